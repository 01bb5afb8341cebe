"""`gpt2kit model info|convert`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect and convert GPT-2 models",
                       description="GPT-2 model presets and weights (Hugging Face and OpenAI formats).")
    cmds = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    i = cmds.add_parser("info", help="size and shape of a preset or a model folder",
                        description="Print layers, width, heads, context, parameter counts and the memory the "
                                    "weights take per dtype, for a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                                    "tiny, mini, small-cpu) or a model folder / cached hub name. Reads no weights.")
    i.add_argument("model", metavar="PRESET|PATH", help="a preset name or a model folder (or hub name in the HF cache)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_info)

    c = cmds.add_parser("convert", help="write any readable model as a Hugging Face folder",
                        description="Load a model (an OpenAI release folder with its TensorFlow checkpoint, an HF "
                                    "folder, a cached hub name) and write model.safetensors + config.json (+ the "
                                    "tokenizer files when the source has them), loadable by transformers.")
    c.add_argument("source", metavar="PATH", help="the model to read")
    c.add_argument("out", metavar="OUT", help="the folder to write")
    c.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype (default: fp32)")
    c.set_defaults(func=_convert)


def _info(args: argparse.Namespace) -> int:
    from ..model import PRESETS
    from ..weights import config_of

    config = config_of(args.model)
    total, without = config.num_params(), config.num_params(include_embedding=False)
    memory = {dtype: total * n for dtype, n in _BYTES.items()}
    # keys + values, every layer, per token of context
    kv_per_token = {dtype: 2 * config.n_layer * config.n_embd * n for dtype, n in _BYTES.items()}
    info = {"model": args.model, "preset": args.model in PRESETS and not Path(args.model).exists(),
            "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head, "n_ctx": config.n_ctx,
            "vocab_size": config.vocab_size, "params": total, "params_without_token_embedding": without,
            "weights_bytes": memory, "kv_cache_bytes_per_token": kv_per_token}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model      {args.model}{' (preset)' if info['preset'] else ''}")
    print(f"layers     {config.n_layer}")
    print(f"width      {config.n_embd}")
    print(f"heads      {config.n_head} (head size {config.head_size})")
    print(f"context    {config.n_ctx}")
    print(f"vocab      {config.vocab_size}")
    print(f"params     {total:,} ({_human(total)}); without the tied token embedding {without:,} ({_human(without)})")
    print("memory     " + ", ".join(f"{d} {_bytes(b)}" for d, b in memory.items()) + " (weights only)")
    print("kv cache   " + ", ".join(f"{d} {_bytes(b)}" for d, b in kv_per_token.items()) + " per token of context")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ..model import GPT2
    from ..weights import resolve

    from ..io import check_output_path

    check_output_path(args.out, folder=True, what="OUT")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    folder = resolve(args.source)
    model = GPT2.from_pretrained(str(folder), dtype=dtype)
    tokenizer = None
    if any((folder / f).exists() for f in ("encoder.json", "vocab.json", "tokenizer.json")):
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(folder)
    model.save_pretrained(args.out, tokenizer=tokenizer)
    print(f"wrote {args.out}: {model.num_params():,} parameters ({args.dtype})"
          f"{', with tokenizer files' if tokenizer else ', no tokenizer files in the source'}")
    return 0


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"  # (a test-sized model was "0.0M")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
