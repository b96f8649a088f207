"""The speaker encoder: one Hugging Face model class over three architectures.

* ``wav2vec2`` — a :class:`~transformers.Wav2Vec2Model` (tiny and from scratch, or a pretrained
  checkpoint such as ``facebook/wav2vec2-base``) followed by a pooling over frames, as in
  "Fine-tuning wav2vec2 for speaker recognition" (Vaessen & van Leeuwen, ICASSP 2022): mean, mean+std,
  attentive, quantile, first, last, middle, random, max and first+cls.
* ``xvector`` / ``ecapa`` — speechbrain's ``Xvector`` and ``ECAPA_TDNN`` lobes on speechbrain's
  ``Fbank`` with per-utterance mean (and optionally variance) normalisation.

Whatever the architecture, ``SpeakerEncoder.save_pretrained`` / ``from_pretrained`` go through
transformers' own machinery (``config.json`` + ``model.safetensors``), so a model trained here is a
folder the speaker service loads with one call, and ``embed`` turns a list of waveforms into
L2-normalised float32 embeddings.

Batching is exact: a padded batch gives the embedding each utterance gets on its own. For the
lobes that takes two things speechbrain does not do by itself: convolutions pad with zeros
instead of reflecting, and the padded frames of every convolution's input are zeroed (forward
pre-hooks), so a frame next to the padding sees what it would see at the end of a lone utterance.
wav2vec2 models whose feature encoder uses group norm (``wav2vec2-base``) normalise over the whole
padded input and cannot be batched exactly; ``embed`` groups them by exact length instead.

Pretrained weights are loaded by :func:`build_encoder` only (for training): ``__init__`` never
downloads, so serving a trained model needs nothing but its folder.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from speechbrain.lobes.features import Fbank
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN, AttentiveStatisticsPooling
from speechbrain.lobes.models.Xvector import Xvector
from speechbrain.nnet.CNN import Conv1d as SbConv1d
from speechbrain.nnet.pooling import StatisticsPooling
from speechbrain.processing.features import InputNormalization
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)
from transformers import initialization as hf_init

log = logging.getLogger(__name__)

ARCHITECTURES = ("wav2vec2", "xvector", "ecapa")
POOLINGS = (
    "mean",
    "mean+std",
    "attentive",
    "quantile",
    "first",
    "last",
    "middle",
    "random",
    "max",
    "first+cls",
)
# The lobes pool inside speechbrain's code; the config records which pooling that is.
LOBE_POOLING = {"xvector": "mean+std", "ecapa": "attentive"}
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)  # that paper's quantile pooling: min, quartiles, max
HOP_MS = 10.0  # speechbrain Fbank's default hop: frames = 1 + samples // hop

# Small enough to train on two CPU cores in minutes; the production configs
# (services/speaker/presets/*.yaml) name real checkpoints and full sizes instead.
TINY_WAV2VEC2: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "conv_dim": [32] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    # layer norm in the feature encoder keeps padded batches exact (group norm does not)
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "layerdrop": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "mask_time_prob": 0.0,
}
TINY_LOBES: dict[str, dict[str, Any]] = {
    "ecapa": {
        "channels": [64, 64, 64, 64, 192],
        "kernel_sizes": [5, 3, 3, 3, 1],
        "dilations": [1, 2, 3, 4, 1],
        "attention_channels": 32,
        "res2net_scale": 4,
        "se_channels": 32,
    },
    "xvector": {
        "tdnn_blocks": 5,
        "tdnn_channels": [64, 64, 64, 64, 192],
        "tdnn_kernel_sizes": [5, 3, 3, 1, 1],
        "tdnn_dilations": [1, 2, 3, 1, 1],
    },
}
DEFAULT_EMBEDDING_DIM = {"wav2vec2": 0, "xvector": 128, "ecapa": 128}
# Regularisation switches of that paper's ablations, applied onto the wav2vec2 backbone config.
BACKBONE_SWITCHES = (
    "layerdrop",
    "hidden_dropout",
    "attention_dropout",
    "activation_dropout",
    "feat_proj_dropout",
    "mask_time_prob",
)

# The frame mask of the batch being encoded, read by the convolution pre-hooks (a context variable,
# so concurrent threads encoding different batches do not see each other's mask).
_FRAME_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("frame_mask", default=None)


class SpeakerEncoderConfig(PretrainedConfig):
    """Everything needed to rebuild a speaker encoder, plus its calibrated decision threshold.

    Fields left ``None`` are filled per architecture in ``__post_init__`` and then saved explicitly,
    so a saved model never depends on the defaults of a later version of this file.

    * ``architecture``: ``"wav2vec2"``, ``"xvector"`` or ``"ecapa"``.
    * ``embedding_dim``: output size. wav2vec2: a linear projection of the pooled vector, 0 = the
      pooled vector itself (that paper's setup); lobes: speechbrain's ``lin_neurons``.
    * ``pooling``: one of :data:`POOLINGS` for wav2vec2; the lobes pool their own way (recorded).
    * ``backbone``: a ``Wav2Vec2Config`` dict; ``pretrained_backbone``: where :func:`build_encoder`
      takes weights from (hub id or local path); ``freeze_feature_encoder`` keeps the CNN fixed.
    * ``layerdrop`` … ``mask_time_prob``: ablation switches written onto the backbone config.
    * ``n_mels``, ``f_min``/``f_max`` (the filterbank's band), ``lobe`` (speechbrain constructor
      kwargs), ``mean_norm``/``std_norm`` (per-utterance feature normalisation), ``conv_padding``
      (``"zeros"``: exact batching; ``"reflect"``: speechbrain's own), ``pretrained_lobe`` (e.g.
      ``speechbrain/spkrec-ecapa-voxceleb``).
    * ``threshold``: cosine score above which two utterances are the same speaker, set to the EER
      threshold measured when the model was evaluated.
    """

    model_type = "dramaturg-speaker"

    architecture: str = "ecapa"
    sample_rate: int = 16000
    embedding_dim: int | None = None
    pooling: str | None = None
    backbone: dict[str, Any] | None = None
    pretrained_backbone: str = ""
    freeze_feature_encoder: bool = True
    normalize_waveform: bool = True
    layerdrop: float | None = None
    hidden_dropout: float | None = None
    attention_dropout: float | None = None
    activation_dropout: float | None = None
    feat_proj_dropout: float | None = None
    mask_time_prob: float | None = None
    n_mels: int = 40
    f_min: float = 0.0
    f_max: float | None = None
    lobe: dict[str, Any] | None = None
    mean_norm: bool = True
    std_norm: bool = False
    conv_padding: str = "zeros"
    pretrained_lobe: str = ""
    threshold: float = 0.5

    def __post_init__(self, **kwargs: Any) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r}: expected one of {', '.join(ARCHITECTURES)}"
            )
        if self.embedding_dim is None:
            self.embedding_dim = DEFAULT_EMBEDDING_DIM[self.architecture]
        if self.architecture == "wav2vec2":
            self.pooling = self.pooling or "mean+std"
            if self.pooling not in POOLINGS:
                raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
            backbone = dict(TINY_WAV2VEC2 if self.backbone is None else self.backbone)
            for key in BACKBONE_SWITCHES:
                value = getattr(self, key)
                if value is not None:
                    backbone[key] = float(value)
            self.backbone = backbone
        else:
            fixed = LOBE_POOLING[self.architecture]
            if self.pooling not in (None, fixed):
                raise ValueError(
                    f"pooling {self.pooling!r}: the speechbrain {self.architecture} lobe pools "
                    f"with {fixed} statistics of its own; only wav2vec2 takes a pooling choice"
                )
            self.pooling = fixed
            if self.embedding_dim <= 0:
                raise ValueError("embedding_dim must be positive for the speechbrain lobes")
            self.lobe = dict(TINY_LOBES[self.architecture] if self.lobe is None else self.lobe)
            if self.conv_padding not in ("zeros", "reflect"):
                raise ValueError(f"conv_padding {self.conv_padding!r}: expected 'zeros' or 'reflect'")
        super().__post_init__(**kwargs)


# ------------------------------------------------------------------------------------------ helpers


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool mask, True on real frames or samples."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def relative_lengths(frames: torch.Tensor, max_len: int) -> torch.Tensor:
    """speechbrain's relative lengths, nudged a quarter frame below the true length.

    speechbrain turns them back into frame counts three different ways (``round``, ``arange <``
    with and without an epsilon); ``(n - 0.25) / T`` gives exactly ``n`` frames under all three,
    where ``n / T`` sometimes counts one padded frame in after float rounding.
    """
    return (frames.float() - 0.25) / float(max_len)


class DeterministicStatisticsPooling(StatisticsPooling):
    """speechbrain's statistics pooling without its noise outside training.

    speechbrain adds up to 9e-5 of random noise to the mean on every call, training or not, which
    makes two calls on the same audio disagree; the noise stays for training, where it was meant.
    """

    def _get_gauss_noise(
        self, shape_of_tensor: torch.Size, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        if self.training:
            return super()._get_gauss_noise(shape_of_tensor, device=device)
        return torch.zeros(shape_of_tensor, device=device)


def _zero_padded_frames(module: SbConv1d, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: zero the padded frames of a convolution's input (see the module docstring)."""
    mask = _FRAME_MASK.get()
    if mask is None or not args:
        return None
    x = args[0]
    time_axis = x.ndim - 1 if module.skip_transpose else 1  # speechbrain: (B, T, C) unless skip_transpose
    if x.ndim != 3 or x.shape[time_axis] != mask.shape[1]:
        return None  # e.g. the final 1×1 convolution on pooled statistics
    shaped = mask[:, :, None] if time_axis == 1 else mask[:, None, :]
    return (x * shaped.to(x.dtype), *args[1:])


class FramePooling(nn.Module):
    """Pool wav2vec2 frames (B, T, H) with a frame mask into one vector per utterance.

    ``random`` picks a random real frame while training and the middle one otherwise, so that a
    served embedding does not change from call to call.
    """

    def __init__(self, kind: str, hidden_size: int) -> None:
        super().__init__()
        self.kind = kind
        if kind in ("mean", "mean+std"):
            self.stats = DeterministicStatisticsPooling(return_mean=True, return_std=kind == "mean+std")
        if kind == "attentive":
            self.attentive = AttentiveStatisticsPooling(hidden_size, attention_channels=min(128, hidden_size))
        self.output_size = hidden_size * {"mean+std": 2, "attentive": 2, "quantile": 5}.get(kind, 1)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = mask.sum(dim=1)
        rel = relative_lengths(n, frames.shape[1])
        batch = torch.arange(frames.shape[0], device=frames.device)
        if self.kind in ("mean", "mean+std"):
            return self.stats(frames, lengths=rel).squeeze(1)
        if self.kind == "attentive":
            return self.attentive(frames.transpose(1, 2), lengths=rel).squeeze(-1)
        if self.kind == "quantile":
            masked = frames.masked_fill(~mask[:, :, None], float("nan"))
            levels = torch.tensor(QUANTILES, dtype=frames.dtype, device=frames.device)
            q = torch.nanquantile(masked, levels, dim=1)  # (5, B, H)
            return q.transpose(0, 1).flatten(1)
        if self.kind == "max":
            return frames.masked_fill(~mask[:, :, None], float("-inf")).amax(dim=1)
        if self.kind in ("first", "first+cls"):
            return frames[:, 0]
        if self.kind == "last":
            return frames[batch, n - 1]
        if self.kind == "random" and self.training:
            pick = (torch.rand(n.shape, device=n.device) * n).long().clamp(max=frames.shape[1] - 1)
            return frames[batch, pick]
        return frames[batch, (n - 1) // 2]  # middle (and random outside training)


# ------------------------------------------------------------------------------------------- model


class SpeakerEncoder(PreTrainedModel):
    """Waveforms in, speaker embeddings out (see the module docstring)."""

    config_class = SpeakerEncoderConfig
    base_model_prefix = "speaker_encoder"
    main_input_name = "input_values"

    def __init__(self, config: SpeakerEncoderConfig) -> None:
        super().__init__(config)
        self.hop = round(config.sample_rate * HOP_MS / 1000)
        if config.architecture == "wav2vec2":
            backbone_config = Wav2Vec2Config(**config.backbone)
            self.backbone = Wav2Vec2Model(backbone_config)
            if config.freeze_feature_encoder:
                self.backbone.freeze_feature_encoder()
            hidden = backbone_config.hidden_size
            self.cls_token = nn.Parameter(torch.zeros(hidden)) if config.pooling == "first+cls" else None
            self.pooling = FramePooling(config.pooling, hidden)
            pooled = self.pooling.output_size
            self.projection = nn.Linear(pooled, config.embedding_dim) if config.embedding_dim > 0 else None
            self.frame_size = hidden
            self.embedding_size = config.embedding_dim or pooled
        else:
            self.fbank = Fbank(
                n_mels=config.n_mels, sample_rate=config.sample_rate, f_min=config.f_min, f_max=config.f_max
            )
            self.norm = InputNormalization(
                norm_type="sentence", mean_norm=config.mean_norm, std_norm=config.std_norm
            )
            lobe_kwargs = dict(config.lobe or {})
            if config.architecture == "ecapa":
                self.lobe = ECAPA_TDNN(
                    input_size=config.n_mels, lin_neurons=config.embedding_dim, **lobe_kwargs
                )
            else:
                self.lobe = Xvector(
                    in_channels=config.n_mels, lin_neurons=config.embedding_dim, **lobe_kwargs
                )
                for i, block in enumerate(self.lobe.blocks):
                    if type(block) is StatisticsPooling:
                        self.lobe.blocks[i] = DeterministicStatisticsPooling()
            if config.conv_padding == "zeros":
                for module in self.lobe.modules():
                    if isinstance(module, SbConv1d):
                        module.padding_mode = "constant"
                        module.register_forward_pre_hook(_zero_padded_frames)
            self.cls_token = None
            self.frame_size = 0
            self.embedding_size = config.embedding_dim
        self.post_init()

    @classmethod
    def get_init_context(cls, *args: Any, **kwargs: Any) -> list[Any]:
        """transformers' init contexts without the meta device.

        ``from_pretrained`` builds models on the meta device and fills them from the checkpoint, but
        speechbrain's feature modules keep constants (STFT window, mel filters) as plain tensor
        attributes computed in ``__init__``, which the checkpoint does not carry: built on meta,
        they would stay empty. Building on the CPU costs a little time and nothing else.
        """
        contexts = super().get_init_context(*args, **kwargs)
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only the CLS token is ours to initialise.

        The wav2vec2 backbone initialises itself (transformers dispatches to its own ``_init_weights``);
        speechbrain's lobes and the projection keep torch's default initialisation, which is what
        their recipes train from.
        """
        if module is self and self.cls_token is not None:
            hf_init.normal_(self.cls_token, mean=0.0, std=0.02)

    # ---------------------------------------------------------------------------------- properties

    @property
    def padding_invariant(self) -> bool:
        """Whether a zero-padded batch gives exactly the one-by-one embeddings (see module docstring)."""
        if self.config.architecture == "wav2vec2":
            return self.backbone.config.feat_extract_norm == "layer"
        return self.config.conv_padding == "zeros"

    # ------------------------------------------------------------------------------------- forward

    def _lengths(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None, lengths: torch.Tensor | None
    ) -> torch.Tensor:
        if lengths is not None:
            return lengths.to(device=input_values.device, dtype=torch.long)
        if attention_mask is not None:
            return attention_mask.to(input_values.device).long().sum(dim=1)
        return torch.full(
            (input_values.shape[0],), input_values.shape[1], dtype=torch.long, device=input_values.device
        )

    def frames(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wav2vec2 frame states (B, T, H) and their mask (B, T), CLS excluded: what the CTC head reads."""
        if self.config.architecture != "wav2vec2":
            raise ValueError(f"frame-level outputs exist for wav2vec2 only, not {self.config.architecture}")
        frames, mask = self._wav2vec2_frames(
            input_values, self._lengths(input_values, attention_mask, lengths)
        )
        if self.cls_token is not None:
            return frames[:, 1:], mask[:, 1:]
        return frames, mask

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings (B, embedding_size), not normalised (the heads decide what they need).

        ``input_values`` is (B, samples) at ``config.sample_rate``; padding is described either by
        ``attention_mask`` (B, samples) or by ``lengths`` (B,) in samples.
        """
        lengths = self._lengths(input_values, attention_mask, lengths)
        if self.config.architecture == "wav2vec2":
            frames, mask = self._wav2vec2_frames(input_values, lengths)
            pooled = self.pooling(frames, mask)
            return self.projection(pooled) if self.projection is not None else pooled
        return self._lobe_embeddings(input_values, lengths)

    def _wav2vec2_frames(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wav2Vec2Model.forward, step by step, so a CLS token can be put in front of the encoder."""
        backbone = self.backbone
        sample_mask = lengths_to_mask(lengths, wav.shape[1])
        full = bool((lengths == wav.shape[1]).all())
        if self.config.normalize_waveform:  # what Wav2Vec2FeatureExtractor(do_normalize=True) does
            m = sample_mask.to(wav.dtype)
            count = m.sum(dim=1, keepdim=True).clamp(min=1)
            mean = (wav * m).sum(dim=1, keepdim=True) / count
            var = (((wav - mean) * m) ** 2).sum(dim=1, keepdim=True) / count
            wav = (wav - mean) / torch.sqrt(var + 1e-7) * m
        extract = backbone.feature_extractor(wav).transpose(1, 2)
        if full:
            frame_mask = torch.ones(extract.shape[:2], dtype=torch.bool, device=wav.device)
        else:
            frame_mask = backbone._get_feature_vector_attention_mask(extract.shape[1], sample_mask.long())
        hidden, _ = backbone.feature_projection(extract)
        hidden = backbone._mask_hidden_states(hidden, attention_mask=None if full else frame_mask)
        if self.cls_token is not None:
            cls = self.cls_token.to(hidden.dtype).expand(hidden.shape[0], 1, -1)
            hidden = torch.cat([cls, hidden], dim=1)
            frame_mask = torch.cat([torch.ones_like(frame_mask[:, :1]), frame_mask], dim=1)
        encoded = backbone.encoder(hidden, attention_mask=None if full else frame_mask)
        return encoded.last_hidden_state, frame_mask

    def _lobe_embeddings(self, wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        wav = wav * lengths_to_mask(lengths, wav.shape[1]).to(wav.dtype)  # padding must be silence
        feats = self.fbank(wav)  # (B, T, n_mels); zero-padded STFT frames match a lone utterance's
        n_frames = torch.clamp(1 + lengths // self.hop, max=feats.shape[1])
        rel = relative_lengths(n_frames, feats.shape[1])
        feats = self.norm(feats, lengths=rel)
        token = _FRAME_MASK.set(lengths_to_mask(n_frames, feats.shape[1]))
        try:
            out = self.lobe(feats, rel)
        finally:
            _FRAME_MASK.reset(token)
        return out.squeeze(1)

    # --------------------------------------------------------------------------------------- serve

    @torch.no_grad()
    def embed(self, waveforms: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """L2-normalised float32 embeddings (n, d) of mono waveforms at ``config.sample_rate``.

        Utterances are sorted by length and padded into batches; a model that cannot be batched
        exactly (see :attr:`padding_invariant`) is batched only among utterances of equal length.
        """
        arrays = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waveforms]
        out = np.zeros((len(arrays), self.embedding_size), dtype=np.float32)
        if not arrays:
            return out
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(arrays)), key=lambda i: -len(arrays[i]))
        batches: list[list[int]] = []
        for i in order:
            if (
                batches
                and len(batches[-1]) < batch_size
                and (self.padding_invariant or len(arrays[batches[-1][0]]) == len(arrays[i]))
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        try:
            for batch in batches:
                longest = len(arrays[batch[0]])
                padded = np.zeros((len(batch), longest), dtype=np.float32)
                for row, i in enumerate(batch):
                    padded[row, : len(arrays[i])] = arrays[i]
                lengths = torch.tensor([len(arrays[i]) for i in batch], device=device)
                vectors = F.normalize(
                    self(torch.from_numpy(padded).to(device), lengths=lengths).float(), dim=-1
                )
                out[batch] = vectors.cpu().numpy()
        finally:
            self.train(was_training)
        return out


AutoConfig.register(SpeakerEncoderConfig.model_type, SpeakerEncoderConfig, exist_ok=True)
AutoModel.register(SpeakerEncoderConfig, SpeakerEncoder, exist_ok=True)


# ---------------------------------------------------------------------------------------- building


def build_encoder(
    config: SpeakerEncoderConfig | Mapping[str, Any],
    *,
    reset_weights: bool = False,
    cache_dir: str | Path | None = None,
) -> SpeakerEncoder:
    """A trainable encoder, with pretrained weights where the config names them.

    * ``pretrained_backbone`` (wav2vec2): ``Wav2Vec2Model.from_pretrained`` — its config becomes
      ``config.backbone`` (the ablation switches still apply) and its weights are copied in, unless
      ``reset_weights`` (that paper's "no pretrained weights" ablation: same architecture, fresh init).
    * ``pretrained_lobe`` (ecapa/xvector): speechbrain's ``EncoderClassifier.from_hparams`` (for
      example ``speechbrain/spkrec-ecapa-voxceleb``); its ``embedding_model`` weights are loaded into
      the lobe, whose config (``n_mels``, ``lobe``, ``embedding_dim``) must match the checkpoint's.
      This needs the hub (or a local copy) and could not be exercised in this repository's tests.
    """
    if not isinstance(config, SpeakerEncoderConfig):
        config = SpeakerEncoderConfig(**dict(config))
    pretrained: Wav2Vec2Model | None = None
    if config.architecture == "wav2vec2" and config.pretrained_backbone:
        pretrained = Wav2Vec2Model.from_pretrained(config.pretrained_backbone, cache_dir=cache_dir)
        backbone = pretrained.config.to_dict()
        backbone = {k: v for k, v in backbone.items() if k in Wav2Vec2Config.__dataclass_fields__}
        config = SpeakerEncoderConfig(**{**config.to_dict(), "backbone": backbone})
    encoder = SpeakerEncoder(config)
    if pretrained is not None and not reset_weights:
        missing, unexpected = encoder.backbone.load_state_dict(pretrained.state_dict(), strict=False)
        if missing or unexpected:
            log.warning("backbone weights: missing %s, unexpected %s", missing, unexpected)
        log.info("wav2vec2 backbone weights from %s", config.pretrained_backbone)
    if config.architecture != "wav2vec2" and config.pretrained_lobe and not reset_weights:
        load_speechbrain_lobe(encoder, config.pretrained_lobe, cache_dir=cache_dir)
    return encoder


def load_speechbrain_lobe(encoder: SpeakerEncoder, source: str, cache_dir: str | Path | None = None) -> None:
    """Copy a speechbrain speaker model's ``embedding_model`` weights into ``encoder.lobe``.

    speechbrain's own loader resolves the hub or a local folder and its hyperparams.yaml; the
    weights then load into the same speechbrain class (ECAPA_TDNN / Xvector), so keys match.
    """
    from speechbrain.inference.speaker import EncoderClassifier

    cache = Path(cache_dir or Path.home() / ".cache" / "dramaturg" / "speechbrain")
    savedir = cache / re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))
    classifier = EncoderClassifier.from_hparams(
        source=source, savedir=str(savedir), run_opts={"device": "cpu"}
    )
    state = classifier.mods["embedding_model"].state_dict()
    hint = "its embedding model does not match config.lobe / n_mels / embedding_dim"
    try:
        missing, unexpected = encoder.lobe.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{source}: {hint}: {str(err)[:300]}") from err
    if missing or unexpected:
        raise ValueError(f"{source}: {hint} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    log.info("%s lobe weights from %s", encoder.config.architecture, source)
