"""The BPE trainer: correct merges (against a brute-force trainer), GPT-2's category rule,
determinism across worker counts, parity of the trained vocabulary with tiktoken and HF."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
import regex
import tiktoken
import zstandard
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gpt2kit.bpe_train import TrainingError, count_text, learn_merges, train_bpe
from gpt2kit.errors import InputFileError
from gpt2kit.tokenizer import ENDOFTEXT, GPT2_SPLIT_PATTERN, Tokenizer

from test_tokenizer import DIVERSE


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_files):
    """A small mixed corpus: slices of three plays, the diverse texts, and a JSONL file."""
    root = tmp_path_factory.mktemp("corpus")
    for p in shakespeare_files[:3]:
        (root / p.name).write_text(p.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    (root / "diverse.txt").write_text("\n".join(DIVERSE * 3), encoding="utf-8")
    lines = [json.dumps({"text": f"record {i}: x = {i * 37} + y_{i}; print(x)\n"}) for i in range(300)]
    (root / "code.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(corpus):
    return train_bpe([corpus], vocab_size=1200)


def naive_merges(counts: dict[str, int], n_merges: int) -> list[tuple[bytes, bytes]]:
    """Brute force: recount every pair after every merge; same tie-break rule."""
    words = {tuple(bytes([b]) for b in p.encode()): c for p, c in counts.items()}
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p[0], p[1]))
        merges.append(best)
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def test_incremental_counts_equal_brute_force(corpus):
    text = (corpus / "diverse.txt").read_text(encoding="utf-8") + "aaaa aaaaa abababab " * 5
    counts = count_text([text])
    _, merges = learn_merges(counts, 150)
    assert merges == naive_merges(counts, 150)


def test_tie_break_and_overlap():
    # 'ab' and 'cd' both occur 4 times: the smaller bytes win; 'aaa' merges left to right.
    ranks, merges = learn_merges({"cdcd": 2, "abab": 2, "aaa": 1}, 3)
    assert merges[:2] == [(b"a", b"b"), (b"c", b"d")]
    _, merges = learn_merges({"aaa": 5}, 5)
    assert merges == [(b"a", b"a"), (b"aa", b"a")]  # stops early: no pairs left


def test_trained_vocabulary_matches_tiktoken_and_hf(trained, corpus, tmp_path):
    assert trained.n_vocab == 1200
    assert trained.eot_token == 1199
    trained.save(tmp_path)
    # tiktoken's own loader for OpenAI's file pair (it checks ids against its byte order)
    ranks = data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert ranks == trained.mergeable_ranks
    tik = tiktoken.Encoding("trained", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens=trained.special_tokens)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf_files = HFTokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf_files.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref = Tokenizer.from_pretrained(tmp_path, engine="reference")
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.iterdir())] + DIVERSE
    texts.append("held-out: Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 12345 !!!")
    for text in texts:
        expected = tik.encode_ordinary(text)
        assert trained.encode_ordinary(text) == expected
        assert ref.encode_ordinary(text) == expected
        assert hf_files.encode(text).ids == expected
        assert hf.encode(text).ids == tik.encode(text, allowed_special="all")
        assert trained.decode(expected) == text


def _category(ch: str) -> str:
    if ch.isspace():
        return "space"
    if regex.match(r"\p{L}", ch):
        return "letter"
    if regex.match(r"\p{N}", ch):
        return "number"
    return "other"


def test_no_learned_token_crosses_categories(trained):
    contractions = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
    checked = 0
    for tok, rank in trained.mergeable_ranks.items():
        if rank < 256:
            continue
        try:
            text = tok.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character: a single category by construction
        if any(c.startswith(text) for c in contractions):
            continue
        body = text[1:] if len(text) > 1 and text[0] == " " and not text[1].isspace() else text
        assert len({_category(c) for c in body}) == 1, f"token {text!r} crosses categories"
        assert ENDOFTEXT not in text
        checked += 1
    assert checked > 800


def test_deterministic_across_workers_and_order(corpus, trained):
    files = sorted(corpus.iterdir())
    again = train_bpe(list(reversed(files)), vocab_size=1200, workers=2)
    assert again.fingerprint == trained.fingerprint


def test_special_tokens_and_compressed_inputs(tmp_path):
    text = "one two three<|endoftext|>four five<|sep|>six " * 50
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    data = "".join(json.dumps({"body": text}) + "\n" for _ in range(3)).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    tok = train_bpe([tmp_path / "a.txt.gz", tmp_path / "b.jsonl.zst"], vocab_size=270,
                    special_tokens=[ENDOFTEXT, "<|sep|>"], field="body")  # 12 merges fit this tiny corpus
    assert tok.special_tokens == {ENDOFTEXT: 268, "<|sep|>": 269}
    assert tok.encode("two<|sep|>", allowed_special="all")[-1] == 269
    # special-token text is cut out before counting: "<|" (100 times per document) is not learned
    assert not any(b"<|" in t or b"|>" in t for t in tok.mergeable_ranks)


def test_trainer_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TrainingError, match="holds no text"):
        train_bpe([tmp_path / "empty.txt"], vocab_size=300)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(TrainingError, match="at least 256 \\+ 2 special token\\(s\\) = 258, got 257"):
        train_bpe([tmp_path / "t.txt"], vocab_size=257, special_tokens=[ENDOFTEXT, "<|x|>"])
    (tmp_path / "bad.txt").write_bytes(b"fine text\n\xc3\x28 broken")
    with pytest.raises(InputFileError, match=r"bad.txt: not valid UTF-8 at byte offset 10"):
        train_bpe([tmp_path / "bad.txt"], vocab_size=300)
    with pytest.raises(InputFileError, match="no such file"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)



def test_special_token_spelled_like_a_vocabulary_token_is_refused(tmp_path, monkeypatch):
    import gpt2kit.bpe_train as bpe_train

    (tmp_path / "t.txt").write_text(" x x x x §§ ab\n", encoding="utf-8")
    # "§" is how the vocabulary files spell byte 0xa7: refused before any counting is done.
    monkeypatch.setattr(bpe_train, "count_pretokens", lambda *a, **k: pytest.fail("counted before refusing"))
    with pytest.raises(TrainingError, match=r"^--special '§' is spelled like the byte token 0xa7 in the vocabulary files"):
        train_bpe([tmp_path / "t.txt"], vocab_size=300, special_tokens=[ENDOFTEXT, "§"])
    monkeypatch.undo()
    # "Ġx" spells the learned token b" x": known only once the merges are.
    with pytest.raises(TrainingError, match=r"^--special 'Ġx' is spelled like the learned token b' x'"):
        train_bpe([tmp_path / "t.txt"], vocab_size=262, special_tokens=[ENDOFTEXT, "\u0120x"])


def test_huge_text_files_are_counted_in_pieces_with_identical_counts(tmp_path):
    from gpt2kit.bpe_train import count_text
    from gpt2kit.corpus import iter_text_pieces

    # Awkward places for a cut: whitespace before and after newlines, contractions, digits, CJK,
    # a special token, a 3-byte character across the 7-byte read blocks.
    unit = ("First line  \nSecond\n\n  indented 's and 're\nnumbers 123\n456\t\n日本語\nend.\n"
            "x<|endoftext|>\ny \n z\n")
    text = unit * 40
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    specials = ["<|endoftext|>"]
    whole = count_text([text], specials)
    for piece_chars in (1, 30):  # 1: cut at every place the rule allows
        pieces = list(iter_text_pieces(path, piece_chars=piece_chars, block_bytes=7))
        assert "".join(pieces) == text and len(pieces) > 20
        assert max(map(len, pieces)) < piece_chars + len(unit)
        assert count_text(pieces, specials) == whole

    bad = tmp_path / "bad.txt"
    bad.write_bytes("ok line\n".encode() * 3 + b"\xe6\x97" + b"!")  # a cut 3-byte character
    with pytest.raises(InputFileError, match=r"bad.txt: not valid UTF-8 at byte offset 24"):
        list(iter_text_pieces(bad, block_bytes=5))


def test_special_token_that_is_not_unicode_text_is_refused_before_counting(tmp_path, monkeypatch):
    import gpt2kit.bpe_train as bpe_train

    (tmp_path / "t.txt").write_text("ab ab ab\n", encoding="utf-8")
    monkeypatch.setattr(bpe_train, "count_pretokens", lambda *a, **k: pytest.fail("counted before refusing"))
    with pytest.raises(TrainingError, match=r"^--special '<\|\\ud800\|>' is not valid Unicode: lone surrogate U\+D800"):
        train_bpe([tmp_path / "t.txt"], vocab_size=300, special_tokens=[ENDOFTEXT, "<|\ud800|>"])
    # one string is not a list of special tokens (it would be taken character by character)
    with pytest.raises(TrainingError, match=r"^special_tokens must be a list of strings, got one str"):
        train_bpe([tmp_path / "t.txt"], vocab_size=300, special_tokens=ENDOFTEXT)


def test_special_tokens_that_start_alike_are_cut_as_encode_matches_them():
    # "<|im|>user" is one special token where the text spells it, at training as at encoding.
    specials = [ENDOFTEXT, "<|im|>", "<|im|>user"]
    assert count_text(["<|im|>user hi<|im|> yo"], specials) == Counter({" hi": 1, " yo": 1})


def test_one_path_is_taken_as_one_input(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat, the end\n" * 20, encoding="utf-8")
    expected = train_bpe([corpus], vocab_size=280).fingerprint
    # not iterated character by character ("c", "o", ...) or refused as not iterable
    assert train_bpe(str(corpus), vocab_size=280).fingerprint == expected
    assert train_bpe(corpus, vocab_size=280).fingerprint == expected


def test_jsonl_with_a_lone_surrogate_escape_is_a_clear_error(tmp_path):
    # JSON may spell a lone surrogate ("\ud800"), which no UTF-8 byte sequence can: the counting
    # accepted it and merge learning crashed with a UnicodeEncodeError traceback.
    lines = ['{"text": "fine words here"}', '', '{"text": "hello \\ud800 there"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"a.jsonl: line 3: field 'text' holds a lone surrogate U\+D800 at "
                                             r"character 6, not text$"):
        train_bpe([tmp_path / "a.jsonl"], vocab_size=300)


def test_option_boundaries_are_exact(tmp_path):
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 5, encoding="utf-8")
    # 256 bytes + 1 special: the smallest vocabulary there is, with no merges at all
    tok = train_bpe([tmp_path / "t.txt"], vocab_size=257)
    assert tok.n_vocab == 257 and tok.special_tokens == {ENDOFTEXT: 256} and len(tok.mergeable_ranks) == 256
    for bad, message in [(dict(workers=0), r"^--workers must be at least 1, got 0$"),
                         (dict(special_tokens=[ENDOFTEXT, ""]), r"^special tokens must be non-empty strings$")]:
        with pytest.raises(TrainingError, match=message):
            train_bpe([tmp_path / "t.txt"], vocab_size=300, **bad)


def test_a_special_token_named_twice_is_one_token(tmp_path):
    (tmp_path / "t.txt").write_text("the cat sat on the mat<|x|>the end\n" * 5, encoding="utf-8")
    tok = train_bpe([tmp_path / "t.txt"], vocab_size=270, special_tokens=[ENDOFTEXT, "<|x|>", ENDOFTEXT])
    # ids stay contiguous: 268 tokens from merges and bytes, then the two distinct specials
    assert tok.special_tokens == {ENDOFTEXT: 268, "<|x|>": 269} and tok.n_vocab == 270
    assert len(tok.mergeable_ranks) == 268


@pytest.mark.parametrize("workers", [1, 2])
def test_counting_in_many_batches_counts_each_document_once(tmp_path, monkeypatch, workers):
    import gpt2kit.bpe_train as bpe_train

    docs = [f"document {i} says hello<|endoftext|>world {i % 7}\n" for i in range(40)]
    for i in range(4):
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::4]),
                                              encoding="utf-8")
    expected = count_text(docs, [ENDOFTEXT])
    monkeypatch.setattr(bpe_train, "_BATCH_CHARS", 100)  # a batch every few documents
    files = sorted(tmp_path.iterdir())
    assert bpe_train.count_pretokens(files, workers=workers) == expected


def test_a_text_file_cut_inside_its_last_character_is_refused(tmp_path):
    from gpt2kit.corpus import iter_text_pieces

    # a download cut short mid-character: the dangling bytes were silently dropped at EOF
    bad = tmp_path / "cut.txt"
    bad.write_bytes("ok line\n".encode() * 3 + "日".encode()[:2])
    for block_bytes in (5, 1 << 20):
        with pytest.raises(InputFileError, match=r"cut.txt: not valid UTF-8 at byte offset 24 \(byte 0xe6\)"):
            list(iter_text_pieces(bad, block_bytes=block_bytes))


def test_without_special_tokens_text_is_counted_whole(tmp_path):
    # no special tokens: nothing to cut at (an empty splitter cut between every two characters)
    assert count_text(["the cat, the hat"]) == Counter({"the": 1, " cat": 1, ",": 1, " the": 1, " hat": 1})
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 5, encoding="utf-8")
    tok = train_bpe([tmp_path / "t.txt"], vocab_size=260, special_tokens=[])
    assert tok.special_tokens == {} and tok.n_vocab == 260
    assert tok.merges == [(b"a", b"t"), (b"h", b"e"), (b"t", b"he"), (b" ", b"c")]


def test_a_vocabulary_too_large_for_the_pair_keys_is_refused_before_counting(tmp_path, monkeypatch):
    import gpt2kit.bpe_train as bpe_train

    # a pair is keyed as left << 24 | right: every id must stay below 2**24
    (tmp_path / "t.txt").write_text("ab ab ab\n", encoding="utf-8")
    monkeypatch.setattr(bpe_train, "count_pretokens", lambda *a, **k: pytest.fail("counted before refusing"))
    with pytest.raises(TrainingError, match=r"^--vocab-size must be below 16777216, got 16777216$"):
        train_bpe([tmp_path / "t.txt"], vocab_size=1 << 24)
    monkeypatch.undo()
    tok = train_bpe([tmp_path / "t.txt"], vocab_size=(1 << 24) - 1)  # the largest: runs out of pairs at once
    assert tok.merges == [(b"a", b"b"), (b" ", b"ab")]


def test_running_out_of_pairs_is_a_warning_with_the_counts(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="gpt2kit.bpe_train"):
        learn_merges({"aaa": 5}, 2)
        assert caplog.records == []  # all the merges asked for: nothing to say
        learn_merges({"aaa": 5}, 5)
    assert [r.getMessage() for r in caplog.records] == ["the corpus ran out of pairs after 2 merges (asked for 5)"]



def test_cli_train_takes_the_field_and_the_special_tokens(tmp_path, capsys):
    from gpt2kit.cli import main

    lines = [json.dumps({"body": "the cat sat on the mat", "text": "zzz zzz zzz"}) for _ in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["tokenizer", "train", str(tmp_path / "a.jsonl"), "--vocab-size", "261", "--workers", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "body"), "--field", "body", "--special", "<|a|>", "--special", "<|b|>"]) == 0
    tok = Tokenizer.from_pretrained(tmp_path / "body")
    assert tok.special_tokens == {"<|a|>": 259, "<|b|>": 260}
    assert tok.merges == [(b"a", b"t"), (b"h", b"e"), (b"t", b"he")]  # learned from "body" alone
    # the defaults: the "text" field, and <|endoftext|> alone
    assert main([*args, "--out", str(tmp_path / "text")]) == 0
    tok = Tokenizer.from_pretrained(tmp_path / "text")
    assert tok.merges == [(b"z", b"z"), (b"zz", b"z"), (b" ", b"zzz")]  # all "zzz zzz zzz" holds
    assert tok.special_tokens == {ENDOFTEXT: 259}
    assert capsys.readouterr().out.splitlines()[-1].startswith("trained 3 merges in ")


def test_text_pieces_are_cut_only_once_they_reach_the_piece_size(tmp_path):
    from gpt2kit.corpus import iter_text_pieces

    # safe cuts every 6 characters: a piece ends at the first of them at or past piece_chars
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line{i}\n" for i in range(10)), encoding="utf-8")
    pieces = list(iter_text_pieces(path, piece_chars=10, block_bytes=4))
    assert pieces == ["line0\nline1\n", "line2\nline3\n", "line4\nline5\n", "line6\nline7\n", "line8\nline9\n"]


@pytest.mark.parametrize("name", ["t.txt.zst", "t.jsonl.zst"])
def test_a_zstd_file_of_several_frames_is_read_to_its_end(tmp_path, name):
    from gpt2kit.corpus import iter_file_documents, iter_text_pieces

    # `cat a.zst b.zst > ab.zst`, or a compressor that ends a frame every so often: one stream
    parts = [json.dumps({"text": f"part {i} " * 20}) + "\n" for i in range(3)]
    path = tmp_path / name
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p.encode()) for p in parts))
    if ".txt" in name:
        assert list(iter_file_documents(path)) == ["".join(parts)]
        assert "".join(iter_text_pieces(path, block_bytes=64)) == "".join(parts)
    else:
        assert list(iter_file_documents(path)) == [json.loads(p)["text"] for p in parts]


def test_a_zstd_frame_larger_than_the_read_buffer_is_read_whole(tmp_path):
    from gpt2kit.corpus import iter_file_documents, iter_text_pieces

    # ~1.7 MB of text compresses to a few KB: one read of the file decompresses to more than the
    # 1 MiB buffer the reader is asked to fill
    text = "".join(json.dumps({"text": f"line {i}: " + "words " * 30}) + "\n" for i in range(8000))
    packed = zstandard.ZstdCompressor().compress(text.encode())
    assert len(text) > 1 << 20 and len(packed) < 1 << 20
    (tmp_path / "big.jsonl.zst").write_bytes(packed)
    (tmp_path / "big.txt.zst").write_bytes(packed)
    docs = list(iter_file_documents(tmp_path / "big.jsonl.zst"))
    assert len(docs) == 8000 and docs[-1] == "line 7999: " + "words " * 30
    assert "".join(iter_text_pieces(tmp_path / "big.txt.zst")) == text


def test_a_folder_without_text_files_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "paper.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "docs" / ".notes.txt").write_text("hidden notes", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"docs: folder holds no \.txt/\.jsonl/\.json files \(optionally \.gz/\.zst\)$"):
        train_bpe([tmp_path / "docs"], vocab_size=300)


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    # a string holding the field's name, or a number: not an object with that field
    for line in ('"the text of a document"', "5", '["text"]'):
        (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(InputFileError, match=r"a.jsonl: line 2: expected a JSON object with a 'text' field$"):
            train_bpe([tmp_path / "a.jsonl"], vocab_size=300)
