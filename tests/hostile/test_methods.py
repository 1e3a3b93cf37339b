"""Hostile inputs to ``[adapter]`` (issue 23): what peft would raise at the first step (or never), refused by
``peftkit validate`` with one message naming the key and the fix; a valid peft spelling peftkit once refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli
from tests.hostile.common import assert_clear_error


def write_recipe(folder: Path, adapter: dict[str, Any]) -> Path:
    from peftkit.recipe.toml_writer import to_toml

    (folder / "train.csv").write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    raw = {
        "model": {"name_or_path": "bert-base-uncased"},
        "task": {"type": "seq_cls"},
        "data": {"train_file": "train.csv"},
        "adapter": adapter,
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
