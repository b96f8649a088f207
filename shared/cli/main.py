"""The ``dramaturg`` command: data, serving, the local stack, jobs, models and training."""

from __future__ import annotations

import argparse
import logging
import sys

from dramaturg.shared.cli import data, evaluate, jobs, models, serve, stack, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dramaturg",
        description="Fine-tune and serve the models an audio-drama team needs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, serve, stack, jobs, models, train, evaluate):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
