"""Packed codec codes → CSM training batches, without running the codec during training.

CSM's own training path (``model(**processor(..., output_labels=True))``) takes *audio*: every forward
encodes each clip with the Mimi codec inside the model (one clip at a time, under ``no_grad``) to get
the codes it then embeds and predicts. The shards already hold those codes, so encoding again every
step would only cost time. ``CsmForConditionalGeneration.forward`` also accepts ``inputs_embeds``
with ``labels`` of shape ``(batch, sequence, num_codebooks)``, which is exactly what its
``_merge_input_ids_with_input_values`` builds from the audio; :func:`merge_codes` builds the same two
tensors from stored codes:

* the prompt is the one the processor's chat template writes for a (text, audio) turn,
  ``<bos>[speaker]text<eos>`` then one ``<|AUDIO|>`` per codec frame and ``<|audio_eos|>``;
* text positions are embedded with ``embed_text_tokens``, audio positions with the backbone's
  codebook embeddings (``backbone_model.embed_tokens``: one embedding per codebook, summed), and the
  ``<|audio_eos|>`` position with the all-``codebook_eos`` frame — as CSM does;
* labels are ``-100`` on text, the frame's codes on audio positions and the end frame on
  ``<|audio_eos|>``; a frame left out of the depth decoder's share (``depth_decoder_ratio`` < 1, as
  csm-1b trained on 1/16 of the frames) keeps only its first codebook as a label.

``tests/test_tts_train.py`` checks that this gives the same loss as CSM's audio path for codes the
codec itself produced.

The held-out split is by text: a clip is held out when a stable hash of its normalised transcript
falls under ``heldout_fraction``, so every clip of a held-out line (whoever speaks it) is held out
and the held-out loss measures lines the model never trained on.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CsmCodesCollator",
    "TtsItem",
    "TtsItems",
    "csm_forward",
    "heldout_texts",
    "merge_codes",
    "normalise_text",
    "speaker_ids",
    "split_by_text",
    "text_fraction",
]


# ----------------------------------------------------------------------------------------- the split


def normalise_text(text: str) -> str:
    """What two transcripts must share to count as the same line: letters and digits, lower case,
    accents stripped, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def text_fraction(text: str) -> float:
    """A stable number in [0, 1) for a transcript (sha1 of its normalised form; no salt, no seed)."""
    digest = hashlib.sha1(normalise_text(text).encode("utf-8")).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def heldout_texts(texts: Iterable[str], fraction: float) -> set[str]:
    """The normalised lines held out: those whose :func:`text_fraction` is below ``fraction``.

    When ``fraction`` > 0 but no line falls below it (a tiny corpus), the line with the lowest value is
    held out, so a held-out set exists whenever there are at least two distinct lines.
    """
    lines = {normalise_text(t) for t in texts}
    if fraction <= 0 or len(lines) < 2:
        return set()
    chosen = {line for line in lines if text_fraction(line) < fraction}
    if not chosen:
        chosen = {min(lines, key=text_fraction)}
    if chosen == lines:  # never hold everything out
        chosen.discard(max(chosen, key=text_fraction))
    return chosen


def split_by_text(items: Sequence[TtsItem], fraction: float) -> tuple[list[TtsItem], list[TtsItem]]:
    """(train, held-out): no normalised transcript of the held-out items occurs in training."""
    held = heldout_texts((item.text for item in items), fraction)
    train = [item for item in items if normalise_text(item.text) not in held]
    heldout = [item for item in items if normalise_text(item.text) in held]
    return train, heldout


def speaker_ids(names: Iterable[str], known: Mapping[str, int] | None = None) -> dict[str, int]:
    """CSM speaker ids (the ``[n]`` of the prompt) for speaker names: ``known`` ones keep theirs (a base
    model's ``speakers.json``), new ones get the next free ids in sorted order."""
    out = dict(known or {})
    next_id = max(out.values(), default=-1) + 1
    for name in sorted(set(names)):
        if name not in out:
            out[name] = next_id
            next_id += 1
    return out


# ------------------------------------------------------------------------------------------ the items


@dataclass(frozen=True)
class TtsItem:
    """One utterance to learn: who (name and CSM id), what, and its codes ``(num_codebooks, frames)``."""

    speaker: str
    speaker_id: int
    text: str
    codes: np.ndarray


class TtsItems(Dataset):
    """A list of :class:`TtsItem` for the Trainer; the collator does the tokenising."""

    def __init__(self, items: Sequence[TtsItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {"speaker_id": item.speaker_id, "text": item.text, "codes": item.codes}


# ------------------------------------------------------------------------------------- the collator


class CsmCodesCollator:
    """Items → ``input_ids``, ``attention_mask``, ``audio_codes`` and ``labels`` (right-padded).

    ``audio_codes`` is ``(batch, sequence, num_codebooks)``: the frame's codes on audio positions,
    the end frame on ``<|audio_eos|>``, zeros elsewhere; :func:`merge_codes` embeds it. The text part
    of each prompt is rendered once per (speaker, text) by the processor's own chat template, so the
    prompt is exactly the one CSM's processor builds (also for csm-1b's Llama-3 template).
    """

    def __init__(
        self, processor: Any, config: Any, *, depth_decoder_ratio: float = 1.0, max_frames: int = 0
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.audio_token = processor.audio_token
        self.audio_token_id = int(config.audio_token_id)
        self.audio_eos_token_id = int(config.audio_eos_token_id)
        self.codebook_eos = int(config.codebook_eos_token_id)
        self.num_codebooks = int(config.num_codebooks)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.depth_decoder_ratio = float(depth_decoder_ratio)
        self.max_frames = int(max_frames)
        self._prompts: dict[tuple[int, str], tuple[list[int], list[int]]] = {}

    def _prompt(self, speaker_id: int, text: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the audio frames (``<|audio_eos|>`` and whatever the template
        writes after it)."""
        key = (speaker_id, text)
        if key not in self._prompts:
            rendered = self.processor.apply_chat_template(
                [
                    {
                        "role": str(int(speaker_id)),
                        "content": [{"type": "text", "text": text}, {"type": "audio", "path": "codes"}],
                    }
                ],
                tokenize=False,
            )
            if isinstance(rendered, list):
                rendered = rendered[0]
            before, marker, after = rendered.partition(self.audio_token)
            if not marker:
                raise ValueError(
                    f"the chat template wrote no {self.audio_token} for an audio turn: {rendered!r}"
                )
            encode = self.tokenizer
            head = list(encode(before, add_special_tokens=False)["input_ids"])
            tail = list(encode(after, add_special_tokens=False)["input_ids"])
            if self.audio_eos_token_id not in tail:
                raise ValueError(f"the chat template wrote no audio end after the frames: {rendered!r}")
            self._prompts[key] = (head, tail)
        return self._prompts[key]

    def encode(
        self, speaker_id: int, text: str, codes: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One item: ``input_ids (S,)``, ``audio_codes (S, Q)``, ``labels (S, Q)``."""
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected ({self.num_codebooks}, frames)")
        if self.max_frames > 0:
            codes = codes[:, : self.max_frames]
        frames = codes.shape[1]
        head, tail = self._prompt(speaker_id, text)
        ids = torch.tensor(head + [self.audio_token_id] * frames + tail, dtype=torch.long)
        audio = torch.zeros(len(ids), self.num_codebooks, dtype=torch.long)
        labels = torch.full((len(ids), self.num_codebooks), -100, dtype=torch.long)
        start = len(head)
        audio[start : start + frames] = codes.T
        labels[start : start + frames] = codes.T
        eos = ids == self.audio_eos_token_id
        audio[eos] = self.codebook_eos
        labels[eos] = self.codebook_eos
        if self.depth_decoder_ratio < 1.0 and frames:
            # as the processor does: a random (1 - ratio) share of the frames trains the backbone only
            skip = torch.randperm(frames)[: int(frames * (1 - self.depth_decoder_ratio))]
            labels[start + skip, 1:] = -100
        return ids, audio, labels

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(int(b["speaker_id"]), str(b["text"]), b["codes"]) for b in batch]
        length = max(len(ids) for ids, _, _ in encoded)
        size = len(encoded)
        input_ids = torch.full((size, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(size, length, dtype=torch.long)
        audio = torch.zeros(size, length, self.num_codebooks, dtype=torch.long)
        labels = torch.full((size, length, self.num_codebooks), -100, dtype=torch.long)
        for row, (ids, codes, lab) in enumerate(encoded):
            n = len(ids)
            input_ids[row, :n], attention[row, :n] = ids, 1
            audio[row, :n], labels[row, :n] = codes, lab
        return {"input_ids": input_ids, "attention_mask": attention, "audio_codes": audio, "labels": labels}


# ---------------------------------------------------------------------------------------- the model


def _csm(model: Any) -> Any:
    """The ``CsmForConditionalGeneration`` under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merge_codes(
    model: Any, input_ids: torch.Tensor, audio_codes: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``inputs_embeds``: text embeddings on text positions, summed codebook embeddings on frames and on
    the audio end (what CSM's ``_merge_input_ids_with_input_values`` computes from audio)."""
    csm = _csm(model)
    text = csm.embed_text_tokens(input_ids)
    frames = csm.backbone_model.embed_tokens(audio_codes)
    is_audio = (input_ids == csm.config.audio_token_id) | (input_ids == csm.config.audio_eos_token_id)
    if attention_mask is not None:
        is_audio = is_audio & attention_mask.bool()
    return torch.where(is_audio.unsqueeze(-1), frames.to(text.dtype), text)


def csm_forward(model: Any, batch: Mapping[str, torch.Tensor]) -> Any:
    """CSM's training forward on a collated batch: the output carries ``loss``, ``backbone_loss``,
    ``depth_decoder_loss`` (model may be a peft model: its adapters are active)."""
    embeds = merge_codes(model, batch["input_ids"], batch["audio_codes"], batch.get("attention_mask"))
    return model(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), labels=batch["labels"])
