"""One access-log line per request, as JSON (default) or logfmt text.

Only the fields in ``FIELDS`` are ever written, whatever the caller passes,
so a header, a key or message content cannot reach the log by accident.
Strings are cut at ``MAX_VALUE`` characters (a model name is client input
until it is validated).

``configure_access_log`` gives a log that writes its lines to the stream
itself: no ``LogRecord`` and no handler per request, and the lines of one
event-loop iteration leave in one write and one flush (bench/README.md, #5).
Without a stream, lines go through the logger as logging is configured.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

Format = Literal["json", "text"]

FIELDS = ("request_id", "trace_id", "method", "path", "status", "team", "key_name", "model",
          "upstream", "stream", "prompt_tokens", "completion_tokens", "attempts", "duration_ms",
          "ttft_ms", "overhead_ms", "error_code", "client_ip")
MAX_VALUE = 200
_ALLOWED = frozenset(FIELDS)


class AccessLog:
    """Writes at INFO; set the logger's level above INFO to turn access logs off."""

    def __init__(self, logger: logging.Logger, fmt: Format = "json", stream: TextIO | None = None) -> None:
        self._logger = logger
        self._render = _json if fmt == "json" else _text
        self._stream = stream
        self._lines: list[str] = []  # written at the end of this loop iteration
        self._clock = _Timestamps()

    def write(self, record: Mapping[str, object]) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        fields: dict[str, object] = {"ts": self._clock.now(), "msg": "access"}
        for name, value in record.items():
            if value is None or name not in _ALLOWED:
                continue
            # The usual types first, without a call; the same rules as _clean.
            if isinstance(value, str):
                if value:
                    fields[name] = value[:MAX_VALUE]
            elif isinstance(value, int):
                fields[name] = value
            elif (clean := _clean(value)) is not None:
                fields[name] = clean
        line = self._render(fields)
        if self._stream is None:
            self._logger.info(line)
            return
        self._lines.append(line)
        if len(self._lines) == 1:
            self._flush_soon()

    def flush(self) -> None:
        """Write out the lines still held (the app calls this at shutdown)."""
        if not self._lines or self._stream is None:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: as logging does, lose the lines, not the request
            return

    def _flush_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the event loop (tools, tests): at once
            self.flush()
            return
        loop.call_soon(self.flush)


class _Timestamps:
    """ISO 8601 UTC with milliseconds; the date and time up to the second are
    formatted once a second, not per line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{int((now - second) * 1000):03d}Z"


def configure_access_log(level: str = "info", fmt: Format = "json", stream: TextIO | None = None,
                         name: str = "llm_proxy.access") -> AccessLog:
    """The access log, writing bare lines (not the app log's format) to ``stream``
    (stdout by default); its logger's level turns it on or off."""
    logger = logging.getLogger(name)
    logger.setLevel(level.upper())
    logger.propagate = False
    for old in list(logger.handlers):
        logger.removeHandler(old)
    out = stream or sys.stdout
    # For anything else that logs to this logger: the same stream, the same bare lines.
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return AccessLog(logger, fmt, out)


def _clean(value: object) -> str | int | float | bool | None:
    if isinstance(value, str):
        return value[:MAX_VALUE] if value else None
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, bool | int):
        return value
    return None  # anything else (None, containers, objects) has no place in an access line


def _json(fields: Mapping[str, object]) -> str:
    return orjson.dumps(fields).decode()


def _text(fields: Mapping[str, object]) -> str:
    return " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())


def _logfmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return orjson.dumps(text).decode()
    return text
