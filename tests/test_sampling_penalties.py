"""Sampling controls beyond the paper's top-k: the OpenAI API's logit_bias and presence/frequency
penalties, as filters (against transformers' bias processor and the API's documented formula) and
through the decoding loop (against a cache-free reference loop on transformers' model), and min-p
(against transformers' warper)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit.generate import GenerationError, generate, prompt_logprobs, stream_generate
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.sampling import (
    SamplingError,
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency,
    min_p_filter,
    process_logits,
    select_tokens,
)
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.weights import hf_config_dict, to_hf_state_dict


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model() -> GPT2:
    torch.manual_seed(1)
    m = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=64)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)  # sharp distributions: greedy choices are not decided by rounding
    return m


@pytest.fixture(scope="module")
def hf(model) -> transformers.GPT2LMHeadModel:
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(model.config)))
    m.load_state_dict(to_hf_state_dict(model), strict=False)
    return m.eval()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_bias=st.integers(1, 6))
def test_logit_bias_matches_transformers_sequence_bias(seed, n_bias):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.randperm(50, generator=g)[:n_bias].tolist()
    values = (torch.rand(n_bias, generator=g) * 200 - 100).tolist()
    params = SamplingParams(logit_bias=dict(zip(ids, values)))
    ours = apply_logit_bias(logits, params.logit_bias)
    processor = transformers.SequenceBiasLogitsProcessor(sequence_bias=[[[i], v] for i, v in zip(ids, values)])
    theirs = processor(torch.zeros((3, 1), dtype=torch.long), logits.clone())
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_penalties_follow_openais_formula():
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, written out element by element
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7)).astype(np.float32)
    counts = np.array([[0, 1, 3, 0, 2, 0, 0], [5, 0, 0, 0, 0, 1, 0]], dtype=np.int32)
    for presence, frequency in ((0.5, 0.0), (0.0, 1.25), (-0.7, 0.3), (2.0, -2.0)):
        want = logits.copy()
        for b in range(2):
            for j in range(7):
                want[b, j] -= counts[b, j] * frequency + (1.0 if counts[b, j] > 0 else 0.0) * presence
        out = apply_presence_frequency(torch.from_numpy(logits), torch.from_numpy(counts), presence, frequency)
        np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=1e-6)
    same = torch.from_numpy(logits)
    assert apply_presence_frequency(same, torch.from_numpy(counts), 0.0, 0.0) is same


def test_params_check_and_normalise_the_new_fields():
    p = SamplingParams(logit_bias={7: 1, 3: -2.5})
    assert p.logit_bias == ((3, -2.5), (7, 1.0))
    assert hash(p) == hash(SamplingParams(logit_bias=((7, 1.0), (3, -2.5))))  # stays a hashable value
    for kwargs, field in (({"presence_penalty": float("nan")}, "presence_penalty"),
                          ({"frequency_penalty": "1"}, "frequency_penalty"),
                          ({"frequency_penalty": True}, "frequency_penalty"),
                          ({"logit_bias": {-1: 1.0}}, "logit_bias"),
                          ({"logit_bias": {"5": 1.0}}, "logit_bias"),
                          ({"logit_bias": {5: float("inf")}}, r"logit_bias\[5\]"),
                          ({"logit_bias": {5: 1e39}}, r"logit_bias\[5\]: expected a number from -1e\+06 to 1e\+06"),
                          ({"frequency_penalty": -2e6}, "frequency_penalty: expected a number from -1e"),
                          ({"logit_bias": 5}, "logit_bias")):
        with pytest.raises(SamplingError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(SamplingError, match="token id 60 is not in the vocabulary"):
        apply_logit_bias(torch.zeros(1, 50), SamplingParams(logit_bias={60: 1.0}).logit_bias)


def test_greedy_keeps_the_bias_and_the_penalties():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    counts = torch.tensor([[1, 0, 0]])
    greedy = SamplingParams(do_sample=False, presence_penalty=0.5)
    assert select_tokens(logits, greedy, sampled_counts=counts).item() == 1
    assert select_tokens(logits, SamplingParams(do_sample=False, logit_bias={2: 5})).item() == 2
    # the bias comes before the penalty, both before the temperature
    p = SamplingParams(temperature=2.0, frequency_penalty=1.0, logit_bias={0: 1.0})
    torch.testing.assert_close(process_logits(logits, p, sampled_counts=counts), torch.tensor([[1.0, 0.95, 0.0]]))


def test_the_filters_apply_in_the_documented_order():
    # bias -> repetition penalty (transformers' processors, in that order) -> presence/frequency
    # (the formula) -> temperature; each order gives other numbers on these logits
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.25]])
    previous = torch.tensor([[0, 1, 1, 4]])
    counts = torch.tensor([[1, 2, 0, 0, 1]])
    p = SamplingParams(temperature=0.5, repetition_penalty=2.0, presence_penalty=0.3, frequency_penalty=0.7,
                       logit_bias={0: 2.0, 1: 1.5, 4: 1.0})
    want = transformers.SequenceBiasLogitsProcessor(sequence_bias=[[[0], 2.0], [[1], 1.5], [[4], 1.0]])(
        previous, logits.clone())
    want = transformers.RepetitionPenaltyLogitsProcessor(penalty=2.0)(previous, want)
    want = (want - counts * 0.7 - (counts > 0) * 0.3) / 0.5
    torch.testing.assert_close(process_logits(logits, p, previous=previous, sampled_counts=counts), want)


def reference_greedy(hf, prompt: list[int], steps: int, presence: float, frequency: float,
                     bias: dict[int, float], n_ctx: int | None = None) -> list[int]:
    """Greedy decoding as the API documents it, one full forward pass per token (no cache); past
    `n_ctx` the window keeps its last 3/4, as gpt2kit's decoding slides it."""
    ids, out, start = list(prompt), [], 0
    for _ in range(steps):
        if n_ctx is not None and len(ids) - start > n_ctx:
            start = len(ids) - (n_ctx - n_ctx // 4)
        with torch.no_grad():
            logits = hf(torch.tensor([ids[start:]])).logits[0, -1].double()
        for j, v in bias.items():
            logits[j] += v
        for j in set(out):
            logits[j] -= out.count(j) * frequency + presence
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("presence, frequency, bias", [
    (0.0, 2.0, {}),
    (1.5, 0.0, {}),
    (0.4, 0.8, {}),
    (-2.0, 0.0, {}),
    (0.0, 0.0, "first-banned"),
])
def test_greedy_decoding_matches_a_reference_loop(model, hf, tok, presence, frequency, bias):
    prompt = tok.encode("the the the cat sat on the mat")
    plain = generate(model, tok, prompt, max_new_tokens=20, do_sample=False, stop_at_eot=False)[0].token_ids
    if bias == "first-banned":
        bias = {plain[0]: -100.0, plain[1]: 3.0}
    ours = generate(model, tok, prompt, max_new_tokens=20, do_sample=False, stop_at_eot=False,
                    presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)[0].token_ids
    assert ours == reference_greedy(hf, prompt, 20, presence, frequency, bias)
    assert ours != plain  # each setting changes this model's greedy text: the test can fail


def test_the_counts_outlive_the_sliding_window(model, hf, tok):
    # 70 new tokens after a 20-token prompt on a 64-token context: the window slides, and the
    # penalties still count every token sampled since the start
    prompt = tok.encode("the the the cat sat on the mat and the dog sat on the log by the door")
    ours = generate(model, tok, prompt, max_new_tokens=70, do_sample=False, stop_at_eot=False,
                    presence_penalty=0.3, frequency_penalty=0.7)[0].token_ids
    assert ours == reference_greedy(hf, prompt, 70, 0.3, 0.7, {}, n_ctx=64)


def test_penalties_count_sampled_tokens_not_the_prompt(model, hf, tok):
    # a prompt whose greedy next token already occurs in it (this model's greedy text repeats)
    start = tok.encode("the cat sat on the mat")
    cont = generate(model, tok, start, max_new_tokens=30, do_sample=False, stop_at_eot=False)[0].token_ids
    k = next(k for k in range(1, 30) if cont[k] in start + cont[:k])
    prompt, repeat = start + cont[:k], cont[k]
    first = generate(model, tok, prompt, max_new_tokens=1, do_sample=False, presence_penalty=2.0,
                     frequency_penalty=2.0)[0].token_ids
    assert first == [repeat]  # the prompt's tokens are not "sampled so far"
    # had the prompt counted, the penalty would have moved this token (the test can fail)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    for j in set(prompt):
        logits[j] -= prompt.count(j) * 2.0 + 2.0
    assert int(logits.argmax()) != repeat
    # and each row counts its own samples: a batch gives each prompt what it gets alone
    prompts = [tok.encode("the the the"), tok.encode("A longer and different prompt")]
    together = generate(model, tok, prompts, max_new_tokens=12, do_sample=False, frequency_penalty=1.0)
    alone = [generate(model, tok, [p], max_new_tokens=12, do_sample=False, frequency_penalty=1.0)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_a_large_bias_forces_or_bans_a_token_when_sampling(model, tok):
    forced = generate(model, tok, "Hello", max_new_tokens=10, seed=0, logit_bias={1000: 100.0}, stop_at_eot=False)
    assert forced[0].token_ids == [1000] * 10
    sampled = generate(model, tok, "Hello", max_new_tokens=30, seed=0, temperature=1.5, stop_at_eot=False)
    banned = set(sampled[0].token_ids[:3])
    again = generate(model, tok, "Hello", max_new_tokens=30, seed=0, temperature=1.5, stop_at_eot=False,
                     logit_bias={t: -100.0 for t in banned})
    assert not banned & set(again[0].token_ids)
    text = "".join(stream_generate(model, tok, "Hello", max_new_tokens=10, seed=0, logit_bias={1000: 100.0},
                                   stop_at_eot=False))
    assert text == forced[0].text


def test_a_bias_for_a_token_the_model_lacks_is_refused(model, tok):
    with pytest.raises(GenerationError, match="logit_bias: token id 50257 is not in the model's vocabulary"):
        generate(model, tok, "Hello", max_new_tokens=2, logit_bias={50257: 1.0})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), min_p=st.sampled_from([0.0, 1e-4, 0.01, 0.05, 0.1, 0.3, 0.9, 1.0]),
       scale=st.sampled_from([0.5, 3.0, 20.0]))
def test_min_p_matches_transformers(seed, min_p, scale):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(seed)) * scale
    theirs = transformers.MinPLogitsWarper(min_p=min_p)(torch.zeros((4, 1), dtype=torch.long), logits.clone()) \
        if min_p > 0 else logits
    ours = min_p_filter(logits, min_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])
    assert torch.isfinite(ours.amax(dim=-1)).all()  # the most probable token always stays


def test_min_p_comes_after_the_temperature_and_limits_sampling(model, tok):
    # min-p reads the distribution the temperature made: at T = 2 more tokens pass than at T = 1
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(process_logits(logits, SamplingParams(min_p=0.3))).tolist() == [[False, False, True, True]]
    assert torch.isinf(process_logits(logits, SamplingParams(min_p=0.3, temperature=2.0))).tolist() == \
        [[False, False, False, True]]
    # with min_p = 1 only the most probable token may be drawn: sampling is greedy
    greedy = generate(model, tok, "Hello", max_new_tokens=12, do_sample=False, stop_at_eot=False)[0].token_ids
    assert generate(model, tok, "Hello", max_new_tokens=12, seed=3, temperature=1.5, min_p=1.0,
                    stop_at_eot=False)[0].token_ids == greedy
    assert generate(model, tok, "Hello", max_new_tokens=12, seed=3, temperature=1.5,
                    stop_at_eot=False)[0].token_ids != greedy
    with pytest.raises(SamplingError, match=r"min_p: expected a number in \[0, 1\]"):
        SamplingParams(min_p=1.5)


def test_the_frequency_penalty_grows_with_each_repeat(model, hf, tok):
    # a token pushed up by a bias is taken again and again: each repeat must cost `frequency` more
    # (a count that stopped at 1 would make the penalty a presence penalty, and the token never stop)
    prompt = tok.encode("the cat sat on the mat")
    favoured = tok.encode(" dog")[0]
    ours = generate(model, tok, prompt, max_new_tokens=12, do_sample=False, stop_at_eot=False,
                    frequency_penalty=1.0, logit_bias={favoured: 8.0})[0].token_ids
    assert ours == reference_greedy(hf, prompt, 12, 0.0, 1.0, {favoured: 8.0})
    assert 2 <= ours.count(favoured) < 12  # taken more than once, and stopped by the growing penalty


def test_logit_bias_takes_numpy_and_torch_numbers_as_python_ones():
    # ids straight from argsort or topk: a prompt takes them, the bias refused them
    want = SamplingParams(logit_bias={3: 1.0, 5: -1.5, 7: 2.0, 9: 4.0}).logit_bias
    got = SamplingParams(logit_bias={np.int64(5): np.float32(-1.5), torch.tensor(7): torch.tensor(2.0),
                                     3: 1, np.int32(9): torch.tensor(4)}).logit_bias
    assert got == want and all(type(t) is int and type(v) is float for t, v in got)
    for bad, message in (({np.bool_(True): 1.0}, "token ids must be integers"),
                         ({torch.tensor(True): 1.0}, "token ids must be integers"),
                         ({np.float64(2.0): 1.0}, "token ids must be integers"),
                         ({2: torch.tensor([1.0, 2.0])}, r"logit_bias\[2\]"),
                         ({2: torch.tensor(False)}, r"logit_bias\[2\]"),
                         ({2: np.float32("nan")}, r"logit_bias\[2\]")):
        with pytest.raises(SamplingError, match=message):
            SamplingParams(logit_bias=bad)


def test_apply_logit_bias_checks_pairs_it_did_not_get_from_sampling_params():
    # unsorted or negative pairs reached the tensor indexing: an IndexError here, a device-side
    # assert that breaks the CUDA context on a GPU
    with pytest.raises(SamplingError, match="token id 20 is not in the vocabulary"):
        apply_logit_bias(torch.zeros(1, 10), ((20, 1.0), (3, 1.0)))
    with pytest.raises(SamplingError, match="token ids must be integers >= 0, got -1"):
        apply_logit_bias(torch.zeros(1, 10), ((-1, 1.0),))
    out = apply_logit_bias(torch.zeros(2, 10), {7: 2.0, 3: 1.0})  # a mapping, as SamplingParams takes
    assert out.tolist() == [[0, 0, 0, 1.0, 0, 0, 0, 2.0, 0, 0]] * 2


def test_a_bias_is_turned_into_tensors_once_per_decoding_not_per_step(model, tok):
    # a bias over the whole vocabulary (a whitelist) cost ~5 ms a token when rehashed and added
    # pair by pair at every step; its hash is computed once and its dense row built once
    import gpt2kit.sampling as sampling

    sampling._dense_bias.cache_clear()
    bias = {t: -100.0 for t in range(50257) if t != 1000}
    out = generate(model, tok, "Hello", max_new_tokens=8, seed=0, logit_bias=bias, stop_at_eot=False)
    assert out[0].token_ids == [1000] * 8
    info = sampling._dense_bias.cache_info()
    assert info.misses == 1 and info.hits >= 7
    params = SamplingParams(logit_bias=bias)
    assert params.logit_bias.__dict__.get("hash") is None
    hash(params.logit_bias)
    first = params.logit_bias.__dict__["hash"]
    assert hash(params.logit_bias) == first == hash(tuple(params.logit_bias))


def test_logprobs_are_the_models_own_before_the_bias_penalties_and_temperature(model, tok):
    # as the README says (and vLLM does): a token forced by a bias of 100 shows how likely the
    # model found it, not ~0
    out = generate(model, tok, "Hello", max_new_tokens=5, seed=0, logit_bias={1000: 100.0}, temperature=0.5,
                   presence_penalty=1.0, frequency_penalty=0.5, stop_at_eot=False, top_logprobs=0)[0]
    assert out.token_ids == [1000] * 5
    raw, _ = prompt_logprobs(model, out.prompt_token_ids + out.token_ids)
    np.testing.assert_allclose(out.logprobs, raw[-5:], rtol=0, atol=1e-4)
    assert max(out.logprobs) < -1.0
