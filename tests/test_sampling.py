"""Sampling filters: properties (hypothesis), parity with transformers' logits processors, and
statistics of many seeded draws."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt2kit.sampling import (
    PRESETS,
    SamplingError,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    process_logits,
    sample,
    select_tokens,
    top_k_filter,
    top_p_filter,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def logit_rows(draw, max_batch=4, max_vocab=64):
    """(B, V) logits with distinct values (ties make 'the k most probable' ambiguous)."""
    b = draw(st.integers(1, max_batch))
    v = draw(st.integers(2, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


@SETTINGS
@given(logits=logit_rows(), k=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_top_k_never_emits_outside_the_k_most_probable(logits, k, seed):
    filtered = top_k_filter(logits, k)
    assert torch.equal(torch.isfinite(filtered).sum(-1), torch.full((logits.shape[0],), min(k, logits.shape[1])))
    allowed = torch.topk(logits, min(k, logits.shape[1]), dim=-1).indices
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        tok = sample(filtered, g)
        assert (allowed == tok[:, None]).any(-1).all()
    # the logits that survive are untouched
    keep = torch.isfinite(filtered)
    assert torch.equal(filtered[keep], logits[keep])


@SETTINGS
@given(logits=logit_rows(), p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_top_p_keeps_exactly_the_smallest_nucleus(logits, p, seed):
    filtered = top_p_filter(logits, p)
    probs = torch.softmax(logits.double(), -1)
    for row in range(logits.shape[0]):
        kept = torch.isfinite(filtered[row])
        kept_mass = probs[row][kept].sum().item()
        # enough mass (up to float32 rounding of the cumulative sum) ...
        assert kept_mass >= p - 1e-5 or kept.all()
        # ... and minimal: without its least probable member the nucleus falls short of p
        least = probs[row][kept].min().item()
        assert kept_mass - least < p + 1e-5
        # the nucleus is a prefix of the tokens sorted by probability
        assert probs[row][kept].min() >= probs[row][~kept].max() if (~kept).any() else True
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        tok = sample(filtered, g)
        assert torch.isfinite(filtered.gather(1, tok[:, None])).all()


@SETTINGS
@given(logits=logit_rows(), k=st.integers(1, 70), p=st.floats(0.05, 1.0))
def test_filters_match_transformers_warpers(logits, k, p):
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    ours = top_k_filter(logits, k)
    theirs = TopKLogitsWarper(top_k=k)(ids, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    ours = top_p_filter(logits, p)
    theirs = TopPLogitsWarper(top_p=p)(ids, logits.clone())
    # transformers thresholds on 1 - p with the opposite sort; only rounding at the exact edge differs
    mismatch = torch.isfinite(ours) != torch.isfinite(theirs)
    if mismatch.any():
        probs = torch.softmax(logits.double(), -1)
        sorted_probs = probs.sort(-1, descending=True).values
        edge = (sorted_probs.cumsum(-1) - p).abs().min().item()
        assert edge < 1e-5


def test_top_p_at_an_exact_boundary_keeps_the_fewest_tokens():
    # four equal logits: probabilities of exactly 1/4, cumulative sums exact in float32; a nucleus
    # that reaches p exactly is complete (as in transformers), one more token would be one too many
    ids = torch.zeros(1, 1, dtype=torch.long)
    for p, n in ((0.25, 1), (0.5, 2), (0.75, 3), (0.7500001, 4)):
        kept = torch.isfinite(top_p_filter(torch.zeros(1, 4), p))
        assert kept.sum().item() == n
        assert kept.sum() == torch.isfinite(TopPLogitsWarper(top_p=p)(ids, torch.zeros(1, 4))).sum()


def test_top_p_over_a_whole_vocabulary_is_exact():
    # 50257 probabilities summed in order: a low-precision cumulative sum would drift by far more
    # than the float32 rounding allowed here at the edge of the nucleus
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(0)) * 2
    probs = torch.softmax(logits.double(), -1).sort(-1, descending=True).values
    before = probs.cumsum(-1) - probs
    for p in (0.3, 0.9, 0.95):
        kept = torch.isfinite(top_p_filter(logits, p)).sum(-1)
        want = (before < p).sum(-1)
        for row in range(4):
            if kept[row] != want[row]:
                edge = before[row, min(kept[row], want[row]):max(kept[row], want[row]) + 1]
                assert (edge - p).abs().max().item() < 1e-5, (p, row, kept[row].item(), want[row].item())


@SETTINGS
@given(logits=logit_rows(), t=st.floats(0.2, 3.0), k=st.integers(1, 70), p=st.floats(0.05, 1.0))
def test_process_logits_matches_transformers_warper_chain(logits, t, k, p):
    # temperature before the truncation filters: it changes which tokens make up the nucleus
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    chain = LogitsProcessorList([TemperatureLogitsWarper(t), TopKLogitsWarper(top_k=k), TopPLogitsWarper(top_p=p)])
    theirs = chain(ids, logits.clone())
    ours = process_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
    both = torch.isfinite(ours) & torch.isfinite(theirs)
    torch.testing.assert_close(ours[both], theirs[both])
    mismatch = torch.isfinite(ours) != torch.isfinite(theirs)
    if mismatch.any():  # only float rounding of a cumulative sum that lands on p
        probs = torch.softmax(top_k_filter(logits.double() / t, k), -1)
        sorted_probs = probs.sort(-1, descending=True).values
        assert (sorted_probs.cumsum(-1) - p).abs().min().item() < 1e-5


@SETTINGS
@given(logits=logit_rows(), penalty=st.floats(0.5, 3.0), seed=st.integers(0, 1000))
def test_repetition_penalty_matches_transformers(logits, penalty, seed):
    g = torch.Generator().manual_seed(seed)
    previous = torch.randint(0, logits.shape[1], (logits.shape[0], 7), generator=g)
    ours = apply_repetition_penalty(logits, previous, penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=penalty)(previous, logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_repetition_penalty_ignores_padding():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    previous = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0, 1, 1]])  # token 0 sits in a pad position only
    out = apply_repetition_penalty(logits, previous, 2.0, mask)
    assert out.tolist() == [[2.0, -4.0, 0.5]]
    assert apply_repetition_penalty(logits, previous, 1.0) is logits


def test_temperature_to_zero_equals_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 500, generator=g) * 3
    greedy = select_tokens(logits, SamplingParams(do_sample=False))
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(select_tokens(logits, SamplingParams(temperature=0.0)), greedy)
    cold = SamplingParams(temperature=1e-4)
    for seed in range(5):
        assert torch.equal(select_tokens(logits, cold, generator=torch.Generator().manual_seed(seed)), greedy)
    # so cold that logits / T overflow float32 (the server takes any temperature in (0, 2]): still the argmax
    for t in (1e-40, 5e-324):
        for top_k, top_p in ((None, None), (5, 0.9)):
            frozen = SamplingParams(temperature=t, top_k=top_k, top_p=top_p)
            assert torch.equal(select_tokens(logits, frozen, generator=torch.Generator().manual_seed(0)), greedy)
    # a warm temperature really samples: some rows differ from the argmax
    warm = select_tokens(logits, SamplingParams(temperature=5.0), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(warm, greedy)


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    n = 20000
    rows = logits.expand(n, -1)
    g = torch.Generator().manual_seed(1234)
    counts = torch.bincount(select_tokens(rows, SamplingParams(top_k=3), generator=g), minlength=5).double()
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9 * n
    assert counts[3:].sum() == 0
    # chi-square with 2 degrees of freedom: 13.8 is the 0.1% critical value
    chi2 = (((counts[:3] - expected[:3]) ** 2) / expected[:3]).sum().item()
    assert chi2 < 13.8
    counts = torch.bincount(select_tokens(rows, SamplingParams(top_p=0.8), generator=g), minlength=5).double()
    assert counts[3:].sum() == 0 and counts[2] > 0  # nucleus {0.5, 0.25, 0.15}: 0.75 < 0.8
    counts = torch.bincount(select_tokens(rows, SamplingParams(temperature=2.0), generator=g), minlength=5)
    p = torch.softmax(logits[0] / 2.0, -1) * n
    assert ((counts.double() - p).abs() < 5 * p.sqrt() + 5).all()


def test_same_seed_same_draws():
    logits = torch.randn(4, 1000)
    a = select_tokens(logits, PRESETS["paper"], generator=torch.Generator().manual_seed(7))
    b = select_tokens(logits, PRESETS["paper"], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_presets_and_validation():
    assert PRESETS["paper"].top_k == 40 and PRESETS["paper"].temperature == 1.0
    assert PRESETS["greedy"].greedy
    assert PRESETS["nucleus"] == SamplingParams(top_p=0.95) and PRESETS["pure"] == SamplingParams()
    # 1 is in range (OpenAI's default top_p): no truncation at all
    assert torch.isfinite(process_logits(torch.randn(2, 30), SamplingParams(top_p=1.0))).all()
    assert SamplingParams(top_p=1).top_p == 1
    assert SamplingParams.from_preset("paper", temperature=0.7) == SamplingParams(temperature=0.7, top_k=40)
    with pytest.raises(SamplingError, match="sampling preset: expected one of paper"):
        SamplingParams.from_preset("papr")
    with pytest.raises(SamplingError, match="top_k: expected an integer >= 1"):
        SamplingParams(top_k=0)
    with pytest.raises(SamplingError, match=r"top_p: expected a number in \(0, 1\]"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=math.nan)
    with pytest.raises(SamplingError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


def test_process_logits_does_not_modify_its_input():
    logits = torch.randn(2, 50)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=1.3)
    out = process_logits(logits, params, previous=torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(logits, before)
    # a bf16 model's logits are filtered in float32, as its float32 copy's would be
    half = logits.bfloat16()
    wide = process_logits(half, params, previous=torch.tensor([[1, 2], [3, 4]]))
    assert wide.dtype == out.dtype == torch.float32
    assert torch.equal(wide, process_logits(half.float(), params, previous=torch.tensor([[1, 2], [3, 4]])))


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e-37, 1e300])
def test_extreme_repetition_penalty_keeps_a_distribution(penalty):
    # logits / 1e-300 overflow float32 to inf (softmax of inf - inf: nan, and multinomial raises);
    # * 1e300 sends every seen negative logit to -inf (a row of only seen tokens: all -inf, nan)
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [-2.0, -1.0, -0.5, -3.0]])
    previous = torch.tensor([[0, 2], [0, 1]]) if penalty < 1 else torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    out = apply_repetition_penalty(logits, previous, penalty)
    probs = torch.softmax(out, dim=-1)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    if penalty < 1:  # the seen tokens' positive logits become the largest, by far
        assert probs[0, [0, 2]].sum() > 0.999 and out[0].argmax() == 0
    for temperature in (0.5, 1e-3):  # the filters after it keep it a distribution too
        params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
        assert torch.isfinite(torch.softmax(process_logits(logits, params, previous), -1)).all()
        sample(process_logits(logits, params, previous), torch.Generator().manual_seed(0))


def test_a_token_seen_in_a_real_position_is_penalized_wherever_its_pad_copies_are():
    # the oracle: transformers' processor on the real tokens alone (pads removed); a token in a pad
    # position and a real one, in either order, is seen (a count that kept only the last
    # occurrence's flag would miss rows 0 and 2), one only in pad positions is not (4 in row 3)
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(0)) * 3
    previous = torch.tensor([[3, 3, 5, 7], [3, 5, 7, 3], [9, 1, 1, 9], [2, 4, 2, 6]])
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
    expected = torch.cat([
        RepetitionPenaltyLogitsProcessor(penalty=1.7)(previous[r][mask[r].bool()][None], logits[r:r + 1].clone())
        for r in range(4)])
    torch.testing.assert_close(apply_repetition_penalty(logits, previous, 1.7, mask), expected, rtol=0, atol=0)
    # process_logits hands the mask on (greedy returns the penalized logits themselves)
    greedy = SamplingParams(do_sample=False, repetition_penalty=1.7)
    torch.testing.assert_close(process_logits(logits, greedy, previous, mask), expected, rtol=0, atol=0)


def test_greedy_decoding_applies_the_repetition_penalty():
    # token 0 is the argmax, already seen; penalty 2 halves its logit below token 1's (as in
    # transformers, where the penalty is a logits processor that greedy search applies too)
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.0]])
    previous = torch.tensor([[0, 2]])
    for params in (SamplingParams(do_sample=False, repetition_penalty=2.0),
                   SamplingParams(temperature=0.0, repetition_penalty=2.0)):
        assert select_tokens(logits, params, previous=previous).tolist() == [1]
        assert process_logits(logits, params, previous).tolist() == [[1.0, 1.5, -2.0, 0.0]]
    assert select_tokens(logits, SamplingParams(do_sample=False), previous=previous).tolist() == [0]


def test_top_k_keeps_every_logit_tied_with_the_kth():
    # the docstring's rule and transformers' TopKLogitsWarper: a tie at the k-th place keeps all of it
    ids = torch.zeros(2, 1, dtype=torch.long)
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0], [5.0, 5.0, 4.0, 1.0, 1.0, 1.0]])
    for k, kept in ((2, [[True, True, True, True, False, False], [True, True, False, False, False, False]]),
                    (1, [[True, False, False, False, False, False], [True, True, False, False, False, False]]),
                    (4, [[True, True, True, True, False, False], [True, True, True, True, True, True]])):
        ours = torch.isfinite(top_k_filter(logits, k))
        assert ours.tolist() == kept
        assert torch.equal(ours, torch.isfinite(TopKLogitsWarper(top_k=k)(ids, logits.clone())))


@pytest.mark.parametrize("field, value", [
    ("top_p", 0), ("top_p", 0.0), ("top_p", "0.9"), ("top_p", -0.1), ("top_k", True), ("top_k", 2.0),
    ("temperature", math.inf), ("temperature", "1"), ("repetition_penalty", math.inf),
    ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
])
def test_out_of_range_options_are_refused_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field}: expected "):
        SamplingParams(**{field: value})


def test_apply_temperature_refuses_zero_and_negative():
    # zero means greedy, which never calls it; called directly, 0 would divide into nan
    for t in (0.0, -0.5):
        with pytest.raises(SamplingError, match="temperature: expected > 0 for sampling"):
            apply_temperature(torch.randn(2, 5), t)


def test_sample_draws_from_bf16_logits_as_from_their_float32_values():
    # a bf16 model's logits handed straight to sample: the softmax is taken in float32 (in bf16 its
    # probabilities would be rounded to 8 bits, and the same generator would draw other tokens)
    logits = (torch.randn(2000, 300, generator=torch.Generator().manual_seed(0)) * 2).bfloat16()
    a = sample(logits, torch.Generator().manual_seed(3))
    b = sample(logits.float(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_nan_logits_are_one_error_not_a_traceback_or_nonsense():
    # a checkpoint of diverged (NaN) weights: multinomial raised "probability tensor contains
    # either inf, nan or element < 0", and greedy decoding printed whatever argmax chose
    logits = torch.zeros(2, 5)
    logits[1, 3] = float("nan")
    with pytest.raises(SamplingError, match=r"^the next-token probabilities are NaN: the model's logits are NaN or "):
        select_tokens(logits, SamplingParams())
    with pytest.raises(SamplingError, match=r"^the model's logits are NaN \(damaged or diverged weights\?\)$"):
        select_tokens(logits, SamplingParams(do_sample=False))
    fine = torch.zeros(2, 5)
    fine[:, 2] = 50.0
    assert select_tokens(fine, SamplingParams()).tolist() == [2, 2]
    assert select_tokens(fine, SamplingParams(do_sample=False)).tolist() == [2, 2]
