"""The corpus plan: every decision that does not need audio, made from the seed before anything renders.

Which scenes exist, who is cast, their setting, who speaks which line in what order, each speaker's
recording sessions and standalone lines, the enrollment lines, and how every line is to be acted (the
prosody targets of :class:`render.Acting`). Placement on a scene's timeline needs the rendered
durations and is done later (``mixdown.py``). A plan is a pure value: the same config and bank give an
equal plan, which is what lets each writer be tested on its own.

Where lines come from (``SynthConfig.text_source``): ``bank`` draws every line from the script bank,
so all splits speak the same few dozen lines; ``grammar`` draws from the generated sentences
(``sentences.py``), each part of the corpus from its own text split — train scenes and training
speakers from ``train``, development scenes from ``dev``, test scenes and held-out speakers from
``test`` — so no evaluation sentence is ever heard in training. Scene settings always come from the bank.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import seeds
from .config import SynthConfig
from .render import Acting, RenderJob, draw_acting
from .scripts import ScriptBank, ScriptLine, default_script_bank
from .sentences import TEXT_SPLITS, default_sentences, split_sentences
from .voices import ChannelEffects, VoiceProfile, make_sessions, make_voice_pool

SPLITS = ("train", "development", "test")
SPLIT_PREFIX = {"train": "train", "development": "dev", "test": "test"}
"""Scene URIs are ``{prefix}_{index:03d}``."""
ENROLL_LINES = 2
"""Enrollment (casting reference) lines per speaker."""
SCENE_TEXT_SPLIT = {"train": "train", "development": "dev", "test": "test"}
"""The text split (``sentences.TEXT_SPLITS``) each scene split draws its lines from."""


@dataclass(frozen=True)
class PlannedLine:
    """One line to render: its key, who says it, the bank line, and how it is acted.

    ``session`` is the recording session of a speaker-corpus utterance: its channel is applied after
    rendering (the studio rendering also feeds the TTS tree), so it is never part of the render job.
    """

    key: str
    voice: VoiceProfile
    line: ScriptLine
    acting: Acting
    session: ChannelEffects | None = None

    def job(self) -> RenderJob:
        """What the renderer needs (no channel: see the class docstring)."""
        return RenderJob(self.key, self.line.text, self.voice, self.acting)


@dataclass(frozen=True)
class PlannedScene:
    """A scene before placement: its URI, split, index within the split, setting, cast and turns."""

    uri: str
    split: str
    index: int
    setting: str
    cast: tuple[VoiceProfile, ...]
    turns: tuple[PlannedLine, ...]


@dataclass(frozen=True)
class CorpusPlan:
    """Everything to render, in the order it is rendered; ``pool`` is training speakers, then held-out."""

    config: SynthConfig
    bank: ScriptBank
    pool: tuple[VoiceProfile, ...]
    scenes: tuple[PlannedScene, ...]
    sessions: Mapping[str, tuple[PlannedLine, ...]]
    """Speaker id → speaker-corpus utterances (each with its recording session)."""
    enrollment: Mapping[str, tuple[PlannedLine, ...]]
    """Speaker id → enrollment lines, read neutrally."""
    texts: Mapping[str, ScriptBank]
    """Text split (``train``, ``dev``, ``test``) → the lines that part of the corpus draws from; with
    ``text_source="bank"`` all three are :attr:`bank`."""

    @property
    def train_pool(self) -> tuple[VoiceProfile, ...]:
        """Speakers that speaker training may see (and the only ones cast in training scenes)."""
        return self.pool[: self.config.num_speakers - self.config.heldout_speakers]

    @property
    def heldout_pool(self) -> tuple[VoiceProfile, ...]:
        """Speakers kept for the trials."""
        return self.pool[self.config.num_speakers - self.config.heldout_speakers :]

    @property
    def heldout_ids(self) -> frozenset[str]:
        """Speaker ids of :attr:`heldout_pool`."""
        return frozenset(v.speaker_id for v in self.heldout_pool)

    @property
    def n_session_utterances(self) -> int:
        """Utterances in the speaker corpus (= TTS clips = archetype items)."""
        return sum(len(lines) for lines in self.sessions.values())

    def render_jobs(self) -> list[RenderJob]:
        """Scene lines, then per speaker its utterances and enrollment lines (keys are unique)."""
        jobs = [turn.job() for scene in self.scenes for turn in scene.turns]
        for voice in self.pool:
            jobs += [p.job() for p in self.sessions[voice.speaker_id]]
            jobs += [p.job() for p in self.enrollment[voice.speaker_id]]
        return jobs


def plan_corpus(config: SynthConfig, bank: ScriptBank | None = None) -> CorpusPlan:
    """The whole plan for ``config``: settings from ``bank`` (default: scripts.yaml), lines from it or,
    with ``text_source="grammar"``, from the generated sentences' text splits (module docstring)."""
    bank = default_script_bank() if bank is None else bank
    texts = text_banks(config, bank)
    if config.text_source == "grammar":
        bank = grammar_bank(bank.settings)
    pool = tuple(make_voice_pool(config.num_speakers, config.seed))
    n_train = config.num_speakers - config.heldout_speakers
    train_pool = pool[:n_train]
    scenes = []
    for split, count in zip(
        SPLITS, (config.scenes_train, config.scenes_dev, config.scenes_test), strict=True
    ):
        # Training scenes use training speakers only; dev/test scenes may cast anyone.
        lines = texts[SCENE_TEXT_SPLIT[split]]
        for k in range(count):
            scenes.append(plan_scene(config, lines, split, k, train_pool if split == "train" else pool))
    sessions = {}
    enrollment = {}
    for idx, voice in enumerate(pool):
        # What a held-out speaker says is held-out text too: their clips are the evaluation items.
        lines = texts["test" if idx >= n_train else "train"]
        sessions[voice.speaker_id] = _plan_sessions(config, lines, idx, voice)
        enrollment[voice.speaker_id] = _plan_enrollment(config, lines, idx, voice)
    return CorpusPlan(config, bank, pool, tuple(scenes), sessions, enrollment, texts)


def text_banks(config: SynthConfig, bank: ScriptBank) -> dict[str, ScriptBank]:
    """Text split → the bank its lines are drawn from: ``bank`` for all three with ``text_source="bank"``
    (exactly the draws made before text splits existed), else :func:`grammar_banks`."""
    if config.text_source == "bank":
        return dict.fromkeys(TEXT_SPLITS, bank)
    return dict(grammar_banks(bank.settings))


@functools.cache
def grammar_bank(settings: tuple[str, ...]) -> ScriptBank:
    """The whole generated bank as script lines, with ``settings`` (what a grammar plan's ``bank`` is:
    the evaluator draws its mismatched archetype cues from it)."""
    return ScriptBank(tuple(s.script_line() for s in default_sentences()), settings)


@functools.cache
def grammar_banks(settings: tuple[str, ...]) -> Mapping[str, ScriptBank]:
    """Each text split of the generated sentences as a script bank with ``settings`` (built once)."""
    return {
        split: ScriptBank(tuple(s.script_line() for s in items), settings)
        for split, items in split_sentences().items()
    }


def pick_lines(bank: ScriptBank, rng: np.random.Generator, n: int) -> list[ScriptLine]:
    """``n`` lines from the bank, without repeats while the bank lasts."""
    order: list[int] = []
    while len(order) < n:
        order.extend(int(i) for i in rng.permutation(len(bank.lines)))
    return [bank.lines[i] for i in order[:n]]


def plan_scene(
    config: SynthConfig, bank: ScriptBank, split: str, k: int, pool: Sequence[VoiceProfile]
) -> PlannedScene:
    """Cast, setting, who speaks which line and how; every cast member speaks at least once when possible."""
    rng = seeds.rng(config.seed, seeds.SCENE, SPLITS.index(split), k)
    n_cast = int(rng.integers(2, min(4, len(pool)) + 1))
    cast = tuple(pool[int(i)] for i in sorted(rng.choice(len(pool), size=n_cast, replace=False)))
    uri = f"{SPLIT_PREFIX[split]}_{k:03d}"
    setting = bank.settings[int(rng.integers(len(bank.settings)))]
    lines = pick_lines(bank, rng, config.lines_per_scene)
    order = [int(i) for i in rng.permutation(n_cast)]
    speakers: list[int] = []
    for j in range(config.lines_per_scene):
        if j < n_cast:
            speakers.append(order[j])
        else:
            choices = [c for c in range(n_cast) if c != speakers[-1]]
            speakers.append(choices[int(rng.integers(len(choices)))])
    acting_rng = seeds.rng(config.seed, seeds.SCENE_ACTING, SPLITS.index(split), k)
    turns = []
    for j, (s, line) in enumerate(zip(speakers, lines, strict=True)):
        acting = draw_acting(cast[s], line.emotion, acting_rng, n_words=len(line.text.split()))
        turns.append(PlannedLine(f"{uri}/{j:02d}", cast[s], line, acting))
    return PlannedScene(uri, split, k, setting, cast, tuple(turns))


def _plan_sessions(
    config: SynthConfig, bank: ScriptBank, idx: int, voice: VoiceProfile
) -> tuple[PlannedLine, ...]:
    """A speaker's utterances, spread round-robin over 2-3 recording sessions, acted as written."""
    rng = seeds.rng(config.seed, seeds.UTT, idx)
    n_sess = min(config.utterances_per_speaker, 2 + int(rng.integers(2)))
    sessions = make_sessions(voice, n_sess, config.seed)
    lines = pick_lines(bank, rng, config.utterances_per_speaker)
    return tuple(
        PlannedLine(
            f"utt/{voice.speaker_id}/{j:03d}",
            voice,
            line,
            draw_acting(voice, line.emotion, rng, n_words=len(line.text.split())),
            session=sessions[j % n_sess],
        )
        for j, line in enumerate(lines)
    )


def _plan_enrollment(
    config: SynthConfig, bank: ScriptBank, idx: int, voice: VoiceProfile
) -> tuple[PlannedLine, ...]:
    """Enrollment lines are read neutrally: a casting reference, not a performance."""
    rng = seeds.rng(config.seed, seeds.ENROLL, idx)
    return tuple(
        PlannedLine(
            f"enroll/{voice.speaker_id}/{j:02d}",
            voice,
            line,
            draw_acting(voice, "neutral", rng, n_words=len(line.text.split())),
        )
        for j, line in enumerate(pick_lines(bank, rng, ENROLL_LINES))
    )
