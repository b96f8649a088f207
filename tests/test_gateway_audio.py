"""How a job's audio reaches the model services: decoded once into a blob, sent by URI or inline.

The model services here are stand-ins that decode what they are sent exactly as the real ones do
(shared/audio.py, by URI only under the blob root) and "identify" a line by its tone, so a crop cut
at the wrong place names the wrong voice. Their gRPC servers take at most 256 KiB per message, so a
10 s scene (320 KB as 16 kHz WAV) is over the inline limit.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.engine import LEGACY_INPUT_FILE, message_too_large, retry_after
from dramaturg.services.gateway.server import GatewayService
from dramaturg.shared import audio as audio_io
from dramaturg.shared.blobs import default_blob_root
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.service import Service
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
from google.protobuf import json_format
from helpers import ServerThread

TOKEN = "t"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
RATE = 16_000
LIMIT = 256 * 1024  # the stand-in services' server.max_message_bytes
# (start, end, Hz): two characters, one low voice and one high one, in a 10 s scene
LINES = ((0.5, 3.0, 220.0), (4.0, 7.5, 660.0), (8.0, 9.9, 220.0))


def scene_wav(seconds: float = 10.0, lines=LINES, rate: int = 44_100) -> bytes:
    """A scene at the client's rate (the gateway resamples it once, at submit)."""
    t = np.arange(int(seconds * rate)) / rate
    x = np.random.default_rng(0).normal(0, 1e-3, len(t))
    for start, end, freq in lines:
        on = (t >= start) & (t < end)
        x[on] += 0.3 * np.sin(2 * np.pi * freq * t[on])
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def voice_of(samples: np.ndarray) -> str:
    spectrum = np.abs(np.fft.rfft(samples))
    peak = float(np.fft.rfftfreq(len(samples), 1 / RATE)[int(np.argmax(spectrum))])
    return "low" if peak < 440 else "high"


class Calls:
    """What the stand-in services were sent, and the lines the diarization stand-in finds."""

    def __init__(self) -> None:
        self.diarize: list[dict] = []
        self.identify: list[dict] = []
        self.lines = LINES


def _decode(audio: common_pb2.AudioInput) -> audio_io.Audio:
    limits = audio_io.AudioLimits(allowed_uri_roots=[default_blob_root()])
    return audio_io.decode_audio_input(audio, target_rate=RATE, limits=limits)


class FakeDiarization(diarization_pb2_grpc.DiarizationServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Diarize(self, request, context):
        audio = _decode(request.audio)
        self.calls.diarize.append(
            {
                "source": request.audio.WhichOneof("source"),
                "seconds": audio.duration,
                "bytes": request.ByteSize(),
            }
        )
        turns = [
            common_pb2.SpeakerTurn(
                span=common_pb2.TimeSpan(start=a, end=b), speaker=f"SPK_{f:.0f}", confidence=1
            )
            for a, b, f in self.calls.lines
        ]
        return diarization_pb2.DiarizeResponse(
            turns=turns,
            exclusive_turns=turns,
            rttm="RTTM",
            speakers=sorted({t.speaker for t in turns}),
            model=common_pb2.ModelRef(name="fake", version="v1"),
        )


class FakeSpeaker(speaker_pb2_grpc.SpeakerServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Identify(self, request, context):
        audio = _decode(request.audio)
        self.calls.identify.append(
            {
                "source": request.audio.WhichOneof("source"),
                "seconds": audio.duration,
                "bytes": request.ByteSize(),
                "spans": [(s.start, s.end) for s in request.segments],
            }
        )
        results = []
        for i, span in enumerate(request.segments):
            voice = voice_of(audio_io.crop(audio, span, field=f"segments[{i}]").samples)
            results.append(
                speaker_pb2.SegmentIdentification(
                    span=span, candidates=[speaker_pb2.VoiceScore(voice_id=voice, score=0.9)], voice_id=voice
                )
            )
        return speaker_pb2.IdentifyResponse(
            results=results, threshold=0.5, model=common_pb2.ModelRef(name="fake", version="v1")
        )


class FakeModels(Service):
    name = "fake-models"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def registrations(self) -> list[Registration]:
        return [
            Registration(
                diarization_pb2.DESCRIPTOR.services_by_name["Diarization"].full_name,
                diarization_pb2_grpc.add_DiarizationServicer_to_server,
                FakeDiarization(self.calls),
            ),
            Registration(
                speaker_pb2.DESCRIPTOR.services_by_name["Speaker"].full_name,
                speaker_pb2_grpc.add_SpeakerServicer_to_server,
                FakeSpeaker(self.calls),
            ),
        ]


def models_server(calls: Calls) -> ServerThread:
    settings = ServerSettings(
        port=0, drain_notice_seconds=0.0, drain_grace_seconds=2.0, max_message_bytes=LIMIT
    )
    return ServerThread(FakeModels(calls), settings)


def gateway(home: Path, target: str, **settings) -> GatewayService:
    return GatewayService(
        GatewaySettings(
            api_token=TOKEN,
            retry_base_seconds=0.05,
            services={"diarization": target, "speaker": target},
            **settings,
        ),
        home=home,
    )


def submit(stub, pipeline: str, content: bytes, **params) -> gateway_pb2.Job:
    request = gateway_pb2.SubmitJobRequest(
        pipeline=pipeline, audio=common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
    )
    if params:
        request.params.update(params)
    return stub.SubmitJob(request, metadata=AUTH, timeout=30)


def run_job(stub, job_id: str) -> tuple[gateway_pb2.Job, dict[str, int]]:
    """The finished job and each stage's attempts, counted from its events."""
    events = list(stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job_id), metadata=AUTH, timeout=120))
    attempts: dict[str, int] = {}
    for event in events:
        if event.kind == gateway_pb2.STAGE_STATE_CHANGED and event.message.startswith("attempt "):
            attempts[event.stage] = attempts.get(event.stage, 0) + 1
    retried = [e.message for e in events if e.kind == gateway_pb2.LOG and "retrying" in e.message]
    assert not retried, retried
    return events[-1].job, attempts


def blobs(home: Path) -> list[Path]:
    return sorted(p for p in (default_blob_root(home) / "sha256").rglob("*") if p.is_file())


def test_a_scene_over_the_inline_limit_runs_by_uri_and_bad_audio_is_refused_at_submit(
    dramaturg_home: Path,
) -> None:
    calls = Calls()
    content = scene_wav()
    assert len(content) > LIMIT  # inline, this scene could not reach the services at all
    with (
        models_server(calls) as models,
        ServerThread(gateway(dramaturg_home, models.target)) as gw,
        grpc.insecure_channel(gw.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        job = submit(stub, "analyze_scene", content, min_segment_seconds=0.5)
        final, attempts = run_job(stub, job.job_id)
        ok, skip = gateway_pb2.STAGE_SUCCEEDED, gateway_pb2.STAGE_SKIPPED
        assert final.state == gateway_pb2.SUCCEEDED, final.error
        assert attempts == {"decode": 1, "diarize": 1, "identify": 1}
        # no audiollm / evaluator here: their stages are skipped without an attempt
        expected = [(1, ok), (1, ok), (1, ok), (0, skip), (0, skip)]
        assert [(s.attempts, s.state) for s in final.stages] == expected
        # the services were sent the blob's name, not the audio
        assert [c["source"] for c in calls.diarize + calls.identify] == ["uri", "uri"]
        assert all(c["bytes"] < 4096 for c in calls.diarize + calls.identify)
        assert calls.diarize[0]["seconds"] == pytest.approx(10.0, abs=1e-3)
        result = json_format.MessageToDict(final.result)
        assert result["speaker_names"] == {"SPK_220": "low", "SPK_660": "high"}
        assert result["duration_seconds"] == pytest.approx(10.0, abs=1e-3)
        assert "audio_transport" not in result
        outputs = {s.name: json_format.MessageToDict(s.output) for s in final.stages}
        assert outputs["diarize"]["audio_transport"] == "uri"
        assert blobs(dramaturg_home) == []  # the finished job's blob is gone
        # garbage bytes: INVALID_ARGUMENT at submit, no job, no stage ever runs
        with pytest.raises(grpc.RpcError) as bad:
            submit(stub, "analyze_scene", b"\x00garbage" * 1000)
        detail = details_from_error(bad.value)
        assert detail.code == grpc.StatusCode.INVALID_ARGUMENT, detail
        assert detail.field_violations[0][0].startswith("audio")
        listed = stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=AUTH, timeout=5)
        assert [j.job_id for j in listed.jobs] == [job.job_id]
        assert len(calls.diarize) == 1


def test_inline_refuses_at_submit_what_a_request_cannot_carry(dramaturg_home: Path) -> None:
    calls = Calls()
    gw = gateway(dramaturg_home, "127.0.0.1:1", audio_transport="inline", inline_message_limit_bytes=LIMIT)
    with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            submit(stub, "analyze_scene", scene_wav())
        detail = details_from_error(refused.value)
        assert detail.code == grpc.StatusCode.INVALID_ARGUMENT, detail
        assert "inline_message_limit_bytes" in detail.message and str(LIMIT) in detail.message
        assert "audio_transport: uri" in detail.message
        with pytest.raises(grpc.RpcError) as refused:
            submit(stub, "identify_lines", scene_wav(), segments=[[0.0, 9.0]])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "params.segments" in refused.value.details()
        assert not stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=AUTH, timeout=5).jobs
    assert blobs(dramaturg_home) == [] and not calls.diarize


def test_inline_sends_only_the_lines_split_below_the_limit(dramaturg_home: Path) -> None:
    calls = Calls()
    with models_server(calls) as models:
        gw = gateway(
            dramaturg_home, models.target, audio_transport="inline", inline_message_limit_bytes=LIMIT
        )
        with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            # a scene over the limit, whose lines together are over it too: two requests of crops
            job = submit(
                stub,
                "identify_lines",
                scene_wav(),
                segments=[[a, b] for a, b, _ in LINES],
                min_segment_seconds=0.5,
            )
            final, attempts = run_job(stub, job.job_id)
            assert final.state == gateway_pb2.SUCCEEDED, final.error
            assert attempts == {"decode": 1, "activity": 1, "identify": 1}
            result = json_format.MessageToDict(final.result)
            assert [line["voice_id"] for line in result["lines"]] == ["low", "high", "low"]
            assert [(line["start"], line["end"]) for line in result["lines"]] == [(a, b) for a, b, _ in LINES]
            identify = json_format.MessageToDict(next(s for s in final.stages if s.name == "identify").output)
            assert identify["audio_transport"] == "inline" and identify["requests"] == 2
            assert [c["source"] for c in calls.identify] == ["content", "content"]
            assert all(c["bytes"] <= LIMIT for c in calls.identify)
            sent = sum(c["seconds"] for c in calls.identify)
            assert sent == pytest.approx(sum(b - a for a, b, _ in LINES), abs=1e-3)  # not the whole scene
            # a short scene goes whole to diarization, and only its lines to the speaker service
            short = ((0.2, 2.2, 220.0), (2.7, 4.7, 660.0))
            calls.identify.clear()
            calls.lines = short
            job = submit(stub, "analyze_scene", scene_wav(5.0, short), min_segment_seconds=0.5)
            final, attempts = run_job(stub, job.job_id)
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    assert attempts == {"decode": 1, "diarize": 1, "identify": 1}
    assert calls.diarize[-1]["source"] == "content"
    assert calls.identify[-1]["seconds"] == pytest.approx(4.0, abs=1e-3)
    assert json_format.MessageToDict(final.result)["speaker_names"] == {"SPK_220": "low", "SPK_660": "high"}


def test_a_request_over_the_message_limit_fails_once_and_is_not_retried(dramaturg_home: Path) -> None:
    """The gateway thinks 1 MiB fits; the service takes 256 KiB: gRPC answers RESOURCE_EXHAUSTED,
    which here means "too large", not "busy"."""
    calls = Calls()
    with models_server(calls) as models:
        gw = gateway(
            dramaturg_home, models.target, audio_transport="inline", inline_message_limit_bytes=1024 * 1024
        )
        with ServerThread(gw) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            job = submit(stub, "analyze_scene", scene_wav())
            final, attempts = run_job(stub, job.job_id)
    assert final.state == gateway_pb2.FAILED
    assert attempts == {"decode": 1, "diarize": 1}
    diarize = next(s for s in final.stages if s.name == "diarize")
    assert diarize.attempts == 1 and diarize.state == gateway_pb2.STAGE_FAILED
    assert "RESOURCE_EXHAUSTED" in diarize.error and "not retried" in diarize.error
    assert "larger than max" in diarize.error
    assert not calls.diarize  # the service's gRPC layer refused it before any handler ran


def test_the_gateway_audio_limits_are_named_at_submit(dramaturg_home: Path) -> None:
    with (
        ServerThread(gateway(dramaturg_home, "127.0.0.1:1", max_audio_seconds=5.0)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as long:
            submit(stub, "probe", scene_wav())
        assert long.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "5 s" in long.value.details()
        with pytest.raises(grpc.RpcError) as asked:
            submit(stub, "probe", scene_wav(3.0, ()), max_seconds=60)
        assert asked.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_audio_seconds" in asked.value.details()
        with pytest.raises(grpc.RpcError) as segments:
            submit(stub, "identify_lines", scene_wav(3.0, ()), segments=[[2.0, 1.0]])
        assert segments.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "params.segments[0]" in segments.value.details()


def test_jobs_share_one_blob_until_the_last_finishes(dramaturg_home: Path) -> None:
    content = scene_wav(3.0, ())
    with (
        ServerThread(gateway(dramaturg_home, "127.0.0.1:1")) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        jobs = [submit(stub, "probe", content) for _ in range(3)]
        for job in jobs:
            final, attempts = run_job(stub, job.job_id)
            assert final.state == gateway_pb2.SUCCEEDED, final.error
            assert attempts == {"decode": 1, "loudness": 1, "activity": 1}
            assert json_format.MessageToDict(final.result)["duration_seconds"] == pytest.approx(3.0, abs=1e-3)
        assert blobs(dramaturg_home) == []


def test_a_job_stored_by_an_older_gateway_resumes_from_its_audio_input(dramaturg_home: Path) -> None:
    """Gateways before the blob store kept the client's AudioInput (input.pb) in the job's folder."""
    content = scene_wav(3.0, ())
    with ServerThread(gateway(dramaturg_home, "127.0.0.1:1")) as srv:
        engine = srv.service.engine
        job = srv.call(_create_legacy_job(engine, content))
    with (
        ServerThread(gateway(dramaturg_home, "127.0.0.1:1")) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        deadline = time.monotonic() + 60
        while (final := stub.GetJob(gateway_pb2.GetJobRequest(job_id=job), metadata=AUTH)).state not in (
            gateway_pb2.SUCCEEDED,
            gateway_pb2.FAILED,
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    assert json_format.MessageToDict(final.result)["duration_seconds"] == pytest.approx(3.0, abs=1e-3)
    work = dramaturg_home / "gateway" / "jobs" / job
    assert not (work / LEGACY_INPUT_FILE).exists()
    assert json.loads((work / "input.json").read_text())["samples"] == 3 * RATE


async def _create_legacy_job(engine, content: bytes) -> str:
    """A PENDING job as an older gateway left it: the AudioInput on disk, no blob, never launched."""
    job = gateway_pb2.Job(
        job_id="legacy000001",
        pipeline="probe",
        state=gateway_pb2.PENDING,
        stages=[
            gateway_pb2.Stage(
                name=s.name, service=s.service, state=gateway_pb2.STAGE_PENDING, depends_on=list(s.depends_on)
            )
            for s in engine.pipelines["probe"].stages
        ],
    )
    work = engine.work_root / job.job_id
    work.mkdir(parents=True)
    (work / LEGACY_INPUT_FILE).write_bytes(
        common_pb2.AudioInput(encoding=common_pb2.WAV, content=content).SerializeToString()
    )
    engine.store.create(job)
    return job.job_id


# -- which failures are worth another attempt ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "reason", "server_delay", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", "", None, 0.5),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", "", None, 0.5),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "QUEUE_FULL", 2.0, 2.0),  # server-sent, RetryInfo
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", "", None, 0.5),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Received message larger than max (327724 vs. 262144)",
            "",
            None,
            None,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Sent message larger than max (70000000 vs. 67108864)",
            "",
            None,
            None,
        ),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "audio.content: audio is 9 bytes but …",
            "PAYLOAD_TOO_LARGE",
            None,
            None,
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "audio.uri: no readable file", "", None, None),
        (grpc.StatusCode.FAILED_PRECONDITION, "no endpoint", "SERVICE_NOT_CONFIGURED", None, None),
        (grpc.StatusCode.INTERNAL, "boom", "", None, None),
    ],
)
def test_retry_classification(code, message, reason, server_delay, expected) -> None:
    assert retry_after(code, message, reason=reason, server_delay=server_delay, backoff=0.5) == expected
    too_large = expected is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message_too_large(code, message, reason) == too_large
