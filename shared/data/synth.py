"""The synthetic drama corpus: one seeded run feeds all five services.

No audio can be downloaded where dramaturg is built, so ``dramaturg data synth OUT`` makes a small
but complete corpus from espeak-ng voices (``voices.py``, ``render.py``) and labels it from what was
actually rendered (``prosody.py``). Every format the services read comes out of ONE run, so they all
describe the same speakers and lines:

* ``diarization/`` — a pyannote.database protocol (``Dramaturg.SpeakerDiarization.Synth``): scenes of
  2-4 characters taking turns with gaps and overlaps, exact RTTM, UEM, lists, ``database.yml``,
  plus per-turn transcripts in ``lab/{uri}.jsonl``.
* ``speaker/`` — a VoxCeleb-style tree, speaker lists (held-out speakers only in test), balanced
  trials among held-out speakers, and enrollment lines for casting.
* ``tts/`` — fish-speech ``SPK/*.wav`` + ``*.lab``.
* ``audiollm/annotation.json`` — ASR and audio-caption items in SALMONN's annotation format.
* ``evaluator/`` — Speech-DRAME realism and archetype JSONL with six noisy "rater" scores per item.

Determinism: every random choice draws from ``np.random.default_rng([seed, TAG, index…])`` keyed by
what it decides (a scene, a speaker, a clip), never from a shared stream, so results do not depend
on thread timing, and adding scenes to one split leaves the others unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .prosody import (
    ARCHETYPE_DIMENSIONS,
    REALISM_DIMENSIONS,
    ProsodyMeasures,
    Region,
    archetype_labels,
    measure_prosody,
    rater_bools,
    rater_scores,
    realism_labels,
)
from .render import (
    RenderedUtterance,
    RenderJob,
    add_noise,
    apply_channel,
    check_tools,
    draw_acting,
    pad_clip,
    protect_clipping,
    render_batch,
)
from .voices import ChannelEffects, VoiceProfile, make_sessions, make_voice_pool

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, completed, total)``; ``completed``/``total`` count work units over the whole run."""

PROTOCOL = "Dramaturg.SpeakerDiarization.Synth"
DATABASE = "Dramaturg"
SCENE_SNR_DB = 25.0
"""Fixed, low background-noise level of scenes, realism clips and enrollment lines: speech sits 25 dB
above pink room tone. Low enough to be clearly audible (models must not rely on digital silence),
high enough that the quietest speech in a turn stays above it, so the RTTM marks audible speech."""
SCENE_LEVEL_DBFS = -24.0
SCENE_LEVEL_SPREAD_DB = 4.0
ENROLL_LINES = 2
CLIP_PAD_S = 0.3
"""Noise-only padding around standalone clips: keeps the SNR measurable and mimics real cuts."""
OUTPUT_ENTRIES = ("diarization", "speaker", "tts", "audiollm", "evaluator", "manifest.json")
SPLITS = ("train", "development", "test")
_SPLIT_PREFIX = {"train": "train", "development": "dev", "test": "test"}

# Seed tags: one per kind of decision (see module docstring).
_TAG_SCENE, _TAG_PLACE, _TAG_UTT, _TAG_ENROLL, _TAG_NOISE, _TAG_RATER, _TAG_TRIALS = (
    2001,
    2002,
    3001,
    4001,
    5001,
    6001,
    7001,
)


@dataclass(frozen=True)
class ScriptLine:
    """A line of the built-in script bank: its emotion, the situation that cues it, and the words."""

    emotion: str
    cue: str
    text: str


SCRIPT_BANK: tuple[ScriptLine, ...] = (
    # angry
    ScriptLine(
        "angry",
        "Your brother sold the family boat without asking you.",
        "You sold it? You sold Father's boat without even asking me!",
    ),
    ScriptLine("angry", "Someone read your private letters.", "Who gave you the right to read my letters?"),
    ScriptLine(
        "angry", "Your partner lied to the police for you.", "Don't you dare lie for me again. Not ever."
    ),
    ScriptLine(
        "angry", "The landlord has changed the locks.", "Open this door right now, or I'll break it down!"
    ),
    ScriptLine(
        "angry", "A colleague took credit for your work.", "That was my idea, and you know it was my idea."
    ),
    ScriptLine("angry", "Your son crashed the car again.", "Get out. Just get out of my sight."),
    # excited
    ScriptLine("excited", "You just won the village raffle.", "We won! We actually won the whole thing!"),
    ScriptLine(
        "excited",
        "The ship has been sighted on the horizon.",
        "Look, there, the sails! She's coming home at last!",
    ),
    ScriptLine("excited", "You found the missing map.", "It was under the floorboards the entire time!"),
    ScriptLine(
        "excited", "The theatre wants to stage your play.", "Opening night in June, can you believe it? June!"
    ),
    ScriptLine("excited", "Your sister is getting married.", "A wedding! Oh, there's so much to plan."),
    ScriptLine("excited", "The storm has finally passed.", "Come and see, the whole sky has turned gold!"),
    # fearful
    ScriptLine("fearful", "Someone is walking in the attic.", "Did you hear that? Someone is upstairs."),
    ScriptLine(
        "fearful",
        "The lights went out during the storm.",
        "Where are you? I can't see anything, say something!",
    ),
    ScriptLine(
        "fearful", "A stranger has been following you.", "He's still there, by the lamp post. Don't look."
    ),
    ScriptLine(
        "fearful", "The doctor wants to see you urgently.", "What did the doctor say? Tell me the truth."
    ),
    ScriptLine("fearful", "The ice is cracking under your feet.", "Don't move. Please, nobody move."),
    ScriptLine("fearful", "The letter carries a threat.", "They know where we live. They know everything."),
    # happy
    ScriptLine("happy", "Your old friend visits unexpectedly.", "Well, look at you! It's been far too long."),
    ScriptLine(
        "happy", "The harvest was better than expected.", "Twice what we had last year, and sweeter too."
    ),
    ScriptLine("happy", "Your daughter passed her exams.", "I always knew you would. I'm so proud of you."),
    ScriptLine("happy", "The dog came home on its own.", "There you are, you muddy old rascal."),
    ScriptLine(
        "happy", "Breakfast is ready for everyone.", "Sit down, sit down, there's plenty for all of us."
    ),
    ScriptLine("happy", "You are dancing at the fair.", "One more song, just one more, and then we'll go."),
    # defiant
    ScriptLine(
        "defiant", "Your father orders you to leave the stage.", "I will sing, whether you like it or not."
    ),
    ScriptLine(
        "defiant",
        "The council wants to close the lighthouse.",
        "This light has burned for a hundred years. It stays lit.",
    ),
    ScriptLine("defiant", "You are told to apologise.", "I have nothing to apologise for."),
    ScriptLine("defiant", "The captain tells you to turn back.", "We keep sailing. Every one of us."),
    ScriptLine("defiant", "Your rival mocks your plan.", "Laugh all you like. You'll see tomorrow."),
    ScriptLine("defiant", "You are asked to sign the confession.", "No. I won't put my name to a lie."),
    # neutral
    ScriptLine(
        "neutral", "You are explaining the timetable.", "The last train leaves at a quarter past nine."
    ),
    ScriptLine("neutral", "You report what you saw.", "The window was open and the lamp was still warm."),
    ScriptLine("neutral", "You give directions.", "Take the left fork, then follow the river to the mill."),
    ScriptLine(
        "neutral",
        "You read out the inventory.",
        "Three barrels of flour, two of salt, and one crate of candles.",
    ),
    ScriptLine("neutral", "You describe the weather.", "It will rain by evening, according to the almanac."),
    ScriptLine("neutral", "You answer a simple question.", "Yes, I posted the letter this morning."),
    # sarcastic
    ScriptLine(
        "sarcastic", "Your brother arrives three hours late.", "Oh, wonderful. How kind of you to join us."
    ),
    ScriptLine(
        "sarcastic", "Someone praises the burnt dinner.", "Yes, charcoal is very fashionable this season."
    ),
    ScriptLine(
        "sarcastic", "The plan has failed again.", "What a surprise. Who could have seen that coming?"
    ),
    ScriptLine(
        "sarcastic",
        "Your cousin offers unwanted advice.",
        "Thank you, truly, I don't know how I managed without you.",
    ),
    ScriptLine(
        "sarcastic", "The roof is leaking onto the piano.", "Lovely. Now it plays in the rain as well."
    ),
    ScriptLine("sarcastic", "You are told to stay calm.", "Calm. Of course. Why didn't I think of that?"),
    # tender
    ScriptLine("tender", "Your child cannot sleep.", "Hush now, I'm right here. Close your eyes."),
    ScriptLine("tender", "Your old friend is leaving for good.", "Write to me. Even a line or two will do."),
    ScriptLine("tender", "Your partner apologises.", "It's all right. We'll start again in the morning."),
    ScriptLine("tender", "You find your mother's ring.", "She wore this every day of her life."),
    ScriptLine("tender", "A frightened soldier asks for help.", "Hold my hand. You're safe now, I promise."),
    ScriptLine(
        "tender", "You say goodnight to your grandfather.", "Sleep well, Grandad. I'll leave the lamp on."
    ),
    # sad
    ScriptLine("sad", "The house is being sold.", "I grew up in this room. Every mark on the wall is ours."),
    ScriptLine("sad", "Your dog has died.", "He waited by the gate every evening. Every single evening."),
    ScriptLine("sad", "Your friend did not come to the funeral.", "I kept looking at the door for you."),
    ScriptLine("sad", "The letter never arrived.", "I waited all winter, and nothing came."),
    ScriptLine("sad", "Your brother is emigrating.", "So this is goodbye, then. After everything."),
    ScriptLine("sad", "The orchard has been cut down.", "There's nothing left. Not even the old pear tree."),
    # weary
    ScriptLine("weary", "You have worked a double shift.", "Not tonight. I can barely keep my eyes open."),
    ScriptLine("weary", "The same argument starts again.", "We've had this conversation a hundred times."),
    ScriptLine("weary", "The car has broken down once more.", "Of course it has. Of course."),
    ScriptLine("weary", "You are asked to try one more time.", "I've tried. I've tried everything I know."),
    ScriptLine(
        "weary", "The rain will not stop.", "Forty days of this. I've forgotten what the sun looks like."
    ),
    ScriptLine(
        "weary",
        "You walked all the way from the station.",
        "Just let me sit down for a minute. Just a minute.",
    ),
)

SETTINGS: tuple[str, ...] = (
    "A lighthouse keeper's cottage on the night of a storm.",
    "The back room of a failing bakery, an hour before dawn.",
    "A railway platform in winter, the last train delayed.",
    "A farmhouse kitchen after the funeral guests have gone.",
    "The deck of a fishing boat as the fog rolls in.",
    "A theatre dressing room on opening night.",
    "A hospital corridor in the small hours.",
    "An attic full of old trunks and letters.",
    "A village fair at dusk, music drifting from the square.",
    "A lawyer's office where a will is about to be read.",
    "A mountain hut cut off by snow.",
    "The garden of a grand house, the morning after a party.",
)


class SynthConfig(BaseModel):
    """Size and seed of a synthetic corpus. Defaults build in well under a minute on 2 cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seed for every random choice; same seed, same bytes.")
    num_speakers: int = Field(8, ge=3, le=500, description="Speakers in the pool.")
    heldout_speakers: int = Field(
        3, ge=2, description="Speakers kept out of speaker training; used in trials."
    )
    scenes_train: int = Field(6, ge=1, description="Diarization scenes in the train split.")
    scenes_dev: int = Field(2, ge=1, description="Diarization scenes in the development split.")
    scenes_test: int = Field(2, ge=1, description="Diarization scenes in the test split.")
    lines_per_scene: int = Field(8, ge=2, description="Turns per scene.")
    utterances_per_speaker: int = Field(
        6, ge=2, description="Standalone utterances per speaker (VoxCeleb tree)."
    )
    overlap_probability: float = Field(
        0.25, ge=0.0, le=1.0, description="Chance a turn starts before the last ends."
    )
    sample_rate: int = Field(16000, ge=8000, le=48000, description="Output sample rate (Hz).")
    raters: int = Field(6, ge=1, description="Noisy rater scores per evaluator item.")
    workers: int = Field(2, ge=1, le=64, description="Rendering threads.")

    @model_validator(mode="after")
    def _enough_training_speakers(self) -> SynthConfig:
        if self.num_speakers - self.heldout_speakers < 2:
            raise ValueError("need at least 2 non-held-out speakers (num_speakers - heldout_speakers >= 2)")
        return self


@dataclass
class _Turn:
    """A scene line in planning and after placement (sample offsets in the scene)."""

    voice: VoiceProfile
    line: ScriptLine
    key: str
    utt: RenderedUtterance | None = None
    start: int = 0

    @property
    def end(self) -> int:
        assert self.utt is not None
        return self.start + len(self.utt.samples)


@dataclass
class _Scene:
    uri: str
    split: str
    setting: str
    cast: list[VoiceProfile]
    turns: list[_Turn] = field(default_factory=list)
    samples: np.ndarray | None = None


@dataclass
class _Clip:
    """A standalone clip as written (noise added), with its measurements."""

    kind: str  # "role" | "session" | "enroll"
    voice: VoiceProfile
    line: ScriptLine
    samples: np.ndarray
    regions: list[Region]
    rel_path: str
    split: str
    context: dict[str, Any] = field(default_factory=dict)
    measures: ProsodyMeasures | None = None


# ------------------------------------------------------------------------------------------- helpers


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent generator for one decision (see module docstring)."""
    return np.random.default_rng([seed, *keys])


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM (what every recipe reads); values were kept inside ±1 by protect_clipping."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")


def _fmt(t: float) -> str:
    """Seconds with 6 decimals: round-trips to the exact sample at any rate up to 500 kHz."""
    return f"{t:.6f}"


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix two corpora; with ``overwrite`` remove only what a previous run created."""
    existing = [out / e for e in OUTPUT_ENTRIES if (out / e).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a corpus ({existing[0].name}); use --force to replace it")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _pick_lines(rng: np.random.Generator, n: int) -> list[ScriptLine]:
    """``n`` lines from the bank, without repeats while the bank lasts."""
    order: list[int] = []
    while len(order) < n:
        order.extend(int(i) for i in rng.permutation(len(SCRIPT_BANK)))
    return [SCRIPT_BANK[i] for i in order[:n]]


def _plan_scene(config: SynthConfig, split: str, k: int, pool: Sequence[VoiceProfile]) -> _Scene:
    """Cast, setting, who speaks which line; every cast member speaks at least once when possible."""
    rng = _rng(config.seed, _TAG_SCENE, SPLITS.index(split), k)
    n_cast = int(rng.integers(2, min(4, len(pool)) + 1))
    cast = [pool[int(i)] for i in sorted(rng.choice(len(pool), size=n_cast, replace=False))]
    scene = _Scene(
        uri=f"{_SPLIT_PREFIX[split]}_{k:03d}",
        split=split,
        setting=SETTINGS[int(rng.integers(len(SETTINGS)))],
        cast=cast,
    )
    lines = _pick_lines(rng, config.lines_per_scene)
    order = [int(i) for i in rng.permutation(n_cast)]
    speakers: list[int] = []
    for j in range(config.lines_per_scene):
        if j < n_cast:
            speakers.append(order[j])
        else:
            choices = [c for c in range(n_cast) if c != speakers[-1]]
            speakers.append(choices[int(rng.integers(len(choices)))])
    for j, (s, line) in enumerate(zip(speakers, lines, strict=True)):
        scene.turns.append(_Turn(voice=cast[s], line=line, key=f"{scene.uri}/{j:02d}"))
    return scene


def _place_turns(scene: _Scene, config: SynthConfig) -> None:
    """Lay turns on a timeline: gaps, or (with overlap_probability) a start before the previous end.

    Invariants that keep the RTTM meaningful: a turn may only overlap the turn right before it (so at
    most two voices at once and never a speaker with itself), and starts ≥ 0.3 s after it.
    """
    sr = config.sample_rate
    rng = _rng(config.seed, _TAG_PLACE, SPLITS.index(scene.split), int(scene.uri.rsplit("_", 1)[1]))
    t = int(rng.uniform(0.3, 0.8) * sr)
    for i, turn in enumerate(scene.turns):
        assert turn.utt is not None
        if i == 0:
            turn.start = t
            continue
        prev = scene.turns[i - 1]
        assert prev.utt is not None
        floor = prev.start + int(0.3 * sr)
        if i >= 2:
            floor = max(floor, max(tt.end for tt in scene.turns[: i - 1]) + int(0.1 * sr))
        gap = int(rng.uniform(0.15, 1.0) * sr)
        want_overlap = rng.random() < config.overlap_probability
        max_ov = min(1.2, 0.5 * prev.utt.duration_s, 0.5 * turn.utt.duration_s)
        ov = rng.uniform(0.2, max(0.2, max_ov))
        if want_overlap and max_ov >= 0.2:
            start = max(prev.end - int(ov * sr), floor)
            turn.start = start if start < prev.end else max(prev.end + gap, floor)
        else:
            turn.start = max(prev.end + gap, floor)
    tail = int(rng.uniform(0.4, 0.9) * sr)
    total = max(tt.end for tt in scene.turns) + tail
    mix = np.zeros(total, dtype=np.float64)
    for turn in scene.turns:
        assert turn.utt is not None
        mix[turn.start : turn.end] += turn.utt.samples * _mix_gain(turn.utt)
    mix = protect_clipping(mix)
    regions = [(turn.start + a, turn.start + b) for turn in scene.turns for a, b in turn.utt.regions]
    mix = add_noise(
        mix,
        SCENE_SNR_DB,
        _rng(config.seed, _TAG_NOISE, 1, SPLITS.index(scene.split), int(scene.uri.rsplit("_", 1)[1])),
        regions,
        sr,
    )
    scene.samples = protect_clipping(mix)


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


def _scene_rttm(scene: _Scene, sr: int) -> list[str]:
    """RTTM lines from the placed speech regions, sorted by onset (one line per region)."""
    rows = []
    for turn in scene.turns:
        assert turn.utt is not None
        for a, b in turn.utt.regions:
            rows.append((turn.start + a, turn.start + b, turn.voice.speaker_id))
    rows.sort()
    return [
        f"SPEAKER {scene.uri} 1 {_fmt(a / sr)} {_fmt((b - a) / sr)} <NA> <NA> {spk} <NA> <NA>"
        for a, b, spk in rows
    ]


def _noisy_clip(
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


def _median_measures(items: Sequence[ProsodyMeasures]) -> ProsodyMeasures:
    """Field-wise median: a speaker's typical delivery (robust to one overacted line)."""
    values = {}
    for f in fields(ProsodyMeasures):
        col = [getattr(m, f.name) for m in items]
        if f.name in ("f0_mean_hz", "f0_mean_st"):
            col = [c for c, m in zip(col, items, strict=True) if m.f0_mean_hz > 0] or [0.0]
        med = float(np.median(col))
        values[f.name] = round(med) if f.type in (int, "int") else med
    return ProsodyMeasures(**values)


def caption_for(voice: VoiceProfile, m: ProsodyMeasures, emotion: str) -> str:
    """An audio caption built from known facts (speaker) and measured ones (pace, level, pitch)."""
    noun = "man" if voice.gender == "male" else "woman"
    age = {"Young adult": "young ", "Adult": "", "Middle-aged": "middle-aged ", "Elderly": "elderly "}[
        voice.age
    ]
    subject = f"{age}{noun}"
    article = "An" if subject[0] in "aeiou" else "A"
    pace = "quickly" if m.rate_sps > 5.2 else ("slowly" if m.rate_sps < 3.8 else "at an even pace")
    level = "loudly" if m.level_dbfs > -19.5 else ("softly" if m.level_dbfs < -26.5 else "")
    manner = f"{pace} and {level}" if level else pace
    pitch = (
        " in a flat, monotone voice"
        if m.f0_spread_st < 2.5
        else (" with a lively, rising and falling pitch" if m.f0_spread_st > 7.0 else "")
    )
    mood = {"neutral": "matter-of-fact"}.get(emotion, emotion)
    return (
        f"{article} {subject} with {'an' if voice.accent_name[0] in 'AEIOU' else 'a'} "
        f"{voice.accent_name} accent speaks {manner}{pitch}, sounding {mood}."
    )


def _trials(heldout_files: dict[str, list[str]], seed: int) -> list[tuple[int, str, str]]:
    """Balanced trials among held-out speakers: every same-speaker pair, as many different-speaker pairs.

    Different-speaker pairs are drawn without replacement, so labels are balanced exactly whenever
    there are enough of them (there always are for ≥ 2 speakers with ≥ 2 utterances each).
    """
    rng = _rng(seed, _TAG_TRIALS)
    targets = [
        (1, a, b)
        for spk in sorted(heldout_files)
        for i, a in enumerate(heldout_files[spk])
        for b in heldout_files[spk][i + 1 :]
    ]
    spks = sorted(heldout_files)
    nontarget_pool = [
        (0, a, b)
        for i, s1 in enumerate(spks)
        for s2 in spks[i + 1 :]
        for a in heldout_files[s1]
        for b in heldout_files[s2]
    ]
    n = min(len(targets), len(nontarget_pool))

    def sample(items: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
        return [items[i] for i in sorted(int(i) for i in rng.choice(len(items), size=n, replace=False))]

    targets, nontargets = sample(targets), sample(nontarget_pool)
    nontargets = [(lab, b, a) if rng.random() < 0.5 else (lab, a, b) for lab, a, b in nontargets]
    trials = targets + nontargets
    order = rng.permutation(len(trials))
    return [trials[int(i)] for i in order]


# ----------------------------------------------------------------------------------------------- main


def synthesize_corpus(
    out_dir: str | Path,
    config: SynthConfig | None = None,
    progress: ProgressFn | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the whole corpus under ``out_dir`` and return the manifest (also written to manifest.json).

    Raises FileExistsError when ``out_dir`` already holds a corpus and ``overwrite`` is False.
    """
    config = config or SynthConfig()
    t0 = time.perf_counter()
    check_tools()  # before touching OUT: a missing espeak-ng must not leave half a corpus behind
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    sr = config.sample_rate
    pool = make_voice_pool(config.num_speakers, config.seed)
    n_train_spk = config.num_speakers - config.heldout_speakers
    train_pool, heldout_pool = pool[:n_train_spk], pool[n_train_spk:]
    heldout_ids = {v.speaker_id for v in heldout_pool}

    # ---- plan -------------------------------------------------------------------------------------
    scenes: list[_Scene] = []
    for split, count in zip(
        SPLITS, (config.scenes_train, config.scenes_dev, config.scenes_test), strict=True
    ):
        # Training scenes use training speakers only; dev/test scenes may cast anyone.
        for k in range(count):
            scenes.append(_plan_scene(config, split, k, train_pool if split == "train" else pool))
    jobs: list[RenderJob] = []
    for scene in scenes:
        rng = _rng(config.seed, _TAG_SCENE + 100, SPLITS.index(scene.split), int(scene.uri.rsplit("_", 1)[1]))
        for turn in scene.turns:
            acting = draw_acting(turn.voice, turn.line.emotion, rng, n_words=len(turn.line.text.split()))
            jobs.append(RenderJob(turn.key, turn.line.text, turn.voice, acting))
    session_plan: dict[str, list[tuple[ChannelEffects, ScriptLine, str]]] = {}
    for idx, voice in enumerate(pool):
        rng = _rng(config.seed, _TAG_UTT, idx)
        n_sess = min(config.utterances_per_speaker, 2 + int(rng.integers(2)))
        sessions = make_sessions(voice, n_sess, config.seed)
        lines = _pick_lines(rng, config.utterances_per_speaker)
        plan = []
        for j, line in enumerate(lines):
            key = f"utt/{voice.speaker_id}/{j:03d}"
            plan.append((sessions[j % n_sess], line, key))
            jobs.append(
                RenderJob(
                    key,
                    line.text,
                    voice,
                    draw_acting(voice, line.emotion, rng, n_words=len(line.text.split())),
                )
            )
        session_plan[voice.speaker_id] = plan
        erng = _rng(config.seed, _TAG_ENROLL, idx)
        for j, line in enumerate(_pick_lines(erng, ENROLL_LINES)):
            # Enrollment lines are read neutrally: a casting reference, not a performance.
            jobs.append(
                RenderJob(
                    f"enroll/{voice.speaker_id}/{j:02d}",
                    line.text,
                    voice,
                    draw_acting(voice, "neutral", erng, n_words=len(line.text.split())),
                )
            )

    n_session_utts = sum(len(p) for p in session_plan.values())
    # Work units: render every job, channel every session utterance, mix every scene, measure every
    # clip (one clip per job), and one for writing the rest.
    total = len(jobs) + n_session_utts + len(scenes) + len(jobs) + 1
    done = 0

    def tick(stage: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(stage, done, total)

    # ---- render -----------------------------------------------------------------------------------
    logger.info("rendering %d lines with %d workers", len(jobs), config.workers)
    rendered = render_batch(
        jobs, sample_rate=sr, workers=config.workers, progress=lambda n: tick("render", n)
    )
    by_key = {str(u.meta["key"]): u for u in rendered}
    with ThreadPoolExecutor(max_workers=config.workers) as ex:
        chan_keys = [(key, ch) for plan in session_plan.values() for ch, _, key in plan]
        chan_out = {}
        for (key, _), y in zip(
            chan_keys,
            ex.map(lambda kc: apply_channel(by_key[kc[0]].samples, sr, kc[1]), chan_keys),
            strict=True,
        ):
            chan_out[key] = y
            tick("channel")

    # ---- diarization ------------------------------------------------------------------------------
    ddir = out / "diarization"
    for sub in ("wav", "rttm", "uem", "lists", "lab"):
        (ddir / sub).mkdir(parents=True, exist_ok=True)
    split_rttm: dict[str, list[str]] = {s: [] for s in SPLITS}
    split_uem: dict[str, list[str]] = {s: [] for s in SPLITS}
    split_uris: dict[str, list[str]] = {s: [] for s in SPLITS}
    scene_info = []
    for scene in scenes:
        for turn in scene.turns:
            turn.utt = by_key[turn.key]
        _place_turns(scene, config)
        assert scene.samples is not None
        _write_wav(ddir / "wav" / f"{scene.uri}.wav", scene.samples, sr)
        rttm = _scene_rttm(scene, sr)
        dur = len(scene.samples) / sr
        uem = f"{scene.uri} 1 {_fmt(0.0)} {_fmt(dur)}"
        (ddir / "rttm" / f"{scene.uri}.rttm").write_text("\n".join(rttm) + "\n")
        (ddir / "uem" / f"{scene.uri}.uem").write_text(uem + "\n")
        with (ddir / "lab" / f"{scene.uri}.jsonl").open("w") as fh:
            for turn in scene.turns:
                fh.write(
                    json.dumps(
                        {
                            "start": round(turn.start / sr, 6),
                            "end": round(turn.end / sr, 6),
                            "speaker": turn.voice.speaker_id,
                            "name": turn.voice.name,
                            "text": turn.line.text,
                            "emotion": turn.line.emotion,
                        }
                    )
                    + "\n"
                )
        split_rttm[scene.split] += rttm
        split_uem[scene.split].append(uem)
        split_uris[scene.split].append(scene.uri)
        overlap = _overlap_seconds(scene, sr)
        scene_info.append(
            {
                "uri": scene.uri,
                "split": scene.split,
                "duration_s": round(dur, 3),
                "setting": scene.setting,
                "cast": [v.speaker_id for v in scene.cast],
                "turns": len(scene.turns),
                "overlap_s": round(overlap, 3),
            }
        )
        tick("scenes")
    for split in SPLITS:
        (ddir / "lists" / f"{split}.lst").write_text("".join(u + "\n" for u in split_uris[split]))
        (ddir / f"{split}.rttm").write_text("".join(r + "\n" for r in split_rttm[split]))
        (ddir / f"{split}.uem").write_text("".join(r + "\n" for r in split_uem[split]))
    database = {
        "Databases": {DATABASE: "wav/{uri}.wav"},
        "Protocols": {
            DATABASE: {
                "SpeakerDiarization": {
                    "Synth": {
                        "scope": "file",
                        **{
                            split: {
                                "uri": f"lists/{split}.lst",
                                "annotation": f"{split}.rttm",
                                "annotated": f"{split}.uem",
                            }
                            for split in SPLITS
                        },
                    }
                }
            }
        },
    }
    (ddir / "database.yml").write_text(yaml.safe_dump(database, sort_keys=False))

    # ---- standalone clips -------------------------------------------------------------------------
    clips: list[_Clip] = []
    for scene in scenes:
        for j, turn in enumerate(scene.turns):
            assert turn.utt is not None
            y, regions = _noisy_clip(
                turn.utt,
                turn.utt.samples,
                SCENE_SNR_DB,
                _rng(
                    config.seed, _TAG_NOISE, 2, SPLITS.index(scene.split), int(scene.uri.rsplit("_", 1)[1]), j
                ),
            )
            prev = scene.turns[j - 1] if j else None
            clips.append(
                _Clip(
                    "role",
                    turn.voice,
                    turn.line,
                    y,
                    regions,
                    f"wav/role/{scene.uri}_{j:02d}.wav",
                    "test" if scene.split == "test" else "train",
                    {"scene": scene, "prev": prev, "acting": turn.utt.acting},
                )
            )
    spk_dir = out / "speaker"
    for idx, voice in enumerate(pool):
        counters: dict[str, int] = {}
        for j, (channel, line, key) in enumerate(session_plan[voice.speaker_id]):
            n = counters[channel.session_id] = counters.get(channel.session_id, 0) + 1
            rel = f"{voice.speaker_id}/{channel.session_id}/{n:05d}.wav"
            y, regions = _noisy_clip(
                by_key[key], chan_out[key], channel.snr_db, _rng(config.seed, _TAG_NOISE, 3, idx, j)
            )
            clips.append(
                _Clip(
                    "session",
                    voice,
                    line,
                    y,
                    regions,
                    rel,
                    "test" if voice.speaker_id in heldout_ids else "train",
                    {"key": key, "channel": channel, "acting": by_key[key].acting},
                )
            )
        for j in range(ENROLL_LINES):
            key = f"enroll/{voice.speaker_id}/{j:02d}"
            utt = by_key[key]
            y, regions = _noisy_clip(utt, utt.samples, SCENE_SNR_DB, _rng(config.seed, _TAG_NOISE, 4, idx, j))
            clips.append(
                _Clip(
                    "enroll",
                    voice,
                    ScriptLine("neutral", "", utt.text),
                    y,
                    regions,
                    f"{voice.speaker_id}/{j:02d}.wav",
                    "enroll",
                    {"key": key},
                )
            )

    with ThreadPoolExecutor(max_workers=config.workers) as ex:
        for clip, m in zip(
            clips,
            ex.map(lambda c: measure_prosody(c.samples, sr, c.line.text, c.regions), clips),
            strict=True,
        ):
            clip.measures = m
            tick("measure")

    # ---- speaker corpus ---------------------------------------------------------------------------
    spk_files: dict[str, list[str]] = {v.speaker_id: [] for v in pool}
    for clip in clips:
        if clip.kind == "session":
            _write_wav(spk_dir / "wav" / clip.rel_path, clip.samples, sr)
            spk_files[clip.voice.speaker_id].append(clip.rel_path)
        elif clip.kind == "enroll":
            _write_wav(spk_dir / "enroll" / clip.rel_path, clip.samples, sr)
    (spk_dir / "train_speakers.txt").write_text("".join(v.speaker_id + "\n" for v in train_pool))
    (spk_dir / "test_speakers.txt").write_text("".join(v.speaker_id + "\n" for v in heldout_pool))
    trials = _trials({s: spk_files[s] for s in sorted(heldout_ids)}, config.seed)
    (spk_dir / "trials.txt").write_text("".join(f"{lab} {a} {b}\n" for lab, a, b in trials))
    cast = [
        {
            **v.to_dict(),
            "heldout": v.speaker_id in heldout_ids,
            "enroll": [
                {"path": c.rel_path, "text": c.line.text}
                for c in clips
                if c.kind == "enroll" and c.voice.speaker_id == v.speaker_id
            ],
        }
        for v in pool
    ]
    (spk_dir / "enroll" / "cast.json").write_text(json.dumps({"speakers": cast}, indent=1) + "\n")

    # ---- tts (studio renders, no channel, no noise) -----------------------------------------------
    tts_count = 0
    for voice in pool:
        for j, (_, line, key) in enumerate(session_plan[voice.speaker_id]):
            stem = out / "tts" / voice.speaker_id / f"{voice.speaker_id}_{j:05d}"
            _write_wav(stem.with_suffix(".wav"), protect_clipping(by_key[key].samples.astype(np.float64)), sr)
            stem.with_suffix(".lab").write_text(line.text + "\n")
            tts_count += 1

    # ---- labels -------------------------------------------------------------------------------------
    speaker_f0: dict[str, float] = {}
    baseline: dict[tuple[str, str], ProsodyMeasures] = {}
    for voice in pool:
        mine = [
            c.measures for c in clips if c.voice.speaker_id == voice.speaker_id and c.measures is not None
        ]
        voiced = [m.f0_mean_st for m in mine if m.f0_mean_hz > 0]
        speaker_f0[voice.speaker_id] = float(np.median(voiced)) if voiced else 0.0
        studio = [
            c.measures
            for c in clips
            if c.voice.speaker_id == voice.speaker_id and c.kind != "session" and c.measures is not None
        ]
        session = [
            c.measures
            for c in clips
            if c.voice.speaker_id == voice.speaker_id and c.kind == "session" and c.measures is not None
        ]
        baseline[(voice.speaker_id, "studio")] = _median_measures(studio)
        baseline[(voice.speaker_id, "session")] = _median_measures(session)

    bias_rng = _rng(config.seed, _TAG_RATER, 0)
    realism_bias = list(bias_rng.normal(0.0, 0.3, config.raters))
    arche_bias = list(bias_rng.normal(0.0, 0.3, config.raters))
    evdir = out / "evaluator"
    realism: list[dict[str, Any]] = []
    archetype: list[dict[str, Any]] = []
    hist = {d: [0] * 5 for d in (*REALISM_DIMENSIONS, *ARCHETYPE_DIMENSIONS)}
    for i, clip in enumerate(c for c in clips if c.kind == "role"):
        assert clip.measures is not None
        _write_wav(evdir / clip.rel_path, clip.samples, sr)
        labels = realism_labels(
            clip.measures,
            emotion=clip.line.emotion,
            style=clip.voice.style,
            speaker_f0_st=speaker_f0[clip.voice.speaker_id],
            baseline=baseline[(clip.voice.speaker_id, "studio")],
        )
        rrng = _rng(config.seed, _TAG_RATER, 1, i)
        scene: _Scene = clip.context["scene"]
        prev: _Turn | None = clip.context["prev"]
        others = [v.name for v in scene.cast if v.speaker_id != clip.voice.speaker_id]
        local = (
            f"{scene.setting} {clip.voice.name} is talking with {', '.join(others)}. "
            + (f'{prev.voice.name} has just said: "{prev.line.text}"' if prev else "This opens the scene.")
            + f" Situation: {clip.line.cue}"
        )
        for d, v in labels.items():
            hist[d][v - 1] += 1
        realism.append(
            {
                "id": f"role-synth_v1_{i:04d}",
                "dataset_name": "ROLE",
                "local_scene": local,
                "char_age": clip.voice.age,
                "char_style": clip.voice.char_style,
                "char_profile": clip.voice.char_profile,
                "transcript": clip.line.text,
                "wav_path": clip.rel_path,
                "annotations": {d: rater_scores(labels[d], rrng, realism_bias) for d in REALISM_DIMENSIONS},
                "split": clip.split,
                "speaker_id": clip.voice.speaker_id,
                "emotion": clip.line.emotion,
                "scene_uri": scene.uri,
                "reference": labels,
                "measures": clip.measures.to_dict(),
            }
        )
    for i, clip in enumerate(c for c in clips if c.kind == "session"):
        assert clip.measures is not None
        arng = _rng(config.seed, _TAG_RATER, 2, i)
        # One question in five asks for a different line than the one spoken: content_pass is False.
        mismatch = bool(arng.random() < 0.2)
        cue_line = clip.line
        if mismatch:
            others = [s for s in SCRIPT_BANK if s.emotion != clip.line.emotion]
            cue_line = others[int(arng.integers(len(others)))]
        content_pass, labels = archetype_labels(
            clip.measures,
            emotion=cue_line.emotion,
            style=clip.voice.style,
            content_matches=not mismatch,
            baseline=baseline[(clip.voice.speaker_id, "session")],
        )
        rel = f"wav/arche/{clip.rel_path.replace('/', '_')}"
        _write_wav(evdir / rel, clip.samples, sr)
        noun = "man" if clip.voice.gender == "male" else "woman"
        question = (
            f"You are {clip.voice.name}, {'an' if clip.voice.age[0] in 'AEIOU' else 'a'} "
            f"{clip.voice.age.lower()} {noun} who is {clip.voice.style.lower()}. {cue_line.cue} "
            f"Respond in a {cue_line.emotion} tone. You say:"
        )
        for d, v in labels.items():
            hist[d][v - 1] += 1
        archetype.append(
            {
                "id": f"synth_en_{clip.voice.style}_{i:04d}",
                "dataset_name": "Arche",
                "question": question,
                "wav_path": rel,
                "annotations": {
                    "content_pass": rater_bools(content_pass, arng, config.raters),
                    **{d: rater_scores(labels[d], arng, arche_bias) for d in ARCHETYPE_DIMENSIONS},
                },
                "split": clip.split,
                "speaker_id": clip.voice.speaker_id,
                "emotion": cue_line.emotion,
                "transcript": clip.line.text,
                "reference": {"content_pass": content_pass, **labels},
                "measures": clip.measures.to_dict(),
            }
        )
    _write_jsonl(evdir / "realism.jsonl", realism)
    _write_jsonl(evdir / "archetype.jsonl", archetype)
    for name, items in (("realism", realism), ("archetype", archetype)):
        for split in ("train", "test"):
            _write_jsonl(evdir / f"{name}_{split}.jsonl", [r for r in items if r["split"] == split])

    # ---- audio-LLM ----------------------------------------------------------------------------------
    adir = out / "audiollm"
    annotation = []
    for i, clip in enumerate(c for c in clips if c.kind == "role"):
        assert clip.measures is not None
        rel = clip.rel_path.replace("wav/role/", "wav/")
        _write_wav(adir / rel, clip.samples, sr)
        annotation.append(
            {
                "testset_id": f"asr_{i:05d}",
                "path": rel,
                "task": "asr",
                "text": clip.line.text,
                "split": clip.split,
            }
        )
        annotation.append(
            {
                "testset_id": f"aac_{i:05d}",
                "path": rel,
                "task": "audiocaption_v2",
                "text": caption_for(clip.voice, clip.measures, clip.line.emotion),
                "split": clip.split,
            }
        )
    _write_json(adir / "annotation.json", {"annotation": annotation})
    for split in ("train", "test"):
        _write_json(
            adir / f"annotation_{split}.json", {"annotation": [a for a in annotation if a["split"] == split]}
        )

    # ---- manifest -----------------------------------------------------------------------------------
    elapsed = time.perf_counter() - t0
    manifest: dict[str, Any] = {
        "format": "dramaturg-synth/1",
        "config": config.model_dump(),
        "sample_rate": sr,
        "protocol": PROTOCOL,
        "database_yml": "diarization/database.yml",
        "speakers": [
            {
                **v.to_dict(),
                "heldout": v.speaker_id in heldout_ids,
                "mean_f0_st": round(speaker_f0[v.speaker_id], 3),
            }
            for v in pool
        ],
        "scenes": scene_info,
        "counts": {
            "speakers": len(pool),
            "train_speakers": len(train_pool),
            "heldout_speakers": len(heldout_pool),
            "scenes": {s: len(split_uris[s]) for s in SPLITS},
            "scene_hours": round(sum(s["duration_s"] for s in scene_info) / 3600.0, 4),
            "overlap_s": round(sum(s["overlap_s"] for s in scene_info), 3),
            "speaker_utterances": n_session_utts,
            "trials": len(trials),
            "trials_target": sum(1 for t in trials if t[0] == 1),
            "tts_clips": tts_count,
            "realism_items": len(realism),
            "archetype_items": len(archetype),
            "audiollm_items": len(annotation),
            "renders": len(jobs),
        },
        "label_histogram": hist,
        "paths": {
            "diarization": "diarization",
            "speaker_wav": "speaker/wav",
            "trials": "speaker/trials.txt",
            "cast": "speaker/enroll/cast.json",
            "tts": "tts",
            "audiollm": "audiollm/annotation.json",
            "realism": "evaluator/realism.jsonl",
            "archetype": "evaluator/archetype.jsonl",
        },
        "elapsed_s": round(elapsed, 2),
    }
    _write_json(out / "manifest.json", manifest)
    tick("done")
    logger.info(
        "synthetic corpus in %s: %d scenes, %d speakers, %.1f s", out, len(scenes), len(pool), elapsed
    )
    return manifest


def _overlap_seconds(scene: _Scene, sr: int) -> float:
    """Seconds where two or more speakers' regions overlap (from the same regions as the RTTM)."""
    assert scene.samples is not None
    count = np.zeros(len(scene.samples), dtype=np.int16)
    for turn in scene.turns:
        assert turn.utt is not None
        for a, b in turn.utt.regions:
            count[turn.start + a : turn.start + b] += 1
    return float(np.sum(count >= 2) / sr)


def _write_jsonl(path: Path, items: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
