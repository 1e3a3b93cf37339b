"""The hostile-input corpus: every case states its expected outcome, and the session reports the counts.

A case is a test marked ``@pytest.mark.hostile(outcome)`` where ``outcome`` is ``"clear_error"`` (exit 2, one
message naming the file and key or line, no traceback) or ``"success"`` (the documented success). At the end
of the session the terminal summary prints how many cases were tried and how each ended; a failed case counts
as a traceback or as data lost, whichever its assertion says (see ``common.py``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

OUTCOMES = ("clear_error", "success")
_tally: Counter[str] = Counter()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("hostile")
        if marker is None:
            continue
        outcome = marker.args[0] if marker.args else marker.kwargs.get("outcome")
        if outcome not in OUTCOMES:
            wanted = " or ".join(OUTCOMES)
            raise pytest.UsageError(f"{item.nodeid}: hostile outcome must be {wanted}, not {outcome!r}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = (yield).get_result()
    marker = item.get_closest_marker("hostile")
    if marker is None or report.when != "call":
        return
    outcome = marker.args[0] if marker.args else marker.kwargs["outcome"]
    _tally["tried"] += 1
    if report.passed:
        _tally["clear errors" if outcome == "clear_error" else "documented successes"] += 1
    else:
        text = str(report.longrepr)
        _tally["data lost" if "DATA LOST" in text else "tracebacks or wrong outcomes"] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _tally:
        return
    order = ("tried", "clear errors", "documented successes", "tracebacks or wrong outcomes", "data lost")
    line = ", ".join(f"{name} {_tally[name]}" for name in order)
    terminalreporter.write_line(f"hostile-input corpus: {line}")
