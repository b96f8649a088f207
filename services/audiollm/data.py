"""SALMONN annotation JSON → training items, and the collator that turns them into model inputs.

An annotation file is ``{"annotation": [{"path", "task", "text", ...}, ...]}`` with ``path`` relative
to the file's folder (SALMONN's layout; the synthetic corpus writes it under ``audiollm/``). Clips are
read as 16 kHz mono (resampled when they are not); the collator is the processor itself
(:class:`~.prompt.AudioLlmProcessor` with ``responses``: prompt, audio tokens, answer, labels on the
answer only), with each item's instruction from :data:`~.prompt.TASK_INSTRUCTIONS` or, with
``prompts: varied``, drawn from :data:`VARIED_INSTRUCTIONS`.

``edge_augment`` (seconds, 0: off) makes training ASR clips look like what a diarization pipeline cuts
out of a scene (:func:`diarized_edges`): a turn's boundaries are rarely the line's — they start or end
a little inside it, or take in a piece of the neighbouring speaker's line, over it or next to it. A
model that only heard clean, whole lines answers such a crop with a different line.
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


def diarized_edges(
    audio: np.ndarray, neighbour: np.ndarray, seconds: float, rng: random.Random
) -> np.ndarray:
    """``audio`` cut the way a diarized turn may be: each edge either trimmed by up to ``seconds`` / 2
    or given up to ``seconds`` of ``neighbour`` (the end of it before the clip, its start after),
    mixed over the clip's edge or placed next to it, at the neighbour's own level. At least half
    the clip always stays."""
    most = int(seconds * SAMPLE_RATE)
    if most <= 0:
        return audio
    out = audio
    for side in ("start", "end"):
        choice = rng.random()
        if choice < 1 / 3:  # trimmed: the turn starts late / ends early
            cut = min(rng.randint(0, most // 2), out.size // 4)
            out = out[cut:] if side == "start" else out[: out.size - cut]
        elif choice < 2 / 3 and neighbour.size:  # a piece of the neighbour's line
            size = min(rng.randint(1, most), neighbour.size)
            piece = neighbour[-size:] if side == "start" else neighbour[:size]
            overlap = rng.randint(0, min(size, out.size // 4))  # 0: next to it; else over the edge
            mixed = out.copy()
            if side == "start":
                mixed[:overlap] += piece[size - overlap:]
                out = np.concatenate([piece[: size - overlap], mixed])
            else:
                mixed[mixed.size - overlap:] += piece[:overlap]
                out = np.concatenate([mixed, piece[overlap:]])
    return np.clip(out, -1.0, 1.0).astype(np.float32)


class SalmonnCollator:
    """Items → processor batch with labels; ``prompts: varied`` draws instructions from a seeded stream
    (evaluation: ``rng`` None, the first phrasing, the same every time). With ``edge_augment`` > 0 and
    a seed (training), each ASR clip's edges are cut as a diarized turn's may be, the batch's other
    clips serving as neighbours."""

    def __init__(
        self, processor: AudioLlmProcessor, prompts: str, seed: int | None = None, *, ctc_alphabet: str = "",
        edge_augment: float = 0.0,
    ) -> None:
        self.processor = processor
        self.prompts = prompts
        self.rng = random.Random(seed) if seed is not None else None
        self.ctc_alphabet = ctc_alphabet  # non-empty: ASR items' transcripts spelled for a CTC head too
        self.edge_augment = float(edge_augment)

    def audio_of(self, items: Sequence[AudioItem]) -> list[np.ndarray]:
        if self.rng is None or self.edge_augment <= 0 or len(items) < 2:
            return [it.audio for it in items]
        out = []
        for i, it in enumerate(items):
            if it.task != "asr":
                out.append(it.audio)
                continue
            neighbour = items[(i + 1 + self.rng.randrange(len(items) - 1)) % len(items)].audio
            out.append(diarized_edges(it.audio, neighbour, self.edge_augment, self.rng))
        return out

    def __call__(self, items: Sequence[AudioItem]) -> dict[str, torch.Tensor]:
        batch = self.processor(
            self.audio_of(items),
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
