"""A real multi-stage job: the gateway decodes a scene and the speaker service identifies each line."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.server import GatewayService
from dramaturg.services.speaker.config import SpeakerSettings
from dramaturg.services.speaker.server import SpeakerService
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
from google.protobuf import json_format
from helpers import ServerThread
from test_speaker_server import RATE, publish_tiny, voice, wav

AUTH = (("authorization", "Bearer t"),)


def test_identify_lines_through_the_gateway(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    a, b = voice(1, seconds=2.0), voice(5, seconds=2.0, f0=220.0)
    gap = np.zeros(RATE, np.float32)
    scene = np.concatenate([gap, a, gap, b, gap, a[: RATE // 5]])  # the last line is too short to identify
    with ServerThread(SpeakerService(SpeakerSettings(), home=dramaturg_home)) as speaker:
        with grpc.insecure_channel(speaker.target) as channel:
            stub = speaker_pb2_grpc.SpeakerStub(channel)
            for voice_id, clip in (("alice", a), ("bob", b)):
                stub.Enroll(speaker_pb2.EnrollRequest(voice_id=voice_id, audio=[wav(clip)]), timeout=60)
        settings = GatewaySettings(api_token="t", services={"speaker": speaker.target})
        with (
            ServerThread(GatewayService(settings, home=dramaturg_home)) as gw,
            grpc.insecure_channel(gw.target) as channel,
        ):
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.SubmitJobRequest(pipeline="identify_lines", audio=wav(scene))
            request.params.update({"segments": [[1.0, 3.0], [4.0, 6.0], [7.0, 7.2]]})
            job = stub.SubmitJob(request, metadata=AUTH, timeout=30)
            watch = gateway_pb2.WatchJobRequest(job_id=job.job_id)
            events = list(stub.WatchJob(watch, metadata=AUTH, timeout=120))
    final = events[-1].job
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    stage = {s.name: s for s in final.stages}
    assert stage["identify"].service == "speaker" and stage["identify"].state == gateway_pb2.STAGE_SUCCEEDED
    result = json_format.MessageToDict(final.result)
    assert [line["voice_id"] for line in result["lines"]] == ["alice", "bob"]
    assert result["skipped_short"] == 1
    assert result["model"] == "tiny:v1"
    assert all(line["score"] == pytest.approx(1.0, abs=1e-3) for line in result["lines"])


def test_a_stage_whose_service_is_down_fails_after_retries(dramaturg_home: Path) -> None:
    from dramaturg.shared.cli.stack import free_port

    settings = GatewaySettings(
        api_token="t", services={"speaker": f"127.0.0.1:{free_port()}"}, retry_base_seconds=0.05,
        service_down_patience_seconds=1.0,  # then the attempts kept for errors of the work are spent
    )
    with (
        ServerThread(GatewayService(settings, home=dramaturg_home)) as gw,
        grpc.insecure_channel(gw.target) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.SubmitJobRequest(pipeline="identify_lines", audio=wav(voice(1, seconds=2.0)))
        request.params.update({"segments": [[0.0, 2.0]]})
        job = stub.SubmitJob(request, metadata=AUTH, timeout=30)
        deadline = time.monotonic() + 120
        while (job := stub.GetJob(gateway_pb2.GetJobRequest(job_id=job.job_id), metadata=AUTH)).state not in (
            gateway_pb2.SUCCEEDED,
            gateway_pb2.FAILED,
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert job.state == gateway_pb2.FAILED
    identify = next(s for s in job.stages if s.name == "identify")
    assert identify.attempts >= 3 and "UNAVAILABLE" in identify.error
