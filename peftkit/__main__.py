"""``python -m peftkit``: the entry point for ``deepspeed -m``, ``torchrun -m``, ``accelerate launch -m``."""

from __future__ import annotations

import sys

from peftkit.cli import run

if __name__ == "__main__":
    # The deepspeed launcher passes --local_rank=N before the command (torch.distributed.launch passes
    # --local-rank=N); the rank is also in LOCAL_RANK, which torch, accelerate and DeepSpeed read.
    sys.argv = [a for a in sys.argv if not a.startswith(("--local_rank=", "--local-rank="))]
    run()
