"""The bound on fp32 prefill speed-ups on a CPU: how much of each library's pass is matrix products.

A prompt's forward pass is mostly GEMMs (every block's four projections and the output layer),
which gpt2kit and transformers hand to the same BLAS (MKL, in PyTorch's x86 wheels). What gpt2kit
can save is the rest of transformers' pass: attention, the GELU, bias broadcasts, residual adds,
copies. So on a given machine the ratio ours / transformers of `benchmarks/model.py` cannot exceed

    ceiling = transformers' pass time / our GEMM time

however cheap the rest of our pass gets, unless our products beat the BLAS. For the gpt2 and
gpt2-medium shapes (random weights, the same in both libraries, 1024-token sequences, fp32, no
autograd), this prints each library's pass time and, from the same passes, its GEMM time (self
time of aten::mm / addmm / addmm_ / bmm, oneDNN's linear and gpt2kit's OpenBLAS product (where
`kernels.gemm()` chooses them) under torch.profiler, which costs little at a few dozen
ops per pass), medians of `--repeats` interleaved passes; the GEMMs' FLOP rate; and the CPU's FMA
peak for the same thread count (a loop of independent FMAs, compiled here with the system C
compiler; "n/a" without one).

    .venv/bin/python benchmarks/prefill_ceiling.py             # the table in docs/benchmarks.md
    .venv/bin/python benchmarks/prefill_ceiling.py --quick     # gpt2 only, one repeat
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, record_function

from gpt2kit import kernels
from gpt2kit.model import GPT2, PRESETS
from gpt2kit.weights import hf_config_dict, to_hf_state_dict

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "mkldnn::_linear_pointwise", "gpt2kit::sgemm")


def _profiled_openblas() -> None:
    """Makes ours' OpenBLAS products (`kernels.gemm()` "openblas", called through ctypes, which the
    profiler cannot see) show up as gpt2kit::sgemm ops."""
    real = kernels._openblas_product

    def product(*args):
        with record_function("gpt2kit::sgemm"):
            return real(*args)

    kernels._openblas_product = product

# Twelve independent accumulators per thread (more than FMA latency x ports), so the loop runs
# at the FMA units' throughput; the registers are named in the asm so the compiler cannot fold
# the chains together.
_PEAK_SOURCE = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char** argv) {
  int threads = atoi(argv[1]);
  long iters = 50000000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
    {
      __asm__ volatile(ZERO14 ::: REGS);  // no NaN or denormal operands from whatever ran before
      for (long i = 0; i < iters; ++i)
        __asm__ volatile(FMA12 ::: REGS);
    }
    double flops = (double)iters * threads * 12 * LANES * 2 / (omp_get_wtime() - t0);
    if (flops > best) best = flops;
  }
  printf("%f\n", best / 1e9);
  return 0;
}
"""


def fma_peak_gflops(threads: int) -> float | None:
    """Peak fp32 FMA GFLOP/s of `threads` threads (AVX-512 or AVX2), or None without a compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    capability = torch.backends.cpu.get_cpu_capability()
    if compiler is None or platform.machine() not in ("x86_64", "AMD64") or capability == "DEFAULT":
        return None
    wide = capability in ("AVX512", "AVX512_BF16", "AMX")
    reg, lanes = ("zmm", 16) if wide else ("ymm", 8)
    fma = " ".join(f'"vfmadd231ps %%{reg}12, %%{reg}13, %%{reg}{i}\\n\\t"' for i in range(12))
    zero = " ".join(f'"vxorps %%{reg}{i}, %%{reg}{i}, %%{reg}{i}\\n\\t"' for i in range(14))
    regs = ", ".join(f'"xmm{i}"' for i in range(14))
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
        with open(src, "w") as f:
            f.write(f"#define FMA12 {fma}\n#define ZERO14 {zero}\n#define REGS {regs}\n#define LANES {lanes}\n"
                    + _PEAK_SOURCE)
        flags = ["-mavx512f"] if wide else ["-mavx2", "-mfma"]
        try:
            subprocess.run([compiler, "-O2", "-fopenmp", *flags, src, "-o", exe], check=True, capture_output=True)
            out = subprocess.run([exe, str(threads)], check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    return float(out)


def gemm_flops(preset: str, rows: int) -> float:
    """FLOPs of one pass's projections and output layer for `rows` tokens."""
    c = PRESETS[preset]
    return 2.0 * rows * (c.n_layer * 12 * c.n_embd ** 2 + c.n_embd * c.vocab_size)


def timed_pass(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, of which in GEMMs) of one call of fn, profiled."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6


def bench_cell(preset: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = PRESETS[preset]
    ours = GPT2(config).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(config))).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    runs = {"ours": lambda: ours(ids), "hf": lambda: hf(ids, use_cache=False).logits}
    times: dict[str, list[float]] = {name: [] for name in runs}
    gemm: dict[str, list[float]] = {name: [] for name in runs}
    result: dict[str, float] = {}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm: kernels built, buffers allocated
        for r in range(repeats):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                seconds, in_gemm = timed_pass(runs[name])  # both from one pass: the host's speed drifts
                times[name].append(seconds)
                gemm[name].append(in_gemm)
    for name in runs:
        result[f"{name}_pass"] = statistics.median(times[name])
        result[f"{name}_gemm"] = statistics.median(gemm[name])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt2,gpt2-medium")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per library and cell (median shown)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="gpt2 only, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.repeats = "gpt2", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    _profiled_openblas()
    peak = fma_peak_gflops(threads)
    print(f"# fp32 prefill of {args.seq}-token sequences on {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads, median of "
          f"{args.repeats}; FMA peak {'n/a' if peak is None else f'{peak:.0f} GFLOP/s'}; ours' GEMM: {kernels.gemm()}")
    cols = ["shape", "batch", "ours ms", "ours GEMM ms", "transformers ms", "transformers GEMM ms", "ratio",
            "ceiling", "GEMM GFLOP/s (ours / transformers)", "of FMA peak"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for preset in args.shapes.split(","):
        for batch in map(int, args.batches.split(",")):
            r = bench_cell(preset, batch, args.seq, args.repeats)
            flops = gemm_flops(preset, batch * args.seq)
            rate_ours, rate_hf = flops / r["ours_gemm"] / 1e9, flops / r["hf_gemm"] / 1e9
            row = [preset, str(batch), f"{r['ours_pass'] * 1e3:,.0f}", f"{r['ours_gemm'] * 1e3:,.0f}",
                   f"{r['hf_pass'] * 1e3:,.0f}", f"{r['hf_gemm'] * 1e3:,.0f}", f"{r['hf_pass'] / r['ours_pass']:.2f}x",
                   f"{r['hf_pass'] / r['ours_gemm']:.2f}x", f"{rate_ours:.0f} / {rate_hf:.0f}",
                   "n/a" if peak is None else f"{rate_ours / peak:.0%}"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
