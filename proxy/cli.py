"""``llm-proxy serve|check-config`` (and the admin subcommands)."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config.loader import load_config
from .config.types import Config
from .errors import ConfigError

GC_THRESHOLD = 20_000  # first-generation allocations between collections (Python's default: 700)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    code: int = args.func(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="OpenAI-compatible LLM gateway.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path of the YAML config")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every "
                       "interface, as in a container (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="port of the API, and of /admin/* unless "
                       "server.admin_port is set (default: %(default)s)")
    serve.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                       help="overrides logging.level in the config")
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    _register_admin(sub)
    return parser


def _register_admin(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .admin import cli as cli_admin

    cli_admin.register(sub)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 1
    print(f"{args.file}: OK ({len(config.upstreams)} upstreams, {len(config.public_models())} models, "
          f"{len(config.keys)} keys, {len(config.teams)} teams)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .config.loader import telemetry_from_process_env
    from .serving.http_protocol import limited_protocol
    from .serving.server import GatewayServer
    from .telemetry.accesslog import configure_access_log
    from .telemetry.hub import Telemetry

    config = _load(args.config)
    if config is None:
        return 1
    level = args.log_level or config.logging.level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger("llm_proxy")
    access = configure_access_log("info" if config.logging.access_log else "warning",
                                  config.logging.access_format)
    telemetry = Telemetry.build(telemetry_from_process_env(), access)
    app = create_app(config, config_path=args.config, telemetry=telemetry, logger=log)
    # One protocol class serves every socket below: header size and header-read time are bounded.
    http = limited_protocol(config.server.max_header_bytes, config.server.header_timeout,
                            config.server.max_body_bytes, config.server.send_timeout)
    settings = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop", http=http,
                              lifespan="on", log_level=level, access_log=False,
                              server_header=False, date_header=False,
                              timeout_graceful_shutdown=int(config.server.shutdown_grace) or None)
    server = GatewayServer(settings, app.state.gateway, config.server.shutdown_delay, log)
    sockets = [settings.bind_socket()]
    if config.server.admin_port is not None:
        # Only its socket is used; log_config=None keeps it from configuring logging again
        # (uvicorn's defaults would add its plain-text access lines beside the JSON ones).
        admin = uvicorn.Config(app, host=args.host, port=config.server.admin_port, log_config=None,
                               log_level=level, access_log=False)
        sockets.append(admin.bind_socket())
    _tune_gc()
    server.run(sockets=sockets)
    return 0


def _tune_gc() -> None:
    """The objects built at start-up live as long as the process: out of the collector's sight.
    A request allocates a few hundred container objects that die with it (reference counting
    frees them), so the default first-generation threshold of 700 ran a collection every few
    requests; a higher one keeps a cycle's garbage a little longer instead."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


if __name__ == "__main__":
    sys.exit(main())
