"""`gpt2kit tokenizer encode|decode|train|info`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import GPT2KitError

_TOKENIZER_HELP = "a released name (gpt2) or a folder with encoder.json+vocab.bpe or tokenizer.json (default: gpt2)"


class CommandInputError(GPT2KitError):
    """Text on the command line or stdin that is not what the command expects."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="encode, decode, train and inspect byte-level BPE tokenizers",
                       description="GPT-2's byte-level BPE tokenizer: the released vocabulary or your own.")
    cmds = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    e = cmds.add_parser("encode", help="text -> token ids",
                        description="Encode each FILE (or stdin) and print its token ids on one line. Text that "
                                    "spells a special token is ordinary text unless --allow-special is given.")
    e.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files, optionally .gz/.zst (default: stdin)")
    _add_tokenizer_args(e)
    fmt = e.add_mutually_exclusive_group()
    fmt.add_argument("--ids", action="store_true", help="space-separated ids, one line per input (the default)")
    fmt.add_argument("--json", action="store_true", help='one JSON object per input: {"source", "n_tokens", "ids"}')
    fmt.add_argument("--count", action="store_true", help="only the number of tokens per input")
    e.add_argument("--allow-special", action="store_true", help="turn special-token text (<|endoftext|>) into its id")
    e.set_defaults(func=_encode)

    d = cmds.add_parser("decode", help="token ids -> text",
                        description="Decode token ids given as arguments or on stdin (whitespace/comma separated, "
                                    "or a JSON list). A character split at the end becomes U+FFFD unless --bytes.")
    d.add_argument("ids", nargs="*", metavar="ID", help="token ids (default: read stdin)")
    _add_tokenizer_args(d)
    d.add_argument("--bytes", action="store_true", help="write the exact bytes, not text")
    d.set_defaults(func=_decode)

    t = cmds.add_parser("train", help="learn a byte-level BPE vocabulary (GPT-2's rule) from text",
                        description="Learn merges from .txt/.jsonl files or folders (optionally .gz/.zst) and "
                                    "write encoder.json, vocab.bpe, vocab.json, merges.txt and tokenizer.json to "
                                    "--out. Ties between equally frequent pairs go to the smaller (left, right) bytes.")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary: 256 bytes + merges + specials")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    t.add_argument("--special", action="append", metavar="TOKEN",
                   help="a special token, repeatable (default: <|endoftext|>)")
    t.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes counting pre-tokens (default: all cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    i = cmds.add_parser("info", help="describe a tokenizer", description="Print vocabulary size, special tokens, "
                        "fingerprint and, with --text, how a text splits into tokens.")
    _add_tokenizer_args(i)
    i.add_argument("--text", help="show the tokens of this text")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="gpt2", help=_TOKENIZER_HELP)
    p.add_argument("--engine", choices=("fast", "reference"), default="fast",
                   help="fast (tiktoken's core, default) or reference (pure Python); identical ids")


def _load(args: argparse.Namespace):
    from ..tokenizer import Tokenizer

    return Tokenizer.from_pretrained(args.tokenizer, engine=args.engine)


def _text_arg(value: str, flag: str) -> str:
    """A command-line argument as text. A byte that is not UTF-8 reaches Python as a lone
    surrogate U+DC80..U+DCFF (PEP 383); it is named as the byte it was."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        cp = ord(value[e.start])
        what = f"byte 0x{cp - 0xDC00:02x}" if 0xDC80 <= cp <= 0xDCFF else f"lone surrogate U+{cp:04X}"
        raise CommandInputError(f"{flag}: not valid UTF-8: {what} at character {e.start}") from None
    return value


def _read_stdin() -> str:
    from ..corpus import decode_utf8

    return decode_utf8(sys.stdin.buffer.read(), "<stdin>")


def _encode(args: argparse.Namespace) -> int:
    from ..corpus import read_text

    tok = _load(args)
    sources = [(f, read_text(f)) for f in args.files] if args.files else [("<stdin>", _read_stdin())]
    allowed = "all" if args.allow_special else frozenset()
    batch = tok.encode_batch([text for _, text in sources], allowed_special=allowed)
    out = sys.stdout
    for (name, _), ids in zip(sources, batch):
        if args.json:
            out.write(json.dumps({"source": os.fspath(name), "n_tokens": len(ids), "ids": ids}) + "\n")
        elif args.count:
            out.write(f"{len(ids)}\n")
        else:
            out.write(" ".join(map(str, ids)) + "\n")
    return 0


def _parse_ids(words: list[str], source: str) -> list[int]:
    if len(words) == 1 and words[0].lstrip().startswith("["):
        try:
            data = json.loads(words[0])
        except json.JSONDecodeError as e:
            raise CommandInputError(f"{source}: not a valid JSON list of ids ({e.msg})") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in data):
            raise CommandInputError(f"{source}: expected a JSON list of integer ids")
        return data
    ids = []
    for w in " ".join(words).replace(",", " ").split():
        try:
            ids.append(int(w))
        except ValueError:
            raise CommandInputError(f"{source}: {w[:30]!r} is not a token id (expected integers)") from None
    return ids


def _decode(args: argparse.Namespace) -> int:
    tok = _load(args)
    ids = _parse_ids(args.ids, "arguments") if args.ids else _parse_ids([_read_stdin()], "<stdin>")
    # Bytes straight to stdout: the text is UTF-8 whatever the terminal's locale says.
    data = tok.decode_bytes(ids) if args.bytes else tok.decode(ids).encode("utf-8")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _train(args: argparse.Namespace) -> int:
    import time

    from ..bpe_train import train_bpe
    from ..corpus import expand_inputs
    from ..io import check_output_path

    specials = [_text_arg(s, "--special") for s in args.special] if args.special is not None else ["<|endoftext|>"]
    out = check_output_path(args.out, folder=True, what="--out")
    # `train --out data/tok data/`: a rerun must not learn from the last run's vocabulary files
    inputs = [p for p in expand_inputs(args.inputs) if not p.resolve().is_relative_to(out.resolve())]
    start = time.perf_counter()
    tok = train_bpe(inputs, vocab_size=args.vocab_size, special_tokens=specials, field=args.field,
                    workers=args.workers, progress=not args.no_progress)
    tok.save(args.out)
    print(f"trained {len(tok.merges)} merges in {time.perf_counter() - start:.1f} s: vocabulary {tok.n_vocab} "
          f"({tok.fingerprint[:12]}) written to {args.out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    tok = _load(args)
    info = {
        "tokenizer": os.fspath(args.tokenizer),
        "n_vocab": tok.n_vocab,
        "merges": len(tok.merges),
        "special_tokens": tok.special_tokens,
        "fingerprint": tok.fingerprint,
    }
    if args.text is not None:
        ids = tok.encode(_text_arg(args.text, "--text"))
        info["tokens"] = [{"id": i, "bytes": tok.token_bytes(i).decode("utf-8", errors="backslashreplace")} for i in ids]
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    for key in ("tokenizer", "n_vocab", "merges", "fingerprint"):
        print(f"{key}: {info[key]}")
    print("special_tokens: " + ", ".join(f"{t} = {i}" for t, i in info["special_tokens"].items()))
    if "tokens" in info:
        print(f"tokens ({len(info['tokens'])}): " + " ".join(f"{t['bytes']!r}={t['id']}" for t in info["tokens"]))
    return 0
