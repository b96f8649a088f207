"""From plan to audio: render every planned line, channel the session lines, mix scenes, cut clips.

The result, :class:`RenderedCorpus`, is everything a writer needs and nothing is written yet: writers
only format and save it, so each can run on its own (and in any order) over the same rendering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .clips import Clip, SpeakerNorms, cut_clips, measure_clips, speaker_norms
from .mixdown import MixedScene, mix_scene
from .plan import CorpusPlan, PlannedLine
from .render import RenderedUtterance, apply_channel, render_batch

logger = logging.getLogger(__name__)

TickFn = Callable[[str, int], None]
"""``tick(stage, units)``: ``units`` more work units of ``stage`` are done (see :func:`work_units`)."""


@dataclass(frozen=True)
class RenderedCorpus:
    """The plan with its audio: studio renderings by key, mixed scenes, measured clips, speaker norms."""

    plan: CorpusPlan
    rendered: Mapping[str, RenderedUtterance]
    scenes: tuple[MixedScene, ...]
    clips: tuple[Clip, ...]
    norms: SpeakerNorms

    @property
    def sample_rate(self) -> int:
        return self.plan.config.sample_rate

    def clips_of(self, kind: str) -> list[Clip]:
        """Clips of one kind (``role``, ``session`` or ``enroll``), in corpus order."""
        return [c for c in self.clips if c.kind == kind]


def work_units(plan: CorpusPlan) -> int:
    """Progress units of :func:`render_corpus`: render every job, channel every session utterance, mix
    every scene, measure every clip (one clip per job)."""
    jobs = len(plan.render_jobs())
    return jobs + plan.n_session_utterances + len(plan.scenes) + jobs


def render_corpus(plan: CorpusPlan, tick: TickFn | None = None) -> RenderedCorpus:
    """Render and measure everything the plan describes (espeak-ng + sox, in ``workers`` threads)."""
    config = plan.config
    sr = config.sample_rate

    def done(stage: str, n: int = 1) -> None:
        if tick is not None:
            tick(stage, n)

    jobs = plan.render_jobs()
    logger.info("rendering %d lines with %d workers", len(jobs), config.workers)
    rendered = render_batch(
        jobs, sample_rate=sr, workers=config.workers, progress=lambda n: done("render", n)
    )
    by_key = {str(u.meta["key"]): u for u in rendered}
    session_lines = [spoken for lines in plan.sessions.values() for spoken in lines]

    def channel(spoken: PlannedLine) -> np.ndarray:
        assert spoken.session is not None
        return apply_channel(by_key[spoken.key].samples, sr, spoken.session)

    channelled: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=config.workers) as ex:
        outputs = ex.map(channel, session_lines)
        for spoken, y in zip(session_lines, outputs, strict=True):
            channelled[spoken.key] = y
            done("channel")
    scenes = []
    for planned in plan.scenes:
        scenes.append(mix_scene(planned, by_key, config))
        done("scenes")
    clips = cut_clips(plan, scenes, by_key, channelled)
    clips = measure_clips(clips, sr, config.workers, lambda: done("measure"))
    return RenderedCorpus(plan, by_key, tuple(scenes), tuple(clips), speaker_norms(plan.pool, clips))
