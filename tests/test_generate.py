"""Generation: greedy parity with transformers' generate, the KV cache and sliding window against a
cache-free reference, stop strings, seeds, n samples, and streaming that never splits a character."""
from __future__ import annotations

import copy
import logging
import threading

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit.generate import (
    GenerationError,
    _TextTracker,
    generate,
    generate_tokens,
    iter_generate,
    optimize_for_cpu,
    prompt_logprobs,
    quantize_int8,
    stream_generate,
)
import gpt2kit.model
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.sampling import SamplingError, SamplingParams
from gpt2kit.tokenizer import Tokenizer
from gpt2kit.weights import hf_config_dict, to_hf_state_dict

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


def peaked(config: GPT2Config, seed: int = 0) -> GPT2:
    """A random model with large weights: its next-token distributions are sharp, so greedy choices
    are not decided by float rounding (std 0.02 weights give nearly uniform logits)."""
    torch.manual_seed(seed)
    model = GPT2(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> GPT2:
    return peaked(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=64))


def hf_copy(model: GPT2) -> transformers.GPT2LMHeadModel:
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(model.config)))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)  # lm_head is tied to wte
    return hf.eval()


def hf_greedy(hf, tok: Tokenizer, prompts: list[str], max_new_tokens: int, **kw) -> list[list[int]]:
    rows = [tok.encode(p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.eot_token)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=tok.eot_token, eos_token_id=tok.eot_token, **kw)[:, width:].tolist()
    return [r[: r.index(tok.eot_token)] if tok.eot_token in r else r for r in out]


@pytest.mark.parametrize("fast", [False, True], ids=["model", "optimize_for_cpu"])
@pytest.mark.parametrize("prompts", [
    ["The quick brown fox"],
    ["Hello", "A longer prompt with quite a few more tokens in it", "Three words here"],
])
def test_greedy_matches_transformers_generate(model, tok, prompts, fast):
    ours = generate(optimize_for_cpu(model) if fast else model, tok, prompts, max_new_tokens=24, do_sample=False)
    theirs = hf_greedy(hf_copy(model), tok, prompts, 24)
    assert [c.token_ids for c in ours] == theirs
    assert all(len(t) > 0 for t in theirs)
    for c, p in zip(ours, prompts):
        assert c.prompt_token_ids == tok.encode(p)
        assert c.text == tok.decode(c.token_ids)


def test_greedy_with_repetition_penalty_matches_transformers(model, tok):
    ours = generate(model, tok, "Repeat after me", max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
    theirs = hf_greedy(hf_copy(model), tok, ["Repeat after me"], 24, repetition_penalty=1.5)
    assert ours[0].token_ids == theirs[0]
    plain = generate(model, tok, "Repeat after me", max_new_tokens=24, do_sample=False)
    assert plain[0].token_ids != ours[0].token_ids  # the penalty did something


def test_inference_form_under_torch_func_transforms(model):
    """vmap over prompts and jvp through the inference form, as through the model itself: the
    MKL/oneDNN/matvec paths cannot see into torch.func's wrapper tensors."""
    fast = optimize_for_cpu(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    with torch.no_grad():
        ref = model(ids)
        rows = torch.func.vmap(lambda r: fast(r[None])[0])(ids)  # (3, 5, V)
        one = torch.func.vmap(lambda r: fast(r[None, None])[0, -1])(ids[:, 0])  # 1 row: the decode path
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, ref[:, 0], atol=1e-5, rtol=1e-5)
    x = model.transformer.wte(ids[:1])  # (1, 5, C): a tangent on the embeddings
    head = fast.transformer.h[0].mlp
    _, tangent = torch.func.jvp(head, (x,), (torch.ones_like(x),))
    _, expect = torch.func.jvp(model.transformer.h[0].mlp, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, expect, atol=1e-5, rtol=1e-5)


def test_fast_paths_keep_the_logits(model, tok):
    ids = torch.tensor([tok.encode("fast paths"), tok.encode("same length")])
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(optimize_for_cpu(model)(ids), ref, atol=1e-5, rtol=1e-5)
        qmodel = quantize_int8(model)
        q = qmodel(ids)
    assert q.shape == ref.shape and not torch.equal(q, ref)
    assert (q - ref).abs().max() < 0.05 * ref.abs().max()  # int8 rounding, not a different model
    assert type(model.transformer.h[0].mlp.c_fc) is gpt2kit.model.Linear  # the original is untouched
    assert all(isinstance(m, torch.ao.nn.quantized.dynamic.Linear)  # every projection, and the head
               for m in (qmodel.transformer.h[0].mlp.c_fc, qmodel.transformer.h[0].attn.c_attn, qmodel.lm_head))
    half = peaked(model.config).to(torch.bfloat16)
    with torch.no_grad():
        packed = optimize_for_cpu(half)
        assert not isinstance(packed.transformer.h[0].mlp.c_fc, torch.nn.Linear)
        # both bf16 passes within bf16's rounding of the same weights multiplied in fp32 (how far
        # PyTorch's own bf16 pass strays depends on the CPU's kernels: 0.6% of the largest logit
        # on an AMD EPYC without AVX-512)
        exact = copy.deepcopy(half).float()(ids)  # (.float() converts in place)
        for got in (packed(ids), half(ids)):
            assert (got.float() - exact).abs().max() <= 0.01 * exact.abs().max()
        torch.testing.assert_close(packed(ids), half(ids), atol=0.05, rtol=0.02)
    assert generate(packed, tok, "x", max_new_tokens=10, do_sample=False)[0].token_ids == \
        generate(half, tok, "x", max_new_tokens=10, do_sample=False)[0].token_ids
    a = generate(optimize_for_cpu(model), tok, "x", max_new_tokens=10, seed=1)[0].token_ids
    assert a == generate(model, tok, "x", max_new_tokens=10, seed=1)[0].token_ids


def test_inference_form_without_the_kernels_keeps_the_logits(model, tok, monkeypatch):
    # no C++ compiler (or GPT2KIT_KERNELS=0): optimize_for_cpu stores the weights input-major instead
    monkeypatch.setattr(gpt2kit.kernels, "_library", lambda: None)
    monkeypatch.setattr(gpt2kit.kernels, "available", lambda dtype: False)  # (cached once the kernels built)
    fast = optimize_for_cpu(model)
    assert type(fast.transformer.h[0].mlp.c_fc) is not type(model.transformer.h[0].mlp.c_fc)
    ids = torch.tensor([[tok.eot_token, 0, 15496], [995, tok.eot_token, 1]])  # the first and last ids too
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(ids[:1, :1]), model(ids[:1, :1]), atol=1e-5, rtol=1e-5)
    assert generate(fast, tok, "x", max_new_tokens=10, do_sample=False)[0].token_ids == \
        generate(model, tok, "x", max_new_tokens=10, do_sample=False)[0].token_ids


@pytest.mark.parametrize("form", ["optimize_for_cpu", "without the kernels", "quantize_int8"])
def test_an_inference_form_refuses_to_be_saved_trained_or_converted(model, form, tmp_path, monkeypatch):
    # its layers are copies that state_dict and .to() do not see: a save would lose them silently
    if form == "without the kernels":
        monkeypatch.setattr(gpt2kit.kernels, "_library", lambda: None)
        monkeypatch.setattr(gpt2kit.kernels, "available", lambda dtype: False)
    fast = quantize_int8(model) if form == "quantize_int8" else optimize_for_cpu(model)
    assert isinstance(fast, GPT2) and fast.num_params() == model.num_params()
    refusals = {
        "save_pretrained": lambda: fast.save_pretrained(str(tmp_path / "saved")),
        r"train\(\)": fast.train,
        r"\.to\(torch.bfloat16\)": lambda: fast.to(torch.bfloat16),
        r"\.to\(torch.float16\)": fast.half,
        r"\.to\(meta\)": lambda: fast.to("meta"),
        "conversion": fast.share_memory,
    }
    name = "quantize_int8" if form == "quantize_int8" else "optimize_for_cpu"
    for what, call in refusals.items():
        with pytest.raises(GenerationError, match=rf"^{what}: this model is an inference form \({name}, as load_for_in"):
            call()
    assert not (tmp_path / "saved").exists()
    # what changes nothing is allowed, and the model still runs
    assert fast.eval() is fast and fast.cpu() is fast and fast.float() is fast and fast.to("cpu", torch.float32) is fast
    assert fast.to("cpu:0") is fast and fast.to(torch.device("cpu", 0)) is fast
    from gpt2kit.weights import WeightsError, save_pretrained, to_hf_state_dict

    for call in (lambda: save_pretrained(fast, tmp_path / "saved"), lambda: to_hf_state_dict(fast)):
        with pytest.raises(WeightsError, match=rf"^this model is an inference form \({name}\), whose layers are not "):
            call()
    assert not fast.training
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        ref = model(ids)
        atol = 0.05 * ref.abs().max().item() if form == "quantize_int8" else 1e-5  # int8 moves logits ~1%
        torch.testing.assert_close(fast(ids), ref, atol=atol, rtol=0)


def test_cache_and_sliding_window_match_a_cache_free_reference(tok):
    m = peaked(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=16), seed=1)
    prompt = list(range(100, 111))  # 11 tokens, then 30 new ones: the window slides twice
    got = [out.tokens[0] for out in generate_tokens(m, [prompt], GREEDY, max_new_tokens=30)]
    # reference: a full forward over the window each step; the window is the last 12 tokens
    # (3/4 of n_ctx) from the moment the sequence no longer fits
    history, start = list(prompt), 0
    want = []
    with torch.no_grad():
        for _ in range(30):
            if len(history) - start > 16:
                start = len(history) - 12
            logits = m(torch.tensor([history[start:]]))[0, -1]
            history.append(int(logits.argmax()))
            want.append(history[-1])
    assert got == want


def test_a_row_slides_when_its_own_context_is_full_not_its_batch_mates(tok):
    # a short prompt batched with a long one decodes as it does alone: the long row's window
    # slides first, the short row keeps its whole context until its own fills
    m = peaked(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=16), seed=3)
    long_p, short_p, tiny_p = list(range(1000, 1015)), list(range(2000, 2010)), [3000]
    for model in (m, optimize_for_cpu(m)):
        alone = [[out.tokens[0] for out in generate_tokens(model, [p], GREEDY, max_new_tokens=30)]
                 for p in (long_p, short_p, tiny_p)]
        batched = list(zip(*(out.tokens for out in generate_tokens(model, [long_p, short_p, tiny_p], GREEDY,
                                                                 max_new_tokens=30))))
        assert [list(r) for r in batched] == alone


def test_prompt_longer_than_context_keeps_its_end(tok, caplog):
    m = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=16), seed=2)
    long_prompt = " ".join(f"w{i}" for i in range(40))
    ids = tok.encode(long_prompt)
    assert len(ids) > 16
    with caplog.at_level(logging.WARNING, logger="gpt2kit.generate"):
        out = generate(m, tok, long_prompt, max_new_tokens=20, do_sample=False)[0]
    assert "longer than the context (16): keeping its last 16 tokens" in caplog.text
    assert out.prompt_token_ids == ids[-16:]
    assert len(out.token_ids) == 20
    same = generate(m, tok, [ids[-16:]], max_new_tokens=20, do_sample=False)[0]
    assert same.token_ids == out.token_ids


def test_stop_strings_cut_the_text(model, tok):
    full = generate(model, tok, "Once upon a time", max_new_tokens=30, do_sample=False)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    stop = full.text[10:13]
    cut = generate(model, tok, "Once upon a time", max_new_tokens=30, do_sample=False, stop=[stop, "\x00never"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
    assert len(cut.token_ids) < 30  # decoding ended at the stop string
    pieces = list(stream_generate(model, tok, "Once upon a time", max_new_tokens=30, do_sample=False, stop=stop))
    assert "".join(pieces) == cut.text


def test_a_row_that_stops_takes_no_more_tokens_while_its_batch_mate_goes_on(model, tok):
    a, b = generate(model, tok, ["Once upon a time", "Hello"], max_new_tokens=30, do_sample=False)
    assert a.finish_reason == b.finish_reason == "length"
    stop = next(a.text[i:i + 3] for i in range(3, 20) if a.text[i:i + 3] not in b.text)
    cut, rest = generate(model, tok, ["Once upon a time", "Hello"], max_new_tokens=30, do_sample=False, stop=stop)
    assert (cut.text, cut.finish_reason) == (a.text[: a.text.index(stop)], "stop")
    # its tokens end with the one that completed the stop string
    assert cut.token_ids == a.token_ids[: len(cut.token_ids)]
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])
    assert (rest.token_ids, rest.finish_reason) == (b.token_ids, "length")


def test_seed_n_and_batches(model, tok):
    a = generate(model, tok, ["Hi", "Hello there"], max_new_tokens=12, seed=3, n=3)
    b = generate(model, tok, ["Hi", "Hello there"], max_new_tokens=12, seed=3, n=3)
    assert [c.text for c in a] == [c.text for c in b]
    assert [c.prompt_index for c in a] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in a}) == 6  # independent samples
    other = generate(model, tok, ["Hi", "Hello there"], max_new_tokens=12, seed=4, n=3)
    assert [c.text for c in other] != [c.text for c in a]
    paper = generate(model, tok, "Hi", max_new_tokens=12, seed=3, preset="paper")[0]
    assert paper.token_ids == generate(model, tok, "Hi", max_new_tokens=12, seed=3, top_k=40)[0].token_ids


def eot_model(config: GPT2Config, eot: int) -> GPT2:
    """A random model whose next token is always `eot`: ln_f outputs one constant vector, along
    which the embedding row of `eot` is by far the longest."""
    m = peaked(config)
    with torch.no_grad():
        direction = torch.zeros(config.n_embd)
        direction[0] = 10.0
        m.transformer.wte.weight[eot] = direction
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(direction)
    return m


def test_end_of_text_ends_a_sample_unless_told_otherwise(tok):
    m = eot_model(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=64), tok.eot_token)
    done = generate(m, tok, ["Hello", "Bye"], max_new_tokens=5, do_sample=False)
    assert [(c.text, c.token_ids, c.finish_reason) for c in done] == [("", [], "stop")] * 2
    on = generate(m, tok, "Hello", max_new_tokens=5, do_sample=False, stop_at_eot=False)[0]
    assert on.token_ids == [tok.eot_token] * 5 and on.finish_reason == "length"
    assert on.text == "<|endoftext|>" * 5


def test_n_samples_come_prompt_by_prompt(model, tok):
    one = [generate(model, tok, p, max_new_tokens=8, do_sample=False)[0].token_ids for p in ("Hi", "Hello there")]
    both = generate(model, tok, ["Hi", "Hello there"], max_new_tokens=8, do_sample=False, n=2)
    assert [c.token_ids for c in both] == [one[0], one[0], one[1], one[1]]
    assert [c.prompt_token_ids for c in both] == [tok.encode("Hi")] * 2 + [tok.encode("Hello there")] * 2


def test_decoding_stops_when_every_row_is_finished_or_cancelled(model):
    finished = [False, False]
    steps = 0
    for _ in generate_tokens(model, [[1, 2], [3]], GREEDY, max_new_tokens=10, finished=finished):
        steps += 1
        finished[steps - 1] = True  # row 0 after the first step, row 1 after the second
    assert steps == 2
    cancel = threading.Event()
    steps = 0
    for _ in generate_tokens(model, [[1, 2]], GREEDY, max_new_tokens=10, cancel=cancel):
        steps += 1
        cancel.set()
    assert steps == 1


def test_the_stop_string_that_begins_first_wins(tok):
    # " world" completes both stop strings at once: the text ends where the earlier one begins,
    # whichever of them the list names first
    pieces, whole = feed(tok, tok.encode("Hello world"), stop=["d", "o w"])
    assert whole == "".join(pieces) == "Hell"


def test_logprobs_are_the_models(model, tok):
    c = generate(model, tok, "Scores", max_new_tokens=5, do_sample=False, top_logprobs=3)[0]
    ids = torch.tensor([c.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].float(), -1)
    n = len(c.prompt_token_ids)
    want = [logp[n - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(want, abs=1e-4)
    assert all(next(iter(top)) == t for top, t in zip(c.top_logprobs, c.token_ids))  # greedy = the best
    best = logp[n - 1:-1].topk(3, dim=-1)
    for top, values, ids_ in zip(c.top_logprobs, best.values.tolist(), best.indices.tolist()):
        assert list(top) == ids_ and list(top.values()) == pytest.approx(values, abs=1e-4)
    # sampled with a temperature and top-k: still the model's own log-probabilities (as OpenAI reports)
    hot = generate(model, tok, "Scores", max_new_tokens=5, temperature=0.5, top_k=3, seed=0, top_logprobs=1)[0]
    with torch.no_grad():
        hot_logp = torch.log_softmax(model(torch.tensor([hot.prompt_token_ids + hot.token_ids]))[0].float(), -1)
    assert hot.logprobs == pytest.approx([hot_logp[n - 1 + i, t].item() for i, t in enumerate(hot.token_ids)], abs=1e-4)
    scored, tops = prompt_logprobs(model, ids[0].tolist(), 2)
    assert scored[0] is None and tops[0] is None
    assert scored[n:] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 2 for t in tops[1:])
    assert prompt_logprobs(model, ids[0].tolist())[1] == [None] * ids.shape[1]  # no alternatives asked


def test_streaming_equals_non_streaming(model, tok):
    for seed in range(4):
        pieces = list(stream_generate(model, tok, "Stream me", max_new_tokens=40, seed=seed, temperature=1.5))
        whole = generate(model, tok, "Stream me", max_new_tokens=40, seed=seed, temperature=1.5)[0]
        assert "".join(pieces) == whole.text == tok.decode(whole.token_ids)
        assert all(pieces)


def test_edge_cases_and_errors(model, tok):
    empty = generate(model, tok, "", max_new_tokens=3, do_sample=False)[0]
    assert empty.prompt_token_ids == [tok.eot_token] and len(empty.token_ids) == 3
    by_ids = generate(model, tok, tok.encode("abc"), max_new_tokens=3, do_sample=False)
    assert len(by_ids) == 1 and by_ids[0].text == generate(model, tok, "abc", max_new_tokens=3, do_sample=False)[0].text
    none = generate(model, tok, ["a", "b"], max_new_tokens=0)
    assert [(c.text, c.finish_reason) for c in none] == [("", "length"), ("", "length")]
    with pytest.raises(GenerationError, match="n: expected an integer >= 1"):
        generate(model, tok, "x", n=0)
    with pytest.raises(GenerationError, match="max_new_tokens: expected an integer >= 0"):
        generate(model, tok, "x", max_new_tokens=-1)
    with pytest.raises(GenerationError, match="stop: expected non-empty strings"):
        generate(model, tok, "x", stop=[""])
    events = list(iter_generate(model, tok, "x", max_new_tokens=4, params=GREEDY))
    assert [e.finish_reason for e in events] == [None, None, None, "length"]
    # bytes would be read as a list of byte values, i.e. token ids
    for bad, named in ((b"Hello", "prompts"), (bytearray(b"Hi"), "prompts"), ([b"Hi"], "prompt 0")):
        with pytest.raises(GenerationError, match=rf"^{named}: expected a string or token ids, got {type(bad).__name__ if named == 'prompts' else 'bytes'}: decode"):
            generate(model, tok, bad, max_new_tokens=1)
    with pytest.raises(GenerationError, match="^prompt 0: expected a string or token ids, got bytes"):
        list(stream_generate(model, tok, b"Hi", max_new_tokens=1))
    for bad in (-1, model.config.vocab_size + 1, "2", True, 1.0, np.array([1, 2])):
        with pytest.raises(GenerationError, match=rf"^top_logprobs: expected an integer in \[0, {model.config.vocab_size}\]"):
            generate(model, tok, "x", max_new_tokens=1, top_logprobs=bad)


def test_numpy_and_torch_scalars_are_taken_as_numbers(model, tok):
    # a sweep over np.arange / np.linspace, or a value read from a tensor
    options = dict(max_new_tokens=5, n=2, seed=3, temperature=0.7, top_k=5, top_p=0.9, min_p=0.01,
                   repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.25, top_logprobs=2)
    as_numpy = {k: (np.int64(v) if isinstance(v, int) else np.float32(v)) for k, v in options.items()}
    as_torch = {k: torch.tensor(v) for k, v in options.items()}
    ref = [(c.token_ids, c.top_logprobs) for c in generate(model, tok, "Hi", **options)]
    for scalars in (as_numpy, as_torch):
        got = generate(model, tok, "Hi", **scalars)
        assert [c.token_ids for c in got] == [r[0] for r in ref] and len(got) == 2
    assert SamplingParams(temperature=np.float64(0.5), top_k=np.int32(3)) == SamplingParams(temperature=0.5, top_k=3)
    with pytest.raises(SamplingError, match=r"top_k: expected an integer >= 1 \(or None\), got np.float64\(3.0\)"):
        SamplingParams(top_k=np.float64(3.0))


def test_a_model_in_training_mode_decodes_as_in_eval_mode(model, tok):
    # a model just built, or mid-training, has dropout on: decoding must not sample dropout masks
    import dataclasses

    training = GPT2(dataclasses.replace(model.config, dropout=0.5))
    training.load_state_dict(model.state_dict())
    assert training.train().training
    ref = generate(model, tok, "Hello", max_new_tokens=8, do_sample=False, top_logprobs=1)[0]
    for _ in range(2):
        got = generate(training, tok, "Hello", max_new_tokens=8, do_sample=False, top_logprobs=1)[0]
        assert got.token_ids == ref.token_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert training.training  # and it is left as it was
    assert prompt_logprobs(training, [1, 2, 3])[0] == pytest.approx(prompt_logprobs(model, [1, 2, 3])[0], abs=1e-5)
    assert training.training
    # between the pieces of a stream the caller's code runs as it would without it: no inference
    # mode, the model's own modes, and a mode the caller sets meanwhile stays set
    stream = stream_generate(training, tok, "Hello", max_new_tokens=6, do_sample=False)
    first = next(stream)
    assert not torch.is_inference_mode_enabled() and training.training
    training.eval()
    assert first + "".join(stream) == generate(model, tok, "Hello", max_new_tokens=6, do_sample=False)[0].text
    assert not training.training
    training.train()
    training.transformer.h[0].eval()  # a frozen block stays frozen
    generate(training, tok, "Hello", max_new_tokens=2)
    assert training.training and training.transformer.h[1].training and not training.transformer.h[0].training



def test_bad_prompt_token_ids_are_named(model, tok):
    # the embedding would fail with "index out of range in self", or take a float or a bool as an id
    for bad, shown in (([[15496, tok.n_vocab]], str(tok.n_vocab)), ([[-1]], "-1"), ([[15496, 3.5]], "3.5"),
                       ([[True, 995]], "True"), ([["a"]], "'a'")):
        with pytest.raises(GenerationError, match=rf"prompt 0: token id {shown} .*expected an integer in \[0, "):
            generate(model, tok, bad, max_new_tokens=2)
        if isinstance(bad[0][0], int):  # (else not one prompt for stream_generate)
            with pytest.raises(GenerationError, match="prompt 0: token id"):
                list(stream_generate(model, tok, bad[0], max_new_tokens=2))
    with pytest.raises(GenerationError, match="prompt 1: token id 50257"):
        generate(model, tok, [[1], [2, 50257]], max_new_tokens=2)
    small_vocab = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=64, vocab_size=300))
    with pytest.raises(GenerationError, match=r"prompt 0: token id 300 is invalid; expected an integer in \[0, 300\)"):
        generate(small_vocab, tok, [[5, 300]], max_new_tokens=2)  # the model's vocabulary bounds the ids
    for run in (generate, stream_generate, iter_generate):  # text that encodes past it: named, not an IndexError
        with pytest.raises(GenerationError, match=r"prompt 0: .*token id 15496"):
            list(run(small_vocab, tok, "Hello world", max_new_tokens=2))
    bigger = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=64, vocab_size=tok.n_vocab + 1))
    with pytest.raises(GenerationError, match=r"the model has 50258 output tokens but the tokenizer only 50257"):
        generate(bigger, tok, "x", max_new_tokens=2)
    as_arrays = generate(model, tok, [np.array([15496, 995]), torch.tensor([15496, 995])], max_new_tokens=3,
                         do_sample=False)
    assert [c.token_ids for c in as_arrays] == [generate(model, tok, [15496, 995], max_new_tokens=3,
                                                         do_sample=False)[0].token_ids] * 2
    assert as_arrays[0].prompt_token_ids == [15496, 995] and type(as_arrays[1].prompt_token_ids[0]) is int

# --- the text tracker: whole characters, stop strings held back --------------------------------

def feed(tok: Tokenizer, ids: list[int], stop=()) -> tuple[list[str], str]:
    tracker = _TextTracker(tok, list(stop))
    pieces = [tracker.push(t) for t in ids]
    if not tracker.stopped:
        pieces.append(tracker.finish())
    return pieces, tracker.text


def test_multibyte_characters_arrive_whole(tok):
    text = "naïve café – 日本語 😀👍🏽 ok"
    ids = tok.encode(text)
    assert any(tok.decode([t]) != tok.token_bytes(t).decode("utf-8", "ignore") for t in ids)  # split chars
    pieces, whole = feed(tok, ids)
    assert "".join(pieces) == whole == text
    assert all("\ufffd" not in p for p in pieces)
    pieces, whole = feed(tok, ids, stop=["👍"])
    assert "".join(pieces) == whole == "naïve café – 日本語 😀"


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=40), stop=st.lists(st.text(min_size=1, max_size=4), max_size=2))
def test_tracker_pieces_join_to_the_cut_text(tok, text, stop):
    ids = tok.encode(text)
    pieces, whole = feed(tok, ids, stop)
    assert "".join(pieces) == whole
    assert text.startswith(whole) and not any(s in whole for s in stop)
    if any(s in text for s in stop):
        # cut where the first stop string to be completed begins
        assert any(text.startswith(s, len(whole)) for s in stop)
    else:
        assert whole == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=30))
def test_tracker_on_arbitrary_bytes_matches_decode(tok, data):
    # one single-byte token per byte: any byte string, valid UTF-8 or not
    by_byte = {tok.token_bytes(t)[0]: t for t in range(256)}
    assert len(by_byte) == 256
    seq = [by_byte[b] for b in data]
    pieces, whole = feed(tok, seq)
    assert "".join(pieces) == whole == tok.decode(seq) == data.decode("utf-8", errors="replace")


README_IMPORTS = """
import importlib
import torch
{before}
from gpt2kit import generate, stream_generate
the_function = importlib.import_module("gpt2kit.generate").__dict__["generate"]
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.tokenizer import Tokenizer

torch.manual_seed(0)
model, tok = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_ctx=16)).eval(), Tokenizer.gpt2()
out = generate(model, tok, ["Hello", "Bonjour"], max_new_tokens=4, do_sample=False, n=2)
assert [c.token_ids for c in out] == [c.token_ids for c in the_function(model, tok, ["Hello", "Bonjour"],
                                                                       max_new_tokens=4, do_sample=False, n=2)]
assert out[0].finish_reason == "length" and len(out) == 4
import gpt2kit.generate as G  # the submodule stays reachable by its dotted name
assert G.stream_generate is stream_generate and callable(G.optimize_for_cpu)
import functools, inspect, pickle  # a process pool's target; help() and IDEs show the real parameters
assert pickle.loads(pickle.dumps(functools.partial(generate, model))).func is generate
assert inspect.signature(generate) == inspect.signature(the_function)
print("ok")
"""


@pytest.mark.parametrize("before", ["", "import gpt2kit.server", "import gpt2kit; gpt2kit.generate"])
def test_the_readme_import_of_generate_is_callable(before):
    # `from gpt2kit import generate` names a function and a submodule at once: whichever the
    # package attribute is by then (the submodule once anything imported it), the README's call works
    import subprocess
    import sys

    code = README_IMPORTS.format(before=before)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_inference_forms_prompt_gelu_runs_over_the_product_itself(monkeypatch):
    # fp32 prompts: the MLP's bias + GELU is written over c_fc's fresh product (one (N, 4C) tensor,
    # as the trainable model does), not into a second one; with a gradient to carry, out of place
    from gpt2kit import kernels

    in_place, out_of_place = [], []
    real_, real = kernels.bias_gelu_, kernels.bias_gelu
    monkeypatch.setattr(kernels, "bias_gelu_", lambda x, b: in_place.append(x.shape) or real_(x, b))
    monkeypatch.setattr(kernels, "bias_gelu", lambda x, b: out_of_place.append(x.shape) or real(x, b))
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=1, n_ctx=128, vocab_size=300)).eval()
    fast = optimize_for_cpu(model)
    ids = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        want = model(ids)
        in_place.clear()
        torch.testing.assert_close(fast(ids), want, atol=1e-5, rtol=1e-5)
    if not kernels.available(torch.float32):  # PyTorch's GELU after the input-major product, no kernel
        assert type(fast.transformer.h[0].mlp.c_fc).__name__ == "_InputMajorLinear"
        assert in_place == out_of_place == []
        return
    assert in_place == [(200, 256)] * 2 and out_of_place == []
    x = torch.randn(200, 64, requires_grad=True)
    y = fast.transformer.h[0].mlp.c_fc(x)  # a gradient through the inference form's layer
    y.sum().backward()
    assert out_of_place == [(200, 256)] and x.grad is not None


def test_text_held_back_at_the_last_token_is_not_lost(model, tok):
    # the sample's end (max_new_tokens) releases what was held back: the start of a stop string
    # that never came, or the bytes of a character the last token left unfinished
    full = generate(model, tok, "Hello", max_new_tokens=10, do_sample=False)[0]
    assert full.finish_reason == "length" and full.text == tok.decode(full.token_ids)
    held = generate(model, tok, "Hello", max_new_tokens=10, do_sample=False, stop=full.text[-1] + "\x01never")[0]
    assert held.text == full.text and held.finish_reason == "length"
    lead = tok.mergeable_ranks[b"\xe2"]  # a character's first byte, never finished
    cut = generate(model, tok, "Hello", max_new_tokens=2, do_sample=False, logit_bias={lead: 100.0})[0]
    assert cut.token_ids == [lead, lead] and cut.text == "\ufffd\ufffd"


def test_top_logprobs_0_gives_logprobs_without_alternatives(model, tok):
    c = generate(model, tok, "Hello", max_new_tokens=3, do_sample=False, top_logprobs=0)[0]
    assert len(c.logprobs) == 3 and c.top_logprobs is None


def test_generate_tokens_with_no_steps_yields_nothing(model):
    # the cache holds the prompt and the tokens still to be fed back: with none to come, the prompt alone
    assert list(generate_tokens(model, [[1, 2, 3], [4]], GREEDY, max_new_tokens=0)) == []


def test_a_tiny_context_slides_to_all_but_its_last_token():
    # n_ctx // 4 is 0 below 4 positions: the window still drops at least one token when it slides
    m = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=3), seed=4)
    got = [out.tokens[0] for out in generate_tokens(m, [[100, 101]], GREEDY, max_new_tokens=8)]
    history, start, want = [100, 101], 0, []
    with torch.no_grad():
        for _ in range(8):
            if len(history) - start > 3:
                start = len(history) - 2
            history.append(int(m(torch.tensor([history[start:]]))[0, -1].argmax()))
            want.append(history[-1])
    assert got == want


def test_option_errors_refuse_bools_and_non_strings(model, tok):
    # True is an int to Python; a stop list of numbers would fail inside str.find
    for kw, msg in ((dict(max_new_tokens=True), "max_new_tokens: expected an integer >= 0, got True"),
                    (dict(n=True), "n: expected an integer >= 1, got True"),
                    (dict(n="2"), "n: expected an integer >= 1, got '2'"),  # checked before any use
                    (dict(stop=[1]), r"stop: expected non-empty strings, got \[1\]")):
        with pytest.raises(GenerationError, match=msg):
            generate(model, tok, "x", **{"max_new_tokens": 2, **kw})
    assert generate(model, tok, [], max_new_tokens=2) == []  # no prompts: no work, no error
    with pytest.raises(GenerationError, match="prompt 0: token id True is invalid"):
        generate(model, tok, [True, 995], max_new_tokens=2)  # one prompt of ids, not two prompts


def test_prompt_token_bounds_are_exact(tok, caplog):
    # a text whose last token is the model's first missing id is refused; a prompt of exactly
    # n_ctx tokens is kept whole, without a warning
    small_vocab = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=16, vocab_size=300))
    with pytest.raises(GenerationError, match="prompt 0: its text encodes to token id 300"):
        generate(small_vocab, tok, tok.decode([299, 300]), max_new_tokens=2)
    assert generate(small_vocab, tok, tok.decode([299]), max_new_tokens=1)[0].prompt_token_ids == [299]
    ids = list(range(100, 116))
    with caplog.at_level(logging.WARNING, logger="gpt2kit.generate"):
        out = generate(small_vocab, tok, [ids], max_new_tokens=2, do_sample=False)[0]
    assert out.prompt_token_ids == ids and "longer than the context" not in caplog.text


def test_end_of_text_releases_held_text_and_reports_its_logprob(tok):
    m = eot_model(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=64), tok.eot_token)
    # a character's first byte first (biased), then <|endoftext|> (the penalty took the bias back):
    # the unfinished character held back comes out as the sample ends
    lead = tok.mergeable_ranks[b"\xe2"]
    c = generate(m, tok, "Hello", max_new_tokens=5, do_sample=False, logit_bias={lead: 150.0},
                 frequency_penalty=100.0)[0]
    assert (c.token_ids, c.text, c.finish_reason) == ([lead], "\ufffd", "stop")
    pieces = list(stream_generate(m, tok, "Hello", max_new_tokens=5, do_sample=False, logit_bias={lead: 150.0},
                                  frequency_penalty=100.0))
    assert pieces == ["\ufffd"]
    with torch.no_grad():  # a less certain <|endoftext|>: its logprob is not 0
        m.transformer.ln_f.bias.mul_(0.05)
        want = torch.log_softmax(m(torch.tensor([tok.encode("Hello")]))[0, -1].float(), -1)[tok.eot_token].item()
    events = list(iter_generate(m, tok, "Hello", max_new_tokens=5, params=GREEDY, top_logprobs=0))
    assert [(e.token_id, e.finish_reason) for e in events] == [(None, "stop")]
    assert want < -1 and events[0].logprob == pytest.approx(want, abs=1e-4)
    # stream_generate honours stop_at_eot=False as generate does
    on = "".join(stream_generate(m, tok, "Hello", max_new_tokens=3, do_sample=False, stop_at_eot=False))
    assert on == "<|endoftext|>" * 3


def test_seed_and_stream_prompt_errors(model, tok):
    for bad in (True, 2**64, -(2**63) - 1, 1.0):
        with pytest.raises(GenerationError, match=r"seed: expected an integer in \[-2\*\*63, 2\*\*64\)"):
            generate(model, tok, "x", max_new_tokens=2, seed=bad)
    for edge in (2**64 - 1, -(2**63)):  # what torch's generator takes, both ends
        a = generate(model, tok, "x", max_new_tokens=4, seed=edge)[0].token_ids
        assert a == generate(model, tok, "x", max_new_tokens=4, seed=edge)[0].token_ids
    with pytest.raises(GenerationError, match="stream_generate: expected one prompt"):
        list(stream_generate(model, tok, ["a", "b"], max_new_tokens=2))


@pytest.mark.parametrize("kernels_built", [True, False], ids=["kernels", "no-kernels"])
def test_inference_forms_of_a_padded_training_model_keep_the_logits(kernels_built, monkeypatch):
    # wte padded to 320 rows for 300 tokens: the output layer reads the first 300 only; a model
    # handed over in training mode (dropout 0.5) is evaluated, as eval mode, whatever its flag
    if not kernels_built:
        monkeypatch.setattr(gpt2kit.kernels, "_library", lambda: None)
        monkeypatch.setattr(gpt2kit.kernels, "available", lambda dtype: False)
    model = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=16, vocab_size=300, padded_vocab_multiple=64,
                              dropout=0.5)).train()
    ids = torch.tensor([[0, 299, 17, 5], [250, 1, 2, 3]])
    fast = optimize_for_cpu(model)
    with torch.no_grad():
        want = model.eval()(ids)  # (2, 4, 300)
        torch.testing.assert_close(fast(ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(ids[:1, -1:]), model(ids[:1, -1:]), atol=1e-5, rtol=1e-5)  # one row
        q = quantize_int8(model)(ids)
    assert q.shape == want.shape and (q - want).abs().max() < 0.05 * want.abs().max()


def test_a_float16_model_is_left_as_it_is(model):
    half = peaked(model.config).half()  # no fast CPU form for float16 (see load_for_inference)
    assert optimize_for_cpu(half) is half and type(half.transformer.h[0].mlp.c_fc) is gpt2kit.model.Linear


def test_load_for_inference_options_and_a_missing_tokenizer(tmp_path, tok, caplog):
    from gpt2kit.errors import GPT2KitError
    from gpt2kit.generate import load_for_inference

    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_ctx=16)).save_pretrained(str(tmp_path / "gpt2"))  # no tokenizer
    with caplog.at_level(logging.WARNING, logger="gpt2kit.generate"):
        fast, found = load_for_inference(str(tmp_path / "gpt2"))
    assert "holds no tokenizer files: using GPT-2's released vocabulary" in caplog.text
    assert found.encode("Hello world") == tok.encode("Hello world") and not fast.training
    assert type(fast.transformer.h[0].mlp.c_fc) is not gpt2kit.model.Linear  # the CPU inference form
    q, _ = load_for_inference(str(tmp_path / "gpt2"), quantize="int8")
    assert isinstance(q.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    with pytest.raises(GenerationError, match=r"dtype: expected one of float32, bfloat16, float16, got 'bf16'"):
        load_for_inference(str(tmp_path / "gpt2"), dtype="bf16")
    with pytest.raises(GenerationError, match=r"quantize: expected 'int8' \(or nothing\), got 'int4'"):
        load_for_inference(str(tmp_path / "gpt2"), quantize="int4")
    # a model with another vocabulary cannot borrow GPT-2's
    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_ctx=16, vocab_size=300)).save_pretrained(str(tmp_path / "own"))
    with pytest.raises(GPT2KitError, match="folder holds no encoder.json"):
        load_for_inference(str(tmp_path / "own"))


def test_smaller_models_inplace_forms_and_empty_token_prompts(model, tok):
    # a model with fewer tokens than its tokenizer generates (its own ids only)
    small_vocab = peaked(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=16, vocab_size=300))
    out = generate(small_vocab, tok, [[5, 299]], max_new_tokens=4, do_sample=False)[0]
    assert len(out.token_ids) == 4 and max(out.token_ids) < 300
    copy_ = peaked(model.config)
    assert optimize_for_cpu(copy_, inplace=True) is copy_  # load_for_inference's form: no second copy
    with torch.no_grad():  # a bf16 model is quantized from float32 weights
        q = quantize_int8(peaked(model.config).to(torch.bfloat16))(torch.tensor([[1, 2]]))
    assert q.dtype == torch.float32 and q.shape == (1, 2, model.config.vocab_size)
    with pytest.raises(GenerationError, match="every prompt needs 1 to n_ctx=64 tokens"):
        list(generate_tokens(model, [[1], []], GREEDY, max_new_tokens=2))


def test_no_logprobs_unless_asked(model, tok):
    c = generate(model, tok, "Hello", max_new_tokens=3, do_sample=False)[0]
    assert len(c.token_ids) == 3 and c.logprobs == [] and c.top_logprobs is None


def test_a_prompt_as_a_numpy_array_or_tensor_is_one_prompt(model, tok):
    # ids straight from a tokenizer's tensors: one such prompt was split into one prompt per id
    # and crashed ("'numpy.int64' object is not iterable"); a 2-D one is a prompt per row
    want = generate(model, tok, [15496, 995], max_new_tokens=4, temperature=0)
    for prompt in (np.array([15496, 995]), torch.tensor([15496, 995]), [np.int64(15496), np.int64(995)],
                   (15496, 995)):
        got = generate(model, tok, prompt, max_new_tokens=4, temperature=0)
        assert [c.token_ids for c in got] == [want[0].token_ids], prompt
        assert "".join(stream_generate(model, tok, prompt, max_new_tokens=4, temperature=0)) == want[0].text
    rows = generate(model, tok, torch.tensor([[15496, 995], [464, 3290]]), max_new_tokens=4, temperature=0)
    assert [c.token_ids for c in rows] == [c.token_ids for c in generate(
        model, tok, [[15496, 995], [464, 3290]], max_new_tokens=4, temperature=0)]
    for bad, message in ((np.zeros((1, 1, 1), dtype=np.int64), "got 3 dimensions"),
                         (5, "expected a string, a list of token ids or a list of them, got int"),
                         ([1.5, 2], "prompt 0: token id 1.5 is invalid")):
        with pytest.raises(GenerationError, match=message):
            generate(model, tok, bad, max_new_tokens=1)
    for bad in (torch.tensor([[1, 2]]), [[1, 2]], torch.tensor(5)):
        with pytest.raises(GenerationError, match="stream_generate: expected one prompt"):
            list(stream_generate(model, tok, bad, max_new_tokens=1))
