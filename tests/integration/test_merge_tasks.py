"""``peftkit merge`` for every registered task: tiny runs, merged, then plain transformers in a fresh process.

Each task trains a tiny model for a few steps, merges it (verified by peftkit itself), and then a fresh Python
process that never imports peft or peftkit loads every merged folder with ``AutoModelFor*.from_pretrained``
(and ``pipeline()`` where transformers 5 has one), tokenizes with the saved tokenizer and records its inputs,
logits, pipeline outputs and greedy generations. This process feeds the same inputs to the adapter model and
requires the same logits (max |Δ| ≤ 1e-5), the same labels and the same generated tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftkit.tasks import TASKS
from tests.conftest import FIXTURES, REPO, invoke_cli

TOLERANCE = 1e-5
NER_DATA = REPO / "data" / "ner_fixture"
QA_DATA = REPO / "data" / "qa_fixture" / "v2"
SEQ2SEQ_DATA = FIXTURES / "seq2seq"
WORDS = {"spam": "win free prize cash claim now", "ham": "see you at home for dinner later"}

SEQ_CLS_RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
train_file = "{work}/train.csv"
validation_file = "{work}/validation.csv"
test_file = "{work}/test.csv"

[adapter]
{adapter}
{quantization}
[train]
num_train_epochs = {epochs}
per_device_train_batch_size = 8
learning_rate = {lr}
logging_steps = 2
seed = {seed}
report_to = []
output_dir = "{out}"
"""


def write_seq_cls_data(work: Path, labels: tuple[str, str] = ("ham", "spam")) -> None:
    """Short texts whose words give the label away: a few steps teach even a tiny model something."""
    for name, count, offset in (("train", 48, 0), ("validation", 12, 1), ("test", 12, 2)):
        lines = ["text,label"]
        for i in range(count):
            label = labels[1] if (i + offset) % 3 == 0 else labels[0]
            words = WORDS["spam" if label == labels[1] else "ham"].split()
            lines.append(f"{' '.join(words[: 2 + (i % 4)])} {i},{label}")
        (work / f"{name}.csv").write_text("\n".join(lines) + "\n")


def train_seq_cls(
    work: Path,
    model: Path,
    name: str = "run",
    *,
    r: int = 4,
    alpha: int = 8,
    seed: int = 42,
    lr: float = 2e-2,
    epochs: int = 5,
    quantization: str = "",
    labels: tuple[str, str] = ("ham", "spam"),
    adapter: str | None = None,
) -> Path:
    """A tiny seq_cls LoRA run trained in this process (seconds); returns its run directory."""
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "train.csv").is_file():
        write_seq_cls_data(work, labels)
    recipe = work / f"{name}.toml"
    recipe.write_text(
        SEQ_CLS_RECIPE.format(
            model=model,
            work=work,
            adapter=adapter or f'r = {r}\nalpha = {alpha}\ntarget_modules = ["query", "value", "dense"]',
            seed=seed,
            lr=lr,
            epochs=epochs,
            quantization=quantization,
            out=work / name,
        )
    )
    return finetune(load_recipe(recipe)).run_dir


# --------------------------------------------------------------------------------------------------
# Tiny runs of every registered task


def _train_from_text(recipe_text: str, work: Path) -> Path:
    from peftkit.recipe import load_recipe
    from peftkit.training import finetune

    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.toml"
    recipe.write_text(recipe_text)
    return finetune(load_recipe(recipe)).run_dir


def _token_cls_run(work: Path, model: Path) -> Path:
    return _train_from_text(
        f"""
[model]
name_or_path = "{model}"
[task]
type = "token_cls"
max_length = 64
[data]
dataset = "{NER_DATA}"
[adapter]
r = 4
alpha = 8
target_modules = ["query", "value"]
[train]
output_dir = "{work / "run"}"
report_to = []
learning_rate = 5e-3
num_train_epochs = 2
per_device_train_batch_size = 8
""",
        work,
    )


def _qa_run(work: Path, model: Path) -> Path:
    return _train_from_text(
        f"""
[model]
name_or_path = "{model}"
[task]
type = "qa"
max_length = 64
doc_stride = 16
version_2_with_negative = true
[data]
dataset = "{QA_DATA}"
[adapter]
r = 4
alpha = 8
target_modules = ["query", "value"]
[train]
output_dir = "{work / "run"}"
report_to = []
num_train_epochs = 1
per_device_train_batch_size = 16
learning_rate = 1e-3
""",
        work,
    )


def _seq2seq_run(work: Path, kind: str, task_lines: str = "") -> Path:
    """A tiny seq2seq run (``kind`` t5 or llama); ``task_lines``: more keys of its [task] table."""
    from tests.integration.test_seq2seq_cli import save_tiny

    model = save_tiny(kind, work / "model")
    task = (
        'source_prefix = "translate English to Spanish: "'
        if kind == "t5"
        else 'prompt_template = "Spanish: {source}"'
    )
    targets = '["q", "v"]' if kind == "t5" else '["q_proj", "v_proj"]'
    return _train_from_text(
        f"""
[model]
name_or_path = "{model}"
[task]
type = "seq2seq"
{task}
{task_lines}
max_source_length = 16
max_target_length = 16
max_new_tokens = 8
metrics = ["chrf"]
[data]
dataset = "{SEQ2SEQ_DATA}"
columns = {{ source = "en", target = "es" }}
[adapter]
r = 4
alpha = 8
target_modules = {targets}
[train]
num_train_epochs = 2
per_device_train_batch_size = 8
per_device_eval_batch_size = 8
learning_rate = 1e-3
report_to = []
output_dir = "{work / "run"}"
""",
        work,
    )


CASES = ["seq_cls", "token_cls", "qa", "seq2seq_t5", "seq2seq_llama"]


def _task_of(case: str) -> str:
    return case.split("_t5")[0].split("_llama")[0]


@pytest.fixture(scope="module")
def merged_runs(
    tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """case → (run directory, merged folder) for every case whose task is registered."""
    from peftkit.merge import merge_run

    work = tmp_path_factory.mktemp("merge-tasks")
    builders = {
        "seq_cls": lambda w: train_seq_cls(w, tiny_bert_dir),
        "token_cls": lambda w: _token_cls_run(w, tiny_bert_dir),
        "qa": lambda w: _qa_run(w, tiny_bert_dir),
        "seq2seq_t5": lambda w: _seq2seq_run(w, "t5"),
        "seq2seq_llama": lambda w: _seq2seq_run(w, "llama"),
    }
    out: dict[str, tuple[Path, Path]] = {}
    for case, build in builders.items():
        if _task_of(case) not in TASKS:
            continue
        run = build(work / case)
        result = merge_run(run, work / f"{case}-merged")
        assert result.report["status"] == "passed", result.report
        out[case] = (run, result.out_dir)
    return out


# The fresh process: plain transformers only. It records the exact inputs it fed, so this process can feed the
# adapter model the very same tensors.
RELOAD_SCRIPT = r"""
import inspect, json, sys
import torch
import transformers
from transformers import AutoTokenizer, pipeline

spec = json.load(open(sys.argv[1]))
results = {}
for case, item in spec.items():
    folder, task = item["folder"], item["task"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = getattr(transformers, item["model_class"]).from_pretrained(folder, dtype=torch.float32).eval()
    if task == "qa":
        encoded = tokenizer(item["questions"], item["contexts"], padding=True, truncation="only_second",
                            max_length=64, return_tensors="pt")
    elif task == "seq2seq" and model.config.is_encoder_decoder:
        encoded = tokenizer(item["texts"], text_target=item["targets"], padding=True, return_tensors="pt")
        encoded["labels"][encoded["labels"] == tokenizer.pad_token_id] = -100
    else:
        encoded = tokenizer(item["texts"], padding=True, return_tensors="pt")
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        encoded.pop("token_type_ids", None)
    with torch.no_grad():
        outputs = model(**encoded)
    record = {
        "inputs": {k: v.tolist() for k, v in encoded.items()},
        "outputs": {k: getattr(outputs, k).tolist() for k in ("logits", "start_logits", "end_logits")
                    if getattr(outputs, k, None) is not None},
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "model_class": type(model).__name__,
    }
    if task == "seq2seq":
        gen_inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            generated = model.generate(**gen_inputs, max_new_tokens=8, do_sample=False, num_beams=1)
        record["generated"] = generated.tolist()
    if item["pipeline"]:
        pipe = pipeline(item["pipeline"], model=folder, tokenizer=folder)
        if item["pipeline"] == "text-classification":
            record["pipeline"] = pipe(item["texts"], top_k=None)
        elif item["pipeline"] == "token-classification":
            record["pipeline"] = [pipe(text) for text in item["texts"]]
        else:
            record["pipeline"] = pipe(
                item["texts"], max_new_tokens=8, do_sample=False, return_full_text=False
            )
    results[case] = record
assert "peft" not in sys.modules and "peftkit" not in sys.modules, "plain transformers only"
json.dump(results, open(sys.argv[2], "w"), default=float)
"""


def _inputs_for(case: str, run: Path) -> dict[str, Any]:
    task = _task_of(case)
    if task == "seq_cls":
        lines = (run.parent / "test.csv").read_text().splitlines()[1:]
        return {"texts": [line.rsplit(",", 1)[0] for line in lines]}
    if task == "token_cls":
        return {
            "texts": ["Angela Merkel met Emmanuel Macron in Paris on Tuesday .", "The United Nations met ."]
        }
    if task == "qa":
        rows = [json.loads(line) for line in (QA_DATA / "test.jsonl").read_text().splitlines()[:6]]
        return {"questions": [r["question"] for r in rows], "contexts": [r["context"] for r in rows]}
    rows = [json.loads(line) for line in (SEQ2SEQ_DATA / "test.jsonl").read_text().splitlines()[:4]]
    return {"texts": [r["en"] for r in rows], "targets": [r["es"] for r in rows]}


@pytest.fixture(scope="module")
def reloaded(merged_runs: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run RELOAD_SCRIPT once over every merged folder; its JSON results by case."""
    work = tmp_path_factory.mktemp("reload")
    spec = {}
    for case, (run, merged) in merged_runs.items():
        report = json.loads((merged / "merge_report.json").read_text())
        spec[case] = {
            "folder": str(merged),
            "task": report["task"],
            "model_class": report["model_class"],
            "pipeline": report["pipeline_task"],
            **_inputs_for(case, run),
        }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "reload.py").write_text(RELOAD_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(work / "reload.py"), str(work / "spec.json"), str(work / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


def _adapter_outputs(
    run: Path, inputs: dict[str, list[Any]], generate: bool
) -> tuple[dict[str, Any], Any, Any]:
    """The adapter model (peftkit's loader) on exactly the tensors the fresh process fed the merged model."""
    import torch

    from peftkit.runs import load_run

    loaded = load_run(run)
    loaded.task.collator(loaded.ctx, loaded.model)  # seq2seq: the generation settings the merge saved
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        outputs = loaded.model(**tensors)
        generated = None
        if generate:
            gen_inputs = {k: v for k, v in tensors.items() if k in ("input_ids", "attention_mask")}
            generated = loaded.model.generate(**gen_inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    values = {
        k: getattr(outputs, k)
        for k in ("logits", "start_logits", "end_logits")
        if getattr(outputs, k, None) is not None
    }
    return values, (generated.tolist() if generated is not None else None), loaded.ctx.labels


@pytest.mark.parametrize("case", CASES)
def test_merged_model_reproduces_the_adapter_in_plain_transformers(
    case: str, merged_runs: dict[str, tuple[Path, Path]], reloaded: dict[str, Any]
) -> None:
    import torch

    if case not in merged_runs:
        pytest.skip(f"task {_task_of(case)!r} is not registered in peftkit.tasks.TASKS yet")
    run, merged = merged_runs[case]
    record = reloaded[case]
    task = _task_of(case)
    adapter, generated, labels = _adapter_outputs(run, record["inputs"], generate=task == "seq2seq")
    assert set(adapter) == set(record["outputs"])
    for key, value in adapter.items():
        merged_value = torch.tensor(record["outputs"][key])
        assert merged_value.shape == value.shape
        assert float((merged_value - value).abs().max()) <= TOLERANCE, key
        assert torch.equal(merged_value.argmax(-1), value.argmax(-1)), key
    if labels is not None:  # label names survive the merge, in id order
        assert record["id2label"] == {str(i): name for i, name in enumerate(labels)}
    if generated is not None:
        assert record["generated"] == generated
    report = json.loads((merged / "merge_report.json").read_text())
    check = report["verification"]["checks"][-1]
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 and check["agreement"] == 1.0
    assert report["verification"]["sample"]["source"] == "run data"
    assert check["predictions_compared"] > 0
    assert "max abs Δlogit" in (merged / "README.md").read_text()
    assert not list(merged.glob("adapter_*")), "a merged folder holds no adapter files"


def test_pipelines_give_the_adapters_labels(
    merged_runs: dict[str, tuple[Path, Path]], reloaded: dict[str, Any]
) -> None:
    """text-classification scores and token-classification tags from pipeline() match the adapter model."""
    import torch

    for case in ("seq_cls", "token_cls"):
        if case not in merged_runs:
            continue
        run, _ = merged_runs[case]
        record = reloaded[case]
        adapter, _, labels = _adapter_outputs(run, record["inputs"], generate=False)
        assert labels is not None
        probabilities = adapter["logits"].softmax(-1)
        if case == "seq_cls":
            for row, scores in zip(probabilities, record["pipeline"], strict=True):
                by_label = {item["label"]: item["score"] for item in scores}
                assert set(by_label) == set(labels)
                for i, label in enumerate(labels):
                    assert abs(by_label[label] - float(row[i])) <= TOLERANCE
        else:
            mask = torch.tensor(record["inputs"]["attention_mask"]).bool()
            for sentence, (row, entities) in enumerate(zip(probabilities, record["pipeline"], strict=True)):
                reported = {item["index"]: item for item in entities}
                for position in range(1, int(mask[sentence].sum()) - 1):  # skip [CLS] and [SEP]
                    tag = labels[int(row[position].argmax())]
                    if position in reported:
                        assert reported[position]["entity"] == tag
                        assert abs(reported[position]["score"] - float(row[position].max())) <= TOLERANCE
                    else:
                        assert tag == "O"  # the pipeline leaves out only "O" tokens
    if "seq2seq_llama" in merged_runs:
        outputs = reloaded["seq2seq_llama"]["pipeline"]
        assert len(outputs) == 4 and all(isinstance(o[0]["generated_text"], str) for o in outputs)


# --------------------------------------------------------------------------------------------------
# The CLI, checkpoints, half precision, safety


@pytest.fixture(scope="module")
def seq_cls_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_seq_cls(tmp_path_factory.mktemp("merge-cli"), tiny_bert_dir)


def test_cli_merge_prints_the_checks_and_refuses_to_overwrite(seq_cls_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke_cli("merge", str(seq_cls_run), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (
        "max |Δlogit|" in result.output and "agreement 1.0000" in result.output and "passed" in result.output
    )
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "labels.json",
        "merge_report.json",
        "README.md",
    }
    assert expected <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"
    card = (out / "README.md").read_text()
    for text in ("pipeline_tag: text-classification", "LoRA (r=4, alpha=8)", "| 1 | spam |", "## Recipe"):
        assert text in card
    before = (out / "model.safetensors").stat().st_mtime_ns
    again = invoke_cli("merge", str(seq_cls_run), "--out", str(out))
    assert again.exit_code == 2 and "already exists. Nothing was changed" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    replaced = invoke_cli("merge", str(seq_cls_run), "--out", str(out), "--overwrite", "--dtype", "bfloat16")
    assert replaced.exit_code == 0, replaced.output
    report = json.loads((out / "merge_report.json").read_text())
    assert (
        report["dtype"] == "bfloat16" and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    )
    names = [check["name"] for check in report["verification"]["checks"]]
    assert names == ["merge", "saved"]  # the float32 merge is checked strictly before the cast
    assert report["verification"]["checks"][0]["max_abs_diff"] <= 1e-4


def test_merge_refuses_unfinished_runs_and_names_the_checkpoint(seq_cls_run: Path, tmp_path: Path) -> None:
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(seq_cls_run, unfinished)
    meta = json.loads((unfinished / "peftkit_run.json").read_text())
    meta["status"] = "interrupted"
    (unfinished / "peftkit_run.json").write_text(json.dumps(meta))
    result = invoke_cli("merge", str(unfinished), "--out", str(tmp_path / "m"))
    assert result.exit_code == 2 and "not completed" in result.output and "checkpoint-" in result.output
    assert not (tmp_path / "m").exists()
    # naming a checkpoint of the unfinished run works, and the labels still come through
    last = sorted(unfinished.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    (unfinished / "labels.json").unlink()  # written only when a run completes
    ok = invoke_cli("merge", str(last), "--out", str(tmp_path / "m"))
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["checkpoint"] == last.name and report["labels"] == ["ham", "spam"]


def test_checkpoint_best_and_last(seq_cls_run: Path, tmp_path: Path) -> None:
    from peftkit.merge import MergeError, best_checkpoint, resolve_adapter
    from peftkit.runs import list_checkpoints

    checkpoints = list_checkpoints(seq_cls_run)  # newest first
    assert checkpoints, "the run keeps its checkpoints"
    assert resolve_adapter(seq_cls_run, "last") == (seq_cls_run, checkpoints[0])
    best = best_checkpoint(seq_cls_run)
    recorded = json.loads((seq_cls_run / "metrics.json").read_text())["best_checkpoint"]
    assert best is not None and best.name == Path(recorded).name
    assert resolve_adapter(seq_cls_run, "best") == (seq_cls_run, best)
    assert resolve_adapter(seq_cls_run, checkpoints[-1].name) == (seq_cls_run, checkpoints[-1])
    with pytest.raises(MergeError, match="no such checkpoint"):
        resolve_adapter(seq_cls_run, "checkpoint-999")


def test_a_merge_that_does_not_reproduce_the_adapter_fails_and_leaves_nothing(
    seq_cls_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge bug (simulated: the merged classifier drifts by 1e-3) is caught by the reload check."""
    import torch
    from peft.tuners.tuners_utils import BaseTuner

    from peftkit.merge import MergeVerificationError, merge_run

    original = BaseTuner.merge_and_unload

    def drifting_merge(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.classifier.bias.add_(1e-3)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", drifting_merge)
    out = tmp_path / "merged"
    with pytest.raises(MergeVerificationError, match=r"max \|Δlogit\| = 0.001") as failure:
        merge_run(seq_cls_run, out)
    assert "nothing was written" in str(failure.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def save_tiny_bert(folder: Path, hidden: int) -> Path:
    """A 2-layer random BERT of the given width with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.conftest import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qlora_run_merges_into_an_unquantized_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from peftkit.merge import merge_run

    # bitsandbytes' CPU 4-bit inference packs weights in blocks of 64 inputs: the 32-wide tiny BERT is too
    # narrow for it
    model = save_tiny_bert(tmp_path / "bert-64", hidden=64)
    quantization = '[quantization]\nbits = 4\ncompute_dtype = "float32"\n'
    run = train_seq_cls(tmp_path / "qlora", model, quantization=quantization)
    recipe = json.loads((run / "peftkit_run.json").read_text())["recipe"]
    assert recipe["quantization"]["bits"] == 4
    for dtype in ("float32", "bfloat16"):
        result = merge_run(run, tmp_path / f"merged-{dtype}", dtype=dtype)
        report = result.report
        assert report["status"] == "passed" and report["dtype"] == dtype
        assert "unquantized" in report["merged_into"]
        assert all(check["passed"] for check in report["verification"]["checks"])
        quantized = report["verification"]["quantized_adapter"]
        assert "max_abs_diff" in quantized, quantized  # the 4-bit model as trained, for the record
        config = json.loads((result.out_dir / "config.json").read_text())
        assert "quantization_config" not in config, "the merged model is a plain, unquantized model"
        assert "never merged into" in (result.out_dir / "README.md").read_text()


def test_ia3_merges_and_sharded_output_reloads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Another mergeable method (IA3 scales activations), saved in several shards with an index."""
    from peftkit.merge import merge_run

    adapter = (
        'method = "ia3"\ntarget_modules = ["key", "value", "output.dense"]\n'
        'feedforward_modules = ["output.dense"]'
    )
    run = train_seq_cls(tmp_path / "ia3", tiny_bert_dir, adapter=adapter, lr=5e-2)
    result = merge_run(run, tmp_path / "merged", max_shard_size="1MB")
    report = result.report
    assert report["status"] == "passed" and report["adapter"]["peft_type"] == "IA3"
    assert report["sharded"] and len(report["weight_files"]) > 1
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["weight_files"])
    check = report["verification"]["checks"][-1]
    assert check["max_abs_diff"] <= 1e-4 and check["agreement"] == 1.0
