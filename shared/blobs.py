"""A content-addressed blob store: where the gateway keeps a job's decoded audio for the model services.

Layout (``ROOT`` is ``$DRAMATURG_HOME/blobs`` unless configured otherwise)::

    ROOT/sha256/ab/abcdef…0123.wav     the blob whose SHA-256 is abcdef…0123 (first two hex digits fan out)
    ROOT/sha256/ab/.tmp-<pid>-<rand>   a write in progress (never at a blob's final name)

The gateway decodes a job's audio once and writes it here; remote stages then send the model services
``AudioInput(uri=…)`` naming the blob instead of the whole scene in every request, and the services
read it through their ``audio_uri_roots`` (which include this root by default). The layout lives in
``shared/`` because both sides must agree on it.

Blobs are named by their content, so writing the same bytes twice is a no-op and two writers racing
on the same content cannot disagree. A blob is written to a temporary file in its final folder,
fsynced and renamed into place, so a reader (another process on a shared volume) sees either no blob
or the whole of it, and a crash leaves at most a temporary file, which :meth:`BlobStore.sweep` removes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ALGORITHM = "sha256"
BLOBS_DIR = "blobs"
_TMP_PREFIX = ".tmp-"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX_RE = re.compile(r"^(\.[A-Za-z0-9]{1,8})?$")
# Temporary files of dead writers, or older than this, are removed by sweep().
STALE_TMP_SECONDS = 3600.0


def default_blob_root(home: str | Path | None = None) -> Path:
    """``$DRAMATURG_HOME/blobs`` (``~/.dramaturg/blobs``): the root both the gateway and the services use.

    Computed from the environment without creating anything, so settings can use it as a default.
    """
    base = Path(home) if home is not None else Path(os.environ.get("DRAMATURG_HOME") or "~/.dramaturg")
    return base.expanduser() / BLOBS_DIR


def _fsync_dir(path: Path) -> None:
    # A rename is only durable once its folder is; some file systems refuse fsync on a folder.
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
class BlobRef:
    """One stored blob: its digest, size and where it lies."""

    digest: str
    size: int
    path: Path

    @property
    def uri(self) -> str:
        """``file:///…``: what an ``AudioInput.uri`` names (the services resolve it under their roots)."""
        return self.path.absolute().as_uri()

    @property
    def key(self) -> str:
        """``sha256:<hex>``: the blob's name independent of where the store lives."""
        return f"{ALGORITHM}:{self.digest}"


class BlobStore:
    """Content-addressed files under one root; every method is safe from several threads and processes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # ------------------------------------------------------------------------------------- naming
    @staticmethod
    def digest_of(data: bytes | bytearray | memoryview) -> str:
        return hashlib.sha256(data).hexdigest()

    def path_for(self, digest: str, suffix: str = "") -> Path:
        """Where the blob with ``digest`` lies (whether or not it exists)."""
        if not _DIGEST_RE.match(digest):
            raise ValueError(f"not a {ALGORITHM} hex digest: {digest!r}")
        if not _SUFFIX_RE.match(suffix):
            raise ValueError(f"bad blob suffix {suffix!r}: '.' plus up to 8 letters or digits")
        return self.root / ALGORITHM / digest[:2] / f"{digest}{suffix}"

    # -------------------------------------------------------------------------------------- write
    def put(self, data: bytes | bytearray | memoryview, suffix: str = "") -> BlobRef:
        """Store ``data`` under its digest and return where it lies; equal content is written once.

        An existing blob of the right size is trusted (content addressing: same name, same bytes);
        one of the wrong size (a disk that lost data) is replaced.
        """
        view = memoryview(data)
        digest = self.digest_of(view)
        path = self.path_for(digest, suffix)
        try:
            if path.stat().st_size == view.nbytes:
                return BlobRef(digest, view.nbytes, path)
            log.warning("blob %s has the wrong size on disk; rewriting it", path)
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(view)
                f.flush()
                os.fsync(f.fileno())
            # os.replace is atomic; a concurrent writer of the same content replaces equal bytes.
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        log.debug("stored blob %s (%d bytes)", path, view.nbytes)
        return BlobRef(digest, view.nbytes, path)

    def delete(self, digest: str, suffix: str = "") -> bool:
        """Remove a blob; False when it was not there."""
        try:
            self.path_for(digest, suffix).unlink()
        except FileNotFoundError:
            return False
        return True

    def sweep(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Remove temporary files that crashed writers left behind; returns how many went.

        A temporary file of a live process younger than ``older_than`` seconds is a write in progress
        and stays.
        """
        base = self.root / ALGORITHM
        if not base.is_dir():
            return 0
        removed = 0
        now = time.time()
        for fan in base.iterdir():
            if not fan.is_dir():
                continue
            for entry in fan.iterdir():
                if not entry.name.startswith(_TMP_PREFIX):
                    continue
                pid_text = entry.name[len(_TMP_PREFIX) :].split("-", 1)[0]
                pid = int(pid_text) if pid_text.isdigit() else 0
                try:
                    age = now - entry.stat().st_mtime
                except FileNotFoundError:
                    continue
                if _pid_alive(pid) and age < older_than:
                    continue
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d unfinished blob write(s) under %s", removed, base)
        return removed

    # --------------------------------------------------------------------------------------- read
    def get(self, digest: str, suffix: str = "") -> BlobRef | None:
        """The stored blob with ``digest``, or None."""
        path = self.path_for(digest, suffix)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return BlobRef(digest, size, path)

    def read(self, ref: BlobRef, *, verify: bool = False) -> bytes:
        """The blob's bytes; ``verify`` re-hashes them (a blob changed on disk raises ValueError)."""
        data = ref.path.read_bytes()
        if verify and self.digest_of(data) != ref.digest:
            raise ValueError(f"blob {ref.path} no longer matches its digest")
        return data
