"""``dramaturg eval SERVICE ARGS``: a service's own evaluation command (its ``ServiceEntry.evaluate``).

Each service owns its evaluation (the evaluator's per-dimension correlations, the audio LLM's WER and
captioning scores …) and parses its own arguments; this command only finds it, so ``dramaturg eval
evaluator --help`` shows the evaluator's options.
"""

from __future__ import annotations

import argparse
import sys

from dramaturg.shared import registry


def _evaluable() -> list[str]:
    return sorted(name for name, entry in registry.registered().items() if entry.evaluate)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a dataset (the service's own evaluation)",
                       add_help=False)
    p.add_argument("service", nargs="?", help=f"one of: {', '.join(_evaluable()) or 'none yet'}")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="the service's evaluation arguments (SERVICE --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = _evaluable()
    if args.service in (None, "-h", "--help"):
        print(f"usage: dramaturg eval SERVICE [ARGS …]   (SERVICE: {', '.join(names)}; "
              "`dramaturg eval SERVICE --help` for its options)")
        return 0 if args.service else 2
    if args.service not in names:
        print(f"dramaturg eval: {args.service!r} has no evaluation command; "
              f"expected one of {', '.join(names)}", file=sys.stderr)
        return 2
    return int(registry.get(args.service).load_evaluate()(list(args.args)) or 0)
