"""TTS service settings."""

from __future__ import annotations

from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.model_service import ModelServiceSettings
from pydantic import Field, model_validator

#: Output rates a client may ask for besides the model's own: telephony, wideband, CD and studio.
DEFAULT_OUTPUT_RATES = (8_000, 16_000, 22_050, 24_000, 44_100, 48_000)


class TtsSettings(ModelServiceSettings):
    # Reference audio (a zero-shot prompt or a voice's prompt): under a second carries too little of a
    # voice, and every second is ~12.5 prompt positions the model attends to at every generated frame.
    min_seconds: float = Field(1.0, ge=0)
    max_seconds: float = Field(30.0, gt=0)
    # Text to speak and reference transcripts, in characters: longer text belongs in several requests
    # (one line of dialogue each), which also keeps time to first audio short.
    max_text_chars: int = Field(1000, ge=1)
    # Codec frames per request (12.5 a second): the default when a request says 0, and the cap.
    default_max_new_tokens: int = Field(250, ge=1)
    max_new_tokens: int = Field(750, ge=1)
    # Sampling defaults (CSM's reference settings); a request's non-zero values replace them.
    default_temperature: float = Field(0.9, gt=0)
    default_top_p: float = Field(0.0, ge=0, le=1)  # 0: no nucleus filtering
    default_top_k: int = Field(50, ge=0)  # 0: no top-k filtering
    # sample_rate_hz a request may ask for (the model's own rate is always allowed; 0 means it).
    output_sample_rates: list[int] = Field(default_factory=lambda: list(DEFAULT_OUTPUT_RATES))
    # Frames per SynthesizeOnline chunk (80 ms each): smaller is a shorter time to first audio and
    # more messages.
    stream_chunk_frames: int = Field(2, ge=1)
    # Requests waiting for the model beyond the one synthesising; more are RESOURCE_EXHAUSTED.
    max_waiting: int = Field(8, ge=0)
    # LoRA voices: adapters kept loaded on each model (least recently used unloaded first), the
    # folders AddVoice may copy an adapter from (default: DRAMATURG_HOME, where training runs write),
    # and the largest adapter accepted.
    max_loaded_adapters: int = Field(8, ge=1)
    adapter_roots: list[str] = Field(default_factory=lambda: [str(dramaturg_home())])
    max_adapter_bytes: int = Field(1 << 30, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> TtsSettings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) is above the cap "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        bad = [rate for rate in self.output_sample_rates if not 1_000 <= rate <= 768_000]
        if bad:
            raise ValueError(f"output_sample_rates {bad}: rates are in Hz, between 1000 and 768000")
        return self
