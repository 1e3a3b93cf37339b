"""Loss and metric curves from the Trainer's log history, as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(log_history: list[dict[str, Any]], out_dir: Path, metric: str | None = None) -> list[Path]:
    """``loss.png`` (train and eval loss against step) and ``<metric>.png`` (eval metric against step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if train or evals:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="o", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "loss.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    key = f"eval_{metric}" if metric else None
    points = [(e["step"], e[key]) for e in log_history if key and key in e and "step" in e]
    if points and metric:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
