"""The task registry: `@register_task("name")` on a `Task` subclass makes it runnable by name.

A task is one small class in one file under `gpt2kit/eval/tasks/`: it reads its dataset's
standard files (`documents`), turns each document into requests (`requests`), turns a document's
answers into numbers (`score`) and those into the reported metrics (`aggregate`). Every module
in that folder is imported when the registry is first used, so adding a task is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

from ..errors import GPT2KitError
from .requests import Request, Result

__all__ = ["Task", "register_task", "get_task", "task_names", "TaskError", "MissingDataError",
           "find_data_file"]


class TaskError(GPT2KitError):
    """An unknown task name, a duplicate registration, or a dataset file in the wrong format."""


class MissingDataError(TaskError):
    """A dataset file is not in the data folder: names the expected file and where to get it."""

    def __init__(self, task: str, data_dir: Path, expected: Sequence[str], source: str):
        names = " or ".join(repr(e) for e in expected)
        super().__init__(f"task {task!r}: none of {names} found in {data_dir} (it is normally obtained from {source})")


class Task:
    """Base class. Subclasses set the class attributes and implement the four methods.

    `data_files`: paths relative to the data folder, the first that exists is used.
    `source`: where those files are normally obtained (for the missing-file error and the docs).
    `table3`: (column of the paper's Table 3, metric shown there) for each column the task fills.
    """

    name: ClassVar[str] = ""
    data_files: ClassVar[tuple[str, ...]] = ()
    source: ClassVar[str] = ""
    table3: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, data_dir: str | Path, *, detokenize: bool = True):
        self.data_dir = Path(data_dir)
        self.detokenize = detokenize

    @property
    def path(self) -> Path:
        """The dataset file this task reads (raises `MissingDataError` if none is there)."""
        return find_data_file(self.name, self.data_dir, self.data_files, self.source)

    def documents(self, limit: int | None = None) -> list[Any]:
        """The test set's documents (the first `limit`), read from `self.path`."""
        raise NotImplementedError

    def requests(self, doc: Any, tokenizer: Any) -> list[Request]:
        raise NotImplementedError

    def score(self, doc: Any, results: list[Result]) -> dict[str, float]:
        """Per-document numbers (what `aggregate` needs), from the answers to `requests(doc)`."""
        raise NotImplementedError

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """The options that determine the numbers (recorded in the results JSON)."""
        return {"file": str(self.path), "detokenize": self.detokenize}


_REGISTRY: dict[str, type[Task]] = {}
_loaded = False
T = TypeVar("T", bound=type[Task])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: make the task available as `name`; a name may be registered once."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY:
            raise TaskError(f"task name {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TaskError(f"@register_task({name!r}) must decorate a Task subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin_tasks() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import tasks

    for mod in pkgutil.iter_modules(tasks.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{tasks.__name__}.{mod.name}")


def task_names() -> list[str]:
    _load_builtin_tasks()
    return list(_REGISTRY)


def get_task(name: str) -> type[Task]:
    _load_builtin_tasks()
    if name not in _REGISTRY:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def find_data_file(task: str, data_dir: Path, candidates: Sequence[str], source: str) -> Path:
    for rel in candidates:
        p = data_dir / rel
        if p.is_file():
            return p
    raise MissingDataError(task, data_dir, candidates, source)
