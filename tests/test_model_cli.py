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


def test_model_info_text_of_a_billion_parameter_preset_and_a_tiny_folder(capsys):
    from gpt2kit.cli import main

    assert main(["model", "info", "gpt2-xl"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["heads"] == "25 (head size 64)" and lines["vocab"] == "50257" and lines["context"] == "1024"
    assert lines["params"] == "1,557,611,200 (1.56B); without the tied token embedding 1,477,200,000 (1.48B)"
    # keys and values of 48 layers of 1600 floats per token
    assert lines["kv"] == "cache   fp32 600.0 KiB, bf16 300.0 KiB, fp16 300.0 KiB per token of context"
    assert main(["model", "info", str(FIXTURE)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["heads"] == "2 (head size 4)" and lines["vocab"] == "37"
    assert lines["params"] == "2,184 (2.2K); without the tied token embedding 1,888 (1.9K)"
    assert lines["kv"] == "cache   fp32 128 B, bf16 64 B, fp16 64 B per token of context"
    assert main(["model", "info", str(FIXTURE), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache_bytes_per_token"] == {"fp32": 128, "bf16": 64, "fp16": 64}
    assert info["params_without_token_embedding"] == info["params"] - 37 * 8 == 1888


def test_model_convert_writes_the_dtype_asked_and_the_tokenizer(tmp_path, capsys):
    import torch
    from safetensors import safe_open

    from gpt2kit.cli import main
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    source = tmp_path / "source"
    GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, n_ctx=8)).save_pretrained(str(source), Tokenizer.gpt2())
    assert main(["model", "convert", str(source), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.endswith("(bf16), with tokenizer files\n")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    copied = Tokenizer.from_pretrained(tmp_path / "out")
    assert copied.encode("Hello world") == Tokenizer.gpt2().encode("Hello world")
