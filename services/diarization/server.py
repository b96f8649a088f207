"""The diarization service: who spoke when, over gRPC, for whole files and for live streams.

``Diarize`` decodes and validates the audio, then runs pyannote's ``SpeakerDiarization`` pipeline
of the requested store version in a worker thread (pyannote is synchronous and CPU/GPU bound) and
answers overlapping turns, exclusive turns, RTTM and the speakers. ``StreamingDiarize`` takes a
config and raw PCM chunks and re-diarizes a sliding window as audio arrives, mapping each window's
local speakers onto stable stream-wide labels, and sends each turn once it has settled.

Work is bounded: at most ``max_concurrent`` diarizations run at once and ``max_waiting`` wait; the
rest get RESOURCE_EXHAUSTED with a RetryInfo delay. A diarization checks for client cancellation and
the RPC deadline between pyannote's batches (through pyannote's progress hook) and stops there, so
an abandoned 3-hour request does not keep a slot busy.

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

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from dramaturg.common.v1 import common_pb2
from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
from dramaturg.services.diarization.config import DiarizationSettings
from dramaturg.shared import audio as audio_io
from dramaturg.shared import metrics
from dramaturg.shared.grpc.errors import (
    cancelled,
    deadline_exceeded,
    failed_precondition,
    invalid_argument,
    resource_exhausted,
)
from dramaturg.shared.grpc.interceptors import current_request_id, deadline_of
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.model_service import ModelService
from dramaturg.shared.models import Loaded
from dramaturg.shared.store import ModelRecord

log = logging.getLogger(__name__)

# pyannote.audio 4 sends usage telemetry to otel.pyannote.ai by default; a server must not phone home
# (and cannot, offline). pyannote is imported lazily (load_model), after this; operators can opt in.
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

SERVICE = "diarization"
AudioEncoding = common_pb2.AudioEncoding
_STREAM_SAMPLE_BYTES = {AudioEncoding.LINEAR_PCM_S16LE: 2, AudioEncoding.LINEAR_PCM_F32LE: 4}
_EPS = 1e-3  # seconds: turn boundaries closer than this are the same instant
_MIN_TURN_SECONDS = 0.02  # a clipped turn shorter than this is dropped, not sent

T = TypeVar("T")


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


def check_uri(uri: str, field_path: str) -> str:
    if any(c.isspace() for c in uri):
        raise invalid_argument(
            field_path,
            f"{uri!r} contains whitespace, which RTTM (space-separated fields) cannot hold; "
            "use e.g. underscores instead",
        )
    return uri


def rttm_lines(turns: list[Turn], uri: str) -> str:
    """NIST RTTM, 10 fields: ``SPEAKER <uri> 1 <onset> <duration> <NA> <NA> <label> <NA> <NA>``."""
    return "".join(
        f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
        for t in turns
    )


# ---------------------------------------------------------------------------------------------------
# Running the pipeline


class Stopped(Exception):
    """Raised inside pyannote's hook to abandon a run: the client went away or the deadline passed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
        if end - start >= _MIN_TURN_SECONDS:
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
    should_stop: Callable[[], str | None] = lambda: None,
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
        if t.end - start > _MIN_TURN_SECONDS:
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
        should_stop: Callable[[], str | None] = lambda: None,
    ) -> DiarizationResult:
        return run_pipeline(self.pipeline, samples, self.sample_rate, uri, hints, should_stop)

    @property
    def ref(self) -> common_pb2.ModelRef:
        return common_pb2.ModelRef(name=self.record.name, version=self.record.version)


# ---------------------------------------------------------------------------------------------------
# Concurrency


class ConcurrencyLimiter:
    """A semaphore with a bounded waiting room: a full room answers RESOURCE_EXHAUSTED + RetryInfo.

    Diarizing one file uses every core (or the GPU), so running more at once only makes each slower
    and multiplies peak memory; clients are better told when to come back. The waiting room is
    exported as ``dramaturg_queue_depth`` / ``dramaturg_queue_capacity`` (what the dashboards, the
    "queue saturated" alert and the HPA component read).
    """

    def __init__(self, max_running: int, max_waiting: int, *, queue: str = "diarize") -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._semaphore = asyncio.Semaphore(max_running)
        self.running = 0
        self._waiting = 0
        self._mean_seconds = 10.0  # moving average of a run, for the retry delay
        self._depth = metrics.QUEUE_DEPTH.labels(SERVICE, queue)
        metrics.QUEUE_CAPACITY.labels(SERVICE, queue).set(max_waiting)
        self._depth.set(0)

    @property
    def waiting(self) -> int:
        return self._waiting

    @waiting.setter
    def waiting(self, value: int) -> None:
        self._waiting = value
        self._depth.set(value)

    def retry_after(self) -> float:
        rounds = (self.waiting + self.running) / self.max_running
        return round(max(1.0, self._mean_seconds * max(rounds, 1.0)), 1)

    def check_admission(self) -> None:
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise resource_exhausted(
                f"the diarization service is busy ({self.running} running, {self.waiting} waiting); "
                f"retry in about {self.retry_after():g} s",
                retry_after_seconds=self.retry_after(),
            )

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float | None, *, admit: bool = True) -> AsyncIterator[None]:
        """Hold a run slot; ``admit=False`` (a stream already admitted) waits instead of refusing."""
        if admit:
            self.check_admission()
        self.waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._semaphore.acquire(), timeout)
            except TimeoutError:
                raise deadline_exceeded(
                    "the deadline passed while waiting for a free diarization slot; retry with a longer "
                    "deadline or when the service is less busy"
                ) from None
        finally:
            self.waiting -= 1
        self.running += 1
        began = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - began)
            self._semaphore.release()


# ---------------------------------------------------------------------------------------------------
# Streaming: raw PCM in, stable speakers out


class PcmStream:
    """Raw PCM chunks → mono float32 at the model's rate, continuous across chunk boundaries.

    Clients cut their byte stream anywhere, so a sample can be torn across two messages: the
    remainder is kept for the next chunk. Resampling uses soxr's streaming resampler so the filter
    state carries over between chunks (resampling each chunk alone would click at every boundary).
    """

    def __init__(self, encoding: int, sample_rate: int, target_rate: int) -> None:
        import soxr

        self.encoding = encoding
        self.sample_bytes = _STREAM_SAMPLE_BYTES[encoding]
        self.sample_rate = sample_rate
        self.target_rate = target_rate
        self._rest = b""
        self._resampler = (
            None
            if sample_rate == target_rate
            else soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ")
        )
        self.received_seconds = 0.0

    def feed(self, data: bytes, *, last: bool = False) -> np.ndarray:
        data = self._rest + data
        usable = len(data) - len(data) % self.sample_bytes
        if last and usable != len(data):
            raise invalid_argument(
                "audio_content",
                f"the stream ended with {len(data) - usable} stray byte(s): raw PCM of this encoding has "
                f"{self.sample_bytes}-byte samples, so the total must be a multiple of {self.sample_bytes}",
            )
        self._rest = data[usable:]
        if self.encoding == AudioEncoding.LINEAR_PCM_S16LE:
            samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
            if samples.size and not math.isfinite(float(np.sum(samples, dtype=np.float64))):
                raise invalid_argument(
                    "audio_content",
                    f"NaN or Inf sample near {self.received_seconds:.2f} s; the sender made invalid floats",
                )
        self.received_seconds += samples.size / self.sample_rate
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        return np.asarray(samples, dtype=np.float32)


class AudioBuffer:
    """The stream's audio from ``start`` (seconds) to its end; older audio is dropped."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._chunks: list[np.ndarray] = []
        self._samples = np.zeros(0, np.float32)
        self._offset = 0  # samples dropped before self._samples[0]

    @property
    def end(self) -> float:
        return (self._offset + len(self._samples) + sum(len(c) for c in self._chunks)) / self.sample_rate

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)

    def _join(self) -> None:
        if self._chunks:
            self._samples = np.concatenate([self._samples, *self._chunks])
            self._chunks = []

    def slice(self, start: float, end: float) -> np.ndarray:
        self._join()
        a = max(0, round(start * self.sample_rate) - self._offset)
        b = max(a, round(end * self.sample_rate) - self._offset)
        return self._samples[a:b].copy()

    def drop_before(self, t: float) -> None:
        cut = round(t * self.sample_rate) - self._offset
        if cut > 0:
            self._join()
            self._samples = self._samples[cut:].copy()
            self._offset += cut


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    last: bool  # the final window of the stream: everything in it settles


class StreamTracker:
    """Decides the windows of a stream and which turns are final, with stream-wide speaker labels.

    No gRPC and no model here, so the bookkeeping is testable on its own. Invariants:

    * ``frontier``: every turn that ends before it has been sent; nothing before it changes again.
    * ``pending``: turns of the last window still open at the frontier; they are re-diarized with
      more context by the next window (which starts before them), and sent when they end before a
      later frontier. A pending turn the next window cannot reach back to (its window would exceed
      ``stream_max_window_seconds``) is sent cut at the frontier and continues as a new turn.
    * per speaker, turns are sent in time order and never overlap (a new turn is clipped to start
      after the speaker's last sent turn).

    Speaker matching (local labels of a window → stream labels): the previous window's labelled
    turns and the new window's turns cover the same audio in their overlap, so the share of a local
    speaker's overlap-region speech that one stream speaker held there is direct evidence that
    needs no embedding quality; the cosine between the local centroid and the stream speaker's
    running centroid covers speakers who come back after the overlap region (or when the overlap is
    empty). The two scores are summed and matched one-to-one (Hungarian); a match needs either
    score above its threshold, otherwise the local speaker is new. A second local speaker whose
    overlap evidence points at an already matched stream speaker joins it (pyannote split one voice
    in two in this window). With a speaker-count bound (num_speakers or max_speakers), a local
    speaker beyond it joins its best-scoring stream speaker.
    """

    def __init__(self, settings: DiarizationSettings, hints: SpeakerHints) -> None:
        self.window = settings.stream_window_seconds
        self.step = settings.stream_step_seconds
        self.settle = settings.stream_settle_seconds
        self.max_window = settings.stream_max_window_seconds
        self.context = self.window - self.step - self.settle
        self.overlap_match = settings.stream_overlap_match
        self.cosine_match = settings.stream_cosine_match
        self.max_speakers = hints.upper
        self.frontier = 0.0
        self.processed = 0.0  # end of the last diarized window
        self.pending: list[Turn] = []
        self.previous: list[Turn] = []  # last window's turns, stream labels
        self.last_end: dict[str, float] = {}
        self.centroids: dict[str, tuple[np.ndarray, float]] = {}
        self.speakers: list[str] = []

    # -- scheduling ------------------------------------------------------------------------------
    def next_window(self, audio_end: float, ended: bool) -> Window | None:
        """The next window to diarize, or None until more audio arrives."""
        if audio_end <= self.processed + _EPS:
            return None
        if not ended and (audio_end - self.processed < self.step or audio_end < self.settle + 1.0):
            return None
        base = max(0.0, self.frontier - self.context)
        end = min(audio_end, base + self.max_window)
        start = min([base, *(t.start for t in self.pending)])
        start = max(0.0, start, end - self.max_window)
        return Window(start, end, last=ended and end >= audio_end - _EPS)

    def keep_from(self) -> float:
        """Audio before this time is never diarized again."""
        return max(0.0, min([self.frontier - self.context, *(t.start for t in self.pending)]))

    # -- absorbing a window ------------------------------------------------------------------------
    def absorb(self, window: Window, result: DiarizationResult) -> list[Turn]:
        """Map the window's speakers, advance the frontier, return the turns that settled (sorted)."""
        out: list[Turn] = []
        # pending turns the window does not reach back to: send the part up to the old frontier
        for t in self.pending:
            if t.start < window.start - _EPS:
                cut = Turn(t.start, min(t.end, self.frontier), t.speaker, t.confidence)
                if cut.end - cut.start >= _MIN_TURN_SECONDS:
                    out.append(cut)
                    self.last_end[t.speaker] = cut.end
        mapping = self._match(window, result)
        old_frontier = self.frontier
        new_frontier = window.end if window.last else max(old_frontier, window.end - self.settle)
        pending: list[Turn] = []
        labelled: list[Turn] = []
        for t in result.turns:
            speaker = mapping[t.speaker]
            labelled.append(Turn(t.start, t.end, speaker, t.confidence))
            if t.end <= old_frontier + _EPS:
                continue  # decided by an earlier window
            # A turn still open at the old frontier is the newer window's call (it has more context),
            # but never reaches back into this speaker's turns already sent.
            start = max(t.start, self.last_end.get(speaker, 0.0))
            if t.end - start < _MIN_TURN_SECONDS:
                continue
            turn = Turn(start, t.end, speaker, t.confidence)
            if t.end <= new_frontier + _EPS:
                out.append(turn)
                self.last_end[speaker] = turn.end
            else:
                pending.append(turn)
        self.pending = pending
        self.previous = labelled
        self.frontier = new_frontier
        self.processed = window.end
        out.sort(key=lambda t: (t.start, t.end, t.speaker))
        return out

    def finish(self) -> list[Turn]:
        """End of stream: whatever is still pending is final."""
        out = sorted(self.pending, key=lambda t: (t.start, t.end, t.speaker))
        for t in out:
            self.last_end[t.speaker] = t.end
        self.pending = []
        self.frontier = self.processed
        return out

    # -- speaker matching ----------------------------------------------------------------------------
    def _new_speaker(self) -> str:
        label = f"SPEAKER_{len(self.speakers):02d}"
        self.speakers.append(label)
        return label

    def _match(self, window: Window, result: DiarizationResult) -> dict[str, str]:
        from scipy.optimize import linear_sum_assignment

        local = sorted({t.speaker for t in result.turns})
        if not local:
            return {}
        known = list(self.speakers)
        shared_start, shared_end = window.start, min(self.processed, window.end)
        ratio = np.zeros((len(local), len(known)))
        cosine = np.full((len(local), len(known)), -1.0)
        if known and shared_end > shared_start:
            li = {s: i for i, s in enumerate(local)}
            gi = {s: j for j, s in enumerate(known)}
            spoken = np.zeros(len(local))
            for t in result.turns:
                a, b = max(t.start, shared_start), min(t.end, shared_end)
                if b <= a:
                    continue
                spoken[li[t.speaker]] += b - a
                for p in self.previous:
                    overlap = min(b, p.end) - max(a, p.start)
                    if overlap > 0 and p.speaker in gi:
                        ratio[li[t.speaker], gi[p.speaker]] += overlap
            ratio /= np.maximum(spoken, 1e-9)[:, None]
        for i, s in enumerate(local):
            vector = result.centroids.get(s)
            if vector is None:
                continue
            unit = vector / max(float(np.linalg.norm(vector)), 1e-12)
            for j, g in enumerate(known):
                if g in self.centroids:
                    cosine[i, j] = float(np.dot(unit, self.centroids[g][0]))
        mapping: dict[str, str] = {}
        if known:
            score = ratio + np.maximum(cosine, 0.0)
            rows, cols = linear_sum_assignment(-score)
            for i, j in zip(rows, cols, strict=True):
                if ratio[i, j] >= self.overlap_match or cosine[i, j] >= self.cosine_match:
                    mapping[local[i]] = known[j]
        for i, s in enumerate(local):
            if s in mapping:
                continue
            if known and ratio[i].max() >= self.overlap_match:
                mapping[s] = known[int(ratio[i].argmax())]
            elif self.max_speakers and len(self.speakers) >= self.max_speakers and known:
                mapping[s] = known[int((ratio[i] + np.maximum(cosine[i], 0.0)).argmax())]
            else:
                mapping[s] = self._new_speaker()
        self._update_centroids(result, mapping)
        return mapping

    def _update_centroids(self, result: DiarizationResult, mapping: dict[str, str]) -> None:
        seconds: dict[str, float] = {}
        for t in result.turns:
            seconds[t.speaker] = seconds.get(t.speaker, 0.0) + t.end - t.start
        for s, vector in result.centroids.items():
            g = mapping.get(s)
            if g is None:
                continue
            unit = vector / max(float(np.linalg.norm(vector)), 1e-12)
            weight = max(seconds.get(s, 0.0), 1e-3)
            if g in self.centroids:
                old, old_weight = self.centroids[g]
                mixed = old * old_weight + unit * weight
                self.centroids[g] = (mixed / max(float(np.linalg.norm(mixed)), 1e-12), old_weight + weight)
            else:
                self.centroids[g] = (unit, weight)


# ---------------------------------------------------------------------------------------------------
# The servicer


class DiarizationServicer(diarization_pb2_grpc.DiarizationServicer):
    def __init__(self, service: DiarizationService) -> None:
        self.service = service
        self.settings = service.settings

    def _limits(self) -> audio_io.AudioLimits:
        return self.settings.audio_limits()

    async def _model(self, ref: common_pb2.ModelRef) -> LoadedDiarizationModel:
        loaded: Loaded[LoadedDiarizationModel] = await self.service.models.get(ref)
        return loaded.model

    async def _run(
        self, work: Callable[[Callable[[], str | None]], T], context: grpc.aio.ServicerContext
    ) -> T:
        """Run ``work(should_stop)`` on the diarization threads; stop it when the RPC goes away.

        The slot is held until the worker has really stopped (it notices at its next batch), so a
        cancelled request cannot let more than max_concurrent runs share the machine.
        """
        stop = threading.Event()
        deadline = deadline_of(context)

        def should_stop() -> str | None:
            if stop.is_set():
                return "cancelled"
            if deadline is not None and time.monotonic() > deadline:
                return "deadline"
            return None

        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.service.executor, work, should_stop)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(BaseException):
                await future
            raise
        except Stopped as exc:
            if exc.reason == "deadline":
                raise deadline_exceeded(
                    "the RPC deadline passed while diarizing; give long files a longer deadline "
                    "(about the audio duration × the service's real-time factor)"
                ) from None
            raise cancelled("the diarization was cancelled") from None

    # -- Diarize -------------------------------------------------------------------------------------
    async def Diarize(self, request: diarization_pb2.DiarizeRequest, context: grpc.aio.ServicerContext):
        """Diarize a whole file: hints and uri are checked before any audio is decoded (cheap errors
        first); the run slot is taken before decoding, so at most max_concurrent decoded files sit
        in memory at once."""
        began = time.perf_counter()
        request_id = request.request_id or current_request_id()
        hints = check_hints(request.config, self.settings.max_speakers_hint)
        uri = check_uri(request.uri, "uri") if request.uri else check_uri(request_id, "request_id")
        if not request.HasField("audio"):
            raise invalid_argument("audio", "set the audio to diarize (content or uri)")
        model = await self._model(request.config.model)
        async with self.service.limiter.slot(deadline_of(context)):
            decoded = await asyncio.to_thread(
                audio_io.decode_audio_input,
                request.audio,
                target_rate=model.sample_rate,
                limits=self._limits(),
                field="audio",
            )
            samples = decoded.samples
            duration = decoded.duration
            del decoded
            result = await self._run(lambda stop: model.diarize(samples, uri, hints, stop), context)
        metrics.observe_audio(SERVICE, "Diarize", duration, time.perf_counter() - began)
        return diarization_pb2.DiarizeResponse(
            request_id=request_id,
            turns=[t.to_proto() for t in result.turns],
            exclusive_turns=[t.to_proto() for t in result.exclusive_turns],
            rttm=rttm_lines(result.turns, uri),
            speakers=result.speakers,
            audio_seconds=duration,
            model=model.ref,
        )

    # -- StreamingDiarize -----------------------------------------------------------------------------
    async def StreamingDiarize(
        self,
        request_iterator: AsyncIterator[diarization_pb2.StreamingDiarizeRequest],
        context: grpc.aio.ServicerContext,
    ):
        """Config first, then raw mono PCM chunks of any size; turns stream back as they settle.

        A reader task decodes chunks into the buffer while windows are diarized, so a live client is
        not blocked by a window in progress; it stops reading (gRPC flow control then holds the
        client back) when stream_max_buffer_seconds are waiting.
        """
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise failed_precondition(
                "send streaming_config first: the stream ended before any message",
                reason="NO_STREAMING_CONFIG",
            ) from None
        if first.WhichOneof("streaming_request") != "streaming_config":
            raise failed_precondition(
                "send streaming_config first: the first message of a stream says how the audio that follows "
                "is encoded (encoding, sample_rate_hz) and which model to use; audio_content comes after it",
                reason="NO_STREAMING_CONFIG",
            )
        config = first.streaming_config
        request_id = config.request_id or current_request_id()
        if config.encoding not in _STREAM_SAMPLE_BYTES:
            name = (
                AudioEncoding.Name(config.encoding)
                if config.encoding in AudioEncoding.values()
                else config.encoding
            )
            raise invalid_argument(
                "streaming_config.encoding",
                f"{name} cannot be streamed; stream raw LINEAR_PCM_S16LE or LINEAR_PCM_F32LE mono chunks, "
                "or send a whole file to Diarize",
            )
        if not 1000 <= config.sample_rate_hz <= 768_000:
            raise invalid_argument(
                "streaming_config.sample_rate_hz",
                f"raw PCM needs its sample rate in Hz (e.g. 16000), got {config.sample_rate_hz}",
            )
        hints = check_hints(config.config, self.settings.max_speakers_hint, prefix="streaming_config.config")
        uri = check_uri(config.uri or request_id, "streaming_config.uri")
        model = await self._model(config.config.model)
        self.service.limiter.check_admission()

        began = time.perf_counter()
        pcm = PcmStream(config.encoding, config.sample_rate_hz, model.sample_rate)
        buffer = AudioBuffer(model.sample_rate)
        tracker = StreamTracker(self.settings, hints)
        arrived = asyncio.Event()
        room = asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            async for message in requests:
                if message.WhichOneof("streaming_request") != "audio_content":
                    raise invalid_argument(
                        "streaming_config",
                        "send streaming_config once, as the first message; every later message carries "
                        "audio_content",
                    )
                buffer.append(pcm.feed(message.audio_content))
                if pcm.received_seconds > self.settings.max_seconds:
                    raise invalid_argument(
                        "audio_content",
                        f"the stream is longer than this service accepts ({self.settings.max_seconds:g} s); "
                        "end it and start a new one",
                    )
                arrived.set()
                while buffer.end - tracker.processed > self.settings.stream_max_buffer_seconds:
                    room.clear()
                    await room.wait()
            buffer.append(pcm.feed(b"", last=True))
            ended = True
            arrived.set()

        reader = asyncio.create_task(read())
        settled: list[Turn] = []
        finished = False
        try:
            while True:
                window = tracker.next_window(buffer.end, ended)
                if window is None:
                    if ended:
                        break
                    arrived.clear()
                    waiter = asyncio.ensure_future(arrived.wait())
                    try:
                        await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if reader.done() and reader.exception() is not None:
                        raise reader.exception()
                    continue
                if window.last and buffer.end < self.settings.min_seconds:
                    raise invalid_argument(
                        "audio_content",
                        f"the stream carried {buffer.end:.2f} s of audio; diarization needs at least "
                        f"{self.settings.min_seconds:g} s",
                    )
                settled = await self._stream_window(model, buffer, tracker, window, uri, hints, context)
                buffer.drop_before(tracker.keep_from())
                room.set()
                if window.last:
                    settled += tracker.finish()
                    finished = True
                    break
                yield diarization_pb2.StreamingDiarizeResponse(
                    request_id=request_id,
                    turns=[t.to_proto() for t in settled],
                    processed_seconds=round(tracker.processed, 3),
                )
            if buffer.end <= 0:
                raise invalid_argument(
                    "audio_content", "the stream ended before any audio_content; send audio after the config"
                )
            if not finished:
                settled = tracker.finish()
            metrics.observe_audio(SERVICE, "StreamingDiarize", buffer.end, time.perf_counter() - began)
            yield diarization_pb2.StreamingDiarizeResponse(
                request_id=request_id,
                turns=[t.to_proto() for t in settled],
                processed_seconds=round(tracker.processed, 3),
                is_final=True,
            )
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _stream_window(
        self,
        model: LoadedDiarizationModel,
        buffer: AudioBuffer,
        tracker: StreamTracker,
        window: Window,
        uri: str,
        hints: SpeakerHints,
        context: grpc.aio.ServicerContext,
    ) -> list[Turn]:
        samples = buffer.slice(window.start, window.end)
        # Each window may hold only some of the stream's speakers: pass the bound, not the exact count.
        window_hints = SpeakerHints(max=hints.upper)
        if len(samples) < self.settings.min_seconds * model.sample_rate:
            result = DiarizationResult([], [], [])
        else:
            async with self.service.limiter.slot(deadline_of(context), admit=False):
                result = await self._run(
                    lambda stop: model.diarize(samples, uri, window_hints, stop), context
                )
        return tracker.absorb(window, result.shifted(window.start))


# ---------------------------------------------------------------------------------------------------
# The service


class DiarizationService(ModelService):
    name = SERVICE

    def __init__(self, settings: DiarizationSettings, home: Path | None = None) -> None:
        super().__init__(settings, home)
        self.settings: DiarizationSettings = settings
        self.limiter = ConcurrencyLimiter(settings.max_concurrent, settings.max_waiting)

    def model_threads(self) -> int:
        # A long diarization must not wait behind another, nor occupy the default executor that
        # decodes audio: one model thread per concurrent diarization.
        return self.settings.max_concurrent

    def load_model(self, record: ModelRecord, device: str) -> LoadedDiarizationModel:
        from dramaturg.services.diarization.model import load_pipeline

        pipeline = load_pipeline(
            record.path,
            device,
            segmentation_batch_size=self.settings.segmentation_batch_size,
            embedding_batch_size=self.settings.embedding_batch_size,
        )
        return LoadedDiarizationModel(pipeline, record, self.settings)

    def release_model(self, model: LoadedDiarizationModel) -> None:
        del model
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def warm_up(self, model: LoadedDiarizationModel) -> None:
        noise = np.random.default_rng(0).normal(0, 0.05, 3 * model.sample_rate).astype(np.float32)
        try:
            await self.run_model(model.diarize, noise, "warm-up", SpeakerHints())
        except Exception:  # noise is not speech; a pipeline that trips on it still serves speech
            log.warning("warm-up diarization failed", exc_info=True)

    def service_registrations(self) -> list[Registration]:
        full_name = diarization_pb2.DESCRIPTOR.services_by_name["Diarization"].full_name
        return [
            Registration(
                full_name, diarization_pb2_grpc.add_DiarizationServicer_to_server, DiarizationServicer(self)
            )
        ]


def create_service(settings: DiarizationSettings | None = None) -> DiarizationService:
    return DiarizationService(settings or DiarizationSettings())


SETTINGS = DiarizationSettings

__all__ = [
    "SETTINGS",
    "DiarizationResult",
    "DiarizationService",
    "SpeakerHints",
    "StreamTracker",
    "Turn",
    "create_service",
    "run_pipeline",
]
