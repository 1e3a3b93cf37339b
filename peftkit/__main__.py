"""``python -m peftkit``: the entry point for ``deepspeed -m``, ``torchrun -m``, ``accelerate launch -m``."""

from __future__ import annotations

import sys

from peftkit.cli import main

if __name__ == "__main__":
    # Launchers append --local_rank=N (deepspeed); torch reads LOCAL_RANK from the environment instead.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main(prog_name="peftkit")
