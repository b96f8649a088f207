"""Audio-LLM service settings."""

from __future__ import annotations

from dramaturg.shared.model_service import BatchedModelServiceSettings
from pydantic import Field, model_validator


class AudioLlmSettings(BatchedModelServiceSettings):
    # Audio per request (after `span`): longer audio is read in encoder windows (the model's chunking),
    # each ~3 audio tokens a second in the prompt; SALMONN was trained on clips of up to 30 s.
    min_seconds: float = Field(0.1, ge=0)
    max_seconds: float = Field(300.0, gt=0)
    # The prompt (an instruction or a question), in characters; its tokens are also checked against the
    # model's context together with the audio tokens and max_new_tokens.
    max_prompt_chars: int = Field(4000, ge=1)
    # New tokens per request: the default when a request says 0, and the cap a request may ask for.
    default_max_new_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    # Requests waiting for the model beyond the one generating; more are RESOURCE_EXHAUSTED.
    max_waiting: int = Field(8, ge=0)
    # Dynamic batching (batching, max_batch_items, max_wait_ms, max_queue: BatchedModelServiceSettings)
    # of concurrent greedy Generate requests: one left-padded generate, each row stopped on its own.
    # Unset: on for a CUDA device, off on CPU (README, audio LLM bench: 2.3× the tokens a second for 8
    # clients even on CPU, at +26 ms for a lone request).

    @model_validator(mode="after")
    def _consistent(self) -> AudioLlmSettings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) is above the cap "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        if self.min_seconds >= self.max_seconds:
            raise ValueError(
                f"min_seconds ({self.min_seconds}) must be below max_seconds ({self.max_seconds})"
            )
        return self
