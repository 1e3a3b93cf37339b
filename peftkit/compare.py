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
from dataclasses import dataclass
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
    metric_names: list[str] = []
    rows = []
    for name, (run_dir, metrics, meta) in zip(names, loaded, strict=True):
        recipe = meta.get("recipe") or {}
        adapter = recipe.get("adapter") or {}
        found = metrics.get(split)
        scores: dict[str, Any] = found if isinstance(found, dict) else {}
        shown = {k: v for k, v in scores.items() if _is_headline(k, v)}
        metric_names += [k for k in shown if k not in metric_names]
        trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
        rows.append(
            {
                "run": name,
                "model": Path(str((recipe.get("model") or {}).get("name_or_path", "?"))).name,
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
    ordered = sorted(metric_names, key=lambda k: (k != headline, k == "loss", k))
    columns = ["run", "model", "method", "r", *ordered, "trainable_params", "trainable_%", "wall_time_s"]
    columns += ["peak_rss_mb"]
    return Comparison(columns=columns, rows=rows, split=split, metrics=ordered)


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
