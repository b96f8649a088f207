"""GRPO for the evaluator: TRL's ``GRPOTrainer`` subclassed so that the audio reaches every pass.

Speech-DRAME follows SFT with GRPO: the model writes ``<answer>N</answer>`` for a prompt about a clip,
several completions per prompt are sampled, each is rewarded, and the policy moves toward the
completions that beat their group's mean. TRL does the sampling, the advantages, the clipped loss and
the reference KL; this module adds what TRL does not do for an audio model.

**The blind spot.** Stock TRL 1.16 builds the model's extra inputs (``pixel_values`` …) only for
*images*. For Qwen2-Audio it tokenises the prompt (with its ``<|AUDIO|>`` run) and may even generate
with the audio, but every log-probability pass — the policy's in the loss, the old policy's and the
reference's — runs on ``input_ids`` alone: the audio positions carry the ``<|AUDIO|>`` token's
embedding, the model is trained audio-blind and nothing fails. :class:`AudioGRPOTrainer` closes that:

* :meth:`~AudioGRPOTrainer._tokenize_prompts` tokenises each prompt *with its clip* through the
  processor (the audio token run expanded to the clip's length) and hands ``input_features`` and
  ``feature_attention_mask`` to generation;
* :meth:`~AudioGRPOTrainer._generate_and_score_completions` computes the same features for the batch,
  keeps them for the passes it runs itself (old policy, reference) and adds them to the batch it
  returns, so TRL's splitting and shuffling carry them row by row into the loss;
* :meth:`~AudioGRPOTrainer._get_per_token_logps_and_entropies` passes them to the model in every
  chunk, and **refuses to run without them** (a pass that would be blind is an error, not a number).

Nothing else is overridden: sampling, rewards, advantages, loss, KL and logging stay TRL's.

**Rewards** (TRL reward functions: ``(prompts, completions, **columns) -> list[float]``):
:func:`accuracy_reward` (1 when the parsed answer equals the reference score), :func:`format_reward`
(1 for a well-formed ``<answer>N</answer>`` and nothing else) and :func:`graded_reward`
(``1 − |answer − reference| / 4``; 0 for an unparsable answer). The reference is the raters' mean,
rounded half up. A graded reward from a weak start collapses every answer to the middle score; the
recipe therefore logs the held-out histogram of predicted scores at each evaluation (``train.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer

from .model import SAMPLE_RATE
from .prompts import parse_answer, user_messages
from .scoring import audio_features

WELL_FORMED = re.compile(r"^\s*<answer>\s*([1-5])\s*</answer>\s*$")


# ============================================================================================ rewards


def _text(completion: Any) -> str:
    """A completion's text (TRL passes strings for plain prompts, message lists for chat prompts)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def accuracy_reward(prompts: Sequence[Any], completions: Sequence[Any], reference: Sequence[int],
                    **_: Any) -> list[float]:
    """1.0 when the answer is the reference score, else 0.0."""
    return [float(parse_answer(_text(c)) == int(r)) for c, r in zip(completions, reference, strict=True)]


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 for exactly ``<answer>N</answer>`` (N in 1..5, whitespace aside), else 0.0."""
    return [float(WELL_FORMED.match(_text(c)) is not None) for c in completions]


def graded_reward(prompts: Sequence[Any], completions: Sequence[Any], reference: Sequence[int],
                  **_: Any) -> list[float]:
    """``1 − |answer − reference| / 4`` (1 when exact, 0 four points off or unparsable)."""
    rewards = []
    for completion, ref in zip(completions, reference, strict=True):
        answer = parse_answer(_text(completion))
        rewards.append(0.0 if answer is None else 1.0 - abs(answer - int(ref)) / 4.0)
    return rewards


REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "graded": graded_reward}


def reward_functions(names: Sequence[str]) -> list[Any]:
    """The reward functions by name (:data:`REWARDS`), in order; unknown names are refused."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown or not names:
        raise ValueError(f"rewards {list(names)}: expected one or more of {', '.join(REWARDS)}")
    return [REWARDS[n] for n in names]


# ============================================================================================ trainer


class AudioGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose generation and every log-probability pass see each row's audio.

    ``clips`` maps a row's ``audio_column`` value (the corpus's ``wav_path``) to 16 kHz samples; each
    dataset row is a plain-text ``prompt`` (one ``<|AUDIO|>``, as :func:`.prompts.item_prompt` writes
    it) plus that column and the reward columns (``reference``).
    """

    def __init__(self, *args: Any, clips: Mapping[str, np.ndarray], audio_column: str = "wav_path",
                 **kwargs: Any) -> None:
        self.clips = clips
        self.audio_column = audio_column
        self._batch_audio: list[np.ndarray] | None = None  # the clips of the batch being generated
        self._audio_inputs: dict[str, torch.Tensor] | None = None  # features for the passes in flight
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------------------------- audio features

    def _prompt_text(self, prompt: str) -> str:
        return self.processing_class.apply_chat_template(
            user_messages(prompt), add_generation_prompt=True, tokenize=False
        )

    def _process(self, prompts: Sequence[str], audios: Sequence[np.ndarray]) -> Any:
        """The processor on chat-templated prompts and their clips (audio tokens expanded)."""
        return self.processing_class(
            text=[self._prompt_text(p) for p in prompts],
            audio=[np.asarray(a, dtype=np.float32) for a in audios],
            sampling_rate=SAMPLE_RATE,
            padding=True,
            return_tensors="pt",
        )

    def _features(self, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """``input_features`` and ``feature_attention_mask`` of the clips, on the trainer's device."""
        features = audio_features(self.processing_class, audios)
        return {name: value.to(self.accelerator.device) for name, value in features.items()}

    # ------------------------------------------------------------------------- the TRL overrides

    def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict[str, torch.Tensor]]:
        """Prompt ids with the clip's audio tokens, and the clip features generation needs."""
        if self._batch_audio is None or len(self._batch_audio) != len(prompts):
            raise RuntimeError("AudioGRPOTrainer: prompts reached tokenisation without their clips")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("AudioGRPOTrainer expects plain-text prompts (one <|AUDIO|> each)")
        batch = self._process(prompts, self._batch_audio)
        prompt_ids = [
            [int(t) for t, keep in zip(ids.tolist(), mask.tolist(), strict=True) if keep]
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        fields = {
            "input_features": batch["input_features"],
            "feature_attention_mask": batch["feature_attention_mask"],
        }
        return prompt_ids, None, fields

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        audios = [self.clips[str(row[self.audio_column])] for row in inputs]
        self._batch_audio = audios
        self._audio_inputs = self._features(audios)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._batch_audio = None
        # the batch's rows, split and shuffled by TRL with the rest, reach the loss with their audio
        output.update(self._audio_inputs)
        self._audio_inputs = None
        return output

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        self._audio_inputs = {
            "input_features": inputs["input_features"],
            "feature_attention_mask": inputs["feature_attention_mask"],
        }
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._audio_inputs = None

    def _get_per_token_logps_and_entropies(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **_image_fields: Any,  # TRL's image inputs: always None for an audio model
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-token log-probabilities (and entropies) of the completion, each chunk with its audio."""
        audio = self._audio_inputs
        if audio is None or audio["input_features"].shape[0] != input_ids.shape[0]:
            raise RuntimeError(
                "AudioGRPOTrainer: a log-probability pass without the rows' audio would be audio-blind"
            )
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, mask = input_ids[start:end], attention_mask[start:end]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100  # only the completion is scored
            with self.accelerator.autocast():
                outputs = model(
                    input_ids=ids,
                    attention_mask=mask,
                    input_features=audio["input_features"][start:end],
                    feature_attention_mask=audio["feature_attention_mask"][start:end],
                    labels=labels,
                    fused_lm_head=True,
                )
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None
