"""One access-log line per request, as JSON (default) or logfmt text.

Only the fields in ``FIELDS`` are ever written, whatever the caller passes,
so a header, a key or message content cannot reach the log by accident.
Strings are cut at ``MAX_VALUE`` characters (a model name is client input
until it is validated).
"""

from __future__ import annotations

import logging
import sys
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

    def __init__(self, logger: logging.Logger, fmt: Format = "json") -> None:
        self._logger = logger
        self._render = _json if fmt == "json" else _text

    def write(self, record: Mapping[str, object]) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        fields: dict[str, object] = {"ts": now.replace("+00:00", "Z"), "msg": "access"}
        for name, value in record.items():
            if name in _ALLOWED and (clean := _clean(value)) is not None:
                fields[name] = clean
        self._logger.info(self._render(fields))


def configure_access_log(level: str = "info", fmt: Format = "json", stream: TextIO | None = None,
                         name: str = "llm_proxy.access") -> AccessLog:
    """The access logger with its own handler: bare lines, not the app log's format."""
    logger = logging.getLogger(name)
    logger.setLevel(level.upper())
    logger.propagate = False
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return AccessLog(logger, fmt)


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
