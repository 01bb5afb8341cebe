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
using gpt2kit::scale_row;
using gpt2kit::softmax_row;

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

// out[r] = sum_j p[r][j] v[j] * inv_sums[r] (1 without inv_sums) over keys first..n_keys for
// kRowsPV rows, p's rows ld_p apart; kTransposed: p[r][j] is read at p[j * ld_p + r] instead
// (the backward pass's P^T and dS^T, without transposing them)
template <bool kTransposed = false>
inline void output_tile(const float* p, int64_t ld_p, int n_rows, const float* v, int64_t v_rs, int64_t n_keys,
                        const float* inv_sums, float* out, int64_t o_rs, int64_t first = 0) {
  __m512 acc[kRowsPV][4];
  for (int r = 0; r < kRowsPV; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = first; j < n_keys; ++j) {
    const float* vj = v + j * v_rs;
    const __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16);
    const __m512 v2 = _mm512_loadu_ps(vj + 32), v3 = _mm512_loadu_ps(vj + 48);
    for (int r = 0; r < kRowsPV; ++r) {
      const int64_t rr = r < n_rows ? r : 0;
      const __m512 pv = _mm512_set1_ps(kTransposed ? p[j * ld_p + rr] : p[rr * ld_p + j]);
      acc[r][0] = _mm512_fmadd_ps(pv, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(pv, v1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(pv, v2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(pv, v3, acc[r][3]);
    }
  }
  for (int r = 0; r < n_rows; ++r) {
    const __m512 inv = _mm512_set1_ps(inv_sums ? inv_sums[r] : 1.0f);
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * o_rs + 16 * c, _mm512_mul_ps(acc[r][c], inv));
  }
}

// dst (cols, ld) = src (n, cols)^T, zero in columns n..ld (ld a multiple of 16): 16 rows of src
// at a time, one gather per column
inline void transpose(const float* src, int64_t src_rs, int64_t n, int64_t cols, float* dst, int64_t ld) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(src_rs)));
  for (int64_t j = 0; j < ld; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xffff)
                                    : n > j ? static_cast<__mmask16>((1u << (n - j)) - 1) : static_cast<__mmask16>(0);
    for (int64_t c = 0; c < cols; ++c)
      _mm512_storeu_ps(dst + c * ld + j, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src + j * src_rs + c, 4));
  }
}

inline void transpose_keys(const float* k, int64_t k_rs, int64_t n, float* kt, int64_t ld) {
  transpose(k, k_rs, n, kHs, kt, ld);
}

// ds[0..n) = scale * p * (dp - sum_j p[j] dp[j]) (the softmax's backward), zeros in n..ld
inline void softmax_backward_row(const float* p, const float* dp, float* ds, int64_t n, int64_t ld, float scale) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(p + j), _mm512_loadu_ps(dp + j), acc);
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
  if (j < n) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p + j), _mm512_maskz_loadu_ps(tail, dp + j), acc);
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sv = _mm512_set1_ps(scale);
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_sub_ps(_mm512_loadu_ps(dp + j), dot));
    _mm512_storeu_ps(ds + j, _mm512_mul_ps(g, sv));
  }
  if (j < n) {
    const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p + j), _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, dp + j), dot));
    _mm512_storeu_ps(ds + j, _mm512_maskz_mov_ps(tail, _mm512_mul_ps(g, sv)));
    j += 16;
  }
  for (; j < ld; j += 16) _mm512_storeu_ps(ds + j, _mm512_setzero_ps());
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

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


// Training, forward: qkv (B, T, 3C) contiguous with C = nh * 64 (q, k, v of every head, as the
// model's c_attn writes them), out (B, T, C); probs (B, nh, T, ld), ld = T rounded up to 32,
// receives each query's attention probabilities (zeros past its position) for the backward pass.
void gpt2kit_attention_train_f32(const float* qkv, float* out, float* probs, int64_t B, int64_t nh, int64_t T,
                                 float scale, int threads) {
  const int64_t C = nh * kHs, rs = 3 * C, ld = round_up(T, kKeysS);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kt_buf(kHs * ld + 16);
    float* kt = kt_buf.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const float* q = qkv + b * T * rs + h * kHs;
      float* p = probs + bh * T * ld;
      transpose_keys(q + C, rs, T, kt, ld);
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int rows = static_cast<int>(T - t0 < kBlock ? T - t0 : kBlock);
        const int64_t n_pad = round_up(t0 + rows, kKeysS);
        for (int64_t j0 = 0; j0 < n_pad; j0 += kKeysS)
          for (int r0 = 0; r0 < rows; r0 += kRowsS)
            score_tile(q + (t0 + r0) * rs, rs, rows - r0 < kRowsS ? rows - r0 : kRowsS, kt, ld, j0, scale,
                       p + (t0 + r0) * ld, ld);
        for (int r = 0; r < rows; ++r) {
          float* row = p + (t0 + r) * ld;
          scale_row(row, t0 + r + 1, softmax_row(row, t0 + r + 1, ld));
        }
        for (int r0 = 0; r0 < rows; r0 += kRowsPV)
          output_tile(p + (t0 + r0) * ld, ld, rows - r0 < kRowsPV ? rows - r0 : kRowsPV, q + 2 * C, rs,
                      t0 + r0 + kRowsPV < T ? t0 + r0 + kRowsPV : T, nullptr, out + b * T * C + (t0 + r0) * C + h * kHs,
                      C);
      }
    }
  }
}

// Training, backward: from dout (B, T, C) and what the forward pass read and saved, dqkv (B, T, 3C),
// every element written: dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO, with dS the softmax's
// backward of dP = dO V^T.
void gpt2kit_attention_train_backward_f32(const float* dout, const float* qkv, const float* probs, float* dqkv,
                                          int64_t B, int64_t nh, int64_t T, float scale, int threads) {
  const int64_t C = nh * kHs, rs = 3 * C, ld = round_up(T, kKeysS);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(T * ld + kHs * ld + 64);
    float* ds = buf.data();           // dP, then dS in place: (T, ld)
    float* vt = ds + T * ld;          // V^T: (64, ld)
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const float* q = qkv + b * T * rs + h * kHs;
      const float* k = q + C;
      const float* v = q + 2 * C;
      const float* p = probs + bh * T * ld;
      const float* dout_h = dout + b * T * C + h * kHs;
      float* dq = dqkv + b * T * rs + h * kHs;
      float* dk = dq + C;
      float* dv = dq + 2 * C;
      for (int64_t j0 = 0; j0 < T; j0 += kRowsPV)  // dV[j] = sum_{i >= j} P[i][j] dO[i]
        output_tile<true>(p + j0, ld, T - j0 < kRowsPV ? static_cast<int>(T - j0) : kRowsPV, dout_h, C, T, nullptr,
                          dv + j0 * rs, rs, j0);
      transpose_keys(v, rs, T, vt, ld);  // dP = dO V^T, over the keys each block of rows sees
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int rows = static_cast<int>(T - t0 < kBlock ? T - t0 : kBlock);
        const int64_t n_pad = round_up(t0 + rows, kKeysS);
        for (int64_t j0 = 0; j0 < n_pad; j0 += kKeysS)
          for (int r0 = 0; r0 < rows; r0 += kRowsS)
            score_tile(dout_h + (t0 + r0) * C, C, rows - r0 < kRowsS ? rows - r0 : kRowsS, vt, ld, j0, 1.0f,
                       ds + (t0 + r0) * ld, ld);
      }
      for (int64_t i = 0; i < T; ++i) softmax_backward_row(p + i * ld, ds + i * ld, ds + i * ld, i + 1, ld, scale);
      for (int64_t r0 = 0; r0 < T; r0 += kRowsPV)  // dQ[i] = sum_{j <= i} dS[i][j] K[j]
        output_tile(ds + r0 * ld, ld, T - r0 < kRowsPV ? static_cast<int>(T - r0) : kRowsPV, k, rs,
                    r0 + kRowsPV < T ? r0 + kRowsPV : T, nullptr, dq + r0 * rs, rs);
      for (int64_t j0 = 0; j0 < T; j0 += kRowsPV)  // dK[j] = sum_{i >= j} dS[i][j] Q[i]
        output_tile<true>(ds + j0, ld, T - j0 < kRowsPV ? static_cast<int>(T - j0) : kRowsPV, q, rs, T, nullptr,
                          dk + j0 * rs, rs, j0);
    }
  }
}

}  // extern "C"
