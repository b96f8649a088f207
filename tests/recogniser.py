"""An independent English recogniser for the learning checks: pocketsphinx with the model in its wheel.

The learning checks judge what the project's models hear or say with a model the project did not
train. pocketsphinx (CMU Sphinx, its US-English acoustic model, dictionary and 3-gram language model
ship inside the wheel) transcribes 16-kHz mono audio offline; it is weak on espeak-ng's synthetic
voices (about 64 % WER on plain en-us sentences), so the checks read its figures side by side with
the project's, never as a bar on their own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16_000


@functools.lru_cache(maxsize=1)
def _decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def transcribe(audio: np.ndarray) -> str:
    """The recogniser's best hypothesis for one 16-kHz mono float clip (lower case, no punctuation)."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
    return hypothesis.hypstr if hypothesis is not None else ""


def transcribe_all(clips: Sequence[np.ndarray]) -> list[str]:
    return [transcribe(clip) for clip in clips]
