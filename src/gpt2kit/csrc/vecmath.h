// Vector math shared by gpt2kit's CPU kernels (AVX-512F, or AVX2 + FMA through avx512_on_avx2.h).
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <cmath>

#include "avx512_on_avx2.h"  // last: it redefines the AVX-512 names where the target has no AVX-512

namespace gpt2kit {

// the lanes of the next 16 elements that exist when `left` remain (none when left <= 0)
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff)
                    : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : static_cast<__mmask16>(0);
}

// exp of 16 floats: 2^n e^r with n = round(z / ln 2), r = z - n ln 2 (ln 2 split in two so that r
// is exact to a few ulp), e^r by its degree-7 Taylor polynomial (|r| <= ln2/2: truncation < 1e-8
// relative), 2^n applied by VSCALEFPS, which over/underflows to inf/0 as exp does. z is clamped
// to [-110, 100] first: exp is then exactly 0 (below fp32's smallest denormal, so exp(-inf) = 0)
// or inf; a NaN passes through.
inline __m512 exp512(__m512 z) {
  z = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-110.0f), z));  // NaN stays
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), z);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094173e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}


inline void scale_row(float* row, int64_t n, float s) {
  const __m512 sv = _mm512_set1_ps(s);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), sv));
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), sv));
  }
}


// exp(row[j] - max) for j < n in place, zeros in n..n_pad (n_pad >= n; stores stay below it);
// returns 1 / the sum of the exps and, through max_out, the max
inline float softmax_row(float* row, int64_t n, int64_t n_pad, float* max_out = nullptr) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
  if (j < n) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, row + j));
  const float row_max = _mm512_reduce_max_ps(m);
  if (max_out) *max_out = row_max;
  const __m512 mx = _mm512_set1_ps(row_max);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx));
    _mm512_storeu_ps(row + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), mx)));
    if (j + 16 <= n_pad) {
      _mm512_storeu_ps(row + j, e);  // zeros past n
    } else {
      _mm512_mask_storeu_ps(row + j, static_cast<__mmask16>((1u << (n_pad - j)) - 1), e);
    }
    sum = _mm512_add_ps(sum, e);
    j += 16;
  }
  for (; j + 16 <= n_pad; j += 16) _mm512_storeu_ps(row + j, _mm512_setzero_ps());
  if (j < n_pad) _mm512_mask_storeu_ps(row + j, static_cast<__mmask16>((1u << (n_pad - j)) - 1), _mm512_setzero_ps());
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// Keeps the compiler from seeing how v was computed, so that it cannot contract the product that
// produced it with a later sum into an FMA.
inline void opaque(__m512& v) {
#ifdef __AVX512F__
  asm("" : "+v"(v));
#else
  asm("" : "+v"(v.lo), "+v"(v.hi));  // the two halves of avx512_on_avx2.h's __m512
#endif
}

}  // namespace gpt2kit
