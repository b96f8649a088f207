"""Codec tokens for every clip of a fish-speech tree: ``clip.npy`` beside ``clip.wav``.

This is fish-speech's ``tools/vqgan/extract_vq.py`` step for a codec with Mimi's interface
(``encode(input_values, padding_mask) -> audio_codes (B, Q, T)``, e.g. ``transformers.MimiModel``):
clips are decoded, downmixed and resampled to the codec's rate in DataLoader workers, encoded in
batches, and each clip's codes are saved as an integer array of shape ``(num_codebooks, frames)``,
exactly what fish-speech's ``build_dataset.py`` (and :mod:`.shards`) read.

Three things fish-speech's script leaves to luck are guaranteed here:

* **Every clip gets exactly its own frames**, ``ceil(samples / hop)`` with ``hop = sampling_rate /
  frame_rate`` (1920 samples for Mimi at 24 kHz, 12.5 Hz). Each clip is zero-padded to a whole number
  of frames before it is batched, so a clip's codes do not depend on what it is batched with: for a
  causal codec such as Mimi, batched and one-by-one extraction give identical codes. (Encoding a clip
  alone *without* that padding gives the same frame count and the same codes except, possibly, the
  last, partial frame: Mimi pads a partial frame inside each convolution, not in the input.)
  A codec whose output length is not ``padded_samples / hop`` is refused, since the frame rate it was
  described with is then wrong and every later alignment would be too.
* **A killed run continues**: clips whose ``.npy`` exists are skipped, and every ``.npy`` is written
  to a hidden temporary file and renamed, so an existing ``.npy`` is always complete and a leftover
  temporary file (``.clip.npy.*.part``) is never mistaken for one.
* **A bad file is reported, not fatal**: an unreadable clip is listed in :class:`ExtractReport` and the
  rest of its batch is still encoded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from dramaturg.shared.audio import Audio, resample
from torch.utils.data import DataLoader, Dataset

from .dataset import DatasetReport, Issue, Pair, Reason, atomic_write, scan_dataset

__all__ = [
    "ClipDataset",
    "CodecGeometry",
    "ExtractReport",
    "codec_geometry",
    "extract_codes",
    "extract_tree",
    "npy_path",
]

logger = logging.getLogger(__name__)


def npy_path(audio: Path) -> Path:
    """Where a clip's codes go: beside it, same stem, as fish-speech's tools expect."""
    return Path(audio).with_suffix(".npy")


@dataclass(frozen=True)
class CodecGeometry:
    """The codec's input rate and how many input samples make one code frame."""

    sample_rate: int
    hop_length: int

    def frames(self, num_samples: int) -> int:
        """Code frames for a clip of ``num_samples`` at :attr:`sample_rate`: a partial frame counts."""
        return math.ceil(num_samples / self.hop_length)


def codec_geometry(
    codec: Any, sample_rate: int | None = None, hop_length: int | None = None
) -> CodecGeometry:
    """Read the rate and hop from a Mimi-style ``codec.config`` (``sampling_rate``, ``frame_rate``).

    Explicit arguments win, for codecs described some other way. The hop must be a whole number of
    samples: a fractional one means frames drift against the audio and no crop can be exact.
    """
    config = getattr(codec, "config", None)
    rate = sample_rate or getattr(config, "sampling_rate", None)
    if not rate:
        raise ValueError("cannot tell the codec's sampling rate: pass sample_rate=")
    if hop_length is None:
        frame_rate = getattr(config, "frame_rate", None)
        if not frame_rate:
            raise ValueError("cannot tell the codec's frame rate: pass hop_length=")
        hop = rate / frame_rate
        if abs(hop - round(hop)) > 1e-6:
            raise ValueError(f"hop {rate} / {frame_rate} = {hop} samples is not a whole number")
        hop_length = round(hop)
    return CodecGeometry(int(rate), int(hop_length))


@dataclass
class ExtractReport:
    """What one extraction run did: files written, found already done, and clips that failed."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[Issue] = field(default_factory=list)
    audio_seconds: float = 0.0
    elapsed_seconds: float = 0.0

    def summary(self) -> str:
        speed = self.audio_seconds / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0
        head = (
            f"extracted codes for {len(self.written)} clips ({self.audio_seconds / 60:.1f} min of audio, "
            f"{speed:.1f}x real time), {len(self.skipped)} already done, {len(self.failed)} failed"
        )
        return "\n".join([head, *(f"  {issue}" for issue in self.failed)])


class ClipDataset(Dataset):
    """Clips decoded to mono float32 at the codec's rate; runs in DataLoader workers.

    A clip that cannot be read yields its error message instead of raising, so one bad file does not
    kill a worker (and with it the whole run).
    """

    def __init__(self, paths: Sequence[Path], sample_rate: int) -> None:
        self.paths = list(paths)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        path = self.paths[index]
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
            if data.shape[0] == 0:
                raise ValueError("no samples")
            if not np.isfinite(data).all():
                raise ValueError("samples are not finite")
            mono = Audio(data.mean(axis=1), int(rate))
            wave = resample(mono, self.sample_rate).samples
        except Exception as exc:
            return index, None, f"{type(exc).__name__}: {exc}"
        return index, wave, ""


@dataclass
class _Batch:
    indices: list[int]
    input_values: torch.Tensor  # (B, 1, T), T a whole number of hops
    padding_mask: torch.Tensor  # (B, 1, T), True on real samples
    num_samples: list[int]
    errors: list[tuple[int, str]]


class _Collate:
    """Pads each clip to whole frames, then the batch to its longest clip (a picklable callable)."""

    def __init__(self, hop_length: int) -> None:
        self.hop_length = hop_length

    def __call__(self, items: list[tuple[int, np.ndarray | None, str]]) -> _Batch:
        good = [(i, w) for i, w, _ in items if w is not None]
        errors = [(i, e) for i, w, e in items if w is None]
        hop = self.hop_length
        longest = max((math.ceil(len(w) / hop) * hop for _, w in good), default=0)
        values = torch.zeros(len(good), 1, longest)
        mask = torch.zeros(len(good), 1, longest, dtype=torch.bool)
        for row, (_, wave) in enumerate(good):
            values[row, 0, : len(wave)] = torch.from_numpy(wave)
            mask[row, 0, : len(wave)] = True
        return _Batch([i for i, _ in good], values, mask, [len(w) for _, w in good], errors)


def _duration_us(path: Path) -> int:
    """A clip's length in microseconds from its header (0 when unreadable: the loader reports it)."""
    try:
        info = sf.info(str(path))
        return int(info.frames) * 1_000_000 // max(int(info.samplerate), 1)
    except Exception:
        return 0


def _device_and_dtype(codec: Any) -> tuple[torch.device, torch.dtype]:
    params = codec.parameters() if hasattr(codec, "parameters") else iter(())
    first = next(params, None)
    if first is None:
        return torch.device("cpu"), torch.float32
    return first.device, first.dtype if first.dtype.is_floating_point else torch.float32


@torch.inference_mode()
def extract_codes(
    codec: Any,
    clips: Iterable[Path | Pair],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    sample_rate: int | None = None,
    hop_length: int | None = None,
    num_quantizers: int | None = None,
    overwrite: bool = False,
    sort_by_length: bool = True,
    rank: int = 0,
    world_size: int = 1,
    log_every: int = 10,
) -> ExtractReport:
    """Encode every clip whose ``.npy`` is missing and write it beside the clip.

    ``clips`` are audio paths or :class:`~.dataset.Pair` objects. ``sort_by_length`` batches clips of
    similar length together, so little compute goes into padding (the codes do not depend on it).
    ``rank`` / ``world_size`` split the clips between processes (fish-speech's ``SLURM_PROCID`` /
    ``SLURM_NTASKS``); each process takes every ``world_size``-th of the clips still to do. The codec
    is switched to eval mode and fed on the device and dtype of its parameters.
    """
    started = time.monotonic()
    geometry = codec_geometry(codec, sample_rate, hop_length)
    report = ExtractReport()
    todo: list[Path] = []
    for clip in clips:
        path = clip.audio if isinstance(clip, Pair) else Path(clip)
        if not overwrite and npy_path(path).exists():
            report.skipped.append(path)
        else:
            todo.append(path)
    todo = todo[rank::world_size]
    if sort_by_length:
        todo.sort(key=_duration_us)
    logger.info(
        "extracting codes for %d clips (%d already done) at %d Hz, hop %d, batch %d, %d workers",
        len(todo),
        len(report.skipped),
        geometry.sample_rate,
        geometry.hop_length,
        batch_size,
        num_workers,
    )
    if not todo:
        report.elapsed_seconds = time.monotonic() - started
        return report

    if isinstance(codec, torch.nn.Module):
        codec.eval()
    device, dtype = _device_and_dtype(codec)
    loader = DataLoader(
        ClipDataset(todo, geometry.sample_rate),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(geometry.hop_length),
        persistent_workers=False,
    )
    kwargs = {} if num_quantizers is None else {"num_quantizers": num_quantizers}
    for n_batch, batch in enumerate(loader, start=1):
        for index, error in batch.errors:
            logger.warning("cannot read %s: %s", todo[index], error)
            report.failed.append(Issue(todo[index], Reason.UNREADABLE_AUDIO, error))
        if not batch.indices:
            continue
        out = codec.encode(
            batch.input_values.to(device=device, dtype=dtype), batch.padding_mask.to(device), **kwargs
        )
        codes = out.audio_codes if hasattr(out, "audio_codes") else out[0]
        expected = batch.input_values.shape[-1] // geometry.hop_length
        if codes.ndim != 3 or codes.shape[0] != len(batch.indices) or codes.shape[-1] != expected:
            raise RuntimeError(
                f"codec returned codes of shape {tuple(codes.shape)} for {len(batch.indices)} clips of "
                f"{batch.input_values.shape[-1]} samples; expected (B, Q, {expected}) at hop "
                f"{geometry.hop_length}: is the codec's frame rate right?"
            )
        codes = codes.cpu().numpy().astype(np.int64, copy=False)
        for row, (index, samples) in enumerate(zip(batch.indices, batch.num_samples, strict=True)):
            path = todo[index]
            target = npy_path(path)
            try:
                with atomic_write(target) as tmp, open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(codes[row, :, : geometry.frames(samples)]))
            except OSError as exc:
                report.failed.append(Issue(target, Reason.WRITE_FAILED, str(exc)))
                continue
            report.written.append(target)
            report.audio_seconds += samples / geometry.sample_rate
        if log_every and n_batch % log_every == 0:
            elapsed = time.monotonic() - started
            done = len(report.written) + len(report.failed)
            eta = elapsed / max(done, 1) * (len(todo) - done)
            logger.info(
                "%d / %d clips, %.2f h of audio, ETA %.0f s",
                done,
                len(todo),
                report.audio_seconds / 3600,
                eta,
            )
    report.elapsed_seconds = time.monotonic() - started
    logger.info(report.summary().splitlines()[0])
    return report


def extract_tree(
    codec: Any,
    root: str | Path,
    *,
    min_seconds: float = 0.5,
    max_seconds: float = 30.0,
    **kwargs: Any,
) -> tuple[ExtractReport, DatasetReport]:
    """Scan a fish-speech tree (:func:`~.dataset.scan_dataset`) and extract codes for its good pairs.

    Returns the extraction report and the scan's :class:`~.dataset.DatasetReport`, whose skipped files
    got no ``.npy``. ``kwargs`` go to :func:`extract_codes`.
    """
    scan = scan_dataset(root, min_seconds=min_seconds, max_seconds=max_seconds)
    if scan.issues:
        logger.warning(scan.summary())
    return extract_codes(codec, scan.pairs, **kwargs), scan
