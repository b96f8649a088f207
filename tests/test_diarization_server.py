"""The diarization service over real gRPC: Diarize, StreamingDiarize, errors, concurrency bounds.

One server (module scope) serves an untrained but complete pyannote pipeline published into a
temporary model store; the audio is a synthetic drama scene with an exact reference RTTM. The model
is untrained, so these tests check the serving contract (shapes, consistency with pyannote called
directly, RTTM, streaming bookkeeping), not accuracy; the stream tracker's label mapping is checked
for exactness on oracle windows made from the reference RTTM.
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
from dramaturg.services.diarization.config import DiarizationSettings
from dramaturg.services.diarization.inference import DiarizationResult, SpeakerHints, Turn
from dramaturg.services.diarization.server import DiarizationService
from dramaturg.services.diarization.streaming import StreamTracker
from dramaturg.shared.cancellation import Stopped
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.store import ModelStore
from helpers import ServerThread, wait_for

pytest.importorskip("pyannote.audio")

SCENE = "test_000"
STREAM_SETTINGS = {
    "stream_window_seconds": 8.0,
    "stream_step_seconds": 4.0,
    "stream_settle_seconds": 2.0,
    "stream_max_window_seconds": 12.0,
}


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    config = SynthConfig(
        num_speakers=4,
        heldout_speakers=2,
        scenes_train=1,
        scenes_dev=1,
        scenes_test=1,
        lines_per_scene=6,
        utterances_per_speaker=2,
        raters=1,
    )
    out = tmp_path_factory.mktemp("corpus") / "synth"
    synthesize_corpus(out, config)
    return out / "diarization"


@pytest.fixture(scope="module")
def scene(corpus: Path) -> tuple[bytes, np.ndarray, int, list[Turn]]:
    wav = corpus / "wav" / f"{SCENE}.wav"
    samples, rate = sf.read(wav, dtype="float32")
    reference = []
    for line in (corpus / "rttm" / f"{SCENE}.rttm").read_text().splitlines():
        f = line.split()
        reference.append(Turn(float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return wav.read_bytes(), samples, rate, reference


def publish(home: Path, name: str, seed: int = 0, default: bool = True) -> Path:
    from dramaturg.services.diarization.model import default_artifact

    store = ModelStore(home)
    writer = store.create_version("diarization", name, architecture="pyannote", base_model="", recipe="test")
    with writer as staging:
        default_artifact(staging, home, seed=seed)
    if default:
        store.set_default("diarization", name)
    return writer.record.path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    publish(home, "tiny")
    settings = DiarizationSettings(max_concurrent=1, max_waiting=1, **STREAM_SETTINGS)
    service = DiarizationService(settings, home=home)
    with ServerThread(service) as srv, grpc.insecure_channel(srv.target) as channel:
        yield srv, service, diarization_pb2_grpc.DiarizationStub(channel), home


def wav_input(content: bytes) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)


def error(call) -> tuple[grpc.StatusCode, str, list, float | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    detail = details_from_error(info.value)
    return detail.code, detail.message, detail.field_violations, detail.retry_after_seconds


def stream_requests(config: diarization_pb2.StreamingDiarizationConfig | None, chunks: list[bytes]):
    if config is not None:
        yield diarization_pb2.StreamingDiarizeRequest(streaming_config=config)
    for chunk in chunks:
        yield diarization_pb2.StreamingDiarizeRequest(audio_content=chunk)


def spans(turns) -> list[tuple[float, float, str]]:
    return [(round(t.span.start, 3), round(t.span.end, 3), t.speaker) for t in turns]


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, current = 0.0, None
    for a, b in sorted(intervals):
        if current is None or a > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = [a, b]
        else:
            current[1] = max(current[1], b)
    return total + (current[1] - current[0] if current else 0.0)


# ------------------------------------------------------------------------------------------- Diarize


def test_diarize_scene_matches_pyannote_and_is_consistent(server, scene) -> None:
    from dramaturg.services.diarization.model import diarize, load_pipeline

    _, _, stub, home = server
    content, samples, rate, _ = scene
    duration = len(samples) / rate
    reply = stub.Diarize(
        diarization_pb2.DiarizeRequest(request_id="d1", audio=wav_input(content), uri=SCENE), timeout=120
    )
    assert reply.request_id == "d1"
    assert (reply.model.name, reply.model.version) == ("tiny", "v1")
    assert reply.audio_seconds == pytest.approx(duration, abs=1e-3)
    assert reply.turns, "no turns on a scene full of speech"
    for t in [*reply.turns, *reply.exclusive_turns]:
        assert 0.0 <= t.span.start < t.span.end <= duration + 1e-3, t
        assert 0.0 <= t.confidence <= 1.0 and t.speaker.startswith("SPEAKER_")
    assert list(reply.speakers) == sorted({t.speaker for t in reply.turns})

    # RTTM: one 10-field line per turn, same numbers as the turns
    lines = reply.rttm.splitlines()
    assert len(lines) == len(reply.turns)
    for line, t in zip(lines, reply.turns, strict=True):
        f = line.split()
        assert len(f) == 10 and f[0] == "SPEAKER" and f[1] == SCENE and f[2] == "1" and f[7] == t.speaker
        assert f[5] == f[6] == f[8] == f[9] == "<NA>"
        assert float(f[3]) == pytest.approx(t.span.start, abs=1e-3)
        assert float(f[3]) + float(f[4]) == pytest.approx(t.span.end, abs=2e-3)

    # exclusive turns: never two at once, and each inside its speaker's (overlapping) turns
    excl = sorted(spans(reply.exclusive_turns))
    for (_, e1, _), (s2, _, _) in itertools.pairwise(excl):
        assert s2 >= e1 - 1e-3
    for s, e, spk in excl:
        inside = sum(
            max(0.0, min(e, t.span.end) - max(s, t.span.start)) for t in reply.turns if t.speaker == spk
        )
        assert inside == pytest.approx(e - s, abs=2e-3)

    # the same as pyannote's pipeline called directly on the same artifact and samples
    import torch

    pipeline = load_pipeline(ModelStore(home).resolve("diarization", "tiny").path, "cpu")
    overlapping, _ = diarize(pipeline, {"waveform": torch.from_numpy(samples)[None], "sample_rate": rate})
    direct = sorted(
        (round(s.start, 3), round(min(s.end, duration), 3), str(label))
        for s, _, label in overlapping.itertracks(yield_label=True)
    )
    assert sorted(spans(reply.turns)) == direct


def test_speaker_hints_reach_the_pipeline(server, scene) -> None:
    _, _, stub, _ = server
    content = scene[0]
    for config, expected in (
        (diarization_pb2.DiarizationConfig(num_speakers=2), 2),
        (diarization_pb2.DiarizationConfig(max_speakers=1), 1),
    ):
        reply = stub.Diarize(
            diarization_pb2.DiarizeRequest(audio=wav_input(content), config=config), timeout=120
        )
        assert len(reply.speakers) == expected, (config, list(reply.speakers))
        # no uri: the RTTM names the file by the request id the server made up
        assert reply.request_id and reply.rttm.split()[1] == reply.request_id


def test_saved_and_reloaded_artifact_answers_the_same(server, scene) -> None:
    from dramaturg.services.diarization.model import load_pipeline, pipeline_params, save_artifact

    _, _, stub, home = server
    store = ModelStore(home)
    pipeline = load_pipeline(store.resolve("diarization", "tiny").path, "cpu")
    writer = store.create_version(
        "diarization", "resaved", architecture="pyannote", base_model="tiny:v1", recipe="test"
    )
    with writer as staging:
        save_artifact(
            staging,
            pipeline._segmentation.model,
            params=pipeline_params(pipeline),
            embedding={"kind": "speaker-store", "model": pipeline.embedding},
            metrics={},
        )
    request = diarization_pb2.DiarizeRequest(audio=wav_input(scene[0]), uri=SCENE)
    original = stub.Diarize(request, timeout=120)
    request.config.model.name = "resaved"
    reloaded = stub.Diarize(request, timeout=120)
    assert (reloaded.model.name, reloaded.model.version) == ("resaved", "v1")
    assert spans(reloaded.turns) == spans(original.turns)
    assert spans(reloaded.exclusive_turns) == spans(original.exclusive_turns)
    assert [t.confidence for t in reloaded.turns] == pytest.approx([t.confidence for t in original.turns])
    assert reloaded.rttm == original.rttm


def test_bad_requests(server, scene) -> None:
    _, _, stub, _ = server
    content, samples, rate, _ = scene
    buf = io.BytesIO()
    sf.write(buf, samples[: int(0.3 * rate)], rate, format="WAV")
    short = buf.getvalue()
    ok = wav_input(content)
    cfg = diarization_pb2.DiarizationConfig
    cases = [
        (diarization_pb2.DiarizeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "audio", ""),
        (
            diarization_pb2.DiarizeRequest(audio=wav_input(b"")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.content",
            "empty",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=wav_input(b"RIFF" + b"junk" * 200)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.content",
            "decode",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=wav_input(short)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio.content",
            "at least",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, config=cfg(model=common_pb2.ModelRef(name="nope"))),
            grpc.StatusCode.NOT_FOUND,
            None,
            "nope",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, config=cfg(num_speakers=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.num_speakers",
            "≥ 0",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, config=cfg(min_speakers=3, max_speakers=2)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.min_speakers",
            "above max_speakers",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, config=cfg(num_speakers=4, max_speakers=2)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.num_speakers",
            "contradicts",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, config=cfg(num_speakers=2, min_speakers=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.num_speakers",
            "contradicts",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, config=cfg(max_speakers=10_000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.max_speakers",
            "typo",
        ),
        (
            diarization_pb2.DiarizeRequest(audio=ok, uri="my scene"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "uri",
            "whitespace",
        ),
    ]
    for request, expected, field_path, hint in cases:
        code, message, violations, _ = error(lambda request=request: stub.Diarize(request, timeout=30))
        assert code == expected, (request, code, message)
        assert hint in message, message
        if field_path:
            assert violations and violations[0][0] == field_path, violations


# ---------------------------------------------------------------------------------- StreamingDiarize


def test_streaming_covers_the_file_once_and_ends_final(server, scene) -> None:
    _, service, stub, _ = server
    content, samples, rate, _ = scene
    duration = len(samples) / rate
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    chunks = [pcm[i : i + 6001] for i in range(0, len(pcm), 6001)]  # odd sizes: samples torn in two
    config = diarization_pb2.StreamingDiarizationConfig(
        request_id="s1", encoding=common_pb2.LINEAR_PCM_S16LE, sample_rate_hz=rate, uri=SCENE
    )
    replies = list(stub.StreamingDiarize(stream_requests(config, chunks), timeout=240))
    assert replies and replies[-1].is_final and not any(r.is_final for r in replies[:-1])
    assert all(r.request_id == "s1" for r in replies)
    processed = [r.processed_seconds for r in replies]
    assert processed == sorted(processed) and processed[-1] == pytest.approx(duration, abs=1e-3)
    assert len(replies) >= 3, "a 17 s stream with 4 s steps should answer while it streams"

    turns = [t for r in replies for t in r.turns]
    assert turns
    sent = spans(turns)
    assert len(sent) == len(set(sent)), "a turn was sent twice"
    by_speaker: dict[str, list[tuple[float, float]]] = {}
    for s, e, spk in sent:
        assert 0.0 <= s < e <= duration + 1e-3
        by_speaker.setdefault(spk, []).append((s, e))
    for spk, intervals in by_speaker.items():  # each speaker's turns: in order, never overlapping
        assert intervals == sorted(intervals), spk
        for (_, e1), (s2, _) in itertools.pairwise(intervals):
            assert s2 >= e1 - 1e-3, (spk, intervals)
    # the stream covers the speech the whole-file diarization finds
    offline = stub.Diarize(diarization_pb2.DiarizeRequest(audio=wav_input(content)), timeout=120)
    offline_speech = union_seconds([(t.span.start, t.span.end) for t in offline.turns])
    streamed_speech = union_seconds([(s, e) for s, e, _ in sent])
    assert streamed_speech >= 0.8 * offline_speech, (streamed_speech, offline_speech)
    assert service.limiter.running == 0 and service.limiter.waiting == 0


def test_stream_errors(server, scene) -> None:
    _, _, stub, _ = server
    pcm = (scene[1][:16000] * 32767).astype("<i2").tobytes()
    good = diarization_pb2.StreamingDiarizationConfig(
        encoding=common_pb2.LINEAR_PCM_S16LE, sample_rate_hz=16000
    )
    cases = [
        (stream_requests(None, [pcm]), grpc.StatusCode.FAILED_PRECONDITION, "streaming_config first"),
        (stream_requests(None, []), grpc.StatusCode.FAILED_PRECONDITION, "streaming_config first"),
        (
            stream_requests(
                diarization_pb2.StreamingDiarizationConfig(encoding=common_pb2.WAV, sample_rate_hz=16000),
                [pcm],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "LINEAR_PCM",
        ),
        (
            stream_requests(
                diarization_pb2.StreamingDiarizationConfig(encoding=common_pb2.LINEAR_PCM_F32LE), [pcm]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sample rate",
        ),
        (stream_requests(good, []), grpc.StatusCode.INVALID_ARGUMENT, "before any audio"),
        (stream_requests(good, [pcm[:3001]]), grpc.StatusCode.INVALID_ARGUMENT, "stray byte"),
        (stream_requests(good, [pcm[:8000]]), grpc.StatusCode.INVALID_ARGUMENT, "at least"),
        (
            iter(
                [
                    diarization_pb2.StreamingDiarizeRequest(streaming_config=good),
                    diarization_pb2.StreamingDiarizeRequest(streaming_config=good),
                ]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "once",
        ),
        (
            stream_requests(
                diarization_pb2.StreamingDiarizationConfig(
                    encoding=common_pb2.LINEAR_PCM_S16LE,
                    sample_rate_hz=16000,
                    config=diarization_pb2.DiarizationConfig(min_speakers=-2),
                ),
                [pcm],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "min_speakers",
        ),
    ]
    for requests, expected, hint in cases:
        code, message, _, _ = error(
            lambda requests=requests: list(stub.StreamingDiarize(requests, timeout=60))
        )
        assert code == expected and hint in message, (code, message)


def _oracle_window(
    reference: list[Turn], start: float, end: float, window_index: int, voices: dict[str, np.ndarray]
) -> DiarizationResult:
    """What a perfect diarizer would answer for [start, end), with labels shuffled per window."""
    rng = np.random.default_rng(window_index)
    names = sorted(voices)
    local = {spk: f"LOCAL_{i}" for i, spk in zip(rng.permutation(len(names)), names, strict=True)}
    turns = [
        Turn(max(t.start, start), min(t.end, end), local[t.speaker], 0.9)
        for t in reference
        if t.end > start and t.start < end and min(t.end, end) - max(t.start, start) > 0.05
    ]
    centroids = {
        local[s]: v + rng.normal(0, 0.05, v.shape)
        for s, v in voices.items()
        if any(t.speaker == local[s] for t in turns)
    }
    return DiarizationResult(turns, turns, sorted({t.speaker for t in turns}), centroids)


@pytest.mark.parametrize("evidence", ["both", "overlap", "centroid"])
def test_stream_tracker_recovers_the_reference_from_oracle_windows(scene, evidence: str) -> None:
    """Exact windows with shuffled labels must come out as the reference, each turn once, stably labelled.

    "overlap": windows carry no centroids, speakers are matched by the time they share with the previous
    window; "centroid": overlap evidence is switched off (threshold above any ratio).
    """
    _, samples, rate, reference = scene
    duration = len(samples) / rate
    settings = DiarizationSettings(**{**STREAM_SETTINGS, "stream_step_seconds": 2.0})
    rng = np.random.default_rng(1)
    voices = {
        s: v / np.linalg.norm(v)
        for s, v in ((s, rng.normal(size=32)) for s in {t.speaker for t in reference})
    }
    tracker = StreamTracker(settings, SpeakerHints())
    if evidence == "centroid":
        tracker.overlap_match = 1.01  # beyond any overlap ratio: only the centroids can match speakers
    sent: list[Turn] = []
    audio_end, ended, k = 0.0, False, 0
    while True:
        window = tracker.next_window(audio_end, ended)
        if window is None:
            if ended:
                break
            audio_end = min(duration, audio_end + 0.5)
            ended = audio_end >= duration
            continue
        assert window.end - window.start <= settings.stream_max_window_seconds + 1e-9
        result = _oracle_window(reference, window.start, window.end, k, voices)
        if evidence == "overlap":
            result.centroids = {}
        sent += tracker.absorb(window, result)
        k += 1
    sent += tracker.finish()
    assert k >= 5
    mapping: dict[str, str] = {}
    for t in sent:
        match = [r for r in reference if abs(r.start - t.start) < 1e-6 and abs(r.end - t.end) < 1e-6]
        assert match, f"{t} is not a reference turn"
        assert mapping.setdefault(t.speaker, match[0].speaker) == match[0].speaker, (
            "a stream label changed voice"
        )
    assert len(set(mapping.values())) == len(mapping), "two stream labels for one voice"
    expected = sorted((round(r.start, 6), round(r.end, 6), r.speaker) for r in reference)
    assert sorted((round(t.start, 6), round(t.end, 6), mapping[t.speaker]) for t in sent) == expected


def test_stream_tracker_cuts_a_turn_longer_than_the_window() -> None:
    settings = DiarizationSettings(**STREAM_SETTINGS)
    tracker = StreamTracker(settings, SpeakerHints())
    voice = {"A": np.ones(8) / np.sqrt(8)}
    reference = [Turn(0.5, 39.5, "A")]
    sent: list[Turn] = []
    for end in np.arange(4.0, 41.0, 4.0):
        window = tracker.next_window(min(end, 40.0), ended=end >= 40.0)
        assert window is not None and window.end - window.start <= 12.0 + 1e-9
        sent += tracker.absorb(window, _oracle_window(reference, window.start, window.end, int(end), voice))
    sent += tracker.finish()
    assert len({t.speaker for t in sent}) == 1 and len(sent) >= 2
    assert sent[0].start == pytest.approx(0.5) and sent[-1].end == pytest.approx(39.5)
    for a, b in itertools.pairwise(sent):
        assert b.start == pytest.approx(a.end)  # cut pieces join exactly: covered once, no gap


# --------------------------------------------------------------------------------------- concurrency


@pytest.fixture()
def blocked_model(server):
    """The served model with its diarize replaced by one that waits for a gate (and honours stops)."""
    srv, service, _, _ = server
    loaded = srv.call(service.models.get(common_pb2.ModelRef()))
    gate = threading.Event()

    def diarize(samples, uri, hints, should_stop=lambda: None):
        while not gate.is_set():
            reason = should_stop()
            if reason:
                raise Stopped(reason)
            time.sleep(0.01)
        turn = Turn(0.0, 1.0, "SPEAKER_00", 1.0)
        return DiarizationResult([turn], [turn], ["SPEAKER_00"])

    loaded.model.diarize = diarize
    try:
        yield gate
    finally:
        gate.set()
        del loaded.model.diarize




def _sample(name: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"service": "diarization", "queue": "diarize"})


def depth() -> float | None:
    return _sample("dramaturg_queue_depth")


def capacity() -> float | None:
    return _sample("dramaturg_queue_capacity")


def test_bounded_concurrency_answers_resource_exhausted(server, scene, blocked_model) -> None:
    _, service, stub, _ = server
    limiter = service.limiter
    request = diarization_pb2.DiarizeRequest(audio=wav_input(scene[0]))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(stub.Diarize, request, timeout=60)
        wait_for(lambda: limiter.running == 1)
        second = pool.submit(stub.Diarize, request, timeout=60)
        wait_for(lambda: limiter.waiting == 1)
        assert depth() == 1.0 and capacity() == 1.0  # what the dashboards and the HPA read
        code, message, _, retry = error(lambda: stub.Diarize(request, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in message
        assert retry is not None and retry >= 1.0
        config = diarization_pb2.StreamingDiarizationConfig(
            encoding=common_pb2.LINEAR_PCM_S16LE, sample_rate_hz=16000
        )
        code, _, _, retry = error(
            lambda: list(stub.StreamingDiarize(stream_requests(config, [b"\0\0"]), timeout=30))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry is not None
        blocked_model.set()
        assert [t.speaker for t in first.result().turns] == ["SPEAKER_00"]
        assert second.result().turns
    assert limiter.running == 0 and limiter.waiting == 0 and depth() == 0.0


def test_deadline_and_cancellation_stop_the_worker(server, scene, blocked_model) -> None:
    _, service, stub, _ = server
    limiter = service.limiter
    request = diarization_pb2.DiarizeRequest(audio=wav_input(scene[0]))
    code, _, _, _ = error(lambda: stub.Diarize(request, timeout=1.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: limiter.running == 0, 5.0)  # the worker noticed and gave its slot back
    call = stub.Diarize.future(request, timeout=60)
    wait_for(lambda: limiter.running == 1)
    call.cancel()
    wait_for(lambda: limiter.running == 0, 5.0)
    blocked_model.set()
    assert stub.Diarize(request, timeout=30).turns  # the service still serves


def test_clustering_cap_thins_the_embeddings_but_still_diarizes(server, scene, caplog) -> None:
    """Long files cluster an evenly spaced subset (max_clustering_embeddings); every chunk keeps a speaker."""
    from dramaturg.services.diarization.inference import LoadedDiarizationModel
    from dramaturg.services.diarization.model import load_pipeline

    _, _, _, home = server
    record = ModelStore(home).resolve("diarization", "tiny")
    capped = LoadedDiarizationModel(
        load_pipeline(record.path, "cpu"), record, DiarizationSettings(max_clustering_embeddings=10)
    )
    _, samples, rate, _ = scene
    with caplog.at_level("INFO", logger="dramaturg.services.diarization.inference"):
        result = capped.diarize(samples, SCENE, SpeakerHints(num=2))
    assert any("clustering 10 of" in r.getMessage() for r in caplog.records), caplog.text
    assert len(result.speakers) == 2 and result.turns
    assert union_seconds([(t.start, t.end) for t in result.turns]) > 0.5 * len(samples) / rate
