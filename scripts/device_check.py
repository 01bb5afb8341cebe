"""gpt2kit's accelerator paths against transformers, in one short run.

The development machine has no GPU; this is the prepared check for a machine that has one
(a few minutes on one GPU), and the test suite runs it on the CPU so that it keeps working.

    python scripts/device_check.py                          # CUDA where there is one, else the CPU
    python scripts/device_check.py --device cpu --quick     # what tests/test_device_check.py runs
    PYTHONPATH=src python3 scripts/device_check.py --out DIR   # where gpt2kit is not installed

Each check prints PASS, FAIL or "not run" (with why) and what it measured; the exit code is 1
when any check fails. `--out DIR` also writes the results to DIR/device_check.json.

  forward fp32     logits of a left-padded batch (the gpt2 width, 2 layers) against
                   transformers.GPT2LMHeadModel holding the same random weights: max |diff| <= 1e-4
                   (TF32 off)
  forward bf16     both models cast to the dtype: ours no further from the fp32 logits than
  forward fp16     transformers' (x1.5 + 1e-3); fp16 on CUDA only
  kv cache         decoding token by token through the KV cache == one full forward pass (1e-4)
  greedy           greedy tokens == transformers' `generate` (a model with sharp distributions)
  compile          torch.compile(model) logits == eager logits (1e-4)
  train            `gpt2kit.train` on a tiny corpus on the device, dtype "auto" (bf16 where the
                   device multiplies it): the loss falls; the checkpoint loads in transformers
                   with the same logits
  train compiled   a float32 run with compile = true: the losses of the eager run (1e-4)
  torchrun         that float32 run under torchrun (nccl on CUDA, gloo on CPU; one GPU is one
                   rank, still through torch.distributed), with DDP and with fsdp = true: the
                   losses of one process (1e-4), rank 0's checkpoints, and its log naming the
                   backend
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; a machine without network must not wait on it

import torch
import transformers

from gpt2kit import train as T
from gpt2kit.bpe_train import train_bpe
from gpt2kit.data import prepare
from gpt2kit.generate import generate_tokens
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.sampling import SamplingParams
from gpt2kit.weights import hf_config_dict, to_hf_state_dict

ROOT = Path(__file__).resolve().parent.parent


class NotRun(Exception):
    """A check that does not apply to this device (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Models and inputs


def hf_twin(model: GPT2) -> transformers.GPT2LMHeadModel:
    """transformers' GPT-2 holding exactly `model`'s weights (lm_head tied to wte), on its device."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(model.config)))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)  # lm_head.weight: tied, not stored
    return hf.to(next(model.parameters()).device).eval()


def random_model(device: str, seed: int = 0, **kw) -> GPT2:
    """The gpt2 preset's width and heads with 2 layers and a 128-token context, random weights."""
    torch.manual_seed(seed)
    return GPT2(GPT2Config.from_preset("gpt2", **{"n_layer": 2, "n_ctx": 128, **kw})).to(device).eval()


def left_padded(vocab: int, lengths: list[int], T: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    return ids.masked_fill(mask == 0, vocab - 1).to(device), mask.to(device)


def hf_logits(hf, ids, mask) -> torch.Tensor:
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return hf(ids, attention_mask=mask, position_ids=position_ids).logits


# ---------------------------------------------------------------------------------------------
# Checks: each returns (passed, what it measured) or raises NotRun


def check_forward_fp32(device: str) -> tuple[bool, str]:
    model = random_model(device)
    ids, mask = left_padded(model.config.vocab_size, [32, 20, 5], 32, device)
    with torch.no_grad():
        diff = (model(ids, attention_mask=mask) - hf_logits(hf_twin(model), ids, mask))[mask.bool()].abs().max().item()
    return diff <= 1e-4, f"max |ours - transformers| = {diff:.2e} (limit 1e-4)"


def check_forward_low(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype == torch.float16 and device == "cpu":
        raise NotRun("fp16 is a CUDA dtype here")
    model = random_model(device)
    hf = hf_twin(model)
    ids, mask = left_padded(model.config.vocab_size, [32, 20, 5], 32, device)
    real = mask.bool()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).float()
        ours = (model.to(dtype)(ids, attention_mask=mask).float() - ref)[real].abs().max().item()
        theirs = (hf_logits(hf.to(dtype), ids, mask).float() - ref)[real].abs().max().item()
    limit = 1.5 * theirs + 1e-3
    return ours <= limit, f"max error vs fp32: ours {ours:.2e}, transformers {theirs:.2e} (limit {limit:.2e})"


def check_kv_cache(device: str) -> tuple[bool, str]:
    model = random_model(device)
    prompt, prompt_mask = left_padded(model.config.vocab_size, [6, 3, 1], 6, device)
    new = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2)).to(device)
    ids = torch.cat([prompt, new], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(3, max_len=20)
        steps = [model(prompt, attention_mask=prompt_mask, kv_cache=cache),
                 model(new[:, :2], attention_mask=mask[:, :8], kv_cache=cache)]  # a block, then one at a time
        steps += [model(new[:, t:t + 1], attention_mask=mask[:, :7 + t], kv_cache=cache) for t in range(2, 7)]
    diff = (torch.cat(steps, 1) - full)[mask.bool()].abs().max().item()
    return diff <= 1e-4, f"max |cached - full| = {diff:.2e} (limit 1e-4)"


def check_greedy(device: str) -> tuple[bool, str]:
    # large weights make each next-token distribution sharp, so no choice hangs on float rounding
    torch.manual_seed(3)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=64)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (9, 4, 1)]
    steps = list(generate_tokens(model, prompts, SamplingParams(do_sample=False), max_new_tokens=16, pad_id=0))
    ours = [[s.tokens[i] for s in steps] for i in range(len(prompts))]
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = hf_twin(model).generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                  max_new_tokens=16, pad_token_id=0, eos_token_id=EOT)
    theirs = out[:, width:].tolist()
    same = sum(upto_eot(a) == upto_eot(b) for a, b in zip(ours, theirs))
    return same == len(prompts), f"{same} of {len(prompts)} left-padded rows decode the same 16 tokens"


EOT = 50256  # transformers stops a row there (and pads it); gpt2kit's token loop leaves that to its caller


def upto_eot(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOT) + 1] if EOT in tokens else tokens


def check_compile(device: str) -> tuple[bool, str]:
    model = random_model(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        eager = model(ids)
        t = time.perf_counter()
        compiled = torch.compile(model)(ids)
        warm = time.perf_counter() - t
    diff = (compiled - eager).abs().max().item()
    return diff <= 1e-4, f"max |compiled - eager| = {diff:.2e} (limit 1e-4), compiled in {warm:.0f} s"


# ---------------------------------------------------------------------------------------------
# Training checks: one tiny corpus, several runs


def synthetic_text(n_chars: int = 300_000, seed: int = 0) -> str:
    """Sentences of 400 made-up words drawn with Zipf-like frequencies: the same text on every
    machine (no download), which a small model learns within a few dozen steps."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "zu", "ri"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines, n = [], 0
    while n < n_chars:
        line = " ".join(words[min(int(rng.paretovariate(1.1)), 400) - 1] for _ in range(rng.randint(4, 12)))
        lines.append(line.capitalize() + ".")
        n += len(lines[-1]) + 1
    return "\n".join(lines)


def tiny_shards(work: Path) -> Path:
    """A 512-token BPE vocabulary and shards of `synthetic_text`."""
    text = work / "text"
    text.mkdir()
    for i in range(4):
        (text / f"part{i}.txt").write_text(synthetic_text(seed=i))
    train_bpe([text], vocab_size=512).save(work / "tok")
    prepare([text], work / "data", tokenizer=str(work / "tok"), val_fraction=0.05, segment_chars=2000)
    return work / "data"


RUN = dict(model="tiny", n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=16, micro_batch_size=8,
           lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=20, eval_batches=2, progress=False, plot=False)
COMPARE_STEPS = 10  # the fp32 runs that must equal each other (float32, TF32 off: 1e-4)


def run_losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def close(a: dict[int, float], b: dict[int, float], tol: float) -> tuple[bool, float]:
    if not a or a.keys() != b.keys():
        return False, math.inf
    worst = max(abs(a[k] - b[k]) for k in a)
    return worst <= tol, worst


def check_train(device: str, data: Path, work: Path, steps: int) -> tuple[bool, str]:
    """dtype "auto": bf16 where the device multiplies it (a GPU), the run's real precision."""
    summary = T.train(T.make_config({**RUN, "data": str(data), "out_dir": str(work / "auto"), "device": device,
                                     "max_steps": steps, "dtype": "auto"}))
    lo = run_losses(work / "auto")
    falls = lo[steps] < lo[1] - 1.0
    dtype = T.resolve_dtype("auto", torch.device(device).type)
    # the checkpoint is a transformers GPT-2 folder: same logits from both libraries
    ours = GPT2.from_pretrained(summary["checkpoint"]).to(device).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(summary["checkpoint"]).to(device).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    ok = falls and diff <= 1e-4
    return ok, (f"{dtype}: loss {lo[1]:.3f} -> {lo[steps]:.3f} in {steps} steps ({summary['tokens_per_s']:,.0f} tok/s); "
                f"checkpoint in transformers: max |diff| {diff:.2e}")


def reference_run(device: str, data: Path, work: Path) -> dict[int, float]:
    """One process, eager, float32: what the compiled and the torchrun runs must reproduce."""
    out = work / "reference"
    if not out.exists():
        T.train(T.make_config({**RUN, "data": str(data), "out_dir": str(out), "device": device,
                               "max_steps": COMPARE_STEPS, "dtype": "float32"}))
    return run_losses(out)


def check_train_compiled(device: str, data: Path, work: Path, steps: int) -> tuple[bool, str]:
    ref = reference_run(device, data, work)
    T.train(T.make_config({**RUN, "data": str(data), "out_dir": str(work / "compiled"), "device": device,
                           "max_steps": COMPARE_STEPS, "dtype": "float32", "compile": True}))
    ok, worst = close(ref, run_losses(work / "compiled"), 1e-4)
    return ok, f"float32, max |compiled - eager| loss over {COMPARE_STEPS} steps = {worst:.2e} (limit 1e-4)"


def torchrun_ranks(device: str) -> int:
    return min(2, torch.cuda.device_count()) if device.startswith("cuda") else 2


def check_torchrun(device: str, data: Path, work: Path, steps: int, timeout: float = 180) -> tuple[bool, str]:
    ref = reference_run(device, data, work)
    ranks = torchrun_ranks(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    notes, ok = [], True
    for name in ("ddp", "fsdp"):
        out = work / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "gpt2kit", "train"]
        for k, v in {**RUN, "data": data, "out_dir": out, "device": "cuda" if device.startswith("cuda") else device,
                     "max_steps": COMPARE_STEPS, "dtype": "float32", "fsdp": name == "fsdp"}.items():
            cmd += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
        # its own process group, so that a hung run is killed with every rank it started
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            return False, f"{name}: no result within {timeout:.0f} s; last output:\n" + tail(log)
        if proc.returncode != 0:
            return False, f"{name}: torchrun exited {proc.returncode}; last output:\n" + tail(log)
        # the run must have gone through torch.distributed (its log line names the backend)
        distributed = f"{ranks} rank(s) over {backend}, {name}" in log
        same, worst = close(ref, run_losses(out), 1e-4)
        saved = sorted(p.name for p in (out / "checkpoints").iterdir())
        one = saved == sorted(p.name for p in (work / "reference" / "checkpoints").iterdir())  # rank 0's alone
        ok = ok and distributed and same and one
        notes.append(f"{name}: {'distributed' if distributed else 'NOT distributed'}, max |loss - one process| "
                     f"{worst:.2e} (limit 1e-4), checkpoints {', '.join(saved)}" + ("" if one else " (not one process's)"))
    return ok, f"{ranks} rank(s) over {backend}; " + "; ".join(notes)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------


def run_checks(args, work: Path, report) -> dict[str, dict]:
    data: list[Path] = []

    def with_data(fn):
        def run(device):
            if not data:
                data.append(tiny_shards(work))
            return fn(device, data[0], work, args.steps)
        return run

    checks = {
        "forward fp32": check_forward_fp32,
        "forward bf16": lambda d: check_forward_low(d, torch.bfloat16),
        "forward fp16": lambda d: check_forward_low(d, torch.float16),
        "kv cache": check_kv_cache,
        "greedy": check_greedy,
        "compile": check_compile,
        "train": with_data(check_train),
        "train compiled": with_data(check_train_compiled),
        "torchrun": with_data(check_torchrun),
    }
    skipped_by_quick = {"compile", "train compiled", "torchrun"}
    results: dict[str, dict] = {}
    start = time.monotonic()
    for name, fn in checks.items():
        t = time.perf_counter()
        trace = None
        try:
            if args.quick and name in skipped_by_quick:
                raise NotRun("--quick")
            if args.deadline and time.monotonic() - start > args.deadline:
                raise NotRun(f"--deadline {args.deadline:.0f} s passed")
            ok, detail = fn(args.device)
            status = "PASS" if ok else "FAIL"
        except NotRun as e:
            status, detail = "not run", str(e)
        except Exception as e:  # a check that crashes is a failed check; the others still run
            status, detail, trace = "FAIL", f"{type(e).__name__}: {e}", traceback.format_exc()
        results[name] = {"status": status, "detail": detail, "seconds": round(time.perf_counter() - t, 1)}
        if trace:
            results[name]["traceback"] = trace
        print(f"{status:>7}  {name:<15} {detail}  [{results[name]['seconds']:.0f} s]", flush=True)
        report(results)  # after every check: a run killed from outside keeps what it found
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="skip torch.compile and torchrun (the CPU test suite covers them elsewhere)")
    ap.add_argument("--steps", type=int, default=40, help="steps of the training run that must learn")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds after which the checks not started yet are not run (0: none)")
    ap.add_argument("--out", help="a folder for device_check.json (rewritten after every check)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    # fp32 means fp32: transformers and we would otherwise both multiply in TF32 on Ampere and later
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"gpt2kit device check on {args.device} ({where}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)

    def report(results: dict) -> None:
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            doc = {"device": args.device, "name": where, "torch": torch.__version__,
                   "transformers": transformers.__version__, "results": results}
            tmp = Path(args.out, "device_check.json.tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            tmp.replace(Path(args.out, "device_check.json"))

    with tempfile.TemporaryDirectory(prefix="gpt2kit-device-check-") as tmp:
        results = run_checks(args, Path(tmp), report)

    failed = [n for n, r in results.items() if r["status"] == "FAIL"]
    passed = sum(r["status"] == "PASS" for r in results.values())
    print(f"\n{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} not run"
          + (f": failed {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
