// Training reductions: the softmax cross-entropy of rows of fp32 logits and its gradient, in one
// pass over each row (for gpt2kit.train's chunked output layer); the sum of squares of many
// arrays (the gradients' global norm, for clipping: 3x faster than torch's foreach norm here).
//
// Cross-entropy: PyTorch's softmax took 0.85 ns per element here, ~3% of a small model's
// training step. In place, row i becomes softmax(row i) - onehot(target i), the gradient of the summed loss, and
// nll[i] = log(sum_j exp(x_j - max)) - (x_target - max), -log softmax(row i)[target i] without
// the underflow of taking the log of a tiny probability.
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <utility>
#include <vector>

#include "vecmath.h"

extern "C" void gpt2kit_softmax_xent_f32(float* logits, const int64_t* targets, float* nll, int64_t n, int64_t V,
                                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    float* row = logits + i * V;
    const int64_t t = targets[i];
    const float x_t = row[t];
    float row_max;
    const float inv = gpt2kit::softmax_row(row, V, V, &row_max);
    gpt2kit::scale_row(row, V, inv);
    nll[i] = std::log(1.0f / inv) - (x_t - row_max);
    row[t] -= 1.0f;
  }
}

// The sum of squares of n fp32 arrays (gradients, for their global norm). Work is cut into blocks
// of kBlock elements, each summed in fp32 (as PyTorch's norm does), whose totals are added in
// double, in a fixed order: the result does not depend on the thread count or scheduling (resumed
// runs stay bit-exact).
extern "C" double gpt2kit_sum_squares_f32(const float* const* arrays, const int64_t* sizes, int64_t n, int threads) {
  constexpr int64_t kBlock = 1 << 16;
  std::vector<std::pair<const float*, int64_t>> blocks;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t s = 0; s < sizes[a]; s += kBlock)
      blocks.emplace_back(arrays[a] + s, sizes[a] - s < kBlock ? sizes[a] - s : kBlock);
  std::vector<double> partial(blocks.size());
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < static_cast<int64_t>(blocks.size()); ++b) {
    const float* x = blocks[b].first;
    const int64_t len = blocks[b].second;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 64 <= len; i += 64)
      for (int u = 0; u < 4; ++u) {
        const __m512 v = _mm512_loadu_ps(x + i + 16 * u);
        acc[u] = _mm512_fmadd_ps(v, v, acc[u]);
      }
    for (; i < len; i += 16) {
      const __mmask16 m = gpt2kit::tail_mask(len - i);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
      acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
    }
    partial[b] = static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                                          _mm512_add_ps(acc[2], acc[3]))));
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}
