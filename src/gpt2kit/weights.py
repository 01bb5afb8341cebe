"""GPT-2 weights in and out: Hugging Face folders, OpenAI's TensorFlow release, our own saves.

Formats read:
- Hugging Face GPT-2 folder: config.json + model.safetensors (or pytorch_model.bin, read with
  `torch.load(weights_only=True)`; either may be sharded with a *.index.json). Projections are
  `Conv1D`, weights (in, out); names with or without the `transformer.` prefix.
- OpenAI's release folder: hparams.json + model.ckpt.index + model.ckpt.data-NNNNN-of-NNNNN, a
  TensorFlow "tensor bundle" read here without TensorFlow (see `read_tf_checkpoint`).
Written: an HF folder (model.safetensors + config.json + tokenizer files) that
`transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load.

Every tensor is checked by name and shape against the config before anything is loaded; problems
raise `WeightsError` naming the file and the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .errors import ConfigError, GPT2KitError
from .io import atomic_path, write_json
from .model import GPT2Config

if TYPE_CHECKING:
    from .model import GPT2

log = logging.getLogger(__name__)

# Our nn.Linear weights are (out, in); OpenAI's and HF's Conv1D store (in, out).
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
RELEASED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
TF_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")


class WeightsError(GPT2KitError):
    """A weights file or folder is missing, corrupt, or disagrees with its config."""


# ---------------------------------------------------------------------------------------------
# Names, shapes and layouts


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 in HF GPT2LMHeadModel naming and Conv1D layout."""
    C, V = config.n_embd, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C),
                                          "transformer.wpe.weight": (config.n_ctx, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def check_tensors(shapes: dict[str, tuple[int, ...]], config: GPT2Config, source: Callable[[str], str],
                  config_source: str) -> None:
    """Raise WeightsError for a missing, unexpected or misshapen tensor. `shapes` maps HF names
    to shapes; `source(name)` is the file that holds a tensor (or should)."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in shapes:
            raise WeightsError(f"{source(name)}: missing tensor {name!r} (shape {shape})")
        if tuple(shapes[name]) != shape:
            raise WeightsError(f"{source(name)}: tensor {name!r} has shape {tuple(shapes[name])}, expected "
                               f"{shape} from {config_source} (n_embd={config.n_embd}, "
                               f"vocab_size={config.vocab_size}, n_ctx={config.n_ctx})")
    for name in shapes:
        if name not in expected:
            raise WeightsError(f"{source(name)}: unexpected tensor {name!r} for the model described by "
                               f"{config_source} (n_layer={config.n_layer})")


def to_hf_state_dict(model: "GPT2") -> dict[str, torch.Tensor]:
    """Our parameters under HF GPT2LMHeadModel names, Conv1D layout, without vocab padding;
    the tied `lm_head.weight` is left out (HF re-ties it)."""
    form = getattr(model, "inference_form", None)
    if form:  # gpt2kit.generate's: its layers are packed or int8 copies that the state dict lacks
        raise WeightsError(f"this model is an inference form ({form}), whose layers are not parameters: save the "
                           f"model that GPT2.from_pretrained loads (or the one you trained)")
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
    """Checked HF-named, Conv1D-layout tensors -> our state dict (transposed; the vocabulary padded
    with zero rows); without lm_head.weight, which is the same Parameter as wte."""
    out = {}
    for name, t in sd.items():
        if name.endswith(_TRANSPOSED):
            t = t.t()
        elif name == "transformer.wte.weight" and config.padded_vocab_size != config.vocab_size:
            t = torch.cat([t, t.new_zeros(config.padded_vocab_size - config.vocab_size, t.shape[1])])
        out[name] = t.contiguous()
    return out


def build_model(config: GPT2Config, hf_tensors: dict[str, torch.Tensor], *, dtype: torch.dtype | str | None,
                device: torch.device | str | None) -> "GPT2":
    """A GPT2 holding `hf_tensors` (checked, HF names); built on the meta device so that no time
    goes into a random init that would be overwritten."""
    from .model import GPT2

    if dtype == "auto":  # as stored: the floating tensors' dtype
        dtype = next((v.dtype for v in hf_tensors.values() if v.is_floating_point()), torch.float32)
    dtype = dtype or torch.float32
    sd = {k: v.to(dtype) for k, v in from_hf_state_dict(hf_tensors, config).items()}
    with torch.device("meta"):
        model = GPT2(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied Parameter
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def hf_config_dict(config: GPT2Config, *, eot_token: int | None = None) -> dict[str, Any]:
    """config.json in transformers' GPT-2 format.

    `eot_token` is the tokenizer's `<|endoftext|>` id (GPT-2's 50256); without a tokenizer the
    GPT-2 convention of the last id is assumed, so a trained small vocabulary stays in range.
    """
    if eot_token is None:
        eot_token = min(50256, config.vocab_size - 1)
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
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "torch_dtype": "float32",
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return obj


def config_from_hf(path: Path, **overrides: Any) -> GPT2Config:
    """GPT2Config from an HF config.json; refuses GPT-2 variants this model does not implement."""
    d = _read_json(path)
    if d.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"{path}: model_type is {d['model_type']!r}, expected 'gpt2'")
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None, 4 * d.get("n_embd", 768)),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
        "tie_word_embeddings": (True,),
    }
    for key, ok in unsupported.items():
        if key in d and d[key] not in ok:
            raise WeightsError(f"{path}: {key}={d[key]!r} is not supported (expected one of {list(ok)})")
    def number(key: str, default: float) -> float:
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WeightsError(f"{path}: {key} must be a number, got {value!r}")
        return float(value)

    fields = dict(n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=d.get("n_embd", 768),
                  vocab_size=d.get("vocab_size", 50257), n_ctx=d.get("n_positions", d.get("n_ctx", 1024)),
                  dropout=number("resid_pdrop", 0.0), layer_norm_epsilon=number("layer_norm_epsilon", 1e-5))
    try:
        config = GPT2Config(**fields)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
    return _overridden(config, overrides)


def _overridden(config: GPT2Config, overrides: dict[str, Any]) -> GPT2Config:
    try:
        return dataclasses.replace(config, **overrides)
    except ConfigError as e:  # a value passed to from_pretrained, not the file's
        raise WeightsError(f"from_pretrained: {e}") from None
    except TypeError as e:
        raise WeightsError(f"{path}: {e}") from None


def _hf_name(name: str) -> str | None:
    """HF GPT2LMHeadModel name for a stored name; None for buffers that are not weights. The hub's
    files were saved from GPT2Model: no `transformer.` prefix, and old causal-mask buffers."""
    if re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", name):
        return None
    if name.startswith("lm_head."):
        return name
    return name if name.startswith("transformer.") else "transformer." + name


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a valid safetensors file (truncated or corrupt: {e})") from None


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused: holds objects other than tensors, or is corrupt "
                           f"(loaded with weights_only=True): {str(e).splitlines()[0]}") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/zipfile errors for damaged files
        raise WeightsError(f"{path}: not a readable PyTorch weights file (truncated or corrupt: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensor names to tensors")
    return obj


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of an HF folder under GPT2LMHeadModel names, and the file each came from. The
    files are looked for in transformers' order (a single safetensors file, its sharded index, a
    single .bin, its index), so that both read the same weights from a folder holding several."""
    for name, loader in (("model.safetensors", _load_safetensors), ("model.safetensors.index.json", _load_safetensors),
                         ("pytorch_model.bin", _load_torch_bin), ("pytorch_model.bin.index.json", _load_torch_bin)):
        if not (folder / name).exists():
            continue
        if name.endswith(".index.json"):
            weight_map = _read_json(folder / name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{folder / name}: expected a 'weight_map' object")
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = [folder / name]
        break
    else:
        raise WeightsError(f"{folder}: no weights: expected model.safetensors or pytorch_model.bin "
                           f"(or a sharded *.index.json) beside config.json")
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        for raw, t in loader(f).items():
            name = _hf_name(raw)
            if name is not None:
                tensors[name], origin[name] = t, f
    return tensors, origin


def _untie(tensors: dict[str, torch.Tensor], origin: dict[str, Path]) -> None:
    """Drop lm_head.weight after checking it is the token embedding (GPT-2 ties them)."""
    head = tensors.pop("lm_head.weight", None)
    wte = tensors.get("transformer.wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise WeightsError(f"{origin['lm_head.weight']}: tensor 'lm_head.weight' differs from "
                           f"'transformer.wte.weight'; GPT-2 ties the output layer to the token embedding")


def load_hf_folder(folder: Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   **overrides: Any) -> "GPT2":
    config = config_from_hf(folder / "config.json", **overrides)
    tensors, origin = read_hf_weights(folder)
    _untie(tensors, origin)
    default = next(iter(origin.values()), folder)
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, config,
                  lambda n: str(origin.get(n, default)), str(folder / "config.json"))
    return build_model(config, tensors, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# OpenAI's release: a TensorFlow tensor bundle
#
# model.ckpt.index is an SSTable (LevelDB table format): data blocks of prefix-compressed
# key/value entries, an index block pointing at them, and a 48-byte footer. Each key is a tensor
# name; the value is a BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto) saying
# which .data-NNNNN-of-NNNNN shard holds the tensor's raw little-endian bytes, at what offset,
# how many, and their CRC32C. The empty key holds the BundleHeaderProto (number of shards).

_TABLE_MAGIC = 0xDB4775248B80FB57
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _protobuf_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: varints as int, length-delimited as
    bytes, fixed32/fixed64 as int."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            (value,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        elif wire == 1:
            (value,), pos = struct.unpack_from("<Q", buf, pos), pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _table_block(data: bytes, offset: int, size: int) -> bytes:
    """One block of the table, its trailer (compression byte + masked CRC32C) checked."""
    if offset + size + 5 > len(data):
        raise ValueError(f"block at offset {offset} runs past the end of the file (truncated)")
    block = data[offset:offset + size]
    compression, stored = struct.unpack_from("<BI", data, offset + size)
    if _mask_crc(crc32c(data[offset:offset + size + 1])) != stored:
        raise ValueError(f"block at offset {offset} fails its CRC32C check (corrupt)")
    if compression != 0:
        raise ValueError(f"block at offset {offset} is compressed (type {compression}); only "
                         f"uncompressed tables, as TensorFlow writes tensor bundles, are supported")
    return block


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of a block: each key shares a prefix with the one before it."""
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise ValueError("bad block restart array")
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > end:
            raise ValueError("bad block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def _read_table(path: Path) -> dict[bytes, bytes]:
    data = path.read_bytes()
    if len(data) < 48:
        raise ValueError(f"{len(data)} bytes is too short for a table footer (truncated)")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != _TABLE_MAGIC:
        raise ValueError("no SSTable magic number at the end (truncated, or not a TensorFlow index)")
    footer = data[-48:]
    _, pos = _varint(footer, 0)  # metaindex handle: unused by tensor bundles
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    table = {}
    for _, handle in _block_entries(_table_block(data, index_offset, index_size)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        table.update(_block_entries(_table_block(data, offset, size)))
    return table


def read_tf_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow V2 checkpoint `prefix` (the path without .index), by name."""
    index = Path(f"{prefix}.index")
    if not index.exists():
        raise WeightsError(f"{index}: no such file")
    try:
        table = _read_table(index)
        header = dict(_protobuf_fields(table.pop(b"", b"")))
    except (ValueError, struct.error) as e:
        raise WeightsError(f"{index}: not a valid TensorFlow checkpoint index: {e}") from None
    num_shards = int(header.get(1, 1))
    if header.get(2, 0) != 0:
        raise WeightsError(f"{index}: big-endian checkpoints are not supported")
    shards: dict[int, Any] = {}
    tensors = {}
    for key, value in table.items():
        name = key.decode("utf-8", "replace")
        try:
            entry = _bundle_entry(value)
        except (ValueError, struct.error) as e:
            raise WeightsError(f"{index}: tensor {name!r}: bad BundleEntryProto ({e})") from None
        if entry["slices"]:
            raise WeightsError(f"{index}: tensor {name!r} is partitioned into slices; not supported")
        if entry["dtype"] not in _TF_DTYPES:
            raise WeightsError(f"{index}: tensor {name!r} has TensorFlow dtype {entry['dtype']}, "
                               f"expected float32/16/64 or int32/64")
        shard = Path(f"{prefix}.data-{entry['shard']:05d}-of-{num_shards:05d}")
        if entry["shard"] not in shards:
            if not shard.exists():
                raise WeightsError(f"{shard}: no such file (named by {index})")
            with open(shard, "rb") as f:
                shards[entry["shard"]] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if shard.stat().st_size else b""
        blob = shards[entry["shard"]]
        start, size = entry["offset"], entry["size"]
        dtype = np.dtype(_TF_DTYPES[entry["dtype"]]).newbyteorder("<")
        if start + size > len(blob):
            raise WeightsError(f"{shard}: tensor {name!r} needs bytes {start}..{start + size} but the "
                               f"file has {len(blob)} (truncated)")
        if size != int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize:
            raise WeightsError(f"{index}: tensor {name!r} has {size} bytes, shape {entry['shape']} "
                               f"needs {int(np.prod(entry['shape'])) * dtype.itemsize}")
        raw = blob[start:start + size]
        if "crc" in entry and _mask_crc(crc32c(raw)) != entry["crc"]:
            raise WeightsError(f"{shard}: tensor {name!r} fails its CRC32C check (corrupt)")
        tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(entry["shape"]).astype(dtype.newbyteorder("="))
    return tensors


def _bundle_entry(value: bytes) -> dict[str, Any]:
    # BundleEntryProto: 1 dtype, 2 shape (TensorShapeProto: 2 dim {1 size}), 3 shard_id,
    # 4 offset, 5 size, 6 crc32c (fixed32, masked), 7 slices.
    entry: dict[str, Any] = {"dtype": 0, "shape": [], "shard": 0, "offset": 0, "size": 0, "slices": []}
    for number, v in _protobuf_fields(value):
        if number == 1:
            entry["dtype"] = v
        elif number == 2:
            entry["shape"] = [dict(_protobuf_fields(d)).get(1, 0) for n, d in _protobuf_fields(v) if n == 2]
        elif number == 3:
            entry["shard"] = v
        elif number == 4:
            entry["offset"] = v
        elif number == 5:
            entry["size"] = v
        elif number == 6:
            entry["crc"] = v
        elif number == 7:
            entry["slices"].append(v)
    return entry


def tf_to_hf_name(name: str) -> str | None:
    """OpenAI's variable names (model/h3/attn/c_attn/w) -> HF names; None for anything else."""
    m = re.fullmatch(r"model/(wte|wpe)", name)
    if m:
        return f"transformer.{m[1]}.weight"
    m = re.fullmatch(r"model/ln_f/(g|b)", name)
    if m:
        return f"transformer.ln_f.{'weight' if m[1] == 'g' else 'bias'}"
    m = re.fullmatch(r"model/h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/(g|b|w)", name)
    if m:
        kind = {"g": "weight", "w": "weight", "b": "bias"}[m[3]]
        return f"transformer.h.{int(m[1])}.{m[2].replace('/', '.')}.{kind}"
    return None


def config_from_hparams(hparams_path: Path, **overrides: Any) -> GPT2Config:
    """GPT2Config from OpenAI's hparams.json."""
    h = _read_json(hparams_path)
    try:
        config = GPT2Config(n_layer=h["n_layer"], n_head=h["n_head"], n_embd=h["n_embd"],
                            vocab_size=h["n_vocab"], n_ctx=h["n_ctx"])
    except KeyError as e:
        raise WeightsError(f"{hparams_path}: missing key {e.args[0]!r} (expected n_vocab, n_ctx, n_embd, "
                           f"n_head, n_layer)") from None
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{hparams_path}: {e}") from None
    return _overridden(config, overrides)


def load_openai_folder(folder: Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                       **overrides: Any) -> "GPT2":
    hparams_path = folder / "hparams.json"
    config = config_from_hparams(hparams_path, **overrides)
    prefix = folder / "model.ckpt"
    tensors: dict[str, torch.Tensor] = {}
    index = f"{prefix}.index"
    for tf_name, array in read_tf_checkpoint(prefix).items():
        name = tf_to_hf_name(tf_name)
        if name is None:
            raise WeightsError(f"{index}: unexpected tensor {tf_name!r} (not a GPT-2 variable)")
        if tf_name.endswith("/w") and array.ndim == 3 and array.shape[0] == 1:
            array = array[0]  # OpenAI's conv1d weights are [1, nx, nf]
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    hf_to_tf = {tf_to_hf_name(n): n for n in _openai_names(config)}
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, config,
                  lambda n: f"{index} ({hf_to_tf.get(n, n)})", str(hparams_path))
    return build_model(config, tensors, dtype=dtype, device=device)


def _openai_names(config: GPT2Config) -> list[str]:
    names = ["model/wte", "model/wpe", "model/ln_f/g", "model/ln_f/b"]
    for i in range(config.n_layer):
        for sub in ("ln_1/g", "ln_1/b", "ln_2/g", "ln_2/b"):
            names.append(f"model/h{i}/{sub}")
        for sub in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            names += [f"model/h{i}/{sub}/w", f"model/h{i}/{sub}/b"]
    return names


# CRC32C (Castagnoli), as LevelDB tables and tensor bundles store it. Bytes are fed through the
# usual 256-entry table, but for many equal-length chunks of the data at once (numpy), whose
# CRCs are then combined pairwise: CRC is linear over GF(2), so crc(A || B) = shift(crc(A),
# len(B)) ^ crc(B) for the raw CRC (zero initial value), where shift is a 32x32 bit matrix.

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_table() -> np.ndarray:
    """The register after 16 zero-input steps from each 16-bit value: two bytes per lookup."""
    table = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(16):
        table = np.where(table & 1, (table >> np.uint32(1)) ^ np.uint32(_POLY), table >> np.uint32(1))
    return table


_CRC_TABLE: np.ndarray | None = None  # 256 KiB, built on first use


def _apply(matrix: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    """Multiply a GF(2) 32x32 matrix (its 32 columns as uint32) by each CRC of a vector."""
    out = np.zeros_like(crcs)
    for bit in range(32):
        out ^= ((crcs >> np.uint32(bit)) & np.uint32(1)) * matrix[bit]
    return out


def _shift_matrix(nbytes: int) -> np.ndarray:
    """The operator that appends `nbytes` zero bytes to a raw CRC register."""
    # one zero bit: reflected shift with conditional polynomial xor
    result = np.array([1 << i for i in range(32)], dtype=np.uint32)  # identity
    power = np.array([_POLY] + [1 << (i - 1) for i in range(1, 32)], dtype=np.uint32)
    for _ in range(3):  # one zero byte = eight zero bits
        power = _apply(power, power)
    while nbytes:
        if nbytes & 1:
            result = _apply(power, result)
        power = _apply(power, power)
        nbytes >>= 1
    return result


def _raw_crc_rows(rows: np.ndarray) -> np.ndarray:
    """Raw CRC (initial register 0, no final xor) of each row of a (N, L) uint8 array, L even."""
    global _CRC_TABLE
    if _CRC_TABLE is None:
        _CRC_TABLE = _make_table()
    words = np.ascontiguousarray(rows.view("<u2").T).astype(np.uint32)  # (L/2, N), one column per step
    crc = np.zeros(rows.shape[0], dtype=np.uint32)
    for col in words:
        crc = _CRC_TABLE[(crc ^ col) & np.uint32(0xFFFF)] ^ (crc >> np.uint32(16))
    return crc


def crc32c(data: bytes) -> int:
    """CRC32C of `data` (as zlib.crc32 is CRC32), fast enough for gigabytes with numpy."""
    n = len(data)
    buf = np.frombuffer(data, dtype=np.uint8)
    # About sqrt(n) rows of sqrt(n) bytes; a power of two rows, for pairwise combination.
    rows = 1 << (max(n, 1).bit_length() + 1) // 2
    chunk = max(2, -(-n // rows) + (-(-n // rows)) % 2)  # even: two bytes per step
    # Leading zero bytes leave a zero register at zero, so padding in front changes nothing.
    padded = np.zeros(rows * chunk, dtype=np.uint8)
    padded[rows * chunk - n:] = buf
    crcs = _raw_crc_rows(padded.reshape(rows, chunk))
    length = chunk
    while len(crcs) > 1:
        crcs = _apply(_shift_matrix(length), crcs[0::2]) ^ crcs[1::2]
        length *= 2
    init = _apply(_shift_matrix(n), np.array([0xFFFFFFFF], dtype=np.uint32))[0]
    return int(crcs[0] ^ init ^ np.uint32(0xFFFFFFFF))


def _mask_crc(crc: int) -> int:
    """LevelDB's masking of stored CRCs (so that a CRC of CRCs is not trivially zero)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Resolution: local folder, HF cache, hub download


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def repo_ids(name: str) -> list[str]:
    """Hub repositories a name may refer to: released sizes live under openai-community/ now
    and under their bare names in older caches."""
    if name in RELEASED:
        return [f"openai-community/{name}", name]
    if name.startswith("openai-community/") and name.split("/", 1)[1] in RELEASED:
        return [name, name.split("/", 1)[1]]
    return [name]


def _is_model_folder(folder: Path) -> bool:
    hf = (folder / "config.json").exists() and any((folder / f).exists() for f in HF_WEIGHT_FILES)
    return hf or ((folder / "hparams.json").exists() and (folder / "model.ckpt.index").exists())


def find_in_hf_cache(name: str, cache: Path | None = None) -> Path | None:
    """The snapshot folder of `name` in the HF cache that holds a loadable model, preferring
    the revision refs/main points at."""
    cache = cache or hf_cache_dir()
    for repo in repo_ids(name):
        base = cache / ("models--" + repo.replace("/", "--"))
        snapshots = base / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = base / "refs" / "main"
        preferred = [snapshots / ref.read_text().strip()] if ref.exists() else []
        others = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for folder in preferred + others:
            if _is_model_folder(folder):
                return folder
    return None


def _download(name: str) -> Path | None:
    """A hub download through huggingface_hub, if it is installed and the network allows."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    common = ["config.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"]
    # safetensors (single or sharded) where the repo has them; else the .bin files, never both
    weights = (["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
               ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"])
    for repo in repo_ids(name)[:1]:
        try:
            for patterns in weights:
                folder = Path(snapshot_download(repo, allow_patterns=common + patterns))
                if any((folder / f).exists() for f in patterns[:2]):
                    return folder
            return folder  # no weights there: resolve() says what is missing
        except Exception as e:  # network down, repo missing, hub refusing: fall back to the message
            log.debug("download of %s from the Hugging Face hub failed: %s", repo, e)
    return None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local folder holding `name_or_path`'s weights (downloading it if need be)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{path}: expected a model folder (config.json + model.safetensors, or "
                               f"OpenAI's hparams.json + model.ckpt.*), got a file")
        if not _is_model_folder(path):
            runs = [str(path / link) for link in ("best", "latest") if _is_model_folder(path / link)]
            if runs:  # `gpt2kit train`'s out_dir
                raise WeightsError(f"{path}: a training run's folder, not a model: load {' or '.join(runs)}")
            raise WeightsError(f"{path}: no model here: expected config.json with model.safetensors or "
                               f"pytorch_model.bin (Hugging Face), or {', '.join(TF_FILES)} (OpenAI)")
        return path
    name = str(name_or_path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "/")):
        raise WeightsError(f"{name}: no such folder")
    folder = find_in_hf_cache(name) or _download(name)
    if folder is not None:
        return folder
    repo = repo_ids(name)[0]
    raise WeightsError(
        f"{name}: not a local folder, not in the Hugging Face cache ({hf_cache_dir()}), and it could not "
        f"be downloaded (offline?). Put config.json and model.safetensors from "
        f"https://huggingface.co/{repo} into {hf_cache_dir() / ('models--' + repo.replace('/', '--'))}"
        f"/snapshots/main/, or into any folder and pass its path; OpenAI's release files "
        f"({', '.join(TF_FILES)}) in a folder work too")


def check_device(device: torch.device | str | None) -> torch.device | None:
    """`device` as a torch.device, or a one-line error before any weight is read: a name torch
    does not know, or a CUDA device this machine does not have."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightsError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):  # meta, mps, xpu, ...: devices gpt2kit does not run on
        raise WeightsError(f"device {str(device)!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise WeightsError(f"device {device!r}: CUDA is not available (no GPU, or a CPU-only torch build)")
        if dev.index is not None and dev.index >= count:
            raise WeightsError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return dev


_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """`dtype` as a torch dtype (names accepted), "auto" or None, or a one-line error before any
    weight is read (torch would take a name such as "bfloat16" for a device)."""
    if dtype is None or dtype == "auto" or dtype in _DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise WeightsError(f"dtype {dtype!r}: expected float32, bfloat16, float16 or auto (as stored)")


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, **overrides: Any) -> "GPT2":
    """The model of a folder or name (see `GPT2.from_pretrained`), in eval mode, as transformers
    returns it: released configs carry dropout 0.1, which `model.train()` turns on. `dtype`: a
    torch dtype or its name; "auto" keeps the stored one; None (the default) is float32, as in
    transformers 4 (training wants float32 weights whatever a checkpoint holds); transformers 4's
    name for it, `torch_dtype`, is taken too. Other keyword arguments replace GPT2Config fields."""
    torch_dtype = overrides.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None:
            raise WeightsError("from_pretrained: dtype and torch_dtype given both; pass dtype alone")
        dtype = torch_dtype
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GPT2Config)})
    if unknown:
        raise WeightsError(f"from_pretrained: unexpected argument(s) {', '.join(unknown)}; it takes dtype, device "
                           f"and GPT2Config fields ({', '.join(f.name for f in dataclasses.fields(GPT2Config))})")
    dtype = check_dtype(dtype)
    device = check_device(device)
    folder = resolve(name_or_path)
    log.debug("loading GPT-2 weights from %s", folder)
    if (folder / "config.json").exists():
        return load_hf_folder(folder, dtype=dtype, device=device, **overrides).eval()
    return load_openai_folder(folder, dtype=dtype, device=device, **overrides).eval()


def save_pretrained(model: "GPT2", folder: str | os.PathLike, tokenizer: Any = None) -> None:
    """model.safetensors + config.json, a valid HF GPT-2 folder, plus the tokenizer's files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if tokenizer is not None and tokenizer.n_vocab > model.config.vocab_size:
        raise WeightsError(f"{folder}: the tokenizer has {tokenizer.n_vocab} tokens, more than the model's "
                           f"vocab_size {model.config.vocab_size}: they do not belong together")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    config = hf_config_dict(model.config, eot_token=None if tokenizer is None else tokenizer.eot_token)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(folder / "config.json", config)
    # weights of an earlier save in other forms would shadow or contradict the new file
    for pattern in ("model.safetensors.index.json", "model-*-of-*.safetensors", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"):
        for stale in folder.glob(pattern):
            log.info("%s: removing %s of an earlier save", folder, stale.name)
            stale.unlink()
    if tokenizer is not None:
        tokenizer.save(folder)
        tok_config = folder / "tokenizer_config.json"
        if tok_config.exists():  # its context is the model's, which AutoTokenizer truncates to
            d = _read_json(tok_config)
            d["model_max_length"] = model.config.n_ctx
            write_json(tok_config, d)


def config_of(name_or_path: str | os.PathLike) -> GPT2Config:
    """The config of a preset name or a model folder (without loading weights)."""
    from .model import PRESETS

    if str(name_or_path) in PRESETS and not Path(name_or_path).exists():
        return PRESETS[str(name_or_path)]
    try:
        folder = resolve(name_or_path)
    except WeightsError as e:
        raise WeightsError(f"not a preset ({', '.join(PRESETS)}) nor a readable model: {e}") from None
    if (folder / "config.json").exists():
        return config_from_hf(folder / "config.json")
    return config_from_hparams(folder / "hparams.json")


__all__ = ["WeightsError", "load_pretrained", "save_pretrained", "read_tf_checkpoint", "crc32c",
           "hf_config_dict", "to_hf_state_dict", "from_hf_state_dict", "resolve", "config_of",
           "find_in_hf_cache", "expected_shapes", "check_tensors"]
