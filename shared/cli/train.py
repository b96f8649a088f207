"""``dramaturg train SERVICE --config FILE``: fine-tune one service's model in the foreground."""

from __future__ import annotations

import argparse
import sys

from dramaturg.shared.service import SERVICES

# Where each service keeps its training recipes (import path of a dict name → Recipe).
RECIPES: dict[str, str | None] = {name: None for name in SERVICES if name != "gateway"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a service's model on your data")
    p.add_argument("service", choices=sorted(RECIPES))
    p.add_argument("--config", help="recipe YAML: recipe, dataset, overrides, output_model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not RECIPES.get(args.service):
        print(
            f"dramaturg train: training for the {args.service} service is not built yet (README: status)",
            file=sys.stderr,
        )
        return 2
    raise AssertionError("unreachable until a service registers recipes")
