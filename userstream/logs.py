"""Log lines a person can read (``LOG_FORMAT=text``, the default) or a machine can
parse (``LOG_FORMAT=json``: one JSON object per line with ts, level, logger,
message, the process name and, for errors, the traceback).

Every process configures logging through :func:`configure_logging`, so one
setting switches all of them (the Faust worker's too, see :func:`dict_config`).

>>> import io, json, logging
>>> stream = io.StringIO()
>>> handler = logging.StreamHandler(stream)
>>> handler.setFormatter(JsonFormatter())
>>> log = logging.getLogger("doctest.json")
>>> log.addHandler(handler)
>>> log.warning("lag %d events", 12)
>>> rec = json.loads(stream.getvalue())
>>> rec["level"], rec["logger"], rec["message"]
('WARNING', 'doctest.json', 'lag 12 events')
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal

__all__ = ["LogFormat", "JsonFormatter", "configure_logging", "dict_config"]

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": os.environ.get("USERSTREAM_PROCESS", record.processName),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _formatter(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT, datefmt="%H:%M:%S")


def configure_logging(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    """The root logger writes ``fmt`` lines to stderr at ``level`` (replacing any
    handler set before); kafka-python's per-connection INFO lines are kept out."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(
        logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    )


def dict_config(fmt: LogFormat = "text", level: str = "INFO") -> dict[str, Any]:
    """The same as a ``logging.config.dictConfig`` dict (what Faust's worker takes)."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if fmt == "json"
        else {"format": TEXT_FORMAT, "datefmt": "%H:%M:%S"}
    )  # fmt: skip
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },  # fmt: skip
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {"kafka": {"level": "WARNING"}},
    }
