"""scripts/device_check.py, the prepared check for a machine with a GPU, kept working on the CPU."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
