"""``manifest.json``: the index of one run — config, speakers, scenes, counts, label histogram, paths.

A corpus built with ``text_source="grammar"`` also gets ``text``: where its lines came from and how
many sentences each text split holds (absent for ``bank`` corpora, whose manifest stays as it was).

Built from the corpus itself and the other writers' reports. Counts of writers that did not run are
left out, and ``paths`` lists only what is on disk, so a partial run (one writer, for a new service's
tests) still gets an honest index; a full run lists everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..corpus import RenderedCorpus
from ..plan import SPLITS, CorpusPlan
from ..sentences import bank_digest
from .files import write_json
from .pyannote import PROTOCOL

FORMAT = "dramaturg-synth/1"
NAME = "manifest.json"
WRITER_COUNTS = (
    "trials",
    "trials_target",
    "tts_clips",
    "realism_items",
    "archetype_items",
    "audiollm_items",
)
"""Counts that come from writers' reports, in the order the manifest lists them."""
PATHS = {
    "diarization": "diarization",
    "speaker_wav": "speaker/wav",
    "trials": "speaker/trials.txt",
    "cast": "speaker/enroll/cast.json",
    "tts": "tts",
    "audiollm": "audiollm/annotation.json",
    "realism": "evaluator/realism.jsonl",
    "archetype": "evaluator/archetype.jsonl",
}


def write_manifest(
    out: Path, corpus: RenderedCorpus, reports: Mapping[str, Any], *, elapsed_s: float
) -> dict[str, Any]:
    """Write ``out/manifest.json`` and return it; ``elapsed_s`` is the run's wall time (the one field
    that differs between two runs of the same config)."""
    plan = corpus.plan
    scenes = [
        {
            "uri": s.uri,
            "split": s.split,
            "duration_s": round(s.duration_s, 3),
            "setting": s.plan.setting,
            "cast": [v.speaker_id for v in s.plan.cast],
            "turns": len(s.turns),
            "overlap_s": round(s.overlap_s(), 3),
        }
        for s in corpus.scenes
    ]
    counts: dict[str, Any] = {
        "speakers": len(plan.pool),
        "train_speakers": len(plan.train_pool),
        "heldout_speakers": len(plan.heldout_pool),
        "scenes": {split: sum(1 for s in scenes if s["split"] == split) for split in SPLITS},
        "scene_hours": round(sum(s["duration_s"] for s in scenes) / 3600.0, 4),
        "overlap_s": round(sum(s["overlap_s"] for s in scenes), 3),
        "speaker_utterances": plan.n_session_utterances,
        **{k: reports[k] for k in WRITER_COUNTS if k in reports},
        "renders": len(plan.render_jobs()),
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "config": plan.config.model_dump(),
        **({"text": text_summary(plan)} if plan.config.text_source != "bank" else {}),
        "sample_rate": corpus.sample_rate,
        "protocol": PROTOCOL,
        "database_yml": "diarization/database.yml",
        "speakers": [
            {
                **v.to_dict(),
                "heldout": v.speaker_id in plan.heldout_ids,
                "mean_f0_st": round(corpus.norms.f0_st[v.speaker_id], 3),
            }
            for v in plan.pool
        ],
        "scenes": scenes,
        "counts": counts,
        **({"label_histogram": reports["label_histogram"]} if "label_histogram" in reports else {}),
        "paths": {k: p for k, p in PATHS.items() if (out / p).exists()},
        "elapsed_s": round(elapsed_s, 2),
    }
    write_json(out / NAME, manifest)
    return manifest


def text_summary(plan: CorpusPlan) -> dict[str, Any]:
    """Where the lines came from: the source, its size and digest, and each text split's size (so a
    service can tell which of its test sentences are held out, and notice a changed grammar)."""
    return {
        "source": plan.config.text_source,
        "split_by": "sentence",
        "sentences": len(plan.bank.lines),
        "splits": {split: len(bank.lines) for split, bank in plan.texts.items()},
        "sha256": bank_digest(plan.bank.lines),
    }
