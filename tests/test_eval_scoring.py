"""The scorer's batching and sharing (batch sizes, length order, identical and shared work), its
edge cases, and the registry and report helpers around it; the reference is the model's own full
forward (the transformers parity tests are in test_eval.py)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from gpt2kit.eval import (Generation, GenerationResult, GreedyGeneration, Loglikelihood, RollingLoglikelihood, Scorer,
                          rolling_windows)
from gpt2kit.eval import scoring
from gpt2kit.eval.scoring import ScoringError
from gpt2kit.generate import generate
from gpt2kit.model import GPT2
from gpt2kit.tokenizer import Tokenizer
from conftest import save_sharp_tiny_model

N_CTX = 64


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    folder = save_sharp_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer, seed=1234, n_ctx=N_CTX, scale=8.0)
    return GPT2.from_pretrained(str(folder)).eval()


def random_tokens(n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 50000, (n,), generator=g).tolist())


def full_forward_logprob(model, ctx, cont) -> float:
    """log p(cont | ctx) from one unbatched forward over ctx + cont (its last token only a target)."""
    ids = list(ctx) + list(cont)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def plain_greedy(model, ctx, n: int) -> list[int]:
    x = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            x.append(int(model(torch.tensor([x]))[0, -1].argmax()))
    return x[len(ctx):]


class Forwards:
    """Records the (rows, length) of every `hidden_states` call, and whether it ran on a KV cache."""

    def __init__(self, model, monkeypatch):
        self.shapes: list[tuple[int, int]] = []
        self.cached: list[bool] = []
        original = model.hidden_states

        def recording(input_ids, **kwargs):
            self.shapes.append(tuple(input_ids.shape))
            self.cached.append(kwargs.get("kv_cache") is not None)
            return original(input_ids, **kwargs)

        monkeypatch.setattr(model, "hidden_states", recording)


# ----------------------------------------------------------------------------- options

def test_a_batch_size_below_one_or_a_stride_outside_the_context_is_refused(model, tokenizer):
    with pytest.raises(ScoringError, match="--batch-size must be at least 1, got 0"):
        Scorer(model, tokenizer, batch_size=0, progress=False)
    for bad in (0, -3, N_CTX + 1):
        with pytest.raises(ScoringError, match=f"--stride must be between 1 and the context length {N_CTX}, got {bad}"):
            Scorer(model, tokenizer, stride=bad, progress=False)
    assert Scorer(model, tokenizer, progress=False).stride == N_CTX // 2  # the default: half the context
    assert Scorer(model, tokenizer, stride=N_CTX, progress=False).stride == N_CTX


def test_rolling_windows_examples():
    assert rolling_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert rolling_windows(11, 4, 4) == [(0, 4, 4), (4, 8, 4), (7, 11, 3)]
    assert rolling_windows(3, 4, 1) == [(0, 3, 3)]  # shorter than the context: one window
    assert rolling_windows(6, 4, 1) == [(0, 4, 4), (1, 5, 1), (2, 6, 1)]
    assert rolling_windows(0, 4, 2) == []
    with pytest.raises(ScoringError, match="got 0"):
        rolling_windows(0, 4, 0)  # checked even with nothing to score


def test_an_empty_continuation_is_refused(model, tokenizer):
    with pytest.raises(ScoringError, match="a loglikelihood request has an empty continuation"):
        Scorer(model, tokenizer, progress=False).loglikelihood([Loglikelihood((1, 2), ())])


def test_progress_bars_show_only_when_asked_and_redraw_at_the_given_interval(model, tokenizer, monkeypatch):
    """progress=True: tqdm's default redraw (0.1 s); a number: at most every that many seconds (a log file)."""
    import tqdm.auto

    bars = []

    def recording(iterable, **kwargs):
        bars.append((kwargs["desc"], kwargs["disable"], kwargs["mininterval"]))
        return iterable

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    reqs = [Loglikelihood((1, 2, 3), (4,))]
    for progress in (True, 30, 2.5, False):
        Scorer(model, tokenizer, progress=progress).loglikelihood(reqs)
    shown = [(disable, interval) for desc, disable, interval in bars if desc == "loglikelihood"]
    assert shown[0::2] == [(False, 0.1), (False, 30.0), (False, 2.5), (True, 0.1)]  # a bar per kind of work
    assert shown[1::2] == [(True, 0.1), (True, 30.0), (True, 2.5), (True, 0.1)]  # no shared contexts: no bar


# ----------------------------------------------------------------------------- batching

def test_batches_hold_at_most_batch_size_rows_longest_first(model, tokenizer, monkeypatch):
    """Seven sequences of different lengths, batch size 3: batches of 3, 3, 1 rows, the longest sequences together
    (so a batch pads little) and first; each answer is that of an unbatched forward."""
    lengths = [5, 30, 12, 22, 8, 40, 17]
    reqs = [Loglikelihood(random_tokens(n, seed=n), random_tokens(2, seed=100 + n)) for n in lengths]
    calls = Forwards(model, monkeypatch)
    res = Scorer(model, tokenizer, batch_size=3, progress=False).loglikelihood(reqs)
    longest = sorted(lengths, reverse=True)
    assert calls.shapes == [(3, longest[0] + 1), (3, longest[3] + 1), (1, longest[6] + 1)]
    for r, q in zip(res, reqs):
        assert r.logprob == pytest.approx(full_forward_logprob(model, q.context, q.continuation), rel=1e-4)


def test_identical_requests_run_once(model, tokenizer, monkeypatch):
    """The same request three times, and one reading the same sequence from a later position: one row."""
    ctx, cont = random_tokens(10, seed=1), random_tokens(4, seed=2)
    reqs = [Loglikelihood(ctx, cont)] * 3 + [Loglikelihood(ctx + cont[:2], cont[2:])]
    calls = Forwards(model, monkeypatch)
    res = Scorer(model, tokenizer, batch_size=8, progress=False).loglikelihood(reqs)
    assert calls.shapes == [(1, len(ctx) + len(cont) - 1)]
    assert res[0] == res[1] == res[2]
    assert res[3].logprob == pytest.approx(full_forward_logprob(model, ctx + cont[:2], cont[2:]), rel=1e-4)


def test_continuations_of_one_context_count_as_rows_of_the_batch(model, tokenizer, monkeypatch):
    """Two contexts with three continuations each and a batch size of 3: each context runs once, in a batch of
    its own (its three continuations fill the batch), and forks its KV cache into three rows."""
    contexts = [random_tokens(20, seed=3), random_tokens(12, seed=4)]
    reqs = [Loglikelihood(c, random_tokens(k + 1, seed=10 * k + j)) for j, c in enumerate(contexts) for k in range(3)]
    calls = Forwards(model, monkeypatch)
    res = Scorer(model, tokenizer, batch_size=3, progress=False).loglikelihood(reqs)
    # the context but its last token, then from the cache the continuations after that token
    assert calls.shapes == [(1, 19), (3, 3), (1, 11), (3, 3)]
    for r, q in zip(res, reqs):
        assert r.logprob == pytest.approx(full_forward_logprob(model, q.context, q.continuation), rel=1e-4)


def test_rolling_log_probabilities_taken_through_the_output_layer_in_chunks(model, tokenizer, monkeypatch):
    """`lm_head` runs on LOGIT_CHUNK positions at a time: chunks of 5 positions give the same sums."""
    reqs = [RollingLoglikelihood(random_tokens(n, seed=n)) for n in (150, 23, 7)]
    whole = Scorer(model, tokenizer, batch_size=2, stride=16, progress=False).rolling(reqs)
    monkeypatch.setattr(scoring, "LOGIT_CHUNK", 5)
    chunked = Scorer(model, tokenizer, batch_size=2, stride=16, progress=False).rolling(reqs)
    for a, b in zip(whole, chunked):
        assert b.logprob == pytest.approx(a.logprob, rel=1e-6) and b.n_tokens == a.n_tokens


def test_an_empty_text_has_no_log_probability(model, tokenizer):
    res = Scorer(model, tokenizer, progress=False).rolling([RollingLoglikelihood(()), RollingLoglikelihood((11,))])
    assert (res[0].logprob, res[0].n_tokens) == (0.0, 0)
    assert res[1].logprob == pytest.approx(full_forward_logprob(model, [tokenizer.eot_token], [11]), rel=1e-4)


# ----------------------------------------------------------------------------- greedy generation

def test_greedy_generation_from_an_empty_context_starts_after_endoftext(model, tokenizer):
    res = Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration((), 5),
                                                           GreedyGeneration((tokenizer.eot_token,), 5)])
    assert list(res[0].tokens) == plain_greedy(model, [tokenizer.eot_token], 5) == list(res[1].tokens)
    assert res[0].logprob == pytest.approx(res[1].logprob, rel=1e-6)


def test_endoftext_as_the_first_token_ends_the_generation_empty(model, tokenizer):
    ids = tuple(tokenizer.encode_ordinary("Once upon a time"))
    first = plain_greedy(model, ids, 1)[0]
    eot = tokenizer.eot_token
    ending = copy.deepcopy(model)
    with torch.no_grad():  # <|endoftext|> now just beats the first token (tied embeddings: its logit too)
        ending.transformer.wte.weight[eot] = 1.01 * ending.transformer.wte.weight[first]
    assert plain_greedy(ending, ids, 1) == [eot]
    res = Scorer(ending, tokenizer, progress=False).greedy([GreedyGeneration(ids, 6), GreedyGeneration(ids, 1)])
    assert res[0] == res[1] == GenerationResult("", (), 0.0)


def test_a_loglikelihood_request_whose_context_the_generation_would_cut_is_scored_whole(model, tokenizer, monkeypatch):
    """A generation of 20 tokens keeps the last n_ctx - 20 tokens of its context; a loglikelihood request on a
    longer context cannot ride along in that batch: it runs on its own and sees its whole context. One on a
    context of exactly n_ctx - 20 tokens fits: it rides along."""
    long, fits = random_tokens(N_CTX - 6, seed=7), random_tokens(N_CTX - 20, seed=17)
    cont = random_tokens(3, seed=8)
    calls = Forwards(model, monkeypatch)
    res = Scorer(model, tokenizer, batch_size=1, progress=False).score(
        [GreedyGeneration(long, 20), Loglikelihood(long, cont), GreedyGeneration(fits, 20), Loglikelihood(fits, cont)])
    alone = [shape for shape, cached in zip(calls.shapes, calls.cached) if not cached]
    assert alone == [(1, len(long) + len(cont) - 1)]
    for r, ctx in ((res[1], long), (res[3], fits)):
        assert r.logprob == pytest.approx(full_forward_logprob(model, ctx, cont), rel=1e-4)
    assert list(res[0].tokens) == plain_greedy(model, long[-(N_CTX - 20):], 20)
    assert list(res[2].tokens) == plain_greedy(model, fits, 20)


def test_suppressing_a_first_token_for_one_request_leaves_the_others_alone(model, tokenizer):
    """Requests on one context: one with its greedy first token suppressed, then a plain one and a loglikelihood
    request that reads that token's probability (riding along in the same batch)."""
    ctx = tuple(tokenizer.encode_ordinary("It was the best of times, it was the"))
    first = plain_greedy(model, ctx, 1)[0]
    reqs = [GreedyGeneration(ctx, 4, suppress_first=frozenset({first})), GreedyGeneration(ctx, 4),
            Loglikelihood(ctx, (first,))]
    res = Scorer(model, tokenizer, progress=False).score(reqs)
    assert res[0].tokens[0] != first and list(res[1].tokens) == plain_greedy(model, ctx, 4)
    assert res[2].is_greedy and res[2].logprob == pytest.approx(full_forward_logprob(model, ctx, (first,)), rel=1e-4)


# ----------------------------------------------------------------------------- generation (generate.py)

def test_a_suffix_may_fill_the_whole_prompt(model, tokenizer):
    """max_new_tokens plus a suffix that fill the context exactly: the prompt is the suffix alone."""
    suffix = random_tokens(N_CTX - 10, seed=9)
    res = Scorer(model, tokenizer, progress=False).score([Generation(random_tokens(30, seed=10), 10, suffix=suffix)])
    (alone,) = generate(model, tokenizer, [list(suffix)], max_new_tokens=10, do_sample=False, top_logprobs=0)
    assert res[0].tokens == tuple(alone.token_ids)
    with pytest.raises(ScoringError, match=f"a generation prompt suffix of 55 tokens leaves no room in the context "
                                           f"of {N_CTX} for 10 new tokens"):
        Scorer(model, tokenizer, progress=False).score([Generation((), 10, suffix=random_tokens(N_CTX - 9, seed=9))])


def test_generation_refuses_max_new_tokens_outside_the_context_and_an_unknown_truncation(model, tokenizer):
    scorer = Scorer(model, tokenizer, progress=False)
    for bad in (0, -1, N_CTX):
        with pytest.raises(ScoringError, match=f"max_new_tokens must be in \\[1, {N_CTX}\\), got {bad}"):
            scorer.score([Generation((1, 2), bad)])
    with pytest.raises(ScoringError, match="truncate: expected 'left' or 'right', got 'middle'"):
        scorer.score([Generation((1, 2), 4, truncate="middle")])
    assert scorer.score([Generation((1, 2), N_CTX - 1)])[0].tokens  # the most that fits after one token


def test_generation_requests_with_different_options_are_decoded_apart(model, tokenizer):
    """One call with requests that differ in one decoding option each: every answer is what `generate` gives that
    request alone (greedy unless sampled; the sampling options left out take generate's defaults)."""
    ctx = tuple(tokenizer.encode_ordinary("Once upon a time"))
    options = [{}, {"max_new_tokens": 5}, {"stop": (" ",)}, {"seed": 3}, {"do_sample": True, "seed": 3},
               {"do_sample": True, "seed": 3, "top_k": 2}, {"do_sample": True, "seed": 3, "temperature": 0.3}]
    reqs = [Generation(ctx, **{"max_new_tokens": 12, **o}) for o in options]
    res = Scorer(model, tokenizer, batch_size=8, progress=False).score(reqs)
    for r, o in zip(res, options):
        o = {"max_new_tokens": 12, "do_sample": False, **o, **({"stop": list(o["stop"])} if "stop" in o else {})}
        (alone,) = generate(model, tokenizer, [list(ctx)], top_logprobs=0, **o)
        assert (r.text, r.tokens) == (alone.text, tuple(alone.token_ids))
        assert r.logprob == pytest.approx(sum(alone.logprobs), rel=1e-4)
    assert len({r.tokens for r in res[3:]}) == 4  # the options made a difference


# ----------------------------------------------------------------------------- registry

def test_only_a_task_class_can_be_registered_and_it_takes_the_name(tmp_path):
    from gpt2kit.eval.registry import _REGISTRY, Task, TaskError, get_task, register_task

    with pytest.raises(TaskError, match=r"@register_task\('test-not-a-task'\) must decorate a Task subclass"):
        @register_task("test-not-a-task")
        class NotATask:
            pass
    with pytest.raises(TaskError, match="must decorate a Task subclass"):
        register_task("test-not-a-task")(lambda data_dir: None)
    assert "test-not-a-task" not in _REGISTRY

    @register_task("test-named")
    class Named(Task):
        data_files = ("a.txt",)

    try:
        assert get_task("test-named") is Named and Named.name == "test-named"
        (tmp_path / "a.txt").write_text("x")
        assert Named(tmp_path, detokenize=False).protocol() == {"file": str(tmp_path / "a.txt"), "detokenize": False}
        assert Named(tmp_path).detokenize
    finally:
        del _REGISTRY["test-named"]


def test_the_first_data_file_that_exists_is_used_and_a_folder_is_not_one(tmp_path):
    from gpt2kit.eval.registry import MissingDataError, find_data_file

    (tmp_path / "first.txt").mkdir()  # a folder of that name
    (tmp_path / "second.txt").write_text("x")
    (tmp_path / "third.txt").write_text("x")
    names = ["first.txt", "second.txt", "third.txt"]
    assert find_data_file("t", tmp_path, names, "here") == tmp_path / "second.txt"
    with pytest.raises(MissingDataError) as e:
        find_data_file("t", tmp_path, ["first.txt", "sub/none.txt"], "the dataset's site")
    assert str(e.value) == (f"task 't': none of 'first.txt' or 'sub/none.txt' found in {tmp_path} "
                            "(it is normally obtained from the dataset's site)")


# ----------------------------------------------------------------------------- report

def test_released_size_names_only_the_released_shapes():
    from gpt2kit.eval import released_size
    from gpt2kit.model import GPT2Config

    sizes = {name: released_size(GPT2Config.from_preset(name))
             for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny")}
    assert sizes == {"gpt2": "117M", "gpt2-medium": "345M", "gpt2-large": "762M", "gpt2-xl": "1542M", "tiny": None}
    assert released_size(GPT2Config.from_preset("gpt2", n_ctx=512)) is None
    assert released_size(GPT2Config.from_preset("gpt2", vocab_size=50304)) is None


def _result(metrics, documents=2, requests=1, tokens=1):
    return {"metrics": metrics, "counts": {"documents": documents, "requests": requests, "tokens": tokens}}


def test_table3_lays_out_the_columns_in_the_papers_order():
    from gpt2kit.eval import format_table3

    lambada = {"ppl": 12.345, "acc_word_stopfilter": 50.0, "acc_word": 25.0, "acc_token_stopfilter": math.nan,
               "acc_token": 75.0}
    results = {"ptb": _result({"ppl": 65.854}, documents=1, requests=1, tokens=1),
               "lambada": _result(lambada, documents=4, requests=12, tokens=300),
               "cbt-cn": _result({"acc": math.nan})}
    table = format_table3(results, model_name="mine", model_size="345M")
    assert table.split("\n") == [
        "| model | LAMBADA (PPL) | LAMBADA (ACC) | CBT-CN (ACC) | PTB (PPL) |",
        "|---|---|---|---|---|",
        "| mine | 12.35 | 50.00 | - | 65.85 |",
        "| paper 345M | 15.60 | 55.48 | 92.35 | 47.33 |",
        "",
        "lambada ACC by protocol: whole word greedy + stop-word filter 50.00 (the ACC column), whole word greedy "
        "25.00, last BPE token + stop-word filter -, last BPE token 75.00; last-word PPL 12.35",
        "",
        "ptb: 1 document, 1 request, 1 token",
        "lambada: 4 documents, 12 requests, 300 tokens",
        "cbt-cn: 2 documents, 1 request, 1 token"]
    assert "paper" not in format_table3(results, model_size=None)
    assert format_table3(results).split("\n")[2].startswith("| ours | ")
    # LAMBADA as originally distributed: not a Table 3 column, its protocols still listed
    original = format_table3({"lambada-original": _result(lambada, documents=1)}).split("\n")
    assert original[:2] == ["", "lambada-original ACC by protocol: whole word greedy + stop-word filter 50.00 (the ACC "
                                "column), whole word greedy 25.00, last BPE token + stop-word filter -, last BPE token "
                                "75.00; last-word PPL 12.35"]
    # a task outside Table 3: no table, only the counts
    assert format_table3({"winograd": _result({"acc": 50.0})}, model_size="117M") == (
        "\nwinograd: 2 documents, 1 request, 1 token")


def test_results_document_holds_everything_and_the_papers_row():
    from gpt2kit.eval import PAPER_TABLE3, results_document

    results = {"ptb": _result({"ppl": 3.0})}
    doc = results_document(results, model="gpt2", model_size="117M", options={"stride": 512}, seconds=1.23456)
    assert doc == {"model": "gpt2", "paper_size": "117M", "options": {"stride": 512}, "seconds": 1.235,
                   "tasks": results, "paper_table3": dict(zip(doc["paper_table3"], PAPER_TABLE3["117M"]))}
    assert doc["paper_table3"]["PTB (PPL)"] == 65.85 and doc["paper_table3"]["1BW (PPL)"] == 75.20
    assert list(doc["paper_table3"])[0] == "LAMBADA (PPL)" and len(doc["paper_table3"]) == 10
    other = results_document(results, model="x", model_size=None, options={}, seconds=0.0)
    assert other["paper_table3"] is None and other["paper_size"] is None
