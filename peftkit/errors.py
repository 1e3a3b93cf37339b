"""Errors that describe a user's mistake. The CLI prints them without a traceback and exits with code 2.

Every peftkit error type lives here, so that each layer can raise and catch them without importing
another layer; this module imports nothing of peftkit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class PeftkitError(Exception):
    """Base class: the message alone tells the user what is wrong and how to fix it."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where (``table.key``), what, and how to fix it."""

    key: str
    problem: str
    fix: str = ""

    def render(self, source: str) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{source}: {self.key}: {self.problem}.{fix}"


class RecipeError(PeftkitError):
    """Every problem of a recipe at once."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = [f"{source}: the recipe has {count}:"]
        lines += ["  " + p.render(source) for p in self.problems]
        super().__init__("\n".join(lines))


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match, else an empty string."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else ""


class DataError(PeftkitError):
    """A data file or dataset is unusable (missing, malformed, wrong columns, unknown labels)."""


class RunDirError(PeftkitError):
    """A run directory is missing, incomplete, corrupted, or would be overwritten."""


class ModelLoadError(PeftkitError):
    """The model or tokenizer named in [model] cannot be loaded."""


class TrainingInterrupted(PeftkitError):
    """SIGINT or SIGTERM stopped the run after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int, summary: str):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.summary = summary


class TrainingDiverged(PeftkitError):
    """The loss, the gradients or the weights stopped being finite (NaN/inf); the run is marked failed."""


class StorageError(PeftkitError):
    """An OS error writing or reading a file (disk full, read-only, permissions): the path and the cause."""


class OutputLocked(PeftkitError):
    """Another live peftkit process is writing this output folder."""


class MergeError(PeftkitError):
    """A merge cannot be done as asked (bad arguments, incompatible runs)."""


class MergeVerificationError(PeftkitError):
    """The merged model does not reproduce the adapter model; nothing was written to the output."""


class ExportError(PeftkitError):
    """An export cannot be done as asked, or its parity check failed (nothing is left at the output)."""


class OutputError(PeftkitError):
    """An output folder cannot be written as asked (a file, an input of the command, not peftkit's)."""


class PushError(PeftkitError):
    """A folder cannot go to the Hugging Face Hub (offline, not logged in, unfinished, not peftkit's)."""
