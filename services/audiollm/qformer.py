"""SALMONN's window-level Q-Former: a few learned queries read each ~0.33 s window of encoder frames.

SALMONN concatenates Whisper's and BEATs' frames (each layer-normalised first: ``ln_speech``,
``ln_audio``), cuts them into windows of 17 frames (``round(1500 × 0.333333 / 30)``, stride 17) and
lets ``N`` learned query tokens (``num_speech_query_token``, 1 by default) cross-attend to one window
at a time: ``N`` audio tokens per 0.34 s, whatever the clip's length, instead of one per 20 ms frame.
Its Q-Former is a 2-layer BERT with cross-attention in every layer and no text input;
transformers' :class:`~transformers.Blip2QFormerModel` is that network (a query-only BERT with
cross-attention every ``cross_attention_frequency`` layers), built from a config with no hub file.

Differences from SALMONN, on purpose:

* windows made only of padding are dropped (SALMONN always encoded 30 s and gave the LLM 88 windows
  of mostly silence for a 2 s clip), so a clip of ``F`` valid frames gets ``ceil(F / stride)``
  windows and the prompt of a short clip in a padded batch is shorter;
* frames past the clip's end are masked in the cross-attention of its last window, so that window
  reads the clip and not the padding;
* the frames are zero-padded up to a whole window instead of dropping the remainder (SALMONN's
  ``F.unfold`` drops the last 4 frames of 30 s), so the end of a long clip is never lost.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


def tiny_qformer_config(encoder_hidden_size: int, **overrides: object) -> Blip2QFormerConfig:
    """A 2-layer, 64-wide Q-Former with cross-attention in every layer (SALMONN's layout, narrowed)."""
    fields: dict[str, object] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "cross_attention_frequency": 1,
        "encoder_hidden_size": int(encoder_hidden_size),
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "vocab_size": 2,  # unused: Blip2QFormerModel has no word embeddings; kept small for the saved config
        "max_position_embeddings": 32,
    }
    fields.update(overrides)
    return Blip2QFormerConfig(**fields)


def window_count(valid_frames: torch.Tensor, stride: int) -> torch.Tensor:
    """Windows that hold at least one valid frame: ``ceil(frames / stride)`` (valid frames are a prefix)."""
    return torch.div(valid_frames + stride - 1, stride, rounding_mode="floor")


class WindowQFormer(nn.Module):
    """Frames (B, T, D_whisper + D_beats) + their mask → query outputs (B, W·N, H) + their mask (B, W·N).

    ``ln_speech`` / ``ln_audio`` are SALMONN's layer norms of the two encoders' frames (trained with
    the Q-Former); either is ``None`` when its encoder is not used.
    """

    def __init__(
        self,
        config: Blip2QFormerConfig,
        *,
        speech_width: int,
        audio_width: int,
        num_queries: int = 1,
        window: int = 17,
        stride: int = 17,
    ) -> None:
        super().__init__()
        if speech_width + audio_width != config.encoder_hidden_size:
            raise ValueError(
                f"Q-Former encoder_hidden_size {config.encoder_hidden_size} != "
                f"Whisper {speech_width} + BEATs {audio_width}"
            )
        if window < 1 or stride < 1 or num_queries < 1:
            raise ValueError("window, stride and num_queries must be positive")
        self.window, self.stride, self.num_queries = int(window), int(stride), int(num_queries)
        self.speech_width, self.audio_width = int(speech_width), int(audio_width)
        self.ln_speech = nn.LayerNorm(speech_width) if speech_width else None
        self.ln_audio = nn.LayerNorm(audio_width) if audio_width else None
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, config.hidden_size))
        self.qformer = Blip2QFormerModel(config)
        self.reset_queries(config.initializer_range)

    @torch.no_grad()
    def reset_queries(self, std: float) -> None:
        """SALMONN's initialisation of the queries: normal with BERT's ``initializer_range``."""
        self.query_tokens.normal_(mean=0.0, std=std)

    @property
    def hidden_size(self) -> int:
        return int(self.query_tokens.shape[-1])

    def forward(
        self, speech: torch.Tensor | None, audio: torch.Tensor | None, frame_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query outputs of every window that holds audio; dropped windows are zero and masked.

        ``speech`` (B, T, D_whisper) and ``audio`` (B, T, D_beats) are the encoders' frames (either may
        be ``None`` when its encoder is not used); ``frame_mask`` (B, T) is True on frames that hold
        audio, a prefix of every row. Everything happens in ``forward`` (normalisation included)
        because peft's ``modules_to_save`` wrapper only routes ``forward`` to the trained copy.
        """
        parts = []
        if self.ln_speech is not None:
            if speech is None:
                raise ValueError("this Q-Former reads Whisper frames, none were given")
            parts.append(self.ln_speech(speech.to(self.ln_speech.weight.dtype)))
        if self.ln_audio is not None:
            if audio is None:
                raise ValueError("this Q-Former reads BEATs frames, none were given")
            parts.append(self.ln_audio(audio.to(self.ln_audio.weight.dtype)))
        frames = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        frames = torch.where(frame_mask[..., None], frames, torch.zeros_like(frames))
        batch, length, _ = frames.shape
        counts = window_count(frame_mask.sum(dim=1), self.stride)  # (B,)
        windows = max(1, int(counts.max().item())) if batch else 0
        needed = (windows - 1) * self.stride + self.window
        if needed > length:
            frames = nn.functional.pad(frames, (0, 0, 0, needed - length))
            frame_mask = nn.functional.pad(frame_mask, (0, needed - length))
        # (B, W, D, K) → (B, W, K, D): SALMONN's unfold, as a view
        tiles = frames[:, :needed].unfold(1, self.window, self.stride).permute(0, 1, 3, 2)
        tile_mask = frame_mask[:, :needed].unfold(1, self.window, self.stride)  # (B, W, K)
        keep = torch.arange(windows, device=frames.device)[None, :] < counts[:, None]  # (B, W)
        selected = tiles[keep]  # (n, K, D): only the windows that hold audio
        out = frames.new_zeros(batch, windows, self.num_queries, self.hidden_size)
        if selected.shape[0]:
            queries = self.query_tokens.expand(selected.shape[0], -1, -1)
            encoded = self.qformer(
                query_embeds=queries,
                encoder_hidden_states=selected,
                encoder_attention_mask=tile_mask[keep].long(),
            ).last_hidden_state
            out[keep] = encoded.to(out.dtype)
        token_mask = keep[:, :, None].expand(-1, -1, self.num_queries)
        return out.reshape(batch, windows * self.num_queries, -1), token_mask.reshape(batch, -1)


def audio_token_count(
    num_samples: int, *, stride: int, num_queries: int, samples_per_frame: int = 320
) -> int:
    """Audio tokens the LLM gets for a clip of ``num_samples``: windows with audio × queries per window."""
    frames = math.ceil(int(num_samples) / samples_per_frame)
    return math.ceil(frames / stride) * num_queries
