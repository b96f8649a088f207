"""Speech-DRAME-style prompts: one acting dimension per prompt, with the character and scene as context.

Speech-DRAME (arXiv 2511.01261; code: github.com/Anuttacon/speech_drame) trains its evaluator
(DRAME-Eval, Qwen2-Audio-7B-Instruct fine-tuned fully or with LoRA) on *single-dimension* prompts: one
user turn holding the audio and a text that names ONE dimension with a 5-point rubric, followed by the item's
context; the assistant answers ``<answer>N</answer>``. This module writes prompts in that layout:

.. code-block:: text

    Please evaluate the audio based on the following criteria:

    Based on the given information, rate the following SINGLE dimension on a 1–5 scale (1 = poor, …
    Return ONLY a number between 1 and 5.
    Dimension: PitchDynamics — <what the dimension is>
    <optional note>

    5: <anchor>
    …
    1: <anchor>
    Example output: 4

    Global Profile: <char_profile>, Local Scene: <local_scene>, Available Traits: <char_style>

    Output the answer in <answer> </answer>.

* The frame sentences, the header, the ``Dimension: Name — …`` line, the ``Example output`` line and the
  context line (``Global Profile: …, Local Scene: …, Available Traits: …`` for realism/ROLE items, the
  item's ``question`` for archetype/Arche items) keep Speech-DRAME's wording: they are the *format*, and
  the production preset may be a DRAME-Eval checkpoint that was trained on exactly that format. The
  rubric anchors are written here, for what the synthetic corpus's labels measure
  (``shared/data/prosody.py``): e.g. ``dynamic_range`` is a loudness range, so its anchors talk about
  energy moving over the line, not only emotion.
* The dimension keys are the JSONL's field names (``shared/data/writers/speech_drame.py``:
  ``pitch_variation`` …); the display names are Speech-DRAME's schema names (``PitchDynamics`` …).
* ``detailed=False`` drops the anchors, as Speech-DRAME's "simple" prompts do: a much shorter prompt
  for the tiny model and for CPU training checks.
* ``content_pass`` (archetype, boolean) is not a 1-5 dimension and is not prompted here.
* No system message: Speech-DRAME's training data has none, so the chat template puts in its default
  ("You are a helpful assistant.").
* ``<answer>`` is plain text, not a special token: the production tokenizer has no such token, and a
  GRPO format reward reads the decoded text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dramaturg.shared.data.prosody import ARCHETYPE_DIMENSIONS, REALISM_DIMENSIONS

REALISM = "ROLE"  # ``dataset_name`` of realism items in the JSONL
ARCHETYPE = "Arche"  # ``dataset_name`` of archetype items
SCORES: tuple[int, ...] = (1, 2, 3, 4, 5)
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

FRAME_OPEN = "Please evaluate the audio based on the following criteria:"
FRAME_CLOSE = "Output the answer in <answer> </answer>."
HEADER = (
    "Based on the given information, rate the following SINGLE dimension on a 1–5 scale "
    "(1 = poor, 5 = excellent).\nReturn ONLY a number between 1 and 5.\n"
)
_ANSWER_RE = re.compile(r"<answer>\s*([1-5])\s*</answer>")


@dataclass(frozen=True)
class Rubric:
    """One dimension's prompt block: display name, what it judges, an optional note, anchors 5 → 1."""

    name: str
    summary: str
    anchors: tuple[str, str, str, str, str]  # for scores 5, 4, 3, 2, 1
    example: int
    note: str = ""

    def block(self, *, detailed: bool = True) -> str:
        """The dimension's text after :data:`HEADER` (anchors only when ``detailed``)."""
        lines = [f"Dimension: {self.name} — {self.summary}"]
        if self.note:
            lines.append(self.note)
        if detailed:
            lines[-1] += "\n"
            lines += [
                f"{score}: {anchor}" for score, anchor in zip((5, 4, 3, 2, 1), self.anchors, strict=True)
            ]
        lines.append(f"Example output: {self.example}")
        return "\n".join(lines)


RUBRICS: dict[str, Rubric] = {
    "pitch_variation": Rubric(
        "PitchDynamics",
        "How much, and how fittingly, the pitch moves.",
        (
            "Lively, well-placed pitch movement that carries the emotion and the emphasis.",
            "Varied and fitting, with a few stiff or flat stretches.",
            "Limited inflection; acceptable but not expressive.",
            "Little movement, or jumps that sound forced and out of place.",
            "Flat monotone, or a pitch that plainly contradicts the scene.",
        ),
        4,
    ),
    "rhythmic_naturalness": Rubric(
        "RhythmicNaturalness",
        "Pace, timing and pauses.",
        (
            "Conversational pace; pauses fall where a person would breathe or think.",
            "Mostly natural, with small timing slips.",
            "Even, read-aloud pacing.",
            "Noticeably too fast or too slow, or broken up by long pauses.",
            "So rushed, dragged or fragmented that the line stops sounding spoken.",
        ),
        3,
    ),
    "stress_and_emphasis": Rubric(
        "StressEmphasis",
        "Whether the important words stand out.",
        (
            "The key words are clearly stressed and the emphasis sharpens the meaning.",
            "Mostly right, with one or two weak or misplaced stresses.",
            "Generic sentence stress; little contrast between words.",
            "Weak contrast, or stress on the wrong words.",
            "No audible emphasis at all, or every word hit equally.",
        ),
        5,
    ),
    "emotion_accuracy": Rubric(
        "EmotionAccuracy",
        "Whether the emotion heard is the one the line calls for.",
        (
            "The intended emotion is unmistakable and fits the character and the scene.",
            "The right emotion, slightly under- or over-stated.",
            "Mostly neutral; the emotion is hard to hear.",
            "A different emotion comes through.",
            "The opposite emotion, or a tone that jars with the scene.",
        ),
        4,
    ),
    "emotion_intensity_control": Rubric(
        "EmotionIntensity",
        "Whether the strength of the emotion matches the stakes.",
        (
            "Intensity calibrated to the situation and the character.",
            "Slightly too strong or too weak.",
            "Clearly off in strength, but still plausible.",
            "Overacted, or flat for the stakes.",
            "Wildly out of proportion.",
        ),
        2,
        note="Judge the strength only, whichever emotion is heard.",
    ),
    "dynamic_range": Rubric(
        "EmotionalDynamicRange",
        "How much the energy and the emotion move within the line.",
        (
            "Purposeful rises and falls in energy across the line.",
            "Some movement, a little constrained.",
            "Mostly steady energy.",
            "Nearly level energy from start to end.",
            "Completely level, or erratic jumps with no logic.",
        ),
        3,
    ),
    "voice_identity_matching": Rubric(
        "VoiceIdentityMatching",
        "Whether the voice is this character's voice.",
        (
            "Age, pitch and timbre match the profile and the character's usual voice.",
            "A match with small deviations (a little high or low).",
            "A generic voice that could belong to many characters.",
            "Noticeably off from the character's usual voice.",
            "Clearly someone else's voice.",
        ),
        5,
        note="If the speaker is clearly the wrong person, answer 1.",
    ),
    "trait_embodiment": Rubric(
        "TraitEmbodiment",
        "Whether the listed traits are audible in the delivery.",
        (
            "The character's traits come through clearly and convincingly.",
            "Most traits are audible; one is weak.",
            "Traits are faint; the delivery is neutral.",
            "The delivery leans away from the listed traits.",
            "No trait is audible, or the delivery contradicts the profile.",
        ),
        2,
    ),
    "local_story_fit": Rubric(
        "LocalSceneFit",
        "Whether tone and timing suit the immediate situation.",
        (
            "Tone and pace serve the moment exactly.",
            "A small mismatch; the scene still works.",
            "Neutral; neither helps nor hurts the scene.",
            "The tone is somewhat wrong for the moment.",
            "Works against what the scene needs.",
        ),
        4,
    ),
    "global_story_coherence": Rubric(
        "GlobalStoryFit",
        "Whether the delivery is consistent with the character as established.",
        (
            "Sounds like this character throughout: voice, manner and habits.",
            "Slightly atypical but believable.",
            "Generic; little of the character's personality.",
            "At odds with the character's profile.",
            "Breaks the character entirely.",
        ),
        5,
    ),
    "audio_quality": Rubric(
        "AudioQuality",
        "Noise and artifacts in the recording only.",
        (
            "Clean recording; no audible noise or artifacts.",
            "Faint hiss or minor artifacts on close listening.",
            "Noticeable noise or artifacts that reduce clarity.",
            "Heavy noise, clipping or glitches through parts of the clip.",
            "Speech buried in noise or badly degraded.",
        ),
        4,
        note="Ignore the performance and the context.",
    ),
    "human_likeness": Rubric(
        "HumanLikeness",
        "How much the delivery sounds like a real person speaking.",
        (
            "Indistinguishable from a person: natural intonation, pace and pauses.",
            "Convincing, with slight stiffness or overly even timing.",
            "Mixed: human in places, mechanical in others.",
            "Clearly synthetic: choppy timing, flat or odd inflection.",
            "Entirely machine-like, a monotone read-out.",
        ),
        3,
        note="Ignore audio quality and whether it fits the context.",
    ),
    "appropriateness": Rubric(
        "Appropriateness",
        "Whether the tone fits the role and the scene the question describes.",
        (
            "Fits the role and the scene completely: emotion, status and situation.",
            "A strong fit with minor flaws.",
            "A broad fit, but shallow or with mild inconsistencies.",
            "Only the role or only the scene fits, or the line spoken is not the one asked for.",
            "Fits neither the role nor the scene.",
        ),
        2,
        note="Ignore audio quality and generic naturalness.",
    ),
}
"""Dimension (JSONL field name) → rubric; every realism and 1-5 archetype dimension has one."""

DIMENSIONS: dict[str, tuple[str, ...]] = {
    REALISM: tuple(REALISM_DIMENSIONS),
    ARCHETYPE: tuple(ARCHETYPE_DIMENSIONS),
}
"""``dataset_name`` → the 1-5 dimensions its items are scored on, in the JSONL's order."""


def dimension_prompt(dimension: str, *, detailed: bool = True) -> str:
    """Header + the dimension's block (Speech-DRAME's ``detailed_dimension_prompts`` entry)."""
    try:
        rubric = RUBRICS[dimension]
    except KeyError:
        raise KeyError(f"unknown dimension {dimension!r}; known: {sorted(RUBRICS)}") from None
    return HEADER + rubric.block(detailed=detailed)


def realism_context(item: Mapping[str, Any]) -> str:
    """The ROLE item's context line: the character's profile, the scene, the traits to listen for."""
    return (
        f"Global Profile: {item['char_profile']}, "
        f"Local Scene: {item['local_scene']}, "
        f"Available Traits: {item['char_style']}"
    )


def item_context(item: Mapping[str, Any]) -> str:
    """The context an item is judged against: ROLE → :func:`realism_context`, Arche → its question."""
    kind = item.get("dataset_name", REALISM)
    if kind == REALISM:
        return realism_context(item)
    if kind == ARCHETYPE:
        return str(item["question"])
    raise ValueError(f"unknown dataset_name {kind!r} (expected {REALISM!r} or {ARCHETYPE!r})")


def build_prompt(dimension: str, context: str, *, detailed: bool = True) -> str:
    """The user turn's text for one dimension (the audio goes before it, as its own content part)."""
    return f"{FRAME_OPEN}\n\n{dimension_prompt(dimension, detailed=detailed)}\n\n{context}\n\n{FRAME_CLOSE}"


def item_prompt(item: Mapping[str, Any], dimension: str, *, detailed: bool = True) -> str:
    """:func:`build_prompt` for a JSONL item (realism or archetype)."""
    if dimension not in item_dimensions(item):
        raise ValueError(f"{dimension!r} is not a dimension of {item.get('dataset_name', REALISM)} items")
    return build_prompt(dimension, item_context(item), detailed=detailed)


def item_dimensions(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The 1-5 dimensions an item is scored on."""
    return DIMENSIONS[item.get("dataset_name", REALISM)]


def user_messages(prompt: str) -> list[dict[str, Any]]:
    """One user turn: the audio, then the prompt (the order of Speech-DRAME's training data)."""
    return [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]


def format_answer(score: int) -> str:
    """``<answer>N</answer>`` for an integer score 1..5."""
    if int(score) not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return f"{ANSWER_OPEN}{int(score)}{ANSWER_CLOSE}"


def parse_answer(text: str) -> int | None:
    """The score in the first well-formed ``<answer>N</answer>`` (N in 1..5), or None."""
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def rater_target(item: Mapping[str, Any], dimension: str, rng: np.random.Generator) -> int:
    """A training target as Speech-DRAME draws it: one rater's score, picked at random per example.

    Drawing a rater (rather than the mean) keeps the raters' spread in the targets, so a model trained
    on them puts its probability mass where the raters do and its expected score approaches their mean.
    Missing scores (None) count as 1, as Speech-DRAME counts them.
    """
    scores = [1 if s is None else int(s) for s in item["annotations"][dimension]]
    if not scores:
        return 1
    return scores[int(rng.integers(len(scores)))]


# ------------------------------------------------------------------------------- prompt variations

# Speech-DRAME's dimension keys (its prompt_variations.json ``dimension_name``) → the JSONL field names
SPEECH_DRAME_KEYS: dict[str, str] = {
    "pitch_dynamics": "pitch_variation",
    "rhythmic_naturalness": "rhythmic_naturalness",
    "stress_emphasis": "stress_and_emphasis",
    "emotion_accuracy": "emotion_accuracy",
    "emotion_intensity": "emotion_intensity_control",
    "emotional_dynamic_range": "dynamic_range",
    "voice_identity_matching": "voice_identity_matching",
    "trait_embodiment": "trait_embodiment",
    "local_scene_fit": "local_story_fit",
    "global_story_fit": "global_story_coherence",
}

PromptVariations = Mapping[str, Sequence[str]]
"""Dimension (JSONL field name) → alternative wordings of its prompt (each a whole dimension block)."""


def load_prompt_variations(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Prompt variations from a JSON file in Speech-DRAME's layout (``prompt_variations.json``).

    ``{"variations": {"dimension_prompts": [{"dimension_name": …, "prompt_text": …}, …]}}``:
    ``dimension_name`` is Speech-DRAME's key (``pitch_dynamics`` …) or the JSONL's field name
    (``pitch_variation`` …); ``prompt_text`` is the dimension's whole block, header and rubric included.
    Other keys (``metadata``, ``detailed_variations``: Speech-DRAME's all-dimensions prompts) are
    ignored. A malformed file is a ValueError that names the entry.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"prompt variations {path}: not readable JSON ({error})") from error
    entries = (data.get("variations") or {}).get("dimension_prompts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"prompt variations {path}: expected variations.dimension_prompts, a non-empty list "
                         "of {dimension_name, prompt_text} (Speech-DRAME's layout)")
    found: dict[str, list[str]] = {}
    for index, entry in enumerate(entries):
        name = str(entry.get("dimension_name", "")) if isinstance(entry, dict) else ""
        text = str(entry.get("prompt_text", "")).strip() if isinstance(entry, dict) else ""
        dimension = SPEECH_DRAME_KEYS.get(name, name)
        if dimension not in RUBRICS:
            raise ValueError(f"prompt variations {path}: dimension_prompts[{index}] names dimension "
                             f"{name!r}; use one of {sorted(SPEECH_DRAME_KEYS)} or {sorted(RUBRICS)}")
        if not text:
            raise ValueError(f"prompt variations {path}: dimension_prompts[{index}] has no prompt_text")
        found.setdefault(dimension, []).append(text)
    return {dimension: tuple(texts) for dimension, texts in found.items()}


def variation_prompt(item: Mapping[str, Any], text: str) -> str:
    """A variation's user text, laid out as Speech-DRAME's ``RoleVariation`` rows are: the variation's
    block, the item's context, no frame sentences (the block carries its own instructions)."""
    return f"{text}\n\n{item_context(item)}\n\n"


def row_prompt(item: Mapping[str, Any], dimension: str, *, detailed: bool,
               variations: PromptVariations | None, picker: np.random.Generator) -> str:
    """A training row's user text: one of ``variations`` for its dimension, drawn with ``picker``, when
    the dimension has some; else the standard :func:`item_prompt`."""
    wordings = (variations or {}).get(dimension)
    if wordings:
        return variation_prompt(item, wordings[int(picker.integers(len(wordings)))])
    return item_prompt(item, dimension, detailed=detailed)


def sft_examples(
    items: Sequence[Mapping[str, Any]],
    *,
    rng: np.random.Generator,
    detailed: bool = True,
    dimensions: Sequence[str] | None = None,
    variations: PromptVariations | None = None,
    variation_rng: np.random.Generator | None = None,
) -> list[dict[str, Any]]:
    """Prompt/completion rows (one per item and dimension) for the SFT collator (``collate.py``).

    Each row: ``prompt`` (the user text), ``completion`` (``<answer>N</answer>``), ``wav_path``,
    ``dimension``, ``id``. Audio is not loaded here: the dataset adds it as ``audio`` (16 kHz float).
    With ``variations``, a row whose dimension has some is prompted with one of them, drawn with
    ``variation_rng`` (its own stream: the targets drawn with ``rng`` stay those of a run without).
    """
    picker = variation_rng if variation_rng is not None else np.random.default_rng(0)
    rows = []
    for item in items:
        for dimension in dimensions or item_dimensions(item):
            if dimension not in item_dimensions(item):
                continue
            rows.append(
                {
                    "id": item["id"],
                    "dimension": dimension,
                    "prompt": row_prompt(item, dimension, detailed=detailed, variations=variations,
                                         picker=picker),
                    "completion": format_answer(rater_target(item, dimension, rng)),
                    "wav_path": item["wav_path"],
                }
            )
    return rows


# The store label that records the prompt style a model was trained on, so the service prompts it the
# same way (a model trained on simple prompts and served detailed ones scores off-format).
PROMPTS_LABEL = "prompts"


def prompt_style(detailed: bool) -> str:
    """The label value for a prompt style: ``detailed`` or ``simple``."""
    return "detailed" if detailed else "simple"


def detailed_for(labels: dict[str, str], default: bool) -> bool:
    """Whether to prompt a model in the detailed style: its label if it has one, else ``default``."""
    style = labels.get(PROMPTS_LABEL, "")
    return default if style not in ("detailed", "simple") else style == "detailed"
