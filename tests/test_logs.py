"""Server logs: JSON lines with the record's fields and its ``extra=`` fields; the text format as it always was."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lossd_server import __version__
from lossd_server.logs import configure_logging


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = logging.getLogger("lossd_server.test")
    before = datetime.now(UTC)
    log.debug("hidden below INFO")
    log.info("serving on %s:%d", "127.0.0.1", 50051, extra={"address": "127.0.0.1:50051", "path": Path("/x")})
    log.warning('a "quoted"\nmessage', extra={"time": "not the record's", "workers": 8})
    lines = _lines(stream)
    assert len(lines) == 2  # one object a line, even for a message with a newline
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "serving on 127.0.0.1:50051"
    assert (first["level"], first["logger"]) == ("INFO", "lossd_server.test")
    assert first["address"] == "127.0.0.1:50051"
    assert first["path"] == "/x"  # not JSON-serialisable: written as its str()
    when = datetime.fromisoformat(first["time"])
    assert first["time"].endswith("Z") and when.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= when <= datetime.now(UTC)
    assert "args" not in first and "msg" not in first and "exception" not in first  # no LogRecord internals
    assert second["message"] == 'a "quoted"\nmessage'
    assert second["level"] == "WARNING" and second["workers"] == 8
    assert second["time"] != "not the record's"  # the fixed keys win over extra fields


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_include_the_exception_text() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("lossd_server").exception("unexpected error in %s", "/lossd.v1.LossService/GetSession")
    (entry,) = (json.loads(line) for line in _lines(stream))
    assert entry["level"] == "ERROR"
    assert entry["message"] == "unexpected error in /lossd.v1.LossService/GetSession"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: boom")


@pytest.mark.usefixtures("restore_logging")
def test_text_format_is_unchanged() -> None:
    stream = io.StringIO()
    configure_logging("WARNING", "text", stream=stream)
    log = logging.getLogger("lossd_server")
    log.info("hidden below WARNING")
    log.warning("calls still running after %.1f s; cancelling them", 5.0, extra={"grace_seconds": 5.0})
    (line,) = _lines(stream)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING lossd_server: calls still running after 5\.0 s; cancelling them",
        line,
    ), line


def test_lossd_serve_logs_json_at_startup_and_shutdown() -> None:
    env = {**os.environ, "LOSSD_TORCH_THREADS": "1", "LOSSD_WORKERS": "1"}
    command = [sys.executable, "-m", "lossd_server", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
    command += ["--store", "memory", "--metrics-port", "0", "--log-format", "json"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        entries: list[dict[str, Any]] = []
        while not any("metrics_url" in entry for entry in entries):
            line = process.stderr.readline()
            assert line, f"lossd serve exited early: {entries}"
            entries.append(json.loads(line))
        (serving,) = (entry for entry in entries if "address" in entry)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", serving["address"])
        assert (serving["device"], serving["version"], serving["level"]) == ("cpu", __version__, "INFO")
        assert serving["message"].startswith(f"lossd {__version__} serving on {serving['address']}")
        url = next(entry["metrics_url"] for entry in entries if "metrics_url" in entry)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert b"lossd_sessions 0.0" in reply.read()
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=20) == 0
        final = [json.loads(line) for line in rest.splitlines()]
        assert final[-2]["message"].startswith("stopping") and final[-2]["grace_seconds"] == 5.0
        assert final[-1]["message"] == "stopped" and final[-1]["stop_seconds"] >= 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stderr.close()
