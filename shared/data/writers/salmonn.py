"""``audiollm/``: ASR and audio-caption (AAC) items in SALMONN's annotation JSON.

Every scene turn, cut as a role clip, becomes two items over the same wav: its transcript (``asr``)
and a caption (``audiocaption_v2``) built from what is known of the speaker and what was measured on
the clip, so a caption never claims a pace or pitch the audio does not have. Besides SALMONN's fields
each item names its ``speaker`` and whether that voice is ``heldout`` (never in a training split), so
an evaluation can score held-out sentences spoken by held-out voices; SALMONN's readers ignore them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..corpus import RenderedCorpus
from ..prosody import ProsodyMeasures
from ..voices import VoiceProfile
from . import Report
from .files import write_json, write_wav

DIR = "audiollm"


def write_salmonn(out: Path, corpus: RenderedCorpus) -> Report:
    """Write ``annotation.json`` (and per-split copies) and the clips under ``out/audiollm``."""
    adir = out / DIR
    annotation: list[dict[str, Any]] = []
    heldout = corpus.plan.heldout_ids
    for i, clip in enumerate(corpus.clips_of("role")):
        assert clip.measures is not None
        rel = clip.rel_path.replace("wav/role/", "wav/")
        write_wav(adir / rel, clip.samples, corpus.sample_rate)
        annotation.append(
            {
                "testset_id": f"asr_{i:05d}",
                "path": rel,
                "task": "asr",
                "text": clip.line.text,
                "split": clip.split,
                "speaker": clip.voice.speaker_id,
                "heldout": clip.voice.speaker_id in heldout,
            }
        )
        annotation.append(
            {
                "testset_id": f"aac_{i:05d}",
                "path": rel,
                "task": "audiocaption_v2",
                "text": caption_for(clip.voice, clip.measures, clip.line.emotion),
                "split": clip.split,
                "speaker": clip.voice.speaker_id,
                "heldout": clip.voice.speaker_id in heldout,
            }
        )
    write_json(adir / "annotation.json", {"annotation": annotation})
    for split in ("train", "test"):
        write_json(
            adir / f"annotation_{split}.json", {"annotation": [a for a in annotation if a["split"] == split]}
        )
    return {"audiollm_items": len(annotation)}


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
