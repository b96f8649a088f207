"""File primitives every writer uses, so the formats agree on sample encoding and number precision."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM (what every recipe reads); values were kept inside ±1 by protect_clipping."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")


def fmt_seconds(t: float) -> str:
    """Seconds with 6 decimals: round-trips to the exact sample at any rate up to 500 kHz."""
    return f"{t:.6f}"


def write_jsonl(path: Path, items: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8 kept as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")


def write_json(path: Path, obj: Any) -> None:
    """Indented JSON (one space: readable, still compact), UTF-8 kept as is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
