"""cast_voices end to end on the tiny speaker and TTS services: each character's lines become a
fish-speech tree, an enrolment, a LoRA adapter trained through training.v1 (its progress in the
job's stream) and a TTS voice that speaks with it; bad casts and a gateway without shared storage
are refused at submit."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.server import GatewayService
from dramaturg.services.speaker.config import SpeakerSettings
from dramaturg.services.speaker.server import SpeakerService
from dramaturg.services.tts.config import TtsSettings
from dramaturg.services.tts.server import TtsService
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc
from google.protobuf import json_format
from helpers import ServerThread
from test_speaker_server import publish_tiny as publish_speaker
from test_tts_server import publish_tiny as publish_tts

AUTH = (("authorization", "Bearer t"),)
TRAINING = {"max_steps": 2, "eval_every": 2, "eval_at_start": False, "batch_size": 2, "device": "cpu",
            "torch_threads": 1, "lr": 3e-3, "lora_targets": "backbone"}


def cast_of(corpus: Path, uri: str, voices: int = 2) -> list[dict]:
    """The first ``voices`` characters of a generated scene, with their lines (timings and words)."""
    path = corpus / "diarization" / "lab" / f"{uri}.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    speakers = list(dict.fromkeys(line["speaker"] for line in lines))[:voices]
    return [{"voice_id": s, "display_name": next(x["name"] for x in lines if x["speaker"] == s),
             "lines": [{"start": x["start"], "end": x["end"], "text": x["text"]} for x in lines
                       if x["speaker"] == s]} for s in speakers]


def submit(stub: gateway_pb2_grpc.GatewayStub, content: bytes, **params: object) -> gateway_pb2.Job:
    audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
    request = gateway_pb2.SubmitJobRequest(pipeline="cast_voices", audio=audio)
    request.params.update(params)
    return stub.SubmitJob(request, metadata=AUTH, timeout=30)


def test_cast_voices_enrolls_trains_and_adds_a_voice_per_character(
    dramaturg_home: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, SynthConfig(num_speakers=4, heldout_speakers=2, scenes_train=1,
                                          scenes_dev=1, scenes_test=1, lines_per_scene=6,
                                          utterances_per_speaker=2, raters=1))
    content = (corpus / "diarization" / "wav" / "test_000.wav").read_bytes()
    cast = cast_of(corpus, "test_000")
    publish_speaker(dramaturg_home)
    publish_tts(dramaturg_home, "tiny-tts")
    with (
        ServerThread(SpeakerService(SpeakerSettings(min_seconds=0.5), home=dramaturg_home)) as speaker,
        ServerThread(TtsService(TtsSettings(default_max_new_tokens=8), home=dramaturg_home)) as tts,
    ):
        services = {"speaker": speaker.target, "tts": tts.target}
        gateway = GatewayService(GatewaySettings(api_token="t", services=services), home=dramaturg_home)
        with ServerThread(gateway) as gw, grpc.insecure_channel(gw.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            job = submit(stub, content, characters=cast, training=TRAINING)
            events = list(stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job.job_id), metadata=AUTH,
                                        timeout=900))
            with pytest.raises(grpc.RpcError) as twice:
                submit(stub, content, characters=[cast[0], cast[0]])
            with pytest.raises(grpc.RpcError) as lineless:
                submit(stub, content, characters=[{"voice_id": "x", "lines": []}])
        with grpc.insecure_channel(tts.target) as channel:
            tts_stub = tts_pb2_grpc.TextToSpeechStub(channel)
            listed = tts_stub.ListVoices(tts_pb2.ListVoicesRequest(), timeout=30).voices
            voices = {v.voice_id: v for v in listed}
            config = tts_pb2.SynthesisConfig(voice_id=cast[0]["voice_id"], seed=1)
            spoken = tts_stub.Synthesize(tts_pb2.SynthesizeRequest(text="Hello.", config=config), timeout=120)
        with grpc.insecure_channel(speaker.target) as channel:
            enrolled = {v.voice_id for v in speaker_pb2_grpc.SpeakerStub(channel).ListVoices(
                speaker_pb2.ListVoicesRequest(), timeout=30).voices}
        inline = GatewayService(GatewaySettings(api_token="t", services=services, audio_transport="inline"),
                                home=dramaturg_home)
        with (
            ServerThread(inline) as gw,
            grpc.insecure_channel(gw.target) as channel,
            pytest.raises(grpc.RpcError) as no_shared_storage,
        ):
            submit(gateway_pb2_grpc.GatewayStub(channel), content, characters=cast)

    final = events[-1].job
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    result = json_format.MessageToDict(final.result)
    ids = [c["voice_id"] for c in cast]
    assert [v["voice_id"] for v in result["voices"]] == ids
    for voice in result["voices"]:
        assert voice["enrolled"] and voice["adapter"] == f"cast-{final.job_id}-{voice['voice_id']}"
    assert set(ids) <= enrolled
    for voice in ids:  # a TTS voice with its own adapter, prompted with the character's first line
        assert voices[voice].has_adapter and voices[voice].has_reference
        assert voices[voice].adapter_source.startswith(f"cast-{final.job_id}-{voice}")
    assert spoken.audio.content and spoken.audio.duration_seconds > 0
    progress = [e.message for e in events if e.kind == gateway_pb2.STAGE_PROGRESS and e.stage == "train"]
    assert any(m.startswith("training run ") and "step" in m for m in progress)
    stages = {s.name: s.service for s in final.stages}
    assert stages == {"decode": "gateway", "prepare": "gateway", "enroll": "speaker", "train": "tts",
                      "add_voices": "tts"}
    assert twice.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cast twice" in twice.value.details()
    assert lineless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_shared_storage.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "audio_transport: uri" in no_shared_storage.value.details()
