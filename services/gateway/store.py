"""Where jobs live: an interface, SQLite for the embedded default and PostgreSQL for clusters.

The gateway persists every job and every event before it acts on it, so a gateway killed mid-job
finds its work on restart. Jobs are stored as the protobuf ``Job`` message (JSON) plus indexed
columns; events as an append-only table. ``open_store`` picks the implementation from a URL:
``sqlite:///PATH`` (:class:`SqliteJobStore`, one gateway process) or ``postgresql://…``
(:class:`PostgresJobStore`, psycopg 3 from the ``gateway`` extra, imported only when used). Both keep
the same tables and the same guarantees: a request_id creates at most one job, and a job's events are
numbered 1, 2, 3 … without gaps or duplicates, also when several gateway processes share a PostgreSQL
database.

Which gateway runs which job is decided by **leases**. A job row carries its ``owner`` (a gateway's
replica id) and ``lease_until``; the owner renews the leases of the jobs it runs every third of the
lease, and a gateway with free slots claims unfinished jobs whose lease ran out (a dead or partitioned
owner) — on PostgreSQL with ``FOR UPDATE SKIP LOCKED``, so two gateways never claim one job. Every
write a job's runner makes is *fenced* by its owner: a job's snapshot and its event are stored in one
transaction that first checks the row still names this gateway, and :class:`LeaseLost` stops a
gateway that was presumed dead and came back. Cancellation from a gateway that does not own the job
is a flag on the row the owner reads when it renews. SQLite is the one-gateway store: its gateway
takes every unfinished job over when it starts, without waiting for leases to run out.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from dramaturg.gateway.v1 import gateway_pb2
from google.protobuf import json_format

TERMINAL_STATES = {gateway_pb2.SUCCEEDED, gateway_pb2.FAILED, gateway_pb2.CANCELLED}

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True)
class StoredEvent:
    job_id: str
    sequence: int
    time: float
    kind: int
    stage: str
    message: str


class LeaseLost(RuntimeError):
    """A fenced write found another owner on the job: its lease ran out and another gateway took it."""

    def __init__(self, job_id: str, owner: str, holder: str | None) -> None:
        self.job_id, self.owner, self.holder = job_id, owner, holder
        held = f"gateway {holder!r}" if holder else "no gateway"
        super().__init__(f"job {job_id} is no longer owned by {owner!r} ({held} holds it now)")


@dataclass(frozen=True)
class Claimed:
    """A job a gateway just claimed, and who held it before (empty: nobody)."""

    job: gateway_pb2.Job
    previous_owner: str


class JobStore(abc.ABC):
    """Persistence the gateway needs; every method is safe to call from several threads."""

    #: whether several gateway processes may share this store (and so must wait for leases)
    shared: bool = False

    @abc.abstractmethod
    def create(
        self, job: gateway_pb2.Job, owner: str = "", lease_seconds: float = 0.0
    ) -> tuple[gateway_pb2.Job, bool]:
        """Insert ``job`` (owned by ``owner`` for ``lease_seconds``); when its request_id was seen
        before, return that job and False."""

    @abc.abstractmethod
    def get(self, job_id: str) -> gateway_pb2.Job | None: ...

    @abc.abstractmethod
    def by_request_id(self, request_id: str) -> gateway_pb2.Job | None: ...

    @abc.abstractmethod
    def save(self, job: gateway_pb2.Job, owner: str = "") -> None:
        """Replace the stored job with this snapshot; with ``owner``, only while it owns the job
        (else :class:`LeaseLost`)."""

    @abc.abstractmethod
    def add_event(
        self, job_id: str, kind: int, stage: str = "", message: str = "", owner: str = ""
    ) -> StoredEvent:
        """Append an event; with ``owner``, only while it owns the job (else :class:`LeaseLost`)."""

    @abc.abstractmethod
    def save_with_event(
        self, job: gateway_pb2.Job, kind: int, stage: str = "", message: str = "", owner: str = ""
    ) -> StoredEvent:
        """:meth:`save` and :meth:`add_event` in one transaction: a watcher never sees a snapshot
        without its event, and a fenced-off gateway writes neither."""

    @abc.abstractmethod
    def claim(
        self, owner: str, lease_seconds: float, limit: int, *, job_id: str = "", own: bool = False,
        force: bool = False,
    ) -> list[Claimed]:
        """Take up to ``limit`` unfinished jobs, oldest first, that nobody holds or whose lease ran out
        (``own``: also those ``owner`` held before, e.g. in a previous life; ``force``: every unfinished
        job, for a store only one gateway uses); ``job_id`` restricts the claim to that job."""

    @abc.abstractmethod
    def renew(self, owner: str, job_ids: Iterable[str], lease_seconds: float) -> dict[str, bool]:
        """Extend ``owner``'s leases on these jobs; returns the unfinished ones it still owns, each
        with whether a cancellation was requested for it."""

    @abc.abstractmethod
    def release(self, owner: str, job_ids: Iterable[str]) -> None:
        """Give these leases up (a gateway stopping cleanly): another gateway may claim them at once."""

    @abc.abstractmethod
    def request_cancel(self, job_id: str) -> None:
        """Flag the job for cancellation; its owner sees the flag when it next renews its leases."""

    @abc.abstractmethod
    def lease(self, job_id: str) -> tuple[str, float]:
        """(owner, seconds its lease has left; negative once expired) — for status pages and tests."""

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

    # The stored form of a job, the same in every SQL store: the Job message as JSON.
    @staticmethod
    def _body(job: gateway_pb2.Job) -> str:
        return json_format.MessageToJson(job, indent=None, preserving_proto_field_name=True)

    @staticmethod
    def _job(body: str) -> gateway_pb2.Job:
        return json_format.Parse(body, gateway_pb2.Job())


# owner: the replica id of the gateway running the job ('' = nobody); lease_until: when its lease runs
# out (seconds since the epoch, by the database's clock on PostgreSQL); cancel_requested: set by a
# gateway that does not own the job, read by its owner.
LEASE_COLUMNS_SQLITE = {
    "owner": "TEXT NOT NULL DEFAULT ''",
    "lease_until": "REAL NOT NULL DEFAULT 0",
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
}


def list_query(
    mark: str, *, state: int, pipeline: str, limit: int, before: tuple[float, str] | None
) -> tuple[str, list[Any]]:
    """``JobStore.list``'s SQL and arguments for a driver whose placeholder is ``mark`` (? or %s)."""
    where: list[str] = []
    args: list[Any] = []
    if state:
        where.append(f"state = {mark}")
        args.append(state)
    if pipeline:
        where.append(f"pipeline = {mark}")
        args.append(pipeline)
    if before:
        where.append(f"(created_at < {mark} OR (created_at = {mark} AND job_id < {mark}))")
        args += [before[0], before[0], before[1]]
    sql = "SELECT body FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
    return sql + f" ORDER BY created_at DESC, job_id DESC LIMIT {mark}", [*args, limit]


class SqliteJobStore(JobStore):
    """SQLite in WAL mode: readers never block the writer, and a committed row survives a crash."""

    shared = False

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
        # the lease columns, added to a database an older gateway created
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, declaration in LEASE_COLUMNS_SQLITE.items():
            if column not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction under the lock (IMMEDIATE: it holds the write lock from its start)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _fence(self, db: sqlite3.Connection, job_id: str, owner: str) -> None:
        if not owner:
            return
        row = db.execute("SELECT owner FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None or row[0] != owner:
            raise LeaseLost(job_id, owner, row[0] if row else None)

    def create(
        self, job: gateway_pb2.Job, owner: str = "", lease_seconds: float = 0.0
    ) -> tuple[gateway_pb2.Job, bool]:
        with self._transaction() as db:
            if job.request_id:
                row = db.execute("SELECT body FROM jobs WHERE request_id = ?", (job.request_id,)).fetchone()
                if row:
                    return self._job(row[0]), False
            created = job.created_at.ToNanoseconds() / 1e9 if job.HasField("created_at") else time.time()
            db.execute(
                "INSERT INTO jobs(job_id, request_id, pipeline, state, created_at, body, owner, lease_until) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job.job_id, job.request_id, job.pipeline, job.state, created, self._body(job), owner,
                 time.time() + lease_seconds if owner else 0.0),
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

    def save(self, job: gateway_pb2.Job, owner: str = "") -> None:
        with self._transaction() as db:
            self._fence(db, job.job_id, owner)
            db.execute("UPDATE jobs SET state = ?, body = ? WHERE job_id = ?",
                       (job.state, self._body(job), job.job_id))

    @staticmethod
    def _append(db: sqlite3.Connection, job_id: str, kind: int, stage: str, message: str) -> StoredEvent:
        row = db.execute("SELECT COALESCE(MAX(sequence), 0) FROM events WHERE job_id = ?",
                         (job_id,)).fetchone()
        event = StoredEvent(job_id, row[0] + 1, time.time(), kind, stage, message)
        db.execute("INSERT INTO events VALUES (?,?,?,?,?,?)", astuple(event))
        return event

    def add_event(
        self, job_id: str, kind: int, stage: str = "", message: str = "", owner: str = ""
    ) -> StoredEvent:
        with self._transaction() as db:
            self._fence(db, job_id, owner)
            return self._append(db, job_id, kind, stage, message)

    def save_with_event(
        self, job: gateway_pb2.Job, kind: int, stage: str = "", message: str = "", owner: str = ""
    ) -> StoredEvent:
        with self._transaction() as db:
            self._fence(db, job.job_id, owner)
            db.execute("UPDATE jobs SET state = ?, body = ? WHERE job_id = ?",
                       (job.state, self._body(job), job.job_id))
            return self._append(db, job.job_id, kind, stage, message)

    def claim(
        self, owner: str, lease_seconds: float, limit: int, *, job_id: str = "", own: bool = False,
        force: bool = False,
    ) -> list[Claimed]:
        now = time.time()
        where, args = ["state IN (?, ?)"], [gateway_pb2.PENDING, gateway_pb2.RUNNING]
        if job_id:
            where.append("job_id = ?")
            args.append(job_id)
        if not force:
            where.append("(owner = '' OR lease_until < ?" + (" OR owner = ?)" if own else ")"))
            args += [now, owner] if own else [now]
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT job_id, owner, body FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY created_at, job_id LIMIT ?",
                [*args, limit],
            ).fetchall()
            db.executemany("UPDATE jobs SET owner = ?, lease_until = ? WHERE job_id = ?",
                           [(owner, now + lease_seconds, row[0]) for row in rows])
        return [Claimed(self._job(body), previous) for _, previous, body in rows]

    def renew(self, owner: str, job_ids: Iterable[str], lease_seconds: float) -> dict[str, bool]:
        ids = list(job_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT job_id, cancel_requested FROM jobs WHERE owner = ? AND state IN (?, ?) "
                f"AND job_id IN ({marks})",
                [owner, gateway_pb2.PENDING, gateway_pb2.RUNNING, *ids],
            ).fetchall()
            db.executemany("UPDATE jobs SET lease_until = ? WHERE job_id = ?",
                           [(time.time() + lease_seconds, row[0]) for row in rows])
        return {job_id: bool(cancel) for job_id, cancel in rows}

    def release(self, owner: str, job_ids: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE jobs SET owner = '', lease_until = 0 WHERE job_id = ? AND owner = ?",
                           [(job_id, owner) for job_id in job_ids])

    def request_cancel(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))

    def lease(self, job_id: str) -> tuple[str, float]:
        with self._lock:
            row = self._db.execute("SELECT owner, lease_until FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone()
        return ("", 0.0) if row is None else (row[0], row[1] - time.time())

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
        sql, args = list_query("?", state=state, pipeline=pipeline, limit=limit, before=before)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
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


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db`` (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


class PostgresJobStore(JobStore):
    """PostgreSQL through psycopg 3: the job store several gateway processes (or a restarted pod) share.

    One autocommit connection, guarded by a lock like the SQLite store's (calls are short; the gateway
    makes a handful per stage). Creating a job is one ``INSERT … ON CONFLICT DO NOTHING``, so two
    processes submitting one request_id at once get one job; an event's sequence number is taken in a
    transaction that first locks the job's row, so concurrent writers queue up instead of colliding.
    A connection that drops (server restart, fail-over, idle timeout) is reopened once per call before
    the error reaches the caller. A write whose commit succeeded but whose answer was lost is then sent
    again: ``create`` recognises its own row, ``add_event`` may record that one event twice (a repeated
    notification, never a lost one).

    The URL is libpq's (``postgresql://user@host:5432/db?sslmode=require``); what it leaves out comes
    from libpq's environment (``PGPASSWORD``, ``PGSSLMODE``, …) or ``~/.pgpass``. The tables are
    created when missing; to keep them out of ``public``, add ``options=-csearch_path%3Dschema``.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS jobs (
          job_id TEXT COLLATE "C" PRIMARY KEY,
          request_id TEXT COLLATE "C" NOT NULL DEFAULT '',
          pipeline TEXT NOT NULL,
          state INTEGER NOT NULL,
          created_at DOUBLE PRECISION NOT NULL,
          body TEXT NOT NULL
        );
        CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs(request_id) WHERE request_id <> '';
        CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
        CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at, job_id);
        CREATE TABLE IF NOT EXISTS events (
          job_id TEXT COLLATE "C" NOT NULL,
          sequence INTEGER NOT NULL,
          time DOUBLE PRECISION NOT NULL,
          kind INTEGER NOT NULL,
          stage TEXT NOT NULL,
          message TEXT NOT NULL,
          PRIMARY KEY (job_id, sequence)
        );
        ALTER TABLE jobs ADD COLUMN IF NOT EXISTS owner TEXT COLLATE "C" NOT NULL DEFAULT '';
        ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
    """
    # Lease times come from the database's clock, so gateways whose clocks disagree still agree on
    # whether a lease ran out.
    NOW = "extract(epoch from clock_timestamp())::double precision"
    # pg_advisory_xact_lock key: processes starting together create the tables one after the other
    # (concurrent CREATE … IF NOT EXISTS can still collide in the catalog).
    SCHEMA_LOCK = 0x6472616D61  # "drama"
    shared = True

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        import psycopg  # the gateway extra; only a postgresql:// URL needs it

        self._pg = psycopg
        self.url = url
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._conn = self._connect()
        self._run(self._create_schema)

    def _connect(self) -> Any:
        try:
            return self._pg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name="dramaturg-gateway",
            )
        except self._pg.OperationalError as exc:
            raise self._pg.OperationalError(
                f"cannot connect to the job store at {redact_url(self.url)}: {exc}".strip()
            ) from exc

    def _create_schema(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
            for statement in filter(str.strip, self.SCHEMA.split(";")):
                conn.execute(statement)

    def _run(self, op: Callable[[Any], R]) -> R:
        """Run ``op(connection)`` under the lock; reconnect once if the connection dropped."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            if self._conn.closed:
                self._conn = self._connect()
            try:
                return op(self._conn)
            except self._pg.OperationalError as exc:
                # Only a lost connection is retried; a query error on a live one is the caller's.
                if not self._conn.closed:
                    raise
                log.warning("job store connection to %s lost (%s); reconnecting", redact_url(self.url), exc)
            self._conn = self._connect()
            return op(self._conn)

    def create(
        self, job: gateway_pb2.Job, owner: str = "", lease_seconds: float = 0.0
    ) -> tuple[gateway_pb2.Job, bool]:
        created = job.created_at.ToNanoseconds() / 1e9 if job.HasField("created_at") else time.time()
        body = self._body(job)

        def op(conn: Any) -> tuple[gateway_pb2.Job, bool]:
            inserted = conn.execute(
                "INSERT INTO jobs(job_id, request_id, pipeline, state, created_at, body, owner, lease_until) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, CASE WHEN %s = '' THEN 0 ELSE {self.NOW} + %s END) "
                "ON CONFLICT DO NOTHING",
                (job.job_id, job.request_id, job.pipeline, job.state, created, body, owner, owner,
                 lease_seconds),
            ).rowcount
            if inserted:
                return job, True
            row = None
            if job.request_id:
                row = conn.execute(
                    "SELECT job_id, body FROM jobs WHERE request_id = %s", (job.request_id,)
                ).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT job_id, body FROM jobs WHERE job_id = %s", (job.job_id,)
                ).fetchone()
            if row is None:  # the conflicting row was deleted in between: not something the gateway does
                raise RuntimeError(f"job {job.job_id} conflicted with a row that no longer exists")
            if row[1] == body:  # our own insert, committed before a dropped connection lost the answer
                return job, True
            if row[0] == job.job_id:
                raise ValueError(f"job id {job.job_id} is already taken by another job")
            return self._job(row[1]), False

        return self._run(op)

    def get(self, job_id: str) -> gateway_pb2.Job | None:
        row = self._run(
            lambda conn: conn.execute("SELECT body FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        )
        return self._job(row[0]) if row else None

    def by_request_id(self, request_id: str) -> gateway_pb2.Job | None:
        if not request_id:
            return None
        row = self._run(
            lambda conn: conn.execute("SELECT body FROM jobs WHERE request_id = %s", (request_id,)).fetchone()
        )
        return self._job(row[0]) if row else None

    def _fence(self, conn: Any, job_id: str, owner: str) -> None:
        """Lock the job's row (writers of one job queue on it) and check ``owner`` still holds it."""
        row = conn.execute("SELECT owner FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,)).fetchone()
        if owner and (row is None or row[0] != owner):
            raise LeaseLost(job_id, owner, row[0] if row else None)

    def _append(self, conn: Any, job_id: str, kind: int, stage: str, message: str) -> StoredEvent:
        # Writers of one job queue on its row (locked by _fence); each then reads the MAX the previous
        # one committed (READ COMMITTED takes a fresh snapshot per statement).
        (sequence,) = conn.execute(
            "SELECT COALESCE(MAX(sequence), 0) + 1 FROM events WHERE job_id = %s", (job_id,)
        ).fetchone()
        event = StoredEvent(job_id, sequence, time.time(), kind, stage, message)
        conn.execute(
            "INSERT INTO events(job_id, sequence, time, kind, stage, message) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            astuple(event),
        )
        return event

    def _write(self, job_id: str, owner: str, write: Callable[[Any], R]) -> R:
        """Run ``write(conn)`` in a transaction fenced by ``owner``."""

        def op(conn: Any) -> R:
            for attempt in range(5):
                try:
                    with conn.transaction():
                        self._fence(conn, job_id, owner)
                        return write(conn)
                except self._pg.errors.UniqueViolation:
                    # only possible without a job row to lock (events of an unknown job): take the next
                    if attempt == 4:
                        raise
            raise AssertionError("unreachable")

        return self._run(op)

    def save(self, job: gateway_pb2.Job, owner: str = "") -> None:
        body = self._body(job)
        self._write(job.job_id, owner, lambda conn: conn.execute(
            "UPDATE jobs SET state = %s, body = %s WHERE job_id = %s", (job.state, body, job.job_id)))

    def add_event(
        self, job_id: str, kind: int, stage: str = "", message: str = "", owner: str = ""
    ) -> StoredEvent:
        return self._write(job_id, owner, lambda conn: self._append(conn, job_id, kind, stage, message))

    def save_with_event(
        self, job: gateway_pb2.Job, kind: int, stage: str = "", message: str = "", owner: str = ""
    ) -> StoredEvent:
        body = self._body(job)

        def write(conn: Any) -> StoredEvent:
            conn.execute("UPDATE jobs SET state = %s, body = %s WHERE job_id = %s",
                         (job.state, body, job.job_id))
            return self._append(conn, job.job_id, kind, stage, message)

        return self._write(job.job_id, owner, write)

    def claim(
        self, owner: str, lease_seconds: float, limit: int, *, job_id: str = "", own: bool = False,
        force: bool = False,
    ) -> list[Claimed]:
        where, args = ["state IN (%s, %s)"], [gateway_pb2.PENDING, gateway_pb2.RUNNING]
        if job_id:
            where.append("job_id = %s")
            args.append(job_id)
        if not force:
            where.append(f"(owner = '' OR lease_until < {self.NOW}" + (" OR owner = %s)" if own else ")"))
            args += [owner] if own else []
        # SKIP LOCKED: a row another gateway is claiming (or writing) right now is left to it, and
        # the WHERE is checked again on the row's newest version once it is locked.
        sql = (
            f"WITH c AS (SELECT job_id, owner FROM jobs WHERE {' AND '.join(where)} "
            "ORDER BY created_at, job_id LIMIT %s FOR UPDATE SKIP LOCKED) "
            f"UPDATE jobs j SET owner = %s, lease_until = {self.NOW} + %s FROM c WHERE j.job_id = c.job_id "
            "RETURNING j.created_at, j.job_id, j.body, c.owner"
        )
        rows = self._run(lambda conn: conn.execute(sql, [*args, limit, owner, lease_seconds]).fetchall())
        return [Claimed(self._job(body), previous) for _, _, body, previous in sorted(rows)]

    def renew(self, owner: str, job_ids: Iterable[str], lease_seconds: float) -> dict[str, bool]:
        ids = list(job_ids)
        if not ids:
            return {}
        rows = self._run(lambda conn: conn.execute(
            f"UPDATE jobs SET lease_until = {self.NOW} + %s WHERE owner = %s AND job_id = ANY(%s) "
            "AND state IN (%s, %s) RETURNING job_id, cancel_requested",
            (lease_seconds, owner, ids, gateway_pb2.PENDING, gateway_pb2.RUNNING),
        ).fetchall())
        return {job_id: bool(cancel) for job_id, cancel in rows}

    def release(self, owner: str, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            self._run(lambda conn: conn.execute(
                "UPDATE jobs SET owner = '', lease_until = 0 WHERE owner = %s AND job_id = ANY(%s)",
                (owner, ids)))

    def request_cancel(self, job_id: str) -> None:
        self._run(lambda conn: conn.execute(
            "UPDATE jobs SET cancel_requested = TRUE WHERE job_id = %s", (job_id,)))

    def lease(self, job_id: str) -> tuple[str, float]:
        row = self._run(lambda conn: conn.execute(
            f"SELECT owner, lease_until - {self.NOW} FROM jobs WHERE job_id = %s", (job_id,)).fetchone())
        return ("", 0.0) if row is None else (row[0], float(row[1]))

    def events_after(self, job_id: str, after_sequence: int) -> list[StoredEvent]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT job_id, sequence, time, kind, stage, message FROM events "
                "WHERE job_id = %s AND sequence > %s ORDER BY sequence",
                (job_id, after_sequence),
            ).fetchall()
        )
        return [StoredEvent(*row) for row in rows]

    def list(
        self, *, state: int = 0, pipeline: str = "", limit: int = 50, before: tuple[float, str] | None = None
    ) -> list[gateway_pb2.Job]:
        sql, args = list_query("%s", state=state, pipeline=pipeline, limit=limit, before=before)
        rows = self._run(lambda conn: conn.execute(sql, args).fetchall())
        return [self._job(r[0]) for r in rows]

    def unfinished(self) -> list[gateway_pb2.Job]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT body FROM jobs WHERE state IN (%s, %s) ORDER BY created_at, job_id",
                (gateway_pb2.PENDING, gateway_pb2.RUNNING),
            ).fetchall()
        )
        return [self._job(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()


def open_store(url: str) -> JobStore:
    """The job store a URL names.

    ``sqlite:///path/to/jobs.db``: the embedded default, one gateway process.
    ``postgresql://user@host:5432/db`` (or ``postgres://``): a PostgreSQL database, for clusters; the
    password comes from the URL or libpq's environment (``PGPASSWORD``) / ``~/.pgpass``. Needs psycopg
    (the ``gateway`` extra).
    """
    if url.startswith("sqlite:///"):
        return SqliteJobStore(Path(url[len("sqlite:///") :]).expanduser())
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresJobStore(url)
    raise ValueError(
        f"unsupported job store URL {redact_url(url)!r}; expected sqlite:///PATH or postgresql://…"
    )
