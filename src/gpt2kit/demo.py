"""The main job: a corpus -> a BPE vocabulary -> token shards -> a small GPT-2, in N minutes.

`demo()` does what `make demo` shows: it learns a byte-level BPE vocabulary on the corpus (by
default Shakespeare, `gpt2kit.corpus.shakespeare()`), prepares shards with a held-out split,
trains the demo model for the time budget, and measures the held-out text:

- loss and perplexity per token of the demo's vocabulary,
- bits per character: total negative log-likelihood of the held-out text in bits divided by its
  number of characters. It does not depend on the tokenizer, so it compares with character-level
  models (nanoGPT's Shakespeare quickstart reports nats per character: divide by ln 2),
- the same numbers for a unigram model of the training tokens (add-one smoothed): the baseline a
  model must beat to have learned anything about context.

It saves the model as a Hugging Face GPT-2 folder with the tokenizer (`gpt2kit generate --model
OUT/model`, `transformers.GPT2LMHeadModel.from_pretrained`), the loss plot and a JSON report.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, GPT2KitError, check_spawn_guard
from .io import check_output_path
from .train import TrainConfig, _resolve_device, make_config, resolve_dtype

log = logging.getLogger(__name__)

# The demo's settings, chosen for the best held-out bits/char after ~10 minutes on 2 CPU cores
# (docs/benchmarks.md has the measurements). A 4096-token BPE vocabulary makes a token about
# 3.2 characters of Shakespeare, so a small model sees ~3x more text per FLOP than a
# character-level one. bf16 autocast where the CPU has bf16 matrix instructions (dtype "auto"):
# twice the fp32 speed there; where they are missing, bf16 is no faster than fp32 (see
# train.resolve_dtype), so fp32.
DEMO_VOCAB = 4096
DEMO_VAL_FRACTION = 0.05
DEMO_TRAIN: dict[str, Any] = dict(
    model="mini", n_layer=4, n_head=4, n_embd=256, block_size=128,
    batch_size=32, lr=2e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.1,
    beta2=0.99, grad_clip=1.0, dropout=0.0, dtype="auto",
)
SAMPLE_TOKENS = 120
MIN_CORPUS_BYTES = 10_000  # a BPE vocabulary, 128-token windows and a held-out split need some text


def _segment_chars(paths: Sequence[Path]) -> int:
    """prepare's segment length for this corpus: its default 10,000 characters (Shakespeare's
    5 MB keeps it), shorter for a small --corpus, which would otherwise make too few segments for
    one of every 20 to be held out: about 40 segments at least."""
    size = sum(p.stat().st_size for p in paths)
    return max(100, min(10_000, size // 60))


def _draw_samples(model, tokenizer, count: int, *, seed: int) -> list[str]:
    """`count` unconditional samples, skipping draws that end at once (an early <|endoftext|>
    leaves nothing to show); seeds seed, seed+1, ... keep it reproducible."""
    from .train import sample_text

    texts: list[str] = []
    for attempt in range(4 * count):
        if len(texts) == count:
            break
        text = sample_text(model, tokenizer, "", SAMPLE_TOKENS, seed=seed + attempt)
        if text.strip():
            texts.append(text)
    return texts


def _measure_step_time(cfg: TrainConfig, n_vocab: int, steps: int = 3) -> float:
    """Seconds per optimizer step of this config on this machine (random tokens)."""
    import torch

    from .model import GPT2
    from .train import _loss_module, _make_optimizer, _model_config

    mc = _model_config(cfg, n_vocab)
    with torch.random.fork_rng(devices=[]):
        model = GPT2(mc)
        loss_mod = _loss_module(model)
        opt = _make_optimizer(cfg, loss_mod, torch.device("cpu"), False)
        block = cfg.block_size or mc.n_ctx
        micro = cfg.micro_batch_size or cfg.batch_size
        x = torch.randint(0, n_vocab, (micro, block))
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            for _ in range(cfg.batch_size // micro):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                    loss = loss_mod(x, x)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t)
    return float(np.median(times))


MIN_STEPS = 300


def fitted_batch_size(tokens: float, batch_size: int, block_size: int, min_steps: int = MIN_STEPS) -> int:
    """The largest power-of-two batch (at most `batch_size`, at least 4) that still gives
    `min_steps` optimizer steps within `tokens` tokens of compute.

    >>> fitted_batch_size(20e6, 32, 128), fitted_batch_size(300e3, 32, 128)
    (32, 4)
    """
    b = batch_size
    while b > 4 and tokens / (b * block_size) < min_steps:
        b //= 2
    return b


def heldout_nll(model, stream, *, block_size: int, batch_size: int = 16, dtype: str = "float32") -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of predicted tokens) of a whole token stream:
    consecutive windows predict every token but the first exactly once."""
    import torch

    from .data import sequential_windows
    from .train import linear_cross_entropy

    windows = sequential_windows(len(stream), block_size)
    total, count = 0.0, 0
    model.eval()
    V = model.config.vocab_size
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            by_len: dict[int, list[int]] = {}
            for start, length in group:
                by_len.setdefault(length, []).append(start)
            for length, starts in by_len.items():
                rows = np.stack([stream.window(s, length + 1) for s in starts])
                x = torch.from_numpy(rows[:, :-1])
                y = torch.from_numpy(rows[:, 1:])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    h = model.hidden_states(x)
                    loss = linear_cross_entropy(h, model.transformer.wte.weight[:V], y)
                total += float(loss) * y.numel()
                count += y.numel()
    return total, count


def unigram_nll(train_stream, val_stream, n_vocab: int) -> tuple[float, int]:
    """(total NLL in nats, tokens) of the validation tokens after the first under the training
    tokens' unigram distribution with add-one smoothing."""
    counts = np.zeros(n_vocab, dtype=np.float64)
    for shard in train_stream.shards:
        counts += np.bincount(shard, minlength=n_vocab)[:n_vocab]
    logp = np.log(counts + 1.0) - math.log(counts.sum() + n_vocab)
    val = np.concatenate([np.asarray(s) for s in val_stream.shards]).astype(np.int64)[1:]
    return float(-logp[val].sum()), len(val)


def demo(minutes: float = 10.0, *, out_dir: str | os.PathLike = "runs/demo",
         corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
         preset: str | None = None, vocab_size: int = DEMO_VOCAB, threads: int = 0, seed: int = 1337,
         progress: bool = False, samples: int = 3, overrides: dict[str, Any] | None = None) -> dict:
    """Run the demo; return its report (also written to OUT/report.json)."""
    import torch

    threads_before = torch.get_num_threads()
    try:
        return _demo(minutes, out_dir=out_dir, corpus=corpus, preset=preset, vocab_size=vocab_size, threads=threads,
                     seed=seed, progress=progress, samples=samples, overrides=overrides)
    finally:  # `threads` is the demo's setting, not the calling program's
        torch.set_num_threads(threads_before)


def _demo(minutes: float, *, out_dir: str | os.PathLike, corpus: str | os.PathLike | Sequence[str | os.PathLike] | None,
          preset: str | None, vocab_size: int, threads: int, seed: int, progress: bool, samples: int,
          overrides: dict[str, Any] | None) -> dict:
    import torch

    from .bpe_train import train_bpe
    from .corpus import shakespeare
    from .data import TokenStream, prepare
    from .model import GPT2, GPT2Config
    from .train import train

    if not 0 < minutes < math.inf:
        raise ConfigError(f"--minutes must be a positive number, got {minutes}")
    if vocab_size > 65536:  # (else found by prepare, after the vocabulary is learned)
        raise ConfigError(f"--vocab-size: at most 65536 (token shards hold uint16 ids), got {vocab_size}")
    if vocab_size < 257:  # (else found once the corpus is read)
        raise ConfigError(f"--vocab-size: at least 257 (the 256 bytes and <|endoftext|>), got {vocab_size}")
    t0 = time.perf_counter()
    out = check_output_path(out_dir, folder=True, what="--out")
    data_dir, run_dir = out / "data", out / "run"
    # the run's settings are checked now, not after the vocabulary and the shards are made
    values = dict(DEMO_TRAIN)
    if preset:
        GPT2Config.from_preset(preset)  # an unknown name fails with the list of presets
        values.update(model=preset, n_layer=0, n_head=0, n_embd=0)
    values.update(overrides or {})
    values.update(data=str(data_dir), out_dir=str(run_dir), seed=seed, progress=progress,
                  threads=threads, keep_last=1)
    cfg = make_config(values, source="demo")
    if isinstance(corpus, (str, os.PathLike)):  # one path (iterating "/data/x" would start at "/")
        corpus = [corpus]
    inputs = [Path(p) for p in corpus] if corpus else shakespeare()
    if corpus:
        from .corpus import expand_inputs

        inputs = expand_inputs(inputs)
        size = sum(p.stat().st_size for p in inputs)
        if size < MIN_CORPUS_BYTES:
            raise ConfigError(f"--corpus: {size:,} bytes of text; the demo needs at least {MIN_CORPUS_BYTES:,}")
    if threads:
        torch.set_num_threads(threads)
    workers = max(1, min(os.cpu_count() or 1, 4))
    try:  # worker processes that re-run the calling script (spawn, forkserver) would re-run an
        check_spawn_guard("demo")  # unguarded one: do that work in this process then
        guarded = True
    except GPT2KitError:
        guarded = False
    prepare_workers = workers if guarded else 1  # prepare's workers are spawned
    import multiprocessing as mp

    forks = (mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]) == "fork"
    bpe_workers = workers if guarded or forks else 1  # train_bpe's use the default start method

    log.info("1/5 learning a %d-token BPE vocabulary on %d file(s)", vocab_size, len(inputs))
    tok_dir = out / "tokenizer"
    tokenizer = train_bpe(inputs, vocab_size=vocab_size, workers=bpe_workers)
    tokenizer.save(tok_dir)

    log.info("2/5 tokenizing into shards")
    if (data_dir / "meta.json").exists():
        from .data import read_meta

        if read_meta(data_dir)["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
            shutil.rmtree(data_dir)
    meta = prepare(inputs, data_dir, tokenizer=str(tok_dir), val_fraction=DEMO_VAL_FRACTION,
                   segment_chars=_segment_chars(inputs), workers=prepare_workers, progress=progress)
    n_vocab = meta["tokenizer"]["n_vocab"]

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo run starts fresh: its schedule is fitted to its budget
    cfg = make_config({"dtype": resolve_dtype(cfg.dtype, _resolve_device(cfg, 0).type)}, source="demo", base=cfg)
    log.info("3/5 measuring the step time to fit the schedule into %.1f minutes", minutes)
    budget_s = 60.0 * minutes
    step_s = _measure_step_time(cfg, n_vocab)
    batch = fitted_batch_size(cfg.batch_size * (cfg.block_size or 128) / step_s * budget_s, cfg.batch_size,
                              cfg.block_size or 128)
    if batch != cfg.batch_size:
        # Too little compute for enough steps at the full batch (a short budget or a busy
        # machine): more, smaller steps learn faster; Adam's lr scales about as sqrt(batch).
        cfg = make_config({"batch_size": batch, "lr": cfg.lr * math.sqrt(batch / cfg.batch_size),
                           "min_lr": cfg.min_lr * math.sqrt(batch / cfg.batch_size)}, source="demo", base=cfg)
        step_s = _measure_step_time(cfg, n_vocab)
    # Evaluations of up to 64 windows each, and the checkpoints saved with them, come out of the budget
    # too: up to 10 a run, at most ~10% of the budget (a forward pass costs about a third of a
    # training step). Training stops one evaluation's time early, for the last one.
    # (fewer windows where one evaluation of 64 would take more than ~10% of a short budget: the
    # report's held-out numbers are measured apart, on all of the held-out text)
    eval_batches = max(1, min(64 // cfg.batch_size, int(0.1 * budget_s / (step_s / 3))))
    eval_s = eval_batches * step_s / 3
    n_evals = max(1, min(10, int(0.1 * budget_s / eval_s)))
    max_steps = max(10, int((0.95 * budget_s - n_evals * eval_s) / step_s))
    cfg = make_config({"max_steps": max_steps, "max_minutes": max(budget_s - eval_s, 0.5 * budget_s) / 60,
                       "eval_interval": max(1, -(-max_steps // n_evals)),  # (the last is at max_steps)
                       "warmup_steps": min(cfg.warmup_steps, max_steps // 10),
                       "eval_batches": eval_batches}, source="demo", base=cfg)
    log.info("4/5 training %s for ~%d steps (%.2f s/step measured)", _describe(cfg), max_steps, step_s)
    summary = train(cfg)
    if summary["stopped"] in ("SIGINT", "SIGTERM"):
        # the user (or a scheduler) asked it to stop, not to carry on evaluating and sampling
        raise Stopped(summary["stopped"], summary["step"], summary["checkpoint"])

    log.info("5/5 measuring the held-out text")
    ckpt = Path(summary["checkpoint"])
    model = GPT2.from_pretrained(str(ckpt))
    train_stream, val_stream = TokenStream(data_dir, "train"), TokenStream(data_dir, "val")
    block = cfg.block_size or model.config.n_ctx
    nll, n_tok = heldout_nll(model, val_stream, block_size=block)  # float32: the exact measure
    uni_nll, _ = unigram_nll(train_stream, val_stream, n_vocab)
    chars = val_stream.chars
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(str(model_dir), tokenizer=tokenizer)
    plot = None
    if summary.get("plot"):
        plot = out / "loss.png"
        shutil.copyfile(summary["plot"], plot)
    texts = _draw_samples(model, tokenizer, samples, seed=seed)
    report = {
        "corpus": "shakespeare" if not corpus else [str(p) for p in corpus],
        "minutes_budget": minutes, "train_seconds": round(summary["elapsed_s"], 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "steps": summary["step"], "tokens_trained": summary["step"] * cfg.batch_size * block,
        "model": _describe(cfg), "parameters": model.num_params(), "vocab_size": n_vocab,
        "train_tokens": len(train_stream), "val_tokens": len(val_stream), "val_chars": chars,
        "chars_per_token": round(chars / max(1, n_tok), 3),
        "val_loss": nll / n_tok, "val_perplexity": math.exp(nll / n_tok),
        "val_bits_per_char": nll / math.log(2) / chars,
        "unigram_loss": uni_nll / n_tok, "unigram_perplexity": math.exp(uni_nll / n_tok),
        "unigram_bits_per_char": uni_nll / math.log(2) / chars,
        "tokens_per_s": round(summary["tokens_per_s"]),
        "model_dir": str(model_dir), "plot": str(plot) if plot else None, "samples": texts,
    }
    from .io import write_json

    write_json(out / "report.json", report)
    return report


class Stopped(Exception):
    """The demo's training was stopped by a signal (SIGINT or SIGTERM) after saving its checkpoint:
    the demo ends there, without its report."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        super().__init__(f"stopped by {signal_name} during training at step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


def _describe(cfg: TrainConfig) -> str:
    from .train import _model_config

    mc = _model_config(cfg, 1)
    return (f"{mc.n_layer} layers x {mc.n_embd} ({mc.n_head} heads), context {cfg.block_size or mc.n_ctx}, "
            f"batch {cfg.batch_size}, {cfg.dtype}")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n:,}"  # (a short run's 37,888 was "0.0M")


def format_report(r: dict) -> str:
    lines = [
        "",
        f"gpt2kit demo: {r['model']}, {r['parameters'] / 1e6:.2f}M parameters, vocabulary {r['vocab_size']}",
        f"  trained {r['steps']} steps ({_count(r['tokens_trained'])} tokens) in {r['train_seconds']:.0f} s "
        f"({r['tokens_per_s']:,} tok/s); held-out text: {r['val_chars']:,} characters, {r['val_tokens']:,} tokens",
        "",
        f"  {'held-out text':<22}{'loss/token':>11}{'perplexity':>12}{'bits/char':>11}",
        f"  {'GPT-2 (this run)':<22}{r['val_loss']:>11.4f}{r['val_perplexity']:>12.2f}{r['val_bits_per_char']:>11.4f}",
        f"  {'unigram baseline':<22}{r['unigram_loss']:>11.4f}{r['unigram_perplexity']:>12.2f}{r['unigram_bits_per_char']:>11.4f}",
        "",
        f"  model: {r['model_dir']}  (gpt2kit generate --model {r['model_dir']} ...; transformers loads it too)",
    ]
    if r.get("plot"):
        lines.append(f"  loss plot: {r['plot']}")
    for i, text in enumerate(r["samples"], 1):
        lines += ["", f"--- sample {i} ---", text.strip("\n")]
    return "\n".join(lines)


__all__ = ["demo", "format_report", "heldout_nll", "unigram_nll", "DEMO_TRAIN", "DEMO_VOCAB"]
