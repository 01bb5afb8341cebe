// The softmax cross-entropy of rows of fp32 logits and its gradient, in one pass over each row
// (for gpt2kit.train's chunked output layer). PyTorch's softmax took 0.85 ns per element here,
// ~3% of a small model's training step.
//
// In place, row i becomes softmax(row i) - onehot(target i), the gradient of the summed loss, and
// nll[i] = log(sum_j exp(x_j - max)) - (x_target - max), -log softmax(row i)[target i] without
// the underflow of taking the log of a tiny probability.
#include <omp.h>
#include <stdint.h>

#include <cmath>

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
