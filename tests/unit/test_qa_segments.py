"""Regression: QA adapters must see the tokenizer's segment ids (peft's QUESTION_ANS wrapper drops them)."""

from __future__ import annotations

from pathlib import Path

import torch


def test_qa_adapter_forward_uses_token_type_ids(tiny_bert_dir: Path) -> None:
    from transformers import AutoConfig

    from peftkit.adapters import apply_adapter
    from peftkit.modeling import load_model, load_tokenizer
    from peftkit.recipe import ModelSection
    from peftkit.tasks import TASKS
    from peftkit.tasks.base import TaskContext

    task = TASKS["qa"]
    section = ModelSection(name_or_path=str(tiny_bert_dir))
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    ctx = TaskContext(task.config_class(), load_tokenizer(section), None, config)
    torch.manual_seed(0)
    model = apply_adapter(load_model(section, task, ctx), {"method": "lora", "r": 4}, task, config).eval()
    inputs = ctx.tokenizer("who?", "the cat sat on the mat", return_tensors="pt")
    assert bool(inputs["token_type_ids"].any())
    with torch.no_grad():
        with_segments = model(**inputs).start_logits
        zeroed = model(
            **{**inputs, "token_type_ids": torch.zeros_like(inputs["token_type_ids"])}
        ).start_logits
    assert not torch.allclose(with_segments, zeroed), "token_type_ids were dropped on the way to the model"
