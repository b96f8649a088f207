"""Speaker data: the VoxCeleb-style tree, random crops with augmentation, pairs, trials, collators.

Layout (what ``dramaturg data synth`` writes under ``OUT/speaker`` and what VoxCeleb unpacks to)::

    wav/<speaker>/<session>/<n>.wav    16 kHz mono (other rates are resampled on load)
    train_speakers.txt                 speakers to train on (default: every folder not held out)
    test_speakers.txt                  held-out speakers: never trained on
    trials.txt                         "label enroll test", paths relative to wav/

VoxCeleb2 ships AAC (``.m4a``); :func:`convert_tree` turns such a tree into this one with ffmpeg
(``python -m dramaturg.services.speaker.data convert SRC DST``).

Randomness (crop positions, pairs, augmentation) comes from torch's global generator, which the
transformers Trainer seeds and saves in its checkpoints, so a resumed run draws what it would have.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from scipy.signal import fftconvolve
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")
CONVERT_SUFFIXES = (".m4a", ".aac", ".mp3", ".ogg", ".opus", ".mp4", ".webm", ".wma")


# ------------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Utterance:
    speaker: str
    rel_path: str  # relative to the corpus's wav/ folder, as trials name it
    path: Path


@dataclass(frozen=True)
class Trial:
    label: int  # 1: same speaker
    enroll: str
    test: str


def read_trials(path: str | Path) -> list[Trial]:
    """``label enroll test`` lines (VoxCeleb's format); blank lines and ``#`` comments are skipped."""
    trials = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected 'label enroll test' with label 0 or 1, got {line!r}")
        trials.append(Trial(int(fields[0]), fields[1], fields[2]))
    return trials


def _read_list(path: Path) -> list[str]:
    return [
        s for s in (line.strip() for line in path.read_text().splitlines()) if s and not s.startswith("#")
    ]


class SpeakerCorpus:
    """A speaker folder (see the module docstring); ``root`` may also be the corpus root above it."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not (root / "wav").is_dir() and (root / "speaker" / "wav").is_dir():
            root = root / "speaker"
        if not (root / "wav").is_dir():
            raise FileNotFoundError(f"{root}: no wav/ folder (expected wav/<speaker>/<session>/<n>.wav)")
        self.root = root
        self.wav_dir = root / "wav"
        present = sorted(p.name for p in self.wav_dir.iterdir() if p.is_dir())
        test_list = root / "test_speakers.txt"
        self.test_speakers = _read_list(test_list) if test_list.exists() else []
        train_list = root / "train_speakers.txt"
        if train_list.exists():
            self.train_speakers = _read_list(train_list)
        else:
            held = set(self.test_speakers)
            self.train_speakers = [s for s in present if s not in held]
        overlap = set(self.train_speakers) & set(self.test_speakers)
        if overlap:
            raise ValueError(f"{root}: speakers both in training and held out: {sorted(overlap)[:5]}")
        missing = [s for s in self.train_speakers if not (self.wav_dir / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root}: training speakers without a wav/ folder: {missing[:5]}")
        self.trials_path = root / "trials.txt"

    def utterances(self, speakers: Iterable[str]) -> list[Utterance]:
        """Every readable audio file of ``speakers`` (sorted, so the order is the same on every machine)."""
        found: list[Utterance] = []
        odd: list[Path] = []
        for speaker in speakers:
            for path in sorted((self.wav_dir / speaker).rglob("*")):
                if not path.is_file():
                    continue
                if path.suffix.lower() in AUDIO_SUFFIXES:
                    found.append(Utterance(speaker, path.relative_to(self.wav_dir).as_posix(), path))
                elif path.suffix.lower() in CONVERT_SUFFIXES:
                    odd.append(path)
        if odd:
            raise ValueError(
                f"{len(odd)} files need converting to wav first (e.g. {odd[0]}): "
                "python -m dramaturg.services.speaker.data convert SRC DST"
            )
        return found

    def train_utterances(self) -> list[Utterance]:
        return self.utterances(self.train_speakers)

    def trials(self) -> list[Trial]:
        if not self.trials_path.exists():
            return []
        return read_trials(self.trials_path)


# ------------------------------------------------------------------------------------------- audio


def load_audio(
    path: str | Path, sample_rate: int, *, start_seconds: float = 0.0, max_seconds: float | None = None
) -> np.ndarray:
    """Mono float32 at ``sample_rate``, optionally a window of the file (read without decoding the rest)."""
    with sf.SoundFile(str(path)) as f:
        rate = f.samplerate
        start = min(int(start_seconds * rate), f.frames)
        f.seek(start)
        frames = -1 if max_seconds is None else math.ceil(max_seconds * rate)
        data = f.read(frames=frames, dtype="float32", always_2d=True)
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), rate, sample_rate).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


def audio_seconds(path: str | Path) -> float:
    info = sf.info(str(path))
    return info.frames / float(info.samplerate)


def random_crop(path: str | Path, seconds: float, sample_rate: int) -> torch.Tensor:
    """A random window of ``seconds`` (the whole file when shorter), drawn with torch's generator."""
    total = audio_seconds(path)
    start = 0.0
    if total > seconds:
        start = float(torch.rand(()).item()) * (total - seconds)
    wav = load_audio(path, sample_rate, start_seconds=start, max_seconds=seconds)
    return torch.from_numpy(wav[: round(seconds * sample_rate)])


# ------------------------------------------------------------------------------------ augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Waveform augmentation for training crops (all off by default).

    ``speeds`` are speechbrain's speed-perturbation factors; ``channel`` imitates another
    microphone or codec (random high-pass, low-pass and one EQ bump: the recording-session
    differences verification must ignore); noise is white or babble (a crop of another training
    utterance) or coloured noise (power falling as 1/f^e, e drawn from ``noise_exponent``: white,
    pink, brown) at an SNR drawn from ``snr_db``; reverb convolves with a synthetic room response
    (exponentially decaying noise) whose RT60 is drawn from ``rt60``.
    """

    speed_perturb: bool = False
    speeds: tuple[float, ...] = (0.95, 1.0, 1.05)
    channel_prob: float = 0.0
    highpass_hz: tuple[float, float] = (50.0, 300.0)
    lowpass_hz: tuple[float, float] = (3000.0, 7800.0)
    eq_hz: tuple[float, float] = (300.0, 3500.0)
    eq_gain_db: tuple[float, float] = (-6.0, 6.0)
    noise_prob: float = 0.0
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_prob: float = 0.5
    noise_exponent: tuple[float, float] = (0.0, 2.0)
    reverb_prob: float = 0.0
    rt60: tuple[float, float] = (0.2, 0.8)

    @property
    def active(self) -> bool:
        return self.speed_perturb or self.channel_prob > 0 or self.noise_prob > 0 or self.reverb_prob > 0


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())


def colored_noise(n: int, exponent: float) -> torch.Tensor:
    """Unit-variance noise whose power falls as 1/f^exponent (0 white, 1 pink, 2 brown)."""
    spectrum = torch.fft.rfft(torch.randn(n))
    freqs = torch.fft.rfftfreq(n)
    freqs[0] = freqs[1] if n > 1 else 1.0
    noise = torch.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return noise / noise.std().clamp(min=1e-8)


class Augmenter:
    """Applies :class:`AugmentConfig` to one mono waveform (torchaudio does the signal processing)."""

    def __init__(self, config: AugmentConfig, sample_rate: int, babble: Sequence[Path] = ()) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self.babble = list(babble)

    def speed(self, wav: torch.Tensor) -> torch.Tensor:
        factor = self.config.speeds[int(torch.randint(len(self.config.speeds), ()).item())]
        if factor == 1.0:
            return wav
        out, _ = AF.speed(wav.unsqueeze(0), self.sample_rate, factor)
        return out.squeeze(0)

    def channel(self, wav: torch.Tensor) -> torch.Tensor:
        c = self.config
        nyquist = self.sample_rate / 2 - 100.0
        wav = AF.highpass_biquad(wav, self.sample_rate, _uniform(*c.highpass_hz))
        wav = AF.lowpass_biquad(wav, self.sample_rate, min(_uniform(*c.lowpass_hz), nyquist))
        eq_hz = math.exp(_uniform(math.log(c.eq_hz[0]), math.log(c.eq_hz[1])))
        return AF.equalizer_biquad(wav, self.sample_rate, min(eq_hz, nyquist), _uniform(*c.eq_gain_db), Q=1.0)

    def reverb(self, wav: torch.Tensor) -> torch.Tensor:
        rt60 = _uniform(*self.config.rt60)
        n = max(2, int(rt60 * self.sample_rate))
        t = torch.arange(n, dtype=wav.dtype) / self.sample_rate
        rir = torch.randn(n, dtype=wav.dtype) * torch.exp(-6.9078 * t / rt60)  # 60 dB down at rt60
        rir[0] = 1.0  # the direct path
        rir = rir / rir.norm()
        # scipy's FFT sizes are fast for any length; torchaudio's fftconvolve is ~10x slower here
        out = torch.from_numpy(fftconvolve(wav.numpy(), rir.numpy())[: wav.shape[0]]).to(wav.dtype)
        return out * (wav.pow(2).mean().sqrt() / out.pow(2).mean().sqrt().clamp(min=1e-8))

    def noise(self, wav: torch.Tensor) -> torch.Tensor:
        if self.babble and float(torch.rand(()).item()) < self.config.babble_prob:
            source = self.babble[int(torch.randint(len(self.babble), ()).item())]
            noise = random_crop(source, wav.shape[0] / self.sample_rate, self.sample_rate)
            if noise.shape[0] < wav.shape[0]:
                noise = noise.repeat(math.ceil(wav.shape[0] / max(1, noise.shape[0])))[: wav.shape[0]]
        else:
            noise = colored_noise(wav.shape[0], _uniform(*self.config.noise_exponent)).to(wav.dtype)
        snr = torch.tensor([_uniform(*self.config.snr_db)], dtype=wav.dtype)
        return AF.add_noise(wav.unsqueeze(0), noise[: wav.shape[0]].unsqueeze(0), snr).squeeze(0)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        if self.config.speed_perturb:
            wav = self.speed(wav)
        if self.config.reverb_prob > 0 and float(torch.rand(()).item()) < self.config.reverb_prob:
            wav = self.reverb(wav)
        if self.config.channel_prob > 0 and float(torch.rand(()).item()) < self.config.channel_prob:
            wav = self.channel(wav)
        if self.config.noise_prob > 0 and float(torch.rand(()).item()) < self.config.noise_prob:
            wav = self.noise(wav)
        return wav


# ---------------------------------------------------------------------------------------- datasets


class UtteranceDataset(Dataset):
    """One item per training utterance: a random crop and the speaker's index (for ce/aam/ctc)."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        speakers: Sequence[str],
        *,
        crop_seconds: float,
        sample_rate: int,
        augment: AugmentConfig | None = None,
        min_crop_seconds: float | None = None,
    ) -> None:
        if not utterances:
            raise ValueError("no training utterances")
        if min_crop_seconds is not None and not 0 < min_crop_seconds <= crop_seconds:
            raise ValueError(
                f"min_crop_seconds must be in (0, crop_seconds={crop_seconds}], got {min_crop_seconds}"
            )
        self.utterances = list(utterances)
        self.speaker_index = {s: i for i, s in enumerate(speakers)}
        self.crop_seconds = crop_seconds
        self.min_crop_seconds = min_crop_seconds
        self.sample_rate = sample_rate
        augment = augment or AugmentConfig()
        self.augmenter = (
            Augmenter(augment, sample_rate, [u.path for u in self.utterances]) if augment.active else None
        )

    @property
    def num_speakers(self) -> int:
        return len(self.speaker_index)

    def __len__(self) -> int:
        return len(self.utterances)

    def crop_length(self) -> float:
        """Seconds of the next crop: ``crop_seconds``, or uniform in [min_crop_seconds, crop_seconds].

        Variable lengths (the collator pads, the encoder masks) teach the embedding the short,
        uneven segments a diarization pipeline hands it, not only one fixed window.
        """
        if self.min_crop_seconds is None:
            return self.crop_seconds
        u = float(torch.rand(()).item())
        return self.min_crop_seconds + u * (self.crop_seconds - self.min_crop_seconds)

    def crop(self, utterance: Utterance) -> torch.Tensor:
        seconds = self.crop_length()
        crop = round(seconds * self.sample_rate)
        if self.augmenter is None:
            return random_crop(utterance.path, seconds, self.sample_rate)
        # Read a little more so speed perturbation (which shortens or stretches) still fills the crop.
        margin = max(self.augmenter.config.speeds) if self.augmenter.config.speed_perturb else 1.0
        wav = self.augmenter(random_crop(utterance.path, seconds * margin, self.sample_rate))
        return wav[:crop]

    def __getitem__(self, index: int) -> dict[str, Any]:
        utterance = self.utterances[index]
        return {"input_values": self.crop(utterance), "labels": self.speaker_index[utterance.speaker]}


class PairDataset(Dataset):
    """Pairs for the pairwise BCE head: each utterance with a same-speaker partner half of the time.

    An epoch is one pair per utterance; partners are drawn afresh every time an item is read.
    """

    def __init__(self, base: UtteranceDataset) -> None:
        self.base = base
        self.by_speaker: dict[str, list[int]] = {}
        for i, u in enumerate(base.utterances):
            self.by_speaker.setdefault(u.speaker, []).append(i)
        if len(self.by_speaker) < 2:
            raise ValueError("pairs need at least two training speakers")

    def __len__(self) -> int:
        return len(self.base)

    def _pick(self, choices: Sequence[int]) -> int:
        return choices[int(torch.randint(len(choices), ()).item())]

    def __getitem__(self, index: int) -> dict[str, Any]:
        first = self.base.utterances[index]
        same = bool(torch.rand(()).item() < 0.5)
        if same:
            own = [i for i in self.by_speaker[first.speaker] if i != index] or [index]
            other = self._pick(own)
        else:
            speakers = [s for s in self.by_speaker if s != first.speaker]
            other = self._pick(self.by_speaker[speakers[int(torch.randint(len(speakers), ()).item())]])
        return {
            "input_values": self.base.crop(first),
            "input_values_b": self.base.crop(self.base.utterances[other]),
            "labels": int(same),
        }


def _pad(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for row, wav in enumerate(waves):
        batch[row, : wav.shape[0]] = wav
    return batch, lengths


def collate_utterances(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Zero-padded ``input_values`` (B, S), ``lengths`` in samples (B,), ``labels`` (B,)."""
    values, lengths = _pad([item["input_values"] for item in items])
    return {
        "input_values": values,
        "lengths": lengths,
        "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long),
    }


def collate_pairs(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """All first utterances, then all second ones (2B rows), and one same-speaker label per pair."""
    waves = [item["input_values"] for item in items] + [item["input_values_b"] for item in items]
    values, lengths = _pad(waves)
    return {
        "input_values": values,
        "lengths": lengths,
        "labels": torch.tensor([item["labels"] for item in items], dtype=torch.float32),
    }


# -------------------------------------------------------------------------------------- conversion


def convert_to_wav(src: str | Path, dst: str | Path, sample_rate: int = 16000) -> Path:
    """Decode anything ffmpeg reads (m4a, mp3, …) into 16-bit mono wav at ``sample_rate``."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed (apt-get install ffmpeg)")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part.wav")
    cmd = [
        ffmpeg,
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-i",
        str(src),
        "-ac",
        "1",
        "-ar",
        str(sample_rate),
        "-c:a",
        "pcm_s16le",
        str(tmp),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg could not convert {src}: {result.stderr.strip()[-500:]}")
    tmp.replace(dst)  # a killed conversion never leaves a truncated wav that looks finished
    return dst


def convert_tree(
    src_root: str | Path,
    dst_root: str | Path,
    *,
    sample_rate: int = 16000,
    workers: int = 4,
    suffixes: Sequence[str] = CONVERT_SUFFIXES,
) -> int:
    """Mirror ``src_root`` (e.g. VoxCeleb2's ``aac/``) into ``dst_root`` as wav; returns files converted.

    Files already converted are skipped, so an interrupted conversion resumes where it stopped.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    jobs = []
    for path in sorted(src_root.rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes:
            target = (dst_root / path.relative_to(src_root)).with_suffix(".wav")
            if not target.exists():
                jobs.append((path, target))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, _ in enumerate(
            pool.map(lambda job: convert_to_wav(*job, sample_rate=sample_rate), jobs), 1
        ):
            if done % 1000 == 0:
                log.info("converted %d/%d files", done, len(jobs))
    return len(jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dramaturg.services.speaker.data")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert an m4a/mp3/… tree (e.g. VoxCeleb2 aac/) into wav")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--sample-rate", type=int, default=16000)
    conv.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    count = convert_tree(args.src, args.dst, sample_rate=args.sample_rate, workers=args.workers)
    log.info("converted %d files into %s", count, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
