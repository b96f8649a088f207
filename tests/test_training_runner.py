"""The shared training runner: worker subprocesses, events, cancel, crash recovery, and the gRPC servicer.

Each worker imports torch (a few seconds on a slow core), so the tests start as few as they can.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from dramaturg.shared import registry
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import LazyRecipe, TrainingRunner, recipes_with_presets
from dramaturg.shared.training.metrics import TrainingCollector
from dramaturg.shared.training.runs import process_alive, process_start_time
from dramaturg.shared.training.servicer import TrainingServicer
from dramaturg.training.v1 import training_pb2, training_pb2_grpc
from google.protobuf import struct_pb2
from helpers import wait_for
from prometheus_client import CollectorRegistry
from rich.console import Console

try:
    import training_fixtures
except ImportError:  # tests/ imported as a package
    from tests import training_fixtures  # type: ignore[no-redef]

SERVICE = "toy"
RECIPES = f"{training_fixtures.__name__}:RECIPES"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[SimpleNamespace]:
    root = tmp_path / "state"
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "train.lst").write_text("x\n")
    store = ModelStore(root)
    runners: list[TrainingRunner] = []

    def make(**kwargs: Any) -> TrainingRunner:
        runner = TrainingRunner(root, SERVICE, RECIPES, store, **{"grace_seconds": 5.0, **kwargs})
        runners.append(runner)
        return runner

    yield SimpleNamespace(root=root, dataset=str(dataset), store=store, make=make)
    for runner in runners:
        runner.close(timeout=5.0)




def test_toy_run_succeeds_inline(env: SimpleNamespace) -> None:
    runner = env.make()
    out = io.StringIO()
    final = runner.run_inline("toy-linear", env.dataset, {"steps": 40}, output_model="toy",
                              request_id="req-1", console=Console(file=out, width=120))
    assert final.state == "SUCCEEDED", final.error
    assert final.attempts == 1 and final.step == 40 and final.total_steps == 40
    assert "SUCCEEDED" in out.getvalue()

    events = runner.events(final.run_id)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    states = [e["state"] for e in events if e["type"] == "state"]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]

    # what Prometheus scrapes (shared/training/metrics.py): the run's own run.json, read at scrape time
    registry = CollectorRegistry()
    collector = TrainingCollector()
    collector.add(runner)
    registry.register(collector)
    labels = {"service": SERVICE, "run_id": final.run_id, "recipe": "toy-linear"}
    assert registry.get_sample_value("dramaturg_training_steps_total", labels) == 40
    assert registry.get_sample_value("dramaturg_training_progress_ratio", labels) == 1.0
    loss = registry.get_sample_value("dramaturg_training_metric", {**labels, "name": "loss/train"})
    assert loss == pytest.approx(final.metrics["loss/train"])
    def runs(state: str) -> float | None:
        return registry.get_sample_value("dramaturg_training_runs", {"service": SERVICE, "state": state})

    assert (runs("SUCCEEDED"), runs("RUNNING"), runs("FAILED")) == (1, 0, 0)
    collector.recent_seconds = 0.0  # finished runs leave the per-run families; the counts stay
    time.sleep(0.01)
    assert registry.get_sample_value("dramaturg_training_steps_total", labels) is None
    assert runs("SUCCEEDED") == 1
    losses = [e["values"]["loss/train"] for e in events if e["type"] == "metrics"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 10  # the loss falls
    assert list(final.log_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"

    checkpoints = runner.checkpoints(final.run_id)
    assert [c.step for c in checkpoints] == [20, 30, 40]  # keep_checkpoints=3 (best is the newest)
    assert checkpoints[-1].best

    model = env.store.resolve(SERVICE, "toy")
    assert final.published_model == model.ref == "toy:v1"
    assert model.recipe == "toy-linear" and model.architecture == "linear-1x1"
    assert model.labels["run_id"] == final.run_id and model.data_hash
    assert {"model.pt", "config.json"} <= set(model.files)

    # Idempotency: the same request id returns the same run; other parameters are refused.
    again = runner.start("toy-linear", env.dataset, {"steps": 40}, output_model="toy", request_id="req-1")
    assert again.run_id == final.run_id and again.state == "SUCCEEDED"
    with pytest.raises(ServiceError) as err:
        runner.start("toy-linear", env.dataset, {"steps": 41}, output_model="toy", request_id="req-1")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert len(runner.list()) == 1


def test_invalid_requests(env: SimpleNamespace) -> None:
    runner = env.make()
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"recipe": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "toy-linear"),
        ({"overrides": {"stepz": 3}}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
        ({"overrides": {"steps": 2.5}}, grpc.StatusCode.INVALID_ARGUMENT, "integer"),
        ({"dataset_uri": env.dataset + "/missing"}, grpc.StatusCode.NOT_FOUND, "missing"),
        ({"dataset_uri": ""}, grpc.StatusCode.INVALID_ARGUMENT, "dataset_uri"),
        ({"base_model": "ghost"}, grpc.StatusCode.NOT_FOUND, "ghost"),
    ]
    for change, code, text in cases:
        kwargs: dict[str, Any] = {"recipe": "toy-linear", "dataset_uri": env.dataset, **change}
        with pytest.raises(ServiceError) as err:
            runner.start(**kwargs)
        assert err.value.code == code, change
        assert text in err.value.message, (change, err.value.message)
    with pytest.raises(ServiceError) as err:
        runner.get("20990101-000000-abcdef")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert runner.list() == []


def test_failing_recipe_is_failed_with_its_error(env: SimpleNamespace) -> None:
    runner = env.make()
    run = runner.start("toy-fail", env.dataset, {"message": "no data"})
    final = runner.wait(run.run_id, timeout=30)
    assert final.state == "FAILED" and "ValueError: no data" in final.error
    assert final.attempts == 1  # a Python error is not retried
    logs = [e for e in runner.events(run.run_id) if e["type"] == "log" and e["level"] == "ERROR"]
    assert logs and "Traceback" in logs[0]["message"]


def test_cancel_stops_the_worker(env: SimpleNamespace) -> None:
    runner = env.make(grace_seconds=1.0)
    for ignore_cancel in (False, True):  # a cooperative recipe, then one the runner must SIGKILL
        run = runner.start("toy-sleep", env.dataset, {"ignore_cancel": ignore_cancel})
        wait_for(lambda run=run: runner.get(run.run_id).step > 0, 30, "the first step")
        running = runner.get(run.run_id)
        assert running.state == "RUNNING" and running.pid
        final = runner.cancel(run.run_id)
        assert final.state == "CANCELLED", ignore_cancel
        assert not process_alive(running.pid, running.pid_start_time)
        assert runner.cancel(run.run_id).state == "CANCELLED"  # idempotent
    assert [e["state"] for e in runner.events(run.run_id) if e["type"] == "state"][-1] == "CANCELLED"


def test_live_runner_restarts_a_killed_worker(env: SimpleNamespace) -> None:
    runner = env.make(grace_seconds=1.0)
    run = runner.start("toy-sleep", env.dataset, {"checkpoint_every": 5, "sleep": 0.01})
    wait_for(lambda: bool(runner.checkpoints(run.run_id)), 30, "a checkpoint")
    victim = runner.get(run.run_id)
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: runner.get(run.run_id).attempts == 2 and runner.get(run.run_id).state == "RUNNING",
              30, "the restart")
    restarted = runner.get(run.run_id)
    assert restarted.crashes == 1 and restarted.pid != victim.pid
    assert restarted.resumed_from is not None and restarted.resumed_from["step"] >= 5
    assert any("SIGKILL" in e.get("message", "") for e in runner.events(run.run_id))
    assert runner.cancel(run.run_id).state == "CANCELLED"


def test_sigkill_mid_run_then_recover_resumes_from_checkpoint(env: SimpleNamespace) -> None:
    first = env.make()
    run = first.start("toy-linear", env.dataset, {"steps": 60, "sleep": 0.03, "checkpoint_every": 10})
    wait_for(lambda: any(c.step >= 10 for c in first.checkpoints(run.run_id)), 60, "a checkpoint")
    victim = first.get(run.run_id)
    first.close(stop_workers=False)  # the server is gone too: nobody watches the worker any more
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(victim.pid, victim.pid_start_time), 10, "the worker to die")
    assert first.get(run.run_id).state == "RUNNING"  # what a crash leaves on disk

    second = env.make()
    assert second.recover() == [run.run_id]
    final = second.wait(run.run_id, timeout=60)
    assert final.state == "SUCCEEDED", final.error
    assert final.attempts == 2
    assert final.resumed_from is not None and final.resumed_from["step"] >= 10
    events = second.events(run.run_id)
    assert any("resuming from checkpoint" in e.get("message", "") for e in events)
    second_attempt = [e["step"] for e in events if e["type"] == "progress" and e["attempt"] == 2]
    assert second_attempt and min(second_attempt) > final.resumed_from["step"]  # not from zero
    assert env.store.resolve(SERVICE, "toy-linear").labels["run_id"] == run.run_id


def test_process_identity_survives_pid_reuse() -> None:
    me, started = os.getpid(), process_start_time(os.getpid())
    assert started is not None and process_alive(me, started)
    assert not process_alive(me, started + 1)  # same pid, another process: not our worker
    assert not process_alive(None) and not process_alive(2**22 + 12345)


def test_servicer_over_grpc(env: SimpleNamespace) -> None:
    runner = env.make()
    servicer = TrainingServicer(runner, poll_interval=0.05)

    async def scenario() -> None:
        with pytest.raises(ServiceError) as err:  # direct calls: errors are ServiceError for the interceptor
            await servicer.GetTraining(training_pb2.GetTrainingRequest(run_id="20990101-000000-abcdef"), None)
        assert err.value.code == grpc.StatusCode.NOT_FOUND

        server = grpc.aio.server()
        training_pb2_grpc.add_TrainingServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = training_pb2_grpc.TrainingStub(channel)
                recipes = await stub.ListRecipes(training_pb2.ListRecipesRequest())
                assert {r.name for r in recipes.recipes} == {"toy-linear", "toy-sleep", "toy-fail"}
                toy = next(r for r in recipes.recipes if r.name == "toy-linear")
                assert toy.defaults["steps"] == 40

                overrides = struct_pb2.Struct()
                overrides.update({"steps": 30, "sleep": 0.0})
                run = await stub.StartTraining(training_pb2.StartTrainingRequest(
                    request_id="grpc-1", recipe="toy-linear", dataset_uri=env.dataset, overrides=overrides,
                    output_model="toy-grpc"))
                assert run.state in (training_pb2.QUEUED, training_pb2.RUNNING) and run.attempts == 1
                queued = await stub.StartTraining(training_pb2.StartTrainingRequest(
                    request_id="grpc-2", recipe="toy-linear", dataset_uri=env.dataset))
                assert queued.state == training_pb2.QUEUED  # max_concurrent=1

                page = await stub.ListTrainings(training_pb2.ListTrainingsRequest(page_size=1))
                rest = await stub.ListTrainings(training_pb2.ListTrainingsRequest(
                    page_size=1, page_token=page.next_page_token))
                assert page.next_page_token and not rest.next_page_token
                assert [r.run_id for r in (*page.runs, *rest.runs)] == [queued.run_id, run.run_id]

                cancelled = await stub.CancelTraining(
                    training_pb2.CancelTrainingRequest(run_id=queued.run_id))
                assert cancelled.state == training_pb2.CANCELLED and cancelled.attempts == 0

                events = [e async for e in stub.WatchTraining(
                    training_pb2.WatchTrainingRequest(run_id=run.run_id))]
                assert events[-1].WhichOneof("event") == "state"
                assert events[-1].state == training_pb2.SUCCEEDED
                kinds = {e.WhichOneof("event") for e in events}
                assert {"state", "progress", "metrics", "checkpoint", "log"} <= kinds
                later = [e async for e in stub.WatchTraining(training_pb2.WatchTrainingRequest(
                    run_id=run.run_id, after_sequence=events[-3].sequence))]
                assert [e.sequence for e in later] == [e.sequence for e in events[-2:]]

                checkpoints = await stub.ListCheckpoints(
                    training_pb2.ListCheckpointsRequest(run_id=run.run_id))
                assert [c.step for c in checkpoints.checkpoints] == [10, 20, 30]
                assert any(c.best for c in checkpoints.checkpoints)

                activated = await stub.ActivateCheckpoint(training_pb2.ActivateCheckpointRequest(
                    run_id=run.run_id, model_name="toy-activated", load=True))
                info = activated.model
                assert info.ref.name == "toy-activated" and info.ref.version == "v1" and info.is_default
                record = env.store.resolve(SERVICE, (info.ref.name, info.ref.version))
                assert (record.path / "model.pt").exists() and not (record.path / "trainer_state").exists()
                assert record.labels["run_id"] == run.run_id and record.recipe == "toy-linear"

                done = await stub.GetTraining(training_pb2.GetTrainingRequest(run_id=run.run_id))
                assert done.state == training_pb2.SUCCEEDED and done.step == 30
                assert done.output_model.name == "toy-activated"  # the latest publication of the run
                assert done.overrides["steps"] == 30 and done.metrics["loss/train"] < 0.1
                assert done.log_dir.endswith("tensorboard") and done.finished_at.seconds > 0
        finally:
            await server.stop(None)

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ recipes and presets

HEAVY_MODULES = ("torch", "transformers", "lightning", "pyannote.audio", "speechbrain", "trl", "peft")


@pytest.mark.parametrize("service", registry.model_services())
def test_a_services_recipes_load_without_the_training_frameworks(service: str) -> None:
    """The server lists and validates recipes: importing them (and their presets) must not load torch."""
    path = registry.recipes_path(service)
    code = (
        "import sys; from dramaturg.shared.training import load_recipes; "
        f"recipes = load_recipes({path!r}); assert recipes, 'no recipes'; "
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{path} imports {out.stdout.strip()}"


RAN: list[Any] = []


def _train(ctx: Any) -> None:
    """A LazyRecipe's target (imported by name when the recipe runs)."""
    RAN.append(ctx)


def test_presets_derive_from_base_recipes(tmp_path: Path) -> None:
    base = LazyRecipe("fit", "the base", {"lr": 0.1, "steps": 10, "note": ""}, f"{__name__}:_train",
                      architecture="toy")
    (tmp_path / "quick.yaml").write_text("recipe: fit\noverrides: {steps: 2.0}\ndataset: synthetic\n")
    (tmp_path / "slow.yaml").write_text("recipe: fit\ndescription: long\noverrides: {lr: 0.01}\n")
    recipes = recipes_with_presets([base], tmp_path)
    assert list(recipes) == ["fit", "quick", "slow"]
    quick = recipes["quick"]
    assert quick.defaults == {"lr": 0.1, "steps": 2, "note": ""} and quick.description == "fit (quick.yaml)"
    assert quick.architecture == "toy" and quick.target == base.target
    assert recipes["slow"].description == "long" and recipes["slow"].defaults["lr"] == 0.01
    assert "keep_checkpoints" not in quick.defaults  # the runner adds its own keys
    quick.run("a context")
    assert RAN == ["a context"]

    (tmp_path / "typo.yaml").write_text("recipe: fit\noverrides: {stpes: 3}\n")
    with pytest.raises(ServiceError, match="stpes"):
        recipes_with_presets([base], tmp_path)
    (tmp_path / "typo.yaml").write_text("recipe: fitt\n")
    with pytest.raises(ValueError, match="must name one of fit"):
        recipes_with_presets([base], tmp_path)
    (tmp_path / "typo.yaml").unlink()
    (tmp_path / "fit.yaml").write_text("recipe: fit\n")
    with pytest.raises(ValueError, match="would replace"):
        recipes_with_presets([base], tmp_path)
