"""Measure the prosody a synthetic utterance actually has, and turn measurements into 1-5 labels.

The synthetic corpus asks espeak-ng for a given pitch, speed and loudness, but what comes out differs
from what was asked (espeak's intonation model, sox effects, noise). Labels for the evaluator must
describe the audio, not the request, so everything here works on rendered samples only. Only numpy is
used: the core package must not depend on scipy/librosa.

Label mapping uses FIXED thresholds (not corpus quantiles). Fixed thresholds make a clip's label
independent of which other clips were generated with it, so growing the corpus with CLI flags does
not relabel existing clips and a test can predict the label of a hand-made signal. The thresholds
were chosen so that the default espeak-ng voices spread over the whole 1-5 range; they are listed
in ``THRESHOLDS`` and in :func:`realism_labels` / :func:`archetype_labels`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

logger = logging.getLogger(__name__)

Region = tuple[int, int]
"""A speech region as ``(start_sample, end_sample)``, end exclusive."""

REALISM_DIMENSIONS: tuple[str, ...] = (
    "pitch_variation",
    "rhythmic_naturalness",
    "stress_and_emphasis",
    "emotion_accuracy",
    "emotion_intensity_control",
    "dynamic_range",
    "voice_identity_matching",
    "trait_embodiment",
    "local_story_fit",
    "global_story_coherence",
)
"""The ten Speech-DRAME realism dimensions, in the order of the reference JSONL."""

ARCHETYPE_DIMENSIONS: tuple[str, ...] = ("audio_quality", "human_likeness", "appropriateness")
"""The 1-5 archetype dimensions (``content_pass`` is boolean and handled separately)."""

# Ascending cut points: a value below cut[0] maps to 1, below cut[1] to 2, …, at or above cut[3] to 5.
THRESHOLDS: dict[str, tuple[float, float, float, float]] = {
    # F0 spread (10th-90th percentile of voiced frames) in semitones: monotone → expressive.
    "pitch_variation": (2.0, 3.5, 5.0, 7.0),
    # Loudness range (10th-90th percentile of active-frame RMS dB) in dB.
    "dynamic_range": (6.0, 9.0, 12.0, 15.0),
    # Local syllable-peak prominence in dB (espeak-ng lines without <emphasis> sit around 5 dB,
    # with strong emphasis on a word around 12 dB).
    "stress_and_emphasis": (4.0, 7.0, 10.0, 14.0),
    # Measured SNR in dB → audio quality.
    "audio_quality": (10.0, 16.0, 22.0, 28.0),
}
# Descending cut points for "distance" measures: a value at or below cut[0] maps to 5, …, above cut[3] to 1.
DISTANCE_THRESHOLDS: dict[str, tuple[float, float, float, float]] = {
    # |log2(rate / NATURAL_RATE)|: 0 = conversational rate.
    "rhythmic_naturalness": (0.12, 0.25, 0.40, 0.60),
    # |utterance mean F0 - speaker mean F0| in semitones.
    "voice_identity_matching": (1.0, 2.0, 3.0, 4.5),
    # |measured arousal - intended arousal| (arousal units, see :func:`arousal_index`).
    "emotion_accuracy": (0.35, 0.7, 1.1, 1.6),
    # ||measured arousal| - |intended arousal||.
    "emotion_intensity_control": (0.3, 0.6, 1.0, 1.5),
    # Euclidean distance between the measured and the style's expected prosody profile.
    "trait_embodiment": (0.5, 0.9, 1.4, 2.0),
}

DIGITAL_SILENCE_DB = -90.0
"""Frames below this level (dBFS) are silence whatever their periodicity (YIN sees 0/0 as periodic)."""

NATURAL_RATE_SPS = 4.5
"""Conversational English runs at about 4-5 syllables per second of speech (pauses excluded)."""

NATURAL_F0_SPREAD_ST = 5.0
"""A lively but human pitch spread; much less sounds robotic, much more sounds sung."""


@dataclass(frozen=True)
class ProsodyMeasures:
    """What was measured on one utterance; every field is plain float so it serialises to JSON."""

    duration_s: float
    speech_s: float
    f0_mean_hz: float
    f0_mean_st: float
    f0_spread_st: float
    voiced_ratio: float
    syllables: int
    words: int
    rate_sps: float
    rate_wps: float
    level_dbfs: float
    loudness_range_db: float
    stress_contrast_db: float
    peak_rate_hz: float
    pause_ratio: float
    snr_db: float

    def to_dict(self) -> dict[str, float]:
        """Rounded copy for manifests (keeps JSON small and diff-friendly)."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------------------------- framing


def frame_rms_db(
    samples: np.ndarray, sample_rate: int, *, window_s: float = 0.025, hop_s: float = 0.01
) -> np.ndarray:
    """RMS level per frame in dBFS; frame ``i`` covers ``[i*hop, i*hop + window)``.

    Short signals are zero-padded to one window so callers never special-case them.
    """
    x = np.asarray(samples, dtype=np.float64)
    win = max(1, round(window_s * sample_rate))
    hop = max(1, round(hop_s * sample_rate))
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    frames = sliding_window_view(x, win)[::hop]
    power = np.mean(frames * frames, axis=1)
    return 10.0 * np.log10(power + 1e-12)


def detect_speech_regions(
    samples: np.ndarray,
    sample_rate: int,
    *,
    threshold_db: float = -30.0,
    min_pause_s: float = 0.2,
    min_region_s: float = 0.03,
    frame_s: float = 0.01,
) -> list[Region]:
    """Energy-based speech regions of a CLEAN rendering, exact to the sample.

    Rule (documented because RTTM exactness depends on it): split the signal into non-overlapping
    ``frame_s`` frames; a frame is active when its RMS is within ``threshold_db`` of the loudest
    frame; active runs separated by less than ``min_pause_s`` are merged, runs shorter than
    ``min_region_s`` dropped. Each region then starts at the first sample of its first frame whose
    magnitude reaches the threshold and ends after the last such sample of its last frame.
    """
    x = np.asarray(samples, dtype=np.float64)
    hop = max(1, round(frame_s * sample_rate))
    n_frames = len(x) // hop + (1 if len(x) % hop else 0)
    if n_frames == 0:
        return []
    padded = np.pad(x, (0, n_frames * hop - len(x)))
    rms = np.sqrt(np.mean(padded.reshape(n_frames, hop) ** 2, axis=1))
    peak = float(rms.max())
    if peak <= 1e-9:
        return []
    thr = peak * 10.0 ** (threshold_db / 20.0)
    active = rms >= thr
    runs: list[list[int]] = []
    idx = np.flatnonzero(active)
    max_gap = round(min_pause_s / frame_s)
    for i in idx:
        if runs and i - runs[-1][1] <= max_gap:
            runs[-1][1] = int(i)
        else:
            runs.append([int(i), int(i)])
    regions: list[Region] = []
    min_len = round(min_region_s * sample_rate)
    mag = np.abs(x)
    for f0, f1 in runs:
        a, b = f0 * hop, min(len(x), (f1 + 1) * hop)
        first = np.flatnonzero(mag[a : min(b, a + hop)] >= thr)
        last = np.flatnonzero(mag[max(a, b - hop) : b] >= thr)
        start = a + int(first[0]) if len(first) else a
        end = max(a, b - hop) + int(last[-1]) + 1 if len(last) else b
        if end - start >= min_len:
            regions.append((start, end))
    return regions


# ------------------------------------------------------------------------------------------------ F0


def _median_filter_nan(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Median filter that ignores NaN (unvoiced) frames and keeps them unvoiced.

    Written without ``np.nanmedian`` because that warns on all-NaN windows, and silencing warnings
    is not thread-safe (measurements run in a thread pool).
    """
    if len(values) < width:
        return values
    half = width // 2
    padded = np.pad(values, (half, half), constant_values=np.nan)
    win = np.sort(sliding_window_view(padded, width), axis=1)  # NaN sorts last
    count = np.sum(np.isfinite(win), axis=1)
    rows = np.arange(len(win))
    lo = np.clip((count - 1) // 2, 0, width - 1)
    hi = np.clip(count // 2, 0, width - 1)
    med = 0.5 * (win[rows, lo] + win[rows, hi])
    med[(count == 0) | np.isnan(values)] = np.nan
    return med


def f0_track(
    samples: np.ndarray,
    sample_rate: int,
    *,
    fmin: float = 60.0,
    fmax: float = 500.0,
    hop_s: float = 0.01,
    window_s: float = 0.03,
    threshold: float = 0.25,
    silence_db: float = -40.0,
    octave_guard_st: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """YIN F0 tracker in numpy (de Cheveigné & Kawahara 2002), vectorised over frames.

    Returns ``(times_s, f0_hz)`` with NaN for unvoiced frames. A frame is voiced when the
    cumulative-mean-normalised difference dips below ``threshold`` and its level is within
    ``silence_db`` of the loudest frame (so noise-only frames never get a pitch). YIN's typical
    failure is a harmonic picked as F0 (x2, x3); frames more than ``octave_guard_st`` semitones from
    the utterance's median F0 are therefore treated as unvoiced, which keeps genuine excursions
    (well under an octave in speech) and removes harmonic jumps before any spread is computed.
    """
    x = np.asarray(samples, dtype=np.float64)
    w = round(window_s * sample_rate)
    tau_min = max(2, int(sample_rate / fmax))
    tau_max = math.ceil(sample_rate / fmin)
    n = w + tau_max + 1
    hop = max(1, round(hop_s * sample_rate))
    if len(x) < n:
        return np.zeros(0), np.zeros(0)
    frames = sliding_window_view(x, n)[::hop]
    n_fft = 1 << math.ceil(math.log2(n + w))
    spec_a = np.fft.rfft(frames[:, :w], n_fft)
    spec_b = np.fft.rfft(frames, n_fft)
    acf = np.fft.irfft(np.conj(spec_a) * spec_b, n_fft)[:, : tau_max + 1]
    sq = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames * frames, axis=1)], axis=1)
    e0 = sq[:, w]
    e_tau = sq[:, w : w + tau_max + 1] - sq[:, : tau_max + 1]
    diff = np.maximum(e0[:, None] + e_tau - 2.0 * acf, 0.0)
    taus = np.arange(1, tau_max + 1, dtype=np.float64)
    cum = np.cumsum(diff[:, 1:], axis=1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * taus / np.maximum(cum, 1e-12)
    level = 10.0 * np.log10(e0 / w + 1e-12)
    loud_enough = (level >= level.max() + silence_db) & (level > DIGITAL_SILENCE_DB)
    f0 = np.full(len(frames), np.nan)
    below = cmnd < threshold
    below[:, :tau_min] = False
    for i in np.flatnonzero(loud_enough & below.any(axis=1)):
        row = cmnd[i]
        t = int(np.argmax(below[i]))
        while t + 1 <= tau_max and row[t + 1] < row[t]:
            t += 1
        if 0 < t < tau_max:
            a, b, c = row[t - 1], row[t], row[t + 1]
            denom = a - 2.0 * b + c
            shift = 0.5 * (a - c) / denom if abs(denom) > 1e-12 else 0.0
            tau = t + float(np.clip(shift, -1.0, 1.0))
        else:
            tau = float(t)
        f0[i] = sample_rate / tau
    f0[(f0 < fmin) | (f0 > fmax)] = np.nan
    f0 = _median_filter_nan(f0, 5)
    voiced = np.isfinite(f0)
    if voiced.sum() >= 3 and octave_guard_st > 0:
        st = 12.0 * np.log2(f0[voiced] / np.median(f0[voiced]))
        idx = np.flatnonzero(voiced)
        f0[idx[np.abs(st) > octave_guard_st]] = np.nan
    times = (np.arange(len(frames)) * hop + n / 2) / sample_rate
    return times, f0


def hz_to_st(f0_hz: np.ndarray | float) -> np.ndarray | float:
    """Semitones relative to 100 Hz, the scale in which pitch spread is perceptually even."""
    return 12.0 * np.log2(np.asarray(f0_hz, dtype=np.float64) / 100.0)


def f0_spread_st(f0_hz: np.ndarray) -> float:
    """10th-90th percentile range of voiced F0 in semitones (robust to octave slips at the tails)."""
    voiced = f0_hz[np.isfinite(f0_hz)]
    if len(voiced) < 3:
        return 0.0
    st = hz_to_st(voiced)
    return float(np.percentile(st, 90) - np.percentile(st, 10))


# ------------------------------------------------------------------------------------------ loudness


def loudness_range_db(
    samples: np.ndarray,
    sample_rate: int,
    regions: Sequence[Region] | None = None,
    *,
    window_s: float = 0.3,
    floor_db: float = 40.0,
) -> float:
    """10th-90th percentile range of phrase-level loudness (300 ms RMS windows) over speech, in dB.

    Windows of 300 ms average over syllables, so the range describes how the level moves across
    the line (a crescendo, a dropped voice) rather than the vowel/consonant contrast every line has.
    Windows centred outside ``regions`` (when given) or ``floor_db`` below the loudest are ignored.
    """
    db = frame_rms_db(samples, sample_rate, window_s=window_s, hop_s=0.02)
    mask = _region_frame_mask(len(db), sample_rate, regions, hop_s=0.02, window_s=window_s)
    db = db[mask]
    if len(db) == 0:
        return 0.0
    db = db[db >= db.max() - floor_db]
    return float(np.percentile(db, 90) - np.percentile(db, 10))


def _region_frame_mask(
    n_frames: int,
    sample_rate: int,
    regions: Sequence[Region] | None,
    hop_s: float = 0.01,
    window_s: float = 0.025,
) -> np.ndarray:
    """Boolean mask of frames whose centre lies inside one of ``regions`` (all frames if None)."""
    if regions is None:
        return np.ones(n_frames, dtype=bool)
    centres = np.arange(n_frames) * hop_s + window_s / 2
    mask = np.zeros(n_frames, dtype=bool)
    for a, b in regions:
        mask |= (centres >= a / sample_rate) & (centres < b / sample_rate)
    return mask


def energy_peaks(
    samples: np.ndarray,
    sample_rate: int,
    regions: Sequence[Region] | None = None,
    *,
    min_prominence_db: float = 3.0,
) -> np.ndarray:
    """Levels (dB) of syllable-like energy peaks: local maxima of a 50 ms-smoothed level contour.

    A maximum counts when its topographic prominence (height above the higher of the two lowest
    points reached before meeting a higher contour on either side, as in ``scipy.signal.find_peaks``)
    is at least ``min_prominence_db``, so ripples inside a vowel or a flat-topped syllable do not.
    """
    db = frame_rms_db(samples, sample_rate)
    mask = _region_frame_mask(len(db), sample_rate, regions)
    db = np.where(mask, db, -120.0)
    # Silence beyond both ends, so a syllable at the very edge still rises and falls.
    padded = np.concatenate([np.full(3, -120.0), db, np.full(3, -120.0)])
    smooth = np.convolve(padded, np.ones(5) / 5.0, mode="same")
    if len(smooth) < 3:
        return np.zeros(0)
    cand = np.flatnonzero((smooth[1:-1] > smooth[:-2]) & (smooth[1:-1] >= smooth[2:])) + 1
    cand = cand[smooth[cand] > smooth.max() - 40.0]
    peaks: list[float] = []
    last = -1
    for i in cand:
        height = smooth[i]
        if last >= 0 and smooth[last : i + 1].min() > min(smooth[last], height) - min_prominence_db:
            continue  # no dip since the last accepted peak: same syllable (plateau or tie)
        higher_left = np.flatnonzero(smooth[:i] > height)
        higher_right = np.flatnonzero(smooth[i + 1 :] > height)
        left = higher_left[-1] if len(higher_left) else 0
        right = i + 1 + higher_right[0] if len(higher_right) else len(smooth) - 1
        base = max(smooth[left : i + 1].min(), smooth[i : right + 1].min())
        if height - base >= min_prominence_db:
            peaks.append(float(height))
            last = int(i)
    return np.asarray(peaks)


def stress_contrast_db(peaks_db: np.ndarray, *, neighbours: int = 2) -> float:
    """How far the most stressed syllable stands out LOCALLY: the largest difference between a
    peak's level and the median of up to ``neighbours`` peaks either side.

    Local, because a line that simply gets quieter halfway (dynamics) is not "emphasis"; an
    emphasised word is louder than the words around it. The maximum, because a line usually
    stresses one or two words and a percentile over ten syllables would not see them.
    """
    n = len(peaks_db)
    if n < 3:
        return 0.0
    prominence = []
    for i in range(n):
        around = np.concatenate([peaks_db[max(0, i - neighbours) : i], peaks_db[i + 1 : i + 1 + neighbours]])
        prominence.append(peaks_db[i] - float(np.median(around)))
    return float(max(0.0, max(prominence)))


def estimate_snr_db(samples: np.ndarray, regions: Sequence[Region]) -> float:
    """SNR from the signal itself: power inside speech regions vs. power outside them.

    Needs some non-speech samples (clips are padded with noise for this reason); returns 60 dB when
    there are none or the outside is digital silence.
    """
    x = np.asarray(samples, dtype=np.float64)
    inside = np.zeros(len(x), dtype=bool)
    for a, b in regions:
        inside[a:b] = True
    if inside.all() or not inside.any():
        return 60.0
    p_noise = float(np.mean(x[~inside] ** 2))
    p_total = float(np.mean(x[inside] ** 2))
    if p_noise <= 1e-14:
        return 60.0
    p_speech = max(p_total - p_noise, 1e-14)
    return float(np.clip(10.0 * np.log10(p_speech / p_noise), -20.0, 60.0))


# ----------------------------------------------------------------------------------------- text side

_WORD = re.compile(r"[A-Za-z']+")


def count_syllables(text: str) -> int:
    """Vowel-group syllable count for English (good to about ±10%, enough for a speaking rate)."""
    total = 0
    for word in _WORD.findall(text.lower()):
        groups = re.findall(r"[aeiouy]+", word)
        n = len(groups)
        if word.endswith("e") and n > 1 and not word.endswith(("le", "ee", "ye")):
            n -= 1
        total += max(1, n)
    return total


def count_words(text: str) -> int:
    """Number of word tokens (apostrophes kept inside words)."""
    return len(_WORD.findall(text))


# -------------------------------------------------------------------------------------- measurement


def measure_prosody(
    samples: np.ndarray, sample_rate: int, text: str, regions: Sequence[Region] | None = None
) -> ProsodyMeasures:
    """Measure one utterance. ``regions`` are the known speech regions (detected when omitted).

    Speaking rate is syllables (from the text) per second of speech, where speech time excludes the
    pauses between regions; pause ratio is pause time over the span from first to last region.
    """
    x = np.asarray(samples, dtype=np.float64)
    if regions is None:
        regions = detect_speech_regions(x, sample_rate)
    regions = [tuple(map(int, r)) for r in regions]
    duration = len(x) / sample_rate
    if not regions:
        return ProsodyMeasures(
            duration,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            count_syllables(text),
            count_words(text),
            0.0,
            0.0,
            -120.0,
            0.0,
            0.0,
            0.0,
            0.0,
            estimate_snr_db(x, []),
        )
    speech_s = sum(b - a for a, b in regions) / sample_rate
    span_s = (regions[-1][1] - regions[0][0]) / sample_rate
    seg = x[regions[0][0] : regions[-1][1]]
    _, f0 = f0_track(seg, sample_rate)
    voiced = f0[np.isfinite(f0)]
    f0_mean = float(np.exp(np.mean(np.log(voiced)))) if len(voiced) else 0.0
    inside = np.concatenate([x[a:b] for a, b in regions])
    level = float(10.0 * np.log10(np.mean(inside**2) + 1e-12))
    peaks = energy_peaks(x, sample_rate, regions)
    syl, words = count_syllables(text), count_words(text)
    return ProsodyMeasures(
        duration_s=duration,
        speech_s=speech_s,
        f0_mean_hz=f0_mean,
        f0_mean_st=float(hz_to_st(f0_mean)) if f0_mean > 0 else 0.0,
        f0_spread_st=f0_spread_st(f0),
        voiced_ratio=float(len(voiced) / max(1, len(f0))),
        syllables=syl,
        words=words,
        rate_sps=syl / speech_s if speech_s > 0 else 0.0,
        rate_wps=words / speech_s if speech_s > 0 else 0.0,
        level_dbfs=level,
        loudness_range_db=loudness_range_db(x, sample_rate, regions),
        stress_contrast_db=stress_contrast_db(peaks),
        peak_rate_hz=len(peaks) / speech_s if speech_s > 0 else 0.0,
        pause_ratio=float(max(0.0, span_s - speech_s) / span_s) if span_s > 0 else 0.0,
        snr_db=estimate_snr_db(x, regions),
    )


# ------------------------------------------------------------------------------------------- labels


def bin_ascending(value: float, cuts: Sequence[float]) -> int:
    """1 + number of cut points ``value`` reaches (so 1..5 for four cuts)."""
    return 1 + int(sum(value >= c for c in cuts))


def bin_distance(value: float, cuts: Sequence[float]) -> int:
    """5 for a distance within ``cuts[0]``, down to 1 beyond ``cuts[-1]``."""
    return 5 - int(sum(value > c for c in cuts))


EMOTION_AROUSAL: dict[str, float] = {
    "angry": 1.5,
    "excited": 1.3,
    "fearful": 1.0,
    "happy": 0.8,
    "defiant": 0.8,
    "neutral": 0.0,
    "sarcastic": -0.2,
    "tender": -0.8,
    "sad": -1.2,
    "weary": -1.4,
}
"""Intended arousal per emotion tag of the script bank, in the units of :func:`arousal_index`."""

STYLE_PROFILE: dict[str, tuple[float, float, float]] = {
    # style: (expected pitch-spread z, rate z, level z) relative to the corpus reference below.
    "Playful": (1.0, 0.5, 0.3),
    "Stern": (-0.8, -0.2, 0.6),
    "Anxious": (0.5, 1.0, -0.2),
    "Warm": (0.3, -0.3, -0.2),
    "Brooding": (-0.8, -0.8, -0.6),
    "Commanding": (0.0, 0.0, 1.0),
    "Sardonic": (-0.3, -0.5, 0.0),
    "Gentle": (0.2, -0.6, -0.8),
    "Charismatic": (0.8, 0.2, 0.4),
    "Weary": (-0.6, -1.0, -0.6),
}
"""Expected prosody profile of each character style (z-units: spread/2.5 st, log2 rate/0.25, level/4 dB)."""

REFERENCE_PROFILE = {"f0_spread_st": 5.0, "rate_sps": NATURAL_RATE_SPS, "level_dbfs": -22.0}
"""Centre of the style space; a clip with exactly these measures has profile (0, 0, 0)."""


def arousal_index(m: ProsodyMeasures, baseline: ProsodyMeasures | None) -> float:
    """Arousal of a clip relative to its speaker's baseline (0 = the speaker's typical delivery).

    Mean of three deviations, each scaled so ±1 is a clearly audible change: level (4 dB), mean F0
    (1.5 semitones) and speaking rate (log2 ratio 0.15). Without a baseline the reference profile
    stands in.
    """
    if baseline is None:
        level0, st0, rate0 = REFERENCE_PROFILE["level_dbfs"], 0.0, NATURAL_RATE_SPS
    else:
        level0, st0, rate0 = baseline.level_dbfs, baseline.f0_mean_st, max(baseline.rate_sps, 1e-3)
    d_level = (m.level_dbfs - level0) / 4.0
    d_pitch = (m.f0_mean_st - st0) / 1.5 if baseline is not None and m.f0_mean_hz > 0 else 0.0
    d_rate = math.log2(max(m.rate_sps, 1e-3) / rate0) / 0.15
    return float((d_level + d_pitch + d_rate) / 3.0)


def style_distance(m: ProsodyMeasures, style: str) -> float:
    """Distance between the clip's prosody profile and the profile its style word implies."""
    expected = STYLE_PROFILE.get(style, (0.0, 0.0, 0.0))
    measured = (
        (m.f0_spread_st - REFERENCE_PROFILE["f0_spread_st"]) / 2.5,
        math.log2(max(m.rate_sps, 1e-3) / REFERENCE_PROFILE["rate_sps"]) / 0.25,
        (m.level_dbfs - REFERENCE_PROFILE["level_dbfs"]) / 4.0,
    )
    return float(math.sqrt(sum((a - b) ** 2 for a, b in zip(measured, expected, strict=True)) / 3.0))


def realism_labels(
    m: ProsodyMeasures,
    *,
    emotion: str,
    style: str,
    speaker_f0_st: float,
    baseline: ProsodyMeasures | None = None,
) -> dict[str, int]:
    """Map measurements to the ten realism dimensions (1-5). Direct acoustic proxies:

    - pitch_variation: F0 spread (semitones), ``THRESHOLDS``.
    - rhythmic_naturalness: |log2(rate / 4.5 syl/s)|, minus one point when pauses exceed 35%.
    - stress_and_emphasis: syllable-peak contrast (dB).
    - dynamic_range: loudness range (dB).
    - voice_identity_matching: |mean F0 - speaker's mean F0| (semitones).

    Derived (no single acoustic proxy; documented combinations):

    - emotion_accuracy: |arousal - intended arousal of the line's emotion| (signed agreement).
    - emotion_intensity_control: ||arousal| - |intended arousal|| (magnitude only).
    - trait_embodiment: distance of (spread, rate, level) to the style's expected profile.
    - local_story_fit: round(mean(emotion_accuracy, rhythmic_naturalness)).
    - global_story_coherence: round(mean(voice_identity_matching, trait_embodiment)).
    """
    target = EMOTION_AROUSAL.get(emotion, 0.0)
    arousal = arousal_index(m, baseline)
    rhythm = bin_distance(
        abs(math.log2(max(m.rate_sps, 1e-3) / NATURAL_RATE_SPS)), DISTANCE_THRESHOLDS["rhythmic_naturalness"]
    )
    if m.pause_ratio > 0.35:
        rhythm = max(1, rhythm - 1)
    identity = bin_distance(
        abs(m.f0_mean_st - speaker_f0_st) if m.f0_mean_hz > 0 else 99.0,
        DISTANCE_THRESHOLDS["voice_identity_matching"],
    )
    accuracy = bin_distance(abs(arousal - target), DISTANCE_THRESHOLDS["emotion_accuracy"])
    intensity = bin_distance(
        abs(abs(arousal) - abs(target)), DISTANCE_THRESHOLDS["emotion_intensity_control"]
    )
    trait = bin_distance(style_distance(m, style), DISTANCE_THRESHOLDS["trait_embodiment"])
    return {
        "pitch_variation": bin_ascending(m.f0_spread_st, THRESHOLDS["pitch_variation"]),
        "rhythmic_naturalness": rhythm,
        "stress_and_emphasis": bin_ascending(m.stress_contrast_db, THRESHOLDS["stress_and_emphasis"]),
        "emotion_accuracy": accuracy,
        "emotion_intensity_control": intensity,
        "dynamic_range": bin_ascending(m.loudness_range_db, THRESHOLDS["dynamic_range"]),
        "voice_identity_matching": identity,
        "trait_embodiment": trait,
        "local_story_fit": _round_half_up((accuracy + rhythm) / 2.0),
        "global_story_coherence": _round_half_up((identity + trait) / 2.0),
    }


def archetype_labels(
    m: ProsodyMeasures,
    *,
    emotion: str,
    style: str,
    content_matches: bool,
    baseline: ProsodyMeasures | None = None,
) -> tuple[bool, dict[str, int]]:
    """Archetype labels: ``(content_pass, {audio_quality, human_likeness, appropriateness})``.

    - content_pass: the spoken line is the one the question asks for (a known fact of generation)
      AND speech was really produced at a plausible rate (1.5-9 syl/s, ≥ 20% voiced frames).
    - audio_quality: measured SNR (dB), ``THRESHOLDS``.
    - human_likeness: round(0.4·rhythm + 0.4·pitch naturalness + 0.2·audio_quality), where pitch
      naturalness is 5 at a 5-semitone spread and loses a point per 1.5 st away (monotone = robotic).
    - appropriateness: round(mean(emotion_accuracy, trait_embodiment)), capped at 2 on a content miss.
    """
    plausible = 1.5 <= m.rate_sps <= 9.0 and m.voiced_ratio >= 0.2
    content_pass = bool(content_matches and plausible)
    quality = bin_ascending(m.snr_db, THRESHOLDS["audio_quality"])
    rhythm = bin_distance(
        abs(math.log2(max(m.rate_sps, 1e-3) / NATURAL_RATE_SPS)), DISTANCE_THRESHOLDS["rhythmic_naturalness"]
    )
    pitch_nat = int(np.clip(5 - int(abs(m.f0_spread_st - NATURAL_F0_SPREAD_ST) // 1.5), 1, 5))
    human = _round_half_up(0.4 * rhythm + 0.4 * pitch_nat + 0.2 * quality)
    target = EMOTION_AROUSAL.get(emotion, 0.0)
    accuracy = bin_distance(abs(arousal_index(m, baseline) - target), DISTANCE_THRESHOLDS["emotion_accuracy"])
    trait = bin_distance(style_distance(m, style), DISTANCE_THRESHOLDS["trait_embodiment"])
    appropriate = _round_half_up((accuracy + trait) / 2.0)
    if not content_pass:
        appropriate = min(appropriate, 2)
    return content_pass, {
        "audio_quality": quality,
        "human_likeness": int(np.clip(human, 1, 5)),
        "appropriateness": appropriate,
    }


def _round_half_up(value: float) -> int:
    """Round .5 up (Python's round() is banker's rounding, which would bias 2.5 and 4.5 down)."""
    return math.floor(value + 0.5)


def rater_scores(
    label: int, rng: np.random.Generator, rater_bias: Sequence[float], *, noise_sd: float = 0.55
) -> list[int]:
    """Noisy copies of a label, one per rater: label + that rater's bias + item noise, clipped 1..5.

    Real Speech-DRAME items carry six human scores that disagree; an evaluator trained on them must
    learn the mean, so the synthetic raters disagree in the same way (a fixed per-rater bias plus
    per-item noise).
    """
    noise = rng.normal(0.0, noise_sd, size=len(rater_bias))
    return [int(np.clip(_round_half_up(label + b + e), 1, 5)) for b, e in zip(rater_bias, noise, strict=True)]


def rater_bools(value: bool, rng: np.random.Generator, n_raters: int, *, flip_p: float = 0.08) -> list[bool]:
    """Noisy boolean judgements: each rater disagrees with the true value with probability ``flip_p``."""
    flips = rng.random(n_raters) < flip_p
    return [bool(value) != bool(f) for f in flips]
