"""The explicit task registry: name → :class:`~peftkit.tasks.base.Task`."""

from __future__ import annotations

from peftkit.tasks import qa, seq2seq, seq_cls, token_cls
from peftkit.tasks.base import Task

TASKS: dict[str, Task] = {
    "seq_cls": seq_cls.TASK,
    "qa": qa.TASK,
    "token_cls": token_cls.TASK,
    "seq2seq": seq2seq.TASK,
}

__all__ = ["TASKS", "Task"]
