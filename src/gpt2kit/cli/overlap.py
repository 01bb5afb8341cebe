"""`gpt2kit overlap build|merge|query|fpr|info`: 8-gram overlap analysis (the paper's Table 6)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from decimal import Decimal, InvalidOperation

from ..errors import InputFileError


def register(subparsers) -> None:
    p = subparsers.add_parser("overlap", help="train/test 8-gram overlap with Bloom filters (paper Section 4)",
                              description="Bloom filters of normalized word 8-grams: build them from a training "
                                          "corpus, merge shards, and report how much of each test set they hold.")
    sub = p.add_subparsers(dest="overlap_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser("build", help="insert every 8-gram of the inputs into a new filter file")
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text/JSONL files or folders (.gz/.zst too), or `gpt2kit prepare` shard folders")
    b.add_argument("--out", required=True, help="filter file to write (e.g. train.bloom)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--capacity", metavar="N",
                      help="distinct 8-grams the filter must hold at --fpr (a whole number: 8000000000 or 8e9)")
    size.add_argument("--auto", action="store_true", help="size from a first pass that counts the 8-grams")
    b.add_argument("--fpr", type=float, help="target false-positive rate at capacity (default 1e-8)")
    b.add_argument("--exact", action="store_true", help="store the 8-grams themselves (exact; small corpora)")
    b.add_argument("--workers", type=int, default=1,
                   help="processes: shard filters built in parallel, then OR-ed (default 1)")
    b.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    b.add_argument("--split", default="train", choices=("train", "val"),
                   help="split of prepared shard folders to read (default: train)")
    b.add_argument("--allow-overfill", action="store_true",
                   help="keep going past the capacity and report the false-positive rate reached")
    b.set_defaults(func=_build)

    m = sub.add_parser("merge", help="OR filters with equal parameters into one")
    m.add_argument("filters", nargs="+", metavar="FILTER",
                   help="filter files with equal parameters (built with the same --capacity and --fpr, "
                        "or all exact sets)")
    m.add_argument("--out", required=True, help="filter file to write (e.g. all.bloom)")
    m.add_argument("--allow-overfill", action="store_true",
                   help="write the result even if it holds more distinct 8-grams than its capacity, with a "
                        "warning giving the false-positive rate reached (default: refuse)")
    m.add_argument("--no-verify", action="store_true", help="skip the payload checksums of the inputs")
    m.set_defaults(func=_merge)

    q = sub.add_parser("query", help="percent of each test set's 8-grams found in each filter",
                       description="Arguments that are filter files (by their magic bytes) are filters; "
                                   "the others are test sets (files or folders). Prints a Table 6-style table.")
    q.add_argument("paths", nargs="+", metavar="FILTER_OR_TEST",
                   help="filter files, then test sets (text/JSONL files or folders, .gz/.zst too)")
    q.add_argument("--out-dir", help="write report.md, report.json and overlap.png here")
    q.add_argument("--top", type=int, default=10, help="longest overlapping passages to keep per pair (default 10)")
    q.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    q.add_argument("--split", default="train", choices=("train", "val"),
                   help="split of prepared shard folders given as test sets (default: train)")
    q.add_argument("--json", action="store_true", help="print the JSON report instead of markdown")
    q.add_argument("--no-verify", action="store_true", help="skip the filters' payload checksums")
    q.set_defaults(func=_query)

    f = sub.add_parser("fpr", help="measure the false-positive rate with random 8-grams (the paper's check)")
    f.add_argument("filter", metavar="FILTER", help="a Bloom filter file (an exact set has no false positives)")
    f.add_argument("--samples", default="1000000", metavar="N",
                   help="random 8-grams to query (a whole number: 1000000 or 1e6; default 1e6)")
    f.add_argument("--seed", type=int, default=0, help="seed of the random 8-grams, 0 or more (default 0)")
    f.add_argument("--no-verify", action="store_true", help="skip the filter's payload checksum")
    f.set_defaults(func=_fpr)

    i = sub.add_parser("info", help="print a filter's header and fill statistics as JSON")
    i.add_argument("filter", metavar="FILTER", help="a filter file (Bloom filter or exact set)")
    i.set_defaults(func=_info)


def _whole_number(text: str, option: str) -> int:
    """An option's whole number, written plainly (8000000000, 8_000_000_000) or in scientific
    notation (8e9, 2.5e9): filter capacities run to billions, whose zeros are easy to miscount."""
    from ..overlap import OverlapError

    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        d = None
    if d is None or not d.is_finite() or d != d.to_integral_value():
        raise OverlapError(f"{option}: expected a whole number such as 1000000 or 1e6, got {text!r}")
    if d.adjusted() > 30:  # int() of 1e999999999 would spend minutes writing out its digits
        raise OverlapError(f"{option}: {text!r} is too large")
    return int(d)


def _build(args: argparse.Namespace) -> int:
    from ..overlap import OverlapError, build_filter

    if args.exact and args.auto:
        raise OverlapError("--auto does not apply to --exact (an exact set stores the 8-grams themselves)")
    if not args.exact and args.capacity is None and not args.auto:
        raise OverlapError("build: give --capacity N or --auto (or --exact)")
    capacity = None if args.capacity is None else _whole_number(args.capacity, "--capacity")
    s = build_filter(args.inputs, args.out, capacity=capacity, fpr=args.fpr, exact=args.exact,
                     workers=args.workers, field=args.field, split=args.split,
                     allow_overfill=args.allow_overfill, progress=True)
    print(s.line())
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..overlap import merge_filters

    s = merge_filters(args.filters, args.out, allow_overfill=args.allow_overfill, verify=not args.no_verify,
                      progress=True)
    print(f"merged {len(args.filters)} filters -> {s.line()}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from ..overlap import OverlapError, OverlapReport, is_filter_file, query

    # before the filters are read and verified, which for a large one takes minutes (`query`
    # checks --top first thing)
    if args.out_dir:
        OverlapReport.check_out_dir(args.out_dir)
    # named first: a mistyped filter would otherwise pass for a test set, and the error would be
    # that no argument is a filter
    for p in args.paths:
        if not os.path.exists(p):
            raise InputFileError(p, "no such file or folder")
    filters = [p for p in args.paths if is_filter_file(p)]
    tests = [p for p in args.paths if p not in filters]
    if not filters:
        raise OverlapError("query: none of the arguments is a filter file (build one with `gpt2kit overlap build`)")
    if not tests:
        raise OverlapError("query: no test sets given (text/JSONL files or folders after the filters)")
    report = query(filters, tests, top=args.top, field=args.field, split=args.split, verify=not args.no_verify,
                   progress=True, exclude=args.out_dir)  # a rerun must not read the last one's report
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(report.to_markdown(), end="")
    if args.out_dir:
        written = report.write(args.out_dir)
        # on stderr: stdout is the report itself, for `> report.md` or `--json | jq`
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


def _fpr(args: argparse.Namespace) -> int:
    from ..overlap import BloomFilter, OverlapError, check_fpr_options, measure_fpr, open_filter

    # before the filter is read and verified, which for a large one takes minutes
    samples, seed = check_fpr_options(_whole_number(args.samples, "--samples"), args.seed)
    flt = open_filter(args.filter, verify=not args.no_verify, progress=True)
    if not isinstance(flt, BloomFilter):
        raise OverlapError(f"{args.filter}: an exact set has no false positives; fpr needs a Bloom filter")
    r = measure_fpr(flt, samples, seed=seed)
    print(f"{r['hits']} of {r['samples']:,} random 8-grams reported present: measured false-positive rate "
          f"{r['measured_fpr']:.3g} (95% upper bound {r['upper_95']:.3g}); expected at this fill "
          f"{r['expected_fpr']:.3g}; configured bound {r['fpr_target']:.3g}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..overlap import json_safe, open_filter, read_header

    header = read_header(args.filter)
    stats = open_filter(args.filter, verify=True, progress=True).stats()
    print(json.dumps(json_safe({"header": header, "stats": stats}), indent=2))
    return 0
