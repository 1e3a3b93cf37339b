"""The console of ``peftkit finetune`` in a log file: no library notice that does not apply to the run, no
progress bars piled up, and a summary that names the kept checkpoint and why (issue 20, "Console")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, invoke_cli
from tests.integration.test_cli_seq_cls import write_split

# each line here was in such a log before: deepspeed's CPU notice, bitsandbytes' optional-kernel notice,
# peft's GGUF-base notice, and the carriage-return updates of tqdm bars (Trainer, datasets.map, loading)
NOISE = (
    "we were unable to detect it",
    "gemm_4bit_forward",
    "will assume that the vocabulary was not modified",
    "\r",
    "it/s]",
    "examples/s]",
)

RECIPE = """
[model]
name_or_path = "{model}"

[task]
type = "seq_cls"
max_length = 32

[data]
train_file = "train.csv"
validation_file = "validation.csv"

[adapter]
r = 4
alpha = 8

[train]
num_train_epochs = 2
per_device_train_batch_size = 8
learning_rate = 1e-3
logging_steps = 2
eval_strategy = "steps"
eval_steps = 4
save_strategy = "steps"
save_steps = 4
report_to = []
output_dir = "run"
{extra}
"""


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    write_split(tmp_path / "train.csv", 48, 0)
    write_split(tmp_path / "validation.csv", 12, 1)
    return tmp_path


def test_a_logged_finetune_is_quiet_and_names_the_kept_checkpoint(work: Path, tiny_bert_dir: Path) -> None:
    (work / "recipe.toml").write_text(RECIPE.format(model=tiny_bert_dir, extra=""))
    log = work / "finetune.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "peftkit", "finetune", "recipe.toml"],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        ).returncode
    text = log.read_text(encoding="utf-8")
    assert code == 0, text[-3000:]
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the log:\n{text}"
    # the Trainer's progress is one line per logging step instead: 12 steps, logging every 2 steps
    assert sum(line.startswith("{'loss'") for line in text.splitlines()) == 6
    # the best eval_f1_macro (the seq_cls default) chose the checkpoint the run kept
    history = json.loads((work / "run" / "log_history.json").read_text())
    evals = [(row["eval_f1_macro"], row["step"]) for row in history if "eval_f1_macro" in row]
    best_value, best_step = max(evals, key=lambda pair: (pair[0], -pair[1]))
    kept = [line.strip() for line in text.splitlines() if line.strip().startswith("kept ")]
    assert kept == [
        f"kept checkpoint-{best_step} (highest eval_f1_macro {best_value:.4g} at step {best_step}; "
        "training ran to step 12 of 12)"
    ], text[-2000:]


def test_without_best_model_selection_the_summary_says_the_last_step(work: Path, tiny_bert_dir: Path) -> None:
    extra = "load_best_model_at_end = false\nmax_steps = 3"
    (work / "recipe.toml").write_text(RECIPE.format(model=tiny_bert_dir, extra=extra))
    cwd = Path.cwd()
    os.chdir(work)  # output_dir = "run" resolves against the recipe's folder either way
    try:
        result = invoke_cli("finetune", str(work / "recipe.toml"))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output[-3000:]
    assert "kept the last step (step 3 of 3; no best-model selection)" in result.output


def test_the_filters_drop_only_the_notices_that_do_not_apply() -> None:
    """The exact notices, emitted through the loggers and warning calls the libraries use, in a fresh
    process: dropped by default, the bitsandbytes and DeepSpeed ones kept for runs that use them, and any
    other warning of the same loggers kept."""
    script = textwrap.dedent(
        """
        import logging, sys, warnings
        from peftkit.console import drop_notices
        drop_notices(four_bit=sys.argv[1] == "4bit", deepspeed=sys.argv[1] == "ds")
        logging.basicConfig(format="%(name)s: %(message)s")
        bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
        bnb.warning("a real bitsandbytes warning")
        ds = logging.getLogger("DeepSpeed")
        ds.warning("Setting accelerator to CPU. "
                   "If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("a real DeepSpeed warning")
        warnings.warn("Could not find a config file in /m - "
                      "will assume that the vocabulary was not modified.")
        warnings.warn("a real peft warning")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outputs = {}
    for mode in ("cpu", "4bit", "ds"):
        result = subprocess.run(
            [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        outputs[mode] = result.stderr
    for output in outputs.values():
        assert "a real bitsandbytes warning" in output and "a real DeepSpeed warning" in output
        assert "a real peft warning" in output and "vocabulary was not modified" not in output
    assert "gemm_4bit_forward" not in outputs["cpu"] and "unable to detect" not in outputs["cpu"]
    assert "gemm_4bit_forward" in outputs["4bit"] and "unable to detect" not in outputs["4bit"]
    assert "gemm_4bit_forward" not in outputs["ds"] and "unable to detect" in outputs["ds"]


def test_the_gguf_readers_bar_follows_the_transformers_switch() -> None:
    """transformers' GGUF reader imports tqdm itself, past transformers' progress-bar switch: peftkit routes
    it through the switch, so the CLI's quiet console (switch off in a log file) has no GGUF bar either,
    and a user who keeps transformers' bars on keeps this one."""
    script = textwrap.dedent(
        """
        import sys
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
        from peftkit.console import follow_transformers_progress_switch, quiet_libraries
        if sys.argv[1] == "quiet":
            quiet_libraries()  # stderr is a pipe here: progress bars off
        else:
            hf_logging.enable_progress_bar()
        follow_transformers_progress_switch()
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    stderr = {}
    for mode in ("quiet", "bars"):
        result = subprocess.run(
            [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        stderr[mode] = result.stderr
    assert "GGUF tensors" not in stderr["quiet"], stderr["quiet"]
    assert stderr["bars"].count("Converting and de-quantizing GGUF tensors") >= 1, stderr["bars"]
