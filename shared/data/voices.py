"""Synthetic speakers: an espeak-ng voice plus sox effects, drawn from a seed.

No speech corpus can be downloaded in the places dramaturg is built and tested, so every service
trains and is checked on voices made here. A speaker must be (a) distinct from the others, so that
diarization and verification have something to learn, and (b) consistent across all its utterances,
so that "same speaker" means something. Distinctness comes from a unique (accent, variant) pair plus
pitch, speed and a sox pitch shift spread over a grid; consistency comes from keeping all of these
fixed per speaker and letting only small per-line "acting" jitter (see ``render.py``) vary.

Speaker ids follow VoxCeleb (``id10001``…) so recipes written for VoxCeleb run unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

ACCENTS: dict[str, str] = {
    # espeak-ng language voice → adjective used in captions and profiles.
    "en-us": "American",
    "en-gb": "British",
    "en-gb-scotland": "Scottish",
    "en-029": "Caribbean",
    "en-gb-x-rp": "Received Pronunciation",
    "en-gb-x-gbclan": "Lancashire",
    "en-gb-x-gbcwmd": "West Midlands",
    "en-us-nyc": "New York",
}

ACCENT_PLACES: dict[str, str] = {
    "en-us": "Ohio",
    "en-gb": "London",
    "en-gb-scotland": "Glasgow",
    "en-029": "Kingston",
    "en-gb-x-rp": "Oxford",
    "en-gb-x-gbclan": "Lancaster",
    "en-gb-x-gbcwmd": "Birmingham",
    "en-us-nyc": "Brooklyn",
}

# espeak-ng variants (``espeak-ng --voices=variant``) that sound like plain human voices; the robotic,
# whispering and novelty ones are left out on purpose.
MALE_VARIANTS: tuple[str, ...] = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "Andy",
    "david",
    "john",
    "paul",
    "rob",
    "Mike",
    "quincy",
)
FEMALE_VARIANTS: tuple[str, ...] = (
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "Annie",
    "Alicia",
    "Andrea",
    "belinda",
    "linda",
    "steph",
    "anika",
)

MALE_NAMES: tuple[str, ...] = (
    "Arthur",
    "Bernard",
    "Callum",
    "Desmond",
    "Edmund",
    "Felix",
    "Gideon",
    "Hector",
    "Isaac",
    "Jasper",
    "Kieran",
    "Leopold",
    "Magnus",
    "Nathaniel",
    "Oswin",
    "Percival",
    "Quentin",
    "Rupert",
    "Silas",
    "Tobias",
    "Ulric",
    "Victor",
    "Walter",
    "Xavier",
)
FEMALE_NAMES: tuple[str, ...] = (
    "Agatha",
    "Beatrice",
    "Cordelia",
    "Delphine",
    "Eleanor",
    "Florence",
    "Greta",
    "Harriet",
    "Imogen",
    "Juliet",
    "Katherine",
    "Lavinia",
    "Margaret",
    "Nell",
    "Ophelia",
    "Philippa",
    "Rosalind",
    "Sybil",
    "Tabitha",
    "Ursula",
    "Vivienne",
    "Winifred",
    "Yvonne",
    "Zelda",
)

AGE_BRACKETS: tuple[str, ...] = ("Young adult", "Adult", "Middle-aged", "Elderly")
AGE_PITCH_OFFSET: dict[str, int] = {"Young adult": 8, "Adult": 0, "Middle-aged": -4, "Elderly": -8}
AGE_SPEED_FACTOR: dict[str, float] = {"Young adult": 1.05, "Adult": 1.0, "Middle-aged": 0.97, "Elderly": 0.9}

STYLE_TRAITS: dict[str, tuple[str, ...]] = {
    # style word → secondary traits; the style word drives the voice, the traits only the profile text.
    "Playful": ("Charismatic", "Mischievous", "Confident"),
    "Stern": ("Disciplined", "Proud", "Unyielding"),
    "Anxious": ("Restless", "Loyal", "Watchful"),
    "Warm": ("Kind", "Patient", "Generous"),
    "Brooding": ("Secretive", "Bitter", "Intense"),
    "Commanding": ("Ambitious", "Decisive", "Ruthless"),
    "Sardonic": ("Witty", "Cynical", "Sharp"),
    "Gentle": ("Soft-spoken", "Thoughtful", "Shy"),
    "Charismatic": ("Charming", "Bold", "Persuasive"),
    "Weary": ("Resigned", "Wise", "Tired"),
}

STYLE_DESCRIPTIONS: dict[str, str] = {
    "Playful": "quick to joke and quicker to change the subject",
    "Stern": "keeps order in the house and expects to be obeyed",
    "Anxious": "always expects the worst and speaks before thinking",
    "Warm": "the one everyone brings their troubles to",
    "Brooding": "carries an old grudge and rarely says what they mean",
    "Commanding": "used to giving orders and having them followed",
    "Sardonic": "hides every feeling behind a dry remark",
    "Gentle": "chooses words carefully and avoids a quarrel",
    "Charismatic": "can talk anyone into anything, and often does",
    "Weary": "has seen it all before and is tired of it",
}

# How a style shapes the voice: (espeak pitch-range step, speed factor, amplitude factor). Derived from
# ``prosody.STYLE_PROFILE`` so that "trait_embodiment" measures something the voice was built to show.
STYLE_VOICE: dict[str, tuple[int, float, float]] = {
    "Playful": (1, 1.08, 1.05),
    "Stern": (-1, 0.97, 1.2),
    "Anxious": (0, 1.15, 0.95),
    "Warm": (0, 0.95, 0.95),
    "Brooding": (-1, 0.88, 0.85),
    "Commanding": (0, 1.0, 1.3),
    "Sardonic": (0, 0.92, 1.0),
    "Gentle": (0, 0.9, 0.8),
    "Charismatic": (1, 1.03, 1.1),
    "Weary": (-1, 0.86, 0.85),
}

PITCH_RANGES: tuple[str, ...] = ("x-low", "low", "medium", "high", "x-high")
"""espeak-ng SSML ``<prosody range=…>`` keywords, in order; indices are "range steps"."""

BASE_AMPLITUDE = 50
"""espeak ``-a`` at neutral delivery; 100 is espeak's default but leaves no headroom for loud acting."""

_SESSION_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


@dataclass(frozen=True)
class VoiceProfile:
    """Everything fixed about one synthetic speaker (identity and character metadata)."""

    speaker_id: str
    name: str
    gender: str  # "male" | "female"
    age: str  # one of AGE_BRACKETS
    style: str  # key of STYLE_TRAITS
    traits: tuple[str, ...]
    accent: str  # espeak-ng language voice, key of ACCENTS
    variant: str  # espeak-ng variant file name
    pitch: int  # espeak -p, 0..99
    speed: int  # espeak -s, words per minute
    amplitude: int  # espeak -a at neutral delivery
    range_step: int  # index into PITCH_RANGES at neutral delivery
    shift_cents: float  # sox pitch
    tempo: float  # sox tempo -s
    reverb: float  # sox reverb reverberance (0 = dry)
    room_scale: float  # sox reverb room-scale
    gain_db: float  # sox gain

    @property
    def espeak_voice(self) -> str:
        """``-v`` argument, e.g. ``en-gb-scotland+m1``."""
        return f"{self.accent}+{self.variant}"

    @property
    def accent_name(self) -> str:
        """Human-readable accent ("Scottish")."""
        return ACCENTS.get(self.accent, self.accent)

    @property
    def char_style(self) -> str:
        """Speech-DRAME ``char_style``: the style word and two traits, comma separated."""
        return ", ".join((self.style, *self.traits))

    @property
    def char_profile(self) -> str:
        """Speech-DRAME ``char_profile``: a one-sentence character background built from the facts."""
        noun = "man" if self.gender == "male" else "woman"
        place = ACCENT_PLACES.get(self.accent, "abroad")
        return (
            f"{self.name} is {_article(self.age.lower())} {self.age.lower()} {noun} from {place} "
            f"with {_article(self.accent_name)} {self.accent_name} accent; {self.style.lower()}, "
            f"{STYLE_DESCRIPTIONS.get(self.style, '')}."
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready copy including derived fields (for manifest.json and cast.json)."""
        d = asdict(self)
        d["traits"] = list(self.traits)
        d["espeak_voice"] = self.espeak_voice
        d["accent_name"] = self.accent_name
        return d


@dataclass(frozen=True)
class ChannelEffects:
    """A recording session's channel: what differs between two VoxCeleb videos of one person."""

    session_id: str
    highpass_hz: float
    lowpass_hz: float
    eq_hz: float
    eq_gain_db: float
    gain_db: float
    snr_db: float

    def sox_effects(self) -> list[str]:
        """sox effect arguments that apply this channel (noise is added separately with numpy)."""
        return [
            "highpass",
            f"{self.highpass_hz:.1f}",
            "lowpass",
            f"{self.lowpass_hz:.1f}",
            "equalizer",
            f"{self.eq_hz:.1f}",
            "1q",
            f"{self.eq_gain_db:.2f}",
            "gain",
            f"{self.gain_db:.2f}",
        ]


def _article(word: str) -> str:
    """'a' or 'an' for a following word (vowel-sound approximation good enough for our vocabulary)."""
    return "an" if word[:1].lower() in "aeio" else "a"


def speaker_id(index: int, first_id: int = 10001) -> str:
    """VoxCeleb-style id for the ``index``-th speaker (0-based)."""
    return f"id{first_id + index:05d}"


def _spread(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """``n`` values covering [low, high] evenly, shuffled and jittered: guarantees distinct speakers."""
    if n == 1:
        return np.array([(low + high) / 2.0])
    grid = np.linspace(low, high, n)
    step = (high - low) / (n - 1)
    return rng.permutation(grid + rng.uniform(-0.3, 0.3, n) * step)


def make_voice_pool(num_speakers: int, seed: int, *, first_id: int = 10001) -> list[VoiceProfile]:
    """Create ``num_speakers`` distinct speakers, deterministic from ``seed``.

    Genders alternate from a seeded start (so the training and held-out ranges are both mixed); each
    speaker gets a
    different (accent, variant) pair while pairs last, and pitch / speed / pitch shift come from
    shuffled even grids so no two speakers share a setting by chance.
    """
    if num_speakers < 1:
        raise ValueError("num_speakers must be >= 1")
    rng = np.random.default_rng([seed, 1001])
    start = int(rng.integers(2))
    genders = [("male", "female")[(i + start) % 2] for i in range(num_speakers)]
    accents = list(ACCENTS)
    combos = {
        g: [(a, v) for a in accents for v in (MALE_VARIANTS if g == "male" else FEMALE_VARIANTS)]
        for g in ("male", "female")
    }
    for g in combos:
        order = rng.permutation(len(combos[g]))
        combos[g] = [combos[g][i] for i in order]
    # Spread accents: walk the permuted combos but prefer accents not used yet.
    used_accents: dict[str, int] = dict.fromkeys(accents, 0)
    names = {"male": list(rng.permutation(MALE_NAMES)), "female": list(rng.permutation(FEMALE_NAMES))}
    pitches = _spread(rng, num_speakers, 30, 70)
    speeds = _spread(rng, num_speakers, 140, 185)
    shifts = _spread(rng, num_speakers, -220, 220)
    styles = list(STYLE_TRAITS)
    style_order = [styles[i] for i in rng.permutation(len(styles))]
    pool: list[VoiceProfile] = []
    counters = {"male": 0, "female": 0}
    for i in range(num_speakers):
        g = genders[i]
        cands = combos[g]
        if not cands:  # more speakers than (accent, variant) pairs: reuse, other settings still differ
            cands = combos[g] = [
                (a, v) for a in accents for v in (MALE_VARIANTS if g == "male" else FEMALE_VARIANTS)
            ]
        least = min(used_accents[a] for a, _ in cands)
        pick = next(k for k, (a, _) in enumerate(cands) if used_accents[a] == least)
        accent, variant = cands.pop(pick)
        used_accents[accent] += 1
        k = counters[g]
        counters[g] += 1
        name_list = names[g]
        name = name_list[k % len(name_list)] + ("" if k < len(name_list) else f" {k // len(name_list) + 1}")
        age = AGE_BRACKETS[int(rng.integers(len(AGE_BRACKETS)))]
        style = style_order[i % len(style_order)]
        range_step, speed_f, amp_f = STYLE_VOICE[style]
        traits = tuple(str(t) for t in rng.choice(STYLE_TRAITS[style], size=2, replace=False))
        pool.append(
            VoiceProfile(
                speaker_id=speaker_id(i, first_id),
                name=str(name),
                gender=g,
                age=age,
                style=style,
                traits=traits,
                accent=accent,
                variant=variant,
                pitch=int(np.clip(round(pitches[i]) + AGE_PITCH_OFFSET[age], 5, 95)),
                speed=round(speeds[i] * speed_f * AGE_SPEED_FACTOR[age]),
                amplitude=round(BASE_AMPLITUDE * amp_f),
                range_step=2 + range_step,
                shift_cents=float(round(shifts[i], 1)),
                tempo=float(round(rng.uniform(0.95, 1.05), 3)),
                reverb=float(round(rng.uniform(0.0, 30.0), 1)),
                room_scale=float(round(rng.uniform(10.0, 40.0), 1)),
                gain_db=float(round(rng.uniform(-2.0, 2.0), 2)),
            )
        )
    logger.debug("voice pool: %s", [(v.speaker_id, v.espeak_voice) for v in pool])
    return pool


def session_name(rng: np.random.Generator) -> str:
    """An 11-character YouTube-like session id, as VoxCeleb folders use."""
    return "".join(_SESSION_ALPHABET[int(i)] for i in rng.integers(0, len(_SESSION_ALPHABET), 11))


def make_sessions(
    voice: VoiceProfile, n_sessions: int, seed: int, *, snr_range: tuple[float, float] = (6.0, 34.0)
) -> list[ChannelEffects]:
    """Recording sessions of one speaker, each with its own channel and noise level.

    Verification must not be solvable by matching the channel, so sessions differ in band limits,
    an EQ bump, level and SNR while the voice itself stays fixed.
    """
    index = int(voice.speaker_id[2:])
    rng = np.random.default_rng([seed, 1002, index])
    sessions = []
    names: set[str] = set()
    for _ in range(n_sessions):
        name = session_name(rng)
        while name in names:
            name = session_name(rng)
        names.add(name)
        sessions.append(
            ChannelEffects(
                session_id=name,
                highpass_hz=float(rng.uniform(60.0, 250.0)),
                lowpass_hz=float(rng.uniform(3400.0, 7600.0)),
                eq_hz=float(math.exp(rng.uniform(math.log(400.0), math.log(3000.0)))),
                eq_gain_db=float(rng.uniform(-5.0, 5.0)),
                gain_db=float(rng.uniform(-2.0, 2.0)),
                snr_db=float(rng.uniform(*snr_range)),
            )
        )
    return sessions
