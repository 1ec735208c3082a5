"""Topic names are built in one place (sagaz.topics.topic_name): no stray f-string names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sagaz.topics import TOPIC_KINDS, Topics, topic_name

ROOT = Path(__file__).resolve().parents[2]
# an f-string that puts a topic's suffix after an interpolation: "{prefix}.commands" ...
STRAY = re.compile(r"""f["'][^"'\n]*\}(\.(commands|results|timers|outcomes|"""
                   r"""dead-letters|participant|inbox)\b|-orchestrator|-changelog)""")


def test_no_topic_name_is_built_outside_topic_name() -> None:
    stray = []
    for package in ("sagaz", "streams"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "sagaz" / "topics.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if STRAY.search(line):
                    stray.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not stray, "build topic names with sagaz.topics.topic_name:\n" + "\n".join(stray)


def test_every_topic_kind() -> None:
    t = Topics("p")
    assert (t.commands, t.results, t.timers, t.outcomes, t.dead_letters) == (
        "p.commands", "p.results", "p.timers", "p.outcomes", "p.dead-letters")
    assert t.participant("svc") == "p.participant.svc"
    assert t.participant_inbox("svc") == "p.participant.svc.inbox"
    assert (t.orchestrator, t.changelog) == ("p-orchestrator", "p-orchestrator-sagas-changelog")
    assert {k for k in TOPIC_KINDS} == {"commands", "results", "timers", "outcomes",
                                        "dead-letters", "participant", "participant-inbox",
                                        "orchestrator", "changelog"}


@pytest.mark.parametrize("args, message", [
    (("", "commands"), "prefix must be non-empty"),
    (("a b", "commands"), "prefix must be non-empty"),
    (("p", "nope"), "unknown topic kind 'nope'"),
    (("p", "participant"), "needs a service"),
    (("p", "commands", "svc"), "takes no service"),
    (("p", "participant", "a/b"), "service must be"),
])
def test_bad_names_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        topic_name(*args)
