"""Weights in and out: HF folders both ways, OpenAI's TF checkpoint, resolution, bad input."""
from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.weights import WeightsError, crc32c, read_tf_checkpoint, resolve

FIXTURE = Path(__file__).parent / "fixtures" / "openai-tiny"
CFG = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_ctx=16)


def hf_model(cfg: GPT2Config = CFG, seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                     vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones test the layout better
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def ids(vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours: GPT2, hf: transformers.GPT2LMHeadModel, vocab: int = 50) -> None:
    x = ids(vocab)
    with torch.no_grad():
        diff = (ours.eval()(x).float() - hf(x).logits).abs().max()
    assert diff <= 1e-5


def test_hf_save_then_our_load_safetensors_and_bin(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors").exists()
    assert_same_logits(GPT2.from_pretrained(str(tmp_path / "st")), hf)
    # pytorch_model.bin as older transformers wrote it (hub layout: no prefix, mask buffers)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    torch.save(sd, folder / "pytorch_model.bin")
    model = GPT2.from_pretrained(str(folder))
    assert_same_logits(model, hf)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


def test_our_save_then_transformers_load(tmp_path):
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(3)
    ours = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50257, n_ctx=16,
                           padded_vocab_multiple=64)).eval()
    tok = Tokenizer.gpt2()
    ours.save_pretrained(str(tmp_path), tokenizer=tok)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.transformer.wte.weight.shape == (50257, 16)  # padding rows are not saved
    assert_same_logits(ours, hf, vocab=50257)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, it's GPT-2!"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    # and back: our load of our save is exact
    again = GPT2.from_pretrained(str(tmp_path))
    assert not again.training  # as transformers returns it: released configs carry dropout 0.1
    x = ids(50257)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), rtol=0, atol=0)


def test_saved_config_names_the_tokenizers_end_of_text_id(tmp_path):
    from gpt2kit.bpe_train import train_bpe

    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    tok = train_bpe([corpus], vocab_size=300, workers=1)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.n_vocab, n_ctx=16))
    model.save_pretrained(tmp_path / "small", tokenizer=tok)
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == tok.eot_token < tok.n_vocab
    model.save_pretrained(tmp_path / "bare")  # no tokenizer: GPT-2's convention, the last id
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["eos_token_id"] == tok.n_vocab - 1
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "small")
    assert hf.generation_config.eos_token_id == tok.eot_token


def test_dtypes_and_padded_vocab_on_load(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ref = GPT2.from_pretrained(str(tmp_path)).eval()
    padded = GPT2.from_pretrained(str(tmp_path), padded_vocab_multiple=64).eval()
    assert padded.transformer.wte.weight.shape == (64, 16)
    bf16 = GPT2.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(padded(x), ref(x), rtol=0, atol=1e-6)
        out = bf16(x)
        assert out.dtype == torch.bfloat16
        cache = bf16.new_kv_cache(2)
        assert cache.k.dtype == torch.float32  # a bf16 model on CPU keeps an fp32 cache (see new_kv_cache)
        assert (out.float() - ref(x)).abs().max() < 0.05
        step = torch.cat([bf16(x[:, :5], kv_cache=cache), bf16(x[:, 5:], kv_cache=cache)], 1)
        assert (step.float() - ref(x)).abs().max() < 0.05


def test_dtype_auto_keeps_the_stored_one_and_names_are_accepted(tmp_path):
    from gpt2kit.generate import load_for_inference
    from gpt2kit.tokenizer import Tokenizer

    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_ctx=16)).to(torch.bfloat16).save_pretrained(
        str(tmp_path), tokenizer=Tokenizer.gpt2())
    assert GPT2.from_pretrained(str(tmp_path)).transformer.wte.weight.dtype == torch.float32  # as transformers 4
    assert GPT2.from_pretrained(str(tmp_path), dtype="auto").transformer.wte.weight.dtype == torch.bfloat16
    # config.json says what the weights hold, for transformers' torch_dtype="auto"
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.bfloat16
    assert GPT2.from_pretrained(str(tmp_path), dtype="float16").transformer.wte.weight.dtype == torch.float16
    # `gpt2kit generate/serve --dtype`: "default: as stored"
    assert load_for_inference(str(tmp_path))[0].transformer.wte.weight.dtype == torch.bfloat16
    assert load_for_inference(str(tmp_path), dtype="float32")[0].transformer.wte.weight.dtype == torch.float32
    # ...except float16 on a CPU, which has no float16 arithmetic (several times slower than float32)
    GPT2.from_pretrained(str(tmp_path), dtype="float16").save_pretrained(str(tmp_path / "fp16"), Tokenizer.gpt2())
    assert load_for_inference(str(tmp_path / "fp16"))[0].transformer.wte.weight.dtype == torch.float32
    assert load_for_inference(str(tmp_path / "fp16"), dtype="float16")[0].transformer.wte.weight.dtype == torch.float16
    fixture = Path(__file__).parent / "fixtures" / "openai-tiny"  # a TF checkpoint stores float32
    assert GPT2.from_pretrained(str(fixture), dtype="auto").transformer.wte.weight.dtype == torch.float32
    for bad in ("bf16", "int8", torch.int8, 3):
        with pytest.raises(WeightsError, match=r"dtype .*: expected float32, bfloat16, float16 or auto"):
            GPT2.from_pretrained(str(tmp_path), dtype=bad)
    # transformers 4's spelling, torch_dtype, is taken; an argument that is no field is named as such
    assert GPT2.from_pretrained(str(tmp_path), torch_dtype="auto").transformer.wte.weight.dtype == torch.bfloat16
    assert GPT2.from_pretrained(str(tmp_path), torch_dtype=torch.float16).transformer.wte.weight.dtype == torch.float16
    with pytest.raises(WeightsError, match="^from_pretrained: dtype and torch_dtype given both; pass dtype alone$"):
        GPT2.from_pretrained(str(tmp_path), dtype="float32", torch_dtype=torch.float16)
    with pytest.raises(WeightsError, match=r"^from_pretrained: unexpected argument\(s\) n_layers, revision; it takes "
                                           r"dtype, device and GPT2Config fields \(n_layer, n_head, "):
        GPT2.from_pretrained(str(tmp_path), n_layers=2, revision="main")
    assert GPT2.from_pretrained(str(tmp_path), dropout=0.25).config.dropout == 0.25
    assert GPT2.from_pretrained(str(tmp_path), dtype="float16", torch_dtype=None).transformer.wte.weight.dtype == \
        torch.float16
    for folder in (tmp_path, fixture):  # a bad value passed is not the file's fault
        with pytest.raises(WeightsError, match=r"^from_pretrained: GPT2Config.n_layer: expected a positive integer"):
            GPT2.from_pretrained(str(folder), n_layer="x")


def test_openai_tf_checkpoint_fixture():
    # Our TensorFlow-free reader returns exactly what TensorFlow stored (scripts/make_tf_fixture.py).
    tensors = read_tf_checkpoint(FIXTURE / "model.ckpt")
    ref = np.load(FIXTURE / "reference.npz")
    assert sorted(k.replace("/", ".") for k in tensors) == sorted(ref.files)
    for name, array in tensors.items():
        np.testing.assert_array_equal(array, ref[name.replace("/", ".")])
    # The same weights in transformers, built from the reference values independently of gpt2kit.
    h = json.loads((FIXTURE / "hparams.json").read_text())
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=h["n_layer"], n_head=h["n_head"], n_embd=h["n_embd"], vocab_size=h["n_vocab"],
        n_positions=h["n_ctx"])).eval()
    sd = {}
    for key in ref.files:
        parts = key.split(".")[1:]  # model.h0.attn.c_attn.w -> [h0, attn, c_attn, w]
        if parts[0].startswith("h") and parts[0][1:].isdigit():
            parts = ["h", parts[0][1:]] + parts[1:]
        leaf = {"g": "weight", "w": "weight", "b": "bias"}.get(parts[-1])
        name = "transformer." + ".".join(parts[:-1] + [leaf] if leaf else parts + ["weight"])
        value = torch.from_numpy(ref[key])
        sd[name] = value[0] if value.ndim == 3 else value
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    ours = GPT2.from_pretrained(str(FIXTURE))
    assert ours.config == GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=37, n_ctx=16)
    assert_same_logits(ours, hf, vocab=37)


def _crc32c_bitwise(data: bytes) -> int:
    """CRC32C bit by bit, as its definition reads."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 64, 1000, 4099):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc32c_bitwise(data)
        assert crc32c(data) != zlib.crc32(data) or n == 0


def test_resolution_hf_cache_and_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    downloads = []  # offline means no hub request at all, not one that fails
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: downloads.append(repo))
    with pytest.raises(WeightsError) as e:
        GPT2.from_pretrained("gpt2-medium")
    assert downloads == []
    msg = str(e.value)
    assert "config.json and model.safetensors" in msg and "https://huggingface.co/openai-community/gpt2-medium" in msg
    assert str(tmp_path / "hub" / "models--openai-community--gpt2-medium" / "snapshots") in msg
    assert "hparams.json, model.ckpt.index, model.ckpt.data-00000-of-00001" in msg
    hf = hf_model()
    # the legacy cache name (models--gpt2), with refs/main naming the snapshot
    base = tmp_path / "hub" / "models--gpt2"
    hf.save_pretrained(base / "snapshots" / "abc123")
    (base / "snapshots" / "old").mkdir()
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("abc123")
    assert resolve("gpt2") == base / "snapshots" / "abc123"
    assert_same_logits(GPT2.from_pretrained("gpt2"), hf)
    # the current name wins when both are there
    hf.save_pretrained(tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "def")
    assert resolve("openai-community/gpt2").parent.parent.name == "models--openai-community--gpt2"
    assert resolve("gpt2").parent.parent.name == "models--openai-community--gpt2"
    with pytest.raises(WeightsError, match="no such folder"):
        GPT2.from_pretrained(str(tmp_path / "nowhere" / "x"))
    with pytest.raises(WeightsError, match="no model here: expected config.json"):
        GPT2.from_pretrained(str(tmp_path))
    # a training run's out_dir holds its models under best/ and latest/
    hf.save_pretrained(tmp_path / "run" / "best")
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(tmp_path / 'run'))}: a training run's folder, not a "
                                           rf"model: load {re.escape(str(tmp_path / 'run' / 'best'))}$"):
        GPT2.from_pretrained(str(tmp_path / "run"))
    # a relative path that is not there is a missing folder, not a hub name
    monkeypatch.chdir(tmp_path)
    for missing in ("runs/demo/model", "./model", "../model"):
        with pytest.raises(WeightsError, match=rf"^{re.escape(missing)}: no such folder$"):
            GPT2.from_pretrained(missing)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"weights.safetensors: expected a model folder .*, got a file$"):
        GPT2.from_pretrained(str(tmp_path / "weights.safetensors"))


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "m"
    hf_model().save_pretrained(folder)
    return folder


def rewrite_tensors(folder: Path, change) -> None:
    sd = load_file(folder / "model.safetensors")
    change(sd)
    save_file(sd, folder / "model.safetensors")


def test_bad_hf_weights_name_file_and_tensor(hf_folder):
    st = hf_folder / "model.safetensors"
    data = st.read_bytes()

    def load():
        return GPT2.from_pretrained(str(hf_folder))

    st.write_bytes(data[:-200])
    with pytest.raises(WeightsError, match=r"model.safetensors: not a valid safetensors file \(truncated"):
        load()
    st.write_bytes(data)
    rewrite_tensors(hf_folder, lambda sd: sd.update({"transformer.h.1.mlp.c_fc.weight": torch.zeros(16, 63)}))
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'transformer.h.1.mlp.c_fc.weight' has "
                                           r"shape \(16, 63\), expected \(16, 64\) from .*config.json"):
        load()
    st.write_bytes(data)
    rewrite_tensors(hf_folder, lambda sd: sd.pop("transformer.h.0.ln_2.bias"))
    with pytest.raises(WeightsError, match=r"model.safetensors: missing tensor 'transformer.h.0.ln_2.bias' \(shape \(16,\)\)"):
        load()
    st.write_bytes(data)
    rewrite_tensors(hf_folder, lambda sd: sd.update({"transformer.h.0.attn.q_proj.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"model.safetensors: unexpected tensor 'transformer.h.0.attn.q_proj.weight'"):
        load()
    st.write_bytes(data)
    rewrite_tensors(hf_folder, lambda sd: sd.update({"lm_head.weight": torch.zeros(50, 16)}))
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor 'lm_head.weight' differs from 'transformer.wte.weight'"):
        load()
    st.write_bytes(data)
    cfg_path = hf_folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(WeightsError, match=r"model.safetensors: missing tensor 'transformer.h.2.ln_1.weight'"):
        load()
    cfg_path.write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'transformer.h.1\.\S+' for the model described by .*config.json \(n_layer=1\)"):
        load()
    cfg_path.write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(WeightsError, match=r"tensor 'transformer.wte.weight' has shape \(50, 16\), expected \(50, 32\)"):
        load()
    cfg_path.write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(WeightsError, match=r"config.json: activation_function='relu' is not supported"):
        load()
    cfg_path.write_text(json.dumps({**cfg, "n_head": 3}))
    with pytest.raises(WeightsError, match=r"config.json: GPT2Config.n_embd: 16 is not divisible by n_head=3"):
        load()
    cfg_path.write_text("{not json")
    with pytest.raises(WeightsError, match=r"config.json: not valid JSON"):
        load()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_pytorch_bin_is_never_unpickled(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    binf = hf_folder / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(1), "evil": Evil()}, binf)
    with pytest.raises(WeightsError, match=r"pytorch_model.bin: refused: holds objects other than tensors.*weights_only=True"):
        GPT2.from_pretrained(str(hf_folder))
    binf.write_bytes(b"neither a zip archive nor a pickle")
    with pytest.raises(WeightsError, match=r"pytorch_model.bin: "):
        GPT2.from_pretrained(str(hf_folder))
    torch.save({"transformer.wte.weight": torch.zeros(3)}, binf)
    data = binf.read_bytes()
    binf.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"pytorch_model.bin: not a readable PyTorch weights file \(truncated or corrupt"):
        GPT2.from_pretrained(str(hf_folder))


def test_bad_tf_checkpoint_names_file_and_tensor(tmp_path):
    folder = tmp_path / "openai"
    folder.mkdir()
    for f in FIXTURE.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data_file = folder / "model.ckpt.data-00000-of-00001"
    index = folder / "model.ckpt.index"
    data, idx = data_file.read_bytes(), index.read_bytes()
    entries = read_tf_checkpoint(folder / "model.ckpt")
    assert GPT2.from_pretrained(str(folder)).config.n_embd == 8

    data_file.write_bytes(data[:-100])
    with pytest.raises(WeightsError, match=r"model.ckpt.data-00000-of-00001: tensor 'model/\S+' needs bytes \d+\.\.\d+ but the file has \d+ \(truncated\)"):
        GPT2.from_pretrained(str(folder))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    data_file.write_bytes(bytes(flipped))
    with pytest.raises(WeightsError, match=r"model.ckpt.data-00000-of-00001: tensor 'model/\S+' fails its CRC32C check \(corrupt\)"):
        GPT2.from_pretrained(str(folder))
    data_file.unlink()
    with pytest.raises(WeightsError, match=r"model.ckpt.data-00000-of-00001: no such file \(named by .*model.ckpt.index\)"):
        GPT2.from_pretrained(str(folder))
    data_file.write_bytes(data)

    index.write_bytes(idx[:-10])
    with pytest.raises(WeightsError, match=r"model.ckpt.index: not a valid TensorFlow checkpoint index: no SSTable magic"):
        GPT2.from_pretrained(str(folder))
    broken = bytearray(idx)
    broken[30] ^= 0xFF  # inside the first data block
    index.write_bytes(bytes(broken))
    with pytest.raises(WeightsError, match=r"model.ckpt.index: not a valid TensorFlow checkpoint index: block at offset 0 fails its CRC32C"):
        GPT2.from_pretrained(str(folder))
    index.write_bytes(idx)

    hp = folder / "hparams.json"
    h = json.loads(hp.read_text())
    hp.write_text(json.dumps({**h, "n_embd": 12}))
    with pytest.raises(WeightsError, match=r"model.ckpt.index \(model/wte\): tensor 'transformer.wte.weight' has shape \(37, 8\), expected \(37, 12\) from .*hparams.json"):
        GPT2.from_pretrained(str(folder))
    hp.write_text(json.dumps({**h, "n_layer": 3}))
    with pytest.raises(WeightsError, match=r"model.ckpt.index \(model/h2/ln_1/g\): missing tensor 'transformer.h.2.ln_1.weight'"):
        GPT2.from_pretrained(str(folder))
    hp.write_text(json.dumps({k: v for k, v in h.items() if k != "n_ctx"}))
    with pytest.raises(WeightsError, match=r"hparams.json: missing key 'n_ctx'"):
        GPT2.from_pretrained(str(folder))
    assert len(entries) == 28


def test_hub_download_when_online(tmp_path, monkeypatch):
    import huggingface_hub

    served = tmp_path / "served"
    hf = hf_model()
    hf.save_pretrained(served)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(served)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_same_logits(GPT2.from_pretrained("gpt2-large"), hf)
    repo, patterns = calls[0]
    assert repo == "openai-community/gpt2-large"
    assert "model.safetensors" in patterns and "config.json" in patterns and "*.bin" not in patterns


def test_hub_download_of_sharded_and_bin_only_repos(tmp_path, monkeypatch):
    # a fake hub that applies the patterns to a repo's files, as snapshot_download does
    import fnmatch
    import shutil

    import huggingface_hub

    hf = hf_model()
    repos = {"sharded": tmp_path / "sharded", "binonly": tmp_path / "binonly"}
    hf.save_pretrained(repos["sharded"], max_shard_size="10KB")
    assert (repos["sharded"] / "model.safetensors.index.json").exists()
    repos["binonly"].mkdir()  # as older transformers saved: config.json and pytorch_model.bin only
    (repos["binonly"] / "config.json").write_text((repos["sharded"] / "config.json").read_text())
    torch.save(hf.state_dict(), repos["binonly"] / "pytorch_model.bin")

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        src = repos[repo_id.split("/")[-1]]
        dst = tmp_path / "downloads" / repo_id.replace("/", "--")
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, dst / f.name)
        return str(dst)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for repo in ("someone/sharded", "someone/binonly"):
        assert_same_logits(GPT2.from_pretrained(repo), hf)
    # the .bin-only repo's safetensors round found nothing: never both kinds of weights
    assert not list((tmp_path / "downloads" / "someone--sharded").glob("*.bin"))


def test_saving_over_an_earlier_save_leaves_no_stale_weights(tmp_path, monkeypatch):
    from gpt2kit.tokenizer import Tokenizer

    old = hf_model(seed=0)
    old.save_pretrained(tmp_path, max_shard_size="10KB")  # index + shards
    (tmp_path / "pytorch_model.bin").write_bytes(b"an older save's weights")
    (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": {"x": "pytorch_model-00001-of-00002.bin"}}')
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"an older save's shard")
    torch.manual_seed(5)
    new = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50257, n_ctx=16)).eval()
    new.save_pretrained(tmp_path, tokenizer=Tokenizer.gpt2())
    assert sorted(p.name for p in tmp_path.glob("*model*")) == ["model.safetensors"]
    x = ids(50257)
    with torch.no_grad():
        torch.testing.assert_close(GPT2.from_pretrained(str(tmp_path))(x), new(x), rtol=0, atol=0)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert (hf(x).logits - new(x)).abs().max() <= 1e-5
    # the tokenizer's context is the model's: AutoTokenizer truncates to 16, not 1024
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).model_max_length == 16
    # a sharded folder reads each shard once, however many tensors it holds
    import gpt2kit.weights

    hf_model(seed=2).save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    read = []
    load = gpt2kit.weights._load_safetensors
    monkeypatch.setattr(gpt2kit.weights, "_load_safetensors", lambda path: read.append(path) or load(path))
    assert_same_logits(GPT2.from_pretrained(str(tmp_path / "sharded")), hf_model(seed=2))
    assert len(shards) > 1 and sorted(read) == shards
    # a folder with both a single file and shards reads the single file, as transformers does
    hf_model(seed=0).save_pretrained(tmp_path / "both", max_shard_size="10KB")
    hf_model(seed=1).save_pretrained(tmp_path / "single")
    (tmp_path / "both" / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
    assert_same_logits(GPT2.from_pretrained(str(tmp_path / "both")), hf_model(seed=1))


def test_bad_configs_and_mismatched_tokenizers_name_the_file(tmp_path):
    from gpt2kit.tokenizer import Tokenizer
    from gpt2kit.weights import config_of

    hf_model().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value in (("resid_pdrop", None), ("layer_norm_epsilon", "x")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(WeightsError, match=rf"config.json: {key} must be a number, got {value!r}"):
            GPT2.from_pretrained(str(tmp_path / "m"))
    tf = tmp_path / "tf"
    tf.mkdir()
    for f in FIXTURE.iterdir():
        (tf / f.name).write_bytes(f.read_bytes())
    h = json.loads((tf / "hparams.json").read_text())
    del h["n_layer"]
    (tf / "hparams.json").write_text(json.dumps(h))
    with pytest.raises(WeightsError, match=r"hparams.json: missing key 'n_layer'"):
        config_of(tf)
    with pytest.raises(WeightsError, match=r"the tokenizer has 50257 tokens, more than the model's vocab_size 50"):
        GPT2(CFG).save_pretrained(tmp_path / "mismatch", tokenizer=Tokenizer.gpt2())
    assert not (tmp_path / "mismatch").exists()


def test_layer_norm_epsilon_and_dropout_travel_with_the_config(tmp_path):
    # an epsilon far from the default changes every LayerNorm: lost on the way out or in, the
    # logits move (std 0.02 embeddings have a variance well below 0.05)
    torch.manual_seed(0)
    ours = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_ctx=16, layer_norm_epsilon=0.05)).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert hf.config.layer_norm_epsilon == 0.05
    assert_same_logits(ours, hf)
    assert GPT2.from_pretrained(str(tmp_path / "ours")).config.layer_norm_epsilon == 0.05
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, layer_norm_epsilon=0.05,
        resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = GPT2.from_pretrained(str(tmp_path / "theirs"))
    assert (loaded.config.layer_norm_epsilon, loaded.config.dropout) == (0.05, 0.3)
    assert_same_logits(loaded, theirs)
    # transformers sizes the position table by n_positions; an n_ctx beside it (older configs) is stale
    config = tmp_path / "theirs" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "n_ctx": 1024}))
    assert GPT2.from_pretrained(str(tmp_path / "theirs")).config.n_ctx == 16


def test_causal_mask_buffers_of_older_saves_are_skipped(tmp_path):
    # transformers 2.x-4.2x saved each layer's causal mask (attn.bias) and attn.masked_bias, with the
    # `transformer.` prefix from GPT2LMHeadModel and without it from GPT2Model; transformers still
    # loads such files, ignoring both
    hf = hf_model()
    mask = torch.tril(torch.ones(1, 1, 16, 16, dtype=torch.bool))
    for name, prefix in (("prefixed", "transformer."), ("bare", "")):
        folder = tmp_path / name
        hf.save_pretrained(folder)

        def add_buffers(sd, prefix=prefix):
            if not prefix:
                for k in list(sd):
                    sd[k.removeprefix("transformer.")] = sd.pop(k)
            for i in range(CFG.n_layer):
                sd[f"{prefix}h.{i}.attn.bias"] = mask.clone()
                sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        rewrite_tensors(folder, add_buffers)
        with torch.no_grad():
            theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()(ids()).logits
            assert torch.equal(theirs, hf(ids()).logits)
        assert_same_logits(GPT2.from_pretrained(str(folder)), hf)


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                        ("tie_word_embeddings", False), ("n_inner", 32), ("add_cross_attention", True),
                                        ("activation_function", "gelu")])
def test_gpt2_variants_this_model_does_not_implement_are_refused(tmp_path, key, value):
    # transformers builds and saves each of these; the first two have GPT-2's tensors and shapes,
    # so only the config tells that their attention is not GPT-2's
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, **{key: value})
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[key] == value
    with pytest.raises(WeightsError, match=rf"config.json: {key}={value!r} is not supported \(expected one of "):
        GPT2.from_pretrained(str(tmp_path))


def test_explicit_gpt2_settings_load_and_other_model_types_are_refused(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, n_inner=64,
        activation_function="gelu_pytorch_tanh")).eval()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_inner"] == 64
    assert_same_logits(GPT2.from_pretrained(str(tmp_path)), hf)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt_neox"}))
    with pytest.raises(WeightsError, match=r"config.json: model_type is 'gpt_neox', expected 'gpt2'$"):
        GPT2.from_pretrained(str(tmp_path))


def test_refs_main_picks_the_snapshot_not_the_newest_folder(tmp_path, monkeypatch):
    # as huggingface_hub resolves a name offline: the revision refs/main names, even if an older
    # (or another branch's) snapshot folder was written later
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    base = tmp_path / "hub" / "models--someone--tiny"
    hf_model(seed=0).save_pretrained(base / "snapshots" / "main-rev")
    hf_model(seed=1).save_pretrained(base / "snapshots" / "other-rev")
    os.utime(base / "snapshots" / "main-rev", (1_000_000, 1_000_000))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("main-rev\n")
    assert resolve("someone/tiny") == base / "snapshots" / "main-rev"
    assert_same_logits(GPT2.from_pretrained("someone/tiny"), hf_model(seed=0))


def test_safetensors_win_over_a_bin_in_the_same_folder_as_in_transformers(tmp_path):
    hf_model(seed=0).save_pretrained(tmp_path)
    torch.save(hf_model(seed=1).state_dict(), tmp_path / "pytorch_model.bin")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_logits(GPT2.from_pretrained(str(tmp_path)), theirs)
    assert_same_logits(GPT2.from_pretrained(str(tmp_path)), hf_model(seed=0))


def test_a_failed_save_leaves_the_earlier_weights_whole(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(0)
    GPT2(CFG).save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # what a writer leaves when the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        GPT2(CFG).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# A tensor bundle written by hand from the formats' specifications (LevelDB's table format,
# tensorflow/core/protobuf/tensor_bundle.proto), for what the TensorFlow-made fixture cannot show:
# other dtypes, bad entries, big-endian headers, sliced tensors.

def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: int | bytes) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")  # one restart, at 0


def write_bundle(prefix: Path, arrays: dict[str, np.ndarray], *, dtypes: dict | None = None, header_extra: bytes = b"",
                 entry_extra: dict[str, bytes] | None = None, size_delta: dict[str, int] | None = None) -> None:
    tf_dtype = {np.float32: 1, np.float64: 2, np.int32: 3, np.int64: 9, np.float16: 19}
    data, entries = b"", [(b"", _field(1, 1) + header_extra)]
    for name in sorted(arrays):
        raw = np.ascontiguousarray(arrays[name]).astype(arrays[name].dtype.newbyteorder("<")).tobytes()
        shape = b"".join(_field(2, _field(1, d)) for d in arrays[name].shape)
        value = (_field(1, (dtypes or {}).get(name, tf_dtype[arrays[name].dtype.type])) + _field(2, shape)
                 + _field(4, len(data)) + _field(5, len(raw) + (size_delta or {}).get(name, 0))
                 + b"\x35" + _masked(_crc32c_bitwise(raw)).to_bytes(4, "little") + (entry_extra or {}).get(name, b""))
        entries.append((name.encode(), value))
        data += raw
    table = bytearray()

    def put(block: bytes) -> bytes:
        handle = _varint(len(table)) + _varint(len(block))
        table.extend(block + b"\x00" + _masked(_crc32c_bitwise(block + b"\x00")).to_bytes(4, "little"))
        return handle

    data_handle = put(_block(entries))
    meta_handle = put(_block([]))
    index_handle = put(_block([(entries[-1][0], data_handle)]))
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + (0xDB4775248B80FB57).to_bytes(8, "little")
    Path(f"{prefix}.index").write_bytes(bytes(table) + footer)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)


def test_tf_checkpoints_of_every_stored_dtype_read_as_stored(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a/f32": rng.standard_normal((3, 4)).astype(np.float32), "b/f64": rng.standard_normal(5),
              "c/f16": rng.standard_normal((2, 2)).astype(np.float16), "d/i32": np.arange(-3, 3, dtype=np.int32),
              "e/i64": np.array([2**40, -7], dtype=np.int64), "f/scalar": np.float32(1.5).reshape(())}
    # fields a newer TensorFlow might add (numbers unknown here, fixed64 and fixed32) are skipped
    unknown = b"\x79" + (2**63 + 5).to_bytes(8, "little") + b"\x85\x01" + (7).to_bytes(4, "little")
    write_bundle(tmp_path / "model.ckpt", arrays, entry_extra={name: unknown for name in arrays})
    back = read_tf_checkpoint(tmp_path / "model.ckpt")
    assert sorted(back) == sorted(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)
    # and the fixture's GPT-2, rewritten by hand, loads as TensorFlow's file does
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "hparams.json").write_bytes((FIXTURE / "hparams.json").read_bytes())
    ref = np.load(FIXTURE / "reference.npz")
    write_bundle(folder / "model.ckpt", {k.replace(".", "/"): ref[k] for k in ref.files})
    x = ids(37)
    with torch.no_grad():
        assert torch.equal(GPT2.from_pretrained(str(folder))(x), GPT2.from_pretrained(str(FIXTURE))(x))


def test_bad_tf_bundle_entries_are_named(tmp_path):
    prefix = tmp_path / "model.ckpt"
    arrays = {"model/wte": np.ones((4, 2), dtype=np.float32)}
    write_bundle(prefix, arrays, size_delta={"model/wte": -4})
    with pytest.raises(WeightsError, match=r"model.ckpt.index: tensor 'model/wte' has 28 bytes, shape \[4, 2\] needs 32$"):
        read_tf_checkpoint(prefix)
    write_bundle(prefix, arrays, dtypes={"model/wte": 2})  # float64 in the entry: 64 bytes needed
    with pytest.raises(WeightsError, match=r"tensor 'model/wte' has 32 bytes, shape \[4, 2\] needs 64$"):
        read_tf_checkpoint(prefix)
    write_bundle(prefix, arrays, dtypes={"model/wte": 7})  # DT_STRING
    with pytest.raises(WeightsError, match=r"tensor 'model/wte' has TensorFlow dtype 7, expected float32/16/64 or int32/64"):
        read_tf_checkpoint(prefix)
    write_bundle(prefix, arrays, header_extra=_field(2, 1))  # endianness = BIG
    with pytest.raises(WeightsError, match=r"model.ckpt.index: big-endian checkpoints are not supported$"):
        read_tf_checkpoint(prefix)
    write_bundle(prefix, arrays, entry_extra={"model/wte": _field(7, _field(1, _field(1, 0) + _field(2, 2)))})
    with pytest.raises(WeightsError, match=r"tensor 'model/wte' is partitioned into slices; not supported"):
        read_tf_checkpoint(prefix)


def test_a_tf_checkpoint_with_a_variable_gpt2_lacks_is_refused(tmp_path):
    ref = np.load(FIXTURE / "reference.npz")
    (tmp_path / "hparams.json").write_bytes((FIXTURE / "hparams.json").read_bytes())
    arrays = {k.replace(".", "/"): ref[k] for k in ref.files} | {"model/h0/attn/c_attn/w/Adam": ref["model.h0.attn.c_attn.w"]}
    write_bundle(tmp_path / "model.ckpt", arrays)
    with pytest.raises(WeightsError, match=r"model.ckpt.index: unexpected tensor 'model/h0/attn/c_attn/w/Adam' \(not a GPT-2 variable\)"):
        GPT2.from_pretrained(str(tmp_path))


def test_a_sharded_index_without_a_weight_map_is_named(hf_folder):
    (hf_folder / "model.safetensors").rename(hf_folder / "model-00001-of-00001.safetensors")
    (hf_folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(WeightsError, match=r"model.safetensors.index.json: expected a 'weight_map' object$"):
        GPT2.from_pretrained(str(hf_folder))


def test_a_bin_holding_a_training_checkpoint_is_named(hf_folder):
    # {"model": state_dict, "step": ...}: loads with weights_only=True, but is not a state dict
    (hf_folder / "model.safetensors").unlink()
    torch.save({"model": hf_model().state_dict(), "step": 100}, hf_folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pytorch_model.bin: expected a dict of tensor names to tensors$"):
        GPT2.from_pretrained(str(hf_folder))


def test_devices_a_machine_lacks_are_refused_before_reading_weights(hf_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WeightsError, match=r"^device 'cuda': CUDA is not available \(no GPU, or a CPU-only torch build\)$"):
        GPT2.from_pretrained(str(hf_folder), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(WeightsError, match=r"^device 'cuda:2': this machine has 2 CUDA device\(s\)$"):
        GPT2.from_pretrained(str(hf_folder), device="cuda:2")
    with pytest.raises(WeightsError, match=r"^device 'gpu': expected cpu, cuda or cuda:N$"):
        GPT2.from_pretrained(str(hf_folder), device="gpu")
    for other in ("meta", "mps", torch.device("meta")):  # torch knows them; gpt2kit does not run there
        with pytest.raises(WeightsError, match=r"^device .*: expected cpu, cuda or cuda:N$"):
            GPT2.from_pretrained(str(hf_folder), device=other)


def test_config_of_a_preset_name_needs_no_files(tmp_path, monkeypatch):
    from gpt2kit.model import PRESETS
    from gpt2kit.weights import config_of

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert config_of("tiny") == PRESETS["tiny"]
    assert config_of("gpt2-medium").n_layer == 24  # the released sizes are presets too
    with pytest.raises(WeightsError, match=r"^not a preset \(.*tiny.*\) nor a readable model: "):
        config_of("tiny-typo")
