"""Overlap analysis over `gpt2kit prepare` token shard folders."""
from __future__ import annotations

from gpt2kit import overlap
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
