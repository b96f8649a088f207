"""The shared server bootstrap, in process: health, reflection, metrics, error details, drain, limits."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest
from dramaturg.common.v1 import common_pb2
from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from dramaturg.shared import metrics
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc import errors
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.service import Service
from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from helpers import ServerThread
from hostile import assert_clear_status
from prometheus_client import REGISTRY

EVALUATOR = evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"].full_name
#: 40,000 bytes of 4-byte characters: 120,000 once percent-encoded in grpc-message.
HUGE = "🎭" * 10_000
TTS = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name


class FakeEvaluator(evaluator_pb2_grpc.EvaluatorServicer):
    """Exercises the interceptor: each request id picks a behaviour."""

    async def Evaluate(self, request, context):
        if request.request_id == "boom":
            raise RuntimeError("model exploded")
        if request.request_id == "busy":
            raise errors.resource_exhausted("queue is full", retry_after_seconds=1.5)
        if request.request_id == "echoes-everything":  # a careless error that quotes unbounded input
            raise errors.ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "text: " + HUGE,
                metadata={f"key{i}-{HUGE}": HUGE for i in range(20)},
                field_violations=[(f"text[{i}]", HUGE) for i in range(64)],
                retry_after_seconds=2.0,
            )
        if request.request_id.startswith("slow"):
            await asyncio.sleep(1.0)
        if not request.audio.WhichOneof("source"):
            raise errors.invalid_argument("audio", "set audio.content or audio.uri")
        return evaluator_pb2.EvaluateResponse(
            request_id=request.request_id,
            scores=[
                evaluator_pb2.DimensionScore(dimension="pitch_variation", score=len(request.audio.content))
            ],
        )

    async def ListDimensions(self, request, context):
        return evaluator_pb2.ListDimensionsResponse(dimensions=["pitch_variation"])


class FakeTts(tts_pb2_grpc.TextToSpeechServicer):
    async def SynthesizeOnline(self, request, context):
        if not request.text:
            raise errors.invalid_argument("text", "empty text; send the line to speak")
        for i in range(3):
            yield tts_pb2.SynthesizeOnlineResponse(sequence=i, audio_chunk=b"\0" * 320, is_final=i == 2)


class FakeService(Service):
    name = "fake"

    def __init__(self, load_gate: threading.Event | None = None) -> None:
        self.load_gate = load_gate

    def registrations(self):
        return [
            Registration(EVALUATOR, evaluator_pb2_grpc.add_EvaluatorServicer_to_server, FakeEvaluator()),
            Registration(TTS, tts_pb2_grpc.add_TextToSpeechServicer_to_server, FakeTts()),
        ]

    async def start(self) -> None:
        if self.load_gate is not None:  # a slow model load
            await asyncio.to_thread(self.load_gate.wait, 30)


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_health_is_serving_only_after_the_model_loaded() -> None:
    gate = threading.Event()
    with ServerThread(FakeService(gate), wait_ready=False) as srv:
        assert _health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(srv.target, EVALUATOR) == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        deadline = time.monotonic() + 20
        while _health(srv.target, EVALUATOR) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "never became SERVING"
            time.sleep(0.05)
        assert _health(srv.target, TTS) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_mounted_service() -> None:
    with ServerThread(FakeService()) as srv, grpc.insecure_channel(srv.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {EVALUATOR, TTS, "grpc.health.v1.Health"} <= services
        method = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(EVALUATOR)
        assert method.package == "dramaturg.evaluator.v1"


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_errors_carry_status_and_details_and_are_counted() -> None:
    labels = {"grpc_type": "unary", "grpc_service": EVALUATOR, "grpc_method": "Evaluate"}
    before_invalid = _sample("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **labels)
    before_ok = _sample("grpc_server_handled_total", grpc_code="OK", **labels)
    with ServerThread(FakeService()) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = evaluator_pb2_grpc.EvaluatorStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Evaluate(evaluator_pb2.EvaluateRequest(request_id="r1"), timeout=5)
        detail = details_from_error(bad.value)
        assert detail.code == grpc.StatusCode.INVALID_ARGUMENT
        assert detail.field_violations == [("audio", "set audio.content or audio.uri")]

        with pytest.raises(grpc.RpcError) as busy:
            stub.Evaluate(evaluator_pb2.EvaluateRequest(request_id="busy"), timeout=5)
        detail = details_from_error(busy.value)
        assert detail.code == grpc.StatusCode.RESOURCE_EXHAUSTED and detail.retry_after_seconds == 1.5

        with pytest.raises(grpc.RpcError) as boom:
            stub.Evaluate(evaluator_pb2.EvaluateRequest(request_id="boom"), timeout=5)
        assert boom.value.code() == grpc.StatusCode.INTERNAL
        assert "boom" in boom.value.details() and "model exploded" not in boom.value.details()

        reply, call = stub.Evaluate.with_call(
            evaluator_pb2.EvaluateRequest(request_id="ok", audio=common_pb2.AudioInput(content=b"abc")),
            metadata=(("x-request-id", "trace-42"),),
            timeout=5,
        )
        assert reply.scores[0].score == 3
        assert ("x-request-id", "trace-42") in tuple(call.initial_metadata())
    assert _sample("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **labels) == before_invalid + 1
    assert _sample("grpc_server_handled_total", grpc_code="OK", **labels) == before_ok + 1
    assert _sample("grpc_server_handling_seconds_count", **labels) >= 4


def test_clip_bounds_bytes_on_character_boundaries() -> None:
    assert errors.clip("short", 64) == "short"
    for text in ("a" * 5000, "é" * 5000, HUGE, "a" + HUGE):
        clipped = errors.clip(text, 300)
        assert len(clipped.encode()) <= 300  # encodes: no half character was left behind
        assert clipped.endswith(f"[cut, {len(text.encode())} bytes in all]")
        assert text.startswith(clipped[:10])


def test_echo_keeps_both_ends_and_says_how_long() -> None:
    assert errors.echo("alice\x00") == "'alice\\x00'"
    quoted = errors.echo("start" + "x" * 10_000 + "end.wav")
    assert quoted.startswith("'start") and "end.wav'" in quoted and "(10012 characters)" in quoted
    assert len(quoted) < 100
    assert len(errors.not_found("voice", HUGE).message.encode()) < 300


def test_status_details_are_bounded_whatever_the_error_holds() -> None:
    error = errors.ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        HUGE,
        reason="R" * 500,
        metadata={f"k{i}": HUGE for i in range(50)},
        field_violations=[(f"audio[{i}]" + HUGE, HUGE) for i in range(64)],
        retry_after_seconds=1.0,
    )
    assert len(error.message.encode()) <= errors.MAX_MESSAGE_BYTES  # the log line is bounded too
    status = error.to_status_proto()
    assert status.ByteSize() <= errors.MAX_DETAILS_BYTES
    assert len(status.message.encode()) <= errors.MAX_MESSAGE_BYTES
    grpc_status = error.to_grpc_status()
    assert grpc_status.code == grpc.StatusCode.INVALID_ARGUMENT
    # the first violation survives (clipped), and ErrorInfo says what the budget left out
    unpacked = {d.type_url.rsplit(".", 1)[-1]: d for d in status.details}
    assert {"ErrorInfo", "BadRequest", "RetryInfo"} <= set(unpacked)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    unpacked["ErrorInfo"].Unpack(info)
    unpacked["BadRequest"].Unpack(bad)
    assert bad.field_violations[0].field.startswith("audio[0]")
    assert len(info.reason.encode()) <= errors.MAX_REASON_BYTES
    assert "left out" in info.metadata[errors.TRUNCATED_KEY]
    # small errors are untouched
    small = errors.invalid_argument("audio", "set audio.content").to_status_proto()
    assert small.message == "audio: set audio.content"
    small_info = error_details_pb2.ErrorInfo()
    small.details[0].Unpack(small_info)
    assert dict(small_info.metadata) == {}


def test_an_error_quoting_huge_input_still_reaches_the_client() -> None:
    """Unbounded trailers once made the client drop the status (its metadata limit is 8-16 KiB)."""
    with ServerThread(FakeService()) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = evaluator_pb2_grpc.EvaluatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(evaluator_pb2.EvaluateRequest(request_id="echoes-everything"), timeout=5)
        detail = assert_clear_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, "text[0]")
        assert detail.message.startswith("text: 🎭") and detail.retry_after_seconds == 2.0
        assert errors.TRUNCATED_KEY in detail.metadata


def test_server_streaming_is_intercepted_too() -> None:
    labels = {"grpc_type": "server_stream", "grpc_service": TTS, "grpc_method": "SynthesizeOnline"}
    sent_before = _sample("grpc_server_msg_sent_total", **labels)
    with ServerThread(FakeService()) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        chunks = list(stub.SynthesizeOnline(tts_pb2.SynthesizeRequest(text="hello"), timeout=5))
        assert [c.sequence for c in chunks] == [0, 1, 2] and chunks[-1].is_final
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.SynthesizeOnline(tts_pb2.SynthesizeRequest(text=""), timeout=5))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _sample("grpc_server_msg_sent_total", **labels) == sent_before + 3
    assert _sample("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **labels) >= 1


def test_audio_sized_messages_pass_the_default_4mib_limit() -> None:
    payload = b"\1" * (10 * 1024 * 1024)
    with ServerThread(FakeService()) as srv:
        from dramaturg.shared.grpc.server import channel_options

        with grpc.insecure_channel(srv.target, options=channel_options(64 * 1024 * 1024)) as channel:
            reply = evaluator_pb2_grpc.EvaluatorStub(channel).Evaluate(
                evaluator_pb2.EvaluateRequest(audio=common_pb2.AudioInput(content=payload)), timeout=30
            )
    assert reply.scores[0].score == len(payload)


def test_drain_finishes_in_flight_work_and_says_not_serving() -> None:
    srv = ServerThread(
        FakeService(), ServerSettings(port=0, drain_notice_seconds=1.0, drain_grace_seconds=5.0)
    )
    with srv:
        channel = grpc.insecure_channel(srv.target)
        stub = evaluator_pb2_grpc.EvaluatorStub(channel)
        future = stub.Evaluate.future(
            evaluator_pb2.EvaluateRequest(request_id="slow-1", audio=common_pb2.AudioInput(content=b"x")),
            timeout=10,
        )
        time.sleep(0.3)  # the RPC is in flight
        stopping = threading.Thread(target=srv.call, args=(srv.server.stop(),))
        stopping.start()
        time.sleep(0.2)  # within the drain notice: still answering, but NOT_SERVING
        assert _health(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert future.result(timeout=10).scores[0].score == 1  # finished, not cut off
        stopping.join(15)
        with pytest.raises(grpc.RpcError):
            stub.ListDimensions(evaluator_pb2.ListDimensionsRequest(), timeout=2)
        channel.close()


def test_metrics_endpoint_shows_grpc_and_gpu_families() -> None:
    port = metrics.start_metrics_server(0, "127.0.0.1")
    with ServerThread(FakeService()) as srv, grpc.insecure_channel(srv.target) as channel:
        evaluator_pb2_grpc.EvaluatorStub(channel).ListDimensions(
            evaluator_pb2.ListDimensionsRequest(), timeout=5
        )
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in (
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "dramaturg_gpu_available",
        "dramaturg_gpu_count",
    ):
        assert family in text, family
    collector = metrics.register_gpu_collector()
    expected = "1.0" if collector.available else "0.0"
    assert f"dramaturg_gpu_available {expected}" in text
