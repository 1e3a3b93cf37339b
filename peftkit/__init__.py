"""peftkit: parameter-efficient fine-tuning from one TOML recipe.

The public API (``__all__``; see docs/python-api.md) is imported lazily, from :mod:`peftkit.api`, so that
``import peftkit`` (and ``peftkit --help``) stays cheap: no torch until a function is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
API = ("load_recipe", "finetune", "evaluate", "predict", "merge", "merge_adapters", "export", "plan")
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        from peftkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
