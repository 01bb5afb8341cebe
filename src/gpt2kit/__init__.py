"""gpt2kit: the complete GPT-2 system of Radford et al. (2019).

The public API is imported lazily so that `import gpt2kit` stays light (no torch until a model
is used).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "GPT2KitError": "errors",
    "Tokenizer": "tokenizer",
    "GPT2Config": "model",
    "GPT2": "model",
    "KVCache": "model",
    "generate": "generate",
    "stream_generate": "generate",
    "load_for_inference": "generate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        # `generate` is also its submodule's name: importing it made the package attribute the
        # (callable) module, which is then what every later lookup finds; return it from the first
        return module if name == _EXPORTS[name] else getattr(module, name)
    raise AttributeError(f"module 'gpt2kit' has no attribute {name!r}")
