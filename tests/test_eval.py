"""Zero-shot evaluation: tasks on fixture files in the real formats, metrics vs transformers."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2kit.eval import (GenerationResult, GreedyGeneration, Loglikelihood, MissingDataError, RollingLoglikelihood,
                          RollingResult, Scorer, Task, TaskError, evaluate, format_table3, get_task, register_task,
                          rolling_windows, task_names)
from gpt2kit.eval.scoring import ScoringError
from gpt2kit.eval import detokenizers as dt
from gpt2kit.eval.tasks.enwik8 import decode_cut
from gpt2kit.model import GPT2
from gpt2kit.tokenizer import Tokenizer
from conftest import save_sharp_tiny_model

transformers = pytest.importorskip("transformers")  # a test dependency (the oracle)

# ----------------------------------------------------------------------------- fixture files

LAMBADA = [
    "He stepped out of the car and looked up at the old house. It was exactly as he remembered it, the paint "
    "peeling from the shutters and the porch sagging under the weight of years. \u201cHome,\u201d he said to the house",
    "The recipe called for two cups of flour, a pinch of salt and three eggs. She mixed them slowly, then "
    "poured the batter into the pan and slid it into the oven",
    "Marcus had never seen the ocean before. When the bus finally crested the hill, he pressed his face to the "
    "window and stared at the endless blue water",
    "The professor paused, adjusted his glasses and wrote a single word on the board, a word nobody in the "
    "room could pronounce: antidisestablishmentarianism",
]
LAMBADA_PLAIN = ["`` i 'm not going back there , '' she said . `` not ever . '' he nodded and took her hand",
                 "the dog barked at the mailman every morning , and every morning the mailman threw him a biscuit"]

WIKITEXT = """ 
 = Valkyria Chronicles III = 
 
 Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , commonly referred to as " Valkyria Chronicles III " outside Japan , is a tactical role @-@ playing video game . 
 It sold 1 @,@ 000 copies at 3 @.@ 5 dollars in the game 's first week . 
 
 = = Gameplay = = 
 
 As with previous <unk> Chronicles games , Valkyria Chronicles III is a tactical role @-@ playing game . 
 
 = Tower Building of the Little Rock Arsenal = 
 
 The Tower Building of the Little Rock Arsenal , also known as U.S. Arsenal Building , is a building located in MacArthur Park . 
"""

PTB = """ no it was n't black monday 
 but while the new york stock exchange did n't fall apart friday as the dow jones industrial average plunged N points 
 some circuit breakers installed after the october N crash failed their first test traders say unable to cool the selling panic in both stocks and futures 
 the N stock specialist firms on the big board floor the buyers and sellers of last resort who were criticized after the N crash once again could n't handle the selling pressure 
 big investment banks refused to step up to the plate to support the beleaguered floor traders by buying big blocks of stock traders say 
 heavy selling of standard & poor 's 500-stock index futures in chicago <unk> beat stocks downward 
 seven big board stocks ual amr bankamerica walt disney capital cities\\/abc philip morris and pacific telesis group stopped trading and never resumed 
 the <unk> has already begun 
"""

ONE_BW = """The U.S. Centers for Disease Control and Prevention initially advised school districts to close if flu had spread to a student , but they later said that was unnecessary .
He said : " It 's not a $ 100 deal . "
Bush doesn 't care about ( most ) of it .
"""

ENWIK8 = ("<mediawiki>\n  <page>\n    <title>Anarchism</title>\n    <text xml:space=\"preserve\">'''Anarchism''' "
          "originated as a term of abuse first used against early [[working class]] [[radical]]s including the "
          "[[Diggers]] of the [[English Revolution]] and the ''sans-culottes'' of the [[French Revolution]]. "
          "Müller, Zürich, café.</text>\n  </page>\n</mediawiki>\n")
TEXT8 = " anarchism originated as a term of abuse first used against early working class radicals including the diggers"


def _cbt_block(story: list[str], query: str, answer: str, candidates: list[str]) -> str:
    lines = [f"{i} {s}" for i, s in enumerate(story, 1)]
    lines.append(f"21 {query}\t{answer}\t\t{'|'.join(candidates)}")
    return "\n".join(lines) + "\n\n"


def _cbt_file() -> str:
    story = [f"Sentence {i} of the tale , where the king spoke to the `` old miller '' about the mill ." for i in range(1, 21)]
    cands = ["king", "mill", "miller", "queen", "river", "tale", "bread", "horse", "road", "castle"]
    return (_cbt_block(story, "Then the XXXXX went home to his wife .", "miller", cands)
            + _cbt_block(story, "`` Who owns the XXXXX ? '' asked the queen .", "mill", cands))


def write_datasets(root: Path) -> Path:
    """Every task's files, in the real distribution formats and folder layouts."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    for sub in ("wikitext-2", "wikitext-103"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "wiki.test.tokens").write_text(WIKITEXT)
    (root / "simple-examples" / "data").mkdir(parents=True, exist_ok=True)
    (root / "simple-examples" / "data" / "ptb.test.txt").write_text(PTB)
    (root / "news.en.heldout-00000-of-00050").write_text(ONE_BW)
    (root / "enwik8").write_bytes(ENWIK8.encode())
    (root / "text8").write_bytes(TEXT8.encode())
    (root / "CBTest" / "data").mkdir(parents=True, exist_ok=True)
    for kind in ("CN", "NE"):
        (root / "CBTest" / "data" / f"cbtest_{kind}_valid_2000ex.txt").write_text(_cbt_file())
    return root


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_sharp_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer,
                                 seed=1234, n_ctx=64, scale=8.0)


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT2.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("data"))


def hf_rolling_logprob(hf, ids: list[int], eot: int, max_len: int, stride: int) -> float:
    """The straightforward sliding-window recipe: a full window ends every `stride` tokens (the last one at the
    text's end), each window's new targets via labels=-100."""
    x = torch.tensor([eot] + ids)
    total, prev_end, window_end = 0.0, 0, max_len
    while prev_end < len(ids):
        end = min(window_end, len(ids))
        begin = max(0, end - max_len)
        inp = x[begin:end]
        labels = x[begin + 1:end + 1].clone()
        labels[: len(labels) - (end - prev_end)] = -100
        with torch.no_grad():
            logits = hf(inp[None]).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        keep = labels != -100
        total += float(lp[keep].gather(1, labels[keep][:, None]).sum())
        prev_end, window_end = end, window_end + stride
    return total


def hf_continuation(hf, ctx: list[int], cont: list[int]) -> tuple[float, list[int]]:
    """log p(cont | ctx) and the argmax tokens at the continuation's positions."""
    ids = torch.tensor([(ctx + cont)[:-1]])  # the last token is only a target
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(float(lp[p, t]) for p, t in zip(pos, cont)), [int(lp[p].argmax()) for p in pos]


def assert_logprobs_match_transformers(hf, requests, results) -> None:
    for r, q in zip(results, requests, strict=True):
        assert r.logprob == pytest.approx(hf_continuation(hf, list(q.context), list(q.continuation))[0], rel=1e-4)

# ----------------------------------------------------------------------------- scorers vs transformers

def test_rolling_windows_score_every_token_once_with_enough_context():
    for n, L, s in [(1, 4, 2), (10, 4, 2), (11, 4, 4), (100, 16, 5), (7, 16, 8), (33, 8, 1)]:
        seen = []
        for begin, end, n_new in rolling_windows(n, L, s):
            assert end - begin == min(L, end)  # every window as long as the context allows (the last one too)
            targets = list(range(end - n_new + 1, end + 1))
            seen += targets
            if begin > 0:  # every new target has at least L - s tokens of context
                assert min(t - begin for t in targets) >= L - s
        assert seen == list(range(1, n + 1))
    with pytest.raises(ScoringError, match="--stride must be between 1 and the context length 4"):
        rolling_windows(10, 4, 5)


@pytest.mark.parametrize("stride", [32, 7])
def test_rolling_loglikelihood_matches_transformers(model, hf, tokenizer, stride):
    texts = [PTB, WIKITEXT[:300], "short"]
    ids = [tokenizer.encode_ordinary(t) for t in texts]
    assert len(ids[0]) > 3 * model.config.n_ctx  # exercises the sliding window
    ours = Scorer(model, tokenizer, batch_size=3, stride=stride, progress=False).rolling(
        [RollingLoglikelihood(tuple(i)) for i in ids])
    for r, i in zip(ours, ids):
        ref = hf_rolling_logprob(hf, i, tokenizer.eot_token, model.config.n_ctx, stride)
        assert r.n_tokens == len(i)
        assert r.logprob == pytest.approx(ref, rel=1e-4)


def test_word_perplexity_matches_transformers(model, hf, tokenizer, data_dir):
    res = evaluate(model, tokenizer, ["ptb"], data_dir, batch_size=4, progress=False)["ptb"]
    text = dt.ptb(PTB)
    ref = hf_rolling_logprob(hf, tokenizer.encode_ordinary(text), tokenizer.eot_token, 64, 32)
    words = len(PTB.split()) + PTB.count("\n")  # + one end-of-line per sentence
    assert res["metrics"]["units"] == words == 160
    assert res["metrics"]["ppl"] == pytest.approx(math.exp(-ref / words), rel=1e-4)
    assert res["protocol"]["stride"] == 32 and res["counts"]["documents"] == 1
    # a model in training mode (with dropout) is scored as in eval mode, and left in training mode;
    # one task may be named by a string
    import dataclasses

    from gpt2kit.model import GPT2

    training = GPT2(dataclasses.replace(model.config, dropout=0.5))
    training.load_state_dict(model.state_dict())
    assert training.train().training
    again = evaluate(training, tokenizer, "ptb", data_dir, batch_size=4, progress=False)["ptb"]
    assert again["metrics"]["ppl"] == pytest.approx(res["metrics"]["ppl"], rel=1e-6) and training.training


def test_a_data_dir_that_is_no_folder_is_named_as_such(model, tokenizer, tmp_path):
    # it said "none of 'lambada_test.jsonl' ... found in X", as if the folder were there
    from gpt2kit.eval.registry import TaskError

    (tmp_path / "file").write_text("x")
    for path, said in ((tmp_path / "nowhere", "no such folder"), (tmp_path / "file", "not a folder")):
        with pytest.raises(TaskError, match=rf"^{re.escape(str(path))}: {said}; expected the folder of the tasks' data"):
            evaluate(model, tokenizer, ["lambada"], path, progress=False)


def test_loglikelihood_and_greedy_check_match_transformers(model, hf, tokenizer):
    ctx = tokenizer.encode_ordinary("The quick brown fox jumps over the")
    conts = [tokenizer.encode_ordinary(" lazy dog"), tokenizer.encode_ordinary(" fence")]
    _, greedy = hf_continuation(hf, ctx, conts[0])
    reqs = [Loglikelihood(tuple(ctx), tuple(c)) for c in conts]
    reqs.append(Loglikelihood(tuple(ctx), (greedy[0],)))  # the argmax itself: greedy
    reqs.append(Loglikelihood(tuple(ctx), (greedy[0],), exclude=frozenset({greedy[0]})))  # filtered out
    reqs.append(Loglikelihood((), tuple(conts[1])))  # empty context: conditioned on <|endoftext|>
    res = Scorer(model, tokenizer, batch_size=2, progress=False).loglikelihood(reqs)
    for r, c in zip(res[:2], conts):
        assert r.logprob == pytest.approx(hf_continuation(hf, ctx, c)[0], rel=1e-4)
        assert r.n_tokens == len(c)
    assert res[2].is_greedy and not res[3].is_greedy
    assert res[2].logprob == res[3].logprob
    assert res[4].logprob == pytest.approx(hf_continuation(hf, [tokenizer.eot_token], conts[1])[0], rel=1e-4)


def test_shared_contexts_batched_together_never_overrun_the_context(model, hf, tokenizer):
    # a long context with short continuations and a short one with long continuations: each
    # sequence fits the model's context, but padding both to the longest of each would not
    g = torch.Generator().manual_seed(0)
    n_ctx = model.config.n_ctx
    tokens = lambda n: torch.randint(0, 50000, (n,), generator=g).tolist()
    long_ctx, short_ctx = tokens(n_ctx - 4), tokens(3)
    reqs = [Loglikelihood(tuple(long_ctx), tuple(tokens(2))) for _ in range(3)]
    reqs += [Loglikelihood(tuple(short_ctx), tuple(tokens(n_ctx // 2))) for _ in range(3)]
    res = Scorer(model, tokenizer, batch_size=8, progress=False).loglikelihood(reqs)
    assert_logprobs_match_transformers(hf, reqs, res)


def test_a_context_longer_than_the_model_keeps_its_most_recent_tokens_that_fit(model, hf, tokenizer):
    """n_ctx + 1 tokens of context + continuation fit (the last one is only a target): the first positions go."""
    n_ctx = model.config.n_ctx
    ctx = tokenizer.encode_ordinary(PTB)[:2 * n_ctx]
    conts = [tokenizer.encode_ordinary(" the market fell"), tokenizer.encode_ordinary(" prices")]
    reqs = [Loglikelihood(tuple(ctx), tuple(c)) for c in conts]  # one context, two continuations: shared
    reqs.append(Loglikelihood(tuple(ctx[:-1]), tuple(conts[0])))  # a context of its own
    res = Scorer(model, tokenizer, batch_size=4, progress=False).loglikelihood(reqs)
    for r, q in zip(res, reqs):
        kept = list(q.context)[-(n_ctx + 1 - len(q.continuation)):]
        assert r.logprob == pytest.approx(hf_continuation(hf, kept, list(q.continuation))[0], rel=1e-4)


def test_greedy_generation_matches_transformers_generate(model, hf, tokenizer):
    prompts = ["Once upon a time", "The results of the experiment were", "A"]
    suppress = frozenset(tokenizer.encode_ordinary(" the") + tokenizer.encode_ordinary(" a"))
    reqs = []
    for p in prompts:
        ids = tuple(tokenizer.encode_ordinary(p))
        reqs += [GreedyGeneration(ids, 6), GreedyGeneration(ids, 6, suppress_first=frozenset())]
        hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)
        reqs.append(GreedyGeneration(ids, 6, suppress_first=frozenset({int(hf_out[0, -1])}) | suppress))
    res = Scorer(model, tokenizer, batch_size=4, progress=False).greedy(reqs)
    for k, p in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode_ordinary(p)])
        plain = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert list(res[3 * k].tokens) == plain == list(res[3 * k + 1].tokens)
        assert res[3 * k].text == tokenizer.decode(plain)
        first_banned = sorted(reqs[3 * k + 2].suppress_first)
        filtered = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               begin_suppress_tokens=first_banned)[0, ids.shape[1]:].tolist()
        assert list(res[3 * k + 2].tokens) == filtered != plain
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids[0].tolist() + plain])).logits[0].double(), -1)
        ref = sum(float(lp[ids.shape[1] - 1 + j, t]) for j, t in enumerate(plain))
        assert res[3 * k].logprob == pytest.approx(ref, rel=1e-4)


def test_loglikelihood_riding_along_with_generation_gives_the_same_answers(model, tokenizer):
    ctx = tuple(tokenizer.encode_ordinary("It was the best of times, it was the"))
    long, short = tokenizer.encode_ordinary(" antidisestablishmentarianism"), tokenizer.encode_ordinary(" age")
    assert len(long) > 3
    ll = [Loglikelihood(ctx, tuple(long)), Loglikelihood(ctx, tuple(short)),
          Loglikelihood(ctx + tuple(long[:-1]), tuple(long[-1:]), exclude=frozenset(long[-1:]))]
    alone = Scorer(model, tokenizer, progress=False).loglikelihood(ll)
    scorer = Scorer(model, tokenizer, batch_size=2, progress=False)

    def not_used(*args):
        raise AssertionError("these requests should be teacher-forced inside the generation batch")

    scorer._loglikelihood_batch = scorer._shared_context_batch = not_used
    mixed = scorer.score([GreedyGeneration(ctx, 4)] + ll)
    plain = scorer.greedy([GreedyGeneration(ctx, 4)])[0]
    # the same tokens; the log-probability to float rounding (a batch of other rows can change
    # how the BLAS blocks the products: seen on a Xeon, not on an EPYC)
    assert (mixed[0].text, mixed[0].tokens) == (plain.text, plain.tokens)
    assert mixed[0].logprob == pytest.approx(plain.logprob, rel=1e-6)
    for a, b in zip(alone, mixed[1:]):
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5) and (b.is_greedy, b.n_tokens) == (a.is_greedy, a.n_tokens)
    assert not mixed[3].is_greedy  # its only candidate token was excluded


def test_greedy_requests_of_different_lengths_batched_together_keep_their_context(model, tokenizer):
    """A long context asking for 2 tokens shares a batch with a request for 40: it keeps the n_ctx - 2 tokens it
    would keep alone (not n_ctx - 40), and so does a loglikelihood request riding along with it."""
    n_ctx = model.config.n_ctx
    long_ctx = tuple(tokenizer.encode_ordinary(PTB))[:n_ctx - 3]
    reqs = [GreedyGeneration(long_ctx, 2), GreedyGeneration(tuple(tokenizer.encode_ordinary("Hello")), 40)]
    ll = [Loglikelihood(long_ctx, (262, 318))]
    alone = [Scorer(model, tokenizer, batch_size=1, progress=False).score([r])[0] for r in reqs + ll]
    together = Scorer(model, tokenizer, batch_size=2, progress=False).score(reqs + ll)
    for a, b in zip(alone, together):
        if hasattr(a, "tokens"):
            assert a.tokens == b.tokens
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5)


def test_a_long_continuation_riding_along_a_short_context_never_overruns_the_context(model, hf, tokenizer):
    """One batch: a generation from n_ctx - 8 tokens, and one from 5 tokens whose loglikelihood request (40 tokens)
    is teacher-forced beside it. Each row fits the context; left padded to the longest context, then fed the
    longest continuation, the batch would not."""
    n_ctx = model.config.n_ctx
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: tuple(torch.randint(0, 50000, (n,), generator=g).tolist())
    long_ctx, short_ctx, cont = tokens(n_ctx - 8), tokens(5), tokens(40)
    reqs = [GreedyGeneration(long_ctx, 8), GreedyGeneration(short_ctx, 8), Loglikelihood(short_ctx, cont)]
    alone = [Scorer(model, tokenizer, batch_size=1, progress=False).score([r])[0] for r in reqs]
    together = Scorer(model, tokenizer, batch_size=2, progress=False).score(reqs)
    assert [r.tokens for r in together[:2]] == [r.tokens for r in alone[:2]]
    assert together[2].logprob == pytest.approx(hf_continuation(hf, list(short_ctx), list(cont))[0], rel=1e-4)


def test_greedy_generation_stops_and_cuts(model, tokenizer):
    ids = tuple(tokenizer.encode_ordinary("Hello"))
    free = Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration(ids, 10)])[0]
    assert len(free.tokens) == 10
    piece = free.text[3:6]
    cut = Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration(ids, 10, stop=(piece,))])[0]
    assert cut.text == free.text[:free.text.find(piece)]
    assert tokenizer.decode(list(cut.tokens)).startswith(cut.text) and len(cut.tokens) < 10


def test_greedy_check_needs_every_continuation_token_to_be_the_argmax(model, hf, tokenizer):
    ctx = tokenizer.encode_ordinary("The quick brown fox jumps over the")
    _, (g0,) = hf_continuation(hf, ctx, [0])  # the argmax after the context
    other = (g0 + 1) % 50000
    _, (_, g1) = hf_continuation(hf, ctx, [g0, 0])  # the argmax after context + g0
    _, (_, h1) = hf_continuation(hf, ctx, [other, 0])
    conts = [(g0, g1), (g0, (g1 + 1) % 50000), (other, h1)]  # both argmax; second token wrong; first wrong
    res = Scorer(model, tokenizer, progress=False).loglikelihood([Loglikelihood(tuple(ctx), c) for c in conts])
    assert [r.is_greedy for r in res] == [True, False, False]


def test_requests_reading_one_sequence_from_different_positions(model, hf, tokenizer):
    """log p(a b | c) and log p(b | c a) read one input sequence from two positions: each reads its own."""
    ctx = tuple(tokenizer.encode_ordinary("It was a dark and stormy night"))
    cont = tuple(tokenizer.encode_ordinary(" and the rain fell in torrents"))
    reqs = [Loglikelihood(ctx, cont), Loglikelihood(ctx + cont[:3], cont[3:])]
    assert_logprobs_match_transformers(hf, reqs, Scorer(model, tokenizer, progress=False).loglikelihood(reqs))

def test_a_continuation_as_long_as_the_context_fits(model, hf, tokenizer):
    """n_ctx continuation tokens after <|endoftext|> (or the context's last token) are n_ctx inputs: they fit."""
    n_ctx = model.config.n_ctx
    g = torch.Generator().manual_seed(1)
    cont = tuple(torch.randint(0, 50000, (n_ctx,), generator=g).tolist())
    ctx = tuple(torch.randint(0, 50000, (5,), generator=g).tolist())
    scorer = Scorer(model, tokenizer, progress=False)
    res = scorer.loglikelihood([Loglikelihood((), cont), Loglikelihood(ctx, cont)])
    assert res[0].logprob == pytest.approx(hf_continuation(hf, [tokenizer.eot_token], list(cont))[0], rel=1e-4)
    assert res[1].logprob == pytest.approx(hf_continuation(hf, list(ctx[-1:]), list(cont))[0], rel=1e-4)
    with pytest.raises(ScoringError, match=f"a continuation of {n_ctx + 1} tokens does not fit the context of {n_ctx}"):
        scorer.loglikelihood([Loglikelihood((), cont + (11,))])


def test_shared_contexts_of_different_lengths_in_one_batch(model, hf, tokenizer):
    """Two contexts, each with several continuations, left padded into one batch: the pads are not attended."""
    short = tuple(tokenizer.encode_ordinary("Once upon a time"))
    long = tuple(tokenizer.encode_ordinary("The results of the experiment were published in a journal and"))
    conts = [tuple(tokenizer.encode_ordinary(c)) for c in (" the end", " a story", " nobody read them")]
    reqs = [Loglikelihood(ctx, c) for ctx in (short, long) for c in conts]
    res = Scorer(model, tokenizer, batch_size=8, progress=False).loglikelihood(reqs)
    assert_logprobs_match_transformers(hf, reqs, res)


def test_greedy_generation_from_a_context_longer_than_the_model(model, hf, tokenizer):
    """It keeps the last n_ctx - max_new_tokens context tokens: the generation then ends at the context's end."""
    n_ctx = model.config.n_ctx
    ctx = tokenizer.encode_ordinary(PTB)[:2 * n_ctx]
    res = Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration(tuple(ctx), 5)])[0]
    kept = ctx[-(n_ctx - 5):]
    plain = hf.generate(torch.tensor([kept]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(kept):]
    assert list(res.tokens) == plain.tolist()
    assert res.logprob == pytest.approx(hf_continuation(hf, kept, plain.tolist())[0], rel=1e-4)
    for bad in (0, n_ctx):
        with pytest.raises(ScoringError, match=f"max_new_tokens must be in \\[1, {n_ctx}\\), got {bad}"):
            Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration(tuple(ctx), bad)])


def test_greedy_generation_cuts_at_the_earliest_stop_and_keeps_the_tokens_before_it(model, hf, tokenizer):
    """Several stop strings and a stop regex: the text ends at the first match of any of them; the answer keeps
    the tokens whose text starts before the cut, with their log-probability (none when the text starts there)."""
    ids = tuple(tokenizer.encode_ordinary("Once upon a time"))
    free = Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration(ids, 10)])[0]
    pieces = [tokenizer.decode([t]) for t in free.tokens]
    assert "".join(pieces) == free.text and all(len(p) >= 4 for p in pieces[:5]) and len(pieces[1]) >= 9
    starts = [len("".join(pieces[:k])) for k in range(len(pieces))]
    early, late = pieces[1][:4], pieces[4][:4]  # e.g. " fas", " Log": the cut falls where token 1 starts
    assert (free.text.find(early), free.text.find(late)) == (starts[1], starts[4])
    # two stops that token 1 completes at once, one character and six characters into it (" fascinating": "fa",
    # "nat"): the earlier one cuts, whether it is a string or the regex
    first, second = pieces[1][1:3], pieces[1][6:9]
    assert (free.text.find(first), free.text.find(second)) == (starts[1] + 1, starts[1] + 6)
    # a stop that only the token after the last one allowed would complete: no cut
    beyond = pieces[2][-2:] + pieces[3][:2]
    assert free.text.find(beyond) == starts[3] - 2
    cases = [((late, second, first), None, starts[1] + 1, 10), ((second,), re.escape(first), starts[1] + 1, 10),
             ((early,), re.escape(late), starts[1], 10), ((pieces[0][:3],), None, 0, 10), ((beyond,), None, starts[3], 3)]
    reqs = [GreedyGeneration(ids, n, stop=stop, stop_regex=regex) for stop, regex, _, n in cases]
    res = Scorer(model, tokenizer, batch_size=4, progress=False).greedy(reqs)
    for r, (_, _, cut, _) in zip(res, cases):
        kept = [t for t, s in zip(free.tokens, starts) if s < cut]
        assert (r.text, list(r.tokens)) == (free.text[:cut], kept)
        assert r.logprob == pytest.approx(hf_continuation(hf, list(ids), kept)[0] if kept else 0.0, rel=1e-4, abs=1e-9)


def test_a_cut_after_a_character_split_across_tokens_keeps_all_of_its_bytes(model, tokenizer):
    """"é" generated as its two byte tokens, then " au": cut at " au", the answer keeps both bytes of "é" (the text of
    each starts before the cut), and their log-probabilities."""
    from gpt2kit.eval.scoring import _Path

    split_e = [tokenizer.mergeable_ranks[bytes([b])] for b in "é".encode()]
    caf, rest = tokenizer.encode_ordinary("Caf"), tokenizer.encode_ordinary(" au lait")
    tokens = [*caf, *split_e, *rest]
    logprobs = [-1.0 - k for k in range(len(tokens))]
    assert tokenizer.decode(tokens) == "Café au lait"
    scorer = Scorer(model, tokenizer, progress=False)
    path = _Path([0], tokens, logprobs)
    scorer._check_finished(path, [GreedyGeneration((1,), 20, stop=(" au",))])
    kept = len(caf) + 2
    assert path.done[0] == GenerationResult("Café", tuple(tokens[:kept]), sum(logprobs[:kept]))


def test_greedy_generation_ends_at_endoftext(model, tokenizer):
    """A path that generates <|endoftext|> ends there: the answer holds neither the token nor its text."""
    import copy

    eot = tokenizer.eot_token
    ids = tokenizer.encode_ordinary("Once upon a time")
    free = Scorer(model, tokenizer, progress=False).greedy([GreedyGeneration(tuple(ids), 6)])[0].tokens
    ending = copy.deepcopy(model)
    with torch.no_grad():  # <|endoftext|> now just beats the third token (tied embeddings: its logit too)
        ending.transformer.wte.weight[eot] = 1.01 * ending.transformer.wte.weight[free[2]]
    x, logprob = list(ids), 0.0
    with torch.no_grad():  # the reference: a plain greedy loop over full forwards
        while x[-1] != eot:
            lp = torch.log_softmax(ending(torch.tensor([x]))[0, -1].double(), -1)
            x.append(int(lp.argmax()))
            logprob += float(lp[x[-1]])
    assert x[len(ids):] == [*free[:2], eot]
    res = Scorer(ending, tokenizer, progress=False).greedy([GreedyGeneration(tuple(ids), 6)])[0]
    assert res.tokens == free[:2] and res.text == tokenizer.decode(list(free[:2]))
    assert res.logprob == pytest.approx(logprob - float(lp[eot]), rel=1e-4)


def test_log_softmax_runs_in_float32_for_a_bfloat16_model(model, tokenizer):
    """bf16 log-probabilities would be rounded to 8 bits of mantissa (steps of 1/16 near -10)."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    ctx = tuple(tokenizer.encode_ordinary("The quick brown fox jumps over the"))
    reqs = [Loglikelihood(ctx, (t,)) for t in (1000, 2000, 3000, 4000)]
    ours = Scorer(half, tokenizer, progress=False).loglikelihood(reqs)
    full = Scorer(model, tokenizer, progress=False).loglikelihood(reqs)
    for r, f in zip(ours, full):
        assert r.logprob == pytest.approx(f.logprob, abs=1.0)  # the same model, in bf16
        assert float(torch.tensor(r.logprob).to(torch.bfloat16)) != r.logprob  # not a bf16 number


# ----------------------------------------------------------------------------- tasks on fixtures

def test_every_table3_task_runs_on_its_real_format(model, tokenizer, data_dir):
    tasks = ["lambada", "cbt-cn", "cbt-ne", "wikitext2", "ptb", "enwik8", "text8", "wikitext103", "1bw"]
    res = evaluate(model, tokenizer, tasks, data_dir, batch_size=5, progress=False)
    assert list(res) == tasks
    counts = {t: r["counts"]["documents"] for t, r in res.items()}
    assert counts == {"lambada": 4, "cbt-cn": 2, "cbt-ne": 2, "wikitext2": 2, "ptb": 1, "enwik8": 1, "text8": 1,
                      "wikitext103": 2, "1bw": 3}
    assert res["wikitext2"]["metrics"]["units"] == len(WIKITEXT.split()) + WIKITEXT.count("\n")
    assert res["enwik8"]["metrics"]["units"] == len(ENWIK8.encode()) > len(ENWIK8)
    assert res["text8"]["metrics"]["units"] == len(TEXT8)
    assert res["1bw"]["metrics"]["units"] == len(ONE_BW.split()) + 3
    for t, r in res.items():
        assert all(math.isfinite(v) for v in r["metrics"].values()), t
    for key in ("acc_word", "acc_word_stopfilter", "acc_token", "acc_token_stopfilter"):
        assert res["lambada"]["metrics"][key] in (0.0, 25.0, 50.0, 75.0, 100.0)
    table = format_table3(res, model_name="tiny", model_size="117M")
    assert "| paper 117M | 35.13 | 45.99 | 87.65 | 83.40 | 29.41 | 65.85 | 1.16 | 1.17 | 37.50 | 75.20 |" in table
    # bits per byte and per character are the same log-probability in other units
    m = res["text8"]["metrics"]
    assert m["bpc"] == pytest.approx(-m["logprob"] / math.log(2) / len(TEXT8))


def test_perplexity_units_and_aggregates_by_hand(tmp_path):
    """Perplexity per word, bits per byte or per character over the original text's units, and the perplexity per
    BPE token beside them, from the summed log-probabilities of all documents."""
    scores = [{"logprob": -10.0, "tokens": 5, "units": 4}, {"logprob": -6.0, "tokens": 3, "units": 6}]
    words = get_task("ptb")(tmp_path).aggregate(scores)
    assert words == {"logprob": -16.0, "units": 10, "tokens": 8, "token_ppl": pytest.approx(math.exp(16 / 8)),
                     "ppl": pytest.approx(math.exp(16 / 10))}
    assert get_task("enwik8")(tmp_path).aggregate(scores)["bpb"] == pytest.approx(16 / math.log(2) / 10)
    assert get_task("text8")(tmp_path).aggregate(scores)["bpc"] == pytest.approx(16 / math.log(2) / 10)
    assert get_task("enwik8")(tmp_path).units("café\n") == 6 and get_task("text8")(tmp_path).units("café\n") == 5

def test_perplexity_tasks_record_their_detokenizer_unit_and_scoring(data_dir, tmp_path):
    protocols = {name: get_task(name)(data_dir).protocol() for name in ("ptb", "wikitext2", "1bw", "enwik8", "text8")}
    words = "words (+1 end-of-line per line)"
    assert {name: (p["detokenizer"], p["unit"], p["scored_as"]) for name, p in protocols.items()} == {
        "ptb": ("ptb", words, "one stream"), "wikitext2": ("wikitext", words, "one text per document"),
        "1bw": ("lm1b", words, "one text per document"), "enwik8": ("none", "bytes", "one stream"),
        "text8": ("none", "chars", "one stream")}
    assert get_task("ptb")(data_dir, detokenize=False).protocol()["detokenizer"] == "none"
    # an empty test set is no document (not one empty stream), which the evaluation refuses
    (tmp_path / "ptb.test.txt").write_text("")
    assert get_task("ptb")(tmp_path).documents() == []


def test_lambada_metrics_match_a_straightforward_computation(model, hf, tokenizer, data_dir):
    res = evaluate(model, tokenizer, ["lambada"], data_dir, batch_size=2, progress=False)["lambada"]["metrics"]
    total, token_hits, word_hits = 0.0, 0, 0
    for text in LAMBADA:
        context, word = text.rsplit(" ", 1)
        ctx = tokenizer.encode_ordinary(context)
        lp, _ = hf_continuation(hf, ctx, tokenizer.encode_ordinary(" " + word))
        total += lp
        ids = tokenizer.encode_ordinary(text)
        token_hits += hf_continuation(hf, ids[:-1], ids[-1:])[1] == ids[-1:]
        out = hf.generate(torch.tensor([ctx]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ctx):]
        generated = tokenizer.decode(out.tolist())
        word_hits += generated.split()[0].rstrip(".,;:!?\"") == word if generated.strip() else False
    assert res["ppl"] == pytest.approx(math.exp(-total / len(LAMBADA)), rel=1e-4)
    assert res["acc_token"] == pytest.approx(100 * token_hits / len(LAMBADA))
    assert res["acc_word"] == pytest.approx(100 * word_hits / len(LAMBADA))


def test_lambada_whole_word_accuracy_counts_a_right_prediction(model, tokenizer, tmp_path):
    """Passages whose last word IS the model's greedy continuation score 100% on the word protocols."""
    passages = []
    for ctx in ["It was a dark and stormy night and", "In the beginning there was"]:
        ids = tuple(tokenizer.encode_ordinary(ctx))
        gen = Scorer(model, tokenizer, progress=False).greedy(
            [GreedyGeneration(ids, 8, stop_regex=r"(?<=\w)[^\w']")])[0].text
        if gen.strip() and gen.startswith(" ") and gen.strip().isalpha():
            passages.append(ctx + gen)
    assert passages, "the tiny model produced no word to build a passage from"
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    m = evaluate(model, tokenizer, ["lambada"], tmp_path, progress=False)["lambada"]["metrics"]
    assert m["acc_word"] == 100.0


def test_lambada_stop_word_filter_never_removes_a_piece_inside_the_target(model, tokenizer, tmp_path):
    """A target whose last BPE token spells a stop word (" Beth"+"any", " Kent"+"on") is not a stop word: when
    that piece is the model's argmax, the last-token protocol is right with the filter as without it."""
    from gpt2kit.eval.tasks.lambada import stop_word_tokens

    stop = stop_word_tokens(tokenizer)
    bare = {i for i in stop if not tokenizer.decode([i]).startswith(" ")}
    firsts = [i for i in range(tokenizer.n_vocab) if (s := tokenizer.decode([i])).startswith(" ") and len(s) > 3
              and s[1:].isalpha() and s[1:].istitle()]
    passage = None
    for context in ("She looked at the old photograph and smiled at", "The letter was signed by"):
        ctx = tokenizer.encode_ordinary(context)
        with torch.no_grad():
            for j in range(0, len(firsts), 1024):
                batch = firsts[j:j + 1024]
                nxt = model.lm_head(model.hidden_states(torch.tensor([ctx + [t] for t in batch]))[:, -1]).argmax(-1)
                for t, piece in zip(batch, nxt.tolist()):
                    word = tokenizer.decode([t, piece])
                    if piece in bare and word[1:].isalpha() and tokenizer.encode_ordinary(word) == [t, piece]:
                        passage = context + word
                        break
                if passage:
                    break
        if passage:
            break
    assert passage, "the tiny model never continued a word with a stop-word piece"
    (tmp_path / "lambada_test.jsonl").write_text(json.dumps({"text": passage}) + "\n")
    m = evaluate(model, tokenizer, ["lambada"], tmp_path, progress=False)["lambada"]["metrics"]
    assert m["acc_token"] == 100.0
    assert m["acc_token_stopfilter"] == 100.0
    # a whole stop word is still filtered: the same passage with a stop word as its target cannot be right
    req = get_task("lambada")(tmp_path).requests(("It was", " the", "the"), tokenizer)
    assert tokenizer.encode_ordinary(" the")[0] in req[2].exclude


def test_lambada_stop_word_filter_applies_to_the_whole_word_protocol(model, hf, tokenizer, tmp_path):
    """Table 3's LAMBADA accuracy: where the model would start with a stop word (" Will" after "It was near"), the
    filtered protocol decodes the best other word; a passage ending in that word is right only with the filter."""
    import re

    from gpt2kit.eval.tasks.lambada import stop_word_tokens

    stop = sorted(stop_word_tokens(tokenizer))
    passages = []
    for context in ("It was ask", "It was near", "It was watching", "It was infrastructure", "It was scan",
                    "It was Cooper", "It was controversy", "It was Gary", "It was Made"):
        ids = torch.tensor([tokenizer.encode_ordinary(context)])
        plain = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        filtered = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               begin_suppress_tokens=stop)[0, ids.shape[1]:].tolist()
        word = re.match(r" ([A-Za-z]+)(?:[^\w']|$)", tokenizer.decode(filtered))
        if plain[0] in stop and word:
            passages.append(context + " " + word.group(1))
    assert len(passages) >= 2, "the tiny model no longer starts these contexts with a stop word"
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    m = evaluate(model, tokenizer, ["lambada"], tmp_path, progress=False)["lambada"]["metrics"]
    assert (m["acc_word_stopfilter"], m["acc_word"]) == (100.0, 0.0)


def test_lambada_plain_text_is_detokenized(tmp_path, tokenizer):
    (tmp_path / "lambada_test_plain_text.txt").write_text("\n".join(LAMBADA_PLAIN) + "\n")
    docs = get_task("lambada")(tmp_path).documents()
    assert docs[0] == ('"i\'m not going back there," she said. "not ever." he nodded and took her', " hand", "hand")
    raw = get_task("lambada")(tmp_path, detokenize=False).documents()
    assert raw[0][0].startswith("`` i 'm")
    assert get_task("lambada")(tmp_path).protocol()["detokenizer"] == "ptb_quotes"
    assert get_task("lambada")(tmp_path, detokenize=False).protocol()["detokenizer"] == "none"
    (tmp_path / "lambada_test.jsonl").write_text(json.dumps({"text": LAMBADA[0]}) + "\n")
    assert get_task("lambada")(tmp_path).documents()[0][2] == "house"  # OpenAI's file comes first
    assert get_task("lambada")(tmp_path).protocol()["detokenizer"] == "none"  # and is natural text already
    assert get_task("lambada-original")(tmp_path).documents() == docs


def test_lambada_whole_word_of_many_tokens_is_generated_to_its_end(model, tokenizer, tmp_path):
    """The word protocol decodes as many tokens as the target takes: passages ending in a word the tiny model makes
    up from 3 to 7 BPE tokens ("It was now" -> " rogue"+"reading"+"broad") are right."""
    from gpt2kit.eval.tasks.lambada import WORD_END

    passages = []
    for ctx in ("It was two", "It was now", "It was ref"):
        gen = Scorer(model, tokenizer, progress=False).greedy(
            [GreedyGeneration(tuple(tokenizer.encode_ordinary(ctx)), 16, stop_regex=WORD_END)])[0].text
        if re.fullmatch(r" [A-Za-z]+", gen) and 3 <= len(tokenizer.encode_ordinary(gen)) <= 7:
            passages.append(ctx + gen)
    assert len(passages) >= 2, "the tiny model no longer makes up long words after these contexts"
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    m = evaluate(model, tokenizer, ["lambada"], tmp_path, progress=False)["lambada"]["metrics"]
    assert m["acc_word"] == 100.0
    # a word ends at its first character that is neither a word character nor an apostrophe
    stop = get_task("lambada")(tmp_path).requests(("It was", " don't", "don't"), tokenizer)[3].stop_regex
    assert re.search(stop, " don't, he said").start() == len(" don't")
    assert re.search(stop, " o'clock.").start() == len(" o'clock") and re.search(stop, " ours") is None


def test_lambada_score_takes_each_metric_from_its_own_answer(tmp_path):
    """The five answers of a passage, in the order of its requests: the word's log-probability, the last token
    without and with the filter, the generated word without and with the filter."""
    from gpt2kit.eval.requests import LoglikelihoodResult

    doc = ("It was", " house", "house")
    answers = [LoglikelihoodResult(-3.0, False, 1), LoglikelihoodResult(-1.0, True, 1),
               LoglikelihoodResult(-1.0, False, 1), GenerationResult(" horse", (1,), -2.0),
               GenerationResult(" house", (2,), -2.5)]
    assert get_task("lambada")(tmp_path).score(doc, answers) == {
        "logprob": -3.0, "acc_word": 0.0, "acc_word_stopfilter": 1.0, "acc_token": 1.0, "acc_token_stopfilter": 0.0}


def test_lambada_passages_keep_their_lines_and_the_whitespace_before_the_word(tmp_path):
    """The context is everything before the last word, over several lines too; the scored continuation is the
    word with all the whitespace before it (nothing of the passage is lost), trailing whitespace is not."""
    texts = ["He said:\nlook at the house", "look at the  house", "She baked the bread \n"]
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert get_task("lambada")(tmp_path).documents() == [("He said:\nlook at the", " house", "house"),
                                                        ("look at the", "  house", "house"),
                                                        ("She baked the", " bread", "bread")]
    assert get_task("lambada")(tmp_path).documents(limit=2) == get_task("lambada")(tmp_path).documents()[:2]
    # the plain-text release: a passage per non-blank line
    (tmp_path / "lambada_test_plain_text.txt").write_text("he took her hand\n\n \nshe baked the bread\n")
    assert [d[2] for d in get_task("lambada-original")(tmp_path).documents()] == ["hand", "bread"]


def test_lambada_format_errors_name_the_line(tmp_path):
    path = tmp_path / "lambada_test.jsonl"
    for bad in ('{"txt": "a b"}', '["a b"]', '{"text": 5}', '{"text": null}', "not json"):
        path.write_text("\n" + json.dumps({"text": "a b"}) + "\n\n" + bad + "\n")  # blank lines are skipped, not counted out
        with pytest.raises(TaskError, match=r"lambada_test.jsonl: line 4: expected a JSON object with a \"text\" string"):
            get_task("lambada")(tmp_path).documents()
    path.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": " house "}) + "\n")
    with pytest.raises(TaskError, match="lambada_test.jsonl: passage 2 has no last word to predict"):
        get_task("lambada")(tmp_path).documents()


def test_lambada_stop_words_are_whole_words_in_every_form(tokenizer, tmp_path):
    """The filter's token ids are exactly the stop words that are one token: with or without a space, lower-case
    or capitalized, never the first piece of a longer one (" Wh" of " Whom", "H" of "Him")."""
    from gpt2kit.eval.tasks.lambada import STOP_WORDS, stop_word_tokens

    every, spaced = stop_word_tokens(tokenizer), stop_word_tokens(tokenizer, spaced_only=True)
    assert {tokenizer.decode([i]).strip().lower() for i in every} <= STOP_WORDS
    assert {tokenizer.encode_ordinary(form)[0] for form in ("the", " the", "The", " The", "It", " whom")} <= every
    assert spaced < every and all(tokenizer.decode([i]).startswith(" ") for i in spaced)
    # a whole target word, after one space or more, is filtered with every form; a piece inside one with spaced forms
    task = get_task("lambada")(tmp_path)
    assert task.requests(("It was", " the", "the"), tokenizer)[2].exclude == every
    assert task.requests(("It was", "  the", "the"), tokenizer)[2].exclude == every
    assert task.requests(("She met", " Bethany", "Bethany"), tokenizer)[2].exclude == spaced


def test_cbt_substitutes_each_candidate_and_scores_the_rest_of_the_sentence(model, hf, tokenizer, data_dir):
    task = get_task("cbt-cn")(data_dir)
    q1, q2 = task.documents()
    assert len(q1.story) == 20 and q1.answer == "miller" and len(q1.candidates) == 10
    reqs = task.requests(q2, tokenizer)
    ctx_text = tokenizer.decode(list(reqs[0].context))
    assert ctx_text.endswith('spoke to the "old miller" about the mill. "Who owns the')
    assert [tokenizer.decode(list(r.continuation)) for r in reqs[:2]] == [' king?" asked the queen.',
                                                                         ' mill?" asked the queen.']
    # the prediction is the candidate a straightforward transformers scoring ranks first
    acc = evaluate(model, tokenizer, ["cbt-cn"], data_dir, progress=False)["cbt-cn"]["metrics"]["acc"]
    hits = 0
    for q in (q1, q2):
        rs = task.requests(q, tokenizer)
        # the context is longer than the tiny model's 64 positions: keep its most recent part
        scores = [hf_continuation(hf, list(r.context)[-(65 - len(r.continuation)):], list(r.continuation))[0]
                  for r in rs]
        hits += q.candidates[max(range(10), key=scores.__getitem__)] == q.answer
    assert acc == pytest.approx(100 * hits / 2)


def test_cbt_format_errors_name_the_line(tmp_path):
    bad = _cbt_file().replace("21 Then the XXXXX", "21 Then the")
    (tmp_path / "cbtest_NE_valid_2000ex.txt").write_text(bad)
    with pytest.raises(TaskError, match=r"cbtest_NE_valid_2000ex.txt: line 21: expected"):
        get_task("cbt-ne")(tmp_path).documents()
    (tmp_path / "cbtest_NE_valid_2000ex.txt").write_text("1 only one line\n\n")
    with pytest.raises(TaskError, match="line 1: expected a block of 21"):
        get_task("cbt-ne")(tmp_path).documents()


def test_cbt_files_without_a_last_blank_line_or_with_crlf_read_the_same(tmp_path):
    path = tmp_path / "cbtest_CN_valid_2000ex.txt"
    path.write_text(_cbt_file())
    questions = get_task("cbt-cn")(tmp_path).documents()
    assert len(questions) == 2 and questions[1].candidates[-1] == "castle"
    path.write_text(_cbt_file().rstrip("\n"))
    assert get_task("cbt-cn")(tmp_path).documents() == questions
    path.write_bytes(_cbt_file().replace("\n", "\r\n").encode())
    assert get_task("cbt-cn")(tmp_path).documents() == questions
    path.write_text(_cbt_file().replace("|castle", "|castle|"))  # an empty candidate is none
    assert get_task("cbt-cn")(tmp_path).documents() == questions
    assert get_task("cbt-cn")(tmp_path).documents(limit=1) == questions[:1]


def test_cbt_without_detokenizing_scores_the_tokenized_text(data_dir):
    task = get_task("cbt-cn")(data_dir, detokenize=False)
    before, after = task.split(task.documents()[1])
    assert before.endswith("about the mill . `` Who owns the ") and after == " ? '' asked the queen ."
    assert task.protocol()["detokenizer"] == "none"
    assert get_task("cbt-cn")(data_dir).protocol()["detokenizer"] == "ptb_quotes"


@pytest.mark.parametrize("old, new, error", [
    ("2 Sentence 2 ", "3 Sentence 2 ", "line 2: expected the line to start with its number 2"),
    ("\tmiller\t\t", "\tmiller\t\t\t", "line 21: expected 'query with XXXXX<TAB>answer<TAB><TAB>c1|...|c10'"),
    ("\tmiller\t\t", "\twolf\t\t", "line 21: the answer 'wolf' is not among the candidates"),
])
def test_cbt_line_errors(tmp_path, old, new, error):
    (tmp_path / "cbtest_CN_valid_2000ex.txt").write_text(_cbt_file().replace(old, new, 1))
    with pytest.raises(TaskError, match=re.escape(f"cbtest_CN_valid_2000ex.txt: {error}")):
        get_task("cbt-cn")(tmp_path).documents()


def test_enwik8_and_text8_standard_split(tmp_path):
    from gpt2kit.eval.tasks.enwik8 import FULL, TEST, standard_test_split

    data = bytes(range(256)) * (FULL // 256) + b"x" * (FULL % 256)
    assert standard_test_split(data) == data[-TEST:] and standard_test_split(b"abc") == b"abc"
    cut = "é€x".encode()
    assert decode_cut(cut[1:]) == "€x" and decode_cut(cut[:-2]) == "é"
    import zipfile

    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", "a" * 25_000)
    docs = get_task("text8")(tmp_path).documents(limit=2)
    assert docs == ["a" * 20_000]  # two 10,000-character documents, streamed as one text


def test_decode_cut_drops_only_the_characters_split_by_the_cut():
    assert decode_cut("é€x".encode()[1:]) == "€x" and decode_cut("€x".encode()[1:]) == "x"
    assert decode_cut("xé€".encode()[:-1]) == "xé" and decode_cut(b"") == ""
    # a character is at most 4 bytes: no more than 3 continuation bytes start a cut, and a byte that is no part of
    # any UTF-8 character (0xC0, 0xFF) is an error anywhere
    for data in (b"\x80" * 4 + b"abc", b"\xc0abc", b"ab\xffcd", b"ab\x80cd"):
        with pytest.raises(UnicodeDecodeError):
            decode_cut(data)


def test_a_full_size_hutter_file_is_read_as_its_test_split(tmp_path, monkeypatch):
    """(At 30 bytes instead of 100M.) The last 10 bytes are the test set, a character cut at its start dropped."""
    from gpt2kit.eval.tasks import enwik8

    monkeypatch.setattr(enwik8, "FULL", 30)
    monkeypatch.setattr(enwik8, "TEST", 10)
    (tmp_path / "enwik8").write_bytes(b"x" * 19 + "é".encode() + b"abc\ndef\ng")
    assert get_task("enwik8")(tmp_path).documents(limit=2) == ["abc\ndef\n"]
    (tmp_path / "text8").write_bytes(b"y" * 20 + b"abcde fghi")
    assert get_task("text8")(tmp_path).documents() == ["abcde fghi"]
    (tmp_path / "text8").write_bytes(b"y" * 21 + b"abcde fghi")  # any other size is a test set already
    assert get_task("text8")(tmp_path).documents() == ["y" * 21 + "abcde fghi"]


def test_hutter_files_that_cannot_be_read_name_the_file(tmp_path):
    from gpt2kit.errors import InputFileError

    (tmp_path / "enwik8.zip").write_bytes(b"not a zip file")
    with pytest.raises(InputFileError, match=r"enwik8.zip: cannot read 'enwik8'"):
        get_task("enwik8")(tmp_path).documents()
    import zipfile

    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8.txt", "a b")
    with pytest.raises(InputFileError, match=r"text8.zip: cannot read 'text8'"):
        get_task("text8")(tmp_path).documents()
    (tmp_path / "enwik8").write_bytes(b"<page>\n ab\xffcd\n")
    with pytest.raises(InputFileError, match=r"enwik8: not valid UTF-8 at byte 10 of the test split"):
        get_task("enwik8")(tmp_path).documents()
    (tmp_path / "text8").write_bytes("a café".encode())
    with pytest.raises(InputFileError, match=r"text8: text8 must be ASCII \(a-z and space\); byte 5 is not"):
        get_task("text8")(tmp_path).documents()


def test_only_newlines_end_sentences_and_passages(tmp_path):
    """A 1BW sentence or a LAMBADA passage holding U+2028, U+0085 or a form feed stays one document with one
    end of line (str.splitlines would cut it in two, each scored without the other and counted as a line)."""
    (tmp_path / "news.en.heldout-00000-of-00050").write_text("A first\x0csentence .\nA second\u2028one .\n")
    task = get_task("1bw")(tmp_path)
    assert task.documents() == ["A first\x0csentence .\n", "A second\u2028one .\n"]
    texts = ["He said:\u2028\u201cHome,\u201d to the house", "She baked\x85the bread"]
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                         for t in texts))
    assert [d[2] for d in get_task("lambada")(tmp_path).documents()] == ["house", "bread"]


def test_1bw_blank_lines_are_no_sentences(tmp_path):
    (tmp_path / "news.en.heldout-00000-of-00050").write_text("A first sentence .\n\n \nA second one .\n")
    assert get_task("1bw")(tmp_path).documents() == ["A first sentence .\n", "A second one .\n"]


def test_hellaswag_file_errors_name_the_line(tmp_path):
    item = {"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "she", "endings": ["a", "b", "c", "d"]}
    for label, ok in ((0, True), (3, True), (-1, False), (4, False)):
        (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps({**item, "label": label}) + "\n")
        if ok:
            assert get_task("hellaswag")(tmp_path).documents()[0].label == label
        else:
            with pytest.raises(TaskError, match=f'hellaswag_val.jsonl: line 1: "label" {label} is not an index of the 4'):
                get_task("hellaswag")(tmp_path).documents()
    for line in (json.dumps({**item, "label": "first"}), json.dumps([item]), '"text"'):  # a label, an object, needed
        (tmp_path / "hellaswag_val.jsonl").write_text(line + "\n")
        with pytest.raises(TaskError, match='hellaswag_val.jsonl: line 1: expected a HellaSwag object'):
            get_task("hellaswag")(tmp_path).documents()
    # blank lines are skipped, and counted in the line numbers
    lines = ["", json.dumps({**item, "label": 1}), " ", json.dumps({**item, "label": 2}), "", json.dumps({**item, "label": 9})]
    (tmp_path / "hellaswag_val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError, match='hellaswag_val.jsonl: line 6: "label" 9'):
        get_task("hellaswag")(tmp_path).documents()
    (tmp_path / "hellaswag_val.jsonl").write_text("\n".join(lines[:5]) + "\n")
    assert [i.label for i in get_task("hellaswag")(tmp_path).documents()] == [1, 2]


def test_hellaswag_aggregate_averages_each_accuracy_and_counts_the_items(tmp_path):
    scores = [{"acc": 1.0, "acc_norm": 0.0, "acc_token_norm": 1.0}, {"acc": 0.0, "acc_norm": 0.0, "acc_token_norm": 1.0}]
    assert get_task("hellaswag")(tmp_path).aggregate(scores) == {"acc_norm": 0.0, "acc": 50.0, "acc_token_norm": 100.0,
                                                                 "items": 2}


def test_wikitext_articles_and_limit(data_dir):
    task = get_task("wikitext103")(data_dir)
    docs = task.documents()
    assert len(docs) == 2 and docs[1].startswith(" = Tower Building")
    assert "".join(docs) == WIKITEXT
    assert task.documents(limit=1) == docs[:1]


def test_wikitext_counts_words_on_the_tokenized_file_when_both_are_there(tmp_path):
    """The benchmark's word count is the tokenized file's (`1 @,@ 000` is three words): `wiki.test.tokens` is read
    before `wiki.test.raw`, which is only a fallback."""
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(WIKITEXT)
    assert get_task("wikitext2")(tmp_path).path.name == "wiki.test.raw"
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.tokens").write_text(WIKITEXT)
    assert get_task("wikitext2")(tmp_path).path.name == "wiki.test.tokens"


def test_a_wikitext_equation_line_does_not_start_an_article(tmp_path):
    """WikiText-2's test set has formula lines that look like level-1 headings (` = 1 <unk> / s ... = ` in
    "Constant k filter"); an article's heading comes after a blank line, these come straight after text."""
    text = (" \n = Constant k filter = \n \n Constant k filters are image filters . \n \n = = = <unk> <unk> = = = \n"
            " \n The prototype has a cut @-@ off frequency of \n = 1 <unk> / s and a nominal <unk> k = \n"
            " 1 <unk> . This is produced by a filter half @-@ section with <unk> L \n = 1 <unk> and <unk> C = \n"
            " 1 <unk> . \n \n = The <unk> = \n \n \" The <unk> \" is an episode of Doctor Who . \n")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.tokens").write_text(text)
    docs = get_task("wikitext2")(tmp_path).documents()
    assert [d.lstrip(" \n").split("\n")[0] for d in docs] == ["= Constant k filter = ", "= The <unk> = "]
    assert "".join(docs) == text


# ----------------------------------------------------------------------------- detokenizers

@pytest.mark.parametrize("name, original, expected", [
    ("wikitext", " = Valkyria Chronicles III = ", "= Valkyria Chronicles III ="),
    ("wikitext", " = = Gameplay = = ", "== Gameplay =="),
    ("wikitext", " a role @-@ playing game , sold 1 @,@ 000 copies at 3 @.@ 5 dollars . ",
     "a role-playing game, sold 1,000 copies at 3.5 dollars."),
    ("wikitext", ' known as " Valkyria Chronicles III " outside Japan ( the game \'s name ) ',
     'known as "Valkyria Chronicles III" outside Japan (the game\'s name)'),
    ("wikitext", " <unk> Chronicles ; lit . Valkyria : 3 ", "<unk> Chronicles; lit. Valkyria: 3"),
    ("ptb", " it was n't black monday as the dow fell N points to $ N <unk> ",
     "it wasn't black monday as the dow fell 1 points to $1 <unk>"),
    ("ptb", " we 're sure they 've paid N N ", "we're sure they've paid 1 1"),
    ("lm1b", 'He said : " It \'s not a $ 100 deal . " And does n\'t care ( much ) .',
     'He said: "It\'s not a $100 deal." And doesn\'t care (much).'),
    # a closing quote before `,` or `.`, and one at a line's start: each later quote keeps its side
    ("wikitext", ' The song " Crazy in Love " , which topped the charts , and " Baby Boy " were released . ',
     'The song "Crazy in Love", which topped the charts, and "Baby Boy" were released.'),
    ("wikitext", ' " Tom " . Later he played " Kieron Fletcher " . ', '"Tom". Later he played "Kieron Fletcher".'),
    ("lm1b", '" We are very pleased with the result , " he said .', '"We are very pleased with the result," he said.'),
    ("ptb_quotes", "`` i 'm sorry , '' he said . `` did n't you know ? ''",
     '"i\'m sorry," he said. "didn\'t you know?"'),
    ("wikitext", " turnout was 50 % , up from 45 % . ", "turnout was 50%, up from 45%."),
    ("lm1b", "He was the # 1 seed .", "He was the #1 seed."),
    ("lm1b", "SCHOOLS ISN 'T OVER , IT 'S SUMMER .", "SCHOOLS ISN'T OVER, IT'S SUMMER."),
    # a lone quote that starts the line opens a quotation, whatever follows
    ("lm1b", '" and so it goes on , he said .', '"and so it goes on, he said.'),
    # ... one after a clause's end closes it before a lower-case word (also after `?` or `!`), opens one before a
    # capital (a quoted sentence), and closes one when it ends the line
    ("lm1b", 'Are you sure ? " asked the man .', 'Are you sure?" asked the man.'),
    ("lm1b", 'Get out ! " shouted the man .', 'Get out!" shouted the man.'),
    ("lm1b", 'He left early . " This is not over , she said .', 'He left early. "This is not over, she said.'),
    ("lm1b", 'It was not what I meant "', 'It was not what I meant"'),
    # upper-case clitics, yen signs, a line's own surrounding whitespace (a CRLF file's \r)
    ("lm1b", "I 'D RATHER STAY , WE 'LL SEE .", "I'D RATHER STAY, WE'LL SEE."),
    ("lm1b", "The yen fell to ¥ 110 against the dollar .\r", "The yen fell to ¥110 against the dollar."),
    # a colon between digits is a time, any other keeps its space after it
    ("wikitext", " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) ",
     "Senjō no Valkyria 3: <unk> Chronicles (Japanese: 戦場のヴァルキュリア3)"),
    # lines of `=` that are no heading (formula lines): nothing added, nothing dropped
    ("wikitext", " = ", "="),
    ("wikitext", " = = ", "= ="),
    ("wikitext", " = = Gameplay = ", "= = Gameplay ="),
    # a plural possessive ends the line
    ("ptb", " the analysts ' ", "the analysts'"),
    ("ptb_quotes", "she took the girls '", "she took the girls'"),
    # a single quotation opening on a word that starts like a clitic ('S, 'D) is no clitic
    ("ptb_quotes", "he said , ` Sorry ! ' and left .", "he said, 'Sorry!' and left."),
    ("ptb_quotes", "he said , ` Dear me ! ' and left .", "he said, 'Dear me!' and left."),
])
def test_detokenizer_known_pairs(name, original, expected):
    assert dt.detokenize(name, original) == expected
    assert only_spaces_moved(name, original, expected)


# Paper §3.1: the de-tokenizers are invertible. Besides moving spaces, each one only writes some of the dataset's
# tokens the way running text does; with those substitutions made on the original, both texts hold the same
# characters in the same order once spaces are removed (so nothing was dropped, added or reordered).
TOKEN_SUBSTITUTIONS = {
    "ptb_quotes": [(r"``", '"'), (r"''", '"'), (r"`", "'"), (r"(?i)-LRB-", "("), (r"(?i)-RRB-", ")"),
                   (r"(?i)-LSB-", "["), (r"(?i)-RSB-", "]"), (r"(?i)-LCB-", "{"), (r"(?i)-RCB-", "}")],
    "wikitext": [(r"@-@", "-"), (r"@,@", ","), (r"@\.@", ".")],
    "lm1b": [],
    "ptb": [(r"(?<!\S)N(?!\S)", "1"), (r"\\/", "/")],
}


def only_spaces_moved(name: str, original: str, detokenized: str) -> bool:
    for pattern, replacement in TOKEN_SUBSTITUTIONS[name]:
        original = re.sub(pattern, replacement, original)
    return "".join(original.split()) == "".join(detokenized.split())


@pytest.mark.parametrize("name, text", [("wikitext", WIKITEXT), ("ptb", PTB), ("lm1b", ONE_BW),
                                        ("ptb_quotes", "\n".join(LAMBADA_PLAIN)), ("ptb_quotes", _cbt_file())])
def test_detokenizers_keep_every_line_and_character_of_the_fixture_files(name, text):
    detokenized = dt.detokenize(name, text)
    assert detokenized.count("\n") == text.count("\n")
    assert all(only_spaces_moved(name, a, b) for a, b in zip(text.split("\n"), detokenized.split("\n")))


@pytest.mark.parametrize("original, expected", [
    # CBT (Stanford-tokenized Project Gutenberg books): this line is in CBT's Prince Prigio text
    ("CHAPTER I. -LCB- Chapter heading picture : p1.jpg -RCB- How the Fairies were not Invited to Court .",
     "CHAPTER I. {Chapter heading picture: p1.jpg} How the Fairies were not Invited to Court."),
    ("The queen -LRB- who was very clever and learned -RRB- said that fairies had never existed .",
     "The queen (who was very clever and learned) said that fairies had never existed."),
    ("-LSB- Illustration : The dragon -RSB- `` Who goes there ? '' cried the prince .",
     '[Illustration: The dragon] "Who goes there?" cried the prince.'),
    # a quotation inside a quotation: the single one opens with ` and closes with '
    ("`` ` Off with her head ! ' the Queen shouted , '' said Alice .",
     '"\'Off with her head!\' the Queen shouted," said Alice.'),
    # LAMBADA's plain text (lower-cased): a plural possessive is a lone ' after the word
    ("she thought that because she was old , her life was of less value than the others ' . for all helen knew",
     "she thought that because she was old, her life was of less value than the others'. for all helen knew"),
    ("give me a minute to change and i 'll meet you at the docks . '' she 'd forced those words through her teeth",
     'give me a minute to change and i\'ll meet you at the docks." she\'d forced those words through her teeth'),
    ("the girls ' dresses -lrb- blue ones -rrb- were ready .", "the girls' dresses (blue ones) were ready."),
    # a single quotation opening the line
    ("` Off with her head ! ' the Queen shouted .", "'Off with her head!' the Queen shouted."),
])
def test_ptb_quotes_detokenizes_cbt_and_lambada_lines(original, expected):
    detokenized = dt.ptb_quotes(original)
    assert detokenized == expected
    assert only_spaces_moved("ptb_quotes", original, detokenized)


@pytest.mark.parametrize("original, expected", [
    # lines of WikiText-2's wiki.test.tokens: headings are text too, and WikiText splits "don't" as "don 't"
    (" = = = Formation and major @-@ label debut ( 1994 – 1999 ) = = = ",
     "=== Formation and major-label debut (1994 – 1999) ==="),
    (" = = = = 2012 season : Cy Young runner @-@ up = = = = ", "==== 2012 season: Cy Young runner-up ===="),
    (" = = = Hero 's ( 2007 ) = = = ", "=== Hero's (2007) ==="),
    (" = <unk> <unk> But They Don 't Go Down = ", "= <unk> <unk> But They Don't Go Down ="),
    (" However , the North Koreans weren 't aware that the US 2nd Infantry Division had recently replaced the US "
     "24th Infantry Division in positions along the <unk> River . ",
     "However, the North Koreans weren't aware that the US 2nd Infantry Division had recently replaced the US "
     "24th Infantry Division in positions along the <unk> River."),
    (" It won 't win any new fans , but existing fans of ( <unk> ) <unk> 's work won 't be turning their backs ",
     "It won't win any new fans, but existing fans of (<unk>) <unk>'s work won't be turning their backs"),
    # times and durations: WikiText splits every colon
    (' " Kiss You " is an uptempo , upbeat power pop song which runs for a duration of 3 : 04 ( 3 minutes , four '
     'seconds ) . ', '"Kiss You" is an uptempo, upbeat power pop song which runs for a duration of 3:04 (3 minutes, '
     'four seconds).'),
    (" The Americans finally spotted the Japanese carriers at 16 : 40 , some 200 miles ( 320 km ) east of Cape <unk> "
     ", the northeastern tip of Luzon . ", "The Americans finally spotted the Japanese carriers at 16:40, some 200 "
     "miles (320 km) east of Cape <unk>, the northeastern tip of Luzon."),
    # a formula line that starts with `=` but does not end with one is text, not a heading
    (" = 3 @.@ 5 m / s ", "= 3.5 m / s"),
])
def test_wikitext_detokenizes_headings_and_split_negations(original, expected):
    detokenized = dt.wikitext(original)
    assert detokenized == expected
    assert only_spaces_moved("wikitext", original, detokenized)


@pytest.mark.parametrize("original, expected", [
    # sentences of 1BW's held-out set: "don't" is split "don 't", pounds and euros are tokens of their own
    ("I still don 't see how any of this is the president 's fault .",
     "I still don't see how any of this is the president's fault."),
    ("It 's a land where MRSA doesn 't exist and where \" who gets what treatment when \" isn 't determined .",
     'It\'s a land where MRSA doesn\'t exist and where "who gets what treatment when" isn\'t determined.'),
    ("A Hertfordshire council lost £ 24,000 in revenue from parking fines because enforcement orders were out of "
     "date .", "A Hertfordshire council lost £24,000 in revenue from parking fines because enforcement orders were "
     "out of date."),
    ("Unilever 's second-quarter pre-tax profits fell 12 per cent to € 1.2bn ( $ 1.72bn ) due to restructuring "
     "costs .", "Unilever's second-quarter pre-tax profits fell 12 per cent to €1.2bn ($1.72bn) due to restructuring "
     "costs."),
    # a quotation over several sentences leaves one of them with a lone quote, closing or opening
    ("It was exciting end-to-end stuff , and I don 't think one spectator left the stadium dissatisfied , \" said "
     "the Hibs manager .", "It was exciting end-to-end stuff, and I don't think one spectator left the stadium "
     "dissatisfied,\" said the Hibs manager."),
    ("He said to me , it 's better to kill them straight away , get rid of the evidence straight away . \"",
     'He said to me, it\'s better to kill them straight away, get rid of the evidence straight away."'),
    ('Ms Kitchen said : " It is a nightmare that we are all taking part in .',
     'Ms Kitchen said: "It is a nightmare that we are all taking part in.'),
    ('In a 66-page decision , the judge said there had been " no conduct that showed wanton and reckless disregard .',
     'In a 66-page decision, the judge said there had been "no conduct that showed wanton and reckless disregard.'),
    ('" I was poking about in the dashboard while the RSPCA man was trying to coax her out .',
     '"I was poking about in the dashboard while the RSPCA man was trying to coax her out.'),
    ("The Buccaneers ( 5-5 ) led 67-53 with 2 : 56 remaining on two free throws by Williams .",
     "The Buccaneers (5-5) led 67-53 with 2:56 remaining on two free throws by Williams."),
    # an ellipsis ends a clause too: the quote after it closes
    ('I thought it was over ... " not yet , she said .', 'I thought it was over..." not yet, she said.'),
])
def test_lm1b_detokenizes_held_out_sentences(original, expected):
    detokenized = dt.lm1b(original)
    assert detokenized == expected
    assert only_spaces_moved("lm1b", original, detokenized)


def retokenize_ptb(text: str) -> str:
    """Mikolov's PTB tokenization of de-tokenized text: each line is ' ' + tokens + ' ', clitics and a plural
    possessive's ' split off, every number N, '/' escaped as a backslash and '/'."""
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"(\S)'(?= |$)", r"\1 '", line)
        line = re.sub(r"(\S)(n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1 \2", line)
        line = re.sub(r"(?<!\S)1(?!\S)", "N", line.replace("$1", "$ 1")).replace("/", "\\/")
        lines.append(f" {line} " if line else line)
    return "\n".join(lines)


# lines of ptb.test.txt
PTB_LINES = [
    " newport corp. said it expects to report <unk> earnings of between N cents and N cents a share somewhat below "
    "analysts ' estimates of N cents to N cents ",
    " two years ago there were massive redemption levels over the weekend and a lot of fear around said c. bruce "
    "<unk> who runs fidelity investments ' $ N billion <unk> fund ",
    " nbc 's interest may revive the deal which mgm\\/ua killed last week when the australian concern had trouble "
    "raising cash ",
]


def test_ptb_detokenizer_undoes_possessives_and_escaped_slashes_and_is_invertible():
    out = dt.ptb("\n".join(PTB_LINES)).split("\n")
    assert out[0].endswith("below analysts' estimates of 1 cents to 1 cents")
    assert "fidelity investments' $1 billion <unk> fund" in out[1]
    assert out[2].startswith("nbc's interest may revive the deal which mgm/ua killed")
    for text in ("\n".join(PTB_LINES), PTB):
        assert retokenize_ptb(dt.ptb(text)) == text


@pytest.mark.parametrize("task, detok", [("wikitext2", "wikitext"), ("ptb", "ptb"), ("1bw", "lm1b")])
def test_detokenizing_never_changes_the_word_count(task, detok, data_dir, tokenizer):
    on, off = get_task(task)(data_dir), get_task(task)(data_dir, detokenize=False)
    assert on.documents() == off.documents()  # the original text is what gets counted
    answer = [RollingResult(-10.0, 5)]
    for doc in on.documents():
        assert on.score(doc, answer)["units"] == off.score(doc, answer)["units"] == dt.count_words(doc)
        assert on.requests(doc, tokenizer) != off.requests(doc, tokenizer)  # it did change the text
    # and the de-tokenizer keeps every line: end-of-line units are unchanged too
    text = {"wikitext": WIKITEXT, "ptb": PTB, "lm1b": ONE_BW}[detok]
    assert dt.detokenize(detok, text).count("\n") == text.count("\n")


def test_enwik8_and_text8_are_scored_as_written(data_dir, tokenizer):
    """The character-level sets have no tokenization to undo: the model reads the original text, indentation,
    markup and all."""
    for name in ("enwik8", "text8"):
        task = get_task(name)(data_dir)
        (doc,) = task.documents()
        assert task.requests(doc, tokenizer) == [RollingLoglikelihood(tuple(tokenizer.encode_ordinary(doc)))]
        assert task.protocol()["detokenizer"] == "none"


def test_a_last_line_without_its_newline_still_counts_its_end_of_sentence(tmp_path):
    """A test file saved without a final newline has as many sentences, so as many words, as the same file with it."""
    assert dt.count_words("a b\nc d e") == dt.count_words("a b\nc d e\n") == 7
    assert dt.count_words("a b\nc d e", eos_per_line=False) == 5 and dt.count_words("") == 0
    (tmp_path / "ptb.test.txt").write_text(PTB.rstrip("\n"))
    task = get_task("ptb")(tmp_path)
    (doc,) = task.documents()
    assert task.score(doc, [RollingResult(-10.0, 5)])["units"] == 160



# ----------------------------------------------------------------------------- errors, registry

def test_missing_file_names_the_file_and_its_source(tmp_path, model, tokenizer):
    for name, expect in [("lambada", "lambada_test.jsonl"), ("ptb", "ptb.test.txt"),
                         ("cbt-cn", "cbtest_CN_valid_2000ex.txt"), ("1bw", "news.en.heldout-00000-of-00050"),
                         ("wikitext2", "wikitext-2/wiki.test.tokens"), ("enwik8", "enwik8.zip")]:
        with pytest.raises(MissingDataError, match=f"task '{name}'.*{expect}.*normally obtained from") as e:
            evaluate(model, tokenizer, [name], tmp_path, progress=False)
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_registry_rejects_duplicates_and_unknown_names():
    assert {"lambada", "cbt-cn", "cbt-ne", "wikitext2", "wikitext103", "ptb", "enwik8", "text8", "1bw"} <= set(task_names())
    with pytest.raises(TaskError, match="already registered"):
        @register_task("lambada")
        class Again(Task):
            pass
    with pytest.raises(TaskError, match="unknown task 'nope'; known tasks: .*lambada"):
        get_task("nope")


def test_a_new_task_is_one_class(model, tokenizer, tmp_path):
    from gpt2kit.eval.registry import _REGISTRY

    @register_task("test-echo")
    class Echo(Task):
        data_files = ("echo.txt",)
        source = "nowhere"

        def documents(self, limit=None):
            return self.path.read_text().split()[:limit]

        def requests(self, doc, tokenizer):
            return [Loglikelihood((), tuple(tokenizer.encode_ordinary(doc)))]

        def score(self, doc, results):
            return {"lp": results[0].logprob}

        def aggregate(self, scores):
            return {"mean_lp": sum(s["lp"] for s in scores) / len(scores)}

    try:
        (tmp_path / "echo.txt").write_text("hello world")
        out = evaluate(model, tokenizer, ["test-echo"], tmp_path, progress=False)["test-echo"]
        assert out["counts"]["documents"] == 2 and out["metrics"]["mean_lp"] < 0
    finally:
        del _REGISTRY["test-echo"]


# ----------------------------------------------------------------------------- CLI, torchrun

def test_cli_errors_are_one_line(model_dir, data_dir, tmp_path, capsys):
    from gpt2kit.cli import main

    assert main(["eval", "--model", str(model_dir), "--tasks", "ptb,1bw", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2kit: error: task 'ptb': none of 'ptb.test.txt'") and err.count("\n") == 1
    assert main(["eval", "--model", str(model_dir), "--tasks", "ptb,nope", "--data-dir", str(data_dir)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "list", "--data-dir", str(data_dir)]) == 0
    assert "cbt-ne" in capsys.readouterr().out.split()
    # an empty dataset measures nothing: an error, not NaN in the table and the JSON
    (tmp_path / "ptb.test.txt").write_text("")
    assert main(["eval", "--model", str(model_dir), "--tasks", "ptb", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"gpt2kit: error: {tmp_path / 'ptb.test.txt'}: no ptb documents in it (an empty file?)\n"
    (tmp_path / "lambada_test.jsonl").write_text('{"text": 5}\n')
    assert main(["eval", "--model", str(model_dir), "--tasks", "lambada", "--data-dir", str(tmp_path)]) == 2
    assert "lambada_test.jsonl: line 1: expected a JSON object with a \"text\" string" in capsys.readouterr().err
    # numeric options are checked before the model is even loaded (here it does not exist)
    for extra, message in ((["--limit", "0"], "--limit must be at least 1, got 0"),
                           (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                           (["--stride", "-5"], "--stride must be at least 1, got -5")):
        assert main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "ptb", "--data-dir", str(data_dir),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"gpt2kit: error: {message}\n"
    # options and the output path are checked before the model runs
    for extra, message in ((["--out", str(tmp_path)], "exists and is not a file"),
                           (["--shots", "-1"], "--shots must be at least 0, got -1"),
                           (["--device", "bogus"], "device 'bogus': expected cpu, cuda or cuda:N")):
        assert main(["eval", "--model", str(model_dir), "--tasks", "ptb", "--data-dir", str(data_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gpt2kit: error: ") and message in err and err.count("\n") == 1


def test_cli_keeps_the_journal_until_the_results_are_written(model_dir, data_dir, tmp_path, capsys, monkeypatch,
                                                              caplog):
    """If writing --out fails (a full disk), the finished answers stay in FILE.partial and the rerun
    takes them; the journal goes only once the results file exists."""
    import gpt2kit.io
    from gpt2kit.cli import main

    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(model_dir), "--tasks", "ptb", "--data-dir", str(data_dir), "--limit", "2",
            "--stride", "16", "--out", str(out)]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out))

    with monkeypatch.context() as m:
        m.setattr(gpt2kit.io, "write_json", full_disk)
        assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "r.json.partial").is_file()
    with caplog.at_level(logging.INFO, logger="gpt2kit.eval.evaluator"):
        assert main(argv) == 0
    assert "resuming from" in caplog.text
    assert out.is_file() and not (tmp_path / "r.json.partial").exists()


def test_journal_fingerprint_names_the_device(model, tokenizer, data_dir, tmp_path):
    from gpt2kit.eval.evaluator import _open_journal
    from gpt2kit.eval.scoring import Scorer

    scorer = Scorer(model, tokenizer, batch_size=2, progress=False)
    a = _open_journal(tmp_path / "j", model, [], scorer).fingerprint

    class Elsewhere:  # the same config and weights, on another device
        config = model.config

        def parameters(self):
            yield torch.empty(0, device="meta")

        def state_dict(self):
            return model.state_dict()

        def named_modules(self):
            return model.named_modules()

    assert _open_journal(tmp_path / "j", Elsewhere(), [], scorer).fingerprint != a


def test_journal_fingerprint_tells_inference_forms_apart_by_their_block_weights(model):
    # `gpt2kit eval` fingerprints the inference form, whose layers keep their weights outside the
    # state dict: another checkpoint with the same embeddings (a fine-tune with them frozen) would
    # have reused the first run's answers
    import copy

    from gpt2kit.eval.journal import fingerprint
    from gpt2kit.generate import optimize_for_cpu

    outside = []
    for dtype in (torch.float32, torch.bfloat16):  # (fp32 without the kernels: input-major Parameters)
        one = copy.deepcopy(model).to(dtype)
        other = copy.deepcopy(one)
        with torch.no_grad():
            other.transformer.h[0].attn.c_attn.weight.mul_(2.0)
        a, b = optimize_for_cpu(one), optimize_for_cpu(other)
        assert set(a.state_dict()) == set(b.state_dict())
        outside.append(not any(".attn.c_attn" in k for k in a.state_dict()))
        assert fingerprint(a, [], {}) != fingerprint(b, [], {})
        assert fingerprint(a, [], {}) == fingerprint(optimize_for_cpu(copy.deepcopy(one)), [], {})
    assert outside[1]  # bf16 layers are always _CPULinear's (matvec, packed or widened)


def test_cli_end_to_end_under_torchrun(model_dir, data_dir, tmp_path):
    """`gpt2kit eval` on two processes: the table, the JSON, and the same numbers as one process."""
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tasks = ["lambada", "cbt-cn", "ptb", "text8", "1bw"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gpt2kit", "eval", "--model", str(model_dir), "--tasks", ",".join(tasks), "--data-dir", str(data_dir),
           "--limit", "3", "--batch-size", "2", "--stride", "16", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("| model | LAMBADA (PPL) | LAMBADA (ACC) | CBT-CN (ACC) | PTB (PPL) | text8 (BPC) | 1BW (PPL) |") == 1
    assert "lambada ACC by protocol" in r.stdout and "paper" not in r.stdout  # not a released size
    doc = json.loads(out.read_text())
    assert not list(tmp_path.glob("results.json.partial*"))  # the journals of both ranks go when done
    # stderr is a pipe here, as under nohup or a scheduler: progress still shows (redrawn sparsely)
    assert "rolling loglikelihood:" in r.stderr and "batch" in r.stderr
    assert doc["options"]["world_size"] == 2 and doc["options"]["stride"] == 16 and doc["options"]["limit"] == 3
    assert doc["tasks"]["lambada"]["counts"]["documents"] == 3
    assert doc["tasks"]["ptb"]["protocol"]["stride"] == 16 and doc["tasks"]["ptb"]["protocol"]["detokenizer"] == "ptb"
    assert set(doc["tasks"]["lambada"]["metrics"]) == {"ppl", "acc_word", "acc_word_stopfilter", "acc_token",
                                                       "acc_token_stopfilter"}
    model = GPT2.from_pretrained(str(model_dir)).eval()
    single = evaluate(model, Tokenizer.gpt2(), tasks, data_dir, limit=3, batch_size=2, stride=16, progress=False)
    for t in single:
        assert doc["tasks"][t]["counts"] == single[t]["counts"]
        for k, v in single[t]["metrics"].items():
            assert doc["tasks"][t]["metrics"][k] == pytest.approx(v, rel=1e-5), (t, k)


def test_an_interrupted_evaluation_resumes_from_its_journal(model, tokenizer, data_dir, tmp_path):
    """Stopped after a few batches and run again with the same journal, an evaluation runs only the batches it
    had not finished and gives the numbers of an uninterrupted run; the journal goes away when it completes."""
    tasks = ["lambada", "cbt-cn", "ptb", "1bw", "wikitext2"]
    options = dict(batch_size=2, stride=16, progress=False)
    forwards = []
    original = model.hidden_states

    def counting(*args, stop_after=None, **kwargs):
        forwards.append(1)
        if stop_after is not None and len(forwards) > stop_after:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    try:
        model.hidden_states = counting
        full = evaluate(model, tokenizer, tasks, data_dir, **options)
        total = len(forwards)
        journal = tmp_path / "run.partial"
        forwards.clear()
        model.hidden_states = lambda *a, **k: counting(*a, stop_after=total // 2, **k)
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, tokenizer, tasks, data_dir, journal=journal, **options)
        assert journal.is_file()
        with journal.open("a") as f:
            f.write('{"key": "9:9", "answ')  # the interruption cut the last line short
        forwards.clear()
        model.hidden_states = counting
        resumed = evaluate(model, tokenizer, tasks, data_dir, journal=journal, **options)
        assert 0 < len(forwards) < total - total // 4  # only what had not been done
        assert not journal.exists()
        assert resumed == full
        # a journal of another run (here another stride) is not used: the numbers stay right
        forwards.clear()
        model.hidden_states = lambda *a, **k: counting(*a, stop_after=total // 2, **k)
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, tokenizer, tasks, data_dir, journal=journal, **{**options, "stride": 8})
        assert journal.is_file()
        model.hidden_states = counting
        assert evaluate(model, tokenizer, tasks, data_dir, journal=journal, **options) == full
    finally:
        del model.hidden_states


def test_journal_keeps_every_kind_of_answer_exactly(tmp_path):
    from gpt2kit.eval.journal import Journal
    from gpt2kit.eval.requests import GenerationResult, LoglikelihoodResult

    answers = [({3: GenerationResult("Paris\u2028x", (5, 6), -1.25)}, [(0, LoglikelihoodResult(-0.1, True, 2))]),
               [[(7, LoglikelihoodResult(-math.inf, False, 1))]], 1 / 3, GenerationResult("", (), 0.0)]
    journal = Journal(tmp_path / "j", "fp")
    journal.put("0:0", answers)
    journal.close()
    assert Journal(tmp_path / "j", "fp").get("0:0") == answers
    assert Journal(tmp_path / "j", "other").get("0:0") is None
