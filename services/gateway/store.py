"""Where jobs live: an interface, and the SQLite implementation of the embedded default.

The gateway persists every job and every event before it acts on it, so a gateway killed mid-job
finds its work on restart. Jobs are stored as the protobuf ``Job`` message (JSON) plus indexed
columns; events as an append-only table. A cluster swaps in PostgreSQL behind the same interface.
"""

from __future__ import annotations

import abc
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dramaturg.gateway.v1 import gateway_pb2
from google.protobuf import json_format

TERMINAL_STATES = {gateway_pb2.SUCCEEDED, gateway_pb2.FAILED, gateway_pb2.CANCELLED}


@dataclass(frozen=True)
class StoredEvent:
    job_id: str
    sequence: int
    time: float
    kind: int
    stage: str
    message: str


class JobStore(abc.ABC):
    """Persistence the gateway needs; every method is safe to call from several threads."""

    @abc.abstractmethod
    def create(self, job: gateway_pb2.Job) -> tuple[gateway_pb2.Job, bool]:
        """Insert ``job``; when its request_id was seen before, return that job and False."""

    @abc.abstractmethod
    def get(self, job_id: str) -> gateway_pb2.Job | None: ...

    @abc.abstractmethod
    def by_request_id(self, request_id: str) -> gateway_pb2.Job | None: ...

    @abc.abstractmethod
    def save(self, job: gateway_pb2.Job) -> None:
        """Replace the stored job with this snapshot."""

    @abc.abstractmethod
    def add_event(self, job_id: str, kind: int, stage: str = "", message: str = "") -> StoredEvent: ...

    @abc.abstractmethod
    def events_after(self, job_id: str, after_sequence: int) -> list[StoredEvent]: ...

    @abc.abstractmethod
    def list(
        self, *, state: int = 0, pipeline: str = "", limit: int = 50, before: tuple[float, str] | None = None
    ) -> list[gateway_pb2.Job]:
        """Newest first; ``before`` is the (created_at, job_id) of the last job of the previous page."""

    @abc.abstractmethod
    def unfinished(self) -> list[gateway_pb2.Job]:
        """Jobs that were PENDING or RUNNING: what a restarted gateway must resume."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class SqliteJobStore(JobStore):
    """SQLite in WAL mode: readers never block the writer, and a committed row survives a crash."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS jobs (
              job_id TEXT PRIMARY KEY,
              request_id TEXT,
              pipeline TEXT NOT NULL,
              state INTEGER NOT NULL,
              created_at REAL NOT NULL,
              body TEXT NOT NULL
            );
            CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id) WHERE request_id != '';
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
            CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at, job_id);
            CREATE TABLE IF NOT EXISTS events (
              job_id TEXT NOT NULL,
              sequence INTEGER NOT NULL,
              time REAL NOT NULL,
              kind INTEGER NOT NULL,
              stage TEXT NOT NULL,
              message TEXT NOT NULL,
              PRIMARY KEY (job_id, sequence)
            );
            """
        )

    @staticmethod
    def _body(job: gateway_pb2.Job) -> str:
        return json_format.MessageToJson(job, indent=None, preserving_proto_field_name=True)

    @staticmethod
    def _job(body: str) -> gateway_pb2.Job:
        return json_format.Parse(body, gateway_pb2.Job())

    def create(self, job: gateway_pb2.Job) -> tuple[gateway_pb2.Job, bool]:
        with self._lock:
            if job.request_id:
                row = self._db.execute(
                    "SELECT body FROM jobs WHERE request_id = ?", (job.request_id,)
                ).fetchone()
                if row:
                    return self._job(row[0]), False
            created = job.created_at.ToNanoseconds() / 1e9 if job.HasField("created_at") else time.time()
            self._db.execute(
                "INSERT INTO jobs(job_id, request_id, pipeline, state, created_at, body) "
                "VALUES (?,?,?,?,?,?)",
                (job.job_id, job.request_id, job.pipeline, job.state, created, self._body(job)),
            )
            return job, True

    def get(self, job_id: str) -> gateway_pb2.Job | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return self._job(row[0]) if row else None

    def by_request_id(self, request_id: str) -> gateway_pb2.Job | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return self._job(row[0]) if row else None

    def save(self, job: gateway_pb2.Job) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, body = ? WHERE job_id = ?",
                (job.state, self._body(job), job.job_id),
            )

    def add_event(self, job_id: str, kind: int, stage: str = "", message: str = "") -> StoredEvent:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()
            event = StoredEvent(job_id, row[0] + 1, time.time(), kind, stage, message)
            self._db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?,?)",
                (event.job_id, event.sequence, event.time, event.kind, event.stage, event.message),
            )
        return event

    def events_after(self, job_id: str, after_sequence: int) -> list[StoredEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, sequence, time, kind, stage, message FROM events "
                "WHERE job_id = ? AND sequence > ? ORDER BY sequence",
                (job_id, after_sequence),
            ).fetchall()
        return [StoredEvent(*row) for row in rows]

    def list(
        self, *, state: int = 0, pipeline: str = "", limit: int = 50, before: tuple[float, str] | None = None
    ) -> list[gateway_pb2.Job]:
        where, args = [], []
        if state:
            where.append("state = ?")
            args.append(state)
        if pipeline:
            where.append("pipeline = ?")
            args.append(pipeline)
        if before:
            where.append("(created_at < ? OR (created_at = ? AND job_id < ?))")
            args += [before[0], before[0], before[1]]
        sql = "SELECT body FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [self._job(r[0]) for r in rows]

    def unfinished(self) -> list[gateway_pb2.Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE state IN (?, ?) ORDER BY created_at",
                (gateway_pb2.PENDING, gateway_pb2.RUNNING),
            ).fetchall()
        return [self._job(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url: str) -> JobStore:
    """``sqlite:///path/to/jobs.db`` (the embedded default). PostgreSQL is the cluster plan (README)."""
    if url.startswith("sqlite:///"):
        return SqliteJobStore(Path(url[len("sqlite:///") :]).expanduser())
    if url.startswith(("postgres://", "postgresql://")):
        raise ValueError("the PostgreSQL job store is not built yet; use sqlite:///PATH (README: status)")
    raise ValueError(f"unsupported job store URL {url!r}; expected sqlite:///PATH")
