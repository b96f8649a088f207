"""Enrolled voices: named speaker embeddings, persisted under ``$DRAMATURG_HOME/voices/speaker``.

A voice is the L2-normalised mean of its utterances' embeddings, and it remembers which model version
made it: embeddings of different models live in different spaces, so a voice is only compared with
embeddings of its own model. Each voice is one JSON file written atomically, so a crash mid-enrolment
leaves the previous state.

A voice id becomes a file name and every field is echoed back by ListVoices, so all of them are
bounded: a hostile id is refused as INVALID_ARGUMENT without being replayed whole (a 10,000-character
id quoted in the error once made the status too big for the client to read).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dramaturg.shared.grpc.errors import already_exists, not_found
from dramaturg.shared.store import atomic_write_json
from dramaturg.shared.validation import require_finite
from dramaturg.shared.voice.catalog import check_voice_fields, check_voice_id


@dataclass
class Voice:
    voice_id: str
    display_name: str
    model_ref: str  # "name:version" of the model that made the embedding
    embedding: np.ndarray
    num_utterances: int
    total_seconds: float
    labels: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    def to_json(self) -> dict:
        return {
            "voice_id": self.voice_id,
            "display_name": self.display_name,
            "model_ref": self.model_ref,
            "embedding": [float(x) for x in self.embedding],
            "num_utterances": self.num_utterances,
            "total_seconds": self.total_seconds,
            "labels": self.labels,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict) -> Voice:
        return cls(
            voice_id=data["voice_id"],
            display_name=data.get("display_name", ""),
            model_ref=data["model_ref"],
            embedding=np.asarray(data["embedding"], dtype=np.float32),
            num_utterances=int(data["num_utterances"]),
            total_seconds=float(data["total_seconds"]),
            labels=dict(data.get("labels") or {}),
            created_at=data.get("created_at", ""),
        )


class VoiceRegistry:
    """All enrolled voices, cached in memory, one JSON file each on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._voices: dict[str, Voice] = {}
        for path in sorted(self.root.glob("*.json")):
            voice = Voice.from_json(json.loads(path.read_text()))
            self._voices[voice.voice_id] = voice

    def check_new(self, voice_id: str) -> None:
        if voice_id in self._voices:
            raise already_exists("voice", voice_id, "set overwrite=true to replace it")

    def enroll(self, voice: Voice, overwrite: bool = False) -> Voice:
        check_voice_id(voice.voice_id)
        check_voice_fields(voice.display_name, voice.labels)
        # The last guard (the servicer checks first): a NaN voice would match nothing, ever.
        require_finite(voice.embedding, f"the embedding of voice {voice.voice_id!r}", model=voice.model_ref)
        with self._lock:
            if not overwrite:
                self.check_new(voice.voice_id)
            atomic_write_json(self.root / f"{voice.voice_id}.json", voice.to_json())
            self._voices[voice.voice_id] = voice
        return voice

    def get(self, voice_id: str, field_path: str = "voice_id") -> Voice:
        check_voice_id(voice_id, field_path)
        voice = self._voices.get(voice_id)
        if voice is None:
            raise not_found("voice", voice_id, "enroll it first, or ListVoices to see the enrolled ones")
        return voice

    def delete(self, voice_id: str) -> Voice:
        voice = self.get(voice_id)
        with self._lock:
            (self.root / f"{voice_id}.json").unlink(missing_ok=True)
            self._voices.pop(voice_id, None)
        return voice

    def list(self) -> list[Voice]:
        return sorted(self._voices.values(), key=lambda v: v.voice_id)
