"""Speaker service settings."""

from __future__ import annotations

from dramaturg.shared.model_service import ModelServiceSettings
from pydantic import Field


class SpeakerSettings(ModelServiceSettings):
    # Utterances shorter than this are refused: embeddings of a few frames are noise.
    min_seconds: float = Field(0.5, ge=0)
    max_seconds: float = Field(600.0, gt=0)
    # Identify decodes one whole file (a scene) and cuts its segments out of it, so the file may be longer
    # than one utterance; this bounds its decoded length (2 h ≈ 460 MB of float32 at 16 kHz). Everything
    # else is Embed's rule: the file is refused if silent or non-finite, and each segment must be between
    # min_seconds and max_seconds long and not silent.
    identify_max_seconds: float = Field(7200.0, gt=0)
    max_inputs_per_request: int = 64
    # Dynamic batching (shared/batching.py): items per batch, seconds of audio per batch, wait, queue bound.
    max_batch_size: int = 32
    max_batch_seconds: float = 240.0
    max_wait_ms: float = 5.0
    max_queue: int = 512
    batching: bool = True
    # Identify answers at most this many candidates per segment when the request says 0.
    default_top_k: int = 5
