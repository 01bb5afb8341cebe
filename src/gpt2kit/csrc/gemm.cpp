// An fp32 product C = alpha op(A) op(B) + beta C on torch's OpenMP threads, each thread running a
// single-threaded OpenBLAS sgemm on its share of C's rows (or, for few rows, of its columns).
//
// Why not OpenBLAS's own threads: after every parallel region of PyTorch, its OpenMP workers spin
// for a while before they sleep (libgomp's GOMP_SPINCOUNT, read once at start-up); an OpenBLAS
// call right after a LayerNorm or an attention then shares the cores with spinning threads and
// ran ~20% slower than alone (AMD EPYC Zen 2, 2 threads). Here the spinning workers are the ones
// that do the work. OpenBLAS's thread count is process-wide state (its "_local" setter is too, in
// the builds checked), so it is set to 1 for the call and put back after, one call at a time (two
// Python threads interleaving their set and restore would leave it at 1, or let one call run
// OpenBLAS's own threads inside ours).
//
// The library is whatever OpenBLAS the process has loaded (numpy's, in practice): the caller
// passes its sgemm and thread-count functions, and whether its integers are 64-bit (ILP64).
#include <omp.h>
#include <stdint.h>

#include <mutex>

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                         int32_t, float, float*, int32_t);
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                         int64_t, float, float*, int64_t);
using SetThreads = void (*)(int);
using GetThreads = int (*)();

struct Call {
  void* fn;
  int ilp64, ta, tb;  // ta, tb: kNoTrans or kTrans
  float alpha, beta;
  int64_t k, lda, ldb, ldc;

  // C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, all row-major
  void operator()(int64_t m, int64_t n, const float* a, const float* b, float* c) const {
    if (m <= 0 || n <= 0) return;
    if (ilp64)
      reinterpret_cast<Sgemm64>(fn)(kRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
      reinterpret_cast<Sgemm32>(fn)(kRowMajor, ta, tb, static_cast<int32_t>(m), static_cast<int32_t>(n),
                                    static_cast<int32_t>(k), alpha, a, static_cast<int32_t>(lda), b,
                                    static_cast<int32_t>(ldb), beta, c, static_cast<int32_t>(ldc));
  }
};

}  // namespace

extern "C" {

// op(A) (m, k): A is (m, k) or, with trans_a, (k, m), rows lda floats apart; op(B) (k, n): B is
// (k, n) or, with trans_b, (n, k), rows ldb apart; C (m, n), rows ldc apart. An LP64 library
// (ilp64 = 0) needs every size below 2^31: the caller checks.
void gpt2kit_sgemm_f32(void* fn, int ilp64, void* set_threads, void* get_threads, int trans_a, int trans_b,
                       int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                       int64_t ldb, float beta, float* c, int64_t ldc, int threads) {
  const Call call{fn, ilp64, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, alpha, beta, k, lda, ldb, ldc};
  static std::mutex one_at_a_time;
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  const int saved = reinterpret_cast<GetThreads>(get_threads)();
  reinterpret_cast<SetThreads>(set_threads)(1);
  // rows when each thread gets a tall block (B is then read once per thread, from the shared
  // cache); columns for short products, where a thread's rows would be too few to block
  const bool by_rows = m >= 64 * static_cast<int64_t>(threads);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (by_rows) {
      const int64_t r0 = m * t / nt, r1 = m * (t + 1) / nt;
      call(r1 - r0, n, a + (trans_a ? r0 : r0 * lda), b, c + r0 * ldc);
    } else {
      const int64_t c0 = (n * t / nt) / 16 * 16, c1 = t + 1 == nt ? n : (n * (t + 1) / nt) / 16 * 16;
      call(m, c1 - c0, a, b + (trans_b ? c0 * ldb : c0), c + c0);
    }
  }
  reinterpret_cast<SetThreads>(set_threads)(saved);
}

}  // extern "C"
