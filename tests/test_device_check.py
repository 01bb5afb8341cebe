"""scripts/device_check.py, the prepared check for a machine with a GPU, kept working on the CPU."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "device_check.py"


def test_quick_run_on_the_cpu_passes_and_says_what_it_did_not_run(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "device_check.json").read_text())["results"]
    status = {name: res["status"] for name, res in results.items()}
    assert status == {"forward fp32": "PASS", "forward bf16": "PASS", "forward fp16": "not run", "kv cache": "PASS",
                      "greedy": "PASS", "compile": "not run", "train": "PASS", "train compiled": "not run",
                      "torchrun": "not run"}, results
    assert "5 passed, 0 failed, 4 not run" in r.stdout


def test_a_check_fails_when_the_weights_differ(monkeypatch):
    mod = load_script()
    real = mod.to_hf_state_dict

    def nudged(model):
        sd = dict(real(model))
        bias = sd["transformer.ln_f.bias"].clone()
        bias[0] += 0.01  # one channel: a shift of all of them would vanish in the LayerNorm
        sd["transformer.ln_f.bias"] = bias
        return sd

    monkeypatch.setattr(mod, "to_hf_state_dict", nudged)
    ok, detail = mod.check_forward_fp32("cpu")
    assert not ok and "limit 1e-4" in detail


def load_script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compiled_and_torchrun_checks_on_the_cpu(tmp_path, monkeypatch):
    mod = load_script()
    data = mod.tiny_shards(tmp_path)
    ok, detail = mod.check_train_compiled("cpu", data, tmp_path, 0)
    assert ok, detail
    for ranks in (2, 1):  # one rank (one GPU) still runs through torch.distributed under torchrun
        monkeypatch.setattr(mod, "torchrun_ranks", lambda device: ranks)
        work = tmp_path / f"ranks{ranks}"
        work.mkdir()
        ok, detail = mod.check_torchrun("cpu", data, work, 0)
        assert ok and detail.startswith(f"{ranks} rank(s) over gloo") and "NOT distributed" not in detail, detail
        assert detail.count("distributed, max |loss - one process|") == 2, detail


def test_the_checks_report_failures(tmp_path, monkeypatch):
    mod = load_script()
    assert mod.close({1: 5.0, 2: 4.0}, {1: 5.0, 2: 4.0 + 2e-4}, 1e-4) == (False, pytest.approx(2e-4))
    assert not mod.close({}, {}, 1e-4)[0] and not mod.close({1: 5.0}, {2: 5.0}, 1e-4)[0]
    data = mod.tiny_shards(tmp_path)
    mod.reference_run("cpu", data, tmp_path)
    monkeypatch.setattr(mod.sys, "executable", "/bin/false")  # torchrun that fails
    ok, detail = mod.check_torchrun("cpu", data, tmp_path, 0)
    assert not ok and detail.startswith("ddp: torchrun exited 1"), detail
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\necho started\nexec sleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(mod.sys, "executable", str(hang))  # ... and one that hangs: killed at the timeout
    t = time.monotonic()
    ok, detail = mod.check_torchrun("cpu", data, tmp_path, 0, timeout=1)
    assert not ok and detail.startswith("ddp: no result within 1 s") and detail.endswith("started"), detail
    assert time.monotonic() - t < 30
