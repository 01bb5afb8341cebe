// Vector math shared by gpt2kit's CPU kernels (AVX-512F).
#pragma once
#include <immintrin.h>

namespace gpt2kit {

// exp of 16 floats: 2^n e^r with n = round(z / ln 2), r = z - n ln 2 (ln 2 split in two so that r
// is exact to a few ulp), e^r by its degree-7 Taylor polynomial (|r| <= ln2/2: truncation < 1e-8
// relative), 2^n applied by VSCALEFPS, which over/underflows to inf/0 as exp does. z is clamped
// to [-100, 100] first (exp is then 0 or inf in fp32 anyway); a NaN passes through.
inline __m512 exp512(__m512 z) {
  z = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-100.0f), z));  // NaN stays
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

}  // namespace gpt2kit
