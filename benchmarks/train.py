"""Training throughput, gpt2kit vs a plain transformers loop, and the demo's bits/char by budget.

    python benchmarks/train.py                 # throughput table + demo at 65 s, 2 min, 10 min
    python benchmarks/train.py --no-demo       # throughput only
    python benchmarks/train.py --demo-budgets 65

Throughput: one optimizer step = forward + backward + AdamW (lr 6e-4, wd 0.1, betas 0.9/0.95,
grad clip 1.0) on the same random batch, for the gpt2 shape (124M) and the demo's model, in
float32 and bf16 autocast. gpt2kit: `GPT2.hidden_states` + the chunked linear cross-entropy of
`gpt2kit.train` + fused AdamW. Peer: `transformers.GPT2LMHeadModel(labels=...)` + `torch.optim.AdamW`
(its default foreach implementation). Steps of the two alternate, so machine noise hits both; the
table gives medians. MFU = achieved model FLOP/s (6N + 12LCT per token) / the best matmul FLOP/s
measured here in the same dtype.

Demo: `gpt2kit.demo.demo(minutes=...)` on Shakespeare; bits per character of the held-out text.
nanoGPT's character-level CPU quickstart reaches 2.74 bits/char on this corpus in 65 s here.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.train import flops_per_token, linear_cross_entropy, measure_matmul_peak

SHAPES = {
    # name: (config, batch, block)
    "gpt2 (124M)": (GPT2Config.from_preset("gpt2"), 2, 256),
    "demo (4x256)": (GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, n_ctx=128), 32, 128),
}
OPT = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


def ours(config: GPT2Config):
    torch.manual_seed(0)
    model = GPT2(config)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **OPT)

    def step(x, y, dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = linear_cross_entropy(model.hidden_states(x), model.transformer.wte.weight, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peer(config: GPT2Config):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1))
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), **OPT)

    def step(x, y, dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            # labels are the inputs: transformers shifts them itself (block - 1 targets)
            loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def throughput(steps: int) -> list[dict]:
    rows = []
    for name, (config, batch, block) in SHAPES.items():
        for dtype in ("float32", "bfloat16"):
            g = torch.Generator().manual_seed(1)
            seq = torch.randint(0, config.vocab_size, (batch, block + 1), generator=g)
            x, y = seq[:, :-1], seq[:, 1:]
            a, b = ours(config), peer(config)
            a(x, y, dtype), b(x, None, dtype)  # warm-up
            ta, tb = [], []
            for _ in range(steps):
                t = time.perf_counter(); a(x, y, dtype); ta.append(time.perf_counter() - t)
                t = time.perf_counter(); b(x, None, dtype); tb.append(time.perf_counter() - t)
            tok = batch * block
            ours_tps, peer_tps = tok / statistics.median(ta), tok / statistics.median(tb)
            peak = measure_matmul_peak("cpu", dtype)
            fpt = flops_per_token(config, block)
            rows.append(dict(shape=name, dtype=dtype, batch=f"{batch}x{block}", ours=ours_tps, peer=peer_tps,
                             ratio=ours_tps / peer_tps, mfu_ours=ours_tps * fpt / peak, mfu_peer=peer_tps * fpt / peak,
                             peak=peak))
            print(f"  {name} {dtype}: ours {ours_tps:,.0f} tok/s, transformers {peer_tps:,.0f} tok/s", file=sys.stderr)
    return rows


def print_throughput(rows: list[dict]) -> None:
    print()
    print("| model | dtype | batch x block | gpt2kit tok/s | transformers tok/s | ratio | MFU gpt2kit | MFU transformers |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['batch']} | {r['ours']:,.0f} | {r['peer']:,.0f} | "
              f"{r['ratio']:.2f}x | {100 * r['mfu_ours']:.1f}% | {100 * r['mfu_peer']:.1f}% |")
    peaks = {r["dtype"]: r["peak"] for r in rows}
    print("\nmeasured matmul peak: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation and case")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo runs")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    ap.add_argument("--demo-budgets", default="65,120,600", help="demo budgets in seconds, comma-separated")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_throughput:
        print_throughput(throughput(args.steps))
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
