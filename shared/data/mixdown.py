"""A scene's mixdown: lay its rendered turns on a timeline (gaps, overlaps), mix, add room tone.

Placement needs the rendered durations, so it happens after rendering, from its own seed key; the
result (:class:`MixedScene`) holds the samples and the exact sample offsets of every speech region,
from which the diarization writer's RTTM and the manifest's overlap figures are both derived.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import seeds
from .config import SynthConfig
from .plan import SPLITS, PlannedLine, PlannedScene
from .render import RenderedUtterance, add_noise, protect_clipping

SCENE_SNR_DB = 25.0
"""Fixed, low background-noise level of scenes, realism clips and enrollment lines: speech sits 25 dB
above pink room tone. Low enough to be clearly audible (models must not rely on digital silence),
high enough that the quietest speech in a turn stays above it, so the RTTM marks audible speech."""
SCENE_LEVEL_DBFS = -24.0
SCENE_LEVEL_SPREAD_DB = 4.0


@dataclass(frozen=True)
class PlacedTurn:
    """A planned line with its rendering and its first sample in the scene."""

    planned: PlannedLine
    utt: RenderedUtterance
    start: int

    @property
    def end(self) -> int:
        """One past the turn's last sample in the scene."""
        return self.start + len(self.utt.samples)


@dataclass(frozen=True)
class MixedScene:
    """A scene as heard: the planned scene, its placed turns and the mixed, noisy samples."""

    plan: PlannedScene
    turns: tuple[PlacedTurn, ...]
    samples: np.ndarray
    sample_rate: int

    @property
    def uri(self) -> str:
        return self.plan.uri

    @property
    def split(self) -> str:
        return self.plan.split

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    def speech_rows(self) -> list[tuple[int, int, str]]:
        """``(start, end, speaker_id)`` of every speech region in scene samples, sorted by onset."""
        rows = [
            (turn.start + a, turn.start + b, turn.planned.voice.speaker_id)
            for turn in self.turns
            for a, b in turn.utt.regions
        ]
        rows.sort()
        return rows

    def overlap_s(self) -> float:
        """Seconds where two or more speakers' regions overlap (from the same regions as the RTTM)."""
        count = np.zeros(len(self.samples), dtype=np.int16)
        for turn in self.turns:
            for a, b in turn.utt.regions:
                count[turn.start + a : turn.start + b] += 1
        return float(np.sum(count >= 2) / self.sample_rate)


def mix_scene(
    scene: PlannedScene, rendered: Mapping[str, RenderedUtterance], config: SynthConfig
) -> MixedScene:
    """Place the scene's turns, mix them at their engineered gains, and add room tone at SCENE_SNR_DB."""
    sr = config.sample_rate
    utts = [rendered[turn.key] for turn in scene.turns]
    starts, total = _place(
        utts, config, seeds.rng(config.seed, seeds.PLACE, SPLITS.index(scene.split), scene.index)
    )
    turns = tuple(PlacedTurn(p, u, s) for p, u, s in zip(scene.turns, utts, starts, strict=True))
    mix = np.zeros(total, dtype=np.float64)
    for turn in turns:
        mix[turn.start : turn.end] += turn.utt.samples * _mix_gain(turn.utt)
    mix = protect_clipping(mix)
    regions = [(turn.start + a, turn.start + b) for turn in turns for a, b in turn.utt.regions]
    noise_rng = seeds.rng(config.seed, seeds.NOISE, seeds.NOISE_SCENE, SPLITS.index(scene.split), scene.index)
    mix = add_noise(mix, SCENE_SNR_DB, noise_rng, regions, sr)
    return MixedScene(scene, turns, protect_clipping(mix), sr)


def _place(
    utts: list[RenderedUtterance], config: SynthConfig, rng: np.random.Generator
) -> tuple[list[int], int]:
    """Start sample of every turn and the scene's length: gaps, or (with overlap_probability) a start
    before the previous end.

    Invariants that keep the RTTM meaningful: a turn may only overlap the turn right before it (so at
    most two voices at once and never a speaker with itself), and starts ≥ 0.3 s after it.
    """
    sr = config.sample_rate
    starts: list[int] = []
    ends: list[int] = []
    for i, utt in enumerate(utts):
        if i == 0:
            start = int(rng.uniform(0.3, 0.8) * sr)
        else:
            prev = utts[i - 1]
            floor = starts[i - 1] + int(0.3 * sr)
            if i >= 2:
                floor = max(floor, max(ends[: i - 1]) + int(0.1 * sr))
            gap = int(rng.uniform(0.15, 1.0) * sr)
            want_overlap = rng.random() < config.overlap_probability
            max_ov = min(1.2, 0.5 * prev.duration_s, 0.5 * utt.duration_s)
            ov = rng.uniform(0.2, max(0.2, max_ov))
            if want_overlap and max_ov >= 0.2:
                start = max(ends[i - 1] - int(ov * sr), floor)
                if start >= ends[i - 1]:
                    start = max(ends[i - 1] + gap, floor)
            else:
                start = max(ends[i - 1] + gap, floor)
        starts.append(start)
        ends.append(start + len(utt.samples))
    tail = int(rng.uniform(0.4, 0.9) * sr)
    return starts, max(ends) + tail


def _mix_gain(utt: RenderedUtterance) -> float:
    """Gain a mixing engineer would apply: halve the distance to ``SCENE_LEVEL_DBFS`` and never leave
    a turn more than ``SCENE_LEVEL_SPREAD_DB`` from it.

    Loud lines stay louder than soft ones, but no turn sinks into the scene's noise floor (the RTTM
    would then mark inaudible speech) or dwarfs its partner.
    """
    inside = np.concatenate([utt.samples[a:b] for a, b in utt.regions]).astype(np.float64)
    level = 10.0 * np.log10(float(np.mean(inside * inside)) + 1e-12)
    wanted = SCENE_LEVEL_DBFS + float(
        np.clip(0.5 * (level - SCENE_LEVEL_DBFS), -SCENE_LEVEL_SPREAD_DB, SCENE_LEVEL_SPREAD_DB)
    )
    return float(10.0 ** ((wanted - level) / 20.0))
