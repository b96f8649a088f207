"""The project's metric conventions, defined once for the services, the gateway, the demo and bench.

DER (REFERENCE.md's convention): pyannote.metrics' optimal-mapping ``DiarizationErrorRate`` with no
forgiveness collar and overlapped speech scored, always on the UEM. pyannote's ``collar`` is the
TOTAL width around each reference boundary, so pyannote collar=0.5 is md-eval's ``-c 0.25``; 0.0 is
the same in both. pyannote.metrics is imported when a metric is built, so importing this module is
cheap.

WER (the gateway's re-voicing guard, the demo's transcript check): jiwer after lower-casing and
dropping punctuation. The audio LLM's own evaluation applies Whisper's English normaliser first, as
SALMONN's does (``services/audiollm/evaluate.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyannote.metrics.diarization import DiarizationErrorRate

DER_VARIANT: dict[str, Any] = {"collar": 0.0, "skip_overlap": False}
DER_CONVENTION: dict[str, Any] = {
    **DER_VARIANT, "uem": True, "mapping": "optimal (Hungarian)",
    "note": "pyannote collar is the total width (collar=0.5 == md-eval -c 0.25); 0.0 = none",
}


def der_metric(collar: float = DER_VARIANT["collar"], skip_overlap: bool = DER_VARIANT["skip_overlap"]
               ) -> DiarizationErrorRate:
    """The project's DER; ``collar`` is pyannote's total width in seconds."""
    from pyannote.metrics.diarization import DiarizationErrorRate

    return DiarizationErrorRate(collar=float(collar), skip_overlap=bool(skip_overlap))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER after lower-casing and dropping punctuation (jiwer); 1.0 for an empty hypothesis."""
    import jiwer

    clean = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                           jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    if not hypothesis.strip():
        return 1.0
    return float(jiwer.wer(reference, hypothesis, reference_transform=clean, hypothesis_transform=clean))
