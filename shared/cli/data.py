"""``dramaturg data synth OUT``: build the seeded synthetic drama corpus every service trains on.

Flags mirror :class:`SynthConfig` one to one (generated from its fields, so a new field gets a flag
without touching this file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_err = Console(stderr=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` (with its ``synth`` subcommand) to the main CLI's subparsers."""
    p = sub.add_parser("data", help="make or inspect training data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = data_sub.add_parser(
        "synth",
        help="build the synthetic drama corpus (diarization, speaker, tts, audiollm, evaluator)",
        description="Render a deterministic synthetic drama corpus with espeak-ng + sox into OUT.",
    )
    s.add_argument("out", type=Path, metavar="OUT", help="output folder")
    for name, info in SynthConfig.model_fields.items():
        kind: Any = info.annotation if info.annotation in (int, float) else str
        s.add_argument(
            _flag(name),
            dest=name,
            type=kind,
            default=None,
            help=f"{info.description or name} (default: {info.default})",
        )
    s.add_argument("--force", action="store_true", help="replace a corpus already in OUT")
    s.set_defaults(func=run_synth)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """SynthConfig from the flags that were given (the rest keep their defaults)."""
    given = {
        name: getattr(args, name)
        for name in SynthConfig.model_fields
        if getattr(args, name, None) is not None
    }
    return SynthConfig(**given)


def run_synth(args: argparse.Namespace) -> int:
    """Build the corpus with a progress bar, then print what was made."""
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        _err.print(f"[red]dramaturg data synth: invalid settings[/red]\n{exc}")
        return 2
    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err,
        transient=True,
    ) as bar:
        task = bar.add_task("planning", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        try:
            manifest = synthesize_corpus(args.out, config, progress, overwrite=args.force)
        except FileExistsError as exc:
            _err.print(f"[red]dramaturg data synth:[/red] {exc}")
            return 1
        except RuntimeError as exc:  # missing espeak-ng / sox
            _err.print(f"[red]dramaturg data synth:[/red] {exc}")
            return 1
    print_summary(manifest, args.out)
    return 0


def print_summary(manifest: dict[str, Any], out: Path, console: Console | None = None) -> None:
    """A short table: what each service gets and where it is."""
    c = manifest["counts"]
    table = Table(title=f"synthetic corpus in {out} ({manifest['elapsed_s']:.1f} s)")
    table.add_column("for")
    table.add_column("what", justify="right")
    table.add_column("where")
    scenes = c["scenes"]
    table.add_row(
        "diarization",
        f"{sum(scenes.values())} scenes ({scenes['train']}/{scenes['development']}/"
        f"{scenes['test']}), {c['scene_hours'] * 60:.1f} min, {c['overlap_s']:.1f} s overlap",
        manifest["database_yml"],
    )
    table.add_row(
        "speaker",
        f"{c['speakers']} speakers ({c['heldout_speakers']} held out), "
        f"{c['speaker_utterances']} utts, {c['trials']} trials",
        "speaker/",
    )
    table.add_row("tts", f"{c['tts_clips']} clips", "tts/")
    table.add_row("audiollm", f"{c['audiollm_items']} items", manifest["paths"]["audiollm"])
    table.add_row(
        "evaluator", f"{c['realism_items']} realism, {c['archetype_items']} archetype", "evaluator/"
    )
    (console or Console(file=sys.stdout)).print(table)
