"""The stub upstream's bytes, the client's request bodies, and nginx configs.

The answers are real OpenAI framing: a ``chat.completion`` with ``usage``,
and a stream of 20 ``chat.completion.chunk`` events (role, 18 words, finish)
each carrying ``"usage":null`` as OpenAI sends them when the gateway asks for
``stream_options.include_usage``, then the usage-only event and ``[DONE]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson

NGINX_DIR = Path(__file__).resolve().parent / "nginx"
MODEL = "bench-model"
STREAM_MODEL = "bench-stream"
SLOW_MODEL = "bench-slow"
KEY = "sk-bench"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
CREATED = 1764000000
WORDS = (
    "The quick brown fox jumps over the lazy dog while the gateway relays every event exactly as it came"
).split()

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Write one sentence about a quick brown fox and a lazy dog, please."},
]


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {"model": model, "messages": MESSAGES, "max_tokens": 64, "temperature": 0.7}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def completion() -> bytes:
    text = " ".join(WORDS[:18]) + "."
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 31,
                "completion_tokens": 19,
                "total_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }
    )


def _chunk(delta: dict[str, object], finish: str | None) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-bench0000000000000000000000",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": MODEL,
                "system_fingerprint": "fp_bench",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None,
            }
        )
        + b"\n\n"
    )


def stream(events: int = 20) -> bytes:
    """``events`` chunk events, the usage event, ``[DONE]``."""
    parts = [_chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    parts += [
        _chunk({"content": (" " if i else "") + WORDS[i % len(WORDS)]}, None) for i in range(events - 2)
    ]
    parts.append(_chunk({}, "stop"))
    parts.append(
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-bench0000000000000000000000",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": MODEL,
                "system_fingerprint": "fp_bench",
                "choices": [],
                "usage": {
                    "prompt_tokens": 31,
                    "completion_tokens": events - 2,
                    "total_tokens": 31 + events - 2,
                },
            }
        )
        + b"\n\n"
    )
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def render(template: str, workdir: Path, name: str, **values: object) -> Path:
    """Write ``bench/nginx/<template>`` with its placeholders filled; return the path."""
    text = (NGINX_DIR / template).read_text()
    defaults: dict[str, object] = {
        "DIR": workdir,
        "NAME": name,
        "NOFILE": 65536,
        "CONNECTIONS": 30000,
        "WORKERS": 1,
        "DRIP_RATE": 200,
    }
    for key, value in {**defaults, **values}.items():
        text = text.replace(f"@@{key}@@", str(value))
    if "@@" in text:
        raise ValueError(f"{template}: unfilled placeholder near {text[text.index('@@') :][:40]!r}")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / f"{name}-tmp" / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # As root, nginx's workers would drop to `nobody`, who cannot read a
        # workdir under a private checkout (a fresh clone in a 0700 tempdir).
        text = "user root;\n" + text
    out = workdir / f"{name}.conf"
    out.write_text(text)
    return out


def stub_conf(workdir: Path, port: int, drip_rate: int = 200, tls_port: int | None = None) -> Path:
    """With ``tls_port``, the stub also serves https there (a certificate from ``tls_files``)."""
    (workdir / "stub-completion.json").write_bytes(completion())
    (workdir / "stub-stream.sse").write_bytes(stream())
    tls_listen = ""
    if tls_port is not None:
        cert, key = tls_files(workdir)
        tls_listen = (f"listen 127.0.0.1:{tls_port} ssl backlog=8192;\n"
                      f"        ssl_certificate {cert};\n        ssl_certificate_key {key};")
    return render("stub.conf", workdir, "stub", PORT=port, DRIP_RATE=drip_rate, TLS_LISTEN=tls_listen)


def tls_files(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA: the gateway's ``tls.ca_file``) and its key."""
    cert, key = workdir / "stub-tls.pem", workdir / "stub-tls.key"
    if not cert.exists():
        subprocess.run([shutil.which("openssl") or "openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "7",
                        "-subj", "/CN=llm-proxy bench stub", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                        "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def hop_conf(workdir: Path, name: str, port: int, backends: list[int], workers: int = 1) -> Path:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    return render("hop.conf", workdir, name, PORT=port, SERVERS=servers, WORKERS=workers)


def gateway_config(stub_port: int, redis_port: int | None, tls: tuple[int, Path] | None = None) -> str:
    """One upstream per stub location; the key has limits so quotas are enforced when Redis is on.
    ``tls``: (port, CA file) of the stub's https listener, which the upstreams then use."""
    lines = []
    if redis_port:
        lines.append(f"redis_url: redis://127.0.0.1:{redis_port}/0")
    origin = f"https://127.0.0.1:{tls[0]}" if tls else f"http://127.0.0.1:{stub_port}"
    tls_line = [f"    tls: {{ca_file: '{tls[1]}'}}"] if tls else []
    lines += [
        "upstreams:",
        "  - name: stub",
        f"    base_url: {origin}/v1",
        f"    models: [{MODEL}]",
        *tls_line,
        "  - name: stub-stream",
        f"    base_url: {origin}/stream/v1",
        f"    models: [{STREAM_MODEL}]",
        *tls_line,
        "  - name: stub-slow",
        f"    base_url: {origin}/slow/v1",
        f"    models: [{SLOW_MODEL}]",
        *tls_line,
        "    timeout: {connect: 5, first_byte: 60, idle: 120, total: 900}",
        "server: {shutdown_delay: 0, shutdown_grace: 5}",
        "routing:",
        "  strategy: least_requests",
        "  max_attempts: 2",
        "  deadline: 900",
        "keys:",
        "  - name: bench",
        f"    key: {KEY}",
        "    team: bench-team",
    ]
    if redis_port:
        lines.append("    limits: {rpm: 100000000, tpm: 100000000000}")
    lines += ["teams:", "  - name: bench-team"]
    if redis_port:
        lines.append("    limits: {rpm: 100000000, tpm: 100000000000}")
    return "\n".join(lines) + "\n"
