"""peftkit: parameter-efficient fine-tuning from one TOML recipe.

The public API (``__all__``; see docs/python-api.md) is imported lazily, from :mod:`peftkit.api`, so that
``import peftkit`` (and ``peftkit --help``) stays cheap: no torch until a function is called.
"""

from __future__ import annotations

import sys
import types
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


class _Package(types.ModuleType):
    """Three API functions share their names with modules (``merge``, ``export``, ``plan``). Importing a
    module binds it as an attribute of its package, which would hide the function from then on; the
    modules stay reachable as ``from peftkit.merge import ...`` (through ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
