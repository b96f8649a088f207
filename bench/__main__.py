"""``make bench`` / ``python -m bench [NAME …]``: run the benchmarks and print their ratio tables."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "speaker-embed": "bench.speaker_embed",
    "diarization-rtf": "bench.diarization_rtf",
    "evaluator-items": "bench.evaluator_items",
    "gateway-load": "bench.gateway_load",
    "tts-synthesis": "bench.tts_synthesis",
    "audiollm-generate": "bench.audiollm_generate",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "--quick", action="store_true", help="fewer requests (a smoke run, not a measurement)"
    )
    args = parser.parse_args(argv)
    rc = 0
    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        rc |= module.main(["--quick"] if args.quick else [])
    return rc


if __name__ == "__main__":
    sys.exit(main())
