"""SynthConfig: the size and seed of a synthetic corpus, one field per ``dramaturg data synth`` flag.

Its own module because the plan, the renderer and every writer read it, and the recipes' ``synth:``
sections are passed to it verbatim (the CLI generates its flags from the fields).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)


class SynthConfig(BaseModel):
    """Size and seed of a synthetic corpus. Defaults build in well under a minute on 2 cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seed for every random choice; same seed, same bytes.")
    num_speakers: int = Field(8, ge=3, le=500, description="Speakers in the pool.")
    heldout_speakers: int = Field(
        3, ge=2, description="Speakers kept out of speaker training; used in trials."
    )
    scenes_train: int = Field(6, ge=1, description="Diarization scenes in the train split.")
    scenes_dev: int = Field(2, ge=1, description="Diarization scenes in the development split.")
    scenes_test: int = Field(2, ge=1, description="Diarization scenes in the test split.")
    lines_per_scene: int = Field(8, ge=2, description="Turns per scene.")
    utterances_per_speaker: int = Field(
        6, ge=2, description="Standalone utterances per speaker (VoxCeleb tree)."
    )
    overlap_probability: float = Field(
        0.25, ge=0.0, le=1.0, description="Chance a turn starts before the last ends."
    )
    sample_rate: int = Field(16000, ge=8000, le=48000, description="Output sample rate (Hz).")
    raters: int = Field(6, ge=1, description="Noisy rater scores per evaluator item.")
    workers: int = Field(2, ge=1, le=64, description="Rendering threads.")
    text_source: Literal["bank", "grammar"] = Field(
        "bank",
        description="Where lines come from: 'bank' (scripts.yaml, every split speaks the same lines) or "
        "'grammar' (thousands of generated sentences; dev/test scenes and held-out speakers say only "
        "sentences that training never hears).",
    )

    @model_validator(mode="after")
    def _enough_training_speakers(self) -> SynthConfig:
        if self.num_speakers - self.heldout_speakers < 2:
            raise ValueError("need at least 2 non-held-out speakers (num_speakers - heldout_speakers >= 2)")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_text_source(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``text_source`` out of dumps while it is the default ``bank``.

        A dump names a corpus: it is the manifest's ``config`` and ``dramaturg train``'s cache key for
        corpora (``shared/cli/train.py``). Omitting the default keeps both byte for byte what they were
        before the field existed, so no existing corpus changes or is rebuilt; a ``grammar`` corpus
        still dumps (and round-trips) its source.
        """
        data: dict[str, Any] = handler(self)
        if self.text_source == "bank":
            data.pop("text_source", None)
        return data
