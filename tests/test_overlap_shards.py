"""Overlap analysis over `gpt2kit prepare` token shard folders."""
from __future__ import annotations

import json
import shutil

import pytest

from gpt2kit import overlap
from gpt2kit.bpe_train import train_bpe
from gpt2kit.errors import InputFileError
from gpt2kit.data import prepare
from gpt2kit.overlap import build_filter, iter_shard_documents, query


def test_shard_folders_are_decoded_and_cut_at_endoftext(tmp_path, monkeypatch):
    words = [f"w{i % 97}x{i % 89}" for i in range(6000)]
    text = "\n\n".join(" ".join(words[i:i + 60]) for i in range(0, len(words), 60))
    (tmp_path / "corpus.txt").write_text(text)
    prepare([tmp_path / "corpus.txt"], tmp_path / "prep", shard_tokens=4000, segment_chars=500, val_fraction=0.2)
    train = list(iter_shard_documents(tmp_path / "prep", "train"))
    val = list(iter_shard_documents(tmp_path / "prep", "val"))
    assert len(train) > 1 and len(val) > 1 and all("<|endoftext|>" not in d for d in train + val)
    monkeypatch.setattr(overlap, "_SHARD_CHUNK", 777)  # documents cross chunk and shard edges alike
    assert list(iter_shard_documents(tmp_path / "prep", "train")) == train

    build_filter([tmp_path / "corpus.txt"], tmp_path / "text.exact", exact=True)
    build_filter([tmp_path / "prep"], tmp_path / "train.bloom", capacity=10_000, fpr=1e-8)
    # every 8-gram of either split is an 8-gram of the text: nothing spans a place where
    # `prepare` dropped a validation segment
    for split in ("train", "val"):
        (r,) = query([tmp_path / "text.exact"], [tmp_path / "prep"], split=split).results
        assert r.percent == 100.0 and r.ngrams > 0
    (r,) = query([tmp_path / "train.bloom"], [tmp_path / "corpus.txt"]).results
    assert 50.0 < r.percent < 100.0  # the validation fifth is not in the training filter


def test_a_long_document_in_shards_is_not_held_as_tokens(tmp_path, monkeypatch):
    # Without a validation split, a one-document corpus has no <|endoftext|> at all: the document
    # was carried as a growing int64 array (copied again at every 4M-token chunk) and decoded from
    # a Python list of all its ids (~36 bytes per token); it is now kept as its bytes only.
    import tracemalloc

    words = [f"w{i % 997}x{i % 991}" for i in range(60_000)]
    (tmp_path / "one.txt").write_text(" ".join(words))
    prepare([tmp_path / "one.txt"], tmp_path / "prep", shard_tokens=50_000, val_fraction=0)
    monkeypatch.setattr(overlap, "_SHARD_CHUNK", 4096)
    from gpt2kit.tokenizer import Tokenizer

    load, loaded = Tokenizer.from_pretrained, []

    def measured_from_here(*args, **kwargs):  # the tokenizer's own tables are not the document's
        tok = load(*args, **kwargs)
        loaded.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.reset_peak()
        return tok

    monkeypatch.setattr(Tokenizer, "from_pretrained", measured_from_here)
    tracemalloc.start()
    try:
        (doc,) = iter_shard_documents(tmp_path / "prep", "train")
        peak = tracemalloc.get_traced_memory()[1] - loaded[0]
    finally:
        tracemalloc.stop()
    assert doc == " ".join(words)
    assert peak < 4 * len(doc) + 1_000_000, (peak, len(doc))  # the ids as a list: ~36 bytes per token


def test_a_shard_folder_with_another_tokenizer_is_refused(tmp_path):
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat and the dog sat on the log\n" * 30)
    prepare([tmp_path / "corpus.txt"], tmp_path / "prep", val_fraction=0)
    # its tokenizer/ replaced: the ids would be decoded into some other text
    shutil.rmtree(tmp_path / "prep" / "tokenizer")
    train_bpe([tmp_path / "corpus.txt"], vocab_size=300).save(tmp_path / "prep" / "tokenizer")
    with pytest.raises(InputFileError, match=r"meta.json: tokenizer fingerprint does not match the folder's tokenizer/"):
        list(iter_shard_documents(tmp_path / "prep"))


def test_the_split_of_a_shard_folder_reaches_build_and_query(tmp_path, cli):
    words = [f"w{i % 97}x{i % 89}" for i in range(3000)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(words[i:i + 60]) for i in range(0, len(words), 60)))
    prepare([tmp_path / "corpus.txt"], tmp_path / "prep", shard_tokens=4000, segment_chars=500, val_fraction=0.3)
    counts = {split: len(list(iter_shard_documents(tmp_path / "prep", split))) for split in ("train", "val")}
    assert counts["train"] != counts["val"], counts
    es = overlap.ExactSet(["a b c d e f g h"])
    es.save(tmp_path / "f.exact")
    for split, n in counts.items():
        (r,) = query([tmp_path / "f.exact"], [tmp_path / "prep"], split=split).results
        assert r.documents == n, split
        r = cli("overlap", "query", str(tmp_path / "f.exact"), str(tmp_path / "prep"), "--split", split, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["documents"] == n, (split, r.stderr)
    r = cli("overlap", "build", "--exact", "--split", "val", "--out", str(tmp_path / "val.exact"), str(tmp_path / "prep"))
    assert r.returncode == 0 and f"from {counts['val']} documents" in r.stdout, r.stderr
