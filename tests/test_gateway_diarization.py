"""The first real multi-stage job: AnalyzeScene = decode → diarize (diarization service) → identify
each turn and name each diarized speaker (speaker service), through the gateway over gRPC.

Both models are untrained (accuracy is the slow learning checks' business), so this checks the
wiring: the gateway's RTTM is the diarization service's own answer, every exclusive turn is in the
labelled script, and a voice enrolled from one turn's audio is found again in that turn.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
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
            # merge_gap_seconds 0: one script line per exclusive turn, so each is checked against its turn
            request.params.update({"uri": URI, "min_segment_seconds": 0.5, "merge_gap_seconds": 0})
            job = stub.SubmitJob(request, metadata=AUTH, timeout=30)
            watch = gateway_pb2.WatchJobRequest(job_id=job.job_id)
            events = list(stub.WatchJob(watch, metadata=AUTH, timeout=600))
    final = events[-1].job
    assert final.state == gateway_pb2.SUCCEEDED, final.error
    stages = {s.name: s for s in final.stages}
    assert [stages[n].service for n in ("diarize", "identify")] == ["diarization", "speaker"]
    assert all(stages[n].state == gateway_pb2.STAGE_SUCCEEDED for n in ("decode", "diarize", "identify"))
    # no audiollm or evaluator endpoint: transcription and scoring are skipped, and the job says why
    for name, service in (("transcribe", "audiollm"), ("score", "evaluator")):
        assert stages[name].state == gateway_pb2.STAGE_SKIPPED
        reason = json_format.MessageToDict(stages[name].output)["skipped"]
        assert f"no endpoint for the {service} service" in reason
    # the gateway's default: the services read the scene from its blob store, nobody sent it inline
    for name in ("diarize", "identify"):
        assert json_format.MessageToDict(stages[name].output)["audio_transport"] == "uri"
    result = json_format.MessageToDict(final.result)
    assert result["rttm"] == direct.rttm
    assert sorted(result["speakers"]) == sorted(direct.speakers)
    assert result["diarization_model"] == "tiny-diarization:v1"
    assert sorted(result["skipped_stages"]) == ["score", "transcribe"]
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


def test_analyze_scene_whole_transcribes_and_scores_every_line(dramaturg_home: Path, scene) -> None:
    """All four services: each named line of the script comes back with the audio LLM's transcript
    and the evaluator's realism scores — the services' own answers for that line's audio and context."""
    from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc
    from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
    from dramaturg.services.audiollm.config import AudioLlmSettings
    from dramaturg.services.audiollm.server import AudioLlmService
    from dramaturg.services.evaluator.config import EvaluatorSettings
    from dramaturg.services.evaluator.server import EvaluatorService
    from test_audiollm_server import publish_tiny as publish_audiollm
    from test_evaluator_server import publish_tiny as publish_evaluator

    content, samples, rate = scene
    publish_diarization(dramaturg_home, "tiny-diarization")
    publish_speaker(dramaturg_home)
    publish_audiollm(dramaturg_home, "tiny-audiollm")
    publish_evaluator(dramaturg_home, "tiny-evaluator")
    characters = {"captain": {"profile": "a retired sea captain", "style": "gruff", "age": "60"}}
    with (
        ServerThread(DiarizationService(DiarizationSettings(), home=dramaturg_home)) as diarization,
        ServerThread(SpeakerService(SpeakerSettings(min_seconds=0.5), home=dramaturg_home)) as speaker,
        ServerThread(AudioLlmService(AudioLlmSettings(), home=dramaturg_home)) as audiollm,
        # it takes less audio than the scene: the gateway must send it each line, not the scene by URI
        ServerThread(EvaluatorService(EvaluatorSettings(max_seconds=8.0), home=dramaturg_home)) as evaluator,
    ):
        assert len(samples) / rate > 8.0
        with grpc.insecure_channel(speaker.target) as channel:  # the job names speakers against these
            speaker_pb2_grpc.SpeakerStub(channel).Enroll(
                speaker_pb2.EnrollRequest(voice_id="captain", audio=[_clip(samples, rate, 0.0, 3.0)]),
                timeout=60)
        services = {"diarization": diarization.target, "speaker": speaker.target,
                    "audiollm": audiollm.target, "evaluator": evaluator.target}
        settings = GatewaySettings(api_token="t", services=services)
        audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
        with (
            ServerThread(GatewayService(settings, home=dramaturg_home)) as gw,
            grpc.insecure_channel(gw.target) as channel,
        ):
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.SubmitJobRequest(pipeline="analyze_scene", audio=audio)
            request.params.update({"uri": URI, "min_segment_seconds": 0.5, "max_transcript_tokens": 4,
                                   "scene": "a storm at sea", "characters": characters,
                                   "dimensions": ["pitch_variation", "emotion_accuracy"]})
            job = stub.SubmitJob(request, metadata=AUTH, timeout=30)
            events = list(stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job.job_id), metadata=AUTH,
                                        timeout=600))
            files = _download(stub, job.job_id)
            bad = gateway_pb2.SubmitJobRequest(pipeline="analyze_scene", audio=audio)
            bad.params.update({"characters": {"v": {"mood": "grim"}}})
            with pytest.raises(grpc.RpcError) as refused:
                stub.SubmitJob(bad, metadata=AUTH, timeout=30)
        final = events[-1].job
        assert final.state == gateway_pb2.SUCCEEDED, final.error
        stages = {s.name: s for s in final.stages}
        assert all(s.state == gateway_pb2.STAGE_SUCCEEDED for s in stages.values())
        result = json_format.MessageToDict(final.result)
        lines = [t for t in result["script"] if t["end"] - t["start"] >= 0.5]
        assert lines and result["skipped_stages"] == {}
        # the script's lines are the exclusive turns grouped (merge_gap_seconds' default, 1 s): every turn
        # in exactly one line, and no two lines of one speaker left less than a second apart
        turns = json_format.MessageToDict(stages["diarize"].output)["exclusive_turns"]
        assert sum(t["turns"] for t in result["script"]) == len(turns)
        assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(result["script"]))
        assert not any(a["speaker"] == b["speaker"] and b["start"] - a["end"] < 1.0
                       for a, b in itertools.pairwise(result["script"]))
        assert result["transcription_model"] == "tiny-audiollm:v1"
        assert result["evaluator_model"] == "tiny-evaluator:v1"
        # the gateway's answers are the services' own for the same line (first line checked directly)
        line = lines[0]
        span = common_pb2.TimeSpan(start=line["start"], end=line["end"])
        with grpc.insecure_channel(audiollm.target) as channel:
            direct = audiollm_pb2_grpc.AudioLLMStub(channel).Generate(
                audiollm_pb2.GenerateRequest(audio=audio, span=span, task=audiollm_pb2.TRANSCRIBE,
                                             generation=audiollm_pb2.GenerationConfig(max_new_tokens=4)),
                timeout=120)
        assert line["text"] == direct.text
        # a line longer than the evaluator's 5-s window is scored in equal pieces, weighted by duration
        assert all(t["pieces"] == math.ceil((t["end"] - t["start"]) / 5.0 - 1e-9) for t in lines)
        described = characters.get(line["voice_id"], {})
        who = (f"the character {line['voice_id']}" if line["voice_id"]
               else f"an unidentified speaker ({line['speaker']})")
        context = evaluator_pb2.RoleContext(local_scene="a storm at sea",
                                            char_style=described.get("style", "not described"),
                                            char_profile=described.get("profile", who),
                                            char_age=described.get("age", ""))
        pieces = int(line["pieces"])  # a Struct number: a float
        step = (line["end"] - line["start"]) / pieces
        expected = {"pitch_variation": 0.0, "emotion_accuracy": 0.0}
        with grpc.insecure_channel(evaluator.target) as channel:
            for i in range(pieces):
                end = line["end"] if i == pieces - 1 else line["start"] + (i + 1) * step
                piece = common_pb2.TimeSpan(start=line["start"] + i * step, end=end)
                clip = _clip(samples, rate, piece.start, piece.end)  # what the gateway sends
                scored = evaluator_pb2_grpc.EvaluatorStub(channel).Evaluate(
                    evaluator_pb2.EvaluateRequest(audio=clip, rubric=evaluator_pb2.REALISM,
                                                  dimensions=list(expected), context=context), timeout=120)
                share = (piece.end - piece.start) / (line["end"] - line["start"])
                for s in scored.scores:
                    expected[s.dimension] += s.score * share
    assert line["scores"] == pytest.approx(expected, abs=1e-3)
    assert line["mean_score"] == pytest.approx(sum(expected.values()) / 2, abs=1e-3)
    assert all(set(t["scores"]) == {"pitch_variation", "emotion_accuracy"} and "text" in t for t in lines)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mood" in refused.value.details()
    # the job's files: listed on the job, downloadable whole or from an offset, by name only
    assert sorted(files) == ["report.json", "script.html", "script.md", "timeline.png", "timeline.svg"]
    assert json.loads(files["report.json"]) == result
    assert files["timeline.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert line["text"] in files["script.html"].decode() or "&" in line["text"]
    markdown = result["script_markdown"].splitlines()
    assert markdown[0].startswith("| time | speaker") and len(markdown) == 2 + len(result["script"])
    # progress events came from the per-line stages
    progress = [e.message for e in events if e.kind == gateway_pb2.STAGE_PROGRESS]
    assert any(m.startswith("transcribed line") for m in progress)
    assert any(m.startswith("scored piece") for m in progress)


def _download(stub: gateway_pb2_grpc.GatewayStub, job_id: str) -> dict[str, bytes]:
    """Every file of a finished job through GetJobFile, checked against Job.files; and the errors."""
    job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), metadata=AUTH, timeout=30)
    files = {}
    for entry in job.files:
        chunks = list(stub.GetJobFile(gateway_pb2.GetJobFileRequest(job_id=job_id, name=entry.name),
                                      metadata=AUTH, timeout=30))
        data = b"".join(c.data for c in chunks)
        assert len(data) == entry.size_bytes and hashlib.sha256(data).hexdigest() == entry.sha256
        starts = [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
        assert [c.offset for c in chunks] == starts
        files[entry.name] = data
    tail = stub.GetJobFile(gateway_pb2.GetJobFileRequest(job_id=job_id, name="report.json", offset=10),
                           metadata=AUTH, timeout=30)
    assert b"".join(c.data for c in tail) == files["report.json"][10:]
    for name, offset, code in (("../input.json", 0, grpc.StatusCode.NOT_FOUND),
                               ("nope.txt", 0, grpc.StatusCode.NOT_FOUND),
                               ("report.json", 10**9, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.GetJobFile(gateway_pb2.GetJobFileRequest(job_id=job_id, name=name, offset=offset),
                                 metadata=AUTH, timeout=30))
        assert refused.value.code() == code, name
    with pytest.raises(grpc.RpcError) as anonymous:
        list(stub.GetJobFile(gateway_pb2.GetJobFileRequest(job_id=job_id, name="report.json"), timeout=30))
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return files


def test_speaker_lines_group_one_speakers_turns_across_short_gaps() -> None:
    """A line split at its pauses is one line again; a gap as long as merge_gap_seconds, another
    speaker in between, or a gap of 0 keeps turns apart."""
    from dramaturg.services.gateway.pipelines import speaker_lines

    def turn(start: float, end: float, speaker: str) -> dict:
        return {"start": start, "end": end, "speaker": speaker, "confidence": 1.0}

    turns = [turn(10.6, 10.7, "B"), turn(0.7, 2.8, "A"), turn(3.6, 4.1, "B"), turn(4.4, 7.0, "B"),
             turn(7.0, 7.5, "A"), turn(11.3, 12.3, "B"), turn(12.7, 15.5, "B"), turn(16.5, 17.0, "B")]
    spans = [[(t["start"], t["end"]) for t in line] for line in speaker_lines(turns, 1.0)]
    assert spans == [[(0.7, 2.8)], [(3.6, 4.1), (4.4, 7.0)], [(7.0, 7.5)],
                     [(10.6, 10.7), (11.3, 12.3), (12.7, 15.5)], [(16.5, 17.0)]]
    assert [len(line) for line in speaker_lines(turns, 0.0)] == [1] * len(turns)
    assert speaker_lines([], 1.0) == []
