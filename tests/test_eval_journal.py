"""The evaluator's orchestration and its resumable journal: what a rerun may take from a journal,
what the journal keeps on disk, and the per-task numbers `evaluate` reports beside the metrics."""
from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from gpt2kit.eval import Loglikelihood, RollingLoglikelihood, Scorer, TaskError, evaluate
from gpt2kit.eval.evaluator import _open_journal, make_task
from gpt2kit.eval.journal import Journal, fingerprint
from gpt2kit.eval.requests import LoglikelihoodResult
from gpt2kit.model import GPT2
from gpt2kit.tokenizer import Tokenizer
from conftest import save_sharp_tiny_model
from test_eval import write_datasets


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    folder = save_sharp_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer, seed=1234, n_ctx=64, scale=8.0)
    return GPT2.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("data"))


def answers(k: int) -> list[LoglikelihoodResult]:
    return [LoglikelihoodResult(-0.5 * k, k % 2 == 0, k + 1)]


# ----------------------------------------------------------------------------- the journal file


def test_an_answer_is_on_disk_as_soon_as_it_is_put(tmp_path):
    """A run killed right after a batch (no close, no finish) must leave that batch for the rerun."""
    journal = Journal(tmp_path / "j", "fp")
    journal.put("0:0", answers(0))
    journal.put("0:1", answers(1))
    try:
        rerun = Journal(tmp_path / "j", "fp")   # read while the first one still holds the file open
        assert (rerun.resumed, rerun.get("0:0"), rerun.get("0:1")) == (2, answers(0), answers(1))
    finally:
        journal.close()


def test_a_resumed_journal_keeps_the_answers_it_read_back(tmp_path):
    """The rerun rewrites the journal before its first new answer: the batches of the run before it
    stay in it (a third run takes them all), and the header stays first."""
    first = Journal(tmp_path / "j", "fp")
    first.put("0:0", answers(0))
    first.close()
    second = Journal(tmp_path / "j", "fp")
    assert second.resumed == 1
    second.put("0:1", answers(1))
    second.close()
    third = Journal(tmp_path / "j", "fp")
    assert third.resumed == 2 and [third.get(f"0:{b}") for b in range(2)] == [answers(0), answers(1)]
    assert (tmp_path / "j").read_text().startswith('{"fingerprint": "fp"}\n')


def test_a_journal_of_another_run_is_replaced_by_this_one(tmp_path):
    (tmp_path / "j").write_text('{"fingerprint": "other"}\n{"key": "0:0", "answers": [1.5]}\n')
    journal = Journal(tmp_path / "j", "fp")
    assert journal.resumed == 0 and journal.get("0:0") is None
    journal.put("0:1", answers(1))
    journal.close()
    again = Journal(tmp_path / "j", "fp")
    assert again.resumed == 1 and again.get("0:0") is None and again.get("0:1") == answers(1)


def test_nothing_after_a_damaged_line_is_taken(tmp_path):
    """A line the interruption cut short ends what is read back, whatever follows it."""
    good = '{"key": "0:%d", "answers": [%d]}\n'
    (tmp_path / "j").write_text('{"fingerprint": "fp"}\n' + good % (0, 0) + '{"key": "0:1", "ans\n' + good % (2, 2))
    journal = Journal(tmp_path / "j", "fp")
    assert journal.resumed == 1 and journal.get("0:0") == [0] and journal.get("0:2") is None


def test_an_unreadable_journal_starts_the_evaluation_over(tmp_path, caplog):
    (tmp_path / "binary").write_bytes(b'{"fingerprint": "fp"}\n\xff\xfe')
    (tmp_path / "folder").mkdir()
    for name in ("binary", "folder"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpt2kit.eval.journal"):
            assert Journal(tmp_path / name, "fp").resumed == 0
        assert "unreadable" in caplog.text and "starts over" in caplog.text, name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2kit.eval.journal"):
        assert Journal(tmp_path / "new", "fp").resumed == 0   # a first run: nothing to warn about
    assert caplog.records == []


def test_finish_deletes_the_journal(tmp_path):
    journal = Journal(tmp_path / "j", "fp")
    journal.put("0:0", answers(0))
    journal.finish()
    assert not (tmp_path / "j").exists()
    Journal(tmp_path / "never-written", "fp").finish()   # a run without a batch of its own


# ----------------------------------------------------------------------------- the fingerprint


def test_fingerprint_tells_apart_what_changes_the_batches(model, tokenizer, tmp_path):
    """The batches are keyed by their index: a rerun with another batch size, rank or world size
    has other batches under the same keys, and must not take the first run's answers."""
    requests = [RollingLoglikelihood(tuple(range(5 + k))) for k in range(4)]

    def fp(**changes):
        scorer = Scorer(model, tokenizer, batch_size=2, stride=16, progress=False)
        for name, value in changes.items():
            setattr(scorer, name, value)
        return _open_journal(tmp_path / "j", model, requests, scorer).fingerprint

    base = fp()
    assert base == fp()
    others = [fp(batch_size=3), fp(stride=8), fp(rank=1, world=2), fp(world=2)]
    assert len({base, *others}) == 5


def test_fingerprint_reads_the_requests_the_config_and_weights_beyond_their_start(model):
    a = [Loglikelihood((1, 2), (3,))]
    assert fingerprint(model, a, {}) == fingerprint(model, [Loglikelihood((1, 2), (3,))], {})
    assert fingerprint(model, a, {}) != fingerprint(model, [Loglikelihood((1, 2), (4,))], {})
    assert fingerprint(model, a, {}) != fingerprint(model, a + a, {})
    # a set field hashes the same however it was built (its iteration order may differ)
    x, y = frozenset([0, 8]), frozenset([8, 0])
    assert x == y and list(x) != list(y)
    assert fingerprint(model, [Loglikelihood((1,), (2,), x)], {}) == fingerprint(model, [Loglikelihood((1,), (2,), y)], {})
    # the same weights under another config (a LayerNorm epsilon changes every answer)
    other = copy.deepcopy(model)
    other.config = dataclasses.replace(model.config, layer_norm_epsilon=model.config.layer_norm_epsilon * 10)
    assert fingerprint(other, a, {}) != fingerprint(model, a, {})
    # a weight far into the token embedding (a fine-tune that moved only later rows)
    other = copy.deepcopy(model)
    wte = other.transformer.wte.weight
    step = wte.numel() // 4096
    with torch.no_grad():
        wte.view(-1)[step * 4000] += 1.0
    assert step * 4000 > 4096 and fingerprint(other, a, {}) != fingerprint(model, a, {})
    # the same numbers in another dtype (`gpt2kit eval --dtype bfloat16` rounds every product otherwise)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert fingerprint(rounded, a, {}) != fingerprint(copy.deepcopy(rounded).to(torch.bfloat16), a, {})


# ----------------------------------------------------------------------------- evaluate


def test_a_limit_below_one_is_refused(model, tokenizer, data_dir):
    for limit in (0, -1):
        with pytest.raises(TaskError, match=f"--limit must be at least 1, got {limit}"):
            evaluate(model, tokenizer, ["ptb"], data_dir, limit=limit, progress=False)


def test_counts_are_each_tasks_own(model, tokenizer, data_dir):
    """Run together, each task reports its own documents, requests and tokens (contexts plus
    continuations, or the whole text of a rolling request): those of the task run alone."""
    tasks = ["lambada", "ptb", "cbt-cn"]
    together = evaluate(model, tokenizer, tasks, data_dir, limit=3, batch_size=4, stride=16, progress=False)
    for name in tasks:
        alone = evaluate(model, tokenizer, [name], data_dir, limit=3, batch_size=4, stride=16, progress=False)[name]
        assert together[name] == alone, name
        task = make_task(name, data_dir)
        requests = [r for d in task.documents(3) for r in task.requests(d, tokenizer)]
        tokens = sum(len(r.tokens) if isinstance(r, RollingLoglikelihood) else
                     len(r.context) + len(r.continuation) if isinstance(r, Loglikelihood) else
                     len(r.context) for r in requests)      # a greedy generation: its prompt
        assert alone["counts"] == {"documents": len(task.documents(3)), "requests": len(requests),
                                   "tokens": tokens}, name
        assert alone["protocol"]["limit"] == 3 and alone["protocol"]["stride"] == 16
        assert alone["protocol"]["n_ctx"] == 64 and alone["protocol"]["file"] == str(task.path)


def test_task_options_left_unset_keep_each_tasks_default(tmp_path):
    """The CLI passes {"shots": None, "seed": None} when neither flag is given: every task keeps its
    own default, and a task takes only the options its constructor knows."""
    from gpt2kit.eval.tasks.nq import DEFAULT_SHOTS

    assert make_task("nq", tmp_path, shots=None, seed=None).shots == DEFAULT_SHOTS
    assert make_task("nq", tmp_path, shots=3, seed=1).shots == 3
    assert make_task("ptb", tmp_path, shots=3, seed=1, detokenize=False).detokenize is False
