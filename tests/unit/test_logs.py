from __future__ import annotations

import json
import logging

import pytest

from sagaz.logs import JsonFormatter, handler


def test_json_lines_carry_level_logger_message_extras_and_exceptions():
    record = logging.LogRecord("sagaz.outbox", logging.WARNING, __file__, 1,
                               "published %d events", (3,), None)
    record.saga_id = "s-1"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "warning" and doc["logger"] == "sagaz.outbox"
    assert doc["message"] == "published 3 events" and doc["saga_id"] == "s-1"
    assert doc["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]
    with pytest.raises(ValueError, match="log format must be 'text' or 'json'"):
        handler("xml")
