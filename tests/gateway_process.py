"""Run the real gateway (``python -m proxy serve``) as a process on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.stub_upstream import free_port


class _PortTaken(Exception):
    pass


class GatewayProcess:
    def __init__(self, config_text: str, env: dict[str, str] | None = None,
                 port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        # A port picked here may be taken by another test process before the gateway binds it:
        # then it is picked again. A port the caller chose, or one a client already knows, is kept.
        self._may_move = port is None
        self._dir = tempfile.TemporaryDirectory(prefix="llm-proxy-test-")
        self.config_path = Path(self._dir.name) / "config.yaml"
        self.config_path.write_text(config_text)
        self.log_path = Path(self._dir.name) / "gateway.log"
        self.env = {**os.environ, **(env or {})}
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 60.0) -> GatewayProcess:
        for _ in range(4):
            try:
                started = self._start(wait)
            except _PortTaken:
                self.port = free_port()
                continue
            self._may_move = False
            return started
        raise RuntimeError(f"no free port for the gateway:\n{self.log()}")

    def _start(self, wait: float) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path),
             "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._may_move and "address already in use" in self.log().lower():
                    raise _PortTaken
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway did not start within {wait}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop at once (SIGINT; again to skip uvicorn's wait for open requests)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
