"""The TTS service over real gRPC, on the untrained tiny CSM: synthesis whole and streamed, every bad
input with its status, voices (reference prompts and LoRA adapters) that persist, deadlines and
admission. The tiny model never samples its end-of-audio frame, so every synthesis runs exactly
``max_new_tokens`` frames: lengths are exact and a long request is long for sure.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.services.tts.config import TtsSettings
from dramaturg.services.tts.server import TtsService
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.store import ModelStore
from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc
from helpers import ServerThread, wait_for
from hostile import speechlike, wav
from prometheus_client import REGISTRY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 24_000
FRAME = 1_920  # samples per Mimi frame at 24 kHz (12.5 frames a second)
Enc = common_pb2.AudioEncoding


def publish_tiny(home: Path, name: str = "tiny", seed: int = 0, default: bool = True) -> None:
    from dramaturg.services.tts.model import write_tiny_model

    store = ModelStore(home)
    with store.create_version("tts", name, architecture="tiny", base_model="", recipe="test") as staging:
        write_tiny_model(Path(staging), home, seed=seed)
    if default:
        store.set_default("tts", name)


class Served:
    """A running service, its stub, and a way to restart it on the same home."""

    def __init__(self, home: Path, **settings: object) -> None:
        self.home = home
        self.settings = TtsSettings(**settings)
        self.server: ServerThread | None = None
        self.channel: grpc.Channel | None = None
        self.start()

    def start(self) -> None:
        self.server = ServerThread(TtsService(self.settings, home=self.home)).__enter__()
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = tts_pb2_grpc.TextToSpeechStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.__exit__(None, None, None)
        self.server = self.channel = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def limiter(self):
        return self.server.service.limiter


@pytest.fixture()
def served(dramaturg_home: Path) -> Iterator[Served]:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home)
    yield running
    running.stop()


def request(text: str = "Hello there.", **config: object) -> tts_pb2.SynthesizeRequest:
    config.setdefault("seed", 7)
    config.setdefault("max_new_tokens", 12)
    return tts_pb2.SynthesizeRequest(request_id="r1", text=text, config=tts_pb2.SynthesisConfig(**config))


def samples_of(output: common_pb2.AudioOutput) -> np.ndarray:
    if output.encoding == Enc.LINEAR_PCM_F32LE:
        return np.frombuffer(output.content, "<f4")
    data, rate = sf.read(io.BytesIO(output.content), dtype="float32")
    assert rate == output.sample_rate_hz
    return data


def error(call) -> tuple[grpc.StatusCode, str, list, float | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    detail = details_from_error(info.value)
    return detail.code, detail.message, [f for f, _ in detail.field_violations], detail.retry_after_seconds


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- synthesis ----------------------------------------------------------------------------------------


def test_synthesize_returns_wav_of_the_frames_generated_same_as_the_model_in_process(served: Served) -> None:
    from dramaturg.services.tts.model import load_tts_model, synthesize

    reply = served.stub.Synthesize(request(max_new_tokens=25), timeout=60)
    assert reply.request_id == "r1" and reply.model.name == "tiny" and reply.model.version == "v1"
    assert reply.seed == 7 and reply.generated_frames == 25
    assert reply.audio.encoding == Enc.WAV and reply.audio.sample_rate_hz == RATE
    audio = samples_of(reply.audio)  # decodable WAV
    assert audio.shape == (25 * FRAME,) and reply.audio.duration_seconds == pytest.approx(2.0)
    assert np.abs(audio).max() > 0.01  # sound, not silence
    # what the store's model gives in process, with the service's default sampling (temperature 0.9, top-k 50)
    device = served.server.service.device  # sampling on a GPU draws other numbers than on the CPU
    model, processor = load_tts_model(ModelStore(served.home).resolve("tts", "tiny").path, device=device)
    local, _ = synthesize(model, processor, "Hello there.", seed=7, max_new_frames=25, top_k=50)
    assert np.abs(audio - np.clip(local, -1, 1)).max() <= 1.5 / 32767  # 16-bit WAV

    # the same seed gives the same audio; seed 0 draws one and says which
    again = served.stub.Synthesize(request(max_new_tokens=25, encoding=Enc.LINEAR_PCM_F32LE), timeout=60)
    assert np.abs(samples_of(again.audio) - local).max() < 1e-6
    fresh = served.stub.Synthesize(request(seed=0, encoding=Enc.LINEAR_PCM_F32LE), timeout=60)
    assert fresh.seed != 0
    repeat = served.stub.Synthesize(request(seed=fresh.seed, encoding=Enc.LINEAR_PCM_F32LE), timeout=60)
    assert repeat.audio.content == fresh.audio.content
    # another output rate: resampled, same duration
    low = served.stub.Synthesize(request(sample_rate_hz=16_000), timeout=60)
    assert low.audio.sample_rate_hz == 16_000 and samples_of(low.audio).shape == (12 * FRAME * 2 // 3,)


@pytest.mark.parametrize(
    ("encoding", "rate", "tolerance"),
    [(Enc.LINEAR_PCM_F32LE, 0, 1e-5), (Enc.WAV, 0, 1.5 / 32767), (Enc.LINEAR_PCM_S16LE, 16_000, 1.5 / 32767)],
)
def test_streamed_chunks_concatenate_to_the_whole_synthesis(
    served: Served, encoding: int, rate: int, tolerance: float
) -> None:
    frames = 15
    whole_reply = served.stub.Synthesize(
        request(max_new_tokens=frames, encoding=encoding, sample_rate_hz=rate), timeout=60
    )
    chunks = list(
        served.stub.SynthesizeOnline(
            request(max_new_tokens=frames, encoding=encoding, sample_rate_hz=rate), timeout=60
        )
    )
    out_rate = rate or RATE
    assert len(chunks) >= frames // 2  # streamed as generated (2 frames a chunk), not at the end
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert [c.is_final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    first = chunks[0]
    assert first.seed == 7 and first.model.name == "tiny" and first.encoding == encoding
    assert all(c.sample_rate_hz == out_rate and c.request_id == "r1" for c in chunks)
    seconds = [c.audio_seconds for c in chunks]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(frames * FRAME / RATE)
    data = b"".join(c.audio_chunk for c in chunks)
    if encoding == Enc.WAV:
        streamed, file_rate = sf.read(io.BytesIO(data), dtype="float32")  # header sizes say "unknown"
        assert file_rate == out_rate
    elif encoding == Enc.LINEAR_PCM_S16LE:
        streamed = np.frombuffer(data, "<i2").astype(np.float32) / 32767
    else:
        streamed = np.frombuffer(data, "<f4")
    if encoding == Enc.LINEAR_PCM_S16LE:
        whole = np.frombuffer(whole_reply.audio.content, "<i2").astype(np.float32) / 32767
    else:
        whole = samples_of(whole_reply.audio)
    assert streamed.shape == whole.shape == (frames * FRAME * out_rate // RATE,)
    assert np.abs(streamed - whole).max() <= tolerance
    # time to first audio, frames per second and real-time factor are exported for both methods
    for method in ("Synthesize", "SynthesizeOnline"):
        assert metric("dramaturg_tts_time_to_first_audio_seconds_count", method=method) > 0
        assert metric("dramaturg_tts_frames_per_second_count", method=method) > 0
        assert metric("dramaturg_real_time_factor_count", service="tts", method=method) > 0
    assert REGISTRY.get_sample_value("dramaturg_queue_depth", {"service": "tts", "queue": "synthesize"}) == 0


def test_bad_requests_are_refused_naming_the_field(served: Served, dramaturg_home: Path) -> None:
    reference = tts_pb2.SynthesisConfig(reference_audio=common_pb2.AudioInput(content=wav(speechlike(2.0))))
    cases: list[tuple[str, tts_pb2.SynthesizeRequest, grpc.StatusCode, str, str]] = [
        ("empty text", request(""), grpc.StatusCode.INVALID_ARGUMENT, "text", "empty"),
        ("blank text", request("  \n "), grpc.StatusCode.INVALID_ARGUMENT, "text", "empty"),
        ("long text", request("a" * 1001), grpc.StatusCode.INVALID_ARGUMENT, "text", "1001"),
        (
            "unknown characters",
            request("Price: 5 € 语"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text",
            "EURO SIGN",
        ),
        ("special token", request("hi <eos> there"), grpc.StatusCode.INVALID_ARGUMENT, "text", "'<eos>'"),
        ("audio token", request("hi <|AUDIO|>"), grpc.StatusCode.INVALID_ARGUMENT, "text", "<|AUDIO|>"),
        ("control character", request("hi\x00"), grpc.StatusCode.INVALID_ARGUMENT, "text", "U+0000"),
        (
            "reference without transcript",
            request(reference_audio=reference.reference_audio),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.reference_text",
            "transcript",
        ),
        (
            "transcript without reference",
            request(reference_text="hello"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.reference_text",
            "without",
        ),
        (
            "unspeakable transcript",
            request(reference_audio=reference.reference_audio, reference_text="€"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.reference_text",
            "EURO",
        ),
        (
            "voice and reference",
            request(voice_id="alice", reference_audio=reference.reference_audio, reference_text="hello"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.voice_id",
            "not both",
        ),
        (
            "garbage reference",
            request(reference_audio=common_pb2.AudioInput(content=b"not audio" * 50), reference_text="hello"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.reference_audio",
            "",
        ),
        ("bad voice id", request(voice_id="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "config.voice_id", ""),
        ("unknown voice", request(voice_id="nobody"), grpc.StatusCode.NOT_FOUND, "", "nobody"),
        (
            "unknown model",
            request(model=common_pb2.ModelRef(name="missing")),
            grpc.StatusCode.NOT_FOUND,
            "",
            "missing",
        ),
        (
            "odd rate",
            request(sample_rate_hz=12_345),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.sample_rate_hz",
            "44100",
        ),
        (
            "unknown encoding",
            request(encoding=999),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.encoding",
            "999",
        ),
        (
            "negative temperature",
            request(temperature=-0.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.temperature",
            "",
        ),
        (
            "NaN temperature",
            request(temperature=math.nan),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.temperature",
            "",
        ),
        ("top_p above 1", request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "config.top_p", "(0, 1]"),
        ("negative top_p", request(top_p=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "config.top_p", ""),
        ("negative top_k", request(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "config.top_k", ""),
        (
            "frames over the cap",
            request(max_new_tokens=751),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.max_new_tokens",
            "750",
        ),
        (
            "negative frames",
            request(max_new_tokens=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.max_new_tokens",
            "",
        ),
    ]
    failures = []
    for streaming in (False, True):
        call = served.stub.SynthesizeOnline if streaming else served.stub.Synthesize
        extra = (
            [
                (
                    "stream of a compressed format",
                    request(encoding=Enc.FLAC),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "config.encoding",
                    "use Synthesize",
                )
            ]
            if streaming
            else []
        )
        for name, req, code, field_path, words in cases + extra:
            try:
                got, message, fields, _ = error(
                    lambda req=req, call=call, streaming=streaming: (
                        list(call(req, timeout=30)) if streaming else call(req, timeout=30)
                    )
                )
            except BaseException as exc:  # the call succeeded: pytest.raises failed
                failures.append(f"{name} (streaming={streaming}): {exc}")
                continue
            ok = (
                got == code
                and words in message
                and (not field_path or any(f == field_path or f.startswith(field_path + ".") for f in fields))
            )
            if not ok:
                failures.append(f"{name} (streaming={streaming}): {got.name} {fields} {message!r}")
    assert not failures, "\n".join(failures)
    assert served.stub.Synthesize(request(encoding=Enc.FLAC), timeout=30).audio.encoding == Enc.FLAC


def test_a_prompt_longer_than_the_model_is_refused(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    served = Served(dramaturg_home, max_new_tokens=4000)
    try:
        code, message, fields, _ = error(
            lambda: served.stub.Synthesize(request(max_new_tokens=2040), timeout=30)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["config.max_new_tokens"], message
        assert "2048 positions" in message
    finally:
        served.stop()


# -- voices -------------------------------------------------------------------------------------------


def add_reference_voice(stub, voice_id: str = "narrator", **fields: object) -> tts_pb2.AddVoiceResponse:
    fields.setdefault("reference_audio", common_pb2.AudioInput(content=wav(speechlike(2.0))))
    fields.setdefault("reference_text", "a calm voice reads this line.")
    return stub.AddVoice(tts_pb2.AddVoiceRequest(voice_id=voice_id, **fields), timeout=30)


def test_reference_voices_are_added_listed_used_persisted_and_removed(served: Served) -> None:
    added = add_reference_voice(served.stub, display_name="Narrator", labels={"cast": "demo"}).voice
    assert (added.voice_id, added.display_name, added.model.name, added.model.version) == (
        "narrator",
        "Narrator",
        "tiny",
        "v1",
    )
    assert added.has_reference and not added.has_adapter and added.reference_seconds == pytest.approx(2.0)
    assert added.labels == {"cast": "demo"} and added.created_at.seconds > 0
    assert [v.voice_id for v in served.stub.ListVoices(tts_pb2.ListVoicesRequest(), timeout=10).voices] == [
        "narrator"
    ]
    assert served.stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="narrator"), timeout=10) == added
    code, *_ = error(lambda: add_reference_voice(served.stub))
    assert code == grpc.StatusCode.ALREADY_EXISTS

    # the voice is its prompt: the same audio as sending the reference with the request
    f32 = {"encoding": Enc.LINEAR_PCM_F32LE}
    voiced = served.stub.Synthesize(request(voice_id="narrator", **f32), timeout=60).audio.content
    zero_shot = served.stub.Synthesize(
        request(
            reference_audio=common_pb2.AudioInput(content=wav(speechlike(2.0))),
            reference_text="a calm voice reads this line.",
            **f32,
        ),
        timeout=60,
    ).audio.content
    plain = served.stub.Synthesize(request(**f32), timeout=60).audio.content
    assert voiced == zero_shot and voiced != plain

    # a crash mid-write leaves a payload folder no voice names: swept on start; the voice survives
    stray = served.home / "voices" / "tts" / "data" / "ghost.0123456789ab"
    stray.mkdir()
    served.restart()
    assert not stray.exists()
    assert served.stub.GetVoice(tts_pb2.GetVoiceRequest(voice_id="narrator"), timeout=10) == added
    assert served.stub.Synthesize(request(voice_id="narrator", **f32), timeout=60).audio.content == voiced

    # overwrite replaces the prompt (and its files)
    replaced = add_reference_voice(
        served.stub,
        overwrite=True,
        speaker=2,
        reference_audio=common_pb2.AudioInput(content=wav(speechlike(1.5, seed=3))),
    )
    assert replaced.voice.speaker == 2 and replaced.voice.reference_seconds == pytest.approx(1.5)
    assert len(list((served.home / "voices" / "tts" / "data").iterdir())) == 1

    removed = served.stub.RemoveVoice(tts_pb2.RemoveVoiceRequest(voice_id="narrator"), timeout=10)
    assert removed.voice.voice_id == "narrator"
    for call in (
        lambda: served.stub.RemoveVoice(tts_pb2.RemoveVoiceRequest(voice_id="narrator"), timeout=10),
        lambda: served.stub.Synthesize(request(voice_id="narrator"), timeout=10),
    ):
        code, message, *_ = error(call)
        assert code == grpc.StatusCode.NOT_FOUND and "narrator" in message
    served.restart()
    assert not served.stub.ListVoices(tts_pb2.ListVoicesRequest(), timeout=10).voices
    assert not list((served.home / "voices" / "tts" / "data").iterdir())


def test_bad_voices_are_refused(served: Served) -> None:
    cases = [
        ({"voice_id": "a b"}, grpc.StatusCode.INVALID_ARGUMENT, "voice_id"),
        ({"voice_id": "v" * 10_000}, grpc.StatusCode.INVALID_ARGUMENT, "voice_id"),
        ({"reference_text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "reference_text"),
        (
            {"reference_audio": common_pb2.AudioInput(content=wav(np.zeros(32_000, np.float32)))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "reference_audio",
        ),  # silence carries no voice
        ({"speaker": -1}, grpc.StatusCode.INVALID_ARGUMENT, "speaker"),
        ({"model": common_pb2.ModelRef(name="missing")}, grpc.StatusCode.NOT_FOUND, ""),
        ({"adapter_path": "/etc"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_path"),
        ({"adapter_path": "../../etc"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_path"),
        ({"adapter_path": "runs\x00"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_path"),
        ({"adapter_path": "models"}, grpc.StatusCode.INVALID_ARGUMENT, "adapter_path"),  # not an adapter
    ]
    for fields, code, field_path in cases:
        voice_id = str(fields.pop("voice_id", "v1"))
        got, message, violations, _ = error(
            lambda v=voice_id, f=fields: add_reference_voice(served.stub, v, **f)
        )
        assert got == code, (fields, message)
        assert not field_path or any(v == field_path or v.startswith(field_path + ".") for v in violations), (
            fields,
            violations,
        )
        assert len(message) < 1100
    neither = tts_pb2.AddVoiceRequest(voice_id="nothing")
    code, message, *_ = error(lambda: served.stub.AddVoice(neither, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter" in message
    assert not served.stub.ListVoices(tts_pb2.ListVoicesRequest(), timeout=10).voices


def write_adapter(folder: Path, seed: int = 0, **model_overrides: object) -> Path:
    """A peft LoRA over a tiny CSM, with random (not identity) weights so it changes the audio."""
    import torch
    from dramaturg.services.tts.model import LORA_TARGET_MODULES, build_tiny_tts_model
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_tts_model(seed=0, **model_overrides)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def test_lora_voices_switch_onto_the_model_without_merging(served: Served) -> None:
    source = write_adapter(served.home / "runs" / "alice-lora")
    voice = served.stub.AddVoice(
        tts_pb2.AddVoiceRequest(voice_id="alice", adapter_path=str(source)), timeout=60
    )
    assert voice.voice.has_adapter and not voice.voice.has_reference
    f32 = {"encoding": Enc.LINEAR_PCM_F32LE}
    base = served.stub.Synthesize(request(**f32), timeout=60).audio.content
    alice = served.stub.Synthesize(request(voice_id="alice", **f32), timeout=60).audio.content
    assert alice != base
    assert served.stub.Synthesize(request(**f32), timeout=60).audio.content == base  # disabled, not merged
    # a second adapter and a voice with both an adapter and a prompt, relative to the adapter roots
    write_adapter(served.home / "runs" / "bob-lora", seed=1)
    served.stub.AddVoice(
        tts_pb2.AddVoiceRequest(
            voice_id="bob",
            adapter_path="runs/bob-lora",
            reference_audio=common_pb2.AudioInput(content=wav(speechlike(2.0))),
            reference_text="a calm voice reads this line.",
        ),
        timeout=60,
    )
    bob = served.stub.Synthesize(request(voice_id="bob", **f32), timeout=60).audio.content
    assert len({base, alice, bob}) == 3
    assert served.stub.Synthesize(request(voice_id="alice", **f32), timeout=60).audio.content == alice

    # the voice keeps its own copy: the training run's folder may go
    for path in source.iterdir():
        path.unlink()
    source.rmdir()
    served.restart()
    assert served.stub.Synthesize(request(voice_id="alice", **f32), timeout=60).audio.content == alice

    # an adapter trained on another architecture does not fit: refused, and the model is unharmed
    misfit = write_adapter(served.home / "runs" / "misfit", hidden_size=32)
    code, message, fields, _ = error(
        lambda: served.stub.AddVoice(
            tts_pb2.AddVoiceRequest(voice_id="misfit", adapter_path=str(misfit)), timeout=60
        )
    )
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["adapter_path"] and "does not fit" in message
    )
    assert served.stub.Synthesize(request(**f32), timeout=60).audio.content == base


def test_a_voice_of_another_model_is_failed_precondition(served: Served) -> None:
    publish_tiny(served.home, "other", seed=1, default=False)
    other = common_pb2.ModelRef(name="other")
    add_reference_voice(served.stub, "stranger", model=other)
    code, message, *_ = error(lambda: served.stub.Synthesize(request(voice_id="stranger"), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "other:v1" in message and "tiny:v1" in message and "config.model" in message
    reply = served.stub.Synthesize(request(voice_id="stranger", model=other), timeout=60)
    assert reply.model.name == "other" and reply.generated_frames == 12


# -- deadlines and admission --------------------------------------------------------------------------

LONG = 700  # frames: tens of seconds on this machine's CPU, were it not stopped


def test_a_passed_deadline_stops_generation(served: Served) -> None:
    for streaming in (False, True):
        began = time.monotonic()
        if streaming:
            code, *_ = error(
                lambda: list(served.stub.SynthesizeOnline(request(max_new_tokens=LONG), timeout=1.0))
            )
        else:
            code, *_ = error(lambda: served.stub.Synthesize(request(max_new_tokens=LONG), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # the model thread stopped at the next frame, not after the 700: the slot is free at once
        wait_for(lambda: served.limiter.running == 0, 3.0, "the generation to stop")
        assert time.monotonic() - began < 4.0
    began = time.monotonic()
    assert served.stub.Synthesize(request(), timeout=30).generated_frames == 12
    assert time.monotonic() - began < 3.0


def test_a_cancelled_stream_stops_generation(served: Served) -> None:
    stream = served.stub.SynthesizeOnline(request(max_new_tokens=LONG), timeout=60)
    assert next(stream).audio_chunk  # generation runs
    stream.cancel()
    wait_for(lambda: served.limiter.running == 0, 3.0, "the generation to stop")


def test_a_full_queue_is_resource_exhausted_with_a_retry_delay(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    served = Served(dramaturg_home, max_waiting=0)
    try:
        busy = served.stub.Synthesize.future(request(max_new_tokens=LONG), timeout=60)
        wait_for(lambda: served.limiter.running == 1, 10.0, "the first synthesis to start")
        for call in (
            served.stub.Synthesize,
            lambda r, timeout: list(served.stub.SynthesizeOnline(r, timeout=timeout)),
        ):
            code, message, _, retry = error(lambda call=call: call(request(), timeout=30))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in message
            assert retry is not None and retry >= 1.0
        busy.cancel()
        wait_for(lambda: served.limiter.running == 0, 3.0, "the cancelled synthesis to stop")
        assert served.stub.Synthesize(request(), timeout=30).generated_frames == 12
    finally:
        served.stop()


def test_adapters_published_in_the_store_become_voices_of_their_base_model(dramaturg_home: Path) -> None:
    """What the lora recipes publish: an adapter version in the tts store whose adapter_meta.json names
    its base model and speaker id. The voice belongs to that base even when another model is the default."""
    import json

    from dramaturg.common.v1 import common_pb2_grpc

    publish_tiny(dramaturg_home)
    publish_tiny(dramaturg_home, "other", seed=1)  # the default now
    store = ModelStore(dramaturg_home)
    with store.create_version(
        "tts", "carol-lora", architecture="csm-lora", base_model="tiny:v1", recipe="lora"
    ) as staging:
        write_adapter(Path(staging))
        (Path(staging) / "adapter_meta.json").write_text(
            json.dumps({"base_model": "tiny:v1", "speaker": "carol", "speaker_id": 3})
        )
    served = Served(dramaturg_home)
    try:
        carol = common_pb2.ModelRef(name="carol-lora")
        voice = served.stub.AddVoice(
            tts_pb2.AddVoiceRequest(voice_id="carol", adapter_model=carol), timeout=60
        )
        assert voice.voice.model.name == "tiny" and voice.voice.speaker == 3 and voice.voice.has_adapter
        assert voice.voice.adapter_source == "carol-lora:v1"
        reply = served.stub.Synthesize(
            request(voice_id="carol", model=common_pb2.ModelRef(name="tiny")), timeout=60
        )
        assert reply.model.name == "tiny" and reply.generated_frames == 12
        # naming another model than the adapter's base is refused, and so is serving the adapter as a model
        code, message, *_ = error(
            lambda: served.stub.AddVoice(
                tts_pb2.AddVoiceRequest(
                    voice_id="carol2", adapter_model=carol, model=common_pb2.ModelRef(name="other")
                ),
                timeout=60,
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "tiny:v1" in message
        repo = common_pb2_grpc.ModelRepositoryStub(served.channel)
        code, message, *_ = error(
            lambda: repo.LoadModel(common_pb2.LoadModelRequest(model=carol), timeout=30)
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "AddVoice" in message
        code, *_ = error(
            lambda: served.stub.AddVoice(
                tts_pb2.AddVoiceRequest(voice_id="x", adapter_model=carol, adapter_path="runs"), timeout=60
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        served.stop()


def test_a_speaker_the_model_was_trained_on_is_a_voice_id(dramaturg_home: Path) -> None:
    """A model's speakers.json (what the full / lora recipes write) names voices without AddVoice:
    its names are voice ids, prompted with their trained speaker id; others are NOT_FOUND with the list."""
    from dramaturg.services.tts.model import write_tiny_model

    store = ModelStore(dramaturg_home)
    with store.create_version("tts", "trained", architecture="tiny", base_model="", recipe="test") as staging:
        write_tiny_model(Path(staging), dramaturg_home, seed=0)
        (Path(staging) / "speakers.json").write_text(json.dumps({"alice": 3, "bob": 5}))
    store.set_default("tts", "trained")
    running = Served(dramaturg_home)
    try:
        alice = samples_of(running.stub.Synthesize(request(voice_id="alice"), timeout=60).audio)
        again = samples_of(running.stub.Synthesize(request(voice_id="alice"), timeout=60).audio)
        bob = samples_of(running.stub.Synthesize(request(voice_id="bob"), timeout=60).audio)
        plain = samples_of(running.stub.Synthesize(request(), timeout=60).audio)  # speaker 0
        code, message, _, _ = error(lambda: running.stub.Synthesize(request(voice_id="carol"), timeout=60))
    finally:
        running.stop()
    assert np.array_equal(alice, again)  # same seed, same speaker: the same audio
    assert not np.array_equal(alice, bob) and not np.array_equal(alice, plain)  # the speaker id is used
    assert code == grpc.StatusCode.NOT_FOUND and "trained on speakers: alice, bob" in message
