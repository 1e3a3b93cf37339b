"""``peftkit push``: only finished folders peftkit wrote reach the Hub; offline it says so (issue 18).

No network here: the refusals happen before any request, and the upload itself is checked against a
recording stand-in for huggingface_hub's ``HfApi`` (what would be created and uploaded, and what stays local).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke_cli
from tests.hostile.common import assert_clear_error, assert_nothing_lost, snapshot


def fake_run(folder: Path, status: str = "completed") -> Path:
    """A run directory's records and a whole (tiny) adapter: all that push reads."""
    import torch
    from safetensors.torch import save_file

    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")
    (folder / "peftkit_run.json").write_text(json.dumps({"status": status, "recipe": {}, "name": "r"}))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.hostile("clear_error")
def test_push_refuses_an_unfinished_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", status="interrupted")
    before = snapshot(run)
    result = invoke_cli("push", str(run), "me/model")
    assert_clear_error(result, str(run), "unfinished run", "'interrupted'", "--resume")
    assert_nothing_lost(before, snapshot(run), run)


@pytest.mark.hostile("clear_error")
def test_push_refuses_a_folder_peftkit_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("private")
    result = invoke_cli("push", str(tmp_path / "mine"), "me/model")
    assert_clear_error(result, str(tmp_path / "mine"), "not a folder peftkit wrote", "peftkit_run.json")


@pytest.mark.hostile("clear_error")
def test_push_refuses_a_merge_whose_checks_failed(tmp_path: Path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "merge_report.json").write_text(json.dumps({"status": "failed"}))
    result = invoke_cli("push", str(tmp_path / "merged"), "me/model")
    assert_clear_error(result, "merge_report.json", "did not pass")


@pytest.mark.hostile("clear_error")
def test_push_offline_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = invoke_cli("push", str(fake_run(tmp_path / "run")), "me/model")
    assert_clear_error(result, "me/model", "HF_HUB_OFFLINE=1")


@pytest.mark.hostile("success")
def test_push_uploads_a_finished_run_without_its_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fnmatch

    from huggingface_hub import HfApi, constants

    calls: dict[str, Any] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        calls["create"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: Any, **kwargs: Any) -> Any:
        calls["upload"] = kwargs
        return type("Commit", (), {"oid": "abc123"})()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    run = fake_run(tmp_path / "run")
    result = invoke_cli("push", str(run), "me/model", "--private")
    assert result.exit_code == 0, result.output
    assert "pushed run" in result.output and "https://huggingface.co/me/model" in result.output
    assert calls["create"] == ("me/model", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = calls["upload"]
    assert upload["repo_id"] == "me/model" and Path(upload["folder_path"]) == run
    ignored = upload["ignore_patterns"]
    kept = [
        name
        for name in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "peftkit_run.json",
            "checkpoint-4/optimizer.pt",
        )
        if not any(fnmatch.fnmatch(name, pattern) for pattern in ignored)
    ]
    assert kept == ["adapter_config.json", "adapter_model.safetensors", "peftkit_run.json"]
