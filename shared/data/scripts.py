"""The script bank: the lines actors speak and the places scenes are set, loaded from ``scripts.yaml``.

The words are data, not code: writers of new lines edit (a copy of) the YAML file, and the plan draws
from whatever :class:`ScriptBank` it is given. The bank is validated on load because a typo would not
fail later: an unknown emotion would silently be acted as neutral and labelled as the typo.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .render import EMOTION_ACTING

DEFAULT_PATH = Path(__file__).with_name("scripts.yaml")
"""The bank every corpus is built from unless told otherwise (shipped as package data)."""


@dataclass(frozen=True)
class ScriptLine:
    """A line of the script bank: its emotion, the situation that cues it, and the words."""

    emotion: str
    cue: str
    text: str


@dataclass(frozen=True)
class ScriptBank:
    """Lines (in file order, grouped by emotion) and scene settings; the plan draws both by position."""

    lines: tuple[ScriptLine, ...]
    settings: tuple[str, ...]


def load_script_bank(path: str | Path | None = None) -> ScriptBank:
    """Read and validate a bank (default: :data:`DEFAULT_PATH`).

    Raises ValueError naming the file and the entry when the layout, an emotion or a text is wrong.
    """
    source = Path(path) if path is not None else DEFAULT_PATH
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(doc, Mapping) or set(doc) != {"settings", "lines"}:
        raise ValueError(f"{source}: expected exactly the keys 'settings' and 'lines'")
    settings = doc["settings"]
    if not isinstance(settings, list) or not settings:
        raise ValueError(f"{source}: 'settings' must be a non-empty list")
    for i, setting in enumerate(settings):
        if not isinstance(setting, str) or not setting.strip():
            raise ValueError(f"{source}: settings[{i}] must be a non-empty string")
    groups = doc["lines"]
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"{source}: 'lines' must map emotions to lists of lines")
    lines: list[ScriptLine] = []
    for emotion, items in groups.items():
        lines.extend(_group(source, emotion, items))
    return ScriptBank(lines=tuple(lines), settings=tuple(settings))


@functools.cache
def default_script_bank() -> ScriptBank:
    """The shipped bank, read once per process."""
    return load_script_bank()


def _group(source: Path, emotion: Any, items: Any) -> list[ScriptLine]:
    """One emotion's lines, in file order."""
    if emotion not in EMOTION_ACTING:
        known = ", ".join(EMOTION_ACTING)
        raise ValueError(f"{source}: unknown emotion {emotion!r} (the renderer acts: {known})")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: lines.{emotion} must be a non-empty list")
    return [_line(source, emotion, i, item) for i, item in enumerate(items)]


def _line(source: Path, emotion: str, index: int, item: Any) -> ScriptLine:
    where = f"{source}: lines.{emotion}[{index}]"
    if not isinstance(item, Mapping) or set(item) != {"cue", "text"}:
        raise ValueError(f"{where} must have exactly 'cue' and 'text'")
    cue, text = item["cue"], item["text"]
    if not isinstance(cue, str) or not isinstance(text, str) or not cue.strip() or not text.strip():
        raise ValueError(f"{where}: 'cue' and 'text' must be non-empty strings")
    return ScriptLine(emotion=emotion, cue=cue, text=text)
