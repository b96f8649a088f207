"""Scores from the evaluator: the expected value of the answer digit, one audio encoding for all dimensions.

**Expected-value score.** The prompt of one dimension is followed by the start of the answer,
``<|im_start|>assistant\\n<answer>`` (teacher-forced, so the next token is the digit). At that position
the model's probabilities of the five tokens ``1``..``5`` are renormalised over the five and the score
is their expected value ``Σ k·p(k)``: a continuous score (a model unsure between 3 and 4 says 3.5, where
greedy decoding would say 3 or 4), which is what correlates with the raters' mean (Speech-DRAME's
metric). The probability mass on the five digits *before* renormalising (``digit_mass``) is the format
check: a model that has learned the answer format puts nearly all its mass there; an untrained or
broken one does not, and its score means nothing.

**One audio encoding.** A realism item has ten dimensions, each with its own prompt, all about the same
clip. Running the model on ten (prompt, clip) pairs would encode the clip ten times (the production
encoder is a 32-layer Whisper-large over 30 s). Instead :func:`encode_audio` runs the encoder and the
projector once, exactly as ``Qwen2AudioModel.forward`` does (same padding mask), and
:func:`score_prompts` writes those audio embeddings over the ``<|AUDIO|>`` positions of all the
prompts' token embeddings (``masked_scatter`` with the encoding repeated along the batch), then runs
only the language model on the left-padded batch (``inputs_embeds``), and the LM head only at the last
position. Positions count real tokens only (``cumsum`` of the mask, as ``generate`` counts them), so a
padded row gets what it gets alone (within float error, see the tests).

**Generation.** :func:`generate_answers` decodes ``<answer>N</answer>`` the plain way, on the same
shared encoding; :func:`~dramaturg.services.evaluator.prompts.parse_answer` reads it.

A further saving not taken here: the prompts share their first ~``40 + audio`` tokens (system turn,
audio, frame), so a prefix KV cache would run the language model over the audio once as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from dramaturg.services.evaluator.model import (
    SAMPLE_RATE,
    check_window,
    project_audio,
    soft_prompt_kind,
    unwrap,
    virtual_tokens,
)
from dramaturg.services.evaluator.prompts import (
    ANSWER_OPEN,
    SCORES,
    item_dimensions,
    item_prompt,
    user_messages,
)
from torch import nn
from transformers import Qwen2AudioProcessor


class ScoreTensors(NamedTuple):
    """Batched :func:`score_logits` results: ``score`` (B,), ``distribution`` (B, 5), ``digit_mass`` (B,)."""

    score: torch.Tensor
    distribution: torch.Tensor
    digit_mass: torch.Tensor


@dataclass(frozen=True)
class DimensionScore:
    """One dimension's result: expected score, P(1..5) renormalised, and the mass the digits had."""

    dimension: str
    score: float
    distribution: tuple[float, float, float, float, float]
    digit_mass: float

    @property
    def mode(self) -> int:
        """The most likely digit (what greedy decoding would answer, format permitting)."""
        return int(np.argmax(self.distribution)) + 1


@dataclass(frozen=True)
class AudioEncoding:
    """One clip's audio tokens, already projected to the language model's width: (tokens, hidden)."""

    embeds: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


def digit_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the answer tokens ``1``..``5``; raises if one of them is not a single token."""
    ids = []
    for digit in SCORES:
        encoded = tokenizer.encode(str(digit), add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the digit {digit} is {len(encoded)} tokens in this tokenizer, not one")
        ids.append(int(encoded[0]))
    return tuple(ids)


def score_logits(logits: torch.Tensor, digit_ids: Sequence[int]) -> ScoreTensors:
    """Expected score, renormalised digit distribution and digit mass from next-token logits (..., V).

    Computed in float32 log space: the mass is ``exp(logsumexp(log p(digits)))``, the distribution a
    softmax over the five digits' logits (the same as renormalising their probabilities).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    digit_logp = logp[..., list(digit_ids)]
    mass = digit_logp.logsumexp(dim=-1).exp()
    distribution = torch.softmax(digit_logp, dim=-1)
    values = torch.arange(1, len(digit_ids) + 1, dtype=distribution.dtype, device=distribution.device)
    return ScoreTensors((distribution * values).sum(dim=-1), distribution, mass)


# ------------------------------------------------------------------------------------------- audio


def audio_features(processor: Qwen2AudioProcessor, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """``input_features`` (B, mels, window) and ``feature_attention_mask`` (B, window) of 16 kHz clips.

    Each padded to the window and truncated past it, as the processor does when it is called with text.
    """
    features = processor.feature_extractor(
        [np.asarray(a, dtype=np.float32) for a in audios],
        sampling_rate=SAMPLE_RATE,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {
        "input_features": features["input_features"],
        "feature_attention_mask": features["attention_mask"],
    }


def encode_audios(
    model: nn.Module, processor: Qwen2AudioProcessor, audios: Sequence[np.ndarray]
) -> list[AudioEncoding]:
    """Encoder + projector on clips in one pass, as ``Qwen2AudioModel.forward`` runs them (each clip
    padded to the window, its own padding mask); gradients flow if enabled (the scoring functions below
    turn them off). A clip's encoding does not depend on the others in the batch, within float error."""
    check_window(model, processor)
    features = audio_features(processor, audios)
    projected = project_audio(model, features["input_features"], features["feature_attention_mask"])
    return [AudioEncoding(tokens) for tokens in projected]


def encode_audio(model: nn.Module, processor: Qwen2AudioProcessor, audio: np.ndarray) -> AudioEncoding:
    """One clip's :func:`encode_audios`."""
    return encode_audios(model, processor, [audio])[0]


# ---------------------------------------------------------------------------------------- prompts


def prompt_texts(
    processor: Qwen2AudioProcessor, prompts: Sequence[str], num_audio_tokens: int, *, answer_prefix: bool
) -> list[str]:
    """Chat-templated prompts, ``<|AUDIO|>`` written ``num_audio_tokens`` times (the processor's expansion).

    ``answer_prefix`` appends ``<answer>`` after the generation prompt: the next token is the digit.
    """
    audio_token = processor.audio_token
    texts = []
    for prompt in prompts:
        text = processor.apply_chat_template(
            user_messages(prompt), add_generation_prompt=True, tokenize=False
        )
        if text.count(audio_token) != 1:
            raise ValueError(f"a prompt must hold {audio_token} once, found {text.count(audio_token)}")
        texts.append(
            text.replace(audio_token, audio_token * num_audio_tokens) + (ANSWER_OPEN if answer_prefix else "")
        )
    return texts


def embed_prompts(
    model: nn.Module,
    processor: Qwen2AudioProcessor,
    encoding: AudioEncoding | Sequence[AudioEncoding],
    prompts: Sequence[str],
    *,
    answer_prefix: bool,
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask``, ``position_ids``, ``inputs_embeds`` (audio written in).

    One ``encoding``: every row gets it (repeated along the batch, not re-encoded); a sequence: one per
    row (rows about different clips, as a batch of several requests has).
    """
    base = unwrap(model)
    encodings = [encoding] * len(prompts) if isinstance(encoding, AudioEncoding) else list(encoding)
    if len(encodings) != len(prompts):
        raise ValueError(f"{len(encodings)} audio encodings for {len(prompts)} prompts")
    texts = [
        prompt_texts(processor, [prompt], enc.num_tokens, answer_prefix=answer_prefix)[0]
        for prompt, enc in zip(prompts, encodings, strict=True)
    ]
    batch = processor.tokenizer(
        texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
    )
    device = base.get_input_embeddings().weight.device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    embeds = base.get_input_embeddings()(input_ids)
    audio_positions = input_ids == int(base.config.audio_token_id)
    found = audio_positions.sum(dim=1).tolist()
    expected = [enc.num_tokens for enc in encodings]
    if found != expected:
        raise ValueError(f"audio tokens per row {found}, the encodings have {expected}")
    # masked_scatter fills the audio positions row by row: the rows' encodings, in row order
    source = torch.cat([enc.embeds.to(device, embeds.dtype) for enc in encodings])
    embeds = embeds.masked_scatter(audio_positions[..., None], source)
    soft, kind = virtual_tokens(model), soft_prompt_kind(model)
    rows = input_ids.shape[0]
    extra: dict[str, Any] = {}
    if kind == "prompt":  # learnt embeddings first, where peft puts them (before the padding too)
        embeds = torch.cat([model.get_prompt(batch_size=rows).to(device, embeds.dtype), embeds], dim=1)
        pad = int(processor.tokenizer.pad_token_id)
        input_ids = torch.cat([torch.full((rows, soft), pad, dtype=input_ids.dtype, device=device),
                               input_ids], dim=1)
    elif kind == "prefix":  # learnt keys and values, as a cache of ``soft`` positions before the text
        extra["past_key_values"] = model.get_prompt(batch_size=rows)
    if soft:
        attention_mask = torch.cat([torch.ones((rows, soft), dtype=attention_mask.dtype, device=device),
                                    attention_mask], dim=1)
    # positions count real tokens only, so a row's positions do not depend on its batch's padding
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "inputs_embeds": embeds,
        **extra,
    }


# ---------------------------------------------------------------------------------------- scoring


def answer_logits(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits (B, V) at every row's last position (left padding: the answer position).

    Runs the language model on ``inputs_embeds`` and the LM head on the last position only: the full
    (B, T, V) logits of the 7 B model would be gigabytes for ten prompts.
    """
    base = unwrap(model)
    hidden = base.model(
        inputs_embeds=inputs["inputs_embeds"],
        attention_mask=inputs["attention_mask"],
        position_ids=inputs["position_ids"],
        past_key_values=inputs.get("past_key_values"),  # a prefix-tuned model's learnt prefix
        use_cache=False,
    ).last_hidden_state
    return base.lm_head(hidden[:, -1])


@torch.no_grad()
def score_prompts(
    model: nn.Module,
    processor: Qwen2AudioProcessor,
    encoding: AudioEncoding,
    prompts: Sequence[str],
    *,
    batch_size: int | None = None,
) -> ScoreTensors:
    """Scores of ``prompts`` about one encoded clip, ``batch_size`` prompts per language-model pass."""
    digit_ids = digit_token_ids(processor.tokenizer)
    step = len(prompts) if not batch_size else int(batch_size)
    parts = []
    for start in range(0, len(prompts), max(step, 1)):
        inputs = embed_prompts(model, processor, encoding, prompts[start : start + step], answer_prefix=True)
        parts.append(score_logits(answer_logits(model, inputs), digit_ids))
    return ScoreTensors(*(torch.cat(field) for field in zip(*parts, strict=True)))


@torch.no_grad()
def score_batch(
    model: nn.Module,
    processor: Qwen2AudioProcessor,
    audios: Sequence[np.ndarray],
    prompts: Sequence[Sequence[str]],
    *,
    batch_size: int | None = None,
) -> list[ScoreTensors]:
    """Several requests at once: every clip encoded in one encoder pass, then all their prompts (each
    row with its own clip's audio) through the language model, ``batch_size`` rows a pass (None: all).
    Returns one :class:`ScoreTensors` per clip, its prompts in order."""
    digit_ids = digit_token_ids(processor.tokenizer)
    encodings = encode_audios(model, processor, audios)
    rows = [(enc, prompt) for enc, own in zip(encodings, prompts, strict=True) for prompt in own]
    step = len(rows) if not batch_size else int(batch_size)
    parts = []
    for start in range(0, len(rows), max(step, 1)):
        chunk = rows[start : start + step]
        inputs = embed_prompts(model, processor, [e for e, _ in chunk], [p for _, p in chunk],
                               answer_prefix=True)
        parts.append(score_logits(answer_logits(model, inputs), digit_ids))
    score, distribution, mass = (torch.cat(field) for field in zip(*parts, strict=True))
    out, offset = [], 0
    for own in prompts:
        end = offset + len(own)
        out.append(ScoreTensors(score[offset:end], distribution[offset:end], mass[offset:end]))
        offset = end
    return out


@torch.no_grad()
def score_item(
    model: nn.Module,
    processor: Qwen2AudioProcessor,
    audio: np.ndarray,
    item: Mapping[str, Any],
    *,
    dimensions: Sequence[str] | None = None,
    detailed: bool = True,
    batch_size: int | None = None,
) -> dict[str, DimensionScore]:
    """Every dimension of a JSONL item (or ``dimensions``) scored on one encoding of ``audio`` (16 kHz)."""
    dimensions = tuple(dimensions or item_dimensions(item))
    encoding = encode_audio(model, processor, audio)
    prompts = [item_prompt(item, d, detailed=detailed) for d in dimensions]
    result = score_prompts(model, processor, encoding, prompts, batch_size=batch_size)
    return {
        d: DimensionScore(
            dimension=d,
            score=float(result.score[i]),
            distribution=tuple(float(p) for p in result.distribution[i]),  # type: ignore[arg-type]
            digit_mass=float(result.digit_mass[i]),
        )
        for i, d in enumerate(dimensions)
    }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Qwen2AudioProcessor,
    encoding: AudioEncoding,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    answer_prefix: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's own answers (new text only, special tokens dropped), greedy unless told otherwise.

    ``answer_prefix`` starts the answer with ``<answer>`` (then the first new token is the digit that
    :func:`score_prompts` reads); by default the model writes the whole ``<answer>N</answer>``.
    """
    if soft_prompt_kind(model) == "prefix":
        raise ValueError("generating from a prefix-tuned evaluator is not supported (its prefix would have "
                         "to be a generation cache): score it, or train with another peft method")
    inputs = embed_prompts(model, processor, encoding, prompts, answer_prefix=answer_prefix)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": False}
    kwargs.update(generate_kwargs)
    output = unwrap(model).generate(
        input_ids=inputs["input_ids"],
        inputs_embeds=inputs["inputs_embeds"],
        attention_mask=inputs["attention_mask"],
        **kwargs,
    )
    new = output[:, inputs["input_ids"].shape[1] :]
    prefix = ANSWER_OPEN if answer_prefix else ""
    return [prefix + text for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
