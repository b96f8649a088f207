"""The synthetic drama corpus: one seeded run feeds all five services.

No audio can be downloaded where dramaturg is built, so ``dramaturg data synth OUT`` makes a small
but complete corpus from espeak-ng voices and labels it from what was actually rendered. Every format
the services read comes out of ONE run, so they all describe the same speakers and lines. This module
only orchestrates; each step has its own module:

1. **plan** (``plan.py``, lines from ``scripts.yaml`` via ``scripts.py``, or with
   ``text_source="grammar"`` from ``grammar.yaml`` via ``sentences.py``, each split from its own
   text): scenes, casts, who says which line, sessions, enrollment lines and how each line is acted —
   pure, from the seed;
2. **render** (``corpus.py`` over ``render.py``, ``voices.py``, ``mixdown.py``, ``clips.py``,
   ``prosody.py``): renderings, channels, scene mixes, standalone clips and their measured prosody;
3. **write** (``writers/``), one writer per format: pyannote protocol (``diarization/``), VoxCeleb tree
   (``speaker/``), fish-speech (``tts/``), SALMONN annotation (``audiollm/``), Speech-DRAME
   (``evaluator/``), then the manifest.

Determinism: every random choice draws from its own seeded stream (``seeds.py``), so the same config
gives the same bytes whatever the thread timing, and writers can run alone or in any order.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import SynthConfig
from .corpus import render_corpus, work_units
from .plan import ENROLL_LINES, SPLITS, plan_corpus
from .render import check_tools
from .scripts import ScriptLine, default_script_bank
from .writers import Report, Writer
from .writers.fish_speech import write_fish_speech
from .writers.manifest import write_manifest
from .writers.pyannote import DATABASE, PROTOCOL, write_pyannote
from .writers.salmonn import caption_for, write_salmonn
from .writers.speech_drame import write_speech_drame
from .writers.voxceleb import write_voxceleb

__all__ = [
    "DATABASE",
    "ENROLL_LINES",
    "OUTPUT_ENTRIES",
    "PROTOCOL",
    "SCRIPT_BANK",
    "SETTINGS",
    "SPLITS",
    "WRITERS",
    "ProgressFn",
    "ScriptLine",
    "SynthConfig",
    "caption_for",
    "synthesize_corpus",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, completed, total)``; ``completed``/``total`` count work units over the whole run."""

SCRIPT_BANK: tuple[ScriptLine, ...] = default_script_bank().lines
"""The shipped script bank's lines (``scripts.yaml``), which every default plan draws from."""
SETTINGS: tuple[str, ...] = default_script_bank().settings
"""The shipped script bank's scene settings."""

WRITERS: tuple[Writer, ...] = (
    write_pyannote,
    write_voxceleb,
    write_fish_speech,
    write_speech_drame,
    write_salmonn,
)
"""Every format of a full run (the manifest, which indexes them, is written last)."""
OUTPUT_ENTRIES = ("diarization", "speaker", "tts", "audiollm", "evaluator", "manifest.json")
"""What a run creates directly under OUT (and the only things ``overwrite`` removes)."""


def synthesize_corpus(
    out_dir: str | Path,
    config: SynthConfig | None = None,
    progress: ProgressFn | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the whole corpus under ``out_dir`` and return the manifest (also written to manifest.json).

    Raises FileExistsError when ``out_dir`` already holds a corpus and ``overwrite`` is False.
    """
    config = config or SynthConfig()
    t0 = time.perf_counter()
    check_tools()  # before touching OUT: a missing espeak-ng must not leave half a corpus behind
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    plan = plan_corpus(config)
    total = work_units(plan) + 1  # + 1 for writing
    done = 0

    def tick(stage: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(stage, done, total)

    corpus = render_corpus(plan, tick)
    reports: Report = {}
    for write in WRITERS:
        reports.update(write(out, corpus))
    elapsed = time.perf_counter() - t0
    manifest = write_manifest(out, corpus, reports, elapsed_s=elapsed)
    tick("done")
    logger.info(
        "synthetic corpus in %s: %d scenes, %d speakers, %.1f s",
        out,
        len(plan.scenes),
        len(plan.pool),
        elapsed,
    )
    return manifest


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix two corpora; with ``overwrite`` remove only what a previous run created."""
    existing = [out / e for e in OUTPUT_ENTRIES if (out / e).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0].name}); use --force to replace it")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
