"""The first real multi-stage job: AnalyzeScene = decode → diarize (diarization service) → identify
each turn and name each diarized speaker (speaker service), through the gateway over gRPC.

Both models are untrained (accuracy is the slow learning checks' business), so this checks the
wiring: the gateway's RTTM is the diarization service's own answer, every exclusive turn is in the
labelled script, and a voice enrolled from one turn's audio is found again in that turn.
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.diarization.config import DiarizationSettings
from dramaturg.services.diarization.server import DiarizationService
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.server import GatewayService
from dramaturg.services.speaker.config import SpeakerSettings
from dramaturg.services.speaker.server import SpeakerService
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
from google.protobuf import json_format
from helpers import ServerThread
from test_diarization_server import publish as publish_diarization
from test_speaker_server import publish_tiny as publish_speaker

pytest.importorskip("pyannote.audio")

AUTH = (("authorization", "Bearer t"),)
URI = "scene"


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, np.ndarray, int]:
    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, SynthConfig(num_speakers=4, heldout_speakers=2, scenes_train=1, scenes_dev=1,
                                       scenes_test=1, lines_per_scene=5, utterances_per_speaker=2, raters=1))
    wav = out / "diarization" / "wav" / "test_000.wav"
    samples, rate = sf.read(wav, dtype="float32")
    return wav.read_bytes(), samples, rate


def _clip(samples: np.ndarray, rate: int, start: float, end: float) -> common_pb2.AudioInput:
    buf = io.BytesIO()
    sf.write(buf, samples[round(start * rate) : round(end * rate)], rate, format="WAV", subtype="FLOAT")
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=buf.getvalue())


def test_analyze_scene_through_the_gateway(dramaturg_home: Path, scene) -> None:
    content, samples, rate = scene
    publish_diarization(dramaturg_home, "tiny-diarization")
    publish_speaker(dramaturg_home)
    with (
        ServerThread(DiarizationService(DiarizationSettings(), home=dramaturg_home)) as diarization,
        ServerThread(SpeakerService(SpeakerSettings(min_seconds=0.5), home=dramaturg_home)) as speaker,
    ):
        audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
        with grpc.insecure_channel(diarization.target) as channel:
            direct = diarization_pb2_grpc.DiarizationStub(channel).Diarize(
                diarization_pb2.DiarizeRequest(audio=audio, uri=URI), timeout=300
            )
        assert direct.exclusive_turns, "the untrained pipeline found no speech in the scene"
        # enroll one voice per diarized speaker from that speaker's longest exclusive turn
        enrolled: dict[str, tuple[float, float]] = {}
        for turn in direct.exclusive_turns:
            start, end = round(turn.span.start, 3), round(turn.span.end, 3)
            best = enrolled.get(turn.speaker)
            if end - start >= 0.5 and (best is None or end - start > best[1] - best[0]):
                enrolled[turn.speaker] = (start, end)
        assert enrolled
        with grpc.insecure_channel(speaker.target) as channel:
            stub = speaker_pb2_grpc.SpeakerStub(channel)
            for label, (start, end) in enrolled.items():
                clip = _clip(samples, rate, start, end)
                stub.Enroll(speaker_pb2.EnrollRequest(voice_id=f"v-{label}", audio=[clip]), timeout=60)
        settings = GatewaySettings(
            api_token="t", services={"diarization": diarization.target, "speaker": speaker.target}
        )
        with (
            ServerThread(GatewayService(settings, home=dramaturg_home)) as gw,
            grpc.insecure_channel(gw.target) as channel,
        ):
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.SubmitJobRequest(pipeline="analyze_scene", audio=audio)
            request.params.update({"uri": URI, "min_segment_seconds": 0.5})
            job = stub.SubmitJob(request, metadata=AUTH, timeout=30)
            watch = gateway_pb2.WatchJobRequest(job_id=job.job_id)
            events = list(stub.WatchJob(watch, metadata=AUTH, timeout=600))
    final = events[-1].job
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    stages = {s.name: s for s in final.stages}
    assert [stages[n].service for n in ("diarize", "identify")] == ["diarization", "speaker"]
    assert all(s.state == gateway_pb2.STAGE_SUCCEEDED for s in stages.values())
    # the gateway's default: the services read the scene from its blob store, nobody sent it inline
    for name in ("diarize", "identify"):
        assert json_format.MessageToDict(stages[name].output)["audio_transport"] == "uri"
    result = json_format.MessageToDict(final.result)
    assert result["rttm"] == direct.rttm
    assert sorted(result["speakers"]) == sorted(direct.speakers)
    assert result["diarization_model"] == "tiny-diarization:v1"
    script = {(line["start"], line["end"]): line for line in result["script"]}
    assert len(script) == len(direct.exclusive_turns)
    for label, span in enrolled.items():
        line = script[span]
        assert line["speaker"] == label
        assert line["turn_voice_id"] == f"v-{label}", line  # its own audio: the nearest enrolled voice
        assert line["score"] > 0.99
    # every speaker that got a name got it from votes of its own turns
    for label, voice in result["speaker_names"].items():
        assert any(line["speaker"] == label and line["turn_voice_id"] == voice for line in result["script"])
