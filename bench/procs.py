"""Process plumbing for the benchmarks: ports, pinning, CPU and RSS readings.

Everything here listens on 127.0.0.1 only, and every process started is
owned by a ``Procs`` that stops exactly the processes it started (by pid).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def which(name: str) -> str | None:
    """Like shutil.which, but also looks in the sbin directories (nginx lives there)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def cores() -> int:
    return len(os.sched_getaffinity(0))


def pin(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """``taskset -c CPUS argv`` when pinning is possible, else argv unchanged."""
    if cpus is None or which("taskset") is None or cores() < 2:
        return list(argv)
    return ["taskset", "-c", cpus, *argv]


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes, from /proc/PID/stat (their own threads included)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def workers(self) -> list[int]:
        """nginx: the worker processes (they do the work; the master idles)."""
        return children(self.pid) or [self.pid]

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Procs:
    """Starts processes, remembers them, and stops exactly those (by pid)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              port: int = 0, wait: float = 20.0) -> Proc:
        log = self.workdir / f"{name}.log"
        fh = log.open("ab")
        popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, cwd=ROOT)
        fh.close()
        proc = Proc(name, popen, log, port)
        self.started.append(proc)
        if port:
            try:
                wait_port(port, wait, popen)
            except RuntimeError as exc:
                raise RuntimeError(f"{name} did not start: {exc}\n{proc.tail()}") from None
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            # nginx: SIGQUIT is a graceful stop; SIGTERM is fast. Everyone else: SIGTERM.
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(proc)

    @contextlib.contextmanager
    def session(self) -> Iterator[Procs]:
        try:
            yield self
        finally:
            self.stop_all()


def gateway_argv(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "proxy", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]


def redis_argv(port: int) -> list[str]:
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes"]


def redis_info(port: int, section: str) -> dict[str, str]:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", section], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    info: dict[str, str] = {}
    for line in out.splitlines():
        if ":" in line and not line.startswith("#"):
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    return info


def redis_counters(port: int) -> dict[str, int]:
    """Commands by name (cmdstat_*) and the server's read events (≈ client round trips)."""
    stats = redis_info(port, "commandstats")
    out: dict[str, int] = {}
    for k, v in stats.items():
        fields = dict(p.split("=", 1) for p in v.split(","))
        out[k.removeprefix("cmdstat_")] = int(fields["calls"])
    general = redis_info(port, "stats")
    out["__reads__"] = int(general.get("total_reads_processed", 0))
    return out


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "loadavg_at_start": " ".join(load),
    }
