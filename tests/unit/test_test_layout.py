"""The test tree's own rule: test modules are collected by basename (``tests/unit`` and
``tests/integration`` are not packages), so two files of one name in different folders
break the collection of the whole suite ("import file mismatch"). It happened twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_its_own_basename() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)
    twice = sorted(n for n, k in names.items() if k > 1)
    assert not twice, f"test modules with the same basename in different folders: {twice}"
