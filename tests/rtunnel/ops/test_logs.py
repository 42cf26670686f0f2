"""Access lines written by rtunnel.ops.logs' own buffered sink: the same text as the logging module would write,
in both formats, flushed on time, before other lines and at exit, and off with `--access-log off`."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from rtunnel.ops import logs
from rtunnel.ops.logs import Access, AccessLog, JsonFormatter, flush_periodically

ACCESS = Access("GET", "/a b/ü", 200, 0, 12, 1.25, 'id-"quoted"')
FIELDS: dict[str, object] = {
    "method": "GET",
    "path": "/a b/ü",
    "status": 200,
    "bytes_in": 0,
    "bytes_out": 12,
    "duration_ms": 1.25,
    "request_id": 'id-"quoted"',
    "client": "127.0.0.1",
}
NONE = Access("GET", "/", None, 0, 0, 0.0, None)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if logs._sink is not None:
        logs._sink.flush()
    logs._sink = None
    logs.AccessLog.enabled_by_option = True
    root.handlers[:] = handlers
    root.setLevel(level)


def through_logging(fmt: str, name: str, message: str, fields: dict[str, object]) -> str:
    """The line the logging module writes for the same access record (what the sink must reproduce)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(logs.HUMAN_FORMAT))
    logger = logging.Logger(name)
    logger.addHandler(handler)
    logger.info(message, extra=fields)
    return out.getvalue()


def drop_time(fmt: str, line: str) -> object:
    if fmt == "json":
        record = json.loads(line)
        assert record["time"].endswith("Z") and len(record["time"]) == len("2026-01-01T00:00:00.000Z")
        record["time"] = "T"
        return record
    assert line[19] == "," and line[23] == " ", line  # "YYYY-MM-DD HH:MM:SS,mmm "
    return line[24:]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_sink_writes_what_the_logging_module_would(fmt: str, restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", fmt, out)
    message = "127.0.0.1 GET /a b/ü 200 in=0 out=12 1.2ms id=x %s"  # a % in a path is no format
    AccessLog("rtunnel.relay.access").write(message, ACCESS, "client", "127.0.0.1")
    assert out.getvalue() == ""  # buffered until the next flush
    assert logs._sink is not None
    logs._sink.flush()
    expected = through_logging(fmt, "rtunnel.relay.access", message, FIELDS)
    assert drop_time(fmt, out.getvalue()) == drop_time(fmt, expected)
    if fmt == "json":
        record = json.loads(out.getvalue())
        assert list(record) == ["time", "level", "logger", "message", *FIELDS]


def test_buffered_lines_go_out_before_any_other_line(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", "text", out)
    AccessLog("rtunnel.agent.access").write("first", NONE, "note", None)
    logging.getLogger("rtunnel.agent").warning("second")
    lines = out.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["first", "second"]


def test_access_log_off_and_level_warning_write_nothing(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", "text", out, access=False)
    assert not AccessLog("rtunnel.relay.access").enabled
    logs.setup("warning", "text", out)
    assert not AccessLog("rtunnel.relay.access").enabled
    logs.setup("info", "text", out)
    assert AccessLog("rtunnel.relay.access").enabled


def test_without_setup_lines_go_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    assert logs._sink is None
    with caplog.at_level(logging.INFO, logger="rtunnel.relay.access"):
        AccessLog("rtunnel.relay.access").write("GET / 200", ACCESS, "client", None)
    (record,) = [r for r in caplog.records if r.name == "rtunnel.relay.access"]
    assert record.getMessage() == "GET / 200"
    assert record.status == 200


def test_a_burst_is_written_once_it_reaches_the_size_bound(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("info", "text", out)
    access = AccessLog("rtunnel.relay.access")
    line = "x" * 1000
    written = 0
    while not out.getvalue():
        access.write(line, NONE, "note", None)
        written += 1
        assert written * 1000 <= logs.FLUSH_SIZE + 1000
    assert out.getvalue().count("\n") == written


async def test_flushed_within_the_interval_and_when_stopped(
    restore_logging: None, autojump_clock: trio.testing.MockClock
) -> None:
    out = io.StringIO()
    logs.setup("info", "text", out)
    access = AccessLog("rtunnel.relay.access")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_periodically)
        await trio.testing.wait_all_tasks_blocked()
        access.write("one", NONE, "note", None)
        await trio.sleep(logs.FLUSH_INTERVAL * 0.9)
        assert out.getvalue() == ""
        await trio.sleep(logs.FLUSH_INTERVAL * 0.2)
        assert out.getvalue().endswith(": one\n")
        access.write("two", NONE, "note", None)
        nursery.cancel_scope.cancel()  # the process stops: what is buffered still goes out
    assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == ["one", "two"]
