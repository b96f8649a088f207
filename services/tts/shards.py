"""Training shards in fish-speech's format: length-prefixed ``TextData`` protobufs, one group per speaker.

fish-speech's ``tools/llama/build_dataset.py`` turns a tree of ``clip.npy`` + transcript into
``00000000.protos``, ``00000001.protos``, … and its training loader streams them back. A shard is a
plain concatenation of records, each a 4-byte little-endian unsigned length followed by that many
bytes of a serialised :class:`TextData` (fish-speech packs the length with ``struct.pack("I")``,
native order, which is little-endian on every machine it runs on; it is fixed here so a shard means
the same everywhere). A ``TextData`` is one speaker (``name``) holding one ``Sentence`` per clip:
its transcript(s) in ``texts`` and its codes in ``semantics``, one ``Semantics`` per codebook. The
schema is ``proto/dramaturg/tts/v1/text_data.proto``, field for field fish-speech's, so shards written
here train fish-speech and fish-speech's shards feed dramaturg.

Why this format and not a folder of ``.npy``: a training job opens a handful of large files instead of
millions of small ones, and grouping by speaker is what lets the loader sample several utterances of
one voice into one context.

Writing is safe to interrupt: each shard is written to a hidden temporary file and renamed when it is
complete, so the reader never meets a half-written shard from a killed run (it does detect, and names,
a truncated record in a damaged file rather than returning garbage).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from dramaturg.tts.v1.text_data_pb2 import Semantics, Sentence, TextData

from .dataset import TEXT_EXTENSION, Issue, Reason

__all__ = [
    "SHARD_SUFFIX",
    "Sample",
    "ShardReport",
    "ShardWriter",
    "build_shards",
    "clean_text",
    "codes_of",
    "iter_records",
    "iter_samples",
    "iter_text_data",
    "make_sentence",
    "pack_record",
    "shard_files",
]

logger = logging.getLogger(__name__)

#: fish-speech's shard extension (its loader globs ``*.protos`` in a folder).
SHARD_SUFFIX = ".protos"

_LENGTH = struct.Struct("<I")
_MAX_CODE = 2**32 - 1  # Semantics.values is uint32


def clean_text(text: str) -> str:
    """fish-speech's cleaning at build time: ``{…}`` and ``<…>`` annotations become a space, whitespace
    collapses. Done when packing so that training sees exactly what fish-speech would give it."""
    text = re.sub(r"\{.*?\}", " ", text)
    text = re.sub(r"<.*?>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def make_sentence(texts: str | Sequence[str], codes: np.ndarray) -> Sentence:
    """One clip as a ``Sentence``; ``codes`` is ``(num_codebooks, frames)`` of integers in uint32 range.

    Out-of-range or non-integer codes raise ``ValueError``: protobuf would otherwise wrap a negative
    code (a padding marker, say) into a huge token id without a word.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (num_codebooks, frames), got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > _MAX_CODE):
        raise ValueError(f"codes must be within [0, {_MAX_CODE}], got [{codes.min()}, {codes.max()}]")
    texts = [texts] if isinstance(texts, str) else list(texts)
    return Sentence(texts=texts, semantics=[Semantics(values=row.tolist()) for row in codes])


def codes_of(sentence: Sentence) -> np.ndarray:
    """A ``Sentence``'s codes back as ``(num_codebooks, frames)`` int64, as extraction saved them."""
    if not sentence.semantics:
        return np.zeros((0, 0), dtype=np.int64)
    rows = [np.fromiter(s.values, dtype=np.int64, count=len(s.values)) for s in sentence.semantics]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"codebooks of one sentence differ in length: {[len(r) for r in rows]}")
    return np.stack(rows)


def pack_record(text_data: TextData) -> bytes:
    """One record: the little-endian uint32 length, then the serialised message."""
    body = text_data.SerializeToString()
    if len(body) > 0xFFFFFFFF:
        raise ValueError(f"record of {len(body)} bytes does not fit a 4-byte length prefix")
    return _LENGTH.pack(len(body)) + body


def iter_records(f: BinaryIO, name: str = "<stream>") -> Iterator[bytes]:
    """The serialised messages of one shard, read one at a time (constant memory for any shard size)."""
    offset = 0
    while True:
        head = f.read(_LENGTH.size)
        if not head:
            return
        if len(head) < _LENGTH.size:
            raise ValueError(f"{name}: truncated length prefix at byte {offset}")
        (size,) = _LENGTH.unpack(head)
        body = f.read(size)
        if len(body) < size:
            raise ValueError(f"{name}: record at byte {offset} claims {size} bytes, only {len(body)} remain")
        offset += _LENGTH.size + size
        yield body


class ShardWriter:
    """Appends records to ``out_dir/00000000.protos``, ``00000001.protos``, … up to a size limit each.

    A new shard is started before a record that would push the current one past ``max_shard_bytes``
    (fish-speech closes a shard only after it has passed the limit, so its shards overshoot); a record
    larger than the limit on its own gets a shard to itself. Use as a context manager: on a clean exit
    the last shard is finished; on an exception the shard in progress is discarded and the finished
    ones stay.
    """

    def __init__(
        self, out_dir: str | Path, max_shard_bytes: int = 10 * 1024 * 1024, start_index: int = 0
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.index = start_index
        self.shards: list[Path] = []
        self.records = 0
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._size = 0

    def _path(self) -> Path:
        return self.out_dir / f"{self.index:08d}{SHARD_SUFFIX}"

    def _open(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.out_dir, prefix=f".{self._path().name}.", suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._size = 0

    def _finish(self) -> None:
        if self._file is None:
            return
        assert self._tmp is not None
        self._file.close()
        os.replace(self._tmp, self._path())
        self.shards.append(self._path())
        logger.info("wrote shard %s (%d bytes)", self._path(), self._size)
        self._file, self._tmp = None, None
        self.index += 1

    def write(self, text_data: TextData) -> Path:
        """Append one message; return the shard it goes into."""
        record = pack_record(text_data)
        if self._file is not None and self._size > 0 and self._size + len(record) > self.max_shard_bytes:
            self._finish()
        if self._file is None:
            self._open()
        assert self._file is not None
        self._file.write(record)
        self._size += len(record)
        self.records += 1
        return self._path()

    def close(self) -> list[Path]:
        """Finish the shard in progress; return every shard written."""
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (finished shards stay)."""
        if self._file is not None:
            self._file.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._file, self._tmp = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class ShardReport:
    """What :func:`build_shards` packed, and every clip it left out with the reason."""

    shards: list[Path] = field(default_factory=list)
    speakers: dict[str, int] = field(default_factory=dict)  # speaker -> sentences
    issues: list[Issue] = field(default_factory=list)

    @property
    def sentences(self) -> int:
        return sum(self.speakers.values())

    def summary(self) -> str:
        head = (
            f"packed {self.sentences} sentences of {len(self.speakers)} speakers into {len(self.shards)} "
            f"shards, skipped {len(self.issues)}"
        )
        return "\n".join([head, *(f"  {issue}" for issue in self.issues)])


def build_shards(
    root: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 10 * 1024 * 1024,
    text_extension: str = TEXT_EXTENSION,
    source: str = "folder",
    max_sentences_per_record: int | None = None,
    clean: bool = True,
    overwrite: bool = False,
) -> ShardReport:
    """Pack every ``root/SPEAKER/clip.npy`` with its transcript into shards, one ``TextData`` per speaker.

    This is ``build_dataset.py --input root`` for a folder tree: the speaker is the folder name,
    ``source`` is ``"folder"``, texts are cleaned as fish-speech cleans them (``clean``). A clip without
    readable text or with unreadable / malformed codes is skipped and reported. A speaker with more
    than ``max_sentences_per_record`` clips is split into several records of the same name, so that no
    one record outgrows a shard (the loader treats them as one voice either way).

    Shards already in ``out_dir`` are refused unless ``overwrite``, which removes them first: mixing
    the shards of two builds would duplicate every speaker in training.
    """
    root, out_dir = Path(root), Path(out_dir)
    existing = sorted(out_dir.glob(f"*{SHARD_SUFFIX}")) if out_dir.is_dir() else []
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds {len(existing)} shards: pass overwrite=True")
        for path in existing:
            path.unlink()
    report = ShardReport()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    with ShardWriter(out_dir, max_shard_bytes) as writer:
        for folder in folders:
            sentences: list[Sentence] = []
            for npy in sorted(folder.glob("*.npy")):
                if npy.name.startswith("."):
                    continue
                lab = npy.with_suffix(text_extension)
                try:
                    text = lab.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    report.issues.append(Issue(npy, Reason.MISSING_LAB, f"{lab.name}: {exc}"))
                    continue
                text = clean_text(text) if clean else text.strip()
                if not text:
                    report.issues.append(Issue(lab, Reason.EMPTY_TEXT))
                    continue
                try:
                    sentences.append(make_sentence(text, np.load(npy, allow_pickle=False)))
                except (OSError, ValueError) as exc:
                    report.issues.append(Issue(npy, Reason.UNREADABLE_CODES, str(exc)))
            if not sentences:
                continue
            step = max_sentences_per_record or len(sentences)
            for start in range(0, len(sentences), step):
                writer.write(
                    TextData(source=source, name=folder.name, sentences=sentences[start : start + step])
                )
            report.speakers[folder.name] = len(sentences)
    report.shards = writer.shards
    logger.info(report.summary().splitlines()[0])
    return report


def shard_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Shards named by files and/or folders (a folder means its ``*.protos``, recursively, sorted)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            out.extend(sorted(p for p in item.rglob(f"*{SHARD_SUFFIX}") if not p.name.startswith(".")))
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"no shard or folder at {item}")
    return out


def iter_text_data(paths: str | Path | Iterable[str | Path]) -> Iterator[TextData]:
    """Every ``TextData`` of the shards in order, streamed: one record in memory at a time."""
    for path in shard_files(paths):
        with open(path, "rb") as f:
            for body in iter_records(f, str(path)):
                message = TextData()
                message.ParseFromString(body)
                yield message


class Sample(NamedTuple):
    """One training utterance: who, what was said, and its codes ``(num_codebooks, frames)`` int64."""

    speaker: str
    text: str
    codes: np.ndarray


def iter_samples(paths: str | Path | Iterable[str | Path]) -> Iterator[Sample]:
    """Every utterance of the shards as a :class:`Sample`, streamed.

    ``text`` is the sentence's first transcript; a sentence can hold several alternatives (fish-speech
    picks one at random per step), which :func:`iter_text_data` exposes.
    """
    for text_data in iter_text_data(paths):
        for sentence in text_data.sentences:
            yield Sample(text_data.name, sentence.texts[0] if sentence.texts else "", codes_of(sentence))
