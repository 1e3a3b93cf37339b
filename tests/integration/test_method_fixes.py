"""Methods that ran but did something else than their name (issue 23), each checked against the saved run.

EVA initialises from the data; AdaLoRA allocates its ranks and reports the task loss; [quantization] keeps
the LM head a plain Linear; merge-adapters refuses residual-base inits; prompt tuning on a decoder-only
model predicts the same alone and in a padded batch; plan sizes seq2seq by its real lengths and builds
PiSSA on the meta device. (The validate-time refusals are in tests/hostile/test_methods.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli
from tests.integration.key_effects_common import (
    evaluate_metrics,
    finetune_raw,
    quick_train,
    read_json,
    read_jsonl,
    write_csv,
)


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fixes-data")
    write_csv(folder / "train.csv", 16)
    write_csv(folder / "validation.csv", 6, offset=1)
    return folder


def cls_raw(model: Path, data: Path, adapter: dict[str, Any], **train: Any) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": str(data / "train.csv"), "validation_file": str(data / "validation.csv")},
        "adapter": adapter,
        "train": quick_train(per_device_train_batch_size=4, **train),
    }


def saved_tensors(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter_model.safetensors"))


def test_eva_initialises_lora_a_from_the_data(tiny_bert_dir: Path, cls_data: Path, tmp_path: Path) -> None:
    """With learning rate 0 the saved A matrices are the init: EVA's are right-singular vectors of the
    layers' inputs (orthonormal rows); the placeholder (Kaiming-uniform) rows are not."""
    import torch

    adapter = {"r": 4, "init_lora_weights": "eva", "target_modules": ["query", "value"]}
    run = finetune_raw(cls_raw(tiny_bert_dir, cls_data, adapter, learning_rate=0.0), tmp_path)
    a_matrices = {k: v for k, v in saved_tensors(run).items() if "lora_A" in k}
    assert a_matrices
    for key, a in a_matrices.items():
        gram = a.float() @ a.float().T
        assert torch.allclose(gram, torch.eye(a.shape[0]), atol=1e-4), (key, gram)


def test_adalora_allocates_ranks_and_reports_the_task_loss(
    tiny_bert_dir: Path, cls_data: Path, tmp_path: Path
) -> None:
    """total_step comes from the planned steps; the ranks end below init_r (update_and_allocate ran);
    the run's validation loss, `peftkit evaluate`'s and the cross-entropy recomputed from the saved model
    are the same number (no orthogonality penalty in it)."""
    import torch

    from peftkit.runs import load_run

    adapter = {"method": "adalora", "init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 1, "deltaT": 1}
    run = finetune_raw(cls_raw(tiny_bert_dir, cls_data, adapter, max_steps=6, learning_rate=1e-2), tmp_path)
    config = read_json(run / "adapter_config.json")
    assert config["total_step"] == 6
    ranks = [int(sum(mask)) for mask in config["rank_pattern"].values()]
    assert ranks and sum(ranks) < 4 * len(ranks), ranks
    reported = read_json(run / "metrics.json")["validation"]["loss"]
    scores = evaluate_metrics(run)  # `peftkit evaluate` (raised AttributeError 'trainable_adapter_name')
    evaluated = scores.get("loss", scores.get("eval_loss"))
    assert evaluated is not None, scores
    loaded = load_run(run)
    texts = [line.rsplit(",", 1) for line in (cls_data / "validation.csv").read_text().splitlines()[1:]]
    labels = list(loaded.ctx.labels or ())
    batch = loaded.ctx.tokenizer(
        [t for t, _ in texts], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    task_loss = torch.nn.functional.cross_entropy(logits, torch.tensor([labels.index(y) for _, y in texts]))
    assert reported == pytest.approx(float(task_loss), rel=1e-4, abs=1e-5)
    assert evaluated == pytest.approx(float(task_loss), rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_keeps_the_lm_head_a_plain_linear(bits: int, tmp_path: Path) -> None:
    """T5's LM head (tied to its embeddings) and Llama's stay torch.nn.Linear; other linears are quantized;
    on CPU in 4 bits layers whose width the kernel cannot pack are skipped too (counted in the log)."""
    import torch

    from peftkit.modeling import load_stack
    from peftkit.recipe import recipe_from_dict
    from tests.integration.test_seq2seq_cli import save_tiny

    for kind in ("t5", "llama"):
        folder = save_tiny(kind, tmp_path / kind)
        raw = {
            "model": {"name_or_path": str(folder)},
            "task": {"type": "seq2seq", **({"prompt_template": "{source} ="} if kind == "llama" else {})},
            "data": {"dataset": str(Path(__file__).parents[1] / "fixtures" / "seq2seq")},
            "quantization": {"bits": bits},
        }
        recipe = recipe_from_dict(raw, base_dir=tmp_path, name=kind)
        model = load_stack(recipe, None, quantized=True).model
        assert type(model.lm_head) is torch.nn.Linear, (kind, type(model.lm_head))
        quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
        assert quantized, kind


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_run_predicts_its_saved_predictions(bits: int, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """``peftkit predict`` of a QLoRA run loads the base quantized, as it trained and evaluated: a
    regression score equals the saved one (loaded unquantized, the 4-bit run's first score moved from
    0.0087 to 0.0076)."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("validation", 4)):
        rows = ["text,label"] + [f"{'good ' * (i % 3 + 1)}day {i},{(i % 3) / 2}" for i in range(n)]
        (data / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    raw = {
        "model": {"name_or_path": str(tiny_bert_dir)},
        "task": {"type": "seq_cls", "max_length": 16, "num_labels": 1},
        "data": {"dataset": str(data)},
        "adapter": {"r": 4},
        "quantization": {"bits": bits},
        "train": quick_train(per_device_train_batch_size=4, learning_rate=1e-3),
    }
    run = finetune_raw(raw, tmp_path)
    saved = [r["prediction"] for r in read_jsonl(run / "predictions_validation.jsonl")]
    records = tmp_path / "records.jsonl"
    lines = (data / "validation.csv").read_text().splitlines()[1:]
    records.write_text("".join(json.dumps({"text": line.rsplit(",", 1)[0]}) + "\n" for line in lines))
    out = invoke_cli("predict", str(run), "--input", str(records), "--output", str(tmp_path / "p.jsonl"))
    assert out.exit_code == 0, out.output
    assert [r["prediction"] for r in read_jsonl(tmp_path / "p.jsonl")] == saved


@pytest.mark.parametrize("init", ["pissa_niter_2", "olora"])
def test_a_residual_init_run_saves_no_residual_base(
    init: str, tiny_bert_dir: Path, cls_data: Path, tmp_path: Path
) -> None:
    """The live base of a PiSSA/OLoRA run is the residual, and peft subtracts the init again from whatever
    base it loads the adapter onto, so the run saves no base weights (``from_pretrained(run_dir)`` was off:
    logits 1.4e-4 from the run's on the tiny BERT); reloaded through peftkit it predicts what it saved."""
    from peftkit.runs import load_run

    run = finetune_raw(cls_raw(tiny_bert_dir, cls_data, {"r": 4, "init_lora_weights": init}), tmp_path)
    assert not (run / "model.safetensors").exists()
    lines = (cls_data / "validation.csv").read_text().splitlines()[1:]
    loaded = load_run(run)
    predicted = loaded.task.predict(loaded.model, loaded.ctx, [{"text": t.rsplit(",", 1)[0]} for t in lines])
    saved = read_jsonl(run / "predictions_validation.jsonl")
    assert [p["prediction"] for p in predicted] == [r["prediction"] for r in saved]


def test_merge_adapters_refuses_a_residual_base_init(
    tiny_bert_dir: Path, cls_data: Path, tmp_path: Path
) -> None:
    """PiSSA's A·B is an update of W - B0·A0, not of the shared base: combining it would silently drop
    -B0·A0 (the combined config says init_lora_weights = true), so merge-adapters refuses it."""
    target = {"target_modules": ["query", "value"]}
    lora = finetune_raw(cls_raw(tiny_bert_dir, cls_data, {"r": 4, **target}), tmp_path, "lora")
    pissa = finetune_raw(
        cls_raw(tiny_bert_dir, cls_data, {"r": 4, "init_lora_weights": "pissa", **target}), tmp_path, "pissa"
    )
    out = invoke_cli(
        "merge-adapters", str(lora), str(pissa), "--method", "cat", "--out", str(tmp_path / "both")
    )
    assert out.exit_code == 2, out.output
    assert "init_lora_weights = 'pissa'" in out.output and "residual base" in out.output
    assert "Traceback" not in out.output
    assert not (tmp_path / "both").exists()


def test_prompt_tuned_decoder_only_predicts_the_same_alone_and_in_a_padded_batch(tmp_path: Path) -> None:
    from peftkit.runs import load_run
    from tests.integration.test_seq2seq_cli import save_tiny

    model = save_tiny("llama", tmp_path / "llama")
    raw = {
        "model": {"name_or_path": str(model)},
        "task": {
            "type": "seq2seq",
            "prompt_template": "{source} =",
            "max_source_length": 24,
            "max_target_length": 8,
            "max_new_tokens": 6,
            "metrics": ["chrf"],
        },
        "data": {
            "dataset": str(Path(__file__).parents[1] / "fixtures" / "seq2seq"),
            "columns": {"source": "en", "target": "es"},
        },
        "adapter": {"method": "prompt_tuning", "num_virtual_tokens": 4},
        "train": quick_train(per_device_train_batch_size=4, learning_rate=0.3),
    }
    run = finetune_raw(raw, tmp_path)
    loaded = load_run(run)
    records = [{"source": "Hi."}, {"source": "We need to find the car before it gets dark outside."}]
    batch = [p["prediction"] for p in loaded.task.predict(loaded.model, loaded.ctx, records)]
    alone = [loaded.task.predict(loaded.model, loaded.ctx, [r])[0]["prediction"] for r in records]
    assert batch == alone
    saved = [r["prediction"] for r in read_jsonl(run / "predictions_validation.jsonl")]
    assert len(saved) == 8


def test_plan_uses_seq2seq_lengths_and_builds_pissa_on_meta(tmp_path: Path) -> None:
    import peftkit
    from tests.integration.test_seq2seq_cli import save_tiny

    model = save_tiny("llama", tmp_path / "llama")
    raw = {
        "model": {"name_or_path": str(model)},
        "task": {
            "type": "seq2seq",
            "prompt_template": "{source} =",
            "max_source_length": 24,
            "max_target_length": 8,
        },
        "data": {
            "dataset": str(Path(__file__).parents[1] / "fixtures" / "seq2seq"),
            "columns": {"source": "en", "target": "es"},
        },
        "adapter": {"r": 4, "init_lora_weights": "pissa"},
        "train": {"per_device_train_batch_size": 2},
    }
    from peftkit.recipe import recipe_from_dict

    plan = peftkit.plan(recipe_from_dict(raw, base_dir=tmp_path, name="p"), device="cpu")
    # prompt and target joined, not task.max_length: the longest training feature, within their sum
    assert plan.seq_len <= 24 + 8 and "max_source_length + max_target_length 32" in plan.padding
    assert plan.trainable_params > 0
