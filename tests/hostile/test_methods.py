"""Hostile inputs to ``[adapter]`` (issue 23): what peft would raise at the first step (or never), refused by
``peftkit validate`` with one message naming the key and the fix; a valid peft spelling peftkit once refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli
from tests.hostile.common import assert_clear_error


def write_recipe(folder: Path, adapter: dict[str, Any], train: dict[str, Any] | None = None) -> Path:
    from peftkit.recipe.toml_writer import to_toml

    (folder / "train.csv").write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    raw = {
        "model": {"name_or_path": "bert-base-uncased"},
        "task": {"type": "seq_cls"},
        "data": {"train_file": "train.csv"},
        "adapter": adapter,
        **({"train": train} if train else {}),
    }
    path = folder / "recipe.toml"
    path.write_text(to_toml(raw), encoding="utf-8")
    return path


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize(
    ("adapter", "needles"),
    [
        ({"method": "prefix_tuning"}, ["adapter.num_virtual_tokens", "needs num_virtual_tokens"]),
        ({"method": "p_tuning"}, ["adapter.num_virtual_tokens"]),
        ({"init_lora_weights": "loftq"}, ["adapter.init_lora_weights", "CUDA", "pissa"]),
        (
            {"method": "adalora", "total_step": 4, "tinit": 3, "tfinal": 2},
            ["adapter.total_step", "budgeting"],
        ),
    ],
)
def test_validate_refuses_what_peft_would_raise_later(
    adapter: dict[str, Any], needles: list[str], tmp_path: Path
) -> None:
    import torch

    if "loftq" in str(adapter) and torch.cuda.is_available():
        pytest.skip("LoftQ is refused only without CUDA")
    recipe = write_recipe(tmp_path, adapter)
    assert_clear_error(invoke_cli("validate", str(recipe)), str(recipe), *needles)


@pytest.mark.hostile("success")
def test_validate_accepts_pissa_niter(tmp_path: Path) -> None:
    out = invoke_cli("validate", str(write_recipe(tmp_path, {"init_lora_weights": "pissa_niter_4"})))
    assert out.exit_code == 0, out.output
    assert '"init_lora_weights": "pissa_niter_4"' in out.output


@pytest.mark.hostile("clear_error")
@pytest.mark.parametrize(
    ("adapter", "train", "needles"),
    [
        (
            {"method": "ia3", "loraplus_lr_ratio": 16},
            None,
            ["adapter.loraplus_lr_ratio", "method 'lora' only"],
        ),
        (
            {"method": "prompt_tuning", "num_virtual_tokens": 4, "loraplus_lr_ratio": 16},
            None,
            ["adapter.loraplus_lr_ratio", "no lora_A/lora_B"],
        ),
        ({"method": "adalora", "loraplus_lr_ratio": 16}, None, ["adapter.loraplus_lr_ratio", "lora_E"]),
        ({"loraplus_lr_ratio": 0}, None, ["adapter.loraplus_lr_ratio", "must be positive, got 0"]),
        ({"loraplus_lr_ratio": -2.0}, None, ["adapter.loraplus_lr_ratio", "must be positive"]),
        ({"loraplus_lr_ratio": "16"}, None, ["adapter.loraplus_lr_ratio", "expected"]),
        ({"loraplus_lr_embedding": 1e-5}, None, ["adapter.loraplus_lr_embedding", "loraplus_lr_ratio"]),
        (
            {"loraplus_lr_ratio": 16},
            {"deepspeed": "zero2_offload"},
            ["adapter.loraplus_lr_ratio", "zero2_offload.json", "its own optimizer"],
        ),
        ({"loraplus_lr_ratio": 16}, {"deepspeed": "zero3"}, ["adapter.loraplus_lr_ratio", "ZeRO-3"]),
        (
            {"loraplus_lr_ratio": 16},
            {"optim": "galore_adamw"},
            ["adapter.loraplus_lr_ratio", "galore_adamw", "own parameter groups"],
        ),
    ],
)
def test_validate_refuses_loraplus_where_it_cannot_work(
    adapter: dict[str, Any], train: dict[str, Any] | None, needles: list[str], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, adapter, train)
    assert_clear_error(invoke_cli("validate", str(recipe)), str(recipe), *needles)


@pytest.mark.hostile("success")
def test_validate_accepts_loraplus_with_8bit_adamw_and_zero2(tmp_path: Path) -> None:
    adapter = {"loraplus_lr_ratio": 16, "loraplus_lr_embedding": 1e-5, "use_dora": True}
    train = {"optim": "adamw_bnb_8bit", "deepspeed": "zero2"}
    out = invoke_cli("validate", str(write_recipe(tmp_path, adapter, train)))
    assert out.exit_code == 0, out.output
    assert '"loraplus_lr_ratio": 16' in out.output
