// Causal self-attention of a prompt, fp32, head size 64, for CPU inference:
//   out[b, t, h, :] = softmax_j<=P+t(q[b,h,t] . k[b,h,j] * scale) @ v[b,h,j]
// for queries t < T at absolute positions P + t over S = P + T keys (P keys already cached).
//
// PyTorch's fp32 flash kernel for CPU runs a 1024-token GPT-2 prompt's attention at ~150 GFLOP/s
// here, half the matmul peak: 14% of the whole forward pass. This kernel works on one (batch,
// head) at a time per thread, with the head's keys transposed once into a scratch buffer that
// stays in L2. For each block of query rows it computes the scores against every key the block
// may see (register tiles of 8 rows x 32 keys: each step broadcasts one element of 8 query rows
// and multiplies two vectors of keys), takes each row's softmax in place (vecmath.h's exp),
// and multiplies the probabilities with the values (tiles of 4 rows x 64 dims). Scores and
// probabilities never leave L2; the output is written in (B, T, nh, hs) order, which is what the
// following projection reads, so no transpose pass follows either.
//
// The sums are over the same terms as any attention, in another order: results differ from
// PyTorch's by float rounding only. Keys past a query's position get probability exactly 0.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#include "vecmath.h"

namespace {

using gpt2kit::exp512;

constexpr int kHs = 64;       // head size (every GPT-2 preset's)
constexpr int kRowsS = 8;     // query rows per score tile
constexpr int kKeysS = 32;    // keys per score tile (2 vectors)
constexpr int kRowsPV = 4;    // query rows per output tile (x 4 vectors = 64 dims)
constexpr int kBlock = 64;    // query rows per block (a multiple of both tile heights)


// scores[r][j] = scale * q[r] . kt[:, j] for kRowsS rows (rows >= n_rows are skipped) and the
// kKeysS keys starting at j0; kt is (kHs, ld_kt) row-major
inline void score_tile(const float* q, int64_t q_rs, int n_rows, const float* kt, int64_t ld_kt, int64_t j0,
                       float scale, float* scores, int64_t ld_s) {
  __m512 acc[kRowsS][2];
  for (int r = 0; r < kRowsS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int d = 0; d < kHs; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * ld_kt + j0);
    const __m512 k1 = _mm512_loadu_ps(kt + d * ld_kt + j0 + 16);
    for (int r = 0; r < kRowsS; ++r) {
      const __m512 qv = _mm512_set1_ps(q[(r < n_rows ? r : 0) * q_rs + d]);
      acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < n_rows; ++r) {
    _mm512_storeu_ps(scores + r * ld_s + j0, _mm512_mul_ps(acc[r][0], s));
    _mm512_storeu_ps(scores + r * ld_s + j0 + 16, _mm512_mul_ps(acc[r][1], s));
  }
}

// out[r] = sum_j p[r][j] v[j] / sums[r] over keys 0..n_keys for kRowsPV rows
inline void output_tile(const float* p, int64_t ld_p, int n_rows, const float* v, int64_t v_rs, int64_t n_keys,
                        const float* inv_sums, float* out, int64_t o_rs) {
  __m512 acc[kRowsPV][4];
  for (int r = 0; r < kRowsPV; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_keys; ++j) {
    const float* vj = v + j * v_rs;
    const __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16);
    const __m512 v2 = _mm512_loadu_ps(vj + 32), v3 = _mm512_loadu_ps(vj + 48);
    for (int r = 0; r < kRowsPV; ++r) {
      const __m512 pv = _mm512_set1_ps(p[(r < n_rows ? r : 0) * ld_p + j]);
      acc[r][0] = _mm512_fmadd_ps(pv, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(pv, v1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(pv, v2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(pv, v3, acc[r][3]);
    }
  }
  for (int r = 0; r < n_rows; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sums[r]);
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * o_rs + 16 * c, _mm512_mul_ps(acc[r][c], inv));
  }
}

// softmax of row[0..n) in place (entries n..n_pad are set to 0); returns 1 / sum of the exps
inline float softmax_row(float* row, int64_t n, int64_t n_pad) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
  if (j < n) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, row + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx));
    _mm512_storeu_ps(row + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), mx)));
    _mm512_storeu_ps(row + j, e);  // zeros past n
    sum = _mm512_add_ps(sum, e);
    j += 16;
  }
  for (; j < n_pad; j += 16) _mm512_storeu_ps(row + j, _mm512_setzero_ps());
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// kt (64, ld) = k (n, 64)^T, zero past n: 16 keys at a time, one gather per dimension
inline void transpose_keys(const float* k, int64_t k_rs, int64_t n, float* kt, int64_t ld) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(k_rs)));
  for (int64_t j = 0; j < ld; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xffff)
                                    : n > j ? static_cast<__mmask16>((1u << (n - j)) - 1) : static_cast<__mmask16>(0);
    for (int d = 0; d < kHs; ++d)
      _mm512_storeu_ps(kt + d * ld + j, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, k + j * k_rs + d, 4));
  }
}

}  // namespace

extern "C" {

// q: (B, nh, T, 64), k and v: (B, nh, S, 64), out: (B, T, nh, 64) written as rows of stride
// o_rs (= nh * 64 for a contiguous (B, T, C)); each given by element strides (batch, head, row),
// the last dimension contiguous. S = P + T.
void gpt2kit_causal_attention_f32(const float* q, int64_t q_bs, int64_t q_hs, int64_t q_rs,
                                  const float* k, int64_t k_bs, int64_t k_hs, int64_t k_rs,
                                  const float* v, int64_t v_bs, int64_t v_hs, int64_t v_rs,
                                  float* out, int64_t o_bs, int64_t o_hs, int64_t o_rs,
                                  int64_t B, int64_t nh, int64_t T, int64_t S, float scale, int threads) {
  const int64_t P = S - T;
  const int64_t ld = (S + kKeysS - 1) / kKeysS * kKeysS;  // keys padded to whole score tiles
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kt_buf(kHs * ld + 16), scores_buf(kBlock * ld + 16);
    float* kt = kt_buf.data();
    float* scores = scores_buf.data();
    float inv_sums[kBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const float* qh = q + b * q_bs + h * q_hs;
      const float* kh = k + b * k_bs + h * k_hs;
      const float* vh = v + b * v_bs + h * v_hs;
      float* oh = out + b * o_bs + h * o_hs;
      transpose_keys(kh, k_rs, S, kt, ld);
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int rows = static_cast<int>(T - t0 < kBlock ? T - t0 : kBlock);
        const int64_t n_keys = P + t0 + rows;  // what the block's last row sees
        const int64_t n_pad = (n_keys + kKeysS - 1) / kKeysS * kKeysS;
        for (int64_t j0 = 0; j0 < n_pad; j0 += kKeysS)
          for (int r0 = 0; r0 < rows; r0 += kRowsS)
            score_tile(qh + (t0 + r0) * q_rs, q_rs, rows - r0 < kRowsS ? rows - r0 : kRowsS, kt, ld, j0, scale,
                       scores + r0 * ld, ld);
        for (int r = 0; r < rows; ++r) inv_sums[r] = softmax_row(scores + r * ld, P + t0 + r + 1, n_pad);
        for (int r0 = 0; r0 < rows; r0 += kRowsPV)
          output_tile(scores + r0 * ld, ld, rows - r0 < kRowsPV ? rows - r0 : kRowsPV, vh, v_rs, n_keys,
                      inv_sums + r0, oh + (t0 + r0) * o_rs, o_rs);
      }
    }
  }
}

}  // extern "C"
