"""Training batch order on SMS spam: peftkit's shuffled length groups vs transformers' LengthGroupedSampler.

transformers' ``LengthGroupedSampler`` visits each mega-batch from its longest to its shortest examples; on
SMS spam, where spam is long and ham short, that gives long runs of one class (peftkit/batching.py). This
runs ``recipes/seq_cls_lora.toml`` as shipped (same seed, same data, same schedule) twice through
``peftkit.training.finetune``: once with peftkit's sampler, once with transformers' sampler put in its place,
and reports the validation metrics of the evaluation at the end of epoch 1. Training stops after that
evaluation (``--epochs-run``, default 1), so the learning-rate schedule is the recipe's 2-epoch one.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/bench_batch_order.py [--work /tmp/batch_order]

Not part of the test suite. Prints one line per arm.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "seq_cls_lora.toml"


def transformers_sampler(lengths: Any, batch_size: int, seed: int) -> Any:
    """transformers' own training sampler, built as its Trainer builds it (the global RNG, no generator)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler(batch_size, lengths=list(lengths))


def run_arm(arm: str, work: Path, epochs_run: int, extra: list[str]) -> dict[str, Any]:
    from transformers import TrainerCallback

    import peftkit.batching
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    evaluations: list[dict[str, Any]] = []

    class StopAfter(TrainerCallback):  # type: ignore[misc]
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any) -> None:
            evaluations.append({"epoch": state.epoch, **(metrics or {})})

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.epoch is not None and state.epoch >= epochs_run - 1e-6:
                control.should_training_stop = True  # the epoch's evaluation still runs first
            return control

    original = peftkit.batching.ShuffledLengthGroupedSampler
    if arm == "transformers":
        peftkit.batching.ShuffledLengthGroupedSampler = transformers_sampler  # type: ignore[assignment,misc]
    try:
        recipe = load_recipe(RECIPE, [f"train.output_dir='{work / arm}'", "train.report_to=[]", *extra])
        started = time.perf_counter()
        finetune(recipe, overwrite=True, callbacks=[StopAfter()])
        wall = time.perf_counter() - started
    finally:
        peftkit.batching.ShuffledLengthGroupedSampler = original  # type: ignore[misc]
    first = next(e for e in evaluations if e.get("epoch") and e["epoch"] >= epochs_run - 1e-6)
    keys = ("epoch", "eval_loss", "eval_accuracy", "eval_f1_spam", "eval_recall_spam", "eval_precision_spam")
    return {"arm": arm, "wall_s": round(wall, 1), **{k: first.get(k) for k in keys if k in first}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/batch_order"))
    parser.add_argument("--epochs-run", type=int, default=1, help="epochs trained before stopping")
    parser.add_argument("--arms", default="peftkit,transformers")
    parser.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    args = parser.parse_args()
    for arm in args.arms.split(","):
        print(json.dumps(run_arm(arm, args.work, args.epochs_run, args.set)), flush=True)


if __name__ == "__main__":
    main()
