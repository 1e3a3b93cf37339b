"""Class weights: the 'balanced' formula, weighted cross-entropy against a hand computation, the Trainer's
loss with weights, and the recipe/data errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from peftkit.recipe import RecipeError, recipe_from_dict
from peftkit.trainer import balanced_class_weights, class_weights_for, weighted_cross_entropy


def recipe_data(tmp_path: Path, **task: Any) -> dict[str, Any]:
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    return {
        "model": {"name_or_path": "bert-base-uncased"},
        "task": {"type": "seq_cls", **task},
        "data": {"train_file": "train.csv"},
    }


def test_balanced_weights_are_n_over_k_times_count() -> None:
    # 6 examples, 3 classes with counts 3, 2, 1 -> 6/(3*3), 6/(3*2), 6/(3*1)
    assert balanced_class_weights([0, 0, 0, 1, 1, 2], 3) == pytest.approx([2 / 3, 1.0, 2.0])


def test_balanced_weights_count_labelled_tokens_only() -> None:
    # token labels: -100 (sub-tokens, special tokens) does not count; class 2 never occurs -> weight 1
    labels = [[-100, 0, 0, 1, -100], [-100, 0, 1, 1, 1, -100]]
    # counts: class 0 = 3, class 1 = 4, class 2 = 0; n = 7
    assert balanced_class_weights(labels, 3) == pytest.approx([7 / 9, 7 / 12, 1.0])


def test_weighted_cross_entropy_matches_hand_computation() -> None:
    import torch

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    labels = torch.tensor([0, 1, 1, -100])
    weights = torch.tensor([1.0, 3.0])

    def nll(row: list[float], target: int) -> float:
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    rows = logits.tolist()
    terms = [(1.0, nll(rows[0], 0)), (3.0, nll(rows[1], 1)), (3.0, nll(rows[2], 1))]
    expected = sum(w * loss for w, loss in terms) / sum(w for w, _ in terms)
    got = weighted_cross_entropy(logits, labels, weights)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    unweighted = sum(loss for _, loss in terms) / 3
    assert abs(float(got) - unweighted) > 1e-3  # the weights change the loss


def test_trainer_loss_uses_the_class_weights(tmp_path: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from peftkit.trainer import with_shuffled_length_groups

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = BertForSequenceClassification(config)  # 2 labels
    model.eval()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = with_shuffled_length_groups(Trainer)(model=model, args=args)
    inputs = {
        "input_ids": torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0], [2, 11, 12, 3]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([0, 1, 1]),
    }
    with torch.no_grad():
        plain = float(trainer.compute_loss(model, inputs))
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        trainer.class_weights = torch.tensor([0.25, 4.0])
        weighted = float(trainer.compute_loss(model, inputs))
    log_probs = torch.log_softmax(logits, dim=-1)
    per_example = [-float(log_probs[i, t]) for i, t in enumerate([0, 1, 1])]
    assert plain == pytest.approx(sum(per_example) / 3, rel=1e-5)
    expected = (0.25 * per_example[0] + 4 * per_example[1] + 4 * per_example[2]) / (0.25 + 4 + 4)
    assert weighted == pytest.approx(expected, rel=1e-5)
    assert "labels" in inputs  # the caller's batch is left intact (prediction_step reads it)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"class_weights": [1.0, -2.0]}, "must not be negative"),
        ({"class_weights": [0.0, 0.0]}, "all 0"),
        ({"class_weights": "balance"}, "task.class_weights"),
        ({"class_weights": [1.0, 2.0, 3.0], "label_list": ["x", "y"]}, "3 weights for 2 labels"),
        ({"class_weights": "balanced", "num_labels": 1}, "regression"),
    ],
)
def test_class_weight_mistakes_are_recipe_errors(tmp_path: Path, task: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(recipe_data(tmp_path, **task), base_dir=tmp_path)
    assert message in str(caught.value)
    assert "task" in str(caught.value)


def test_token_cls_accepts_class_weights(tmp_path: Path) -> None:
    data = recipe_data(tmp_path)
    data["task"] = {"type": "token_cls", "class_weights": "balanced"}
    assert recipe_from_dict(data, base_dir=tmp_path).task.class_weights == "balanced"


def test_weight_list_must_match_the_labels_found_in_the_data() -> None:
    from peftkit.errors import DataError
    from peftkit.tasks.base import TaskContext
    from peftkit.tasks.seq_cls import SeqClsConfig

    ctx = TaskContext(cfg=SeqClsConfig(class_weights=[1.0, 2.0, 3.0]), tokenizer=None, labels=("ham", "spam"))
    with pytest.raises(DataError, match="3 weights but the data has 2 labels"):
        class_weights_for(ctx, {"labels": [0, 1]})
    ctx = TaskContext(cfg=SeqClsConfig(class_weights="balanced"), tokenizer=None, labels=("ham", "spam"))
    assert class_weights_for(ctx, {"labels": [0, 0, 0, 1]}) == pytest.approx([4 / 6, 2.0])
