"""Token shards: segmenting, the validation split, prepare (formats, workers, resume, errors),
and the pure batch functions."""
from __future__ import annotations

import filecmp
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt2kit import data as D
from gpt2kit.cli import main as cli_main
from gpt2kit.corpus import iter_documents
from gpt2kit.errors import GPT2KitError, InputFileError
from gpt2kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three small documents in three formats."""
    root = tmp_path_factory.mktemp("corpus")
    paras = [f"Paragraph {i} of the first play.\nA line, and another line {i * 7}.\n\n" for i in range(120)]
    (root / "a.txt").write_text("".join(paras))
    with gzip.open(root / "b.txt.gz", "wt") as f:
        f.write("The second document, short.\n")
    (root / "c.jsonl").write_text("\n".join(json.dumps({"body": f"JSON doc {i}: words words."}) for i in range(3)) + "\n")
    return root


def test_split_segments_concatenate_back_and_cut_at_paragraphs():
    text = "".join(f"para {i}\nline\n\n" for i in range(50))
    segs = D.split_segments(text, 40)
    assert "".join(segs) == text
    assert all(s.endswith("\n\n") for s in segs[:-1])
    assert all(len(s) >= 40 for s in segs[:-1])
    assert D.split_segments("x" * 10, 100) == ["x" * 10]
    assert D.split_segments("a\nb\nc\n", 1) == ["a\n", "b\n", "c\n"]  # no blank line: cut at newlines


def test_split_segments_end_near_segment_chars_without_blank_lines():
    lines = "".join(f"sentence number {i} on a line of its own.\n" for i in range(300))
    text = lines + "\nA last paragraph after the only blank line.\n"
    segs = D.split_segments(text, 100)
    assert "".join(segs) == text
    # A far-off blank line does not make one piece of everything before it.
    assert all(100 < len(s) <= 200 and s.endswith("\n") for s in segs[:-1])
    head = D.split_segments(lines, 100)
    assert segs[:len(head) - 1] == head[:-1]  # cut as if the blank line were not there
    # No line break within reach: cut at twice segment_chars.
    assert D.split_segments("x" * 1000, 100) == ["x" * 200] * 5


class _CountingStr(str):
    """A str that counts the characters its `find` calls look at."""
    scanned = 0

    def find(self, sub, start=0, end=None):
        end = len(self) if end is None else min(end, len(self))
        _CountingStr.scanned += max(0, end - start)
        return super().find(sub, start, end)


def test_split_segments_work_is_linear_in_text_without_blank_lines():
    text = "".join(f"line {i}, one sentence per line.\n" for i in range(10_000))
    _CountingStr.scanned = 0
    segs = D.split_segments(_CountingStr(text), 100)
    assert "".join(segs) == text and len(segs) > 1000
    # Each piece searches at most twice within segment_chars of its minimum end, while searching
    # on to the end of the text would scan it once per piece (~len(text)**2 / 200 characters).
    assert _CountingStr.scanned <= 2 * len(text), _CountingStr.scanned


def test_val_split_is_every_kth_segment():
    assert D.val_period(0.05) == 20 and D.val_period(0) == 0
    assert D.val_period(0.15) == 7  # 1 / 0.15 = 6.67 rounds to 7, not down to 6
    assert D.val_period(0.5) == 2  # the upper bound itself is allowed: every other segment
    splits = [D.split_of(i, 20) for i in range(100)]
    assert splits.count("val") == 5 and splits[10] == "val" and splits[11] == "train"
    with pytest.raises(D.DataError):
        D.val_period(0.9)
    for bad in (-0.1, math.nan):
        with pytest.raises(D.DataError, match=r"val_fraction must be in \[0, 0.5\]"):
            D.val_period(bad)


def test_prepare_formats_eot_between_documents_and_metadata(corpus, tmp_path):
    tok = Tokenizer.gpt2()
    meta = D.prepare([corpus], tmp_path / "s", field="body", val_fraction=0.25, segment_chars=500, shard_tokens=700)
    train, val = D.TokenStream(tmp_path / "s", "train"), D.TokenStream(tmp_path / "s", "val")
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"
    assert [len(s) for s in train.shards[:-1]] == [700] * (len(train.shards) - 1)  # fixed shard size
    all_train = train.window(0, len(train))
    assert all_train.dtype == np.int64 and all_train[0] == tok.eot_token
    text = tok.decode(all_train.tolist())
    # Every document is preceded by <|endoftext|> in its split; the jsonl field was read.
    assert "<|endoftext|>The second document, short.\n<|endoftext|>JSON doc 0: words words." in text
    # Held-out text: whole segments, each preceded by <|endoftext|> (a discontinuity), none in train.
    val_text = tok.decode(val.window(0, len(val)).tolist())
    pieces = [p for p in val_text.split("<|endoftext|>") if p]
    assert pieces and all(p not in text for p in pieces)
    segs = D.split_segments((corpus / "a.txt").read_text(), 500)
    assert pieces[0] == segs[2]  # period 4: the segment with index 2 is the first held out
    # consecutive segments of one document in one split are not separated
    assert text.startswith("<|endoftext|>" + segs[0] + segs[1] + "<|endoftext|>" + segs[3] + segs[4] + segs[5] + "<|endoftext|>")
    assert meta["splits"]["val"]["chars"] == sum(len(p) for p in pieces)
    total_chars = sum(len(d) for _, d in iter_documents([corpus], field="body"))
    assert meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"] == total_chars
    assert {s["path"].rsplit("/", 1)[1] for s in meta["settings"]["sources"]} == {"a.txt", "b.txt.gz", "c.jsonl"}
    # Whole segments are counted in the split that holds them, the folder carries the tokenizer that
    # made it, and a finished run leaves no progress file behind.
    assert meta["splits"]["val"]["segments"] == len(pieces)
    n_segments = sum(len(D.split_segments(d, 500)) for _, d in iter_documents([corpus], field="body"))
    assert meta["splits"]["train"]["segments"] + meta["splits"]["val"]["segments"] == n_segments
    assert (train.chars, val.chars) == (meta["splits"]["train"]["chars"], meta["splits"]["val"]["chars"])
    assert meta["tokenizer"]["eot_token"] == tok.eot_token
    assert Tokenizer.from_pretrained(str(tmp_path / "s" / "tokenizer")).fingerprint == tok.fingerprint
    assert not (tmp_path / "s" / "progress.json").exists()
    # A rerun finds the finished folder and does nothing.
    assert D.prepare([corpus], tmp_path / "s", field="body", val_fraction=0.25, segment_chars=500, shard_tokens=700) == meta


def test_prepare_resume_after_interruption_and_workers_give_identical_shards(corpus, tmp_path, monkeypatch):
    kw = dict(field="body", val_fraction=0.25, segment_chars=300, shard_tokens=256)
    ref = D.prepare([corpus], tmp_path / "ref", **kw)
    real_write = D._ShardWriter._write
    calls = []

    def crash_on_fourth(self, arr):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_write(self, arr)

    monkeypatch.setattr(D._ShardWriter, "_write", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        D.prepare([corpus], tmp_path / "cut", **kw)
    monkeypatch.setattr(D._ShardWriter, "_write", lambda self, arr: (calls.append(1), real_write(self, arr)))
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert len(progress["train"]["shards"]) + len(progress["val"]["shards"]) == 3
    with pytest.raises(D.DataError, match="unfinished"):
        D.TokenStream(tmp_path / "cut", "train")
    # a recorded shard cut short (or gone) since: refused, not resumed over (meta.json then
    # claimed tokens that the shards do not hold)
    import shutil

    shutil.copytree(tmp_path / "cut", tmp_path / "damaged")
    first = tmp_path / "damaged" / progress["train"]["shards"][0]
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(first))}: 100 bytes, expected 512 \(a damaged shard of an "
                                          rf"unfinished run\); delete {re.escape(str(tmp_path / 'damaged'))} to prepare"):
        D.prepare([corpus], tmp_path / "damaged", **kw)
    first.unlink()
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(first))}: missing, expected 512 "):
        D.prepare([corpus], tmp_path / "damaged", **kw)
    calls.clear()
    resumed = D.prepare([corpus], tmp_path / "cut", **kw)
    assert len(calls) == len(ref["splits"]["train"]["shards"]) + len(ref["splits"]["val"]["shards"]) - 3
    assert resumed["splits"] == ref["splits"]
    parallel = D.prepare([corpus], tmp_path / "par", workers=2, **kw)
    assert parallel["splits"] == ref["splits"]
    for name in ref["splits"]["train"]["shards"] + ref["splits"]["val"]["shards"]:
        assert filecmp.cmp(tmp_path / "ref" / name, tmp_path / "cut" / name, shallow=False)
        assert filecmp.cmp(tmp_path / "ref" / name, tmp_path / "par" / name, shallow=False)


def test_workers_from_a_script_without_a_main_guard_are_refused_before_anything_runs(tmp_path, corpus):
    # spawn's workers re-run the calling script: unguarded, each would redo its work, then fail
    script = tmp_path / "script.py"
    script.write_text(f"from gpt2kit.data import prepare\nprint('top level ran')\n"
                      f"prepare([{str(corpus)!r}], {str(tmp_path / 'out')!r}, field='body', val_fraction=0, workers=2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stdout == "top level ran\n", (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == (
        f"gpt2kit.data.DataError: prepare(workers=2): its worker processes would each re-run {script} from the top "
        f"(multiprocessing's spawn), which has no `if __name__ == \"__main__\":`: put the script's work under one, "
        f"or pass workers=1")
    assert not (tmp_path / "out").exists()
    # a folder already prepared starts no worker: the same call returns it, as before
    D.prepare([corpus], tmp_path / "out", field="body", val_fraction=0)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout == "top level ran\n", (r.stdout, r.stderr)


def test_a_worker_that_dies_is_a_one_line_error(tmp_path):
    segments = iter([D.Segment(index=0, split="train", boundary=True, text="hello")])
    with pytest.raises(D.DataError, match=r"^prepare: a tokenizing worker process failed \(its error is printed above\)"
                                          r", was killed or ran out of memory; .*with fewer workers than 2; failed at "
                                          r"its start: with the script's work under `if __name__ == \"__main__\":`\)$"):
        list(D._encode_in_pool(str(tmp_path / "no tokenizer here"), segments, 2))  # each worker fails to start


def test_prepare_bad_inputs(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GPT2KitError, match=rf"^{re.escape(str(tmp_path / 'empty.txt'))}: .*no text"):
        D.prepare([tmp_path / "empty.txt"], tmp_path / "out")
    (tmp_path / "small.txt").write_text("too small for a split")
    with pytest.raises(D.DataError, match="too little text for a validation split"):
        D.prepare([tmp_path / "small.txt"], tmp_path / "out2", val_fraction=0.1)
    # a run that fails so leaves nothing behind: full shards under final names looked done
    assert not (tmp_path / "out2").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(D.DataError, match="too little text for a validation split"):
        D.prepare([corpus], tmp_path / "kept", field="body", val_fraction=0.01, segment_chars=100_000, shard_tokens=50)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
    with pytest.raises(GPT2KitError, match="no text"):
        D.prepare([tmp_path / "empty.txt"], tmp_path / "out6")
    assert not (tmp_path / "out6").exists()
    D.prepare([corpus], tmp_path / "out3", field="body", val_fraction=0)
    with pytest.raises(D.DataError, match="other inputs or settings"):
        D.prepare([corpus], tmp_path / "out3", field="body", val_fraction=0.1)
    with pytest.raises(D.DataError, match="not a prepared shard folder"):
        D.read_meta(tmp_path)
    for bad in (0, -2):
        with pytest.raises(D.DataError, match=f"workers must be at least 1, got {bad}"):
            D.prepare([corpus], tmp_path / "out4", field="body", workers=bad)
    (tmp_path / "vocab.txt").write_text("not a tokenizer")
    with pytest.raises(InputFileError, match="vocab.txt: is a file, not a tokenizer: expected a folder holding "
                                             ".*encoder.json.*or a released name"):
        D.prepare([corpus], tmp_path / "out5", tokenizer=str(tmp_path / "vocab.txt"))
    assert not any((tmp_path / f"out{i}").exists() for i in (4, 5))
    # an output folder that is a file (or under one): named as such, not "File exists" / "Not a directory"
    for out in (tmp_path / "vocab.txt", tmp_path / "vocab.txt" / "out"):
        with pytest.raises(D.DataError, match=rf"output folder {out}: (exists and is not a folder|.*file, not a folder)"):
            D.prepare([corpus], out, field="body")
    # a shard cut to an odd number of bytes (half a token) is named, not numpy's bare ValueError
    shard = tmp_path / "out3" / D.read_meta(tmp_path / "out3")["splits"]["train"]["shards"][0]
    shard.write_bytes(shard.read_bytes()[:1001])
    with pytest.raises(InputFileError, match=rf"{shard.name}: 1001 bytes: not whole uint16 tokens, the shard is truncated"):
        D.TokenStream(tmp_path / "out3", "train")


@pytest.mark.parametrize("option, value, expected", [
    ("--val-fraction", "-0.1", "--val-fraction: expected a number in [0, 0.5], got -0.1"),
    ("--val-fraction", "nan", "--val-fraction: expected a number in [0, 0.5], got nan"),
    ("--val-fraction", "1.5", "--val-fraction: expected a number in [0, 0.5], got 1.5"),
    ("--val-fraction", "half", "--val-fraction: expected a number in [0, 0.5], got half"),
    ("--workers", "0", "--workers: expected a whole number >= 1, got 0"),
    ("--workers", "-2", "--workers: expected a whole number >= 1, got -2"),
    ("--shard-tokens", "1.5e0", "--shard-tokens: expected a whole number >= 1, got 1.5e0"),
    ("--shard-tokens", "inf", "--shard-tokens: expected a whole number >= 1, got inf"),
    ("--segment-chars", "0", "--segment-chars: expected a whole number >= 1, got 0"),
])
def test_cli_prepare_bad_values_fail_in_one_line(corpus, tmp_path, capsys, option, value, expected):
    rc = cli_main(["prepare", str(corpus), "--out", str(tmp_path / "out"), "--field", "body", "--no-progress",
                   option, value])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"gpt2kit: error: {expected}\n"
    assert not (tmp_path / "out").exists()


def test_jsonl_lone_surrogate_is_named_by_file_and_line(tmp_path):
    from gpt2kit.corpus import iter_file_documents
    f = tmp_path / "sur.jsonl"
    f.write_text('{"text": "fine \\ud83d\\ude00 pair"}\n{"text": "hello world \\ud800 there"}\n')
    docs = iter_file_documents(f)
    assert next(docs) == "fine \U0001F600 pair"  # a surrogate pair is one character
    with pytest.raises(InputFileError, match=r"sur.jsonl: line 2: field 'text' holds a lone surrogate U\+D800 at character 12"):
        next(docs)


def test_cli_prepare_takes_counts_in_scientific_notation(corpus, tmp_path, capsys):
    rc = cli_main(["prepare", str(corpus), "--out", str(tmp_path / "out"), "--field", "body", "--no-progress",
                   "--val-fraction", "0.25", "--shard-tokens", "7e2", "--segment-chars", "5E2", "--workers", "1e0"])
    assert rc == 0, capsys.readouterr().err
    settings = D.read_meta(tmp_path / "out")["settings"]
    assert settings["shard_tokens"] == 700 and settings["segment_chars"] == 500
    assert type(settings["shard_tokens"]) is int and type(settings["segment_chars"]) is int


def test_ctrl_c_with_workers_exits_130_and_the_rerun_resumes(tmp_path, caplog):
    # One shard's worth of paragraphs, then seconds of tokenizing left: one sentence per line.
    (tmp_path / "a.txt").write_text("".join(f"Paragraph {i}: some words.\nAnother line.\n\n" for i in range(2500)))
    (tmp_path / "b.txt").write_text("".join(f"Sentence {i}, some words and a number {i * 7919 % 1000}.\n"
                                            for i in range(60_000)))
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    out = tmp_path / "out"
    # A new session, signalled as a group: a terminal's Ctrl-C reaches the workers too.
    proc = subprocess.Popen([sys.executable, "-m", "gpt2kit", "prepare", *map(str, inputs), "--out", str(out),
                             "--shard-tokens", "20000", "--workers", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "progress.json").exists():
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("prepare did not exit within 60 s of Ctrl-C")
    # Only the parent handles Ctrl-C: no worker reports a KeyboardInterrupt of its own.
    assert proc.returncode == 130 and err == "gpt2kit: interrupted\n", err
    done = json.loads((out / "progress.json").read_text())["train"]["shards"]
    assert done and all((out / name).exists() for name in done)
    caplog.set_level("INFO", logger="gpt2kit.data")
    meta = D.prepare(inputs, out, shard_tokens=20000, workers=1)
    assert f"resuming after {len(done)} train shards" in caplog.text
    assert meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"] == sum(len(p.read_text()) for p in inputs)


def test_resume_refuses_a_progress_file_from_other_segmenting(corpus, tmp_path, monkeypatch):
    kw = dict(field="body", val_fraction=0.25, segment_chars=300, shard_tokens=256)
    _interrupted_prepare(monkeypatch, 3, [corpus], tmp_path / "cut", **kw)
    progress = tmp_path / "cut" / "progress.json"
    state = json.loads(progress.read_text())
    del state["segmenting"]  # as an older gpt2kit wrote it
    progress.write_text(json.dumps(state))
    with pytest.raises(D.DataError, match="an unfinished run by an older gpt2kit, which cut segments differently"):
        D.prepare([corpus], tmp_path / "cut", **kw)


def _interrupted_prepare(monkeypatch, n, *args, **kw):
    """prepare(*args, **kw), stopped by a Ctrl-C during its n-th shard write."""
    real_write = D._ShardWriter._write
    calls = []

    def write(self, arr):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        real_write(self, arr)

    monkeypatch.setattr(D._ShardWriter, "_write", write)
    with pytest.raises(KeyboardInterrupt):
        D.prepare(*args, **kw)
    monkeypatch.undo()


def test_step_offsets_are_pure_and_micro_batches_partition_them():
    a = D.step_offsets(7, 3, 1000, 16, 12)
    assert np.array_equal(a, D.step_offsets(7, 3, 1000, 16, 12))
    assert not np.array_equal(a, D.step_offsets(7, 4, 1000, 16, 12))
    assert not np.array_equal(a, D.step_offsets(7, 3, 1000, 16, 12, stream=1))
    # the validation stream is not the training stream shifted by a step
    assert not np.array_equal(D.step_offsets(7, 2, 1000, 16, 12, stream=1), a)
    assert a.min() >= 0 and a.max() <= 1000 - 17
    one = np.concatenate(D.micro_offsets(a, rank=0, world_size=1, grad_accum=3))
    two = np.concatenate([m for r in range(2) for m in D.micro_offsets(a, rank=r, world_size=2, grad_accum=2)])
    assert np.array_equal(one, a) and np.array_equal(two, a)
    for offsets, world_size in ((a, 5), (a[:0], 1)):  # an empty batch gives no micro-batches to train on
        with pytest.raises(D.DataError, match="does not divide"):
            D.micro_offsets(offsets, rank=0, world_size=world_size, grad_accum=1)
    with pytest.raises(D.DataError, match="fewer than one training window"):
        D.step_offsets(0, 0, 10, 16, 1)


def test_get_batch_targets_are_inputs_shifted_and_windows_cross_shards(tmp_path):
    tokens = np.arange(100, dtype=np.int64)
    x, y = D.get_batch(tokens, np.array([0, 50]), 8)
    assert x.shape == y.shape == (2, 8)
    assert np.array_equal(y[:, :-1], x[:, 1:]) and x[1, 0] == 50 and y[1, -1] == 58
    # The same through shards of 30 tokens.
    (tmp_path / "meta.json").write_text(json.dumps({
        "format": D.FORMAT, "splits": {"train": {"shards": [D.shard_name("train", i) for i in range(4)],
                                                 "tokens": 100, "chars": 0}}}))
    for i in range(4):
        tokens[i * 30:(i + 1) * 30].astype(np.uint16).tofile(tmp_path / D.shard_name("train", i))
    stream = D.TokenStream(tmp_path, "train")
    xs, ys = D.get_batch(stream, np.array([0, 25, 91]), 8)
    xr, yr = D.get_batch(tokens, np.array([0, 25, 91]), 8)
    assert np.array_equal(xs, xr) and np.array_equal(ys, yr)
    # a window inside one shard is int64 too (torch takes no uint16), not a view of the memmap
    assert stream.window(3, 5).dtype == np.int64 and D.get_batch(stream, np.array([2]), 8)[0].dtype == np.int64


def test_sequential_windows_predict_every_token_once():
    for n, T in [(10, 4), (9, 4), (2, 4), (100, 7)]:
        wins = D.sequential_windows(n, T)
        targets = [t for s, length in wins for t in range(s + 1, s + 1 + length)]
        assert targets == list(range(1, n)) and all(length <= T for _, length in wins)


def test_corpus_reader_edge_cases(tmp_path):
    import io

    import zstandard

    from gpt2kit.corpus import iter_file_documents

    # a bad byte on a later JSONL line is named by its offset in the file, not in its line
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputFileError, match=r"bad.jsonl: not valid UTF-8 at byte offset 30 \(byte 0xe9\)"):
        list(iter_file_documents(bad))
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(InputFileError, match=r"num.jsonl: line 1: field 'text' must be a string"):
        list(iter_file_documents(tmp_path / "num.jsonl"))
    # Reddit's dumps are zstd with a window past the library's default limit (--long=31)
    buf = io.BytesIO()
    params = zstandard.ZstdCompressionParameters(window_log=28)
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(b'{"text": "from a long-window dump"}\n')
    assert zstandard.get_frame_parameters(buf.getvalue()).window_size == 1 << 28
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "RC_2019-01.zst").write_bytes(buf.getvalue())  # not a text suffix: not picked up
    (folder / "RS.jsonl.zst").write_bytes(buf.getvalue())
    (folder / "c.json").write_text('{"text": "a .json file of JSON lines"}\n')
    assert [doc for _, doc in iter_documents([folder])] == ["from a long-window dump", "a .json file of JSON lines"]


@pytest.mark.parametrize("name", ["t.txt.gz", "t.txt.zst", "t.jsonl.gz", "t.jsonl.zst"])
def test_a_truncated_compressed_file_is_refused_not_read_in_part(tmp_path, name):
    import zstandard

    from gpt2kit.corpus import iter_file_documents, iter_text_pieces

    # A download cut short: gzip's EOFError came out as a traceback from JSONL files, and a .zst
    # stream ended early without any error, so the corpus silently lost its end.
    text = "".join(json.dumps({"text": f"document {i}: " + "words " * 40}) + "\n" for i in range(500))
    packed = gzip.compress(text.encode()) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(text.encode())
    path = tmp_path / name
    path.write_bytes(packed[:len(packed) // 2])
    readers = [lambda: list(iter_file_documents(path))]
    if ".txt" in name:
        readers.append(lambda: list(iter_text_pieces(path, block_bytes=4096)))
    for read in readers:
        with pytest.raises(InputFileError, match=rf"{name}: cannot read: .*(ended|truncated)"):
            read()
    path.write_bytes(packed)
    assert "".join(iter_file_documents(path)) == (text if ".txt" in name else
                                                  "".join(json.loads(line)["text"] for line in text.splitlines()))


def test_step_offsets_reach_every_window_including_the_only_one():
    # n_tokens == block_size + 1 holds exactly one window, at offset 0
    assert D.step_offsets(0, 0, 17, 16, 4).tolist() == [0, 0, 0, 0]
    # the last window (ending on the last token) is drawn like any other
    assert set(D.step_offsets(0, 0, 18, 16, 64).tolist()) == {0, 1}


def test_resume_after_a_shard_that_ends_where_a_segment_ends(tmp_path, monkeypatch):
    # every document is 5 tokens with its <|endoftext|>: each 5-token shard ends at a segment end,
    # and the resume point is the next segment, with none of its tokens on disk
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"x x x {c}"}) + "\n" for c in "abcdefgh"))
    kw = dict(val_fraction=0, shard_tokens=5)
    ref = D.prepare([corpus], tmp_path / "ref", **kw)
    assert ref["splits"]["train"]["tokens"] == 40 and len(ref["splits"]["train"]["shards"]) == 8
    _interrupted_prepare(monkeypatch, 4, [corpus], tmp_path / "cut", **kw)
    assert D.prepare([corpus], tmp_path / "cut", **kw)["splits"] == ref["splits"]
    for name in ref["splits"]["train"]["shards"]:
        assert filecmp.cmp(tmp_path / "ref" / name, tmp_path / "cut" / name, shallow=False), name


class _WideTokenizer:
    """GPT-2's tokenizer posing as one of `n_vocab` tokens whose <|endoftext|> is the last id."""

    def __init__(self, n_vocab):
        self._tok, self.n_vocab, self.eot_token = Tokenizer.gpt2(), n_vocab, n_vocab - 1

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_uint16_shards_take_a_vocabulary_of_65536_but_not_more(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_load_tokenizer", lambda spec: _WideTokenizer(65536))
    D.prepare([corpus], tmp_path / "ok", field="body", val_fraction=0)
    stream = D.TokenStream(tmp_path / "ok", "train")
    assert stream.window(0, 1).tolist() == [65535]  # the largest id survives the uint16 shard
    monkeypatch.setattr(D, "_load_tokenizer", lambda spec: _WideTokenizer(65537))
    with pytest.raises(D.DataError, match="65537 tokens do not fit uint16 shards"):
        D.prepare([corpus], tmp_path / "big", field="body", val_fraction=0)


def test_a_one_character_tail_is_its_own_segment():
    assert D.split_segments("x" * 201, 100) == ["x" * 200, "x"]


def test_an_input_that_changed_is_not_resumed_or_taken_as_prepared(tmp_path, monkeypatch):
    doc = tmp_path / "a.txt"
    doc.write_text("".join(f"Paragraph {i}, some words.\n\n" for i in range(400)))
    kw = dict(val_fraction=0, shard_tokens=256, segment_chars=300)
    _interrupted_prepare(monkeypatch, 2, [doc], tmp_path / "cut", **kw)
    with open(doc, "a") as f:  # same path, more text: the resume point no longer means anything
        f.write("One more paragraph.\n")
    with pytest.raises(D.DataError, match="an unfinished run with other inputs or settings"):
        D.prepare([doc], tmp_path / "cut", **kw)
    D.prepare([doc], tmp_path / "done", **kw)
    with open(doc, "a") as f:
        f.write("And another.\n")
    with pytest.raises(D.DataError, match="holds shards prepared with other inputs or settings"):
        D.prepare([doc], tmp_path / "done", **kw)


def test_a_shard_shorter_than_meta_json_says_is_refused(corpus, tmp_path):
    D.prepare([corpus], tmp_path / "s", field="body", val_fraction=0, shard_tokens=300)
    shard = tmp_path / "s" / D.shard_name("train", 0)
    shard.write_bytes(shard.read_bytes()[:-2])  # one whole token less: sizes alone look fine
    with pytest.raises(D.DataError, match=r"train shards hold \d+ tokens, meta.json says \d+"):
        D.TokenStream(tmp_path / "s", "train")
    shard.write_bytes(b"")  # emptied (a copy onto a full disk): numpy cannot memory-map it
    with pytest.raises(D.DataError, match=r"train shards hold \d+ tokens, meta.json says \d+"):
        D.TokenStream(tmp_path / "s", "train")


def test_a_tokenizer_without_endoftext_is_refused_before_anything_is_written(tmp_path):
    from gpt2kit.bpe_train import train_bpe

    (tmp_path / "c.txt").write_text("the cat sat on the mat. the dog sat on the log.\n" * 20)
    train_bpe([tmp_path / "c.txt"], vocab_size=270, special_tokens=["<|sep|>"]).save(tmp_path / "tok")
    # refused after the output folder and its tokenizer/ were written, naming neither the tokenizer
    # nor what it lacked beyond "this vocabulary has no <|endoftext|> token"
    with pytest.raises(D.DataError, match=rf"^tokenizer {tmp_path / 'tok'}: has no <\|endoftext\|> token, which "
                                          "prepare puts between documents"):
        D.prepare([tmp_path / "c.txt"], tmp_path / "out", tokenizer=str(tmp_path / "tok"), val_fraction=0)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, monkeypatch, caplog):
    # `prepare data/ --out data/tokens`: on the rerun, data/tokens/meta.json, progress.json and
    # tokenizer/*.json were inputs too, so the same command was refused ("other inputs or
    # settings"), a finished folder and an interrupted one alike
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.txt").write_text("".join(f"Paragraph {j} of file {i}, some words.\n\n" for j in range(300)))
    kw = dict(val_fraction=0.1, segment_chars=500, shard_tokens=1000)
    _interrupted_prepare(monkeypatch, 3, [data], data / "tokens", **kw)
    caplog.set_level("INFO", logger="gpt2kit.data")
    meta = D.prepare([data], data / "tokens", **kw)
    assert "resuming after" in caplog.text
    assert [s["path"].rsplit("/", 1)[1] for s in meta["settings"]["sources"]] == ["0.txt", "1.txt", "2.txt"]
    assert D.prepare([data], data / "tokens", **kw) == meta


def test_prepare_refuses_zero_sizes_from_the_python_api_too(corpus, tmp_path):
    # the CLI checks its flags, but a 0 passed to prepare() made no shard fill (shard_tokens) or
    # no segment end (segment_chars, an endless loop)
    for name in ("shard_tokens", "segment_chars"):
        with pytest.raises(D.DataError, match=f"^{name} must be at least 1, got 0$"):
            D.prepare([corpus], tmp_path / "out", field="body", **{name: 0})
    assert not (tmp_path / "out").exists()


def test_a_finished_folder_is_not_taken_as_prepared_with_other_settings(corpus, tmp_path):
    kw = dict(field="body", val_fraction=0, shard_tokens=700, segment_chars=500)
    D.prepare([corpus], tmp_path / "s", **kw)
    for change in ({"field": "text"}, {"shard_tokens": 701}, {"segment_chars": 501}):
        with pytest.raises(D.DataError, match="holds shards prepared with other inputs or settings"):
            D.prepare([corpus], tmp_path / "s", **{**kw, **change})


def test_a_shard_is_written_as_soon_as_it_is_full(tmp_path):
    # progress is saved after an add that wrote a shard: a full shard held back until the next
    # segment would be tokenized again after an interruption
    w = D._ShardWriter(tmp_path, "train", 5, None)
    assert w.add(0, np.arange(3, dtype=D.DTYPE), 10) is False
    assert w.add(2, np.arange(2, dtype=D.DTYPE), 20) is True
    assert w.disk == {"shards": ["train_000000.bin"], "tokens": 5, "chars": 30, "segments": 2, "next_segment": 3,
                      "skip": 0}
    assert w.add(3, np.arange(7, dtype=D.DTYPE), 40) is True  # 5 of its 7 tokens are on disk
    assert w.disk == {"shards": ["train_000000.bin", "train_000001.bin"], "tokens": 10, "chars": 30, "segments": 2,
                      "next_segment": 3, "skip": 5}
    w.finish()
    assert (w.tokens, w.chars, w.segments, w.disk["next_segment"]) == (12, 70, 3, 4)
    assert np.fromfile(tmp_path / "train_000001.bin", dtype=D.DTYPE).tolist() == [0, 1, 2, 3, 4]


def test_damaged_or_foreign_shard_folders_are_named(corpus, tmp_path):
    folder = tmp_path / "s"
    D.prepare([corpus], folder, field="body", val_fraction=0, shard_tokens=300)
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(folder))}: no split 'test'$"):
        D.TokenStream(folder, "test")
    shard = folder / D.shard_name("train", 1)
    shard.unlink()
    with pytest.raises(InputFileError, match=rf"{shard.name}: shard listed in meta.json is missing"):
        D.TokenStream(folder, "train")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(InputFileError, match="meta.json: expected format 'gpt2kit-shards', got 'other'"):
        D.read_meta(folder)
    (folder / "meta.json").write_text(json.dumps(meta)[:40])  # cut short
    with pytest.raises(InputFileError, match="meta.json: cannot read JSON"):
        D.read_meta(folder)


def test_an_error_while_writing_stops_the_worker_processes_before_it_is_raised(corpus, tmp_path, monkeypatch):
    import multiprocessing as mp

    def full_disk(self, arr):
        raise OSError("No space left on device")

    monkeypatch.setattr(D._ShardWriter, "_write", full_disk)
    with pytest.raises(OSError, match="No space left") as e:
        D.prepare([corpus], tmp_path / "out", field="body", shard_tokens=50, workers=2)
    # the traceback (held here, as by a caller that logs it) keeps prepare's frame alive: the pool is
    # shut down by prepare itself, not whenever its generator is collected
    assert e.value is not None and mp.active_children() == []
