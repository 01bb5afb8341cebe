"""The GPT-2 Transformer (Radford et al., 2019, §2.3), exact to the released weights.

Read top to bottom: config and presets -> KV cache -> attention -> MLP -> block -> GPT2.

The architecture is GPT-1's decoder-only Transformer with the changes of §2.3: LayerNorm moved to
the input of each sub-block, one more LayerNorm after the last block, residual projections
initialized with std 0.02/sqrt(2*n_layer), context 1024, vocabulary 50257. GELU is the tanh
approximation and the output layer is the token embedding (tied), as in OpenAI's code.

Parameter names are OpenAI's/Hugging Face's (`transformer.h.0.attn.c_attn.weight`, ...), so loading
released weights is a copy. One difference: our projections are `nn.Linear`s, whose weight is
(out, in); OpenAI's and HF's `Conv1D` store (in, out). `gpt2kit.weights` transposes on the way
in and out.

Shape legend: B batch, T new tokens, P tokens already in the KV cache, S = P + T keys,
C n_embd, nh n_head, hs head size (C // nh), V vocab_size, Vp padded vocab rows.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .errors import ConfigError


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_ctx: int = 1024
    dropout: float = 0.0  # embeddings, attention probabilities and residuals; training only
    layer_norm_epsilon: float = 1e-5
    # The embedding gets this many rows rounded up (50257 -> 50304 with 64): matmuls with a
    # multiple of 64 columns are faster on GPUs. Logits are cut back to vocab_size, so the
    # extra rows never change an output; 1 turns it off.
    padded_vocab_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx", "padded_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GPT2Config.{name}: expected a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPT2Config.n_embd: {self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPT2Config.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"GPT2Config.layer_norm_epsilon: expected > 0, got {self.layer_norm_epsilon!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.padded_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def num_params(self, *, include_embedding: bool = True) -> int:
        """What `GPT2(config).num_params()` returns, from the shapes alone."""
        C = self.n_embd
        per_block = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, c_proj + biases, two LayerNorms
        n = self.n_ctx * C + self.n_layer * per_block + 2 * C
        return n + self.vocab_size * C if include_embedding else n

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPT2Config":
        """A named preset (see `PRESETS`), with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(f"unknown GPT2Config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(valid))}")
        return dataclasses.replace(PRESETS[name], **overrides)


# Parameter counts are with the tied embedding counted once (`GPT2.num_params()`).
PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),  # 124,439,808
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
    # Small models for CPU work (GPT-2 vocabulary, shorter context).
    "tiny": GPT2Config(n_layer=2, n_head=2, n_embd=64, n_ctx=128),  # 3,324,736
    "mini": GPT2Config(n_layer=4, n_head=4, n_embd=256, n_ctx=256),  # 16,090,880
    "small-cpu": GPT2Config(n_layer=6, n_head=6, n_embd=384, n_ctx=512),  # 30,142,848
}


class KVCache:
    """Keys and values of past tokens for every layer, preallocated for `max_len` positions.

    `GPT2.forward(..., kv_cache=cache)` appends the new tokens' keys and values and advances
    `length`; attention then covers all `length` positions. Rows of a batch share the length:
    left-padded prompts are handled by the attention mask, not by per-row lengths.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        # never read past `length`, so no need to spend a pass over ~MBs clearing it
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, nh, T, hs) keys/values of `layer` after the first `length`
        positions; return all (B, nh, S, hs). `GPT2` advances `length` once every layer is done."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (e.g. to re-run a rejected draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length must be in [0, {self.length}], got {length}")
        self.length = length

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep/duplicate batch rows: row i becomes the old row rows[i] (beam search, pruning)."""
        rows = rows.to(self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)


# Where gpt2kit's training attention kernel does not run (no compiler, no AVX-512 or AVX2; dropout), fp32
# training on CPU attends through `causal_attention` up to this many tokens: forward + backward
# 1.2x (T = 128) faster than SDPA's flash kernel there; as fast at 256, 1.6x slower at 512.
EXPLICIT_ATTENTION_MAX_T = 128


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal softmax attention of (B, nh, T, hs) queries, keys and values as two batched matmuls,
    the scale and the causal mask folded into the first (`baddbmm`). For training on CPU: in
    bf16, forward + backward take 2-3x less time than SDPA's flash kernel, whose bf16 backward is
    slow there; in fp32 for short sequences (`EXPLICIT_ATTENTION_MAX_T`). bf16 scores are rounded
    before the softmax (which computes in fp32), as in transformers' eager attention; inference
    keeps SDPA."""
    B, nh, T, hs = q.shape
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # 0 on and below the diagonal
    att = torch.baddbmm(mask, q.reshape(B * nh, T, hs), k.reshape(B * nh, T, hs).transpose(1, 2),
                        alpha=hs ** -0.5).softmax(-1)  # (B*nh, T, T)
    att = F.dropout(att, dropout_p) if dropout_p else att
    return (att @ v.reshape(B * nh, T, hs)).view(B, nh, T, hs)


def training_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention for training on CPU: `causal_attention` in bf16 and for short fp32
    sequences, SDPA otherwise. Where the CPU has no bf16 arithmetic (`kernels.native_bf16`),
    bf16 products are emulated, several times slower than fp32 ones: bf16 inputs attend in fp32
    there (more exact than bf16, and as fast as fp32 training)."""
    if kernels.bf16_on_fp32_units(q.dtype, q.device.type):
        with torch.autocast("cpu", enabled=False):
            return training_attention_cpu(q.float(), k.float(), v.float(), dropout_p).to(q.dtype)
    if q.dtype == torch.bfloat16 or q.shape[2] <= EXPLICIT_ATTENTION_MAX_T:
        return causal_attention(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class Linear(nn.Linear):
    """`nn.Linear`, except under bf16 autocast on a CPU without bf16 arithmetic, where PyTorch
    emulates bf16 products several times slower than fp32 ones: there the same bf16 product
    (inputs rounded to bf16, exact products summed in fp32, the output rounded to bf16) runs on
    fp32 units (`kernels.bf16_linear_widened`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and kernels.bf16_on_fp32_units(torch.get_autocast_dtype("cpu"), x.device.type)):
            return kernels.bf16_linear_widened(x, self.weight, self.bias)
        return kernels.linear(x, self.weight, self.bias)  # F.linear's product (see kernels.gemm)


def _intercepted(*modules: nn.Module) -> bool:
    """Whether calling any of these modules may do more than its class's forward: forward or
    backward hooks (or pre-hooks) on it, hooks registered for every module
    (`nn.modules.module.register_module_*`), or a forward set on the instance. A path that computes
    a module's output without calling it (a fused kernel) would skip those, so it must not run."""
    g = nn.modules.module
    if any(getattr(g, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                "_global_backward_hooks", "_global_backward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in vars(m) for m in modules)


def plain_product(linear: nn.Module) -> bool:
    """Whether `linear(x)` is `F.linear(x, linear.weight, linear.bias)`, so that the model may
    compute it another way (its bias added elsewhere): our `Linear`, or an inference form's layer
    that says so (not a subclass or wrapper, e.g. an adapter, whose forward may add more), with
    no hooks to run."""
    return ((type(linear) is Linear or getattr(linear, "plain_product", False) is True)
            and not _intercepted(linear))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        # the dtype attention computes in when not its inputs' (inference forms set it: see
        # gpt2kit.generate.optimize_for_cpu); a KV cache's dtype wins
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(self.heads(x, mask, is_causal, kv_cache, layer)))

    def heads(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
              kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        """The heads' outputs side by side (B, T, C): what c_proj projects."""
        B, T, C = x.shape
        training_kernel = (self.training and torch.is_grad_enabled() and is_causal and kv_cache is None
                           and not self.dropout and x.device.type == "cpu")
        fc = self.c_attn
        if (training_kernel and type(fc) is Linear and not _intercepted(fc)
                and kernels.training_attention_folds_bias(x, fc.bias, self.n_head)):
            # fp32: c_attn's bias is added (and its gradient summed) inside the attention kernel,
            # as it packs q, k and v (two passes over the (B, T, 3C) activations fewer)
            return kernels.training_attention(kernels.linear(x, fc.weight), self.n_head, fc.bias)
        if (not self.training and mask is None and is_causal and kv_cache is None and plain_product(fc)
                and self.compute_dtype in (None, torch.float32)
                and kernels.prompt_attention_folds_bias(x, fc.weight, fc.bias, self.n_head)):
            # a prompt in fp32 CPU inference: c_attn's bias is added inside the attention kernel as
            # it packs q, k and v (no pass broadcasting it into the (B, T, 3C) product)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                       for t in kernels.linear(x, fc.weight).split(C, dim=2))  # 3 x (B, nh, T, hs)
            return kernels.causal_attention(q, k, v, bias=fc.bias)
        qkv = self.c_attn(x)  # (B, T, 3C)
        if training_kernel:
            # gpt2kit's training attention kernel where it applies: fp32 (c_attn's bias not folded
            # in above), and bf16 where the CPU would emulate bf16 products (then no faster than fp32)
            wide = qkv.float() if kernels.bf16_on_fp32_units(qkv.dtype, qkv.device.type) else qkv
            if kernels.training_attention_applies(wide, self.n_head):
                return kernels.training_attention(wide, self.n_head).to(qkv.dtype)
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs), in the cache's dtype (see new_kv_cache)
        dtype = q.dtype
        if self.training and torch.is_grad_enabled() and is_causal and q.device.type == "cpu":
            y = training_attention_cpu(q, k, v, self.dropout)  # (B, nh, T, hs)
        else:
            dt = self.compute_dtype if kv_cache is None and self.compute_dtype is not None else k.dtype
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            if not self.training and mask is None and is_causal and kernels.causal_attention_applies(q, k, v):
                # a prompt on CPU: gpt2kit's kernel, which also writes the (B, T, C) layout c_proj reads
                return kernels.causal_attention(q, k, v).to(dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return y.to(dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)


class GELU(nn.Module):
    """OpenAI's gelu, 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))). On CPU it runs gpt2kit's kernel,
    4x (forward) and 2x (backward) faster than PyTorch's for this approximation (see
    gpt2kit.kernels.gelu); elsewhere `F.gelu(x, approximate="tanh")`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gelu(x)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        # a module so that inference forms can fold it into c_fc (see gpt2kit.generate.optimize_for_cpu)
        self.act = GELU()
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.hidden(x)))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(c_fc(x)), (B, T, 4C): what c_proj projects."""
        fc = self.c_fc
        if (type(fc) is Linear and type(self.act) is GELU and not _intercepted(fc, self.act)
                and kernels.bias_folds(x, fc.bias)):
            # fp32 on CPU: c_fc's bias is added, and its gradient summed, inside the GELU kernel
            # (one pass over the (B, T, 4C) activations instead of three)
            product = kernels.linear(x, fc.weight)  # (B, T, 4C)
            if torch.is_grad_enabled() and (product.requires_grad or fc.bias.requires_grad):
                return kernels.bias_gelu(product, fc.bias)
            return kernels.bias_gelu_(product, fc.bias)  # no autograd: over the fresh product itself
        return self.act(self.c_fc(x))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, is_causal, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))

    def forward_in_place(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                         kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        """`forward`'s sums for fp32 CPU inference on many rows, where `in_place_applies`, adding
        into x itself (the residual stream, which GPT2 owns): each projection's bias is added to x
        in the pass of the LayerNorm that reads it, and the projection's product accumulates into
        x (a GEMM with beta = 1). That saves a bias broadcast, a residual add and a fresh (B, T, C)
        tensor per sub-block; the sums are the same up to float rounding (x + b + yW^T, not
        x + (yW^T + b))."""
        rows = x.view(-1, x.shape[-1])  # (B*T, C)
        h = kernels.layer_norm_add_(x, self.ln_1, self.attn.c_proj.bias)  # ln_1(x); then x += c_proj's bias
        heads = self.attn.heads(h, mask, is_causal, kv_cache, layer)  # (B, T, C)
        kernels.linear_add_(rows, heads.reshape(rows.shape), self.attn.c_proj.weight)
        h = kernels.layer_norm_add_(x, self.ln_2, self.mlp.c_proj.bias)
        hidden = self.mlp.hidden(h)  # (B, T, 4C)
        kernels.linear_add_(rows, hidden.reshape(-1, hidden.shape[-1]), self.mlp.c_proj.weight)
        return x

    def in_place_applies(self, x: torch.Tensor) -> bool:
        """Whether `forward_in_place` may run for x: no autograd, fp32 contiguous CPU tensors,
        more rows than decoding multiplies in its own kernel, plain projections with biases, the
        kernels built, no dropout in training, no hooks on the sub-modules it bypasses (and not
        while torch.compile traces)."""
        projections = (self.attn.c_proj, self.mlp.c_proj)
        return (not torch.is_grad_enabled() and not self.training and x.dtype == torch.float32
                and x.device.type == "cpu" and x.is_contiguous() and x.numel() > kernels.MAX_ROWS * x.shape[-1]
                and all(plain_product(p) and p.bias is not None and p.weight.dtype == p.bias.dtype == torch.float32
                        for p in projections)
                and kernels.layer_norm_add_applies(x, self.ln_1) and kernels.layer_norm_add_applies(x, self.ln_2)
                and type(self).forward is Block.forward and type(self.attn).forward is CausalSelfAttention.forward
                and type(self.mlp).forward is MLP.forward  # (a subclass's forward may do more)
                and _inert(self.attn.resid_dropout) and _inert(self.mlp.dropout)
                and not _intercepted(self, self.ln_1, self.ln_2, self.attn, self.mlp))


def _inert(dropout: nn.Module) -> bool:
    """Whether a dropout module passes its input through unchanged and unobserved (an identity,
    or a dropout in eval mode or with p = 0, without hooks)."""
    return ((type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and (not dropout.training or dropout.p == 0)))
            and not _intercepted(dropout))


class TiedLMHead(nn.Module):
    """The output layer: logits = h @ wte^T, cut to the real vocabulary when wte is padded."""

    def __init__(self, wte: nn.Embedding, vocab_size: int):
        super().__init__()
        self.weight = wte.weight  # tied: one Parameter under two names, as in HF
        self.vocab_size = vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if kernels.prompt_gemm_applies(h, self.weight, None):  # a prompt in fp32 CPU inference, not MKL's GEMM
            return kernels.linear(h, self.weight[: self.vocab_size])  # (B, T, V): rows of wte, contiguous
        if kernels.logits_by_blocks_applies(h, self.weight):  # a prompt in fp32 CPU inference
            return kernels.logits_by_blocks(h, self.weight, self.vocab_size)  # (B, T, V), faster there
        logits = kernels.linear(h, self.weight)  # (B, T, Vp)
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size].contiguous()  # (B, T, V)
        return logits


def attention_mask_for(attention_mask: torch.Tensor | None, past: int, T: int,
                       device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for scaled_dot_product_attention; mask is boolean (B|1, 1, T, S), True =
    may attend. Without padding or cache, `is_causal` lets SDPA use its fused causal kernel."""
    if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
        attention_mask = None  # no padding anywhere: the cheaper paths below apply (a data-dependent
        # branch, which torch.compile would have to break its graph for: compiled code keeps the mask)
    if attention_mask is None:
        if past == 0:
            return None, True
        if T == 1:
            return None, False  # one new token sees every cached one
    q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) absolute query positions
    k = torch.arange(past + T, device=device)[None, :]  # (1, S)
    allowed = k <= q  # (T, S)
    if attention_mask is not None:
        # A pad query would see no key at all (softmax of nothing = NaN, which later leaks into
        # real rows through its value vector): let every position see itself.
        allowed = allowed & (attention_mask[:, None, :].bool() | (k == q))  # (B, T, S)
    return allowed.unsqueeze(-3), False  # (B|1, 1, T, S)


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_ctx, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = TiedLMHead(self.transformer.wte, config.vocab_size)
        if self.transformer.wte.weight.is_meta:
            return  # shapes only (model info, or weights about to be assigned): nothing to init
        self.apply(self._init_weights)
        # §2.3: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = the
        # number of residual layers (two per block: attention and MLP).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                      token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) after the final LayerNorm; `forward` is `lm_head` of this. `token_embeddings`
        (B, T, C), when given, stands for `wte(input_ids)` (see gpt2kit.train's loss module)."""
        B, T = input_ids.shape
        if token_embeddings is not None and token_embeddings.shape != (B, T, self.config.n_embd):
            raise ValueError(f"token_embeddings has shape {tuple(token_embeddings.shape)}, expected "
                             f"{(B, T, self.config.n_embd)}")
        past = 0 if kv_cache is None else kv_cache.length
        self._check_lengths(B, T, past, attention_mask, position_ids, kv_cache)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None]  # (1, T)
            else:
                # What transformers' GPT-2 generate does: real tokens count from 0 after the left
                # padding; pads get position 1 (their outputs are never used).
                position_ids = attention_mask.long().cumsum(-1) - 1  # (B, S)
                position_ids = position_ids.masked_fill(attention_mask == 0, 1)[:, past:]  # (B, T)
        mask, is_causal = attention_mask_for(attention_mask, past, T, input_ids.device)
        tokens = self.transformer.wte(input_ids) if token_embeddings is None else token_embeddings
        x = tokens + self.transformer.wpe(position_ids)  # (B, T, C)
        drop = self.transformer.drop
        x = drop(x)  # (B, T, C), a fresh tensor: blocks may add into it in place ...
        # ... unless a hook (or a module of another kind) may have kept it
        owned = type(drop) in (nn.Dropout, nn.Identity) and not _intercepted(drop)
        for layer, block in enumerate(self.transformer.h):
            if block.in_place_applies(x):
                if not owned:
                    x, owned = x.clone(), True
                x = block.forward_in_place(x, mask, is_causal, kv_cache, layer)
            else:
                x = block(x, mask, is_causal, kv_cache, layer)
                owned = False  # hooks (or a subclass) may keep what the block returns
        if kv_cache is not None:
            kv_cache.length = past + T
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) in the model's dtype.

        input_ids (B, T); attention_mask (B, P+T), 1 = real token, 0 = (left) padding;
        position_ids (B, T), by default derived from attention_mask (or P..P+T-1 without one);
        kv_cache: appends this step's keys/values, and attention covers P+T positions.
        """
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               kv_cache=kv_cache)
        return self.lm_head(h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean next-token cross-entropy (nats), as transformers' `model(input_ids,
        labels=labels).loss`: position t is scored on labels[:, t + 1]; labels equal to -100 are
        left out. `labels` default to input_ids. With an attention_mask, no padding is scored and
        nothing is scored from a padding position (a row's first real token: it has no context).
        Training uses gpt2kit.train's chunked loss instead, which never holds all the logits."""
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected input_ids' {tuple(input_ids.shape)}")
        targets = labels[:, 1:]  # (B, T-1)
        if attention_mask is not None:
            scored = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
            targets = targets.masked_fill(~scored, -100)
        logits = self(input_ids, attention_mask=attention_mask)[:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def _check_lengths(self, B: int, T: int, past: int, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, kv_cache: KVCache | None) -> None:
        if T == 0:
            raise ValueError("input_ids has no tokens (shape (B, 0))")
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache holds {kv_cache.batch_size} rows but input_ids has {B}")
            if past + T > kv_cache.max_len:
                raise ValueError(f"kv_cache is full: {past} + {T} tokens exceed its max_len={kv_cache.max_len}")
            if kv_cache.k.dtype not in (self.transformer.wte.weight.dtype, torch.float32):
                raise ValueError(f"kv_cache holds {kv_cache.k.dtype}: expected the model's dtype "
                                 f"({self.transformer.wte.weight.dtype}) or torch.float32")
        if position_ids is None and past + T > self.config.n_ctx:
            raise ValueError(f"sequence of {past + T} positions exceeds the model's context n_ctx={self.config.n_ctx}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = {(B, past + T)}")
        if position_ids is not None and position_ids.shape[-1] != T:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({B}, {T})")

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> KVCache:
        """An empty cache for `batch_size` rows and up to `max_len` (default n_ctx) positions,
        on the model's device, in the model's dtype unless told otherwise, except that a bf16 or
        fp16 model on CPU gets an fp32 cache: there SDPA attends one query over S keys 4x (S=80)
        to 6x (S=1000) faster in fp32 than in bf16, and equally fast for a prompt. It costs twice
        the cache memory and attends in fp32, the precision SDPA accumulates in anyway."""
        c = self.config
        ref = self.transformer.wte.weight
        if dtype is None:
            on_cpu = torch.device(device or ref.device).type == "cpu"
            dtype = torch.float32 if on_cpu and ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype
        return KVCache(c.n_layer, batch_size, c.n_head, max_len or c.n_ctx, c.head_size,
                       dtype=dtype, device=device or ref.device)

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Parameters with the tied token embedding counted once (without its padding rows);
        `include_embedding=False` leaves the token embedding out (position embeddings stay)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied one once
        c = self.config
        n -= (c.padded_vocab_size - c.vocab_size) * c.n_embd
        if not include_embedding:
            n -= c.vocab_size * c.n_embd
        return n

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, **config_overrides: Any) -> "GPT2":
        """Load an HF GPT-2 folder, an OpenAI release folder (TF checkpoint), a folder written by
        `save_pretrained`, an HF cache entry or a hub name ("gpt2", "openai-community/gpt2-xl", ...),
        in eval mode (as transformers does). `dtype`: a torch dtype or its name ("float32",
        "bfloat16", "float16"), "auto" for the stored one, or None for float32."""
        from .weights import load_pretrained

        return load_pretrained(name_or_path, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, folder: str, tokenizer: Any = None) -> None:
        """Write model.safetensors + config.json (a valid HF GPT-2 folder) and the tokenizer's files."""
        from .weights import save_pretrained

        save_pretrained(self, folder, tokenizer=tokenizer)
