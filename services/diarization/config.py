"""Diarization service settings.

Diarization requests are few and long (a scene, an episode, a 3-hour recording session), so the
knobs are about bounding work per request rather than batching many small ones: how long a file may
be, how many files are diarized at once (each one saturates the CPU cores or the GPU on its own),
how many may wait, and how the streaming RPC slides its window.
"""

from __future__ import annotations

from dramaturg.shared.model_service import ModelServiceSettings
from pydantic import Field, model_validator


class DiarizationSettings(ModelServiceSettings):
    """Settings of the diarization service (``DRAMATURG_<KEY>`` or a YAML file override them)."""

    # Whole episodes and recording sessions are normal inputs: allow 4 h. Inline requests are capped
    # by server.max_message_bytes (64 MiB ≈ 33 min of 16-bit 16 kHz WAV); longer files come by uri or
    # compressed (FLAC/OGG), or through StreamingDiarize.
    max_seconds: float = Field(4 * 3600.0, gt=0)
    # Shorter audio cannot carry a speaker embedding (pyannote's embedding needs ~0.5 s of speech).
    min_seconds: float = Field(1.0, ge=0)
    # Refuse speaker-count hints above this: a typo (num_speakers=200) would otherwise cost a k-means
    # over every embedding and answer nonsense.
    max_speakers_hint: int = Field(64, ge=1)

    # pyannote runs the segmentation model and the embedding model chunk-wise in batches of these
    # sizes: larger batches are faster on a GPU; memory per batch is batch × 10 s of audio.
    segmentation_batch_size: int = Field(32, ge=1)
    embedding_batch_size: int = Field(32, ge=1)
    # Agglomerative clustering is quadratic in memory (scipy's linkage keeps a condensed distance
    # matrix, n²/2 doubles, twice). Above this many (chunk, speaker) embeddings, clustering "trains" on
    # an evenly spaced subset of this size and every embedding is then assigned to the nearest
    # centroid, so a 4-hour file costs at most ≈ 2 × n²/2 × 8 B = 0.8 GB at n = 10 000, not 30 GB.
    # Files up to ~1.5 h of drama stay below it and get exactly pyannote's result. 0 = no cap.
    max_clustering_embeddings: int = Field(10_000, ge=0)

    # Concurrency: at most this many diarizations run at once (each uses every core); up to
    # max_waiting more wait for a slot, the rest get RESOURCE_EXHAUSTED with a RetryInfo delay.
    max_concurrent: int = Field(1, ge=1)
    max_waiting: int = Field(4, ge=0)

    # StreamingDiarize: every stream_step_seconds of new audio, the last stream_window_seconds are
    # diarized again (the window reaches further back while an unsettled turn started earlier, up to
    # stream_max_window_seconds, and widens up to that bound when the stream is behind, to catch up).
    stream_window_seconds: float = Field(30.0, gt=0)
    stream_step_seconds: float = Field(5.0, gt=0)
    stream_max_window_seconds: float = Field(90.0, gt=0)
    # A turn is sent once it ended more than this many seconds before the end of the audio diarized
    # so far: the next windows will not move it any more. Longer = more stable, later turns.
    stream_settle_seconds: float = Field(5.0, ge=0)
    # Local speakers of a window are matched to the stream's speakers by the time they share in the
    # overlap with the previous window and by the cosine of their embedding centroids; a local speaker
    # with neither (overlap ratio ≥ stream_overlap_match, cosine ≥ stream_cosine_match) is a new speaker.
    stream_overlap_match: float = Field(0.5, gt=0, le=1)
    stream_cosine_match: float = Field(0.6, ge=-1, le=1)
    # Audio a stream may buffer ahead of the diarizer before the server stops reading (gRPC flow
    # control then slows the client down), in seconds.
    stream_max_buffer_seconds: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _consistent_stream_window(self) -> DiarizationSettings:
        # The next window starts at most (window - step) before the new end; it must reach back past
        # the settle point of the previous window, or audio between them would never be diarized.
        if self.stream_window_seconds < self.stream_step_seconds + self.stream_settle_seconds + 1.0:
            raise ValueError(
                "stream_window_seconds must be at least stream_step_seconds + stream_settle_seconds + 1 "
                f"(got window {self.stream_window_seconds:g} s, step {self.stream_step_seconds:g} s, "
                f"settle {self.stream_settle_seconds:g} s)"
            )
        if self.stream_max_window_seconds < self.stream_window_seconds:
            raise ValueError("stream_max_window_seconds must be ≥ stream_window_seconds")
        return self
