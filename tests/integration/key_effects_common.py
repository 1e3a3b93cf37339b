"""Shared pieces of the recipe-key effect tests (``test_key_effects_*.py``): tiny data, tiny runs, readers.

Each effect test trains through the public Python API (``peftkit.finetune``) or runs a ``peftkit`` command
in-process (``invoke_cli``), then reads what the key changed in the run directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import invoke_cli

WORDS = {"spam": "win free prize cash claim now", "ham": "see you at home for dinner later"}


def write_csv(path: Path, n: int, offset: int = 0, text: str = "text", label: str = "label") -> Path:
    """``n`` short spam/ham rows whose words give the label away."""
    lines = [f"{text},{label}"]
    for i in range(n):
        name = "spam" if (i + offset) % 3 == 0 else "ham"
        words = WORDS[name].split()
        lines.append(f"{' '.join(words[: 2 + (i % 4)])} {i},{name}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def quick_train(**extra: Any) -> dict[str, Any]:
    """[train] of a run of a few steps: no checkpoints, no evaluation during training, no TensorBoard."""
    return {
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "eval_strategy": "no",
        "save_strategy": "no",
        "load_best_model_at_end": False,
        "report_to": ["none"],
        "logging_steps": 1,
        **extra,
    }


def finetune_raw(raw: dict[str, Any], work: Path, name: str = "run") -> Path:
    """Train ``raw`` (recipe data; [train] output_dir becomes ``work/name``) with ``peftkit.finetune``."""
    import peftkit
    from peftkit.recipe import recipe_from_dict

    raw = json.loads(json.dumps(raw))
    raw.setdefault("train", {})["output_dir"] = str(work / name)
    recipe = recipe_from_dict(raw, base_dir=work, name=name)
    return Path(peftkit.finetune(recipe).run_dir)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_metrics(run: Path) -> dict[str, Any]:
    return dict(read_json(run / "metrics.json")["train"])


def steps_trained(run: Path) -> int:
    """The last optimizer step in the run's log history."""
    return max(int(entry["step"]) for entry in read_json(run / "log_history.json"))


def with_task(run: Path, dest: Path, **task: Any) -> Path:
    """A copy of a run directory whose stored [task] section has ``task`` changed (what evaluate and
    predict read back); the adapter and everything else are the same."""
    shutil.copytree(run, dest)
    meta = read_json(dest / "peftkit_run.json")
    meta["recipe"]["task"].update(task)
    (dest / "peftkit_run.json").write_text(json.dumps(meta), encoding="utf-8")
    return dest


def cli_ok(*args: str) -> str:
    """``peftkit ARGS`` in-process; its output, after checking it succeeded."""
    result = invoke_cli(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return str(result.output)


def evaluate_metrics(run: Path, split: str = "validation") -> dict[str, float]:
    """``peftkit evaluate RUN --split SPLIT`` parsed back into numbers."""
    output = cli_ok("evaluate", str(run), "--split", split)
    line = output.rsplit(f"{split}: ", 1)[1].splitlines()[0]  # progress bars may share its line
    pairs = (item.split("=", 1) for item in line.split())
    return {key: float(value) for key, value in pairs}


def predict_records(run: Path, records: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """``peftkit predict`` on ``records``; the output records."""
    work.mkdir(parents=True, exist_ok=True)
    source, out = work / "in.jsonl", work / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cli_ok("predict", str(run), "--input", str(source), "--output", str(out))
    return read_jsonl(out)


def count_forward_batches(monkeypatch: Any, cls: Any) -> list[int]:
    """Patch ``cls.forward`` to record the batch size of every call; returns the (live) list."""
    sizes: list[int] = []
    original: Callable[..., Any] = cls.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        tensor = kwargs.get("input_ids", args[0] if args else None)
        if tensor is not None:
            sizes.append(int(tensor.shape[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return sizes
