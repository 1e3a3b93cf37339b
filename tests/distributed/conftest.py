"""Fixtures for multi-process runs on CPU: launcher environment, compile cache, a dropout-free MiniLM.

Every launch here is a real launcher (torchrun, deepspeed, accelerate) starting 2 processes with 1 thread
each (the CI machine has 2 cores; OMP_NUM_THREADS = cores ÷ processes: docs/stack-notes.md).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, save_tiny_bert

# DeepSpeed compiles its C++ ops (the shared-memory comm op always, cpu_adam for offload) on first use.
# One fixed folder in the repository's ignored .cache/ keeps them across test sessions; the environment
# variable wins, so CI can point it at a cached folder of its own.
EXTENSIONS_DIR = Path(os.environ.get("PEFTKIT_TORCH_EXTENSIONS_DIR", REPO / ".cache" / "torch_extensions"))

# The seq_cls recipe, scaled down so that one launch trains in seconds: 256 training messages (16 steps
# of 16), 128 validation and 128 test messages, one epoch. Sequential batches: DeepSpeed/accelerate shard
# a sequential sampler's batches so that rank 0 and rank 1 together see exactly the single process's batch
# of 16 (a random sampler draws another permutation in a distributed run): the runs match step for step.
RECIPE = REPO / "recipes" / "seq_cls_lora.toml"
SAMPLE = (
    "data.max_train_samples=256",
    "data.max_eval_samples=128",
    "data.max_test_samples=128",
    "task.max_length=64",
    "train.num_train_epochs=1",
    "train.logging_steps=4",
    "adapter.dropout=0.0",  # like the model's dropout: each rank would draw its own masks
    "train.train_sampling_strategy='sequential'",
)


def launch_env() -> dict[str, str]:
    """The environment a CPU launch needs (docs/stack-notes.md, "Launching on CPU")."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # deepspeed, torchrun, accelerate
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Launch:
    command: list[str]
    returncode: int
    output: str
    seconds: float


def launch(command: str, *extra: str, cwd: Path = REPO, timeout: float = 240) -> Launch:
    """Run a documented command line (``command``, split like a shell would) with ``extra`` arguments."""
    argv = [*shlex.split(command), *extra]
    started = time.monotonic()
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Launch(argv, done.returncode, done.stdout, time.monotonic() - started)


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="session")
def tiny_bert_without_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with dropout off and MiniLM's tokenizer (seconds to train on 2 processes).

    Without dropout a 2-process run takes the same steps as a single-process run; with it each process
    would draw its own masks and the runs would differ by more than float rounding.
    """
    return save_tiny_bert(
        tmp_path_factory.mktemp("tiny-bert-nodrop"),
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(scope="session")
def deepspeed_ops() -> float:
    """Compile (or load from EXTENSIONS_DIR) the DeepSpeed ops the CPU runs use, once, before any launch.

    Both ranks of a launch would otherwise compile at their first use, inside the time the tests measure.
    Returns the seconds it took: ~0.5 s from the cache.
    """
    code = (
        "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder\n"
        "ShareMemCommBuilder().load(verbose=False)\n"
        "CPUAdamBuilder().load(verbose=False)\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    seconds = time.monotonic() - started
    print(f"DeepSpeed ops ready in {seconds:.1f} s ({EXTENSIONS_DIR})")
    return seconds
