"""``dramaturg models list``: what the local model store holds."""

from __future__ import annotations

import argparse

from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.store import ModelStore
from rich.console import Console
from rich.table import Table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="inspect the model store under $DRAMATURG_HOME")
    models = p.add_subparsers(dest="models_command", required=True)
    ls = models.add_parser("list", help="every model version, newest last")
    ls.add_argument("--service", help="only this service's models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = ModelStore(dramaturg_home())
    records = store.list(service=args.service)
    table = Table(title=f"model store: {store.models_dir}")
    for col in ("service", "model", "architecture", "recipe", "base", "metrics", "created", "default"):
        table.add_column(col)
    for r in records:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()))
        table.add_row(
            r.service,
            r.ref,
            r.architecture,
            r.recipe,
            r.base_model,
            metrics,
            r.created_at.isoformat(timespec="seconds"),
            "yes" if r.is_default else "",
        )
    Console().print(
        table if records else f"no models yet in {store.models_dir} (train one with `make train-<service>`)"
    )
    return 0
