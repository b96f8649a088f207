"""revoice_scene: choosing, splicing and loudness matching on their own, then the job end to end on
the five tiny services (the untrained TTS cannot pass the guards, so the strict run keeps every line;
a run with the guards off splices its best take in and leaves the rest of the scene untouched)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import grpc
import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.revoice import (
    CROSSFADE_SECONDS,
    choose,
    judged,
    match_loudness,
    parse_script,
    splice,
    words_for,
)
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.scoring import word_error_rate
from google.protobuf import json_format

RATE = 16_000


def tone(seconds: float, level: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# ============================================================================================== units


def test_splice_replaces_only_the_span_with_crossfades() -> None:
    scene = np.random.default_rng(0).uniform(-0.1, 0.1, 3 * RATE).astype(np.float32)
    take = tone(0.5, 0.3)  # shorter than the 1-s span: padded with silence
    out, fit = splice(scene, 1.0, 2.0, take)
    a, b, n = RATE, 2 * RATE, round(CROSSFADE_SECONDS * RATE)
    assert out.shape == scene.shape and fit == "padded 0.50 s"
    assert np.array_equal(out[:a], scene[:a]) and np.array_equal(out[b:], scene[b:])
    assert np.allclose(out[a + n : a + len(take)], take[n:])  # the take itself, after the fade-in
    assert out[a] == pytest.approx(scene[a])  # the cross-fade starts from the original
    longer, cut = splice(scene, 1.0, 2.0, tone(1.5, 0.3))
    assert cut == "cut 0.50 s" and np.array_equal(longer[b:], scene[b:])


def test_loudness_is_matched_by_ebu_r128_and_by_rms_when_too_short() -> None:
    meter = pyloudnorm.Meter(RATE)
    original, take = tone(1.0, 0.05), tone(1.0, 0.5, hz=300.0)
    matched, info = match_loudness(take, original)
    assert info["method"] == "EBU R128" and info["gain_db"] < -15
    assert meter.integrated_loudness(matched) == pytest.approx(meter.integrated_loudness(original), abs=0.5)
    _, info = match_loudness(tone(0.2, 0.5), tone(0.2, 0.05))
    assert info["method"] == "RMS" and info["gain_db"] == pytest.approx(-20.0, abs=0.1)
    loud, _ = match_loudness(tone(1.0, 0.01), tone(1.0, 0.9))  # never pushed past full scale
    assert np.max(np.abs(loud)) <= 0.999 + 1e-6


def test_the_best_take_that_passes_both_guards_wins() -> None:
    takes = [{"take": 0, "mean_score": 4.9, "wer": 0.8, "same_speaker": True},
             {"take": 1, "mean_score": 3.1, "wer": 0.1, "same_speaker": True},
             {"take": 2, "mean_score": 4.0, "wer": 0.2, "same_speaker": False}]
    assert choose(takes, 0.5, True)[0]["take"] == 1
    assert choose(takes, 0.5, False)[0]["take"] == 2
    best, reason = choose(takes, 0.05, True)
    assert best is None and "3 of 3 over WER 0.05" in reason and "1 of 3 not the character's voice" in reason


def test_a_take_a_judge_refuses_fails_that_check_and_the_job_goes_on() -> None:
    import asyncio

    async def refuse(code: grpc.StatusCode) -> dict:
        metadata = grpc.aio.Metadata()
        raise grpc.aio.AioRpcError(code, metadata, metadata, details="0.40 s is too short")

    verdict = asyncio.run(judged(refuse(grpc.StatusCode.INVALID_ARGUMENT),
                                 {"similarity": None, "same_speaker": False}, "voice"))
    assert verdict == {"similarity": None, "same_speaker": False, "voice_refused": "0.40 s is too short"}
    with pytest.raises(grpc.aio.AioRpcError):  # a service that is down is the stage's failure (retried)
        asyncio.run(judged(refuse(grpc.StatusCode.UNAVAILABLE), {}, "voice"))
    takes = [{"take": 0, "mean_score": None, "wer": 0.0, "same_speaker": True},
             {"take": 1, "mean_score": 2.0, "wer": 0.0, "same_speaker": True}]
    assert choose(takes, 0.5, True)[0]["take"] == 1
    assert "1 of 1 not scored" in choose(takes[:1], 0.5, True)[1]


def test_words_come_from_the_script_then_the_transcript() -> None:
    script = parse_script([{"start": 0.0, "end": 2.0, "text": "Hello there."},
                           {"start": 5.0, "end": 6.0, "text": "Far away."}])
    assert words_for({"start": 0.2, "end": 1.9}, script, "helo") == ("Hello there.", "script")
    assert words_for({"start": 3.0, "end": 4.0}, script, "heard this") == ("heard this", "transcript")
    assert words_for({"start": 3.0, "end": 4.0}, script, " ") == ("", "")
    assert word_error_rate("Hello, there!", "hello there") == 0.0
    assert word_error_rate("hello there", "") == 1.0
    with pytest.raises(ServiceError, match=r"script\[0\]"):
        parse_script([{"start": 2.0, "end": 1.0, "text": "x"}])


# ======================================================================================== end to end


def test_revoice_scene_end_to_end_on_the_tiny_services(dramaturg_home: Path, tmp_path: Path) -> None:
    from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
    from dramaturg.services.audiollm.config import AudioLlmSettings
    from dramaturg.services.audiollm.server import AudioLlmService
    from dramaturg.services.diarization.config import DiarizationSettings
    from dramaturg.services.diarization.server import DiarizationService
    from dramaturg.services.evaluator.config import EvaluatorSettings
    from dramaturg.services.evaluator.server import EvaluatorService
    from dramaturg.services.gateway.config import GatewaySettings
    from dramaturg.services.gateway.server import GatewayService
    from dramaturg.services.speaker.config import SpeakerSettings
    from dramaturg.services.speaker.server import SpeakerService
    from dramaturg.services.tts.config import TtsSettings
    from dramaturg.services.tts.server import TtsService
    from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc
    from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc
    from helpers import ServerThread
    from test_audiollm_server import publish_tiny as publish_audiollm
    from test_diarization_server import publish as publish_diarization
    from test_evaluator_server import publish_tiny as publish_evaluator
    from test_speaker_server import publish_tiny as publish_speaker
    from test_tts_server import publish_tiny as publish_tts

    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, SynthConfig(num_speakers=4, heldout_speakers=2, scenes_train=1,
                                          scenes_dev=1, scenes_test=1, lines_per_scene=4,
                                          utterances_per_speaker=2, raters=1))
    wav = corpus / "diarization" / "wav" / "test_000.wav"
    content = wav.read_bytes()
    samples, _ = sf.read(wav, dtype="int16")
    publish_diarization(dramaturg_home, "tiny-diarization")
    publish_speaker(dramaturg_home)
    publish_audiollm(dramaturg_home, "tiny-audiollm")
    publish_evaluator(dramaturg_home, "tiny-evaluator")
    publish_tts(dramaturg_home, "tiny-tts")
    audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
    auth = (("authorization", "Bearer t"),)
    with (
        ServerThread(DiarizationService(DiarizationSettings(), home=dramaturg_home)) as diarization,
        ServerThread(SpeakerService(SpeakerSettings(min_seconds=0.5), home=dramaturg_home)) as speaker,
        ServerThread(AudioLlmService(AudioLlmSettings(), home=dramaturg_home)) as audiollm,
        ServerThread(EvaluatorService(EvaluatorSettings(), home=dramaturg_home)) as evaluator,
        ServerThread(TtsService(TtsSettings(default_max_new_tokens=20), home=dramaturg_home)) as tts,
    ):
        with grpc.insecure_channel(diarization.target) as channel:
            direct = diarization_pb2_grpc.DiarizationStub(channel).Diarize(
                diarization_pb2.DiarizeRequest(audio=audio, uri="scene"), timeout=300)
        turns = [(round(t.span.start, 3), round(t.span.end, 3)) for t in direct.exclusive_turns]
        first = next(t for t in turns if t[1] - t[0] >= 0.5)
        clip = io.BytesIO()
        sf.write(clip, samples[round(first[0] * RATE) : round(first[1] * RATE)], RATE, format="WAV")
        reference = common_pb2.AudioInput(encoding=common_pb2.WAV, content=clip.getvalue())
        with grpc.insecure_channel(speaker.target) as channel:  # the character, from its own line
            speaker_pb2_grpc.SpeakerStub(channel).Enroll(
                speaker_pb2.EnrollRequest(voice_id="captain", audio=[reference]), timeout=60)
        with grpc.insecure_channel(tts.target) as channel:
            tts_pb2_grpc.TextToSpeechStub(channel).AddVoice(
                tts_pb2.AddVoiceRequest(voice_id="captain", reference_audio=reference,
                                        reference_text="Ahoy there."), timeout=60)
        services = {"diarization": diarization.target, "speaker": speaker.target, "audiollm": audiollm.target,
                    "evaluator": evaluator.target, "tts": tts.target}
        gateway = GatewayService(GatewaySettings(api_token="t", services=services), home=dramaturg_home)
        with ServerThread(gateway) as gw, grpc.insecure_channel(gw.target) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            def run(**params: object) -> gateway_pb2.Job:
                request = gateway_pb2.SubmitJobRequest(pipeline="revoice_scene", audio=audio)
                script = [{"start": first[0], "end": first[1], "text": "Ahoy there."}]
                request.params.update({"uri": "scene", "min_segment_seconds": 0.5, "max_transcript_tokens": 4,
                                       "line_ids": [0], "candidates": 2, "script": script, **params})
                job = stub.SubmitJob(request, metadata=auth, timeout=30)
                events = list(stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job.job_id), metadata=auth,
                                            timeout=600))
                return events[-1].job

            strict = run()
            relaxed = run(max_wer=100.0, require_same_speaker=False, seed=7)
            wanted = gateway_pb2.GetJobFileRequest(job_id=relaxed.job_id, name="revoiced.wav")
            chunks = stub.GetJobFile(wanted, metadata=auth, timeout=30)
            revoiced, _ = sf.read(io.BytesIO(b"".join(c.data for c in chunks)), dtype="int16")
            with pytest.raises(grpc.RpcError) as refused:
                bad = gateway_pb2.SubmitJobRequest(pipeline="revoice_scene", audio=audio)
                bad.params.update({"script": [{"start": 1.0, "end": 0.5, "text": "x"}]})
                stub.SubmitJob(bad, metadata=auth, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "script[0]" in refused.value.details()

    for job in (strict, relaxed):
        assert job.state == gateway_pb2.SUCCEEDED, job.error
        assert all(s.state == gateway_pb2.STAGE_SUCCEEDED for s in job.stages), job.stages
    # strict guards: the untrained TTS says nothing a recogniser would match: the line is kept
    result = json_format.MessageToDict(strict.result)
    (line,) = result["lines"]
    assert result["replaced"] == 0 and line["chosen"] is None
    assert "no take passed the guards" in line["reason"]
    assert (line["text"], line["text_source"], line["voice_id"]) == ("Ahoy there.", "script", "captain")
    assert len(line["takes"]) == 2 and all(t["wer"] >= 0 and "similarity" in t for t in line["takes"])
    assert sorted(f.name for f in strict.files) == ["report.json", "revoice.md"]
    # guards off: the best-scoring take replaces the line, the rest of the scene is sample-identical
    result = json_format.MessageToDict(relaxed.result)
    (line,) = result["lines"]
    best = max(line["takes"], key=lambda t: t["mean_score"])
    assert result["replaced"] == 1 and line["chosen"] == best["take"]
    assert line["after"]["mean_score"] == best["mean_score"] and "mean_score" in line["before"]
    assert [t["seed"] for t in line["takes"]] == [7, 8]
    a, b = round(line["start"] * RATE), round(line["end"] * RATE)
    assert revoiced.shape == samples.shape
    assert np.array_equal(revoiced[:a], samples[:a]) and np.array_equal(revoiced[b:], samples[b:])
    assert not np.array_equal(revoiced[a:b], samples[a:b])
    assert sorted(f.name for f in relaxed.files) == ["report.json", "revoice.md", "revoiced.wav"]
    assert math.isfinite(line["loudness"]["gain_db"])
