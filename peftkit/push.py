"""``peftkit push``: a finished run directory, merged folder or bundle → a Hugging Face Hub model repository.

Only folders peftkit wrote, and only finished ones: a run whose status is ``completed``, a merged folder whose
checks passed, an export bundle. Checkpoints, TensorBoard logs and staging folders stay local. The token comes
from where huggingface_hub looks (``HF_TOKEN``, ``hf auth login``'s stored token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.errors import PushError

# what stays on this machine: resumable training state, logs, peftkit's scratch folders
LOCAL_ONLY = ["checkpoint-*/**", "incomplete-*/**", "runs/**", f"{runs.STAGING}/**", "*.partial-*/**"]


def pushable_kind(folder: Path) -> str:
    """'run', 'merged' or 'bundle' for a finished folder peftkit wrote; else a PushError saying why not."""
    if not folder.is_dir():
        raise PushError(
            f"{folder}: no such folder; pass a run directory, a merged folder or an export bundle"
        )
    if (folder / runs.EXPORT_MANIFEST).is_file():
        runs.read_json_object(folder / runs.EXPORT_MANIFEST, {})
        return "bundle"
    if (folder / runs.MERGE_REPORT).is_file():
        report = runs.read_json_object(folder / runs.MERGE_REPORT, {})
        if report.get("status") != "passed":
            raise PushError(
                f"{folder / runs.MERGE_REPORT}: the merge's checks did not pass (status "
                f"{report.get('status')!r}); refusing to publish it. Merge again and push the verified folder"
            )
        return "merged"
    if (folder / runs.RUN_META).is_file():
        meta = runs.read_json_object(folder / runs.RUN_META, {})
        if meta.get("status") != "completed":
            raise PushError(
                f"{folder}: refusing to push an unfinished run: "
                f"{runs.incomplete_run_message(folder, meta).split(': ', 1)[-1]}"
            )
        runs.check_adapter_files(folder)
        return "run"
    raise PushError(
        f"{folder}: not a folder peftkit wrote (no {runs.RUN_META}, {runs.MERGE_REPORT} or "
        f"{runs.EXPORT_MANIFEST}); peftkit pushes only its own run directories, merged folders and bundles. "
        "Use `hf upload` for other folders"
    )


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False) -> dict[str, Any]:
    """Create (or reuse) the model repository ``repo_id`` and upload the folder; returns what was done."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(folder)
    kind = pushable_kind(path)
    if constants.HF_HUB_OFFLINE:
        raise PushError(
            f"cannot push {path} to {repo_id}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1 "
            "or TRANSFORMERS_OFFLINE=1); unset it where the network is reachable and run `peftkit push` again"
        )
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(path),
            repo_type="model",
            ignore_patterns=LOCAL_ONLY,
            commit_message=f"peftkit push: {kind} {path.name}",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = (
            "log in with `hf auth login` or set HF_TOKEN to a token with write access"
            if status in (401, 403)
            else "check the repository id and your access to it"
        )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PushError(f"cannot push {path} to {repo_id} ({first}); {hint}") from None
    except (OSError, ValueError) as exc:  # no network, no token, a malformed repo id
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PushError(
            f"cannot push {path} to {repo_id} ({type(exc).__name__}: {first}); check the network, "
            "the repository id (<user or org>/<name>) and your login (`hf auth login` or HF_TOKEN)"
        ) from None
    return {"kind": kind, "repo_id": repo_id, "url": str(url), "commit": str(getattr(commit, "oid", commit))}
