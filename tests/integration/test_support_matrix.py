"""The support matrix: every adapter method and memory lever × task shape, end to end, or refused at validate.

Each cell trains a tiny random model (built from a config, shared by all cells of its shape) for two steps
through ``peftkit.finetune``, then: the run reloaded from disk predicts its saved validation predictions
again; ``peftkit merge`` passes its parity check or refuses by design (prompt learning has no weights to
merge); the saved adapter is the method's (``adapter_config.json``'s peft_type and its tensors' names). A
cell either ends that round trip or is refused with a :class:`RecipeError` (``peftkit validate``'s, or
finetune's check of the base model's architecture); any other exception fails the test. The last test
reloads every trained run in one fresh process and predicts again, and writes the results as JSON
(``PEFTKIT_SUPPORT_MATRIX_JSON``, e.g. docs/support-matrix.json), which ``scripts/support_matrix.py`` turns
into docs/support-matrix.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, minilm_path, save_tiny_bert
from tests.integration.key_effects_common import quick_train, read_jsonl, write_csv

pytestmark = pytest.mark.slow

NER_LABELS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]

# method name in the matrix → [adapter] table
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "alpha": 8},
    "dora": {"r": 4, "use_dora": True},
    "rslora": {"r": 4, "use_rslora": True},
    "loraplus": {"r": 4, "alpha": 8, "loraplus_lr_ratio": 16},
    "pissa": {"r": 4, "init_lora_weights": "pissa"},
    "pissa_niter_4": {"r": 4, "init_lora_weights": "pissa_niter_4"},
    "olora": {"r": 4, "init_lora_weights": "olora"},
    "eva": {"r": 4, "init_lora_weights": "eva"},
    "loftq": {"r": 4, "init_lora_weights": "loftq"},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0},
    "ia3": {"method": "ia3"},
    "loha": {"method": "loha", "r": 4},
    "lokr": {"method": "lokr", "r": 4},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
}
# memory lever → recipe tables it changes (with LoRA)
LEVERS: dict[str, dict[str, Any]] = {
    "4-bit": {"quantization": {"bits": 4}},
    "8-bit": {"quantization": {"bits": 8}},
    "gradient_checkpointing": {"train": {"gradient_checkpointing": True}},
    "adamw_8bit": {"train": {"optim": "adamw_bnb_8bit"}},
    "paged_adamw_8bit": {"train": {"optim": "paged_adamw_8bit"}},
}
SHAPES = ("seq_cls", "seq_cls_pair", "regression", "token_cls", "qa", "t5", "bart", "llama")
# adapter tensors that show the method trained (names in adapter_model.safetensors)
TENSOR_MARKS = {
    "LORA": "lora_A",
    "ADALORA": "lora_E",
    "IA3": "ia3_l",
    "LOHA": "hada_w1",
    "LOKR": "lokr_w1",
    "PREFIX_TUNING": "prompt_embeddings",
    "PROMPT_TUNING": "prompt_embeddings",
    "P_TUNING": "prompt_embeddings",
}
RESULTS: dict[str, dict[str, Any]] = {}
# the fixed and the refused combinations first, so that a partial run (-x, a timeout) covers them
FIRST = ("loftq", "eva", "adalora", "prefix_tuning", "prompt_tuning", "p_tuning", "pissa", "olora")
CELLS = (
    [("lora", lever, shape) for lever in LEVERS for shape in SHAPES]
    + [(m, "none", s) for m in FIRST for s in SHAPES]
    + [(m, "none", s) for m in METHODS if m not in FIRST for s in SHAPES]
)
# The whole matrix (168 cells; 14 minutes on one thread of a busy 2-core machine, 2026-12-02) runs with
# PEFTKIT_SUPPORT_MATRIX=1, when docs/support-matrix.md is regenerated (scripts/support_matrix.py; --check
# compares the doc with a run's results). The default suite, which CI runs, takes its diagonal: row i
# (methods, then levers) on shape i mod 8, so every method, every lever and every task shape runs at least
# once, for the cost of one column (21 cells): the whole matrix would add 10-14 minutes to a suite that
# should stay well under 30.
ROWS = [(m, "none") for m in METHODS] + [("lora", lever) for lever in LEVERS]
DIAGONAL = {(m, lever, SHAPES[i % len(SHAPES)]) for i, (m, lever) in enumerate(ROWS)}
if not os.environ.get("PEFTKIT_SUPPORT_MATRIX"):
    CELLS = [cell for cell in CELLS if cell in DIAGONAL]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per architecture, with MiniLM's tokenizer ([SEP] as EOS for generation)."""
    from tests.integration.test_seq2seq_cli import save_tiny

    work = tmp_path_factory.mktemp("matrix-bases")
    folders = {"bert": save_tiny_bert(work / "bert")}
    for kind in ("t5", "llama"):
        folders[kind] = save_tiny(kind, work / kind)
    folders["bart"] = save_tiny_bart(work / "bart")
    return folders


def save_tiny_bart(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        decoder_start_token_id=102, forced_eos_token_id=None,
    )  # fmt: skip
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small data per task shape: a dozen training rows, four to validate."""
    from tests.integration.test_key_effects_task import QA_DATA, SEQ2SEQ_DATA, ner_with_integer_tags

    work = tmp_path_factory.mktemp("matrix-data")
    out: dict[str, Path] = {}
    cls = work / "seq_cls"
    cls.mkdir()
    write_csv(cls / "train.csv", 12)
    write_csv(cls / "validation.csv", 4, offset=1)
    out["seq_cls"] = cls
    pair = work / "pair"
    pair.mkdir()
    for split, n in (("train", 12), ("validation", 4)):
        rows = ["premise,hypothesis,label"] + [
            f"a cat sat {i},{'a cat' if i % 2 else 'a dog'} {i},{'yes' if i % 2 else 'no'}" for i in range(n)
        ]
        (pair / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out["seq_cls_pair"] = pair
    reg = work / "regression"
    reg.mkdir()
    for split, n in (("train", 12), ("validation", 4)):
        rows = ["text,label"] + [f"{'good ' * (i % 3 + 1)}day {i},{(i % 3) / 2}" for i in range(n)]
        (reg / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out["regression"] = reg
    out["token_cls"] = ner_with_integer_tags(work / "ner")
    for name, source, train_rows in (("qa", QA_DATA, 12), ("seq2seq", SEQ2SEQ_DATA, 8)):
        folder = work / name
        folder.mkdir()
        for split, n in (("train", train_rows), ("validation", 4)):
            lines = (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[name] = folder
    return out


def recipe_for(shape: str, bases: dict[str, Path], data: dict[str, Path]) -> dict[str, Any]:
    """The recipe of a shape, without [adapter]."""
    bert = {"name_or_path": str(bases["bert"])}
    if shape == "seq_cls":
        task = {"type": "seq_cls", "max_length": 16}
        source = {
            "train_file": str(data["seq_cls"] / "train.csv"),
            "validation_file": str(data["seq_cls"] / "validation.csv"),
        }
        return {"model": bert, "task": task, "data": source}
    if shape == "seq_cls_pair":
        return {
            "model": bert,
            "task": {"type": "seq_cls", "max_length": 24},
            "data": {
                "dataset": str(data["seq_cls_pair"]),
                "columns": {"text": "premise", "text_pair": "hypothesis"},
            },
        }
    if shape == "regression":
        return {
            "model": bert,
            "task": {"type": "seq_cls", "max_length": 16, "num_labels": 1},
            "data": {"dataset": str(data["regression"])},
        }
    if shape == "token_cls":
        return {
            "model": bert,
            "task": {"type": "token_cls", "max_length": 16, "stride": 4, "label_list": NER_LABELS},
            "data": {"dataset": str(data["token_cls"])},
        }
    if shape == "qa":
        return {
            "model": bert,
            "task": {"type": "qa", "max_length": 64, "doc_stride": 16, "version_2_with_negative": True},
            "data": {"dataset": str(data["qa"])},
        }
    task = {
        "type": "seq2seq",
        "max_source_length": 16,
        "max_target_length": 8,
        "max_new_tokens": 4,
        "metrics": ["chrf"],
    }
    if shape == "llama":
        task["prompt_template"] = "{source} ="
    return {
        "model": {"name_or_path": str(bases[shape])},
        "task": task,
        "data": {"dataset": str(data["seq2seq"]), "columns": {"source": "en", "target": "es"}},
    }


def cell_id(method: str, lever: str, shape: str) -> str:
    return f"{method}/{lever}/{shape}"


@pytest.mark.parametrize(("method", "lever", "shape"), CELLS, ids=[cell_id(*c) for c in CELLS])
def test_cell(
    method: str,
    lever: str,
    shape: str,
    bases: dict[str, Path],
    data: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import peftkit
    from peftkit.adapters import ADAPTER_OWN_KEYS
    from peftkit.errors import MergeError, RecipeError
    from peftkit.recipe import recipe_from_dict

    started = time.monotonic()
    work = tmp_path_factory.mktemp("cell")
    raw = recipe_for(shape, bases, data)
    raw["adapter"] = dict(METHODS[method])
    raw["train"] = quick_train(
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3
    )
    for table, keys in LEVERS.get(lever, {}).items():
        raw[table] = {**raw.get(table, {}), **keys}
    raw["train"]["output_dir"] = str(work / "run")
    result: dict[str, Any] = {"method": method, "lever": lever, "shape": shape}
    RESULTS[cell_id(method, lever, shape)] = result
    try:
        run = Path(peftkit.finetune(recipe_from_dict(raw, base_dir=work, name="cell")).run_dir)
    except RecipeError as exc:
        result.update(status="refused", why=" ".join(p.problem + ". Fix: " + p.fix for p in exc.problems))
        assert not (work / "run" / "adapter_model.safetensors").exists()
        result["seconds"] = round(time.monotonic() - started, 1)
        record(result)
        return
    # the saved adapter is the method's
    config = json.loads((run / "adapter_config.json").read_text())
    expected = "LORA" if "method" not in METHODS[method] else METHODS[method]["method"].upper()
    assert config["peft_type"] == {"P_TUNING": "P_TUNING"}.get(expected, expected)
    from safetensors import safe_open

    with safe_open(str(run / "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
    assert any(TENSOR_MARKS[config["peft_type"]] in key for key in keys), keys[:5]
    for key in ("use_dora", "use_rslora"):
        if key in METHODS[method]:
            assert config[key] is True
    if "init_lora_weights" in METHODS[method]:
        assert config["init_lora_weights"] == METHODS[method]["init_lora_weights"]
    # peftkit's own [adapter] keys (LoRA+) are not peft's: the run's resolved recipe holds them
    adapter_record = json.loads((run / "peftkit_run.json").read_text())["recipe"]["adapter"]
    for key in ADAPTER_OWN_KEYS.keys() & METHODS[method].keys():
        assert adapter_record[key] == METHODS[method][key], key
    # reloaded from disk in a fresh process (batched: test_fresh_process_...), it predicts what the run saved
    saved = [r["prediction"] for r in read_jsonl(run / "predictions_validation.jsonl")]
    records = validation_records(shape, data)
    # merge: parity or refused by design
    try:
        peftkit.merge(run, work / "merged")
        result["merge"] = "parity"
    except MergeError as exc:
        assert config["peft_type"] in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"), str(exc)
        result["merge"] = "not mergeable (virtual tokens)"
    result.update(status="ok", run=str(run), records=records, predictions=saved)
    result["seconds"] = round(time.monotonic() - started, 1)
    record(result)


def record(result: dict[str, Any], **extra: Any) -> None:
    """Add a cell's outcome to the results file (``PEFTKIT_SUPPORT_MATRIX_JSON``), cell by cell, so that a
    partial run keeps what it measured; rerunning a cell replaces its entry."""
    import peft
    import transformers

    target = os.environ.get("PEFTKIT_SUPPORT_MATRIX_JSON")
    if not target:
        return
    path = Path(target)
    payload = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"cells": {}}
    payload.update(
        peft=peft.__version__,
        transformers=transformers.__version__,
        methods=list(METHODS),
        levers=["none", *LEVERS],
        shapes=list(SHAPES),
    )
    entry = {k: v for k, v in result.items() if k not in ("run", "records", "predictions")}
    payload["cells"][cell_id(result["method"], result["lever"], result["shape"])] = {**entry, **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def validation_records(shape: str, data: dict[str, Path]) -> list[dict[str, Any]]:
    """The validation split as predict input records."""
    if shape in ("seq_cls", "regression"):
        name = "seq_cls" if shape == "seq_cls" else "regression"
        lines = (data[name] / "validation.csv").read_text().splitlines()[1:]
        return [{"text": line.rsplit(",", 1)[0]} for line in lines]
    if shape == "seq_cls_pair":
        lines = (data["seq_cls_pair"] / "validation.csv").read_text().splitlines()[1:]
        return [{"text": line.split(",")[0], "text_pair": line.split(",")[1]} for line in lines]
    if shape == "token_cls":
        return [{"tokens": r["tokens"]} for r in read_jsonl(data["token_cls"] / "validation.jsonl")]
    if shape == "qa":
        return [
            {"question": r["question"], "context": r["context"]}
            for r in read_jsonl(data["qa"] / "validation.jsonl")
        ]
    return [{"source": r["en"]} for r in read_jsonl(data["seq2seq"] / "validation.jsonl")]


FRESH = """
import json, sys
from peftkit.runs import load_run
out = {}
for cell, spec in json.load(open(sys.argv[1])).items():
    loaded = load_run(spec["run"])
    out[cell] = [p["prediction"] for p in loaded.task.predict(loaded.model, loaded.ctx, spec["records"])]
json.dump(out, open(sys.argv[2], "w"))
"""


def test_fresh_process_predictions_and_results_file(tmp_path: Path) -> None:
    """Every trained cell, reloaded in one fresh process, predicts its saved predictions (recorded)."""
    trained = {cell: r for cell, r in RESULTS.items() if r.get("status") == "ok"}
    if not RESULTS:
        pytest.skip("no matrix cell ran (select them with the test)")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({c: {"run": r["run"], "records": r["records"]} for c, r in trained.items()}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run(
        [sys.executable, "-c", FRESH, str(spec), str(tmp_path / "out.json")],
        check=True,
        env=env,
        timeout=1800,
    )
    fresh = json.loads((tmp_path / "out.json").read_text())
    differ = {}
    for cell, r in trained.items():
        record(r, fresh_predict=fresh[cell] == r["predictions"])
        if fresh[cell] != r["predictions"]:
            differ[cell] = {"saved": r["predictions"], "fresh": fresh[cell]}
    assert not differ, f"{len(differ)} cells predict otherwise when reloaded: {json.dumps(differ)[:2000]}"
