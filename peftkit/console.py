"""What reaches the console: library warnings that do not apply to a peftkit run are dropped, each by its
logger and message (real warnings of the same libraries still show), and progress bars only where they
redraw in place (a terminal or a notebook), never piled up in a log file.

Imports nothing heavy at module level; the CLI calls :func:`quiet_libraries` before its first heavy import.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

# deepspeed (imported by accelerate on every Trainer) logs this on any machine without CUDA, once per
# process; on a CPU run that is simply the truth. Kept when the recipe uses DeepSpeed.
DEEPSPEED_NO_ACCELERATOR = "If you have GPU or other accelerator, we were unable to detect it"
# bitsandbytes on an AVX512-BF16 CPU fetches an optional 4-bit GEMM kernel from the Hub at import and
# falls back to its own implementation when it cannot (offline, or `kernels` not installed); only a 4-bit
# CPU run uses that kernel. Kept for such a run.
BNB_OPTIONAL_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
# peft, saving an adapter whose base folder has no config.json (a GGUF file), cannot tell whether the
# vocabulary was resized; peftkit never resizes embeddings (the pad token reuses an existing one).
PEFT_NO_BASE_CONFIG = r"Could not find a config file in .* will assume that the vocabulary was not modified"


class DropMessages(logging.Filter):
    """Drop the records whose message contains one of ``needles``; pass every other record."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


def _drop(logger_name: str, needle: str) -> None:
    logger = logging.getLogger(logger_name)
    # a logger's filters survive the library configuring it later (deepspeed sets its level and handler
    # on import, after this runs); one filter per message, however often this is called
    if not any(isinstance(f, DropMessages) and f.needles == (needle,) for f in logger.filters):
        logger.addFilter(DropMessages(needle))


def progress_bars_fit() -> bool:
    """Whether progress bars redraw in place: stderr is a terminal, or this is a notebook."""
    if sys.stderr is not None and sys.stderr.isatty():
        return True
    try:
        from IPython import get_ipython  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def drop_notices(*, deepspeed: bool = False, four_bit: bool = False) -> None:
    """Drop the known library notices that do not apply (``deepspeed``/``four_bit``: the run uses them)."""
    if not deepspeed:
        _drop("DeepSpeed", DEEPSPEED_NO_ACCELERATOR)
    if not four_bit:
        _drop("bitsandbytes.backends.cpu.ops", BNB_OPTIONAL_CPU_KERNEL)
    warnings.filterwarnings("ignore", message=PEFT_NO_BASE_CONFIG, category=UserWarning)


def quiet_libraries(*, deepspeed: bool = False, four_bit: bool = False) -> None:
    """:func:`drop_notices`, and off a terminal no progress bars of datasets, transformers and
    huggingface_hub (the Trainer's follow ``disable_tqdm``, see ``trainer.training_arguments``)."""
    drop_notices(deepspeed=deepspeed, four_bit=four_bit)
    if progress_bars_fit():
        return
    configure_library(
        "datasets", {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}, lambda m: m.disable_progress_bars()
    )
    configure_library(
        "transformers",
        {"HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        lambda m: m.utils.logging.disable_progress_bar(),
    )
    configure_library(
        "huggingface_hub",
        {"HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        lambda m: m.utils.disable_progress_bars(),
    )


def follow_transformers_progress_switch() -> None:
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"):
    ``modeling_gguf_pytorch_utils`` imports tqdm directly, so transformers' progress-bar switch does not reach
    it. Called before a GGUF file is read: the bar then shows exactly when transformers' own bars do (off in
    a log file under the CLI, see :func:`quiet_libraries`, or wherever the user switched them off)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = gguf_utils.tqdm
    if getattr(original, "follows_transformers_switch", False):
        return  # routed by an earlier load

    def bar(*args: Any, **kwargs: Any) -> Any:
        if not hf_logging.is_progress_bar_enabled():
            kwargs["disable"] = True
        return original(*args, **kwargs)

    bar.follows_transformers_switch = True  # type: ignore[attr-defined]
    gguf_utils.tqdm = bar


def configure_library(module: str, environment: dict[str, str], configure: Any) -> None:
    """Configure a library now if this process has imported it, else through the environment variables
    it reads when it is imported (importing transformers or datasets only to configure them costs seconds
    of a command that may never need them, such as ``validate`` of a recipe with a typo). A variable the
    user set is kept."""
    if module in sys.modules:
        configure(sys.modules[module])
        return
    for name, value in environment.items():
        os.environ.setdefault(name, value)
