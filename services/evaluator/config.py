"""Evaluator service settings."""

from __future__ import annotations

from dramaturg.shared.model_service import BatchedModelServiceSettings
from pydantic import Field, model_validator


class EvaluatorSettings(BatchedModelServiceSettings):
    # Audio per request (after `span`). The model reads one encoder window (30 s in production, 5 s for
    # the tiny model) and never truncates silently: longer audio is refused whatever max_seconds says.
    min_seconds: float = Field(0.1, ge=0)
    max_seconds: float = Field(30.0, gt=0)
    # Each RoleContext field, in characters (they go into every dimension's prompt).
    max_context_chars: int = Field(4000, ge=1)
    # The prompts' style: the detailed rubric (anchors 5 → 1) or the simple one (dimension line only).
    # The default for models whose store record does not say: the sft recipe labels every model it
    # publishes with its style (label "prompts"), and the service prompts that model the same way.
    detailed_prompts: bool = True
    # Dimensions per language-model pass (0: all the requested ones in one batch).
    batch_size: int = Field(0, ge=0)
    # Requests waiting for the model beyond the one running; more are RESOURCE_EXHAUSTED.
    max_waiting: int = Field(8, ge=0)
    # Dynamic batching (batching, max_batch_items, max_wait_ms, max_queue: BatchedModelServiceSettings)
    # of concurrent Evaluate requests: their clips in one encoder pass and all their prompts in one
    # language-model batch. Off: one request at a time, cancellable between the encoder and the
    # language model. Unset: on for a CUDA device, off on CPU — measured (README, evaluator bench):
    # eight 7 B-shaped requests batched on an H200 score 1.73× the items of one at a time, while on 2
    # CPU cores the tiny model loses about 6 % to the batcher's wait.

    @model_validator(mode="after")
    def _consistent(self) -> EvaluatorSettings:
        if self.min_seconds >= self.max_seconds:
            raise ValueError(
                f"min_seconds ({self.min_seconds}) must be below max_seconds ({self.max_seconds})"
            )
        return self
