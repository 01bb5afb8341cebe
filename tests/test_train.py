"""Training: the run config, the schedule, the loss, a run that learns, exact resume after a real
kill, SIGTERM, torchrun (gloo) against one process, bad inputs, and prepare -> train -> generate."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import kernels
from gpt2kit import train as T
from gpt2kit.data import TokenStream, prepare
from gpt2kit.errors import ConfigError
from gpt2kit.model import GPT2, GPT2Config

T_KERNELS = kernels.available(torch.float32)
TINY = dict(model="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, lr=3e-3, min_lr=3e-4,
            warmup_steps=2, eval_interval=10, eval_batches=2, progress=False, threads=1, plot=False)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, shakespeare_files):
    root = tmp_path_factory.mktemp("text")
    for p in shakespeare_files[:2]:
        (root / p.name).write_text(p.read_text()[:60_000])
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, text_dir):
    """A 384-token BPE vocabulary and shards of ~120 KB of Shakespeare."""
    from gpt2kit.bpe_train import train_bpe

    root = tmp_path_factory.mktemp("shards")
    train_bpe([text_dir], vocab_size=384).save(root / "tok")
    prepare([text_dir], root / "data", tokenizer=str(root / "tok"), val_fraction=0.1, segment_chars=2000)
    return root / "data"


def cfg_for(shards, out, **kw) -> T.TrainConfig:
    return T.make_config({**TINY, "data": str(shards), "out_dir": str(out), **kw})


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def val_losses(out) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r}


# ---------------------------------------------------------------------------------------------
# Config, schedule, loss


def test_config_from_toml_and_overrides(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('data = "d"\nmax_steps = 50\nlr = 1\ndtype = "bfloat16"\ncompile = false\n')
    cfg = T.load_config(p, ["--max_steps", "7", "--resume", "--min-lr=0.5", "--out_dir", "o"])
    assert (cfg.data, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.resume, cfg.out_dir) == ("d", 7, 1.0, 0.5, True, "o")
    assert isinstance(cfg.lr, float) and cfg.dtype == "bfloat16"
    p.write_text("max_step = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'; valid keys: data, out_dir, .*max_steps"):
        T.load_config(p)
    p.write_text('max_steps = "many"\n')
    with pytest.raises(ConfigError, match="max_steps expects int, got str 'many'"):
        T.load_config(p)
    p.write_text("[train]\nlr = 1\n")
    with pytest.raises(ConfigError, match="flat table"):
        T.load_config(p)
    with pytest.raises(ConfigError, match="command line: lr expects float, got 'fast'"):
        T.load_config(None, ["--lr", "fast"])
    with pytest.raises(ConfigError, match="dtype must be"):
        T.load_config(None, {"dtype": "fp8"})
    with pytest.raises(ConfigError, match="^overrides: lr expects float, got 'fast'"):  # from Python: no command line
        T.load_config(None, {"lr": "fast"})


def test_train_help_documents_every_key(cli):
    # the README: "`gpt2kit COMMAND --help` documents every option"
    import re

    text = re.sub(r"\s+", " ", cli("train", "--help").stdout)
    for key, value in vars(T.TrainConfig()).items():
        metavar = r"\[?[A-Z]+\]?"
        flag = re.search(rf"--{key} {metavar}(?:, --{key.replace('_', '-')} {metavar})? "
                         rf"((?:(?! --[a-z]).)+?)\(default: ([^)]*)\)", text)
        assert flag and flag.group(1).strip(), f"--{key} has no help in `gpt2kit train --help`"
        assert flag.group(2) == (repr(value) if isinstance(value, str) else str(value)), key
    assert re.search(r"Exit status: 0 when .* max_minutes .* 130 after Ctrl-C \(SIGINT\) and 143 after SIGTERM", text)


def test_a_flag_before_the_config_file_leaves_it_the_config():
    # `gpt2kit train --resume run.toml` took run.toml for --resume's value: "resume expects bool"
    from gpt2kit.cli import build_parser

    args = build_parser().parse_args(["train", "--resume", "run.toml", "--compile", "--max_steps", "5", "--plot", "no"])
    assert args.config == "run.toml" and not args.unknown_overrides
    assert (vars(args)["cfg.resume"], vars(args)["cfg.compile"], vars(args)["cfg.plot"]) == ("true", "true", "no")


def test_keys_take_dashes_and_a_prefix_of_a_key_is_an_unknown_key(monkeypatch):
    # argparse's abbreviations would read a typo such as --max_step as --max_steps (or --lr_decay
    # as --lr_decay_steps) and train with it: the error names the key that was given
    from gpt2kit.cli import build_parser

    args = build_parser().parse_args(["train", "--max-steps", "5", "--min-lr=0.1", "--max_minutes", "2"])
    assert {k: v for k, v in vars(args).items() if k.startswith("cfg.")} == {
        "cfg.max_steps": "5", "cfg.min_lr": "0.1", "cfg.max_minutes": "2"} and not args.unknown_overrides
    monkeypatch.setattr(T, "train", lambda cfg: pytest.fail(f"trained with {cfg}"))
    for key in ("--max_step", "--lr_decay", "--warmup"):
        args = build_parser().parse_args(["train", key, "5"])
        assert not any(name.startswith("cfg.") for name in vars(args))
        with pytest.raises(ConfigError, match=rf"^command line: unknown key '{key}'; valid keys: data, "):
            args.func(args)
    # the key is named, not a stray word before it
    args = build_parser().parse_args(["train", "run.toml", "stray", "--bogus", "1"])
    with pytest.raises(ConfigError, match=r"^command line: unknown key '--bogus'; valid keys: "):
        args.func(args)


@pytest.mark.parametrize("argv, error", [
    (["r.toml", "--progress", "off"], "progress expects bool, got 'off'"),
    (["--progress", "off", "r.toml"], "progress expects bool, got 'off'"),
    (["r.toml", "--progress", "2"], "progress expects bool, got '2'"),
])
def test_a_bad_bool_value_is_named_as_such(cli, tmp_path, argv, error):
    # the config-file rule for `--resume run.toml` took any word that is no bool value for the
    # config: "unknown key 'off'", "unknown key 'r.toml'"; only a .toml name or an existing file is
    (tmp_path / "r.toml").write_text('model = "tiny"\n')
    r = cli("train", *argv, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(error), r.stderr
    assert "Traceback" not in r.stderr


def test_a_bool_flag_before_an_existing_config_without_toml_suffix(tmp_path):
    from gpt2kit.cli import build_parser

    run = tmp_path / "run.cfg"
    run.write_text('model = "tiny"\n')
    args = build_parser().parse_args(["train", "--resume", str(run)])
    assert args.config == str(run) and vars(args)["cfg.resume"] == "true" and not args.unknown_overrides


def test_shipped_configs_are_valid():
    root = T.BUNDLED_CONFIGS  # (the checkout's configs/ links to it)
    found = sorted(root.glob("*.toml"))
    assert {p.name for p in found} >= {"demo.toml", "gpt2-124m.toml"}
    assert [p.stem for p in found] == T.bundled_configs()
    for p in found:
        T.load_config(p)
    paper = T.load_config(root / "gpt2-124m.toml")
    assert paper.batch_size * paper.block_size == 512 * 1024  # the paper's batch (§2.3)


def test_bundled_configs_load_by_name_from_any_folder(tmp_path, monkeypatch, cli):
    """`gpt2kit train demo` works outside a checkout (a wheel install): a bare name that is no
    file here is a bundled config; a file of that name here wins; a path is never redirected."""
    root = T.BUNDLED_CONFIGS
    monkeypatch.chdir(tmp_path)
    for name in ("demo", "demo.toml", "gpt2-124m"):
        stem = name.removesuffix(".toml")
        assert T.load_config(name) == T.load_config(root / f"{stem}.toml")
    assert T.load_config("demo", {"max_steps": 7}).max_steps == 7
    (tmp_path / "demo.toml").write_text('model = "tiny"\nmax_steps = 3\n')
    assert T.load_config("demo.toml").max_steps == 3  # the local file
    assert T.load_config("demo").max_steps == T.load_config(root / "demo.toml").max_steps  # no "demo" file here
    for path in ("sub/demo.toml", "./gpt2-124m", "gpt2-124m/"):  # a path: no other file
        with pytest.raises(ConfigError, match=r"^[^ ]+: no such config file$"):
            T.load_config(path)
    (tmp_path / "gpt2-124m").mkdir()  # a folder of that name is no config: the bundled one loads
    assert T.load_config("gpt2-124m") == T.load_config(root / "gpt2-124m.toml")
    with pytest.raises(ConfigError, match=r"^nosuch: no such config file \(bundled configs, by name: "
                                          r"demo, finetune-gpt2, gpt2-124m\)$"):
        T.load_config("nosuch")
    r = cli("train", "nosuch", "--max_steps", "1")
    assert r.returncode == 2 and r.stderr.strip().endswith("bundled configs, by name: demo, finetune-gpt2, gpt2-124m)")
    r = cli("train", "demo", "--data", str(tmp_path / "none"), "--max_steps", "1")
    assert r.returncode == 2 and "none" in r.stderr and "no such config" not in r.stderr  # the config loaded
    assert "demo, finetune-gpt2, gpt2-124m" in cli("train", "--help").stdout
    from gpt2kit.cli import build_parser

    args = build_parser().parse_args(["train", "--resume", "demo"])  # a bool flag before a bundled name
    assert args.config == "demo" and vars(args)["cfg.resume"] == "true" and not args.unknown_overrides


def test_lr_at_warmup_cosine_floor():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert [T.lr_at(s, **kw) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert T.lr_at(10, **kw) == 1.0
    assert math.isclose(T.lr_at(60, **kw), 0.55)  # half way down the cosine
    assert math.isclose(T.lr_at(109, **kw), 0.1, abs_tol=1e-3)
    assert T.lr_at(110, **kw) == T.lr_at(10_000, **kw) == 0.1
    assert all(T.lr_at(s, **kw) >= T.lr_at(s + 1, **kw) for s in range(10, 200))


@pytest.mark.parametrize("chunk", [5, 64])
def test_linear_cross_entropy_matches_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (3, 7), generator=g)
    ours = T.linear_cross_entropy(h, w, y, chunk=chunk)
    (2 * ours).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.T).view(-1, 50), y.view(-1))
    (2 * ref).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_linear_cross_entropy_underflowing_targets_and_bf16():
    # Targets whose probability underflows float32 (losses of hundreds of nats) still get the
    # exact loss and gradient; under bf16 autocast the loss stays within bf16 rounding.
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 16, generator=g)
    h[:6] *= 60
    h.requires_grad_()
    w = torch.randn(30, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (40,), generator=g)
    ref_each = F.cross_entropy(h @ w.T, y, reduction="none")
    assert (ref_each > 100).sum() >= 2
    ours = T.linear_cross_entropy(h, w, y, chunk=16)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = ref_each.mean()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = T.linear_cross_entropy(h[6:], w, y[6:], chunk=16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, F.cross_entropy(h[6:] @ w.T, y[6:]), rtol=2e-2, atol=0)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_gradients_equals_clip_grad_norm(max_norm):
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(n, generator=g) for n in (7, 30)]

    def params():
        ps = [torch.nn.Parameter(torch.zeros(len(gr))) for gr in grads]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return ps

    ref, ours = params(), params()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    norm = T.clip_gradients(ours + [torch.nn.Parameter(torch.zeros(3))], max_norm)  # (no grad: skipped)
    assert norm == ref_norm
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref))
    assert torch.equal(ours[0].grad, grads[0]) == (max_norm > norm)  # clipped only above max_norm


# ---------------------------------------------------------------------------------------------
# Runs


def test_loss_falls_outputs_checkpoints_and_finetune(shards, tmp_path):
    out = tmp_path / "run"
    s = T.train(cfg_for(shards, out, max_steps=40, keep_last=2, plot=True, sample_interval=40, sample_tokens=8))
    lo = losses(out)
    assert len(lo) == 40 and lo[40] < lo[1] - 1.0, lo
    assert s["val_loss"] is not None and s["val_loss"] < math.log(384)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20, 30, 40]
    assert all(r["tok_per_s"] > 0 and 0 < r["mfu"] for r in recs if "loss" in r)
    assert any("sample" in r for r in recs)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    index = json.loads((out / "checkpoints.json").read_text())
    best = min((r for r in recs if "val_loss" in r), key=lambda r: r["val_loss"])["step"]
    kept = sorted({30, 40, best})
    assert [e["step"] for e in index["checkpoints"]] == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{k:07d}" for k in kept]
    assert os.readlink(out / "latest") == "checkpoints/step_0000040"
    assert os.readlink(out / "best") == f"checkpoints/step_{best:07d}"
    # Fine-tuning starts from the trained weights: its first loss is the trained model's.
    ft = tmp_path / "ft"
    T.train(cfg_for(shards, ft, init_from=str(out / "latest"), max_steps=2, lr=1e-5, min_lr=1e-6, warmup_steps=0))
    assert losses(ft)[1] < lo[1] - 1.0
    # a shape the checkpoint does not have is refused, not silently dropped for the checkpoint's
    with pytest.raises(T.TrainError, match=r"n_layer 3 differs from init_from .*latest's 2: fine-tuning keeps"):
        T.train(cfg_for(shards, tmp_path / "ft3", init_from=str(out / "latest"), max_steps=2, n_layer=3))


def _reference_run(init: Path, shards, *, steps, lrs, micro, batch, clip, wd, betas, eps):
    """A plain PyTorch loop: torch.optim.AdamW with no decay on biases and LayerNorm gains, the
    given learning rates, 1/accum-scaled micro-batches, clip_grad_norm_. (losses, norms, model)"""
    from gpt2kit import data as D

    model = GPT2.from_pretrained(str(init))
    named = dict(model.named_parameters())
    no_decay = [p for n, p in named.items() if n.endswith(".bias") or ".ln_" in n]
    decay = [p for n, p in named.items() if not (n.endswith(".bias") or ".ln_" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            betas=betas, eps=eps, foreach=False)
    stream = TokenStream(shards, "train")
    block, accum = model.config.n_ctx, batch // micro
    out_losses, norms = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lrs[step]
        offsets = D.step_offsets(1337, step, len(stream), block, batch)
        total = 0.0
        for i in range(accum):
            x, y = (torch.from_numpy(a) for a in D.get_batch(stream, offsets[i * micro:(i + 1) * micro], block))
            loss = F.cross_entropy(model(x).reshape(-1, model.config.vocab_size), y.reshape(-1))
            (loss / accum).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        out_losses.append(total / accum)
    return out_losses, norms, model


def test_a_run_equals_a_plain_pytorch_loop(shards, tmp_path):
    # Nothing else checks the arithmetic of a step against an independent loop: a run with the
    # loss not divided by the accumulation, weight decay on every tensor, beta1 and beta2 swapped
    # or the cosine ending a step late only "learned" in the other tests.
    init = tmp_path / "init"
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=384, n_ctx=32)).save_pretrained(str(init))
    lr, min_lr = 3e-3, 3e-4
    lrs = [lr / 2, lr, lr, (lr + min_lr) / 2, min_lr, min_lr]  # warm-up 2, cosine to step 4, then the floor
    settings = dict(micro=2, batch=8, clip=0.8, wd=0.5, betas=(0.8, 0.9), eps=1e-4)
    want, norms, ref = _reference_run(init, shards, steps=6, lrs=lrs, **settings)
    assert min(norms) < settings["clip"] < max(norms), norms  # steps with and without clipping
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, init_from=str(init), max_steps=6, lr=lr, min_lr=min_lr, warmup_steps=2,
                    lr_decay_steps=4, micro_batch_size=2, grad_clip=0.8, weight_decay=0.5, beta1=0.8, beta2=0.9,
                    eps=1e-4, tensorboard=False))
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    for r, loss, norm, rate in zip(recs, want, norms, lrs):
        assert r["lr"] == pytest.approx(rate, rel=1e-12), r
        assert r["loss"] == pytest.approx(loss, rel=1e-5), (r, loss)
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-4), (r, norm)
    trained = GPT2.from_pretrained(str(out / "latest")).state_dict()
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(trained[name], p, atol=2e-6, rtol=1e-4, msg=name)
    # the validation loss: the mean over eval_batches x batch_size fixed windows of the val split
    from gpt2kit import data as D

    val = TokenStream(shards, "val")
    block = min(32, len(val) - 1)
    x, y = (torch.from_numpy(a) for a in D.get_batch(val, D.step_offsets(1337, 0, len(val), block, 2 * 8, stream=1), block))
    with torch.no_grad():
        want_val = F.cross_entropy(ref(x).reshape(-1, 384), y.reshape(-1)).item()
    vals = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert vals == [pytest.approx(want_val, rel=1e-5)]


def test_compiled_run_equals_eager(shards, tmp_path):
    # `compile = true` trains the same model: the losses of a few steps agree with eager mode
    # to float rounding (inductor reorders sums), and fall.
    import torch._dynamo

    runs = {}
    for mode in (False, True):
        out = tmp_path / f"compile-{mode}"
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        T.train(cfg_for(shards, out, max_steps=6, eval_interval=100, tensorboard=False, compile=mode))
        runs[mode] = losses(out)
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == mode  # really compiled
    assert list(runs[True]) == list(range(1, 7))
    for step, loss in runs[False].items():
        assert abs(runs[True][step] - loss) < 1e-4 * loss, (step, runs)
    assert runs[True][6] < runs[True][1] - 0.15, runs[True]


def test_bf16_run_follows_the_float32_run(shards, tmp_path):
    # dtype = "bfloat16" on CPU trains through `model.causal_attention` and the bf16 loss path:
    # the same losses as float32 to bf16 rounding, step by step.
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        T.train(cfg_for(shards, out, max_steps=6, eval_interval=100, tensorboard=False, dtype=dtype))
        runs[dtype] = losses(out)
    for step, loss in runs["float32"].items():
        assert abs(runs["bfloat16"][step] - loss) < 0.02 * loss, (step, runs)
    assert runs["bfloat16"][6] < runs["bfloat16"][1] - 0.15, runs


def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_it(shards, tmp_path, monkeypatch, caplog):
    from gpt2kit import kernels

    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    assert T.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    assert T.resolve_dtype("auto", "cpu") == "float32" and T.resolve_dtype("float32", "cpu") == "float32"
    with caplog.at_level("WARNING", logger="gpt2kit.train"):
        assert T.resolve_dtype("bfloat16", "cpu") == "bfloat16"  # asked for: kept, with a warning
    assert "no bf16 arithmetic" in caplog.text
    runs = {}  # on such a CPU, a run with dtype "auto" is the float32 run, loss for loss
    for dtype in ("float32", "auto"):
        T.train(cfg_for(shards, tmp_path / dtype, max_steps=3, eval_interval=100, tensorboard=False, dtype=dtype))
        runs[dtype] = losses(tmp_path / dtype)
    assert runs["auto"] == runs["float32"] and len(runs["auto"]) == 3


def _cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(shards, out, *extra):
    args = [sys.executable, "-m", "gpt2kit", "train"]
    for k, v in {**TINY, "data": shards, "out_dir": out}.items():
        args += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return args + list(extra)


def test_resume_after_a_killed_process_is_bit_exact(shards, tmp_path):
    ref = tmp_path / "ref"
    T.train(cfg_for(shards, ref, max_steps=60, dropout=0.1, checkpoint_interval=4))
    out = tmp_path / "cut"
    cmd = _train_cmd(shards, out, "--max_steps", "60", "--dropout", "0.1", "--checkpoint_interval", "4")
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    index = out / "checkpoints.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if index.exists() and json.loads(index.read_text())["latest"] >= "step_0000008":
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to save: a crash
    proc.wait()
    killed_at = json.loads(index.read_text())["latest"]
    assert proc.returncode == -signal.SIGKILL and killed_at < "step_0000060", killed_at
    r = subprocess.run(_train_cmd(shards, out, "--max_steps", "60", "--dropout", "0.1", "--checkpoint_interval", "4",
                                  "--resume"), env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'checkpoints' / killed_at} (step {int(killed_at[5:])})" in r.stderr
    assert losses(out) == losses(ref)  # every step, bit for bit


def test_torchrun_two_ranks_equal_one_process(shards, tmp_path):
    one = tmp_path / "one"
    T.train(cfg_for(shards, one, max_steps=6, micro_batch_size=2))  # 1 rank x 2 x 4 accumulation
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gpt2kit", *_train_cmd(shards, two, "--max_steps", "6", "--micro_batch_size", "2")[3:]]
    peak = 1e-4  # TFLOP/s of one device: MFU is each device's share of the global tokens/s over it
    r = subprocess.run(cmd + ["--peak_tflops", str(peak)], env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    # the validation loss too: each rank evaluates its half of the fixed windows, averaged over ranks
    va, vb = val_losses(one), val_losses(two)
    assert va.keys() == vb.keys() == {6} and abs(va[6] - vb[6]) < 1e-5, (va, vb)
    fpt = T.flops_per_token(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=384), 32)
    for rec in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()):
        if "mfu" in rec:
            assert rec["mfu"] == pytest.approx(rec["tok_per_s"] / 2 * fpt / (peak * 1e12), rel=1e-3, abs=1e-4)
            assert rec["tokens"] == rec["step"] * 8 * 32  # the global batch's tokens, not one rank's
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000006"]
    # each rank's random stream (dropout) is seeded with seed + rank, and saved in rank order (no
    # dropout here: untouched since)
    rngs = T.load_trainer_state(two / "latest")["rng"]
    assert [torch.equal(s["cpu"], torch.Generator().manual_seed(1337 + r).get_state()) for r, s in enumerate(rngs)] == [True, True]
    assert r.stdout.count("trained 6 steps") == 1  # only rank 0 reports
    assert r.stderr.count("batch 8 x 32 tokens (2 rank(s) over gloo, ddp x 2 micro x 2 accumulation)") == 1, r.stderr[-3000:]
    # fsdp = true: parameters sharded over the two ranks, same losses, one full checkpoint.
    fsdp = tmp_path / "fsdp"
    r = subprocess.run(cmd[:-4] + ["--out_dir", str(fsdp), "--fsdp", "true"] + cmd[-4:], env=_cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 8 x 32 tokens (2 rank(s) over gloo, fsdp x 2 micro x 2 accumulation)" in r.stderr, r.stderr[-3000:]
    c = losses(fsdp)
    assert all(abs(a[k] - c[k]) < 1e-5 for k in a), (a, c)
    full = T.load_trainer_state(fsdp / "latest")
    assert full["step"] == 6 and len(full["rng"]) == 2
    from gpt2kit.model import GPT2

    ref, sharded = GPT2.from_pretrained(str(one / "latest")), GPT2.from_pretrained(str(fsdp / "latest"))
    for (name, p), q in zip(ref.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)


def test_fsdp_samples_text_without_a_collective_mismatch(shards, tmp_path):
    # sampling on rank 0 alone ran the sharded blocks' all-gathers on one rank: gloo aborted
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gpt2kit", *_train_cmd(shards, out, "--max_steps", "4", "--fsdp", "true", "--sample_interval", "2",
                                        "--sample_tokens", "8", "--sample_prompt", "KING")[3:]]
    r = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "sample" in r]
    assert [s["step"] for s in samples] == [2, 4] and all(s["sample"].startswith("KING") for s in samples)
    # the same text as a sample from the checkpoint written at that step
    model = GPT2.from_pretrained(str(out / "latest"))
    from gpt2kit.tokenizer import Tokenizer

    want = T.sample_text(model, Tokenizer.from_pretrained(str(out / "latest")), "KING", 8, seed=1337 + 4)
    assert samples[-1]["sample"] == want


def test_resuming_a_finished_run_under_torchrun_says_so_once(shards, tmp_path):
    done = tmp_path / "done"
    T.train(cfg_for(shards, done, max_steps=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gpt2kit", *_train_cmd(shards, done, "--max_steps", "2", "--resume")[3:]]
    r = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("nothing to train") == 1 and r.stderr.count("nothing to train") == 1, (r.stdout, r.stderr)


def test_resume_notices_under_torchrun_come_once(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gpt2kit", *_train_cmd(shards, run, "--max_steps", "2", "--resume")[3:]]
    r = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("no checkpoint to resume from") == 1, r.stderr
    T.train(cfg_for(shards, run, max_steps=4, resume=True))  # the next checkpoint by one process
    r = subprocess.run([*cmd[:-3], "--max_steps", "6", "--resume"], env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("saved with 1 rank(s), resuming with 2: RNG streams re-seeded") == 1, r.stderr
    assert r.stderr.count(f"resuming from {run / 'checkpoints' / 'step_0000004'} (step 4)") == 1, r.stderr
    assert r.stderr.count("the learning rate at step 4 is") == 1, r.stderr  # (max_steps 4 -> 6 stretches the cosine)
    # re-seeded with seed + step + rank (no dropout here: untouched since)
    rngs = T.load_trainer_state(run / "latest")["rng"]
    assert [torch.equal(s["cpu"], torch.Generator().manual_seed(1337 + 4 + r).get_state()) for r, s in enumerate(rngs)] == [True, True]
    # resumed by as many ranks as saved it: each rank continues its own stream
    r = subprocess.run([*cmd[:-3], "--max_steps", "7", "--resume"], env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "re-seeded" not in r.stderr
    after = T.load_trainer_state(run / "latest")
    assert after["step"] == 7 and all(torch.equal(a["cpu"], b["cpu"]) for a, b in zip(after["rng"], rngs, strict=True))


def _two_nodes(argv0, argv1, timeout=120, cwds=(None, None)):
    """Two torchrun launchers of one process each, rendezvousing as two machines do (in folders `cwds`)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes", "-m", "gpt2kit"]
    procs = [subprocess.Popen(launch + argv, env=_cli_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv, cwd in zip((argv0, argv1), cwds)]
    try:
        return [p.communicate(timeout=timeout) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_resume_where_the_machines_see_different_checkpoints_is_refused(shards, tmp_path):
    # out_dir not shared between machines: one resumed at its checkpoint's step, the other from
    # step 0, and their collectives no longer matched: both hung until gloo's 30-minute timeout
    done = tmp_path / "done"
    T.train(cfg_for(shards, done, max_steps=2))
    empty = tmp_path / "empty"
    results = _two_nodes(*(_train_cmd(shards, out, "--max_steps", "4", "--resume")[3:] for out in (done, empty)))
    for stdout, stderr, code in results:
        assert code != 0
    stderr = results[0][1] + results[1][1]
    assert "the ranks see different checkpoints to resume from" in stderr, stderr[-3000:]
    assert "out_dir must be one folder shared by all machines" in stderr


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs(shards, tmp_path, text_dir):
    with pytest.raises(T.TrainError, match="batch_size 6 does not divide across 1 rank"):
        T.train(cfg_for(shards, tmp_path / "a", batch_size=6, micro_batch_size=4))
    with pytest.raises(ConfigError, match="no prepared shard folder"):
        T.train(T.make_config({}))
    run = tmp_path / "run"
    T.train(cfg_for(shards, run, max_steps=2))
    with pytest.raises(T.TrainError, match="already holds checkpoints; pass --resume"):
        T.train(cfg_for(shards, run, max_steps=4))
    with pytest.raises(T.CheckpointError, match=r"checkpoint of another model config \(n_embd=32 vs 64 configured\)"):
        T.train(cfg_for(shards, run, max_steps=4, n_embd=64, resume=True))
    # a --seed given to the first run and forgotten on --resume: other batches and validation windows
    with pytest.raises(T.CheckpointError, match=r"trained with seed 1337, configured 7: .*pass --seed 1337"):
        T.train(cfg_for(shards, run, max_steps=4, seed=7, resume=True))
    # Shards of the GPT-2 vocabulary against a model trained on the 384-token one.
    gpt2_shards = tmp_path / "gpt2"
    prepare([text_dir], gpt2_shards, val_fraction=0.1, segment_chars=2000)
    with pytest.raises(T.TrainError, match="vocabulary mismatch"):
        T.train(cfg_for(gpt2_shards, tmp_path / "b", init_from=str(run / "latest"), max_steps=1))
    with pytest.raises(T.CheckpointError, match="shards of another tokenizer"):
        T.train(cfg_for(gpt2_shards, run, max_steps=4, resume=True))
    # resuming a run that is already done, or from damaged files: one line naming what and where
    with pytest.raises(T.TrainError, match=r"already at step 2, past max_steps 1"):
        T.train(cfg_for(shards, run, max_steps=1, resume=True))
    with pytest.raises(T.TrainError, match=r"pass a larger --max_steps to continue it \(with --lr_decay_steps 2 to keep"):
        T.train(cfg_for(shards, run, max_steps=1, resume=True))
    done = T.train(cfg_for(shards, run, max_steps=2, resume=True))  # a requeued job: nothing to do, no error
    assert done["nothing_to_do"] and done["step"] == 2 and done["checkpoint"].endswith("step_0000002")
    state = run / "checkpoints" / "step_0000002" / T.TRAINER_STATE
    good = state.read_bytes()
    for damaged in (good[:100], b"\x80\x04not a pickle at all"):
        state.write_bytes(damaged)
        with pytest.raises(T.CheckpointError, match=rf"{state}: unreadable training state .*the checkpoint is damaged"):
            T.train(cfg_for(shards, run, max_steps=4, resume=True))
    state.write_bytes(good)
    # the weights damaged (the state intact): the same advice, which the loader's error alone lacked
    weights = run / "checkpoints" / "step_0000002" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(T.CheckpointError, match=rf"{weights}: .*the checkpoint is damaged: remove "
                                                rf"{weights.parent} to resume from the one before it$"):
        T.train(cfg_for(shards, run, max_steps=4, resume=True))
    weights.write_bytes(whole)
    (run / "checkpoints.json").write_text("{")
    with pytest.raises(T.CheckpointError, match="checkpoints.json: not a valid checkpoint index"):
        T.train(cfg_for(shards, run, max_steps=4, resume=True))


def test_resume_with_nothing_to_resume_warns_naming_the_folder(shards, tmp_path, caplog):
    # a requeued job's first start, or a mistyped out_dir: it trains from zero, and says so loudly
    with caplog.at_level("WARNING", logger="gpt2kit.train"):
        T.train(cfg_for(shards, tmp_path / "typo", max_steps=1, resume=True))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'typo'}: no checkpoint to resume from; starting from scratch"]


def test_an_out_dir_that_is_a_file_is_named_as_such(shards, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(T.TrainError, match=rf"out_dir {out}: (exists and is not a folder|.*file, not a folder)"):
            T.train(cfg_for(shards, out, max_steps=1))


def test_too_little_text_for_one_window_names_the_data_and_block_size(shards, tmp_path):
    n = len(TokenStream(shards, "train"))
    with pytest.raises(T.TrainError, match=rf"{shards}: {n:,} training tokens are fewer than one window of "
                                           rf"block_size \+ 1 = {n + 1:,}"):
        T.train(cfg_for(shards, tmp_path / "run", block_size=n, max_steps=1))
    assert not (tmp_path / "run").exists()  # refused before any output


def test_a_validation_split_shorter_than_a_window_is_evaluated_in_windows_of_its_length(shards, tmp_path):
    # windows of block_size + 1 tokens do not fit in it: the validation windows are as long as it allows
    (tmp_path / "t.txt").write_text("".join(f"KING. Speak, speak {i}: a word or two.\n\n" for i in range(300)))
    data = tmp_path / "data"
    prepare([tmp_path / "t.txt"], data, tokenizer=str(shards.parent / "tok"), val_fraction=0.01, segment_chars=20, workers=1,
            progress=False)
    n_val = len(TokenStream(data, "val"))
    assert 1 < n_val < 129
    s = T.train(cfg_for(data, tmp_path / "run", block_size=128, max_steps=1, tensorboard=False))
    assert s["val_loss"] is not None and 0 < s["val_loss"] < 2 * math.log(384)


def test_tensorboard_keeps_the_checkpoint_step_after_a_resume(shards, tmp_path):
    # the resumed writer purged events from the checkpoint's step on, though that step is not run
    # again: TensorBoard lost the loss and the validation loss of every step a run resumed from
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=10, eval_interval=5, checkpoint_interval=10))
    time.sleep(1.1)  # (event files are named by the second they were opened in)
    with SummaryWriter(str(out / "tensorboard")) as crashed:  # a step logged after the checkpoint, then a crash
        crashed.add_scalar("loss", 99.0, 11)
    time.sleep(1.1)
    T.train(cfg_for(shards, out, max_steps=12, eval_interval=5, resume=True))
    events = EventAccumulator(str(out / "tensorboard"))  # (it drops what a restart purged, as TensorBoard does)
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))
    assert [e.value for e in events.Scalars("loss")][10] == pytest.approx(losses(out)[11])  # the rerun's, not 99
    assert [e.step for e in events.Scalars("val_loss")] == [5, 10, 12]
    assert "step" not in events.Tags()["scalars"]  # (the step is each scalar's x, not a curve of its own)


def test_a_resume_that_moves_the_learning_rate_says_so(shards, tmp_path, caplog):
    # continuing a finished run with a larger max_steps ("pass a larger --max_steps to continue
    # it") stretched its cosine: the learning rate jumped from min_lr back up, without a word
    out = tmp_path / "run"
    kw = dict(max_steps=4, warmup_steps=2, lr=1e-3, min_lr=1e-4, eval_interval=100)
    T.train(cfg_for(shards, out, **kw))
    with caplog.at_level("WARNING", logger="gpt2kit.train"):
        T.train(cfg_for(shards, out, **{**kw, "max_steps": 6}, resume=True))
    assert ("learning rate at step 4 is 0.00055 in this schedule, 0.0001 in the checkpoint's (max_steps 6, was 4); "
            "to keep the checkpoint's schedule, set lr_decay_steps = 4") in caplog.text
    assert losses(out).keys() == set(range(1, 7))
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpt2kit.train"):  # the advice taken: the same rate, no warning
        T.train(cfg_for(shards, out, **{**kw, "max_steps": 8, "lr_decay_steps": 4}, resume=True))
    assert "learning rate" not in caplog.text
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lrs[7] == lrs[8] == 1e-4
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpt2kit.train"):  # another floor: no lr_decay_steps would keep it
        T.train(cfg_for(shards, out, **{**kw, "max_steps": 9, "lr_decay_steps": 4, "min_lr": 2e-4}, resume=True))
    assert ("learning rate at step 8 is 0.0002 in this schedule, 0.0001 in the checkpoint's (min_lr 0.0002, was "
            "0.0001, max_steps 9, was 8)\n") in caplog.text


def test_optimizer_settings_given_on_resume_are_used(shards, tmp_path):
    # the checkpoint's AdamW groups were loaded whole: --weight_decay, --beta1/2 and --eps given
    # with --resume were silently replaced by the first run's (only lr, set every step, applied)
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=2))
    T.train(cfg_for(shards, out, max_steps=3, weight_decay=0.5, beta1=0.8, beta2=0.9, eps=1e-6, resume=True))
    groups = T.load_trainer_state(out / "latest")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in groups] == [(0.5, (0.8, 0.9), 1e-6), (0.0, (0.8, 0.9), 1e-6)]


def test_max_minutes_counts_minutes_of_training(shards, tmp_path, monkeypatch):
    # a clock that moves one second per reading: a 1-minute budget stops at the first step
    # whose check reads past 60 s, and logs that step
    import itertools
    import types

    ticks = itertools.count(1000.0, 1.0)
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = tmp_path / "run"
    s = T.train(cfg_for(shards, out, max_steps=1000, max_minutes=1, eval_interval=1000, peak_tflops=1.0,
                        tensorboard=False))
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert s["stopped"] == "time" and s["step"] == recs[-1]["step"] and len(recs) > 2, (s, recs)
    assert recs[-2]["time_s"] <= 61 < recs[-1]["time_s"] <= 63, recs[-3:]
    # the budget running out on the last step is no stop: the run is complete
    ticks = itertools.count(1000.0, 1.0)
    s2 = T.train(cfg_for(shards, tmp_path / "last", max_steps=s["step"], max_minutes=1, eval_interval=1000,
                         peak_tflops=1.0, tensorboard=False))
    assert s2["step"] == s["step"] and s2["stopped"] is None, s2


def test_checkpoints_come_every_checkpoint_interval_steps(shards, tmp_path):
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=5, checkpoint_interval=2, eval_interval=1000, keep_last=10, tensorboard=False))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004", "step_0000005"]


def test_the_seed_seeds_the_initialization(shards, tmp_path):
    # a from-scratch model is the model's own initialization under torch.manual_seed(seed): a
    # step at a rate of 1e-20 leaves it there
    for seed in (5, 6):
        out = tmp_path / str(seed)
        T.train(cfg_for(shards, out, seed=seed, max_steps=1, lr=1e-20, min_lr=0.0, warmup_steps=0, weight_decay=0.0,
                        eval_interval=1000, tensorboard=False))
        torch.manual_seed(seed)
        want = GPT2(GPT2Config.from_preset("tiny", n_layer=2, n_head=2, n_embd=32, vocab_size=384)).state_dict()
        got = GPT2.from_pretrained(str(out / "latest")).state_dict()
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, atol=1e-12, rtol=0, msg=name)


def test_the_seed_seeds_the_dropout_masks(shards, tmp_path, monkeypatch):
    # with the batches and the initial weights held fixed, two seeds differ in their dropout alone
    from gpt2kit import data as D

    init = tmp_path / "init"
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=384, n_ctx=32)).save_pretrained(str(init))
    step_offsets = D.step_offsets
    monkeypatch.setattr(D, "step_offsets", lambda seed, *a, **kw: step_offsets(1337, *a, **kw))
    runs = {}
    for dropout in (0.0, 0.2):
        for seed in (5, 6):
            out = tmp_path / f"{dropout}-{seed}"
            T.train(cfg_for(shards, out, init_from=str(init), seed=seed, dropout=dropout, max_steps=2,
                            eval_interval=1000, tensorboard=False))
            runs[dropout, seed] = losses(out)
    assert runs[0.0, 5] == runs[0.0, 6]
    assert runs[0.2, 5][1] != runs[0.2, 6][1]


def test_the_best_validation_loss_survives_a_resume(shards, tmp_path):
    # a resumed run's best_val_loss (its summary, the next checkpoint's state) counts the
    # evaluations before the checkpoint too: a resumed run whose losses rise keeps the old best
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=10, eval_interval=10, keep_last=1))
    s = T.train(cfg_for(shards, out, max_steps=11, eval_interval=10, lr=0.5, min_lr=0.5, keep_last=1, resume=True))
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r}
    assert list(vals) == [10, 11] and vals[11] > vals[10], vals
    assert s["best_val_loss"] == vals[10]
    assert T.load_trainer_state(out / "latest")["best_val_loss"] == vals[10]
    assert os.readlink(out / "best") == "checkpoints/step_0000010"
    # keep_last 1 keeps the latest and, besides it, the best
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000010", "step_0000011"]


def test_evaluations_leave_the_training_run_alone(shards, tmp_path):
    # evaluating in eval mode draws no dropout masks and switches dropout back on after: a run
    # evaluated at every step trains exactly as one never evaluated
    runs = {}
    for every in (1, 1000):
        out = tmp_path / str(every)
        T.train(cfg_for(shards, out, max_steps=4, dropout=0.2, eval_interval=every, checkpoint_interval=1000,
                        tensorboard=False))
        runs[every] = losses(out)
    assert runs[1] == runs[1000] and len(runs[1]) == 4


def test_a_stop_off_the_log_interval_logs_its_last_step(shards, tmp_path):
    # a run stopped between two log steps reported "loss nan" and left its last steps out of
    # metrics.jsonl, though its checkpoint has them
    out = tmp_path / "run"
    s = T.train(cfg_for(shards, out, max_steps=100000, log_interval=1000, eval_interval=100000, max_minutes=0.001))
    assert s["stopped"] == "time" and s["step"] < 1000 and math.isfinite(s["loss"])
    assert list(losses(out)) == [s["step"]] and losses(out)[s["step"]] == s["loss"]


def test_a_resume_on_other_shards_of_the_same_tokenizer_says_so(shards, tmp_path, text_dir, caplog):
    # only the tokenizer was compared: any corpus prepared with it (every GPT-2 one, for the gpt2
    # tokenizer; a config's relative data path on another machine) resumed in silence, its batches
    # other windows of other text
    other = tmp_path / "other"
    prepare([text_dir], other, tokenizer=str(shards / "tokenizer"), val_fraction=0.2, segment_chars=2000)
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=2))
    with caplog.at_level("WARNING", logger="gpt2kit.train"):
        T.train(cfg_for(shards, out, max_steps=3, resume=True))
    assert "other shards" not in caplog.text
    with caplog.at_level("WARNING", logger="gpt2kit.train"):
        T.train(cfg_for(other, out, max_steps=4, resume=True))
    assert (f"step_0000003: trained on other shards than {other} (the same tokenizer, other shard names or token "
            "counts): the batches from step 3 on come from these") in caplog.text


def test_throughput_after_a_resume_counts_the_steps_run_since(shards, tmp_path):
    # a checkpoint off the log interval: the first record after resuming covers 1 step, not 4
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=7, log_interval=4, checkpoint_interval=7))
    T.train(cfg_for(shards, out, max_steps=12, log_interval=4, resume=True))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in recs if r.get("step") == 8 and "tok_per_s" in r)
    tokens_per_step = first["tokens"] // 8
    assert first["tok_per_s"] * first["time_s"] <= 1.5 * tokens_per_step  # ~1 step's tokens in the time since start
    # every record's rate covers the steps since the record before it (its time_s and tok_per_s come from one clock
    # reading: exact up to the rounding of time_s to the millisecond, 1 ms at most on the difference)
    logged = {r["step"]: r for r in recs if "tok_per_s" in r}
    for a, b in ((4, 7), (8, 12)):
        rate, took = logged[b]["tok_per_s"], logged[b]["time_s"] - logged[a]["time_s"]
        assert abs(rate * took - (b - a) * tokens_per_step) <= rate * 0.001 + 1, (a, b, logged[a], logged[b])


def test_bad_config_files_and_values(tmp_path):
    with pytest.raises(ConfigError, match="a folder; expected a TOML config file"):
        T.load_config(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b"model = 'caf\xe9'\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte offset 12\)"):
        T.load_config(tmp_path / "latin1.toml")
    for key, value, message in (("max_minutes", "-1", "max_minutes must not be negative"),
                                ("grad_clip", "nan", "grad_clip must not be negative"),
                                ("dropout", "1", r"dropout must be in \[0, 1\)"),
                                ("lr", "0", "lr must be positive"),
                                ("lr", "inf", "lr must be positive and finite, got inf"),  # trained to NaN
                                ("keep_last", "0", "keep_last must be at least 1, got 0"),  # ([-0:] keeps all)
                                ("min_lr", "1e-3", r"expected 0 <= min_lr <= lr, got min_lr=0.001, lr=0.0006"),
                                ("min_lr", "-1e-5", r"expected 0 <= min_lr <= lr, got min_lr=-1e-05"),
                                ("lr_decay_steps", "5", r"lr_decay_steps \(5\) ends the cosine decay before the warm-up"),
                                # numpy's seed sequences take no negative seed: a traceback at the first batch
                                ("seed", "-5", r"seed must be in \[0, 2\*\*63\), got -5"),
                                ("seed", str(2**63), r"seed must be in \[0, 2\*\*63\)"),
                                # int("x") on a CUDA machine: a ValueError traceback after the data was read
                                ("device", "cuda:x", r"device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
                                ("device", "tpu", r"device must be auto, cpu, cuda or cuda:N, got 'tpu'")):
        with pytest.raises(ConfigError, match=message):
            T.load_config(None, [f"--{key}", value])


def test_a_gpu_index_past_the_machine_is_named(monkeypatch):
    # torch.cuda.set_device's "invalid device ordinal" came as a traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(T.TrainError, match=r"device 'cuda:2': this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        T._resolve_device(T.make_config({"device": "cuda:2"}), 0)
    # under torchrun the local rank picks the GPU: more processes than GPUs on a machine
    with pytest.raises(T.TrainError, match=r"local rank 3 has no GPU: this machine has 2 GPU\(s\); "
                                           r"start at most 2 processes per machine"):
        T._resolve_device(T.make_config({"device": "cuda"}), 3)
    assert T._resolve_device(T.make_config({"device": "cuda:1"}), 0) == torch.device("cuda", 1)


def test_resume_after_a_kill_mid_metrics_line(shards, tmp_path):
    # a process killed while appending to metrics.jsonl leaves half a line; resuming must not choke on it
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.2, "l')
    T.train(cfg_for(shards, out, max_steps=3, resume=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.2}\nnot json\n{"step": 2, "loss": 5.1}\n')
    with pytest.raises(T.TrainError, match=r"metrics.jsonl: line 2 is not JSON"):  # damage elsewhere is not ours to drop
        T.train(cfg_for(shards, out, max_steps=4, resume=True))


def test_what_a_kill_while_saving_left_is_removed_by_the_next_save(shards, tmp_path):
    # a process killed while writing a checkpoint (SIGKILL after a scheduler's grace period) left its
    # half-written folder, and one killed while deleting old checkpoints a part of one; neither is
    # in the index, and only a later save of the same step removed them: gigabytes each, for good
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=4, checkpoint_interval=2, keep_last=1, eval_interval=100))
    half = out / "checkpoints" / ".step_0000005.tmp"  # (the stop of a signal: off the interval)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / "checkpoints" / "step_0000002").mkdir()  # (rmtree stopped half way)
    (out / "checkpoints" / "step_0000002" / "trainer.pt").write_bytes(b"\0" * 1000)
    T.train(cfg_for(shards, out, max_steps=6, checkpoint_interval=2, keep_last=1, eval_interval=100, resume=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000006"]
    assert [e["name"] for e in json.loads((out / "checkpoints.json").read_text())["checkpoints"]] == ["step_0000006"]


def test_a_resume_with_other_batches_says_so(shards, tmp_path, caplog):
    # the docs promise a bit-exact resume; --block_size 16 on a block-32 run changed it silently
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=2, eval_interval=2))
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, out, max_steps=4, eval_interval=2, block_size=16, batch_size=4, resume=True))
    assert (f"{out / 'checkpoints' / 'step_0000002'}: resumed with other batches (block_size 16, was 32; batch_size 4, "
            f"was 8): from step 2 on, the run differs from one that was never stopped") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, out, max_steps=6, eval_interval=2, block_size=16, batch_size=4, resume=True))
    assert "resumed with other batches" not in caplog.text
    # block_size 0 is the context: the same windows as naming it
    from gpt2kit.model import GPT2Config

    T.train(cfg_for(shards, tmp_path / "ctx", max_steps=1, eval_interval=5, block_size=0, batch_size=2))
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, tmp_path / "ctx", max_steps=2, eval_interval=5, batch_size=2, resume=True,
                        block_size=GPT2Config.from_preset("tiny").n_ctx))
    assert "resuming from" in caplog.text and "resumed with other batches" not in caplog.text


def test_a_block_longer_than_the_presets_context_is_said(shards, tmp_path, caplog):
    from gpt2kit.model import GPT2Config

    n_ctx = GPT2Config.from_preset("tiny").n_ctx
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, tmp_path / "long", max_steps=1, batch_size=1, block_size=n_ctx + 8, eval_interval=5))
    assert (f"block_size {n_ctx + 8} is longer than tiny's context ({n_ctx}): the model is built with n_ctx "
            f"{n_ctx + 8}") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, tmp_path / "short", max_steps=1, eval_interval=5))
    assert "is longer than" not in caplog.text


def test_a_run_that_diverges_stops_before_it_saves_nan_weights(shards, tmp_path, monkeypatch):
    # lr inf (now refused) ran to the end with exit 0, NaN losses, and a NaN checkpoint as "best"
    import torch

    closed, real_close = [], T.Monitor.close
    monkeypatch.setattr(T.Monitor, "close", lambda self: (closed.append(self.path), real_close(self)))

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    T.train(cfg_for(shards, out, max_steps=2, eval_interval=2, threads=threads + 1))
    assert torch.get_num_threads() == threads  # the caller's setting is back
    with pytest.raises(T.TrainError, match=rf"^step \d+: the training loss is nan: the run diverged \(lr 1e\+30 too "
                                           rf"high\?\); nothing more is saved; the last checkpoint is "
                                           rf"{re.escape(str(out / 'checkpoints' / 'step_0000002'))}$"):
        T.train(cfg_for(shards, out, max_steps=6, eval_interval=2, log_interval=1, lr=1e30, resume=True))
    assert closed == [out / "metrics.jsonl"] * 2  # the run that stopped with the error closed its logs too
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert torch.get_num_threads() == threads
    # a checkpoint on a step whose loss is not logged (or the last step's own update): the weights
    # are checked before they are written
    with pytest.raises(T.TrainError, match=rf"^step 1: the weights are NaN or infinite: the run diverged \(lr 1e\+39 "
                                           rf"too high\?\); not saved; the last checkpoint is none$"):
        T.train(cfg_for(shards, tmp_path / "one", max_steps=2, checkpoint_interval=1, eval_interval=5, log_interval=5,
                        lr=1e39))
    assert not (tmp_path / "one" / "checkpoints").exists() or not any((tmp_path / "one" / "checkpoints").iterdir())


def test_a_damaged_checkpoint_removed_as_told_resumes_from_the_one_before(shards, tmp_path, caplog):
    # "remove the folder (and its entry in checkpoints.json)" left "latest" and "best" naming it:
    # the next resume failed with "not a training checkpoint", and only editing the JSON helped
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=6, eval_interval=2))
    damaged = out / "checkpoints" / "step_0000006"
    (damaged / T.TRAINER_STATE).write_bytes(b"garbage")
    with pytest.raises(T.CheckpointError, match=rf"the checkpoint is damaged: remove {damaged} to resume from the "
                                                r"one before it$"):
        T.train(cfg_for(shards, out, max_steps=8, eval_interval=2, resume=True))
    import shutil

    shutil.rmtree(damaged)
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, out, max_steps=8, eval_interval=2, resume=True))
    assert f"{damaged}: missing; resuming from the checkpoint before it ({out / 'checkpoints' / 'step_0000004'})" in caplog.text
    assert f"resuming from {out / 'checkpoints' / 'step_0000004'} (step 4)" in caplog.text
    index = json.loads((out / "checkpoints.json").read_text())
    assert [e["name"] for e in index["checkpoints"]][-2:] == ["step_0000006", "step_0000008"]
    assert all((out / "checkpoints" / e["name"]).is_dir() for e in index["checkpoints"])
    assert (out / "best").resolve().is_dir() and (out / "latest").resolve() == (out / "checkpoints" / "step_0000008")
    # with none left before it: said once, not twice ("missing" and then "no checkpoint to resume from")
    caplog.clear()
    for folder in (out / "checkpoints").iterdir():
        shutil.rmtree(folder)
    with caplog.at_level("INFO", logger="gpt2kit.train"):
        T.train(cfg_for(shards, out, max_steps=2, eval_interval=2, resume=True))
    assert "missing; resuming from the checkpoint before it (none: starting over)" in caplog.text
    assert "no checkpoint to resume from" not in caplog.text


def test_full_disk_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=2))
    good = (out / "latest" / "model.safetensors").read_bytes()
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(T.CheckpointError, match=r"No space left on device.*last good one is .*step_0000002"):
        T.train(cfg_for(shards, out, max_steps=4, resume=True))
    assert (out / "latest" / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no temp folder left


# ---------------------------------------------------------------------------------------------
# The whole path through the CLI


def test_prepare_takes_the_val_fraction_s_bounds(shards, tmp_path, capsys):
    # [0, 0.5], both ends included: 0 holds nothing out (a run then has no validation loss)
    from gpt2kit.cli import main as cli_main
    from gpt2kit.data import read_meta

    (tmp_path / "t.txt").write_text("".join(f"KING. Speak, speak {i}: a word or two.\n\n" for i in range(300)))
    held_out = {}
    for fraction in ("0", "0.5"):
        rc = cli_main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / fraction), "--tokenizer",
                       str(shards.parent / "tok"), "--val-fraction", fraction, "--segment-chars", "500", "--workers", "1",
                       "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        held_out[fraction] = read_meta(tmp_path / fraction)["splits"]["val"]["tokens"]
    assert held_out["0"] == 0 and held_out["0.5"] > 0


def test_prepare_train_sigterm_generate_through_the_cli(cli, tmp_path, text_dir, shards):
    r = cli("prepare", "--tokenizer", str(shards.parent / "tok"), "--out", str(tmp_path / "data"),
            "--val-fraction", "0.1", "--segment-chars", "2000", "--workers", "1", str(text_dir))
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout and "vocabulary 384" in r.stdout
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**TINY, "data": str(tmp_path / "data")}.items()))
    r = cli("train", str(cfg), "--out_dir", str(tmp_path / "o2"), "--max_stepz", "3")
    assert r.returncode == 2 and "unknown key '--max_stepz'; valid keys:" in r.stderr
    # A run that would go on for ages: SIGTERM makes it save a checkpoint and exit.
    out = tmp_path / "out"
    proc, stdout, stderr = _run_until(signal.SIGTERM, [sys.executable, "-m", "gpt2kit", "train", str(cfg), "--out_dir",
                                                       str(out), "--max_steps", "100000", "--eval_interval", "100000"], out)
    # an interrupted run is not a finished one: `train && export` or a scheduler must see it fail
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stdout
    last = max(losses(out))
    assert json.loads((out / "checkpoints.json").read_text())["latest"] == f"step_{last:07d}"
    assert stderr.splitlines()[-1] == _stop_line("SIGTERM", last, out, [
        str(cfg), "--out_dir", str(out), "--max_steps", "100000", "--eval_interval", "100000"])
    r = cli("generate", "--model", str(out / "latest"), "--max-new-tokens", "12", "--seed", "1", "--no-stream", "KING")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def _run_until(sig, argv: list[str], out: Path):
    """Run `argv`; once its first step is logged, send it `sig` (None: let it end). (process, stdout, stderr)"""
    proc = subprocess.Popen(argv, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if sig is not None:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
            time.sleep(0.02)
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc, stdout, stderr


def _stop_line(how: str, step: int, out: Path, args: list[str]) -> str:
    """The last line of a stopped `gpt2kit train ARGS` (a config file, then --key value pairs)."""
    import shlex

    head = args[:1] if not args[0].startswith("--") else []
    given: dict[str, str] = {}  # the command as parsed: each key once, at its first place, with its last value
    for key, value in zip(args[len(head)::2], args[len(head) + 1::2]):
        given[key] = value
    argv = ["gpt2kit", "train", *head, *(part for kv in given.items() for part in kv)]
    what = "the time limit (max_minutes 0.002)" if how == "time" else how
    return (f"gpt2kit: stopped by {what} at step {step} of 100000; checkpoint {out / 'checkpoints' / f'step_{step:07d}'}; "
            f"resume with: {shlex.join(argv + ['--resume'])}")


@pytest.mark.parametrize("how", ["SIGINT", "time"])
def test_ctrl_c_and_time_limit_exit_codes_and_the_resume_command(shards, tmp_path, how):
    # Ctrl-C is an interruption (130, the shell's code for it); max_minutes is a configured end:
    # exit 0, and the line that says how to go on, whose command does resume
    out = tmp_path / "out"
    argv = _train_cmd(shards, out, "--max_steps", "100000", "--eval_interval", "100000")
    if how == "time":
        argv += ["--max_minutes", "0.002"]
    proc, stdout, stderr = _run_until(signal.SIGINT if how == "SIGINT" else None, argv, out)
    assert proc.returncode == (130 if how == "SIGINT" else 0), stderr
    last = max(losses(out))
    assert last < 100000 and json.loads((out / "checkpoints.json").read_text())["latest"] == f"step_{last:07d}"
    assert stderr.splitlines()[-1] == _stop_line(how, last, out, argv[4:]), stderr[-2000:]
    if how == "time":  # the printed command, run as printed, continues the run
        import shlex

        again = shlex.split(stderr.splitlines()[-1].split("resume with: ")[1])
        r = subprocess.run([sys.executable, "-m", *again], env=_cli_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"resuming from {out / 'checkpoints' / f'step_{last:07d}'} (step {last})" in r.stderr
        assert max(losses(out)) > last


@pytest.mark.parametrize("second, torchrun, stops_at_once", [
    ("SIGINT", False, True), ("SIGINT", True, True),
    ("SIGTERM", True, True),  # torchrun's, after the user's second Ctrl-C reached it: it forwards one SIGINT, then SIGTERM
    ("SIGTERM", False, False),  # a process manager's, while a Ctrl-C stop is on its way: that stop goes on
])
def test_a_second_ctrl_c_stops_at_once(shards, tmp_path, monkeypatch, capfd, second, torchrun, stops_at_once):
    # Ctrl-C was swallowed until the step, the evaluation and the checkpoint were done, silently,
    # and a second one did nothing: a run stuck there could only be killed. Both signals are
    # raised from inside a step (each handler runs before raise_signal returns): no timing
    import gpt2kit.data as data

    out = tmp_path / "out"
    get_batch, calls = data.get_batch, []

    def in_a_step(*a):
        calls.append(1)
        if len(calls) == 3:
            if torchrun:  # (set only now: at the start, train() would open a process group)
                monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(getattr(signal, second))
        return get_batch(*a)

    monkeypatch.setattr(data, "get_batch", in_a_step)
    cfg = cfg_for(shards, out, max_steps=100000, eval_interval=100000)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    if stops_at_once:
        with pytest.raises(KeyboardInterrupt):
            T.train(cfg)
        assert not (out / "checkpoints").exists()
    else:
        s = T.train(cfg)
        assert s["stopped"] == "SIGINT" and (out / "checkpoints.json").exists()
        # saved at once, unevaluated: no val loss of an earlier step passes for the stop's
        assert s["val_loss"] is None and "val_loss" not in (out / "metrics.jsonl").read_text()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    err = capfd.readouterr().err
    assert err.count("stopping after this step") == 1
    assert "SIGINT: stopping after this step, with a checkpoint (Ctrl-C again: now, without one)" in err


def test_ctrl_c_under_torchrun_saves_the_checkpoint_before_torchrun_kills_the_workers(shards, tmp_path):
    # torchrun forwards the Ctrl-C it got to its workers (in sessions of their own, the terminal's
    # reaches only torchrun) and SIGKILLs them --shutdown-timeout seconds later: a stop that
    # evaluated 60,000 batches before saving was killed there, without its checkpoint
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--shutdown-timeout", "20", "-m", "gpt2kit",
            *_train_cmd(shards, out, "--max_steps", "100000", "--eval_interval", "100000", "--eval_batches", "60000")[3:]]
    proc, stdout, stderr = _run_until(signal.SIGINT, argv, out)
    assert proc.returncode == 1, stderr[-3000:]  # torchrun's own code for a run its signal ended
    assert "SIGKILL" not in stderr, stderr[-3000:]
    stop = next(line for line in stderr.splitlines() if line.startswith("gpt2kit: stopped by SIGINT at step "))
    step = int(stop.split(" at step ")[1].split()[0])
    assert json.loads((out / "checkpoints.json").read_text())["latest"] == f"step_{step:07d}"
    assert (out / "checkpoints" / f"step_{step:07d}" / "model.safetensors").is_file()
    assert "the same torchrun launch, its command ending in: -m gpt2kit train " in stop


def test_bf16_mfu_counts_the_fp32_units_where_bf16_multiplies_on_them(monkeypatch):
    from gpt2kit import kernels
    from gpt2kit import train as T

    monkeypatch.setattr(kernels, "native_bf16", lambda: False)
    monkeypatch.setattr(T, "_PEAKS", {})
    assert T.measure_matmul_peak("cpu", "bfloat16") >= T.measure_matmul_peak("cpu", "float32") > 0
    monkeypatch.setattr(kernels, "native_bf16", lambda: True)
    monkeypatch.setattr(T, "_PEAKS", {})
    assert T.measure_matmul_peak("cpu", "bfloat16") == T._PEAKS[("cpu", "bfloat16")]
    assert ("cpu", "float32") not in T._PEAKS  # measured alone


@pytest.mark.parametrize("padded", [False, True])
def test_loss_module_gradients_equal_plain_cross_entropy(padded):
    # The training loss sums the tied matrix's two gradients in place (token embedding and output
    # layer); with a padded vocabulary it reads a slice. Both equal the textbook computation, also
    # when two micro-batches accumulate.
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=61, n_ctx=16,
                            padded_vocab_multiple=64 if padded else 1))
    ids = torch.randint(0, 61, (2, 3, 13))
    loss_mod = T._loss_module(model)
    for x in ids:
        loss_mod(x[:, :-1], x[:, 1:]).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for x in ids:
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for a, b in zip(ours, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _three_adamw_steps(fused: bool, max_norm: float, how: str):
    """Parameters after three AdamW steps on fixed gradients, clipped `how`: "folded"
    (clip_and_step), "separate" (clip_gradients, then step) or "none"."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (70, 300)]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=fused)
    norm = None
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step + p.numel()))
        if how == "folded":
            norm = T.clip_and_step(opt, params, max_norm)
        else:
            norm = T.clip_gradients(params, max_norm) if how == "separate" and max_norm else None
            opt.step()
    assert not hasattr(opt, "grad_scale")  # the clipping factor does not outlive its step
    return norm, [p.detach().clone() for p in params]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, 1e3, 0.0])
def test_clip_and_step_equals_clip_then_step(fused, max_norm):
    (n1, a), (n2, b) = (_three_adamw_steps(fused, max_norm, how) for how in ("folded", "separate"))
    assert (n1 is None) == (n2 is None) == (max_norm == 0.0)
    if n1 is not None:
        torch.testing.assert_close(n1, n2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if max_norm == 0.05:  # (clipping did change the steps)
        assert not torch.allclose(a[0], _three_adamw_steps(fused, max_norm, "none")[1][0], atol=1e-3)


def _adamw_runs(kernel_steps, sizes=((768, 16), (2304,), (70,), (64, 3), (99, 3)), steps=4, beta1=0.8):
    """Parameters, gradients and optimizer after `steps` AdamW steps on two groups of
    parameters (different lr, weight decay, betas and eps), the second parameter without a
    gradient at step 2; steps in `kernel_steps` through `adamw_step_cpu`, the others through
    torch's fused AdamW. Odd steps scale the gradients (the folded clipping)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
    opt = torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.1},
                             {"params": params[2:], "weight_decay": 0.0, "lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3}],
                            lr=0.1, betas=(beta1, 0.97), eps=1e-6, fused=True)
    grads = []
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (step, i) == (2, 1) else torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i))
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        scale = 2.5 if step % 2 else 1.0
        if step in kernel_steps:
            assert T.adamw_step_cpu(opt, scale)
        else:
            opt.grad_scale = torch.tensor(scale)
            opt.step()
            del opt.grad_scale
    return params, grads, opt


@pytest.mark.parametrize("beta1", [0.8, 0.3])  # (torch's lerp changes form for a weight 1 - beta1 >= 0.5)
def test_adamw_kernel_equals_torch_fused_adamw(beta1):
    if not T_KERNELS:  # without the kernels it declines (see the next test)
        assert not T.adamw_step_cpu(_adamw_runs(kernel_steps=(), steps=1)[2])
        return
    ours, ours_grads, ours_opt = _adamw_runs(range(4), beta1=beta1)
    ref, _, ref_opt = _adamw_runs((), beta1=beta1)
    mixed, _, _ = _adamw_runs((1, 3), beta1=beta1)  # the state is torch's own: steps can alternate
    for i, (a, b, c) in enumerate(zip(ours, ref, mixed)):
        states = [(ours_opt.state[a][k], ref_opt.state[b][k]) for k in ("exp_avg", "exp_avg_sq")]
        if a.numel() % 16 == 0:  # (every GPT-2 shape) bit-identical to torch 2.13's kernel
            assert torch.equal(a, b) and torch.equal(c, b)
            assert all(torch.equal(x, y) for x, y in states)
        else:  # the last numel % 16 elements: torch's scalar loop, up to its compiler's contractions
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            torch.testing.assert_close(c, b, rtol=0, atol=1e-6)
            for x, y in states:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        assert float(ours_opt.state[a]["step"]) == float(ref_opt.state[b]["step"]) == (3 if i == 1 else 4)
    assert ours_opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]
    # the (scaled) gradients are read, not written
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, ours_grads) if g is not None)
    assert not torch.equal(ours[0], _adamw_runs((), steps=3, beta1=beta1)[0][0])  # (the steps did something)


def test_adamw_kernel_declines_what_it_does_not_implement():
    torch.manual_seed(0)

    def declines(make_opt, dtype=torch.float32):
        p = torch.nn.Parameter(torch.randn(32, dtype=dtype))
        p.grad = torch.randn(32, dtype=dtype)
        opt = make_opt([p])
        before = p.detach().clone()
        assert not T.adamw_step_cpu(opt)
        assert torch.equal(p.detach(), before) and not opt.state  # nothing changed
        return True

    assert declines(lambda ps: torch.optim.AdamW(ps, foreach=True))  # only the fused AdamW's arithmetic
    assert declines(lambda ps: torch.optim.AdamW(ps, fused=True, amsgrad=True))
    assert declines(lambda ps: torch.optim.AdamW(ps, fused=True, maximize=True))
    assert declines(lambda ps: torch.optim.Adam(ps, fused=True))
    assert declines(lambda ps: torch.optim.AdamW(ps, fused=True), dtype=torch.float64)
    assert declines(lambda ps: torch.optim.AdamW(ps, fused=True, betas=(torch.tensor(0.9), torch.tensor(0.99))))

    def aliased(ps):  # two parameters, one memory: they would be updated in parallel
        twin = torch.nn.Parameter(ps[0].data)
        twin.grad = ps[0].grad.clone()
        return torch.optim.AdamW([{"params": ps}, {"params": [twin]}], fused=True)

    assert declines(aliased)

    def hooked(ps):
        opt = torch.optim.AdamW(ps, fused=True)
        opt.register_step_post_hook(lambda *a: None)
        return opt

    assert declines(hooked)
    if not T_KERNELS:
        assert declines(lambda ps: torch.optim.AdamW(ps, fused=True))


def test_machines_with_different_data_are_refused(shards, tmp_path, text_dir):
    # the same --data path holding other shards on one machine: each rank read windows of its
    # own corpus at the same offsets, and nothing said so
    other = tmp_path / "other"
    prepare([text_dir], other, tokenizer=str(shards / "tokenizer"), val_fraction=0.2, segment_chars=2000)
    out = tmp_path / "run"
    results = _two_nodes(*([*_train_cmd(shards, out, "--max_steps", "2")[3:], "--data", str(data)]
                           for data in (shards, other)))
    stderr = results[0][1] + results[1][1]
    assert all(code != 0 for _, _, code in results)
    assert "the ranks read different prepared data" in stderr, stderr[-3000:]
    assert not (out / "checkpoints").exists()


def test_machines_with_different_settings_are_refused(shards, tmp_path):
    # one machine's command line with another lr: each rank stepped its own copy of the weights
    # with its own learning rate from the same averaged gradients, and the copies drifted apart
    # silently (another batch_size or eval_interval: mismatched collectives, a hang)
    out = tmp_path / "run"
    base = _train_cmd(shards, out, "--max_steps", "2", "--threads", "1")[3:]
    results = _two_nodes(base + ["--lr", "0.003"], base + ["--lr", "0.001", "--threads", "2"])
    stderr = results[0][1] + results[1][1]
    assert all(code != 0 for _, _, code in results)
    assert "the ranks run different settings: lr (rank 0: 0.00" in stderr, stderr[-3000:]
    assert "threads" not in stderr.split("different settings")[1].splitlines()[0]  # a per-machine setting


def test_machines_compare_the_init_from_weights_not_the_path(shards, tmp_path):
    # init_from was compared as a string: the same released model at another path on one machine
    # was refused, and a relative path naming other weights on each machine was accepted (DDP then
    # trained rank 0's weights, FSDP a mix of both)
    import shutil

    from gpt2kit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(str(shards / "tokenizer"))
    for machine, seed in (("a", 0), ("c", 1)):
        torch.manual_seed(seed)
        GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=384, n_ctx=32)).save_pretrained(
            str(tmp_path / machine / "gpt2"), tokenizer)
    shutil.copytree(tmp_path / "a" / "gpt2", tmp_path / "b" / "models" / "gpt2")
    out = tmp_path / "run"
    base = _train_cmd(shards, out, "--max_steps", "1", "--eval_batches", "1")[3:]
    results = _two_nodes(base + ["--init_from", str(tmp_path / "a" / "gpt2")],
                         base + ["--init_from", str(tmp_path / "b" / "models" / "gpt2")])
    assert [code for _, _, code in results] == [0, 0], (results[0][1] + results[1][1])[-3000:]
    assert json.loads((out / "checkpoints.json").read_text())["latest"] == "step_0000001"
    results = _two_nodes(*([*base, "--out_dir", str(tmp_path / "other"), "--init_from", "gpt2"],) * 2,
                         cwds=(tmp_path / "a", tmp_path / "c"))
    stderr = results[0][1] + results[1][1]
    assert all(code != 0 for _, _, code in results)
    assert "init_from 'gpt2': the ranks loaded different weights (rank 0: " in stderr, stderr[-3000:]
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_resume_between_fsdp_and_unsharded_runs(shards, tmp_path):
    # an fsdp checkpoint's optimizer state is keyed by parameter name and carries its non-fused
    # options: resuming it in one process crashed in AdamW, and an unsharded checkpoint resumed
    # with fsdp = true crashed with KeyError 'state.0.step' (clipping on at every step: the
    # fused step folds it into the optimizer)
    ref = tmp_path / "ref"
    T.train(cfg_for(shards, ref, max_steps=4, micro_batch_size=2, grad_clip=0.1))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gpt2kit"]
    sharded = tmp_path / "sharded"
    r = subprocess.run([*torchrun, *_train_cmd(shards, sharded, "--max_steps", "2", "--micro_batch_size", "2", "--grad_clip", "0.1",
                                               "--fsdp", "true")[3:]], env=_cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    T.train(cfg_for(shards, sharded, max_steps=4, micro_batch_size=2, grad_clip=0.1, resume=True))
    plain = tmp_path / "plain"
    T.train(cfg_for(shards, plain, max_steps=2, micro_batch_size=2, grad_clip=0.1))
    r = subprocess.run([*torchrun, *_train_cmd(shards, plain, "--max_steps", "4", "--micro_batch_size", "2", "--grad_clip", "0.1",
                                               "--fsdp", "true", "--resume")[3:]], env=_cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = losses(ref)
    for run in (sharded, plain):  # the optimizer's moments carried over: the uninterrupted run's losses
        got = losses(run)
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want), (run.name, got, want)


# ---------------------------------------------------------------------------------------------
# Each key's range, the checkpoint index, what may differ between machines


@pytest.mark.parametrize("keys, bad, good, message", [
    (("batch_size", "max_steps", "log_interval", "eval_interval", "eval_batches", "keep_last"), "0", "1",
     "must be at least 1, got 0"),
    (("micro_batch_size", "warmup_steps", "lr_decay_steps", "n_layer", "n_head", "n_embd", "block_size",
      "sample_interval", "checkpoint_interval", "threads"), "-1", "0", "must not be negative, got -1"),
    (("max_minutes", "weight_decay", "grad_clip", "eps", "peak_tflops"), "-1", "0", "must not be negative, got -1.0"),
    (("max_minutes", "weight_decay", "grad_clip", "eps", "peak_tflops"), "nan", "0", "must not be negative, got nan"),
    (("dropout", "beta1", "beta2"), "-0.1", "0", r"must be in \[0, 1\), got -0.1"),
    (("dropout", "beta1", "beta2"), "1", "0.99", r"must be in \[0, 1\), got 1.0"),
])
def test_every_key_is_refused_past_its_range_and_accepted_at_its_bound(keys, bad, good, message):
    # only some keys of each rule were tried: a key dropped from its rule (a batch_size of 0, a
    # negative eps) passed, as did a bound moved by one (a warmup_steps of 0 refused)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^command line: {key} {message}$"):
            T.load_config(None, [f"--{key}", bad])
        assert getattr(T.load_config(None, [f"--{key}", good]), key) == float(good), key
    # the other bounds, reached: a seed of 0 and of 2**63 - 1, a decay ending with the warm-up,
    # min_lr equal to lr and to 0
    cfg = T.load_config(None, ["--seed", "0", "--warmup_steps", "5", "--lr_decay_steps", "5", "--min_lr", "6e-4"])
    assert (cfg.seed, cfg.lr_decay_steps, cfg.min_lr) == (0, 5, cfg.lr)
    assert T.load_config(None, ["--seed", str(2**63 - 1), "--min_lr", "0"]).seed == 2**63 - 1


def test_bool_words_toml_types_and_config_file_errors(tmp_path):
    for word, value in (("TRUE", True), (" yes ", True), ("No", False), ("0", False), ("1", True)):
        assert T.load_config(None, ["--resume", word]).resume is value, word
    # TOML's true is no int (bool is an int subclass in Python), 1 is no bool
    p = tmp_path / "run.toml"
    p.write_text("max_steps = true\n")
    with pytest.raises(ConfigError, match=rf"^{p}: max_steps expects int, got bool True$"):
        T.load_config(p)
    p.write_text("resume = 1\n")
    with pytest.raises(ConfigError, match=rf"^{p}: resume expects bool, got int 1$"):
        T.load_config(p)
    p.write_text("lr = \n")
    with pytest.raises(ConfigError, match=rf"^{p}: not valid TOML \("):
        T.load_config(p)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'none.toml'}: no such config file$"):
        T.load_config(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"^expected --key value, got '--'$"):
        T.parse_overrides(["--lr", "1", "--"])


def test_checkpoint_index_ties_a_step_saved_again_and_an_interrupted_save(tmp_path):
    ck = T.Checkpoints(tmp_path, keep_last=1)

    def write(text):
        return lambda folder: (folder / "w.txt").write_text(text)

    ck.save(1, write("1"), {"step": 1}, 2.0)
    ck.save(2, write("2"), {"step": 2}, 2.0)  # a tie: the later checkpoint is the best, and no other is kept
    idx = ck.index()
    assert (idx["best"], [e["name"] for e in idx["checkpoints"]]) == ("step_0000002", ["step_0000002"])
    assert sorted(p.name for p in ck.root.iterdir()) == ["step_0000002"]
    # the same step saved again (a resume from an earlier checkpoint): replaced, listed once
    ck.save(2, write("again"), {"step": 2}, 1.5)
    assert ck.index()["checkpoints"] == [{"name": "step_0000002", "step": 2, "val_loss": 1.5}]
    assert (ck.root / "step_0000002" / "w.txt").read_text() == "again"
    assert T.load_trainer_state(ck.latest()) == {"step": 2}

    def interrupted(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C while saving: no CheckpointError, nothing left
        ck.save(3, interrupted, {"step": 3}, 1.0)
    assert sorted(p.name for p in ck.root.iterdir()) == ["step_0000002"] and ck.index()["latest"] == "step_0000002"
    (tmp_path / T.INDEX).write_text('{"latest": null}')
    with pytest.raises(T.CheckpointError, match=r"checkpoints.json: not a checkpoint index \(expected keys checkpoints, "
                                                r"latest, best\)"):
        ck.latest()


def test_a_folder_without_a_training_state_is_named(tmp_path):
    with pytest.raises(T.CheckpointError, match=rf"^{tmp_path}: not a training checkpoint \(no trainer.pt\)$"):
        T.load_trainer_state(tmp_path)
    for state in ([1, 2], {"optimizer": {}}):
        torch.save(state, tmp_path / T.TRAINER_STATE)
        with pytest.raises(T.CheckpointError, match=r"trainer.pt: not a gpt2kit training state \(expected a dict with "
                                                    r"a 'step'\)$"):
            T.load_trainer_state(tmp_path)


def test_settings_that_may_differ_between_machines_and_those_that_may_not(monkeypatch):
    # paths, hardware and what only rank 0 uses may differ; any other key is refused, and
    # init_from only as given or not (its weights are compared once loaded)
    first: list = []
    monkeypatch.setattr(T, "_every_rank", lambda value, dist_: [first[0] if first else first.append(value) or value, value])
    dist_ = T._Dist(rank=0, world=2, enabled=True)
    here = T.make_config({"data": "a", "init_from": "m"})
    T._check_same_settings(here, dist_)  # (rank 0's view, recorded)
    T._check_same_settings(T.make_config({
        "data": "b", "out_dir": "o2", "device": "cpu", "threads": 3, "progress": False, "tensorboard": False,
        "plot": False, "peak_tflops": 5.0, "keep_last": 7, "init_from": "/elsewhere/m"}), dist_)
    for key, value in (("lr", 1e-3), ("init_from", ""), ("eval_batches", 3), ("seed", 1)):
        with pytest.raises(T.TrainError, match=rf"^the ranks run different settings: {key} \(rank 0: "):
            T._check_same_settings(T.make_config({"data": "a", "init_from": "m", key: value}), dist_)


def test_the_strongest_stop_reason_on_any_rank_stops_every_rank(monkeypatch):
    # a signal may reach some ranks only (or one rank's clock passes max_minutes first): all of
    # them stop at the same step, for the strongest reason any of them has
    import torch.distributed as dist

    other = {}

    def all_reduce(t, op):  # the other rank's contribution, reduced as a backend does
        reduce = {dist.ReduceOp.SUM: torch.add, dist.ReduceOp.MAX: torch.maximum, dist.ReduceOp.MIN: torch.minimum}[op]
        t.copy_(reduce(t, torch.full_like(t, other["value"])))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    dist_ = T._Dist(rank=0, world=2, enabled=True)
    for mine, theirs, want in ((None, None, None), (None, "SIGINT", "SIGINT"), ("time", None, "time"),
                               ("time", "SIGTERM", "SIGTERM"), ("SIGINT", "SIGTERM", "SIGINT")):
        other["value"] = float(T._STOP_REASONS.index(theirs))
        assert T._stop_reason(mine, dist_, "cpu") == want, (mine, theirs)
    other["value"] = 3.0  # the loss of the other rank: the logged loss is the ranks' mean
    assert float(T._all_mean(torch.tensor(1.0), dist_)) == 2.0


def test_under_torchrun_even_one_rank_runs_distributed(monkeypatch):
    # a one-GPU torchrun launch takes the code path of many (DDP, collectives); a plain process does not
    import torch.distributed as dist

    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert T._init_distributed("cpu") == T._Dist() and not dist.is_initialized()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    for key, value in {"TORCHELASTIC_RUN_ID": "one", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    try:
        assert T._init_distributed("cpu") == T._Dist(rank=0, world=1, local_rank=0, enabled=True)
        assert dist.get_backend() == "gloo"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_gpu_of_each_local_rank_and_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert T._resolve_device(T.make_config({"device": "cuda"}), 1) == torch.device("cuda", 1)
    with pytest.raises(T.TrainError, match=r"local rank 2 has no GPU: this machine has 2 GPU\(s\)"):
        T._resolve_device(T.make_config({"device": "cuda"}), 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T._resolve_device(T.make_config({"device": "auto"}), 0) == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(T.TrainError, match=rf"^device '{device}': CUDA is not available$"):
            T._resolve_device(T.make_config({"device": device}), 0)


def test_mfu_is_the_throughput_times_the_flops_per_token_over_the_peak(shards, tmp_path):
    # only "0 < mfu" was checked: the attention term or the output layer left out of the FLOPs passed
    assert T.flops_per_token(GPT2Config.from_preset("gpt2"), 1024) == 854_438_400  # 6 x 123.5M + 12 x 12 x 768 x 1024
    fpt = 6 * (12 * 2 * 32**2 + 384 * 32) + 12 * 2 * 32 * 32  # the run's model: 2 layers of width 32, 32 tokens
    out = tmp_path / "run"
    T.train(cfg_for(shards, out, max_steps=3, peak_tflops=1e-3, eval_interval=1000, tensorboard=False))
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "mfu" in r]
    assert len(recs) == 3
    for r in recs:
        assert r["mfu"] == pytest.approx(r["tok_per_s"] * fpt / 1e9, rel=1e-3, abs=1e-4), r


def test_the_last_step_is_logged_off_the_log_interval(shards, tmp_path):
    out = tmp_path / "run"
    s = T.train(cfg_for(shards, out, max_steps=5, log_interval=2, eval_interval=1000, tensorboard=False))
    assert list(losses(out)) == [2, 4, 5] and s["loss"] == losses(out)[5]


def test_samples_come_from_the_step_s_seed_and_leave_the_run_alone(shards, tmp_path):
    # a sample at step s is sample_text's with seed + s, after the prompt; sampling changes
    # neither the training's random streams (dropout) nor its mode
    from gpt2kit.tokenizer import Tokenizer

    runs = {}
    for every in (0, 1):
        out = tmp_path / str(every)
        T.train(cfg_for(shards, out, max_steps=2, dropout=0.2, sample_interval=every, sample_tokens=6,
                        sample_prompt="KING", checkpoint_interval=1, keep_last=5, eval_interval=1000, tensorboard=False))
        runs[every] = losses(out)
    assert runs[0] == runs[1]
    samples = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "sample" in r]
    assert [r["step"] for r in samples] == [1, 2]
    tok = Tokenizer.from_pretrained(str(out / "latest"))
    for r in samples:
        model = GPT2.from_pretrained(str(out / "checkpoints" / f"step_{r['step']:07d}"))
        assert r["sample"].startswith("KING") and r["sample"] == T.sample_text(model, tok, "KING", 6, seed=1337 + r["step"])
    state = torch.get_rng_state()
    for training in (True, False):
        model.train(training)
        T.sample_text(model, tok, "", 4, seed=1)
        assert model.training is training and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("stopped, rank, code", [(None, 0, 0), ("time", 0, 0), ("SIGTERM", 0, 143), ("SIGINT", 1, 130),
                                                 ("nothing", 0, 0), ("nothing", 1, 0)])
def test_what_the_train_command_prints_for_each_end(monkeypatch, capsys, stopped, rank, code):
    # the summary line and the stop line, from rank 0 alone; a time stop is a configured end,
    # not named in the summary as a signal's is
    from gpt2kit.cli import build_parser

    summary = {"step": 7, "start_step": 2, "elapsed_s": 1.0, "tokens_per_s": 1000.0, "loss": 2.5,
               "val_loss": 2.75 if stopped is None else None,  # (a signal's stop is not evaluated)
               "checkpoint": "o/checkpoints/step_0000007", "stopped": stopped, "max_steps": 9, "rank": rank}
    if stopped == "nothing":
        summary = {"step": 9, "nothing_to_do": True, "checkpoint": "o/checkpoints/step_0000009", "rank": rank}
    monkeypatch.setattr(T, "train", lambda cfg: summary)
    args = build_parser().parse_args(["train", "--resume", "--max_steps", "9", "--max_minutes", "0.5"])
    assert args.func(args) == code
    out, err = capsys.readouterr()
    if rank:
        assert (out, err) == ("", "")
    elif stopped == "nothing":
        assert out == "nothing to train: o/checkpoints/step_0000009 is at step 9, the configured max_steps\n"
    else:
        val = ", val loss 2.7500" if stopped is None else ""
        assert out.startswith(f"trained 5 steps to step 7 in 1.0 s (1,000 tok/s): loss 2.5000{val}; checkpoint "
                              "o/checkpoints/step_0000007")
        assert out.endswith("step_0000007; stopped by SIGTERM\n" if stopped == "SIGTERM" else "step_0000007\n")
        why = {None: None, "time": "the time limit (max_minutes 0.5)", "SIGTERM": "SIGTERM"}[stopped]
        assert err == ("" if why is None else f"gpt2kit: stopped by {why} at step 7 of 9; checkpoint "
                       "o/checkpoints/step_0000007; resume with: gpt2kit train --max_steps 9 --max_minutes 0.5 --resume\n")


def test_init_from_a_model_of_another_tokenizer_is_refused(shards, tmp_path, text_dir):
    # a model whose vocabulary is large enough, but whose tokenizer is not the shards' one: its
    # token ids mean other text, and fine-tuning went on in silence
    from gpt2kit.bpe_train import train_bpe

    sample = tmp_path / "t.txt"
    sample.write_text(next(text_dir.iterdir()).read_text()[:5000])
    other = train_bpe([sample], vocab_size=300)
    GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=400, n_ctx=32)).save_pretrained(str(tmp_path / "m"),
                                                                                               tokenizer=other)
    with pytest.raises(T.TrainError, match=rf"init_from {tmp_path / 'm'}: its tokenizer differs from the one that made "
                                           rf"the shards in {shards} \(vocabulary mismatch\); prepare the data with "
                                           rf"--tokenizer {tmp_path / 'm'}$"):
        T.train(cfg_for(shards, tmp_path / "run", init_from=str(tmp_path / "m"), max_steps=1))
    assert not (tmp_path / "run").exists()


def test_a_model_context_from_block_size_and_an_old_checkpoint_s_schedule(tmp_path, caplog):
    # a block_size past the preset's context widens the new model's; a fine-tuned model keeps its own
    assert [T._model_config(T.make_config({"block_size": b}), 384).n_ctx for b in (0, 64, 200)] == [128, 128, 200]
    # a checkpoint whose saved config lacks schedule keys (an older run's): no warning, no KeyError
    with caplog.at_level("WARNING", logger="gpt2kit.train"):
        T._warn_if_the_rate_moves(T.make_config({"max_steps": 50}), {"lr": 1.0, "max_steps": 10}, 5, tmp_path)
    assert not caplog.text


def test_a_block_past_a_fine_tuned_model_s_context_and_another_dropout_on_resume(shards, tmp_path):
    init = tmp_path / "init"
    GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=384, n_ctx=16)).save_pretrained(str(init))
    with pytest.raises(T.TrainError, match=r"^block_size 32 exceeds the model's context n_ctx=16$"):
        T.train(cfg_for(shards, tmp_path / "ft", init_from=str(init), max_steps=1))
    out = tmp_path / "run"
    s = T.train(cfg_for(shards, out, max_steps=2, eval_interval=1))
    assert s["best_checkpoint"] == str(out / "best") and s["checkpoint"] == str(out / "checkpoints" / "step_0000002")
    with pytest.raises(T.CheckpointError, match=r"step_0000002: trained with dropout 0.0, configured 0.1$"):
        T.train(cfg_for(shards, out, max_steps=3, dropout=0.1, resume=True))


def test_a_bool_word_stays_the_flag_s_value_where_a_file_has_its_name(tmp_path, monkeypatch):
    from gpt2kit.cli import build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "yes").write_text('model = "tiny"\n')
    args = build_parser().parse_args(["train", "--resume", "yes"])
    assert args.config is None and vars(args)["cfg.resume"] == "yes" and not args.unknown_overrides


def test_fine_tuning_with_dropout_sets_it_at_every_site(shards, tmp_path):
    # the checkpoint's dropout (0) was replaced in the attention alone or in the nn.Dropout modules
    # alone (residuals, MLP, embeddings): the run still differed by seed, with part of its dropout
    from gpt2kit import data as D

    init = tmp_path / "init"
    GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=384, n_ctx=32)).save_pretrained(str(init))
    model, _ = T._build_model(cfg_for(shards, tmp_path / "run", init_from=str(init), dropout=0.2), D.read_meta(shards))
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    attention = [m.dropout for m in model.modules() if isinstance(getattr(m, "dropout", None), float)]
    assert drops and attention and set(drops) == set(attention) == {0.2} and model.config.dropout == 0.2


def test_shards_whose_tokenizer_folder_was_replaced_are_refused(shards, tmp_path, text_dir):
    import shutil

    from gpt2kit import data as D
    from gpt2kit.bpe_train import train_bpe

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    folder = data / D.read_meta(data)["tokenizer"]["folder"]
    shutil.rmtree(folder)
    sample = tmp_path / "t.txt"
    sample.write_text(next(text_dir.iterdir()).read_text()[:5000])
    train_bpe([sample], vocab_size=300).save(folder)
    with pytest.raises(T.TrainError, match=r"tokenizer: does not match the fingerprint in meta.json$"):
        T.train(cfg_for(data, tmp_path / "run", max_steps=1))
