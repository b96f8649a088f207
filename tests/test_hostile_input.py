"""Hostile input, tried from outside: the battery of tests/hostile.py against the real services over gRPC.

Each service runs in process with a tiny untrained model in a temporary DRAMATURG_HOME, an allowed uri
root and small duration bounds (so the "too long" cases stay small). Every malformed AudioInput must
come back as a clear INVALID_ARGUMENT on the field that carried it, through every RPC that takes
audio, and nothing hostile may be enrolled: the finite-but-huge samples that once became an all-NaN
voice are refused before the model sees them.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from dramaturg.common.v1 import common_pb2
from dramaturg.services.speaker.config import SpeakerSettings
from dramaturg.services.speaker.server import SpeakerService
from dramaturg.shared.store import ModelStore
from dramaturg.shared.voice.encoder import SpeakerEncoderConfig, build_encoder
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
from helpers import ServerThread
from hostile import (
    NEEDS_SPEECH,
    HostileContext,
    assert_clear_status,
    audio_battery,
    hostile_strings,
    make_context,
    run_audio_battery,
    speechlike,
    wav,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 16_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SPEAKER = {"min_seconds": 0.5, "max_seconds": 20.0, "identify_max_seconds": 40.0}


def good(seed: int = 0, seconds: float = 2.0) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=wav(speechlike(seconds, RATE, seed), RATE))


def expect(call, code: grpc.StatusCode, field: str | None = None):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return assert_clear_status(info.value, code, field)


# ------------------------------------------------------------------------------------------- speaker


def publish_tiny_speaker(home: Path) -> None:
    import torch

    torch.manual_seed(0)
    encoder = build_encoder(SpeakerEncoderConfig(architecture="ecapa", threshold=0.8))
    store = ModelStore(home)
    writer = store.create_version("speaker", "tiny", architecture="ecapa", base_model="", recipe="test")
    with writer as staging:
        encoder.save_pretrained(staging)
    store.set_default("speaker", "tiny")


@pytest.fixture(scope="module")
def speaker(tmp_path_factory):
    """One speaker service for the module, with one voice enrolled (Identify needs one)."""
    tmp = tmp_path_factory.mktemp("speaker")
    home = tmp / "home"
    home.mkdir()
    publish_tiny_speaker(home)
    ctx = make_context(tmp / "audio", SPEAKER["min_seconds"], SPEAKER["max_seconds"], RATE)
    settings = SpeakerSettings(max_wait_ms=5.0, audio_uri_roots=[str(ctx.allowed_root)], **SPEAKER)
    with (
        ServerThread(SpeakerService(settings, home=home)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = speaker_pb2_grpc.SpeakerStub(channel)
        stub.Enroll(speaker_pb2.EnrollRequest(voice_id="anchor", audio=[good(1)]), timeout=60)
        yield stub, ctx, home


def voice_ids(stub) -> list[str]:
    return [v.voice_id for v in stub.ListVoices(speaker_pb2.ListVoicesRequest(), timeout=10).voices]


def test_the_good_path_works_through_every_rpc(speaker) -> None:
    """The control: the battery's failures are about the input, not a broken fixture."""
    stub, _, _ = speaker
    by_uri = common_pb2.AudioInput(uri="good.wav")
    assert len(stub.Embed(speaker_pb2.EmbedRequest(audio=[good(), by_uri]), timeout=60).embeddings) == 2
    assert stub.Verify(speaker_pb2.VerifyRequest(voice_id="anchor", test_audio=by_uri), timeout=60).model.name
    found = stub.Identify(speaker_pb2.IdentifyRequest(audio=good(1)), timeout=60)
    assert found.results[0].candidates[0].voice_id == "anchor"


@pytest.mark.parametrize(
    ("rpc", "field"),
    [("Embed", "audio[0]"), ("Verify.test", "test_audio"), ("Verify.reference", "reference_audio"),
     ("Enroll", "audio[0]"), ("Identify", "audio")],
)  # fmt: skip
def test_speaker_rpcs_refuse_every_hostile_audio(speaker, rpc: str, field: str) -> None:
    stub, ctx, _ = speaker
    calls = {
        "Embed": lambda a: stub.Embed(speaker_pb2.EmbedRequest(audio=[a]), timeout=30),
        "Verify.test": lambda a: stub.Verify(
            speaker_pb2.VerifyRequest(reference_audio=good(), test_audio=a), timeout=30
        ),
        "Verify.reference": lambda a: stub.Verify(
            speaker_pb2.VerifyRequest(reference_audio=a, test_audio=good()), timeout=30
        ),
        "Enroll": lambda a: stub.Enroll(speaker_pb2.EnrollRequest(voice_id="hostile", audio=[a]), timeout=30),
        "Identify": lambda a: stub.Identify(speaker_pb2.IdentifyRequest(audio=a), timeout=30),
    }
    if rpc == "Identify":  # the whole file may be longer: identify_max_seconds
        ctx = HostileContext(ctx.allowed_root, ctx.outside, ctx.min_seconds, SPEAKER["identify_max_seconds"])
    answers = run_audio_battery(calls[rpc], ctx, field)
    assert answers["uri_with_nul"].reason == "INVALID_URI"
    assert "4096" in answers["uri_10k_chars"].message
    assert answers["wav_float_1e30"].reason == "AMPLITUDE_OUT_OF_RANGE"
    assert "silent" in answers["silence"].message
    if rpc == "Enroll":
        assert voice_ids(stub) == ["anchor"], "a hostile input was enrolled"


def test_huge_samples_are_never_enrolled(speaker) -> None:
    """The finite-but-absurd cases (1e30, integer-scaled floats) through Enroll, with overwrite: the
    anchor voice is untouched and no NaN voice exists."""
    stub, ctx, home = speaker
    huge = [c for c in audio_battery(ctx) if c.huge]
    assert len(huge) >= 3
    before = stub.ListVoices(speaker_pb2.ListVoicesRequest(), timeout=10).voices
    for case in huge:
        for voice_id in ("hostile_huge", "anchor"):
            expect(
                lambda case=case, voice_id=voice_id: stub.Enroll(
                    speaker_pb2.EnrollRequest(voice_id=voice_id, audio=[good(), case.audio], overwrite=True),
                    timeout=30,
                ),
                INVALID,
                "audio[1]",
            )
    assert stub.ListVoices(speaker_pb2.ListVoicesRequest(), timeout=10).voices == before
    stored = sorted((home / "voices" / "speaker").glob("*.json"))
    assert [p.stem for p in stored] == ["anchor"]
    verify = stub.Verify(speaker_pb2.VerifyRequest(voice_id="anchor", test_audio=good(1)), timeout=30)
    assert np.isfinite(verify.score) and verify.score == pytest.approx(1.0, abs=1e-4)


def test_identify_segments_obey_embeds_rules(speaker) -> None:
    """The file may be longer than an Embed input, but every segment is held to Embed's rules."""
    stub, _, _ = speaker
    scene = np.concatenate([speechlike(2.0, RATE), np.zeros(RATE, np.float32), speechlike(25.0, RATE, 2)])
    audio = common_pb2.AudioInput(content=wav(scene, RATE))
    ok = stub.Identify(
        speaker_pb2.IdentifyRequest(audio=audio, segments=[common_pb2.TimeSpan(start=0.0, end=2.0)]),
        timeout=60,
    )
    assert len(ok.results) == 1
    for span, hint in (
        ((2.1, 2.9), "silent"),  # inside the second of zeros
        ((0.0, 0.2), "too short"),
        ((3.0, 28.0), "at most 20 s"),  # 25 s: longer than Embed's max_seconds
    ):
        detail = expect(
            lambda span=span: stub.Identify(
                speaker_pb2.IdentifyRequest(
                    audio=audio, segments=[common_pb2.TimeSpan(start=span[0], end=span[1])]
                ),
                timeout=60,
            ),
            INVALID,
            "segments[0]",
        )
        assert hint in detail.message, detail.message
    detail = expect(lambda: stub.Identify(speaker_pb2.IdentifyRequest(audio=audio), timeout=60), INVALID)
    assert "segments[0]" in detail.message and "at most 20 s" in detail.message


@pytest.mark.parametrize("name", sorted(hostile_strings()))
def test_speaker_string_fields_give_bounded_errors(speaker, name: str) -> None:
    stub, _, _ = speaker
    value = hostile_strings()[name]
    cases = [
        (
            lambda: stub.Enroll(speaker_pb2.EnrollRequest(voice_id=value, audio=[good()]), timeout=30),
            "voice_id",
        ),
        (
            lambda: stub.Verify(speaker_pb2.VerifyRequest(voice_id=value, test_audio=good()), timeout=30),
            "voice_id",
        ),
        (lambda: stub.DeleteVoice(speaker_pb2.DeleteVoiceRequest(voice_id=value), timeout=10), "voice_id"),
        (
            lambda: stub.Identify(
                speaker_pb2.IdentifyRequest(audio=good(), voice_ids=["anchor", value]), timeout=30
            ),
            "voice_ids[1]",
        ),
    ]
    for call, field in cases:
        detail = expect(call, INVALID, field)
        assert "voice id" in detail.message
    assert voice_ids(stub) == ["anchor"]


def test_speaker_free_text_fields_are_bounded(speaker) -> None:
    stub, _, _ = speaker
    long = hostile_strings()["emoji_10k"]
    for request, field in (
        (speaker_pb2.EnrollRequest(voice_id="x", display_name=long, audio=[good()]), "display_name"),
        (speaker_pb2.EnrollRequest(voice_id="x", labels={long: "v"}, audio=[good()]), "labels"),
        (speaker_pb2.EnrollRequest(voice_id="x", labels={"k": long}, audio=[good()]), "labels"),
        (
            speaker_pb2.EnrollRequest(
                voice_id="x", labels={f"k{i}": "v" for i in range(100)}, audio=[good()]
            ),
            "labels",
        ),
    ):
        expect(lambda request=request: stub.Enroll(request, timeout=30), INVALID, field)
    assert voice_ids(stub) == ["anchor"]
    # the model store refuses the name; its message quotes it, and the status stays bounded anyway
    expect(
        lambda: stub.Embed(
            speaker_pb2.EmbedRequest(audio=[good()], model=common_pb2.ModelRef(name=long)), timeout=30
        ),
        INVALID,
        "model.name",
    )


def test_a_long_request_id_does_not_break_the_answer(speaker) -> None:
    """The id is echoed as x-request-id: a 20,000-character one is shortened there (head + hash)."""
    stub, _, _ = speaker
    rid = "r" * 20_000
    reply = stub.Embed(speaker_pb2.EmbedRequest(request_id=rid, audio=[good()]), timeout=30)
    assert len(reply.embeddings) == 1
    expect(
        lambda: stub.Embed(
            speaker_pb2.EmbedRequest(request_id=rid, audio=[common_pb2.AudioInput()]), timeout=30
        ),
        INVALID,
        "audio[0]",
    )


# --------------------------------------------------------------------------------------- diarization


@pytest.fixture(scope="module")
def diarization(tmp_path_factory):
    pytest.importorskip("pyannote.audio")
    from dramaturg.diarization.v1 import diarization_pb2_grpc
    from dramaturg.services.diarization.config import DiarizationSettings
    from dramaturg.services.diarization.model import default_artifact
    from dramaturg.services.diarization.server import DiarizationService

    tmp = tmp_path_factory.mktemp("diarization")
    home = tmp / "home"
    home.mkdir()
    store = ModelStore(home)
    writer = store.create_version(
        "diarization", "tiny", architecture="pyannote", base_model="", recipe="test"
    )
    with writer as staging:
        default_artifact(staging, home, seed=0)
    store.set_default("diarization", "tiny")
    ctx = make_context(tmp / "audio", 1.0, 60.0, RATE)
    settings = DiarizationSettings(min_seconds=1.0, max_seconds=60.0, audio_uri_roots=[str(ctx.allowed_root)])
    with (
        ServerThread(DiarizationService(settings, home=home)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        yield diarization_pb2_grpc.DiarizationStub(channel), ctx


def test_diarize_refuses_every_hostile_audio(diarization) -> None:
    from dramaturg.diarization.v1 import diarization_pb2

    stub, ctx = diarization
    reply = stub.Diarize(
        diarization_pb2.DiarizeRequest(audio=common_pb2.AudioInput(uri="good.wav")), timeout=120
    )
    assert reply.audio_seconds == pytest.approx(2.0)
    answers = run_audio_battery(
        lambda a: stub.Diarize(diarization_pb2.DiarizeRequest(audio=a), timeout=60),
        ctx,
        "audio",
        exclude=NEEDS_SPEECH,
    )
    assert answers["raw_f32_1e30"].reason == "AMPLITUDE_OUT_OF_RANGE"
    # silence is a well-formed file: any answer (the untrained model may hear someone in it) or a
    # clear refusal, never INTERNAL
    silence = next(c for c in audio_battery(ctx) if c.name == "silence")
    try:
        quiet = stub.Diarize(diarization_pb2.DiarizeRequest(audio=silence.audio), timeout=120)
    except grpc.RpcError as exc:
        assert_clear_status(exc, INVALID, "audio")
    else:
        assert quiet.audio_seconds == pytest.approx(2.0)


@pytest.mark.parametrize("name", sorted(hostile_strings()))
def test_diarize_string_fields_give_bounded_errors(diarization, name: str) -> None:
    from dramaturg.diarization.v1 import diarization_pb2

    stub, _ = diarization
    value = hostile_strings()[name]
    expect(
        lambda: stub.Diarize(
            diarization_pb2.DiarizeRequest(audio=common_pb2.AudioInput(), uri=value + " x"), timeout=30
        ),
        INVALID,
        "uri",
    )
    # The model store answers a bad name with INVALID_ARGUMENT (a well-formed unknown one with NOT_FOUND),
    # its violation naming "model.name" whatever the request's path to it.
    with pytest.raises(grpc.RpcError) as info:
        stub.Diarize(
            diarization_pb2.DiarizeRequest(
                audio=common_pb2.AudioInput(uri="good.wav"),
                config=diarization_pb2.DiarizationConfig(model=common_pb2.ModelRef(name=value)),
            ),
            timeout=30,
        )
    code = info.value.code()
    assert code in (INVALID, grpc.StatusCode.NOT_FOUND), code
    assert_clear_status(info.value, code)
