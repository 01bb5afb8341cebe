"""GPT-2 weights in and out: Hugging Face folders, OpenAI's TensorFlow release, our own saves.

Formats:
- Hugging Face GPT-2 folder: config.json + model.safetensors (or pytorch_model.bin, read with
  `torch.load(weights_only=True)`). Projections are `Conv1D` with (in, out) weights; names with
  or without the `transformer.` prefix; `lm_head.weight` optional (tied).
- OpenAI release folder: hparams.json + model.ckpt.index + model.ckpt.data-NNNNN-of-NNNNN (a
  TensorFlow "tensor bundle", parsed here without TensorFlow) + encoder.json + vocab.bpe.
- Our save is an HF folder: `transformers.GPT2LMHeadModel.from_pretrained(folder)` loads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import GPT2KitError
from .model import GPT2Config

if TYPE_CHECKING:
    from .model import GPT2

# Our nn.Linear weights are (out, in); OpenAI's and HF's Conv1D store (in, out).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class WeightsError(GPT2KitError):
    """A weights file or folder is missing, corrupt, or disagrees with its config."""


def hf_config_dict(config: GPT2Config) -> dict[str, Any]:
    """config.json for `transformers.GPT2Config` (and for us: the same keys)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }


def to_hf_state_dict(model: "GPT2") -> dict[str, torch.Tensor]:
    """Our parameters under HF GPT2LMHeadModel names, Conv1D layout, without vocab padding;
    the tied `lm_head.weight` is left out (HF re-ties it)."""
    V = model.config.vocab_size
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            t = t[:V]
        elif name.endswith(_TRANSPOSED):
            t = t.t()
        out[name] = t.detach().contiguous()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """HF-named Conv1D-layout tensors -> our state dict (transposed, vocab padded with zeros).
    Assumes names and shapes were checked (`check_state_dict`)."""
    out = {}
    for name, t in sd.items():
        if name.endswith(_TRANSPOSED):
            t = t.t()
        elif name == "transformer.wte.weight" and config.padded_vocab_size != config.vocab_size:
            t = torch.cat([t, t.new_zeros(config.padded_vocab_size - config.vocab_size, t.shape[1])])
        out[name] = t.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
