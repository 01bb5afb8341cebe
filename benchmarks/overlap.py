"""Overlap analysis throughput: gpt2kit's 8-gram Bloom filter vs rbloom (a Rust Bloom filter) and
a Python set, in one run.

Every rate counts 8-grams per second from raw text: normalization, 8-gram construction (strings for
the peers, fingerprints for us) and the filter operation. rbloom and the set are fed the same
normalized 8-grams that gpt2kit fingerprints (`gpt2kit.overlap.ngrams`). The default corpus
(Shakespeare, ~0.94M 8-grams) is used; `--copies` repeats it on disk for the multi-process build.

    python benchmarks/overlap.py [--repeat 5] [--copies 4] [--big-capacity 200000000]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_time(fn, repeat: int, clock=time.process_time) -> float:
    """Median seconds of fn(). Single-process rows use this process's CPU time, which a machine
    shared with other jobs disturbs far less than wall time; multi-process rows pass a wall clock."""
    times = []
    for _ in range(repeat):
        gc.collect()
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--copies", type=int, default=8, help="corpus copies for the 1- vs 2-worker build")
    ap.add_argument("--big-capacity", type=int, default=200_000_000,
                    help="capacity of the large (RAM-bound, ~1 GB at 1e-8) filter; 0 skips it")
    ap.add_argument("--fpr", type=float, default=1e-8)
    args = ap.parse_args(argv)

    import rbloom

    from gpt2kit.corpus import shakespeare
    from gpt2kit.overlap import BloomFilter, build_filter, ngrams, words

    files = shakespeare()
    texts = [f.read_text(encoding="utf-8") for f in files]
    n = sum(max(0, len(words(t)) - 7) for t in texts)
    corpus_bytes = sum(len(t.encode()) for t in texts)
    fpr = args.fpr
    rows: list[tuple[str, str, float]] = []  # (operation, implementation, seconds)

    # -- insert, single process -------------------------------------------------------------------
    def ours(engine: str, capacity: int = n):
        bf = BloomFilter.new(capacity=capacity, fpr=fpr, engine=engine)
        for t in texts:
            bf.add_text(t)
        return bf

    ours("numba")  # compile (or load the cached kernels) outside the timing
    filters = {}
    rows.append(("insert", "gpt2kit (numba)", _median_time(lambda: filters.__setitem__("ours", ours("numba")), args.repeat)))
    rows.append(("insert", "gpt2kit (numpy only)", _median_time(lambda: ours("numpy"), args.repeat)))

    def peer_insert(make):
        s = make()
        for t in texts:
            s.update(ngrams(words(t)))
        return s

    rows.append(("insert", "rbloom", _median_time(
        lambda: filters.__setitem__("rbloom", peer_insert(lambda: rbloom.Bloom(n, fpr))), args.repeat)))
    rows.append(("insert", "python set", _median_time(lambda: filters.__setitem__("set", peer_insert(set)), args.repeat)))
    grams = [x for t in texts for x in ngrams(words(t))]
    t_rb_only = _median_time(lambda: rbloom.Bloom(n, fpr).update(grams), args.repeat)

    # -- query, single process ----------------------------------------------------------------------
    bf = filters["ours"]
    rows.append(("query", "gpt2kit (numba)", _median_time(lambda: [bf.contains_text(t) for t in texts], args.repeat)))
    bf_np = BloomFilter(bf.bits, capacity=bf.capacity, fpr_target=fpr, m_bits=bf.m, k_hashes=bf.k, engine="numpy")
    rows.append(("query", "gpt2kit (numpy only)", _median_time(lambda: [bf_np.contains_text(t) for t in texts], args.repeat)))
    rb, st = filters["rbloom"], filters["set"]
    rows.append(("query", "rbloom", _median_time(lambda: [[g in rb for g in ngrams(words(t))] for t in texts], args.repeat)))
    rows.append(("query", "python set", _median_time(lambda: [[g in st for g in ngrams(words(t))] for t in texts], args.repeat)))

    # -- a filter much larger than the CPU caches (as a WebText-sized one is) -------------------
    if args.big_capacity:
        big = {}
        rows.append((f"insert, {args.big_capacity:.0e}-capacity filter", "gpt2kit (numba)", _median_time(
            lambda: big.__setitem__("o", ours("numba", args.big_capacity)), max(1, args.repeat // 2))))
        del big["o"]
        gc.collect()
        rows.append((f"insert, {args.big_capacity:.0e}-capacity filter", "rbloom", _median_time(
            lambda: big.__setitem__("r", peer_insert(lambda: rbloom.Bloom(args.big_capacity, fpr))),
            max(1, args.repeat // 2))))
        del big["r"]
        gc.collect()

    # -- files on disk, 1 and 2 worker processes ---------------------------------------------------
    scale = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for c in range(args.copies):
            for f, t in zip(files, texts):
                (corpus / f"{c}_{f.name}").write_text(t, encoding="utf-8")
        for w in (1, 2):
            out = Path(tmp) / f"w{w}.bloom"
            runs = []
            for _ in range(max(1, args.repeat // 2)):
                t0, c0 = time.perf_counter(), os.times()
                build_filter([corpus], out, capacity=n * args.copies, fpr=fpr, workers=w)
                t1, c1 = time.perf_counter(), os.times()
                parent = (c1.user - c0.user) + (c1.system - c0.system)
                children = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
                # on free cores the workers run side by side: parent time + the workers' share
                runs.append((t1 - t0, parent + children, parent + children / w))
            scale[w] = tuple(statistics.median(r[i] for r in runs) for i in range(3))

    # -- report -----------------------------------------------------------------------------------------
    print(f"corpus: {len(files)} files, {corpus_bytes / 1e6:.1f} MB, {n:,} 8-grams; fpr {fpr:g}; "
          f"median of {args.repeat}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"Python {sys.version.split()[0]}")
    print("seconds are CPU seconds of this process (the machine is shared: wall time is mostly other jobs)")
    print()
    print("| operation | implementation | seconds | M 8-grams/s | vs rbloom |")
    print("|---|---|---|---|---|")
    peer = {op: s for op, impl, s in rows if impl == "rbloom"}
    for op, impl, s in rows:
        print(f"| {op} | {impl} | {s:.3f} | {n / s / 1e6:.2f} | {peer[op] / s:.2f}x |")
    print(f"| insert, strings already built | rbloom `update` alone | {t_rb_only:.3f} | {n / t_rb_only / 1e6:.2f} | |")
    corpus_n = n * args.copies
    print()
    print(f"| build {args.copies} corpus copies from disk ({corpus_n / 1e6:.1f}M 8-grams, file written) | wall s | "
          "CPU s, all processes | projected wall on free cores | M 8-grams/s (projected) | speed-up |")
    print("|---|---|---|---|---|---|")
    for w in (1, 2):
        wall, cpu, proj = scale[w]
        print(f"| gpt2kit, {w} worker{'s' * (w > 1)} | {wall:.2f} | {cpu:.2f} | {proj:.2f} | "
              f"{corpus_n / proj / 1e6:.2f} | {scale[1][2] / proj:.2f}x |")
    print()
    ours_bytes = bf.m / 8 / n
    rb_bytes = rb.size_in_bits / 8 / n
    import tracemalloc

    del grams, filters, st
    gc.collect()
    tracemalloc.start()
    s2 = peer_insert(set)  # the strings are made inside: the set's table plus its strings
    set_bytes = tracemalloc.get_traced_memory()[0] / len(s2)
    tracemalloc.stop()
    print("| memory per 8-gram at capacity | bytes |")
    print("|---|---|")
    print(f"| gpt2kit Bloom filter, fpr {fpr:g} | {ours_bytes:.2f} |")
    print(f"| rbloom, fpr {fpr:g} | {rb_bytes:.2f} |")
    print(f"| python set of 8-gram strings | {set_bytes:.0f} |")
    print()
    # WebText: 40 GB of text (the paper); assume this corpus's bytes per 8-gram, all of them distinct.
    webtext_ngrams = 40e9 / (corpus_bytes / n)
    rate1 = corpus_n / scale[1][2]
    print(f"projection to WebText (40 GB, ~{webtext_ngrams / 1e9:.1f}B 8-grams): filter {webtext_ngrams * ours_bytes / 2**30:.0f} GiB "
          f"at fpr {fpr:g}; build {webtext_ngrams / rate1 / 3600:.1f} h in one process at the measured rate, "
          f"~{webtext_ngrams / rate1 / 3600 / 16:.1f} h with 16 workers if scaling stays linear "
          f"(shards of a filter that size are RAM-bound: see the large-filter row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
