"""Config hot reload: on SIGHUP, and when the file changes.

Kubernetes updates a mounted ConfigMap by swapping a symlink, so the watcher
compares the content it reads through the path (not an inode or an mtime).
A new config is validated in full before anything is swapped; a bad one is
logged and counted, and the running config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .loader import load_config
from .types import Config


class ConfigWatcher:
    def __init__(self, path: str | os.PathLike[str], apply: Callable[[Config], None],
                 outcome: Callable[[str], None], logger: logging.Logger, interval: float = 2.0) -> None:
        self.path = Path(path)
        self._apply = apply
        self._outcome = outcome
        self._log = logger
        self._interval = interval
        self._digest = self._read_digest()
        self._task: asyncio.Task[None] | None = None

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self, force: bool = False) -> bool:
        """Reload if the file changed (or when forced); True when a new config was applied."""
        digest = self._read_digest()
        if digest is None or (digest == self._digest and not force):
            return False
        self._digest = digest
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            self._log.error("config reload rejected, keeping the running config: %s",
                            "; ".join(exc.problems))
            self._outcome("error")
            return False
        self._apply(config)
        self._log.info("config reloaded from %s", self.path)
        self._outcome("ok")
        return True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._watch())
        try:
            loop.add_signal_handler(signal.SIGHUP, self.check, True)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests run apps in threads)
            self._log.debug("SIGHUP reload unavailable in this thread")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.check()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
