"""What a training run leaves on disk, shared by the server-side runner and the worker subprocess.

A run is a folder ``ROOT/runs/<service>/<run_id>/``. Two processes write into it (the runner before
and after the worker, the worker while it trains), so every write here is either an atomic replace
(``run.json``, checkpoint folders) or an append under an exclusive ``flock`` (``events.jsonl``), and
every read tolerates a writer that was killed half-way. Nothing here imports torch or grpc, so the
worker starts fast and the runner never pays for a model library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dramaturg.shared.store import atomic_write_json, file_lock

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
LOCK_FILE = ".lock"
WORKER_LOG = "worker.log"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_META = "checkpoint.json"
# Files under this sub-folder of a checkpoint (optimizer, scheduler, RNG state) are needed to resume
# but are not part of the model, so activating a checkpoint leaves them out of the model store.
TRAINER_STATE_DIR = "trainer_state"
# Marker files the runner drops before signalling the worker: they say *why* it was asked to stop,
# which a signal alone cannot carry (SIGTERM from the runner's cancel vs. from a shutting-down host).
CANCEL_MARKER = "CANCEL"
PREEMPT_MARKER = "PREEMPT"
# Exit status of a worker that stopped because it was asked to (shutdown), leaving the run resumable.
EXIT_PREEMPTED = 75

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class RunRecord:
    """The state of one run as ``run.json`` holds it (``run_dir`` is where it was read from)."""

    run_id: str
    service: str
    recipe: str
    run_dir: Path
    state: str = QUEUED
    dataset_uri: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    output_model: str = ""        # store name requested for the result
    published_model: str = ""     # "name:version" once something was published
    base_model: str = ""          # store ref ("name:version") or hub id the run started from
    base_model_path: str = ""     # folder of the store model, when base_model is a store ref
    architecture: str = ""
    request_id: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0             # worker launches: 1 + resumes
    crashes: int = 0              # launches that ended in an unexpected death (bounded by max_attempts)
    pid: int | None = None
    pid_start_time: int | None = None
    cancel_requested: bool = False
    preempted: bool = False
    resumed_from: dict[str, Any] | None = None  # {"checkpoint_id", "step"} of the last resume
    best_checkpoint: str = ""
    last_checkpoint: str = ""
    data_hash: str = ""
    store_root: str = ""
    recipes_import_path: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def log_dir(self) -> Path:
        """TensorBoard folder of the run (``tensorboard --logdir`` it, or its parent for all runs)."""
        return self.run_dir / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    @property
    def events_path(self) -> Path:
        return self.run_dir / EVENTS_FILE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("run_dir")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], run_dir: Path) -> RunRecord:
        # Unknown keys are dropped so a newer runner's run.json still loads in an older one.
        known = {f.name for f in fields(cls)} - {"run_dir"}
        return cls(run_dir=run_dir, **{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint folder ``run_dir/checkpoints/<checkpoint_id>/``."""

    checkpoint_id: str
    step: int
    epoch: float
    metrics: dict[str, float]
    created_at: float
    best: bool
    path: Path


# --------------------------------------------------------------------------------------------- files


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The lock every read-modify-write of ``run.json`` holds. Never nest it: flock is not re-entrant."""
    return file_lock(run_dir / LOCK_FILE)


def load_run(run_dir: Path) -> RunRecord:
    return RunRecord.from_dict(read_json(run_dir / RUN_FILE), run_dir)


def save_run(record: RunRecord, *, durable: bool = True) -> None:
    atomic_write_json(record.run_dir / RUN_FILE, record.to_dict(), durable=durable)


def update_run(run_dir: Path, mutate: Callable[[RunRecord], None], *, durable: bool = True) -> RunRecord:
    """Load, change and save ``run.json`` under the run lock (the other process may be writing too)."""
    with run_lock(run_dir):
        record = load_run(run_dir)
        mutate(record)
        save_run(record, durable=durable)
        return record


# -------------------------------------------------------------------------------------------- events


class EventLog:
    """Appends numbered events to ``events.jsonl``; safe with another process appending too.

    Sequence numbers must be unique and increasing across the runner and the worker, so each append
    takes an exclusive lock, reads whatever the other writer appended since (to learn the last
    sequence), and drops a trailing partial line that a killed writer left behind.
    """

    def __init__(self, path: Path, run_id: str, attempt: int = 0) -> None:
        self.path = path
        self.run_id = run_id
        self.attempt = attempt
        self._offset = 0
        self._sequence = 0

    def append(self, kind: str, **payload: Any) -> dict[str, Any]:
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._catch_up(f)
                event = {"sequence": self._sequence + 1, "time": time.time(), "run_id": self.run_id,
                         "attempt": self.attempt, "type": kind, **payload}
                line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
                f.seek(0, os.SEEK_END)
                f.write(line)
                f.flush()
                self._offset = f.tell()
                self._sequence = event["sequence"]
                return event
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _catch_up(self, f: Any) -> None:
        size = f.seek(0, os.SEEK_END)
        if size < self._offset:  # replaced behind our back: start over
            self._offset, self._sequence = 0, 0
        f.seek(self._offset)
        data = f.read()
        if not data:
            return
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            log.warning("dropping a partial event line in %s (a writer died mid-line)", self.path)
            f.truncate(self._offset + cut)
        for raw in data[:cut].splitlines():
            event = _parse_line(raw, self.path)
            if event is not None:
                self._sequence = max(self._sequence, int(event.get("sequence", 0)))
        self._offset += cut

    def state(self, state: str, **extra: Any) -> dict[str, Any]:
        return self.append("state", state=state, **extra)

    def message(self, message: str, level: str = "INFO") -> dict[str, Any]:
        return self.append("log", level=level, message=message)


def _parse_line(raw: bytes, path: Path) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        event = json.loads(raw)
    except ValueError:
        log.warning("skipping an unreadable event line in %s", path)
        return None
    return event if isinstance(event, dict) else None


class EventTail:
    """Reads ``events.jsonl`` incrementally, returning only complete lines (a line being written waits)."""

    def __init__(self, path: Path, after_sequence: int = 0) -> None:
        self.path = path
        self.after_sequence = after_sequence
        self._offset = 0

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        out: list[dict[str, Any]] = []
        for raw in data[:cut].splitlines():
            event = _parse_line(raw, self.path)
            if event is not None and int(event.get("sequence", 0)) > self.after_sequence:
                self.after_sequence = int(event["sequence"])
                out.append(event)
        return out


def read_events(run_dir: Path, after_sequence: int = 0) -> list[dict[str, Any]]:
    return EventTail(run_dir / EVENTS_FILE, after_sequence).poll()


def last_state_event(run_dir: Path) -> dict[str, Any] | None:
    states = [e for e in read_events(run_dir) if e.get("type") == "state"]
    return states[-1] if states else None


def transition(record: RunRecord, events: EventLog, state: str, *, error: str = "") -> None:
    """Move ``record`` (held under the run lock by the caller) to ``state``: event first, then the record.

    The event goes first so that a terminal ``run.json`` always has its terminal event in the log:
    WatchTraining stops on either, and recovery trusts the log when the two disagree.
    """
    now = time.time()
    if error:
        record.error = error
    if state == RUNNING and record.started_at is None:
        record.started_at = now
    if state in TERMINAL_STATES:
        record.finished_at = now
    record.state = state
    extra = {"error": error} if error else {}
    events.state(state, **extra)


# ------------------------------------------------------------------------------------------ processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc, or None where there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid``: with the pid it names a process even after pid reuse."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def process_alive(pid: int | None, start_time: int | None = None) -> bool:
    """Whether ``pid`` still runs and is the same process that was started (not a zombie, not reused)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else: its start time below tells whether it is ours
    stat = _proc_stat(pid)
    if stat is None:
        return not Path("/proc/self/stat").exists()  # no procfs: the signal probe is all we have
    state, started = stat
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def signal_process(pid: int, sig: int, *, group: bool = False) -> bool:
    """Send ``sig`` to a process (or its process group); False when it is already gone."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal pid %d with %s", pid, signal.Signals(sig).name)
        return False
    return True


# ---------------------------------------------------------------------------------------- checkpoints


def checkpoint_id_for(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Checkpoints of a run in step order; ``best`` marks the newest one saved with ``is_best``.

    Built from the folders alone (each carries its own ``checkpoint.json``), so a worker killed
    between writing a checkpoint and updating ``run.json`` still leaves a consistent answer.
    """
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found: list[tuple[CheckpointInfo, bool]] = []
    for entry in root.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            meta = read_json(entry / CHECKPOINT_META)
        except (OSError, ValueError):
            continue  # being replaced or pruned right now
        info = CheckpointInfo(
            checkpoint_id=entry.name, step=int(meta.get("step", 0)), epoch=float(meta.get("epoch", 0.0)),
            metrics={k: float(v) for k, v in (meta.get("metrics") or {}).items()},
            created_at=float(meta.get("created_at", 0.0)), best=False, path=entry,
        )
        found.append((info, bool(meta.get("is_best", False))))
    found.sort(key=lambda pair: (pair[0].step, pair[0].created_at))
    best_id = next((info.checkpoint_id for info, flagged in reversed(found) if flagged), None)
    return [
        CheckpointInfo(**{**info.__dict__, "best": info.checkpoint_id == best_id}) for info, _ in found
    ]


def remove_tree(path: Path) -> None:
    """Remove a folder so that no half of it stays visible: rename aside first, then delete."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
