"""The corpus's Speech-DRAME JSONL → items, clips and SFT rows for the evaluator's training.

The writer (``shared/data/writers/speech_drame.py``) lays out ``evaluator/`` as ``realism.jsonl`` and
``archetype.jsonl`` (every item) plus ``{realism,archetype}_{train,test}.jsonl``; each item names its
clip (``wav_path``, relative to ``evaluator/``). Training reads the ``train`` files and scores the
``test`` files (held out: other scenes and speakers' lines). ``dataset`` may be the corpus root or its
``evaluator/`` folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from dramaturg.services.evaluator.model import SAMPLE_RATE
from dramaturg.services.evaluator.prompts import PromptVariations, item_dimensions, sft_examples

DIR = "evaluator"
KINDS = {"realism": ("realism",), "archetype": ("archetype",), "both": ("realism", "archetype")}


def evaluator_dir(dataset: str | Path) -> Path:
    """The folder holding the JSONL: ``dataset/evaluator`` or ``dataset`` itself."""
    root = Path(dataset)
    folder = root / DIR if (root / DIR).is_dir() else root
    if not any(folder.glob("*_train.jsonl")):
        raise FileNotFoundError(f"{folder}: no Speech-DRAME JSONL (realism_train.jsonl, …) found")
    return folder


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_split(folder: Path, item_set: str, split: str) -> list[dict[str, Any]]:
    """The items of ``item_set`` (realism | archetype | both) in ``split`` (train | test)."""
    if item_set not in KINDS:
        raise ValueError(f"item_set {item_set!r}: expected one of {', '.join(KINDS)}")
    return [item for kind in KINDS[item_set] for item in read_jsonl(folder / f"{kind}_{split}.jsonl")]


def load_clip(path: str | Path) -> np.ndarray:
    """Mono float32 at 16 kHz."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), rate, SAMPLE_RATE).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


def load_clips(folder: Path, items: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``wav_path`` → samples, each clip read once."""
    return {p: load_clip(folder / p) for p in dict.fromkeys(str(it["wav_path"]) for it in items)}


def rater_mean(item: Mapping[str, Any], dimension: str) -> float:
    """The raters' mean score (missing scores count as 1, as ``rater_target`` counts them)."""
    scores = [1 if s is None else int(s) for s in item["annotations"][dimension]]
    return float(np.mean(scores)) if scores else 1.0


def with_mean_targets(item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``item`` whose every 1-5 dimension has one "rater": the raters' mean, rounded half up."""
    annotations = dict(item["annotations"])
    for dimension in item_dimensions(item):
        annotations[dimension] = [int(min(5, max(1, np.floor(rater_mean(item, dimension) + 0.5))))]
    return {**item, "annotations": annotations}


def sft_rows(
    items: Sequence[Mapping[str, Any]],
    *,
    target: str,
    seed: int,
    detailed: bool,
    dimensions: Sequence[str] | None = None,
    variations: PromptVariations | None = None,
) -> list[dict[str, Any]]:
    """:func:`~dramaturg.services.evaluator.prompts.sft_examples` rows with ``target`` per_rater | mean
    (and ``variations``: prompt wordings drawn per row, from a stream seeded by ``seed`` + 1).

    Each row also carries ``reference``, the raters' mean (what the score probe, ``probe.py``, learns).
    """
    means = {(item["id"], dimension): rater_mean(item, dimension)
             for item in items for dimension in item_dimensions(item)}
    if target == "mean":
        items = [with_mean_targets(item) for item in items]
    elif target != "per_rater":
        raise ValueError(f"target {target!r}: expected per_rater or mean")
    rng = np.random.default_rng(seed)
    rows = sft_examples(items, rng=rng, detailed=detailed, dimensions=dimensions or None,
                        variations=variations, variation_rng=np.random.default_rng(seed + 1))
    return [{**row, "reference": means[(row["id"], row["dimension"])]} for row in rows]


class WithAudio:
    """A collator wrapper that adds each row's clip (``audio``) from ``clips`` by its ``wav_path``.

    The dataset rows stay small (text and a path); every clip is read once, before training.
    """

    def __init__(self, collator: Any, clips: Mapping[str, np.ndarray]) -> None:
        self.collator = collator
        self.clips = clips

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collator([{**f, "audio": self.clips[str(f["wav_path"])]} for f in features])
