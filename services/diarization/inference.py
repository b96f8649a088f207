"""Running pyannote's pipeline for the service: hints, results, per-turn confidence, RTTM.

:class:`LoadedDiarizationModel` wraps a loaded pipeline (``model.load_pipeline``) with the serving
settings (batch sizes, the clustering cap) and diarizes in-memory mono audio, polling a
``should_stop`` callable between pyannote's batches (``shared.cancellation``) so an abandoned request
stops at its next batch.

Confidence of a turn: pyannote does not expose a per-turn score (powerset segmentation is one-hot,
and the clustering's soft scores stay inside the pipeline), but it exposes, through its hook, the
embedding of every (10 s chunk, local speaker) pair and, in its output, one centroid per speaker.
Each active (chunk, local speaker) embedding is assigned to its most similar centroid (cosine), as
the pipeline's own assignment step does; its score is ``(1 + margin) / 2`` where ``margin`` is the
cosine to the turn's speaker minus the best cosine to any other speaker (the cosine itself when
there is one speaker), clipped to [0, 1]: 0.5 means "as close to another speaker as to this one".
A turn's confidence is the average score of the embeddings that support it, weighted by how many of
their active frames fall inside the turn; 0 when no embedding supports it (e.g. a sliver turn).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dramaturg.common.v1 import common_pb2
from dramaturg.diarization.v1 import diarization_pb2
from dramaturg.services.diarization.config import DiarizationSettings
from dramaturg.shared.cancellation import ShouldStop, Stopped, never_stop
from dramaturg.shared.grpc.errors import echo, invalid_argument
from dramaturg.shared.store import ModelRecord

log = logging.getLogger(__name__)

EPS = 1e-3  # seconds: turn boundaries closer than this are the same instant
MIN_TURN_SECONDS = 0.02  # a clipped turn shorter than this is dropped, not sent


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: str
    confidence: float = 0.0

    def to_proto(self) -> common_pb2.SpeakerTurn:
        return common_pb2.SpeakerTurn(
            span=common_pb2.TimeSpan(start=round(self.start, 3), end=round(self.end, 3)),
            speaker=self.speaker,
            confidence=round(self.confidence, 4),
        )


@dataclass
class DiarizationResult:
    """One pipeline run: turns in seconds from the start of the audio it was given."""

    turns: list[Turn]
    exclusive_turns: list[Turn]
    speakers: list[str]
    # speaker label → centroid embedding (absent when the pipeline exposes none)
    centroids: dict[str, np.ndarray] = field(default_factory=dict)

    def shifted(self, offset: float) -> DiarizationResult:
        def move(turns: list[Turn]) -> list[Turn]:
            return [Turn(t.start + offset, t.end + offset, t.speaker, t.confidence) for t in turns]

        return DiarizationResult(move(self.turns), move(self.exclusive_turns), self.speakers, self.centroids)


@dataclass(frozen=True)
class SpeakerHints:
    """The request's speaker-count hints; 0 = not given."""

    num: int = 0
    min: int = 0
    max: int = 0

    def kwargs(self) -> dict[str, int]:
        out = {"num_speakers": self.num, "min_speakers": self.min, "max_speakers": self.max}
        return {k: v for k, v in out.items() if v > 0}

    @property
    def upper(self) -> int:
        """Most speakers allowed (0 = unbounded)."""
        return self.num or self.max


def check_hints(
    config: diarization_pb2.DiarizationConfig, limit: int, prefix: str = "config"
) -> SpeakerHints:
    """Refuse negative and contradictory hints with messages that say which value to change."""
    hints = SpeakerHints(config.num_speakers, config.min_speakers, config.max_speakers)
    for name, value in (
        ("num_speakers", hints.num),
        ("min_speakers", hints.min),
        ("max_speakers", hints.max),
    ):
        if value < 0:
            raise invalid_argument(f"{prefix}.{name}", f"must be ≥ 0 (0 means not given), got {value}")
        if value > limit:
            raise invalid_argument(
                f"{prefix}.{name}",
                f"{value} is more speakers than this service accepts ({limit}); is it a typo?",
            )
    if hints.min and hints.max and hints.min > hints.max:
        raise invalid_argument(
            f"{prefix}.min_speakers",
            f"min_speakers={hints.min} is above max_speakers={hints.max}; swap them or drop one",
        )
    if hints.num and hints.min and hints.num < hints.min:
        raise invalid_argument(
            f"{prefix}.num_speakers",
            f"num_speakers={hints.num} contradicts min_speakers={hints.min}; give num_speakers alone "
            "when the count is known, or only the bounds when it is not",
        )
    if hints.num and hints.max and hints.num > hints.max:
        raise invalid_argument(
            f"{prefix}.num_speakers",
            f"num_speakers={hints.num} contradicts max_speakers={hints.max}; give num_speakers alone "
            "when the count is known, or only the bounds when it is not",
        )
    return hints


MAX_URI_CHARS = 256  # the RTTM file id is repeated on every line: a name, not a document


def check_uri(uri: str, field_path: str) -> str:
    """The RTTM file id: printable, no whitespace (RTTM fields are space-separated), a sane length."""
    if len(uri) > MAX_URI_CHARS:
        raise invalid_argument(
            field_path, f"{echo(uri)} is longer than an RTTM file id may be ({MAX_URI_CHARS} characters)"
        )
    if any(c.isspace() for c in uri):
        raise invalid_argument(
            field_path,
            f"{echo(uri)} contains whitespace, which RTTM (space-separated fields) cannot hold; "
            "use e.g. underscores instead",
        )
    if not uri.isprintable():
        raise invalid_argument(field_path, f"{echo(uri)} contains control characters; RTTM ids are printable")
    return uri


def rttm_lines(turns: list[Turn], uri: str) -> str:
    """NIST RTTM, 10 fields: ``SPEAKER <uri> 1 <onset> <duration> <NA> <NA> <label> <NA> <NA>``."""
    return "".join(
        f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
        for t in turns
    )


# ---------------------------------------------------------------------------------------------------
# Running the pipeline


def _cap_clustering(pipeline: Any, max_embeddings: int) -> None:
    """Cluster on at most ``max_embeddings`` (chunk, speaker) embeddings (see the setting's comment).

    pyannote's clusterings all start from ``filter_embeddings`` and assign every embedding to the
    nearest centroid afterwards, so thinning the "training" set there bounds the quadratic linkage
    while every chunk still gets a speaker.
    """
    clustering = getattr(pipeline, "clustering", None)
    if clustering is None or max_embeddings <= 0 or not hasattr(clustering, "filter_embeddings"):
        return
    original = clustering.filter_embeddings

    def filter_embeddings(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        embeddings, chunk_idx, speaker_idx = original(*args, **kwargs)
        n = len(embeddings)
        if n <= max_embeddings:
            return embeddings, chunk_idx, speaker_idx
        keep = np.unique(np.linspace(0, n - 1, max_embeddings).round().astype(np.int64))
        log.info("clustering %d of %d embeddings (max_clustering_embeddings)", len(keep), n)
        return embeddings[keep], chunk_idx[keep], speaker_idx[keep]

    clustering.filter_embeddings = filter_embeddings


def _turns(annotation: Any, confidences: Callable[[float, float, str], float], duration: float) -> list[Turn]:
    """Turns of an annotation, clipped to the audio: pyannote pads the last chunk, so its last turn
    can run past the end of the file."""
    out = []
    for seg, _, label in annotation.itertracks(yield_label=True):
        start, end = float(seg.start), min(float(seg.end), duration)
        if end - start >= MIN_TURN_SECONDS:
            out.append(Turn(start, end, str(label), confidences(start, end, str(label))))
    out.sort(key=lambda t: (t.start, t.end, t.speaker))
    return out


class _Confidence:
    """Per-turn confidence from the chunk embeddings and speaker centroids (module docstring)."""

    def __init__(
        self,
        pipeline: Any,
        segmentation: Any,
        embeddings: np.ndarray | None,
        labels: list[str],
        centroids: np.ndarray | None,
    ) -> None:
        self.ok = False
        if segmentation is None or embeddings is None or centroids is None or not labels:
            return
        data = np.nan_to_num(np.asarray(segmentation.data, dtype=np.float32), nan=0.0)  # (C, F, K)
        num_chunks, num_frames, num_local = data.shape
        if embeddings.shape[:2] != (num_chunks, num_local) or len(centroids) < len(labels):
            return
        model = pipeline._segmentation.model
        powerset = bool(getattr(model.specifications, "powerset", False))
        threshold = 0.5 if powerset else float(getattr(pipeline.segmentation, "threshold", 0.5))
        active = data >= threshold  # (C, F, K)
        self.window = segmentation.sliding_window
        # frame f of a chunk is centred at chunk start + frame_centre + f * frame_step
        try:
            receptive = model.receptive_field
            self.frame_centre, self.frame_step = float(receptive[0].middle), float(receptive.step)
        except Exception:  # models without a receptive field: frames spread evenly over the chunk
            self.frame_step = self.window.duration / num_frames
            self.frame_centre = self.frame_step / 2
        self.num_frames = num_frames
        # cumulative active-frame counts: frames of (c, k) active in [f0, f1) = cum[c, f1, k] - cum[c, f0, k]
        self.cum = np.zeros((num_chunks, num_frames + 1, num_local), dtype=np.int16)
        np.cumsum(active, axis=1, dtype=np.int16, out=self.cum[:, 1:, :])
        cents = np.nan_to_num(np.asarray(centroids[: len(labels)], dtype=np.float64), nan=0.0)
        cents = cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        emb = np.asarray(embeddings, dtype=np.float64)
        finite = np.isfinite(emb).all(axis=2)  # NaN rows: too little speech for an embedding
        emb = np.where(finite[..., None], emb, 0.0)
        norms = np.linalg.norm(emb, axis=2, keepdims=True)
        valid = finite & (norms[..., 0] > 1e-12) & active.any(axis=1)
        emb = emb / np.maximum(norms, 1e-12)
        cos = np.einsum("ckd,sd->cks", emb, cents)  # (C, K, S)
        self.assigned = np.where(valid, cos.argmax(axis=2), -1)
        if cos.shape[2] == 1:
            margin = cos[..., 0]
        else:
            top2 = np.sort(cos, axis=2)[..., -2:]
            margin = top2[..., 1] - top2[..., 0]
        self.score = np.clip((1.0 + margin) / 2.0, 0.0, 1.0)
        self.index = {label: i for i, label in enumerate(labels)}
        self.ok = True

    def __call__(self, start: float, end: float, label: str) -> float:
        if not self.ok or label not in self.index:
            return 0.0
        w = self.window
        first = max(0, math.ceil((start - w.start - w.duration) / w.step))
        last = min(len(self.cum) - 1, math.floor((end - w.start) / w.step))
        if last < first:
            return 0.0
        chunks = np.arange(first, last + 1)
        chunk_start = w.start + chunks * w.step
        # frames whose centre lies in [start, end)
        f0 = np.clip(np.ceil((start - chunk_start - self.frame_centre) / self.frame_step), 0, self.num_frames)
        f1 = np.clip(np.ceil((end - chunk_start - self.frame_centre) / self.frame_step), 0, self.num_frames)
        counts = (self.cum[chunks, f1.astype(int), :] - self.cum[chunks, f0.astype(int), :]).astype(
            np.float64
        )
        weights = counts * (self.assigned[chunks] == self.index[label])
        total = weights.sum()
        if total <= 0:
            return 0.0
        return float((weights * self.score[chunks]).sum() / total)


def run_pipeline(
    pipeline: Any,
    samples: np.ndarray,
    sample_rate: int,
    uri: str,
    hints: SpeakerHints,
    should_stop: ShouldStop = never_stop,
) -> DiarizationResult:
    """Run pyannote on in-memory mono audio; ``should_stop`` is polled between batches."""
    import torch

    captured: dict[str, Any] = {}

    def hook(step: str, artefact: Any, file: Any = None, total: Any = None, completed: Any = None) -> None:
        reason = should_stop()
        if reason:
            raise Stopped(reason)
        if completed is None and step in ("segmentation", "embeddings"):
            captured[step] = artefact

    waveform = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
    output = pipeline(
        {"waveform": waveform, "sample_rate": sample_rate, "uri": uri}, hook=hook, **hints.kwargs()
    )
    overlapping = getattr(output, "speaker_diarization", output)
    exclusive = getattr(output, "exclusive_speaker_diarization", None)
    centroids = getattr(output, "speaker_embeddings", None)
    labels = [str(label) for label in overlapping.labels()]
    try:
        confidence = _Confidence(
            pipeline, captured.get("segmentation"), captured.get("embeddings"), labels, centroids
        )
    except Exception:  # a score is a nicety: never fail a diarization over it
        log.exception("could not compute turn confidences")
        confidence = _Confidence(pipeline, None, None, labels, None)
    duration = len(samples) / sample_rate
    turns = _turns(overlapping, confidence, duration)
    exclusive_turns = _turns(exclusive, confidence, duration) if exclusive is not None else _exclusive(turns)
    by_label: dict[str, np.ndarray] = {}
    if centroids is not None:
        for label, vector in zip(labels, np.asarray(centroids), strict=False):
            if np.isfinite(vector).all() and np.linalg.norm(vector) > 1e-12:
                by_label[label] = np.asarray(vector, dtype=np.float64)
    return DiarizationResult(turns, exclusive_turns, sorted(labels), by_label)


def _exclusive(turns: list[Turn]) -> list[Turn]:
    """Fallback when the pipeline gives no exclusive diarization: later turns yield to earlier ones."""
    out: list[Turn] = []
    for t in turns:
        start = max([t.start, *(o.end for o in out if o.end > t.start)]) if out else t.start
        if t.end - start > MIN_TURN_SECONDS:
            out.append(Turn(start, t.end, t.speaker, t.confidence))
    return out


class LoadedDiarizationModel:
    """A loaded pyannote pipeline and what the servicer needs to call it."""

    def __init__(self, pipeline: Any, record: ModelRecord, settings: DiarizationSettings) -> None:
        self.pipeline = pipeline
        self.record = record
        self.settings = settings
        model = getattr(getattr(pipeline, "_segmentation", None), "model", None)
        self.sample_rate = int(getattr(getattr(model, "audio", None), "sample_rate", 16_000))
        if hasattr(pipeline, "segmentation_batch_size"):
            pipeline.segmentation_batch_size = settings.segmentation_batch_size
        if hasattr(pipeline, "embedding_batch_size"):
            pipeline.embedding_batch_size = settings.embedding_batch_size
        _cap_clustering(pipeline, settings.max_clustering_embeddings)

    def diarize(
        self,
        samples: np.ndarray,
        uri: str,
        hints: SpeakerHints,
        should_stop: ShouldStop = never_stop,
    ) -> DiarizationResult:
        return run_pipeline(self.pipeline, samples, self.sample_rate, uri, hints, should_stop)
