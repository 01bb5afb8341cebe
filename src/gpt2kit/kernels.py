"""Hand-written CPU kernels: few-row matrix products that stream weights at memory speed (decoding),
GPT-2's GELU with its derivative (every forward and backward pass on CPU), causal attention
over a prompt in fp32 (inference) and in training, a LayerNorm that carries the next projection's
bias into the residual stream (fp32 inference), the training loss, gradient norm and AdamW
step; and a binding to MKL's packed GEMM (`MKLPackedLinear`).

Decoding one token reads every weight once, so its speed is the rate at which weights stream
from memory. PyTorch's CPU kernels for a (1..16, K) x (K, N) product read bf16 weights at about
half of this machine's read bandwidth (oneDNN, packed) or a seventh (`F.linear`), fp32 at ~70%.
`csrc/matvec.cpp` reads an `nn.Linear` weight as it is, once, sequentially, on torch's threads.

PyTorch's CPU kernel for the tanh GELU is 4-5x slower than a plain tanh here (1 ns/element):
`csrc/gelu.cpp` computes it as x * sigmoid(2u), at memory speed (`gelu`, autograd-aware).
PyTorch's fp32 SDPA runs a 1024-token prompt's attention at under half the matmul peak:
`csrc/attention.cpp` packs a head's keys, values and queries and keeps its scores in L2
(`causal_attention`, 1.6-1.8x faster), and does the same for training, forward and backward
(`training_attention`, 1.7-2.4x faster up to 512 tokens).

The kernels are compiled on first use with the system C++ compiler into gpt2kit's cache folder (~3 s,
once) and reused after. bf16 weights go through the bf16 dot-product instruction where the CPU
has it (AVX512-BF16, `native_bf16`) and are widened to fp32 where it does not: decoding is
memory-bound, so both stream at the same speed. The kernels are written with AVX-512 intrinsics;
where PyTorch runs its AVX2 code (a CPU with AVX2 and FMA but no AVX-512, e.g. AMD Zen 2) they are
built for AVX2 instead, each 512-bit operation done on two 256-bit halves (`csrc/avx512_on_avx2.h`).
Without a compiler, on a CPU without either, when the build or the load fails, or with
GPT2KIT_KERNELS=0 in the environment, `available` is false and callers use PyTorch (`gelu` falls
back to `F.gelu` itself).

The same question for the GEMMs: which one multiplies an fp32 prompt. MKL's, as `F.linear` does,
on Intel CPUs; elsewhere, where MKL runs a generic code path, OpenBLAS's (numpy's copy) on
torch's threads (`csrc/gemm.cpp`), or oneDNN's (`gemm`, `linear`, `linear_add_`;
GPT2KIT_GEMM=mkl, =onednn or =openblas chooses).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 16  # beyond this a product is compute-bound and oneDNN's blocked GEMM wins
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("matvec.cpp", "gelu.cpp", "attention.cpp",
                                                                           "xent.cpp", "adamw.cpp", "layernorm.cpp",
                                                                           "gemm.cpp")]
_HEADERS = [_SOURCES[0].with_name(name) for name in ("vecmath.h", "avx512_on_avx2.h")]
_FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp",
          "-shared", "-fPIC"]
# The same sources on AVX2 + FMA (avx512_on_avx2.h supplies the AVX-512 intrinsics). Without
# contraction, both builds round the same operations: the AVX-512 build contracts only 0 - x*y
# (into an FNMADD of the same value), while here the multiplies inside the emulated intrinsics
# (VSCALEFPS's) would otherwise fuse with the kernels' next add.
_AVX2_FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def _isa_flags() -> list[str] | None:
    """The compiler flags of the kernels for the instructions PyTorch uses on this CPU (which
    follows ATEN_CPU_CAPABILITY where set), or None where they cannot run (no AVX2)."""
    if _cpu_has_avx512():
        return _FLAGS
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return _AVX2_FLAGS
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    flags = _isa_flags()
    if os.environ.get("GPT2KIT_KERNELS", "1") == "0" or flags is None:
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        log.info("no C++ compiler found: decoding uses PyTorch's matrix kernels")
        return None
    from .corpus import cache_dir

    source = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]  # one file per ISA
    target = cache_dir() / "kernels" / f"gpt2kit-{key}.so"
    if target.exists() and target.stat().st_uid != os.getuid():
        log.warning("%s belongs to another user: not loading it; decoding uses PyTorch's matrix kernels", target)
        return None
    if target.exists() and not _elf_complete(target):
        log.warning("%s is incomplete (a copy cut short?): building it again", target)
        if not _build(compiler, target, flags):
            return None
    if not target.exists() and not _build(compiler, target, flags):
        return None
    try:
        lib = ctypes.CDLL(str(target))
        functions = (lib.gpt2kit_matvec_bf16, lib.gpt2kit_matvec_bf16_widened, lib.gpt2kit_matvec_f32)
        unary = (lib.gpt2kit_gelu_f32, lib.gpt2kit_gelu_bf16)
        binary = (lib.gpt2kit_gelu_backward_f32, lib.gpt2kit_gelu_backward_bf16)
        bias_gelu, bias_gelu_bwd = lib.gpt2kit_bias_gelu_f32, lib.gpt2kit_bias_gelu_backward_f32
        attention = lib.gpt2kit_causal_attention_f32
        train_fwd, train_bwd = lib.gpt2kit_attention_train_f32, lib.gpt2kit_attention_train_backward_f32
        xent, squares = lib.gpt2kit_softmax_xent_f32, lib.gpt2kit_sum_squares_f32
        adamw = lib.gpt2kit_adamw_f32
        layer_norm_add = lib.gpt2kit_layer_norm_add_f32
        sgemm = lib.gpt2kit_sgemm_f32
    except (OSError, AttributeError) as e:  # e.g. a cache folder shared with a machine of another kind
        log.warning("could not load %s (%s): decoding uses PyTorch's matrix kernels", target, e)
        return None
    for fn in functions:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
    for fn in unary:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
    for fn in binary:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
    bias_gelu.argtypes = [*[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    bias_gelu_bwd.argtypes = [*[ctypes.c_void_p] * 5, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    bias_gelu.restype = bias_gelu_bwd.restype = None
    attention.argtypes = [*([ctypes.c_void_p] + [ctypes.c_int64] * 3) * 3, ctypes.c_void_p,
                          ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_int64] * 4, ctypes.c_float, ctypes.c_int]
    attention.restype = None
    train_fwd.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3, ctypes.c_float, ctypes.c_int]
    train_bwd.argtypes = [*[ctypes.c_void_p] * 6, *[ctypes.c_int64] * 3, ctypes.c_float, ctypes.c_int]
    train_fwd.restype = train_bwd.restype = None
    xent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    xent.restype = None
    squares.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    squares.restype = ctypes.c_double
    adamw.argtypes = [*[ctypes.c_void_p] * 6, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    adamw.restype = None
    layer_norm_add.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_float, ctypes.c_int]
    layer_norm_add.restype = None
    sgemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                      *[ctypes.c_int64] * 3, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                      ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    sgemm.restype = None
    return lib


def _build(compiler: str, target: Path, flags: Sequence[str]) -> bool:
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: concurrent builders each install a complete file
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("could not build gpt2kit's CPU kernels (%s): decoding uses PyTorch's matrix kernels",
                    getattr(e, "stderr", None) or e)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _elf_complete(path: Path) -> bool:
    """Whether a 64-bit little-endian ELF file holds every byte its headers point to (other files:
    assumed whole, for the loader to judge). dlopen maps a truncated library past its end, and
    the process dies of SIGBUS on the first access there instead of getting an error."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 64:
        return False  # shorter than an ELF header
    if data[:6] != b"\x7fELF\x02\x01":
        return True
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return False
    for i in range(phnum):  # every loaded segment's bytes
        kind, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if kind == 1 and offset + filesz > len(data):
            return False
    return True


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it, PyTorch's
    bf16 matrix products emulate it and run several times slower than fp32 ones (measured on a
    Xeon whose hypervisor hides both: 61 vs 294 GFLOP/s)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_on_fp32_units(dtype: torch.dtype, device_type: str) -> bool:
    """Whether bf16 numbers of this dtype and device multiply on fp32 units in gpt2kit: bf16 on a
    CPU without bf16 arithmetic, where PyTorch's bf16 products are emulated several times slower
    (the products of bf16 numbers are exact in fp32, so only the summation order changes)."""
    return dtype == torch.bfloat16 and device_type == "cpu" and not native_bf16()


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """Whether `matvec` runs for weights of `dtype` on this machine (builds the kernels if needed)."""
    return dtype in (torch.float32, torch.bfloat16) and _library() is not None


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N), with M <= MAX_ROWS and K >= 1: contiguous CPU
    tensors of one dtype, float32 or bfloat16, for which `available` is true. Inference only (no
    autograd). bf16 results are rounded once, to nearest even; the bf16 dot-product instruction
    (used where `native_bf16`) treats denormal inputs as zero."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"matvec: expected 2-D x (M, K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if (not 1 <= M <= MAX_ROWS or K == 0 or weight.shape[1] != K or weight.dtype != x.dtype
            or x.device.type != "cpu" or weight.device.type != "cpu"
            or not (x.is_contiguous() and weight.is_contiguous())):
        raise ValueError(f"matvec: expected contiguous CPU x (M<={MAX_ROWS}, K>=1) and weight (N, K) of one dtype, "
                         f"got {tuple(x.shape)} {x.dtype} {x.device} and {tuple(weight.shape)} {weight.dtype} "
                         f"{weight.device}")
    if not available(x.dtype):
        raise ValueError(f"matvec: no kernel for {x.dtype} on this machine (see gpt2kit.kernels.available)")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype or bias.device.type != "cpu"
                             or not bias.is_contiguous()):
        raise ValueError(f"matvec: bias must be a contiguous ({N},) {x.dtype} CPU tensor")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError("matvec: an input needs a gradient, which this kernel does not compute (use F.linear, "
                         "or call it under torch.no_grad)")
    return matvec_unchecked(x, weight, bias)


def matvec_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`matvec` without its checks (~7 us of a ~12 us call on small layers), for callers that
    checked the weight and bias once and check x's dtype, device, rows and contiguity. Wrong
    arguments here read or write out of bounds."""
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device="cpu")
    lib = _library()
    fn = lib.gpt2kit_matvec_f32 if x.dtype != torch.bfloat16 else (
        lib.gpt2kit_matvec_bf16 if native_bf16() else lib.gpt2kit_matvec_bf16_widened)
    fn(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), None if bias is None else bias.data_ptr(),
       y.data_ptr(), weight.shape[0], torch.get_num_threads())
    return y


def gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), differentiable: what
    `F.gelu(x, approximate="tanh")` computes, through gpt2kit's kernel for fp32 and bf16 CPU
    tensors where it is `available` (and not while torch.compile traces: its own fused code is
    as fast), else through `F.gelu`. The kernel's results are within a few fp32 ulps of the exact
    function and, for x < -4, closer to it than PyTorch's (whose 1 + tanh(u) cancels there)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.numel() == 0
            or torch.compiler.is_compiling() or forward_ad_active() or not available(x.dtype)):
        return F.gelu(x, approximate="tanh")
    return _GELU.apply(x)


# The kernels' backward passes are not themselves differentiable. Under create_graph=True
# (gradient penalties, Hessian-vector products, MAML), where autograd runs a backward with
# gradients enabled, each Function computes its backward with PyTorch's differentiable ops
# instead, from its inputs as given (a contiguous copy made in forward is not in the graph).


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        xc = x.contiguous()
        y = torch.empty_like(xc)
        fn = _library().gpt2kit_gelu_f32 if x.dtype == torch.float32 else _library().gpt2kit_gelu_bf16
        fn(xc.data_ptr(), y.data_ptr(), xc.numel(), torch.get_num_threads())
        ctx.save_for_backward(x, xc)  # (one tensor twice where x is contiguous)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> torch.Tensor:
        x_given, x = ctx.saved_tensors
        if torch.is_grad_enabled():
            return torch.ops.aten.gelu_backward(gy.to(x.dtype), x_given, approximate="tanh")
        gy = gy.to(x.dtype).contiguous()
        gx = torch.empty_like(x)
        lib = _library()
        fn = lib.gpt2kit_gelu_backward_f32 if x.dtype == torch.float32 else lib.gpt2kit_gelu_backward_bf16
        fn(gy.data_ptr(), x.data_ptr(), gx.data_ptr(), x.numel(), torch.get_num_threads())
        return gx


def bias_folds(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a linear layer's bias can be folded into the kernel that reads its product (GELU,
    training attention) for inputs like x: fp32 CPU tensors, a 1-D bias, not under autocast,
    forward-mode AD or while torch.compile traces, the kernels built."""
    return (bias is not None and x.device.type == bias.device.type == "cpu"
            and x.dtype == bias.dtype == torch.float32 and bias.dim() == 1 and not torch.is_autocast_enabled("cpu")
            and not forward_ad_active() and not torch.compiler.is_compiling() and available(torch.float32))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`gelu(x + bias)` (OpenAI's tanh GELU), differentiable in both: a linear layer's product
    without its bias, then this, is the layer and its GELU in one pass over the output instead of
    three (broadcasting the bias into the product, the GELU, and, backward, summing the bias
    gradient over the rows, which the kernel does as it writes x's gradient, in a fixed order).
    Where `bias_folds` is false, PyTorch's ops compute the same."""
    if not (bias_folds(x, bias) and x.dim() >= 1 and x.shape[-1] == bias.shape[0] and x.numel() > 0):
        return gelu(x + bias)
    return _BiasGELU.apply(x, bias)


def bias_gelu_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`bias_gelu` written over x, for inference: a contiguous fp32 CPU x needing no gradient, a
    bias of its last dimension's size, where `bias_folds`. The (B, T, 4C) activations are then one
    tensor, not two: less memory, and the pass itself takes 15-30% less time here than writing a
    fresh tensor (within the noise of a whole prompt). x's version counter is bumped, as by any
    in-place op, so a graph that saved x fails on backward instead of using the new values.
    Returns x."""
    problem = ("bias_folds is false for them (it needs fp32 CPU tensors and a 1-D bias, no autocast, no "
               "forward-mode AD, no torch.compile tracing, the kernels built)" if not bias_folds(x, bias) else
               "x is not contiguous" if not x.is_contiguous() else
               "x must have at least one dimension" if x.dim() < 1 else
               f"bias must have shape ({x.shape[-1]},)" if bias.shape != (x.shape[-1],) else
               "x or bias needs a gradient" if torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad)
               else None)
    if problem:
        raise ValueError(f"bias_gelu_: {problem}; got x {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"bias {tuple(bias.shape)} {bias.dtype}")
    if x.numel():
        bias = bias.detach().contiguous()
        _library().gpt2kit_bias_gelu_f32(x.data_ptr(), bias.data_ptr(), x.data_ptr(), x.numel() // x.shape[-1],
                                         x.shape[-1], torch.get_num_threads())
        torch.autograd.graph.increment_version(x)
    return x


class _BiasGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        xc, bc = x.contiguous(), bias.contiguous()
        y = torch.empty(x.shape, dtype=torch.float32, device="cpu")
        cols = x.shape[-1]
        _library().gpt2kit_bias_gelu_f32(xc.data_ptr(), bc.data_ptr(), y.data_ptr(), x.numel() // cols, cols,
                                         torch.get_num_threads())
        ctx.save_for_backward(x, bias, xc, bc)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x_given, bias_given, x, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            gx = torch.ops.aten.gelu_backward(gy.to(torch.float32), x_given + bias_given, approximate="tanh")
            return gx, gx.reshape(-1, gx.shape[-1]).sum(0)
        gy = gy.to(torch.float32).contiguous()
        gx = torch.empty(x.shape, dtype=torch.float32, device="cpu")
        gbias = torch.empty(bias.shape, dtype=torch.float32, device="cpu")
        cols = x.shape[-1]
        _library().gpt2kit_bias_gelu_backward_f32(gy.data_ptr(), x.data_ptr(), bias.data_ptr(), gx.data_ptr(),
                                                  gbias.data_ptr(), x.numel() // cols, cols,
                                                  torch.get_num_threads())
        return gx, gbias


ATTENTION_HEAD_SIZE = 64  # the head size `causal_attention` handles (every GPT-2 preset's)


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (inside `torch.autograd.forward_ad.dual_level`), which works
    with gradients disabled: the kernels that do no autograd would drop tangents without a word,
    so their callers take PyTorch's ops then. A torch.func transform (grad, vmap, jvp, ...) counts
    too: its tensors are wrappers without data pointers for the kernels, and gpt2kit's
    autograd.Functions have no functorch rules."""
    return (getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
            or torch._C._functorch.maybe_current_level() is not None)


def causal_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `causal_attention` runs for these (B, nh, T|S, hs) queries, keys and values: fp32
    CPU tensors of head size 64, with contiguous last dimensions, needing no gradient (and no
    forward-mode AD), the kernels built (and not while torch.compile traces)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[-1] == ATTENTION_HEAD_SIZE and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not forward_ad_active() and not torch.compiler.is_compiling() and available(torch.float32))


def prompt_attention_folds_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_head: int) -> bool:
    """Whether a prompt's attention may take c_attn's product without its bias and add the bias in
    `causal_attention`: fp32 CPU input, weight and bias (3C), head size 64, no autograd, the
    kernels built (not under autocast, nor while torch.compile traces)."""
    C = x.shape[-1] if x.dim() else 0
    return (bias is not None and x.device.type == weight.device.type == bias.device.type == "cpu"
            and x.dtype == weight.dtype == bias.dtype == torch.float32 and C == n_head * ATTENTION_HEAD_SIZE
            and tuple(weight.shape) == (3 * C, C) and tuple(bias.shape) == (3 * C,) and bias.is_contiguous()
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and not forward_ad_active()
            and not torch.compiler.is_compiling() and available(torch.float32))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of T queries (B, nh, T, 64) at positions S - T .. S - 1 over S
    keys and values (B, nh, S, 64), returned as (B, T, nh * 64), the layout the output
    projection reads; for tensors where `causal_attention_applies`. `bias` (3 * nh * 64), if
    given, is added to q, k and v first (c_attn's bias, in the order c_attn lays out q, k, v; only
    without cached keys): the kernel adds it as it reads them, which saves c_attn a pass writing it. Forward only;
    1.6-1.8x PyTorch's fp32 SDPA on a 1024-token prompt here (csrc/attention.cpp). Results differ
    from SDPA's by float rounding only."""
    B, nh, T, hs = q.shape if q.dim() == 4 else (-1,) * 4  # (any other rank: refused below)
    S = k.shape[2] if k.dim() == 4 else -1
    if not (k.shape == v.shape == (B, nh, S, hs) and 1 <= T <= S) or not causal_attention_applies(q, k, v):
        raise ValueError(f"causal_attention: expected fp32 CPU q (B, nh, T, {ATTENTION_HEAD_SIZE}) and k, v "
                         f"(B, nh, S >= T, {ATTENTION_HEAD_SIZE}), got {tuple(q.shape)} {q.dtype}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if bias is not None and (bias.shape != (3 * nh * hs,) or bias.dtype != torch.float32 or bias.device.type != "cpu"
                             or not bias.is_contiguous() or (torch.is_grad_enabled() and bias.requires_grad) or S != T):
        raise ValueError(f"causal_attention: expected a contiguous fp32 CPU bias of shape ({3 * nh * hs},) needing "
                         f"no gradient, and no cached keys (cached keys hold their bias already); got "
                         f"{tuple(bias.shape)} {bias.dtype} with {S - T} cached keys")
    out = torch.empty(B, T, nh, hs, dtype=torch.float32, device="cpu")  # (whatever torch's defaults)
    _library().gpt2kit_causal_attention_f32(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), None if bias is None else bias.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(2), out.stride(1), B, nh, T, S, hs ** -0.5,
        torch.get_num_threads())
    return out.view(B, T, nh * hs)


def layer_norm_add_applies(x: torch.Tensor, ln: torch.nn.Module) -> bool:
    """Whether `layer_norm_add_` runs for x and LayerNorm `ln`: fp32 contiguous CPU x, an
    `nn.LayerNorm` over its last dimension with fp32 weight and bias, no autograd, the kernels
    built (not under autocast, where the block's products would be bf16, nor while torch.compile
    traces)."""
    return (type(ln) is torch.nn.LayerNorm and ln.weight is not None and ln.bias is not None
            and ln.weight.is_contiguous() and ln.bias.is_contiguous() and ln.bias.device.type == "cpu"
            and x.dim() >= 1 and tuple(ln.normalized_shape) == (x.shape[-1],)
            and x.dtype == ln.weight.dtype == ln.bias.dtype == torch.float32
            and x.device.type == ln.weight.device.type == "cpu" and x.is_contiguous() and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not forward_ad_active() and not torch.compiler.is_compiling()
            and available(torch.float32))


def layer_norm_add_(x: torch.Tensor, ln: torch.nn.LayerNorm, bias: torch.Tensor | None) -> torch.Tensor:
    """ln(x), then x += bias in place (bias (C) broadcast over rows; None: x unchanged), in one
    pass over x (csrc/layernorm.cpp): a pre-LN block's LayerNorm, carrying the next projection's
    bias into the residual stream. For x and ln where `layer_norm_add_applies`. ln(x) equals
    PyTorch's LayerNorm up to float rounding."""
    C = x.shape[-1] if x.dim() else 0
    if not layer_norm_add_applies(x, ln) or (bias is not None and (bias.shape != (C,) or bias.dtype != torch.float32
                                                                   or bias.device.type != "cpu")):
        raise ValueError(f"layer_norm_add_: expected contiguous fp32 CPU x (..., C), a LayerNorm(C) and a bias (C), "
                         f"no autograd; got x {tuple(x.shape)} {x.dtype}, "
                         f"bias {None if bias is None else (tuple(bias.shape), bias.dtype)}")
    h = torch.empty_like(x)
    bias = None if bias is None else bias.detach().contiguous()
    _library().gpt2kit_layer_norm_add_f32(x.data_ptr(), C, None if bias is None else bias.data_ptr(),
                                          ln.weight.data_ptr(), ln.bias.data_ptr(), h.data_ptr(), x.numel() // C, C,
                                          ln.eps, torch.get_num_threads())
    if bias is not None:
        torch.autograd.graph.increment_version(x)  # a graph that saved x then fails, as for any in-place op
    return h


TRAINING_ATTENTION_MAX_T = 512  # beyond, a head's T x T scores outgrow L2 and SDPA's flash kernel wins


def training_attention_applies(qkv: torch.Tensor, n_head: int) -> bool:
    """Whether `training_attention` runs for this (B, T, 3C) fp32 CPU tensor of n_head heads."""
    if qkv.dim() != 3:
        return False
    B, T, C3 = qkv.shape
    return (qkv.device.type == "cpu" and qkv.dtype == torch.float32 and _training_attention_fits(T, C3, n_head)
            and not forward_ad_active() and not torch.compiler.is_compiling() and available(torch.float32))


def _training_attention_fits(T: int, C3: int, n_head: int) -> bool:
    return C3 == 3 * n_head * ATTENTION_HEAD_SIZE and 1 <= T <= TRAINING_ATTENTION_MAX_T


def training_attention_folds_bias(x: torch.Tensor, bias: torch.Tensor | None, n_head: int) -> bool:
    """Whether `training_attention(F.linear(x, weight), n_head, bias)` runs gpt2kit's kernel for
    a linear layer's input x (B, T, C) and its bias (3C): where `training_attention_applies` to
    the product and the bias `bias_folds`."""
    return (x.dim() == 3 and bias is not None and tuple(bias.shape) == (3 * x.shape[-1],) and bias_folds(x, bias)
            and _training_attention_fits(x.shape[1], 3 * x.shape[-1], n_head))


def training_attention(qkv: torch.Tensor, n_head: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention for training, differentiable, without dropout: qkv (B, T, 3C),
    the queries, keys and values of n_head heads of size 64 side by side as the model's c_attn
    writes them, -> (B, T, C), the layout c_proj reads; for tensors where
    `training_attention_applies`. Forward + backward run 2x faster than SDPA or explicit batched
    matmuls here at T = 128-256 (and skip their transposes, splits and concatenations); the
    probabilities (B, nh, T, T) are kept for the backward pass, as explicit attention keeps them.
    With a fp32 bias (3C), the attention of qkv + bias, differentiable in both: c_attn's product
    without its bias, then this, saves the two passes over (B, T, 3C) that broadcast the bias and
    sum its gradient (the kernels add it as they pack q, k, v, and sum the gradient, in a fixed
    order, as they finish dqkv)."""
    if not training_attention_applies(qkv, n_head):
        raise ValueError(f"training_attention: expected a fp32 CPU (B, T <= {TRAINING_ATTENTION_MAX_T}, "
                         f"3 * {n_head} * {ATTENTION_HEAD_SIZE}) tensor, got {tuple(qkv.shape)} {qkv.dtype} "
                         f"{qkv.device}")
    if bias is not None and not (tuple(bias.shape) == (qkv.shape[-1],) and bias.dtype == torch.float32
                                 and bias.device.type == "cpu"):
        raise ValueError(f"training_attention: expected a fp32 CPU bias ({qkv.shape[-1]},), got {tuple(bias.shape)} "
                         f"{bias.dtype} {bias.device}")
    return _TrainingAttention.apply(qkv, bias, n_head)


class _TrainingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor | None, n_head: int) -> torch.Tensor:
        qkv_given, bias_given = qkv, bias
        qkv = qkv.contiguous()
        bias = bias.contiguous() if bias is not None else None
        B, T, C3 = qkv.shape
        f32 = dict(dtype=torch.float32, device="cpu")
        probs = torch.empty(B, n_head, T, (T + 31) // 32 * 32, **f32)  # rows padded to whole 32-key tiles
        out = torch.empty(B, T, C3 // 3, **f32)
        _library().gpt2kit_attention_train_f32(qkv.data_ptr(), bias.data_ptr() if bias is not None else None,
                                               out.data_ptr(), probs.data_ptr(), B, n_head, T,
                                               ATTENTION_HEAD_SIZE ** -0.5, torch.get_num_threads())
        ctx.save_for_backward(qkv, bias, probs, qkv_given, bias_given)
        ctx.n_head = n_head
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        qkv, bias, probs, qkv_given, bias_given = ctx.saved_tensors
        if torch.is_grad_enabled():
            dqkv = _attention_backward_ops(qkv_given if bias_given is None else qkv_given + bias_given,
                                           dout.to(torch.float32), ctx.n_head)
            return dqkv, None if bias_given is None else dqkv.sum((0, 1)), None
        B, T, _ = qkv.shape
        dout = dout.to(torch.float32).contiguous()
        dqkv = torch.empty_like(qkv)
        dbias = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[1] else None
        _library().gpt2kit_attention_train_backward_f32(
            dout.data_ptr(), qkv.data_ptr(), bias.data_ptr() if bias is not None else None, probs.data_ptr(),
            dqkv.data_ptr(), dbias.data_ptr() if dbias is not None else None, B, ctx.n_head, T,
            ATTENTION_HEAD_SIZE ** -0.5, torch.get_num_threads())
        return dqkv, dbias, None


def _attention_backward_ops(qkv: torch.Tensor, dout: torch.Tensor, n_head: int) -> torch.Tensor:
    """`training_attention`'s backward, dqkv (B, T, 3C) from qkv (bias added) and dout (B, T, C),
    in differentiable PyTorch ops: the probabilities recomputed, then dV = P^T dO, dS = P (dP -
    rowsum(P dP)) with dP = dO V^T, dQ = scale dS K, dK = scale dS^T Q."""
    B, T, C3 = qkv.shape
    scale = ATTENTION_HEAD_SIZE ** -0.5
    q, k, v = (t.view(B, T, n_head, ATTENTION_HEAD_SIZE).transpose(1, 2) for t in qkv.split(C3 // 3, 2))
    do = dout.view(B, T, n_head, ATTENTION_HEAD_SIZE).transpose(1, 2)  # (B, nh, T, hs)
    future = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
    p = (q @ k.transpose(-1, -2) * scale).masked_fill(future, float("-inf")).softmax(-1)  # (B, nh, T, T)
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    grads = (ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do)  # dQ, dK, dV: (B, nh, T, hs)
    return torch.cat([g.transpose(1, 2).reshape(B, T, C3 // 3) for g in grads], dim=2)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For contiguous fp32 CPU logits (n, V) and int64 targets (n,) in [0, V): overwrites logits
    with softmax(logits) - onehot(targets) (the gradient of the summed cross-entropy) and returns
    the (n,) losses -log softmax(logits)[target], computed as logsumexp - logit (exact where the
    probability underflows). One pass over each row instead of PyTorch's softmax + gather + log
    + scatter. Requires `available(torch.float32)`, and logits needing no gradient where autograd records."""
    n, V = logits.shape if logits.dim() == 2 else (-1, -1)  # (any other rank: refused below)
    if (logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous()
            or targets.shape != (n,) or targets.dtype != torch.int64 or targets.device.type != "cpu"
            or not available(torch.float32)):
        raise ValueError(f"softmax_xent_: expected contiguous fp32 CPU logits (n, V) and int64 targets (n,), got "
                         f"{tuple(logits.shape)} {logits.dtype} and {tuple(targets.shape)} {targets.dtype}")
    if torch.is_grad_enabled() and logits.requires_grad:
        raise ValueError("softmax_xent_: logits need a gradient; this kernel writes over them outside autograd "
                         "(call it under torch.no_grad, or use F.cross_entropy)")
    targets = targets.contiguous()
    if n and not (0 <= int(targets.min()) and int(targets.max()) < V):
        raise ValueError(f"softmax_xent_: targets must be in [0, {V}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    nll = torch.empty(n, dtype=torch.float32, device="cpu")
    _library().gpt2kit_softmax_xent_f32(logits.data_ptr(), targets.data_ptr(), nll.data_ptr(), n, V,
                                        torch.get_num_threads())
    torch.autograd.graph.increment_version(logits)  # a graph that saved logits then fails, as for any in-place op
    return nll


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> float | None:
    """The sum of the squares of every element of `tensors` (fp32 within blocks of 65536
    elements, the block totals in double), independent of the thread count; None unless they
    are all plain contiguous fp32 CPU tensors and the kernels are `available` (the caller then
    uses PyTorch)."""
    if not all(type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in tensors) or not available(torch.float32):  # (CUDA runs never build the CPU kernels)
        return None
    pointers = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    sizes = (ctypes.c_int64 * len(tensors))(*(t.numel() for t in tensors))
    return _library().gpt2kit_sum_squares_f32(pointers, sizes, len(tensors), torch.get_num_threads())


def adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
           exp_avg_sqs: Sequence[torch.Tensor], coefficients: Sequence[Sequence[float]], grad_scale: float = 1.0) -> bool:
    """One AdamW step in place over contiguous fp32 CPU tensors, with PyTorch's fused AdamW
    arithmetic (bit-identical results in tensors whose size is a multiple of 16: see
    csrc/adamw.cpp), in one pass over all of them; the gradients are divided by
    `grad_scale` as they are read, and are left unchanged. coefficients[i] = (1 - lr * weight_decay,
    1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^step), eps, -lr / (1 - beta1^step)) for tensor i.
    Returns False, having done nothing, unless every tensor qualifies and the kernels are
    `available` (the caller then uses PyTorch)."""
    groups = (params, grads, exp_avgs, exp_avg_sqs)
    n = len(params)
    if (not all(len(g) == n for g in (*groups, coefficients)) or not all(len(row) == 7 for row in coefficients)
            or not available(torch.float32)):
        return False
    for p, *rest in zip(*groups):
        if not all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32
                   and t.device.type == "cpu" and t.is_contiguous() and t.shape == p.shape for t in (p, *rest)):
            return False
    arrays = [(ctypes.c_void_p * n)(*(t.data_ptr() for t in g)) for g in groups]
    sizes = (ctypes.c_int64 * n)(*(p.numel() for p in params))
    flat = (ctypes.c_float * (7 * n))(*(float(c) for row in coefficients for c in row))
    _library().gpt2kit_adamw_f32(*arrays, sizes, flat, n, grad_scale, torch.get_num_threads())
    return True


def bf16_linear_widened(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as CPU bf16 autocast computes it, differentiable: x, weight and
    bias rounded to bf16, their exact products summed in fp32, the output rounded to bf16; the
    input gradient rounded to bf16, the weight and bias gradients to bf16 precision in fp32, as
    autocast's bf16 GEMMs and casts leave them. The products run on fp32 units (bf16 numbers
    widen to fp32 exactly): on a CPU without bf16 arithmetic, 4-5x faster than PyTorch's
    emulated bf16 GEMM. Only the summation order differs from a bf16 GEMM. Under forward-mode AD
    or a torch.func transform, the same product through differentiable PyTorch ops."""
    if forward_ad_active():
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            y = F.linear(x.to(bf16).float(), weight.to(bf16).float(), None if bias is None else bias.to(bf16).float())
        return y.to(bf16)
    return _Bf16LinearWidened.apply(x, weight, bias)


class _Bf16LinearWidened(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            xb, wb = x.to(bf16), weight.to(bf16)  # (..., in), (out, in)
            xf = xb.reshape(-1, x.shape[-1]).float()
            if bias is None:
                y, beta = xf.new_empty(xf.shape[0], wb.shape[0]), 0.0
            else:
                y, beta = bias.to(bf16).float().expand(xf.shape[0], wb.shape[0]).contiguous(), 1.0
            addmm_(y, xf, wb.float(), trans_b=True, beta=beta)  # (N, out), through gemm()'s GEMM
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = x.dtype, weight.dtype, None if bias is None else bias.dtype
        return y.to(bf16).view(*x.shape[:-1], -1)  # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: torch.Tensor):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        bf16 = torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            g = gy.reshape(-1, gy.shape[-1]).to(bf16).float()  # (N, out)
            xf, wf = xb.reshape(-1, xb.shape[-1]).float(), wb.float()
            gx = addmm_(g.new_empty(g.shape[0], wf.shape[1]), g, wf, beta=0)
            gx = gx.to(bf16).view(xb.shape).to(x_dtype)  # (..., in)
            gw = addmm_(g.new_empty(wf.shape), g, xf, trans_a=True, beta=0).to(bf16).to(w_dtype)  # (out, in)
            gb = None if b_dtype is None else g.sum(0).to(bf16).to(b_dtype)
        return gx, gw, gb


def huge_page_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU `tensors` in one private anonymous mapping advised to use
    transparent huge pages: fewer TLB misses, and a sum over 512 MiB reads 32 instead of 25.5
    GB/s here, so decoding, which streams every weight once per token, gets faster too. Where
    the OS offers no huge pages the copies are ordinary memory."""
    align, offsets, total = 64, [], 0
    for t in tensors:
        offsets.append(total)
        total += (t.numel() * t.element_size() + align - 1) // align * align
    if total == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return [t.contiguous().clone() for t in tensors]
    buf = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive as long as any view lives
    copies = []
    for t, offset in zip(tensors, offsets):
        view = arena[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        copies.append(view.copy_(t))
    return copies


# MKL's packed GEMM. `F.linear` has MKL copy (pack) its weight into the blocked layout of its
# inner kernel on every call; for a prompt through the (50257, 768) output layer that was ~8% of
# the product alone (1024 rows, a Xeon; ~1% at 4096), within the noise inside a whole prompt
# (docs/benchmarks.md, session 8). MKL's packed API packs once and then multiplies
# with the same kernel, so its products equal `F.linear`'s bit for bit from 64 rows on (fewer
# rows take other kernels in `F.linear`: equal up to float rounding). PyTorch links MKL into
# libtorch_cpu and exports its cblas symbols; `mkl_packing_works` checks them with one small
# product before anything relies on them.
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS, _CBLAS_B_MATRIX, _CBLAS_PACKED = 101, 111, 112, 162, 151
# Output features per packed block. The 50257-wide output layer's product, 1024 rows x 768 on a
# Xeon (2 threads), ran 1.15-1.2x faster as six products of ~8400 columns each, written into
# the columns of one output, than as one product (4096 rows: 1.15x; equal results, bit for bit);
# layers of at most ~1.5 blocks (every other GPT-2 layer) stay one product.
_PACKED_BLOCK = 8192


# Rows of a prompt's output-layer product that `logits_by_blocks` takes (below, the one product
# was as fast; at 4096 rows it was 5% faster).
BLOCKED_LOGITS_ROWS = (512, 3072)


def logits_by_blocks_applies(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `logits_by_blocks` runs for hidden states h (..., C) and an output layer's weight
    (V, C): fp32 CPU inference (no gradient, no forward-mode AD, not while torch.compile traces),
    a layer at least two blocks wide, `BLOCKED_LOGITS_ROWS` rows."""
    rows = h.numel() // max(h.shape[-1], 1)
    return (not torch.is_grad_enabled() and h.dtype == weight.dtype == torch.float32
            and h.device.type == weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[0] >= 2 * _PACKED_BLOCK and BLOCKED_LOGITS_ROWS[0] <= rows <= BLOCKED_LOGITS_ROWS[1]
            and not forward_ad_active() and not torch.compiler.is_compiling())


def logits_by_blocks(h: torch.Tensor, weight: torch.Tensor, n_out: int) -> torch.Tensor:
    """`F.linear(h, weight[:n_out])` (..., n_out) as one product per block of ~_PACKED_BLOCK output
    features, each written into its columns of the output (see _PACKED_BLOCK: 1.15-1.2x faster
    for a 1024-token prompt's output layer on a Xeon). Where `logits_by_blocks_applies`."""
    rows = h.reshape(-1, h.shape[-1])
    out = torch.empty(rows.shape[0], n_out, dtype=h.dtype)
    step = -(-n_out // max(1, round(n_out / _PACKED_BLOCK)))
    for a in range(0, n_out, step):
        b = min(a + step, n_out)
        out[:, a:b].addmm_(rows, weight[a:b].t(), beta=0)  # beta 0: out's garbage is never read
    return out.view(*h.shape[:-1], n_out)


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    if not torch.backends.mkl.is_available():
        return None
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).with_name("lib") / name
        if path.exists():
            break
    else:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    # integers passed as 64 bits: right for MKL's 32-bit (LP64) interface, whose callee reads the
    # low half of each register or stack slot on x86-64, and for a 64-bit (ILP64) one alike
    get_size.argtypes, get_size.restype = [ctypes.c_int64] * 4, ctypes.c_size_t
    pack.argtypes = [*[ctypes.c_int64] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    pack.restype = None
    compute.argtypes = [*[ctypes.c_int64] * 6, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
    compute.restype = None
    return lib


class MKLPackedLinear:
    """`F.linear(x, weight, bias)` for fp32 CPU inputs of any number of rows, on a copy of
    `weight` (out, in) that MKL packed once (see `_mkl` above: from 64 rows on, bit for bit
    `F.linear`'s result). The copy takes 1.2-2.6x the weight's memory. Build it only where
    `mkl_packing_works()`. The packed layout depends on the CPU: pickling (or deep-copying) keeps
    the weight, and unpickling packs it again."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        lib = _mkl()
        if (lib is None or weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu"
                or max(weight.shape) >= 2**31):
            raise ValueError(f"MKLPackedLinear: expected a 2-D fp32 CPU weight and MKL, got {weight.dtype} "
                             f"{tuple(weight.shape)} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.weight = w = weight.detach().contiguous()  # (shares the caller's storage when contiguous)
        # one packed copy per block of output features (all of them when few): the product of a
        # wide layer block by block into the columns of its output (see _PACKED_BLOCK)
        n_blocks = max(1, round(self.out_features / _PACKED_BLOCK))
        step = -(-self.out_features // n_blocks)
        self.blocks: list[tuple[int, int, torch.Tensor]] = []  # (first, last + 1 output feature, packed copy)
        for a in range(0, self.out_features, step):
            b = min(a + step, self.out_features)
            size = lib.cblas_sgemm_pack_get_size(_CBLAS_B_MATRIX, 1, b - a, self.in_features)
            packed = torch.empty(size // 4 + 16, dtype=torch.float32)  # MKL aligns as it needs within it
            lib.cblas_sgemm_pack(_CBLAS_ROW_MAJOR, _CBLAS_B_MATRIX, _CBLAS_TRANS, 1, b - a, self.in_features, 1.0,
                                 w[a].data_ptr(), self.in_features, packed.data_ptr())
            self.blocks.append((a, b, packed))
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __getstate__(self) -> dict:
        return {"weight": self.weight, "bias": self.bias}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["weight"], state["bias"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) fp32 CPU -> (N, out)."""
        if (x.dim() != 2 or x.shape[1] != self.in_features or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.shape[0] >= 2**31):
            raise ValueError(f"MKLPackedLinear: expected fp32 CPU input (N, {self.in_features}), got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        x = x.contiguous()
        rows, n = x.shape[0], self.out_features
        if self.bias is None:
            y, beta = torch.empty(rows, n, dtype=torch.float32), 0.0
        else:  # as addmm does: the bias in place first, the product added to it
            y, beta = self.bias.expand(rows, n).clone(), 1.0
        if rows:
            lib = _mkl()
            for a, b, packed in self.blocks:
                lib.cblas_sgemm_compute(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_PACKED, rows, b - a,
                                        self.in_features, x.data_ptr(), self.in_features, packed.data_ptr(), b - a,
                                        beta, y.data_ptr() + 4 * a, n)  # columns a..b of y's rows
        return y


@functools.cache
def mkl_packing_works() -> bool:
    """Whether `MKLPackedLinear` is there and right on this PyTorch build (checked once, on a
    small product against `F.linear`)."""
    if _mkl() is None:
        return False
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(40, 24, generator=g), torch.randn(40, generator=g), torch.randn(70, 24, generator=g)
    try:
        return bool(torch.allclose(MKLPackedLinear(w, b)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (ValueError, OSError):
        return False


# Which GEMM multiplies an fp32 prompt. MKL, which `F.linear` calls on x86, runs its fastest
# kernels on Intel CPUs only. On an AMD EPYC (Zen 2, 2 threads), at the four layer shapes of gpt2
# and gpt2-medium and the output layer's: MKL 114-146 GFLOP/s, oneDNN's GEMM (which PyTorch links
# too) 119-156, OpenBLAS's (numpy's own copy) 180-195, ~88% of the FMA peak; on a Zen 4, oneDNN's
# packed GEMM ran 1.75x faster than MKL's; on a Xeon oneDNN's was 12% slower. So on x86 CPUs of
# other makers, fp32 inference products of a prompt go through OpenBLAS (`csrc/gemm.cpp`, on
# torch's threads), or oneDNN where numpy brings no OpenBLAS or the kernels are not built.
# GPT2KIT_GEMM=mkl, =onednn or =openblas chooses on any CPU.
GEMM_CHOICES = ("auto", "mkl", "onednn", "openblas")
# OpenBLAS's names for its C interface: numpy >= 2's build (scipy-openblas, 64-bit integers),
# scipy's (32-bit), numpy 1's (64-bit), a plain build (32-bit). Each: sgemm, set / get thread
# count, ILP64.
_OPENBLAS_SYMBOLS = (
    ("scipy_cblas_sgemm64_", "scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_", True),
    ("scipy_cblas_sgemm", "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads", False),
    ("cblas_sgemm64_", "openblas_set_num_threads64_", "openblas_get_num_threads64_", True),
    ("cblas_sgemm", "openblas_set_num_threads", "openblas_get_num_threads", False),
)


def _cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's maker as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"); "" where unknown."""
    try:
        with open(cpuinfo, errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return ""
    return ""


def _loaded_openblas(maps: str = "/proc/self/maps") -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (numpy loads its own on import)."""
    try:
        import numpy  # noqa: F401  (loads numpy's BLAS)

        with open(maps) as f:
            paths = [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
    except (ImportError, OSError):
        return []
    return list(dict.fromkeys(p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in p))


@functools.cache
def _openblas() -> tuple[int, int, int, bool] | None:
    """(sgemm, set threads, get threads) addresses and ILP64 of a loaded OpenBLAS, or None."""
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same copy, not a second one
        except OSError:
            continue
        for sgemm, set_threads, get_threads, ilp64 in _OPENBLAS_SYMBOLS:
            try:
                fns = [getattr(lib, name) for name in (sgemm, set_threads, get_threads)]
            except AttributeError:
                continue
            return (*(ctypes.cast(fn, ctypes.c_void_p).value for fn in fns), ilp64)
    return None


_LP64_MAX = 2**31 - 1  # the largest size or leading dimension a 32-bit-integer BLAS takes


def _openblas_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, trans_a: bool = False,
                 trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """out = alpha op(a) op(b) + beta out, through OpenBLAS on torch's threads (`csrc/gemm.cpp`),
    op(t) = t.T with trans_*: fp32 CPU 2-D tensors with unit column strides (a and b as stored:
    (k, m) for a transposed a). beta 0 ignores out's values. Sizes a 32-bit OpenBLAS cannot take
    (`_LP64_MAX`) go to `torch.addmm`."""
    sgemm, set_threads, get_threads, ilp64 = _openblas()
    m, k = a.shape[::-1] if trans_a else a.shape
    n, k_b = (b.shape[0], b.shape[1]) if trans_b else (b.shape[1], b.shape[0])
    if k != k_b or out.shape != (m, n):
        raise ValueError(f"_openblas_mm: op(a) {(m, k)} times op(b) {(k_b, n)} into out {tuple(out.shape)}")
    if not ilp64 and max(m, n, k, _ld(a), _ld(b), _ld(out)) > _LP64_MAX:  # would wrap around in 32 bits
        return torch.addmm(out, a.t() if trans_a else a, b.t() if trans_b else b, beta=beta, alpha=alpha, out=out)
    _library().gpt2kit_sgemm_f32(sgemm, ilp64, set_threads, get_threads, trans_a, trans_b, m, n, k, alpha,
                                 a.data_ptr(), _ld(a), b.data_ptr(), _ld(b), beta, out.data_ptr(), _ld(out),
                                 torch.get_num_threads())
    return out


def _ld(t: torch.Tensor) -> int:
    """A row-major matrix's leading dimension for BLAS: its row stride, or, for one row (whose
    stride PyTorch leaves arbitrary, e.g. 1 in a transposed column), its width."""
    return t.stride(0) if t.shape[0] > 1 else max(1, t.shape[1])


def _blas_reads(*ts: torch.Tensor) -> bool:
    """Whether BLAS can read these 2-D fp32 CPU matrices in place: unit column strides, rows at
    least a row's width apart (or one row)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and t.stride(-1) == 1
               and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]) for t in ts)


def _overlap(out: torch.Tensor, *ts: torch.Tensor) -> bool:
    """Whether out shares memory with any of ts (BLAS's output may not alias its inputs)."""
    return any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in ts)


def _openblas_product(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, beta: float) -> None:
    """out = x weight^T + beta out (`_openblas_mm`): x (m, k), weight (n, k), out (m, n)."""
    _openblas_mm(x, weight, out, trans_b=True, beta=beta)


def _gemms_work(choice: str) -> bool:
    """Whether the GEMM `choice` is there and right on this build (checked once, on a small
    product against `F.linear`, rows split and not)."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    try:
        for rows in (70, 300):
            x = torch.randn(rows, 24, generator=g)
            if choice == "onednn":
                got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            else:
                got = b.expand(rows, 40).contiguous()
                _openblas_product(x, w, got, 1.0)
            if not torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5):
                return False
    except (RuntimeError, AttributeError, OSError):  # a build without the op or the library
        return False
    return True


@functools.cache
def gemm() -> str:
    """The GEMM of fp32 prompts on this machine (see above): "mkl" (`F.linear`'s), "onednn" or
    "openblas". GPT2KIT_GEMM chooses; auto (the default) is MKL on Intel CPUs and on CPUs of
    unknown make, else OpenBLAS where numpy loaded one and the kernels are built, else oneDNN.
    A choice that is not there falls back the same way (with a warning if it was asked for)."""
    choice = os.environ.get("GPT2KIT_GEMM", "auto").strip().lower() or "auto"
    if choice not in GEMM_CHOICES:
        log.warning("GPT2KIT_GEMM=%s: expected one of %s; using auto", choice, ", ".join(GEMM_CHOICES))
        choice = "auto"
    if choice == "mkl" or (choice == "auto" and _cpu_vendor() in ("", "GenuineIntel")):
        return "mkl"
    if choice in ("auto", "openblas"):
        if _library() is not None and _openblas() is not None and _gemms_work("openblas"):
            return "openblas"
        if choice == "openblas":
            log.warning("GPT2KIT_GEMM=openblas: %s; using oneDNN's GEMM",
                        "the kernels are not built" if _library() is None else "numpy loaded no OpenBLAS")
    if torch.backends.mkldnn.is_available() and _gemms_work("onednn"):
        return "onednn"
    return "mkl"


def prompt_gemm_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` multiplies through `gemm()` other than MKL's: fp32 CPU tensors that need
    no gradient (neither oneDNN's op nor OpenBLAS has a backward), a 2-D contiguous weight, more
    than `MAX_ROWS` rows, no autocast, forward-mode AD or torch.compile tracing."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and _blas_reads(weight) and x.dim() >= 2
            and x.shape[-1] == weight.shape[1] and x.numel() > MAX_ROWS * x.shape[-1]
            and (bias is None or (bias.dtype == torch.float32 and bias.dim() == 1 and bias.device.type == "cpu"))
            and not (torch.is_grad_enabled()
                     and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))
            and not torch.is_autocast_enabled("cpu") and not forward_ad_active() and not torch.compiler.is_compiling()
            and gemm() != "mkl")


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t as a (rows, cols) matrix that BLAS can read in place: unit column stride, rows at least
    `cols` apart (an expanded tensor's rows, 0 apart, are copied)."""
    r = t.reshape(-1, cols)
    return r if r.stride(-1) == 1 and r.stride(0) >= cols else r.contiguous()


def training_gemm_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` runs forward and backward through OpenBLAS (`_BLASLinear`): `gemm()` is
    OpenBLAS, fp32 CPU tensors of which one needs a gradient, more than `MAX_ROWS` rows, a 2-D
    contiguous weight, no autocast, forward-mode AD or torch.compile tracing."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and _blas_reads(weight) and x.dim() >= 2
            and x.shape[-1] == weight.shape[1] and x.numel() > MAX_ROWS * x.shape[-1]
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"
                                  and bias.shape == (weight.shape[0],)))
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
            and not torch.is_autocast_enabled("cpu") and not forward_ad_active() and not torch.compiler.is_compiling()
            and gemm() == "openblas")


class _BLASLinear(torch.autograd.Function):
    """`F.linear` with its three products (y = x W^T + b, dx = dy W, dW = dy^T x) in OpenBLAS."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y, beta = _output(x, weight, bias)
        _openblas_product(_rows(x, x.shape[-1]), weight.detach(), y.view(-1, weight.shape[0]), beta)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y  # (not a view: a caller may change it in place, as F.linear's)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiable ops (see above)
            g2 = gy.reshape(-1, n)
            return (gy @ weight if need_x else None, g2.t() @ x.reshape(-1, k) if need_w else None,
                    g2.sum(0) if need_b and ctx.has_bias else None)
        g = _rows(gy, n)
        gx = _openblas_mm(g, weight, g.new_empty(g.shape[0], k)).view(x.shape) if need_x else None
        gw = _openblas_mm(g, _rows(x, k), g.new_empty(n, k), trans_a=True) if need_w else None
        gb = g.sum(0) if need_b and ctx.has_bias else None
        return gx, gw, gb


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, trans_a: bool = False, trans_b: bool = False,
           alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """out = beta out + alpha op(a) op(b) in place (op(t) = t.T with trans_*; beta 0 ignores out's
    values, NaNs included), for 2-D tensors and no autograd: through OpenBLAS where `gemm()` chooses
    it and all are fp32 CPU matrices BLAS reads in place, else `torch.addmm`."""
    operands = (out, a, b)
    if any(t.dim() != 2 for t in operands):
        raise ValueError(f"addmm_: expected 2-D tensors, got {[tuple(t.shape) for t in operands]}")
    op_a, op_b = (a.shape[::-1] if trans_a else a.shape), (b.shape[::-1] if trans_b else b.shape)
    if op_a[1] != op_b[0] or out.shape != (op_a[0], op_b[1]):
        raise ValueError(f"addmm_: op(a) {tuple(op_a)} times op(b) {tuple(op_b)} does not fit out {tuple(out.shape)}")
    if (_blas_reads(*operands) and gemm() == "openblas" and not _overlap(out, a, b)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in operands))
            and out.numel() > MAX_ROWS * out.shape[1]):
        _openblas_mm(a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
        torch.autograd.graph.increment_version(out)  # as an in-place op does: a graph that saved out fails
        return out
    return torch.addmm(out, a.t() if trans_a else a, b.t() if trans_b else b, beta=beta, alpha=alpha, out=out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through `gemm()` where `prompt_gemm_applies` or (OpenBLAS, with
    autograd) `training_gemm_applies` (the same result up to float rounding), else `F.linear`."""
    if training_gemm_applies(x, weight, bias):
        return _BLASLinear.apply(x, weight, bias)
    if not prompt_gemm_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if gemm() == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, None if bias is None else bias.contiguous(),
                                                  "none", [], "")
    y, beta = _output(x, weight, bias)
    _openblas_product(_rows(x, x.shape[-1]), weight, y.view(-1, weight.shape[0]), beta)
    return y


def _output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """The (..., n) fp32 output of x weight^T + bias, and the beta that adds the product to it: as
    addmm does, the bias first (beta 1), else an empty tensor (beta 0)."""
    shape = (*x.shape[:-1], weight.shape[0])
    if bias is None:
        return torch.empty(shape, dtype=torch.float32), 0.0
    return bias.detach().expand(shape).contiguous(), 1.0


def linear_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out += x @ weight^T in place, for 2-D out and x (`addmm_`), through OpenBLAS where `gemm()`
    chooses it and `prompt_gemm_applies` (oneDNN has no in-place sum: `addmm_` was as fast)."""
    if (_blas_reads(out, x) and gemm() == "openblas" and out.shape == (x.shape[0], weight.shape[0])
            and not _overlap(out, x, weight) and not (torch.is_grad_enabled() and out.requires_grad)
            and prompt_gemm_applies(x, weight, None)):
        _openblas_product(x, weight, out, 1.0)
        torch.autograd.graph.increment_version(out)
        return out
    return out.addmm_(x, weight.t())
