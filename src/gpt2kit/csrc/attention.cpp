// Causal self-attention, fp32, head size 64, on CPU: a prompt's (inference, with or without
// cached keys before it) and training's forward and backward passes.
//   out[b, t, h, :] = softmax_j<=P+t(q[b,h,t] . k[b,h,j] * scale) @ v[b,h,j]
// for queries t < T at absolute positions P + t over S = P + T keys (P keys already cached;
// P = 0 in training).
//
// PyTorch's fp32 flash kernel for CPU runs a 1024-token GPT-2 prompt's attention at ~130 GFLOP/s
// here, ~40% of the matmul peak; these kernels run it at ~215. Scores and probabilities never
// leave L2, and the output is written in (B, T, nh, hs) order, which is what the following
// projection reads, so no transpose pass follows.
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

using gpt2kit::scale_row;
using gpt2kit::softmax_row;

constexpr int kHs = 64;       // head size (every GPT-2 preset's)
#ifdef __AVX512F__
constexpr int kRowsS = 8;     // query rows per score tile
#else
// With AVX2 (avx512_on_avx2.h) each __m512 takes two of only 16 ymm registers: the AVX-512
// tiles' accumulators (8 rows x 2 vectors, 4 rows x 4 vectors: 32 ymm each) were spilled to the
// stack around every FMA. 2 score rows (8 ymm, with the panel's 4 key ymm) and 1 output row (8 ymm)
// stay in registers: a 1024-token prompt's attention ran 1.25x faster on a Zen 2. Tile heights
// only change which rows are computed together, not any sum's terms or their order: the results
// are bit for bit the same.
constexpr int kRowsS = 2;
#endif
constexpr int kKeysS = 32;    // keys per score tile (2 vectors)
#ifdef __AVX512F__
constexpr int kRowsPV = 4;    // query rows per output tile (x 4 vectors = 64 dims)
#else
constexpr int kRowsPV = 1;
#endif
constexpr int kBlock = 64;    // query rows per block (a multiple of both tile heights)


inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Every pass works on one (batch, head) at a time per thread, in blocks of kBlock query rows, and
// keeps every operand of a register tile's inner loop in L1: q, k, v and
// dout rows are kHs floats 3C (or C) floats apart, a stride that maps a block's rows onto a few
// cache sets, so the operands are first packed: K^T (and V^T) in panels of 32 keys (kHs x 32,
// contiguous), K and V as contiguous rows, the block's Q (pre-scaled) and dO rows contiguous.
// In training, packing is also where c_attn's bias is added (q + bq, k + bk, v + bv; the model then computes
// c_attn's product without it), and the backward pass sums dqkv's columns for its gradient: the
// linear layer would otherwise broadcast the bias into all of qkv and sum it back, two passes
// over (B, T, 3C) in memory for what costs nothing here. Products
// whose reduction runs over keys (P V, dS K) go over them in chunks of kChunk keys for every row
// tile of the block, so that a chunk of V or K stays in L1 while it is reused, accumulating in the
// output rows. Score tiles stop at the last 32 keys the tile's rows see, output tiles at their last
// row's position: probabilities past a query's position are exactly 0, so the skipped terms are 0.

constexpr int kChunk = 64;  // keys per pass of the output tiles (16 KiB of V or K)

// A prompt's score block and the backward pass's dS and P block buffers have rows (ld + 16)
// floats apart: an odd number of cache lines, so reads down their columns (the dK and dV tiles;
// a prompt's output tiles read 4 rows at a time) spread over all sets.
inline int64_t padded(int64_t ld) { return ld + 16; }

// dst[i] = scale * (src[i] + bias) (kHs floats; bias may be null: 0) for rows i < n, zeros in rows n..n_pad
inline void pack_rows(const float* src, int64_t src_rs, const float* bias, int64_t n, int64_t n_pad, float* dst,
                      float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512 bv[kHs / 16];
  for (int c = 0; c < kHs / 16; ++c) bv[c] = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < kHs; c += 16)
      _mm512_storeu_ps(dst + i * kHs + c,
                       _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(src + i * src_rs + c), bv[c / 16]), s));
  for (int64_t i = n; i < n_pad; ++i)
    for (int c = 0; c < kHs; c += 16) _mm512_storeu_ps(dst + i * kHs + c, _mm512_setzero_ps());
}

// r[i][c] -> r[c][i] for a 16 x 16 block in registers: 64 shuffles, cheaper than the 16 gathers
// (256 loads) of its columns
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int k = 0; k < 2; ++k) {
      const __m512d a = _mm512_castps_pd(t[i + k]), b = _mm512_castps_pd(t[i + k + 2]);
      r[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
      t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
  }
}

// (src (n, kHs) + bias)^T in panels of kKeysS keys: dst[(j / 32) * kHs * 32 + d * 32 + j % 32] =
// src[j][d] + bias[d] (bias may be null: 0), zero for keys n..round_up(n, 32)
inline void pack_panels(const float* src, int64_t src_rs, const float* bias, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t rows = n - j < 16 ? n - j : 16;
    float* panel = dst + j / kKeysS * kKeysS * kHs + j % kKeysS;
    for (int d0 = 0; d0 < kHs; d0 += 16) {
      const __m512 b = bias ? _mm512_loadu_ps(bias + d0) : _mm512_setzero_ps();
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_add_ps(_mm512_loadu_ps(src + (j + i) * src_rs + d0), b) : _mm512_setzero_ps();
      transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(panel + (d0 + c) * kKeysS, r[c]);
    }
  }
  if (n % kKeysS && n % kKeysS <= 16) {  // the last panel's second half
    float* panel = dst + n / kKeysS * kKeysS * kHs + 16;
    for (int d = 0; d < kHs; ++d) _mm512_storeu_ps(panel + d * kKeysS, _mm512_setzero_ps());
  }
}

// s[r][0..32) = q[r] . kt[:, 0..32) for kRowsS packed rows of q and one panel of kt; rows >= n_rows
// are computed (q is padded with zeros) but not stored
inline void panel_scores(const float* q, const float* kt, float* s, int64_t ld_s, int n_rows) {
  __m512 acc[kRowsS][2];
  for (int r = 0; r < kRowsS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int d = 0; d < kHs; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * kKeysS), k1 = _mm512_loadu_ps(kt + d * kKeysS + 16);
    for (int r = 0; r < kRowsS; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r * kHs + d]);
      acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < n_rows; ++r) {
    _mm512_storeu_ps(s + r * ld_s, acc[r][0]);
    _mm512_storeu_ps(s + r * ld_s + 16, acc[r][1]);
  }
}

// The scores (or dP) of a block of n rows starting at query t0: s[r][j] = q[r] . kt[:, j] for the
// panels of keys each tile of kRowsS rows sees
inline void block_scores(const float* q, const float* kt, int64_t t0, int n, float* s, int64_t ld_s) {
  const int64_t n_pad = round_up(t0 + n, kKeysS);
  for (int64_t j0 = 0; j0 < n_pad; j0 += kKeysS)
    for (int r0 = j0 > t0 ? static_cast<int>((j0 - t0) / kRowsS * kRowsS) : 0; r0 < n; r0 += kRowsS)  // rows that see j0
      panel_scores(q + r0 * kHs, kt + j0 * kHs, s + r0 * ld_s + j0, ld_s, n - r0 < kRowsS ? n - r0 : kRowsS);
}

// out[r] (+)= sum_{j in [j0, j1)} a[r][j] x[j] for kRowsPV rows r of a (rows >= n_rows neither
// stored nor read) and packed rows of x; accumulate: add to out instead of overwriting it.
// a[r][j] is at a[r * lda + j], or, kTransposed, at a[j * lda + r]: the columns of P and dS,
// for P^T dO and dS^T Q of dV and dK
template <bool kTransposed>
inline void output_rows(const float* a, int64_t lda, int n_rows, const float* x, int64_t j0, int64_t j1, float* out,
                        int64_t o_rs, bool accumulate) {
  const float* ar[kRowsPV];
  for (int r = 0; r < kRowsPV; ++r) ar[r] = a + (r < n_rows ? r : 0) * (kTransposed ? 1 : lda);
  __m512 acc[kRowsPV][4];
  for (int r = 0; r < kRowsPV; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = accumulate && r < n_rows ? _mm512_loadu_ps(out + r * o_rs + 16 * c) : _mm512_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    const float* xj = x + j * kHs;
    const __m512 x0 = _mm512_loadu_ps(xj), x1 = _mm512_loadu_ps(xj + 16);
    const __m512 x2 = _mm512_loadu_ps(xj + 32), x3 = _mm512_loadu_ps(xj + 48);
    for (int r = 0; r < kRowsPV; ++r) {
      const __m512 av = _mm512_set1_ps(kTransposed ? ar[r][j * lda] : ar[r][j]);
      acc[r][0] = _mm512_fmadd_ps(av, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, x1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(av, x2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(av, x3, acc[r][3]);
    }
  }
  for (int r = 0; r < n_rows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * o_rs + 16 * c, acc[r][c]);
}

// out[t0 + r] = sum_{j <= t0 + r} p[r][j] v[j] for the n rows of a block (p's rows ld_p apart),
// over chunks of kChunk keys; out's rows o_rs apart
inline void block_outputs(const float* p, int64_t ld_p, const float* v, int64_t t0, int n, float* out, int64_t o_rs) {
  for (int64_t c0 = 0; c0 < t0 + n; c0 += kChunk)
    for (int r0 = 0; r0 < n; r0 += kRowsPV) {
      const int rows = n - r0 < kRowsPV ? n - r0 : kRowsPV;
      const int64_t end = t0 + r0 + rows, c1 = c0 + kChunk < end ? c0 + kChunk : end;  // keys the tile sees
      if (c0 < c1) output_rows<false>(p + r0 * ld_p, ld_p, rows, v, c0, c1, out + r0 * o_rs, o_rs, c0 > 0);
    }
}

// out[j] (+)= sum_{r < n, t0 + r >= j} a[r][j] x[r] for keys j < t0 + n (a's rows lda apart, x packed):
// the block's share of dK or dV; keys before t0 already hold the earlier blocks' shares
inline void block_key_grads(const float* a, int64_t lda, const float* x, int64_t t0, int n, int64_t T, float* out,
                            int64_t o_rs) {
  for (int64_t j0 = 0; j0 < t0 + n; j0 += kRowsPV) {
    const int64_t r0 = j0 > t0 ? j0 - t0 : 0;  // a[r][j] is 0 for rows before key j
    output_rows<true>(a + r0 * lda + j0, lda, T - j0 < kRowsPV ? static_cast<int>(T - j0) : kRowsPV, x + r0 * kHs, 0,
                      n - r0, out + j0 * o_rs, o_rs, j0 < t0);
  }
}

// ds[0..n) = scale * p * (dp - sum_j p[j] dp[j]) (the softmax's backward), zeros in n..n_pad;
// pc[0..n_pad) = p (a copy at the padded stride for block_key_grads)
inline void softmax_backward_row(const float* p, const float* dp, float* ds, float* pc, int64_t n, int64_t n_pad,
                                 float scale) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(p + j), _mm512_loadu_ps(dp + j), acc);
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
  if (j < n) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p + j), _mm512_maskz_loadu_ps(tail, dp + j), acc);
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sv = _mm512_set1_ps(scale);
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 pj = _mm512_loadu_ps(p + j);
    _mm512_storeu_ps(pc + j, pj);
    _mm512_storeu_ps(ds + j, _mm512_mul_ps(_mm512_mul_ps(pj, _mm512_sub_ps(_mm512_loadu_ps(dp + j), dot)), sv));
  }
  if (j < n) {
    const __m512 pj = _mm512_maskz_loadu_ps(tail, p + j);
    _mm512_storeu_ps(pc + j, pj);
    const __m512 g = _mm512_mul_ps(pj, _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, dp + j), dot));
    _mm512_storeu_ps(ds + j, _mm512_maskz_mov_ps(tail, _mm512_mul_ps(g, sv)));
    j += 16;
  }
  for (; j < n_pad; j += 16) {
    _mm512_storeu_ps(pc + j, _mm512_setzero_ps());
    _mm512_storeu_ps(ds + j, _mm512_setzero_ps());
  }
}

// sums[c] = sum_{t < n} x[t][c] for kHs columns, rows x_rs apart, t in order
inline void column_sums(const float* x, int64_t x_rs, int64_t n, float* sums) {
  __m512 acc[kHs / 16];
  for (int c = 0; c < kHs / 16; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t)
    for (int c = 0; c < kHs / 16; ++c) acc[c] = _mm512_add_ps(acc[c], _mm512_loadu_ps(x + t * x_rs + 16 * c));
  for (int c = 0; c < kHs / 16; ++c) _mm512_storeu_ps(sums + 16 * c, acc[c]);
}

}  // namespace

extern "C" {

// q: (B, nh, T, 64), k and v: (B, nh, S, 64), out: (B, T, nh, 64) written as rows of stride
// o_rs (= nh * 64 for a contiguous (B, T, C)); each given by element strides (batch, head, row),
// the last dimension contiguous. S = P + T. bias (3 * nh * 64; null: none), if given, is added to
// q, k and v as they are packed (c_attn's bias, laid out as c_attn writes q, k, v). The passes of training's forward kernel, with the
// probabilities kept per block only, normalized in the output rows (64 floats) instead of in P
// (S floats): packing the operands made gpt2-medium's heads (rows 12 KiB apart, all in one L1
// set) 2x faster than reading them in place.
void gpt2kit_causal_attention_f32(const float* q, int64_t q_bs, int64_t q_hs, int64_t q_rs,
                                  const float* k, int64_t k_bs, int64_t k_hs, int64_t k_rs,
                                  const float* v, int64_t v_bs, int64_t v_hs, int64_t v_rs, const float* bias,
                                  float* out, int64_t o_bs, int64_t o_hs, int64_t o_rs,
                                  int64_t B, int64_t nh, int64_t T, int64_t S, float scale, int threads) {
  const int64_t P = S - T, C = nh * kHs;
  const int64_t ld = round_up(S, kKeysS), ldp = padded(ld);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(2 * kHs * ld + kBlock * kHs + kBlock * ldp + 64);
    float* kt = buf.data();     // K^T in panels
    float* vp = kt + kHs * ld;  // V's rows
    float* qb = vp + kHs * ld;  // the block's rows of Q * scale, padded to whole score tiles
    float* p = qb + kBlock * kHs;  // the block's scores, then probabilities
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const float* qh = q + b * q_bs + h * q_hs;
      float* oh = out + b * o_bs + h * o_hs;
      const float* bq = bias ? bias + h * kHs : nullptr;
      const float* bk = bias ? bq + C : nullptr;
      const float* bv = bias ? bq + 2 * C : nullptr;
      pack_panels(k + b * k_bs + h * k_hs, k_rs, bk, S, kt);
      pack_rows(v + b * v_bs + h * v_hs, v_rs, bv, S, S, vp, 1.0f);
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int n = static_cast<int>(T - t0 < kBlock ? T - t0 : kBlock);
        pack_rows(qh + t0 * q_rs, q_rs, bq, n, round_up(n, kRowsS), qb, scale);
        block_scores(qb, kt, P + t0, n, p, ldp);
        const int64_t n_pad = round_up(P + t0 + n, kKeysS);  // keys the block's score tiles reach
        float inv_sums[kBlock];  // each row's exps are scaled to probabilities in its output (64 floats, not S)
        for (int r = 0; r < n; ++r) inv_sums[r] = softmax_row(p + r * ldp, P + t0 + r + 1, n_pad);
        block_outputs(p, ldp, vp, P + t0, n, oh + t0 * o_rs, o_rs);
        for (int r = 0; r < n; ++r) scale_row(oh + (t0 + r) * o_rs, kHs, inv_sums[r]);
      }
    }
  }
}


// Training, forward: qkv (B, T, 3C) contiguous with C = nh * 64 (q, k, v of every head, as the
// model's c_attn writes them), plus bias (3C) if not null, out (B, T, C); probs (B, nh, T, ld),
// ld = T rounded up to 32, receives each query's attention probabilities (zeros past its position)
// for the backward pass.
void gpt2kit_attention_train_f32(const float* qkv, const float* bias, float* out, float* probs, int64_t B,
                                 int64_t nh, int64_t T, float scale, int threads) {
  const int64_t C = nh * kHs, rs = 3 * C, ld = round_up(T, kKeysS);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(2 * kHs * ld + kBlock * kHs + 64);
    float* kt = buf.data();     // K^T in panels
    float* vp = kt + kHs * ld;  // V's rows
    float* qb = vp + kHs * ld;  // the block's rows of Q * scale, padded to whole score tiles
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const float* q = qkv + b * T * rs + h * kHs;
      float* p = probs + bh * T * ld;
      float* o = out + b * T * C + h * kHs;
      const float* bq = bias ? bias + h * kHs : nullptr;
      const float* bk = bias ? bq + C : nullptr;
      const float* bv = bias ? bq + 2 * C : nullptr;
      pack_panels(q + C, rs, bk, T, kt);
      pack_rows(q + 2 * C, rs, bv, T, T, vp, 1.0f);
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int n = static_cast<int>(T - t0 < kBlock ? T - t0 : kBlock);
        pack_rows(q + t0 * rs, rs, bq, n, round_up(n, kRowsS), qb, scale);
        block_scores(qb, kt, t0, n, p + t0 * ld, ld);
        for (int r = 0; r < n; ++r) {
          float* row = p + (t0 + r) * ld;
          scale_row(row, t0 + r + 1, softmax_row(row, t0 + r + 1, ld));
        }
        block_outputs(p + t0 * ld, ld, vp, t0, n, o + t0 * C, C);
      }
    }
  }
}

// Training, backward: from dout (B, T, C) and what the forward pass read and saved (bias may be
// null), dqkv (B, T, 3C), every element written: dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO,
// with dS the softmax's backward of dP = dO V^T. Per block of query rows: its dP, dS and dQ rows,
// and its share of every dK and dV row it sees, added to the earlier blocks' shares (a key's first
// block writes them). dbias (3C), if not null, receives dqkv's column sums: each (batch, head) sums
// its finished columns over t (in L2 still) into its batch's row of a (B, 3C) buffer, whose rows
// are then added in order, so the result does not depend on the thread count.
void gpt2kit_attention_train_backward_f32(const float* dout, const float* qkv, const float* bias, const float* probs,
                                          float* dqkv, float* dbias, int64_t B, int64_t nh, int64_t T, float scale,
                                          int threads) {
  const int64_t C = nh * kHs, rs = 3 * C, ld = round_up(T, kKeysS), ldd = padded(ld);
  std::vector<float> partial(dbias ? B * rs : 0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(2 * kHs * ld + 2 * kBlock * kHs + 2 * kBlock * ldd + 64);
    float* vt = buf.data();        // V^T in panels
    float* kp = vt + kHs * ld;     // K's rows
    float* dob = kp + kHs * ld;    // the block's rows of dO, padded to whole score tiles
    float* qb = dob + kBlock * kHs;  // the block's rows of Q
    float* ds = qb + kBlock * kHs;   // the block's dP, then dS in place: (kBlock, ldd)
    float* pc = ds + kBlock * ldd;   // the block's P: (kBlock, ldd)
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const float* q = qkv + b * T * rs + h * kHs;
      const float* p = probs + bh * T * ld;
      const float* dout_h = dout + b * T * C + h * kHs;
      float* dq = dqkv + b * T * rs + h * kHs;
      const float* bq = bias ? bias + h * kHs : nullptr;
      const float* bk = bias ? bq + C : nullptr;
      const float* bv = bias ? bq + 2 * C : nullptr;
      pack_panels(q + 2 * C, rs, bv, T, vt);
      pack_rows(q + C, rs, bk, T, T, kp, 1.0f);
      for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
        const int n = static_cast<int>(T - t0 < kBlock ? T - t0 : kBlock);
        pack_rows(dout_h + t0 * C, C, nullptr, n, round_up(n, kRowsS), dob, 1.0f);
        pack_rows(q + t0 * rs, rs, bq, n, n, qb, 1.0f);
        block_scores(dob, vt, t0, n, ds, ldd);
        const int64_t n_pad = round_up(t0 + n, kKeysS);
        for (int r = 0; r < n; ++r)
          softmax_backward_row(p + (t0 + r) * ld, ds + r * ldd, ds + r * ldd, pc + r * ldd, t0 + r + 1, n_pad, scale);
        block_outputs(ds, ldd, kp, t0, n, dq + t0 * rs, rs);
        block_key_grads(ds, ldd, qb, t0, n, T, dq + C, rs);
        block_key_grads(pc, ldd, dob, t0, n, T, dq + 2 * C, rs);
      }
      if (dbias)
        for (int64_t part = 0; part < 3; ++part)
          column_sums(dq + part * C, rs, T, partial.data() + b * rs + part * C + h * kHs);
    }
  }
  if (dbias)
    for (int64_t c = 0; c < rs; ++c) {
      float sum = 0.0f;
      for (int64_t b = 0; b < B; ++b) sum += partial[b * rs + c];
      dbias[c] = sum;
    }
}

}  // extern "C"
