"""What several test modules share: waiting on a condition, and small settings."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from userstream.settings import Settings

T = TypeVar("T")

# a learner small enough for unit tests (seconds on one CPU thread)
TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, dropout=0.0, device="cpu")


def tiny_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with a :data:`TINY_MODEL` learner whose files live in ``tmp_path``."""
    return Settings(**{"data_dir": tmp_path, **TINY_MODEL, **overrides})


def wait_until(
    check: Callable[[], T],
    timeout_s: float = 20.0,
    what: str = "the condition",
    proc: subprocess.Popen | None = None,
    poll_s: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something true and return that.

    Fails at once when ``proc`` exits, and after ``timeout_s`` with ``what``,
    the last value seen and ``details()`` (e.g. log tails). Exceptions in
    ``ignore`` count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        try:
            last = check()
            if last:
                return last
        except ignore:
            pass
        if time.monotonic() > deadline:
            extra = details() if details is not None else ""
            raise AssertionError(
                f"timed out after {timeout_s:.0f}s waiting for {what} (last={last!r}){extra}"
            )
        time.sleep(poll_s)
