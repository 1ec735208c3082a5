"""JSON log lines for sagaz processes (opt-in: importing sagaz configures nothing).

    sagaz worker --log-format json ...      # or: configure(level="info", fmt="json")

One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the
exception when there is one; fields passed with ``extra={...}`` are included.
Both formats mask the password of every URL in a line (``sagaz.errors.mask_url``): a
library's message or traceback may quote the URL it was given.

Saga fields: a line written while sagaz handles one saga input (the stream worker one input
message, a participant one command, the engine one step attempt, the user's step code
included) carries ``saga_id``, ``step``, ``command_id`` and ``trace_id`` (null when the input
has none: a start has no step). The handler binds them in a context variable for the time
it handles that input (``bind``/``unbind``, or ``saga_fields``) and resets them after; the
JSON formatter adds them to each line. Binding stores what the handler has at hand (for the
worker, the raw input bytes) and the fields are worked out only when a line is written, so
handling costs one context-variable set and reset. The engine binds per step only when
saga fields are wanted (a ``JsonFormatter`` exists, or ``want_saga_fields()`` was called),
as a step there costs a few microseconds in all.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

import orjson

from sagaz.errors import mask_url

#: (saga_id, step, command_id, trace, raw message) of the saga input being handled; trace:
#: trace headers, a span or None; raw: the input's bytes, decoded for what is missing.
_FIELDS: ContextVar[tuple[Any, ...] | None] = ContextVar("sagaz_saga_fields", default=None)
FIELD_NAMES = ("saga_id", "step", "command_id", "trace_id")

#: True once something formats the saga fields (read by the engine before binding them)
wanted = False


def want_saga_fields() -> None:
    """Make the in-process engine bind saga fields per step (a JsonFormatter does this);
    for a formatter of your own that reads ``current_fields()``."""
    global wanted
    wanted = True


def bind(saga_id: str | None, step: str | None = None, command_id: str | None = None,
         trace: Any = None, raw: bytes | None = None) -> Token[tuple[Any, ...] | None]:
    """Bind the saga fields of the input being handled; ``unbind`` the token after."""
    return _FIELDS.set((saga_id, step, command_id, trace, raw))


def unbind(token: Token[tuple[Any, ...] | None]) -> None:
    _FIELDS.reset(token)


@contextlib.contextmanager
def saga_fields(saga_id: str | None, step: str | None = None, command_id: str | None = None,
                trace: Any = None, raw: bytes | None = None) -> Iterator[None]:
    token = bind(saga_id, step, command_id, trace, raw)
    try:
        yield
    finally:
        unbind(token)


def current_fields() -> dict[str, Any] | None:
    """The saga fields of the input being handled here, or None outside one."""
    bound = _FIELDS.get()
    if bound is None:
        return None
    saga_id, step, command_id, trace, raw = bound
    if raw is not None:  # what the handler did not decode itself: from the message
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            msg = None
        if isinstance(msg, dict):
            saga_id = saga_id or _str(msg.get("saga_id"))
            step = step or _str(msg.get("step"))
            command_id = command_id or _str(msg.get("command_id"))
            trace = trace or msg.get("trace")
    from sagaz.tracing import trace_id_of

    trace_id = trace_id_of(trace)
    if trace_id is None and "opentelemetry.trace" in sys.modules:
        from opentelemetry.trace import get_current_span

        trace_id = trace_id_of(get_current_span())
    return {"saga_id": saga_id, "step": step, "command_id": command_id, "trace_id": trace_id}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None

_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the saga fields of the input being handled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        want_saga_fields()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        fields = current_fields()
        if fields is not None:
            doc.update(fields)
        for key, value in vars(record).items():  # extra={...} wins
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
