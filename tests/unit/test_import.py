"""`import sagaz` is cheap and has no side effects."""

from __future__ import annotations

import json
import subprocess
import sys


def _probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_bare_import_loads_only_sagaz():
    info = _probe("import json, sys; before = set(sys.modules); import sagaz; "
                  "print(json.dumps(sorted(set(sys.modules) - before)))")
    assert info == ["sagaz"]


def test_no_module_configures_logging_or_touches_the_network():
    info = _probe(
        "import json, logging, socket\n"
        "calls = []\n"
        "socket.socket.connect = lambda *a: calls.append(a)\n"
        "import sagaz\n"
        "for name in sagaz.__all__: getattr(sagaz, name)\n"
        "import sagaz.testing.kafka, sagaz.topics\n"
        "print(json.dumps({'handlers': len(logging.getLogger().handlers),\n"
        "                  'level': logging.getLogger().level, 'connects': len(calls)}))")
    assert info == {"handlers": 0, "level": 30, "connects": 0}
