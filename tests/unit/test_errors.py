"""One exception root: every exception class sagaz and its stream app define is a SagazError
(and keeps its standard base, so ``except ValueError`` still catches what it caught)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import sagaz
from sagaz import SagazError
from sagaz.errors import SagaDefinitionError

ROOT = Path(__file__).resolve().parents[2]


def modules() -> list[str]:
    names = []
    for package in ("sagaz", "streams"):
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
    return names


def test_every_exception_class_derives_from_sagaz_error() -> None:
    seen, wrong = [], []
    for name in modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            seen.append(f"{name}.{cls.__qualname__}")
            if not issubclass(cls, SagazError):
                wrong.append(f"{name}.{cls.__qualname__}")
    assert not wrong, f"not derived from sagaz.SagazError: {wrong}"
    assert "streams.app.DeadLetterFailed" in seen and "sagaz.messages.MessageError" in seen


def test_standard_bases_are_kept() -> None:
    from sagaz.messages import MessageError
    from sagaz.topics import TopicMismatch

    assert issubclass(MessageError, ValueError) and issubclass(TopicMismatch, RuntimeError)
    assert issubclass(SagaDefinitionError, ValueError)
    assert sagaz.SagazError is SagazError
