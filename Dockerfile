# llm-proxy container image.
#
#   buildah bud --format docker -t llm-proxy:dev .      (or: docker build -t llm-proxy:dev .)
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp llm-proxy:dev
#
# The image runs the demo config (mock upstreams) unless a config is mounted at
# /etc/llm-proxy/config.yaml (the Helm chart and the kustomize base mount a
# ConfigMap there). scripts/build-image builds and runs it without a Docker
# daemon. Notes on the choices:
# - Two stages: the builder makes wheels and a virtualenv in /opt/llm-proxy;
#   the final stage copies only that virtualenv. No compiler, no pip, no build
#   cache in the final image.
# - The virtualenv lives at the same path in both stages of the same base, so
#   its interpreter symlink and script shebangs stay valid. Only `python3` is
#   called by name (the base may keep it in /usr/local/bin or /usr/bin).
# - Non-root fixed UID/GID 10001, nothing written outside /tmp (bytecode is
#   compiled at build time, PYTHONDONTWRITEBYTECODE stops runtime writes), so
#   the container runs with a read-only root filesystem and an emptyDir /tmp.
# - Exec-form ENTRYPOINT: the gateway is PID 1 and receives SIGTERM itself
#   (it drains in-flight requests and streams, then exits 0).

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first (from pyproject.toml only), so editing the package does
# not rebuild this layer.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
 && python3 -m pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt

# Then the package itself (.dockerignore lets in only what the build needs).
COPY . .
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python3 -m venv /opt/llm-proxy \
 && /opt/llm-proxy/bin/python3 -m pip install --no-cache-dir --no-index --find-links /wheels llm-proxy \
 && /opt/llm-proxy/bin/python3 -m pip uninstall --yes pip setuptools \
 && /opt/llm-proxy/bin/llm-proxy check-config /src/config/demo.yaml


FROM python:3.11-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llm-proxy" \
      org.opencontainers.image.description="OpenAI-compatible LLM gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/llm-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    TMPDIR=/tmp

# The runtime needs no installer: drop the base interpreter's pip, setuptools
# and wheel too (python:3.11-slim ships them; a distribution-managed pip, as
# in a Debian-based stand-in, is left to the OS).
RUN groupadd --system --gid 10001 llm-proxy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin llm-proxy \
 && (python3 -m pip uninstall --yes --quiet pip setuptools wheel \
     || echo "the base's pip is managed by the OS: left in place")

COPY --from=builder /opt/llm-proxy /opt/llm-proxy
COPY config/demo.yaml /etc/llm-proxy/config.yaml

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
STOPSIGNAL SIGTERM

# python3 is the virtualenv's (first on PATH); no curl in the image.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["/opt/llm-proxy/bin/llm-proxy"]
CMD ["serve", "--config", "/etc/llm-proxy/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
