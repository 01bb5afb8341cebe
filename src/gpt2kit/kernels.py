"""Hand-written CPU kernels for decoding: few-row matrix products that stream weights at memory speed.

Decoding one token reads every weight once, so its speed is the rate at which weights stream
from memory. PyTorch's CPU kernels for a (1..16, K) x (K, N) product read bf16 weights at about
half of this machine's read bandwidth (oneDNN, packed) or a seventh (`F.linear`), fp32 at ~70%.
`csrc/matvec.cpp` reads an `nn.Linear` weight as it is, once, sequentially, on torch's threads.

It is compiled on first use with the system C++ compiler into gpt2kit's cache folder (a second
or two) and reused after. Without a compiler, on a CPU without AVX-512 (BF16 for the bf16
kernel), or with GPT2KIT_KERNELS=0 in the environment, `matvec` is None and callers use PyTorch.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16  # beyond this a product is compute-bound and oneDNN's blocked GEMM wins
_SOURCE = Path(__file__).with_name("csrc") / "matvec.cpp"
_FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp",
          "-shared", "-fPIC"]


def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GPT2KIT_KERNELS", "1") == "0" or not _cpu_has_avx512():
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        log.info("no C++ compiler found: decoding uses PyTorch's matrix kernels")
        return None
    from .corpus import cache_dir

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"matvec-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)  # atomic: concurrent builders each install a complete file
        except (OSError, subprocess.CalledProcessError) as e:
            log.warning("could not build gpt2kit's CPU kernels (%s): decoding uses PyTorch's matrix kernels",
                        getattr(e, "stderr", None) or e)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:  # e.g. a cache folder shared with a machine of another kind
        log.warning("could not load %s (%s): decoding uses PyTorch's matrix kernels", target, e)
        return None
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64]
    for fn in (lib.gpt2kit_matvec_bf16, lib.gpt2kit_matvec_f32):
        fn.argtypes, fn.restype = args, None
    return lib


def available(dtype: torch.dtype) -> bool:
    """Whether `matvec` runs for weights of `dtype` on this machine (builds the kernels if needed)."""
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        return False
    return dtype in (torch.float32, torch.bfloat16) and _library() is not None


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N), M <= MAX_ROWS, all contiguous CPU tensors of one dtype
    (float32 or bfloat16) for which `available` is true. Inference only (no autograd)."""
    M, K = x.shape
    N = weight.shape[0]
    if (M > MAX_ROWS or weight.shape[1] != K or weight.dtype != x.dtype or x.device.type != "cpu"
            or not (x.is_contiguous() and weight.is_contiguous())):
        raise ValueError(f"matvec: expected contiguous CPU x (M<={MAX_ROWS}, K) and weight (N, K) of one dtype, "
                         f"got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"matvec: bias must be a contiguous ({N},) {x.dtype} tensor")
    y = torch.empty(M, N, dtype=x.dtype)
    fn = _library().gpt2kit_matvec_bf16 if x.dtype == torch.bfloat16 else _library().gpt2kit_matvec_f32
    fn(x.data_ptr(), M, K, weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), N)
    return y
