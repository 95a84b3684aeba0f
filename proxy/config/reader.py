"""A typed walk over raw YAML data that collects problems with their paths.

Kept apart from ``config`` so the shape of the config (there) reads as a
schema, and the mechanics of checking (here) are written once.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T", bound=str)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '(top level)'}: {message}")

    def substitute(self, value: Any, path: str) -> Any:
        """Replace ``${NAME}`` / ``${NAME:-default}`` in a string value."""
        if not isinstance(value, str) or "${" not in value:
            return value

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            self.problem(path, f"environment variable {name} is not set")
            return ""

        return _VAR.sub(replace, value)

    def mapping(self, raw: Any, path: str, allowed: Collection[str],
                optional: bool = False) -> dict[str, Any] | None:
        if raw is None and optional:
            return None
        if not isinstance(raw, dict):
            self.problem(path, "must be a mapping")
            return None
        for key in raw:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.problem(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
        return raw

    def seq(self, raw: Any, path: str, required: bool = False) -> Sequence[Any]:
        if raw is None:
            if required:
                self.problem(path, "is required")
            return ()
        if not isinstance(raw, list):
            self.problem(path, "must be a list")
            return ()
        return raw

    def string(self, raw: Any, path: str, required: bool = False,
               empty_is_none: bool = False) -> str | None:
        known = len(self.problems)
        value = self.substitute(raw, path)
        if len(self.problems) > known:
            return None  # an unset variable was already reported for this path
        if value is None or (empty_is_none and value == ""):
            if required:
                self.problem(path, "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.problem(path, "must be a string")
            return None
        text = str(value)
        if required and not text:
            self.problem(path, "must not be empty")
            return None
        return text

    def secret(self, raw: Any, path: str, required: bool = False) -> str | None:
        """A key or password: surrounding whitespace dropped (a secret file's trailing newline),
        none inside, since it is sent in a header."""
        text = self.string(raw, path, required=required, empty_is_none=True)
        if text is None:
            return None
        text = text.strip()
        if not text or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
            self.problem(path, "must be a non-empty secret without spaces or control characters")
            return None
        return text

    def choice(self, raw: Any, path: str, options: Sequence[T]) -> T | None:
        value = self.string(raw, path)
        for option in options:
            if value == option:
                return option
        self.problem(path, f"must be one of {', '.join(options)} (got {value!r})")
        return None

    def number(self, raw: Any, path: str, minimum: float | None = None,
               exclusive: bool = False) -> float:
        value = self._numeric(raw, path, float)
        if value is None:
            return 0.0
        self._check_minimum(value, path, minimum, exclusive)
        return float(value)

    def integer(self, raw: Any, path: str, minimum: int | None = None) -> int:
        value = self._numeric(raw, path, int)
        if value is None:
            return 0
        self._check_minimum(value, path, minimum, False)
        return int(value)

    def optional_int(self, raw: Any, path: str, minimum: int | None = None) -> int | None:
        if self.substitute(raw, path) in (None, ""):
            return None
        return self.integer(raw, path, minimum)

    def boolean(self, raw: Any, path: str) -> bool:
        value = self.substitute(raw, path)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            self.problem(path, "must be true or false")
            return False
        return value

    def timestamp(self, raw: Any, path: str) -> datetime | None:
        value = self.substitute(raw, path)
        if value in (None, ""):
            return None
        if isinstance(value, datetime):
            moment = value
        else:
            try:
                moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                self.problem(path, "must be an ISO 8601 timestamp, e.g. 2027-01-01T00:00:00Z")
                return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def _numeric(self, raw: Any, path: str, kind: type) -> float | int | None:
        value = self.substitute(raw, path)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value) if kind is int else float(value)
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            self.problem(path, f"must be {'an integer' if kind is int else 'a number'}")
            return None
        assert isinstance(value, (int, float))
        # NaN passes every comparison with a minimum, and a timeout of NaN or infinity
        # breaks the timer it is given (YAML's .nan / .inf, or "nan" from the environment).
        if not math.isfinite(value):
            self.problem(path, "must be a finite number")
            return None
        return value

    def _check_minimum(self, value: float, path: str, minimum: float | None,
                       exclusive: bool) -> None:
        if minimum is None:
            return
        if exclusive and value <= minimum:
            self.problem(path, f"must be > {minimum:g}")
        elif not exclusive and value < minimum:
            self.problem(path, f"must be >= {minimum:g}")
