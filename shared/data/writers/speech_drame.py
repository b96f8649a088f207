"""``evaluator/``: Speech-DRAME realism (ROLE) and archetype (Arche) JSONL with noisy rater scores.

The 1-5 reference labels are derived from the prosody actually measured on each clip, relative to the
speaker's own typical delivery (``SpeakerNorms``); each item then gets ``raters`` noisy copies from
raters with a fixed personal bias, as human annotation would. Realism items are the scene turns
(with the scene as context); archetype items are the speaker-corpus utterances, one in five paired
with a question that asks for a different line than the one spoken (``content_pass`` false).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import seeds
from ..clips import Clip
from ..corpus import RenderedCorpus
from ..plan import PlannedLine, PlannedScene
from ..prosody import (
    ARCHETYPE_DIMENSIONS,
    REALISM_DIMENSIONS,
    archetype_labels,
    rater_bools,
    rater_scores,
    realism_labels,
)
from . import Report
from .files import write_jsonl, write_wav

DIR = "evaluator"
MISMATCH_PROBABILITY = 0.2
"""Share of archetype questions that cue another line than the one spoken."""

Histogram = dict[str, list[int]]
"""Dimension → how many items got each label 1..5."""


def write_speech_drame(out: Path, corpus: RenderedCorpus) -> Report:
    """Write both item sets (all, train, test) and their clips under ``out/evaluator``."""
    config = corpus.plan.config
    bias_rng = seeds.rng(config.seed, seeds.RATER, seeds.RATER_BIAS)
    realism_bias = list(bias_rng.normal(0.0, 0.3, config.raters))
    archetype_bias = list(bias_rng.normal(0.0, 0.3, config.raters))
    hist: Histogram = {d: [0] * 5 for d in (*REALISM_DIMENSIONS, *ARCHETYPE_DIMENSIONS)}
    evdir = out / DIR
    realism = _realism_items(evdir, corpus, realism_bias, hist)
    archetype = _archetype_items(evdir, corpus, archetype_bias, hist)
    write_jsonl(evdir / "realism.jsonl", realism)
    write_jsonl(evdir / "archetype.jsonl", archetype)
    for name, items in (("realism", realism), ("archetype", archetype)):
        for split in ("train", "test"):
            write_jsonl(evdir / f"{name}_{split}.jsonl", [r for r in items if r["split"] == split])
    return {"realism_items": len(realism), "archetype_items": len(archetype), "label_histogram": hist}


def _realism_items(
    evdir: Path, corpus: RenderedCorpus, bias: list[float], hist: Histogram
) -> list[dict[str, Any]]:
    """One ROLE item per scene turn; writes its clip and counts its labels into ``hist``."""
    config, norms = corpus.plan.config, corpus.norms
    items = []
    for i, clip in enumerate(corpus.clips_of("role")):
        assert clip.measures is not None and clip.scene is not None
        write_wav(evdir / clip.rel_path, clip.samples, corpus.sample_rate)
        labels = realism_labels(
            clip.measures,
            emotion=clip.line.emotion,
            style=clip.voice.style,
            speaker_f0_st=norms.f0_st[clip.voice.speaker_id],
            baseline=norms.baseline[(clip.voice.speaker_id, "studio")],
        )
        rng = seeds.rng(config.seed, seeds.RATER, seeds.RATER_REALISM, i)
        for d, v in labels.items():
            hist[d][v - 1] += 1
        items.append(
            {
                "id": f"role-synth_v1_{i:04d}",
                "dataset_name": "ROLE",
                "local_scene": local_scene(clip, clip.scene, clip.prev),
                "char_age": clip.voice.age,
                "char_style": clip.voice.char_style,
                "char_profile": clip.voice.char_profile,
                "transcript": clip.line.text,
                "wav_path": clip.rel_path,
                "annotations": {d: rater_scores(labels[d], rng, bias) for d in REALISM_DIMENSIONS},
                "split": clip.split,
                "speaker_id": clip.voice.speaker_id,
                "emotion": clip.line.emotion,
                "scene_uri": clip.scene.uri,
                "reference": labels,
                "measures": clip.measures.to_dict(),
            }
        )
    return items


def local_scene(clip: Clip, scene: PlannedScene, prev: PlannedLine | None) -> str:
    """The ROLE prompt's context: setting, who is present, the line just heard, the situation."""
    others = [v.name for v in scene.cast if v.speaker_id != clip.voice.speaker_id]
    return (
        f"{scene.setting} {clip.voice.name} is talking with {', '.join(others)}. "
        + (f'{prev.voice.name} has just said: "{prev.line.text}"' if prev else "This opens the scene.")
        + f" Situation: {clip.line.cue}"
    )


def _archetype_items(
    evdir: Path, corpus: RenderedCorpus, bias: list[float], hist: Histogram
) -> list[dict[str, Any]]:
    """One Arche item per speaker-corpus utterance; writes its clip and counts its labels into ``hist``."""
    config, bank = corpus.plan.config, corpus.plan.bank
    items = []
    for i, clip in enumerate(corpus.clips_of("session")):
        assert clip.measures is not None
        rng = seeds.rng(config.seed, seeds.RATER, seeds.RATER_ARCHETYPE, i)
        mismatch = bool(rng.random() < MISMATCH_PROBABILITY)
        cue_line = clip.line
        if mismatch:
            others = [s for s in bank.lines if s.emotion != clip.line.emotion]
            cue_line = others[int(rng.integers(len(others)))]
        content_pass, labels = archetype_labels(
            clip.measures,
            emotion=cue_line.emotion,
            style=clip.voice.style,
            content_matches=not mismatch,
            baseline=corpus.norms.baseline[(clip.voice.speaker_id, "session")],
        )
        rel = f"wav/arche/{clip.rel_path.replace('/', '_')}"
        write_wav(evdir / rel, clip.samples, corpus.sample_rate)
        noun = "man" if clip.voice.gender == "male" else "woman"
        question = (
            f"You are {clip.voice.name}, {'an' if clip.voice.age[0] in 'AEIOU' else 'a'} "
            f"{clip.voice.age.lower()} {noun} who is {clip.voice.style.lower()}. {cue_line.cue} "
            f"Respond in a {cue_line.emotion} tone. You say:"
        )
        for d, v in labels.items():
            hist[d][v - 1] += 1
        items.append(
            {
                "id": f"synth_en_{clip.voice.style}_{i:04d}",
                "dataset_name": "Arche",
                "question": question,
                "wav_path": rel,
                "annotations": {
                    "content_pass": rater_bools(content_pass, rng, config.raters),
                    **{d: rater_scores(labels[d], rng, bias) for d in ARCHETYPE_DIMENSIONS},
                },
                "split": clip.split,
                "speaker_id": clip.voice.speaker_id,
                "emotion": cue_line.emotion,
                "transcript": clip.line.text,
                "reference": {"content_pass": content_pass, **labels},
                "measures": clip.measures.to_dict(),
            }
        )
    return items
