"""seq2seq task: config validation, model family, label masks token by token, padding, bad input."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from peftkit.errors import DataError, PeftkitError
from peftkit.tasks.base import TaskContext
from peftkit.tasks.seq2seq import (
    IGNORE_INDEX,
    TASK,
    DecoderOnlyCollator,
    Seq2SeqConfig,
    join_prompt_and_target,
    prepare_labels,
    preprocess,
    render_prompt,
)

TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}[unused0] {{ m['content'] }} [unused1]{% endfor %}"
    "{% if add_generation_prompt %}[unused2]{% endif %}"
)


@pytest.fixture(scope="module")
def base_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tests.conftest import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture
def tokenizer(base_tokenizer: Any) -> Any:
    """MiniLM's WordPiece tokenizer with [SEP] as EOS (a decoder-only model needs one), no chat template."""
    tok = copy.deepcopy(base_tokenizer)
    tok.eos_token = "[SEP]"
    return tok


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    values: dict[str, Any] = dict(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def t5_config() -> Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=30522,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        eos_token_id=102,
        pad_token_id=0,
        decoder_start_token_id=0,  # as in t5-small's config.json: decoding starts from the pad token
    )


def context(tokenizer: Any, model_config: Any, **cfg: Any) -> TaskContext:
    return TaskContext(cfg=Seq2SeqConfig(**cfg), tokenizer=tokenizer, labels=None, model_config=model_config)


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------
# Config


def test_prompt_template_without_source_placeholder_is_refused() -> None:
    with pytest.raises(
        ValidationError, match=r"prompt_template 'Translate: \{text\}' has no \{source\} placeholder"
    ):
        Seq2SeqConfig(prompt_template="Translate: {text}")


def test_prefix_and_template_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="set source_prefix or prompt_template, not both"):
        Seq2SeqConfig(source_prefix="summarize: ", prompt_template="{source}")


def test_max_length_is_refused_in_favour_of_source_and_target_limits() -> None:
    with pytest.raises(ValidationError, match="replace max_length with max_source_length"):
        Seq2SeqConfig(max_length=64)
    # a resolved recipe (written to the run directory) holds every default, max_length included
    assert Seq2SeqConfig(**Seq2SeqConfig(max_source_length=20).model_dump()).max_source_length == 20


def test_system_prompt_needs_the_chat_template(tokenizer: Any) -> None:
    with pytest.raises(ValidationError, match="system_prompt needs the chat template"):
        Seq2SeqConfig(system_prompt="Translate.", use_chat_template=False)
    ctx = context(tokenizer, llama_config(), system_prompt="Translate.")  # the tokenizer has no template
    with pytest.raises(PeftkitError, match="system_prompt is set, but no chat template is used"):
        preprocess({"source": ["a"], "target": ["b"]}, ctx, train=True)
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    out = preprocess({"source": ["a"]}, ctx, train=False)
    assert out["input_ids"][0] == ids(
        tokenizer, "[unused0] translate. [unused1][unused0] a [unused1][unused2]"
    )


def test_metrics_are_checked() -> None:
    with pytest.raises(ValidationError, match="lists a metric twice"):
        Seq2SeqConfig(metrics=["chrf", "chrf"])
    with pytest.raises(ValidationError, match="metrics"):
        Seq2SeqConfig(metrics=["bleu"])
    with pytest.raises(ValidationError, match=r"beams\n  Extra inputs are not permitted"):
        Seq2SeqConfig(beams=4)  # type: ignore[call-arg]


def test_best_metric_follows_the_first_listed_metric() -> None:
    assert TASK.best_metric(Seq2SeqConfig()) == ("sacrebleu", True)
    assert TASK.best_metric(Seq2SeqConfig(metrics=["rouge", "chrf"])) == ("rougeL", True)
    assert TASK.best_metric(Seq2SeqConfig(metrics=["chrf"])) == ("chrf", True)


def test_render_prompt_keeps_other_braces() -> None:
    cfg = Seq2SeqConfig(prompt_template='{"text": "{source}"}')
    assert render_prompt("hi", cfg) == '{"text": "hi"}'
    assert render_prompt("hi", Seq2SeqConfig(source_prefix="summarize: ")) == "summarize: hi"


def test_template_fields_come_from_the_record_and_are_expanded_once() -> None:
    cfg = Seq2SeqConfig(prompt_template="{aspect} of: {source} {not a field} {source}")
    assert cfg.template_fields == ["aspect"]
    # a source holding a placeholder is text, not a template: it is not expanded again
    assert render_prompt("x {aspect}", cfg, {"aspect": "outcome"}) == (
        "outcome of: x {aspect} {not a field} x {aspect}"
    )


def test_template_field_missing_from_the_data_is_named() -> None:
    from datasets import Dataset, DatasetDict

    cfg = Seq2SeqConfig(prompt_template="{aspect}: {source}")
    raw = DatasetDict({"train": Dataset.from_dict({"source": ["a"], "target": ["x"]})})
    with pytest.raises(DataError, match=r"uses \{aspect\}, but the train split has no 'aspect' field"):
        prepare_labels(raw, cfg)
    raw["train"] = raw["train"].add_column("aspect", ["outcome"])
    assert prepare_labels(raw, cfg) is None


def test_template_fields_reach_the_encoder_input(tokenizer: Any) -> None:
    cfg = Seq2SeqConfig(prompt_template="{aspect}: {source}")
    ctx = TaskContext(cfg=cfg, tokenizer=tokenizer, labels=None, model_config=t5_config())
    features = preprocess({"source": ["a cat"], "target": ["x"], "aspect": ["outcome"]}, ctx, train=True)
    assert tokenizer.decode(features["input_ids"][0], skip_special_tokens=True) == "outcome : a cat"
    with pytest.raises(DataError, match="the records have no 'aspect' field"):
        preprocess({"source": ["a cat"], "target": ["x"]}, ctx, train=True)


def test_generation_limit_defaults_to_max_target_length() -> None:
    assert Seq2SeqConfig(max_target_length=40).generation_limit == 40
    assert Seq2SeqConfig(max_target_length=40, max_new_tokens=7).generation_limit == 7


# --------------------------------------------------------------------------------------------------
# Model family comes from the model config


def test_model_family_is_read_from_the_config() -> None:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        BartConfig,
        BertConfig,
        EncoderDecoderConfig,
    )

    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    warm = EncoderDecoderConfig.from_encoder_decoder_configs(bert, copy.deepcopy(bert))
    for config in (t5_config(), BartConfig(), warm):
        assert TASK.model_class(config) is AutoModelForSeq2SeqLM
        assert TASK.peft_task_type(config) == "SEQ_2_SEQ_LM"
    assert TASK.model_class(llama_config()) is AutoModelForCausalLM
    assert TASK.peft_task_type(llama_config()) == "CAUSAL_LM"


# --------------------------------------------------------------------------------------------------
# Decoder-only features: label masks token by token


def test_decoder_only_training_labels_mask_the_prompt_and_label_the_eos(tokenizer: Any) -> None:
    ctx = context(tokenizer, llama_config(), prompt_template="translate: {source} =>")
    out = preprocess({"source": ["the cat"], "target": ["el gato"]}, ctx, train=True)
    prompt = [tokenizer.cls_token_id, *ids(tokenizer, "translate: the cat =>")]  # BOS ([CLS]) kept, [SEP] not
    target = [*ids(tokenizer, "el gato"), tokenizer.eos_token_id]
    assert out["input_ids"] == [prompt + target]
    assert out["labels"] == [[IGNORE_INDEX] * len(prompt) + target]
    assert out["attention_mask"] == [[1] * (len(prompt) + len(target))]


def test_decoder_only_eval_features_hold_prompt_and_reference_only(tokenizer: Any) -> None:
    ctx = context(tokenizer, llama_config(), prompt_template="translate: {source} =>")
    out = preprocess({"source": ["the cat"], "target": ["el gato"]}, ctx, train=False)
    assert out["input_ids"] == [[tokenizer.cls_token_id, *ids(tokenizer, "translate: the cat =>")]]
    assert out["labels"] == [[*ids(tokenizer, "el gato"), tokenizer.eos_token_id]]
    no_target = preprocess({"source": ["the cat"]}, ctx, train=False)
    assert "labels" not in no_target and no_target["input_ids"] == out["input_ids"]


def test_eos_is_labelled_when_pad_is_eos(tokenizer: Any) -> None:
    tokenizer.pad_token = tokenizer.eos_token  # the usual decoder-only policy: pad == eos
    eos = tokenizer.eos_token_id
    ctx = context(tokenizer, llama_config(pad_token_id=eos), prompt_template="{source} =>")
    out = preprocess({"source": ["a b c d", "a"], "target": ["x", "x y z"]}, ctx, train=True)
    features = [{k: v[i] for k, v in out.items()} for i in range(2)]
    batch = DecoderOnlyCollator(tokenizer.pad_token_id)(features)
    short = batch["labels"][1].tolist()  # the shorter row is right padded with pad == eos ids
    real = len(out["input_ids"][1])
    assert batch["input_ids"][1, real:].tolist() == [eos] * (batch["input_ids"].shape[1] - real)
    assert short[real - 1] == eos  # the real EOS is a label
    assert short[real:] == [IGNORE_INDEX] * (len(short) - real)  # the padding eos ids are not
    assert batch["attention_mask"][1].tolist() == [1] * real + [0] * (len(short) - real)
    for row in batch["labels"].tolist():
        assert row.count(eos) == 1  # exactly one labelled EOS per example


def test_chat_template_wraps_the_prompt_and_ends_with_the_generation_header(tokenizer: Any) -> None:
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    ctx = context(tokenizer, llama_config(), prompt_template="translate: {source}")
    out = preprocess({"source": ["the cat"], "target": ["el gato"]}, ctx, train=True)
    prompt = ids(tokenizer, "[unused0] translate: the cat [unused1][unused2]")
    assert out["input_ids"][0][: len(prompt)] == prompt
    assert out["labels"][0] == [IGNORE_INDEX] * len(prompt) + [
        *ids(tokenizer, "el gato"),
        tokenizer.eos_token_id,
    ]
    off = context(tokenizer, llama_config(), prompt_template="translate: {source}", use_chat_template=False)
    assert preprocess({"source": ["the cat"]}, off, train=False)["input_ids"][0][0] == tokenizer.cls_token_id


def test_chat_template_requested_but_missing_is_an_error(tokenizer: Any) -> None:
    ctx = context(tokenizer, llama_config(), use_chat_template=True)
    with pytest.raises(
        PeftkitError, match="use_chat_template = true, but the tokenizer has no chat template"
    ):
        preprocess({"source": ["a"], "target": ["b"]}, ctx, train=True)


def test_source_longer_than_max_source_length_is_cut_counted_and_reported(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    ctx = context(tokenizer, llama_config(), max_source_length=3)
    sources = ["one two three four five", "one two", "alpha beta gamma delta"]
    with caplog.at_level(logging.WARNING, logger="peftkit.tasks.seq2seq"):
        out = preprocess({"source": sources, "target": ["x", "y", "z"]}, ctx, train=False)
    assert (
        "2 of 3 sources in this batch are longer than max_source_length = 3 tokens (longest: 5) and were "
        "truncated; raise [task] max_source_length" in caplog.text
    )
    # the cut keeps the template's tail (the generation header) intact
    assert out["input_ids"][0] == ids(tokenizer, "[unused0] one two three [unused1][unused2]")
    assert out["input_ids"][1] == ids(tokenizer, "[unused0] one two [unused1][unused2]")


def test_long_target_is_cut_but_still_ends_with_eos(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    ctx = context(tokenizer, llama_config(), max_target_length=3, prompt_template="{source}")
    with caplog.at_level(logging.WARNING, logger="peftkit.tasks.seq2seq"):
        out = preprocess({"source": ["a"], "target": ["one two three four"]}, ctx, train=False)
    assert out["labels"] == [[*ids(tokenizer, "one two"), tokenizer.eos_token_id]]
    assert (
        "1 of 1 targets in this batch are longer than max_target_length = 3 tokens (longest: 5)"
        in caplog.text
    )


def test_decoder_only_needs_an_eos_token(base_tokenizer: Any) -> None:
    ctx = context(base_tokenizer, llama_config(), prompt_template="{source}")  # BERT's tokenizer: no EOS
    with pytest.raises(PeftkitError, match="decoder-only seq2seq needs a tokenizer with an EOS token"):
        preprocess({"source": ["a"], "target": ["b"]}, ctx, train=True)


# --------------------------------------------------------------------------------------------------
# Encoder-decoder features


def test_encoder_decoder_features(tokenizer: Any) -> None:
    ctx = context(tokenizer, t5_config(), source_prefix="summarize: ", max_target_length=4)
    out = preprocess({"source": ["the cat sat"], "target": ["cat sat on the mat"]}, ctx, train=True)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"] == [tokenizer("summarize: the cat sat")["input_ids"]]
    # truncated to 4 tokens, the end token kept
    assert out["labels"] == [[tokenizer.cls_token_id, *ids(tokenizer, "cat sat"), tokenizer.sep_token_id]]
    assert (
        preprocess({"source": ["the cat sat"], "target": ["x"]}, ctx, train=False)["input_ids"]
        == out["input_ids"]
    )


def test_warm_started_labels_do_not_repeat_the_decoder_start_token(tokenizer: Any) -> None:
    """BERT2BERT starts decoding from [CLS]; labels opening with [CLS] too taught it to emit [CLS] forever."""
    from transformers import BertConfig, EncoderDecoderConfig

    bert = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    warm = EncoderDecoderConfig.from_encoder_decoder_configs(bert, copy.deepcopy(bert))
    assert warm.decoder_start_token_id is None  # the tokenizer's [CLS] is used, as at generation time
    out = preprocess({"source": ["a"], "target": ["cat sat"]}, context(tokenizer, warm), train=True)
    assert out["labels"] == [[*ids(tokenizer, "cat sat"), tokenizer.sep_token_id]]
    # a start token the tokenizer does not put first (T5's pad here, BART's </s>) leaves the labels alone
    out = preprocess({"source": ["a"], "target": ["cat sat"]}, context(tokenizer, t5_config()), train=True)
    assert out["labels"][0][0] == tokenizer.cls_token_id


def test_encoder_decoder_collator_pads_labels_with_ignore_index(tokenizer: Any) -> None:
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config())
    ctx = context(tokenizer, model.config)
    out = preprocess({"source": ["a", "a b c"], "target": ["x y z", "x"]}, ctx, train=True)
    batch = TASK.collator(ctx, model)([{k: v[i] for k, v in out.items()} for i in range(2)])
    assert batch["labels"][1].tolist() == [*out["labels"][1], IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["decoder_input_ids"][0, 0].item() == model.config.decoder_start_token_id


# --------------------------------------------------------------------------------------------------
# Collator and eval loss


def test_collator_pads_training_right_and_generation_left(tokenizer: Any) -> None:
    ctx = context(tokenizer, llama_config(), prompt_template="{source} =>")
    data = {"source": ["a", "a b c d"], "target": ["x y", "x"]}
    pad = tokenizer.pad_token_id
    collate = DecoderOnlyCollator(pad)
    train = preprocess(data, ctx, train=True)
    batch = collate([{k: v[i] for k, v in train.items()} for i in range(2)])
    n = len(train["input_ids"][0])
    assert batch["input_ids"][0].tolist() == train["input_ids"][0] + [pad] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][0].tolist()[n:] == [IGNORE_INDEX] * (batch["labels"].shape[1] - n)
    evaluation = preprocess(data, ctx, train=False)
    batch = collate([{k: v[i] for k, v in evaluation.items()} | {"length": 9} for i in range(2)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    short = evaluation["input_ids"][0]
    gap = batch["input_ids"].shape[1] - len(short)
    assert batch["input_ids"][0].tolist() == [pad] * gap + short  # prompts left padded
    assert batch["attention_mask"][0].tolist() == [0] * gap + [1] * len(short)
    assert batch["labels"][1].tolist() == [*evaluation["labels"][1], IGNORE_INDEX]  # targets right padded


def test_eval_loss_from_prompt_and_target_equals_training_loss(tokenizer: Any) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    ctx = context(tokenizer, model.config, prompt_template="{source} =>")
    data = {"source": ["a", "one two three four five"], "target": ["x y z w", "x"]}
    collate = DecoderOnlyCollator(tokenizer.pad_token_id)
    train = preprocess(data, ctx, train=True)
    evaluation = preprocess(data, ctx, train=False)
    with torch.no_grad():
        train_loss = model(**collate([{k: v[i] for k, v in train.items()} for i in range(2)])).loss
        batch = collate([{k: v[i] for k, v in evaluation.items()} for i in range(2)])
        joined = join_prompt_and_target(batch["input_ids"], batch["attention_mask"], batch["labels"], 0)
        eval_loss = model(**joined).loss
    assert (joined["labels"] != IGNORE_INDEX).sum() == (batch["labels"] != IGNORE_INDEX).sum()
    assert eval_loss.item() == pytest.approx(train_loss.item(), abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_empty_target_is_refused_with_split_and_record() -> None:
    from datasets import Dataset, DatasetDict

    raw = DatasetDict(
        {
            "train": Dataset.from_dict({"source": ["a", "b"], "target": ["x", "y"]}),
            "validation": Dataset.from_dict({"source": ["a", "b", "c"], "target": ["x", "y", "  "]}),
        }
    )
    with pytest.raises(DataError, match=r"validation split, record 2: target is empty \('  '\)"):
        prepare_labels(raw, Seq2SeqConfig())
    raw["validation"] = Dataset.from_dict({"source": ["a", None], "target": ["x", "y"]})
    with pytest.raises(DataError, match="validation split, record 1: source is missing"):
        prepare_labels(raw, Seq2SeqConfig())
    raw["validation"] = Dataset.from_dict({"source": ["a"], "summary": ["x"]})
    with pytest.raises(DataError, match=r"validation split has no 'target' column .*\[data\] columns"):
        prepare_labels(raw, Seq2SeqConfig())


def test_empty_target_in_a_batch_is_refused(tokenizer: Any) -> None:
    ctx = context(tokenizer, llama_config())
    with pytest.raises(DataError, match=r"record 1 of this batch: target is empty \(''\)"):
        preprocess({"source": ["a", "b"], "target": ["x", ""]}, ctx, train=True)


def test_training_arguments_pickle_by_name(tmp_path: Any) -> None:
    """The Trainer saves its arguments with torch.save in every checkpoint."""
    import pickle

    args = TASK.training_args_class()(output_dir=str(tmp_path), use_cpu=True, report_to="none")  # type: ignore[misc]
    assert args.predict_with_generate is True
    restored = pickle.loads(pickle.dumps(args))
    assert type(restored) is TASK.training_args_class() and restored.predict_with_generate is True
    assert pickle.loads(pickle.dumps(TASK.trainer_class())) is TASK.trainer_class()  # type: ignore[misc]
