"""nginx as the load balancer in front of several gateway processes (the Kubernetes Service's role).

``NginxLB(ports).start()`` writes a config into a temporary directory and runs
``nginx -c CONF -p DIR`` in the foreground on a free loopback port; ``stop()``
ends it. Every answer carries ``X-Upstream-Addr`` (nginx's ``$upstream_addr``:
the gateways tried, comma-separated when nginx retried on another one), and
``access.log`` records the same per request.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.stub_upstream import free_port


def nginx_binary() -> str | None:
    """``nginx`` on PATH or in the sbin directories (Debian puts it in /usr/sbin)."""
    found = shutil.which("nginx")
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(d) / "nginx"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


# Why retrying a POST on another gateway is safe here (`non_idempotent`):
# nginx passes a request to the next server only while nothing of the
# response has reached the client: the connection was refused or failed, or
# it closed (or sent a 502/503) before a response header arrived. The client
# therefore never gets half of one gateway's answer spliced onto another's;
# a stream that has begun is never retried, it is cut (and ends without
# `data: [DONE]`). The price: a gateway that died after forwarding a request
# but before answering may have had it run upstream already, so the provider
# can see (and bill) it twice. For chat completions that is only cost; a
# request with side effects (the admin API issuing a key) is not retried,
# hence `non_idempotent` only under /v1/. Retrying also needs the whole
# request body in nginx, so `proxy_request_buffering` stays on (its default).
_CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    log_format lb '$request_method $uri $status upstream=$upstream_addr '
                  'upstream_status=$upstream_status time=$request_time';
    access_log {dir}/access.log lb;
    server_tokens off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    client_body_buffer_size 1m;

    upstream gateways {{
        # Passive health: {max_fails} failure(s) take a gateway out for {fail_timeout}.
{servers}
        keepalive 32;
        keepalive_timeout 30s;
    }}

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_buffering off;
    proxy_connect_timeout 2s;
    proxy_send_timeout 30s;
    proxy_read_timeout 60s;
    proxy_next_upstream_tries {tries};
    proxy_next_upstream_timeout 30s;
    add_header X-Upstream-Addr $upstream_addr always;

    server {{
        listen 127.0.0.1:{port};

        location /v1/ {{
            proxy_pass http://gateways;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        }}

        location / {{
            proxy_pass http://gateways;
            proxy_next_upstream error timeout http_502 http_503;
        }}
    }}
}}
"""


class NginxLB:
    def __init__(self, ports: Sequence[int], *, max_fails: int = 1, fail_timeout: float = 2.0,
                 port: int | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx not found")
        self.binary = binary
        self.ports = list(ports)
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="llmp-nginx-"))
        # The workers drop root to `nobody` and must reach their temp dirs (nginx chowns those).
        self.dir.chmod(0o755)
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails={max_fails} fail_timeout={fail_timeout:g}s;"
                            for p in self.ports)
        self.config_path = self.dir / "nginx.conf"
        self.config_path.write_text(_CONFIG.format(
            dir=self.dir, port=self.port, servers=servers, tries=len(self.ports),
            max_fails=max_fails, fail_timeout=f"{fail_timeout:g}s"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 10.0) -> NginxLB:
        try:
            return self._start(wait)
        except BaseException:
            self.stop()
            raise

    def _start(self, wait: float) -> NginxLB:
        (self.dir / "tmp").mkdir(exist_ok=True)
        checked = subprocess.run([self.binary, "-t", "-q", "-c", str(self.config_path), "-p", str(self.dir)],
                                 capture_output=True, text=True, timeout=10)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stdout}{checked.stderr}")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=(self.dir / "stderr.log").open("ab"))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            try:
                httpx.get(self.url + "/healthz", timeout=0.5)  # any answer: nginx listens
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.port} within {wait}s:\n{self.log()}")

    def log(self) -> str:
        """nginx's error log (retries, gateways marked failed) and its stderr."""
        parts = [p.read_text(errors="replace") for p in (self.dir / "error.log", self.dir / "stderr.log")
                 if p.exists()]
        return "".join(parts)

    def access_log(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        """SIGTERM (nginx's fast stop), SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
