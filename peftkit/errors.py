"""Errors that describe a user's mistake. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class PeftkitError(Exception):
    """Base class: the message alone tells the user what is wrong and how to fix it."""

    exit_code = 2


class DataError(PeftkitError):
    """A data file or dataset is unusable (missing, malformed, wrong columns, unknown labels)."""


class RunDirError(PeftkitError):
    """A run directory is missing, incomplete, corrupted, or would be overwritten."""
