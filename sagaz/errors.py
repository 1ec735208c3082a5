"""Exceptions raised by sagaz. Each message names what is wrong."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagaz.result import SagaResult

# scheme://user:password@ -- the password runs to the last '@' of the URL (up to
# whitespace or a quote), so a raw '@', ':', '/', '?' or '#' in it is masked too (and in a
# rare URL with '@' in its path, a little more than the password).
# Not when what follows the ':' is a port and a path ('http://host:8080/a@b').
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/?#\s'\"]*):(?!\d+(?:[/?#]|$))[^\s'\"]*@")
# ...?password=secret (libpq and redis URLs take it as a query parameter too)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd)=)[^&;\s'\"]*",
                             re.IGNORECASE)


def mask_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by
    ``***`` (``user:***@``).

    A regex over any text, not a URL parser, so it also cleans the message of a
    third-party exception that embeds the URL, a repr, or a log line with several URLs.
    Every URL sagaz puts in a log line, an error or a view goes through it."""
    return _QUERY_PASSWORD.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>:***@", text))


def url_for_error(url: str) -> str:
    """How an error message shows a URL it could not use: masked; and when it lacks the
    ``scheme://`` that ``mask_url`` keys on (``amqp:/admin:pw@host``), not echoed at all
    if it has an '@', which may follow a password."""
    if "://" in url or "@" not in url:
        return repr(mask_url(url))
    return "(not shown: it has no scheme:// and may hold a password)"


def safe_cause(exc: BaseException) -> BaseException | None:
    """``exc`` to chain as the cause of a masked error, or None when its own text shows a
    password (a chained traceback would print it)."""
    text = str(exc)
    return exc if mask_url(text) == text else None


def describe(exc: BaseException) -> str:
    """'Type: message' (or just the type): how step errors are recorded and reported.
    URL passwords in the message are masked: the text is stored in saga state, sent in
    results and dead-letter headers, and shown by the query views."""
    text = mask_url(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SagazError(Exception):
    """Base of every sagaz exception."""


class SagaDefinitionError(SagazError, ValueError):
    """The saga definition is invalid: unknown dependency, cycle, duplicate, non-async step..."""


class SagaContextError(SagazError, TypeError):
    """A context value (or step result) cannot be serialised for transport."""


class SagaFailed(SagazError):
    """Raised by ``execute(..., raise_on_failure=True)`` when a saga did not complete."""

    def __init__(self, result: SagaResult) -> None:
        self.result = result
        super().__init__(
            f"saga {result.name!r} ({result.saga_id}) ended {result.status.value}: {result.error}"
        )


class SagaAlreadyRunning(SagazError, RuntimeError):
    """An idempotency key of this saga is held by another run that has not saved its first
    snapshot: it is starting right now (in another engine or process), or it died less than
    the claim lease (``Engine(claim_lease=...)``) ago. Try again later: once the lease runs
    out, a stale claim is taken over. Also raised to a run whose claim was taken over that
    way, at its first snapshot, before any of its steps runs."""

    def __init__(self, message: str, *, name: str, idempotency_key: str, saga_id: str) -> None:
        super().__init__(message)
        self.name, self.idempotency_key, self.saga_id = name, idempotency_key, saga_id

    @classmethod
    def held(cls, name: str, idempotency_key: str, saga_id: str) -> SagaAlreadyRunning:
        """The key is held by run ``saga_id`` (for the caller that tried to claim it)."""
        return cls(f"saga {name!r}: idempotency key {idempotency_key!r} is held by run "
                   f"{saga_id!r}, which has not saved its first snapshot yet (it is starting, "
                   f"or died less than the claim lease ago); try again later",
                   name=name, idempotency_key=idempotency_key, saga_id=saga_id)

    @classmethod
    def taken_over(cls, name: str, idempotency_key: str, saga_id: str,
                   own: str) -> SagaAlreadyRunning:
        """Run ``own`` lost its claim (its lease ran out) to run ``saga_id``."""
        return cls(f"saga {name!r}: run {own!r} lost idempotency key {idempotency_key!r} before "
                   f"its first snapshot (its claim lease ran out); the key is now held by run "
                   f"{saga_id!r}", name=name, idempotency_key=idempotency_key, saga_id=saga_id)
