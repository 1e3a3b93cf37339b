"""Every recipe key peftkit owns, and the test that shows its *effect* through the public path.

"Effect" means what the key changes in a run (files of the run directory, metrics, predictions, the settings a
library call received), through ``peftkit <command>`` or the Python API, not only that it validates.
``tests/unit/test_key_audit.py`` fails when a key of the recipe schema is missing here or names a test that
does not exist; ``scripts/key_tests_table.py`` writes this mapping as ``docs/recipe-key-tests.md``.

Keys are ``table.key``; task keys are ``task.<task type>.key`` (each task has its own [task] fields).
"""

from __future__ import annotations

from typing import Any

DATA = "tests/integration/test_key_effects_data.py"
MODEL = "tests/integration/test_key_effects_model.py"
TASK = "tests/integration/test_key_effects_task.py"
TRAIN = "tests/integration/test_key_effects_train.py"
QUANT = "tests/integration/test_key_effects_quantization.py"
EXPORT = "tests/integration/test_key_effects_export.py"
SWEEP = "tests/integration/test_key_effects_sweep.py"
LORAPLUS = "tests/integration/test_loraplus.py"

_MODEL_LOADERS = f"{MODEL}::test_tokenizer_revision_remote_code_attention_and_dtype_reach_the_loaders"
_SPLITS = f"{DATA}::test_split_sampling_format_and_seed_keys"
_CONLL = f"{DATA}::test_conll_columns_pick_the_words_and_the_tags"
_TYPES = f"{TASK}::test_every_task_type_runs_its_own_task"
_SEQ_CLS_PREDICT = f"{TASK}::test_seq_cls_max_length_and_predict_batch_size_at_predict"
_TOKEN_LOSS = f"{TASK}::test_token_cls_label_all_tokens_and_class_weights_change_the_training_loss"
_TOKEN_PREDICT = f"{TASK}::test_token_cls_long_inputs_stride_and_predict_batch_size_at_predict"
_QA_WINDOWS = f"{TASK}::test_qa_windows_follow_max_length_doc_stride_and_predict_batch_size"
_QA_DECODING = f"{TASK}::test_qa_decoding_keys_change_the_answers"
_S2S_PROMPT = f"{TASK}::test_seq2seq_prompt_keys_change_what_the_model_reads"
_S2S_GENERATION = f"{TASK}::test_seq2seq_generation_keys"
_QUANT = f"{QUANT}::test_quantization_keys_shape_the_quantized_base"
_EXPORT = f"{EXPORT}::test_export_table_sets_the_merge_and_export_defaults"
_SWEEP = f"{SWEEP}::test_sweep_keys_decide_the_trials_and_the_best"

KEY_EFFECT_TESTS: dict[str, str] = {
    # [adapter] (peftkit's own keys; the others are peft's)
    "adapter.loraplus_lr_ratio": f"{LORAPLUS}::test_loraplus_trains_lora_b_at_ratio_times_the_learning_rate",
    "adapter.loraplus_lr_embedding": f"{LORAPLUS}::test_loraplus_lr_embedding_sets_the_embedding_lora_rate",
    # [model]
    "model.name_or_path": _MODEL_LOADERS,
    "model.revision": _MODEL_LOADERS,
    "model.tokenizer": _MODEL_LOADERS,
    "model.decoder_name_or_path": (
        "tests/integration/test_seq2seq_cli.py::test_warm_start_trains_cross_attention_and_reloads_it"
    ),
    "model.gguf_file": f"{MODEL}::test_gguf_file_is_the_weights_finetune_trains",
    "model.trust_remote_code": _MODEL_LOADERS,
    "model.dtype": _MODEL_LOADERS,
    "model.attn_implementation": _MODEL_LOADERS,
    # [data]
    "data.dataset": (
        "tests/integration/test_token_cls.py::test_finetune_writes_labels_metrics_and_per_word_predictions"
    ),
    "data.config": f"{DATA}::test_config_names_the_hub_dataset_configuration",
    "data.revision": f"{DATA}::test_splits_pick_rename_and_skip_and_revision_reaches_load_dataset",
    "data.splits": f"{DATA}::test_splits_pick_rename_and_skip_and_revision_reaches_load_dataset",
    "data.train_file": _SPLITS,
    "data.validation_file": _CONLL,
    "data.test_file": _SPLITS,
    "data.format": _SPLITS,
    "data.columns": _SPLITS,
    "data.validation_split": _SPLITS,
    "data.max_train_samples": _SPLITS,
    "data.max_eval_samples": _SPLITS,
    "data.max_test_samples": _SPLITS,
    "data.seed": _SPLITS,
    "data.conll_word_column": _CONLL,
    "data.conll_tag_column": _CONLL,
    "data.num_proc": f"{DATA}::test_num_proc_tokenizes_in_that_many_processes",
    # [quantization]
    "quantization.bits": _QUANT,
    "quantization.quant_type": _QUANT,
    "quantization.double_quant": _QUANT,
    "quantization.compute_dtype": _QUANT,
    "quantization.skip_modules": _QUANT,
    # [export]
    "export.dtype": _EXPORT,
    "export.max_shard_size": _EXPORT,
    "export.formats": _EXPORT,
    "export.gguf_type": "tests/integration/test_gguf_export.py::test_export_takes_the_recipe_gguf_type",
    # [train]: peftkit's own keys (the others are TrainingArguments fields, forwarded unchanged)
    "train.output_dir": "tests/integration/test_cli_seq_cls.py::test_run_directory_has_every_artifact",
    "train.deepspeed": "tests/distributed/test_launchers.py::test_two_process_run_matches_single_process",
    "train.early_stopping_patience": (
        "tests/integration/test_workflows.py::test_early_stopping_keeps_and_saves_the_best_checkpoint"
    ),
    "train.early_stopping_threshold": (
        f"{TRAIN}::test_early_stopping_threshold_decides_what_counts_as_an_improvement"
    ),
    "train.resume": "tests/integration/test_resume.py::test_resume_auto_in_the_recipe_and_a_changed_recipe",
    "train.max_train_minutes": (
        "tests/integration/test_time_budget.py::test_time_budget_stops_training_then_evaluates_and_saves"
    ),
    "train.save_base_weights": (
        "tests/integration/test_hf_loadable_runs.py::test_without_base_weights_the_run_holds_the_adapter_only"
    ),
    "train.fused_lora": (
        "tests/integration/test_fused_lora.py::test_fused_path_is_the_same_run_as_peft_layers"
    ),
    # [sweep]
    "sweep.metric": _SWEEP,
    "sweep.direction": _SWEEP,
    "sweep.sampler": _SWEEP,
    "sweep.pruner": _SWEEP,
    "sweep.seed": _SWEEP,
    "sweep.startup_trials": _SWEEP,
    "sweep.baseline_trial": _SWEEP,
    "sweep.space": _SWEEP,
    # [task] type = "seq_cls"
    "task.seq_cls.type": _TYPES,
    "task.seq_cls.max_length": _SEQ_CLS_PREDICT,
    "task.seq_cls.num_labels": "tests/integration/test_seq_cls_variants.py::test_finetune_and_reload",
    "task.seq_cls.label_list": f"{TASK}::test_seq_cls_type_and_label_list_fix_the_head_and_its_label_order",
    "task.seq_cls.predict_batch_size": _SEQ_CLS_PREDICT,
    "task.seq_cls.class_weights": f"{TASK}::test_seq_cls_class_weights_change_the_training_loss",
    # [task] type = "token_cls"
    "task.token_cls.type": _TYPES,
    "task.token_cls.max_length": _TOKEN_PREDICT,
    "task.token_cls.label_all_tokens": _TOKEN_LOSS,
    "task.token_cls.scheme": f"{TASK}::test_token_cls_scheme_none_scores_tags_not_entities",
    "task.token_cls.long_inputs": _TOKEN_PREDICT,
    "task.token_cls.stride": _TOKEN_PREDICT,
    "task.token_cls.label_list": f"{TASK}::test_token_cls_type_and_label_list_name_integer_tags",
    "task.token_cls.predict_batch_size": _TOKEN_PREDICT,
    "task.token_cls.class_weights": _TOKEN_LOSS,
    # [task] type = "qa"
    "task.qa.type": _TYPES,
    "task.qa.version_2_with_negative": _QA_DECODING,
    "task.qa.max_length": _QA_WINDOWS,
    "task.qa.doc_stride": _QA_WINDOWS,
    "task.qa.n_best_size": _QA_DECODING,
    "task.qa.max_answer_length": _QA_DECODING,
    "task.qa.null_score_diff_threshold": _QA_DECODING,
    "task.qa.predict_batch_size": _QA_WINDOWS,
    # [task] type = "seq2seq"
    "task.seq2seq.type": _TYPES,
    # inherited from every task's [task] fields but unused by seq2seq: setting it is refused
    "task.seq2seq.max_length": f"{TASK}::test_seq2seq_max_length_is_refused",
    "task.seq2seq.source_prefix": _S2S_PROMPT,
    "task.seq2seq.prompt_template": _S2S_PROMPT,
    "task.seq2seq.use_chat_template": _S2S_PROMPT,
    "task.seq2seq.system_prompt": _S2S_PROMPT,
    "task.seq2seq.chat": "tests/integration/test_chat_cli.py::test_chat_run_scores_the_last_reply",
    "task.seq2seq.max_source_length": _S2S_PROMPT,
    "task.seq2seq.max_target_length": _S2S_PROMPT,
    "task.seq2seq.num_beams": _S2S_GENERATION,
    "task.seq2seq.max_new_tokens": _S2S_GENERATION,
    "task.seq2seq.metrics": _S2S_GENERATION,
    "task.seq2seq.predict_batch_size": _S2S_GENERATION,
}


def _fields(model: Any) -> list[str]:
    return list(getattr(model, "model_fields", {}))


def _section_class(annotation: Any) -> Any:
    """The pydantic class inside ``X`` or ``X | None`` (None when the annotation holds none)."""
    import typing

    from pydantic import BaseModel

    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def sweep_keys() -> list[str]:
    """The [sweep] table's keys: its pydantic model when the recipe layer has one, else its key list."""
    from peftkit import recipe

    field = recipe.Recipe.model_fields.get("sweep")
    section = _section_class(field.annotation) if field is not None else None
    if section is not None:
        return _fields(section)
    keys = getattr(recipe, "SWEEP_KEYS", None)
    if keys is None:
        from peftkit import sweep

        keys = sweep.SWEEP_KEYS
    return list(keys)


def owned_keys() -> list[str]:
    """Every recipe key peftkit defines itself, read from the recipe schema in code."""
    from peftkit import recipe
    from peftkit.tasks import TASKS

    keys: list[str] = []
    for table in ("model", "data", "quantization", "export"):
        section = _section_class(recipe.Recipe.model_fields[table].annotation)
        assert section is not None, f"[{table}] is no pydantic model any more"
        keys += [f"{table}.{name}" for name in _fields(section)]
    keys += [f"train.{name}" for name in recipe.TRAIN_OWN_KEYS]
    keys += [f"adapter.{name}" for name in recipe.ADAPTER_OWN_KEYS]
    keys += [f"sweep.{name}" for name in sweep_keys()]
    for name, task in sorted(TASKS.items()):
        keys += [f"task.{name}.{field}" for field in _fields(task.config_class)]
    return keys
