"""The SFT collator: (audio, prompt, answer) rows → a Qwen2-Audio batch whose loss is on the answer only.

Each row is what :func:`~dramaturg.services.evaluator.prompts.sft_examples` writes plus the clip:
``audio`` (1-D float samples at 16 kHz; a list is fine, as ``datasets`` returns one), ``prompt`` (the
user text of one dimension) and ``completion`` (``<answer>N</answer>``). The collator renders the chat
(the audio part, the prompt, the generation prompt ``<|im_start|>assistant\\n``), appends the completion
and ``<|im_end|>``, and lets the processor expand ``<|AUDIO|>`` to the clip's token count and compute
the mel features.

**Labels** are -100 everywhere except the completion's tokens and the ``<|im_end|>`` that closes it
(so the model learns to stop there): the system turn, the audio tokens, the rubric and the context are
never a target. The rubric is the same text in thousands of rows; a loss on it would spend the
model's capacity on reciting prompts, and audio positions have no token to predict. The completion's
ids are found as the last tokens of each row's unpadded span and checked against the completion
tokenised alone, so a tokenizer that merged across the prompt/answer boundary fails loudly instead
of training on a shifted target.

Used with TRL's stock ``SFTTrainer`` as ``data_collator`` with ``remove_unused_columns=False`` (the
collator needs the raw columns) and ``dataset_kwargs={"skip_prepare_dataset": True}`` (TRL's own
preparation would tokenise the prompt as text without the audio).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from dramaturg.services.evaluator.model import SAMPLE_RATE
from dramaturg.services.evaluator.probe import clip_contour, probe_fields
from dramaturg.services.evaluator.prompts import user_messages
from transformers import Qwen2AudioProcessor

IGNORE_INDEX = -100


class EvaluatorCollator:
    """Batches SFT rows for Qwen2-Audio (module docstring); padding follows the processor's tokenizer."""

    def __init__(
        self,
        processor: Qwen2AudioProcessor,
        *,
        end_of_turn: str | None = None,
        probe_dimensions: Sequence[str] | None = None,
        contours: bool = False,
    ) -> None:
        self.processor = processor
        self.end_of_turn = end_of_turn if end_of_turn is not None else processor.tokenizer.eos_token
        # with a score probe (``probe.py``): each row's ``dimension`` and ``reference`` go in the batch too
        self.probe_dimensions = list(probe_dimensions) if probe_dimensions else None
        # with the probe's contour head: each clip's per-frame pitch and level (``contour_target``),
        # measured once per ``wav_path``
        self.contours = contours
        self._contour_cache: dict[str, np.ndarray] = {}

    def contour(self, feature: Mapping[str, Any], audio: np.ndarray, frames: int) -> np.ndarray:
        """:func:`~.probe.clip_contour` of one row's clip, cached by its ``wav_path`` when it has one."""
        key = feature.get("wav_path")
        if key is None:
            return clip_contour(audio, SAMPLE_RATE, frames)
        cached = self._contour_cache.get(str(key))
        if cached is None or cached.shape[0] != frames:
            cached = self._contour_cache[str(key)] = clip_contour(audio, SAMPLE_RATE, frames)
        return cached

    def prompt_text(self, prompt: str) -> str:
        """The chat up to and including the generation prompt, with one ``<|AUDIO|>`` (not yet expanded)."""
        return self.processor.apply_chat_template(
            user_messages(prompt), add_generation_prompt=True, tokenize=False
        )

    def target_ids(self, completion: str) -> list[int]:
        """Token ids that carry the loss: the completion and the end-of-turn token."""
        return list(
            self.processor.tokenizer(completion + self.end_of_turn, add_special_tokens=False)["input_ids"]
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [self.prompt_text(f["prompt"]) + f["completion"] + self.end_of_turn for f in features]
        audios = [np.asarray(f["audio"], dtype=np.float32) for f in features]
        batch = self.processor(
            text=texts, audio=audios, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt"
        )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, feature in enumerate(features):
            target = torch.tensor(self.target_ids(feature["completion"]), dtype=input_ids.dtype)
            end = int(attention_mask[row].nonzero().max()) + 1  # one past the row's last real token
            start = end - target.numel()
            if start < 0 or not torch.equal(input_ids[row, start:end], target):
                raise ValueError(
                    f"row {row}: the completion's tokens are not the end of the tokenised chat "
                    "(did the tokenizer merge across the prompt/answer boundary?)"
                )
            labels[row, start:end] = target
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": batch["input_features"],
            "feature_attention_mask": batch["feature_attention_mask"],
            "labels": labels,
        }
        if self.probe_dimensions is not None:
            out |= probe_fields(features, self.probe_dimensions)
        if self.contours:
            frames = int(batch["input_features"].shape[-1])
            out["contour_target"] = torch.from_numpy(
                np.stack([self.contour(f, a, frames) for f, a in zip(features, audios, strict=True)])
            )
        return out
