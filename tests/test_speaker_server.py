"""The speaker service over real gRPC: every RPC, its error cases, model repository and batching."""

from __future__ import annotations

import concurrent.futures
import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2, common_pb2_grpc
from dramaturg.services.speaker.config import SpeakerSettings
from dramaturg.services.speaker.server import SpeakerService
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.store import ModelStore
from dramaturg.shared.voice.encoder import SpeakerEncoder, SpeakerEncoderConfig, build_encoder
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
from helpers import ServerThread
from prometheus_client import REGISTRY

RATE = 16_000


def voice(seed: int, seconds: float = 1.5, f0: float = 140.0) -> np.ndarray:
    """A buzzy vowel-like signal: distinct per seed, deterministic."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * f0 * (1 + seed / 10) * k * t) for k in range(1, 8))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + rng.normal(0, 0.01, len(t))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def wav(samples: np.ndarray) -> common_pb2.AudioInput:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="FLOAT")
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=buf.getvalue())


def publish_tiny(home: Path, name: str = "tiny", seed: int = 0, default: bool = True) -> str:
    import torch

    torch.manual_seed(seed)
    encoder = build_encoder(SpeakerEncoderConfig(architecture="ecapa", threshold=0.8))
    store = ModelStore(home)
    writer = store.create_version("speaker", name, architecture="ecapa", base_model="", recipe="test")
    with writer as staging:
        encoder.save_pretrained(staging)
    if default:
        store.set_default("speaker", name)
    return writer.record.ref


@pytest.fixture()
def service(dramaturg_home: Path):
    publish_tiny(dramaturg_home)
    settings = SpeakerSettings(min_seconds=0.5, max_wait_ms=20.0)
    with (
        ServerThread(SpeakerService(settings, home=dramaturg_home)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        yield srv, speaker_pb2_grpc.SpeakerStub(channel), channel


def error(call) -> tuple[grpc.StatusCode, str, list]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    detail = details_from_error(info.value)
    return detail.code, detail.message, detail.field_violations


def test_embed_matches_the_model_in_process(service, dramaturg_home: Path) -> None:
    _, stub, _ = service
    clips = [voice(1), voice(2, seconds=2.5), voice(1)]
    reply = stub.Embed(speaker_pb2.EmbedRequest(request_id="e1", audio=[wav(c) for c in clips]), timeout=60)
    assert reply.request_id == "e1" and reply.model.name == "tiny" and reply.model.version == "v1"
    vectors = np.array([e.values for e in reply.embeddings])
    assert vectors.shape == (3, reply.dimension)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-2)
    # the production loading code (from_pretrained of the store's folder) gives the same vectors
    record = ModelStore(dramaturg_home).resolve("speaker", "tiny")
    local = SpeakerEncoder.from_pretrained(str(record.path)).embed(clips)
    assert np.allclose(local, vectors, atol=1e-4)


def test_enroll_verify_identify_round_trip(service) -> None:
    _, stub, _ = service
    a, b = voice(1, seconds=2.0), voice(5, seconds=2.0, f0=220.0)
    for voice_id, clip in (("alice", a), ("bob", b)):
        enrolled = stub.Enroll(
            speaker_pb2.EnrollRequest(
                voice_id=voice_id, display_name=voice_id.title(), audio=[wav(clip)], labels={"cast": "demo"}
            ),
            timeout=60,
        )
        assert enrolled.voice.num_utterances == 1 and enrolled.voice.total_seconds == pytest.approx(2.0)
        assert enrolled.voice.model.name == "tiny"
    listed = stub.ListVoices(speaker_pb2.ListVoicesRequest(), timeout=10)
    assert [v.voice_id for v in listed.voices] == ["alice", "bob"]

    same = stub.Verify(speaker_pb2.VerifyRequest(voice_id="alice", test_audio=wav(a)), timeout=60)
    assert same.score == pytest.approx(1.0, abs=1e-4) and same.same_speaker
    pair = stub.Verify(speaker_pb2.VerifyRequest(reference_audio=wav(a), test_audio=wav(b)), timeout=60)
    assert pair.score < same.score and pair.threshold == pytest.approx(0.8)

    scene = np.concatenate([a, np.zeros(RATE // 2, np.float32), b])
    spans = [common_pb2.TimeSpan(start=0.0, end=2.0), common_pb2.TimeSpan(start=2.5, end=4.5)]
    found = stub.Identify(speaker_pb2.IdentifyRequest(audio=wav(scene), segments=spans, top_k=2), timeout=60)
    assert [r.candidates[0].voice_id for r in found.results] == ["alice", "bob"]
    assert [r.voice_id for r in found.results] == ["alice", "bob"]
    assert all(len(r.candidates) == 2 for r in found.results)
    assert found.results[0].candidates[0].score == pytest.approx(1.0, abs=1e-3)

    deleted = stub.DeleteVoice(speaker_pb2.DeleteVoiceRequest(voice_id="bob"), timeout=10)
    assert deleted.voice.voice_id == "bob"
    code, _, _ = error(lambda: stub.DeleteVoice(speaker_pb2.DeleteVoiceRequest(voice_id="bob"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND


def test_voices_survive_a_restart(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    for attempt in range(2):
        service = SpeakerService(SpeakerSettings(), home=dramaturg_home)
        with ServerThread(service) as srv, grpc.insecure_channel(srv.target) as channel:
            stub = speaker_pb2_grpc.SpeakerStub(channel)
            if attempt == 0:
                stub.Enroll(speaker_pb2.EnrollRequest(voice_id="carol", audio=[wav(voice(3))]), timeout=60)
            else:
                assert [v.voice_id for v in stub.ListVoices(speaker_pb2.ListVoicesRequest()).voices] == [
                    "carol"
                ]


def test_bad_requests(service) -> None:
    _, stub, _ = service
    ok = wav(voice(1))
    cases = [
        (
            lambda: stub.Embed(speaker_pb2.EmbedRequest(), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio",
        ),
        (
            lambda: stub.Embed(
                speaker_pb2.EmbedRequest(audio=[ok, common_pb2.AudioInput(content=b"junk" * 100)]), timeout=30
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio[1]",
        ),
        (
            lambda: stub.Embed(speaker_pb2.EmbedRequest(audio=[wav(voice(1, seconds=0.2))]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio[0]",
        ),
        (
            lambda: stub.Embed(speaker_pb2.EmbedRequest(audio=[wav(np.zeros(RATE, np.float32))]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio[0]",
        ),
        (
            lambda: stub.Embed(
                speaker_pb2.EmbedRequest(audio=[ok], model=common_pb2.ModelRef(name="nope")), timeout=10
            ),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (
            lambda: stub.Embed(
                speaker_pb2.EmbedRequest(audio=[ok], model=common_pb2.ModelRef(name="tiny", version="v9")),
                timeout=10,
            ),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (
            lambda: stub.Verify(speaker_pb2.VerifyRequest(voice_id="ghost", test_audio=ok), timeout=10),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (
            lambda: stub.Verify(speaker_pb2.VerifyRequest(test_audio=ok), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "reference",
        ),
        (
            lambda: stub.Enroll(speaker_pb2.EnrollRequest(voice_id="no spaces!", audio=[ok]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "voice_id",
        ),
        (
            lambda: stub.Identify(speaker_pb2.IdentifyRequest(audio=ok), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
            None,
        ),
    ]
    for call, expected, field_path in cases:
        code, message, violations = error(call)
        assert code == expected, (code, message)
        assert message
        if field_path:
            assert violations and violations[0][0].startswith(field_path), violations
    stub.Enroll(speaker_pb2.EnrollRequest(voice_id="dave", audio=[ok]), timeout=30)
    code, message, _ = error(
        lambda: stub.Enroll(speaker_pb2.EnrollRequest(voice_id="dave", audio=[ok]), timeout=10)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and "overwrite" in message
    stub.Enroll(speaker_pb2.EnrollRequest(voice_id="dave", audio=[ok, ok], overwrite=True), timeout=30)
    for span, hint in (
        (common_pb2.TimeSpan(start=0.0, end=0.2), "too short"),
        (common_pb2.TimeSpan(start=1.0, end=9.0), ""),
    ):
        code, message, violations = error(
            lambda span=span: stub.Identify(
                speaker_pb2.IdentifyRequest(audio=ok, segments=[span]), timeout=10
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0].startswith("segments[0]")
        assert hint in message


def test_voices_of_another_model_are_refused(service, dramaturg_home: Path) -> None:
    _, stub, _ = service
    stub.Enroll(speaker_pb2.EnrollRequest(voice_id="erin", audio=[wav(voice(4))]), timeout=30)
    publish_tiny(dramaturg_home, name="other", seed=1, default=False)
    other = common_pb2.ModelRef(name="other")
    code, message, _ = error(
        lambda: stub.Verify(
            speaker_pb2.VerifyRequest(model=other, voice_id="erin", test_audio=wav(voice(4))), timeout=30
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "tiny:v1" in message


def test_model_repository(service, dramaturg_home: Path) -> None:
    _, _, channel = service
    repo = common_pb2_grpc.ModelRepositoryStub(channel)
    listed = repo.ListModels(common_pb2.ListModelsRequest(), timeout=10)
    assert [(m.ref.name, m.loaded, m.is_default) for m in listed.models] == [("tiny", True, True)]
    publish_tiny(dramaturg_home, name="other", seed=1, default=False)
    loaded = repo.LoadModel(
        common_pb2.LoadModelRequest(model=common_pb2.ModelRef(name="other"), make_default=True), timeout=60
    )
    assert loaded.model.loaded and loaded.model.is_default and loaded.model.device == "cpu"
    infos = {m.ref.name: m for m in repo.ListModels(common_pb2.ListModelsRequest(loaded_only=True)).models}
    assert set(infos) == {"tiny", "other"} and infos["other"].is_default and not infos["tiny"].is_default
    repo.UnloadModel(common_pb2.UnloadModelRequest(model=common_pb2.ModelRef(name="tiny")), timeout=10)
    code, _, _ = error(
        lambda: repo.UnloadModel(
            common_pb2.UnloadModelRequest(model=common_pb2.ModelRef(name="tiny")), timeout=10
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _, _ = error(
        lambda: repo.LoadModel(
            common_pb2.LoadModelRequest(model=common_pb2.ModelRef(name="missing")), timeout=10
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_concurrent_requests_share_batches(service) -> None:
    _, stub, _ = service
    labels = {"service": "speaker", "queue": "embed"}
    count0 = REGISTRY.get_sample_value("dramaturg_batch_size_count", labels) or 0.0
    sum0 = REGISTRY.get_sample_value("dramaturg_batch_size_sum", labels) or 0.0
    clips = [wav(voice(i, seconds=1.0 + 0.01 * i)) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda c: stub.Embed(speaker_pb2.EmbedRequest(audio=[c]), timeout=60), clips))
    assert all(len(r.embeddings) == 1 for r in replies)
    batches = (REGISTRY.get_sample_value("dramaturg_batch_size_count", labels) or 0.0) - count0
    items = (REGISTRY.get_sample_value("dramaturg_batch_size_sum", labels) or 0.0) - sum0
    assert items == 16
    assert batches < 16, "no two concurrent requests shared a batch"


def test_service_without_a_model_says_how_to_get_one(dramaturg_home: Path) -> None:
    service = SpeakerService(SpeakerSettings(), home=dramaturg_home)
    with pytest.raises(RuntimeError, match="make train-speaker"), ServerThread(service):
        pass


def test_reflection_lists_speaker_models_and_training(service) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    _, _, channel = service
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "dramaturg.speaker.v1.Speaker",
        "dramaturg.common.v1.ModelRepository",
        "dramaturg.training.v1.Training",
        "grpc.health.v1.Health",
    } <= services
