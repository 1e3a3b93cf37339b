"""The ``[sweep]`` table's schema: its keys, the search space's distributions, and their validation.

Only ``peftkit sweep`` (:mod:`peftkit.sweep`) runs a sweep; the recipe layer validates the table with
every recipe, so a mistake in it is reported like any other recipe problem, before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peftkit.errors import Problem, RecipeError, did_you_mean
from peftkit.recipe.toml_writer import toml_value

DISTRIBUTIONS = {
    "log_uniform": "[low, high] with 0 < low < high, sampled on a log scale",
    "uniform": "[low, high] with low < high",
    "int": "[low, high] integers with low <= high",
    "choice": "a non-empty list of numbers, strings or booleans",
}
SWEEP_KEYS = ("metric", "direction", "sampler", "pruner", "seed", "startup_trials", "baseline_trial", "space")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# recipe keys a sweep may not vary: it sets them itself, or they change what the metric means
FIXED_PATHS = {
    "train.output_dir": "each trial's run directory is set by the sweep",
    "task.type": "trials of one sweep must share the task (and its metrics)",
}


@dataclass(frozen=True)
class Parameter:
    """One searched recipe key and its distribution."""

    path: str  # "table.key" as in --set
    kind: str  # a key of DISTRIBUTIONS
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high))
        return trial.suggest_float(self.path, self.low, self.high, log=self.kind == "log_uniform")

    def extremes(self) -> list[Any]:
        """Values that bound what the sweep can draw: each choice, or the range's ends."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high


@dataclass(frozen=True)
class SweepSpec:
    """The parsed ``[sweep]`` table."""

    parameters: tuple[Parameter, ...]
    metric: str | None = None
    direction: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = None
    startup_trials: int | None = None
    baseline_trial: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_sweep_table(table: Any) -> tuple[SweepSpec | None, list[Problem]]:
    """``[sweep]`` → SweepSpec, with a Problem for every mistake in its structure."""
    problems: list[Problem] = []
    if not isinstance(table, dict):
        return None, [Problem("sweep", "must be a table", "write [sweep] and [sweep.space]")]
    for key in table:
        if key not in SWEEP_KEYS:
            hint = did_you_mean(key, SWEEP_KEYS) or f"the keys are {', '.join(SWEEP_KEYS)}"
            problems.append(Problem(f"sweep.{key}", "unknown key", hint))
    options: dict[str, Any] = {}
    for key, kinds, allowed in (
        ("metric", str, None),
        ("direction", str, ("maximize", "minimize")),
        ("sampler", str, SAMPLERS),
        ("pruner", str, PRUNERS),
        ("seed", int, None),
        ("startup_trials", int, None),
        ("baseline_trial", bool, None),
    ):
        if key not in table:
            continue
        value: Any = table[key]
        if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
            problems.append(
                Problem(
                    f"sweep.{key}",
                    f"expected {kinds.__name__}, got {value!r}",
                    f"write {key} as a {kinds.__name__}",
                )
            )
        elif allowed is not None and value not in allowed:
            hint = did_you_mean(str(value), allowed)
            problems.append(
                Problem(
                    f"sweep.{key}",
                    f"got {value!r}",
                    f"{hint + ' ' if hint else ''}use one of {list(allowed)}",
                )
            )
        elif key == "startup_trials" and int(value) < 1:
            problems.append(
                Problem("sweep.startup_trials", f"must be at least 1, got {value}", "use 1 or more")
            )
        else:
            options[key] = value
    space = table.get("space")
    parameters: list[Parameter] = []
    if not isinstance(space, dict) or not space:
        problems.append(
            Problem(
                "sweep.space",
                "missing or empty" if not isinstance(space, dict) else "names no parameter",
                'add [sweep.space] with e.g. "train.learning_rate" = {log_uniform = [1e-5, 1e-3]}',
            )
        )
    else:
        for path, spec in flatten_space(space).items():
            parameter, problem = _parameter(path, spec)
            if problem:
                problems.append(problem)
            elif parameter:
                parameters.append(parameter)
    if problems:
        return None, problems
    return SweepSpec(parameters=tuple(parameters), **options), []


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Unquoted dotted TOML keys ({"train": {"learning_rate": ...}}) → {"train.learning_rate": ...}."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        # a nested table holds only tables; a distribution spec ({uniform = [...]}) holds a value
        is_leaf = (
            not isinstance(value, dict) or not value or not all(isinstance(v, dict) for v in value.values())
        )
        if is_leaf:
            flat[path] = value
        else:
            flat.update(flatten_space(value, f"{path}."))
    return flat


def _parameter(path: str, spec: Any) -> tuple[Parameter | None, Problem | None]:
    where = f'sweep.space."{path}"'
    example = "e.g. {log_uniform = [1e-5, 1e-3]} or {choice = [4, 8, 16]}"
    if len([p for p in path.split(".") if p]) < 2:
        return None, Problem(where, "expected a table.key path", 'e.g. "train.learning_rate" or "adapter.r"')
    if path in FIXED_PATHS:
        return None, Problem(where, "cannot be swept", FIXED_PATHS[path])
    if not isinstance(spec, dict) or len(spec) != 1:
        return None, Problem(where, f"expected one distribution, got {spec!r}", example)
    kind, value = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        hint = did_you_mean(kind, DISTRIBUTIONS)
        return None, Problem(
            where,
            f"unknown distribution {kind!r}",
            f"{hint + ' ' if hint else ''}use one of {', '.join(DISTRIBUTIONS)}",
        )
    fix = f"{kind} takes {DISTRIBUTIONS[kind]}"
    if kind == "choice":
        scalars = (str, int, float, bool)
        if not isinstance(value, list) or not value or not all(isinstance(v, scalars) for v in value):
            return None, Problem(where, f"bad choice list {value!r}", fix)
        if len(set(map(repr, value))) != len(value):
            return None, Problem(where, f"choice list {value!r} has duplicates", "list each value once")
        return Parameter(path, kind, choices=tuple(value)), None
    numbers = isinstance(value, list) and len(value) == 2
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers:
        return None, Problem(where, f"bad {kind} range {value!r}", fix)
    low, high = value
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int) and low <= high):
        return None, Problem(where, f"bad int range {value!r}", fix)
    if kind == "uniform" and not low < high:
        return None, Problem(where, f"bad uniform range {value!r}", fix)
    if kind == "log_uniform" and not 0 < low < high:
        return None, Problem(where, f"bad log_uniform range {value!r}", fix)
    return Parameter(path, kind, low=low, high=high), None


def check_sweep_table(table: Any, validate: Callable[[str], None]) -> list[Problem]:
    """Every problem of ``[sweep]``: its structure, then each parameter's bounding values.

    ``validate`` applies one ``--set`` override to the base recipe (without [sweep]) and validates it,
    raising the recipe layer's RecipeError: so an unknown path gets the recipe layer's own "did you mean"
    and an impossible value (``adapter.r = 0``) is caught before trial 1.
    """
    spec, problems = parse_sweep_table(table)
    if spec is None:
        return problems
    for parameter in spec.parameters:
        where = f'sweep.space."{parameter.path}"'
        for value in parameter.extremes():
            try:
                validate(override_text(parameter.path, value))
            except RecipeError as exc:
                for problem in exc.problems:
                    problems.append(
                        Problem(where, f"with value {value!r}: {problem.key}: {problem.problem}", problem.fix)
                    )
                break  # one failing value per parameter is enough to report
    return problems


def override_text(path: str, value: Any) -> str:
    """``table.key=<TOML value>``, the --set form of one trial parameter."""
    return f"{path}={toml_value(value)}"
