"""`gpt2kit tokenizer ...` end to end, as a user runs it."""
from __future__ import annotations

import json

import tiktoken
from tokenizers import Tokenizer as HFTokenizer

from gpt2kit.tokenizer import GPT2_SPLIT_PATTERN, Tokenizer


def test_encode_decode_round_trip(cli, tmp_path):
    text = "Hello world <|endoftext|> naïve 👍🏽\n"
    r = cli("tokenizer", "encode", input=text)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert ids == Tokenizer.gpt2().encode_ordinary(text)
    r = cli("tokenizer", "decode", "--engine", "reference", input=" ".join(map(str, ids)))
    assert r.returncode == 0 and r.stdout == text
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    r = cli("tokenizer", "encode", "--json", "--allow-special", str(tmp_path / "a.txt"))
    row = json.loads(r.stdout)
    assert row["source"].endswith("a.txt") and 50256 in row["ids"] and row["n_tokens"] == len(row["ids"])
    cut = row["ids"][:-2]  # ends inside the emoji's UTF-8 bytes
    r = cli("tokenizer", "decode", "--bytes", input=json.dumps(cut).encode())
    assert r.returncode == 0 and r.stdout == Tokenizer.gpt2().decode_bytes(cut)
    assert text.encode().startswith(r.stdout) and len(r.stdout) < len(text.encode()) - 1
    r = cli("tokenizer", "decode", input=json.dumps(cut))
    assert r.stdout.endswith("\ufffd")


def test_train_then_use_everywhere(cli, tmp_path, shakespeare_files):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in shakespeare_files[:2]:
        (corpus / p.name).write_text(p.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    out = tmp_path / "tok"
    r = cli("tokenizer", "train", "--vocab-size", "600", "--out", str(out), "--workers", "2", "--no-progress", str(corpus))
    assert r.returncode == 0, r.stderr
    assert "vocabulary 600" in r.stdout
    text = "To be, or not to be, that is the question: 1599."
    r = cli("tokenizer", "encode", "--tokenizer", str(out), input=text)
    ids = [int(x) for x in r.stdout.split()]
    tok = Tokenizer.from_pretrained(out)
    tik = tiktoken.Encoding("t", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=tok.mergeable_ranks,
                            special_tokens=tok.special_tokens)
    assert ids == tik.encode_ordinary(text) == HFTokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids
    r = cli("tokenizer", "info", "--tokenizer", str(out), "--json", "--text", "To be")
    info = json.loads(r.stdout)
    assert info["n_vocab"] == 600 and info["special_tokens"] == {"<|endoftext|>": 599}
    assert "".join(t["bytes"] for t in info["tokens"]) == "To be"


def test_user_errors_are_one_line(cli, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff")
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (("tokenizer", "encode", str(tmp_path / "bad.txt")), "bad.txt: not valid UTF-8 at byte offset 3"),
        (("tokenizer", "decode", "15496", "50257"), "token id 50257 is outside the vocabulary"),
        (("tokenizer", "decode", "12", "x7"), "'x7' is not a token id"),
        (("tokenizer", "encode", "--tokenizer", str(tmp_path / "nope")), "no such tokenizer folder"),
        (("tokenizer", "train", "--vocab-size", "100", "--out", str(tmp_path / "o"), str(tmp_path / "empty.txt")),
         "--vocab-size must be at least 256 + 1 special token(s) = 257, got 100"),
        (("tokenizer", "train", "--no-progress", "--vocab-size", "300", "--out", str(tmp_path / "o"), str(tmp_path / "empty.txt")),
         "holds no text"),
        # an --out the vocabulary could not be written to fails before the training, not after it
        (("tokenizer", "train", "--no-progress", "--vocab-size", "300", "--out", str(tmp_path / "bad.txt" / "o"),
          str(tmp_path / "empty.txt")), f"--out {tmp_path / 'bad.txt' / 'o'}: {tmp_path / 'bad.txt'} is a file, not a folder"),
        (("tokenizer", "train", "--no-progress", "--vocab-size", "300", "--out", str(tmp_path / "bad.txt"),
          str(tmp_path / "empty.txt")), "exists and is not a folder"),
    ]
    for args, message in cases:
        r = cli(*args, input="")
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("gpt2kit: error: ") and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written on failure
    r = cli("tokenizer", "encode", input=b"abc\xc3")
    assert r.returncode == 2 and "<stdin>: not valid UTF-8 at byte offset 3" in r.stderr.decode()


def test_arguments_that_are_not_utf8_are_named(cli, tmp_path):
    # A byte that is not UTF-8 on the command line reaches Python as a lone surrogate (U+DCxx).
    (tmp_path / "a.txt").write_text("hello hello world\n", encoding="utf-8")
    cases = [
        (("tokenizer", "info", "--text", "ab\udcffc"), "--text: not valid UTF-8: byte 0xff at character 2"),
        (("tokenizer", "train", "--no-progress", "--vocab-size", "300", "--special", "<|\udce9|>",
          "--out", str(tmp_path / "o"), str(tmp_path / "a.txt")), "--special: not valid UTF-8: byte 0xe9 at character 2"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr == f"gpt2kit: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_train_into_a_folder_inside_its_corpus_twice(cli, tmp_path):
    # `tokenizer train --out data/tok data`, twice: the second run read the first one's
    # encoder.json as corpus ('expected a JSON object with a 'text' field')
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("the cat sat on the mat, and the dog sat on the log.\n" * 40)
    made = []
    for _ in range(2):
        r = cli("tokenizer", "train", "--vocab-size", "300", "--out", str(data / "tok"), "--no-progress", str(data))
        assert r.returncode == 0, r.stderr
        made.append((data / "tok" / "vocab.bpe").read_text())
    assert made[0] == made[1]
