"""A fish-speech dataset tree, checked and loudness-normalised before any token is extracted.

fish-speech fine-tunes from a folder per speaker, each clip beside its transcript::

    data/
      SPK1/  clip_0001.wav  clip_0001.lab  ...
      SPK2/  ...

and its tools assume every pair is good: ``extract_vq.py`` logs and drops an unreadable file,
``build_dataset.py`` silently drops a clip whose text is missing, and an empty transcript or a
40-minute file goes into training unnoticed. :func:`scan_dataset` looks at every file once and says
what is wrong with each one it leaves out (:class:`DatasetReport`), so a bad corpus is fixed at the
source instead of surfacing as a strange loss curve.

Levels matter too: a voice recorded 15 dB quieter than the others teaches the model that this speaker
is quiet, and the codec spends its codes on level instead of timbre. :func:`normalize_loudness`
brings every clip to one EBU R128 programme loudness (ITU-R BS.1770, measured with pyloudnorm) in a
copy of the tree, leaving the originals untouched.

Nothing here needs torch; everything is safe to run again: a scan has no side effects, and the
normaliser skips clips whose copy is already newer than its source and writes each copy atomically,
so a killed run never leaves a half-written file that a later run would take for done.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = [
    "AUDIO_EXTENSIONS",
    "TEXT_EXTENSION",
    "DatasetReport",
    "Issue",
    "LoudnessReport",
    "NormalizedClip",
    "Pair",
    "Reason",
    "atomic_write",
    "measure_loudness",
    "normalize_loudness",
    "scan_dataset",
]

logger = logging.getLogger(__name__)

#: Audio formats accepted beside a ``.lab``, in order of preference when a stem has several (a lossless
#: original beats its MP3).
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".mp3")

TEXT_EXTENSION = ".lab"

#: BS.1770's gating block: the meter needs at least this much audio for a standard measurement.
_GATE_SECONDS = 0.4


class Reason(enum.StrEnum):
    """Why a file was left out of the dataset (the report groups by these)."""

    MISSING_LAB = "missing .lab"
    NO_AUDIO = ".lab without audio"
    EMPTY_TEXT = "empty text"
    UNREADABLE_TEXT = "unreadable text"
    UNREADABLE_AUDIO = "unreadable audio"
    UNREADABLE_CODES = "unreadable codes"
    TOO_SHORT = "too short"
    TOO_LONG = "too long"
    DUPLICATE_AUDIO = "duplicate audio"
    NOT_IN_SPEAKER_FOLDER = "not in a speaker folder"
    WRITE_FAILED = "write failed"


@dataclass(frozen=True)
class Issue:
    """One file left out, and why: ``detail`` says enough to fix it without opening the file."""

    path: Path
    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Pair:
    """A usable clip: audio, its transcript, and what its header says about it."""

    speaker: str
    audio: Path
    lab: Path
    text: str
    duration: float
    sample_rate: int
    channels: int

    @property
    def stem(self) -> Path:
        """The clip without its extension: ``stem.npy`` holds its codec tokens, as in fish-speech."""
        return self.audio.with_suffix("")


@dataclass
class DatasetReport:
    """What :func:`scan_dataset` found: the pairs to use and every file it skipped, with the reason."""

    root: Path
    pairs: list[Pair] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def speakers(self) -> list[str]:
        return sorted({p.speaker for p in self.pairs})

    @property
    def total_seconds(self) -> float:
        return float(sum(p.duration for p in self.pairs))

    def by_reason(self) -> dict[Reason, list[Issue]]:
        out: dict[Reason, list[Issue]] = {}
        for issue in self.issues:
            out.setdefault(issue.reason, []).append(issue)
        return out

    def summary(self) -> str:
        """One paragraph for a log or a terminal: counts first, then every skipped file."""
        lines = [
            f"{len(self.pairs)} pairs from {len(self.speakers)} speakers "
            f"({self.total_seconds / 60:.1f} min) under {self.root}; skipped {len(self.issues)}"
            + (
                ": " + ", ".join(f"{n} {r}" for r, n in Counter(i.reason for i in self.issues).most_common())
                if self.issues
                else ""
            )
        ]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


def _read_text(lab: Path) -> str:
    """The transcript, stripped; raises UnicodeDecodeError / OSError for the caller to report."""
    return lab.read_text(encoding="utf-8").strip()


def scan_dataset(
    root: str | Path,
    *,
    min_seconds: float = 0.5,
    max_seconds: float = 30.0,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    check_decode: bool = False,
) -> DatasetReport:
    """Pair every ``SPK/*.lab`` under ``root`` with its audio and report what cannot be used.

    Only the first level of folders is read, as fish-speech lays a dataset out (the folder name is the
    speaker); hidden files (``.name``, e.g. temporary files of an interrupted run) are ignored. Audio is
    judged from its header (cheap, fine for a large corpus); ``check_decode`` also decodes every file,
    which catches a truncated body the header does not show. Nothing raises for a bad file: each one is
    an :class:`Issue` and the scan goes on.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    exts = tuple(e.lower() for e in extensions)
    report = DatasetReport(root=root)

    for stray in sorted(root.iterdir()):
        if (
            stray.is_file()
            and not stray.name.startswith(".")
            and stray.suffix.lower() in (*exts, TEXT_EXTENSION)
        ):
            report.issues.append(
                Issue(stray, Reason.NOT_IN_SPEAKER_FOLDER, "fish-speech wants root/SPEAKER/clip")
            )

    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        by_stem: dict[str, dict[str, Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                if path.is_dir() and not path.name.startswith("."):
                    logger.warning("ignoring nested folder %s: fish-speech reads one folder level", path)
                continue
            suffix = path.suffix.lower()
            if suffix == TEXT_EXTENSION or suffix in exts:
                by_stem.setdefault(path.stem, {})[suffix] = path
        for stem in sorted(by_stem):
            pair = _pair_one(folder.name, by_stem[stem], exts, min_seconds, max_seconds, check_decode, report)
            if pair is not None:
                report.pairs.append(pair)
    logger.info(
        "scanned %s: %d pairs, %d speakers, %d skipped",
        root,
        len(report.pairs),
        len(report.speakers),
        len(report.issues),
    )
    return report


def _pair_one(
    speaker: str,
    files: dict[str, Path],
    exts: tuple[str, ...],
    min_seconds: float,
    max_seconds: float,
    check_decode: bool,
    report: DatasetReport,
) -> Pair | None:
    """Judge one stem's files; record issues in ``report``; return the pair when it is usable."""
    lab = files.get(TEXT_EXTENSION)
    audios = [files[e] for e in exts if e in files]
    if lab is None:
        for audio in audios:
            report.issues.append(
                Issue(audio, Reason.MISSING_LAB, f"expected {audio.with_suffix('.lab').name}")
            )
        return None
    if not audios:
        report.issues.append(Issue(lab, Reason.NO_AUDIO, f"expected one of {', '.join(exts)} beside it"))
        return None
    audio, extra = audios[0], audios[1:]
    for dup in extra:
        report.issues.append(Issue(dup, Reason.DUPLICATE_AUDIO, f"{audio.name} is used for this .lab"))

    try:
        text = _read_text(lab)
    except (OSError, UnicodeDecodeError) as exc:
        report.issues.append(Issue(lab, Reason.UNREADABLE_TEXT, str(exc)))
        return None
    if not text:
        report.issues.append(Issue(lab, Reason.EMPTY_TEXT))
        return None

    try:
        info = sf.info(str(audio))
        frames, rate, channels = int(info.frames), int(info.samplerate), int(info.channels)
        if check_decode:
            data, _ = sf.read(str(audio), dtype="float32", always_2d=True)
            frames = int(data.shape[0])
            if not np.isfinite(data).all():
                raise ValueError("samples are not finite")
        if rate <= 0 or frames < 0:
            raise ValueError(f"implausible header: {frames} frames at {rate} Hz")
    except Exception as exc:
        report.issues.append(Issue(audio, Reason.UNREADABLE_AUDIO, f"{type(exc).__name__}: {exc}"))
        return None

    duration = frames / rate
    if duration < min_seconds:
        report.issues.append(Issue(audio, Reason.TOO_SHORT, f"{duration:.2f} s < {min_seconds:g} s"))
        return None
    if duration > max_seconds:
        report.issues.append(Issue(audio, Reason.TOO_LONG, f"{duration:.2f} s > {max_seconds:g} s"))
        return None
    return Pair(speaker, audio, lab, text, duration, rate, channels)


# --------------------------------------------------------------------------------------------------
# Writing files atomically


class atomic_write:
    """``with atomic_write(path) as tmp:`` write ``tmp``; it becomes ``path`` only if the block succeeds.

    The temporary file is hidden (``.name.<random>.part``) and sits in the target's folder, so the final
    ``os.replace`` is atomic and nothing that globs for ``*.wav`` / ``*.npy`` ever sees it: a run killed
    mid-write leaves at worst a stray ``.part`` file, never a truncated file that looks finished.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.tmp is not None
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Loudness


@dataclass(frozen=True)
class NormalizedClip:
    """One clip of the normalised tree and what was done to it.

    ``method`` is ``"bs1770"`` (standard gated measurement), ``"short"`` (shorter than the 400 ms
    gating block: measured as one block the length of the clip) or ``"silent"`` (nothing to measure:
    copied unchanged). ``peak_limited`` says the gain was lowered so the peak stays at ``peak_dbfs``,
    which leaves the clip below the target.
    """

    pair: Pair
    input_lufs: float
    gain_db: float
    peak_limited: bool
    method: str


@dataclass
class LoudnessReport:
    """What :func:`normalize_loudness` wrote (``clips``), found already done (``skipped``) or failed."""

    out_root: Path
    target_lufs: float
    clips: list[NormalizedClip] = field(default_factory=list)
    skipped: list[Pair] = field(default_factory=list)
    failed: list[Issue] = field(default_factory=list)

    @property
    def pairs(self) -> list[Pair]:
        """Every pair of the normalised tree, written now or before: what extraction should read."""
        return sorted([c.pair for c in self.clips] + self.skipped, key=lambda p: (p.speaker, p.audio.name))

    def summary(self) -> str:
        limited = sum(c.peak_limited for c in self.clips)
        short = sum(c.method == "short" for c in self.clips)
        silent = sum(c.method == "silent" for c in self.clips)
        head = (
            f"normalised {len(self.clips)} clips to {self.target_lufs:g} LUFS under {self.out_root} "
            f"({limited} peak-limited, {short} measured as one short block, {silent} silent), "
            f"{len(self.skipped)} already done, {len(self.failed)} failed"
        )
        return "\n".join([head, *(f"  {issue}" for issue in self.failed)])


def measure_loudness(samples: np.ndarray, rate: int) -> tuple[float, str]:
    """Integrated loudness in LUFS and how it was measured (see :class:`NormalizedClip`).

    ``samples`` is ``(n,)`` or ``(n, channels)``. A clip shorter than BS.1770's 400 ms block cannot be
    gated; pyloudnorm refuses it. Measuring it as a single block of its own length gives the K-weighted
    mean square the standard would average, without the gate, which is the best estimate there is.
    """
    import pyloudnorm

    n = int(samples.shape[0])
    if n == 0:
        return -math.inf, "silent"
    data = np.asarray(samples, dtype=np.float64)
    if n >= _GATE_SECONDS * rate:
        lufs, method = float(pyloudnorm.Meter(rate).integrated_loudness(data)), "bs1770"
    else:
        # (n - 0.5) / rate: one block covering the clip, without float error pushing block_size * rate
        # above n (which pyloudnorm rejects).
        lufs = float(pyloudnorm.Meter(rate, block_size=(n - 0.5) / rate).integrated_loudness(data))
        method = "short"
    if not math.isfinite(lufs):
        return -math.inf, "silent"
    return lufs, method


def _output_path(pair: Pair, out_root: Path) -> Path:
    """MP3 is decoded once and kept lossless (WAV): re-encoding would add a second generation of loss."""
    suffix = pair.audio.suffix.lower()
    return out_root / pair.speaker / (pair.audio.stem + (".flac" if suffix == ".flac" else ".wav"))


def normalize_loudness(
    pairs: Iterable[Pair],
    out_root: str | Path,
    *,
    target_lufs: float = -23.0,
    peak_dbfs: float = -1.0,
    subtype: str = "PCM_16",
    overwrite: bool = False,
) -> LoudnessReport:
    """Write a copy of the tree, every clip at ``target_lufs``, each beside a copy of its ``.lab``.

    EBU R128 asks for -23 LUFS programme loudness; the gain that reaches it is lowered where it would
    push the sample peak above ``peak_dbfs`` (-1 dBFS, the R128 true-peak ceiling, measured here on
    samples), because clipping distorts what the codec learns far more than a clip a little quiet.
    Silent clips are copied unchanged. Sample rate and channels are kept: extraction resamples.

    Idempotent: a clip whose copy exists and is newer than its source is not read again (``overwrite``
    forces it). Each output is written atomically. A clip that fails is reported, never raised.
    """
    out_root = Path(out_root)
    report = LoudnessReport(out_root=out_root, target_lufs=target_lufs)
    ceiling = 10.0 ** (peak_dbfs / 20.0)
    for pair in pairs:
        out_audio = _output_path(pair, out_root)
        out_lab = out_audio.with_suffix(TEXT_EXTENSION)
        done = (
            not overwrite
            and out_audio.exists()
            and out_audio.stat().st_mtime_ns >= pair.audio.stat().st_mtime_ns
        )
        try:
            if not out_lab.exists() or out_lab.read_bytes() != pair.lab.read_bytes():
                with atomic_write(out_lab) as tmp:
                    shutil.copyfile(pair.lab, tmp)
            new_pair = Pair(
                pair.speaker, out_audio, out_lab, pair.text, pair.duration, pair.sample_rate, pair.channels
            )
            if done:
                report.skipped.append(new_pair)
                continue
            samples, rate = sf.read(str(pair.audio), dtype="float64", always_2d=False)
            lufs, method = measure_loudness(samples, rate)
            gain_db, limited = 0.0, False
            if method != "silent":
                gain_db = target_lufs - lufs
                peak = float(np.max(np.abs(samples))) if samples.size else 0.0
                if peak > 0 and peak * 10.0 ** (gain_db / 20.0) > ceiling:
                    gain_db = 20.0 * math.log10(ceiling / peak)
                    limited = True
            out = samples * 10.0 ** (gain_db / 20.0)
            fmt = "FLAC" if out_audio.suffix == ".flac" else "WAV"
            with atomic_write(out_audio) as tmp:
                sf.write(str(tmp), out, rate, format=fmt, subtype=subtype)
        except Exception as exc:
            logger.warning("cannot normalise %s: %s", pair.audio, exc)
            report.failed.append(Issue(pair.audio, Reason.WRITE_FAILED, f"{type(exc).__name__}: {exc}"))
            continue
        if limited:
            logger.info(
                "%s: gain lowered to %.1f dB to keep the peak at %g dBFS", pair.audio, gain_db, peak_dbfs
            )
        report.clips.append(NormalizedClip(new_pair, lufs, gain_db, limited, method))
    logger.info(report.summary().splitlines()[0])
    return report
