"""`gpt2kit generate` end to end, on a tiny random checkpoint saved with save_pretrained."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from gpt2kit.cli import main
from gpt2kit.generate import generate, quantize_int8
from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_ctx=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    tok = Tokenizer.gpt2()
    model.save_pretrained(str(folder), tok)
    return folder, model, tok


def test_stream_and_json_agree(cli, checkpoint, capsys):
    folder, model, tok = checkpoint
    args = ["generate", "--model", str(folder), "The sea", "--max-new-tokens", "15", "--seed", "5", "--num-samples", "2"]
    streamed = cli(*args)
    assert streamed.returncode == 0, streamed.stderr
    want = generate(model, tok, "The sea", max_new_tokens=15, seed=5, n=2, preset="paper")
    assert streamed.stdout == "".join(f"{'=' * 20} SAMPLE {i + 1} of 2 {'=' * 20}\n{c.text}\n" for i, c in enumerate(want))
    assert main([*args, "--json"]) == 0  # in-process: one torch start-up per test is enough
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == [c.text for c in want]
    assert [r["token_ids"] for r in rows] == [c.token_ids for c in want]
    assert rows[0]["prompt"] == "The sea" and rows[0]["finish_reason"] == "length"


def test_stdin_prompt_interactive_and_errors(cli, checkpoint, capsys, monkeypatch):
    folder, model, tok = checkpoint
    greedy = ["--greedy", "--max-new-tokens", "8"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("From stdin"))
    assert main(["generate", "--model", str(folder), "-", *greedy, "--quantize", "int8", "--no-stream"]) == 0
    want = generate(quantize_int8(model), tok, "From stdin", max_new_tokens=8, do_sample=False)[0].text
    assert capsys.readouterr().out == want + "\n"
    r = cli("generate", "--model", str(folder), "--interactive", *greedy, "--stop", "\n", input="first\nsecond\n")
    assert r.returncode == 0, r.stderr
    want = [generate(model, tok, p, max_new_tokens=8, do_sample=False, stop="\n")[0].text for p in ("first", "second")]
    assert r.stdout == "".join(w + "\n" for w in want)
    assert main(["generate", "--model", str(folder), "x", "--top-p", "2"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: top_p: expected a number in (0, 1] (or None), got 2.0\n"
    # text that is not UTF-8 is named by its byte, from stdin whole or line by line (where the
    # session goes on with the next line)
    r = cli("generate", "--model", str(folder), "-", *greedy, input=b"ok\n\xff bad\n")
    assert r.returncode == 2 and r.stderr == b"gpt2kit: error: <stdin>: not valid UTF-8 at byte offset 3 (byte 0xff)\n"
    r = cli("generate", "--model", str(folder), "--interactive", *greedy, "--stop", "\n", input=b"first\n\xff\nsecond\n")
    assert r.returncode == 0 and r.stderr == b"gpt2kit: error: <stdin>: not valid UTF-8 at byte offset 6 (byte 0xff)\n"
    assert r.stdout.decode() == "".join(w + "\n" for w in want)
    assert main(["generate", "--model", str(folder), "x", "--device", "bogus"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: device 'bogus': expected cpu, cuda or cuda:N\n"
    assert main(["generate", "--model", str(folder), "x", "--device", "meta"]) == 2  # (was a traceback)
    assert capsys.readouterr().err == "gpt2kit: error: device 'meta': expected cpu, cuda or cuda:N\n"
    assert main(["generate", "--model", str(folder), "x", "--device", "cuda:99"]) == 2  # no machine has that many
    assert capsys.readouterr().err.startswith("gpt2kit: error: device 'cuda:99': ")
    assert main(["generate", "--model", str(folder), "x", "--seed", str(2**70)]) == 2
    assert capsys.readouterr().err.startswith("gpt2kit: error: seed: expected an integer in [-2**63, 2**64)")


def test_sampling_options_with_greedy_are_refused_not_ignored(checkpoint, capsys):
    # greedy decoding never reads them: `--greedy --temperature 0.7` would print the greedy text
    folder, _, _ = checkpoint
    for args, flags in ((["--greedy", "--temperature", "0.7"], "--temperature"),
                        (["--preset", "greedy", "--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p"),
                        (["--temperature", "0", "--top-k", "5"], "--top-k"),
                        (["--greedy", "--min-p", "0.1"], "--min-p")):
        assert main(["generate", "--model", str(folder), "x", *args]) == 2
        assert capsys.readouterr().err == f"gpt2kit: error: {flags}: no effect with greedy decoding (--greedy, " \
                                          f"--preset greedy or --temperature 0); drop them, or sample\n"
    assert main(["generate", "--model", str(folder), "x", "--greedy", "--temperature", "0", "--max-new-tokens", "2",
                 "--repetition-penalty", "1.2"]) == 0  # the penalty applies to greedy too


def test_openai_penalties_and_logit_bias_from_the_command_line(checkpoint, capsys):
    folder, model, tok = checkpoint
    plain = generate(model, tok, "The sea", max_new_tokens=10, do_sample=False)[0]
    banned = plain.token_ids[0]
    args = ["generate", "--model", str(folder), "The sea", "--greedy", "--max-new-tokens", "10",
            "--frequency-penalty", "1.5", "--presence-penalty", "0.5", "--logit-bias", f"{banned}=-100",
            "--logit-bias", "13=2.5"]
    want = generate(model, tok, "The sea", max_new_tokens=10, do_sample=False, frequency_penalty=1.5,
                    presence_penalty=0.5, logit_bias={banned: -100.0, 13: 2.5})[0]
    assert want.token_ids[0] != banned
    for extra in ([], ["--no-stream"], ["--json"]):  # the streamed path passes the options on too
        assert main([*args, *extra]) == 0
        out = capsys.readouterr().out
        assert (json.loads(out)["token_ids"] == want.token_ids) if extra == ["--json"] else out == want.text + "\n"
    assert main(["generate", "--model", str(folder), "The sea", "--max-new-tokens", "6", "--seed", "4", "--temperature",
                 "1.5", "--min-p", "0.2", "--json"]) == 0
    want = generate(model, tok, "The sea", max_new_tokens=6, seed=4, temperature=1.5, min_p=0.2, preset="paper")[0]
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    for bad, message in (("13", "expected ID=VALUE"), ("x=1", "expected ID=VALUE"), ("13=big", "expected ID=VALUE")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(folder), "x", "--logit-bias", bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "x", "--logit-bias=-3=1"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: logit_bias: token ids must be integers >= 0, got -3\n"
    assert main(["generate", "--model", str(folder), "x", "--logit-bias", "99999=1"]) == 2
    assert "logit_bias: token id 99999 is not in the model's vocabulary" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "x", "--presence-penalty", "nan"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: presence_penalty: expected a number from -1e+06 to 1e+06, got nan\n"
    assert main(["generate", "--model", str(folder), "x", "--logit-bias", "13=1e39"]) == 2  # was a traceback
    assert capsys.readouterr().err.startswith("gpt2kit: error: logit_bias[13]: expected a number from -1e+06")


def test_interactive_checks_the_logit_bias_before_the_first_prompt(cli, checkpoint):
    folder, _, _ = checkpoint
    r = cli("generate", "--model", str(folder), "--interactive", "--logit-bias", "99999=1", input="")
    assert r.returncode == 2 and "logit_bias: token id 99999 is not in the model's vocabulary" in r.stderr
    assert "prompt>" not in r.stderr and r.stdout == ""


def test_a_bad_num_samples_is_named_by_its_flag(checkpoint, capsys):
    folder, _, _ = checkpoint
    for value in ("0", "-1"):
        assert main(["generate", "--model", str(folder), "x", "--num-samples", value]) == 2
        assert capsys.readouterr().err == f"gpt2kit: error: --num-samples: expected an integer >= 1, got {value}\n"
    # one batch: 10^8 samples grew memory silently until the process was killed
    assert main(["generate", "--model", str(folder), "x", "--num-samples", "129"]) == 2
    assert capsys.readouterr().err == ("gpt2kit: error: --num-samples: at most 128 (they decode as one batch), got 129; "
                                       "run it again with another --seed for more\n")


def test_top_k_and_repetition_penalty_reach_the_decoding(checkpoint, capsys):
    # (--top-k overrides the paper preset's 40; the penalty applies to greedy decoding too)
    folder, model, tok = checkpoint
    for flags, options in ((["--top-k", "3", "--temperature", "1.5", "--seed", "5"],
                            dict(top_k=3, temperature=1.5, seed=5, preset="paper")),
                           (["--greedy", "--repetition-penalty", "3.0"], dict(repetition_penalty=3.0, do_sample=False))):
        for extra in ([], ["--json"]):
            assert main(["generate", "--model", str(folder), "The sea", "--max-new-tokens", "10", *flags, *extra]) == 0
            out = capsys.readouterr().out
            want = generate(model, tok, "The sea", max_new_tokens=10, **options)[0]
            assert (json.loads(out)["token_ids"] == want.token_ids) if extra else out == want.text + "\n"
        without = {k: v for k, v in options.items() if k not in ("top_k", "repetition_penalty")}
        assert want.token_ids != generate(model, tok, "The sea", max_new_tokens=10, **without)[0].token_ids


def test_max_new_tokens_interactive_and_the_default_prompt(checkpoint, capsys):
    folder, model, tok = checkpoint
    assert main(["generate", "--model", str(folder), "x", "--max-new-tokens", "-1"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: --max-new-tokens: expected an integer >= 0, got -1\n"
    assert main(["generate", "--model", str(folder), "x", "--max-new-tokens", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out == "\n"  # nothing generated, and no error
    assert main(["generate", "--model", str(folder), "x", "--interactive"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: --interactive reads its prompts from stdin: give no PROMPT argument\n"
    # no PROMPT: an empty document is continued
    assert main(["generate", "--model", str(folder), "--greedy", "--max-new-tokens", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    want = generate(model, tok, "", max_new_tokens=6, do_sample=False)[0]
    assert row["prompt"] == "" and row["token_ids"] == want.token_ids


def test_stop_cuts_each_output_where_its_text_appears(checkpoint, capsys):
    folder, model, tok = checkpoint
    full = generate(model, tok, "The sea", max_new_tokens=12, do_sample=False)[0].text
    stop = full[4:7]
    want = generate(model, tok, "The sea", max_new_tokens=12, do_sample=False, stop=stop)[0]
    assert want.text == full[:full.index(stop)] and want.finish_reason == "stop"
    for extra in ([], ["--no-stream"], ["--json"]):
        assert main(["generate", "--model", str(folder), "The sea", "--greedy", "--max-new-tokens", "12",
                     "--stop", "no such text", "--stop", stop, *extra]) == 0
        out = capsys.readouterr().out
        if extra == ["--json"]:
            row = json.loads(out)
            assert row["text"] == want.text and row["finish_reason"] == "stop"
        else:
            assert out == want.text + "\n"
