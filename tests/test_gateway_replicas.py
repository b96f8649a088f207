"""Gateway replicas on one PostgreSQL: jobs owned by leases, taken over from a dead gateway, fenced.

First the lease contract every job store keeps (SQLite and PostgreSQL, the same function); then two
real gateway processes (tests/replica_gateway.py) sharing a PostgreSQL database and a DRAMATURG_HOME:
one is killed with SIGKILL mid-stage and the other finishes its job; one is frozen (SIGSTOP: a
partition or a long pause) past its lease, the other takes over, and the frozen one, thawed, stops
instead of racing it; a job is cancelled through the gateway that does not run it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.store import JobStore, LeaseLost, PostgresJobStore, open_store
from dramaturg.shared.cli.stack import free_port
from dramaturg.shared.grpc.client import wait_for_serving
from helpers import ServerThread, wait_for
from test_gateway import AUTH, wait_done, wav_input
from test_gateway_store_postgres import make_job, pg_url, postgres, store_url  # noqa: F401 - fixtures

S = gateway_pb2
LEASE = 1.5  # seconds; leases are renewed every 0.5 s
SCRIPT = Path(__file__).with_name("replica_gateway.py")


# -- the lease contract of every store -------------------------------------------------------------


def check_lease_contract(store: JobStore, other: JobStore) -> None:
    """``store`` and ``other`` are two gateways' connections to one database."""
    store.create(make_job("j1", 1.0), owner="a", lease_seconds=0.6)
    store.create(make_job("j2", 2.0), owner="a", lease_seconds=30)
    store.create(make_job("j3", 3.0))  # nobody's
    store.create(make_job("done", 0.5, state=S.SUCCEEDED))
    owner, left = other.lease("j1")
    assert owner == "a" and 0.3 < left <= 0.6

    # only the unowned job can be claimed while the leases run
    assert [c.job.job_id for c in other.claim("b", 5, limit=10)] == ["j3"]
    assert other.claim("b", 5, limit=10) == []
    store.save(store.get("j1"), owner="a")  # the owner writes freely
    store.save_with_event(store.get("j1"), S.LOG, message="mine", owner="a")
    time.sleep(0.7)  # j1's lease runs out
    taken = other.claim("b", 5, limit=10)
    assert [(c.job.job_id, c.previous_owner) for c in taken] == [("j1", "a")]
    assert other.lease("j1")[0] == "b"

    # the old owner is fenced off: no snapshot, no event
    before = len(store.events_after("j1", 0))
    stale = store.get("j1")
    stale.progress = 0.9
    for write in (
        lambda: store.save(stale, owner="a"),
        lambda: store.add_event("j1", S.LOG, message="late", owner="a"),
        lambda: store.save_with_event(stale, S.LOG, message="late", owner="a"),
    ):
        with pytest.raises(LeaseLost, match=r"no longer owned by 'a'.*'b' holds it"):
            write()
    assert len(store.events_after("j1", 0)) == before and store.get("j1").progress == 0
    other.save_with_event(other.get("j1"), S.LOG, message="new owner", owner="b")

    # renewals: only what one still owns, with the cancellation flag
    assert store.renew("a", ["j1", "j2"], 30) == {"j2": False}
    assert other.renew("b", ["j1", "j3", "done"], 30) == {"j1": False, "j3": False}
    store.request_cancel("j3")
    assert other.renew("b", ["j1", "j3"], 30) == {"j1": False, "j3": True}

    # a released lease can be claimed at once; "own" takes back one's own live leases (a restart)
    other.release("b", ["j1"])
    assert store.lease("j1") == ("", pytest.approx(store.lease("j1")[1]))
    assert [c.job.job_id for c in store.claim("a", 5, limit=10)] == ["j1"]
    assert store.claim("a", 5, limit=10) == []
    assert [c.job.job_id for c in store.claim("a", 5, limit=10, own=True)] == ["j1", "j2"]
    assert [c.job.job_id for c in store.claim("a", 5, limit=1, own=True, job_id="j2")] == ["j2"]
    # force (a one-gateway store at start): every unfinished job, never a finished one
    forced = store.claim("c", 5, limit=10, force=True)
    assert [c.job.job_id for c in forced] == ["j1", "j2", "j3"]
    assert [c.previous_owner for c in forced] == ["a", "a", "b"]


def test_both_stores_keep_the_lease_contract(store_url: str) -> None:  # noqa: F811 - the fixture
    stores = [open_store(store_url), open_store(store_url)]
    try:
        check_lease_contract(*stores)
    finally:
        for store in stores:
            store.close()


def test_concurrent_claims_take_each_job_once(pg_url: str) -> None:  # noqa: F811 - the fixture
    stores = [PostgresJobStore(pg_url) for _ in range(2)]
    try:
        for n in range(60):
            stores[0].create(make_job(f"q{n:02d}", float(n)))
        taken: dict[str, list[str]] = {}
        lock = threading.Lock()
        start = threading.Barrier(4)

        def claimer(store: PostgresJobStore, name: str) -> None:
            start.wait()
            while batch := store.claim(name, 30, limit=3):
                with lock:
                    taken.setdefault(name, []).extend(c.job.job_id for c in batch)

        threads = [threading.Thread(target=claimer, args=(stores[n % 2], f"g{n}")) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        every = sorted(j for jobs in taken.values() for j in jobs)
        assert every == [f"q{n:02d}" for n in range(60)]  # each once, none left
        assert len(taken) > 1  # the claimers really overlapped
        for name, jobs in taken.items():
            assert all(stores[1].lease(j)[0] == name for j in jobs)
    finally:
        for store in stores:
            store.close()


# -- two gateway processes on one PostgreSQL --------------------------------------------------------


class Replica:
    """One gateway process of the pair; restartable with the same replica id and port."""

    def __init__(self, name: str, home: Path, store: str, log_dir: Path, ticks: int) -> None:
        self.name, self.home, self.store, self.ticks = name, home, store, ticks
        self.port = free_port()
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, str(SCRIPT), "--home", str(self.home), "--store", self.store,
               "--port", str(self.port), "--replica", self.name, "--lease", str(LEASE),
               "--ticks", str(self.ticks)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        assert wait_for_serving(self.target, timeout=60), self.log.read_text()[-3000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(30)

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def replicas(dramaturg_home: Path, pg_url: str, tmp_path: Path, request) -> Iterator[list[Replica]]:  # noqa: F811
    ticks = getattr(request, "param", 40)
    pair = [Replica(name, dramaturg_home, pg_url, tmp_path, ticks) for name in ("gw-a", "gw-b")]
    try:
        for replica in pair:
            replica.start()
        yield pair
    finally:
        for replica in pair:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.signal(signal.SIGCONT)
            replica.kill()


def stub_for(channel: grpc.Channel) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(channel)


def wait_progress(stub, job_id: str, stage: str, at_least: float, timeout: float = 30) -> gateway_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=AUTH, timeout=5)
        current = next(s for s in job.stages if s.name == stage)
        if current.progress >= at_least:
            return job
        assert job.state not in (S.SUCCEEDED, S.FAILED, S.CANCELLED), job
        assert time.monotonic() < deadline, f"{stage} never reached {at_least}: {current}"
        time.sleep(0.05)


def watch_all(stub, job_id: str) -> list[gateway_pb2.JobEvent]:
    return list(stub.WatchJob(S.WatchJobRequest(job_id=job_id), metadata=AUTH, timeout=60))


def runs(home: Path, job_id: str) -> list[str]:
    return (home / "gateway" / "jobs" / job_id / "runs.txt").read_text().split("\n")[:-1]


def check_events(events: list[gateway_pb2.JobEvent]) -> None:
    """Every event once, in order, numbered without gaps; each stage's result recorded once."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    for stage in ("prepare", "long", "finish"):
        succeeded = [e for e in events if e.stage == stage and e.message == "succeeded"]
        assert len(succeeded) == 1, (stage, [e.message for e in events if e.stage == stage])


def test_a_killed_gateways_job_is_taken_over_and_finished(replicas: list[Replica],
                                                          dramaturg_home: Path) -> None:
    a, b = replicas
    with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
        job = stub_for(ca).SubmitJob(S.SubmitJobRequest(pipeline="slow", audio=wav_input()),
                                     metadata=AUTH, timeout=10)
        seen_on_b: list[gateway_pb2.JobEvent] = []
        watcher = threading.Thread(target=lambda: seen_on_b.extend(watch_all(stub_for(cb), job.job_id)))
        watcher.start()  # a watch opened on the gateway that does not run the job
        wait_progress(stub_for(cb), job.job_id, "long", 0.25)
        a.kill()
        killed = time.monotonic()
        final = wait_done(stub_for(cb), job.job_id, timeout=60)
        watcher.join(30)
        taken_after = time.monotonic() - killed
        events_b = watch_all(stub_for(cb), job.job_id)
    assert final.state == S.SUCCEEDED, final.error
    # prepare's result came from a and was kept; the interrupted stage ran again on b
    assert dict(final.result) == {"prepare": "gw-a", "long": "gw-b", "finish": "gw-b"}
    assert runs(dramaturg_home, job.job_id) == [
        "prepare gw-a", "long-start gw-a", "long-start gw-b", "long-end gw-b", "finish gw-b"]
    check_events(events_b)
    assert [e.sequence for e in seen_on_b] == [e.sequence for e in events_b]  # live = replayed
    takeover = [e for e in events_b if "taken over from gateway gw-a" in e.message]
    assert len(takeover) == 1
    assert taken_after < LEASE * 2 + 10  # the lease ran out, then b's next round claimed it

    # the killed replica comes back with its id: it sees the same history
    a.start()
    with grpc.insecure_channel(a.target) as ca:
        events_a = watch_all(stub_for(ca), job.job_id)
    assert [(e.sequence, e.kind, e.stage, e.message) for e in events_a] == [
        (e.sequence, e.kind, e.stage, e.message) for e in events_b]


def test_a_frozen_gateway_is_fenced_off_when_it_thaws(replicas: list[Replica], dramaturg_home: Path) -> None:
    a, b = replicas
    with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
        job = stub_for(ca).SubmitJob(S.SubmitJobRequest(pipeline="slow", audio=wav_input()),
                                     metadata=AUTH, timeout=10)
        wait_progress(stub_for(cb), job.job_id, "long", 0.25)
        a.signal(signal.SIGSTOP)  # alive, holding a stage, but silent: a pause or a partition
        deadline = time.monotonic() + 30
        while not any("taken over" in e.message for e in watch_events_so_far(stub_for(cb), job.job_id)):
            assert time.monotonic() < deadline, "b never took the job over"
            time.sleep(0.1)
        a.signal(signal.SIGCONT)  # a's next write finds b's name on the row
        final = wait_done(stub_for(cb), job.job_id, timeout=60)
        time.sleep(1.0)  # a has had time to notice
        events = watch_all(stub_for(ca), job.job_id)
    assert final.state == S.SUCCEEDED, final.error
    assert final.result["finish"] == "gw-b"
    check_events(events)
    done = runs(dramaturg_home, job.job_id)
    assert done.count("finish gw-b") == 1 and "finish gw-a" not in done
    assert "long-end gw-b" in done
    assert "no longer owned by 'gw-a'" in a.text() or "another gateway holds its lease" in a.text()
    assert a.proc is not None and a.proc.poll() is None  # a stopped the job, not itself


def watch_events_so_far(stub, job_id: str) -> list[gateway_pb2.JobEvent]:
    events = []
    call = stub.WatchJob(S.WatchJobRequest(job_id=job_id), metadata=AUTH, timeout=0.5)
    try:
        for event in call:
            events.append(event)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return events


@pytest.mark.parametrize("replicas", [300], indirect=True)  # 30 s of ticks: it must not finish
def test_cancelling_through_the_other_gateway_stops_the_stage(replicas: list[Replica],
                                                              dramaturg_home: Path) -> None:
    a, b = replicas
    with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
        job = stub_for(ca).SubmitJob(S.SubmitJobRequest(pipeline="slow", audio=wav_input()),
                                     metadata=AUTH, timeout=10)
        wait_progress(stub_for(cb), job.job_id, "long", 0.02)
        began = time.monotonic()
        answer = stub_for(cb).CancelJob(S.CancelJobRequest(job_id=job.job_id), metadata=AUTH, timeout=30)
        took = time.monotonic() - began
        assert answer.state == S.CANCELLED, answer
        stopped = stub_for(ca).GetJob(S.GetJobRequest(job_id=job.job_id), metadata=AUTH, timeout=5)
        ticks = [e for e in watch_all(stub_for(ca), job.job_id) if e.kind == S.STAGE_PROGRESS]
        time.sleep(1.0)
        later = [e for e in watch_all(stub_for(ca), job.job_id) if e.kind == S.STAGE_PROGRESS]
    assert took < LEASE + 2  # a saw the flag at its next lease round
    assert stopped.state == S.CANCELLED
    assert next(s for s in stopped.stages if s.name == "long").state == S.STAGE_CANCELLED
    assert len(later) == len(ticks)  # the stage stopped ticking on a
    assert "long-end gw-a" not in runs(dramaturg_home, job.job_id)


def test_a_gateway_whose_lease_was_taken_stops_at_its_next_write(dramaturg_home: Path, caplog) -> None:
    """Fencing alone, without the lease round's help: leases long enough that no renewal comes."""
    from replica_gateway import slow_pipeline
    from test_gateway import gateway

    gw = gateway(dramaturg_home, {"slow": slow_pipeline("gw-a", 100)}, lease_seconds=120, replica_id="gw-a")
    intruder = open_store(f"sqlite:///{dramaturg_home / 'gateway' / 'jobs.db'}")
    try:
        with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = stub_for(channel)
            job = stub.SubmitJob(S.SubmitJobRequest(pipeline="slow", audio=wav_input()), metadata=AUTH,
                                 timeout=10)
            wait_progress(stub, job.job_id, "long", 0.05)
            assert [c.job.job_id for c in intruder.claim("gw-b", 120, 10, force=True)] == [job.job_id]
            with caplog.at_level("WARNING", logger="dramaturg.services.gateway.engine"):
                wait_for(lambda: "this gateway stops running it" in caplog.text, timeout=10)
            count = len(intruder.events_after(job.job_id, 0))
            time.sleep(1.0)  # the stage would have reported progress 4 times since
            after = intruder.events_after(job.job_id, 0)
            current = intruder.get(job.job_id)
    finally:
        intruder.close()
    assert len(after) == count  # nothing written once the row named gw-b
    assert current.state == S.RUNNING  # gw-a neither failed nor cancelled b's job
    assert "no longer owned by 'gw-a' (gateway 'gw-b' holds it now)" in caplog.text
    assert "long-end gw-a" not in runs(dramaturg_home, job.job_id)
