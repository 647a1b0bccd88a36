"""Command-line options derived from the typed configurations, not re-declared.

:func:`add_fields` adds one ``--kebab-case`` option per field of a pydantic
model (type, choices and help from the field itself); :func:`given` reads back
the ones the user gave, so a command passes only those on and every default
stays where the model defines it.

>>> import argparse
>>> from userstream.settings import ModelSettings
>>> p = argparse.ArgumentParser()
>>> add_fields(p, ModelSettings, "model", only=("hidden_size", "positions", "post_norm"))
>>> given(p.parse_args(["--hidden-size", "32", "--no-post-norm"]), "model")
{'hidden_size': 32, 'post_norm': False}
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

__all__ = ["add_fields", "given"]


def _kind(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse type, choices) of a field annotation; (None, None) when a flag
    cannot express it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if origin is typing.Literal:
        return type(args[0]), tuple(args)
    if annotation in (int, float, str, bool):
        return annotation, None
    return None, None


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    dest_prefix: str,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: BaseModel | None = None,
    default_notes: dict[str, str] | None = None,
) -> None:
    """One option per field of ``model`` (all, or ``only`` those) whose type a
    flag can express. Booleans get ``--name`` / ``--no-name``. Options left out
    on the command line are absent from the namespace (see :func:`given`).

    The help shows each default: the field's, or ``defaults``' value of it (an
    instance the command starts from), or the text in ``default_notes``."""
    names = list(only) if only is not None else list(model.model_fields)
    for name in names:
        if name in skip:
            continue
        field = model.model_fields[name]
        kind, choices = _kind(field.annotation)
        if kind is None:
            if only is not None:
                raise TypeError(f"{model.__name__}.{name} cannot be a command-line option")
            continue
        flag = "--" + name.replace("_", "-")
        shown = getattr(defaults, name) if defaults is not None else field.default
        note = (default_notes or {}).get(name, None if shown is None else f"default: {shown}")
        help_text = (field.description or "") + (f" ({note})" if note else "")
        common: dict[str, Any] = {
            "dest": f"{dest_prefix}.{name}",
            "default": argparse.SUPPRESS,
            "help": help_text.strip() or None,
        }
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(flag, type=kind, choices=choices, metavar=name.upper()
                                if choices is None else None, **common)  # fmt: skip


def given(args: argparse.Namespace, dest_prefix: str) -> dict[str, Any]:
    """The fields of ``dest_prefix`` given on the command line: {field: value}."""
    start = f"{dest_prefix}."
    return {k[len(start) :]: v for k, v in vars(args).items() if k.startswith(start)}
