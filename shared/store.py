"""A versioned model store: a folder layout plus JSON metadata, shared by every service.

Layout (``ROOT`` is ``DRAMATURG_HOME``)::

    ROOT/models/<service>/<name>/<version>/   artifact files (whatever save_pretrained writes)
                                             + dramaturg-model.json (metadata, file sha256s)
    ROOT/models/<service>/<name>/.sequence    last sequence number handed out (versions never reused)
    ROOT/models/<service>/<name>/.lock        flock taken while a version is numbered and published
    ROOT/models/<service>/.default.json       {"name", "version"} the service serves without a ref
    ROOT/models/.generation                   a random token replaced after every change (see below)

BentoML's store is deliberately not used: its dependency tree pins certifi beyond what the rest of
the stack accepts and its gRPC serving is gone, while all we need is "publish atomically, find the
newest, read the metadata". A version is written into a hidden staging folder beside its final
place, its metadata is fsynced, then it is renamed into place, so a crash never leaves a half
version visible; stale staging folders are skipped by every reader and removed when found.

Lookups are cached. Serving resolves a model ref on every RPC, and scanning the version folders and
parsing their JSON each time would block the event loop; instead a :class:`ModelStore` keeps one
snapshot per service and trusts it while ``models/.generation`` is unchanged. Every change through a
store (publish, delete, set_default, in any process) replaces that file after the change is visible,
so the check is one ``stat`` (plus a 40-byte read within two seconds of a change, where a file
system's coarse timestamps could hide a second change). A tree edited by hand is seen after the next
change through a store, or after ``models/.generation`` is deleted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import already_exists, invalid_argument, not_found

log = logging.getLogger(__name__)

META_FILE = "dramaturg-model.json"
FORMAT = 1
LATEST = "latest"
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
_SEQUENCE_FILE = ".sequence"
_LOCK_FILE = ".lock"
_DEFAULT_FILE = ".default.json"
_GENERATION_FILE = ".generation"
# Within this long of the generation file's last change its content is compared too: two changes
# inside one timestamp tick can leave the same inode number, size and times behind.
_RACY_NS = 2_000_000_000
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would accept a trailing newline
_AUTO_VERSION_RE = re.compile(r"^v(\d+)$")
# Staging folders of a live process are left alone; those of dead ones, or older than this, go.
STALE_STAGING_SECONDS = 24 * 3600.0
# Small text manifests are hashed by content (stable across copies); everything else by size + mtime.
MANIFEST_SUFFIXES = frozenset({".json", ".jsonl", ".csv", ".tsv", ".txt", ".lst", ".yaml", ".yml",
                               ".rttm", ".uem", ".lab", ".scp", ".trials"})

ModelRefLike = str | tuple[str, str] | common_pb2.ModelRef


def default_root() -> Path:
    """``DRAMATURG_HOME`` or ``~/.dramaturg``: used only where a caller passes no root."""
    return Path(os.environ.get("DRAMATURG_HOME") or "~/.dramaturg").expanduser()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Small durable-file helpers, also used by the training runner (they live here because the store is
# the lowest layer: it must not import the training package).


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a rename is only as durable as its folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see either the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: serialises threads (each opens its own description) and processes.

    Not re-entrant: a thread that takes it twice deadlocks, so callers never nest the same lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the description releases the lock


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ModelRecord:
    """One published model version, as read from its ``dramaturg-model.json``."""

    service: str
    name: str
    version: str
    path: Path
    architecture: str = ""
    base_model: str = ""
    recipe: str = ""
    data_hash: str = ""
    parent: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: dt.datetime = field(default_factory=_utcnow)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path → {size, sha256}
    sequence: int = 0
    is_default: bool = False

    @property
    def ref(self) -> str:
        """``name:version``: what clients, labels and ``parent`` fields use to point at this version."""
        return f"{self.name}:{self.version}"

    def to_proto(self, *, loaded: bool = False, device: str = "") -> common_pb2.ModelInfo:
        info = common_pb2.ModelInfo(
            ref=common_pb2.ModelRef(name=self.name, version=self.version),
            service=self.service, architecture=self.architecture, base_model=self.base_model,
            recipe=self.recipe, data_hash=self.data_hash, parent=self.parent,
            metrics={k: float(v) for k, v in self.metrics.items()},
            labels={k: str(v) for k, v in self.labels.items()},
            loaded=loaded, is_default=self.is_default, device=device,
        )
        info.created_at.FromDatetime(self.created_at)
        return info

    def to_meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "service": self.service, "name": self.name, "version": self.version,
            "sequence": self.sequence, "architecture": self.architecture, "base_model": self.base_model,
            "recipe": self.recipe, "data_hash": self.data_hash, "parent": self.parent,
            "metrics": dict(self.metrics), "labels": dict(self.labels),
            "created_at": self.created_at.isoformat(), "files": self.files,
        }

    @classmethod
    def from_meta(cls, path: Path, meta: Mapping[str, Any]) -> ModelRecord:
        created = dt.datetime.fromisoformat(meta["created_at"]) if meta.get("created_at") else _utcnow()
        if created.tzinfo is None:
            created = created.replace(tzinfo=dt.UTC)
        return cls(
            service=str(meta["service"]), name=str(meta["name"]), version=str(meta["version"]), path=path,
            architecture=str(meta.get("architecture", "")), base_model=str(meta.get("base_model", "")),
            recipe=str(meta.get("recipe", "")), data_hash=str(meta.get("data_hash", "")),
            parent=str(meta.get("parent", "")),
            metrics={k: float(v) for k, v in (meta.get("metrics") or {}).items()},
            labels={k: str(v) for k, v in (meta.get("labels") or {}).items()},
            created_at=created, files=dict(meta.get("files") or {}), sequence=int(meta.get("sequence", 0)),
        )


def parse_ref(ref: ModelRefLike) -> tuple[str, str]:
    """Split a model reference into (name, version); version "" means latest, name "" the default.

    Accepts ``"name"``, ``"name:latest"``, ``"name:v3"``, ``(name, version)`` and ``common_pb2.ModelRef``.
    """
    if isinstance(ref, common_pb2.ModelRef):
        name, version = ref.name, ref.version
    elif isinstance(ref, tuple):
        if len(ref) != 2:
            raise invalid_argument("model", f"a model ref tuple is (name, version), got {ref!r}")
        name, version = str(ref[0] or ""), str(ref[1] or "")
    elif isinstance(ref, str):
        if ref.count(":") > 1:
            raise invalid_argument("model", f"malformed model ref {ref!r}: use NAME or NAME:VERSION")
        name, colon, version = ref.strip().partition(":")
        if colon and not version:
            raise invalid_argument("model", f"malformed model ref {ref!r}: version after ':' is empty")
    else:
        raise invalid_argument("model", f"unsupported model ref type {type(ref).__name__}")
    if version == LATEST:
        version = ""
    if name and not _NAME_RE.fullmatch(name):
        raise invalid_argument("model.name", f"invalid model name {name!r}: letters, digits, '.', '_', '-'")
    if version and not _NAME_RE.fullmatch(version):
        raise invalid_argument("model.version", f"invalid model version {version!r}")
    if version and not name:
        raise invalid_argument("model.name", "a model version needs a model name")
    return name, version


def _check_name(kind: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value or ""):
        raise invalid_argument(kind, f"invalid {kind} {value!r}: letters, digits, '.', '_', '-' (max 128)")
    return value


def data_hash(paths: str | Path | Iterable[str | Path], *, content_limit: int = 1 << 20) -> str:
    """A fingerprint of a training data set, recorded with every model trained on it.

    Hashes the sorted relative paths and sizes of every file; small text manifests (lists, RTTM,
    JSONL, …) add their content, so a copied data set keeps its hash, and media files add their
    mtime instead, so a large corpus is fingerprinted with ``stat`` calls rather than read in full.
    """
    roots = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    digest = hashlib.sha256()
    for index, root in enumerate(sorted(roots, key=str)):
        root = root.expanduser()
        if root.is_file():
            files = [(root.name, root)]
        elif root.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for fname in sorted(filenames):
                    full = Path(dirpath) / fname
                    files.append((full.relative_to(root).as_posix(), full))
        else:
            raise FileNotFoundError(root)
        for rel, full in files:
            st = full.stat()
            digest.update(f"{index}:{rel}\0{st.st_size}\0".encode())
            if st.st_size <= content_limit and full.suffix.lower() in MANIFEST_SUFFIXES:
                digest.update(b"c" + _file_sha256(full, durable=False).encode())
            else:
                digest.update(f"m{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _file_sha256(path: Path, *, durable: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if durable:
            os.fsync(f.fileno())  # Linux accepts fsync on a read-only descriptor: flushes the writer's data
    return h.hexdigest()


class VersionWriter(contextlib.AbstractContextManager[Path]):
    """``with store.create_version(...) as folder:`` write files into ``folder``; published on clean exit.

    After the block, :attr:`record` holds the published :class:`ModelRecord`. An exception inside the
    block discards the staging folder, so no version appears.
    """

    def __init__(self, store: ModelStore, service: str, name: str, meta: dict[str, Any],
                 version: str | None) -> None:
        self._store = store
        self.service = service
        self.name = name
        self._meta = meta
        self._version = version
        self.staging: Path | None = None
        self.record: ModelRecord | None = None

    def __enter__(self) -> Path:
        name_dir = self._store._name_dir(self.service, self.name)
        name_dir.mkdir(parents=True, exist_ok=True)
        self._store._cleanup_dir(name_dir)
        self.staging = name_dir / f"{_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.staging.mkdir()
        return self.staging

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        assert self.staging is not None
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return False
        try:
            self.record = self._store._publish_staging(self.service, self.name, self.staging, self._meta,
                                                       self._version)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        return False


@dataclass(frozen=True)
class _Snapshot:
    """One service's published versions and default pointer, as of one store generation."""

    generation: tuple[Any, ...]
    versions: dict[str, list[ModelRecord]]  # model name → versions, oldest first (never empty)
    default: tuple[str, str] | None


class ModelStore:
    """Versioned models of every service under ``root/models`` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._snapshots: dict[str, _Snapshot] = {}
        self._snapshots_lock = threading.Lock()
        try:
            self.cleanup_staging()
        except OSError as err:  # a read-only or racing tree must not stop a server from starting
            log.warning("could not clean stale staging folders under %s: %s", self.models_dir, err)

    # ---------------------------------------------------------------------------------------- write

    def create_version(self, service: str, name: str, *, architecture: str, base_model: str, recipe: str,
                       data_hash: str = "", parent: str = "", metrics: Mapping[str, float] | None = None,
                       labels: Mapping[str, str] | None = None, version: str | None = None) -> VersionWriter:
        """A context manager yielding a staging folder; it becomes ``name:<next vN>`` (or ``version``)."""
        _check_name("service", service)
        _check_name("model name", name)
        if version is not None:
            _check_name("version", version)
            if version == LATEST:
                raise invalid_argument("version", "'latest' is not a version one can publish")
        meta = {
            "architecture": architecture, "base_model": base_model, "recipe": recipe,
            "data_hash": data_hash, "parent": parent,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "labels": {k: str(v) for k, v in (labels or {}).items()},
        }
        return VersionWriter(self, service, name, meta, version)

    def publish_folder(self, service: str, name: str, folder: str | Path, *, exclude: Iterable[str] = (),
                       version: str | None = None, **meta: Any) -> ModelRecord:
        """Copy ``folder`` into a new version. ``exclude`` names top-level entries to leave out."""
        src = Path(folder)
        if not src.is_dir():
            raise not_found("folder", str(src))
        skip = set(exclude) | {META_FILE}
        meta.setdefault("architecture", "")
        meta.setdefault("base_model", "")
        meta.setdefault("recipe", "")
        writer = self.create_version(service, name, version=version, **meta)
        with writer as staging:
            for entry in sorted(src.iterdir()):
                if entry.name in skip:
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, staging / entry.name)
                else:
                    shutil.copy2(entry, staging / entry.name)
        assert writer.record is not None
        return writer.record

    def _publish_staging(self, service: str, name: str, staging: Path, meta: dict[str, Any],
                         version: str | None) -> ModelRecord:
        if (staging / META_FILE).exists():
            log.warning("%s/%s: the writer wrote its own %s; the store's replaces it",
                        service, name, META_FILE)
            (staging / META_FILE).unlink()
        files = self._hash_tree(staging)
        name_dir = staging.parent
        with file_lock(name_dir / _LOCK_FILE):
            existing = self._read_versions(service, name)
            counter = max([self._read_sequence(name_dir), *(r.sequence for r in existing)], default=0)
            sequence = counter + 1
            taken = {r.version for r in existing}
            if version is None:
                while f"v{sequence}" in taken or (name_dir / f"v{sequence}").exists():
                    sequence += 1
                version = f"v{sequence}"
            elif version in taken or (name_dir / version).exists():
                raise already_exists("model version", f"{name}:{version}",
                                     hint="publish under another version or delete it first")
            record = ModelRecord(service=service, name=name, version=version, path=name_dir / version,
                                 files=files, sequence=sequence, created_at=_utcnow(), **meta)
            atomic_write_json(staging / META_FILE, record.to_meta(), durable=True)
            fsync_dir(staging)
            os.rename(staging, record.path)
            fsync_dir(name_dir)
            atomic_write_json(name_dir / _SEQUENCE_FILE, {"sequence": sequence}, durable=True)
        self._changed()
        log.info("published %s model %s (%d files)", service, record.ref, len(files))
        return record

    @staticmethod
    def _hash_tree(folder: Path) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                rel = full.relative_to(folder).as_posix()
                files[rel] = {"size": full.stat().st_size, "sha256": _file_sha256(full, durable=True)}
            fsync_dir(Path(dirpath))
        return files

    def delete(self, service: str, name: str, version: str | None = None) -> list[ModelRecord]:
        """Delete one version, or every version of ``name`` when ``version`` is None; returns what went.

        Each version folder is renamed aside before it is removed, so readers never see half of it.
        A default that pointed at a deleted version is cleared.
        """
        _check_name("service", service)
        name, version = parse_ref((name, version or ""))
        name_dir = self._name_dir(service, name)
        with file_lock(self._lock_path(service, name)):
            records = self._read_versions(service, name)
            if version:
                records = [r for r in records if r.version == version]
            if not records:
                raise self._missing(service, name, version)
            for record in records:
                trash = name_dir / f"{_TRASH_PREFIX}{record.version}-{uuid.uuid4().hex[:8]}"
                os.rename(record.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            fsync_dir(name_dir)
        try:
            pointer = self._read_default(service)
            if pointer and pointer[0] == name and (not version or pointer[1] in ("", version)):
                remaining = self._read_versions(service, name)
                if not remaining or pointer[1] == version:
                    (self.models_dir / service / _DEFAULT_FILE).unlink(missing_ok=True)
                    log.info("%s: default model %s was deleted; no default now", service, name)
        finally:
            self._changed()
        return records

    def set_default(self, service: str, name: str, version: str = "") -> ModelRecord:
        """Make ``name`` (pinned to ``version``, or its newest version when empty) the service default."""
        record = self.resolve(service, (name, version))
        service_dir = self.models_dir / service
        atomic_write_json(service_dir / _DEFAULT_FILE, {"name": name, "version": version or ""})
        self._changed()
        return replace(record, is_default=True)

    # ----------------------------------------------------------------------------------------- read

    def is_current(self, service: str) -> bool:
        """Whether lookups for ``service`` are answered from memory now (no folder scan): one ``stat``.

        Async callers check this first and, when it is False, refresh the snapshot in a worker thread
        (:meth:`refresh`) rather than scanning on their event loop.
        """
        with self._snapshots_lock:
            snapshot = self._snapshots.get(service)
        return snapshot is not None and snapshot.generation == self._generation()

    def refresh(self, service: str) -> None:
        """Bring the service's snapshot up to date (scans its folders if the store changed)."""
        self._snapshot(service)

    def default(self, service: str) -> ModelRecord | None:
        """The service's default model, or None when none was set (or it was deleted)."""
        snapshot = self._snapshot(service)
        pointer = snapshot.default
        if pointer is None:
            return None
        versions = snapshot.versions.get(pointer[0], [])
        pick = self._pick(versions, pointer[1])
        if pick is None:
            log.warning("%s: default model %s:%s no longer exists", service, pointer[0], pointer[1] or LATEST)
            return None
        return replace(pick, is_default=True)

    def resolve(self, service: str, ref: ModelRefLike) -> ModelRecord:
        """Find a model version; NOT_FOUND says what exists, INVALID_ARGUMENT a malformed ref."""
        _check_name("service", service)
        name, version = parse_ref(ref)
        if not name:
            record = self.default(service)
            if record is None:
                names = self._names(service)
                raise not_found("default model", service,
                                hint=f"no default set; available: {', '.join(names)}" if names
                                else f"the store has no {service} models yet")
            return record
        pick = self._pick(self._snapshot(service).versions.get(name, []), version)
        if pick is None:
            raise self._missing(service, name, version)
        return self._mark_default(pick)

    def resolve_folder_or_ref(self, service: str, spec: str) -> tuple[Path, str, dict[str, str]]:
        """(folder, what to call it, labels) for a command-line ``--model``: an existing folder (a
        store version folder keeps its labels from its metadata file), else a ref in this store
        (``name``, ``name:v3``; "" = the default). A folder wins over a ref spelled the same."""
        folder = Path(spec).expanduser() if spec else None
        if folder is not None and folder.is_dir():
            meta = folder / META_FILE
            labels = json.loads(meta.read_text()).get("labels") or {} if meta.is_file() else {}
            return folder.resolve(), str(folder.resolve()), {k: str(v) for k, v in labels.items()}
        record = self.resolve(service, spec)
        return Path(record.path), record.ref, dict(record.labels)

    def verify(self, record: ModelRecord) -> list[str]:
        """Files whose content no longer matches the metadata (empty list: intact)."""
        bad: list[str] = []
        for rel, info in record.files.items():
            path = record.path / rel
            if not path.is_file() or _file_sha256(path, durable=False) != info.get("sha256"):
                bad.append(rel)
        return bad

    def cleanup_staging(self, service: str | None = None) -> int:
        """Remove staging/trash folders left by dead processes; returns how many went."""
        removed = 0
        services = [self.models_dir / service] if service else self._dirs(self.models_dir)
        for service_dir in services:
            for name_dir in self._dirs(service_dir):
                removed += self._cleanup_dir(name_dir)
        return removed

    def _cleanup_dir(self, name_dir: Path) -> int:
        removed = 0
        if not name_dir.is_dir():
            return 0
        for entry in name_dir.iterdir():
            if entry.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
            elif entry.name.startswith(_STAGING_PREFIX):
                pid_text = entry.name[len(_STAGING_PREFIX):].split("-", 1)[0]
                pid = int(pid_text) if pid_text.isdigit() else 0
                try:
                    age = time.time() - entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if pid == os.getpid() or (_pid_alive(pid) and age < STALE_STAGING_SECONDS):
                    continue
                log.info("removing stale staging folder %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    # -------------------------------------------------------------------------------------- helpers

    def _name_dir(self, service: str, name: str) -> Path:
        return self.models_dir / service / name

    def _lock_path(self, service: str, name: str) -> Path:
        name_dir = self._name_dir(service, name)
        name_dir.mkdir(parents=True, exist_ok=True)
        return name_dir / _LOCK_FILE

    @staticmethod
    def _dirs(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _names(self, service: str) -> list[str]:
        return sorted(self._snapshot(service).versions)

    # ------------------------------------------------------------------------------ lookup cache

    def _generation(self) -> tuple[Any, ...]:
        """What identifies the store's current state: the generation file's stat (and, just after a
        change, its content). Reading it before a scan makes any later change give another value."""
        path = self.models_dir / _GENERATION_FILE
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return ()
        key: tuple[Any, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if time.time_ns() - st.st_mtime_ns < _RACY_NS:
            try:
                key += (path.read_bytes(),)
            except FileNotFoundError:
                return ()
        return key

    def _changed(self) -> None:
        """After a change is visible: tell every ModelStore (this process or another) to scan again."""
        with self._snapshots_lock:
            self._snapshots.clear()
        path = self.models_dir / _GENERATION_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_text(uuid.uuid4().hex + "\n")
            os.replace(tmp, path)
        except OSError as err:  # a store nobody can write to cannot change either
            tmp.unlink(missing_ok=True)
            log.warning("could not mark the model store changed (%s): other processes may serve "
                        "stale lookups until the next change", err)

    def _snapshot(self, service: str) -> _Snapshot:
        generation = self._generation()
        with self._snapshots_lock:
            snapshot = self._snapshots.get(service)
        if snapshot is not None and snapshot.generation == generation:
            return snapshot
        snapshot = self._scan(service, generation)
        with self._snapshots_lock:
            self._snapshots[service] = snapshot
        return snapshot

    def _scan(self, service: str, generation: tuple[Any, ...]) -> _Snapshot:
        """Read one service's folders: every published version's metadata and the default pointer."""
        versions: dict[str, list[ModelRecord]] = {}
        for name_dir in self._dirs(self.models_dir / service):
            records = self._read_versions(service, name_dir.name)
            if records:
                versions[name_dir.name] = records
        log.debug("scanned the %s model store: %d model(s)", service, len(versions))
        return _Snapshot(generation, versions, self._read_default(service))

    def _read_versions(self, service: str, name: str) -> list[ModelRecord]:
        """Published versions of one name, oldest first. Hidden (staging, trash) folders are skipped."""
        records: list[ModelRecord] = []
        for version_dir in self._dirs(self._name_dir(service, name)):
            meta_path = version_dir / META_FILE
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
                records.append(ModelRecord.from_meta(version_dir, meta))
            except FileNotFoundError:
                continue
            except (ValueError, KeyError) as err:
                log.warning("skipping %s: unreadable metadata (%s)", version_dir, err)
        records.sort(key=lambda r: (r.sequence, r.created_at))
        return records

    @staticmethod
    def _read_sequence(name_dir: Path) -> int:
        try:
            with open(name_dir / _SEQUENCE_FILE, encoding="utf-8") as f:
                return int(json.load(f)["sequence"])
        except (OSError, ValueError, KeyError):
            return 0

    def _read_default(self, service: str) -> tuple[str, str] | None:
        try:
            with open(self.models_dir / service / _DEFAULT_FILE, encoding="utf-8") as f:
                data = json.load(f)
            return str(data["name"]), str(data.get("version") or "")
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def _pick(versions: list[ModelRecord], version: str) -> ModelRecord | None:
        if not versions:
            return None
        if not version or version == LATEST:
            return versions[-1]
        return next((r for r in versions if r.version == version), None)

    def _mark_default(self, record: ModelRecord) -> ModelRecord:
        snapshot = self._snapshot(record.service)
        pointer = snapshot.default
        if pointer is None or pointer[0] != record.name:
            return record
        if pointer[1]:
            return replace(record, is_default=pointer[1] == record.version)
        newest = self._pick(snapshot.versions.get(record.name, []), "")
        return replace(record, is_default=newest is not None and newest.version == record.version)

    def _missing(self, service: str, name: str, version: str) -> Exception:
        versions = self._snapshot(service).versions.get(name, [])
        if versions and version:
            return not_found("model version", f"{name}:{version}",
                             hint=f"available versions of {name}: {', '.join(r.version for r in versions)}")
        names = self._names(service)
        hint = f"available {service} models: {', '.join(names)}" if names else f"no {service} models yet"
        return not_found("model", f"{name}:{version}" if version else name, hint=hint)

    def list(self, service: str | None = None, name: str | None = None) -> list[ModelRecord]:
        """Every published version, by service, then name, then age (oldest first)."""
        services = [service] if service else [d.name for d in self._dirs(self.models_dir)]
        out: list[ModelRecord] = []
        for svc in services:
            versions = self._snapshot(svc).versions
            for model in [name] if name else sorted(versions):
                out.extend(self._mark_default(r) for r in versions.get(model, []))
        return out
