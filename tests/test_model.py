"""The model against its oracle, transformers.GPT2LMHeadModel, with the same random weights."""
from __future__ import annotations

import ctypes
import dataclasses
import math

import pytest
import torch
import transformers

from gpt2kit.errors import ConfigError
import gpt2kit.model
from gpt2kit.model import (EXPLICIT_ATTENTION_MAX_T, GPT2, PRESETS, GPT2Config, KVCache, attention_mask_for,
                           causal_attention)
from gpt2kit.weights import hf_config_dict, to_hf_state_dict

torch.manual_seed(0)


def hf_twin(model: GPT2) -> transformers.GPT2LMHeadModel:
    """A transformers GPT-2 holding exactly our weights."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(model.config)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to wte
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf.eval()


def randomize_(model: GPT2, seed: int = 0) -> GPT2:
    """Every parameter random, biases and LayerNorms too (GPT-2's init has zero biases and unit
    LayerNorms, under which a misplaced bias would go unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def small(preset: str, **kw) -> GPT2Config:
    """A preset's width and heads with few layers, short context and vocabulary (fast on CPU)."""
    return GPT2Config.from_preset(preset, **{"n_layer": 2, "n_ctx": 64, "vocab_size": 503, **kw})


def left_padded_batch(vocab: int, lengths: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    ids = ids.masked_fill(mask == 0, vocab - 1)  # pad token: any id works
    return ids, mask


def hf_position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def test_presets_and_param_counts():
    # The released models' true sizes (PAPER.md, Table 2 "true count").
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                "gpt2-xl": 1_557_611_200}
    for name, n in expected.items():
        with torch.device("meta"):
            m = GPT2(PRESETS[name])
        assert m.num_params() == n == PRESETS[name].num_params()
        assert m.num_params(include_embedding=False) == n - 50257 * PRESETS[name].n_embd
    assert {"tiny", "mini", "small-cpu"} <= set(PRESETS)
    for cfg in PRESETS.values():
        with torch.device("meta"):
            m = GPT2(dataclasses.replace(cfg, padded_vocab_multiple=64))
        assert m.num_params() == cfg.num_params()
        assert m.num_params(include_embedding=False) == cfg.num_params(include_embedding=False)
    assert GPT2Config.from_preset("gpt2", n_ctx=256).n_ctx == 256
    with pytest.raises(ConfigError, match=r"unknown model preset 'gpt3'; valid presets: gpt2, gpt2-medium"):
        GPT2Config.from_preset("gpt3")
    with pytest.raises(ConfigError, match=r"unknown GPT2Config field\(s\) n_layers; valid fields:"):
        GPT2Config.from_preset("gpt2", n_layers=3)
    with pytest.raises(ConfigError, match="n_embd: 100 is not divisible by n_head=3"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match="dropout"):
        GPT2Config(dropout=1.5)
    for field, bad in (("n_head", 0), ("n_layer", 0), ("n_embd", 64.0), ("vocab_size", True)):
        with pytest.raises(ConfigError, match=rf"GPT2Config.{field}: expected a positive integer, got {bad!r}"):
            GPT2Config(**{field: bad})


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_logits_match_transformers_on_padded_batch(preset):
    cfg = small(preset, n_layer=1 if preset == "gpt2-xl" else 2)
    model = randomize_(GPT2(cfg).eval())
    hf = hf_twin(model)
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 7, 1], 12)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
        real = mask.bool()
        assert ours.shape == (3, 12, cfg.vocab_size) and ours.dtype == torch.float32
        assert (ours - theirs)[real].abs().max() <= 1e-4
        assert torch.isfinite(ours).all()  # pad positions too: no NaN leaks from all-masked rows
        # Without padding (the fused causal path) every position matches: one row of 12 tokens
        # (as decoding multiplies), and three (as prompts are, in place on CPU)
        for full in (ids[:1], ids):
            assert (model(full) - hf(full).logits).abs().max() <= 1e-4


def softmax_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
    """Attention as a plain softmax, which gives NaN for a query that may see no key (as CUDA's
    SDPA kernels and older CPU ones do; torch's CPU SDPA now returns zeros there instead)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_loss_is_transformers_labels_loss():
    model = randomize_(GPT2(small("gpt2")).eval())
    hf = hf_twin(model)
    ids, mask = left_padded_batch(503, [12, 7, 3], 12)
    # the padding and each row's first real token (scored from a pad position) are left out
    labels = ids.masked_fill((mask == 0) | (mask.cumsum(-1) == 1), -100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=hf_position_ids(mask), labels=labels).loss
        assert model.loss(ids, attention_mask=mask) == pytest.approx(ref.item(), abs=1e-5)  # padding left out
        assert model.loss(ids, labels, attention_mask=mask) == pytest.approx(ref.item(), abs=1e-5)
        assert model.loss(ids[:1]) == pytest.approx(hf(ids[:1], labels=ids[:1]).loss.item(), abs=1e-5)
    with pytest.raises(ValueError, match=r"labels has shape \(3, 11\), expected input_ids' \(3, 12\)"):
        model.loss(ids, labels[:, 1:])


def test_pad_queries_see_a_key_so_no_nan_reaches_real_tokens(monkeypatch):
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    for past, T in ((0, 5), (2, 3), (4, 1)):
        allowed, _ = attention_mask_for(mask, past, T, torch.device("cpu"))
        assert allowed.shape == (3, 1, T, 5) and allowed.any(-1).all()
    # where a fully masked query gives NaN, it would spread through its value vector into real rows
    cfg = small("gpt2")
    model = randomize_(GPT2(cfg).eval())
    hf = hf_twin(model)
    ids, mask = left_padded_batch(cfg.vocab_size, [12, 7, 1], 12)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", softmax_attention)
        ours = model(ids, attention_mask=mask)
    assert torch.isfinite(ours).all()
    assert (ours - theirs)[mask.bool()].abs().max() <= 1e-4


def test_a_hook_keeps_what_it_saw_though_blocks_add_in_place():
    # 2 x 20 rows: fp32 CPU inference adds each block into the residual stream in place, which
    # must not be the tensor a hook on the embedding dropout kept
    model = randomize_(GPT2(small("gpt2")).eval())
    kept = []
    model.transformer.drop.register_forward_hook(lambda module, args, out: kept.append(out))
    ids = torch.randint(0, 503, (2, 20))
    with torch.no_grad():
        out = model(ids)
        embeddings = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(20))
    torch.testing.assert_close(kept[0], embeddings, rtol=0, atol=0)
    assert (out - hf_twin(model)(ids).logits).abs().max() <= 1e-4


def test_hidden_states_then_lm_head_is_forward():
    model = GPT2(small("gpt2")).eval()
    ids, mask = left_padded_batch(503, [5, 9], 9)
    with torch.no_grad():
        h = model.hidden_states(ids, attention_mask=mask)
        assert h.shape == (2, 9, 768)
        torch.testing.assert_close(model.lm_head(h), model(ids, attention_mask=mask), rtol=0, atol=0)


def test_cached_decoding_matches_full_forward_and_transformers():
    cfg = small("gpt2")
    model = GPT2(cfg).eval()
    hf = hf_twin(model)
    prompt, prompt_mask = left_padded_batch(cfg.vocab_size, [6, 3, 1], 6)
    new = torch.randint(0, cfg.vocab_size, (3, 7))
    ids = torch.cat([prompt, new], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(new)], 1)
    real = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(3, max_len=20)
        assert isinstance(cache, KVCache) and cache.length == 0
        steps = [model(prompt, attention_mask=prompt_mask, kv_cache=cache)]
        # Two tokens at once (a causal block over the cache), then one at a time.
        steps.append(model(new[:, :2], attention_mask=mask[:, :8], kv_cache=cache))
        for t in range(2, 7):
            steps.append(model(new[:, t:t + 1], attention_mask=mask[:, :7 + t], kv_cache=cache))
        assert cache.length == 13
        cached = torch.cat(steps, 1)
        assert (cached - full)[real].abs().max() <= 1e-5
        theirs = hf(ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
        assert (cached - theirs)[real].abs().max() <= 1e-4


def test_bf16_cached_decoding_matches_bf16_full_forward():
    cfg = small("gpt2")
    model = GPT2(cfg).eval().to(torch.bfloat16)
    prompt, prompt_mask = left_padded_batch(cfg.vocab_size, [5, 2], 5)
    new = torch.randint(0, cfg.vocab_size, (2, 4))
    ids, mask = torch.cat([prompt, new], 1), torch.cat([prompt_mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).float()
        cache = model.new_kv_cache(2, max_len=16)
        assert cache.k.dtype == torch.float32  # on CPU (see new_kv_cache); logits stay bf16
        assert model.new_kv_cache(2, dtype=torch.bfloat16).k.dtype == torch.bfloat16
        steps = [model(prompt, attention_mask=prompt_mask, kv_cache=cache)]
        steps += [model(new[:, t:t + 1], attention_mask=mask[:, :6 + t], kv_cache=cache) for t in range(4)]
    assert steps[-1].dtype == torch.bfloat16
    cached = torch.cat(steps, 1).float()
    scale = full[mask.bool()].abs().max()
    assert (cached - full)[mask.bool()].abs().max() <= 0.02 * scale  # bf16 rounding, not a bug


def test_training_attention_matches_sdpa(monkeypatch):
    # causal_attention (bf16 training on CPU) against SDPA: values and gradients in fp32, and the
    # model in train mode under bf16 autocast (which takes it) against eval mode (SDPA)
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 3, 4, 40, 16).unbind(0))
    ours = causal_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model = GPT2(small("gpt2", vocab_size=300, n_ctx=EXPLICIT_ATTENTION_MAX_T + 1))
    x = torch.randint(0, 300, (3, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_h = model.train().hidden_states(x)
        eval_h = model.eval().hidden_states(x)
    full = model.hidden_states(x)
    assert (train_h - eval_h).abs().max() < 0.05  # bf16 rounding apart
    assert (train_h - full).abs().max() > 1e-4  # (autocast did compute in bf16)
    # fp32 training of short sequences takes it too where gpt2kit's training kernel does not run
    # (no compiler, no AVX-512): the same values as SDPA (eval mode)
    monkeypatch.setattr(gpt2kit.kernels, "training_attention_applies", lambda *a: False)
    monkeypatch.setattr(gpt2kit.kernels, "training_attention_folds_bias", lambda *a: False)
    calls = []
    monkeypatch.setattr(gpt2kit.model, "causal_attention", lambda *a: calls.append(a[0].shape) or causal_attention(*a))
    for T in (EXPLICIT_ATTENTION_MAX_T, EXPLICIT_ATTENTION_MAX_T + 1):
        x = torch.randint(0, 300, (2, T))
        torch.testing.assert_close(model.train().hidden_states(x), model.eval().hidden_states(x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # without gradients to compute: SDPA (not counted below)
            model.train().hidden_states(x)
    assert [s[2] for s in calls] == [EXPLICIT_ATTENTION_MAX_T] * model.config.n_layer  # longer: SDPA


def test_cache_without_padding_and_its_limits():
    model = GPT2(small("gpt2", n_ctx=16)).eval()
    ids = torch.randint(0, 503, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2)
        assert cache.max_len == 16 and cache.k.dtype == torch.float32
        out = torch.cat([model(ids[:, :4], kv_cache=cache), model(ids[:, 4:7], kv_cache=cache),
                         *(model(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 10))], 1)
        torch.testing.assert_close(out, full, rtol=0, atol=1e-5)
        cache.crop(7)  # roll back three tokens and redo them
        torch.testing.assert_close(model(ids[:, 7:], kv_cache=cache), full[:, 7:], rtol=0, atol=1e-5)
        cache.crop(cache.length)  # every drafted token accepted: nothing to forget
        assert cache.length == 10
        with pytest.raises(ValueError, match=r"KVCache.crop: length must be in \[0, 10\], got 11"):
            cache.crop(11)
        beams = model.new_kv_cache(2)
        model(ids[:, :5], kv_cache=beams)
        beams.reorder(torch.tensor([1, 1]))  # both rows continue row 1
        step = model(ids[1:, 5:6].expand(2, 1), kv_cache=beams)
        torch.testing.assert_close(step[:, 0], full[1, 5].expand(2, -1), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"kv_cache is full: 10 \+ 7 tokens exceed its max_len=16"):
            model(ids[:, :7], kv_cache=cache)
        with pytest.raises(ValueError, match="exceeds the model's context n_ctx=16"):
            model(torch.zeros(1, 17, dtype=torch.long))
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), expected"):
            model(ids, attention_mask=torch.ones(2, 3))
        with pytest.raises(ValueError, match="kv_cache holds torch.float16: expected the model's dtype"):
            model(ids[:, :1], kv_cache=model.new_kv_cache(2, dtype=torch.float16))
        with pytest.raises(ValueError, match="kv_cache holds 2 rows but input_ids has 1"):
            model(ids[:1, :1], kv_cache=model.new_kv_cache(2))


def test_padded_vocabulary_never_changes_outputs():
    cfg = small("gpt2", vocab_size=50257)
    padded_cfg = GPT2Config.from_preset("gpt2", **{**vars(cfg), "padded_vocab_multiple": 64})
    plain, padded = GPT2(cfg).eval(), GPT2(padded_cfg).eval()
    assert padded.transformer.wte.weight.shape[0] == 50304 and padded.lm_head.weight is padded.transformer.wte.weight
    with torch.no_grad():
        sd = {k: v for k, v in plain.state_dict().items()}
        wte = padded.transformer.wte.weight
        wte.normal_()  # the padding rows hold anything at all
        wte[:50257] = sd.pop("transformer.wte.weight")
        sd.pop("lm_head.weight")
        padded.load_state_dict(sd, strict=False)
        ids, mask = left_padded_batch(50257, [4, 2], 4)
        a, b = plain(ids, attention_mask=mask), padded(ids, attention_mask=mask)
    assert b.shape == a.shape == (2, 4, 50257) and b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert padded.num_params() == plain.num_params()


def test_init_scales_residual_projections():
    model = GPT2(GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, n_ctx=32))
    h0 = model.transformer.h[0]
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(h0.attn.c_attn.weight.std().item() - 0.02) < 1e-3
    for w in (h0.attn.c_proj.weight, h0.mlp.c_proj.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert h0.attn.c_attn.bias.abs().max() == 0 and h0.ln_1.weight.eq(1).all()
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                         "transformer.h.0.ln_1.bias"]
    assert "transformer.h.7.mlp.c_fc.weight" in names and "transformer.ln_f.bias" in names
    assert "lm_head.weight" in model.state_dict()


def test_dropout_only_in_training():
    model = GPT2(small("gpt2", dropout=0.5))
    ids = torch.randint(0, 503, (2, 8))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids), model(ids))
        # the embeddings reach the first block with dropout applied (about half of them zeroed)
        seen = []
        hook = model.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        model(ids)
        hook.remove()
        assert 0.3 < (seen[0] == 0).float().mean() < 0.7
        model.eval()
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)
        # eval mode with padding and with a KV cache (released configs carry dropout 0.1)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, :3] = 0
        torch.testing.assert_close(model(ids, attention_mask=mask), model(ids, attention_mask=mask), rtol=0, atol=0)
        cache = model.new_kv_cache(2)
        steps = torch.cat([model(ids[:, :4], kv_cache=cache), *(model(ids[:, t:t + 1], kv_cache=cache)
                                                                for t in range(4, 8))], 1)
        torch.testing.assert_close(steps, model(ids), rtol=0, atol=1e-5)


@pytest.fixture
def gemm_choice(monkeypatch):
    """Lets a test set GPT2KIT_GEMM and the CPU's maker; the real choice is back afterwards."""
    from gpt2kit import kernels

    kernels.gemm.cache_clear()
    yield kernels
    monkeypatch.undo()
    kernels.gemm.cache_clear()


@pytest.mark.parametrize("env,vendor,openblas,want", [
    (None, "GenuineIntel", True, "mkl"), (None, "AuthenticAMD", True, "openblas"),
    (None, "AuthenticAMD", False, "onednn"), (None, "HygonGenuine", True, "openblas"), (None, "", True, "mkl"),
    ("auto", "AuthenticAMD", True, "openblas"), ("mkl", "AuthenticAMD", True, "mkl"),
    ("onednn", "GenuineIntel", True, "onednn"), (" OneDNN ", "", True, "onednn"),
    ("openblas", "GenuineIntel", True, "openblas"), ("openblas", "GenuineIntel", False, "onednn"),
    ("", "AuthenticAMD", True, "openblas"), ("blas", "AuthenticAMD", True, "openblas"),
    ("blas", "GenuineIntel", True, "mkl")])
def test_the_gemm_for_fp32_prompts_is_chosen_by_the_cpus_maker_or_gpt2kit_gemm(gemm_choice, monkeypatch, caplog,
                                                                               env, vendor, openblas, want):
    # MKL runs its fast kernels on Intel CPUs only: elsewhere OpenBLAS's GEMM (or oneDNN's) multiplies prompts
    if env is None:
        monkeypatch.delenv("GPT2KIT_GEMM", raising=False)
    else:
        monkeypatch.setenv("GPT2KIT_GEMM", env)
    monkeypatch.setattr(gemm_choice, "_cpu_vendor", lambda: vendor)
    if not openblas:
        monkeypatch.setattr(gemm_choice, "_loaded_openblas", lambda: [])
        gemm_choice._openblas.cache_clear()
    elif want == "openblas" and not (gemm_choice.available(torch.float32) and gemm_choice._openblas()):
        want = "onednn"  # (where the kernels don't build or numpy has another BLAS: oneDNN's, as asked for below)
    try:
        with caplog.at_level("WARNING", logger="gpt2kit.kernels"):
            assert gemm_choice.gemm() == want
    finally:
        gemm_choice._openblas.cache_clear()
    assert ("GPT2KIT_GEMM=blas: expected one of auto, mkl, onednn, openblas; using auto" in caplog.text) == (
        env == "blas")
    assert ("GPT2KIT_GEMM=openblas: " in caplog.text) == (env == "openblas" and want == "onednn")


def test_numpys_openblas_is_found_and_its_threads_are_given_back(gemm_choice):
    import numpy

    kernels = gemm_choice
    config = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if "openblas" not in config["name"].lower():  # a numpy on another BLAS (MKL, Accelerate): none to find
        assert kernels._openblas() is None or kernels._loaded_openblas()
        return
    assert kernels._loaded_openblas() and kernels._openblas() is not None
    if not kernels.available(torch.float32):
        return
    _, set_threads, get_threads, _ = kernels._openblas()
    getter, setter = ctypes.CFUNCTYPE(ctypes.c_int)(get_threads), ctypes.CFUNCTYPE(None, ctypes.c_int)(set_threads)
    before = getter()
    try:
        setter(3)
        x, w = torch.randn(300, 40), torch.randn(50, 40)
        out = torch.zeros(300, 50)
        kernels._openblas_product(x, w, out, 0.0)  # set to 1 for the call, put back after
        torch.testing.assert_close(out, x @ w.t(), atol=1e-5, rtol=1e-5)
        assert getter() == 3
    finally:
        setter(before)


@pytest.fixture
def openblas_gemm(gemm_choice, monkeypatch):
    """kernels, with GPT2KIT_GEMM=openblas in force (a machine without it cannot run these tests)."""
    monkeypatch.setenv("GPT2KIT_GEMM", "openblas")
    if not (gemm_choice.available(torch.float32) and gemm_choice._openblas()):
        pytest.skip("no OpenBLAS or no kernels here")
    assert gemm_choice.gemm() == "openblas"
    return gemm_choice


def test_training_products_through_openblas_equal_f_linears_and_their_gradients(openblas_gemm, monkeypatch):
    """With gemm() OpenBLAS, `linear` under autograd runs `_BLASLinear`: its output and its three
    gradients (x, weight, bias) equal F.linear's up to rounding, for strided, expanded and 3-D
    inputs, with and without a bias, and under create_graph (differentiable backward)."""
    kernels = openblas_gemm
    F = torch.nn.functional
    g = torch.Generator().manual_seed(1)
    w0, b0 = torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    x0 = torch.randn(3, 70, 48, generator=g)
    for inp in (x0, x0[:, ::2], x0.transpose(0, 1), x0[0, :1].expand(30, 48)):
        for with_bias in (True, False):
            for needs in ((True, True, True), (False, True, True), (True, False, False)):
                x, w, b = inp.clone().requires_grad_(needs[0]), w0.clone().requires_grad_(needs[1]), b0.clone()
                b = b.requires_grad_(needs[2]) if with_bias else None
                assert kernels.training_gemm_applies(x, w, b)
                y, want = kernels.linear(x, w, b), F.linear(x, w, b)
                assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_BLASLinearBackward"
                torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
                gy = torch.randn(y.shape, generator=g)
                inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
                for got, ref in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(want, inputs, gy)):
                    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    # gradient of a sum: an expanded (stride 0) output gradient
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    got = torch.autograd.grad(kernels.linear(x, w, b0).sum(), [x, w])
    for a, ref in zip(got, torch.autograd.grad(F.linear(x, w, b0).sum(), [x, w])):
        torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-5)
    # second derivatives through the differentiable backward
    x, w = x0[0, :20].clone().requires_grad_(), w0.clone().requires_grad_()
    second = []
    for fn in (kernels.linear, F.linear):
        (gx,) = torch.autograd.grad((fn(x, w) ** 2).sum(), [x], create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), [w])[0])
    torch.testing.assert_close(second[0], second[1], rtol=1e-4, atol=1e-6 * float(second[1].abs().max()))  # ~2e5
    # not for: few rows, autocast, a choice other than OpenBLAS
    assert not kernels.training_gemm_applies(x0[0, :kernels.MAX_ROWS].requires_grad_(), w0, b0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.training_gemm_applies(x0.requires_grad_(), w0, b0)
    assert not kernels.training_gemm_applies(x0.detach(), w0, b0)  # nothing needs a gradient
    monkeypatch.setenv("GPT2KIT_GEMM", "mkl")
    kernels.gemm.cache_clear()
    assert not kernels.training_gemm_applies(x0.detach().requires_grad_(), w0, b0)


def test_a_32_bit_openblas_never_gets_sizes_past_its_integers(openblas_gemm, monkeypatch):
    """A size or leading dimension over 2^31 - 1 would wrap around in a 32-bit (LP64) OpenBLAS:
    such products go to torch.addmm (shown with the limit lowered; the real one needs 8 GiB)."""
    kernels = openblas_gemm
    sgemm, set_threads, get_threads, _ = kernels._openblas()
    monkeypatch.setattr(kernels, "_openblas", lambda: (sgemm, set_threads, get_threads, False))
    monkeypatch.setattr(kernels, "_LP64_MAX", 63)

    class NoBLAS:
        def gpt2kit_sgemm_f32(self, *args):
            raise AssertionError("OpenBLAS called with a size past its integers")

    real = kernels._library()
    monkeypatch.setattr(kernels, "_library", lambda: NoBLAS())
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(70, 64, generator=g), torch.randn(48, 64, generator=g)
    out = torch.full((70, 48), float("nan"))
    kernels._openblas_mm(a, b, out, trans_b=True, beta=0.0)  # k = 64 > 63
    torch.testing.assert_close(out, a @ b.t(), atol=1e-5, rtol=1e-5)
    acc = torch.ones(40, 48)
    kernels._openblas_mm(a[:60, :40], a[:60, :48], acc, trans_a=True, alpha=2.0, beta=1.0)  # sizes <= 63, ld 64
    torch.testing.assert_close(acc, 1 + 2 * a[:60, :40].t() @ a[:60, :48], atol=1e-4, rtol=1e-5)

    calls = []

    class Spy:
        def gpt2kit_sgemm_f32(self, *args):
            calls.append(args)
            return real.gpt2kit_sgemm_f32(*args)

    monkeypatch.setattr(kernels, "_library", lambda: Spy())  # every size and ld <= 63: OpenBLAS, same result
    small, x, w = torch.empty(20, 30), a[:20, :50].contiguous(), b[:30, :50].t().contiguous()
    kernels._openblas_mm(x, w, small)
    assert len(calls) == 1
    torch.testing.assert_close(small, x @ w, atol=1e-5, rtol=1e-5)


def test_openblas_products_survive_odd_inputs_threads_and_in_place_use(openblas_gemm):
    """The edges of the OpenBLAS path: a one-row weight whose row stride PyTorch leaves at 1, a
    float64 default dtype, an output changed in place before backward (as after F.linear),
    mismatched shapes (torch's error, nothing written), the version counter of an in-place sum,
    and OpenBLAS's process-wide thread count put back after calls from several Python threads."""
    import threading

    kernels = openblas_gemm
    F = torch.nn.functional
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 64, generator=g)
    w1 = torch.randn(64, 1, generator=g).t()  # (1, 64), strides (1, 1): "contiguous" to PyTorch
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w1), F.linear(x, w1), atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_()
    y = kernels.linear(xg, w1)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), xg)[0], w1.expand(100, 64))

    w, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        xg = x.clone().requires_grad_()
        y = kernels.linear(xg, w, b)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        y.sum().backward()
        torch.testing.assert_close(xg.grad, w.sum(0).expand(100, 64), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_default_dtype(before)

    wg = w.clone().requires_grad_()
    y = kernels.linear(x.view(4, 25, 64), wg, b)
    assert y.grad_fn is not None and not y._is_view()
    y.mul_(2)  # allowed after F.linear too
    y.sum().backward()
    torch.testing.assert_close(wg.grad, 2 * x.sum(0).expand(32, 64), atol=1e-4, rtol=1e-5)

    buf = torch.zeros(40, 32)
    with pytest.raises(ValueError, match=r"addmm_: op\(a\) \(40, 64\) times op\(b\) \(64, 32\) does not fit out \(20, 32\)"):
        kernels.addmm_(buf[:20], torch.randn(40, 64), w, trans_b=True)
    with pytest.raises(RuntimeError):
        kernels.linear_add_(buf[:20], torch.randn(40, 64), w)
    assert not buf.any()  # nothing written past the view
    out = torch.zeros(40, 32)
    version = out._version
    kernels.linear_add_(out, torch.randn(40, 64), w)
    kernels.addmm_(out, torch.randn(40, 64), w, trans_b=True)
    assert out._version == version + 2

    _, set_threads, get_threads, _ = kernels._openblas()
    getter, setter = ctypes.CFUNCTYPE(ctypes.c_int)(get_threads), ctypes.CFUNCTYPE(None, ctypes.c_int)(set_threads)
    saved = getter()
    setter(3)
    try:
        a, bm, errors = torch.randn(300, 64), torch.randn(64, 48), []

        def work():
            try:
                for _ in range(20):
                    got = kernels.addmm_(torch.empty(300, 48), a, bm, beta=0)
                    torch.testing.assert_close(got, a @ bm, atol=1e-4, rtol=1e-5)
            except AssertionError as e:  # (reported from the main thread)
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and getter() == 3
    finally:
        setter(saved)


def test_addmm_equals_torchs_with_any_gemm(gemm_choice, monkeypatch):
    kernels = gemm_choice
    g = torch.Generator().manual_seed(2)
    for choice in ("openblas", "mkl"):
        monkeypatch.setenv("GPT2KIT_GEMM", choice)
        kernels.gemm.cache_clear()
        for ta, tb in ((False, False), (True, False), (False, True), (True, True)):
            a = torch.randn(*((50, 200) if ta else (200, 50)), generator=g)
            b = torch.randn(*((30, 50) if tb else (50, 30)), generator=g)
            out = torch.randn(200, 34, generator=g)[:, 2:32]  # rows 34 floats apart
            for alpha, beta in ((1.0, 0.0), (0.5, 1.0), (2.0, 0.25)):
                want = beta * out + alpha * ((a.t() if ta else a) @ (b.t() if tb else b))
                if beta == 0:
                    out.fill_(float("nan"))  # beta 0 ignores out, NaNs included
                got = kernels.addmm_(out, a, b, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta)
                assert got.data_ptr() == out.data_ptr()
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_each_openblas_build_numpy_and_scipy_load_multiplies_right(gemm_choice, monkeypatch):
    """numpy's OpenBLAS takes 64-bit sizes, scipy's 32-bit ones: both through `csrc/gemm.cpp`,
    rows split (300 rows) and columns split (20 rows, 70 columns: not a multiple of 16)."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)

    kernels = gemm_choice
    if not kernels.available(torch.float32):
        pytest.skip("the kernels are not built here")
    libraries = kernels._loaded_openblas()
    found = []
    for path in libraries:
        monkeypatch.setattr(kernels, "_loaded_openblas", lambda path=path: [path])
        kernels._openblas.cache_clear()
        if kernels._openblas() is None:
            continue
        found.append(kernels._openblas()[3])
        g = torch.Generator().manual_seed(len(found))
        for rows, cols in ((300, 50), (20, 70)):
            x = torch.randn(rows, 43, generator=g)[:, 3:]  # rows 43 floats apart
            w, out = torch.randn(cols, 40, generator=g), torch.randn(rows, cols + 5, generator=g)[:, :cols]
            want = out + x @ w.t()
            kernels._openblas_product(x, w, out, 1.0)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    kernels._openblas.cache_clear()
    import numpy

    if "openblas" in numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"].lower():
        assert True in found  # numpy >= 2's wheel: ILP64
    scipy_blas = [p for p in libraries if "scipy.libs" in p]
    assert not scipy_blas or False in found  # scipy's wheel: LP64


def test_the_openblas_library_is_read_from_the_process_maps(tmp_path, monkeypatch):
    from gpt2kit import kernels

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/libc.so.6\n"
                    "7f02-7f03 r-xp 00000000 08:01 13 /x/numpy.libs/libscipy_openblas64_-32a4b2a6.so\n"
                    "7f03-7f04 r--p 00001000 08:01 13 /x/numpy.libs/libscipy_openblas64_-32a4b2a6.so\n"
                    "7f05-7f06 rw-p 00000000 00:00 0 \n7f07-7f08 r-xp 00000000 08:01 14 /a b/libopenblasp-r0.so.0\n")
    assert kernels._loaded_openblas(str(maps)) == ["/x/numpy.libs/libscipy_openblas64_-32a4b2a6.so",
                                                   "/a b/libopenblasp-r0.so.0"]
    assert kernels._loaded_openblas(str(tmp_path / "missing")) == []


def test_the_cpus_maker_is_read_from_cpuinfo(tmp_path):
    from gpt2kit import kernels

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\n\nprocessor\t: 1\n"
                    "vendor_id\t: AuthenticAMD\n")
    assert kernels._cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\nmodel name\t: some ARM core\n")
    assert kernels._cpu_vendor(str(info)) == ""
    assert kernels._cpu_vendor(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("gemm", ["onednn", "openblas"])
def test_prompt_gemm_products_equal_f_linear_and_apply_to_fp32_prompts_only(gemm_choice, monkeypatch, gemm):
    kernels = gemm_choice
    monkeypatch.setenv("GPT2KIT_GEMM", gemm)
    if gemm == "openblas" and not (kernels.available(torch.float32) and kernels._openblas()):
        gemm = "onednn"  # its fallback, checked as such
    assert kernels.gemm() == gemm
    calls = []
    if gemm == "onednn":
        real = torch.ops.mkldnn._linear_pointwise
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or real(*a))
    else:
        real = kernels._openblas_product
        monkeypatch.setattr(kernels, "_openblas_product", lambda *a: calls.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    x = torch.randn(3, 70, 48, generator=g)  # 210 rows: split by rows (OpenBLAS); 35 rows below: by columns
    for inp in (x, x[:, ::2], x[1], x.transpose(0, 1), x[0, :35]):  # 3-D, strided, 2-D, non-contiguous, short
        for bias in (b, None):
            torch.testing.assert_close(kernels.linear(inp, w, bias), torch.nn.functional.linear(inp, w, bias),
                                       atol=1e-5, rtol=1e-5)
    assert len(calls) == 10
    out = torch.randn(210, 40, generator=g)
    torch.testing.assert_close(kernels.linear_add_(out.clone(), x.reshape(210, 48), w),
                               out.addmm(x.reshape(210, 48), w.t()), atol=1e-5, rtol=1e-5)
    assert len(calls) == (11 if gemm == "openblas" else 10)  # (oneDNN has no in-place sum: addmm_)
    small = torch.randn(kernels.MAX_ROWS, 48, generator=g)  # decoding's rows: not a prompt
    cases = {"few rows": (small, w, b), "bf16": (x.bfloat16(), w.bfloat16(), b.bfloat16()),
             "a strided weight": (x, torch.randn(48, 40).t(), b), "float64": (x.double(), w.double(), b.double()),
             "a 2-D bias": (x, w, b[None])}
    for what, (xi, wi, bi) in cases.items():
        assert not kernels.prompt_gemm_applies(xi, wi, bi), what
        assert torch.equal(kernels.linear(xi, wi, bi), torch.nn.functional.linear(xi, wi, bi)), what
    assert not kernels.prompt_gemm_applies(x.requires_grad_(), w, b)  # training: see the next test
    x.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.prompt_gemm_applies(x, w, b)
    assert kernels.prompt_gemm_applies(x, w, b) and len(calls) == (11 if gemm == "openblas" else 10)
    with torch.no_grad():  # a Parameter needs a gradient only where autograd records
        assert kernels.prompt_gemm_applies(x, torch.nn.Parameter(w), b)
    monkeypatch.setenv("GPT2KIT_GEMM", "mkl")
    kernels.gemm.cache_clear()
    assert not kernels.prompt_gemm_applies(x, w, b)


@pytest.mark.parametrize("gemm", ["onednn", "mkl", "openblas"])
def test_the_model_and_its_inference_form_give_transformers_logits_with_any_gemm(gemm_choice, monkeypatch, gemm):
    from gpt2kit.generate import optimize_for_cpu

    monkeypatch.setenv("GPT2KIT_GEMM", gemm)
    model = randomize_(GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=1, n_ctx=1024, vocab_size=50257,
                                       padded_vocab_multiple=64)).eval())
    hf = hf_twin(model)
    chosen = gemm_choice.gemm()  # (openblas: oneDNN's where the kernels don't build or numpy has no OpenBLAS)
    assert chosen == gemm or (gemm == "openblas" and chosen == "onednn")
    fast = optimize_for_cpu(model)
    head = fast.lm_head
    if gemm_choice.available(torch.float32):  # (without the kernels: stored input-major, MKL's products)
        assert (head.mkl is None) == (chosen != "mkl" or not gemm_choice.mkl_packing_works())
        assert (head.packed is not None) == (chosen == "onednn")  # oneDNN's packed copy of the output layer
    else:
        assert type(head).__name__ == "_InputMajorHead"
    products = []
    real = gemm_choice._openblas_product
    monkeypatch.setattr(gemm_choice, "_openblas_product", lambda *a: products.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 50257, (2, 300))
    with torch.no_grad():
        want = hf(ids).logits
        for ours in (model(ids), fast(ids), model(ids[:, :5]), fast(ids[:1, :1])):
            torch.testing.assert_close(ours, want[: ours.shape[0], : ours.shape[1]], atol=1e-4, rtol=0)
    # OpenBLAS: every product of the 600-row prompt (4 a layer, in place or not, and the output layer's)
    # in both forms, none of the 10-row or 1-row ones (decoding's matvec or F.linear)
    assert len(products) == (2 * (4 * 2 + 1) if chosen == "openblas" else 0)
    model.train()
    model(ids[:, :40]).logsumexp(-1).mean().backward()  # training: F.linear, differentiable
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("padded", [False, True])
def test_a_prompt_output_layer_by_blocks_matches_transformers(monkeypatch, padded):
    # fp32 CPU inference on 512-3072 rows: the 50257-wide output layer is multiplied block by block
    # into the columns of the logits (kernels.logits_by_blocks); the logits stay transformers'
    from gpt2kit import kernels

    calls = []
    blocks = kernels.logits_by_blocks
    monkeypatch.setattr(kernels, "logits_by_blocks", lambda *a: calls.append(a[0].shape) or blocks(*a))
    monkeypatch.setattr(kernels, "gemm", lambda: "mkl")  # MKL's products, as on an Intel CPU
    config = GPT2Config(n_layer=1, n_embd=32, n_head=1, n_ctx=1024, vocab_size=50257,
                        padded_vocab_multiple=64 if padded else 1)
    model = randomize_(GPT2(config).eval())
    hf = hf_twin(model)
    for shape in ((1, 600), (3, 200), (1, 100)):  # the last: too few rows, one product
        ids = torch.randint(0, 50257, shape)
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
            assert ours.shape == (*shape, 50257)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
            # the same numbers as the one product (up to the order MKL sums in)
            h = model.hidden_states(ids)
            torch.testing.assert_close(ours, torch.nn.functional.linear(h, model.lm_head.weight)[..., :50257],
                                       atol=1e-6, rtol=1e-6)
    assert [tuple(s[:-1]) for s in calls] == [(1, 600), (3, 200)]
    with torch.enable_grad():  # training: the one product, differentiable
        model(torch.randint(0, 50257, (1, 600))).sum().backward()
    assert len(calls) == 2 and model.transformer.wte.weight.grad is not None
