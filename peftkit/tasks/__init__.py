"""The explicit task registry: name → :class:`~peftkit.tasks.base.Task`."""

from __future__ import annotations

from peftkit.tasks import seq_cls
from peftkit.tasks.base import Task

TASKS: dict[str, Task] = {
    "seq_cls": seq_cls.TASK,
}

__all__ = ["TASKS", "Task"]
