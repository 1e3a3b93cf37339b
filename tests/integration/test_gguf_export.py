"""``peftkit export --format gguf`` on a tiny random Llama with SmolLM2's real tokenizer and chat template:
finetune a few steps, export f32 / f16 / q8_0 through the CLI, read the files back with transformers' GGUF
loader here and compare their logits with the merged model's; refusals of what cannot be written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES, invoke_cli, run_cli, save_tiny_smollm_llama

pytest.importorskip("gguf")

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq2seq"
prompt_template = "Spanish: {{source}}"
max_source_length = 16
max_target_length = 16
max_new_tokens = 4
metrics = ["chrf"]

[data]
dataset = "{data}"
columns = {{ source = "en", target = "es" }}

[adapter]
r = 4
alpha = 8
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

[train]
max_steps = 3
per_device_train_batch_size = 8
per_device_eval_batch_size = 8
learning_rate = 1e-2
eval_strategy = "no"
save_strategy = "no"
load_best_model_at_end = false
logging_steps = 1
output_dir = "{out}"

[export]
gguf_type = "f16"               # export --format gguf without --gguf-type takes it (a test says so)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(work folder, run directory, merged folder) of a 3-step LoRA run on the tiny Llama."""
    work = tmp_path_factory.mktemp("gguf")
    model = save_tiny_smollm_llama(work / "model")
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(model=model, data=FIXTURES / "seq2seq", out=work / "run"))
    result = run_cli("finetune", str(recipe), cwd=work, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = invoke_cli("merge", str(work / "run"), "--out", str(work / "merged"))
    assert merged.exit_code == 0, merged.output
    return work, work / "run", work / "merged"


def prompts(merged: Path) -> Any:
    """Validation prompts in the run's chat template, and their targets, tokenized by the merged tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    rows = [json.loads(line) for line in (FIXTURES / "seq2seq" / "validation.jsonl").read_text().splitlines()]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Spanish: {r['en']}"}], tokenize=False, add_generation_prompt=True
        )
        + r["es"]
        for r in rows
    ]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits_at_real_tokens(model: Any, batch: Any) -> Any:
    import torch

    with torch.no_grad():
        logits = model(**batch).logits
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_gguf_export_reloads_in_transformers_and_matches_the_merged_model(
    trained: tuple[Path, Path, Path], gguf_type: str
) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, run, merged = trained
    out = work / f"bundle-{gguf_type}"
    args = ["export", str(run), "--out", str(out), "--format", "gguf", "--gguf-type", gguf_type]
    result = run_cli(*args, "--samples", "8", cwd=work, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    name = f"model-{gguf_type.upper()}.gguf"
    assert f"gguf: {name}" in result.stdout
    assert (out / name).is_file()
    assert not list(out.glob("*.safetensors")) and not (out / ".gguf-check").exists()

    # the manifest records the check it passed, and every file with its hash
    manifest = json.loads((out / "peftkit_export.json").read_text())
    check = manifest["gguf"]
    assert manifest["formats"] == ["gguf"] and name in manifest["files"]
    assert check["passed"] and check["tokenizer"]["passed"] and check["gguf_type"] == gguf_type
    assert check["sample"]["split"] == "validation" and check["predictions_compared"] > 50
    if gguf_type == "f32":
        assert check["agreement"] == 1.0 and check["max_abs_diff"] <= check["limit"]
    else:
        assert check["agreement"] >= 0.99 and check["max_abs_diff"] > 0
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and f"{check['agreement']:.4f}" in card and "llama-cli" in card

    # the file's metadata: llama hyper-parameters, the byte-level BPE tokenizer and the chat template
    reader = GGUFReader(str(out / name))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.merges"]) > 40000
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" in kinds  # the tiny model's embeddings are not tied
    expected = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[gguf_type]
    assert kinds["blk.0.attn_q.weight"] == expected and kinds["blk.0.attn_norm.weight"] == "F32"

    # read back here, independently of peftkit's own check, against the merged model
    batch = prompts(merged)
    reference = logits_at_real_tokens(
        AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), batch
    )
    from_file = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    candidate = logits_at_real_tokens(from_file, batch)
    agreement = float((reference.argmax(-1) == candidate.argmax(-1)).float().mean())
    if gguf_type == "f32":
        assert float((reference - candidate).abs().max()) < 1e-4 and agreement == 1.0
    else:
        assert agreement >= 0.99
    assert (
        AutoTokenizer.from_pretrained(out, gguf_file=name)(batch_text := "Hola, ¿qué tal? 123")["input_ids"]
        == tokenizer(batch_text)["input_ids"]
    )


def test_unpermuted_q_and_k_fail_the_check_and_nothing_is_written(
    trained: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without llama.cpp's Q/K permutation transformers' loader un-permutes weights that were never
    permuted: the f32 check catches it, exit 2, and --out is not created."""
    from peftkit import gguf_export

    work, run, _ = trained
    monkeypatch.setattr(gguf_export, "llama_permute", lambda weights, *_: weights)
    out = work / "bundle-broken"
    args = ["--format", "gguf", "--gguf-type", "f32", "--samples", "8"]  # the recipe says f16
    result = invoke_cli("export", str(run), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert "does not reproduce the merged model" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".") and "bundle-broken" in p.name]


def test_tied_embeddings_write_no_output_tensor(tmp_path: Path) -> None:
    """A model with tied embeddings (as SmolLM2) has no output.weight in its file; transformers ties them
    back on reading, and the logits are the model's."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.gguf_export import tokenizer_kind, write_gguf

    folder = save_tiny_smollm_llama(tmp_path / "tied", tie=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    (tmp_path / "file").mkdir()
    path = tmp_path / "file" / "m.gguf"
    pre = tokenizer_kind(folder, folder)
    write_gguf(path, model, tokenizer, folder / "tokenizer.json", "f32", name="tied", pre=pre)
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "file", gguf_file="m.gguf", dtype=torch.float32
    )
    assert reloaded.config.tie_word_embeddings
    batch = tokenizer(["The cat sat on the mat.", "Hola"], return_tensors="pt", padding=True)
    diff = (logits_at_real_tokens(model, batch) - logits_at_real_tokens(reloaded, batch)).abs().max()
    assert float(diff) < 1e-5


def test_bert_run_is_refused_before_any_weights_load(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from tests.integration.key_effects_common import finetune_raw, quick_train, write_csv

    write_csv(tmp_path / "train.csv", 16)
    write_csv(tmp_path / "validation.csv", 8, offset=1)
    raw = {
        "model": {"name_or_path": str(tiny_bert_dir)},
        "task": {"type": "seq_cls", "max_length": 16},
        "data": {"train_file": "train.csv", "validation_file": "validation.csv"},
        "adapter": {"r": 4},
        "train": quick_train(max_steps=1),
    }
    run = finetune_raw(raw, tmp_path)
    # the refusal needs no weights: with the base model's weights gone it still names the real reason
    (tiny_bert_dir / "model.safetensors").rename(tmp_path / "moved.safetensors")
    try:
        result = invoke_cli("export", str(run), "--out", str(tmp_path / "b"), "--format", "gguf")
    finally:
        (tmp_path / "moved.safetensors").rename(tiny_bert_dir / "model.safetensors")
    assert result.exit_code == 2, result.output
    assert "decoder-only" in result.output and "seq_cls" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("config_name", "words"),
    [("Qwen2Config", "'qwen2'"), ("MistralConfig", "'mistral'"), ("T5Config", "encoder-decoder")],
)
def test_other_architectures_are_refused_by_name(tmp_path: Path, config_name: str, words: str) -> None:
    import transformers

    from peftkit.errors import ExportError
    from peftkit.gguf_export import check_gguf_possible

    config = getattr(transformers, config_name)()
    with pytest.raises(ExportError, match=words):
        check_gguf_possible("seq2seq", config, tmp_path, tmp_path)


def test_a_wordpiece_tokenizer_is_refused(tiny_bert_dir: Path) -> None:
    from transformers import LlamaConfig

    from peftkit.errors import ExportError
    from peftkit.gguf_export import check_gguf_possible

    with pytest.raises(ExportError, match=r"byte-level BPE.*WordPiece"):
        check_gguf_possible("seq2seq", LlamaConfig(), tiny_bert_dir, tiny_bert_dir)


def test_export_takes_the_recipe_gguf_type(trained: tuple[Path, Path, Path]) -> None:
    """`[export] gguf_type` is the default of `export --format gguf` (the fixture's recipe says f16)."""
    work, run, _ = trained
    out = work / "bundle-recipe-type"
    result = run_cli("export", str(run), "--out", str(out), "--format", "gguf", "--samples", "4", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model-F16.gguf").is_file() and not (out / "model-F32.gguf").exists()
    assert json.loads((out / "peftkit_export.json").read_text())["gguf"]["gguf_type"] == "f16"


def test_validate_refuses_gguf_for_a_model_it_cannot_write(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """`[export] formats = ["gguf"]` on a BERT classifier: validate says so (export.formats), exit 2."""
    (tmp_path / "train.csv").write_text("text,label\nhi,0\nho,1\n", encoding="utf-8")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[model]\nname_or_path = "{tiny_bert_dir}"\n[task]\ntype = "seq_cls"\n'
        '[data]\ntrain_file = "train.csv"\n[export]\nformats = ["safetensors", "gguf"]\n',
        encoding="utf-8",
    )
    result = invoke_cli("validate", str(recipe))
    assert result.exit_code == 2, result.output
    assert f"{recipe}: export.formats: GGUF export writes decoder-only" in result.output, result.output
    assert "Traceback" not in result.output
