"""Training: a typed run config, a schedule, a loop, checkpoints that resume bit for bit.

    cfg = load_config("demo", ["--max_steps", "200"])  # a bundled config, or a TOML file's path
    summary = train(cfg)

The pieces are small functions: `lr_at` (warm-up then cosine), `linear_cross_entropy` (the loss
without materializing all logits), `Checkpoints` (atomic folders, last K and the best), `train`.
Batches come from `gpt2kit.data`: the windows of step s are a pure function of (seed, s), so the
data position of a run is its step.

One process or many: under `torchrun` (one rank included) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU) or, with `fsdp = true`, sharded with
`fully_shard`. Every rank reads its own part of each global batch; only rank 0 logs and writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError, GPT2KitError
from .io import atomic_path, check_output_path, write_json

log = logging.getLogger(__name__)


class CheckpointError(GPT2KitError):
    """A checkpoint is missing, unreadable, or does not match the run it is loaded into."""


class TrainError(GPT2KitError):
    """The run cannot start as configured (data, model and settings disagree)."""


# ---------------------------------------------------------------------------------------------
# The run config


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings; what each key means is in FIELD_HELP (`gpt2kit train --help` shows it)."""

    # data and output
    data: str = ""
    out_dir: str = "out"
    # model: a preset, optionally resized, or a pretrained checkpoint to fine-tune
    model: str = "tiny"
    init_from: str = ""
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 0
    dropout: float = 0.0
    # batch: `batch_size` sequences per optimizer step over all ranks; each forward takes
    # `micro_batch_size` (0 = batch_size / ranks); the rest is gradient accumulation.
    batch_size: int = 32
    micro_batch_size: int = 0
    # optimization: AdamW, linear warm-up then cosine decay to min_lr at lr_decay_steps
    max_steps: int = 1000
    max_minutes: float = 0.0
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    lr_decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # execution
    dtype: str = "float32"
    compile: bool = False
    device: str = "auto"
    threads: int = 0
    fsdp: bool = False
    seed: int = 1337
    # watching
    log_interval: int = 1
    eval_interval: int = 100
    eval_batches: int = 8
    sample_interval: int = 0
    sample_tokens: int = 64
    sample_prompt: str = ""
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    peak_tflops: float = 0.0
    # checkpoints
    checkpoint_interval: int = 0
    keep_last: int = 2
    resume: bool = False


FIELD_HELP: dict[str, str] = {
    "data": "the shard folder written by `gpt2kit prepare`",
    "out_dir": "where checkpoints, metrics.jsonl, TensorBoard events and loss.png go",
    "model": "the model preset to train from scratch: tiny, mini, small-cpu, gpt2, gpt2-medium, ...",
    "init_from": "fine-tune this model folder or released name instead; empty: from scratch",
    "n_layer": "Transformer blocks; 0: the preset's (with init_from, the checkpoint's)",
    "n_head": "attention heads; 0: the preset's (with init_from, the checkpoint's)",
    "n_embd": "width; 0: the preset's (with init_from, the checkpoint's)",
    "block_size": "tokens per training sequence; 0: the model's context n_ctx",
    "dropout": "dropout probability in training",
    "batch_size": "sequences per optimizer step, over all ranks",
    "micro_batch_size": "sequences per forward pass and rank, the rest accumulated; 0: batch_size / ranks",
    "max_steps": "optimizer steps of the whole run (a resumed one included)",
    "max_minutes": "stop with a checkpoint after this many minutes of training, counted from the first step "
                   "(loading data and model, before it, is not; exit status 0, a configured end); 0: no limit",
    "lr": "peak learning rate, reached at the end of the warm-up",
    "min_lr": "learning rate at the end of the cosine decay and after",
    "warmup_steps": "steps of linear warm-up from lr / warmup_steps to lr",
    "lr_decay_steps": "step at which the cosine decay reaches min_lr; 0: max_steps",
    "weight_decay": "AdamW weight decay, on matrices only (not biases or LayerNorm gains)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eps": "AdamW epsilon",
    "grad_clip": "clip the global gradient norm to this; 0: no clipping",
    "dtype": "float32, bfloat16 (autocast; weights stay float32), or auto: bfloat16 where the device "
             "multiplies it in hardware",
    "compile": "run the model and the loss under torch.compile",
    "device": "auto, cpu, cuda or cuda:N (auto: cuda when there is one)",
    "threads": "torch CPU threads; 0: torch's default",
    "fsdp": "under torchrun, shard parameters, gradients and optimizer state (fully_shard per block)",
    "seed": "seeds the initialization, the batches (those of step s depend on the seed and s only) and dropout",
    "log_interval": "steps between records of loss, lr, tokens/s and MFU",
    "eval_interval": "steps between validation losses",
    "eval_batches": "global batches of fixed validation windows per evaluation",
    "sample_interval": "steps between text samples; 0: none",
    "sample_tokens": "tokens per sample",
    "sample_prompt": "the samples' prompt; empty: a new document",
    "progress": "show a progress bar",
    "tensorboard": "write TensorBoard events to out_dir/tensorboard (when installed)",
    "plot": "redraw out_dir/loss.png at every evaluation",
    "peak_tflops": "the device's peak for MFU, in TFLOP/s; 0: measure its matmul speed",
    "checkpoint_interval": "steps between checkpoints (also written at the end and on SIGINT/SIGTERM); "
                           "0: at every evaluation",
    "keep_last": "checkpoints kept besides the best by validation loss",
    "resume": "continue from out_dir/latest",
}


def config_fields() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


# What a bool key accepts on the command line (any case).
BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(key: str, value: Any, typ: type, source: str, parse: bool) -> Any:
    """`value` as `typ`: with `parse` (command-line text) strings are parsed, else type-checked."""
    if parse and isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                return BOOL_WORDS[text.lower()]
            return typ(text)
        except (ValueError, KeyError):
            raise ConfigError(f"{source}: {key} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool) \
            or not isinstance(value, typ):
        raise ConfigError(f"{source}: {key} expects {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def make_config(values: Mapping[str, Any], *, source: str = "config", base: TrainConfig | None = None,
                parse_strings: bool = False) -> TrainConfig:
    """A TrainConfig from `base` (default: the defaults) with `values` replaced, type-checked
    (`parse_strings`: values may also be command-line text such as "3e-4" or "true")."""
    fields = config_fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    typed = {k: _coerce(k, v, fields[k], source, parse_strings) for k, v in values.items()}
    cfg = dataclasses.replace(base or TrainConfig(), **typed)
    _validate(cfg, source)
    return cfg


def _validate(cfg: TrainConfig, source: str) -> None:
    if cfg.dtype not in ("float32", "bfloat16", "auto"):
        raise ConfigError(f"{source}: dtype must be 'float32', 'bfloat16' or 'auto', got {cfg.dtype!r}")
    kind, colon, index = cfg.device.partition(":")
    if not (cfg.device in ("auto", "cpu", "cuda") or kind == "cuda" and colon and index.isdigit()):
        raise ConfigError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    for k in ("batch_size", "max_steps", "log_interval", "eval_interval", "eval_batches", "keep_last"):
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{source}: {k} must be at least 1, got {getattr(cfg, k)}")
    for k in ("micro_batch_size", "warmup_steps", "lr_decay_steps", "n_layer", "n_head", "n_embd",
              "block_size", "sample_interval", "checkpoint_interval", "threads"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{source}: {k} must not be negative, got {getattr(cfg, k)}")
    for k in ("max_minutes", "weight_decay", "grad_clip", "eps", "peak_tflops"):
        if not getattr(cfg, k) >= 0:  # (also refuses NaN)
            raise ConfigError(f"{source}: {k} must not be negative, got {getattr(cfg, k)}")
    for k in ("dropout", "beta1", "beta2"):
        if not 0 <= getattr(cfg, k) < 1:
            raise ConfigError(f"{source}: {k} must be in [0, 1), got {getattr(cfg, k)}")
    if not 0 <= cfg.seed < 2**63:  # numpy's seed sequences refuse negatives; torch's, 2**64 and up
        raise ConfigError(f"{source}: seed must be in [0, 2**63), got {cfg.seed}")
    if not 0 < cfg.lr < math.inf:
        raise ConfigError(f"{source}: lr must be positive and finite, got {cfg.lr}")
    if 0 < cfg.lr_decay_steps < cfg.warmup_steps:
        raise ConfigError(f"{source}: lr_decay_steps ({cfg.lr_decay_steps}) ends the cosine decay before the "
                          f"warm-up ends (warmup_steps {cfg.warmup_steps}); expected lr_decay_steps >= warmup_steps")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ConfigError(f"{source}: expected 0 <= min_lr <= lr, got min_lr={cfg.min_lr}, lr={cfg.lr}")


def parse_overrides(args: Iterable[str]) -> dict[str, str]:
    """`--key value`, `--key=value` and bare `--flag` (true) into a dict; dashes become underscores."""
    out: dict[str, str] = {}
    args = list(args)
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"expected --key value, got {a!r}")
        key, eq, value = a[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        out[key] = value
        i += 1
    return out


BUNDLED_CONFIGS = Path(__file__).with_name("configs")  # shipped in the package: usable by name from any folder


def bundled_configs() -> list[str]:
    """Names of the run configs shipped with gpt2kit ("demo", "gpt2-124m", ...)."""
    return sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.toml"))


def _bare_name(path: str | os.PathLike) -> bool:
    """Whether `path` is a bare name as typed ("demo", not "./demo", "demo/" or "sub/demo")."""
    text = os.fspath(path)
    return (isinstance(text, str) and text not in ("", ".", "..")
            and not any(sep and sep in text for sep in (os.sep, os.altsep, "/")))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A bundled config's file where `path` is a bare name, with or without ".toml", of one of
    `bundled_configs()` and no such file is here (`gpt2kit train demo` works outside a checkout,
    from a wheel); else `path` itself (a local file of that name wins; a path is never redirected)."""
    p = Path(path)
    if p.is_file() or not _bare_name(path):
        return p
    bundled = BUNDLED_CONFIGS / (p.name if p.suffix == ".toml" else p.name + ".toml")
    return bundled if bundled.is_file() else p


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """A TOML file's values (a flat table of TrainConfig keys), then command-line overrides. A
    bare name that is no file here ("demo", "gpt2-124m.toml") is one of `bundled_configs()`."""
    cfg = TrainConfig()
    if path is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        p = resolve_config_path(path)
        try:
            values = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            hint = f" (bundled configs, by name: {', '.join(bundled_configs())})" if _bare_name(path) else ""
            raise ConfigError(f"{p}: no such config file{hint}") from None
        except IsADirectoryError:
            raise ConfigError(f"{p}: a folder; expected a TOML config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte offset {e.start}); expected a TOML config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"{p}: expected a flat table of keys, found section [{nested[0]}]; valid keys: {', '.join(config_fields())}")
        cfg = make_config(values, source=str(p))
    source = "overrides"  # a mapping from Python code; KEY=VALUE strings come from a command line
    if not isinstance(overrides, Mapping):
        overrides, source = parse_overrides(overrides), "command line"
    return make_config(overrides, source=source, base=cfg, parse_strings=True) if overrides else cfg


# ---------------------------------------------------------------------------------------------
# Schedule and loss (pure)


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The compute dtype a run uses: "auto" is bfloat16 where the device multiplies bf16 in
    hardware (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX) and float32 elsewhere.
    An explicit "bfloat16" on such a CPU is kept, with a warning: its bf16 products then run on
    fp32 units (`kernels.bf16_linear_widened`; PyTorch's own emulation is 4-5x slower), which
    keeps bf16's rounding but is no faster than float32."""
    import torch

    from . import kernels

    native = torch.cuda.is_bf16_supported() if device_type == "cuda" else kernels.native_bf16()
    if dtype == "auto":
        return "bfloat16" if native else "float32"
    if dtype == "bfloat16" and device_type == "cpu" and not native:
        log.warning("this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): bfloat16 autocast multiplies on fp32 "
                    "units here, with bf16 rounding but no faster than float32; dtype = 'auto' picks float32")
    return dtype


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup_steps` to `lr`,
    then cosine decay to `min_lr` at `decay_steps`, then `min_lr`.

    >>> lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=4, decay_steps=10)
    0.25
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def _lr_for(cfg: TrainConfig, step: int) -> float:
    return lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                 decay_steps=cfg.lr_decay_steps or cfg.max_steps)


_SCHEDULE = ("lr", "min_lr", "warmup_steps", "lr_decay_steps", "max_steps")


def _decay_end(saved: dict, default: int) -> int:
    """The step at which a saved run config's cosine decay ends (`default` where it is unknown)."""
    return saved.get("lr_decay_steps") or saved.get("max_steps") or default


def _warn_if_the_rate_moves(cfg: TrainConfig, saved: dict, step: int, source: Path) -> None:
    """Warn where a resumed run's learning rate at `step` is not the one its checkpoint's run
    would have used: a larger max_steps to continue a run stretches the cosine, and the rate jumps."""
    if not all(k in saved for k in _SCHEDULE):
        return
    before = dataclasses.replace(cfg, **{k: saved[k] for k in _SCHEDULE})
    now, then = _lr_for(cfg, step), _lr_for(before, step)
    if now == then:
        return
    changed = ", ".join(f"{k} {getattr(cfg, k)}, was {saved[k]}" for k in _SCHEDULE if getattr(cfg, k) != saved[k])
    decay = _decay_end(saved, step)
    keep = (f"; to keep the checkpoint's schedule, set lr_decay_steps = {decay}"
            if decay != (cfg.lr_decay_steps or cfg.max_steps) else "")
    log.warning("%s: the learning rate at step %d is %g in this schedule, %g in the checkpoint's (%s)%s",
                source, step, now, then, changed, keep)


def _import_torch():
    import torch

    return torch


class _LinearCrossEntropy:
    """Namespace for the autograd Functions, built lazily so that importing this module stays light."""

    fn = None
    embedding = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            torch = _import_torch()

            class LinearCrossEntropy(torch.autograd.Function):
                # Mean cross-entropy of softmax(h @ W^T) against targets, computed chunk by chunk:
                # each chunk's logits live only while its loss and its gradients (softmax - onehot)
                # are computed, so neither the (N, V) logits nor their softmax are kept for
                # backward, and the log-softmax backward pass disappears.
                @staticmethod
                def forward(ctx, h, weight, targets, chunk, tied):  # h (N, C), weight (V, C), targets (N,)
                    N = h.shape[0]
                    need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
                    dev = h.device.type
                    # The matmuls run in autocast's dtype (cast once here, not per chunk and per
                    # matmul as autocast would); the softmax and all sums stay float32.
                    from . import kernels

                    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
                    # On a CPU without bf16 arithmetic, bf16 numbers multiply on fp32 units
                    # (widened exactly: the same products, several times faster; see
                    # kernels.bf16_linear_widened); the logits then stay unrounded.
                    md = torch.float32 if kernels.bf16_on_fp32_units(cd, dev) else cd
                    # one pass per row over fp32 logits on CPU (kernels.softmax_xent_)
                    fused = md == torch.float32 and dev == "cpu" and kernels.available(torch.float32)
                    grad_h = torch.empty_like(h) if need else None
                    grad_w = None
                    total = torch.zeros((), dtype=torch.float32, device=h.device)
                    with torch.autocast(dev, enabled=False):
                        hcd, wcd = h.to(cd).to(md), weight.to(cd).to(md)
                        for s in range(0, N, chunk):
                            hc, tc = hcd[s:s + chunk], targets[s:s + chunk]
                            logits = kernels.addmm_(hc.new_empty(hc.shape[0], wcd.shape[0]), hc, wcd,
                                                    trans_b=True, beta=0)  # (n, V)
                            if fused:  # one pass per row: the losses, and logits -> N * dloss/dlogits
                                total += kernels.softmax_xent_(logits, tc.long()).sum()
                                p = logits
                            else:
                                # softmax once, and the loss from its target entries: one pass fewer
                                # than log_softmax + exp. A target probability that underflows (a
                                # loss above ~69 nats) gets its exact log-softmax instead.
                                p = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (n, V)
                                rows = torch.arange(len(tc), device=p.device)
                                pt = p[rows, tc]  # (n,)
                                small = pt < 1e-30
                                if bool(small.any()):
                                    exact = torch.log_softmax(logits[small], dim=-1, dtype=torch.float32)
                                    pt_log = pt.log().masked_scatter(small, exact.gather(1, tc[small][:, None])[:, 0])
                                else:
                                    pt_log = pt.log()
                                total -= pt_log.sum()
                                p[rows, tc] = pt - 1.0  # N * dloss/dlogits
                            if not need:
                                continue
                            if cd == torch.float32:  # the mean's 1/N: the matmuls' alpha
                                # (beta=0: the output's old contents are neither read nor copied)
                                kernels.addmm_(grad_h[s:s + chunk], p, wcd, alpha=1.0 / N, beta=0)  # (n, C)
                                if grad_w is None:
                                    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=h.device)
                                kernels.addmm_(grad_w, p, hc, trans_a=True, alpha=1.0 / N,
                                               beta=0 if s == 0 else 1)  # (V, C)
                                continue
                            # the mean's 1/N, fused into the cast
                            p = torch.mul(p, 1.0 / N, out=torch.empty(p.shape, dtype=cd, device=p.device)).to(md)
                            grad_h[s:s + chunk] = p @ wcd  # (n, C)
                            if grad_w is None:
                                grad_w = (p.t() @ hc).float()  # (V, C), accumulated in float32
                            else:
                                grad_w += p.t() @ hc
                    ctx.save_for_backward(grad_h, grad_w)
                    ctx.weight_dtype, ctx.tied = weight.dtype, tied
                    return total / N

                @staticmethod
                def backward(ctx, g):
                    grad_h, grad_w = ctx.saved_tensors
                    if not (g.device.type == "cpu" and bool(g == 1.0)):  # (else skip two passes)
                        grad_h, grad_w = grad_h * g, grad_w * g
                    grad_w = grad_w.to(ctx.weight_dtype)
                    if ctx.tied is not None:  # the token embedding's backward adds to it and returns it
                        ctx.tied.grad, grad_w = grad_w, None
                    return grad_h, grad_w, None, None, None

            class TokenEmbedding(torch.autograd.Function):
                # weight[ids], whose backward adds its rows into the output layer's gradient of the
                # same (tied) matrix, left by LinearCrossEntropy: no zero-filled (V, C) gradient
                # and no (V, C) sum of the two (for GPT-2's vocabulary 2 x 154 MB per step, page
                # faults included: ~3% of a 124M model's CPU training step)
                @staticmethod
                def forward(ctx, ids, weight, tied):
                    ctx.save_for_backward(ids)
                    ctx.tied, ctx.shape = tied, weight.shape
                    return torch.nn.functional.embedding(ids, weight)

                @staticmethod
                @torch.autograd.function.once_differentiable
                def backward(ctx, g):
                    # (adds into the tensor LinearCrossEntropy saved: a second backward over the
                    # same graph, retain_graph=True, is refused by autograd's in-place check)
                    (ids,) = ctx.saved_tensors
                    grad = ctx.tied.grad
                    ctx.tied.grad = None
                    if not ctx.needs_input_grad[1]:
                        return None, None, None
                    if grad is None:  # (the loss did not reach the output layer's weight)
                        grad = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
                    return None, grad.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]).to(grad.dtype)), None

            cls.fn = LinearCrossEntropy
            cls.embedding = TokenEmbedding
        return cls.fn


class _TiedGradient:
    """Carries the output layer's weight gradient to the token embedding's backward (see
    `_loss_module`)."""

    grad = None


def linear_cross_entropy(h, weight, targets, *, chunk: int | None = None, tied: _TiedGradient | None = None):
    """Mean next-token loss of hidden states `h` (..., C) under output matrix `weight` (V, C):
    equal to `F.cross_entropy(h @ weight.T, targets)` up to float rounding. With `tied`, the
    weight's gradient is left there for the token embedding's backward (`_loss_module`) instead
    of returned."""
    torch = _import_torch()
    C = h.shape[-1]
    if chunk is None:
        # About 128 MB of float32 logits per chunk (667 rows of GPT-2's vocabulary): taller
        # matmuls run closer to the peak, and the output layer's gradient is read and written
        # fewer times (for the 124M model on CPU, 5% faster than 256-row chunks)
        chunk = min(8192, max(512, (1 << 25) // weight.shape[0]))
    return _LinearCrossEntropy.get().apply(h.reshape(-1, C), weight, targets.reshape(-1), chunk, tied)


def clip_gradients(parameters, max_norm: float):
    """`clip_grad_norm_`, except that on CPU gradients whose norm is within `max_norm` are left
    alone instead of being multiplied by 1.0 (a pass over every gradient). Returns the norm."""
    torch = _import_torch()
    params = [p for p in parameters if p.grad is not None]
    norm = _total_norm([p.grad for p in params])
    if _needs_clipping(norm, max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def clip_and_step(optimizer, parameters, max_norm: float):
    """`clip_gradients(parameters, max_norm)` then `optimizer.step()`. For a fused AdamW on CPU
    the clipping costs no pass of its own: the optimizer divides the gradients by the clipping
    factor as it reads them (its `grad_scale`, the hook torch's GradScaler uses), and over fp32
    parameters the step is `adamw_step_cpu`'s, which leaves the gradients unclipped afterwards.
    Returns the norm (None without clipping)."""
    torch = _import_torch()
    if not max_norm:
        if not adamw_step_cpu(optimizer):
            optimizer.step()
        return None
    params = [p for p in parameters if p.grad is not None]
    norm = _total_norm([p.grad for p in params])
    fused_cpu = (isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
                 and all(type(p.grad) is torch.Tensor and p.grad.device.type == "cpu" for p in params))
    if not _needs_clipping(norm, max_norm):
        if not adamw_step_cpu(optimizer):
            optimizer.step()
    elif not fused_cpu:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        optimizer.step()
    else:
        scale = ((norm + 1e-6) / max_norm).to(torch.float32)  # grads / this = grads * clip factor
        if not adamw_step_cpu(optimizer, float(scale)):
            optimizer.grad_scale = scale
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale
    return norm


def adamw_step_cpu(optimizer, grad_scale: float = 1.0) -> bool:
    """`optimizer.step()` for a `torch.optim.AdamW(fused=True)` over fp32 CPU parameters, through
    gpt2kit's kernel (`kernels.adamw_`): the same state (step counts, moments; state_dict and
    checkpoints unchanged) and the same parameters (bit-identical where a tensor's size is a
    multiple of 16), in one pass over all tensors instead of one per tensor, ~20% less time here.
    Gradients are divided by `grad_scale` as they are read (the folded clipping) and, unlike in
    PyTorch's kernel, not written back. Returns False, having changed nothing, where it does not
    apply (another optimizer or option, CUDA, another dtype, step hooks, no kernels): the caller
    then runs `optimizer.step()`."""
    torch = _import_torch()
    from . import kernels
    from torch.optim import optimizer as optim_module

    if (type(optimizer) is not torch.optim.AdamW or optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks or optim_module._global_optimizer_pre_hooks
            or optim_module._global_optimizer_post_hooks):
        return False

    def plain(t) -> bool:
        return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
                and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())

    todo, storages = [], set()
    for group in optimizer.param_groups:
        hyper = [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]
        if (not group.get("fused") or group["amsgrad"] or group["maximize"] or group["capturable"]
                or group["differentiable"] or any(isinstance(h, torch.Tensor) for h in hyper)):
            return False  # (tensor hyperparameters: torch computes their coefficients otherwise)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.untyped_storage().data_ptr() in storages:
                return False  # a parameter listed twice, or sharing memory with another: updated in parallel
            storages.add(p.untyped_storage().data_ptr())
            state = optimizer.state.get(p, {})  # (a defaultdict: [p] would add an entry)
            moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
            if not (plain(p) and plain(p.grad) and all(plain(m) and m.shape == p.shape for m in moments)):
                return False
            todo.append((group, p))
    if not kernels.available(torch.float32):  # (checked after the devices: a CUDA run never builds them)
        return False
    params, grads, exp_avgs, exp_avg_sqs, coefficients = [], [], [], [], []
    for group, p in todo:
        state = optimizer.state[p]
        if "step" not in state:  # as torch's AdamW initializes a fused optimizer's state
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params.append(p.detach())
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        coefficients.append((1 - lr * wd, 1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2 ** step), eps,
                             -(lr / (1 - beta1 ** step))))
    if params and not kernels.adamw_(params, grads, exp_avgs, exp_avg_sqs, coefficients, grad_scale):
        raise RuntimeError("adamw_step_cpu: the AdamW kernel refused tensors it was checked to accept")
    optimizer._opt_called = True  # (what an LR scheduler's wrapper of optimizer.step records, for its order check)
    return True


def _total_norm(grads):
    torch = _import_torch()
    from . import kernels

    squares = kernels.sum_of_squares(grads)  # (3x faster than PyTorch's on CPU)
    return torch.nn.utils.get_total_norm(grads) if squares is None else torch.tensor(math.sqrt(squares))


def _needs_clipping(norm, max_norm: float) -> bool:
    # The scale is max_norm / (norm + 1e-6), capped at 1. On CPU a norm within max_norm needs no
    # pass over the gradients; elsewhere (CUDA: no host sync; FSDP's sharded DTensor norm) the
    # scale is always applied, as clip_grad_norm_ does.
    torch = _import_torch()
    return type(norm) is not torch.Tensor or norm.device.type != "cpu" or bool(norm + 1e-6 > max_norm)


def _loss_module(model):
    """An nn.Module whose forward is the training loss, so that DDP/FSDP see a plain forward."""
    torch = _import_torch()

    class LMLoss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            w, V = self.model.transformer.wte.weight, self.model.config.vocab_size
            if w.shape[0] != V:  # padded: the output layer reads a slice
                return linear_cross_entropy(self.model.hidden_states(x), w[:V], y)
            # The token embedding and the output layer share one matrix: its two gradients are
            # summed in place (see _LinearCrossEntropy's TokenEmbedding)
            tied = _TiedGradient()
            _LinearCrossEntropy.get()  # (builds the Functions)
            tokens = _LinearCrossEntropy.embedding.apply(x, w, tied)  # (B, T, C)
            h = self.model.hidden_states(x, token_embeddings=tokens)  # (B, T, C)
            return linear_cross_entropy(h, w, y, tied=tied)

    return LMLoss(model)


# ---------------------------------------------------------------------------------------------
# Throughput accounting


def flops_per_token(config, block_size: int) -> float:
    """Training FLOPs per token: 6 per parameter-token (forward + backward matmuls, the tied
    embedding counted once as the output layer) plus attention's 12 * L * C * T (PaLM, App. B)."""
    c = config
    n = 12 * c.n_layer * c.n_embd ** 2 + c.vocab_size * c.n_embd
    return 6 * n + 12 * c.n_layer * c.n_embd * block_size


_PEAKS: dict[tuple[str, str], float] = {}


def measure_matmul_peak(device: str = "cpu", dtype: str = "float32") -> float:
    """This machine's best measured matmul FLOP/s (square matrices), the denominator of MFU. On a
    CPU without bf16 arithmetic, bf16's is float32's if that is higher: gpt2kit multiplies bf16
    numbers on float32 units there (see kernels.bf16_linear_widened)."""
    key = (device, dtype)
    if key not in _PEAKS:
        from . import kernels

        _PEAKS[key] = _time_matmul(device, dtype)
        if kernels.bf16_on_fp32_units(getattr(_import_torch(), dtype), device):
            _PEAKS[key] = max(_PEAKS[key], measure_matmul_peak(device, "float32"))
    return _PEAKS[key]


def _time_matmul(device: str, dtype: str) -> float:
    torch = _import_torch()
    dt = getattr(torch, dtype)
    n = 1024 if device == "cpu" else 8192
    g = torch.Generator(device=device).manual_seed(0)  # leaves the run's random streams alone
    a = torch.randn(n, n, device=device, generator=g).to(dt)
    b = torch.randn(n, n, device=device, generator=g).to(dt)
    out = torch.empty_like(a)
    from . import kernels

    best = 0.0
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if device == "cpu":
            kernels.addmm_(out, a, b, beta=0)  # the GEMM training's fp32 products run on (kernels.gemm)
        else:
            torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


# ---------------------------------------------------------------------------------------------
# Checkpoints


CHECKPOINT_DIR = "checkpoints"
INDEX = "checkpoints.json"
TRAINER_STATE = "trainer.pt"


class Checkpoints:
    """Checkpoint folders under `out_dir/checkpoints/step_NNNNNNN`, each a complete model folder
    (loadable by `gpt2kit generate` and transformers) plus `trainer.pt` (optimizer, schedule,
    RNG). A folder is written under a temporary name and renamed when complete, then the index
    (`checkpoints.json`) and the `latest`/`best` links are replaced atomically, and only then are
    old folders deleted: a crash or a full disk at any point leaves the last good one in place, and
    the next save removes the folders such a crash left half written or half deleted."""

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 2):
        self.out = Path(out_dir)
        self.root = self.out / CHECKPOINT_DIR
        self.keep_last = keep_last

    def index(self) -> dict:
        path = self.out / INDEX
        if not path.exists():
            return {"checkpoints": [], "latest": None, "best": None}
        try:
            idx = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid checkpoint index ({e}); the checkpoint folders are in "
                                  f"{self.root}") from None
        if not isinstance(idx, dict) or not {"checkpoints", "latest", "best"} <= idx.keys():
            raise CheckpointError(f"{path}: not a checkpoint index (expected keys checkpoints, latest, best)")
        return idx

    def latest(self) -> Path | None:
        """The index's latest checkpoint; where its folder was removed (a damaged one, as the error
        that reports it says), the newest one before it that is still there."""
        idx = self.index()
        name = idx["latest"]
        if not name or (self.root / name).is_dir():
            return self.root / name if name else None
        limit = next((e["step"] for e in idx["checkpoints"] if e["name"] == name), math.inf)
        present = [e for e in self._present(idx["checkpoints"]) if e["step"] < limit]
        return self.root / max(present, key=lambda e: e["step"])["name"] if present else None

    def _present(self, entries: list[dict]) -> list[dict]:
        return [e for e in entries if (self.root / e["name"]).is_dir()]

    def save(self, step: int, write_model, trainer_state: dict, val_loss: float | None) -> Path:
        torch = _import_torch()
        name = f"step_{step:07d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write_model(tmp)
            with atomic_path(tmp / TRAINER_STATE) as p:
                torch.save(trainer_state, p)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                last = self.index()["latest"]
                raise CheckpointError(f"{final}: cannot write the checkpoint ({e.strerror or e}); "
                                      f"the last good one is {self.root / last if last else 'none'}") from e
            raise
        idx = self.index()
        entries = [e for e in self._present(idx["checkpoints"]) if e["name"] != name]
        entries.append({"name": name, "step": step, "val_loss": val_loss})
        scored = [e for e in entries if e["val_loss"] is not None]
        best = min(scored, key=lambda e: (e["val_loss"], -e["step"]))["name"] if scored else None
        keep = {e["name"] for e in sorted(entries, key=lambda e: e["step"])[-self.keep_last:]} | {best}
        idx = {"checkpoints": [e for e in entries if e["name"] in keep], "latest": name, "best": best}
        write_json(self.out / INDEX, idx)
        self._link("latest", name)
        if best:
            self._link("best", best)
        # Besides the checkpoints dropped from the index: what a process killed while saving left,
        # a half-written temporary folder or a half-deleted old one (the index never names them)
        for folder in list(self.root.iterdir()):
            if folder.name not in keep and re.fullmatch(r"\.?step_\d+(\.tmp)?", folder.name):
                shutil.rmtree(folder, ignore_errors=True)
        return final

    def _link(self, link: str, name: str) -> None:
        tmp = self.out / f".{link}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(Path(CHECKPOINT_DIR) / name, tmp)
        os.replace(tmp, self.out / link)


def load_trainer_state(folder: Path) -> dict:
    torch = _import_torch()
    path = folder / TRAINER_STATE
    if not path.exists():
        raise CheckpointError(f"{folder}: not a training checkpoint (no {TRAINER_STATE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and tensor errors alike: the file is damaged
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable training state ({reason[:120]}); the checkpoint is damaged: "
                              f"remove {folder} to resume from the one before it") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a gpt2kit training state (expected a dict with a 'step')")
    return state


# ---------------------------------------------------------------------------------------------
# Watching: metrics JSONL, TensorBoard, the loss plot


class Monitor:
    """Rank 0's outputs: metrics.jsonl, TensorBoard events, loss.png."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, resume_step: int | None):
        self.out = out_dir
        self.path = out_dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            # Drop what the interrupted run logged after its checkpoint: those steps run again.
            for r in _read_metrics(self.path):
                if r["step"] <= resume_step:  # a step's records are all written before its checkpoint
                    self.records.append(r)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(self.path, "a")
        self.tb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard hides events from purge_step on: the steps that run again, after
                # the checkpoint's own (logged before it was saved, as in metrics.jsonl)
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                log.debug("tensorboard is not installed: no event files")
        self.plot = cfg.plot

    def log(self, record: dict) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def refresh_plot(self) -> Path | None:
        if not self.plot:
            return None
        return plot_losses(self.records, self.out / "loss.png")

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short (the process was killed while
    appending it) is dropped, as it would be logged again."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise TrainError(f"{path}: line {number} is not JSON; repair or remove the file to resume") from None
            log.warning("%s: dropping its last line, cut short: %r", path, line[:80])
    return records


def plot_losses(records: list[dict], path: str | os.PathLike) -> Path | None:
    """Train and validation loss against step, as a PNG (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'gpt2kit[plot]'): no loss plot")
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # under torchrun even one rank goes through torch.distributed, so that a one-GPU launch runs
    # the code path of many (a plain `python -m gpt2kit train` stays one undistributed process)
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)


def _all_mean(value, dist_: _Dist):
    if dist_.enabled:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist_.world
    return value


def _every_rank(value, dist_: _Dist) -> list:
    """`value` as each rank has it, in rank order (a collective)."""
    import torch.distributed as dist

    seen: list = [None] * dist_.world
    dist.all_gather_object(seen, value)
    return seen


def data_content(meta: dict) -> str:
    """A short hash of prepared shards' content as their meta.json describes it (tokenizer, shard
    names and token counts), not of where their inputs were read from."""
    import hashlib

    content = json.dumps({"tokenizer": meta["tokenizer"]["fingerprint"], "splits": meta["splits"]}, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:12]


def _check_same_data(meta: dict, dist_: _Dist, folder: str) -> None:
    """Refuse, on every rank, shards that differ between machines (the same path, other
    contents): each rank would read its own corpus at the batch's offsets, silently. Compared
    by content (tokenizer, shard names and counts), not by meta.json, which records where the
    inputs were read from."""
    seen = _every_rank(data_content(meta), dist_)
    if len(set(seen)) > 1:
        views = ", ".join(f"rank {r}: {h}" for r, h in enumerate(seen))
        raise TrainError(f"{folder}: the ranks read different prepared data ({views}); every machine needs the "
                         "same shards (copy the folder, or prepare it with the same inputs and settings)")


# Settings that may differ between machines: paths and hardware, and what only rank 0 uses.
_PER_MACHINE = ("data", "out_dir", "device", "threads", "progress", "tensorboard", "plot", "peak_tflops", "keep_last")


def _check_same_settings(cfg: TrainConfig, dist_: _Dist) -> None:
    """Refuse, on every rank, settings that differ between ranks (one machine's command line
    with another value): another lr or weight decay lets the ranks' copies of the weights drift
    apart silently; another batch size or interval mismatches the collectives (a hang)."""
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _PER_MACHINE}
    seen = _every_rank(mine, dist_)
    # init_from is a path, which may differ between machines: here only whether one is given;
    # what it holds is compared once loaded (_check_same_weights)
    same = {"init_from": lambda s: bool(s["init_from"])}
    differ = [k for k in mine if len({repr(same.get(k, lambda s: s[k])(s)) for s in seen}) > 1]
    if differ:
        views = "; ".join(f"{k} (" + ", ".join(f"rank {r}: {s[k]!r}" for r, s in enumerate(seen)) + ")"
                          for k in differ)
        raise TrainError(f"the ranks run different settings: {views}; give every machine the same config and options")


def _check_same_weights(model, init_from: str, dist_: _Dist) -> None:
    """Refuse, on every rank, an init_from that loaded other weights or another config on some
    machine (the same name, other files): DDP would silently train rank 0's weights, FSDP a mix."""
    seen = _every_rank(weights_fingerprint(model), dist_)
    if len(set(seen)) > 1:
        views = ", ".join(f"rank {r}: {fp[:12]}" for r, fp in enumerate(seen))
        raise TrainError(f"init_from {init_from!r}: the ranks loaded different weights ({views}); every machine "
                         "needs the same model files (the paths may differ)")


def weights_fingerprint(model) -> str:
    """A sha256 of the model's config and of every parameter and buffer (name, dtype, shape and
    bytes): equal on any machine for equal weights, whatever their path. The tensors are hashed
    in threads (hashlib releases the GIL): ~1.4 GB/s per core, 0.4 s for the 124M model here."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    torch = _import_torch()
    tensors = [*model.named_parameters(), *model.named_buffers()]  # (a tied matrix once)

    def digest(item) -> str:
        name, t = item
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return f"{name} {t.dtype} {tuple(t.shape)} {hashlib.sha256(memoryview(raw)).hexdigest()}"

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        lines = list(pool.map(digest, tensors))
    config = json.dumps(dataclasses.asdict(model.config), sort_keys=True)
    return hashlib.sha256("\n".join([config, *lines]).encode()).hexdigest()


def _check_same_checkpoint(resume_from: Path | None, dist_: _Dist, out: Path) -> None:
    """Refuse, on every rank, a resume where the ranks found different checkpoints: on machines
    that do not share out_dir, the others would start over at step 0, and their collectives
    would stop matching (a hang until the process group's timeout)."""
    seen = _every_rank(resume_from.name if resume_from is not None else None, dist_)
    if len(set(seen)) > 1:
        views = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(seen))
        raise TrainError(f"{out}: the ranks see different checkpoints to resume from ({views}); under torchrun "
                         "on several machines, out_dir must be one folder shared by all machines")


# Why a run stops early, weakest first: where ranks differ, the strongest wins on all of them.
_STOP_REASONS = (None, "time", "SIGTERM", "SIGINT")


def _stop_reason(mine: str | None, dist_: _Dist, device) -> str | None:
    if not dist_.enabled:
        return mine
    torch = _import_torch()
    import torch.distributed as dist

    t = torch.tensor([float(_STOP_REASONS.index(mine))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return _STOP_REASONS[int(t.item())]


# ---------------------------------------------------------------------------------------------
# The training run


def _resolve_device(cfg: TrainConfig, dist_local_rank: int):
    torch = _import_torch()
    if cfg.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = cfg.device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {cfg.device!r}: CUDA is not available")
        count = torch.cuda.device_count()
        if ":" in cfg.device:
            index = int(cfg.device.split(":")[1])
            if index >= count:
                raise TrainError(f"device {cfg.device!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        else:
            index = dist_local_rank
            if index >= count:
                raise TrainError(f"device 'cuda': local rank {index} has no GPU: this machine has {count} GPU(s); "
                                 f"start at most {count} processes per machine (torchrun --nproc_per_node)")
        return torch.device("cuda", index)
    if kind != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    return torch.device("cpu")


def _model_config(cfg: TrainConfig, vocab_size: int):
    from .model import GPT2Config

    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
    base = GPT2Config.from_preset(cfg.model, **overrides)
    n_ctx = max(base.n_ctx, cfg.block_size)
    return dataclasses.replace(base, vocab_size=vocab_size, n_ctx=n_ctx, dropout=cfg.dropout)


def _tokenizer_fingerprint_of(source: str) -> str | None:
    from .tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(source).fingerprint
    except GPT2KitError:
        return None


def _build_model(cfg: TrainConfig, meta: dict):
    """(model, tokenizer) for a fresh run: from scratch or from a pretrained checkpoint."""
    from .model import GPT2
    from .tokenizer import Tokenizer

    n_vocab = meta["tokenizer"]["n_vocab"]
    tokenizer = Tokenizer.from_pretrained(str(Path(cfg.data) / meta["tokenizer"]["folder"]))
    if tokenizer.fingerprint != meta["tokenizer"]["fingerprint"]:
        raise TrainError(f"{cfg.data}/tokenizer: does not match the fingerprint in meta.json")
    if cfg.init_from:
        model = GPT2.from_pretrained(cfg.init_from)
        for key in ("n_layer", "n_head", "n_embd"):  # (0: the checkpoint's, as a preset's for a new model)
            wanted, have = getattr(cfg, key), getattr(model.config, key)
            if wanted and wanted != have:
                raise TrainError(f"{key} {wanted} differs from init_from {cfg.init_from}'s {have}: fine-tuning keeps "
                                 f"the checkpoint's shape; set {key} to 0 or {have}")
        fp = _tokenizer_fingerprint_of(cfg.init_from)
        if fp is not None and fp != meta["tokenizer"]["fingerprint"]:
            raise TrainError(f"init_from {cfg.init_from}: its tokenizer differs from the one that made the "
                             f"shards in {cfg.data} (vocabulary mismatch); prepare the data with --tokenizer {cfg.init_from}")
        if model.config.vocab_size < n_vocab:
            raise TrainError(f"init_from {cfg.init_from}: vocab_size {model.config.vocab_size} < the shards' {n_vocab} tokens")
        if cfg.dropout != model.config.dropout:
            model.config = dataclasses.replace(model.config, dropout=cfg.dropout)
            for m in model.modules():
                if isinstance(m, _import_torch().nn.Dropout):
                    m.p = cfg.dropout
                if hasattr(m, "dropout") and isinstance(m.dropout, float):
                    m.dropout = cfg.dropout
    else:
        model = GPT2(_model_config(cfg, n_vocab))
    return model, tokenizer


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear weights, embeddings), not on biases or LayerNorm gains."""
    decay, no_decay = [], []
    for p in model.parameters():  # a tied parameter appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(cfg: TrainConfig, model, device, fsdp: bool):
    torch = _import_torch()
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if not fsdp:
        # One fused kernel over all parameters (CPU and CUDA); ~10% faster steps on CPU here,
        # where clip_and_step runs the same arithmetic in gpt2kit's kernel (adamw_step_cpu).
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), **kwargs)
    except (RuntimeError, TypeError):
        kwargs.pop("fused", None)
        return torch.optim.AdamW(_decay_groups(model, cfg.weight_decay), foreach=True, **kwargs)


def _rng_state(device) -> dict:
    torch = _import_torch()
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch = _import_torch()
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


_COMPARED = ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx")


def _all_finite(params, dist_, device) -> bool:
    """Whether every parameter is finite, on every rank (an FSDP rank checks its own shard)."""
    torch = _import_torch()
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in params]
    ok = (torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)).float()
    if dist_.enabled:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def _check_finite(what: str, loss: float, step: int, cfg: TrainConfig, ckpts: "Checkpoints") -> None:
    """Stop a run that diverged before it saves a checkpoint of NaN weights (as the best one)."""
    if not math.isfinite(loss):
        last = ckpts.latest()
        raise TrainError(f"step {step}: the {what} is {loss}: the run diverged (lr {cfg.lr:g} too high?); nothing "
                         f"more is saved; the last checkpoint is {last or 'none'}")


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; return a summary (steps, losses, checkpoint paths, timing)."""
    torch = _import_torch()
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:  # `threads` is this run's setting, not the calling program's
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> dict:
    torch = _import_torch()
    from . import data as D

    if not cfg.data:
        raise ConfigError("data: no prepared shard folder given (set data = \"DIR\" or --data DIR)")
    meta = D.read_meta(cfg.data)
    train_data = D.TokenStream(cfg.data, "train")
    val_data = D.TokenStream(cfg.data, "val") if meta["splits"]["val"]["tokens"] > 1 else None

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device_kind = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device.startswith("cuda") else "cpu"
    dist_ = _init_distributed(device_kind)
    device = _resolve_device(cfg, dist_.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist_.enabled:
        _check_same_settings(cfg, dist_)
        _check_same_data(meta, dist_, cfg.data)
    if cfg.fsdp and not dist_.enabled:
        log.info("fsdp = true with one process: nothing to shard, training unsharded")
    world = dist_.world
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (micro * world):
        raise TrainError(f"batch_size {cfg.batch_size} does not divide across {world} rank(s) x "
                         f"micro_batch_size {micro}: it must be a multiple of {max(1, micro) * world}")
    accum = cfg.batch_size // (micro * world)

    out = check_output_path(cfg.out_dir, folder=True, what="out_dir", error=TrainError)  # before the model is built
    ckpts = Checkpoints(out, cfg.keep_last)
    resume_from = ckpts.latest() if cfg.resume else None
    named = ckpts.index()["latest"]  # what the index names; resume_from: what is there
    if cfg.resume and dist_.main and named not in (None, getattr(resume_from, "name", None)):
        log.warning("%s: missing; resuming from the checkpoint before it (%s)",
                    ckpts.root / named, resume_from or "none: starting over")
    if cfg.resume and dist_.enabled:
        _check_same_checkpoint(resume_from, dist_, out)
    if cfg.resume and resume_from is None:
        if dist_.main and named is None:  # (else just said, with what is missing)
            # a warning: the first start of a requeued job, or a mistyped out_dir that trains from zero
            log.warning("%s: no checkpoint to resume from; starting from scratch", out)
    elif not cfg.resume and ckpts.latest() is not None:
        raise TrainError(f"{out}: already holds checkpoints; pass --resume to continue, or choose another out_dir")

    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        from .model import GPT2
        from .tokenizer import Tokenizer

        state = load_trainer_state(resume_from)
        if state["step"] > cfg.max_steps:
            raise TrainError(f"{resume_from}: the run is already at step {state['step']}, past max_steps "
                             f"{cfg.max_steps}; pass a larger --max_steps to continue it (with --lr_decay_steps "
                             f"{_decay_end(state.get('config', {}), state['step'])} to keep its learning-rate schedule)")
        if state["step"] == cfg.max_steps:  # done: a requeued job that resumes it has nothing to do
            if dist_.main:  # (said once, not once per rank)
                log.info("%s: the run is already at max_steps %d: nothing to train", resume_from, cfg.max_steps)
            if dist_.enabled:
                import torch.distributed as dist

                dist.destroy_process_group()
            return {"step": state["step"], "start_step": state["step"], "nothing_to_do": True,
                    "checkpoint": str(resume_from), "world_size": world, "out_dir": str(out),
                    "best_val_loss": state.get("best_val_loss"), "rank": dist_.rank}
        try:
            model = GPT2.from_pretrained(str(resume_from))
        except GPT2KitError as e:  # its trainer state read, so a folder this run wrote, damaged since
            raise CheckpointError(f"{e}; the checkpoint is damaged: remove {resume_from} to resume from the one "
                                  f"before it") from None
        tokenizer = Tokenizer.from_pretrained(str(Path(cfg.data) / meta["tokenizer"]["folder"]))
        if state["data_fingerprint"] != meta["tokenizer"]["fingerprint"]:
            raise CheckpointError(f"{resume_from}: trained on shards of another tokenizer than {cfg.data} (vocabulary mismatch)")
        expected = _model_config(cfg, meta["tokenizer"]["n_vocab"]) if not cfg.init_from else None
        saved = state["model_config"]
        if expected is not None:
            diff = [k for k in _COMPARED if getattr(expected, k) != saved[k]]
            if diff:
                raise CheckpointError(f"{resume_from}: checkpoint of another model config ("
                                      + ", ".join(f"{k}={saved[k]} vs {getattr(expected, k)} configured" for k in diff) + ")")
        if model.config.dropout != cfg.dropout:
            raise CheckpointError(f"{resume_from}: trained with dropout {model.config.dropout}, configured {cfg.dropout}")
        seed = state.get("config", {}).get("seed", cfg.seed)
        if seed != cfg.seed:  # a command-line --seed is not in the run's TOML: easy to leave out on --resume
            raise CheckpointError(f"{resume_from}: trained with seed {seed}, configured {cfg.seed}: the batches and "
                                  f"validation windows would change; pass --seed {seed}")
        if dist_.main:
            _warn_if_the_rate_moves(cfg, state.get("config", {}), state["step"], resume_from)
            saved_cfg, n_ctx = state.get("config", {}), model.config.n_ctx
            now = {"block_size": cfg.block_size or n_ctx, "batch_size": cfg.batch_size}  # (block 0: the context)
            then = {k: (saved_cfg[k] or n_ctx) if k == "block_size" else saved_cfg[k] for k in now if k in saved_cfg}
            changed = [f"{k} {now[k]}, was {then[k]}" for k in then if then[k] != now[k]]
            if changed:  # (a continued run may mean it: say that it is no longer the uninterrupted one)
                log.warning("%s: resumed with other batches (%s): from step %d on, the run differs from one that "
                            "was never stopped", resume_from, "; ".join(changed), state["step"])
            if state.get("data_content", data_content(meta)) != data_content(meta):  # (a continued run may mean it)
                log.warning("%s: trained on other shards than %s (the same tokenizer, other shard names or token "
                            "counts): the batches from step %d on come from these", resume_from, cfg.data, state["step"])
    else:
        state = None
        model, tokenizer = _build_model(cfg, meta)
        preset = _model_config(dataclasses.replace(cfg, block_size=0), meta["tokenizer"]["n_vocab"]).n_ctx
        if dist_.main and not cfg.init_from and model.config.n_ctx > preset:  # a typo (100000): minutes a step, unsaid
            log.warning("block_size %d is longer than %s's context (%d): the model is built with n_ctx %d, and "
                        "attention's cost grows with its square", cfg.block_size, cfg.model, preset, model.config.n_ctx)
        if dist_.enabled and cfg.init_from:  # (every rank or none: whether init_from is set is compared)
            _check_same_weights(model, cfg.init_from, dist_)
    mc = model.config
    block = cfg.block_size or mc.n_ctx
    if block > mc.n_ctx:
        raise TrainError(f"block_size {block} exceeds the model's context n_ctx={mc.n_ctx}")
    if len(train_data) < block + 1:  # (checked here, before out_dir is written, and naming both)
        raise TrainError(f"{cfg.data}: {len(train_data):,} training tokens are fewer than one window of "
                         f"block_size + 1 = {block + 1:,}; lower block_size or prepare more text")
    if meta["tokenizer"]["n_vocab"] > mc.vocab_size:
        raise TrainError(f"{cfg.data}: shards hold token ids up to {meta['tokenizer']['n_vocab'] - 1}, "
                         f"the model's vocab_size is {mc.vocab_size} (vocabulary mismatch)")
    model.to(device)
    raw_model = model

    loss_mod = _loss_module(model)
    if dist_.enabled and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for blk in model.transformer.h:
            fully_shard(blk)
        fully_shard(loss_mod)
        wrapped = loss_mod
    elif dist_.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(loss_mod, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = loss_mod
    step_fn = torch.compile(wrapped) if cfg.compile else wrapped

    optimizer = _make_optimizer(cfg, loss_mod, device, cfg.fsdp and dist_.enabled)
    start_step = 0
    best_val = math.inf
    tokens_seen = 0
    if state is not None:
        _load_optimizer(optimizer, loss_mod, state["optimizer"], cfg.fsdp and dist_.enabled, resume_from)
        start_step = state["step"]
        best_val = state.get("best_val_loss", math.inf)
        tokens_seen = state.get("tokens_seen", 0)
        rngs = state["rng"]
        if len(rngs) == world:
            _set_rng_state(rngs[dist_.rank], device)
        else:
            if dist_.main:
                log.warning("%s: saved with %d rank(s), resuming with %d: RNG streams re-seeded", resume_from,
                            len(rngs), world)
            torch.manual_seed(cfg.seed + start_step + dist_.rank)
        if dist_.main:
            log.info("resuming from %s (step %d)", resume_from, start_step)
    else:
        torch.manual_seed(cfg.seed + dist_.rank)  # dropout streams differ per rank

    dtype = resolve_dtype(cfg.dtype, device.type)
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    # one device's peak: MFU divides each rank's share of the global tokens/s by it
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else (
        measure_matmul_peak(device.type, dtype) if dist_.main else 1.0)
    fpt = flops_per_token(mc, block)
    monitor = Monitor(out, cfg, start_step if state is not None else None) if dist_.main else None
    eval_offsets = None
    if val_data is not None:
        # eval_batches global batches of fixed windows: the same set for any number of ranks
        eval_offsets = D.step_offsets(cfg.seed, 0, len(val_data), min(block, len(val_data) - 1),
                                      cfg.eval_batches * cfg.batch_size, stream=1)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def evaluate() -> float | None:
        if val_data is None:
            return None
        vb = min(block, len(val_data) - 1)
        model.eval()
        total = torch.zeros((), device=device)
        parts = D.micro_offsets(eval_offsets, rank=dist_.rank, world_size=world, grad_accum=cfg.eval_batches * accum)
        with torch.no_grad():
            for offs in parts:
                x, y = D.get_batch(val_data, offs, vb)
                with autocast():
                    # eager: compiling the no-grad eval graph too would cost more than a few evaluations take
                    total += wrapped(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)).float()
        model.train()
        return float(_all_mean(total / len(parts), dist_))

    def save(step: int, val_loss: float | None) -> Path | None:
        # the losses are checked only where they are logged, and before the step's update: the
        # weights themselves are, before any of them is written
        if not _all_finite(loss_mod.parameters(), dist_, device):
            raise TrainError(f"step {step}: the weights are NaN or infinite: the run diverged (lr {cfg.lr:g} too "
                             f"high?); not saved; the last checkpoint is {ckpts.latest() or 'none'}")
        model_sd, optim_sd = _gather_states(loss_mod, optimizer, cfg.fsdp and dist_.enabled)
        rngs = _gather_rng(device, dist_)
        path = None
        if dist_.main:
            trainer_state = {
                "step": step, "optimizer": optim_sd, "rng": rngs, "best_val_loss": best_val,
                "tokens_seen": tokens_seen, "config": dataclasses.asdict(cfg),
                "model_config": dataclasses.asdict(mc), "data_fingerprint": meta["tokenizer"]["fingerprint"],
                "data_content": data_content(meta),
            }

            def write_model(folder: Path) -> None:
                if model_sd is not None:
                    from .model import GPT2

                    full = GPT2(mc)
                    full.load_state_dict(model_sd)
                    full.save_pretrained(str(folder), tokenizer=tokenizer)
                else:
                    raw_model.save_pretrained(str(folder), tokenizer=tokenizer)

            path = ckpts.save(step, write_model, trainer_state, val_loss)
        if dist_.enabled:
            import torch.distributed as dist

            dist.barrier()
        return path

    stop = {"signal": None}

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if stop["signal"] is not None:  # already stopping: the first signal names the stop
            # A second Ctrl-C: now (a checkpoint being written is left out whole). Under torchrun
            # the workers have sessions of their own, so the terminal's Ctrl-C reaches torchrun
            # alone, which forwards the first as SIGINT and answers a second with SIGTERM: that
            # SIGTERM is the user's second Ctrl-C. Elsewhere a SIGTERM during a Ctrl-C stop (a
            # process manager's) lets the stop that is under way finish with its checkpoint.
            if signum == signal.SIGINT or (stop["signal"] == "SIGINT" and "TORCHELASTIC_RUN_ID" in os.environ):
                raise KeyboardInterrupt
            return
        stop["signal"] = name
        if dist_.main:  # (os.write: a signal handler must not take the logging or tqdm locks)
            with contextlib.suppress(OSError):  # (stderr closed: the stop goes on all the same)
                os.write(2, f"\n{name}: stopping after this step, with a checkpoint (Ctrl-C again: now, "
                            "without one)\n".encode())

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            old_handlers[sig] = signal.signal(sig, on_signal)

    bar = None
    if dist_.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    if dist_.main:
        ranks = f"{world} rank(s)"
        if dist_.enabled:
            import torch.distributed as tdist

            ranks += f" over {tdist.get_backend()}, {'fsdp' if cfg.fsdp else 'ddp'}"
        log.info("model %s: %.2fM parameters, block %d, batch %d x %d tokens (%s x %d micro x %d accumulation), %s",
                 cfg.init_from or cfg.model, raw_model.num_params() / 1e6, block, cfg.batch_size, block,
                 ranks, micro, accum, dtype)

    t_start = time.perf_counter()
    t_last, logged_step = t_start, start_step  # (a resumed run's first interval may be short)
    tokens_per_step = cfg.batch_size * block
    ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
    step = start_step
    last_loss = math.nan
    last_val: float | None = None
    saved_at = -1
    stopped = None
    model.train()
    try:
        while step < cfg.max_steps:
            lr = _lr_for(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            offs = D.step_offsets(cfg.seed, step, len(train_data), block, cfg.batch_size)
            parts = D.micro_offsets(offs, rank=dist_.rank, world_size=world, grad_accum=accum)
            loss_sum = torch.zeros((), device=device)
            for i, m in enumerate(parts):
                x, y = D.get_batch(train_data, m, block)
                x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                sync = contextlib.nullcontext()
                if dist_.enabled and not cfg.fsdp and i < accum - 1:
                    sync = wrapped.no_sync()  # all-reduce gradients once, after the last micro-batch
                with sync:
                    with autocast():
                        loss = step_fn(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = clip_and_step(optimizer, loss_mod.parameters(), cfg.grad_clip)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            out_of_time = bool(cfg.max_minutes) and (time.perf_counter() - t_start) > 60 * cfg.max_minutes
            # All ranks stop together, for one reason (a signal may reach only some of them), and
            # log their last step; a stop on the last step is no stop: the run is complete.
            reason = _stop_reason(stop["signal"] or ("time" if out_of_time else None), dist_, device)
            if reason and step < cfg.max_steps:
                stopped = reason
            if step % cfg.log_interval == 0 or step == cfg.max_steps or stopped:
                last_loss = float(_all_mean(loss_sum / accum, dist_))
                _check_finite("training loss", last_loss, step, cfg, ckpts)  # (the same on every rank)
                if dist_.main:
                    now = time.perf_counter()
                    tps = tokens_per_step * (step - logged_step) / max(now - t_last, 1e-9)
                    t_last, logged_step = now, step
                    rec = {"step": step, "loss": last_loss, "lr": lr, "tok_per_s": round(tps, 1),
                           "mfu": round(tps / world * fpt / peak, 4), "tokens": tokens_seen,
                           "time_s": round(now - t_start, 3)}
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    monitor.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                        mfu=f"{100 * rec['mfu']:.1f}%", refresh=False)
            if bar is not None:
                bar.update(1)
            val_loss = None
            # A signal's stop saves at once, without its evaluation: torchrun SIGKILLs its workers
            # --shutdown-timeout seconds (30) after forwarding the signal, and a long evaluation
            # (eval_batches) there lost the checkpoint. The time limit's stop keeps it: nothing kills.
            signal_stop = stopped in ("SIGINT", "SIGTERM")
            if (step % cfg.eval_interval == 0 or step == cfg.max_steps or stopped) and not signal_stop:
                val_loss = evaluate()
                if val_loss is not None:
                    _check_finite("validation loss", val_loss, step, cfg, ckpts)
                    last_val = val_loss
                    best_val = min(best_val, val_loss)
                    if dist_.main:
                        monitor.log({"step": step, "val_loss": val_loss})
                        monitor.refresh_plot()
            if cfg.sample_interval and step % cfg.sample_interval == 0 and not signal_stop:
                # sharded blocks all-gather their weights in forward: rank 0 alone would run
                # collectives the others never join, so it samples from a gathered copy
                sampler = _unsharded_copy(loss_mod, mc, dist_) if cfg.fsdp and dist_.enabled else raw_model
                if dist_.main:
                    text = sample_text(sampler, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed + step)
                    monitor.log({"step": step, "sample": text})
                    (bar.write if bar is not None else log.info)(f"--- sample at step {step} ---\n{text}")
            if step % ckpt_every == 0 or step == cfg.max_steps or stopped:
                save(step, val_loss)
                saved_at = step
            if stopped:
                break
    except BaseException:
        if dist_.main:  # a run that stops with an error (diverged, a full disk) keeps its TensorBoard events
            monitor.close()
        raise
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if bar is not None:
            bar.close()
    plot = None
    if dist_.main:
        plot = monitor.refresh_plot()
        monitor.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        # (a signal's stop is not evaluated: an earlier step's val loss would pass for the last one's)
        "step": step, "start_step": start_step, "loss": last_loss,
        "val_loss": None if stopped in ("SIGINT", "SIGTERM") else last_val,
        "best_val_loss": best_val if best_val < math.inf else None, "stopped": stopped,
        "elapsed_s": elapsed, "tokens_per_s": (step - start_step) * tokens_per_step / max(elapsed, 1e-9),
        "checkpoint": str(ckpts.latest()) if dist_.main and saved_at >= 0 else None,
        "best_checkpoint": str(out / "best") if dist_.main and (out / "best").exists() else None,
        "plot": str(plot) if plot else None, "out_dir": str(out), "world_size": world, "rank": dist_.rank,
        "max_steps": cfg.max_steps,
    }
    if dist_.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _gather_states(loss_mod, optimizer, fsdp: bool):
    """(full model state dict or None, full optimizer state dict); collective under FSDP."""
    if not fsdp:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(loss_mod, options=opts)
    osd = get_optimizer_state_dict(loss_mod, optimizer, options=opts)
    msd = {k.removeprefix("model."): v for k, v in msd.items()}
    return msd, osd


def _unsharded_copy(loss_mod, config, dist_: _Dist):
    """Rank 0's full copy of an FSDP-sharded model on the CPU (None on the other ranks);
    a collective, as every rank sends its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .model import GPT2

    sd = get_model_state_dict(loss_mod, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist_.main:
        return None
    full = GPT2(config)
    full.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()})
    return full


# How this run's optimizer executes, not its state: an FSDP run's AdamW is not fused, an
# unsharded one is, and a checkpoint of one layout resumes in the other.
_EXECUTION_OPTIONS = ("fused", "foreach", "capturable", "differentiable")
# This run's config, not the checkpoint's: a resume may change them (lr is set at every step).
_CONFIGURED_OPTIONS = ("betas", "eps", "weight_decay")


def _load_optimizer(optimizer, loss_mod, sd, fsdp: bool, source: Path) -> None:
    """Load a checkpoint's optimizer state into this run's optimizer. An unsharded run saves it
    keyed by parameter index, an FSDP run by parameter name: either loads into either, matched
    by position in the parameter groups (both runs build them alike)."""
    if fsdp:
        names = {p: n for n, p in loss_mod.named_parameters()}
        keys = [[names[p] for p in g["params"]] for g in optimizer.param_groups]
    else:
        keys = [g["params"] for g in optimizer.state_dict()["param_groups"]]
    saved = sd["param_groups"]
    if [len(g["params"]) for g in saved] != [len(k) for k in keys]:
        raise CheckpointError(f"{source}: its optimizer state holds other parameters than this model's")
    state, groups = {}, []
    for group, mine, live in zip(saved, keys, optimizer.param_groups):
        for old, new in zip(group["params"], mine):
            if old in sd["state"]:
                state[new] = sd["state"][old]
        groups.append({**group, **{k: live[k] for k in _EXECUTION_OPTIONS + _CONFIGURED_OPTIONS if k in live},
                       "params": list(mine)})
    sd = {"state": state, "param_groups": groups}
    if not fsdp:
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(loss_mod, optimizer, sd, options=StateDictOptions(full_state_dict=True))


def _gather_rng(device, dist_: _Dist) -> list:
    state = _rng_state(device)
    if not dist_.enabled:
        return [state]
    import torch.distributed as dist

    out: list = [None] * dist_.world
    dist.all_gather_object(out, state)
    return out


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, *, seed: int, temperature: float = 1.0,
                top_k: int | None = 40) -> str:
    """`prompt` and one sampled continuation (an empty prompt starts after <|endoftext|>), without
    touching the training run's random state. Top-k 40 is the paper's sampling setting (§3.7)."""
    torch = _import_torch()
    from .generate import generate

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            done = generate(model, tokenizer, [prompt if prompt else [tokenizer.eot_token]],
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            do_sample=True, seed=seed)
    finally:
        model.train(was_training)
    return prompt + done[0].text
