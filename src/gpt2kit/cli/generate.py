"""`gpt2kit generate`: sample text from a prompt, streamed to the terminal."""
from __future__ import annotations

import argparse
import json
import sys


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and how to load it (shared with `gpt2kit serve`)."""
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="a checkpoint folder (ours, Hugging Face or OpenAI's release) or a released name")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights dtype (default: as stored; float16 runs as float32 on a CPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="dynamic int8 quantization of the linear layers (CPU; faster, slightly inexact)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="sample text from a prompt",
        description="Continue PROMPT (or stdin with '-', or an empty document by default) with a GPT-2 "
                    "model. Sampling defaults to the paper's preset (top-k 40, temperature 1); options "
                    "given override the preset's fields.")
    add_model_options(p)
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                   help="the text to continue; '-' reads it from stdin")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens per sample (default 100)")
    p.add_argument("--preset", default="paper", help="sampling preset: paper (top-k 40), greedy, nucleus, pure")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="0 = greedy (preset's: 1)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most probable tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens with probability >= P (nucleus)")
    p.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="sample among the tokens at least P times as probable as the most probable one")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="> 1 makes tokens already present less likely (CTRL's penalty)")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help="subtract X from the logit of every token sampled so far (OpenAI's; -2 to 2 there)")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help="subtract X per time a token was sampled so far (OpenAI's; -2 to 2 there)")
    p.add_argument("--logit-bias", action="append", default=None, metavar="ID=VALUE", type=_bias_pair,
                   help="add VALUE to token ID's logit (repeatable; -100 bans the token, 100 forces it)")
    p.add_argument("--greedy", action="store_true", help="always take the most probable token")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a sample where TEXT appears (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="the same seed and --num-samples give the same text")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples of the prompt, decoded as one batch (default 1, at most 128)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sample (prompt, text, token ids, finish reason)")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts in a loop (one per line) until end of input (Ctrl-D); "
                        "Ctrl-C stops the current answer")
    p.set_defaults(func=run)


def _bias_pair(text: str) -> tuple[int, float]:
    token, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=VALUE (a token id and a number, e.g. 50256=-100), "
                                         f"got {text!r}") from None


_SAMPLING = ("preset", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample",
             "presence_penalty", "frequency_penalty", "logit_bias")


def _options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, preset=args.preset, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                do_sample=False if args.greedy else None, stop=args.stop, seed=args.seed,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                logit_bias=None if args.logit_bias is None else dict(args.logit_bias))


def _sample_header(i: int, total: int) -> str:
    return f"{'=' * 20} SAMPLE {i + 1} of {total} {'=' * 20}\n" if total > 1 else ""


def _stdin_text() -> str:
    # bytes, decoded here: an error names stdin and the byte, whatever the locale's decoder does
    from ..corpus import decode_utf8

    buffer = getattr(sys.stdin, "buffer", None)
    return sys.stdin.read() if buffer is None else decode_utf8(buffer.read(), "<stdin>")


def _stdin_line() -> bytes | str:
    buffer = getattr(sys.stdin, "buffer", None)
    return sys.stdin.readline() if buffer is None else buffer.readline()


def _respond(model, tokenizer, prompt: str, args, out) -> None:
    from ..generate import generate, iter_generate, sampling_params

    opts = _options(args)
    if args.json:
        for c in generate(model, tokenizer, prompt, n=args.num_samples, **opts):
            out.write(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                                  "finish_reason": c.finish_reason}, ensure_ascii=False) + "\n")
        out.flush()
        return
    if args.no_stream:
        for i, c in enumerate(generate(model, tokenizer, prompt, n=args.num_samples, **opts)):
            out.write(_sample_header(i, args.num_samples) + c.text + "\n")
        out.flush()
        return
    # All samples decode together; the first is shown as it grows, the others (finished at about
    # the same time) follow. The same seed gives the same samples as --no-stream and --json.
    out.write(_sample_header(0, args.num_samples))
    rest = [""] * args.num_samples
    params = sampling_params(**{k: opts.pop(k) for k in _SAMPLING})
    for ev in iter_generate(model, tokenizer, [prompt], n=args.num_samples, params=params, **opts):
        if ev.index == 0:
            out.write(ev.text)
            out.flush()
        else:
            rest[ev.index] += ev.text
    out.write("\n")
    for i in range(1, args.num_samples):
        out.write(_sample_header(i, args.num_samples) + rest[i] + "\n")
    out.flush()


def _check_greedy(args) -> None:
    """Greedy decoding never reads the sampling filters: given, they would be silently ignored."""
    from ..errors import GPT2KitError

    if not (args.greedy or args.preset == "greedy" or args.temperature == 0):
        return
    given = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                      ("--top-p", args.top_p), ("--min-p", args.min_p)) if value is not None]
    given = [f for f in given if not (f == "--temperature" and args.temperature == 0)]  # 0 means greedy too
    if given:
        raise GPT2KitError(f"{', '.join(given)}: no effect with greedy decoding (--greedy, --preset greedy "
                           "or --temperature 0); drop them, or sample")


MAX_SAMPLES = 128  # the server's most completions per request, too


def run(args) -> int:
    from ..corpus import decode_utf8
    from ..errors import GPT2KitError
    from ..generate import check_logit_bias, load_for_inference, sampling_params

    if args.num_samples < 1:
        raise GPT2KitError(f"--num-samples: expected an integer >= 1, got {args.num_samples}")
    if args.num_samples > MAX_SAMPLES:  # one batch, with a KV cache row each: 10^8 ran out of memory, silently
        raise GPT2KitError(f"--num-samples: at most {MAX_SAMPLES} (they decode as one batch), got {args.num_samples}; "
                           f"run it again with another --seed for more")
    if args.interactive and args.prompt is not None:
        raise GPT2KitError("--interactive reads its prompts from stdin: give no PROMPT argument")
    if args.max_new_tokens < 0:
        raise GPT2KitError(f"--max-new-tokens: expected an integer >= 0, got {args.max_new_tokens}")
    _check_greedy(args)
    opts = _options(args)
    params = sampling_params(**{k: opts[k] for k in _SAMPLING})  # bad options fail before the model loads
    model, tokenizer = load_for_inference(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    check_logit_bias(model, params)  # before the first prompt is read (--interactive)
    out = sys.stdout
    if args.interactive:
        tty = sys.stdin.isatty()
        offset = 0
        while True:
            if tty:
                sys.stderr.write("prompt> ")
                sys.stderr.flush()
            raw = _stdin_line()
            if not raw:  # end of input (Ctrl-D)
                if tty:
                    sys.stderr.write("\n")
                return 0
            offset += len(raw)
            try:
                line = decode_utf8(raw, "<stdin>", offset - len(raw)) if isinstance(raw, bytes) else raw
            except GPT2KitError as e:  # a bad line is refused, the session goes on
                print(f"gpt2kit: error: {e}", file=sys.stderr)
                continue
            try:
                _respond(model, tokenizer, line.rstrip("\n"), args, out)
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
                out.write("\n")
                out.flush()
    prompt = _stdin_text() if args.prompt == "-" else (args.prompt or "")
    _respond(model, tokenizer, prompt, args, out)
    return 0
