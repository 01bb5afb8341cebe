"""`gpt2kit overlap ...` end to end, as a user runs it."""
from __future__ import annotations

import json
import random

from gpt2kit.overlap import HEADER_BYTES


def _corpus(tmp_path):
    rng = random.Random(3)
    vocab = ["".join(rng.choices("klmnoprstu", k=6)) for _ in range(400)]
    train = tmp_path / "train"
    train.mkdir()
    docs = [[rng.choice(vocab) for _ in range(300)] for _ in range(6)]
    for i, d in enumerate(docs):
        (train / f"doc{i}.txt").write_text(" ".join(d))
    # test set A copies half of a training document; test set B shares nothing
    a = tmp_path / "setA.txt"
    a.write_text(" ".join(docs[2][:150]) + " " + " ".join(f"x{i}" for i in range(150)))
    b = tmp_path / "setB.jsonl"
    b.write_text("".join(json.dumps({"text": " ".join(f"y{i}_{j}" for i in range(40))}) + "\n" for j in range(3)))
    return train, a, b


def test_build_merge_query_fpr(cli, tmp_path):
    train, a, b = _corpus(tmp_path)
    r = cli("overlap", "build", "--out", str(tmp_path / "all.bloom"), "--capacity", "5000", "--fpr", "1e-6",
            "--workers", "2", str(train))
    assert r.returncode == 0, r.stderr
    assert "1,758 8-grams from 6 documents" in r.stdout and "k=20" in r.stdout

    files = sorted(train.iterdir())
    for name, part in (("p1", files[:3]), ("p2", files[3:])):
        r = cli("overlap", "build", "--out", str(tmp_path / f"{name}.bloom"), "--capacity", "5000", "--fpr", "1e-6",
                *map(str, part))
        assert r.returncode == 0, r.stderr
    r = cli("overlap", "merge", str(tmp_path / "p1.bloom"), str(tmp_path / "p2.bloom"), "--out",
            str(tmp_path / "merged.bloom"))
    assert r.returncode == 0, r.stderr
    assert "1,758 8-grams from 6 documents" in r.stdout  # 3 + 3, as the inputs recorded them
    assert (tmp_path / "merged.bloom").read_bytes() == (tmp_path / "all.bloom").read_bytes()

    r = cli("overlap", "build", "--exact", "--out", str(tmp_path / "all.exact"), str(train))
    assert r.returncode == 0 and "exact set of 1,758 distinct 8-grams" in r.stdout, r.stderr

    out = tmp_path / "report"
    r = cli("overlap", "query", str(tmp_path / "all.bloom"), str(tmp_path / "all.exact"), str(a), str(b),
            "--out-dir", str(out), "--top", "2")
    assert r.returncode == 0, r.stderr
    # setA: 300 words -> 293 8-grams; the 143 inside the copied half are in the training set
    assert "| all.bloom | 48.81 | 0.00 |" in r.stdout and "| all.exact | 48.81 | 0.00 |" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["table"]["all.bloom"] == report["table"]["all.exact"] == {"setA": 143 / 293 * 100, "setB": 0.0}
    (ra,) = [x for x in report["results"] if x["test_set"] == "setA" and x["filter"] == "all.bloom"]
    assert ra["top_passages"][0]["words"] == 150 and ra["hits"] == 143
    md = (out / "report.md").read_text()
    assert md.startswith("# 8-gram overlap") and "| filter | setA | setB |" in md
    assert (out / "overlap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = cli("overlap", "fpr", str(tmp_path / "all.bloom"), "--samples", "200000")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("0 of 200,000 random 8-grams reported present") and "configured bound 1e-06" in r.stdout

    r = cli("overlap", "info", str(tmp_path / "all.bloom"))
    info = json.loads(r.stdout)
    assert info["header"]["k_hashes"] == 20 and info["stats"]["estimated_distinct"] > 1700


def test_query_labels_exact_and_bloom_alike(cli, tmp_path):
    train, a, _ = _corpus(tmp_path)
    for flag, name in (([], "f.bloom"), (["--exact"], "g.exact")):
        extra = [] if flag else ["--auto"]
        r = cli("overlap", "build", *flag, *extra, "--out", str(tmp_path / name), str(train))
        assert r.returncode == 0, r.stderr
    r = cli("overlap", "query", str(tmp_path / "f.bloom"), str(tmp_path / "g.exact"), str(a), "--json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)["table"]
    assert table["f"] == table["g"] == {"setA": 143 / 293 * 100}


def test_cli_errors_exit_2(cli, tmp_path):
    train, a, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--out", str(tmp_path / "x.bloom"), str(train))
    assert r.returncode == 2 and "give --capacity N or --auto" in r.stderr

    (tmp_path / "short.txt").write_text("seven words are not enough for one")
    r = cli("overlap", "build", "--auto", "--out", str(tmp_path / "x.bloom"), str(tmp_path / "short.txt"))
    assert r.returncode == 2 and "no 8-grams in the inputs" in r.stderr and "Traceback" not in r.stderr

    r = cli("overlap", "build", "--capacity", "100", "--out", str(tmp_path / "x.bloom"), str(train))
    assert r.returncode == 2 and "more than its capacity 100" in r.stderr
    assert not (tmp_path / "x.bloom").exists()

    cli("overlap", "build", "--capacity", "5000", "--out", str(tmp_path / "p.bloom"), str(train))
    cli("overlap", "build", "--capacity", "6000", "--out", str(tmp_path / "q.bloom"), str(train))
    r = cli("overlap", "merge", str(tmp_path / "p.bloom"), str(tmp_path / "q.bloom"), "--out", str(tmp_path / "m.bloom"))
    assert r.returncode == 2 and "different parameters" in r.stderr

    data = bytearray((tmp_path / "p.bloom").read_bytes())
    data[HEADER_BYTES + 100] ^= 0xFF
    (tmp_path / "bad.bloom").write_bytes(data)
    r = cli("overlap", "query", str(tmp_path / "bad.bloom"), str(a))
    assert r.returncode == 2 and "bad.bloom: payload checksum mismatch" in r.stderr

    r = cli("overlap", "query", str(a))
    assert r.returncode == 2 and "none of the arguments is a filter file" in r.stderr
    r = cli("overlap", "fpr", str(a))
    assert r.returncode == 2 and "setA.txt: not a gpt2kit overlap filter" in r.stderr


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def test_capacity_takes_scientific_notation(cli, tmp_path):
    train, _, _ = _corpus(tmp_path)
    for given, shown in (("1e4", "capacity 10,000"), ("2.5e3", "capacity 2,500"), ("3_000", "capacity 3,000")):
        r = cli("overlap", "build", "--capacity", given, "--out", str(tmp_path / "f.bloom"), str(train))
        assert r.returncode == 0 and shown in r.stdout, (given, r.stderr)
    for bad in ("1.5", "2.5e-3", "abc", "inf"):
        r = cli("overlap", "build", "--capacity", bad, "--out", str(tmp_path / "g.bloom"), str(train))
        _one_line_error(r, f"--capacity: expected a whole number such as 1000000 or 1e6, got '{bad}'")
    r = cli("overlap", "build", "--capacity", "1e999999999", "--out", str(tmp_path / "g.bloom"), str(train))
    _one_line_error(r, "--capacity: '1e999999999' is too large")  # at once, not after writing out its digits
    assert not (tmp_path / "g.bloom").exists()
    r = cli("overlap", "fpr", str(tmp_path / "f.bloom"), "--samples", "2e4")
    assert r.returncode == 0 and "of 20,000 random 8-grams" in r.stdout, r.stderr


def test_bad_options_fail_first_with_one_line(cli, tmp_path):
    train, a, _ = _corpus(tmp_path)
    # refused before the counting pass of --auto (which logs "sized for ..." when it is done)
    r = cli("overlap", "build", "--auto", "--fpr", "0", "--out", str(tmp_path / "x.bloom"), str(train))
    _one_line_error(r, "--fpr must be in [1e-15, 1), got 0.0")
    r = cli("overlap", "build", "--exact", "--out", str(tmp_path / "f.exact"), str(train))
    assert r.returncode == 0, r.stderr
    r = cli("overlap", "query", str(tmp_path / "f.exact"), str(a), "--top", "-1")
    _one_line_error(r, "--top must be a whole number >= 0, got -1")
    # checked before the filter is read: this one does not exist
    r = cli("overlap", "fpr", str(tmp_path / "missing.bloom"), "--seed", "-1")
    _one_line_error(r, "--seed must be a whole number >= 0, got -1")
    r = cli("overlap", "fpr", str(tmp_path / "missing.bloom"), "--samples", "0")
    _one_line_error(r, "--samples must be a whole number >= 1, got 0")


def test_output_paths_are_checked_before_the_work(cli, tmp_path):
    train, a, _ = _corpus(tmp_path)
    (tmp_path / "folder.bloom").mkdir()
    for out, problem in ((tmp_path / "folder.bloom", "exists and is not a file"),
                         (a / "f.bloom", f"{a} is a file, not a folder")):
        r = cli("overlap", "build", "--capacity", "5000", "--out", str(out), str(train))
        _one_line_error(r, f"--out {out}: {problem}")  # one line: no progress bar, nothing was built
    r = cli("overlap", "build", "--capacity", "5000", "--out", str(tmp_path / "f.bloom"), str(train))
    assert r.returncode == 0, r.stderr
    r = cli("overlap", "merge", str(tmp_path / "f.bloom"), str(tmp_path / "f.bloom"), "--out",
            str(tmp_path / "folder.bloom"))
    _one_line_error(r, "exists and is not a file")

    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.json").mkdir()
    for out_dir, problem in ((a, "exists and is not a folder"),
                             (tmp_path / "rep", "report.json: exists and is not a file")):
        r = cli("overlap", "query", str(tmp_path / "f.bloom"), str(a), "--out-dir", str(out_dir))
        _one_line_error(r, problem)
        assert r.stdout == ""  # refused before the query ran, not after printing its report



def _without_help(parser, name, visited=None):
    """`NAME ARGUMENT` for each argument of `parser` and of its subcommands, recursively, that has
    no help text; a subcommand without a one-line help counts too. `visited` collects the command
    paths walked."""
    import argparse

    if visited is not None:
        visited.append(name)
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            if not action.help:
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"
            continue
        helped = {a.dest for a in action._choices_actions if a.help}
        walked = set()
        for sub, child in action.choices.items():
            if id(child) in walked:
                continue  # an alias (`webtext export`) is its target's parser
            walked.add(id(child))
            if sub not in helped:
                yield f"{name} {sub}"
            yield from _without_help(child, f"{name} {sub}", visited)


def test_the_help_walker_finds_what_lacks_help():
    import argparse

    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--fine", help="documented")
    parser.add_argument("--bare")
    sub = parser.add_subparsers(dest="command")
    a = sub.add_parser("a", help="documented")
    a.add_argument("path")
    inner = a.add_subparsers(dest="inner").add_parser("deep")
    inner.add_argument("--deeper", help="")
    visited = []
    assert list(_without_help(parser, "tool", visited)) == ["tool --bare", "tool a path", "tool a deep",
                                                            "tool a deep --deeper"]
    assert visited == ["tool", "tool a", "tool a deep"]


def test_every_option_of_the_gpt2kit_cli_has_help():
    # the README promises that `gpt2kit COMMAND --help` documents every option: every command,
    # every subcommand, every argument
    from gpt2kit.cli import build_parser

    visited = []
    missing = list(_without_help(build_parser(), "gpt2kit", visited))
    assert not missing, f"arguments without help text: {missing}"
    # the walk reached every command group and their subcommands, not just the top level
    for command in ("gpt2kit tokenizer encode", "gpt2kit model info", "gpt2kit generate", "gpt2kit serve",
                    "gpt2kit prepare", "gpt2kit train", "gpt2kit demo", "gpt2kit eval", "gpt2kit overlap build",
                    "gpt2kit overlap query", "gpt2kit webtext"):
        assert command in visited, (command, visited)


def test_query_names_a_missing_filter(cli, tmp_path):
    # a mistyped filter name was taken for a test set, and the command said that none of the
    # arguments was a filter file instead of naming the one that does not exist
    _, a, _ = _corpus(tmp_path)
    r = cli("overlap", "query", str(tmp_path / "trian.bloom"), str(a))
    _one_line_error(r, f"{tmp_path / 'trian.bloom'}: no such file or folder")


def test_exact_refuses_the_options_of_bloom_filters(cli, tmp_path):
    # --exact silently ignored these: --workers 4 ran one process, --fpr and --capacity sized nothing
    train, _, _ = _corpus(tmp_path)
    out = tmp_path / "e.exact"
    for extra, named in ((["--workers", "4"], "--workers"), (["--capacity", "5000"], "--capacity"),
                         (["--auto"], "--auto"), (["--fpr", "1e-3"], "--fpr"),
                         (["--allow-overfill"], "--allow-overfill")):
        r = cli("overlap", "build", "--exact", *extra, "--out", str(out), str(train))
        _one_line_error(r, f"{named} does not apply to --exact")
        assert not out.exists()
    r = cli("overlap", "build", "--exact", "--workers", "1", "--out", str(out), str(train))
    assert r.returncode == 0, r.stderr


def test_builds_show_documents_read_in_every_pass(cli, tmp_path):
    # with --workers the only bar was "shards 0/2" until the end (hours, at WebText scale), and
    # the counting pass of --auto showed nothing at all
    train, _, _ = _corpus(tmp_path)
    for extra in (["--auto"], ["--auto", "--workers", "2"], ["--capacity", "5000", "--workers", "3"]):
        r = cli("overlap", "build", *extra, "--out", str(tmp_path / "f.bloom"), str(train))
        assert r.returncode == 0, r.stderr
        if "--auto" in extra:
            assert "counting 8-grams: 6 doc" in r.stderr, r.stderr
        assert "8-grams: 6 doc" in r.stderr.replace("counting 8-grams: 6 doc", ""), r.stderr


def test_json_of_a_saturated_filter_is_strict_json(cli, tmp_path):
    # every bit set (a far overfilled filter) made the distinct-count estimate infinite, and
    # report.json and `info` wrote the bare word Infinity, which JSON parsers other than Python's refuse
    train, a, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--capacity", "1", "--fpr", "0.5", "--allow-overfill", "--out",
            str(tmp_path / "full.bloom"), str(train))
    assert r.returncode == 0 and "false-positive rate now 1 " in r.stdout, r.stderr

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    r = cli("overlap", "info", str(tmp_path / "full.bloom"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout, parse_constant=refuse)
    assert info["stats"]["estimated_distinct"] is None and info["stats"]["fill_ratio"] == 1.0
    r = cli("overlap", "query", str(tmp_path / "full.bloom"), str(a), "--json", "--out-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    for text in (r.stdout, (tmp_path / "rep" / "report.json").read_text()):
        report = json.loads(text, parse_constant=refuse)
        assert report["filters"][0]["estimated_distinct"] is None
        assert report["table"] == {"full": {"setA": 100.0}}


def test_query_json_with_out_dir_prints_only_json(cli, tmp_path):
    # `query --json --out-dir rep > r.json` put "wrote rep/report.md, ..." after the JSON on
    # stdout: the file did not parse
    train, a, _ = _corpus(tmp_path)
    cli("overlap", "build", "--exact", "--out", str(tmp_path / "f.exact"), str(train))
    r = cli("overlap", "query", str(tmp_path / "f.exact"), str(a), "--json", "--out-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((tmp_path / "rep" / "report.json").read_text())
    assert f"wrote {tmp_path / 'rep' / 'report.md'}" in r.stderr


def test_a_report_folder_inside_a_test_set_is_not_read_on_the_next_run(cli, tmp_path):
    # `overlap query f.exact data --out-dir data/report`, twice: the second run read the first
    # one's report.json as a test document ('data/report/report.json: line 1: not valid JSON')
    train, a, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--exact", "--out", str(tmp_path / "f.exact"), str(train))
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    data.mkdir()
    (data / a.name).write_text(a.read_text())
    outputs = []
    for _ in range(2):
        r = cli("overlap", "query", str(tmp_path / "f.exact"), str(data), "--out-dir", str(data / "report"), "--json")
        assert r.returncode == 0, r.stderr
        outputs.append(json.loads(r.stdout))
    assert outputs[0] == outputs[1] and (data / "report" / "report.json").exists()


def test_a_damaged_filter_is_refused_everywhere_unless_no_verify(cli, tmp_path):
    # merge, fpr and info read the payload too: each checks it, and --no-verify skips the check
    train, a, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--capacity", "5000", "--out", str(tmp_path / "p.bloom"), str(train))
    assert r.returncode == 0, r.stderr
    data = bytearray((tmp_path / "p.bloom").read_bytes())
    data[HEADER_BYTES + 100] ^= 0xFF
    (tmp_path / "bad.bloom").write_bytes(data)
    for args in (("merge", str(tmp_path / "p.bloom"), str(tmp_path / "bad.bloom"), "--out", str(tmp_path / "m.bloom")),
                 ("fpr", str(tmp_path / "bad.bloom"), "--samples", "1000"),
                 ("info", str(tmp_path / "bad.bloom"))):
        _one_line_error(cli("overlap", *args), "bad.bloom: payload checksum mismatch")
    assert not (tmp_path / "m.bloom").exists()

    r = cli("overlap", "merge", str(tmp_path / "p.bloom"), str(tmp_path / "bad.bloom"), "--out",
            str(tmp_path / "m.bloom"), "--no-verify")
    assert r.returncode == 0 and r.stdout.startswith("merged 2 filters -> "), r.stderr
    r = cli("overlap", "fpr", str(tmp_path / "bad.bloom"), "--samples", "1000", "--no-verify")
    assert r.returncode == 0 and r.stdout.startswith("0 of 1,000 random 8-grams"), r.stderr
    r = cli("overlap", "query", str(tmp_path / "bad.bloom"), str(a), "--no-verify")
    assert r.returncode == 0 and "| bad | 48.81 |" in r.stdout, r.stderr


def test_query_and_fpr_name_what_they_lack(cli, tmp_path):
    train, a, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--exact", "--out", str(tmp_path / "f.exact"), str(train))
    assert r.returncode == 0, r.stderr
    # filters are told from test sets by their magic bytes, wherever they stand
    r = cli("overlap", "query", str(a), str(tmp_path / "f.exact"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["table"] == {"f": {"setA": 143 / 293 * 100}}, r.stderr
    _one_line_error(cli("overlap", "query", str(tmp_path / "f.exact")),
                    "query: no test sets given (text/JSONL files or folders after the filters)")
    _one_line_error(cli("overlap", "fpr", str(tmp_path / "f.exact")),
                    f"{tmp_path / 'f.exact'}: an exact set has no false positives; fpr needs a Bloom filter")


def test_field_names_the_jsonl_text_in_build_and_query(cli, tmp_path):
    docs = [" ".join(f"w{i}" for i in range(20)), "nothing of it here at all in this",
            "w0 w1 w2 w3 w4 w5 w6 w7 zz"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"body": docs[0], "text": "short"}) + "\n")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"body": d, "text": docs[0]}) + "\n" for d in docs))
    r = cli("overlap", "build", "--exact", "--field", "body", "--out", str(tmp_path / "f.exact"),
            str(tmp_path / "train.jsonl"))
    assert r.returncode == 0 and "exact set of 13 distinct 8-grams" in r.stdout, r.stderr
    r = cli("overlap", "query", str(tmp_path / "f.exact"), str(tmp_path / "test.jsonl"), "--field", "body", "--json")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert (res["documents"], res["ngrams"], res["hits"]) == (3, 16, 14)
    assert [p["words"] for p in res["top_passages"]] == [20, 8]  # --top is 10 unless given


def test_fpr_takes_its_seed_and_1e6_samples_by_default(cli, tmp_path):
    train, _, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--capacity", "2000", "--fpr", "0.3", "--out", str(tmp_path / "f.bloom"), str(train))
    assert r.returncode == 0, r.stderr
    lines = []
    for seed in ("1", "2"):
        r = cli("overlap", "fpr", str(tmp_path / "f.bloom"), "--samples", "2000", "--seed", seed)
        assert r.returncode == 0, r.stderr
        lines.append(r.stdout.split(" of ")[0])  # the hits: ~500 of 2,000 at this fill
    assert lines[0] != lines[1] and 100 < int(lines[0]) < 1000, lines
    r = cli("overlap", "fpr", str(tmp_path / "f.bloom"))  # the paper's 1M random 8-grams unless told
    assert r.returncode == 0 and " of 1,000,000 random 8-grams reported present" in r.stdout, r.stderr


def test_merge_refuses_an_overfilled_union_unless_allowed(cli, tmp_path):
    # each half fits a capacity of 1,000; their union (1,758 distinct 8-grams) does not
    train, _, _ = _corpus(tmp_path)
    files = sorted(train.iterdir())
    for name, part in (("p1", files[:3]), ("p2", files[3:])):
        r = cli("overlap", "build", "--out", str(tmp_path / f"{name}.bloom"), "--capacity", "1000", "--fpr", "1e-3",
                *map(str, part))
        assert r.returncode == 0, r.stderr
    args = ("overlap", "merge", str(tmp_path / "p1.bloom"), str(tmp_path / "p2.bloom"),
            "--out", str(tmp_path / "m.bloom"))
    _one_line_error(cli(*args), "more than its capacity 1,000", "or --allow-overfill")
    assert not (tmp_path / "m.bloom").exists()
    r = cli(*args, "--allow-overfill")
    assert r.returncode == 0 and r.stdout.startswith("merged 2 filters -> "), r.stderr
    assert "warning: the filter holds ~" in r.stderr and "more than its capacity 1,000" in r.stderr
    assert "1,758 8-grams from 6 documents" in r.stdout and (tmp_path / "m.bloom").is_file()


def test_fpr_reports_each_rate_in_its_place(cli, tmp_path):
    import re

    train, _, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--capacity", "2000", "--fpr", "0.3", "--out", str(tmp_path / "f.bloom"), str(train))
    assert r.returncode == 0, r.stderr
    r = cli("overlap", "fpr", str(tmp_path / "f.bloom"), "--samples", "2000", "--seed", "1")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"(\d+) of 2,000 random 8-grams reported present: measured false-positive rate (\S+) "
                     r"\(95% upper bound (\S+)\); expected at this fill (\S+); configured bound (\S+)\n", r.stdout)
    assert m, r.stdout
    hits, measured, upper, expected, bound = int(m[1]), *map(float, m.groups()[1:])
    assert measured == float(f"{hits / 2000:.3g}") and measured < upper < 1.5 * measured
    info = json.loads(cli("overlap", "info", str(tmp_path / "f.bloom")).stdout)
    assert expected == float(f"{info['stats']['achieved_fpr']:.3g}") and bound == 0.3
    assert expected != bound  # the filter holds fewer 8-grams than its capacity


def test_top_zero_keeps_no_passages(cli, tmp_path):
    train, a, _ = _corpus(tmp_path)
    r = cli("overlap", "build", "--exact", "--out", str(tmp_path / "f.exact"), str(train))
    assert r.returncode == 0, r.stderr
    r = cli("overlap", "query", str(tmp_path / "f.exact"), str(a), "--top", "0", "--json")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert res["hits"] == 143 and res["top_passages"] == []  # counted all the same, none kept
