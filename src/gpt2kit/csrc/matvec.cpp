// Few-row matrix products for CPU decoding: y (M, N) = x (M, K) @ w (N, K)^T + bias, for M of
// 1..16 (the rows being decoded), w the weight of an nn.Linear as it is, row-major (out, in).
//
// Decoding reads every weight once per token, so what counts is how fast the weights stream from
// memory. Each thread takes a contiguous range of output rows and walks it 4 rows at a time over
// the whole K: the weights are read once, sequentially, and every x row is reused from L1 for
// those 4 weight rows. Accumulation is in fp32 (FMA; for bf16, the VDPBF16PS pair
// products, which treat denormals as zero, or, on CPUs without AVX512-BF16, bf16 widened to fp32
// and FMA), a bias is added in fp32, and bf16 outputs are rounded once, to nearest even, as
// PyTorch rounds (a NaN becomes the canonical quiet NaN). Only `gpt2kit_matvec_bf16` executes
// AVX512-BF16 instructions; the caller checks the CPU before calling it.
//
// Built by gpt2kit/kernels.py with the system C++ compiler (-O3 -std=c++17 -mavx512f -mavx512bw
// -mavx512vl -mavx512bf16 -fopenmp, or on CPUs with AVX2 but no AVX-512, -mavx2 -mfma -mf16c with
// avx512_on_avx2.h); OpenMP resolves to the libgomp that PyTorch has already loaded, and the
// caller passes torch's thread count.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "avx512_on_avx2.h"  // last

namespace {

constexpr int kRows = 4;  // weight rows per tile
constexpr int kCols = 4;  // x rows per tile
// Software prefetch into L2, whole tiles ~32 KB ahead: with K = 768 a tile's rows are short
// streams (1.5-3 KB) that the hardware prefetcher barely ramps up on, and prefetching into L1
// is capped by its few miss buffers. Measured here: bf16 1.6x, fp32 1.5x faster than without.
constexpr int64_t kAheadBytes = 32768;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The four horizontal sums of a, b, c, d at once (a transpose-and-add: ~10 instructions instead of
// ~4 x 8 for four separate reductions, which matters when rows are short).
inline void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // [a b c d] x 4 lanes
  const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), upper);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
}

template <int RR, int MM>
inline void reduce_tile(__m512 (&acc)[MM][RR], float out[kCols][kRows]) {
  for (int m = 0; m < MM; ++m) {
    if constexpr (RR == 4) {
      reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out[m]);
    } else {
      for (int r = 0; r < RR; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
    }
  }
}

// What differs between the element kinds: the element type, how many fill a 512-bit register, how
// to load them (all, or the first n with zeros after), and the multiply-add into fp32 sums.
struct F32 {
  using T = float;
  using Vec = __m512;
  static constexpr int64_t kCount = 16;
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load_first(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

#ifdef __AVX512BF16__
struct Bf16Pairs {  // bf16 on CPUs with AVX512-BF16: VDPBF16PS adds adjacent pair products into fp32 lanes
  using T = uint16_t;
  using Vec = __m512bh;
  static constexpr int64_t kCount = 32;
  static Vec load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Vec load_first(const uint16_t* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, a, b); }
};
#endif

struct Bf16Widened {  // bf16 on any CPU: a bf16 is the top half of an fp32, so widen and FMA
  using T = uint16_t;
  using Vec = __m512;
  static constexpr int64_t kCount = 16;
  static Vec widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static Vec load(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static Vec load_first(const uint16_t* p, int64_t n) {
    return widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

// out[m][r] = dot(x row m, w row r) for RR weight rows and MM x rows.
template <typename L, int RR, int MM>
inline void tile(const typename L::T* x, int64_t K, const typename L::T* w, int64_t ahead,
                 float out[kCols][kRows]) {
  using T = typename L::T;
  __m512 acc[MM][RR];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_setzero_ps();
  auto accumulate = [&](int64_t k, auto load_w, auto load_x) {
    typename L::Vec wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = load_w(w + r * K + k);
    for (int m = 0; m < MM; ++m) {
      const typename L::Vec xv = load_x(x + m * K + k);
      for (int r = 0; r < RR; ++r) acc[m][r] = L::madd(acc[m][r], wv[r], xv);
    }
  };
  const auto load = [](const T* p) { return L::load(p); };
  const auto fetch_ahead_and_load = [ahead](const T* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
    return L::load(p);
  };
  int64_t k = 0;
  for (; k + L::kCount <= K; k += L::kCount) accumulate(k, fetch_ahead_and_load, load);
  if (k < K) {  // the tail: lanes past K load as zeros
    const auto load_first = [n = K - k](const T* p) { return L::load_first(p, n); };
    accumulate(k, load_first, load_first);
  }
  reduce_tile<RR, MM>(acc, out);
}

template <typename L, int RR>
inline void tile_any_m(const typename L::T* x, int64_t K, const typename L::T* w, int64_t ahead, int mm,
                       float out[kCols][kRows]) {
  switch (mm) {
    case 1: tile<L, RR, 1>(x, K, w, ahead, out); break;
    case 2: tile<L, RR, 2>(x, K, w, ahead, out); break;
    case 3: tile<L, RR, 3>(x, K, w, ahead, out); break;
    default: tile<L, RR, 4>(x, K, w, ahead, out); break;
  }
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

template <typename L, typename T = typename L::T>
void matvec(const T* x, int64_t M, int64_t K, const T* w, const T* bias, T* y, int64_t N, int threads) {
  const int64_t tiles = (N + kRows - 1) / kRows;
  const int64_t tile_bytes = kRows * K * static_cast<int64_t>(sizeof(T));
  const int64_t ahead = (kAheadBytes + tile_bytes - 1) / tile_bytes * kRows * K;  // whole tiles, in elements
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = t * kRows;
    const int rows = N - n < kRows ? static_cast<int>(N - n) : kRows;
    for (int64_t m0 = 0; m0 < M; m0 += kCols) {
      const int mm = M - m0 < kCols ? static_cast<int>(M - m0) : kCols;
      float out[kCols][kRows];
      if (rows == kRows) {
        tile_any_m<L, kRows>(x + m0 * K, K, w + n * K, ahead, mm, out);
      } else {  // the last few rows, one at a time
        for (int r = 0; r < rows; ++r) {
          float one[kCols][kRows];
          tile_any_m<L, 1>(x + m0 * K, K, w + (n + r) * K, ahead, mm, one);
          for (int m = 0; m < mm; ++m) out[m][r] = one[m][0];
        }
      }
      for (int m = 0; m < mm; ++m)
        for (int r = 0; r < rows; ++r)
          store(y, (m0 + m) * N + n + r, out[m][r] + (bias ? load(bias, n + r) : 0.0f));
    }
  }
}

}  // namespace

extern "C" {

void gpt2kit_matvec_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, const uint16_t* bias,
                         uint16_t* y, int64_t N, int threads) {
#ifdef __AVX512BF16__
  matvec<Bf16Pairs>(x, M, K, w, bias, y, N, threads);
#else  // the AVX2 build, loaded where torch runs its AVX2 code (ATEN_CPU_CAPABILITY=avx2 on a CPU with bf16 units)
  matvec<Bf16Widened>(x, M, K, w, bias, y, N, threads);
#endif
}

void gpt2kit_matvec_bf16_widened(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                                 const uint16_t* bias, uint16_t* y, int64_t N, int threads) {
  matvec<Bf16Widened>(x, M, K, w, bias, y, N, threads);
}

void gpt2kit_matvec_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y,
                        int64_t N, int threads) {
  matvec<F32>(x, M, K, w, bias, y, N, threads);
}

}  // extern "C"
