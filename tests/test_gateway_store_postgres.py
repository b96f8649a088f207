"""The PostgreSQL job store against a real PostgreSQL server (Debian's postgresql package, on loopback).

The store contract (idempotent create, events, paging, unfinished jobs, reopening) is checked on the
SQLite store and on PostgreSQL with the same function; then what only a shared database has to get
right: two stores (two gateway replicas) appending to one job and submitting one request_id at the
same time, a dropped connection, and a gateway running a real job on PostgreSQL.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import tone_wav
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.server import GatewayService
from dramaturg.services.gateway.store import TERMINAL_STATES, JobStore, PostgresJobStore, open_store
from google.protobuf import timestamp_pb2
from helpers import ServerThread

TOKEN = "test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
S = gateway_pb2


# -- a PostgreSQL server for the module -------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl in a temporary directory; as root, both run as the `postgres` system user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="dramaturg-pg-"))  # not under pytest's 0700 tmp dirs
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.sock.mkdir()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.sock):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.port = _free_port()

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
            "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.sock} "
            "-c fsync=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the gateway extra)")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server under /usr/lib/postgresql/*/bin (`make deploy-tools` installs it)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run initdb as")
    server = PostgresServer(bindir)
    try:
        server.start()
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waited for the socket; make sure TCP answers too
            try:
                psycopg.connect(server.url(), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    except BaseException:
        log = server.log.read_text() if server.log.exists() else ""
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{log}") from None
    yield server
    server.stop()


_databases = itertools.count()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty database per test."""
    import psycopg

    name = f"jobs_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return postgres.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


# -- the contract both stores keep -----------------------------------------------------------------


def make_job(job_id: str, created: float, pipeline: str = "probe", request_id: str = "", state=S.PENDING):
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(created * 1e9))
    return S.Job(
        job_id=job_id,
        pipeline=pipeline,
        state=state,
        request_id=request_id,
        created_at=stamp,
        labels={"scene": job_id},
        stages=[S.Stage(name="decode", state=S.STAGE_PENDING)],
    )


def check_store_contract(open_it) -> None:
    """What the engine relies on, for any JobStore. ``open_it()`` opens the same store again."""
    store: JobStore = open_it()
    try:
        first, created = store.create(make_job("a1", 100.0, request_id="req-1"))
        assert created and first.job_id == "a1"
        again, created = store.create(make_job("a2", 101.0, request_id="req-1"))
        assert not created and again.job_id == "a1" and again.labels["scene"] == "a1"
        assert store.get("a2") is None
        assert store.by_request_id("req-1").job_id == "a1"
        assert store.by_request_id("nope") is None
        assert store.get("nope") is None
        # jobs without a request_id never conflict with each other
        for job_id, created_at, pipeline in [
            ("b1", 102.0, "probe"),
            ("b2", 103.0, "analyze_scene"),
            ("b3", 103.0, "probe"),  # same created_at as b2: job_id breaks the tie
            ("b4", 104.0, "probe"),
        ]:
            assert store.create(make_job(job_id, created_at, pipeline))[1]

        job = store.get("b1")
        job.state = S.RUNNING
        job.stages[0].state = S.STAGE_SUCCEEDED
        job.progress = 0.5
        store.save(job)
        saved = store.get("b1")
        assert saved == job and saved.state == S.RUNNING and saved.progress == pytest.approx(0.5)
        done = store.get("b4")
        done.state = S.SUCCEEDED
        store.save(done)

        events = [store.add_event("b1", S.JOB_STATE_CHANGED, message="submitted")]
        events += [
            store.add_event("b1", S.STAGE_STATE_CHANGED, stage="decode", message=f"m{i}") for i in range(3)
        ]
        store.add_event("b2", S.JOB_STATE_CHANGED, message="other job")
        assert [e.sequence for e in events] == [1, 2, 3, 4]
        assert store.events_after("b1", 0) == events
        assert store.events_after("b1", 2) == events[2:]
        assert store.events_after("b1", 4) == []
        assert [(e.sequence, e.message) for e in store.events_after("b2", 0)] == [(1, "other job")]
        assert events[1].stage == "decode" and events[1].kind == S.STAGE_STATE_CHANGED

        # newest first, ties broken by job_id; pages continue after (created_at, job_id)
        assert [j.job_id for j in store.list()] == ["b4", "b3", "b2", "b1", "a1"]
        page1 = store.list(limit=2)
        assert [j.job_id for j in page1] == ["b4", "b3"]
        last = page1[-1]
        page2 = store.list(limit=2, before=(last.created_at.ToNanoseconds() / 1e9, last.job_id))
        assert [j.job_id for j in page2] == ["b2", "b1"]
        last = page2[-1]
        page3 = store.list(limit=2, before=(last.created_at.ToNanoseconds() / 1e9, last.job_id))
        assert [j.job_id for j in page3] == ["a1"]
        assert [j.job_id for j in store.list(pipeline="probe")] == ["b4", "b3", "b1", "a1"]
        assert [j.job_id for j in store.list(state=S.RUNNING)] == ["b1"]
        assert [j.job_id for j in store.list(state=S.PENDING, pipeline="probe")] == ["b3", "a1"]
        assert store.list(pipeline="nope") == []

        assert [j.job_id for j in store.unfinished()] == ["a1", "b1", "b2", "b3"]
        assert all(j.state not in TERMINAL_STATES for j in store.unfinished())
    finally:
        store.close()

    # durable: a new store (a restarted gateway) finds everything, and keeps numbering events
    reopened = open_it()
    try:
        assert reopened.get("b1") == saved
        assert [e.sequence for e in reopened.events_after("b1", 0)] == [1, 2, 3, 4]
        assert reopened.add_event("b1", S.JOB_STATE_CHANGED).sequence == 5
        assert reopened.by_request_id("req-1").job_id == "a1"
        assert not reopened.create(make_job("a3", 105.0, request_id="req-1"))[1]
        assert len(reopened.list()) == 5
    finally:
        reopened.close()


def test_both_stores_keep_the_same_contract(store_url: str) -> None:
    check_store_contract(lambda: open_store(store_url))


def test_open_store_urls(pg_url: str) -> None:
    store = open_store(pg_url.replace("postgresql://", "postgres://", 1))
    assert isinstance(store, PostgresJobStore)
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get("x")
    with pytest.raises(ValueError, match=r"sqlite:///PATH or postgresql://"):
        open_store("mysql://root:secret@db/jobs")
    with pytest.raises(ValueError) as bad:
        open_store("mysql://root:secret@db/jobs")
    assert "secret" not in str(bad.value)


def test_the_sqlite_default_never_imports_psycopg(tmp_path: Path) -> None:
    code = (
        "import sys; from dramaturg.services.gateway.store import open_store; "
        f"open_store('sqlite:///{tmp_path / 'jobs.db'}').close(); assert 'psycopg' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_unreachable_database_is_reported_without_the_password() -> None:
    psycopg = pytest.importorskip("psycopg")
    url = f"postgresql://dramaturg:hunter2@127.0.0.1:{_free_port()}/dramaturg"
    with pytest.raises(psycopg.OperationalError) as failed:
        PostgresJobStore(url, connect_timeout=2)
    assert "cannot connect to the job store" in str(failed.value)
    assert "hunter2" not in str(failed.value) and "dramaturg:***@127.0.0.1" in str(failed.value)


# -- what only a shared database must get right ------------------------------------------------------


def test_two_replicas_appending_to_one_job_number_events_without_gaps(pg_url: str) -> None:
    stores = [PostgresJobStore(pg_url), PostgresJobStore(pg_url)]
    try:
        stores[0].create(make_job("shared", 1.0))
        threads_per_store, per_thread = 3, 20
        start = threading.Barrier(len(stores) * threads_per_store)
        errors: list[BaseException] = []
        written: list[int] = []

        def append(store: PostgresJobStore, worker: int) -> None:
            try:
                start.wait()
                for i in range(per_thread):
                    written.append(
                        store.add_event("shared", S.STAGE_PROGRESS, message=f"{worker}:{i}").sequence
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=append, args=(store, n * threads_per_store + t))
            for n, store in enumerate(stores)
            for t in range(threads_per_store)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        total = len(stores) * threads_per_store * per_thread
        assert sorted(written) == list(range(1, total + 1))
        events = stores[1].events_after("shared", 0)
        assert [e.sequence for e in events] == list(range(1, total + 1))
        # every writer's own events stay in the order it wrote them
        for worker in range(len(threads)):
            mine = [int(e.message.split(":")[1]) for e in events if e.message.startswith(f"{worker}:")]
            assert mine == list(range(per_thread))
    finally:
        for store in stores:
            store.close()


def test_two_replicas_submitting_one_request_id_create_one_job(pg_url: str) -> None:
    stores = [PostgresJobStore(pg_url) for _ in range(2)]
    try:
        for round_ in range(15):
            start = threading.Barrier(4)
            results: list[tuple[str, bool]] = []

            def submit(
                store: PostgresJobStore, job: gateway_pb2.Job, start: threading.Barrier, results: list
            ):
                start.wait()
                stored, created = store.create(job)
                results.append((stored.job_id, created))

            threads = [
                threading.Thread(
                    target=submit,
                    args=(
                        stores[n % 2],
                        make_job(f"r{round_}-{n}", 10.0 + n, request_id=f"req-{round_}"),
                        start,
                        results,
                    ),
                )
                for n in range(4)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(results) == 4
            assert sum(created for _, created in results) == 1, results
            winner = next(job_id for job_id, created in results if created)
            assert {job_id for job_id, _ in results} == {winner}
            assert stores[0].by_request_id(f"req-{round_}").job_id == winner
        assert len(stores[1].list(limit=100)) == 15
    finally:
        for store in stores:
            store.close()


def test_a_dropped_connection_is_reopened_once(pg_url: str, postgres: PostgresServer, caplog) -> None:
    import psycopg

    store = PostgresJobStore(pg_url)
    try:
        store.create(make_job("j", 1.0))
        store.add_event("j", S.JOB_STATE_CHANGED)
        database = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'dramaturg-gateway'",
                (database,),
            ).fetchone()[0]
        assert killed == 1
        # the next calls find the connection gone, reconnect and succeed
        with caplog.at_level("WARNING", logger="dramaturg.services.gateway.store"):
            assert store.add_event("j", S.JOB_STATE_CHANGED).sequence == 2
        assert (
            "connection to postgresql://postgres@127.0.0.1" in caplog.text and "reconnecting" in caplog.text
        )
        assert store.get("j").job_id == "j"
        # an error on a live connection is not retried
        with pytest.raises(psycopg.errors.UndefinedTable):
            store._run(lambda conn: conn.execute("SELECT * FROM no_such_table"))
        assert store.get("j") is not None
    finally:
        store.close()


# -- the gateway on PostgreSQL ---------------------------------------------------------------------


def test_gateway_runs_a_probe_job_on_postgresql(dramaturg_home: Path, pg_url: str) -> None:
    settings = GatewaySettings(api_token=TOKEN, retry_base_seconds=0.05, job_store=pg_url)
    service = GatewayService(settings, home=dramaturg_home)
    assert isinstance(service.store, PostgresJobStore)
    with ServerThread(service) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=tone_wav(seconds=2.0))
        job = stub.SubmitJob(
            S.SubmitJobRequest(pipeline="probe", audio=audio, request_id="pg-1"), metadata=AUTH, timeout=10
        )
        again = stub.SubmitJob(
            S.SubmitJobRequest(pipeline="probe", audio=audio, request_id="pg-1"), metadata=AUTH, timeout=10
        )
        assert again.job_id == job.job_id
        watched = list(stub.WatchJob(S.WatchJobRequest(job_id=job.job_id), metadata=AUTH, timeout=60))
        assert watched[-1].job.state == S.SUCCEEDED, watched[-1].job.error
    # another replica (a second store on the same database) sees the whole history
    other = open_store(pg_url)
    try:
        final = other.get(job.job_id)
        assert final.state == S.SUCCEEDED and final.request_id == "pg-1"
        events = other.events_after(job.job_id, 0)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert [e.sequence for e in events] == [e.sequence for e in watched]
        assert {e.stage for e in events} >= {"decode", "loudness", "activity"}
        assert other.unfinished() == []
    finally:
        other.close()
