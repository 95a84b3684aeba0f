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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Tracing configured but not sampled (issue 7): an exporter endpoint nobody
# listens on, and a sampler that drops every span.
GATEWAY_ENV = {
    "OTEL_SERVICE_NAME": "llm-proxy-bench",
    "OTEL_TRACES_SAMPLER": "always_off",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9/",
    "OTEL_METRICS_EXPORTER": "none",
    "OTEL_LOGS_EXPORTER": "none",
}


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


@dataclass(frozen=True)
class Layout:
    """Which CPUs run what. The gateway under test has a CPU of its own, and the second gateway
    of the two-process run another. Everything else (the load generators, the stub, Redis, the
    profiler) shares the second gateway's CPU on a two-CPU machine, and has every other CPU on a
    larger one, where the two-process run then measures the gateways alone (bench/README.md)."""

    gateway: int
    second_gateway: int
    rest: tuple[int, ...]

    @property
    def shared(self) -> bool:
        """Whether the rest runs on the gateways' CPUs (a two-CPU machine)."""
        return self.second_gateway in self.rest

    def awake_order(self) -> list[int]:
        """The CPUs of the layout, the gateway's first (not the gateways' hyperthreads, whose
        spinners would take from the gateways' cores)."""
        return [self.gateway, *sorted({self.second_gateway, *self.rest} - {self.gateway})]


def physical_core(cpu: int) -> tuple[str, str]:
    """(package, core) of a CPU, from /sys: the hyperthreads of one core share it."""
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
    except OSError:
        return "", str(cpu)


def layout(cpus: Sequence[int] | None = None,
           core_of: Callable[[int], tuple[str, str]] = physical_core) -> Layout:
    """The layout for these CPUs (default: those this process may run on). The two gateways go
    on two physical cores where there are two (two hyperthreads of one core would measure one
    core), and the rest keeps off their hyperthreads where other CPUs are left."""
    ids = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    first = ids[0]
    if len(ids) < 2:  # nothing is pinned (pin() leaves argv alone)
        return Layout(first, first, (first,))
    second = next((c for c in ids[1:] if core_of(c) != core_of(first)), ids[1])
    taken = {core_of(first), core_of(second)}
    others = [c for c in ids if c not in (first, second)]
    apart = [c for c in others if core_of(c) not in taken]
    return Layout(second, first, tuple(apart or others) or (first,))


# pin()'s name for the CPUs of everything but the gateways: Layout.rest.
REST = "rest"


def cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def pin(cpus: str | int | None, argv: Sequence[str]) -> list[str]:
    """``taskset -c CPUS argv`` when pinning is possible, else argv unchanged. ``cpus``: a CPU,
    a taskset list, REST (the layout's), or None (not pinned)."""
    if cpus is None or which("taskset") is None or cores() < 2:
        return list(argv)
    spec = cpu_list(layout().rest) if cpus == REST else str(cpus)
    return ["taskset", "-c", spec, *argv]


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


def core_busy_seconds(core: int) -> float:
    """Busy time of one core (everything but idle and iowait), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            v = [int(x) for x in line.split()[1:]]
            return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK
    return 0.0


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


def tcp_ports(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of the process's established TCP sockets (IPv4 and IPv6)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    except OSError:
        return []
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[9] in inodes and f[3] == "01":  # ESTABLISHED
                    out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)))
    return out


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
    stop_signal: int = signal.SIGTERM

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

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        port: int = 0,
        wait: float = 20.0,
        stop_signal: int = signal.SIGTERM,
        cwd: Path = ROOT,
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        fh = log.open("ab")
        popen = subprocess.Popen(
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        fh.close()
        proc = Proc(name, popen, log, port, stop_signal)
        self.started.append(proc)
        if port:
            try:
                wait_port(port, wait, popen)
            except RuntimeError as exc:
                raise RuntimeError(f"{name} did not start: {exc}\n{proc.tail()}") from None
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            # nginx and redis: SIGTERM is a fast stop. The gateway: SIGINT (SIGTERM first
            # keeps serving for server.shutdown_delay, as Kubernetes needs).
            proc.popen.send_signal(proc.stop_signal)
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


@contextlib.contextmanager
def cores_awake(procs: Procs, cpus: Sequence[int]) -> Iterator[list[int]]:
    """One spinner per core at SCHED_IDLE: it runs only when nothing else wants the core, and any
    wake-up preempts it at once, so it takes no time from the processes measured; it only keeps
    the core from idling. A virtual CPU that idles is halted by the host, and its next wake-up
    (the host's scheduler, a cold cache) is what a low constant rate pays per request on a VM.
    Yields the spinners' pids, in the order of ``cpus`` (their CPU is not "foreign" load)."""
    spinners = []
    for core in cpus:
        argv = ["chrt", "--idle", "0", *pin(core, ["sh", "-c", "while :; do :; done"])]
        spinners.append(procs.start(f"awake-{core}", argv))
    try:
        yield [p.pid for p in spinners]
    finally:
        for p in spinners:
            procs.stop(p)


def gateway_root() -> Path:
    """The checkout whose ``proxy`` package is benchmarked: this one, or $BENCH_GATEWAY_ROOT
    (to compare a change against a baseline checkout on the same machine)."""
    return Path(os.environ.get("BENCH_GATEWAY_ROOT") or ROOT).resolve()


def start_gateway(
    procs: Procs, name: str, config: Path, port: int, cpus: str | int | None, env: dict[str, str] | None = None
) -> Proc:
    root = gateway_root()
    pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return procs.start(
        name,
        pin(cpus, gateway_argv(config, port)),
        {**(env or {}), "PYTHONPATH": pythonpath},
        port,
        wait=30.0,
        stop_signal=signal.SIGINT,
        cwd=root,
    )


def gateway_argv(config: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def redis_argv(port: int) -> list[str]:
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
    ]


def redis_info(port: int, section: str) -> dict[str, str]:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", section],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    info: dict[str, str] = {}
    for line in out.splitlines():
        if ":" in line and not line.startswith("#"):
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    return info


SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def redis_counters(port: int) -> dict[str, int]:
    """Commands by name (cmdstat_*) and the server's read events (≈ client round trips),
    read with ONE ``INFO all`` (so a delta contains exactly one INFO and one read of ours)."""
    info = redis_info(port, "all")
    out: dict[str, int] = {"__script_usec__": 0}
    for k, v in info.items():
        if k.startswith("cmdstat_"):
            fields = dict(p.split("=", 1) for p in v.split(","))
            name = k.removeprefix("cmdstat_")
            out[name] = int(fields["calls"])
            if name in SCRIPT_COMMANDS:  # their time includes the commands the scripts ran
                out["__script_usec__"] += int(fields["usec"])
    out["__reads__"] = int(info.get("total_reads_processed", 0))
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


@dataclass
class Backends:
    """What the gateway under test talks to, on the layout's REST CPUs: the nginx stub and (with
    quotas) Redis."""

    stub: Proc
    stub_port: int
    redis: Proc | None
    redis_port: int | None


def start_backends(procs: Procs, workdir: Path, stub_conf: Callable[[int], Path], quotas: bool) -> Backends:
    """Redis when ``quotas``, then the nginx stub whose config ``stub_conf(port)`` writes."""
    redis, redis_port = None, None
    if quotas:
        redis_port = free_port()
        redis = procs.start("redis", pin(REST, redis_argv(redis_port)), port=redis_port)
    stub_port = free_port()
    nginx = which("nginx") or "nginx"
    stub = procs.start("stub", pin(REST, [nginx, "-c", str(stub_conf(stub_port)), "-p", str(workdir)]),
                       port=stub_port)
    return Backends(stub, stub_port, redis, redis_port)
