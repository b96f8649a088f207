"""The platform's speaker encoder as a pyannote embedding model (what diarization clusters with).

pyannote only knows how to wrap its own ``Model`` subclasses as embeddings
(``PretrainedSpeakerEmbedding`` → ``PyannoteAudioPretrainedSpeakerEmbedding``, which calls
``model(waveforms, weights=masks)``), so :class:`SpeakerStoreEmbedding` is a small pyannote ``Model``
around a :class:`~dramaturg.shared.voice.encoder.SpeakerEncoder`: a pipeline then gets the inference
interface it expects (``sample_rate``, ``dimension``, ``metric``, ``min_num_samples``,
``__call__(waveforms, masks)``) from pyannote's own wrapper, the same code path as WeSpeaker's ResNet.

pyannote is imported here at module level: only code that builds pipelines (the diarization service)
imports this module; the speaker service never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dramaturg.shared.voice.encoder import SpeakerEncoder, SpeakerEncoderConfig, build_encoder
from pyannote.audio import Model
from torch.nn.utils.rnn import pad_sequence

# The untrained encoder of the tests and of the embedded default: a tiny ECAPA.
TINY_EMBEDDING: dict[str, Any] = {"architecture": "ecapa"}


class SpeakerStoreEmbedding(Model):
    """A dramaturg ``SpeakerEncoder`` dressed as a pyannote embedding model (see the module docstring).

    ``forward(waveforms, weights)`` is the contract pyannote's embedding wrapper calls: waveforms
    (batch, 1, samples) of one segmentation window each, weights (batch, frames) the frame mask of
    one local speaker at the segmentation model's resolution. The mask is stretched to samples
    (nearest, > 0.5, as pyannote's SpeechBrain wrapper does), the selected samples of each row are
    concatenated and padded into one batch (the encoder batches exactly), and rows with fewer than
    ``min_samples`` selected samples come back as NaN, which the clustering skips. A call without
    weights that is shorter than ``min_samples`` raises: pyannote probes ``min_num_samples`` that way.
    """

    def __init__(self, encoder: SpeakerEncoder, min_seconds: float = 0.1) -> None:
        super().__init__(sample_rate=int(encoder.config.sample_rate), num_channels=1)
        self.encoder = encoder.eval()
        self.min_samples = max(1, round(float(min_seconds) * int(encoder.config.sample_rate)))

    @property
    def dimension(self) -> int:
        return int(self.encoder.embedding_size)

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        wav = waveforms.reshape(waveforms.shape[0], -1) if waveforms.ndim == 3 else waveforms
        batch, samples = wav.shape
        if weights is None:
            if samples < self.min_samples:
                raise ValueError(f"{samples} samples: the embedding needs at least {self.min_samples}")
            keep = torch.ones_like(wav, dtype=torch.bool)
        else:
            stretched = F.interpolate(weights.to(wav.dtype).unsqueeze(1), size=samples, mode="nearest")
            keep = stretched.squeeze(1) > 0.5
        lengths = keep.sum(dim=1)
        out = torch.full((batch, self.dimension), float("nan"), dtype=torch.float32, device=wav.device)
        rows = torch.nonzero(lengths >= self.min_samples).flatten()
        if rows.numel():
            padded = pad_sequence([wav[i][keep[i]] for i in rows.tolist()], batch_first=True)
            vectors = self.encoder(padded, lengths=lengths[rows])
            out[rows] = F.normalize(vectors.float(), dim=-1)
        return out


def tiny_speaker_encoder(seed: int = 0, config: Mapping[str, Any] | None = None) -> SpeakerEncoder:
    """An untrained speaker-service encoder (default: tiny ECAPA), the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_encoder(SpeakerEncoderConfig(**{**TINY_EMBEDDING, **dict(config or {})})).eval()


def load_speaker_encoder(folder: str | Path) -> SpeakerEncoder:
    return SpeakerEncoder.from_pretrained(str(folder)).eval()
