"""The data a saga run carries from step to step."""

from __future__ import annotations

from typing import Any

import orjson

from sagaz.errors import SagaContextError

_MISSING: Any = object()


def check_serialisable(what: str, value: Any) -> None:
    """Raise SagaContextError unless orjson can encode value (it will cross Kafka)."""
    if value is None or type(value) in (str, int, float, bool):
        return
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise SagaContextError(
            f"{what} is not serialisable with orjson ({type(value).__name__}): {exc}; "
            f"use dicts with str keys, lists, str, int, float, bool, None, datetime or UUID"
        ) from None


class SagaContext:
    """Key/value data of one run, plus each completed step's return value by step name.

    Values must be orjson-serialisable: ``set`` rejects anything else at once, so a saga that
    works in-process also works when its context travels through Kafka.

    The data reads as attributes too: ``ctx.order_id`` is ``ctx["order_id"]`` (an
    AttributeError naming the known keys if it is missing; ``ctx.get`` returns a default).
    Real attributes and methods win (``ctx.data``, ``ctx.get``, ``ctx.saga_id`` ...): read
    such keys with ``ctx["get"]``. Writes go through ``ctx.set`` or ``ctx[key] = value``. The
    participant that runs a step over Kafka hands it the same class, so this reads the same
    in both.
    """

    __slots__ = ("data", "results", "saga_id", "saga_name")

    def __init__(self, saga_id: str, saga_name: str, data: dict[str, Any] | None = None,
                 results: dict[str, Any] | None = None) -> None:
        self.saga_id = saga_id
        self.saga_name = saga_name
        self.data: dict[str, Any] = {}
        for key, value in (data or {}).items():
            self.set(key, value)
        self.results: dict[str, Any] = dict(results or {})

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise SagaContextError(f"context keys must be str, got {key!r}")
        check_serialisable(f"context value {key!r}", value)
        self.data[key] = value

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, so never shadows a real attribute or method.
        if name.startswith("__") or name in self.__slots__:  # protocols; unset slots
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(
                f"saga context has no key {name!r} (keys: {', '.join(sorted(self.data)) or 'none'})"
                f"; ctx.get({name!r}) returns None instead") from None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def result(self, step: str, default: Any = _MISSING) -> Any:
        """The return value of a completed step; KeyError (or default) if it has none yet."""
        if default is _MISSING:
            try:
                return self.results[step]
            except KeyError:
                raise KeyError(f"step {step!r} has no result (not completed yet?)") from None
        return self.results.get(step, default)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "results": self.results}

    def __repr__(self) -> str:
        return (f"SagaContext(saga_id={self.saga_id!r}, data={self.data!r}, "
                f"results={self.results!r})")
