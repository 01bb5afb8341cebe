"""`gpt2kit eval` as a user runs it: what it checks before the model loads, what it prints, what
--out records. Tiny model, one small PTB file: each run takes a second or two."""
from __future__ import annotations

import json

import pytest

from gpt2kit.tokenizer import Tokenizer
from conftest import save_sharp_tiny_model

PTB = """ no it was n't black monday 
 but while the new york stock exchange did n't fall apart friday as the dow jones industrial average plunged N points 
 some circuit breakers installed after the october N crash failed their first test traders say 
 the <unk> has already begun 
"""
LAMBADA = ["The recipe called for two cups of flour and three eggs. She mixed them slowly into the batter",
           "Marcus had never seen the ocean before. He pressed his face to the window and stared at the water",
           "The professor paused and wrote a single word on the board"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_sharp_tiny_model(tmp_path_factory.mktemp("tiny-cli"), Tokenizer.gpt2(), seed=7, n_ctx=64, scale=8.0)


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ptb.test.txt").write_text(PTB)
    (tmp_path / "data" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    return tmp_path / "data"


def _eval(*args: str) -> int:
    from gpt2kit.cli import main

    return main(["eval", *args])


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err == f"gpt2kit: error: {message}\n", err


def test_out_records_every_option_of_the_run(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --data-dir is recorded as the absolute folder it named
    out = tmp_path / "r.json"
    assert _eval("--model", f"{model_dir}/", "--tasks", " ptb , lambada,", "--data-dir", "data", "--limit", "2",
                 "--batch-size", "3", "--stride", "16", "--no-detokenize", "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["options"] == {"tasks": ["ptb", "lambada"], "data_dir": str(data_dir), "limit": 2, "batch_size": 3,
                              "stride": 16, "dtype": "float32", "detokenize": False, "world_size": 1, "shots": None,
                              "seed": 0}
    assert doc["model"] == f"{model_dir}/" and doc["paper_size"] is None and doc["paper_table3"] is None
    assert doc["tasks"]["ptb"]["protocol"]["detokenizer"] == "none" and doc["tasks"]["ptb"]["protocol"]["stride"] == 16
    assert doc["tasks"]["ptb"]["counts"]["documents"] == 1  # a PTB file is one document
    lambada = doc["tasks"]["lambada"]
    assert lambada["counts"]["documents"] == 2 and lambada["protocol"]["detokenizer"] == "none"
    # the table's row is named after the model's folder, even given with a trailing slash
    assert f"| {model_dir.name} | " in stdout, stdout
    assert stdout.splitlines()[-1].startswith("evaluated 2 tasks, 3 documents in ")
    assert stdout.splitlines()[-1].endswith(f"s; results in {out}")
    assert not list(tmp_path.glob("r.json.partial*"))  # the journal goes once the results are written


def test_defaults_detokenize_and_print_no_results_file(model_dir, data_dir, tmp_path, capsys):
    before = sorted(tmp_path.rglob("*"))
    assert _eval("--model", str(model_dir), "--tasks", "ptb", "--data-dir", str(data_dir), "--limit", "1") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("evaluated 1 task, 1 document in ") and last.endswith("s"), last
    assert sorted(tmp_path.rglob("*")) == before  # no results file, no journal
    out = tmp_path / "r.json"
    assert _eval("--model", str(model_dir), "--tasks", "ptb", "--data-dir", str(data_dir), "--limit", "1",
                 "--out", str(out)) == 0
    doc = json.loads(out.read_text())
    assert doc["options"]["detokenize"] is True and doc["tasks"]["ptb"]["protocol"]["detokenizer"] == "ptb"
    assert doc["options"]["batch_size"] == 8 and doc["options"]["stride"] is None


def test_dtype_reaches_the_model(model_dir, data_dir, tmp_path):
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert _eval("--model", str(model_dir), "--tasks", "ptb", "--data-dir", str(data_dir), "--limit", "1",
                     "--dtype", dtype, "--out", str(out)) == 0
        doc = json.loads(out.read_text())
        assert doc["options"]["dtype"] == dtype
        ppl[dtype] = doc["tasks"]["ptb"]["metrics"]["ppl"]
    assert ppl["bfloat16"] != ppl["float32"] and ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.1)


def test_the_task_list_is_checked_before_the_model_loads(tmp_path, data_dir, capsys):
    missing_model = str(tmp_path / "no-model")
    assert _eval("--model", missing_model, "--tasks", " , ", "--data-dir", str(data_dir)) == 2
    _one_line_error(capsys, "--tasks: expected at least one task name")
    # a missing dataset file is named, not the model that was never loaded
    assert _eval("--model", missing_model, "--tasks", "ptb,1bw", "--data-dir", str(data_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2kit: error: task '1bw': none of ") and err.count("\n") == 1, err


def test_zero_shots_and_the_smallest_counts_are_valid(tmp_path, data_dir, capsys):
    # each passes the up-front checks; the run then stops at the model, which does not exist
    missing_model = str(tmp_path / "no-model")
    for extra in (["--shots", "0"], ["--limit", "1"], ["--batch-size", "1"], ["--stride", "1"]):
        assert _eval("--model", missing_model, "--tasks", "ptb", "--data-dir", str(data_dir), *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("gpt2kit: error: ") and "must be at least" not in err and "no-model" in err, (extra, err)


def test_out_and_counts_are_checked_before_the_model_loads(tmp_path, data_dir, capsys):
    missing_model = str(tmp_path / "no-model")
    (tmp_path / "afile").write_text("x")
    assert _eval("--model", missing_model, "--tasks", "ptb", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "afile" / "r.json")) == 2
    _one_line_error(capsys, f"--out {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is a file, not a folder")
    for option in ("--limit", "--batch-size", "--stride"):
        assert _eval("--model", missing_model, "--tasks", "ptb", "--data-dir", str(data_dir), option, "0") == 2
        _one_line_error(capsys, f"{option} must be at least 1, got 0")


def test_progress_is_a_live_bar_on_a_terminal_and_sparse_in_a_log(monkeypatch):
    import io
    import sys

    from gpt2kit.cli.eval import _progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert _progress() is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # nohup, a scheduler: redrawn every 30 s
    assert _progress() == 30.0


def test_a_data_dir_that_is_no_folder_is_said_before_the_model_loads(tmp_path, capsys):
    # it said "none of 'lambada_test.jsonl' ... found in X", as if X were a folder without the file
    (tmp_path / "file").write_text("x")
    for path, said in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "file", "not a folder")):
        assert _eval("--model", str(tmp_path / "no model"), "--tasks", "lambada", "--data-dir", str(path)) == 2
        assert capsys.readouterr().err == (f"gpt2kit: error: {path}: {said}; expected the folder of the tasks' "
                                           f"data files\n")
