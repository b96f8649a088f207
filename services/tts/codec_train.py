"""Recipe ``codec``: train the Mimi-layout codec from scratch on the corpus audio.

transformers' ``MimiModel`` is an inference implementation. Its residual vector quantisers keep
Mimi's EMA codebooks as buffers (``embed_sum``, ``cluster_usage``: a centroid is their ratio) but
nothing in it updates them — ``quantize`` is an ``argmin`` and ``decode`` an embedding lookup in a
buffer, in training mode as in eval mode — and no gradient crosses the quantiser, so the encoder
would never learn from the reconstruction either. This module adds the training half, the smallest
honest version of what moshi (Mimi's own training code) and EnCodec do, on the very same modules
and buffers (the codec keeps Mimi's convolution layout and saves with ``save_pretrained`` as before):

* **straight-through quantisation**: each codebook of each residual quantiser quantises what the
  previous ones left; the decoder receives ``z + (quantised - z).detach()``, so the reconstruction
  loss trains the encoder through the quantiser (EnCodec's RVQ straight-through estimator);
* **commitment loss**: ``mse(residual, its centroid.detach())`` summed over codebooks pulls the
  encoder's latents towards the codes;
* **EMA codebooks**: every training step each centroid moves towards the mean of the latents it was
  chosen for — ``cluster_usage ← d·cluster_usage + (1-d)·counts``, ``embed_sum ← d·embed_sum +
  (1-d)·Σ latents`` (decay ``codec_ema_decay``) — which is exactly what Mimi's buffers hold;
* **k-means initialisation**: before the first step the codebooks are set by k-means on the
  untrained encoder's latents (each residual level on what the previous levels leave), as moshi
  initialises them from data rather than from noise;
* **dead-code replacement**: a code whose usage falls below ``codec_dead_code_ratio`` × the mean
  usage is moved onto a random latent of the batch, so the whole codebook stays in use.

Not reproduced: Mimi's semantic distillation (its first codebook is trained to match WavLM; here the
semantic and acoustic quantisers both just quantise the latent), its adversarial and feature-matching
losses (a discriminator is a second model with its own optimiser), and quantiser dropout.

The loss is auraloss' multi-resolution STFT loss (spectral convergence + log magnitude over several
FFT sizes) plus ``codec_commitment_weight`` × commitment plus ``codec_l1_weight`` × waveform L1, on
random crops of whole frames.

**Two settings that decide whether the codec hears anything** (measured 2026-12-06 on the learning
check's corpus; ``codec/val_level_corr`` below is the check): with auraloss' default log floor (``eps``
1e-8 on the power) the band above 8 kHz — empty in 16-kHz speech resampled to the codec's 24 kHz —
dominates the log-magnitude term, and even an autoencoder without a quantiser settles on one stationary
sound for every input (held-out level-contour correlation ≈ 0 after 1,600 steps); ``codec_stft_eps``
1e-3 fixes that (0.82 after 400). With the quantiser, any commitment weight tried (1, 0.1, 0.01)
collapsed it again, and so did a learning rate of 1e-3 or an untamed random decoder: the defaults are no
commitment (the EMA codebooks follow the latents anyway), ``codec_lr`` 3e-3 and the decoder's last
convolution scaled down as :func:`~.model.build_tiny_tts_model` does.

It runs under ``transformers.Trainer`` with the shared bridge like the LM recipes (the training module
is a plain ``nn.Module`` returning ``{"loss": ...}``; the EMA updates happen inside its forward, under
``no_grad``, and travel in the Trainer's checkpoint as buffers), so progress, metrics, cancel,
checkpoints and resume are the same. Every ``codec_eval_every`` steps the codec encodes and decodes the
held-out clips through its own inference path (``encode`` → codes → ``decode``): ``codec/val_stft`` is
their STFT loss, with the waveform L1, SNR, the share of codes in use and ``codec/val_level_corr``
(:func:`level_envelope_correlation`) and ``codec/val_voicing`` (:func:`voiced_frames`); the checkpoint
with the lowest ``codec/val_stft`` is published
(``architecture: mimi``; ``MimiModel.from_pretrained`` reads it), for the LM recipes' ``codec:`` key.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dramaturg.shared.store import atomic_write_json
from dramaturg.shared.training import RunContext
from torch import nn
from torch.nn import functional as F

from .bridge import (
    CODEC_HELDOUT,
    CODEC_LOG_NAMES,
    StageBridge,
    choose_checkpoint,
    device_of,
    log_checkpoint_table,
    set_threads,
    stage_checkpoints,
    training_arguments,
)
from .collate import heldout_texts, normalise_text
from .dataset import Pair
from .prepare import PreparedAudio, prepare_audio

CODEC_STAGE = "codec"
CODEC_DONE = "codec/done.json"  # the finished codec of a run (a resumed run skips the stage)


# ============================================================================== quantiser training


def _codebooks(codec: Any) -> list[Any]:
    return [m for m in codec.quantizer.modules() if hasattr(m, "embed_sum") and hasattr(m, "cluster_usage")]


def clear_codebook_caches(codec: Any) -> None:
    """Mimi caches each codebook's centroids on first use (``_embed``): drop them after the buffers change."""
    for codebook in _codebooks(codec):
        codebook._embed = None


def _centroids(codebook: Any) -> torch.Tensor:
    return codebook.embed_sum / codebook.cluster_usage.clamp(min=codebook.epsilon)[:, None]


@torch.no_grad()
def kmeans(vectors: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means (``k`` centroids of ``vectors (N, D)``); empty clusters take a random vector."""
    vectors = vectors.float()
    n = vectors.shape[0]
    pick = (
        torch.randint(n, (k,), generator=generator) if n < k else torch.randperm(n, generator=generator)[:k]
    )
    centroids = vectors[pick].clone()
    for _ in range(max(1, iters)):
        assign = torch.cdist(vectors, centroids).argmin(dim=-1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            centroids[empty] = vectors[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centroids


def _residual_quantisers(codec: Any) -> list[Any]:
    q = codec.quantizer
    return [q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer]


@torch.no_grad()
def kmeans_init(codec: Any, latents: torch.Tensor, iters: int, seed: int) -> None:
    """Set every codebook by k-means on ``latents (B, H, F)``, level by level on the residuals."""
    generator = torch.Generator().manual_seed(seed)
    for rvq in _residual_quantisers(codec):
        z = rvq.input_proj(latents) if rvq.input_proj is not None else latents
        residual = z.permute(0, 2, 1).reshape(-1, z.shape[1]).float()
        for layer in rvq.layers:
            codebook = layer.codebook
            centroids = kmeans(residual, int(codebook.codebook_size), iters, generator)
            codebook.cluster_usage.fill_(1.0)
            codebook.embed_sum.copy_(centroids.to(codebook.embed_sum))
            codebook._embed = None
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=-1)]


class QuantiserTrainer(nn.Module):
    """The straight-through RVQ forward with EMA codebook updates (see the module docstring)."""

    def __init__(self, decay: float = 0.99, dead_code_ratio: float = 0.1) -> None:
        super().__init__()
        self.decay = float(decay)
        self.dead_code_ratio = float(dead_code_ratio)

    @torch.no_grad()
    def _ema(self, codebook: Any, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        size = int(codebook.codebook_size)
        counts = torch.bincount(codes, minlength=size).to(codebook.cluster_usage)
        sums = torch.zeros_like(codebook.embed_sum).index_add_(0, codes, vectors.to(codebook.embed_sum))
        codebook.cluster_usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        codebook.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.dead_code_ratio > 0:
            threshold = self.dead_code_ratio * codebook.cluster_usage.sum() / size
            dead = codebook.cluster_usage < threshold
            n_dead = int(dead.sum())
            if n_dead:
                fresh = vectors[torch.randint(vectors.shape[0], (n_dead,), device=vectors.device)]
                codebook.cluster_usage[dead] = threshold
                codebook.embed_sum[dead] = fresh.to(codebook.embed_sum) * threshold
        codebook._embed = None

    def quantise(
        self, rvq: Any, latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """One residual quantiser: (output for the decoder, commitment loss, codes per level)."""
        z = rvq.input_proj(latents) if rvq.input_proj is not None else latents  # (B, D, F)
        batch, dim, frames = z.shape
        residual = z
        quantised = torch.zeros_like(z)
        commitment = z.new_zeros(())
        all_codes = []
        for layer in rvq.layers:
            codebook = layer.codebook
            flat = residual.permute(0, 2, 1).reshape(-1, dim)
            centroids = _centroids(codebook).to(flat.dtype)
            codes = torch.cdist(flat.detach().float(), centroids.float()).argmin(dim=-1)
            chosen = centroids[codes]
            commitment = commitment + F.mse_loss(flat, chosen.detach())
            if self.training:
                self._ema(codebook, flat.detach().float(), codes)
            chosen = chosen.detach().view(batch, frames, dim).permute(0, 2, 1)
            residual = residual - chosen
            quantised = quantised + chosen
            all_codes.append(codes)
        out = z + (quantised - z).detach()  # straight through the whole RVQ (EnCodec's fix)
        if rvq.output_proj is not None:
            out = rvq.output_proj(out)
        return out, commitment, all_codes

    def forward(
        self, codec: Any, latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Mimi's split RVQ: the semantic and the acoustic quantiser each quantise the latents; the
        decoder gets the sum of their outputs (as ``MimiSplitResidualVectorQuantizer.decode``)."""
        outs, commitment, codes = [], latents.new_zeros(()), []
        for rvq in _residual_quantisers(codec):
            out, commit, level_codes = self.quantise(rvq, latents)
            outs.append(out)
            commitment = commitment + commit
            codes.extend(level_codes)
        return outs[0] + outs[1], commitment, codes


class CodecTrainingModule(nn.Module):
    """What the Trainer trains: crops → encoder → straight-through RVQ → decoder → the losses."""

    def __init__(self, codec: Any, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        from auraloss.freq import MultiResolutionSTFTLoss

        self.codec = codec
        self.quantiser = QuantiserTrainer(float(cfg["codec_ema_decay"]), float(cfg["codec_dead_code_ratio"]))
        ffts = [int(n) for n in cfg["codec_fft_sizes"]]
        self.stft = MultiResolutionSTFTLoss(
            fft_sizes=ffts, hop_sizes=[n // 4 for n in ffts], win_lengths=ffts,
            eps=float(cfg["codec_stft_eps"]),
        )
        self.commitment_weight = float(cfg["codec_commitment_weight"])
        self.l1_weight = float(cfg["codec_l1_weight"])
        self._sums: dict[str, float] = {}
        self._count = 0

    def forward(self, input_values: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        latents = self.codec.encoder(input_values).latents
        quantised, commitment, codes = self.quantiser(self.codec, latents)
        audio = self.codec.decoder(quantised).audio_values[..., : input_values.shape[-1]]
        stft = self.stft(audio, input_values)
        l1 = (audio - input_values).abs().mean()
        loss = stft + self.commitment_weight * commitment + self.l1_weight * l1
        if self.training:
            used = np.mean([len(torch.unique(c)) / self.codec.config.codebook_size for c in codes])
            for key, value in (
                ("codec/stft", float(stft.detach())),
                ("codec/commitment", float(commitment.detach())),
                ("codec/l1", float(l1.detach())),
                ("codec/codes_used_batch", float(used)),
            ):
                self._sums[key] = self._sums.get(key, 0.0) + value
            self._count += 1
        return {"loss": loss}

    def pop_averages(self) -> dict[str, float]:
        """The loss terms averaged since the last call (logged beside the Trainer's loss)."""
        out = {k: v / max(1, self._count) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


# ======================================================================================= the data


def load_clip(path: Path, rate: int) -> np.ndarray:
    import soundfile as sf
    from dramaturg.shared.audio import Audio, resample

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(Audio(data.mean(axis=1), int(sr)), rate).samples.astype(np.float32)


class CropDataset(torch.utils.data.Dataset):
    """Random crops of ``frames`` whole codec frames from clips held in memory (zero-padded when short).

    ``length`` items an epoch (the Trainer runs by steps; what matters is that crops are random).
    """

    def __init__(self, clips: Sequence[np.ndarray], samples: int, length: int) -> None:
        self.clips = [torch.from_numpy(c) for c in clips if len(c)]
        self.samples = int(samples)
        self.length = max(1, int(length))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip = self.clips[int(torch.randint(len(self.clips), ()))]
        out = torch.zeros(1, self.samples)
        if len(clip) > self.samples:
            start = int(torch.randint(len(clip) - self.samples + 1, ()))
            out[0] = clip[start : start + self.samples]
        else:
            out[0, : len(clip)] = clip
        return {"input_values": out}


def collate_crops(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"input_values": torch.stack([item["input_values"] for item in items])}


def split_pairs(pairs: Sequence[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """The LM recipes' text-disjoint split, for clips."""
    held = heldout_texts((p.text for p in pairs), fraction)
    train = [p for p in pairs if normalise_text(p.text) not in held]
    heldout = [p for p in pairs if normalise_text(p.text) in held]
    return train, heldout


# =================================================================================== evaluation


@torch.no_grad()
def evaluate_codec(codec: Any, clips: Sequence[np.ndarray], stft: Any) -> dict[str, float]:
    """Reconstruction through the codec's own inference path (codes in between), per clip, averaged."""
    if not clips:
        return {}
    was_training = codec.training
    codec.eval()
    clear_codebook_caches(codec)
    hop = round(codec.config.sampling_rate / codec.config.frame_rate)
    device = next(codec.parameters()).device
    rate = int(codec.config.sampling_rate)
    stfts, l1s, snrs, follows = [], [], [], []
    voiced = np.zeros(2)  # voiced frames of the output, of the input
    used: list[set[int]] = []
    for clip in clips:
        n = len(clip)
        padded = torch.zeros(1, 1, math.ceil(n / hop) * hop, device=device)
        padded[0, 0, :n] = torch.from_numpy(clip).to(device)
        codes = codec.encode(padded).audio_codes
        audio = codec.decode(codes).audio_values[..., :n]
        target = padded[..., :n]
        stfts.append(float(stft(audio, target)))
        l1s.append(float((audio - target).abs().mean()))
        noise = float((audio - target).pow(2).sum())
        snrs.append(10 * math.log10(float(target.pow(2).sum()) / max(noise, 1e-12)))
        follows.append(level_envelope_correlation(audio[0, 0].cpu().numpy(), clip, rate=rate))
        voiced += voiced_frames(audio[0, 0].cpu().numpy(), clip, rate=rate)
        for level in range(codes.shape[1]):
            if len(used) <= level:
                used.append(set())
            used[level].update(codes[0, level].tolist())
    codec.train(was_training)
    clear_codebook_caches(codec)
    size = int(codec.config.codebook_size)
    return {
        "codec/val_stft": float(np.mean(stfts)),
        "codec/val_l1": float(np.mean(l1s)),
        "codec/val_snr_db": float(np.mean(snrs)),
        "codec/val_codes_used": float(np.mean([len(u) / size for u in used])),
        "codec/val_level_corr": float(np.nanmean(follows)) if not np.all(np.isnan(follows)) else math.nan,
        "codec/val_voicing": float(voiced[0] / voiced[1]) if voiced[1] else math.nan,
    }


def level_envelope_correlation(
    audio: np.ndarray, reference: np.ndarray, *, rate: int, frame_s: float = 0.02
) -> float:
    """Pearson correlation of the two clips' level contours (dB per 20-ms frame, floored at -80 dB).

    A health figure independent of the loss: a codec that answers one stationary sound whatever it
    hears (what the tiny codec did with auraloss' default log floor, or with a commitment loss) can
    still lower the STFT loss by matching the average spectrum, but its level contour does not follow
    the speech (≈ 0); a codec that carries the syllables follows it (≈ 0.8 and up). NaN when either
    contour is flat."""
    from dramaturg.shared.data.prosody import frame_rms_db

    size = max(1, int(frame_s * rate))
    n = min(len(audio), len(reference)) // size * size
    if n < 2 * size:
        return math.nan

    def contour(x: np.ndarray) -> np.ndarray:
        return np.maximum(frame_rms_db(x[:n], rate, window_s=size / rate, hop_s=size / rate), -80.0)

    a, b = contour(audio), contour(reference)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


VOICING_RATE = 16_000


def voiced_frames(audio: np.ndarray, reference: np.ndarray, *, rate: int) -> np.ndarray:
    """Frames with a pitch (YIN, ``shared.data.prosody.f0_track``) in ``audio`` and in ``reference``.

    Summed over clips, output / input is the codec's ``codec/val_voicing``: 1 when its speech is as
    voiced as what it heard, 0 when it whispers. A codec trained on spectral losses alone can follow
    the level and the spectral envelope (``level_envelope_correlation`` high) and still answer with
    noise where the speech had a pitch — and then neither a recogniser nor a speaker model hears the
    voice (the tiny codec's state, measured 2026-12-06: README)."""
    from dramaturg.shared.audio import Audio, resample
    from dramaturg.shared.data.prosody import f0_track

    def voiced(x: np.ndarray) -> int:  # at 16 kHz: a pitch needs no more, and YIN runs ~10x faster there
        wave = resample(Audio(np.asarray(x, dtype=np.float32), rate), VOICING_RATE).samples
        return int(np.isfinite(f0_track(np.asarray(wave, dtype=np.float64), VOICING_RATE)[1]).sum())

    return np.array([voiced(audio), voiced(reference)], dtype=np.float64)


# ====================================================================================== the recipe


def build_codec(cfg: Mapping[str, Any], base: Path | None = None) -> Any:
    """A codec to train: a published one to continue (``base``), else a new tiny Mimi from ``codec_model``."""
    from transformers import MimiModel

    from .model import tame_output_level, tiny_mimi_config

    if base is not None:
        return MimiModel.from_pretrained(str(base))
    torch.manual_seed(int(cfg["seed"]))
    codec = MimiModel(tiny_mimi_config(**dict(cfg["codec_model"])))
    tame_output_level(codec)  # as build_tiny_tts_model's codec: a random one's output is ~20x too loud
    return codec


def save_codec(codec: Any, folder: Path) -> None:
    """The codec as the LM recipes and ``MimiModel.from_pretrained`` read it, with its feature extractor."""
    from transformers import EncodecFeatureExtractor

    clear_codebook_caches(codec)
    codec.save_pretrained(str(folder))
    EncodecFeatureExtractor(
        feature_size=1, sampling_rate=int(codec.config.sampling_rate), padding_value=0.0
    ).save_pretrained(str(folder))


def train_codec(
    ctx: RunContext,
    cfg: Mapping[str, Any],
    audio: PreparedAudio,
    *,
    step_offset: int = 0,
    total_steps: int | None = None,
    base: Path | None = None,
) -> Path:
    """The codec stage: train, evaluate, checkpoint, resume; returns the folder of the chosen codec.

    A finished stage leaves ``codec/done.json`` and the chosen codec in ``codec/final`` in the run
    folder; a resumed run returns it at once.
    """
    from dramaturg.shared.training.hf_bridge import attach, resume_path
    from transformers import Trainer

    done = ctx.run_dir / CODEC_DONE
    final = ctx.run_dir / "codec" / "final"
    if done.exists() and final.is_dir():
        ctx.log(f"codec: already trained in this run ({json.loads(done.read_text())['checkpoint']})")
        return final
    set_threads(cfg)
    previous = stage_checkpoints(ctx, CODEC_STAGE)
    resume = previous[-1] if previous else None
    codec = build_codec(cfg, base=resume.path if resume is not None else base)
    rate = int(codec.config.sampling_rate)
    hop = round(rate / codec.config.frame_rate)
    train_pairs, held_pairs = split_pairs(audio.pairs, float(cfg["heldout_fraction"]))
    if not train_pairs:
        train_pairs = list(audio.pairs)
    held_pairs = held_pairs[: max(0, int(cfg["codec_eval_clips"]))]
    train_clips = [load_clip(p.audio, rate) for p in train_pairs]
    held_clips = [load_clip(p.audio, rate) for p in held_pairs]
    max_steps = int(cfg["codec_max_steps"])
    batch = int(cfg["codec_batch_size"])
    crop = int(cfg["codec_crop_frames"]) * hop
    module = CodecTrainingModule(codec, cfg)
    device = device_of(cfg)
    module.to(device)
    ctx.log(
        f"codec: Mimi layout, {sum(p.numel() for p in codec.parameters()):,} parameters, "
        f"{codec.config.num_quantizers} codebooks of {codec.config.codebook_size}, "
        f"{len(train_clips)} training clips, {len(held_clips)} held-out clips, {max_steps} steps of "
        f"{batch} × {crop / rate:.2f} s on {device}"
    )
    if resume is None and base is None and int(cfg["codec_kmeans_iters"]) > 0:
        init = CropDataset(train_clips, crop, 1)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(int(cfg["seed"]))
        crops = torch.stack([init[0]["input_values"] for _ in range(int(cfg["codec_kmeans_crops"]))])
        torch.random.set_rng_state(generator_state)
        with torch.no_grad():
            latents = codec.encoder(crops.to(device)).latents
        kmeans_init(codec, latents, int(cfg["codec_kmeans_iters"]), int(cfg["seed"]))
        ctx.log(f"codec: codebooks initialised by k-means on {latents.shape[0] * latents.shape[-1]} latents")
    args = training_arguments(
        ctx.run_dir / "hf-trainer-codec",
        batch_size=batch,
        max_steps=max_steps,
        lr=float(cfg["codec_lr"]),
        schedule=str(cfg["codec_schedule"]),
        warmup=float(cfg["warmup"]),
        weight_decay=0.0,
        max_grad_norm=float(cfg["max_grad_norm"]),
        log_every=int(cfg["log_every"]),
        seed=int(cfg["seed"]),
        device=device,
    )

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        return evaluate_codec(codec, held_clips, module.stft)

    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        save_codec(codec, folder)

    bridge = StageBridge(
        ctx,
        stage=CODEC_STAGE,
        evaluate=evaluate if held_clips else None,
        eval_every=int(cfg["codec_eval_every"]),
        write_artifact=write,
        step_offset=step_offset,
        total_steps=total_steps or max_steps,
        extra_logs=module.pop_averages,
        monitor=CODEC_HELDOUT,
        log_names=CODEC_LOG_NAMES,
    )
    trainer = attach(
        Trainer(
            model=module,
            args=args,
            train_dataset=CropDataset(train_clips, crop, batch * max_steps),
            data_collator=collate_crops,
        ),
        bridge,
    )
    if resume is not None:
        ctx.log(f"codec: resuming from {resume.checkpoint_id}")
    elif held_clips and cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)
    trainer.train(resume_from_checkpoint=resume_path(resume.path) if resume is not None else None)
    clear_codebook_caches(codec)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    if ctx.cancelled():
        return final
    kept = stage_checkpoints(ctx, CODEC_STAGE)
    chosen = choose_checkpoint(kept, CODEC_HELDOUT, float(cfg["select_tolerance"]))
    log_checkpoint_table(ctx, kept, chosen, "codec")
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(chosen.path, final, ignore=shutil.ignore_patterns("trainer_state", "checkpoint.json"))
    atomic_write_json(
        done, {"checkpoint": chosen.checkpoint_id, "step": chosen.step, "metrics": chosen.metrics}
    )
    return final


def run_codec(ctx: RunContext) -> None:
    """Recipe ``codec``: prepare the audio, train the codec, publish the chosen checkpoint."""
    cfg = ctx.config
    audio = prepare_audio(ctx, cfg)
    final = train_codec(ctx, cfg, audio, base=ctx.base_model_path)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    chosen = json.loads((ctx.run_dir / CODEC_DONE).read_text())
    record = ctx.publish(
        final,
        chosen["metrics"],
        architecture="mimi",
        labels={"kind": "codec", "checkpoint_id": chosen["checkpoint"], "step": str(chosen["step"])},
    )
    ctx.log(
        f"published codec {record.ref} (step {chosen['step']}, held-out STFT loss "
        f"{chosen['metrics'].get('codec/val_stft', math.nan):.4g}); the LM recipes take it as "
        f"codec: {record.ref}"
    )
