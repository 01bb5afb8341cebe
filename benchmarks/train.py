"""Training throughput, gpt2kit vs a plain transformers loop, and the demo's bits/char by budget.

    python benchmarks/train.py                 # throughput table + demo at 65 s, 2 min, 10 min
    python benchmarks/train.py --no-demo       # throughput only
    python benchmarks/train.py --no-compile    # eager only (no torch.compile warm-ups)
    python benchmarks/train.py --demo-budgets 65
    python benchmarks/train.py --no-demo --no-compile --dtypes float32 --runs 7   # medians of 7 processes

Throughput: one optimizer step = forward + backward + AdamW (lr 6e-4, wd 0.1, betas 0.9/0.95,
grad clip 1.0) on the same random batch, for the gpt2 shape (124M) and the demo's model, in
float32 and bf16 autocast. gpt2kit: the training loss module of `gpt2kit.train` (the model's
attention and GELU kernels of `gpt2kit.kernels`) + the chunked linear cross-entropy + fused
AdamW with the gradient clipping folded in (`clip_and_step`: gpt2kit's AdamW kernel, with
torch's fused AdamW's arithmetic),
eager and under `torch.compile` (as `compile = true` runs it). Peer: a plain eager loop around
`transformers.GPT2LMHeadModel(labels=...)` + `torch.optim.AdamW` (its default foreach
implementation), as issue #9 specifies; with compile, the same loop under `torch.compile` is
measured too, for reference. Each (model, dtype) cell runs in a fresh process; in it, steps of
all implementations alternate, so machine noise hits each; the table gives medians; the first two
steps (warm-up, including compilation) are timed apart.
MFU = achieved model FLOP/s (6N + 12LCT per token) / the best matmul FLOP/s measured here in the
same dtype; 1 / (the peer's MFU) bounds the ratio any implementation of the same FLOPs can reach.

Demo: `gpt2kit.demo.demo(minutes=...)` on Shakespeare; bits per character of the held-out text.
nanoGPT's character-level CPU quickstart reaches 2.74 bits/char on this corpus in 65 s here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.train import _loss_module, clip_and_step, flops_per_token, measure_matmul_peak

SHAPES = {
    # name: (config, batch, block)
    "gpt2 (124M)": (GPT2Config.from_preset("gpt2"), 2, 256),
    "demo (4x256)": (GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, n_ctx=128), 32, 128),
}
OPT = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def ours(config: GPT2Config, dtype: str, compile: bool = False):
    torch.manual_seed(0)
    model = GPT2(config)
    loss_mod = _loss_module(model)
    fn = torch.compile(loss_mod) if compile else loss_mod
    opt = torch.optim.AdamW(model.parameters(), fused=True, **OPT)

    def step(x, y):
        with _autocast(dtype):
            loss = fn(x, y)
        loss.backward()
        clip_and_step(opt, model.parameters(), 1.0)
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peer(config: GPT2Config, dtype: str, compile: bool = False):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1, loss_type="ForCausalLM"))
    hf.train()
    fn = torch.compile(hf) if compile else hf
    opt = torch.optim.AdamW(hf.parameters(), **OPT)

    def step(x, y):
        with _autocast(dtype):
            # labels are the inputs: transformers shifts them itself (block - 1 targets)
            loss = fn(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


IMPLS = {  # column: (factory, compile)
    "ours": (ours, False), "ours_compiled": (ours, True), "peer": (peer, False), "peer_compiled": (peer, True),
}


def throughput_isolated(steps: int, compile: bool, shapes: list[str], dtypes: list[str], threads: int,
                        runs: int = 1) -> list[dict]:
    """`throughput`, each (shape, dtype) cell in a fresh process of its own (ours and the peer
    together in it): a cell measured after another one inherits its fragmented heap, which cost
    the demo row ~5% in a full run here. With `runs` > 1 each cell is measured in that many fresh
    processes, one after another, and summarised by `combine_runs`."""
    rows = []
    for name in shapes:
        for dtype in dtypes:
            cmd = [sys.executable, __file__, "--cell-json", "--no-demo", "--steps", str(steps), "--shapes", name,
                   "--dtypes", dtype, "--threads", str(threads)] + ([] if compile else ["--no-compile"])
            cell = []
            for _ in range(runs):
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                cell.append(json.loads(out.strip().splitlines()[-1]))
            rows.append(combine_runs(cell))
    return rows


def combine_runs(cell: list[dict]) -> dict:
    """One row for several runs of a cell: each column's median over the runs, and the ratio as
    the median of the runs' own ratios (each run's ours and peer shared a process, so their
    ratio is free of the machine's drift between runs); `ratios` keeps them all."""
    row = dict(cell[0])
    for key, value in cell[0].items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in cell)
    row["ratios"] = [r["ours"] / r["peer"] for r in cell]
    row["ratio"] = statistics.median(row["ratios"])
    row["mfu_best"] = statistics.median(max(r["ours"], r.get("ours_compiled", 0)) * r["mfu_ours"] / r["ours"]
                                        for r in cell)
    if "ours_compiled" in row:
        row["ratio_compiled"] = statistics.median(r["ours_compiled"] / r["peer"] for r in cell)
        for n in ("ours", "peer"):
            row[f"compile_s_{n}"] = statistics.median(r[f"warm_{n}_compiled"] - r[f"warm_{n}"] for r in cell)
    return row


def throughput(steps: int, compile: bool, shapes: list[str], dtypes: list[str]) -> list[dict]:
    rows = []
    names = [n for n in IMPLS if compile or not IMPLS[n][1]]
    for name in shapes:
        config, batch, block = SHAPES[name]
        for dtype in dtypes:
            g = torch.Generator().manual_seed(1)
            seq = torch.randint(0, config.vocab_size, (batch, block + 1), generator=g)
            x, y = seq[:, :-1], seq[:, 1:]
            fns, warm = {}, {}
            for n in names:
                factory, comp = IMPLS[n]
                fns[n] = factory(config, dtype, comp)
                t = time.perf_counter()
                fns[n](x, y), fns[n](x, y)  # warm-up (and compilation)
                warm[n] = time.perf_counter() - t
            times = {n: [] for n in names}
            for _ in range(steps):
                for n in names:
                    t = time.perf_counter()
                    fns[n](x, y)
                    times[n].append(time.perf_counter() - t)
            tok = batch * block
            peak = measure_matmul_peak("cpu", dtype)
            fpt = flops_per_token(config, block)
            row = dict(shape=name, dtype=dtype, batch=f"{batch}x{block}", peak=peak)
            for n in names:
                row[n] = tok / statistics.median(times[n])
                row[f"mfu_{n}"] = row[n] * fpt / peak
                row[f"warm_{n}"] = warm[n]
            rows.append(row)
            print(f"  {name} {dtype}: " + ", ".join(f"{n} {row[n]:,.0f} tok/s (warm-up {warm[n]:.1f} s)" for n in names),
                  file=sys.stderr, flush=True)
    return rows


def print_throughput(rows: list[dict]) -> None:
    comp = "ours_compiled" in rows[0]
    print()
    head = "| model | dtype | batch x block | gpt2kit tok/s |"
    head += " gpt2kit compiled tok/s |" if comp else ""
    head += " transformers tok/s | ratio |"
    head += " ratio compiled |" if comp else ""
    head += " MFU gpt2kit | MFU transformers | ratio ceiling |"
    head += " transformers compiled tok/s | compile warm-up gpt2kit / transformers |" if comp else ""
    print(head)
    print("|---|---|---|" + "---:|" * (head.count("|") - 4))
    for r in rows:
        best = max(r["ours"], r.get("ours_compiled", 0))
        line = f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['ours']:,.0f} |"
        line += f" {r['ours_compiled']:,.0f} |" if comp else ""
        line += f" {r['peer']:,.0f} | {r.get('ratio', r['ours'] / r['peer']):.3f}x |"
        line += f" {r.get('ratio_compiled', r['ours_compiled'] / r['peer']):.3f}x |" if comp else ""
        line += (f" {100 * r.get('mfu_best', best * r['mfu_ours'] / r['ours']):.1f}% | {100 * r['mfu_peer']:.1f}% |"
                 f" {1 / r['mfu_peer']:.2f}x |")
        if comp:
            warm = [r.get(f"compile_s_{n}", r[f"warm_{n}_compiled"] - r[f"warm_{n}"]) for n in ("ours", "peer")]
            line += f" {r['peer_compiled']:,.0f} | {warm[0]:.0f} s / {warm[1]:.0f} s |"
        print(line)
    for r in rows:
        if len(r.get("ratios", ())) > 1:
            print(f"{r['shape']} {r['dtype']}: ratios of the {len(r['ratios'])} runs "
                  + ", ".join(f"{x:.3f}" for x in r["ratios"]) + f" (median {r['ratio']:.3f}x)")
    peaks = {r["dtype"]: r["peak"] for r in rows}
    print("\nmeasured matmul peak: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))
    print("ratio = gpt2kit / plain eager transformers; MFU gpt2kit = the faster of eager and compiled;"
          " ratio ceiling = 1 / MFU transformers")
    if any(len(r.get("ratios", ())) > 1 for r in rows):
        print("several runs: every column is a median over the runs; a ratio is the median of the runs' own"
              " ratios, not the quotient of the median tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation and case")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo runs")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    ap.add_argument("--demo-budgets", default="65,120,600", help="demo budgets in seconds, comma-separated")
    ap.add_argument("--no-compile", action="store_true", help="eager only: skip the torch.compile columns")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", type=int, default=1,
                    help="fresh processes per cell; the table gives medians over them (fp32 ratios swing a few %%)")
    ap.add_argument("--same-process", action="store_true",
                    help="measure every cell in this process (default: each cell in a fresh one)")
    ap.add_argument("--cell-json", action="store_true", help=argparse.SUPPRESS)  # one cell, as a JSON line
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs < 1 or (args.runs > 1 and (args.same_process or args.no_throughput)):
        ap.error("--runs: expected a count >= 1 of fresh processes per throughput cell "
                 "(not with --same-process or --no-throughput)")
    torch.compiler.config.force_disable_caches = True  # compile warm-ups as on a fresh machine
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    if args.cell_json:
        print(json.dumps(throughput(args.steps, not args.no_compile, shapes, dtypes)[0]))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_throughput:
        if args.same_process:
            rows = throughput(args.steps, not args.no_compile, shapes, dtypes)
        else:
            rows = throughput_isolated(args.steps, not args.no_compile, shapes, dtypes, torch.get_num_threads(),
                                       args.runs)
        print_throughput(rows)
    if args.no_demo:
        return
    from gpt2kit.demo import demo

    print("\n| demo budget | steps | tokens | val loss | val perplexity | bits/char | unigram bits/char | nanoGPT char (65 s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for seconds in (float(s) for s in args.demo_budgets.split(",")):
        rep = demo(minutes=seconds / 60, out_dir=f"/tmp/gpt2kit-bench-demo-{int(seconds)}", samples=0)
        print(f"| {seconds:.0f} s | {rep['steps']} | {rep['tokens_trained'] / 1e6:.1f}M | {rep['val_loss']:.3f} | "
              f"{rep['val_perplexity']:.1f} | {rep['val_bits_per_char']:.3f} | {rep['unigram_bits_per_char']:.3f} | 2.74 |",
              flush=True)


if __name__ == "__main__":
    main()
