"""gpt2kit's CPU matrix-vector kernel against PyTorch, and the fallbacks when it cannot be built."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import kernels
from gpt2kit.generate import _CPULinear, _InputMajorLinear, _packing_works, optimize_for_cpu
from gpt2kit.model import GPT2, GPT2Config

CAN_BUILD = (shutil.which("g++") is not None
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX"))


def test_kernels_build_wherever_they_can():
    # CI and the development machines have g++ and AVX-512 or AVX2: a broken build must fail here,
    # not silently fall back to the slow path.
    assert kernels.available(torch.float32) == CAN_BUILD
    assert kernels.available(torch.bfloat16) == CAN_BUILD  # widened to fp32 where the CPU has no bf16 unit
    assert not kernels.available(torch.float16)
    assert kernels.native_bf16() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _bf16_kernels() -> list[str]:
    """The bf16 variants this CPU can run: the widening one everywhere, VDPBF16PS where native."""
    return ["widened", "native"] if kernels.native_bf16() else ["widened"]


@pytest.mark.parametrize("M,K,N", [(1, 768, 2304), (3, 100, 37), (4, 33, 5), (5, 3072, 9), (16, 64, 130), (1, 7, 1)])
def test_matvec_equals_linear(M, K, N, monkeypatch):
    if not CAN_BUILD:
        assert not kernels.available(torch.float32)
        return
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    exact = F.linear(x.double(), w.double(), b.double())
    for bias in (b, None):
        got = kernels.matvec(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        want = exact if bias is not None else exact - b.double()
        assert (got.double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())  # fp32 summation order only
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    exact = F.linear(xb.double(), wb.double(), bb.double())
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    torch_err = (F.linear(xb, wb, bb).double() - exact).abs().max()
    for variant in _bf16_kernels():
        monkeypatch.setattr(kernels, "native_bf16", lambda: variant == "native")
        got = kernels.matvec(xb, wb, bb)
        # the fp32 sum of the bf16 products, rounded once to bf16: at most half a bf16 ulp off
        # (plus fp32 summation error), exactly what torch's own bf16 linear achieves
        assert got.dtype == torch.bfloat16 and ((got.double() - exact).abs() <= 0.5 * ulp + 1e-4).all(), variant
        assert (got.double() - exact).abs().max() <= torch_err + 1e-4, variant


def test_matvec_is_deterministic_across_thread_counts_and_rejects_bad_input():
    if not CAN_BUILD:
        return
    x, w = torch.randn(2, 300), torch.randn(1001, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.matvec(x, w)
        torch.set_num_threads(2)
        assert torch.equal(kernels.matvec(x, w), one)  # each output row is summed by one thread
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match=r"M<=16"):
        kernels.matvec(torch.randn(17, 300), w)
    with pytest.raises(ValueError, match="of one dtype"):
        kernels.matvec(x.bfloat16(), w)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \(1001,\)"):
        kernels.matvec(x, w, torch.randn(3))
    with pytest.raises(ValueError, match=r"bias must be a contiguous \(1001,\) torch.float32 CPU"):
        kernels.matvec(x, w, torch.randn(1001, device="meta"))
    with pytest.raises(ValueError, match="K>=1"):
        kernels.matvec(torch.randn(1, 0), torch.randn(5, 0))
    with pytest.raises(ValueError, match="of one dtype"):
        kernels.matvec(x, w.to("meta"))
    with pytest.raises(ValueError, match="no kernel for torch.float16"):
        kernels.matvec(x.half(), w.half())


def test_cpu_linear_paths_agree_for_few_and_many_rows():
    lin = torch.nn.Linear(48, 40)
    for dtype in (torch.float32, torch.bfloat16):
        w, b = lin.weight.detach().to(dtype), lin.bias.detach().to(dtype)
        # as optimize_for_cpu builds them here: oneDNN packs bf16 weights only on CPUs with AVX-512
        # (or AVX-NE-CONVERT); without bf16 arithmetic, bf16 prompts multiply widened to fp32
        widen = kernels.bf16_on_fp32_units(dtype, "cpu")
        kinds = dict(matvec=kernels.available(dtype), packed=_packing_works(dtype) and not widen, widen=widen)
        fast = _CPULinear(w, b, **kinds)
        with_gelu = _CPULinear(w, b, **kinds, gelu=True)
        for rows in (1, 16, 17, 40):
            x = torch.randn(rows, 3, 48).to(dtype)[:, 1]  # a non-contiguous input, as a view
            tol = 1e-5 if dtype == torch.float32 else 0.05
            torch.testing.assert_close(fast(x), F.linear(x, w, b), atol=tol, rtol=tol)
            torch.testing.assert_close(with_gelu(x), F.gelu(F.linear(x, w, b), approximate="tanh"), atol=tol, rtol=tol)
        for bad in (torch.randn(1, 47).to(dtype), torch.randn(1, 48).double()):  # never into the kernel
            with pytest.raises(RuntimeError):
                fast(bad)


@pytest.mark.parametrize("block", [64, 100, 150])
def test_a_wide_mkl_packed_linear_multiplies_block_by_block(monkeypatch, block):
    # a layer much wider than _PACKED_BLOCK is packed (and multiplied) in blocks of output
    # features, each written into its columns of one output: the same numbers as one product
    if torch.backends.mkl.is_available() and sys.platform == "linux":
        assert kernels.mkl_packing_works()
    if not kernels.mkl_packing_works():  # (elsewhere the inference form never builds one)
        return
    monkeypatch.setattr(kernels, "_PACKED_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(301, 96, generator=g), torch.randn(301, generator=g)
    for bias in (None, b):
        packed = kernels.MKLPackedLinear(w, bias)
        spans = [(a, e) for a, e, _ in packed.blocks]
        assert spans[0][0] == 0 and spans[-1][1] == 301 and all(e == a2 for (_, e), (a2, _) in zip(spans, spans[1:]))
        assert len(spans) == max(1, round(301 / block))
        for rows in (64, 200):
            x = torch.randn(rows, 96, generator=g)
            assert torch.equal(packed(x), F.linear(x, w, bias))
        x = torch.randn(5, 96, generator=g)
        torch.testing.assert_close(packed(x), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        again = pickle.loads(pickle.dumps(packed))
        assert len(again.blocks) == len(spans) and torch.equal(again(x), packed(x))


def test_mkl_packed_linear_equals_f_linear():
    # torch's x86 Linux wheels link MKL: the packed product must be there, and be F.linear's, bit for bit
    if torch.backends.mkl.is_available() and sys.platform == "linux":
        assert kernels.mkl_packing_works()
    if not kernels.mkl_packing_works():
        return
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    for bias in (None, b):
        packed = kernels.MKLPackedLinear(w, bias)
        for rows in (64, 65, 300):
            x = torch.randn(rows, 96, generator=g)
            assert torch.equal(packed(x), F.linear(x, w, bias))
        for rows in (1, 5, 63):  # F.linear takes other kernels for a few rows: equal up to rounding
            x = torch.randn(rows, 96, generator=g)
            torch.testing.assert_close(packed(x), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        assert packed(torch.randn(0, 96)).shape == (0, 200)
        x = torch.randn(70, 2, 96, generator=g)[:, 0]  # a strided view
        assert torch.equal(packed(x), F.linear(x.contiguous(), w, bias))
    again = pickle.loads(pickle.dumps(packed))  # packed anew from the weight
    assert torch.equal(again(x), packed(x)) and again.blocks[0][2].data_ptr() != packed.blocks[0][2].data_ptr()
    w.add_(1.0)  # the packed copy is a copy
    assert not torch.equal(packed(x), F.linear(x, w, bias))
    for bad in (torch.randn(3, 95), torch.randn(3, 96).double(), torch.randn(96)):
        with pytest.raises(ValueError, match="MKLPackedLinear"):
            packed(bad)
    with pytest.raises(ValueError, match="MKLPackedLinear"):
        kernels.MKLPackedLinear(w.bfloat16())
    # the fp32 inference form's output layer multiplies prompts on such a copy
    model = GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=1, n_ctx=80, vocab_size=300)).eval()
    fast = optimize_for_cpu(model)
    if kernels.available(torch.float32):  # else the output layer is stored input-major for decoding
        # (where another GEMM is the faster, kernels.gemm: oneDNN's packed copy, or OpenBLAS on the plain weight)
        gemm = kernels.gemm()
        assert (fast.lm_head.mkl is None) == (gemm != "mkl") and (fast.lm_head.packed is not None) == (gemm == "onednn")
    ids = torch.randint(0, 300, (1, 70))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_bf16_prompts_multiply_in_fp32_where_the_cpu_has_no_bf16_unit(monkeypatch):
    import gpt2kit.generate as G

    monkeypatch.setattr(G, "_CHUNK_ROWS", 16)  # several weight chunks, the last one short
    lin = torch.nn.Linear(48, 40)
    w, b = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    for gelu in (False, True):
        layer = _CPULinear(w, b, matvec=False, packed=False, widen=True, gelu=gelu)
        assert layer.folds_gelu
        x = torch.randn(3, 20, 48).bfloat16()
        exact = F.linear(x.double(), w.double(), b.double())
        exact = F.gelu(exact, approximate="tanh") if gelu else exact
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (3, 20, 40)
        # fp32 sums rounded once to bf16: within half a bf16 ulp (plus fp32 rounding)
        ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
        assert ((got.double() - exact).abs() <= 0.5 * ulp + 1e-5).all()
    assert not _CPULinear(w.float(), None, matvec=False, packed=False, widen=True).widen  # fp32 has nothing to widen


def test_bf16_model_without_bf16_unit_runs_prompts_in_fp32(monkeypatch):
    torch.manual_seed(2)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_ctx=64)).eval()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        want = model(ids)  # fp32
        bf16 = model.to(torch.bfloat16)
        plain = bf16(ids).float()
        monkeypatch.setattr(kernels, "native_bf16", lambda: False)
        fast = optimize_for_cpu(bf16)
        assert fast.lm_head.widen and fast.transformer.h[0].mlp.c_fc.widen and fast.transformer.h[0].mlp.c_fc.gelu
        assert fast.transformer.h[0].attn.compute_dtype == torch.float32
        got = fast(ids)
        assert got.dtype == torch.bfloat16
        # the same bf16 weights: as close to the fp32 model as torch's own bf16 forward, or closer
        assert (got.float() - want).abs().max() <= 1.5 * (plain - want).abs().max()
        cache = fast.new_kv_cache(2)  # decoding (the kernel for few rows) continues the prompt alike
        steps = [fast(ids[:, :30], kv_cache=cache)] + [fast(ids[:, t:t + 1], kv_cache=cache) for t in range(30, 40)]
        torch.testing.assert_close(torch.cat(steps, 1).float(), got.float(), atol=0.05, rtol=0.05)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_without_kernels_inference_falls_back_to_pytorch(tmp_path):
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from gpt2kit import kernels; from gpt2kit.generate import optimize_for_cpu\n"
        "from gpt2kit.model import GPT2, GPT2Config\n"
        "m = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_ctx=16)).eval()\n"
        "ids = torch.randint(0, 50, (1, 5))\n"
        "fast = optimize_for_cpu(m)\n"
        "print(kernels.available(torch.float32), type(fast.transformer.h[0].mlp.c_fc).__name__,\n"
        "      bool(torch.allclose(fast(ids), m(ids), atol=1e-5)))\n"
    )
    disabled = _run(code, GPT2KIT_KERNELS="0", GPT2KIT_CACHE=str(tmp_path))
    assert disabled.stdout.split() == ["False", "_InputMajorLinear", "True"], disabled.stderr
    no_compiler = _run(code, CXX="g++", PATH="/nonexistent", GPT2KIT_CACHE=str(tmp_path))
    assert no_compiler.stdout.split() == ["False", "_InputMajorLinear", "True"], no_compiler.stderr
    if CAN_BUILD:
        broken = _run(code, CXX="/bin/false", GPT2KIT_CACHE=str(tmp_path))  # the build fails
        assert broken.stdout.split() == ["False", "_InputMajorLinear", "True"], broken.stderr
        assert "could not build gpt2kit's CPU kernels" in broken.stderr
        assert not list((tmp_path / "kernels").iterdir())  # no half-built file left behind
    unusable = tmp_path / "file"
    unusable.write_text("a file where the cache folder should be")
    no_cache = _run(code, GPT2KIT_CACHE=str(unusable / "sub"))
    assert no_cache.stdout.split() == ["False", "_InputMajorLinear", "True"], no_cache.stderr
    if CAN_BUILD:  # a fresh cache folder: the kernel is built there and used
        built = _run(code, GPT2KIT_CACHE=str(tmp_path))
        assert built.stdout.split() == ["True", "_CPULinear", "True"], built.stderr
        (library,) = (tmp_path / "kernels").glob("gpt2kit-*.so")
        assert library.stat().st_mode & 0o777 == 0o644  # readable by others sharing the cache, as installed


def test_optimized_model_decodes_like_the_original():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=301, n_ctx=32)).eval()
    fast = optimize_for_cpu(model)
    assert isinstance(fast.transformer.h[0].attn.c_attn, (_CPULinear, _InputMajorLinear))
    ids = torch.randint(0, 301, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = fast.new_kv_cache(2)
        steps = [fast(ids[:, :5], kv_cache=cache)] + [fast(ids[:, t:t + 1], kv_cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gelu_is_folded_once_and_only_into_projections_that_fold_it(dtype):
    torch.manual_seed(1)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_ctx=64)).eval().to(dtype)
    ids = torch.randint(0, 64, (1, 40))  # 40 rows: the GEMM path, not decoding's matrix-vector kernel
    with torch.no_grad():
        want = model(ids).float()
        fast = optimize_for_cpu(model)
        again = optimize_for_cpu(fast, inplace=True)  # optimizing twice must not drop or double the GELU
        mlp = again.transformer.h[0].mlp
        # (without the kernels, fp32 layers are stored input-major for decoding and fold nothing)
        folded = isinstance(mlp.c_fc, _CPULinear) and mlp.c_fc.folds_gelu and mlp.c_fc.gelu
        assert isinstance(mlp.act, torch.nn.Identity) == folded
        if CAN_BUILD:  # fp32: the bias goes into the GELU kernel; bf16: packed or widened GEMMs
            assert mlp.c_fc.gelu
        tol = 0.03 if dtype == torch.bfloat16 else 1e-5
        for m in (fast, again):
            assert (m(ids).float() - want).abs().max() <= tol * want.abs().max()


def test_huge_page_copies_are_equal_independent_and_aligned():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(0), torch.randn(2, 2).bfloat16()[:, 1]]
    copies = kernels.huge_page_copies(tensors)
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() % 64 == 0 or c.numel() == 0
    tensors[0].zero_()
    assert copies[0].abs().sum() > 0  # a copy, not a view of the original
    assert kernels.huge_page_copies([]) == []


def _gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU in float64 as x * sigmoid(2u), which, unlike 1 + tanh(u), does not cancel
    for x << 0 (where even float64's tanh form rounds to 0 below x ~ -7)."""
    return x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))


def test_gelu_kernel_matches_the_exact_function_and_its_derivative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70001, generator=g) * 4  # not a multiple of the 16 lanes or of a thread's block
    x[:9] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, -9.0, 1e4, -1e4])
    gy = torch.randn(70001, generator=g)
    xr = x.clone().requires_grad_()
    y = kernels.gelu(xr)
    y.backward(gy)
    if not CAN_BUILD:  # PyTorch's GELU, value and derivative
        xt = x.clone().requires_grad_()
        want = F.gelu(xt, approximate="tanh")
        want.backward(gy)
        assert torch.equal(y, want) and torch.equal(xr.grad, xt.grad)
        return
    xd = x.double().requires_grad_()
    want = _gelu_exact(xd)
    want.backward(gy.double())
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_GELUBackward"
    # within a few fp32 ulps of the value, times exp's condition number |2u| (the argument -2u is
    # itself an fp32 number), and of 1e-37 absolutely (tails in fp32's denormal range)
    cond = 1 + (2 * (2 / torch.pi) ** 0.5 * (x.double() + 0.044715 * x.double() ** 3)).abs()
    assert ((y.double() - want).abs() <= 4 * 2.0 ** -23 * cond * want.abs() + 1e-37).all()
    assert ((xr.grad.double() - xd.grad).abs() <= 1e-6 * (1 + gy.double().abs())).all()
    assert torch.equal(y[:2], torch.tensor([0.0, -0.0])) and torch.equal(torch.signbit(y[:2]), torch.tensor([False, True]))
    # for x << 0, where PyTorch's 1 + tanh(u) cancels, it is far more accurate than PyTorch's
    tail = (x < -5) & (want.detach().abs() > 1e-30)  # (below, fp32 underflows anyway)
    def rel(v): return ((v.double() - want.detach()).abs() / want.detach().abs())[tail].max()
    assert rel(y) < 1e-4 < rel(F.gelu(x, approximate="tanh"))


def test_gelu_kernel_special_values_and_layouts():
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0, -3.0])
    torch.testing.assert_close(kernels.gelu(special), F.gelu(special, approximate="tanh"), equal_nan=True)
    x = torch.randn(33, 48)
    for view in (x.t(), x[:, ::2], x[5:7]):  # non-contiguous input, contiguous output
        torch.testing.assert_close(kernels.gelu(view), F.gelu(view, approximate="tanh"), atol=1e-6, rtol=1e-6)
    assert kernels.gelu(torch.randn(0, 4)).shape == (0, 4)
    d = torch.randn(5, dtype=torch.float64)  # other dtypes go through PyTorch, same results
    assert torch.equal(kernels.gelu(d), F.gelu(d, approximate="tanh"))


def test_gelu_kernel_bf16_is_the_fp32_result_rounded_once():
    x = (torch.randn(4099) * 3).bfloat16()
    gy = torch.randn(4099).bfloat16()
    xr = x.clone().requires_grad_()
    y = kernels.gelu(xr)
    y.backward(gy)
    assert y.dtype == torch.bfloat16 and xr.grad.dtype == torch.bfloat16
    if not CAN_BUILD:  # PyTorch's bf16 GELU
        xt = x.clone().requires_grad_()
        want = F.gelu(xt, approximate="tanh")
        want.backward(gy)
        assert torch.equal(y, want) and torch.equal(xr.grad, xt.grad)
        return
    if CAN_BUILD:  # bit for bit: the fp32 kernel's value, rounded to nearest even
        assert torch.equal(y, kernels.gelu(x.float()).bfloat16())
        xf = x.float().requires_grad_()
        kernels.gelu(xf).backward(gy.float())
        assert torch.equal(xr.grad, xf.grad.bfloat16())
    want = _gelu_exact(x.double())
    ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    assert ((y.double() - want).abs() <= 0.5 * ulp + 1e-30).all()


def test_model_trains_through_the_gelu_kernel_like_through_pytorchs(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_ctx=16))
    ids = torch.randint(0, 64, (3, 16))

    def grads():
        model.zero_grad()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    bias_gelu = kernels.bias_gelu
    monkeypatch.setattr(kernels, "bias_gelu", lambda x, b: calls.append(x.shape) or bias_gelu(x, b))
    loss, got = grads()
    # fp32 on CPU: c_fc's bias goes into the GELU kernel (without the kernels: PyTorch's ops)
    assert calls == ([(3, 15, 128)] * 2 if CAN_BUILD else [])
    monkeypatch.setattr(kernels, "gelu", lambda x: F.gelu(x, approximate="tanh"))
    monkeypatch.setattr(kernels, "bias_gelu", lambda x, b: F.gelu(x + b, approximate="tanh"))
    ref_loss, want = grads()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_bias_gelu_kernel_matches_pytorch_and_sums_the_bias_gradient_independently_of_threads():
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 37, 3072), (5, 17), (1, 1), (40, 33)]:  # rows not a multiple of its 16-row blocks
        x, b = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
        gy = torch.randn(*shape, generator=g)
        xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = kernels.bias_gelu(xr, br)
        y.backward(gy)
        if not CAN_BUILD:  # PyTorch's ops
            xt, bt = x.clone().requires_grad_(), b.clone().requires_grad_()
            want = F.gelu(xt + bt, approximate="tanh")
            want.backward(gy)
            assert torch.equal(y, want) and torch.equal(xr.grad, xt.grad) and torch.equal(br.grad, bt.grad)
            continue
        assert type(y.grad_fn).__name__ == "_BiasGELUBackward"
        xd, bd = x.double().requires_grad_(), b.double().requires_grad_()
        want = F.gelu(xd + bd, approximate="tanh")
        want.backward(gy.double())
        assert y.dtype == xr.grad.dtype == br.grad.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(xr.grad.double(), xd.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(br.grad.double(), bd.grad, atol=1e-5 * shape[0], rtol=1e-5)
        threads = torch.get_num_threads()
        try:  # the bias gradient's summation order does not depend on the thread count
            torch.set_num_threads(1)
            xr.grad = br.grad = None
            kernels.bias_gelu(xr, br).backward(gy)
            one = br.grad.clone()
            torch.set_num_threads(max(2, threads))
            xr.grad = br.grad = None
            kernels.bias_gelu(xr, br).backward(gy)
            assert torch.equal(one, br.grad)
        finally:
            torch.set_num_threads(threads)
    # elsewhere (another dtype, autocast, a broadcast it does not do), PyTorch's ops, same results
    d, bd = torch.randn(4, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert not kernels.bias_folds(d, bd)
    assert torch.equal(kernels.bias_gelu(d, bd), F.gelu(d + bd, approximate="tanh"))
    x, b = torch.randn(4, 6), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.bias_folds(x, b)
    s = torch.tensor(0.5)  # a 0-d bias broadcasts through PyTorch
    assert torch.equal(kernels.bias_gelu(x, s), kernels.gelu(x + s))


def test_bias_gelu_in_place_is_bias_gelu_written_over_its_input(monkeypatch):
    if not CAN_BUILD:  # no in-place form without the kernels (nor does the model ask for one)
        with pytest.raises(ValueError, match="bias_gelu_"):
            kernels.bias_gelu_(torch.randn(4, 6), torch.randn(6))
        return
    g = torch.Generator().manual_seed(4)
    for shape in [(2, 37, 3072), (5, 17), (1, 1)]:
        x, b = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
        want = kernels.bias_gelu(x, b)
        y = x.clone()
        with torch.no_grad():
            assert kernels.bias_gelu_(y, b) is y
        assert torch.equal(y, want)
    x, b = torch.randn(4, 6), torch.randn(6)
    for bad, why in ((x.t(), "x is not contiguous"), (x.double(), "bias_folds is false"),
                     (x.clone().requires_grad_(), "x or bias needs a gradient")):
        with pytest.raises(ValueError, match=f"bias_gelu_: {why}"):
            kernels.bias_gelu_(bad, b)
    with pytest.raises(ValueError, match=r"bias_gelu_: bias must have shape \(6,\)"):
        kernels.bias_gelu_(torch.randn(4, 6), torch.randn(5))
    w = torch.randn(4, 6, requires_grad=True)
    saved = (w * x).sum()  # autograd keeps x for w's gradient
    kernels.bias_gelu_(x, b)  # x needs no gradient itself: allowed, and x's version moves on
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    # the model's MLP uses it where no gradient is needed, and gives the same activations
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=96, n_ctx=32)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5, generator=g)
    h = torch.randn(2, 20, 64, generator=g)
    mlp = model.transformer.h[0].mlp
    in_place, autograd = _spy(monkeypatch, "bias_gelu_"), _spy(monkeypatch, "bias_gelu")
    monkeypatch.setattr(kernels, "gemm", lambda: "mkl")  # c_fc's product as with gradients, bit for bit
    with_grad = mlp.hidden(h)
    assert len(autograd) == 1 and not in_place  # parameters need gradients: the autograd kernel
    with torch.no_grad():
        without = mlp.hidden(h)
    assert len(in_place) == 1 and len(autograd) == 1
    assert torch.equal(without, with_grad.detach())


def _one_block_model() -> tuple[GPT2, torch.Tensor]:
    """A one-block model whose heads have the attention kernels' size (64), and 48 tokens of
    input: enough rows for the prompt's in-place path."""
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=96, n_ctx=32)), torch.randint(0, 96, (2, 24))


def test_fused_paths_step_aside_for_hooks_on_the_modules_they_fuse():
    # c_attn's bias in the training attention kernel and c_fc's in the GELU kernel compute those
    # modules' outputs without calling them: a hook there (activation capture) must still run
    model, ids = _one_block_model()
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.act", "mlp.c_proj")
    model.train()
    want = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.eval()
    with torch.no_grad():
        want_logits = model(ids)
    seen: list[str] = []
    for name in names:
        model.transformer.h[0].get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.append(name))
    model.train()
    model.zero_grad()
    got = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    got.backward()
    assert seen == list(names)
    torch.testing.assert_close(got, want)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    seen.clear()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want_logits, atol=1e-5, rtol=1e-5)
    assert seen == list(names)


def test_a_forward_set_on_an_instance_runs_where_a_fused_path_would_bypass_it():
    model, ids = _one_block_model()
    block = model.transformer.h[0]
    calls: list[str] = []
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.act", "mlp.c_proj", "attn", "mlp", "ln_1")
    for name in names:
        module = block.get_submodule(name)
        module.forward = lambda *a, module=module, name=name, **kw: (
            calls.append(name) or type(module).forward(module, *a, **kw))
    model.train()
    model(ids).sum().backward()
    assert sorted(calls) == sorted(names)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(ids)
    assert sorted(calls) == sorted(names)


def test_the_private_torch_attributes_the_guards_read_exist():
    # _intercepted and forward_ad_active read these with defaults: a rename in torch would switch the
    # guards off without a word, so it must fail here
    import torch.autograd.forward_ad as fwAD

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        assert isinstance(getattr(torch.nn.modules.module, name), dict)
    assert isinstance(fwAD._current_level, int)


def test_fused_paths_step_aside_for_backward_hooks_and_hooks_on_every_module():
    model, ids = _one_block_model()
    block = model.transformer.h[0]
    seen: list[str] = []
    names = ("attn.c_attn", "mlp.c_fc", "mlp.act")
    handles = [block.get_submodule(n).register_full_backward_hook(lambda m, gi, go, n=n: seen.append(n))
               for n in names]
    model.train()
    model(ids).sum().backward()
    assert sorted(seen) == sorted(names)
    for h in handles:
        h.remove()
    seen.clear()
    model.eval()
    with torch.no_grad():
        want = model(ids)
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
        try:
            got = model(ids)
        finally:
            handle.remove()
    # every module of the block ran as a module (no in-place residual path, no folded biases)
    assert seen.count("LayerNorm") == 3 and seen.count("Linear") == 4 and "GELU" in seen and "Block" in seen
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_inference_layer_whose_forward_is_overridden_is_not_taken_for_a_plain_product():
    from gpt2kit.model import plain_product

    w, b = torch.randn(8, 4), torch.randn(8)

    class Adapter(_CPULinear):  # e.g. a low-rank update added to the product
        def forward(self, x):
            return super().forward(x) + 1

    class Renamed(_CPULinear):
        pass

    assert plain_product(_CPULinear(w, b, matvec=False, packed=False))
    assert plain_product(Renamed(w, b, matvec=False, packed=False))
    assert not plain_product(Adapter(w, b, matvec=False, packed=False))
    assert not plain_product(_CPULinear(w, b, matvec=False, packed=False, gelu=True))


def test_kernel_paths_step_aside_for_forward_mode_ad_and_a_compute_dtype():
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=96, n_ctx=64)).eval()
    ids = torch.randint(0, 96, (2, 40))
    emb = model.transformer.wte(ids).detach()
    tangent = torch.randn_like(emb)
    exact = GPT2(model.config).double().eval()
    exact.load_state_dict(model.state_dict())
    def exact_hidden(e: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return exact.hidden_states(ids, token_embeddings=e)

    eps = 1e-4  # central differences in float64: the reference tangent
    e, t = emb.double(), tangent.double()
    want_t = (exact_hidden(e + eps * t) - exact_hidden(e - eps * t)) / (2 * eps)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # forward AD works with gradients off; PyTorch's math attention supports it (its CPU flash
    # kernel raises NotImplementedError: loud, which is fine too)
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
        out = model.hidden_states(ids, token_embeddings=fwAD.make_dual(emb, tangent))
        got_t = fwAD.unpack_dual(out).tangent
    assert got_t is not None
    torch.testing.assert_close(got_t.double(), want_t, atol=1e-3, rtol=1e-3)
    with torch.no_grad(), fwAD.dual_level():
        assert kernels.forward_ad_active()
    assert not kernels.forward_ad_active()
    # a compute dtype for attention is honoured by the prompt path with c_attn's bias folded in
    # as by the one without (which a hook on c_attn selects)
    for block in model.transformer.h:
        block.attn.compute_dtype = torch.bfloat16
    with torch.no_grad():
        folded = model(ids)
        model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, a, o: None)
        model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: None)
        unfolded = model(ids)
    assert torch.equal(folded, unfolded)


def test_bf16_linear_widened_is_autocasts_bf16_linear():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 96, generator=g)
    w, b = torch.randn(40, 96, generator=g) * 0.1, torch.randn(40, generator=g)
    gy = torch.randn(3, 50, 40, generator=g)

    def run(fn):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xs, ws, bs)
        y.backward(gy.bfloat16())
        return y, xs.grad, ws.grad, bs.grad

    ours, want = run(kernels.bf16_linear_widened), run(F.linear)  # want: PyTorch's bf16 GEMM under autocast
    for a, b_ in zip(ours, want):
        assert a.dtype == b_.dtype and a.shape == b_.shape
    y, y_want = ours[0].double(), want[0].double()
    assert ours[0].dtype == torch.bfloat16
    ulp = 2.0 ** (torch.floor(torch.log2(y_want.abs().clamp_min(1e-30))) - 7)
    assert ((y - y_want).abs() <= ulp).all()  # the same products and fp32 sums: at most a rounding apart
    assert (y != y_want).float().mean() < 0.05
    for got, ref in zip(ours[1:], want[1:]):  # gradients: bf16-rounded as autocast leaves them
        assert got.dtype == ref.dtype
        assert (got.double() - ref.double()).abs().max() <= 2 ** -7 * ref.double().abs().max()
    exact = F.linear(x.double(), w.double(), b.double())
    assert (y - exact).abs().max() <= 0.02 * exact.abs().max()


def _spy(monkeypatch, name: str) -> list:
    """The argument tuples of every call to kernels.NAME from now on (which still runs)."""
    calls, real = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


def test_bf16_autocast_model_training_without_bf16_unit_matches_pytorchs_bf16(monkeypatch):
    from gpt2kit.train import _loss_module

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=96, n_ctx=32))
    ids = torch.randint(0, 96, (4, 33))
    linear_calls = _spy(monkeypatch, "bf16_linear_widened")

    def step(native: bool):
        monkeypatch.setattr(kernels, "native_bf16", lambda: native)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss_module(model)(ids[:, :-1], ids[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step(native=False)
    assert len(linear_calls) == 4 * model.config.n_layer  # every projection took the widened product
    ref_loss, ref_grads = step(native=True)  # PyTorch's own bf16 kernels
    assert len(linear_calls) == 4 * model.config.n_layer
    assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss)
    for got, want in zip(grads, ref_grads):
        assert (got - want).norm() <= 0.05 * want.norm()


@pytest.mark.parametrize("T,past", [(1, 0), (5, 0), (64, 0), (65, 0), (130, 0), (7, 3), (40, 90), (1, 17)])
def test_causal_attention_kernel_equals_sdpa(T, past):
    if not CAN_BUILD:
        assert not kernels.causal_attention_applies(*torch.randn(3, 1, 1, 2, 64).unbind(0))
        return
    g = torch.Generator().manual_seed(T * 100 + past)
    B, nh, S = 2, 3, past + T
    qkv = torch.randn(B, S, 3 * nh * 64, generator=g) * 2  # q, k, v as the model makes them: strided views
    q, k, v = (t.view(B, S, nh, 64).transpose(1, 2) for t in qkv.split(nh * 64, dim=2))
    q = q[:, :, past:]  # the new tokens' queries, at positions past .. S - 1
    assert kernels.causal_attention_applies(q, k, v)
    got = kernels.causal_attention(q, k, v)  # (B, T, nh * 64)
    allowed = torch.arange(S)[None, :] <= torch.arange(past, S)[:, None]  # (T, S)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    assert got.shape == (B, T, nh * 64)
    err = (got.view(B, T, nh, 64).transpose(1, 2).double() - want).abs().max()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).double() - want).abs().max()
    assert err <= 2 * sdpa_err + 1e-6  # as exact as PyTorch's fp32 attention
    contiguous = kernels.causal_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(contiguous, got)  # the layout of the inputs does not change a bit


@pytest.mark.parametrize("T,past", [(70, 0), (130, 0)])
def test_causal_attention_kernel_adds_the_bias(T, past):
    if not CAN_BUILD:
        return
    g = torch.Generator().manual_seed(T)
    B, nh, S = 2, 3, past + T
    qkv, bias = torch.randn(B, S, 3 * nh * 64, generator=g), torch.randn(3 * nh * 64, generator=g)

    def heads(t):
        q, k, v = (x.view(B, S, nh, 64).transpose(1, 2) for x in t.split(nh * 64, dim=2))
        return q[:, :, past:], k, v

    got = kernels.causal_attention(*heads(qkv), bias=bias)
    want = kernels.causal_attention(*heads(qkv + bias))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the same sums; bias added as it packs
    assert not torch.allclose(got, kernels.causal_attention(*heads(qkv)), atol=1e-3)
    for bad in (bias[:-1], bias.double(), torch.randn(2 * bias.numel())[::2],
                bias.clone().requires_grad_()):
        with pytest.raises(ValueError, match="bias"):
            kernels.causal_attention(*heads(qkv), bias=bad)
    q, k, v = heads(qkv)
    with pytest.raises(ValueError, match="cached keys"):  # cached keys hold their bias already
        kernels.causal_attention(q[:, :, 1:], k, v, bias=bias)


def test_causal_attention_kernel_scope():
    q = torch.randn(1, 2, 4, 64)
    assert not kernels.causal_attention_applies(q.bfloat16(), q.bfloat16(), q.bfloat16())
    assert not kernels.causal_attention_applies(q[..., :32], q[..., :32], q[..., :32])  # head size 32
    strided = torch.randn(1, 2, 64, 4).transpose(2, 3)  # (1, 2, 4, 64), last dimension not contiguous
    assert not kernels.causal_attention_applies(strided, q, q)
    r = q.clone().requires_grad_()
    assert not kernels.causal_attention_applies(r, q, q)  # no backward pass
    with torch.no_grad():
        assert kernels.causal_attention_applies(r, q, q) == CAN_BUILD
    with pytest.raises(ValueError, match="causal_attention"):
        kernels.causal_attention(q, q[:, :, :3], q[:, :, :3])  # fewer keys than queries


def test_layer_norm_add_equals_layer_norm_then_add():
    if not CAN_BUILD:
        assert not kernels.layer_norm_add_applies(torch.randn(2, 8), torch.nn.LayerNorm(8))
        return
    g = torch.Generator().manual_seed(0)
    for C in (64, 70):  # 70: a partial vector at the end of each row
        ln = torch.nn.LayerNorm(C, eps=1e-5)
        with torch.no_grad():
            ln.weight.copy_(1 + torch.randn(C, generator=g))
            ln.bias.copy_(torch.randn(C, generator=g))
            x, bias = torch.randn(3, 5, C, generator=g) * 3 + 1, torch.randn(C, generator=g)
            for b in (bias, None):
                y = x.clone()
                h = kernels.layer_norm_add_(y, ln, b)
                torch.testing.assert_close(h, ln(x), atol=1e-5, rtol=1e-5)
                assert torch.equal(y, x + b if b is not None else x)
            for bad_x, bad_b in ((x.transpose(0, 1), bias), (x.double(), bias), (x, bias[:-1])):
                with pytest.raises(ValueError, match="layer_norm_add_"):
                    kernels.layer_norm_add_(bad_x, ln, bad_b)
    assert not kernels.layer_norm_add_applies(x, ln)  # autograd on: PyTorch's LayerNorm


def test_blocks_add_into_the_residual_stream_only_in_cpu_inference(monkeypatch):
    from test_model import randomize_

    model = randomize_(GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=64, n_ctx=40)).eval())
    ids = torch.randint(0, 64, (2, 20))
    calls = _spy(monkeypatch, "layer_norm_add_")
    with torch.no_grad():
        x = model.transformer.wte(ids) + model.transformer.wpe.weight[:20]  # (2, 20, 128)
        ref = model.transformer.h[0](x.clone(), None, True, None, 0)  # forward: x + attn(..), + mlp(..)
        assert model.transformer.h[0].in_place_applies(x) == CAN_BUILD
        if CAN_BUILD:
            out = model.transformer.h[0].forward_in_place(x, None, True, None, 0)
            assert out is x  # added into the stream itself
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        calls.clear()
        fast = model(ids)
        assert len(calls) == (4 if CAN_BUILD else 0)  # two LayerNorms per block
        model(ids[:, :8])  # 16 rows: as decoding multiplies, no in-place pass
        handle = model.transformer.h[1].mlp.register_forward_hook(lambda *a: None)
        model(ids)  # the hooked block runs its modules
        handle.remove()
        seen = []  # a hook on c_attn: its product is not taken around it (no bias folded into attention)
        handle = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        torch.testing.assert_close(model(ids), fast, atol=2e-5, rtol=1e-5)
        handle.remove()
        assert seen == [(2, 20, 384)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
        assert len(calls) == (10 if CAN_BUILD else 0)  # 4 + 2 (one block hooked) + 4
    slow = model(ids)  # with autograd
    assert len(calls) == (10 if CAN_BUILD else 0)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)


def test_in_place_blocks_leave_what_hooks_and_subclasses_see_alone():
    from test_model import randomize_

    model = randomize_(GPT2(GPT2Config(n_layer=3, n_head=2, n_embd=128, vocab_size=64, n_ctx=40)).eval())
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        for module in (model.transformer.drop, model.transformer.h[0]):  # outputs a user keeps
            kept = []
            handle = module.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
            torch.testing.assert_close(model(ids), ref, atol=2e-5, rtol=1e-5)
            handle.remove()
            assert torch.equal(*kept[0])  # later blocks did not add into it

        class Steered(type(model.transformer.h[1])):
            def forward(self, x, *args):
                return super().forward(x, *args) + torch.linspace(0, 1, x.shape[-1])  # (not a constant: ln_f drops those)

        block = model.transformer.h[1]
        block.__class__ = Steered
        torch.testing.assert_close(model(ids), _grad_path(model, ids), atol=2e-5, rtol=1e-5)
        block.__class__ = Steered.__mro__[1]
        seen = []
        handle = block.mlp.dropout.register_forward_hook(lambda *a: seen.append(1))
        model(ids)
        handle.remove()
        assert seen == [1]
        for m in model.modules():  # Monte Carlo dropout: the dropouts alone in training mode
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.5
                m.train()
        assert not torch.allclose(model(ids), model(ids))


def _grad_path(model, ids):
    with torch.enable_grad():
        return model(ids).detach()


def test_model_prompts_use_the_attention_kernel_in_eval_only(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=64, n_ctx=40))
    ids = torch.randint(0, 64, (2, 40))
    calls = _spy(monkeypatch, "causal_attention")
    with torch.no_grad():
        model.eval()
        fast = model(ids)
        assert len(calls) == (2 if CAN_BUILD else 0)
        padded = torch.ones(2, 40, dtype=torch.long)
        padded[0, :3] = 0
        model(ids, attention_mask=padded)  # padding: SDPA with the mask
        cache = model.new_kv_cache(2)
        model(ids[:, :30], kv_cache=cache)  # a prompt into an empty cache: the kernel
        model(ids[:, 30:31], kv_cache=cache)  # one token after it: SDPA
        assert len(calls) == (4 if CAN_BUILD else 0)
        model.train()
        slow = model(ids)
    assert len(calls) == (4 if CAN_BUILD else 0)
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("B,nh,T", [(2, 3, 1), (2, 3, 5), (1, 2, 33), (3, 1, 64), (2, 2, 65), (1, 3, 130)])
def test_training_attention_kernel_matches_sdpa_and_its_gradients(B, nh, T):
    g = torch.Generator().manual_seed(B * 1000 + T)
    qkv = torch.randn(B, T, 3 * nh * 64, generator=g) * 2
    dout = torch.randn(B, T, nh * 64, generator=g)

    def sdpa(t):
        q, k, v = (part.view(B, T, nh, 64).transpose(1, 2) for part in t.split(nh * 64, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, nh * 64)

    exact_in = qkv.double().requires_grad_()
    exact = sdpa(exact_in)
    exact.backward(dout.double())
    fp32_in = qkv.clone().requires_grad_()
    fp32 = sdpa(fp32_in)
    fp32.backward(dout)
    if not CAN_BUILD:
        assert not kernels.training_attention_applies(qkv, nh)
        return
    ours_in = qkv.clone().requires_grad_()
    ours = kernels.training_attention(ours_in, nh)
    ours.backward(dout)
    assert ours.shape == (B, T, nh * 64) and ours_in.grad.shape == qkv.shape
    # as exact as PyTorch's fp32 attention, values and gradients: on average, and at worst within
    # 3x of its worst error (a worst case over a few hundred numbers is luck: at T = 5 PyTorch's
    # own fp32 error moves 20% with the ISA its kernels run, AVX2 or AVX-512)
    for got, want, theirs in ((ours, exact, fp32), (ours_in.grad, exact_in.grad, fp32_in.grad)):
        err, their_err = (got.double() - want).abs(), (theirs.double() - want).abs()
        assert err.mean() <= 1.5 * their_err.mean() + 1e-9
        assert err.max() <= 3 * their_err.max() + 1e-6


@pytest.mark.parametrize("B,nh,T", [(2, 3, 1), (2, 2, 65), (1, 3, 130), (3, 1, 33)])
def test_training_attention_kernel_adds_the_bias_and_sums_its_gradient_independently_of_threads(B, nh, T):
    # the kernel with c_attn's bias against F.linear(x, W, b) + SDPA: values and gradients of x, W, b
    g = torch.Generator().manual_seed(B * 1000 + T + 7)
    C = nh * 64
    x, w = torch.randn(B, T, C, generator=g), torch.randn(3 * C, C, generator=g) * C ** -0.5
    b = torch.randn(3 * C, generator=g)
    dout = torch.randn(B, T, C, generator=g)

    def sdpa(x, w, b):
        q, k, v = (part.view(B, T, nh, 64).transpose(1, 2) for part in F.linear(x, w, b).split(C, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    exact, fp32 = run(sdpa, torch.float64), run(sdpa, torch.float32)
    if not CAN_BUILD:
        assert not kernels.training_attention_folds_bias(x, b, nh)
        return
    assert kernels.training_attention_folds_bias(x, b, nh)
    ours = run(lambda x, w, b: kernels.training_attention(F.linear(x, w), nh, b), torch.float32)
    for got, ref, want in zip(ours, fp32, exact):  # as exact as PyTorch's fp32 ops
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + 1e-6
    threads = torch.get_num_threads()
    try:  # the bias gradient's summation order does not depend on the thread count
        torch.set_num_threads(1)
        one = run(lambda x, w, b: kernels.training_attention(F.linear(x, w), nh, b), torch.float32)
        torch.set_num_threads(max(2, threads))
        two = run(lambda x, w, b: kernels.training_attention(F.linear(x, w), nh, b), torch.float32)
        assert torch.equal(one[3], two[3])
    finally:
        torch.set_num_threads(threads)
    # without a bias the same kernel, bit for bit as with a zero one
    qkv = torch.randn(B, T, 3 * C, generator=g)
    assert torch.equal(kernels.training_attention(qkv, nh), kernels.training_attention(qkv, nh, torch.zeros(3 * C)))
    with pytest.raises(ValueError, match="bias"):
        kernels.training_attention(qkv, nh, torch.zeros(C))


def test_training_attention_kernel_scope_and_model_use(monkeypatch):
    qkv = torch.randn(2, 8, 3 * 2 * 64)
    assert kernels.training_attention_applies(qkv, 2) == CAN_BUILD
    assert not kernels.training_attention_applies(qkv, 3)  # head size 128 / 3
    assert not kernels.training_attention_applies(qkv.bfloat16(), 2)
    assert not kernels.training_attention_applies(torch.randn(1, kernels.TRAINING_ATTENTION_MAX_T + 1, 384), 2)
    if not CAN_BUILD:
        return
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=64, n_ctx=40)).train()
    ids = torch.randint(0, 64, (3, 33))
    calls = _spy(monkeypatch, "training_attention")

    def grads():
        model.zero_grad()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in model.parameters())]

    got = grads()
    assert len(calls) == 2  # one per layer, with c_attn's product without its bias, and the bias
    h = model.transformer
    assert all(call[2] is block.attn.c_attn.bias for call, block in zip(calls, h.h))
    x0 = h.h[0].ln_1(h.wte(ids[:, :-1]) + h.wpe(torch.arange(32)))
    torch.testing.assert_close(calls[0][0] + calls[0][2], h.h[0].attn.c_attn(x0))
    monkeypatch.setattr(kernels, "training_attention_applies", lambda *a: False)
    monkeypatch.setattr(kernels, "training_attention_folds_bias", lambda *a: False)
    for a, b in zip(got, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert len(calls) == 2


@pytest.mark.parametrize("n,V", [(1, 1), (3, 17), (9, 50257), (33, 64)])
def test_softmax_xent_kernel(n, V):
    g = torch.Generator().manual_seed(n + V)
    logits = torch.randn(n, V, generator=g) * 8
    logits[0, 0] = 300.0  # another target's probability then underflows fp32: its loss stays exact
    targets = torch.randint(0, V, (n,), generator=g)
    if not CAN_BUILD:
        with pytest.raises(ValueError):
            kernels.softmax_xent_(logits.clone(), targets)
        return
    grad = logits.clone()
    nll = kernels.softmax_xent_(grad, targets)
    exact = F.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(nll.double(), exact, rtol=1e-6, atol=1e-5)
    want = torch.softmax(logits.double(), -1) - F.one_hot(targets, V)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="targets must be in"):
        kernels.softmax_xent_(logits.clone(), torch.full((n,), V))
    if V > 1:
        with pytest.raises(ValueError, match="softmax_xent_: expected contiguous"):
            kernels.softmax_xent_(logits[:, ::2], targets)


def test_linear_cross_entropy_fused_and_pytorch_paths_agree(monkeypatch):
    from gpt2kit.train import linear_cross_entropy

    g = torch.Generator().manual_seed(5)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = torch.randn(77, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 77, (50,), generator=g)

    def run():
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, y, chunk=16)
        loss.backward()
        return loss.detach(), h.grad.clone(), w.grad.clone()

    fused = run()
    monkeypatch.setattr(kernels, "available", lambda dtype: False)
    for a, b in zip(fused, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kernels_ignore_torchs_default_dtype_and_take_infinities():
    if not CAN_BUILD:
        return
    logits = torch.tensor([[2.0, float("-inf"), 0.5, -1.0], [0.0, 1.0, float("-inf"), 3.0]])
    targets = torch.tensor([0, 3])
    q = torch.randn(1, 2, 5, 64)
    want_attention = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(1, 5, 128)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the kernels' fp32 outputs must not follow it
    try:
        grad = logits.clone()
        nll = kernels.softmax_xent_(grad, targets)
        attention = kernels.causal_attention(q, q, q)
    finally:
        torch.set_default_dtype(previous)
    assert nll.dtype == attention.dtype == torch.float32
    torch.testing.assert_close(nll, F.cross_entropy(logits, targets, reduction="none"))
    assert grad[0, 1] == 0 and grad[1, 2] == 0  # exp(-inf) is exactly 0
    torch.testing.assert_close(attention, want_attention, atol=1e-6, rtol=1e-6)
    huge = torch.tensor([1e19, 1e15, -1e19, 30.0, -30.0], requires_grad=True)
    kernels.gelu(huge).backward(torch.ones(5))
    assert huge.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # the derivative's limits, exactly


def test_torch_func_transforms_run_through_the_model_as_without_kernels():
    # torch.func (grad, vmap: per-sample gradients) wraps tensors in ways the kernels, plain
    # autograd.Functions over data pointers, cannot take: every kernel path must step aside
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=64, n_ctx=32)).train()
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids = torch.randint(0, 64, (3, 12))

    def loss(p: dict, row: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (row[None],))[0]
        return F.cross_entropy(logits[:-1], row[1:])

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    for i in range(3):
        model.zero_grad()
        loss(dict(model.named_parameters()), ids[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=2e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        batched = vmap(lambda row: functional_call(model, params, (row[None],))[0])(ids)
        torch.testing.assert_close(batched, model(ids), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (the widened bf16 product on CPUs without bf16 units)
        torch.testing.assert_close(vmap(lambda row: functional_call(model, params, (row[None],))[0])(ids).float(),
                                   model(ids).float(), atol=0.05, rtol=0.05)


def test_a_truncated_cached_library_is_built_again_not_loaded(tmp_path):
    # dlopen maps a truncated shared object past its end and the process dies of SIGBUS on first
    # touch: the cache must check the file is whole before loading it (a copy cut short, a full disk)
    if not CAN_BUILD:
        return
    code = "import torch; from gpt2kit import kernels; print(kernels.available(torch.float32))"
    assert _run(code, GPT2KIT_CACHE=str(tmp_path)).stdout.split() == ["True"]
    (library,) = (tmp_path / "kernels").glob("gpt2kit-*.so")
    whole = library.read_bytes()
    for size in (len(whole) // 2, 40):
        library.write_bytes(whole[:size])
        again = _run("import logging; logging.basicConfig()\n" + code, GPT2KIT_CACHE=str(tmp_path))
        assert again.returncode == 0 and again.stdout.split() == ["True"], (size, again.returncode, again.stderr)
        assert "incomplete" in again.stderr and str(library) in again.stderr
        assert len(library.read_bytes()) == len(whole)  # built again, in place


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.double(), approximate="tanh")


def _attention64(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, 64).transpose(1, 2) for t in qkv.double().split(C3 // 3, 2))
    scores = (q @ k.transpose(-1, -2) / 8).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C3 // 3)  # (SDPA's CPU backward: once only)


@pytest.mark.parametrize("kernel", ["gelu", "gelu_strided", "bias_gelu", "training_attention"])
def test_second_derivatives_through_the_kernels_equal_pytorchs(kernel):
    # create_graph=True (gradient penalties, Hessian-vector products, MAML) makes the backward
    # itself differentiable: the kernels' backward must then be too, not refuse or drop terms
    torch.manual_seed(0)
    shape, n_head = ((2, 9, 384), 2) if kernel == "training_attention" else ((5, 37), None)
    x = torch.randn(shape, requires_grad=True)
    bias = torch.randn(shape[-1], requires_grad=True)
    fns = {"gelu": (lambda x, b: kernels.gelu(x * 1.0 + b), lambda x, b: _gelu64(x + b)),
           "gelu_strided": (lambda x, b: kernels.gelu((x + b).t()).t(), lambda x, b: _gelu64((x + b).t()).t()),
           "bias_gelu": (kernels.bias_gelu, lambda x, b: _gelu64(x + b)),
           "training_attention": (lambda x, b: kernels.training_attention(x * 1.0, n_head, b),
                                  lambda x, b: _attention64(x + b, n_head))}
    ours, exact = fns[kernel]
    if kernel == "training_attention" and not CAN_BUILD:  # no PyTorch fallback: it refuses
        with pytest.raises(ValueError, match="^training_attention: expected"):
            ours(x, bias)
        return
    dout, u, w = (torch.randn(shape[:-1] + ((shape[-1] // 3,) if n_head else (shape[-1],))) for _ in range(3))
    dout.requires_grad_()
    results = []
    for f, args in ((ours, (x, bias)), (exact, tuple(t.detach().double().requires_grad_() for t in (x, bias)))):
        d = dout.detach().to(args[0].dtype).requires_grad_()
        gx, gb = torch.autograd.grad(f(*args), args, d, create_graph=True)
        # a scalar of both first derivatives, differentiated again, in every input
        penalty = (gx * x.detach().to(gx.dtype).sin()).sum() + (gb ** 2).sum()
        results.append(torch.autograd.grad(penalty, (*args, d)))
    for got, want in zip(*results):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_gradient_penalty_through_the_model_equals_it_without_kernels(monkeypatch):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=64, n_ctx=32)).train()
    ids = torch.randint(0, 64, (2, 12))

    def penalty_grads() -> list[torch.Tensor]:
        model.zero_grad()
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = penalty_grads()
    monkeypatch.setattr(kernels, "available", lambda dtype: False)
    for a, b in zip(ours, penalty_grads()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_inputs_of_the_wrong_rank_get_the_functions_own_error():
    # (not Python's "not enough values to unpack" or an IndexError from inside)
    ln = torch.nn.LayerNorm(8)
    scalar, row = torch.tensor(1.0), torch.randn(64)
    refused = {
        "matvec": lambda: kernels.matvec(torch.randn(8), torch.randn(4, 8)),
        "matvec ": lambda: kernels.matvec(torch.randn(1, 8), torch.randn(8)),
        "causal_attention": lambda: kernels.causal_attention(*[torch.randn(2, 5, 64)] * 3),
        "causal_attention ": lambda: kernels.causal_attention(torch.randn(1, 1, 5, 64), row, row),
        "training_attention": lambda: kernels.training_attention(torch.randn(10, 384), 2),
        "softmax_xent_": lambda: kernels.softmax_xent_(torch.randn(10), torch.tensor([1])),
        "softmax_xent_ ": lambda: kernels.softmax_xent_(torch.randn(2, 3, 10), torch.tensor([1, 2])),
        "layer_norm_add_": lambda: kernels.layer_norm_add_(scalar, ln, None),
        "bias_gelu_": lambda: kernels.bias_gelu_(scalar, torch.randn(1)),
    }
    with torch.no_grad():
        for name, call in refused.items():
            with pytest.raises(ValueError, match=f"^{name.strip()}: "):
                call()
        assert not kernels.training_attention_applies(torch.randn(10, 384), 2)
        assert not kernels.layer_norm_add_applies(scalar, ln)
        assert not kernels.prompt_attention_folds_bias(scalar, torch.randn(3, 1), torch.randn(3), 1)


def test_kernels_without_autograd_refuse_tensors_that_need_it():
    # matvec's result has no graph and softmax_xent_ writes over its input through a pointer:
    # with a tensor that needs a gradient they would drop it, or corrupt what a graph saved,
    # without a word
    if not CAN_BUILD:
        return
    w = torch.randn(4, 8)
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="^matvec: .*gradient"):
        kernels.matvec(x, w)
    with torch.no_grad():
        torch.testing.assert_close(kernels.matvec(x, w), x @ w.t())
    logits = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(ValueError, match="^softmax_xent_: .*gradient"):
        kernels.softmax_xent_(logits * 1.0, torch.tensor([0, 1, 2]))
    saved = torch.randn(3, 5, requires_grad=True).exp()  # exp's backward reads its output
    with torch.no_grad():
        kernels.softmax_xent_(saved, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_layer_norm_add_bumps_the_version_of_the_x_it_adds_into():
    if not CAN_BUILD:
        return
    ln = torch.nn.LayerNorm(32)
    x = torch.randn(4, 32, requires_grad=True).exp()  # exp's backward reads its output, x
    with torch.no_grad():
        h = kernels.layer_norm_add_(x, ln, torch.ones(32))
        torch.testing.assert_close(h, F.layer_norm(x - 1, (32,), ln.weight, ln.bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.sum().backward()


def test_kernels_refuse_a_bias_or_targets_they_would_misread():
    # each of these reaches a kernel as a raw pointer: a float64 bias read as float32, a strided
    # one read as contiguous, int32 targets read as int64 or a negative target read before its row
    # would give wrong numbers without a word
    if not CAN_BUILD:
        return
    x, w, b = torch.randn(2, 8), torch.randn(5, 8), torch.randn(5)
    for bad in (b.double(), torch.randn(10)[::2]):
        with pytest.raises(ValueError, match=r"^matvec: bias must be a contiguous \(5,\) torch.float32"):
            kernels.matvec(x, w, bad)
    ln = torch.nn.LayerNorm(8)
    with torch.no_grad():
        for bad in (torch.randn(8).double(), torch.randn(8, device="meta")):
            with pytest.raises(ValueError, match="^layer_norm_add_: "):
                kernels.layer_norm_add_(torch.randn(3, 8), ln, bad)
    qkv = torch.randn(1, 4, 384)
    for bad in (torch.randn(384).double(), torch.randn(384, device="meta")):
        with pytest.raises(ValueError, match="^training_attention: .*bias"):
            kernels.training_attention(qkv, 2, bad)
    logits = torch.randn(3, 5)
    for bad in (torch.tensor([0, -1, 2]), torch.tensor([0, 1, 2], dtype=torch.int32)):
        with pytest.raises(ValueError, match="^softmax_xent_: "):
            kernels.softmax_xent_(logits.clone(), bad)
    assert kernels.softmax_xent_(torch.randn(0, 5), torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_attention_kernel_scope_looks_at_keys_and_values_too():
    # the kernel reads k and v by their row strides with a contiguous last dimension, in fp32,
    # and computes no gradient: q alone passing is not enough
    q = torch.randn(1, 2, 4, 64)
    strided = torch.randn(1, 2, 64, 4).transpose(2, 3)  # (1, 2, 4, 64), last dimension not contiguous
    assert kernels.causal_attention_applies(q, q, q) == CAN_BUILD
    assert not kernels.causal_attention_applies(q, strided, q)
    assert not kernels.causal_attention_applies(q, q, strided)
    assert not kernels.causal_attention_applies(q, q.double(), q)
    assert not kernels.causal_attention_applies(q, q, q.bfloat16())
    assert not kernels.causal_attention_applies(q, q.clone().requires_grad_(), q)
    assert not kernels.causal_attention_applies(q, q, q.clone().requires_grad_())


def test_bias_gelu_broadcasts_a_bias_longer_than_the_last_dimension_through_pytorch():
    x, b = torch.randn(4, 1), torch.randn(6)  # (4, 1) + (6,) -> (4, 6): not the kernel's layout
    assert torch.equal(kernels.bias_gelu(x, b), kernels.gelu(x + b))
    assert kernels.bias_gelu(torch.randn(0, 6), b).shape == (0, 6)
    assert kernels.bias_gelu(torch.randn(3, 0), torch.randn(0)).shape == (3, 0)  # (no rows of zero columns to count)
    s = torch.tensor(0.5)  # a 0-d x: no last dimension to fold the bias along
    assert torch.equal(kernels.bias_gelu(s, b[:1]), kernels.gelu(s + b[:1]))
    if CAN_BUILD:
        empty = torch.randn(3, 0)
        with torch.no_grad():
            assert kernels.bias_gelu_(empty, torch.randn(0)) is empty


def test_layer_norm_add_honours_the_layer_norms_eps_and_shape():
    if not CAN_BUILD:
        return
    g = torch.Generator().manual_seed(1)
    for C in (64, 70):
        ln = torch.nn.LayerNorm(C, eps=0.5)  # comparable to the rows' variance: eps must sit inside the root
        x = torch.randn(4, C, generator=g) * 0.5
        with torch.no_grad():
            h = kernels.layer_norm_add_(x.clone(), ln, None)
        torch.testing.assert_close(h, F.layer_norm(x, (C,), ln.weight, ln.bias, eps=0.5), atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # a LayerNorm over more than the last dimension, or without weights: PyTorch's
        assert not kernels.layer_norm_add_applies(torch.randn(3, 2, 8), torch.nn.LayerNorm((2, 8)))
        assert not kernels.layer_norm_add_applies(torch.randn(3, 8), torch.nn.LayerNorm(8, elementwise_affine=False))
        assert not kernels.layer_norm_add_applies(torch.randn(3, 8), torch.nn.LayerNorm(8, bias=False))
        assert kernels.layer_norm_add_applies(torch.randn(3, 8), torch.nn.LayerNorm(8)) == CAN_BUILD


def test_sum_of_squares_and_adamw_decline_what_they_would_misread():
    # both read raw pointers over numel() floats: a strided tensor, a moment of another shape or a
    # short row of coefficients would be read wrong, so they decline (the caller then uses PyTorch)
    g = torch.Generator().manual_seed(0)
    t, u = torch.randn(6, 10, generator=g), torch.randn(150001, generator=g)  # u: three blocks of 65536, the last short
    got = kernels.sum_of_squares([t, u])
    if not CAN_BUILD:
        assert got is None
        return
    assert got == pytest.approx(float(t.double().pow(2).sum() + u.double().pow(2).sum()), rel=1e-6)
    assert kernels.sum_of_squares([t[:, ::2], u]) is None
    # block totals add in double: 2^28 + 1, which fp32 would round to 2^28
    assert kernels.sum_of_squares([torch.full((65536,), 64.0), torch.ones(1)]) == 2 ** 28 + 1
    assert kernels.sum_of_squares([t.double()]) is None
    p, grad, m, v = (torch.randn(32, generator=g) for _ in range(4))
    v = v.abs()
    coefficients = [(0.99, 0.1, 0.999, 0.001, 0.1, 1e-8, -0.01)]
    before = [x.clone() for x in (p, m, v)]
    for args in (([p], [grad], [m], [v[:16]], coefficients),  # a moment of another shape
                 ([p], [grad], [m], [v], [coefficients[0][:6]]),  # six coefficients, not seven
                 ([p], [torch.randn(64, generator=g)[::2]], [m], [v], coefficients),  # a strided gradient
                 ([p], [grad], [m], [], coefficients)):  # a list too short
        assert not kernels.adamw_(*args)
        assert all(torch.equal(x, y) for x, y in zip((p, m, v), before))  # nothing written
    assert kernels.adamw_([p], [grad], [m], [v], coefficients)
    assert not torch.equal(p, before[0])


def test_bf16_linear_widened_leaves_gradients_at_bf16_precision_and_forward_ad_alike():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 40, generator=g, requires_grad=True)
    w, b = torch.randn(24, 40, generator=g, requires_grad=True), torch.randn(24, generator=g, requires_grad=True)
    y = kernels.bf16_linear_widened(x, w, b)
    y.backward(torch.randn(2, 7, 24, generator=g).bfloat16())
    for grad in (x.grad, w.grad, b.grad):  # fp32 tensors holding bf16 numbers, as autocast leaves them
        assert grad.dtype == torch.float32 and torch.equal(grad, grad.bfloat16().float())
    import torch.autograd.forward_ad as fwAD

    with torch.no_grad(), fwAD.dual_level():  # forward-mode AD: the same numbers through PyTorch's ops
        dual = kernels.bf16_linear_widened(fwAD.make_dual(x.detach(), torch.ones_like(x)), w.detach(), b.detach())
        primal = fwAD.unpack_dual(dual).primal
    assert primal.dtype == torch.bfloat16 and torch.equal(primal, y.detach())


def test_prompt_attention_folds_only_a_contiguous_bias():
    x, w, b = torch.randn(2, 5, 128), torch.randn(384, 128), torch.randn(768)
    with torch.no_grad():
        assert kernels.prompt_attention_folds_bias(x, w, b[:384], 2) == CAN_BUILD
        assert not kernels.prompt_attention_folds_bias(x, w, b[::2], 2)  # read as contiguous: refused
        assert not kernels.prompt_attention_folds_bias(x, w[:, :64], b[:384], 2)


def test_bf16_results_round_ties_to_even():
    # sums exactly halfway between two bf16 numbers (1 + k/256, k odd: bf16 steps by 2/256 there)
    # round to the even one, as PyTorch rounds; rounding halves up would still be within half an ulp
    if not CAN_BUILD:
        return
    k = torch.tensor([1.0, 3.0, 5.0, 7.0, -1.0, -3.0])
    x = torch.zeros(6, 40)
    x[:, 0], x[:, 37] = k.sign(), k / 256  # (col 37: in the tail past two 16- or 32-lane vectors)
    w = torch.zeros(5, 40)
    w[:, 0] = w[:, 37] = 1.0
    want = (x @ w.t()).bfloat16()  # the exact sums, rounded by PyTorch
    assert want[0, 0] == 1.0 and want[1, 0] == 1 + 4 / 256
    for variant in _bf16_kernels():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "native_bf16", lambda: variant == "native")
            assert torch.equal(kernels.matvec(x.bfloat16(), w.bfloat16()), want), variant
    # the GELU kernel over every bf16 number (among the results some exactly halfway), bit for bit
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    got, want = kernels.gelu(every), kernels.gelu(every.float()).bfloat16()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_bf16_runs_on_fp32_units_only_on_cpus_without_bf16_arithmetic(monkeypatch):
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    assert kernels.bf16_on_fp32_units(torch.bfloat16, "cpu")
    assert not kernels.bf16_on_fp32_units(torch.bfloat16, "cuda")  # a GPU has its own bf16 units
    assert not kernels.bf16_on_fp32_units(torch.float16, "cpu") and not kernels.bf16_on_fp32_units(torch.float32, "cpu")
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    assert not kernels.bf16_on_fp32_units(torch.bfloat16, "cpu")


def test_elf_completeness_checks_section_headers_and_every_loaded_segment(tmp_path):
    # the cache's check before dlopen, on the kernels' own library cut at the places it looks at
    import struct

    if not CAN_BUILD:
        return
    whole = open(kernels._library()._name, "rb").read()
    phoff, shoff = struct.unpack_from("<QQ", whole, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", whole, 0x36)
    loads = [struct.unpack_from("<IIQQQQ", whole, phoff + i * phentsize) for i in range(phnum)]
    last = max((offset + filesz, offset) for kind, _, offset, _, _, filesz in loads if kind == 1)
    assert shoff + shnum * shentsize == len(whole) and last[0] < shoff  # (the usual layout)

    def complete(data: bytes) -> bool:
        path = tmp_path / "lib.so"
        path.write_bytes(data)
        return kernels._elf_complete(path)

    assert complete(whole)
    assert not complete(whole[:-1])  # the section header table cut short
    # no section headers at all (stripped; legal), and the last loaded segment cut short
    stripped = bytearray(whole[:last[0]])
    struct.pack_into("<Q", stripped, 0x28, 0)
    struct.pack_into("<H", stripped, 0x3C, 0)
    assert complete(bytes(stripped))
    assert not complete(bytes(stripped[:(last[0] + last[1]) // 2]))
    assert not complete(whole[:63]) and not complete(whole[:50])  # shorter than an ELF header
    assert complete(b"not an ELF file at all, but long enough to hold its header: " * 2)  # the loader judges


def test_kernels_check_every_operand_not_only_the_first():
    if not CAN_BUILD:
        return
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    for args in ((x, w.clone().requires_grad_(), b), (x, w, b.clone().requires_grad_())):
        with pytest.raises(ValueError, match="^matvec: .*gradient"):  # its result would have no graph
            kernels.matvec(*args)
    with pytest.raises(ValueError, match=r"^matvec: expected contiguous CPU x \(M<=16"):  # no rows at all
        kernels.matvec(torch.randn(0, 8), w)
    q = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match="^causal_attention: "):  # values for fewer keys than the keys
        kernels.causal_attention(q, q, q[:, :, :4])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g)
    targets = torch.tensor([4, 0, 6, 1, 2, 5])[::2]  # a strided view: 4, 6, 2
    want = kernels.softmax_xent_(logits.clone(), targets.contiguous())
    torch.testing.assert_close(kernels.softmax_xent_(logits.clone(), targets), want, rtol=0, atol=0)


def test_logits_by_blocks_writes_every_column_without_reading_what_was_there(monkeypatch):
    # the output is a fresh torch.empty: whatever it holds must never reach the logits (fresh
    # pages happen to be zeros, so here it holds NaNs); a weight with padded rows past n_out
    monkeypatch.setattr(kernels, "_PACKED_BLOCK", 16)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, 24, generator=g), torch.randn(64, 24, generator=g)
    for n_out in (64, 61, 40):
        got = kernels.logits_by_blocks(h, w, n_out)
        assert got.shape == (2, 3, n_out)
        torch.testing.assert_close(got, F.linear(h, w[:n_out]), atol=1e-5, rtol=1e-5)


def test_softmax_kernels_take_rows_far_below_zero():
    # the row maximum is taken over the real elements only (not the zero lanes past a row's end):
    # logits and scores all far below 0 must not underflow to a 0 / 0
    if not CAN_BUILD:
        return
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 17, generator=g) - 1000  # 17: one vector and a tail
    targets = torch.tensor([0, 16, 5])
    grad = logits.clone()
    nll = kernels.softmax_xent_(grad, targets)
    torch.testing.assert_close(nll.double(), F.cross_entropy(logits.double(), targets, reduction="none"))
    torch.testing.assert_close(grad.double(), torch.softmax(logits.double(), -1) - F.one_hot(targets, 17))
    qkv = torch.randn(1, 21, 3 * 64, generator=g)
    q, k, v = (t.view(1, 21, 1, 64).transpose(1, 2) for t in qkv.split(64, dim=2))
    q, k = q.abs() + 3, k - 5  # every score q . k / 8 about -150: exp underflows fp32 below the max
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(kernels.causal_attention(q, k, v).double(), want.reshape(1, 21, 64), atol=1e-4, rtol=1e-4)
    out = kernels.training_attention(torch.cat([q, k, v], 3).transpose(1, 2).reshape(1, 21, 192), 1)
    torch.testing.assert_close(out.double(), want.reshape(1, 21, 64), atol=1e-4, rtol=1e-4)


def test_matvec_takes_the_bf16_kernel_the_cpu_has(monkeypatch):
    # the two bf16 kernels differ on denormal inputs: VDPBF16PS (native) treats them as zero, the
    # widening kernel multiplies them exactly, so this tells which one ran (the native one on a
    # CPU without AVX512-BF16 would stop the process on an illegal instruction)
    if not CAN_BUILD:
        return
    x = torch.zeros(1, 16)
    x[0, 3] = 2.0 ** -130  # a denormal in fp32 and in bf16
    x, w = x.bfloat16(), torch.ones(2, 16).bfloat16()
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    assert torch.equal(kernels.matvec(x, w), torch.full((1, 2), 2.0 ** -130).bfloat16())
    if torch.cpu._is_avx512_bf16_supported():
        monkeypatch.setattr(kernels, "native_bf16", lambda: True)
        assert torch.equal(kernels.matvec(x, w), torch.zeros(1, 2).bfloat16())


def test_tensors_off_the_cpu_never_reach_the_kernels():
    # (meta tensors stand in for a GPU's: no data pointer a CPU kernel could read)
    meta = dict(device="meta")
    x, b = torch.randn(4, 128, **meta), torch.randn(128, **meta)
    assert kernels.gelu(x).device.type == "meta" and kernels.gelu(x.bfloat16()).device.type == "meta"
    assert not kernels.bias_folds(x, b) and not kernels.bias_folds(torch.randn(4, 128), b)
    assert kernels.bias_gelu(x, b).device.type == "meta"
    q = torch.randn(1, 2, 4, 64, **meta)
    with torch.no_grad():
        assert not kernels.causal_attention_applies(q, q, q)
        assert not kernels.layer_norm_add_applies(x, torch.nn.LayerNorm(128, **meta))
        assert not kernels.layer_norm_add_applies(x, torch.nn.LayerNorm(128))
        assert not kernels.prompt_attention_folds_bias(x, torch.randn(384, 128, **meta), torch.randn(384, **meta), 2)
        assert not kernels.prompt_attention_folds_bias(x, torch.randn(384, 128), torch.randn(384), 2)
    assert not kernels.training_attention_applies(torch.randn(1, 4, 384, **meta), 2)
    assert kernels.sum_of_squares([torch.randn(4), x]) is None
    if CAN_BUILD:
        with pytest.raises(ValueError, match="^matvec: expected contiguous CPU x"):
            kernels.matvec(torch.randn(2, 128, **meta), torch.randn(4, 128))
        q = torch.randn(1, 2, 4, 64)
        with pytest.raises(ValueError, match="^causal_attention: .*bias"):  # (its data pointer: null, no bias)
            kernels.causal_attention(q, q, q, bias=torch.randn(384, **meta))
    p = torch.randn(16, **meta)
    assert not kernels.adamw_([p], [p], [p], [p], [(1.0, 0.1, 0.999, 0.001, 0.1, 1e-8, -0.01)])


def test_the_kernels_exp_is_within_two_ulps():
    # exp512 (every softmax and GELU here): rows [0, z] give p = e^z / (1 + e^z), which for z << 0
    # is e^z itself; measured 1.46 ulp at most (a degree-6 polynomial: 2.4, rounding n = z / ln 2
    # down instead of to nearest: 6.8)
    if not CAN_BUILD:
        return
    z = torch.linspace(-80, 0, 200001)
    grad = torch.stack([torch.zeros_like(z), z], 1)
    kernels.softmax_xent_(grad, torch.zeros(len(z), dtype=torch.int64))
    exact = torch.sigmoid(z.double())
    assert ((grad[:, 1].double() - exact).abs() / exact).max() <= 2 * 2.0 ** -23


def test_adamw_kernel_takes_torchs_lerp_form_at_a_weight_of_one_half():
    # torch.lerp(m, g, w) is m + w (g - m) below w = 0.5 and g - (1 - w)(g - m) from 0.5 on: with
    # beta1 = 0.5 the fused AdamW's moments take the second form, bit for bit
    from gpt2kit.train import adamw_step_cpu

    if not CAN_BUILD:
        return
    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(64, generator=g), [torch.randn(64, generator=g) for _ in range(3)]
    runs = []
    for kernel in (True, False):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=0.1, betas=(0.5, 0.9), fused=True)
        for grad in grads:
            p.grad = grad.clone()
            assert adamw_step_cpu(opt) if kernel else opt.step() is None
        runs.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    for ours, torchs in zip(*runs):
        assert torch.equal(ours, torchs)


def test_fused_kernels_take_only_the_exact_modules_and_dtypes_they_implement():
    x, b = torch.randn(4, 6), torch.randn(6)
    assert not kernels.bias_folds(x, b.double())  # a float64 bias read as fp32 would be garbage
    assert torch.equal(kernels.bias_gelu(x, b.double()), kernels.gelu(x + b.double()))
    assert not kernels.bias_folds(x.double(), b)

    class Scaled(torch.nn.LayerNorm):  # a LayerNorm whose forward does more: not the kernel's arithmetic
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(3, 8)
    with torch.no_grad():
        assert not kernels.layer_norm_add_applies(x, Scaled(8))
        for name in ("weight", "bias"):  # parameters the kernel would read as contiguous
            ln = torch.nn.LayerNorm(8)
            setattr(ln, name, torch.nn.Parameter(torch.randn(16)[::2]))
            assert not kernels.layer_norm_add_applies(x, ln)


def test_a_cached_library_of_another_user_is_not_loaded(tmp_path):
    # loading a shared object runs its code: one that another user put in the cache folder is refused
    import os

    if not CAN_BUILD or os.getuid() != 0:  # (only root can give a file to another user)
        return
    ours = Path(kernels._library()._name)
    theirs = tmp_path / "kernels" / ours.name  # the name this very build has
    theirs.parent.mkdir()
    theirs.write_bytes(ours.read_bytes())
    os.chown(theirs, 12345, 12345)
    code = "import logging, torch; logging.basicConfig(); from gpt2kit import kernels; print(kernels.available(torch.float32))"
    run = _run(code, GPT2KIT_CACHE=str(tmp_path))
    assert run.stdout.split() == ["False"] and "belongs to another user" in run.stderr, run.stderr
