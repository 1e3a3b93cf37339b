"""seq2seq end to end on tiny random models: T5, BART, Llama and a warm-started EncoderDecoderModel.

Each model memorises four toy pairs with the task's own preprocess → collator → GenerationTrainer path,
then generates them back; seconds each.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest

from peftkit.tasks.base import TaskContext
from peftkit.tasks.seq2seq import TASK, Seq2SeqConfig, preprocess

PAIRS = {
    "source": ["one two three four", "red green blue", "cat dog bird fish", "sun moon star"],
    "target": ["four three two one", "blue green red now", "fish bird dog cat", "star moon sun again"],
}
VOCAB = 30522  # MiniLM's WordPiece vocabulary


@pytest.fixture(scope="module")
def base_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tests.conftest import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.eos_token = "[SEP]"
    return tok


def tiny_t5() -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=102, decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def tiny_bart() -> Any:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=102,
        forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def tiny_llama(pad_token_id: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=pad_token_id, bos_token_id=101,
        eos_token_id=102,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def train_and_evaluate(
    model: Any, tokenizer: Any, tmp_path: Path, *, steps: int = 120, lr: float = 1e-2, **cfg: Any
) -> tuple[dict[str, float], dict[str, float], TaskContext, Any]:
    """Evaluate, train ``steps`` steps on PAIRS, evaluate again; returns (before, after, ctx, trainer)."""
    from datasets import Dataset

    settings = {"max_source_length": 16, "max_target_length": 12, "metrics": ["chrf", "sacrebleu", "rouge"]}
    ctx = TaskContext(
        cfg=Seq2SeqConfig(**(settings | cfg)), tokenizer=tokenizer, labels=None, model_config=model.config
    )
    raw = Dataset.from_dict(PAIRS)
    train = raw.map(
        functools.partial(preprocess, ctx=ctx, train=True), batched=True, remove_columns=raw.column_names
    )
    evaluation = raw.map(
        functools.partial(preprocess, ctx=ctx, train=False), batched=True, remove_columns=raw.column_names
    )

    def compute(prediction: Any) -> dict[str, float]:
        return TASK.compute_metrics(*TASK.postprocess(raw, evaluation, prediction, ctx), ctx)

    args = TASK.training_args_class()(  # type: ignore[misc]
        output_dir=str(tmp_path / "out"), max_steps=steps, learning_rate=lr, per_device_train_batch_size=4,
        per_device_eval_batch_size=3, lr_scheduler_type="constant", report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=steps, dataloader_pin_memory=False, seed=0,
    )  # fmt: skip
    trainer = TASK.trainer_class()(  # type: ignore[misc]
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=TASK.collator(ctx, model), compute_metrics=compute,
    )  # fmt: skip
    before = trainer.evaluate()
    trainer.train()
    return before, trainer.evaluate(), ctx, trainer


@pytest.mark.parametrize("build", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_encoder_decoder_trains_and_generates(build: Any, base_tokenizer: Any, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    before, after, ctx, trainer = train_and_evaluate(build(), base_tokenizer, tmp_path)
    assert after["eval_loss"] < before["eval_loss"] / 10
    assert before["eval_chrf"] < 50
    assert after["eval_chrf"] == pytest.approx(100.0)
    assert after["eval_sacrebleu"] == pytest.approx(100.0)
    assert after["eval_rougeL"] == pytest.approx(100.0)
    records = [{"source": s} for s in PAIRS["source"]]
    assert [r["prediction"] for r in TASK.predict(trainer.model, ctx, records)] == PAIRS["target"]


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "pad-is-eos"])
def test_decoder_only_trains_generates_and_stops_at_eos(
    pad_is_eos: bool, base_tokenizer: Any, tmp_path: Path
) -> None:
    import torch

    from peftkit.tasks.seq2seq import generate_from_prompts

    tokenizer = copy.deepcopy(base_tokenizer)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = tiny_llama(tokenizer.pad_token_id)
    before, after, ctx, trainer = train_and_evaluate(
        model, tokenizer, tmp_path, prompt_template="{source} =", max_new_tokens=10
    )
    assert after["eval_loss"] < before["eval_loss"] / 10
    assert after["eval_chrf"] == pytest.approx(100.0)
    assert after["eval_sacrebleu"] == pytest.approx(100.0)
    predictions = TASK.predict(trainer.model, ctx, [{"source": s} for s in PAIRS["source"]])
    assert [p["prediction"] for p in predictions] == PAIRS["target"]  # nothing after the target: it stopped

    # token level: each row is target + EOS, then only padding, well before max_new_tokens
    features = preprocess({"source": PAIRS["source"]}, ctx, train=False)
    batch = TASK.collator(ctx, trainer.model)([{k: v[i] for k, v in features.items()} for i in range(4)])
    generated = generate_from_prompts(trainer.model, batch["input_ids"], batch["attention_mask"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row, target in zip(generated.tolist(), PAIRS["target"], strict=True):
        expected = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        assert row[: len(expected)] == expected
        assert set(row[len(expected) :]) <= {pad}
    assert generated.shape[1] < 10


def test_warm_started_encoder_decoder_trains_new_layers_and_reloads(
    tiny_bert_dir: Path, base_tokenizer: Any, tmp_path: Path
) -> None:
    """Two BERT encoders → EncoderDecoderModel: cross-attention and the LM-head transform are new, so they
    go to modules_to_save; the adapter alone then restores them on a fresh warm start with other weights."""
    import torch
    from peft import PeftModel
    from transformers import EncoderDecoderModel

    from peftkit.adapters import apply_adapter

    def warm_start(seed: int) -> Any:
        torch.manual_seed(seed)
        return EncoderDecoderModel.from_encoder_decoder_pretrained(str(tiny_bert_dir), str(tiny_bert_dir))

    model = warm_start(0)
    assert model.config.decoder_start_token_id is None  # what the task must fill in
    options = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}
    peft_model = apply_adapter(model, options, TASK, model.config)
    assert sorted(peft_model.peft_config["default"].modules_to_save) == ["crossattention", "transform"]
    cross = "decoder.bert.encoder.layer.0.crossattention.modules_to_save.default.self.query.weight"
    start = dict(peft_model.named_parameters())["base_model.model." + cross].detach().clone()

    # frozen random tiny BERTs learn slowly through LoRA: the test asks for a clear drop, not memorisation
    before, after, ctx, _ = train_and_evaluate(peft_model, base_tokenizer, tmp_path, steps=60, lr=1e-2)
    assert model.config.decoder_start_token_id == base_tokenizer.cls_token_id
    assert (
        base_tokenizer.sep_token_id in torch.tensor(model.generation_config.eos_token_id).reshape(-1).tolist()
    )
    assert after["eval_loss"] < before["eval_loss"] - 0.5
    trained = dict(peft_model.named_parameters())["base_model.model." + cross]
    assert not torch.equal(trained, start)  # cross-attention was trained

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(warm_start(1), tmp_path / "adapter").eval()
    peft_model.eval()
    records = [{"source": s} for s in PAIRS["source"]]
    assert TASK.predict(reloaded, ctx, records) == TASK.predict(peft_model, ctx, records)
    features = preprocess(dict(PAIRS), ctx, train=True)
    batch = TASK.collator(ctx, reloaded)([{k: v[i] for k, v in features.items()} for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, peft_model(**batch).logits, atol=1e-5)
