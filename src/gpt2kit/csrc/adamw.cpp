// One AdamW step (Loshchilov & Hutter) over many fp32 CPU tensors, in one parallel pass.
//
// The optimizer step of a 124M model reads a gradient, a parameter and two moments and writes
// three of them back, 28 bytes per parameter: ~80 ms of a ~1.6 s CPU training step at the
// memory bandwidth a core gets here. PyTorch's fused CPU AdamW runs one parallel loop per
// tensor, and with a gradient scale (how gpt2kit.train folds the clipping in) it also stores the
// scaled gradient back. This kernel runs all tensors in one parallel region, prefetches its four
// input streams (each core then moves 54 instead of 45 GB/s here) and leaves the gradients as
// they are. The arithmetic is PyTorch's fused AdamW's, operation for operation, so parameters and
// moments come out bit-identical to torch.optim.AdamW(fused=True) (2.13) in tensors whose size is
// a multiple of 16 (every GPT-2 shape's), and equal to float rounding in the rest.
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#include "vecmath.h"

namespace {

// Per tensor: its parameter group's hyperparameters and its own bias corrections (PyTorch keeps a
// step count per parameter).
struct AdamWCoefficients {
  float decay;         // 1 - lr * weight_decay
  float w1;            // 1 - beta1, the weight of the gradient in the first moment's lerp
  float beta2;
  float w2;            // 1 - beta2
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size; // -lr / (1 - beta1^step)
};

constexpr int64_t kBlock = 1 << 16;   // elements per work item
constexpr int64_t kPrefetch = 512;    // elements ahead (2 KB per stream)

// Elements [0, n) of one tensor, with the operations of PyTorch's fused AdamW (vector loop) in
// its order: g /= scale; p *= decay; m = lerp(m, g, w1); v = fma(w2 g, g, v beta2) (its source
// writes v beta2 + (w2 g) g, which its compiler contracted into this FMA);
// p = p + (neg_step m) / (sqrt(v) / bc2_sqrt + eps). PyTorch does the last numel % 16 elements of
// a tensor in a scalar loop that its compiler contracted differently again: there the results
// agree to float rounding only.
void adamw_range(float* p, float* m, float* v, const float* g, int64_t n, const AdamWCoefficients& c,
                 float grad_scale) {
  // torch.lerp's two forms: m + w (g - m) for a weight below 0.5, g + (w - 1)(g - m) from 0.5 on
  const bool from_m = std::fabs(c.w1) < 0.5f;
  const __m512 decay = _mm512_set1_ps(c.decay), beta2 = _mm512_set1_ps(c.beta2), w2 = _mm512_set1_ps(c.w2),
               bc2_sqrt = _mm512_set1_ps(c.bc2_sqrt), eps = _mm512_set1_ps(c.eps),
               neg_step = _mm512_set1_ps(c.neg_step_size), scale = _mm512_set1_ps(grad_scale),
               lerp_w = from_m ? _mm512_set1_ps(c.w1) : _mm512_sub_ps(_mm512_set1_ps(c.w1), _mm512_set1_ps(1.0f));
  const bool scaled = grad_scale != 1.0f;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = gpt2kit::tail_mask(n - i);
    if (i + kPrefetch < n) {
      _mm_prefetch(reinterpret_cast<const char*>(g + i + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + i + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + i + kPrefetch), _MM_HINT_T0);
    }
    __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
    if (scaled) gv = _mm512_div_ps(gv, scale);
    __m512 pv = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + i), decay);
    gpt2kit::opaque(pv);  // keeps the compiler from contracting this product and the last sum into an FMA
    const __m512 m_old = _mm512_maskz_loadu_ps(k, m + i);
    const __m512 mv = _mm512_fmadd_ps(lerp_w, _mm512_sub_ps(gv, m_old), from_m ? m_old : gv);
    const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(w2, gv), gv, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), bc2_sqrt), eps);
    _mm512_mask_storeu_ps(m + i, k, mv);
    _mm512_mask_storeu_ps(v + i, k, vv);
    _mm512_mask_storeu_ps(p + i, k, _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(neg_step, mv), denom)));
  }
}

}  // namespace

// n tensors: params[a], grads[a], exp_avgs[a], exp_avg_sqs[a] hold sizes[a] contiguous floats;
// coefficients[7a .. 7a+6] are tensor a's AdamWCoefficients; the gradients are divided by
// grad_scale (1 = not scaled) as they are read and are not written.
extern "C" void gpt2kit_adamw_f32(float* const* params, const float* const* grads, float* const* exp_avgs,
                                  float* const* exp_avg_sqs, const int64_t* sizes, const float* coefficients,
                                  int64_t n, float grad_scale, int threads) {
  struct Item {
    int64_t tensor, start, len;
  };
  std::vector<Item> items;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t s = 0; s < sizes[a]; s += kBlock) items.push_back({a, s, sizes[a] - s < kBlock ? sizes[a] - s : kBlock});
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < static_cast<int64_t>(items.size()); ++b) {
    const Item& it = items[b];
    const float* c = coefficients + 7 * it.tensor;
    const AdamWCoefficients coef{c[0], c[1], c[2], c[3], c[4], c[5], c[6]};
    adamw_range(params[it.tensor] + it.start, exp_avgs[it.tensor] + it.start, exp_avg_sqs[it.tensor] + it.start,
                grads[it.tensor] + it.start, it.len, coef, grad_scale);
  }
}
