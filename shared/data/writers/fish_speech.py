"""``tts/``: fish-speech's dataset layout, ``SPK/SPK_{n:05d}.wav`` beside its transcript ``.lab``.

TTS learns from the studio renderings of the speaker-corpus lines (no session channel, no room noise):
a voice to clone should be clean, while verification needs the channel variation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..corpus import RenderedCorpus
from ..render import protect_clipping
from . import Report
from .files import write_wav

DIR = "tts"


def write_fish_speech(out: Path, corpus: RenderedCorpus) -> Report:
    """Write the TTS tree under ``out/tts``; report the clip count."""
    count = 0
    for voice in corpus.plan.pool:
        for j, spoken in enumerate(corpus.plan.sessions[voice.speaker_id]):
            stem = out / DIR / voice.speaker_id / f"{voice.speaker_id}_{j:05d}"
            studio = corpus.rendered[spoken.key].samples.astype(np.float64)
            write_wav(stem.with_suffix(".wav"), protect_clipping(studio), corpus.sample_rate)
            stem.with_suffix(".lab").write_text(spoken.line.text + "\n")
            count += 1
    return {"tts_clips": count}
