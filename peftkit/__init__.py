"""peftkit: parameter-efficient fine-tuning from one TOML recipe.

The public API is imported lazily so that ``import peftkit`` (and ``peftkit --help``) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "finetune", "load_recipe"]


def __getattr__(name: str) -> Any:
    if name == "load_recipe":
        from peftkit.recipe import load_recipe

        return load_recipe
    if name == "finetune":
        from peftkit.training import finetune

        return finetune
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
