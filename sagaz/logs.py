"""JSON log lines for sagaz processes (opt-in: importing sagaz configures nothing).

    sagaz worker --log-format json ...      # or: configure(level="info", fmt="json")

One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the
exception when there is one; fields passed with ``extra={...}`` are included.
Both formats mask the password of every URL in a line (``sagaz.errors.mask_url``): a
library's message or traceback may quote the URL it was given.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from sagaz.errors import mask_url

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        return mask_url(orjson.dumps(doc, default=str).decode())


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, URL passwords masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask_url(super().format(record))


def handler(fmt: str) -> logging.Handler:
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return h


def configure(level: str = "info", fmt: str = "text") -> None:
    """Set up the root logger of a sagaz process (the CLI calls this; a library never)."""
    root = logging.getLogger()
    root.handlers[:] = [handler(fmt)]
    root.setLevel(level.upper())
