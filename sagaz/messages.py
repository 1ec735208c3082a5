"""The messages sagaz sends over Kafka: a versioned orjson envelope, strictly validated.

Every message is keyed by saga id. ``decode`` returns a dict whose fields are checked for
presence and type, or raises MessageError with a reason fit for a dead-letter record.
An optional ``trace`` (str -> str, e.g. W3C ``traceparent``) given with a start is kept
with the saga and stamped on every command and outcome it causes.

    start       client -> orchestrator   saga, data, idempotency_key
    cancel      client -> orchestrator   reason, request_id
    retry       operator -> orchestrator request_id: retry a FAILED saga's compensations
    run         orchestrator -> participant   saga, step, attempt, command_id, data, results,
                                              version (optional: the run's definition
                                              version; absent: 1)
    compensate  orchestrator -> participant   (same fields as run)
    result      participant -> orchestrator   command_id, step, attempt, action, ok, result,
                                              error, retryable, set (context keys it set),
                                              applied (optional: ran, result not carried),
                                              elapsed (optional: seconds the attempt ran)
    timer       orchestrator -> itself        key, due
    outcome     orchestrator -> clients       saga, status, error, failed_step, data, results
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from sagaz.errors import SagazError

VERSION = 1

#: Default cap on one saga row or message, in bytes: under the Kafka producer's default
#: max_request_size (1,048,576) and the broker's message.max.bytes (1,048,588), with room
#: for the key, headers and record overhead.
MAX_MESSAGE_BYTES = 1_000_000
#: Step errors are clipped to this many characters before they go into a row or message.
MAX_ERROR_CHARS = 4000


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    kept = max(0, limit - len(f"... [{len(text)} more characters cut]"))
    return text[:kept] + f"... [{len(text) - kept} more characters cut]"


class MessageError(SagazError, ValueError):
    """A message that cannot be processed; the text is the dead-letter reason, ``kind`` its
    class for metrics (malformed, oversized, unknown_saga, no_saga: a small fixed set)."""

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


_STR, _INT, _NUM, _BOOL, _DICT, _ANY = str, int, (int, float), bool, dict, object
_OPT_STR = (str, type(None))

SCHEMA: dict[str, dict[str, Any]] = {
    "start": {"saga": _STR, "data": _DICT, "idempotency_key": _OPT_STR},
    "cancel": {"reason": _STR, "request_id": _STR},
    "retry": {"request_id": _STR},
    "run": {"saga": _STR, "step": _STR, "attempt": _INT, "command_id": _STR, "data": _DICT,
            "results": _DICT},
    "compensate": {"saga": _STR, "step": _STR, "attempt": _INT, "command_id": _STR,
                   "data": _DICT, "results": _DICT},
    "result": {"command_id": _STR, "step": _STR, "attempt": _INT, "action": _STR, "ok": _BOOL,
               "result": _ANY, "error": _OPT_STR, "retryable": _BOOL, "set": _DICT},
    "timer": {"key": _STR, "due": _NUM},
    "outcome": {"saga": _STR, "status": _STR, "error": _OPT_STR, "failed_step": _OPT_STR,
                "data": _DICT, "results": _DICT},
}


def dead_letter_headers(reason: str, topic: str, partition: int,
                        offset: int) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead letter: why, and where the original came from. The value
    and key are the original bytes, untouched."""
    return [("sagaz-reason", reason.encode()),
            ("sagaz-source", f"{topic}:{partition}:{offset}".encode())]


#: Bytes of the original value kept in a dead-letter copy that would be too large.
TRUNCATED_VALUE_BYTES = 4096


def dead_letter_record(key: bytes | None, value: bytes | None, reason: str, topic: str,
                       partition: int, offset: int, max_bytes: int
                       ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of an input's dead-letter copy: the original bytes, the reason
    (clipped) and the origin. A copy larger than ``max_bytes`` keeps the first
    ``TRUNCATED_VALUE_BYTES`` of the value, with the original's size and SHA-256."""
    headers = dead_letter_headers(clip(reason, MAX_ERROR_CHARS), topic, partition, offset)
    if len(key or b"") + len(value or b"") > max_bytes:
        original = value or b""
        headers += [("sagaz-truncated", b"true"),
                    ("sagaz-original-size", str(len(original)).encode()),
                    ("sagaz-original-sha256", hashlib.sha256(original).hexdigest().encode())]
        key, value = (key or b"")[:1024], original[:TRUNCATED_VALUE_BYTES]
    return key, value, headers


def encode(type_: str, saga_id: str, trace: dict[str, str] | None = None, **fields: Any) -> bytes:
    body = {"v": VERSION, "type": type_, "saga_id": saga_id, **fields}
    if trace:
        body["trace"] = trace
    return orjson.dumps(body)


def decode(raw: bytes | None, *, expect: frozenset[str] | None = None) -> dict[str, Any]:
    if raw is None:
        raise MessageError("empty message (no value)")
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise MessageError(f"envelope must be a JSON object, got {type(msg).__name__}")
    if msg.get("v") != VERSION:
        raise MessageError(f"unsupported envelope version {msg.get('v')!r} (expected {VERSION})")
    type_ = msg.get("type")
    schema = SCHEMA.get(type_)  # type: ignore[arg-type]
    if schema is None or (expect is not None and type_ not in expect):
        allowed = sorted(expect if expect is not None else SCHEMA)
        raise MessageError(f"unexpected message type {type_!r} (expected one of {allowed})")
    sid = msg.get("saga_id")
    if not isinstance(sid, str) or not sid:
        raise MessageError("saga_id must be a non-empty string")
    for name, kind in schema.items():
        if name not in msg:
            raise MessageError(f"{type_} message lacks field {name!r}")
        value = msg[name]
        if kind is not _ANY and (not isinstance(value, kind) or (
                kind in (_INT, _NUM) and isinstance(value, bool))):
            raise MessageError(f"{type_} field {name!r} has the wrong type "
                               f"({type(value).__name__})")
    trace = msg.get("trace")
    if trace is not None and (not isinstance(trace, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in trace.items())):
        raise MessageError("trace must map str to str (e.g. W3C traceparent)")
    return msg
