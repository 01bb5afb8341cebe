// The AVX-512 intrinsics gpt2kit's kernels use, for CPUs with AVX2 and FMA only (kernels.py builds
// the same sources with -mavx2 -mfma -mf16c there). In the AVX-512 build this header is empty.
//
// Each 512-bit vector is a pair of 256-bit halves, and each intrinsic does to both halves what the
// AVX-512 instruction does to its 16 (or 8) lanes, with the same lane semantics (the in-lane
// shuffles and unpacks work per 128-bit lane in both), the same operation order where it changes
// a rounding (the reductions follow GCC's own _mm512_reduce_*_ps), and the same memory behaviour
// (masked loads and stores touch no element outside their mask). Built with -ffp-contract=off,
// the two builds then round the same operations in the same order, so their results are meant
// to be the same bit for bit: each function here was checked against the instruction's
// definition on random and edge inputs (not on AVX-512 hardware), and the AVX-512 build
// contracts nothing but 0 - x*y into an FNMADD, which gives the same value. _mm512_scalef_ps
// rounds as VSCALEFPS under a condition exp512 meets (see there). attention.cpp picks smaller
// register tiles for this build, which does not change its sums.
//
// How the kernels reach these: __m512 in GCC is a vector of 16 floats that, without AVX-512, it
// keeps in memory and moves lane by lane (many times slower code), so the types are redefined as
// structs of two __m256 (which GCC keeps in two ymm registers), and each intrinsic name used by
// the kernels is a macro for the function of the same name here. The kernels call intrinsics from
// anonymous namespaces and from extern "C" functions at global scope, where overloads in a
// namespace would be ambiguous with GCC's declarations, hence macros. Include this header after
// every system header (vecmath.h includes it last).
//
// Not here: AVX512-BF16 (VDPBF16PS) and the 512-bit 16-bit-lane loads of matvec.cpp's Bf16Pairs,
// which that file compiles only where the compiler targets AVX512-BF16.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#ifndef __AVX512F__

#ifndef __AVX2__
#error "gpt2kit's kernels need AVX-512 or AVX2 with FMA"
#endif
#ifndef __FMA__
#error "gpt2kit's kernels need AVX-512 or AVX2 with FMA"
#endif

// Immediate operands (shuffle controls, shift counts, predicates) reach the builtins through these
// always-inlined functions' parameters, which takes optimization: kernels.py builds with -O3
// (at -O0 GCC rejects these calls).
#define GPT2KIT_INLINE inline __attribute__((__always_inline__))

namespace gpt2kit {
namespace avx2 {

struct m512 {  // 16 floats: lanes 0-7 in lo, 8-15 in hi
  __m256 lo, hi;
};
struct m512i {  // 16 int32 (the only integer lanes the kernels use)
  __m256i lo, hi;
};
struct m512d {  // 8 doubles (only as a cast of 16 floats)
  __m256d lo, hi;
};

// The 8 lanes of a half (k's low 8 bits) as all-ones / all-zeros 32-bit lanes.
GPT2KIT_INLINE __m256i lanes_of(unsigned k) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(k & 0xffu)), bits), bits);
}
GPT2KIT_INLINE __m256i lanes_lo(__mmask16 k) { return lanes_of(k); }
GPT2KIT_INLINE __m256i lanes_hi(__mmask16 k) { return lanes_of(static_cast<unsigned>(k) >> 8); }

// --- loads, stores, constants

GPT2KIT_INLINE m512 _mm512_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
GPT2KIT_INLINE m512 _mm512_set1_ps(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
GPT2KIT_INLINE m512i _mm512_set1_epi32(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
GPT2KIT_INLINE m512 _mm512_loadu_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
GPT2KIT_INLINE void _mm512_storeu_ps(void* p, m512 v) {
  float* f = static_cast<float*>(p);
  _mm256_storeu_ps(f, v.lo);
  _mm256_storeu_ps(f + 8, v.hi);
}
// VMASKMOVPS does not fault on masked-off lanes, like AVX-512's masked moves; a full mask (every
// vector but a row's last) takes the plain move, which is faster (AMD runs masked stores slowly).
GPT2KIT_INLINE m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
  const float* f = static_cast<const float*>(p);
  if (k == 0xffff) return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
  return {_mm256_maskload_ps(f, lanes_lo(k)), _mm256_maskload_ps(f + 8, lanes_hi(k))};
}
GPT2KIT_INLINE void _mm512_mask_storeu_ps(void* p, __mmask16 k, m512 v) {
  float* f = static_cast<float*>(p);
  if (k == 0xffff) {
    _mm256_storeu_ps(f, v.lo);
    _mm256_storeu_ps(f + 8, v.hi);
  } else {
    _mm256_maskstore_ps(f, lanes_lo(k), v.lo);
    _mm256_maskstore_ps(f + 8, lanes_hi(k), v.hi);
  }
}
// 16 bf16 (as uint16) under a mask: AVX2 has no 16-bit masked move, so partial ones go element by
// element (only a row's last vector is partial).
GPT2KIT_INLINE __m256i _mm256_maskz_loadu_epi16(__mmask16 k, const void* p) {
  if (k == 0xffff) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  const uint16_t* h = static_cast<const uint16_t*>(p);
  alignas(32) uint16_t buf[16] = {};
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) buf[i] = h[i];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}
GPT2KIT_INLINE void _mm256_mask_storeu_epi16(void* p, __mmask16 k, __m256i v) {
  if (k == 0xffff) return _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  uint16_t* h = static_cast<uint16_t*>(p);
  alignas(32) uint16_t buf[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(buf), v);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) h[i] = buf[i];
}

// --- arithmetic (lane by lane)

GPT2KIT_INLINE m512 _mm512_add_ps(m512 a, m512 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
GPT2KIT_INLINE m512 _mm512_sub_ps(m512 a, m512 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
GPT2KIT_INLINE m512 _mm512_mul_ps(m512 a, m512 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
GPT2KIT_INLINE m512 _mm512_div_ps(m512 a, m512 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
GPT2KIT_INLINE m512 _mm512_sqrt_ps(m512 a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
// max/min return the second operand where either is NaN, on both ISAs (exp512 relies on it)
GPT2KIT_INLINE m512 _mm512_max_ps(m512 a, m512 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
GPT2KIT_INLINE m512 _mm512_min_ps(m512 a, m512 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
GPT2KIT_INLINE m512 _mm512_fmadd_ps(m512 a, m512 b, m512 c) {  // a b + c, rounded once
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
GPT2KIT_INLINE m512 _mm512_fnmadd_ps(m512 a, m512 b, m512 c) {  // -(a b) + c, rounded once
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
GPT2KIT_INLINE m512i _mm512_add_epi32(m512i a, m512i b) {
  return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)};
}
GPT2KIT_INLINE m512i _mm512_and_si512(m512i a, m512i b) {
  return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)};
}
GPT2KIT_INLINE m512i _mm512_slli_epi32(m512i a, unsigned n) {
  return {_mm256_slli_epi32(a.lo, static_cast<int>(n)), _mm256_slli_epi32(a.hi, static_cast<int>(n))};
}
GPT2KIT_INLINE m512i _mm512_srli_epi32(m512i a, unsigned n) {
  return {_mm256_srli_epi32(a.lo, static_cast<int>(n)), _mm256_srli_epi32(a.hi, static_cast<int>(n))};
}

// ROUNDPS with the same rounding-control bits; only a scale of 0 (imm < 16, the kernels' use):
// VRNDSCALEPS's upper four bits keep that many fraction bits, which ROUNDPS cannot.
GPT2KIT_INLINE m512 _mm512_roundscale_ps(m512 a, const int imm) {
  if (imm >> 4) __builtin_trap();  // folded away for constant imm (always inlined)
  return {_mm256_round_ps(a.lo, imm), _mm256_round_ps(a.hi, imm)};
}

// a * 2^floor(b). VSCALEFPS rounds once, and so does this where a * 2^(floor(b)/2 rounded down)
// is a normal float: true in exp512 (a in [0.5, 2], |b| <= 160), where the first of the two
// power-of-two steps below is then exact and the second rounds once, overflowing to inf and
// underflowing through the denormals to 0 as VSCALEFPS does. floor(b) is clamped to [-252, 252]
// (a finite a near 1 is inf or 0 far before that), so each step's power of two is a normal
// float. b must not be NaN (VSCALEFPS returns NaN there; exp512's b is NaN only where a is).
GPT2KIT_INLINE __m256 scalef_half(__m256 a, __m256 b) {
  const __m256 n = _mm256_min_ps(_mm256_set1_ps(252.0f), _mm256_max_ps(_mm256_set1_ps(-252.0f), _mm256_floor_ps(b)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);  // n1 + n2 = n, each in [-126, 126]
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(a, p1), p2);
}
GPT2KIT_INLINE m512 _mm512_scalef_ps(m512 a, m512 b) { return {scalef_half(a.lo, b.lo), scalef_half(a.hi, b.hi)}; }

// --- masks: bit i of a __mmask16 is lane i

GPT2KIT_INLINE __mmask16 _mm512_cmp_ps_mask(m512 a, m512 b, const int pred) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, pred));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, pred));
  return static_cast<__mmask16>(lo | hi << 8);
}
GPT2KIT_INLINE m512 _mm512_maskz_mov_ps(__mmask16 k, m512 a) {  // a where k, else +0
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lanes_lo(k))), _mm256_and_ps(a.hi, _mm256_castsi256_ps(lanes_hi(k)))};
}
GPT2KIT_INLINE m512 _mm512_maskz_sub_ps(__mmask16 k, m512 a, m512 b) { return _mm512_maskz_mov_ps(k, _mm512_sub_ps(a, b)); }
GPT2KIT_INLINE m512 blend(m512 src, __mmask16 k, m512 a) {  // a where k, else src
  return {_mm256_blendv_ps(src.lo, a.lo, _mm256_castsi256_ps(lanes_lo(k))),
          _mm256_blendv_ps(src.hi, a.hi, _mm256_castsi256_ps(lanes_hi(k)))};
}
GPT2KIT_INLINE m512 _mm512_mask_max_ps(m512 src, __mmask16 k, m512 a, m512 b) { return blend(src, k, _mm512_max_ps(a, b)); }
GPT2KIT_INLINE m512 _mm512_mask_mul_ps(m512 src, __mmask16 k, m512 a, m512 b) { return blend(src, k, _mm512_mul_ps(a, b)); }
GPT2KIT_INLINE m512i _mm512_mask_mov_epi32(m512i src, __mmask16 k, m512i a) {
  return {_mm256_blendv_epi8(src.lo, a.lo, lanes_lo(k)), _mm256_blendv_epi8(src.hi, a.hi, lanes_hi(k))};
}

// --- horizontal reductions, in the order of GCC's _mm512_reduce_*_ps: (hi 256 op lo 256), then
// (hi 128 op lo 128), then lanes {2,3} onto {0,1}, then lane 1 onto lane 0

GPT2KIT_INLINE float _mm512_reduce_add_ps(m512 a) {
  const __m256 t3 = _mm256_add_ps(a.hi, a.lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
  return _mm_cvtss_f32(_mm_add_ss(t8, _mm_movehdup_ps(t8)));
}
GPT2KIT_INLINE float _mm512_reduce_max_ps(m512 a) {
  const __m256 t3 = _mm256_max_ps(a.hi, a.lo);
  const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1))));
}

// --- shuffles: the in-lane ones act on each 128-bit lane alike, as their 256-bit forms do

GPT2KIT_INLINE m512 _mm512_unpacklo_ps(m512 a, m512 b) {
  return {_mm256_unpacklo_ps(a.lo, b.lo), _mm256_unpacklo_ps(a.hi, b.hi)};
}
GPT2KIT_INLINE m512 _mm512_unpackhi_ps(m512 a, m512 b) {
  return {_mm256_unpackhi_ps(a.lo, b.lo), _mm256_unpackhi_ps(a.hi, b.hi)};
}
GPT2KIT_INLINE m512d _mm512_unpacklo_pd(m512d a, m512d b) {
  return {_mm256_unpacklo_pd(a.lo, b.lo), _mm256_unpacklo_pd(a.hi, b.hi)};
}
GPT2KIT_INLINE m512d _mm512_unpackhi_pd(m512d a, m512d b) {
  return {_mm256_unpackhi_pd(a.lo, b.lo), _mm256_unpackhi_pd(a.hi, b.hi)};
}
GPT2KIT_INLINE m512 _mm512_shuffle_ps(m512 a, m512 b, const int imm) {
  return {_mm256_shuffle_ps(a.lo, b.lo, imm), _mm256_shuffle_ps(a.hi, b.hi, imm)};
}
// 128-bit lanes: result lanes 0, 1 are a's lanes imm[1:0], imm[3:2], lanes 2, 3 b's lanes imm[5:4],
// imm[7:6]; VPERM2F128 picks from (x lo, x hi, y lo, y hi) = a's (or b's) four lanes by the same numbers
GPT2KIT_INLINE m512 _mm512_shuffle_f32x4(m512 a, m512 b, const int imm) {
  return {_mm256_permute2f128_ps(a.lo, a.hi, (imm & 3) | (imm >> 2 & 3) << 4),
          _mm256_permute2f128_ps(b.lo, b.hi, (imm >> 4 & 3) | (imm >> 6 & 3) << 4)};
}

// --- conversions and casts

GPT2KIT_INLINE m512d _mm512_castps_pd(m512 a) { return {_mm256_castps_pd(a.lo), _mm256_castps_pd(a.hi)}; }
GPT2KIT_INLINE m512 _mm512_castpd_ps(m512d a) { return {_mm256_castpd_ps(a.lo), _mm256_castpd_ps(a.hi)}; }
GPT2KIT_INLINE m512i _mm512_castps_si512(m512 a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
GPT2KIT_INLINE m512 _mm512_castsi512_ps(m512i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
GPT2KIT_INLINE __m256 _mm512_castps512_ps256(m512 a) { return a.lo; }
GPT2KIT_INLINE __m256d _mm512_extractf64x4_pd(m512d a, const int imm) { return imm & 1 ? a.hi : a.lo; }
GPT2KIT_INLINE m512i _mm512_cvtepu16_epi32(__m256i h) {  // zero-extends 16 uint16 to int32
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1))};
}
GPT2KIT_INLINE __m256i _mm512_cvtepi32_epi16(m512i a) {  // keeps each lane's low 16 bits (VPMOVDW truncates)
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  // PACKUSDW saturates, which keeps values already in [0, 65535]; it interleaves 128-bit lanes: lo 0-3,
  // hi 0-3, lo 4-7, hi 4-7, which the permute puts back in order
  const __m256i packed = _mm256_packus_epi32(_mm256_and_si256(a.lo, low16), _mm256_and_si256(a.hi, low16));
  return _mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0));
}

}  // namespace avx2
}  // namespace gpt2kit

#undef GPT2KIT_INLINE

// The kernels' names for the types and intrinsics above (GCC's own are declared by then).
#define __m512 ::gpt2kit::avx2::m512
#define __m512i ::gpt2kit::avx2::m512i
#define __m512d ::gpt2kit::avx2::m512d
#define _mm512_setzero_ps ::gpt2kit::avx2::_mm512_setzero_ps
#define _mm512_set1_ps ::gpt2kit::avx2::_mm512_set1_ps
#define _mm512_set1_epi32 ::gpt2kit::avx2::_mm512_set1_epi32
#define _mm512_loadu_ps ::gpt2kit::avx2::_mm512_loadu_ps
#define _mm512_storeu_ps ::gpt2kit::avx2::_mm512_storeu_ps
#define _mm512_maskz_loadu_ps ::gpt2kit::avx2::_mm512_maskz_loadu_ps
#define _mm512_mask_storeu_ps ::gpt2kit::avx2::_mm512_mask_storeu_ps
#define _mm256_maskz_loadu_epi16 ::gpt2kit::avx2::_mm256_maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 ::gpt2kit::avx2::_mm256_mask_storeu_epi16
#define _mm512_add_ps ::gpt2kit::avx2::_mm512_add_ps
#define _mm512_sub_ps ::gpt2kit::avx2::_mm512_sub_ps
#define _mm512_mul_ps ::gpt2kit::avx2::_mm512_mul_ps
#define _mm512_div_ps ::gpt2kit::avx2::_mm512_div_ps
#define _mm512_sqrt_ps ::gpt2kit::avx2::_mm512_sqrt_ps
#define _mm512_max_ps ::gpt2kit::avx2::_mm512_max_ps
#define _mm512_min_ps ::gpt2kit::avx2::_mm512_min_ps
#define _mm512_fmadd_ps ::gpt2kit::avx2::_mm512_fmadd_ps
#define _mm512_fnmadd_ps ::gpt2kit::avx2::_mm512_fnmadd_ps
#define _mm512_add_epi32 ::gpt2kit::avx2::_mm512_add_epi32
#define _mm512_and_si512 ::gpt2kit::avx2::_mm512_and_si512
#define _mm512_slli_epi32 ::gpt2kit::avx2::_mm512_slli_epi32
#define _mm512_srli_epi32 ::gpt2kit::avx2::_mm512_srli_epi32
#define _mm512_roundscale_ps ::gpt2kit::avx2::_mm512_roundscale_ps
#define _mm512_scalef_ps ::gpt2kit::avx2::_mm512_scalef_ps
#define _mm512_cmp_ps_mask ::gpt2kit::avx2::_mm512_cmp_ps_mask
#define _mm512_maskz_mov_ps ::gpt2kit::avx2::_mm512_maskz_mov_ps
#define _mm512_maskz_sub_ps ::gpt2kit::avx2::_mm512_maskz_sub_ps
#define _mm512_mask_max_ps ::gpt2kit::avx2::_mm512_mask_max_ps
#define _mm512_mask_mul_ps ::gpt2kit::avx2::_mm512_mask_mul_ps
#define _mm512_mask_mov_epi32 ::gpt2kit::avx2::_mm512_mask_mov_epi32
#define _mm512_reduce_add_ps ::gpt2kit::avx2::_mm512_reduce_add_ps
#define _mm512_reduce_max_ps ::gpt2kit::avx2::_mm512_reduce_max_ps
#define _mm512_unpacklo_ps ::gpt2kit::avx2::_mm512_unpacklo_ps
#define _mm512_unpackhi_ps ::gpt2kit::avx2::_mm512_unpackhi_ps
#define _mm512_unpacklo_pd ::gpt2kit::avx2::_mm512_unpacklo_pd
#define _mm512_unpackhi_pd ::gpt2kit::avx2::_mm512_unpackhi_pd
#define _mm512_shuffle_ps ::gpt2kit::avx2::_mm512_shuffle_ps
#define _mm512_shuffle_f32x4 ::gpt2kit::avx2::_mm512_shuffle_f32x4
#define _mm512_castps_pd ::gpt2kit::avx2::_mm512_castps_pd
#define _mm512_castpd_ps ::gpt2kit::avx2::_mm512_castpd_ps
#define _mm512_castps_si512 ::gpt2kit::avx2::_mm512_castps_si512
#define _mm512_castsi512_ps ::gpt2kit::avx2::_mm512_castsi512_ps
#define _mm512_castps512_ps256 ::gpt2kit::avx2::_mm512_castps512_ps256
#define _mm512_extractf64x4_pd ::gpt2kit::avx2::_mm512_extractf64x4_pd
#define _mm512_cvtepu16_epi32 ::gpt2kit::avx2::_mm512_cvtepu16_epi32
#define _mm512_cvtepi32_epi16 ::gpt2kit::avx2::_mm512_cvtepi32_epi16

#endif  // __AVX512F__
