"""``diarization/``: a pyannote.database protocol over the mixed scenes.

``Dramaturg.SpeakerDiarization.Synth``: one wav per scene, exact RTTM from the placed speech regions,
a UEM covering the whole file, train/development/test lists and the ``database.yml`` that registers
them, plus per-turn transcripts in ``lab/{uri}.jsonl`` (who says what when) for the demo and tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..corpus import RenderedCorpus
from ..mixdown import MixedScene
from ..plan import SPLITS
from . import Report
from .files import fmt_seconds, write_wav

DIR = "diarization"
DATABASE = "Dramaturg"
PROTOCOL = f"{DATABASE}.SpeakerDiarization.Synth"


def write_pyannote(out: Path, corpus: RenderedCorpus) -> Report:
    """Write the protocol under ``out/diarization``; nothing to count beyond the scenes (the manifest's)."""
    ddir = out / DIR
    for sub in ("wav", "rttm", "uem", "lists", "lab"):
        (ddir / sub).mkdir(parents=True, exist_ok=True)
    sr = corpus.sample_rate
    split_rttm: dict[str, list[str]] = {s: [] for s in SPLITS}
    split_uem: dict[str, list[str]] = {s: [] for s in SPLITS}
    split_uris: dict[str, list[str]] = {s: [] for s in SPLITS}
    for scene in corpus.scenes:
        write_wav(ddir / "wav" / f"{scene.uri}.wav", scene.samples, sr)
        rttm = scene_rttm(scene)
        uem = f"{scene.uri} 1 {fmt_seconds(0.0)} {fmt_seconds(scene.duration_s)}"
        (ddir / "rttm" / f"{scene.uri}.rttm").write_text("\n".join(rttm) + "\n")
        (ddir / "uem" / f"{scene.uri}.uem").write_text(uem + "\n")
        _write_lab(ddir / "lab" / f"{scene.uri}.jsonl", scene)
        split_rttm[scene.split] += rttm
        split_uem[scene.split].append(uem)
        split_uris[scene.split].append(scene.uri)
    for split in SPLITS:
        (ddir / "lists" / f"{split}.lst").write_text("".join(u + "\n" for u in split_uris[split]))
        (ddir / f"{split}.rttm").write_text("".join(r + "\n" for r in split_rttm[split]))
        (ddir / f"{split}.uem").write_text("".join(r + "\n" for r in split_uem[split]))
    (ddir / "database.yml").write_text(yaml.safe_dump(database_spec(), sort_keys=False))
    return {}


def scene_rttm(scene: MixedScene) -> list[str]:
    """RTTM lines from the placed speech regions, sorted by onset (one line per region)."""
    sr = scene.sample_rate
    return [
        f"SPEAKER {scene.uri} 1 {fmt_seconds(a / sr)} {fmt_seconds((b - a) / sr)} <NA> <NA> {spk} <NA> <NA>"
        for a, b, spk in scene.speech_rows()
    ]


def database_spec() -> dict[str, object]:
    """``database.yml``: paths relative to it, so the folder can move."""
    return {
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


def _write_lab(path: Path, scene: MixedScene) -> None:
    """One JSON line per turn: its extent (first to last speech sample), speaker, words and emotion."""
    sr = scene.sample_rate
    with path.open("w") as fh:
        for turn in scene.turns:
            item = {
                "start": round(turn.start / sr, 6),
                "end": round(turn.end / sr, 6),
                "speaker": turn.planned.voice.speaker_id,
                "name": turn.planned.voice.name,
                "text": turn.planned.line.text,
                "emotion": turn.planned.line.emotion,
            }
            fh.write(json.dumps(item) + "\n")
