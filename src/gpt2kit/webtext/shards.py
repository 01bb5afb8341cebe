"""Stage 5: the final corpus and its report.

`shards/webtext-K.jsonl.zst` hold one JSON object per document with the fields `text`, `url`,
`subreddit`, `score`, `created_utc`, `fetched_at`, ready for `gpt2kit prepare` (which reads JSONL
.zst and takes the `text` field). The report (`report.json`, `report.md`, `funnel.png`) shows how
many links and documents survived each stage, the bytes, the fetch statuses, the reasons pages
were dropped, and the most frequent domains.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..io import atomic_path, write_json, write_text
from .work import Runner, WorkFolder, read_jsonl_zst, run_tasks, shard_name, write_jsonl_zst

FIELDS = ("text", "url", "subreddit", "score", "created_utc", "fetched_at")


@dataclass(frozen=True)
class ShardConfig:
    top_domains: int = 25


def export_shard(in_path: str, out_path: str) -> dict:
    domains: Counter = Counter()
    docs = []
    for d in read_jsonl_zst(in_path):
        docs.append({k: d[k] for k in FIELDS})
        domains[urlsplit(d["url"]).hostname or ""] += 1
    write_jsonl_zst(out_path, docs)
    return {"docs": len(docs), "bytes": sum(len(d["text"].encode()) for d in docs), "domains": dict(domains)}


def funnel(wf: WorkFolder) -> list[tuple[str, int]]:
    """(step, count) from the dump lines to the final documents."""
    links = wf.complete("links")["totals"]
    fetch = wf.complete("fetch")["totals"]
    extract = wf.complete("extract")["totals"]
    dedup = wf.complete("dedup")["totals"]
    final = wf.complete("shards")["totals"] if wf.is_complete("shards") else None
    steps = [
        ("dump lines", links.get("lines", 0)),
        ("link posts kept", links.get("kept", 0)),
        ("unique links", links.get("links", 0)),
        ("fetched HTML", fetch.get("status", {}).get("ok", 0)),
        ("extracted documents", extract.get("docs", 0)),
        ("after exact dedup", dedup.get("docs_in", 0) - dedup.get("exact_duplicates", 0)),
        ("after near dedup", dedup.get("docs", 0)),
    ]
    if final is not None:
        steps.append(("final documents", final.get("docs", 0)))
    return steps


def write_report(wf: WorkFolder, cfg: ShardConfig) -> dict:
    totals = wf.complete("shards")["totals"]
    steps = funnel(wf)
    report = {
        "funnel": dict(steps),
        "bytes": totals.get("bytes", 0),
        "links": wf.complete("links")["totals"],
        "fetch": wf.complete("fetch")["totals"],
        "extract": wf.complete("extract")["totals"],
        "dedup": wf.complete("dedup")["totals"],
        "top_domains": Counter(totals.get("domains", {})).most_common(cfg.top_domains),
    }
    write_json(wf.root / "report.json", report)
    lines = ["# WebText build report", "", "| step | count |", "|---|---:|"]
    lines += [f"| {name} | {n:,} |" for name, n in steps]
    lines += ["", f"Final corpus: {steps[-1][1]:,} documents, {report['bytes']:,} bytes of text.", "",
              "Fetch statuses: " + ", ".join(f"{k} {v:,}" for k, v in report["fetch"].get("status", {}).items() if v),
              "", "Pages dropped in extraction: "
              + (", ".join(f"{k} {v:,}" for k, v in report["extract"].get("dropped", {}).items() if v) or "none"),
              "", "| domain | documents |", "|---|---:|"]
    lines += [f"| {d} | {n:,} |" for d, n in report["top_domains"]]
    write_text(wf.root / "report.md", "\n".join(lines) + "\n")
    plot_funnel(steps, wf.root / "funnel.png")
    return report


def plot_funnel(steps: list[tuple[str, int]], path) -> None:
    # A Figure with the Agg canvas, not pyplot: no global state, no GUI backend, faster import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [s for s, _ in steps][::-1]
    counts = [n for _, n in steps][::-1]
    fig = Figure(figsize=(7, 0.45 * len(steps) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bars = ax.barh(names, counts, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{n:,}" for n in counts], padding=3, fontsize=8)
    positive = [n for n in counts if n > 0]
    if positive and max(positive) > 100 * min(positive):   # a real funnel spans orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("count")
    ax.set_title("WebText funnel")
    ax.margins(x=0.2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_shards(work, cfg: ShardConfig = ShardConfig(), runner: Runner = Runner()) -> dict:
    """Write the final corpus shards and the report; returns the stage's totals."""
    wf = WorkFolder(work)
    ids = wf.shard_ids("dedup")
    wf.check_config("shards", {"upstream": wf.fingerprint("dedup")})
    src, out = wf.stage_dir("dedup"), wf.stage_dir("shards")
    tasks = [(shard_name("webtext", k), (str(src / f"{shard_name('dedup', k)}.jsonl.zst"),
                                         str(out / f"{shard_name('webtext', k)}.jsonl.zst"))) for k in ids]
    totals, skipped = run_tasks(wf, "shards", export_shard, tasks, runner, desc="shard")
    wf.finish("shards", ids, totals)
    write_report(wf, cfg)
    return {**totals, "skipped_tasks": skipped}


def read_corpus(work) -> list[dict]:
    """Every document of a finished build, in shard order (for inspection and tests)."""
    wf = WorkFolder(work)
    return [d for k in wf.shard_ids("shards")
            for d in read_jsonl_zst(wf.stage_dir("shards") / f"{shard_name('webtext', k)}.jsonl.zst")]

