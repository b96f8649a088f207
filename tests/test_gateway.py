"""The gateway over real gRPC: jobs, auth, bad input, cancel, restart-safety, remote stages with retries."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import tone_wav
from dramaturg.common.v1 import common_pb2
from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.catalog import PIPELINES
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.pipelines import PipelineSpec, StageSpec
from dramaturg.services.gateway.server import GatewayService
from dramaturg.shared.cli.stack import free_port
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc import errors
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.service import Service
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ServerThread, wait_for

TOKEN = "test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def gateway(home: Path, pipelines: dict | None = None, **settings) -> GatewayService:
    return GatewayService(
        GatewaySettings(api_token=TOKEN, retry_base_seconds=0.05, **settings), home=home, pipelines=pipelines
    )


def wav_input(**kw) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=tone_wav(**kw))


def wait_done(stub, job_id: str, timeout: float = 60) -> gateway_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), metadata=AUTH, timeout=5)
        if job.state in (gateway_pb2.SUCCEEDED, gateway_pb2.FAILED, gateway_pb2.CANCELLED):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        time.sleep(0.05)


def test_probe_job_runs_end_to_end_and_streams_progress(dramaturg_home: Path) -> None:
    with ServerThread(gateway(dramaturg_home)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        job = stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(pipeline="probe", audio=wav_input(seconds=3.0)),
            metadata=AUTH,
            timeout=10,
        )
        events = list(
            stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job.job_id), metadata=AUTH, timeout=60)
        )
        final = events[-1].job
        assert final.state == gateway_pb2.SUCCEEDED, final.error
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert {e.stage for e in events} >= {"decode", "loudness", "activity"}
        assert final.progress == pytest.approx(1.0)
        result = json_format.MessageToDict(final.result)
        assert result["duration_seconds"] == pytest.approx(3.0, abs=0.01)
        # the tone is on for 0.6 s of every second: activity must find that, not a constant
        assert result["speech_ratio"] == pytest.approx(0.6, abs=0.08)
        assert len(result["segments"]) == 3
        # a watch resumed after a sequence number only replays what came after
        tail = list(
            stub.WatchJob(
                gateway_pb2.WatchJobRequest(job_id=job.job_id, after_sequence=events[-3].sequence),
                metadata=AUTH,
                timeout=10,
            )
        )
        assert [e.sequence for e in tail] == [events[-2].sequence, events[-1].sequence]
        listed = stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=AUTH, timeout=5)
        assert [j.job_id for j in listed.jobs] == [job.job_id]
        pipelines = stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), metadata=AUTH, timeout=5)
        assert "probe" in [p.name for p in pipelines.pipelines]


def test_every_gateway_rpc_needs_the_token_but_health_does_not(dramaturg_home: Path) -> None:
    with ServerThread(gateway(dramaturg_home)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [
            lambda md: stub.SubmitJob(gateway_pb2.SubmitJobRequest(pipeline="probe"), metadata=md, timeout=5),
            lambda md: stub.GetJob(gateway_pb2.GetJobRequest(job_id="x"), metadata=md, timeout=5),
            lambda md: list(stub.WatchJob(gateway_pb2.WatchJobRequest(job_id="x"), metadata=md, timeout=5)),
            lambda md: stub.CancelJob(gateway_pb2.CancelJobRequest(job_id="x"), metadata=md, timeout=5),
            lambda md: stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=md, timeout=5),
            lambda md: stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), metadata=md, timeout=5),
        ]
        for call in calls:
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as denied:
                    call(metadata)
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "DRAMATURG_API_TOKEN" in denied.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_requests_get_actionable_errors(dramaturg_home: Path) -> None:
    with ServerThread(gateway(dramaturg_home)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        cases = [
            (gateway_pb2.SubmitJobRequest(pipeline="nope", audio=wav_input()), "pipeline", "probe"),
            (gateway_pb2.SubmitJobRequest(pipeline="probe"), "audio", "audio.content"),
            (
                gateway_pb2.SubmitJobRequest(
                    pipeline="probe", audio=common_pb2.AudioInput(content=b"not audio")
                ),
                "audio",
                "",
            ),
        ]
        for request, field_path, hint in cases:
            with pytest.raises(grpc.RpcError) as bad:
                stub.SubmitJob(request, metadata=AUTH, timeout=10)
            detail = details_from_error(bad.value)
            assert detail.code == grpc.StatusCode.INVALID_ARGUMENT, detail
            assert detail.field_violations and detail.field_violations[0][0].startswith(field_path)
            assert hint in detail.message
        request = gateway_pb2.SubmitJobRequest(pipeline="probe", audio=wav_input())
        request.params.update({"bogus": 1})
        with pytest.raises(grpc.RpcError) as bad:
            stub.SubmitJob(request, metadata=AUTH, timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bogus" in bad.value.details()
        request = gateway_pb2.SubmitJobRequest(pipeline="analyze_scene", audio=wav_input())
        request.params.update({"merge_gap_seconds": -1})
        with pytest.raises(grpc.RpcError) as bad:
            stub.SubmitJob(request, metadata=AUTH, timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "merge_gap_seconds" in bad.value.details() and "its own line" in bad.value.details()
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetJob(gateway_pb2.GetJobRequest(job_id="nope"), metadata=AUTH, timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as token:
            stub.ListJobs(gateway_pb2.ListJobsRequest(page_token="garbage"), metadata=AUTH, timeout=5)
        assert token.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_makes_submit_idempotent_and_lists_page(dramaturg_home: Path) -> None:
    with ServerThread(gateway(dramaturg_home)) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(pipeline="probe", audio=wav_input(), request_id="k1"),
            metadata=AUTH,
            timeout=10,
        )
        again = stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(pipeline="probe", audio=wav_input(), request_id="k1"),
            metadata=AUTH,
            timeout=10,
        )
        assert again.job_id == first.job_id
        ids = {first.job_id}
        for _ in range(4):
            ids.add(
                stub.SubmitJob(
                    gateway_pb2.SubmitJobRequest(pipeline="probe", audio=wav_input()),
                    metadata=AUTH,
                    timeout=10,
                ).job_id
            )
        seen, token = [], ""
        while True:
            page = stub.ListJobs(
                gateway_pb2.ListJobsRequest(page_size=2, page_token=token), metadata=AUTH, timeout=5
            )
            seen += [j.job_id for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == 5


# -- custom pipelines: slow stages, restarts, remote calls --------------------------------------------


class Gate:
    """Counts stage runs and can hold a stage until released."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.release = threading.Event()

    def stage(self, name: str, block: bool = False):
        async def run(ctx):
            self.calls[name] = self.calls.get(name, 0) + 1
            if block:
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
            return {"stage": name, "upstream": sorted(ctx.inputs)}

        return run


def slow_pipeline(gate: Gate) -> dict[str, PipelineSpec]:
    spec = PipelineSpec(
        name="slow",
        description="first fast, second waits for the test",
        stages=(
            StageSpec("first", gate.stage("first")),
            StageSpec("second", gate.stage("second", block=True), depends_on=("first",)),
        ),
        result=lambda outputs: {"done": sorted(outputs)},
    )
    return {**PIPELINES, "slow": spec}


def test_cancel_stops_a_running_job(dramaturg_home: Path) -> None:
    gate = Gate()
    with (
        ServerThread(gateway(dramaturg_home, slow_pipeline(gate))) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        job = stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(pipeline="slow", audio=wav_input()), metadata=AUTH, timeout=10
        )
        while gate.calls.get("second") != 1:
            time.sleep(0.02)
        cancelled = stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=job.job_id), metadata=AUTH, timeout=10)
        assert cancelled.state == gateway_pb2.CANCELLED
        assert {s.name: s.state for s in cancelled.stages} == {
            "first": gateway_pb2.STAGE_SUCCEEDED,
            "second": gateway_pb2.STAGE_CANCELLED,
        }
        with pytest.raises(grpc.RpcError) as again:
            stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=job.job_id), metadata=AUTH, timeout=10)
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_gateway_stopped_mid_job_resumes_it_on_start(dramaturg_home: Path) -> None:
    gate = Gate()
    with (
        ServerThread(gateway(dramaturg_home, slow_pipeline(gate))) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        job = stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(pipeline="slow", audio=wav_input()), metadata=AUTH, timeout=10
        )
        while gate.calls.get("second") != 1:
            time.sleep(0.02)
    # the first gateway is gone with the job RUNNING in its store
    gate.release.set()
    with (
        ServerThread(gateway(dramaturg_home, slow_pipeline(gate))) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        final = wait_done(gateway_pb2_grpc.GatewayStub(channel), job.job_id)
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    assert gate.calls == {"first": 1, "second": 2}  # the finished stage kept its output; the other re-ran
    assert json_format.MessageToDict(final.result) == {"done": ["first", "second"]}


class FlakyEvaluator(evaluator_pb2_grpc.EvaluatorServicer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def ListDimensions(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            raise errors.resource_exhausted("busy", retry_after_seconds=0.05)
        return evaluator_pb2.ListDimensionsResponse(dimensions=["pitch_variation", "dynamic_range"])


class FlakyService(Service):
    name = "evaluator"

    def __init__(self, servicer: FlakyEvaluator) -> None:
        self.servicer = servicer

    def registrations(self):
        name = evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"].full_name
        return [Registration(name, evaluator_pb2_grpc.add_EvaluatorServicer_to_server, self.servicer)]


async def remote_stage(ctx):
    stub = evaluator_pb2_grpc.EvaluatorStub(ctx.channel("evaluator"))
    reply = await stub.ListDimensions(evaluator_pb2.ListDimensionsRequest(), timeout=5)
    return {"dimensions": list(reply.dimensions)}


def remote_pipeline(attempts: int) -> dict[str, PipelineSpec]:
    spec = PipelineSpec(
        name="remote",
        description="calls the evaluator over gRPC",
        stages=(StageSpec("dims", remote_stage, service="evaluator", max_attempts=attempts),),
        result=lambda outputs: outputs["dims"],
    )
    return {"remote": spec}


@pytest.mark.parametrize(
    ("failures", "attempts", "expected"),
    [
        (2, 3, gateway_pb2.SUCCEEDED),
        (5, 2, gateway_pb2.FAILED),
    ],
)
def test_remote_stages_retry_resource_exhausted(dramaturg_home: Path, failures, attempts, expected) -> None:
    flaky = FlakyEvaluator(failures)
    with ServerThread(FlakyService(flaky)) as model:
        gw = gateway(dramaturg_home, remote_pipeline(attempts), services={"evaluator": model.target})
        with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            job = stub.SubmitJob(
                gateway_pb2.SubmitJobRequest(pipeline="remote", audio=wav_input()), metadata=AUTH, timeout=10
            )
            final = wait_done(stub, job.job_id)
    assert final.state == expected
    assert final.stages[0].attempts == min(failures + 1, attempts)
    if expected == gateway_pb2.SUCCEEDED:
        assert json_format.MessageToDict(final.result) == {"dimensions": ["pitch_variation", "dynamic_range"]}
    else:
        assert "RESOURCE_EXHAUSTED" in final.error


def test_a_service_that_is_down_is_waited_for_without_spending_attempts(dramaturg_home: Path) -> None:
    """The evaluator is down when the stage starts (killed, restarting) and comes back 1.5 s later on
    its address: the stage keeps retrying UNAVAILABLE within the patience, then succeeds — with one
    attempt allowed for errors of the work itself."""
    port = free_port()
    gw = gateway(dramaturg_home, remote_pipeline(1), services={"evaluator": f"127.0.0.1:{port}"})
    with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(pipeline="remote", audio=wav_input()),
                             metadata=AUTH, timeout=10)
        time.sleep(1.5)
        settings = ServerSettings(port=port, drain_notice_seconds=0.0, drain_grace_seconds=1.0)
        with ServerThread(FlakyService(FlakyEvaluator(0)), settings=settings):
            final = wait_done(stub, job.job_id, timeout=60)
        watch = gateway_pb2.WatchJobRequest(job_id=job.job_id)
        events = list(stub.WatchJob(watch, metadata=AUTH, timeout=10))
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    assert final.stages[0].attempts > 1  # several tries while it was down, none counted against the 1
    waits = [e.message for e in events if e.kind == gateway_pb2.LOG]
    assert waits and all("UNAVAILABLE" in m and "patience 300s" in m for m in waits)
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))  # every event once, in order


def test_a_service_down_past_the_patience_fails_the_stage(dramaturg_home: Path) -> None:
    gw = gateway(dramaturg_home, remote_pipeline(3), services={"evaluator": f"127.0.0.1:{free_port()}"},
                 service_down_patience_seconds=0.5)
    with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(pipeline="remote", audio=wav_input()),
                             metadata=AUTH, timeout=10)
        final = wait_done(stub, job.job_id, timeout=60)
    assert final.state == gateway_pb2.FAILED and "UNAVAILABLE" in final.error


def test_unconfigured_service_fails_the_stage_with_a_fix(dramaturg_home: Path) -> None:
    with (
        ServerThread(gateway(dramaturg_home, remote_pipeline(3))) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = gateway_pb2_grpc.GatewayStub(ch)
        job = stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(pipeline="remote", audio=wav_input()), metadata=AUTH, timeout=10
        )
        final = wait_done(stub, job.job_id)
    assert final.state == gateway_pb2.FAILED
    assert "services.evaluator" in final.error and final.stages[0].attempts == 1


def test_pending_queue_is_bounded(dramaturg_home: Path) -> None:
    gate = Gate()
    gw = gateway(dramaturg_home, slow_pipeline(gate), max_running_jobs=1, max_pending_jobs=1)
    with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        submit = gateway_pb2.SubmitJobRequest(pipeline="slow", audio=wav_input())
        stub.SubmitJob(submit, metadata=AUTH, timeout=10)  # runs (blocks in "second")
        while gate.calls.get("second") != 1:
            time.sleep(0.02)
        stub.SubmitJob(submit, metadata=AUTH, timeout=10)  # waits for a slot
        with pytest.raises(grpc.RpcError) as full:
            stub.SubmitJob(submit, metadata=AUTH, timeout=10)
        detail = details_from_error(full.value)
        assert detail.code == grpc.StatusCode.RESOURCE_EXHAUSTED and detail.retry_after_seconds
        gate.release.set()


def test_tls_when_certificates_are_configured(dramaturg_home: Path, tmp_path: Path) -> None:
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = ServerSettings(port=0, drain_notice_seconds=0, tls_cert_file=str(cert), tls_key_file=str(key))
    service = GatewayService(GatewaySettings(api_token=TOKEN, server=server), home=dramaturg_home)
    with ServerThread(service, server) as srv:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as channel:
            reply = gateway_pb2_grpc.GatewayStub(channel).ListPipelines(
                gateway_pb2.ListPipelinesRequest(), metadata=AUTH, timeout=10
            )
            assert "probe" in [p.name for p in reply.pipelines]
        with grpc.insecure_channel(srv.target) as plain, pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GatewayStub(plain).ListPipelines(
                gateway_pb2.ListPipelinesRequest(), metadata=AUTH, timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_the_gateway_and_health(dramaturg_home: Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with ServerThread(gateway(dramaturg_home)) as srv, grpc.insecure_channel(srv.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"dramaturg.gateway.v1.Gateway", "grpc.health.v1.Health"} <= services


def test_cancelling_a_job_cancels_its_stage_requests_in_the_service(dramaturg_home: Path) -> None:
    """A stage fans four Evaluate requests out to a real evaluator whose model thread is busy; the
    job is cancelled: the evaluator sees every request cancelled (its own metrics) and scores none."""
    from dramaturg.services.evaluator.config import EvaluatorSettings
    from dramaturg.services.evaluator.server import EvaluatorService
    from dramaturg.services.gateway.pipelines import fan_out
    from hostile import speechlike, wav
    from prometheus_client import REGISTRY
    from test_evaluator_server import CONTEXT, hold_model_thread, publish_tiny

    publish_tiny(dramaturg_home)
    audio = common_pb2.AudioInput(content=wav(speechlike(1.0, seed=3)))
    labels = {"grpc_type": "unary", "grpc_service": "dramaturg.evaluator.v1.Evaluator",
              "grpc_method": "Evaluate"}

    def count(name: str, **extra: str) -> float:
        return REGISTRY.get_sample_value(name, {**labels, **extra}) or 0.0

    async def score_four(ctx):
        stub = evaluator_pb2_grpc.EvaluatorStub(ctx.channel("evaluator"))
        request = evaluator_pb2.EvaluateRequest(audio=audio, rubric=evaluator_pb2.REALISM, context=CONTEXT)
        replies = await fan_out(ctx, [0, 1, 2, 3], lambda _: stub.Evaluate(request, timeout=60), "scored")
        return {"n": len(replies)}

    spec = PipelineSpec(name="four", description="four Evaluate requests at once",
                        stages=(StageSpec("score", score_four, service="evaluator"),),
                        result=lambda outputs: outputs["score"])
    evaluator = EvaluatorService(EvaluatorSettings(max_waiting=8), home=dramaturg_home)
    with ServerThread(evaluator) as model:
        release = hold_model_thread(evaluator)
        started, cancelled = count("grpc_server_started_total"), count("grpc_server_handled_total",
                                                                        grpc_code="CANCELLED")
        scored = REGISTRY.get_sample_value("dramaturg_audio_seconds_total",
                                           {"service": "evaluator", "method": "Evaluate"}) or 0.0
        gw = gateway(dramaturg_home, {"four": spec}, services={"evaluator": model.target})
        with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(pipeline="four", audio=wav_input()),
                                 metadata=AUTH, timeout=10)
            wait_for(lambda: count("grpc_server_started_total") - started >= 4, what="the requests to arrive")
            cancel = gateway_pb2.CancelJobRequest(job_id=job.job_id)
            final = stub.CancelJob(cancel, metadata=AUTH, timeout=10)
            # the three waiting for the model slot leave at once; the one holding it stops at its next
            # check, when the model thread is free again — before any scoring
            wait_for(lambda: count("grpc_server_handled_total", grpc_code="CANCELLED") - cancelled >= 3,
                     what="the queued requests to be cancelled")
        release.set()
        wait_for(lambda: count("grpc_server_handled_total", grpc_code="CANCELLED") - cancelled >= 4,
                 what="the running request to stop")
        after = REGISTRY.get_sample_value("dramaturg_audio_seconds_total",
                                          {"service": "evaluator", "method": "Evaluate"}) or 0.0
    assert final.state == gateway_pb2.CANCELLED
    assert final.stages[0].state == gateway_pb2.STAGE_CANCELLED
    assert after == scored  # no evaluation was completed for the cancelled job
