"""The versioned model store: numbering, atomic publish, resolve, defaults, metadata, data hashes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path

import grpc
import pytest
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.store import META_FILE, ModelStore, data_hash, parse_ref

SERVICE = "speaker"
META = {"architecture": "ecapa-tdnn", "base_model": "speechbrain/spkrec-ecapa-voxceleb",
        "recipe": "ecapa-aam"}


def _publish(store: ModelStore, name: str = "voices", payload: str = "weights", **extra: object):
    writer = store.create_version(SERVICE, name, **{**META, **extra})  # type: ignore[arg-type]
    with writer as folder:
        (folder / "model.bin").write_text(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")
    assert writer.record is not None
    return writer.record


def test_versions_increase_and_are_never_reused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert [_publish(store).version for _ in range(3)] == ["v1", "v2", "v3"]
    store.delete(SERVICE, "voices", "v3")
    assert _publish(store).version == "v4"  # a deleted number is not handed out again
    assert [r.version for r in store.list(SERVICE, "voices")] == ["v1", "v2", "v4"]
    record = store.resolve(SERVICE, "voices")
    assert record.path == tmp_path / "models" / SERVICE / "voices" / "v4"
    assert (record.path / "model.bin").read_text() == "weights"
    assert record.ref == "voices:v4"


def test_explicit_version_and_duplicates(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert _publish(store, version="2024-best").version == "2024-best"
    with pytest.raises(ServiceError) as err:
        _publish(store, version="2024-best")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert _publish(store).version == "v2"
    assert store.resolve(SERVICE, "voices:latest").version == "v2"
    leftovers = (tmp_path / "models" / SERVICE / "voices").glob(".staging*")
    assert not list(leftovers)


def test_exception_inside_create_version_leaves_no_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError), store.create_version(SERVICE, "voices", **META) as folder:
        (folder / "model.bin").write_text("half")
        raise RuntimeError("crash while saving")
    assert store.list(SERVICE) == []
    name_dir = tmp_path / "models" / SERVICE / "voices"
    assert not [p for p in name_dir.iterdir() if p.is_dir()]
    with pytest.raises(ServiceError) as err:
        store.resolve(SERVICE, "voices")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert _publish(store).version == "v1"


def test_stale_staging_is_ignored_and_cleaned(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    stale = tmp_path / "models" / SERVICE / "voices" / ".staging-999999999-deadbeef"  # no such pid
    stale.mkdir()
    (stale / "model.bin").write_text("half-written")
    assert [r.version for r in store.list(SERVICE)] == ["v1"]
    ModelStore(tmp_path)  # a restarted server cleans up
    assert not stale.exists()


def test_resolve_forms_and_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    _publish(store)
    assert store.resolve(SERVICE, "voices").version == "v2"
    assert store.resolve(SERVICE, "voices:latest").version == "v2"
    assert store.resolve(SERVICE, "voices:v1").version == "v1"
    assert store.resolve(SERVICE, ("voices", "v1")).version == "v1"
    assert store.resolve(SERVICE, common_pb2.ModelRef(name="voices")).version == "v2"

    with pytest.raises(ServiceError) as err:
        store.resolve(SERVICE, "voices:v9")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "v1, v2" in err.value.message
    with pytest.raises(ServiceError) as err:
        store.resolve(SERVICE, "nobody")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "voices" in err.value.message
    # a trailing newline must not pass as part of a name ("$" matches before one)
    for bad in ("a:b:c", "voices:", "bad name!", ("", "v1"), common_pb2.ModelRef(name="voices\n"),
                common_pb2.ModelRef(name="voices", version="v1\n")):
        with pytest.raises(ServiceError) as err:
            store.resolve(SERVICE, bad)  # type: ignore[arg-type]
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert parse_ref("voices:latest") == ("voices", "")


def test_defaults(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ServiceError) as err:
        store.resolve(SERVICE, "")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    _publish(store)
    _publish(store, name="other")
    assert store.default(SERVICE) is None
    store.set_default(SERVICE, "voices")  # floating: follows the newest version
    assert store.resolve(SERVICE, "").ref == "voices:v1"
    _publish(store)
    assert store.resolve(SERVICE, "").ref == "voices:v2"
    flags = {r.ref: r.is_default for r in store.list(SERVICE)}
    assert flags == {"other:v1": False, "voices:v1": False, "voices:v2": True}
    store.set_default(SERVICE, "voices", "v1")  # pinned
    assert store.resolve(SERVICE, "").ref == "voices:v1"
    assert store.resolve(SERVICE, "voices:v1").to_proto().is_default
    store.delete(SERVICE, "voices")
    assert store.default(SERVICE) is None
    assert [r.ref for r in store.list()] == ["other:v1"]


def test_metadata_hashes_and_to_proto(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    record = _publish(store, data_hash="abc", parent="voices:v0", metrics={"eer": 0.9},
                      labels={"run_id": "r1"})
    meta = json.loads((record.path / META_FILE).read_text())
    assert meta["name"] == "voices" and meta["version"] == "v1" and meta["service"] == SERVICE
    assert set(meta["files"]) == {"model.bin", "sub/config.json"}
    assert len(meta["files"]["model.bin"]["sha256"]) == 64
    assert store.verify(record) == []
    (record.path / "model.bin").write_text("tampered")
    assert store.verify(record) == ["model.bin"]

    info = record.to_proto(loaded=True, device="cpu")
    assert isinstance(info, common_pb2.ModelInfo)
    assert (info.ref.name, info.ref.version) == ("voices", "v1")
    assert info.service == SERVICE and info.architecture == "ecapa-tdnn" and info.recipe == "ecapa-aam"
    assert info.base_model == META["base_model"] and info.parent == "voices:v0" and info.data_hash == "abc"
    assert info.metrics["eer"] == pytest.approx(0.9) and info.labels["run_id"] == "r1"
    assert info.loaded and info.device == "cpu" and not info.is_default
    assert abs(info.created_at.ToDatetime().timestamp() - record.created_at.timestamp()) < 1e-3


def test_publish_folder_copies_and_excludes(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint"
    (src / "trainer_state").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\0" * 10)
    (src / "trainer_state" / "optimizer.pt").write_bytes(b"x")
    store = ModelStore(tmp_path / "home")
    record = store.publish_folder(SERVICE, "voices", src, exclude=("trainer_state",), **META)
    assert set(record.files) == {"model.safetensors"}
    assert (src / "model.safetensors").exists()  # copied, not moved
    assert not (record.path / "trainer_state").exists()


def test_data_hash_is_stable_across_copies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "wav").mkdir(parents=True)
    (data / "train.lst").write_text("a\nb\n")
    (data / "wav" / "a.wav").write_bytes(b"RIFF" + b"\0" * 100)
    first = data_hash(data)
    assert first == data_hash(data) == data_hash([str(data)])
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)  # copy2 keeps mtimes
    assert data_hash(copy) == first
    (copy / "train.lst").write_text("a\nc\n")
    os.utime(copy / "train.lst", ns=((data / "train.lst").stat().st_atime_ns,
                                      (data / "train.lst").stat().st_mtime_ns))
    assert data_hash(copy) != first  # same size and mtime, different content: still caught


# -- lookups are cached until the store changes -------------------------------------------------------


class ScanCounter:
    """Counts folder scans of a store (and the threads they ran in)."""

    def __init__(self, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[int] = []
        real = store._scan

        def scan(service, generation):
            self.threads.append(threading.get_ident())
            return real(service, generation)

        monkeypatch.setattr(store, "_scan", scan)

    @property
    def count(self) -> int:
        return len(self.threads)


def test_lookups_come_from_memory_until_the_store_changes(tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    scans = ScanCounter(store, monkeypatch)
    assert store.resolve(SERVICE, "voices").ref == "voices:v1"
    assert scans.count == 1
    real_open = open

    def no_json(path, *args, **kwargs):  # a cached lookup parses no metadata
        assert not str(path).endswith(META_FILE), f"read {path}"
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_json)
    for _ in range(20):
        assert store.resolve(SERVICE, "voices").ref == "voices:v1"
        assert store.resolve(SERVICE, "voices:v1").version == "v1"
        assert [r.ref for r in store.list(SERVICE)] == ["voices:v1"]
        assert store.is_current(SERVICE)
    assert scans.count == 1
    monkeypatch.setattr("builtins.open", real_open)
    # every change through the store is seen at once: publish, set_default, delete
    _publish(store)
    assert not store.is_current(SERVICE)
    assert store.resolve(SERVICE, "voices").ref == "voices:v2"
    store.set_default(SERVICE, "voices", "v1")
    assert store.resolve(SERVICE, "").ref == "voices:v1"
    store.delete(SERVICE, "voices", "v1")
    assert store.default(SERVICE) is None
    assert [r.ref for r in store.list(SERVICE)] == ["voices:v2"]
    with pytest.raises(ServiceError):
        store.resolve(SERVICE, "voices:v1")
    assert scans.count == 4


def test_a_change_by_another_process_is_seen_by_the_next_lookup(tmp_path: Path) -> None:
    serving = ModelStore(tmp_path)  # a model service's store
    other = ModelStore(tmp_path)  # `dramaturg train` / `dramaturg models` in another process
    _publish(other)
    assert serving.resolve(SERVICE, "voices").ref == "voices:v1"
    _publish(other)
    assert serving.resolve(SERVICE, "voices").ref == "voices:v2"
    other.set_default(SERVICE, "voices", "v1")
    assert serving.resolve(SERVICE, "").ref == "voices:v1"
    other.delete(SERVICE, "voices")
    with pytest.raises(ServiceError) as err:
        serving.resolve(SERVICE, "voices")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    # a version removed by hand is seen once the generation file is deleted too (module docstring)
    kept = _publish(other, name="kept")
    assert [r.ref for r in serving.list(SERVICE)] == ["kept:v1"]
    shutil.rmtree(kept.path)
    (tmp_path / "models" / ".generation").unlink()
    assert serving.list(SERVICE) == []


def test_two_changes_in_one_timestamp_tick_are_both_seen(tmp_path: Path, monkeypatch) -> None:
    """Inode numbers are reused and timestamps are coarse: within a moment of a change the
    generation's content is compared as well, so a second change cannot hide behind the first."""
    store = ModelStore(tmp_path)
    _publish(store)
    assert store.resolve(SERVICE, "voices").ref == "voices:v1"
    generation = tmp_path / "models" / ".generation"
    before = os.stat(generation)
    writer = ModelStore(tmp_path)
    _publish(writer)
    # pretend the file system gave the new generation file the old one's inode and times
    real_stat = os.stat

    def same_stat(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        if Path(path) == generation:
            return os.stat_result((st.st_mode, before.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                                   before.st_size, 0, 0, 0, 0.0, 0.0, 0.0, 0, before.st_mtime_ns,
                                   before.st_ctime_ns))
        return st

    monkeypatch.setattr("dramaturg.shared.store.os.stat", same_stat)
    assert store.resolve(SERVICE, "voices").ref == "voices:v2"


def test_the_model_manager_never_scans_the_store_on_its_event_loop(tmp_path: Path, monkeypatch) -> None:
    from dramaturg.shared.models import ModelManager

    store = ModelStore(tmp_path)
    _publish(store)
    scans = ScanCounter(store, monkeypatch)
    manager = ModelManager(SERVICE, store, lambda record: (record.ref, "cpu"))

    async def rpcs() -> tuple[int, list[str]]:
        loop_thread = threading.get_ident()
        refs = [(await manager.get("voices")).record.ref for _ in range(10)]
        _publish(ModelStore(tmp_path))  # published elsewhere while serving
        refs.append((await manager.get("voices")).record.ref)
        refs += [r.ref for r in await manager.records()]
        return loop_thread, refs

    loop_thread, refs = asyncio.run(rpcs())
    assert refs == ["voices:v1"] * 10 + ["voices:v2", "voices:v1", "voices:v2"]
    assert scans.count == 2 and loop_thread not in scans.threads
