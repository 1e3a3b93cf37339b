"""The run directory: its layout, atomic writes, status, and reloading a trained run.

Layout (DESIGN.md)::

    adapter_config.json  adapter_model.safetensors  tokenizer files  config.json  labels.json
    peftkit_run.json (resolved recipe, versions, git commit, seed, data fingerprints, status)
    metrics.json  predictions_<split>.jsonl  plots/*.png  checkpoint-*/  runs/ (TensorBoard)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from peftkit.errors import RunDirError

RUN_META = "peftkit_run.json"
LABELS = "labels.json"
METRICS = "metrics.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PACKAGES = (
    "peftkit",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "evaluate",
    "bitsandbytes",
    "deepspeed",
    "tokenizers",
    "safetensors",
    "numpy",
    "scikit-learn",
)


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or the only process). Side effects go through this."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; is {path.parent} a complete peftkit run directory?") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(
            f"{path}:{exc.lineno}: corrupted JSON ({exc.msg}); re-run the step that wrote it"
        ) from None


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber an existing run unless asked; ``--overwrite`` removes it first."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder; choose another train.output_dir")
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if has_content and not (overwrite or resume):
        raise RunDirError(
            f"{run_dir}: a run already exists there. Nothing was changed. Use --overwrite to replace it, "
            f"--resume to continue it, or --set train.output_dir=<new folder>"
        )
    if has_content and overwrite and is_main_process():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(folder: Path) -> str | None:
    """The commit of the repository holding ``folder`` (with '+dirty' for local changes), if any."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def update_meta(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into peftkit_run.json (atomically)."""
    path = run_dir / RUN_META
    meta = read_json(path) if path.exists() else {}
    meta.update(fields)
    write_json_atomic(path, meta)
    return meta


@dataclass
class LoadedRun:
    """A trained run, reloaded from its folder alone."""

    run_dir: Path
    recipe: Any
    task: Any
    ctx: Any
    model: Any
    meta: dict[str, Any]


def check_complete(run_dir: Path, adapter_dir: Path | None = None) -> dict[str, Any]:
    """The run's metadata, after checking it finished and its adapter files are there."""
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory; pass the folder `peftkit finetune` wrote")
    meta = read_json(run_dir / RUN_META)
    status = meta.get("status")
    if status != "completed" and adapter_dir is None:
        checkpoints = sorted(
            run_dir.glob("checkpoint-*"),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
        )
        extra = f"; its last checkpoint is {checkpoints[-1]}" if checkpoints else ""
        error = f" ({meta['error']})" if meta.get("error") else ""
        raise RunDirError(
            f"{run_dir}: the run is {status!r}{error}, not completed{extra}. "
            "Finish it with `peftkit finetune <recipe> --resume` or name a checkpoint"
        )
    folder = adapter_dir or run_dir
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise RunDirError(f"{folder / name}: missing; the run directory is incomplete, re-run finetune")
    return meta


def load_run(run_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str] | None = None) -> LoadedRun:
    """Recipe, labels, tokenizer and the adapter model, from the run directory alone."""
    from peft import PeftModel

    from peftkit.modeling import load_model, load_model_config, load_tokenizer
    from peftkit.recipe import load_resolved_recipe
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    run_dir = Path(run_dir)
    folder = Path(adapter_dir) if adapter_dir else run_dir
    meta = check_complete(run_dir, Path(adapter_dir) if adapter_dir else None)
    recipe = load_resolved_recipe(run_dir)
    task = TASKS[recipe.task_name]
    labels_data = read_json(run_dir / LABELS)
    labels = tuple(labels_data["labels"]) if labels_data.get("labels") is not None else None
    tokenizer = load_tokenizer(recipe.model, source=str(run_dir))
    model_config = load_model_config(recipe.model)
    ctx = TaskContext(cfg=recipe.task, tokenizer=tokenizer, labels=labels, model_config=model_config)
    base = load_model(recipe.model, task, ctx, quant=None)
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{folder}: the adapter cannot be loaded ({first}); re-run finetune") from None
    model.eval()
    return LoadedRun(run_dir=run_dir, recipe=recipe, task=task, ctx=ctx, model=model, meta=meta)
