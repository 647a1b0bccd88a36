"""What the sub-commands share: resolving the settings with a readable error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["existing", "resolved_settings", "set_threads"]


def resolved_settings(**overrides: Any):
    """The service settings (env vars, settings file), with ``overrides``; exits
    with the validation message when they are invalid."""
    from pydantic import ValidationError

    from userstream.settings import Settings

    try:
        base = Settings()
        return base.replace(**overrides) if overrides else base
    except ValidationError as exc:
        raise SystemExit(f"invalid settings (env vars, settings file or options):\n{exc}") from None


def existing(*paths: str | Path) -> None:
    """Exit with a message naming the first path that does not exist."""
    for p in paths:
        if not Path(p).exists():
            raise SystemExit(f"{p} does not exist")


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` unless 0 (torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
