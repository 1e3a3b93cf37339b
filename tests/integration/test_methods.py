"""The PEFT method family: each trains a few steps on a tiny BERT, saves, and reloads to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.adapters import METHODS as ADAPTER_METHODS
from peftkit.errors import RecipeError
from peftkit.recipe import recipe_from_dict
from peftkit.runs import load_run
from peftkit.training import finetune

METHODS: dict[str, dict] = {
    "lora": {"r": 4, "alpha": 8},
    "dora": {"method": "lora", "r": 4, "use_dora": True},
    "rslora": {"method": "lora", "r": 4, "alpha": 8, "use_rslora": True},
    "adalora": {"method": "adalora", "init_r": 6, "target_r": 2, "total_step": 6},
    "ia3": {"method": "ia3"},
    "loha": {"method": "loha", "r": 4},
    "lokr": {"method": "lokr", "r": 4},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
}


def write(path: Path, n: int) -> None:
    rows = ["text,label"] + [
        f"{'win cash prize' if i % 2 else 'see you soon'} {i},{'spam' if i % 2 else 'ham'}" for i in range(n)
    ]
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_and_reloads(tmp_path: Path, tiny_bert_dir: Path, name: str) -> None:
    write(tmp_path / "train.csv", 24)
    write(tmp_path / "validation.csv", 8)
    adapter = METHODS[name]
    raw = {
        "model": {"name_or_path": str(tiny_bert_dir)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": adapter,
        "train": {
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "eval_strategy": "no",
            "save_strategy": "no",
            "load_best_model_at_end": False,
            "report_to": ["none"],
            "output_dir": str(tmp_path / "run"),
        },
    }
    limited = ADAPTER_METHODS[adapter.get("method", "lora")].version_problem("seq_cls")
    if limited:  # refused when validated, naming the versions (prefix tuning under transformers >= 5.24)
        with pytest.raises(
            RecipeError, match=r"adapter\.method: .* cannot train a 'seq_cls' model with transformers"
        ):
            recipe_from_dict(raw, base_dir=tmp_path, name=name)
        return
    result = finetune(recipe_from_dict(raw, base_dir=tmp_path, name=name))
    config = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == {"dora": "LORA", "rslora": "LORA", "p_tuning": "P_TUNING"}.get(
        name, name.upper().replace("PREFIX_TUNING", "PREFIX_TUNING")
    )
    saved = [
        json.loads(line)["prediction"] for line in (result.run_dir / "predictions_validation.jsonl").open()
    ]
    loaded = load_run(result.run_dir)
    if config["peft_type"] == "LORA":
        check_lora_variant(name, config, result.run_dir, loaded.model)
    records = [
        {"text": line.split(",")[0]} for line in (tmp_path / "validation.csv").read_text().splitlines()[1:]
    ]
    assert [p["prediction"] for p in loaded.task.predict(loaded.model, loaded.ctx, records)] == saved


def check_lora_variant(name: str, config: dict, run_dir: Path, model: object) -> None:
    """DoRA saves a magnitude vector per adapted layer; rsLoRA scales by alpha/sqrt(r) instead of alpha/r.

    Both are LoRA to peft (peft_type "LORA"), so only these show that the variant really trained.
    """
    import math

    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
    magnitudes = [key for key in keys if "lora_magnitude_vector" in key]
    assert config["use_dora"] is (name == "dora")
    assert config["use_rslora"] is (name == "rslora")
    # DoRA: one magnitude vector per adapted linear (each has one lora_A); none otherwise
    assert len(magnitudes) == (len([key for key in keys if "lora_A" in key]) if name == "dora" else 0)
    assert magnitudes or name != "dora"
    scalings = [
        module.scaling["default"]
        for module in model.modules()  # type: ignore[attr-defined]
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    ]
    r, alpha = config["r"], config["lora_alpha"]
    expected = alpha / math.sqrt(r) if name == "rslora" else alpha / r
    assert scalings and all(scaling == pytest.approx(expected) for scaling in scalings), scalings
