"""``dramaturg serve SERVICE``: run one service in the foreground (what a container runs)."""

from __future__ import annotations

import argparse
import os
import sys

from dramaturg.shared import registry
from dramaturg.shared.config import load_settings
from dramaturg.shared.logs import configure_logging
from dramaturg.shared.service import serve_forever


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one service (gRPC + /metrics) in the foreground")
    # Images set DRAMATURG_SERVICE (services/Dockerfile), so their CMD needs no name.
    p.add_argument("service", nargs="?", choices=registry.known_names(),
                   default=os.environ.get("DRAMATURG_SERVICE") or None,
                   help="the service to run (default: $DRAMATURG_SERVICE)")
    p.add_argument("--config", help="YAML settings file (see services/<name>/config.py)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=None, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.set_defaults(func=run)


def settings_class(name: str):
    return registry.get(name).load_settings_class()


def run(args: argparse.Namespace) -> int:
    if not args.service:
        print("dramaturg serve: name a service (or set DRAMATURG_SERVICE): "
              f"{', '.join(registry.known_names())}", file=sys.stderr)
        return 2
    try:
        factory = registry.get(args.service).load_factory()
    except registry.ServiceNotBuilt as exc:
        print(f"dramaturg serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.service)
    server: dict = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.metrics_port is not None:
        server["metrics_port"] = args.metrics_port
    settings = load_settings(
        settings_class(args.service),
        args.config,
        env_prefix=f"DRAMATURG_{args.service.upper()}_",
        overrides={"server": server} if server else None,
    )
    serve_forever(factory(settings), settings.server)
    return 0
