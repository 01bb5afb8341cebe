"""`gpt2kit prepare`, `gpt2kit train`, `gpt2kit demo`."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into uint16 token shards",
                       description="Tokenize .txt/.jsonl files (optionally .gz/.zst) or folders into token shards "
                                   "with <|endoftext|> between documents and a held-out validation split. "
                                   "Rerunning skips finished shards.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="gpt2", help="a released name (gpt2) or a tokenizer folder (default: gpt2)")
    p.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    # Numbers are parsed by the handler, not argparse: its error is one line (argparse adds the usage),
    # and counts may be written like 1e8.
    p.add_argument("--val-fraction", default=0.005, help="share of text held out (default: 0.005)")
    p.add_argument("--shard-tokens", default=100_000_000, help="tokens per shard (default: 1e8)")
    p.add_argument("--segment-chars", default=10_000,
                   help="documents are split into segments of about this many characters for the split (default: 10000)")
    p.add_argument("--workers", default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    from ..train import FIELD_HELP, TrainConfig, bundled_configs, config_fields

    t = sub.add_parser("train", help="train or fine-tune a GPT-2 on prepared shards", allow_abbrev=False,
                       description="Train from a TOML run config (a file, or one shipped with gpt2kit by name: "
                                   f"{', '.join(bundled_configs())}); every key can be overridden "
                                   "on the command line as --key value. Under torchrun the same command runs "
                                   "data-parallel.",
                       epilog="Exit status: 0 when the run reaches max_steps or ends at its max_minutes budget "
                              "(a configured end: the last line then says how to continue); 130 after Ctrl-C "
                              "(SIGINT) and 143 after SIGTERM, each once the checkpoint is saved, with a last "
                              "line naming the step, the checkpoint and the command that resumes; 2 for a bad "
                              "config, data or checkpoint.")
    t.add_argument("config", nargs="?",
                   help=f"a TOML run config's path, or a bundled config's name ({', '.join(bundled_configs())})")
    defaults = TrainConfig()
    for name, typ in config_fields().items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = getattr(defaults, name)
        shown = repr(default) if isinstance(default, str) else default
        t.add_argument(*flags, dest=f"cfg.{name}", default=argparse.SUPPRESS, metavar=typ.__name__.upper(),
                       help=f"{FIELD_HELP[name]} (default: {shown})".replace("%", "%%"),
                       **({"nargs": "?", "const": "true"} if typ is bool else {}))
    _collect_unknown(t, [f for name, typ in config_fields().items() if typ is bool
                         for f in {f"--{name}", f"--{name.replace('_', '-')}"}])
    t.set_defaults(func=_train)

    d = sub.add_parser("demo", help="the main job: Shakespeare -> BPE -> shards -> a trained GPT-2 in N minutes",
                       description="Train a BPE tokenizer and a small GPT-2 on the default corpus (or yours) "
                                   "for a time budget; report held-out loss, perplexity and bits per character "
                                   "against a unigram baseline; save the model, the loss plot, and print samples.")
    d.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes (default: 10)")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--corpus", nargs="+", metavar="INPUT",
                   help="text files/folders instead of Shakespeare (at least 10 KB of text)")
    d.add_argument("--preset", default=None, help="another model preset instead of the demo's (see gpt2kit.demo)")
    d.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the demo's, 4096)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    d.add_argument("--seed", type=int, default=1337,
                   help="seeds the model, the batches and the samples (default: 1337)")
    d.set_defaults(func=_demo)


def _collect_unknown(parser: argparse.ArgumentParser, bool_flags: list[str]) -> None:
    """Keep unknown `--key` arguments for the handler, which names the valid keys in its error
    (argparse would only say "unrecognized arguments"). A bare bool flag followed by the config
    file (`--resume run.toml`) leaves the file alone. Only a word that names a config (a .toml
    name, an existing file or a bundled config's name) counts as one: any other word stays the flag's value, so that
    `--progress off` is refused as a bad bool value, not as an unknown key 'off'."""
    from ..train import BOOL_WORDS, bundled_configs

    parse = parser.parse_known_args

    def is_config(word: str) -> bool:  # (a file named `yes` in the working folder is still a value)
        return word.lower() not in BOOL_WORDS and (word.lower().endswith(".toml") or os.path.isfile(word)
                                                   or word in bundled_configs())

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        for i in reversed(range(len(args) - 1)):
            if args[i] in bool_flags and not args[i + 1].startswith("-") and is_config(args[i + 1]):
                args.insert(i + 1, "true")
        ns, rest = parse(args, namespace)
        ns.unknown_overrides = rest
        return ns, []

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _number(value: str | float) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _count(flag: str, value: str | int) -> int:
    """An integer >= 1, written out or in scientific notation (1e8, as the help shows defaults)."""
    from ..errors import ConfigError

    try:
        number: int | float = int(value)
    except ValueError:
        number = _number(value)
    if not (isinstance(number, int) or number.is_integer()) or number < 1:  # nan and inf are not integers
        raise ConfigError(f"{flag}: expected a whole number >= 1, got {value}")
    return int(number)


def _prepare(args: argparse.Namespace) -> int:
    from ..data import MAX_VAL_FRACTION, prepare
    from ..errors import ConfigError

    val_fraction = _number(args.val_fraction)
    if not 0 <= val_fraction <= MAX_VAL_FRACTION:  # also rejects nan
        raise ConfigError(f"--val-fraction: expected a number in [0, {MAX_VAL_FRACTION}], got {args.val_fraction}")
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, field=args.field,
                   val_fraction=val_fraction, shard_tokens=_count("--shard-tokens", args.shard_tokens),
                   segment_chars=_count("--segment-chars", args.segment_chars),
                   workers=_count("--workers", args.workers), progress=not args.no_progress)
    s = meta["splits"]
    print(f"prepared {args.out}: train {s['train']['tokens']:,} tokens in {len(s['train']['shards'])} shard(s), "
          f"val {s['val']['tokens']:,} tokens in {len(s['val']['shards'])} shard(s); "
          f"vocabulary {meta['tokenizer']['n_vocab']} ({meta['tokenizer']['fingerprint'][:12]})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..train import config_fields, load_config, train

    from ..errors import ConfigError

    if args.unknown_overrides:
        bad = next((a for a in args.unknown_overrides if a.startswith("--")), args.unknown_overrides[0])
        raise ConfigError(f"command line: unknown key {bad!r}; valid keys: {', '.join(config_fields())}")
    overrides = {k.removeprefix("cfg."): v for k, v in vars(args).items() if k.startswith("cfg.")}
    config = args.config
    cfg = load_config(config, overrides)
    s = train(cfg)
    if s.get("nothing_to_do"):
        if s["rank"] != 0:
            return 0
        print(f"nothing to train: {s['checkpoint']} is at step {s['step']}, the configured max_steps")
        return 0
    code = _EXIT_CODES[s["stopped"]]
    if s["rank"] != 0:
        return code  # rank 0 prints the summary
    val = f", val loss {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
    print(f"trained {s['step'] - s['start_step']} steps to step {s['step']} in {s['elapsed_s']:.1f} s "
          f"({s['tokens_per_s']:,.0f} tok/s): loss {s['loss']:.4f}{val}; checkpoint {s['checkpoint']}"
          + (f"; stopped by {s['stopped']}" if s["stopped"] and s["stopped"] != "time" else ""))
    if s["stopped"]:
        why = f"the time limit (max_minutes {cfg.max_minutes:g})" if s["stopped"] == "time" else s["stopped"]
        print(f"gpt2kit: stopped by {why} at step {s['step']} of {s['max_steps']}; checkpoint {s['checkpoint']}; "
              f"resume with: {_resume_command(config, overrides)}", file=sys.stderr)
    return code


# A run stopped by a signal was interrupted: 128 + the signal's number, as a shell reports a process
# the signal killed, so that `train && export` or a scheduler does not take it for a finished one.
# max_minutes is an end the run was configured to have: success, like reaching max_steps.
_EXIT_CODES = {None: 0, "time": 0, "SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def _resume_command(config: str | None, overrides: dict[str, str]) -> str:
    """This run's command line (as parsed: each key once) with --resume; under torchrun, its
    worker part, which follows the launcher's own options."""
    words = ["gpt2kit", "train", *([config] if config else [])]
    for key, value in overrides.items():
        if key != "resume":
            words += [f"--{key}", value]
    command = shlex.join(words + ["--resume"])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return f"the same torchrun launch, its command ending in: -m {command}"
    return command


def _demo(args: argparse.Namespace) -> int:
    from ..demo import DEMO_VOCAB, Stopped, demo, format_report

    try:
        report = demo(minutes=args.minutes, out_dir=args.out, corpus=args.corpus, preset=args.preset,
                      vocab_size=DEMO_VOCAB if args.vocab_size is None else args.vocab_size, threads=args.threads, seed=args.seed, progress=True)
    except Stopped as e:
        print(f"gpt2kit: demo {e} (no report: run `gpt2kit demo` again to start over)", file=sys.stderr)
        return _EXIT_CODES[e.signal_name]
    print(format_report(report))
    return 0
