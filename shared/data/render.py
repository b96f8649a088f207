"""Render one line of text for a synthetic speaker: espeak-ng → sox → 16 kHz mono float32.

Three things matter more than sound quality here:

* **Exact speech regions.** Renders are clean (noise is added later), so silence can be trimmed
  exactly by energy and every region is known to the sample; RTTM files built from them are exact.
* **Acting variation.** Each line gets its own pitch, speed, loudness, pitch range, emphasis and
  dynamics (drawn from a seeded RNG and shaped by the line's emotion), so prosody labels vary
  between lines rather than only between speakers.
* **Determinism.** espeak-ng and sox are deterministic (sox runs with ``-R`` and without dither;
  output is float so nothing is requantised), and noise comes from numpy with an explicit seed, so
  the same seed gives byte-identical files.

Rendering is I/O-bound on two subprocesses, so a ThreadPoolExecutor parallelises it well.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from .prosody import Region, detect_speech_regions
from .voices import PITCH_RANGES, ChannelEffects, VoiceProfile

logger = logging.getLogger(__name__)

ESPEAK = "espeak-ng"
SOX = "sox"
HEADROOM_DB = 9.0
"""Attenuation at the head of the sox chain (undone in float) so pitch/reverb/gain never clip."""
MAX_AMPLITUDE = 115
"""espeak-ng clips its own output above roughly -a 130 for loud voices."""

EMOTION_ACTING: dict[str, tuple[int, float, float, int]] = {
    # emotion: (espeak pitch offset, speed factor, amplitude factor, pitch-range step offset).
    # Pitch offsets are modest (a few semitones at full commitment): emotion should move a voice,
    # not turn it into another speaker.
    "angry": (3, 1.12, 1.55, 1),
    "excited": (5, 1.15, 1.3, 1),
    "fearful": (6, 1.18, 0.9, 1),
    "happy": (4, 1.06, 1.15, 1),
    "defiant": (2, 1.05, 1.3, 0),
    "neutral": (0, 1.0, 1.0, 0),
    "sarcastic": (-1, 0.92, 1.0, 1),
    "tender": (-2, 0.88, 0.7, 0),
    "sad": (-4, 0.82, 0.62, -1),
    "weary": (-5, 0.8, 0.6, -1),
}
"""How an actor moves away from their neutral delivery for each emotion tag of the script bank."""


@dataclass(frozen=True)
class Acting:
    """Per-line performance: everything that varies between two lines of the same speaker."""

    emotion: str
    pitch: int
    speed: int
    amplitude: int
    range_step: int
    emphasis: tuple[int, ...] = ()
    dynamics: str = "flat"  # "flat" | "crescendo" | "decrescendo"
    tempo: float = 1.0
    shift_cents: float = 0.0
    gain_db: float = 0.0
    commitment: float = 1.0  # 0 = ignored the emotion, 1 = as directed, >1 = overacted

    def to_dict(self) -> dict[str, object]:
        """JSON-ready copy for manifests."""
        d = asdict(self)
        d["emphasis"] = list(self.emphasis)
        return d


@dataclass
class RenderedUtterance:
    """A clean, trimmed rendering. ``regions`` are speech regions in sample indices of ``samples``.

    ``samples[0]`` is the first and ``samples[-1]`` the last speech sample (by the energy rule of
    :func:`prosody.detect_speech_regions`), so ``regions[0][0] == 0`` and ``regions[-1][1] == len``.
    """

    text: str
    speaker_id: str
    samples: np.ndarray
    sample_rate: int
    regions: list[Region]
    acting: Acting
    channel: ChannelEffects | None = None
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        """Length in seconds (= speech span, since the rendering is trimmed)."""
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class RenderJob:
    """One thing to render; ``key`` is opaque to the renderer and returned in ``meta['key']``."""

    key: str
    text: str
    voice: VoiceProfile
    acting: Acting
    channel: ChannelEffects | None = None


def draw_acting(voice: VoiceProfile, emotion: str, rng: np.random.Generator, *, n_words: int) -> Acting:
    """Draw a line's performance from ``rng``: the emotion's direction times a random commitment.

    Commitment is usually near 1 but sometimes ~0 (the actor plays it flat) or ~1.8 (overacting), so
    emotion_accuracy / intensity labels are not all 5. Small independent jitters on pitch, speed,
    level and sox tempo keep two neutral lines of one speaker from being identical.
    """
    d_pitch, speed_f, amp_f, d_range = EMOTION_ACTING.get(emotion, EMOTION_ACTING["neutral"])
    u = rng.random()
    commitment = 0.0 if u < 0.12 else (1.8 if u < 0.22 else float(rng.uniform(0.7, 1.2)))
    pitch = voice.pitch + commitment * d_pitch + rng.normal(0.0, 1.5)
    speed = voice.speed * speed_f**commitment * float(np.exp(rng.normal(0.0, 0.04)))
    amplitude = voice.amplitude * amp_f**commitment * float(np.exp(rng.normal(0.0, 0.08)))
    range_step = voice.range_step + round(commitment * d_range) + int(rng.choice([-1, 0, 0, 0, 1]))
    n_emph = int(rng.choice([0, 0, 1, 1, 2])) if n_words > 2 else 0
    emphasis = (
        tuple(sorted(int(i) for i in rng.choice(n_words, size=n_emph, replace=False))) if n_emph else ()
    )
    dynamics = (
        str(rng.choice(["flat", "flat", "flat", "crescendo", "decrescendo"])) if n_words > 3 else "flat"
    )
    return Acting(
        emotion=emotion,
        pitch=int(np.clip(round(pitch), 0, 99)),
        speed=int(np.clip(round(speed), 80, 320)),
        amplitude=int(np.clip(round(amplitude), 10, MAX_AMPLITUDE)),
        range_step=int(np.clip(range_step, 0, len(PITCH_RANGES) - 1)),
        emphasis=emphasis,
        dynamics=dynamics,
        tempo=float(round(rng.uniform(0.97, 1.03), 4)),
        shift_cents=float(round(rng.normal(0.0, 20.0), 1)),
        gain_db=float(round(rng.uniform(-1.5, 1.5), 2)),
        commitment=float(round(commitment, 3)),
    )


def build_ssml(text: str, acting: Acting) -> str:
    """SSML for espeak-ng: the pitch range for the whole line, ``<emphasis>`` on chosen words and a
    loudness step on the second half for crescendo/decrescendo lines."""
    words = text.split()
    parts = []
    half = len(words) // 2
    for i, w in enumerate(words):
        token = escape(w)
        if i in acting.emphasis:
            token = f'<emphasis level="strong">{token}</emphasis>'
        parts.append(token)
    if acting.dynamics in ("crescendo", "decrescendo") and half > 0:
        volume = "x-loud" if acting.dynamics == "crescendo" else "x-soft"
        body = (
            " ".join(parts[:half]) + f' <prosody volume="{volume}">' + " ".join(parts[half:]) + "</prosody>"
        )
    else:
        body = " ".join(parts)
    rng_kw = PITCH_RANGES[acting.range_step]
    return f'<speak><prosody range="{rng_kw}">{body}</prosody></speak>'


def espeak_command(voice: VoiceProfile, acting: Acting, wav_path: Path) -> list[str]:
    """espeak-ng argv (text comes on stdin as SSML)."""
    return [
        ESPEAK,
        "-m",
        "--stdin",
        "-v",
        voice.espeak_voice,
        "-p",
        str(acting.pitch),
        "-s",
        str(acting.speed),
        "-a",
        str(acting.amplitude),
        "-w",
        str(wav_path),
    ]


def sox_command(in_path: Path | str, voice: VoiceProfile, acting: Acting, sample_rate: int) -> list[str]:
    """sox argv: speaker identity (pitch shift, tempo, reverb, gain) + per-line jitter, then
    ``rate`` and ``channels 1``; writes raw little-endian float32 to stdout.

    sox processes in 32-bit integers and clips inside effects, so the chain starts ``HEADROOM_DB``
    down and :func:`render_line` restores the level in float.
    """
    effects = [
        "gain",
        f"{-HEADROOM_DB:.1f}",
        "pitch",
        f"{voice.shift_cents + acting.shift_cents:.1f}",
        "tempo",
        "-s",
        f"{voice.tempo * acting.tempo:.4f}",
    ]
    if voice.reverb > 0.5:
        effects += ["reverb", f"{voice.reverb:.1f}", "50", f"{voice.room_scale:.1f}", "100", "0", "0"]
    effects += [
        "gain",
        f"{voice.gain_db + acting.gain_db:.2f}",
        "rate",
        "-v",
        str(sample_rate),
        "channels",
        "1",
    ]
    return [
        SOX,
        "-R",
        "-D",
        "-V1",
        str(in_path),
        "-t",
        "raw",
        "-e",
        "floating-point",
        "-b",
        "32",
        "-L",
        "-r",
        str(sample_rate),
        "-c",
        "1",
        "-",
        *effects,
    ]


def check_tools() -> None:
    """Fail early with a clear message when espeak-ng or sox is missing (they are system packages)."""
    missing = [t for t in (ESPEAK, SOX) if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing system tools: {', '.join(missing)} (apt-get install espeak-ng sox)")


def apply_channel(samples: np.ndarray, sample_rate: int, channel: ChannelEffects) -> np.ndarray:
    """Run a session's channel (band limits, EQ, gain) through sox on float samples."""
    cmd = [
        SOX,
        "-R",
        "-D",
        "-V1",
        "-t",
        "raw",
        "-e",
        "floating-point",
        "-b",
        "32",
        "-L",
        "-r",
        str(sample_rate),
        "-c",
        "1",
        "-",
        "-t",
        "raw",
        "-e",
        "floating-point",
        "-b",
        "32",
        "-L",
        "-",
        *channel.sox_effects(),
    ]
    out = subprocess.run(
        cmd, input=np.asarray(samples, dtype="<f4").tobytes(), capture_output=True, check=True
    )
    y = np.frombuffer(out.stdout, dtype="<f4").astype(np.float32)
    if len(y) != len(samples):  # sox filters keep the length; guard so regions stay valid
        y = np.pad(y, (0, max(0, len(samples) - len(y))))[: len(samples)]
    return y


def render_line(
    text: str,
    voice: VoiceProfile,
    acting: Acting,
    *,
    sample_rate: int = 16000,
    channel: ChannelEffects | None = None,
) -> RenderedUtterance:
    """Render ``text`` clean, trim it exactly, and find its speech regions.

    The channel (if any) is applied after the regions are found: band-limiting can blur the edges
    the energy rule relies on, while timing is unchanged by it.
    """
    ssml = build_ssml(text, acting)
    with tempfile.TemporaryDirectory(prefix="dramaturg-tts-") as tmp:
        wav = Path(tmp) / "espeak.wav"
        subprocess.run(
            espeak_command(voice, acting, wav), input=ssml.encode(), capture_output=True, check=True
        )
        out = subprocess.run(sox_command(wav, voice, acting, sample_rate), capture_output=True, check=True)
    x = np.frombuffer(out.stdout, dtype="<f4").astype(np.float32) * np.float32(10.0 ** (HEADROOM_DB / 20.0))
    regions = detect_speech_regions(x, sample_rate)
    if not regions:
        raise RuntimeError(f"espeak-ng produced no speech for {voice.espeak_voice!r}: {text!r}")
    a, b = regions[0][0], regions[-1][1]
    x = np.ascontiguousarray(x[a:b])
    regions = [(s - a, e - a) for s, e in regions]
    if channel is not None:
        x = apply_channel(x, sample_rate, channel)
    return RenderedUtterance(
        text=text,
        speaker_id=voice.speaker_id,
        samples=x,
        sample_rate=sample_rate,
        regions=regions,
        acting=acting,
        channel=channel,
    )


def render_batch(
    jobs: Sequence[RenderJob],
    *,
    sample_rate: int = 16000,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[RenderedUtterance]:
    """Render jobs in parallel; results come back in job order (determinism does not depend on timing)."""
    check_tools()

    def one(job: RenderJob) -> RenderedUtterance:
        utt = render_line(job.text, job.voice, job.acting, sample_rate=sample_rate, channel=job.channel)
        utt.meta["key"] = job.key
        return utt

    results: list[RenderedUtterance] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for utt in pool.map(one, jobs):
            results.append(utt)
            if progress is not None:
                progress(1)
    return results


# ---------------------------------------------------------------------------------------------- noise


def pink_noise(n: int, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """Unit-RMS pink (1/f power) noise from numpy: room tone sounds closer to pink than to white.

    The 1/f slope stops at 100 Hz and nothing is left below 30 Hz: true 1/f noise puts most of its
    power in sub-audible drift, which would make frame energies swing by many dB for no audible reason.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.float64)
    n_fft = 1 << max(0, (n - 1).bit_length())  # odd lengths make pocketfft ~100x slower
    white = rng.standard_normal(n_fft)
    spec = np.fft.rfft(white)
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    spec /= np.sqrt(np.maximum(f, 100.0))
    spec[f < 30.0] = 0.0
    y = np.fft.irfft(spec, n_fft)[:n]
    y -= y.mean()
    return y / (np.sqrt(np.mean(y * y)) + 1e-12)


def add_noise(
    samples: np.ndarray,
    snr_db: float,
    rng: np.random.Generator,
    regions: Sequence[Region] | None = None,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Add seeded pink noise at ``snr_db`` relative to the mean power inside ``regions`` (the whole
    signal when None), so the SNR means "speech level over noise level" as a listener hears it."""
    x = np.asarray(samples, dtype=np.float64)
    inside = np.concatenate([x[a:b] for a, b in regions]) if regions else x
    p_speech = float(np.mean(inside * inside)) if len(inside) else 0.0
    noise = pink_noise(len(x), rng, sample_rate) * np.sqrt(p_speech / 10.0 ** (snr_db / 10.0))
    return x + noise


def protect_clipping(samples: np.ndarray, ceiling: float = 0.97) -> np.ndarray:
    """Scale the whole signal down if it would clip (scaling keeps every region and ratio intact)."""
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak > ceiling:
        samples = samples * (ceiling / peak)
    return samples


def pad_clip(
    samples: np.ndarray, regions: Sequence[Region], lead: int, tail: int
) -> tuple[np.ndarray, list[Region]]:
    """Pad with digital silence (noise is added afterwards) and shift regions accordingly."""
    y = np.concatenate([np.zeros(lead), np.asarray(samples, dtype=np.float64), np.zeros(tail)])
    return y, [(a + lead, b + lead) for a, b in regions]
