"""One writer per output format of the synthetic corpus, each owned by the work that reads it.

Every writer is ``write(out, corpus) -> report``: it saves one format under its own folder of ``out``
from a :class:`~dramaturg.shared.data.corpus.RenderedCorpus` and returns the counts the manifest
lists. Writers share no state and draw any randomness from their own seed keys, so each runs on its own
and in any order with the same bytes:

* ``pyannote`` — ``diarization/``: the pyannote.database protocol (wav, RTTM, UEM, lists, database.yml).
* ``voxceleb`` — ``speaker/``: VoxCeleb-style tree, speaker lists, trials, enrollment cast.
* ``fish_speech`` — ``tts/``: fish-speech ``SPK/*.wav`` + ``.lab``.
* ``salmonn`` — ``audiollm/``: ASR and audio-caption items in SALMONN's annotation JSON.
* ``speech_drame`` — ``evaluator/``: Speech-DRAME realism and archetype JSONL with rater scores.
* ``manifest`` — ``manifest.json``: the index of the run, built from the corpus and the reports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..corpus import RenderedCorpus

Report = dict[str, Any]
"""What a writer made, keyed as in the manifest's ``counts`` (plus ``label_histogram``)."""

Writer = Callable[[Path, RenderedCorpus], Report]
"""The shape of every writer (the orchestrator runs a list of them)."""
