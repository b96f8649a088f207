"""SALMONN annotation JSON → training items, and the collator that turns them into model inputs.

An annotation file is ``{"annotation": [{"path", "task", "text", ...}, ...]}`` with ``path`` relative
to the file's folder (SALMONN's layout; the synthetic corpus writes it under ``audiollm/``). Clips are
read as 16 kHz mono (resampled when they are not); the collator is the processor itself
(:class:`~.prompt.AudioLlmProcessor` with ``responses``: prompt, audio tokens, answer, labels on the
answer only), with each item's instruction from :data:`~.prompt.TASK_INSTRUCTIONS` or, with
``prompts: varied``, drawn from :data:`VARIED_INSTRUCTIONS`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from .encoders import SAMPLE_RATE
from .model import ctc_targets
from .prompt import TASK_INSTRUCTIONS, AudioLlmProcessor

ANNOTATION_DIR = "audiollm"
# stage 2's phrasings per task (SALMONN's prompts/train_prompt.json has many per task); the first is the
# test prompt, so a stage-2 model still answers to exactly SALMONN's strings
VARIED_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "asr": (
        TASK_INSTRUCTIONS["asr"],
        "Transcribe the speech.",
        "What words are spoken in the audio?",
        "Write down exactly what the speaker says.",
    ),
    "audiocaption_v2": (
        TASK_INSTRUCTIONS["audiocaption_v2"],
        "Describe the speaker and how they speak.",
        "Give a short caption of the audio.",
        "Who is speaking, and in what manner?",
    ),
}


@dataclass(frozen=True)
class AudioItem:
    audio: np.ndarray  # 16 kHz mono float32
    task: str
    text: str
    item_id: str


def annotation_file(dataset: Path, name: str) -> Path:
    """``name`` under the dataset's ``audiollm/`` folder, or under the dataset itself."""
    for candidate in (dataset / ANNOTATION_DIR / name, dataset / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no SALMONN annotation {name!r} under {dataset} (or its {ANNOTATION_DIR}/)")


def read_audio(path: Path) -> np.ndarray:
    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        common = gcd(int(rate), SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // common, int(rate) // common).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_annotation(
    path: Path, tasks: Sequence[str], max_seconds: float
) -> tuple[list[AudioItem], dict[str, int]]:
    """The items of ``tasks`` (all when empty) with their audio, and what was left out and why."""
    entries = json.loads(path.read_text())["annotation"]
    items: list[AudioItem] = []
    left_out: Counter[str] = Counter()
    cache: dict[str, np.ndarray] = {}  # an ASR and a caption item share one clip
    for entry in entries:
        task = str(entry["task"])
        if tasks and task not in tasks:
            left_out[f"task {task}"] += 1
            continue
        text = str(entry.get("text") or "").strip()
        if not text:
            left_out["empty text"] += 1
            continue
        rel = str(entry["path"])
        if rel not in cache:
            cache[rel] = read_audio(path.parent / rel)
        audio = cache[rel]
        if audio.size == 0 or audio.size > max_seconds * SAMPLE_RATE:
            left_out["empty or too long clip"] += 1
            continue
        items.append(AudioItem(audio, task, text, str(entry.get("testset_id", rel))))
    return items, dict(left_out)


def instruction_for(task: str, prompts: str, rng: random.Random | None = None) -> str:
    if prompts == "varied" and task in VARIED_INSTRUCTIONS:
        options = VARIED_INSTRUCTIONS[task]
        return options[0] if rng is None else rng.choice(options)
    if task not in TASK_INSTRUCTIONS:
        raise ValueError(f"task {task!r} has no instruction; known: {', '.join(sorted(TASK_INSTRUCTIONS))}")
    return TASK_INSTRUCTIONS[task]


class AudioItems(Dataset):
    def __init__(self, items: Sequence[AudioItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> AudioItem:
        return self.items[index]


class SalmonnCollator:
    """Items → processor batch with labels; ``prompts: varied`` draws instructions from a seeded stream
    (evaluation: ``rng`` None, the first phrasing, the same every time)."""

    def __init__(
        self, processor: AudioLlmProcessor, prompts: str, seed: int | None = None, *, ctc_alphabet: str = ""
    ) -> None:
        self.processor = processor
        self.prompts = prompts
        self.rng = random.Random(seed) if seed is not None else None
        self.ctc_alphabet = ctc_alphabet  # non-empty: ASR items' transcripts spelled for a CTC head too

    def __call__(self, items: Sequence[AudioItem]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            [it.audio for it in items],
            [instruction_for(it.task, self.prompts, self.rng) for it in items],
            [it.text for it in items],
        )
        batch = dict(batch)
        if self.ctc_alphabet:
            transcripts = [it.text if it.task == "asr" else None for it in items]
            batch["ctc_labels"] = ctc_targets(transcripts, self.ctc_alphabet)
        return batch


def task_counts(items: Sequence[AudioItem]) -> Mapping[str, Any]:
    return dict(sorted(Counter(it.task for it in items).items()))
