"""Standalone clips cut from the renderings, with noise, and the prosody measured on them.

Three kinds, each written by more than one writer: ``role`` (every scene turn on its own: evaluator
realism items, audio-LLM items), ``session`` (speaker-corpus utterances through their session's
channel: VoxCeleb tree, archetype items) and ``enroll`` (casting references). Labels are derived from
what was measured on these exact samples, and :class:`SpeakerNorms` from all of a speaker's clips, so
measurement happens once here rather than in each writer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import numpy as np

from . import seeds
from .mixdown import SCENE_SNR_DB, MixedScene
from .plan import SPLITS, CorpusPlan, PlannedLine, PlannedScene
from .prosody import ProsodyMeasures, Region, measure_prosody
from .render import RenderedUtterance, add_noise, pad_clip, protect_clipping
from .scripts import ScriptLine
from .voices import VoiceProfile

CLIP_PAD_S = 0.3
"""Noise-only padding around standalone clips: keeps the SNR measurable and mimics real cuts."""


@dataclass(frozen=True)
class Clip:
    """A standalone clip as written (noise added), with its measurements once measured.

    ``rel_path`` is the kind's own relative path (writers place it under their tree). Role clips keep
    their scene and the line spoken just before (None when they open it) for the evaluator's prompts.
    """

    kind: str  # "role" | "session" | "enroll"
    voice: VoiceProfile
    line: ScriptLine
    samples: np.ndarray
    regions: list[Region]
    rel_path: str
    split: str
    scene: PlannedScene | None = None
    prev: PlannedLine | None = None
    measures: ProsodyMeasures | None = None


@dataclass(frozen=True)
class SpeakerNorms:
    """Per speaker: median F0 over all clips, and the typical delivery in studio and in session clips."""

    f0_st: Mapping[str, float]
    baseline: Mapping[tuple[str, str], ProsodyMeasures]
    """``(speaker_id, "studio" | "session")`` → field-wise median measures."""


def cut_clips(
    plan: CorpusPlan,
    scenes: Sequence[MixedScene],
    rendered: Mapping[str, RenderedUtterance],
    channelled: Mapping[str, np.ndarray],
) -> list[Clip]:
    """Every role clip (scene order), then per speaker its session clips and its enrollment clips."""
    seed = plan.config.seed
    clips: list[Clip] = []
    for scene in scenes:
        split_idx = SPLITS.index(scene.split)
        for j, turn in enumerate(scene.turns):
            noise = seeds.rng(seed, seeds.NOISE, seeds.NOISE_ROLE, split_idx, scene.plan.index, j)
            y, regions = noisy_clip(turn.utt, turn.utt.samples, SCENE_SNR_DB, noise)
            clips.append(
                Clip(
                    "role",
                    turn.planned.voice,
                    turn.planned.line,
                    y,
                    regions,
                    f"wav/role/{scene.uri}_{j:02d}.wav",
                    "test" if scene.split == "test" else "train",
                    scene=scene.plan,
                    prev=scene.turns[j - 1].planned if j else None,
                )
            )
    for idx, voice in enumerate(plan.pool):
        split = "test" if voice.speaker_id in plan.heldout_ids else "train"
        counters: dict[str, int] = {}
        for j, spoken in enumerate(plan.sessions[voice.speaker_id]):
            assert spoken.session is not None
            session_id = spoken.session.session_id
            n = counters[session_id] = counters.get(session_id, 0) + 1
            noise = seeds.rng(seed, seeds.NOISE, seeds.NOISE_SESSION, idx, j)
            y, regions = noisy_clip(
                rendered[spoken.key], channelled[spoken.key], spoken.session.snr_db, noise
            )
            rel = f"{voice.speaker_id}/{session_id}/{n:05d}.wav"
            clips.append(Clip("session", voice, spoken.line, y, regions, rel, split))
        for j, spoken in enumerate(plan.enrollment[voice.speaker_id]):
            utt = rendered[spoken.key]
            noise = seeds.rng(seed, seeds.NOISE, seeds.NOISE_ENROLL, idx, j)
            y, regions = noisy_clip(utt, utt.samples, SCENE_SNR_DB, noise)
            line = ScriptLine("neutral", "", utt.text)  # read neutrally, whatever the bank line's emotion
            clips.append(Clip("enroll", voice, line, y, regions, f"{voice.speaker_id}/{j:02d}.wav", "enroll"))
    return clips


def noisy_clip(
    utt: RenderedUtterance,
    samples: np.ndarray,
    snr_db: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[Region]]:
    """Pad a trimmed rendering with ``CLIP_PAD_S`` each side and add noise at ``snr_db``."""
    pad = int(CLIP_PAD_S * utt.sample_rate)
    y, regions = pad_clip(samples, utt.regions, pad, pad)
    y = add_noise(y, snr_db, rng, regions, utt.sample_rate)
    return protect_clipping(y), regions


def measure_clips(
    clips: Sequence[Clip], sample_rate: int, workers: int, tick: Callable[[], None] | None = None
) -> list[Clip]:
    """The clips with their prosody measured (in parallel, results in clip order); ``tick`` per clip."""
    measured = []
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for clip, m in zip(
            clips,
            ex.map(lambda c: measure_prosody(c.samples, sample_rate, c.line.text, c.regions), clips),
            strict=True,
        ):
            measured.append(replace(clip, measures=m))
            if tick is not None:
                tick()
    return measured


def speaker_norms(pool: Sequence[VoiceProfile], clips: Sequence[Clip]) -> SpeakerNorms:
    """What the realism and archetype labels compare a clip with: the speaker's own typical delivery."""
    f0_st: dict[str, float] = {}
    baseline: dict[tuple[str, str], ProsodyMeasures] = {}
    for voice in pool:
        sid = voice.speaker_id
        mine = [(c.kind, m) for c in clips if c.voice.speaker_id == sid and (m := c.measures) is not None]
        voiced = [m.f0_mean_st for _, m in mine if m.f0_mean_hz > 0]
        f0_st[sid] = float(np.median(voiced)) if voiced else 0.0
        baseline[(sid, "studio")] = median_measures([m for kind, m in mine if kind != "session"])
        baseline[(sid, "session")] = median_measures([m for kind, m in mine if kind == "session"])
    return SpeakerNorms(f0_st, baseline)


def median_measures(items: Sequence[ProsodyMeasures]) -> ProsodyMeasures:
    """Field-wise median: a speaker's typical delivery (robust to one overacted line)."""
    values = {}
    for f in fields(ProsodyMeasures):
        col = [getattr(m, f.name) for m in items]
        if f.name in ("f0_mean_hz", "f0_mean_st"):
            col = [c for c, m in zip(col, items, strict=True) if m.f0_mean_hz > 0] or [0.0]
        med = float(np.median(col))
        values[f.name] = round(med) if f.type in (int, "int") else med
    return ProsodyMeasures(**values)
