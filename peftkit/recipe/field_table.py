"""The field names and value types of the classes ``[train]`` and ``[adapter]`` forward to.

``[train]`` keys are checked against ``TrainingArguments`` (``Seq2SeqTrainingArguments`` for seq2seq)
and ``[adapter]`` keys against the method's peft config class. Importing transformers or peft costs
10-15 s of a 2-core machine's time (torch, torch._dynamo, bitsandbytes), which would be most of what
``peftkit validate`` costs for a recipe whose mistake is a typo. So the fields are read from
``library_fields.json``, a table generated from the locked versions of transformers and peft, when the
installed versions are the ones it was generated with; with any other version they are read from the
classes themselves (the slow path, same result).

Each annotation is stored as a small JSON spec (:func:`spec_of`) and rebuilt as an equivalent
annotation (:func:`annotation_of`); both paths go through that round trip, so a recipe is judged the
same way whichever path answered. Regenerate the table after changing the lock::

    python -m peftkit.recipe.field_table --write
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

TABLE_PATH = Path(__file__).with_name("library_fields.json")
LIBRARIES = ("transformers", "peft")
DEFAULT_ARGS = "TrainingArguments"  # the key of tasks that use transformers' own class

Spec = Any  # str | list: JSON


# --------------------------------------------------------------------------------------------------
# Annotation ⇄ JSON spec


def spec_of(annotation: Any) -> Spec:
    """A JSON-able description of a field annotation, as much of it as recipe checks use."""
    if annotation is Any or annotation is object:
        return "any"
    if annotation is type(None):
        return "none"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return ["union", [spec_of(a) for a in args]]
    if origin is Literal:
        return ["literal", [a.value if isinstance(a, enum.Enum) else a for a in args]]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ["enum", annotation.__name__, {m.name: m.value for m in annotation}]
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if annotation is kind:
            return name
    if origin in (list, tuple, set, Sequence):
        return ["list", spec_of(args[0]) if args else None]
    if annotation in (list, tuple, set):
        return ["list", None]
    if origin in (dict, Mapping):
        return "table"
    if annotation is dict:
        return "dict"
    return ["other", getattr(annotation, "__name__", str(annotation))]


def annotation_of(spec: Spec) -> Any:
    """The annotation a spec describes (enums and exotic classes rebuilt as stand-ins of the same name)."""
    simple: dict[str, Any] = {"any": Any, "none": type(None), "bool": bool, "int": int, "float": float}
    simple.update(str=str, dict=dict, table=dict[str, Any])
    if isinstance(spec, str):
        return simple[spec]
    kind = spec[0]
    if kind == "union":
        return typing.Union[tuple(annotation_of(s) for s in spec[1])]  # noqa: UP007 - built from a list
    if kind == "literal":
        return Literal[tuple(spec[1])]
    if kind == "enum":
        return _stand_in_enum(spec[1], tuple(spec[2].items()))
    if kind == "list":
        return list if spec[1] is None else list[annotation_of(spec[1])]  # type: ignore[misc]
    return type(spec[1], (), {})  # exotic: recipe checks leave it to the class itself


@functools.cache
def _stand_in_enum(name: str, members: tuple[tuple[str, Any], ...]) -> type[enum.Enum]:
    return enum.Enum(name, list(members))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# The table


def training_fields(task_type: str | None) -> dict[str, Any]:
    """``[train]``'s forwarded fields for a task type (None: transformers' ``TrainingArguments``)."""
    table = _table()["train"]
    return _annotations(table.get(task_type or DEFAULT_ARGS, table[DEFAULT_ARGS]))


def peft_fields(config_class: str) -> dict[str, Any]:
    """``[adapter]``'s fields for a peft config class name (``LoraConfig``)."""
    return _annotations(_table()["adapter"][config_class])


def _annotations(specs: dict[str, Spec]) -> dict[str, Any]:
    return {name: annotation_of(spec) for name, spec in specs.items()}


@functools.cache
def _table() -> dict[str, Any]:
    versions = installed_versions()
    try:
        shipped = json.loads(TABLE_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        shipped = None
    if shipped is not None and shipped.get("versions") == versions:
        return dict(shipped)
    return build_table()


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - both are dependencies
            versions[name] = ""
    return versions


def build_table() -> dict[str, Any]:
    """The table read from the installed classes (imports transformers and peft)."""
    import peft
    from transformers import TrainingArguments

    from peftkit.adapters import METHODS
    from peftkit.tasks import TASKS

    train = {DEFAULT_ARGS: _field_specs(TrainingArguments)}
    for name, task in TASKS.items():
        if task.training_args_class is not None:
            train[name] = _field_specs(task.training_args_class())
    adapter = {
        method.peft_config: _field_specs(getattr(peft, method.peft_config)) for method in METHODS.values()
    }
    return {"versions": installed_versions(), "train": train, "adapter": adapter}


def _field_specs(cls: Any) -> dict[str, Spec]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # forward references that do not resolve: no type check for this class
        hints = {}
    return {f.name: spec_of(hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def write_table(path: Path = TABLE_PATH) -> None:
    text = json.dumps(build_table(), indent=1, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m peftkit.recipe.field_table --write")
    write_table()
    sys.stdout.write(f"wrote {TABLE_PATH}\n")
