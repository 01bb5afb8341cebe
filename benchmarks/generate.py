"""Generation speed: gpt2kit vs transformers `generate`, next to the memory-bandwidth bound.

A gpt2-shape model (124M, random weights) continues a 16-token prompt by 128 greedy tokens:
decode tokens/s at batch 1 (fp32, bf16, and ours with dynamic int8 quantization) and batch 8,
ours with `optimize_for_cpu` as the CLI and server load it (gpt2kit's matrix-vector kernel for
the decoding steps, oneDNN-packed bf16 weights for prompts),
and the time to first token of a 1000-token prompt. Both libraries run in this process, with the
same weights and thread count, interleaved, and each number is a median of `--repeats` runs.

The bound: decoding one token reads every weight once, so tokens/s <= read bandwidth / weight
bytes. The read bandwidth is measured here: the fastest of a sum over a 512 MiB tensor and a
matrix-vector product with it, in ordinary memory and on transparent huge pages (bytes read
over time). A copy's bandwidth (STREAM 'copy',
read + write bytes) is printed too; it counts the written bytes, which decoding does not move,
and so is ~2x the rate at which weights can be streamed.

    .venv/bin/python benchmarks/generate.py                 # the table in docs/benchmarks.md
    .venv/bin/python benchmarks/generate.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers

from gpt2kit.generate import generate_tokens, optimize_for_cpu, quantize_int8
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.sampling import SamplingParams
from gpt2kit.weights import hf_config_dict, to_hf_state_dict

GREEDY = SamplingParams(do_sample=False)


def copy_bandwidth(repeats: int = 5, mib: int = 512) -> float:
    """Bytes read + written per second by a large tensor copy (STREAM's 'copy'), median."""
    src = torch.empty(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def read_bandwidth(repeats: int = 5, mib: int = 512) -> float:
    """Bytes read per second streaming a 512 MiB tensor, median: the fastest of a sum over it and,
    where gpt2kit's kernel runs, a matrix-vector product with it (the decoding access pattern),
    each in ordinary memory and on transparent huge pages, so that the bound is the machine's,
    not one kernel's or one allocator's."""
    from gpt2kit import kernels

    plain = torch.ones(mib * 2**20 // 4)
    buffers = [plain, kernels.huge_page_copies([plain])[0]]
    readers = [lambda b=b: b.sum() for b in buffers]
    if kernels.available(torch.float32):
        x = torch.ones(1, 4096)
        readers += [lambda b=b: kernels.matvec(x, b.view(-1, 4096)) for b in buffers]
    best = 0.0
    for read in readers:
        read()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        best = max(best, plain.numel() * 4 / statistics.median(times))
    return best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every weight once, but the embeddings only as
    lookups (one row each); the tied output layer reads the first vocab_size embedding rows."""
    from gpt2kit.generate import _CPULinear, _InputMajorHead

    total, seen = 0, set()

    def add(t: torch.Tensor | None, *, once: bool = True) -> None:
        nonlocal total
        if t is not None and (not once or (t.data_ptr(), t.numel()) not in seen):
            seen.add((t.data_ptr(), t.numel()))
            total += t.numel() * t.element_size()

    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):  # int8 weight, fp32 bias
            add(m.weight(), once=False), add(m.bias(), once=False)  # unpacked copies: addresses recur
        elif isinstance(m, _CPULinear):  # the plain weight (decoding never touches the packed copy)
            add(m.weight), add(m.bias)
        elif isinstance(m, _InputMajorHead):
            add(m.embedding.weight_t)
        elif isinstance(m, torch.nn.Embedding) or type(m).__name__ == "_InputMajorEmbedding":
            continue
        else:
            for p in m.parameters(recurse=False):
                add(p)
    if type(model.lm_head).__name__ == "TiedLMHead":  # an unoptimized model
        add(model.transformer.wte.weight[: model.config.vocab_size])
    return total


def ours(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    rows = [[] for _ in prompts]
    for out in generate_tokens(model, prompts, GREEDY, max_new_tokens=new):
        for r, t in zip(rows, out.tokens):
            r.append(t)
    return rows


def theirs(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def median_pair(f_ours, f_theirs, repeats: int) -> tuple[float, float | None]:
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(*f_ours)[0])
        if f_theirs is not None:
            b.append(timed(*f_theirs)[0])
    return statistics.median(a), (statistics.median(b) if b else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both libraries (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-prompt", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat, 200-token TTFT prompt")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.new_tokens, args.ttft_prompt = 1, 16, 200
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    model = GPT2(GPT2Config.from_preset("gpt2")).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(model.config)))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    hf.eval()
    model_bf16 = GPT2(model.config).eval()
    model_bf16.load_state_dict(model.state_dict())
    model_bf16 = optimize_for_cpu(model_bf16.to(torch.bfloat16))  # what `gpt2kit generate --dtype bfloat16` runs
    hf_bf16 = transformers.GPT2LMHeadModel(hf.config)
    hf_bf16.load_state_dict(hf.state_dict())
    hf_bf16 = hf_bf16.to(torch.bfloat16).eval()
    model_int8 = quantize_int8(model)
    model_fp32 = optimize_for_cpu(model)  # what `gpt2kit generate/serve` run in fp32 on CPU

    bw, copy_bw = read_bandwidth(), copy_bandwidth()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50257, (1, 16), generator=g).tolist()
    batch8 = torch.randint(0, 50257, (8, 16), generator=g).tolist()
    long_prompt = torch.randint(0, 50257, (1, args.ttft_prompt), generator=g).tolist()
    new = args.new_tokens

    # exactness first: the same greedy tokens as transformers
    same = ours(model_fp32, prompt, new) == theirs(hf, prompt, new)
    ours(model_bf16, prompt, 4), theirs(hf_bf16, prompt, 4), ours(model_int8, prompt, 4)  # warm-up

    rows = []

    def decode_row(label, m, peer, prompts, peer_label=None):
        t_ours, t_theirs = median_pair((ours, m, prompts, new), None if peer is None else (theirs, peer, prompts, new),
                                       args.repeats)
        n_tok = len(prompts) * new
        bound = bw / weight_bytes(m) * len(prompts)
        print(f"  {label}: {n_tok / t_ours:.1f} vs {n_tok / t_theirs:.1f} tok/s", file=sys.stderr)
        rows.append((label, n_tok / t_ours, None if t_theirs is None else n_tok / t_theirs,
                     peer_label, bound))

    decode_row("batch 1, fp32", model_fp32, hf, prompt)
    decode_row("batch 1, bf16", model_bf16, hf_bf16, prompt)
    decode_row("batch 1, ours int8 vs their fp32", model_int8, hf, prompt)
    decode_row("batch 1, ours int8 vs their bf16", model_int8, hf_bf16, prompt)
    decode_row("batch 8, fp32", model_fp32, hf, batch8)
    decode_row("batch 8, bf16", model_bf16, hf_bf16, batch8)
    decode_row("batch 8, ours int8 vs their fp32", model_int8, hf, batch8)

    ttft = []
    for label, m, peer in (("fp32", model_fp32, hf), ("bf16", model_bf16, hf_bf16), ("ours int8 vs their fp32", model_int8, hf)):
        t_ours, t_theirs = median_pair((ours, m, long_prompt, 1), (theirs, peer, long_prompt, 1), args.repeats)
        ttft.append((label, t_ours, t_theirs))

    print(f"gpt2 shape (124M), random weights; prompt 16 tokens, {new} new tokens, greedy; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s); "
          f"median of {args.repeats}")
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s (copy: {copy_bw / 1e9:.1f} GB/s read + write); "
          f"greedy tokens identical to "
          f"transformers (fp32): {'yes' if same else 'NO'}")
    print()
    print("| decode | gpt2kit tok/s | transformers tok/s | ratio | bandwidth bound tok/s | gpt2kit % of bound |")
    print("|---|---|---|---|---|---|")
    for label, a, b, _, bound in rows:
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {bound:.1f} | {100 * a / bound:.0f}% |")
    print()
    print(f"| time to first token, {args.ttft_prompt}-token prompt | gpt2kit ms | transformers ms | ratio |")
    print("|---|---|---|---|")
    for label, a, b in ttft:
        print(f"| {label} | {1e3 * a:.0f} | {1e3 * b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
