"""Character voices of the TTS service, persisted under ``$DRAMATURG_HOME/voices/tts``.

A voice is a reference prompt (audio + transcript, given to the model as an earlier turn), a LoRA
adapter trained for the character, or both, and it remembers the model version (``name:version``)
it was made for: a prompt is encoded by that model's codec and an adapter's weights only fit that
model, so using the voice with another model is refused (the server says which model to use).

Layout: one ``<voice_id>.json`` per voice, naming its payload folder ``data/<voice_id>.<token>/``
(``reference.wav``, float32 at the model's rate, and ``adapter/``, a copy of the peft folder, so a
cleaned-up training run does not break the voice). A write stages and fsyncs the payload first and
replaces the JSON atomically last, so a crash leaves the old voice or the new one, never half of one;
payload folders no JSON names (a crash before the commit, an overwrite interrupted after it) are
swept when the registry opens.

Voice ids become file names and every field is echoed back by ListVoices, so all are bounded and an
id is refused without being replayed whole (the speaker service's rules; services do not share code
but for ``shared/``, so the few lines are repeated here).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from dramaturg.shared.grpc.errors import already_exists, echo, invalid_argument, not_found
from dramaturg.shared.store import atomic_write_json, fsync_dir
from dramaturg.shared.voice.catalog import check_voice_fields, check_voice_id

log = logging.getLogger(__name__)

MAX_SPEAKER_ID = 1_000  # CSM prompts "[speaker]"; real casts have a handful
MAX_PATH_CHARS = 4096

#: The files of a peft LoRA folder that are copied into a voice (safetensors only: a pickled
#: ``adapter_model.bin`` could run code when loaded).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "adapter_meta.json"  # written by the lora recipes: base model ref, speaker, speaker id
REFERENCE_FILE = "reference.wav"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# A model's trained speakers (the full / lora recipes write it): name → the CSM speaker id it was
# trained as. The server accepts these names as voice ids too.
SPEAKERS_FILE = "speakers.json"


def read_speakers(folder: str | Path) -> dict[str, int]:
    path = Path(folder) / SPEAKERS_FILE
    if not path.is_file():
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}


@dataclass
class Voice:
    voice_id: str
    display_name: str
    model_ref: str  # "name:version" of the model the voice belongs to
    speaker: int = 0
    reference_text: str = ""
    reference_seconds: float = 0.0
    has_reference: bool = False
    has_adapter: bool = False
    data: str = ""  # payload folder under data/ ("" for none)
    adapter_source: str = ""  # the store ref or folder the adapter was copied from
    labels: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    @property
    def adapter_name(self) -> str:
        """The adapter's name on a loaded model: unique per payload, so an overwritten voice's new
        weights are never mistaken for the old ones still loaded (and free of the dots peft forbids)."""
        return "voice_" + hashlib.sha1(self.data.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Voice:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_tts_voice_fields(display_name: str, labels: dict[str, str], speaker: int) -> None:
    """Every voice's display name and labels rules, and a CSM speaker id in range."""
    check_voice_fields(display_name, labels)
    if not 0 <= speaker <= MAX_SPEAKER_ID:
        raise invalid_argument("speaker", f"{speaker} is not a speaker id: use 0–{MAX_SPEAKER_ID}")


@dataclass(frozen=True)
class AdapterSource:
    """A checked LoRA folder and what its ``adapter_meta.json`` says (the ``lora`` recipes write one):
    the base model it was trained on (a store ref, or the path / hub id it was given) and the CSM
    speaker id of the voice it was trained for."""

    folder: Path
    base_model: str = ""
    speaker_id: int | None = None
    source: str = ""  # what the request named (a store ref or a path), for the voice's record


def resolve_adapter_path(path: str, roots: list[str], field_path: str = "adapter_path") -> Path:
    """The folder ``path`` names, if it lies under one of ``roots``.

    The server reads what a client names, so the rules of audio URIs apply: bounded, no control
    characters, resolved (symlinks and ``..`` included) inside an allowed root; a relative path is
    taken against each root in turn.
    """
    allowed = ", ".join(roots)
    if len(path) > MAX_PATH_CHARS:
        raise invalid_argument(field_path, f"{echo(path)} is longer than {MAX_PATH_CHARS} characters")
    if _CONTROL_CHARS.search(path):
        raise invalid_argument(
            field_path, f"{echo(path)} holds control characters; name a folder under: {allowed}"
        )
    if not roots:
        raise invalid_argument(
            field_path, "this server accepts no adapter folders: its adapter_roots setting is empty"
        )
    bases = [Path(path)] if Path(path).is_absolute() else [Path(root) / path for root in roots]
    try:
        candidates = [base.resolve() for base in bases]
        real = next((c for c in candidates if c.exists()), candidates[0])
        is_dir = real.is_dir()
    except (OSError, RuntimeError) as exc:  # a name too long for the OS, a symlink loop
        raise invalid_argument(
            field_path,
            f"cannot look up {echo(path)} ({getattr(exc, 'strerror', None) or type(exc).__name__}); "
            f"name a folder under: {allowed}",
        ) from exc
    if not any(real.is_relative_to(Path(root).resolve()) for root in roots):
        raise invalid_argument(field_path, f"{echo(path)} is outside the adapter roots: {allowed}")
    if not is_dir:
        raise invalid_argument(field_path, f"no adapter folder at {echo(path)} (under: {allowed})")
    return real


def check_adapter_files(
    folder: Path, max_bytes: int, field_path: str, shown: str, source: str = ""
) -> AdapterSource:
    """``folder`` must hold a LoRA ``adapter_config.json`` and ``adapter_model.safetensors`` within
    ``max_bytes`` (``shown`` names it in errors); whether the weights fit the model is checked by
    loading them, which the server does before the voice is stored."""
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise invalid_argument(
            field_path,
            f"{shown} is not a peft adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(PeftModel.save_pretrained writes both; the lora recipes publish such folders)",
        )
    config = _read_json(config_path, field_path, shown)
    if config.get("peft_type") != "LORA":
        raise invalid_argument(
            field_path,
            f"{shown} holds a {config.get('peft_type') or 'unknown'} adapter; only LoRA voices are served",
        )
    size = config_path.stat().st_size + weights.stat().st_size
    if size > max_bytes:
        raise invalid_argument(field_path, f"the adapter is {size} bytes; at most {max_bytes} are accepted")
    meta = _read_json(folder / ADAPTER_META, field_path, shown) if (folder / ADAPTER_META).is_file() else {}
    speaker_id = meta.get("speaker_id")
    return AdapterSource(
        folder=folder,
        base_model=str(meta.get("base_model") or ""),
        speaker_id=int(speaker_id) if isinstance(speaker_id, int) and speaker_id >= 0 else None,
        source=source,
    )


def _read_json(path: Path, field_path: str, shown: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise invalid_argument(field_path, f"{path.name} in {shown} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise invalid_argument(field_path, f"{path.name} in {shown} is not a JSON object")
    return data


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class VoiceRegistry:
    """Every voice, cached in memory (reference audio too, once read), one JSON file each on disk.

    Methods that write or copy files block: the server calls them in a worker thread.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_root = root / "data"
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._voices: dict[str, Voice] = {}
        self._references: dict[str, np.ndarray] = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                voice = Voice.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error("skipping unreadable voice %s: %s", path, exc)
                continue
            self._voices[voice.voice_id] = voice
        self._sweep()

    def _sweep(self) -> None:
        """Remove payload folders no voice names: leftovers of a crash mid-write or mid-overwrite."""
        used = {v.data for v in self._voices.values() if v.data}
        for folder in self.data_root.iterdir():
            if folder.name not in used:
                log.info("removing unreferenced voice data %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def check_new(self, voice_id: str) -> None:
        if voice_id in self._voices:
            raise already_exists("voice", voice_id, "set overwrite=true to replace it")

    def add(
        self,
        voice: Voice,
        *,
        reference: np.ndarray | None = None,
        sample_rate: int = 0,
        adapter: AdapterSource | None = None,
        overwrite: bool = False,
    ) -> Voice:
        """Store ``voice`` with its reference audio and a copy of its adapter folder (see the module)."""
        check_voice_id(voice.voice_id)
        check_tts_voice_fields(voice.display_name, voice.labels, voice.speaker)
        folder = self.data_root / f"{voice.voice_id}.{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        try:
            if reference is not None:
                sf.write(
                    folder / REFERENCE_FILE,
                    np.asarray(reference, np.float32),
                    sample_rate,
                    format="WAV",
                    subtype="FLOAT",
                )
                _fsync_file(folder / REFERENCE_FILE)
            if adapter is not None:
                (folder / "adapter").mkdir()
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META):
                    if name == ADAPTER_META and not (adapter.folder / name).is_file():
                        continue
                    shutil.copyfile(adapter.folder / name, folder / "adapter" / name)
                    _fsync_file(folder / "adapter" / name)
                fsync_dir(folder / "adapter")
            fsync_dir(folder)
            fsync_dir(self.data_root)
            voice = dataclasses.replace(
                voice,
                data=folder.name,
                has_reference=reference is not None,
                has_adapter=adapter is not None,
                adapter_source=adapter.source if adapter is not None else "",
            )
            with self._lock:
                if not overwrite:
                    self.check_new(voice.voice_id)
                previous = self._voices.get(voice.voice_id)
                atomic_write_json(self.root / f"{voice.voice_id}.json", voice.to_json())  # the commit
                self._voices[voice.voice_id] = voice
                if reference is not None:
                    self._references[voice.data] = np.asarray(reference, np.float32)
                if previous is not None:
                    self._references.pop(previous.data, None)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if previous is not None and previous.data:
            shutil.rmtree(self.data_root / previous.data, ignore_errors=True)
        return voice

    def find(self, voice_id: str) -> Voice | None:
        """The voice added under ``voice_id``, or None."""
        return self._voices.get(voice_id)

    def get(self, voice_id: str, field_path: str = "voice_id") -> Voice:
        check_voice_id(voice_id, field_path)
        voice = self._voices.get(voice_id)
        if voice is None:
            raise not_found("voice", voice_id, "AddVoice it first, or ListVoices to see the voices there are")
        return voice

    def reference(self, voice: Voice) -> np.ndarray:
        """The voice's reference audio (float32 at its model's rate), read once and cached by payload
        (a request that looked the voice up just before an overwrite still gets its own audio)."""
        cached = self._references.get(voice.data)
        if cached is None:
            cached, _ = sf.read(self.data_root / voice.data / REFERENCE_FILE, dtype="float32")
            self._references[voice.data] = cached
        return cached

    def adapter_path(self, voice: Voice) -> Path:
        return self.data_root / voice.data / "adapter"

    def remove(self, voice_id: str) -> Voice:
        voice = self.get(voice_id)
        with self._lock:
            (self.root / f"{voice_id}.json").unlink(missing_ok=True)
            fsync_dir(self.root)
            self._voices.pop(voice_id, None)
            self._references.pop(voice.data, None)
        if voice.data:
            shutil.rmtree(self.data_root / voice.data, ignore_errors=True)
        return voice

    def list(self) -> list[Voice]:
        return sorted(self._voices.values(), key=lambda v: v.voice_id)
