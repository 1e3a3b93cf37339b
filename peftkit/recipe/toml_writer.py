"""Recipe data → TOML text: the one TOML writer of peftkit (sweeps' best recipes, ``--set`` values)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from peftkit.errors import PeftkitError


def to_toml(data: Mapping[str, Any]) -> str:
    """Plain recipe data (tables of scalars, lists and small inline tables) as TOML; None values dropped."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
    lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in scalars.items()]
    for table, values in data.items():
        if not isinstance(values, dict):
            continue
        if lines:
            lines.append("")
        lines.append(f"[{_toml_key(table)}]")
        lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise PeftkitError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
