"""The two audio encoders (Whisper's encoder, BEATs), their tiny configs, and long-audio chunking.

**Chunks.** Whisper's encoder only takes exactly ``2 × max_source_positions`` mel frames (30 s for the
real one: 3,000 mel frames → 1,500 encoder frames after its stride-2 convolution, 50 a second). Audio
is therefore cut into *chunks* of ``max_source_positions × 320`` samples; every chunk is encoded on
its own by both encoders and the chunks' frames are concatenated, so a 70 s clip is three 30 s
encoder windows, not a truncated 30 s. A chunk past the end of a shorter clip of the batch is never
encoded (its frames stay zero and masked). Every chunk is encoded at its full length whatever the
clip's length, which is what makes a padded batch give each clip what it gets alone: Whisper never
sees the batch's padding (it sees its own, as always: it was trained on 30 s of zero-padded audio),
and BEATs gets the chunk's own padding mask.

**Frame rates.** Whisper: 100 mel frames a second, stride 2 → 50 Hz, 320 samples a frame. BEATs:
Kaldi fbank at 100 Hz (25 ms window, 10 ms shift, snip-edges: ``1 + (n − 400) // 160`` frames),
16 × 16 patches over time × 128 mel bins → 8 frequency patches per 160 ms time patch, flattened
time-major: ``(fbank_frames // 16) × 8`` tokens, i.e. also ~50 tokens a second (1,496 for 30 s). They
are *not* 50 Hz frames in time: tokens ``8k … 8k+7`` are the 8 frequency bands of time patch ``k``.
SALMONN concatenates the two sequences position by position anyway (the shorter zero-padded to the
longer); position ``i`` is then Whisper's 20 ms frame ``i`` next to a BEATs token of the 160 ms patch
starting at ``20·8·⌊i/8⌋`` ms, i.e. the two are aligned to within one BEATs patch (160 ms), inside the
Q-Former's 340 ms window. We do the same, chunk by chunk (BEATs' ≤ ``max_source_positions`` tokens of
a chunk are zero-padded to Whisper's frame count).

**BEATs from a config.** speechbrain's ``BEATs`` only builds from a checkpoint path (``cfg`` and
``model`` keys, loaded strictly) or with the full-size defaults. :class:`ConfiguredBEATs` builds the
same modules from a config dict, with the same parameter names, so an official checkpoint's
``model`` state dict still loads strictly into it (:func:`load_beats_checkpoint`) and a tiny one
needs no file. Its ``extract_features`` must always get ``wav_lens``: without them speechbrain
1.1.2 reads an unbound ``padding_mask`` and fails.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from speechbrain.lobes.models.beats import BEATs, BEATsConfig, TransformerEncoder
from torch import nn
from transformers import WhisperConfig

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = 320  # Whisper: hop 160 samples, then its stride-2 convolution → 50 frames a second
BEATS_FBANK_WINDOW, BEATS_FBANK_SHIFT = 400, 160  # Kaldi fbank of speechbrain's BEATs.preprocess
BEATS_FREQUENCY_PATCHES = 8  # 128 mel bins / 16

# The tiny Whisper's encoder window: 250 frames = 5 s (the real one: 1,500 = 30 s). Small enough that a
# test crosses a window boundary with 6 s of audio and a short clip does not pay for 30 s of attention;
# long enough that a 0.34 s Q-Former window (17 frames) never needs more than two chunks.
TINY_MAX_SOURCE_POSITIONS = 250


def tiny_whisper_config(**overrides: Any) -> WhisperConfig:
    """A 2-layer, 64-wide Whisper whose encoder takes 5 s windows (see :data:`TINY_MAX_SOURCE_POSITIONS`).

    Only the encoder is ever built; the decoder fields are kept small and valid (``WhisperConfig``
    insists that its special ids lie inside its vocabulary).
    """
    fields: dict[str, Any] = {
        "vocab_size": 64,
        "num_mel_bins": 80,  # whisper-small's count (large-v3: 128)
        "d_model": 64,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_layers": 1,
        "decoder_attention_heads": 4,
        "decoder_ffn_dim": 128,
        "max_source_positions": TINY_MAX_SOURCE_POSITIONS,
        "max_target_positions": 32,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 1,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "begin_suppress_tokens": None,
        "suppress_tokens": None,
    }
    fields.update(overrides)
    return WhisperConfig(**fields)


def tiny_beats_config(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 64-wide BEATs with BEATs_iter3+'s layout (deep norm, gated relative positions).

    ``input_patch_size`` stays 16: speechbrain's preprocessing always makes 128 mel bins, so the patch
    grid (and the ~50 tokens a second) is the real model's.
    """
    cfg: dict[str, Any] = {
        "input_patch_size": 16,
        "embed_dim": 32,
        "conv_bias": False,
        "encoder_layers": 2,
        "encoder_embed_dim": 64,
        "encoder_ffn_embed_dim": 128,
        "encoder_attention_heads": 4,
        "activation_fn": "gelu",
        "layer_norm_first": False,
        "deep_norm": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "dropout_input": 0.0,
        "conv_pos": 16,
        "conv_pos_groups": 4,
        "relative_position_embedding": True,
        "num_buckets": 320,
        "max_distance": 800,
        "gru_rel_pos": True,
        "finetuned_model": False,
    }
    cfg.update(overrides)
    return cfg


class ConfiguredBEATs(BEATs):
    """speechbrain's BEATs built from a config dict instead of a checkpoint (see the module docstring).

    The body is ``BEATs.__init__`` without the checkpoint: same attribute names, hence the same state
    dict keys as the official checkpoints. ``freeze`` is speechbrain's own switch (its ``forward``
    runs under ``no_grad``); the audio LLM calls ``extract_features`` and decides itself.
    """

    def __init__(self, cfg: Mapping[str, Any] | None = None, *, freeze: bool = False) -> None:
        nn.Module.__init__(self)
        # speechbrain initialises through ``tensor.cpu()``, which a meta tensor (transformers'
        # ``from_pretrained`` builds models on the meta device) cannot do: build on the CPU then.
        device = torch.get_default_device()
        with torch.device("cpu" if device.type == "meta" else device):
            self._build(cfg, freeze)

    def _build(self, cfg: Mapping[str, Any] | None, freeze: bool) -> None:
        self.cfg = BEATsConfig(dict(cfg or {}))
        self.freeze = freeze
        self.output_all_hiddens = False
        self.embed = self.cfg.embed_dim
        self.post_extract_proj = (
            nn.Linear(self.embed, self.cfg.encoder_embed_dim)
            if self.embed != self.cfg.encoder_embed_dim
            else None
        )
        self.input_patch_size = self.cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(
            1,
            self.embed,
            kernel_size=self.input_patch_size,
            stride=self.input_patch_size,
            bias=self.cfg.conv_bias,
        )
        self.dropout_input = nn.Dropout(self.cfg.dropout_input)
        if self.cfg.deep_norm and self.cfg.layer_norm_first:
            raise ValueError("BEATs config: deep_norm and layer_norm_first cannot both be true")
        self.encoder = TransformerEncoder(self.cfg)
        self.layer_norm = nn.LayerNorm(self.embed)
        if self.cfg.finetuned_model:  # the AS2M-fine-tuned checkpoints carry a 527-class head
            self.predictor_dropout = nn.Dropout(self.cfg.predictor_dropout)
            self.predictor = nn.Linear(self.cfg.encoder_embed_dim, self.cfg.predictor_class)
        else:
            self.predictor = None

    @property
    def output_size(self) -> int:
        return int(self.cfg.encoder_embed_dim)


def read_beats_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An official BEATs checkpoint's ``cfg`` and ``model`` (state dict), e.g. BEATs_iter3+ AS2M cpt2."""
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    return dict(checkpoint["cfg"]), dict(checkpoint["model"])


def load_beats_checkpoint(beats: ConfiguredBEATs, state: Mapping[str, torch.Tensor]) -> None:
    """Load an official ``model`` state dict strictly, as speechbrain's ``BEATs(ckp_path)`` does."""
    beats.load_state_dict(dict(state), strict=True)


# ------------------------------------------------------------------------------------ geometry


def chunk_samples(max_source_positions: int) -> int:
    """Samples in one encoder chunk (480,000 = 30 s for the real Whisper, 80,000 = 5 s for the tiny one)."""
    return int(max_source_positions) * SAMPLES_PER_FRAME


def num_chunks(num_samples: int, max_source_positions: int) -> int:
    """Encoder chunks a clip of ``num_samples`` needs (at least one)."""
    return max(1, math.ceil(int(num_samples) / chunk_samples(max_source_positions)))


def valid_frames(num_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Encoder frames (50 Hz) that hold audio: ``ceil(samples / 320)``.

    Chunks are a whole number of frames long, so the valid frames of a chunked clip are exactly its
    first ``ceil(samples / 320)`` frames of the concatenation.
    """
    if isinstance(num_samples, torch.Tensor):
        return torch.div(num_samples + SAMPLES_PER_FRAME - 1, SAMPLES_PER_FRAME, rounding_mode="floor")
    return -(-int(num_samples) // SAMPLES_PER_FRAME)


def beats_tokens(chunk_length: int) -> int:
    """BEATs tokens for ``chunk_length`` samples: ``(fbank_frames // 16) × 8`` (≤ its Whisper frames)."""
    fbank_frames = 1 + (int(chunk_length) - BEATS_FBANK_WINDOW) // BEATS_FBANK_SHIFT
    return (fbank_frames // 16) * BEATS_FREQUENCY_PATCHES


def relative_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """speechbrain relative lengths that give back exactly ``lengths`` samples.

    speechbrain's BEATs rebuilds the mask as ``arange(max_len) < rel * max_len``; ``n / max_len`` can
    come back as ``n + ε`` after float rounding and count one padded sample in, ``(n − 0.25) / max_len``
    cannot.
    """
    return (lengths.float() - 0.25).clamp(min=0.0) / float(max_len)


# --------------------------------------------------------------------------------------- encoding


def chunk_lengths(lengths: torch.Tensor, chunks: int, max_source_positions: int) -> torch.Tensor:
    """Valid samples of every chunk of every clip, (B·C,), row-major (clip 0's chunks first)."""
    size = chunk_samples(max_source_positions)
    starts = torch.arange(chunks, device=lengths.device) * size
    return (lengths[:, None] - starts[None, :]).clamp(min=0, max=size).reshape(-1)


def split_chunks(waveforms: torch.Tensor, max_source_positions: int) -> torch.Tensor:
    """Cut (B, samples) padded waveforms into (B·C, chunk) pieces, zero-padding to whole chunks."""
    size = chunk_samples(max_source_positions)
    batch, total = waveforms.shape
    chunks = max(1, math.ceil(total / size))
    padded = torch.nn.functional.pad(waveforms, (0, chunks * size - total))
    return padded.reshape(batch * chunks, size)


def beats_chunk_features(
    beats: ConfiguredBEATs, pieces: torch.Tensor, piece_lengths: torch.Tensor, frames_per_chunk: int
) -> torch.Tensor:
    """BEATs tokens of fixed-length chunks, zero-padded to ``frames_per_chunk`` (N, frames, D).

    Padded tokens (BEATs' own mask) are zeroed: a masked token's output is not meaningful, and a
    row whose keys were all masked would be NaN in speechbrain's attention.
    """
    wav_lens = relative_lengths(piece_lengths, pieces.shape[1])
    out = beats.extract_features(pieces, wav_lens)
    tokens = out[0]
    if tokens.shape[1] > frames_per_chunk:
        raise ValueError(f"BEATs gave {tokens.shape[1]} tokens for a {frames_per_chunk}-frame chunk")
    sample_mask = torch.arange(pieces.shape[1], device=pieces.device)[None, :] >= piece_lengths[:, None]
    fbank_frames = 1 + (pieces.shape[1] - BEATS_FBANK_WINDOW) // BEATS_FBANK_SHIFT
    token_mask = _downsample_mask(_downsample_mask(sample_mask, fbank_frames), tokens.shape[1])
    tokens = torch.where(token_mask[..., None], torch.zeros_like(tokens), tokens)
    return nn.functional.pad(tokens, (0, 0, 0, frames_per_chunk - tokens.shape[1]))


def _downsample_mask(padding_mask: torch.Tensor, size: int) -> torch.Tensor:
    """speechbrain BEATs' ``forward_padding_mask``: trim, group, padding where all of a group is."""
    extra = padding_mask.shape[1] % size
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.reshape(padding_mask.shape[0], size, -1).all(-1)
