"""SALMONN's prompt format and the processor that turns (audio, instruction[, answer]) into model inputs.

SALMONN (``bytedance/SALMONN``, branch ``salmonn``: ``configs/config.yaml``, ``prompts/*.json``,
``models/salmonn.py``) wraps every task prompt ``"<Speech><SpeechHere></Speech> {instruction}"`` in
``prompt_template: "USER: {}\\nASSISTANT:"``, puts the LLM's begin-of-text in front, splits the text
at ``<SpeechHere>`` and puts the audio tokens there; the answer follows the prompt and ends with
``end_sym: "</s>"``; the loss is taken on the answer only. So a training example reads::

    <s>USER: <Speech>[audio tokens]</Speech> Recognize the speech and give me the transcription.
    ASSISTANT: the words</s>

(:data:`PROMPT_TEMPLATE`, :data:`TASK_INSTRUCTIONS`). SALMONN tokenised the answer on its own with
Llama-2's SentencePiece, which puts a space in front of it; :attr:`AudioLlmProcessor.response_prefix`
(``" "``) keeps that space explicit for tokenizers that do not add one.

Instead of splitting the embeddings at the placeholder, the processor writes the placeholder's token
(:attr:`audio_token`) once per audio token, so ``input_ids``, ``attention_mask`` and ``labels`` have the
final length and the model only overwrites those positions' embeddings; the count
(:func:`~dramaturg.services.audiollm.qformer.audio_token_count`) is the number of 0.34 s windows that
hold audio × queries per window, the same function the model's Q-Former uses.

Audio: 16 kHz mono. The processor gives the model both views it needs: Whisper's log-mel
spectrogram (``input_features``, one ``WhisperFeatureExtractor`` call per encoder chunk, exactly as
Whisper sees a 30 s window, concatenated along time) and the raw padded waveform for BEATs
(``input_values``), with the clips' lengths (``audio_lengths``, samples).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from dramaturg.services.audiollm.encoders import SAMPLE_RATE, SAMPLES_PER_FRAME, chunk_samples, num_chunks
from dramaturg.services.audiollm.qformer import audio_token_count
from transformers import BatchFeature, ProcessorMixin, WhisperFeatureExtractor

log = logging.getLogger(__name__)

AUDIO_PLACEHOLDER = "<SpeechHere>"
PROMPT_TEMPLATE = "USER: <Speech><SpeechHere></Speech> {instruction}\nASSISTANT:"
# SALMONN's test prompts (prompts/test_prompt.json) for the service's tasks, its typo included: a model
# trained on SALMONN's prompts answers to exactly these strings.
TASK_INSTRUCTIONS: dict[str, str] = {
    "asr": "Recognize the speech and give me the transcription.",
    "audiocaption_v2": "Please write down what your hear in the audio.",
    "audiocaption": "Please describe the audio.",
    "emotion_recognition": "Describe the emotion of the speaker in one word.",
}
IGNORE_INDEX = -100


def render_prompt(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt text for one instruction (``str.replace``, so braces in the instruction are safe)."""
    if template.count("{instruction}") != 1:
        raise ValueError("the prompt template needs exactly one '{instruction}'")
    return template.replace("{instruction}", instruction.strip())


class AudioLlmProcessor(ProcessorMixin):
    """Whisper's feature extractor + the LLM's tokenizer + SALMONN's prompt layout.

    ``max_source_positions`` (Whisper encoder frames per chunk), ``window_stride`` and
    ``num_queries`` must be the model config's: they decide how many audio tokens a clip gets
    (:func:`~dramaturg.services.audiollm.model.build_processor` takes them from the config).
    ``audio_token`` is the tokenizer's token written once per audio token (default: the tokenizer's
    ``audio_token``, the tiny one's ``<SpeechHere>``; Llama-3: a reserved special token); it is saved
    in ``processor_config.json``, so a tokenizer that does not know it as "the audio token" still works.
    """

    def __init__(
        self,
        feature_extractor: WhisperFeatureExtractor | None = None,
        tokenizer: Any = None,
        prompt_template: str = PROMPT_TEMPLATE,
        audio_placeholder: str = AUDIO_PLACEHOLDER,
        max_source_positions: int = 1500,
        window_stride: int = 17,
        num_queries: int = 1,
        response_prefix: str = " ",
        audio_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        if audio_placeholder not in prompt_template.replace("{instruction}", ""):
            raise ValueError(f"the prompt template has no audio placeholder {audio_placeholder!r}")
        self.prompt_template = prompt_template
        self.audio_placeholder = audio_placeholder
        self.max_source_positions = int(max_source_positions)
        self.window_stride = int(window_stride)
        self.num_queries = int(num_queries)
        self.response_prefix = response_prefix
        if audio_token is None and tokenizer is not None:
            audio_token = getattr(tokenizer, "audio_token", None)
        self.audio_token = str(audio_token or audio_placeholder)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------------------------- pieces

    @property
    def audio_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.audio_token))

    @property
    def chunk_samples(self) -> int:
        return chunk_samples(self.max_source_positions)

    def audio_tokens(self, num_samples: int) -> int:
        """Audio tokens a clip of ``num_samples`` gets in the prompt."""
        return audio_token_count(
            num_samples,
            stride=self.window_stride,
            num_queries=self.num_queries,
            samples_per_frame=SAMPLES_PER_FRAME,
        )

    def prompt_ids(self, instruction: str, num_samples: int) -> list[int]:
        """Token ids of the prompt with the placeholder written once per audio token (BOS included)."""
        text = render_prompt(instruction, self.prompt_template).replace(
            self.audio_placeholder, self.audio_token
        )
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        audio_id = self.audio_token_id
        where = [i for i, token in enumerate(ids) if token == audio_id]
        if len(where) != 1:
            raise ValueError(f"the prompt must hold the audio token once, found it {len(where)} times")
        at = where[0]
        return ids[:at] + [audio_id] * self.audio_tokens(num_samples) + ids[at + 1 :]

    def response_ids(self, response: str) -> list[int]:
        """The answer's ids (``response_prefix`` + text) ending with the end-of-answer token."""
        ids = list(
            self.tokenizer(self.response_prefix + response.strip(), add_special_tokens=False)["input_ids"]
        )
        return [*ids, int(self.tokenizer.eos_token_id)]

    def audio_features(self, audio: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """``input_features`` (B, mels, C·2·frames), ``input_values`` (B, C·chunk) and ``audio_lengths`` (B,).

        Every clip is padded to the batch's chunk count ``C``; the mel features of a chunk past a clip's
        end stay zero (the model never encodes it).
        """
        clips = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio]
        if not clips or any(c.size == 0 for c in clips):
            raise ValueError("every row needs a non-empty clip")
        size = self.chunk_samples
        chunks = max(num_chunks(c.size, self.max_source_positions) for c in clips)
        values = np.zeros((len(clips), chunks * size), dtype=np.float32)
        pieces: list[np.ndarray] = []
        where: list[tuple[int, int]] = []
        for row, clip in enumerate(clips):
            values[row, : clip.size] = clip
            for chunk in range(num_chunks(clip.size, self.max_source_positions)):
                pieces.append(values[row, chunk * size : (chunk + 1) * size])
                where.append((row, chunk))
        mels = self.feature_extractor(
            pieces,
            sampling_rate=SAMPLE_RATE,
            padding="max_length",
            max_length=size,
            truncation=True,
            return_tensors="np",
        )["input_features"]
        frames = mels.shape[-1]
        if frames != 2 * self.max_source_positions:
            raise ValueError(
                f"the feature extractor gives {frames} mel frames a chunk, "
                f"Whisper wants {2 * self.max_source_positions}"
            )
        features = np.zeros((len(clips), mels.shape[1], chunks * frames), dtype=np.float32)
        for (row, chunk), mel in zip(where, mels, strict=True):
            features[row, :, chunk * frames : (chunk + 1) * frames] = mel
        return {
            "input_features": torch.from_numpy(features),
            "input_values": torch.from_numpy(values),
            "audio_lengths": torch.tensor([c.size for c in clips], dtype=torch.long),
        }

    # --------------------------------------------------------------------------------------- call

    def __call__(
        self,
        audio: np.ndarray | Sequence[np.ndarray],
        instructions: str | Sequence[str] = TASK_INSTRUCTIONS["asr"],
        responses: Sequence[str] | None = None,
        *,
        sampling_rate: int = SAMPLE_RATE,
    ) -> BatchFeature:
        """Model inputs for a batch: one clip (16 kHz mono) and one instruction per row.

        With ``responses`` (training) every row continues with its answer and ``labels`` holds the
        answer's ids and -100 everywhere else (padding, prompt, audio). Rows are left-padded.
        """
        if sampling_rate != SAMPLE_RATE:
            raise ValueError(f"audio must be {SAMPLE_RATE} Hz (got {sampling_rate}); resample it first")
        clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
        texts = [instructions] * len(clips) if isinstance(instructions, str) else list(instructions)
        if len(texts) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(texts)} instructions")
        if responses is not None and len(responses) != len(clips):
            raise ValueError(f"{len(clips)} clips but {len(responses)} responses")
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        for i, (clip, text) in enumerate(zip(clips, texts, strict=True)):
            prompt = self.prompt_ids(text, int(np.asarray(clip).size))
            answer = self.response_ids(responses[i]) if responses is not None else []
            rows.append(prompt + answer)
            label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
        longest = max(len(r) for r in rows)
        pad_id = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, lab) in enumerate(zip(rows, label_rows, strict=True)):
            start = longest - len(ids)  # left padding
            input_ids[r, start:] = torch.tensor(ids)
            attention_mask[r, start:] = 1
            labels[r, start:] = torch.tensor(lab)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if responses is not None:
            data["labels"] = labels
        data.update(self.audio_features(clips))
        return BatchFeature(data=data)

    def decode(self, token_ids: torch.Tensor | Sequence[int], prompt_length: int = 0) -> str:
        """The answer text of one generated row (the prompt's ``prompt_length`` ids dropped)."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        return str(self.tokenizer.decode(ids[prompt_length:], skip_special_tokens=True)).strip()

    def batch_decode(self, sequences: torch.Tensor, prompt_length: int = 0) -> list[str]:
        return [self.decode(row, prompt_length) for row in sequences]
