"""The demo's fast mode end to end through the CLI, its numbers checked against transformers."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import torch


def test_demo_fast_mode_numbers_match_transformers(cli, tmp_path, shakespeare_files):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gpt2kit.data import TokenStream, sequential_windows

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in shakespeare_files[:3]:
        (corpus / p.name).write_text(p.read_text()[:40_000])
    out = tmp_path / "demo"
    r = cli("demo", "--minutes", "0.1", "--corpus", str(corpus), "--vocab-size", "512", "--preset", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("GPT-2 (this run)", "unigram baseline", "--- sample 3 ---", "bits/char"):
        assert line in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["samples"]) == 3 and all(t.strip() for t in rep["samples"]) and rep["steps"] >= 1 and (out / "loss.png").exists()

    # The saved model and tokenizer load in transformers, and its held-out NLL is the report's.
    model = GPT2LMHeadModel.from_pretrained(out / "model").eval()
    hf_tok = AutoTokenizer.from_pretrained(out / "model")
    assert hf_tok("ROMEO.\n")["input_ids"] == json.loads(json.dumps(hf_tok("ROMEO.\n")["input_ids"]))
    assert len(hf_tok) == rep["vocab_size"] == model.config.vocab_size
    val, train = TokenStream(out / "data", "val"), TokenStream(out / "data", "train")
    tokens = torch.from_numpy(val.window(0, len(val)))
    nll = 0.0
    with torch.no_grad():
        for start, length in sequential_windows(len(val), 128):
            logits = model(tokens[None, start:start + length]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, tokens[start + 1:start + 1 + length], reduction="sum").item()
    n = len(val) - 1
    assert math.isclose(rep["val_loss"], nll / n, rel_tol=1e-4)
    assert math.isclose(rep["val_perplexity"], math.exp(nll / n), rel_tol=1e-3)
    assert math.isclose(rep["val_bits_per_char"], nll / math.log(2) / val.chars, rel_tol=1e-4)
    # The unigram baseline, counted independently.
    counts = Counter(train.window(0, len(train)).tolist())
    total = sum(counts.values()) + rep["vocab_size"]
    uni = -sum(math.log((counts[t] + 1) / total) for t in tokens[1:].tolist())
    assert math.isclose(rep["unigram_bits_per_char"], uni / math.log(2) / val.chars, rel_tol=1e-6)
    # It learned something: better than the untrained model's log(V) per token.
    assert rep["val_loss"] < math.log(rep["vocab_size"]) and np.isfinite(rep["val_loss"])


def test_fitted_batch_size_keeps_enough_steps():
    from gpt2kit.demo import fitted_batch_size

    assert fitted_batch_size(20e6, 32, 128) == 32  # a quiet machine, 10 minutes: the full batch
    assert fitted_batch_size(1e6, 32, 128) == 16  # 1M tokens / (16 x 128) = 488 steps >= 300
    assert fitted_batch_size(300e3, 32, 128) == 4  # never below 4
    assert all(fitted_batch_size(t, 32, 128) >= fitted_batch_size(t / 2, 32, 128) for t in (1e5, 1e6, 1e7))


def test_bad_options_fail_before_any_work(cli, tmp_path):
    # each checked before the vocabulary is learned: nothing is written, and it takes no time
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50)
    (tmp_path / "file").write_text("x")
    cases = [(("--minutes", "nan"), "--minutes must be a positive number, got nan"),
             (("--minutes", "-1"), "--minutes must be a positive number, got -1.0"),
             (("--preset", "bogus"), "unknown model preset 'bogus'"),
             (("--out", str(tmp_path / "file")), "exists and is not a folder"),
             (("--vocab-size", "70000"), "--vocab-size: at most 65536 (token shards hold uint16 ids), got 70000"),
             ((), f"--corpus: {corpus.stat().st_size:,} bytes of text; the demo needs at least 10,000")]
    for args, message in cases:
        r = cli("demo", "--corpus", str(corpus), "--out", str(tmp_path / "out"), *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "1/5" not in r.stderr and not (tmp_path / "out").exists()


def test_a_small_corpus_still_gets_a_held_out_split(tmp_path, shakespeare_files):
    # 30 KB: three segments of prepare's default 10,000 characters, none of them held out; the
    # error then advised --segment-chars and --val-fraction, which `gpt2kit demo` does not have
    from gpt2kit.demo import demo

    corpus = tmp_path / "small.txt"
    corpus.write_text(shakespeare_files[0].read_text()[:30_000])
    rep = demo(0.02, out_dir=tmp_path / "demo", corpus=[corpus], preset="tiny", vocab_size=300, samples=1,
               overrides={"block_size": 32})
    assert rep["val_tokens"] > 0 and rep["val_chars"] > 1000 and math.isfinite(rep["val_loss"])


def test_one_corpus_path_is_one_input(tmp_path):
    # demo(corpus="/data/x.txt") iterated the string: its first "input" was "/", the whole file system
    import pytest

    from gpt2kit.demo import demo
    from gpt2kit.errors import ConfigError

    small = tmp_path / "c.txt"
    small.write_text("To be, or not to be.\n" * 100)
    for one in (str(small), small):
        with pytest.raises(ConfigError, match=f"--corpus: {small.stat().st_size:,} bytes of text"):
            demo(1, out_dir=tmp_path / "out", corpus=one)


def test_a_signal_during_training_ends_the_demo(tmp_path, shakespeare_files, monkeypatch, capsys):
    # Ctrl-C (or a scheduler's SIGTERM) while it trains: the checkpoint is kept, and the demo stops
    # there with the signal's exit code instead of evaluating, sampling and exiting 0
    import gpt2kit.train
    from gpt2kit.cli import main

    real_train = gpt2kit.train.train

    def train_stopped_by_sigterm(cfg):
        return {**real_train(cfg), "stopped": "SIGTERM"}

    monkeypatch.setattr(gpt2kit.train, "train", train_stopped_by_sigterm)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in shakespeare_files[:2]:
        (corpus / p.name).write_text(p.read_text()[:30_000])
    out = tmp_path / "demo"
    code = main(["demo", "--minutes", "0.05", "--corpus", str(corpus), "--vocab-size", "300", "--preset", "tiny",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 143, err[-2000:]
    assert "demo stopped by SIGTERM during training at step" in err and "checkpoint" in err
    assert not (out / "report.json").exists() and not (out / "model").exists()
