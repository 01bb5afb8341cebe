"""`gpt2kit model info|convert` end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import transformers

from gpt2kit.weights import read_tf_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "openai-tiny"


def test_model_info_preset_and_folder(cli):
    r = cli("model", "info", "gpt2-medium")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert lines["layers"] == "24" and lines["width"] == "1024" and lines["context"] == "1024"
    assert lines["heads"].startswith("16 ")
    assert lines["params"].startswith("354,823,168 (354.8M); without the tied token embedding 303,360,000")
    assert "fp32 1.3 GiB, bf16 676.8 MiB, fp16 676.8 MiB" in lines["memory"]
    r = cli("model", "info", str(FIXTURE), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["n_layer"], info["n_embd"], info["n_head"], info["n_ctx"], info["vocab_size"]) == (2, 8, 2, 16, 37)
    assert info["params"] == sum(a.size for a in read_tf_checkpoint(FIXTURE / "model.ckpt").values())
    assert info["weights_bytes"]["bf16"] == 2 * info["params"] and not info["preset"]
    r = cli("model", "info", "gpt-7", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("gpt2kit: error: not a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny")


def test_model_convert_openai_release_to_hf(cli, tmp_path):
    out = tmp_path / "hf"
    r = cli("model", "convert", str(FIXTURE), str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "2,184 parameters" in r.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    ref = read_tf_checkpoint(FIXTURE / "model.ckpt")
    np.testing.assert_array_equal(hf.transformer.h[1].mlp.c_fc.weight.detach().numpy(), ref["model/h1/mlp/c_fc/w"][0])
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), ref["model/wte"])
    # an OUT that cannot be a folder fails at once, before any weight is read
    (tmp_path / "file").write_text("x")
    for bad, message in ((tmp_path / "file", "exists and is not a folder"),
                         (tmp_path / "file" / "hf", f"{tmp_path / 'file'} is a file, not a folder")):
        r = cli("model", "convert", str(FIXTURE), str(bad))
        assert r.returncode == 2 and r.stderr == f"gpt2kit: error: OUT {bad}: {message}\n"
