// A pre-LN block's LayerNorm for inference on CPU, fp32, with the residual stream's next bias:
//   h = (x - mean(x)) * rstd * w + b,   rstd = 1 / sqrt(var(x) + eps)   (per row of C)
//   x += bias                           (in place, after h is taken)
// The sub-block's output projection then accumulates into x (a GEMM with beta = 1), so that
// x + (y W^T + bias) costs no bias broadcast, no separate add and no fresh (rows, C) tensor: the
// bias rides along in the LayerNorm's pass, which reads x anyway. A row stays in L1 between the
// passes over it. Mean and variance are taken in two passes (as PyTorch's kernel does, to within
// float rounding).
#include <omp.h>
#include <stdint.h>

#include <cmath>

#include "vecmath.h"

namespace {

using gpt2kit::tail_mask;

inline __m512 load(const float* p, int64_t j, int64_t C) { return _mm512_maskz_loadu_ps(tail_mask(C - j), p + j); }
inline void store(float* p, int64_t j, int64_t C, __m512 v) { _mm512_mask_storeu_ps(p + j, tail_mask(C - j), v); }

}  // namespace

extern "C" {

// x (rows, C), rows x_rs floats apart, updated in place when bias is not null; w, b, bias (C);
// h (rows, C) contiguous
void gpt2kit_layer_norm_add_f32(float* x, int64_t x_rs, const float* bias, const float* w, const float* b, float* h,
                                int64_t rows, int64_t C, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * x_rs;
    float* hr = h + r * C;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += 16) sum = _mm512_add_ps(sum, load(xr, j, C));
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / static_cast<float>(C));
    __m512 sq = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += 16) {
      const __m512 d = _mm512_maskz_sub_ps(tail_mask(C - j), load(xr, j, C), mv);
      sq = _mm512_fmadd_ps(d, d, sq);
    }
    const __m512 rv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(C) + eps));
    for (int64_t j = 0; j < C; j += 16) {
      const __m512 v = load(xr, j, C);
      store(hr, j, C, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(v, mv), rv), load(w, j, C), load(b, j, C)));
      if (bias) store(xr, j, C, _mm512_add_ps(v, load(bias, j, C)));
    }
  }
}

}  // extern "C"
