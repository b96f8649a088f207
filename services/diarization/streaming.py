"""StreamingDiarize's bookkeeping: which windows to diarize, which turns have settled, stable speakers.

No gRPC and no model here (the servicer drives it; ``shared.pcm_stream`` buffers the audio), so the
bookkeeping is testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dramaturg.services.diarization.config import DiarizationSettings
from dramaturg.services.diarization.inference import (
    EPS,
    MIN_TURN_SECONDS,
    DiarizationResult,
    SpeakerHints,
    Turn,
)


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
        if audio_end <= self.processed + EPS:
            return None
        if not ended and (audio_end - self.processed < self.step or audio_end < self.settle + 1.0):
            return None
        base = max(0.0, self.frontier - self.context)
        end = min(audio_end, base + self.max_window)
        start = min([base, *(t.start for t in self.pending)])
        start = max(0.0, start, end - self.max_window)
        return Window(start, end, last=ended and end >= audio_end - EPS)

    def keep_from(self) -> float:
        """Audio before this time is never diarized again."""
        return max(0.0, min([self.frontier - self.context, *(t.start for t in self.pending)]))

    # -- absorbing a window ------------------------------------------------------------------------
    def absorb(self, window: Window, result: DiarizationResult) -> list[Turn]:
        """Map the window's speakers, advance the frontier, return the turns that settled (sorted)."""
        out: list[Turn] = []
        # pending turns the window does not reach back to: send the part up to the old frontier
        for t in self.pending:
            if t.start < window.start - EPS:
                cut = Turn(t.start, min(t.end, self.frontier), t.speaker, t.confidence)
                if cut.end - cut.start >= MIN_TURN_SECONDS:
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
            if t.end <= old_frontier + EPS:
                continue  # decided by an earlier window
            # A turn still open at the old frontier is the newer window's call (it has more context),
            # but never reaches back into this speaker's turns already sent.
            start = max(t.start, self.last_end.get(speaker, 0.0))
            if t.end - start < MIN_TURN_SECONDS:
                continue
            turn = Turn(start, t.end, speaker, t.confidence)
            if t.end <= new_frontier + EPS:
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
