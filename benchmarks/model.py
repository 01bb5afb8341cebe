"""Prefill speed: one forward pass over 1024-token sequences, gpt2kit vs transformers.

For the gpt2 and gpt2-medium shapes (random weights, the same in both libraries), batch 1 and 4,
fp32 and bf16: tokens/s of `model(input_ids)` -> (B, T, 50257) logits, and the peak memory the
forward pass adds on top of the weights. transformers runs its default (sdpa) attention with
`use_cache=False`, so that both sides do the same work. Both run in this process with the same
thread count, interleaved (order alternating), and each number is the median of `--repeats` runs.
"ours" is the model as built (`GPT2`, trainable); "ours, inference" is it after
`gpt2kit.generate.optimize_for_cpu` (on CPU), as `gpt2kit generate` / `serve` load a checkpoint:
packed weights for the output layer (MKL's in fp32 on Intel CPUs; oneDNN's, for every layer, in
bf16). fp32 prompts multiply through `kernels.gemm()`'s GEMM (printed; GPT2KIT_GEMM chooses).
`--compile` adds a column for `torch.compile(model)` of ours.

Peak memory: on CUDA, torch's allocator statistics; on CPU, the resident-set high-water mark
(reset through /proc/self/clear_refs after returning free heap memory with malloc_trim).

    .venv/bin/python benchmarks/model.py                  # the table in docs/benchmarks.md
    .venv/bin/python benchmarks/model.py --quick          # a smoke run (128 tokens, gpt2 only)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import statistics
import time
from typing import Callable

import torch
import transformers

from gpt2kit import kernels
from gpt2kit.generate import optimize_for_cpu
from gpt2kit.model import GPT2, PRESETS
from gpt2kit.weights import hf_config_dict, to_hf_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB that `fn` adds at its peak above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _proc_status("VmRSS")
        fn()
        return (_proc_status("VmHWM") - before) / 2**20
    except (OSError, KeyError):
        return None


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_cell(preset: str, dtype: torch.dtype, batch: int, seq: int, repeats: int, device: torch.device,
               compile_: bool) -> dict[str, float | None]:
    torch.manual_seed(0)
    config = PRESETS[preset]
    ours = GPT2(config).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(config)))
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    ours, hf = ours.to(device, dtype), hf.eval().to(device, dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inference = optimize_for_cpu(ours)
    runs: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(ids),
        "inference": lambda: inference(ids),
        "hf": lambda: hf(ids, use_cache=False).logits,
    }
    if compile_:
        compiled = torch.compile(ours)
        runs["compiled"] = lambda: compiled(ids)
    result: dict[str, float | None] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        short = ids[:, :16]
        ours(short), inference(short), hf(short, use_cache=False)  # kernels initialized, cheaply
        if compile_:
            compiled(ids)  # compilation is not what is timed
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                if r == 0:  # the first full call also records the peak memory
                    peak: list[float | None] = []
                    times[name].append(timed(lambda: peak.append(peak_memory(runs[name], device)), device))
                    result[f"{name}_mib"] = peak[0]
                else:
                    times[name].append(timed(runs[name], device))
    for name, ts in times.items():
        result[f"{name}_tps"] = batch * seq / statistics.median(ts)
    del ours, inference, hf, runs
    gc.collect()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt2,gpt2-medium")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16, fp16 (fp16: CUDA)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per cell (the median is shown)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--quick", action="store_true", help="128 tokens, gpt2 shape, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.seq, args.shapes, args.repeats = 128, "gpt2", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# prefill of {args.seq}-token sequences on {device.type} ({where}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
          + (f"; ours' fp32 prompt GEMM: {kernels.gemm()}" if device.type == "cpu" else ""))
    cols = ["shape", "dtype", "batch", "ours tok/s", "ours, inference tok/s", "transformers tok/s", "ratio",
            "ratio, inference"]
    if args.compile:
        cols += ["ours compiled tok/s", "ratio (compiled)"]
    cols += ["ours peak MiB", "transformers peak MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    ratios, inference_ratios = [], []
    for preset in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            for batch in map(int, args.batches.split(",")):
                r = bench_cell(preset, DTYPES[dtype_name], batch, args.seq, args.repeats, device, args.compile)
                ratios.append(r["ours_tps"] / r["hf_tps"])
                inference_ratios.append(r["inference_tps"] / r["hf_tps"])
                row = [preset, dtype_name, str(batch), f"{r['ours_tps']:,.0f}", f"{r['inference_tps']:,.0f}",
                       f"{r['hf_tps']:,.0f}", f"{ratios[-1]:.2f}x", f"{inference_ratios[-1]:.2f}x"]
                if args.compile:
                    row += [f"{r['compiled_tps']:,.0f}", f"{r['compiled_tps'] / r['hf_tps']:.2f}x"]
                mib = [r["ours_mib"], r["hf_mib"]]  # peak of the inference form: see its docstring
                row += ["n/a" if m is None else f"{m:,.0f}" for m in mib]
                print("| " + " | ".join(row) + " |", flush=True)
    print(f"# median ratio ours/transformers (eager): {statistics.median(ratios):.2f}x, inference form: "
          f"{statistics.median(inference_ratios):.2f}x (min {min(inference_ratios):.2f}x) over {len(ratios)} cells")


if __name__ == "__main__":
    main()
