"""The content-addressed blob store: naming by content, atomic writes, idempotence, the shared layout."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from dramaturg.common.v1 import common_pb2
from dramaturg.shared import audio as audio_io
from dramaturg.shared import blobs as blobs_module
from dramaturg.shared.blobs import BlobStore, default_blob_root


def test_blobs_are_named_by_their_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"RIFF" + bytes(range(256)) * 10
    ref = store.put(data, ".wav")
    digest = hashlib.sha256(data).hexdigest()
    assert ref.digest == digest and ref.size == len(data)
    assert ref.path == tmp_path / "blobs" / "sha256" / digest[:2] / f"{digest}.wav"
    assert ref.key == f"sha256:{digest}"
    assert ref.uri == ref.path.as_uri() and ref.uri.startswith("file:///")
    assert store.read(ref, verify=True) == data
    assert store.get(digest, ".wav") == ref
    assert store.get(hashlib.sha256(b"other").hexdigest(), ".wav") is None
    other = store.put(b"other", ".wav")
    assert other.path != ref.path
    with pytest.raises(ValueError):
        store.path_for("../../etc/passwd")
    with pytest.raises(ValueError):
        store.path_for(digest, "/x")


def test_writing_equal_content_again_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)
    first = store.put(b"same bytes", ".wav")
    mtime = first.path.stat().st_mtime_ns
    writes: list[str] = []
    real_open = open

    def spy(path, mode="r", *args, **kwargs):
        if "w" in mode:
            writes.append(str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    again = store.put(b"same bytes", ".wav")
    assert again == first and writes == []
    assert first.path.stat().st_mtime_ns == mtime
    monkeypatch.undo()
    # a blob the disk truncated is not trusted: it is rewritten
    first.path.write_bytes(b"same")
    assert store.put(b"same bytes", ".wav").path.read_bytes() == b"same bytes"


def test_a_failed_write_leaves_neither_a_blob_nor_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    seen_at_fsync: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # while the bytes are being made durable, nothing is at the blob's final name yet
        seen_at_fsync.append(store.path_for(hashlib.sha256(b"payload").hexdigest(), ".wav").exists())
        real_fsync(fd)

    monkeypatch.setattr(blobs_module.os, "fsync", fsync)
    monkeypatch.setattr(blobs_module.os, "replace", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        store.put(b"payload", ".wav")
    assert seen_at_fsync and not any(seen_at_fsync)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert store.put(b"payload", ".wav").path.read_bytes() == b"payload"


def test_concurrent_writers_of_the_same_content_agree(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(1 << 20)
    refs = []
    threads = [threading.Thread(target=lambda: refs.append(store.put(data, ".wav"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.path for r in refs}) == 1
    assert refs[0].path.read_bytes() == data
    assert [p.name for p in refs[0].path.parent.iterdir()] == [refs[0].path.name]


def test_sweep_removes_what_dead_writers_left_and_delete_is_idempotent(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    ref = store.put(b"kept", ".wav")
    dead = ref.path.parent / ".tmp-999999999-deadbeef0000"  # no such process
    dead.write_bytes(b"half")
    live = ref.path.parent / f".tmp-{os.getpid()}-0123456789ab"  # a write in progress
    live.write_bytes(b"half")
    assert store.sweep() == 1
    assert not dead.exists() and live.exists() and ref.path.exists()
    assert store.delete(ref.digest, ".wav") and not ref.path.exists()
    assert not store.delete(ref.digest, ".wav")
    assert BlobStore(tmp_path / "nothing-yet").sweep() == 0


def test_the_services_read_a_blob_by_uri_under_the_default_root(dramaturg_home: Path) -> None:
    """Gateway and services agree on the layout: the default root is $DRAMATURG_HOME/blobs, and the
    model services' default audio_uri_roots let them read what the gateway wrote there."""
    from dramaturg.shared.model_service import ModelServiceSettings

    assert default_blob_root() == dramaturg_home / "blobs"
    assert default_blob_root("/srv/x") == Path("/srv/x/blobs")
    samples = audio_io.Audio(np.zeros(1600, dtype=np.float32) + 0.1, 16_000)
    ref = BlobStore(default_blob_root()).put(audio_io.encode_wav(samples), ".wav")
    limits = ModelServiceSettings().audio_limits()
    decoded = audio_io.decode_audio_input(
        common_pb2.AudioInput(encoding=common_pb2.WAV, uri=ref.uri), target_rate=16_000, limits=limits
    )
    assert decoded.num_frames == 1600
