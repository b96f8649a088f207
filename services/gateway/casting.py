"""cast_voices: give each character of a recording a voice in every service that needs one.

The client sends a recording and, per character, the timings and words of their lines
(``characters``: [{voice_id, display_name, lines: [{start, end, text}]}]). The job then

1. **prepare**s a fish-speech tree under the job's work folder — ``<voice_id>/<n>.wav`` (the line's
   audio) beside ``<voice_id>/<n>.lab`` (its words) — the dataset the TTS recipes read;
2. **enroll**s each character in the speaker service from their lines (so jobs can name them), and,
   side by side,
3. **train**s one LoRA adapter per character on their own lines (``training.v1``: the TTS service's
   ``lora`` recipe with ``speakers`` = the characters, on ``base_model`` or the service's default model;
   ``training`` overrides the recipe's keys), relaying the run's progress into the job's stream — a
   resumed job re-attaches to the same run (the request id is the job's);
4. **add_voices**: a TTS voice per character, speaking with their adapter and prompted with their
   first line.

The TTS service reads the dataset from the gateway's work folder, so the job needs a file system the
two share (``audio_transport: uri``, the local stack and compose); elsewhere it is refused at submit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import ServiceError, invalid_argument
from dramaturg.shared.voice.catalog import check_voice_id

from .pipelines import ANALYZE_SCENE, SAMPLE_RATE, PipelineSpec, StageContext, StageSpec, remaining
from .revoice import parse_script

CAST_DIR = "cast"


def parse_cast(given: Any) -> list[dict[str, Any]]:
    """The ``characters`` parameter, or INVALID_ARGUMENT naming the bad entry."""
    if not isinstance(given, list) or not given:
        raise invalid_argument("params.characters", "a list of {voice_id, display_name, lines}")
    cast, seen = [], set()
    for i, character in enumerate(given):
        where = f"params.characters[{i}]"
        if not isinstance(character, dict):
            raise invalid_argument(where, "a map with voice_id, display_name and lines")
        voice = character.get("voice_id")
        check_voice_id(voice if isinstance(voice, str) else "", f"{where}.voice_id")
        if voice in seen:
            raise invalid_argument(f"{where}.voice_id", f"{voice!r} is cast twice")
        seen.add(voice)
        lines = parse_script(character.get("lines"))
        if not lines:
            raise invalid_argument(f"{where}.lines", "at least one line: a voice is trained on its lines")
        cast.append({"voice_id": voice, "display_name": str(character.get("display_name") or voice),
                     "lines": lines})
    return cast


def _cast(ctx: StageContext) -> list[dict[str, Any]]:
    return parse_cast(ctx.params.get("characters"))


async def prepare_stage(ctx: StageContext) -> dict[str, Any]:
    """The characters' lines as a fish-speech tree (wav + lab per line) under the job's work folder."""
    cast = _cast(ctx)
    samples = (await ctx.audio.samples()).samples
    root = ctx.work_dir / CAST_DIR

    def write() -> list[dict[str, Any]]:
        written = []
        for character in cast:
            folder = root / character["voice_id"]
            folder.mkdir(parents=True, exist_ok=True)
            seconds = 0.0
            for n, line in enumerate(character["lines"]):
                a, b = round(line["start"] * SAMPLE_RATE), min(round(line["end"] * SAMPLE_RATE), len(samples))
                if b - a <= 0:
                    raise invalid_argument(f"characters.{character['voice_id']}.lines[{n}]",
                                           f"[{line['start']:g}, {line['end']:g}) s is outside the audio")
                sf.write(folder / f"{n:03d}.wav", samples[a:b], SAMPLE_RATE, subtype="PCM_16")
                (folder / f"{n:03d}.lab").write_text(line["text"] + "\n")
                seconds += (b - a) / SAMPLE_RATE
            written.append({"voice_id": character["voice_id"], "lines": len(character["lines"]),
                            "seconds": round(seconds, 3)})
        return written

    voices = await asyncio.to_thread(write)
    await ctx.report(1.0, f"{sum(v['lines'] for v in voices)} lines of {len(voices)} characters")
    return {"dataset": str(root), "voices": voices}


def _line_audio(ctx: StageContext, voice: str, n: int) -> common_pb2.AudioInput:
    path = ctx.work_dir / CAST_DIR / voice / f"{n:03d}.wav"
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=path.read_bytes())


async def enroll_stage(ctx: StageContext) -> dict[str, Any]:
    """Speaker.Enroll every character from their lines (replacing an earlier enrolment of the id)."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    stub = speaker_pb2_grpc.SpeakerStub(ctx.channel("speaker"))
    enrolled = []
    for character in _cast(ctx):
        audio = [_line_audio(ctx, character["voice_id"], n) for n in range(len(character["lines"]))]
        request = speaker_pb2.EnrollRequest(request_id=ctx.job_id, voice_id=character["voice_id"],
                                            audio=audio, display_name=character["display_name"],
                                            overwrite=True)
        await stub.Enroll(request, timeout=remaining(ctx))
        enrolled.append(character["voice_id"])
    await ctx.report(1.0, f"enrolled {len(enrolled)} voices")
    return {"enrolled": enrolled}


def adapter_name(job_id: str, voice: str) -> str:
    """The store name the TTS ``lora`` recipe publishes a character's adapter under (its run's
    ``output_model`` + ``-`` + the speaker)."""
    return f"cast-{job_id}-{voice}"


async def train_stage(ctx: StageContext) -> dict[str, Any]:
    """Training.StartTraining (tts ``lora``, one adapter per character), followed to its end."""
    from dramaturg.training.v1 import training_pb2, training_pb2_grpc
    from google.protobuf import struct_pb2

    stub = training_pb2_grpc.TrainingStub(ctx.channel("tts"))
    voices = [v["voice_id"] for v in ctx.inputs["prepare"]["voices"]]
    overrides = struct_pb2.Struct()
    overrides.update({**dict(ctx.params.get("training", {})), "speakers": voices})
    request = training_pb2.StartTrainingRequest(
        request_id=f"cast-{ctx.job_id}",  # a retried or resumed stage gets the same run back
        recipe="lora",
        dataset_uri=ctx.inputs["prepare"]["dataset"],
        overrides=overrides,
        output_model=f"cast-{ctx.job_id}",
        base_model=common_pb2.ModelRef(name=str(ctx.params.get("base_model", ""))),
    )
    run = await stub.StartTraining(request, timeout=remaining(ctx))
    async for event in stub.WatchTraining(training_pb2.WatchTrainingRequest(run_id=run.run_id),
                                          timeout=remaining(ctx)):
        kind = event.WhichOneof("event")
        if kind == "progress" and event.progress.total_steps:
            step, total = event.progress.step, event.progress.total_steps
            await ctx.report(step / total, f"training run {run.run_id}: step {step}/{total}")
        elif kind == "state" and event.state in (training_pb2.SUCCEEDED, training_pb2.FAILED,
                                                 training_pb2.CANCELLED):
            break
    run = await stub.GetTraining(training_pb2.GetTrainingRequest(run_id=run.run_id), timeout=remaining(ctx))
    if run.state != training_pb2.SUCCEEDED:
        state = training_pb2.RunState.Name(run.state)
        why = run.error or "no error given"
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the tts training run {run.run_id} ended {state}: {why}",
                           reason="TRAINING_FAILED")
    return {"run_id": run.run_id, "adapters": {v: adapter_name(ctx.job_id, v) for v in voices},
            "metrics": {k: round(v, 5) for k, v in run.metrics.items()}}


async def add_voices_stage(ctx: StageContext) -> dict[str, Any]:
    """TextToSpeech.AddVoice per character: their adapter, prompted with their first line."""
    from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc

    stub = tts_pb2_grpc.TextToSpeechStub(ctx.channel("tts"))
    added = []
    for character in _cast(ctx):
        voice = character["voice_id"]
        request = tts_pb2.AddVoiceRequest(
            request_id=ctx.job_id, voice_id=voice, display_name=character["display_name"], overwrite=True,
            adapter_model=common_pb2.ModelRef(name=ctx.inputs["train"]["adapters"][voice]),
            reference_audio=_line_audio(ctx, voice, 0), reference_text=character["lines"][0]["text"],
        )
        reply = await stub.AddVoice(request, timeout=remaining(ctx))
        added.append({"voice_id": voice, "model": f"{reply.voice.model.name}:{reply.voice.model.version}",
                      "adapter": reply.voice.adapter_source, "speaker": reply.voice.speaker})
    await ctx.report(1.0, f"{len(added)} TTS voices")
    return {"voices": added}


def cast_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tts = {v["voice_id"]: v for v in outputs["add_voices"]["voices"]}
    return {
        "voices": [
            {**v, "enrolled": v["voice_id"] in outputs["enroll"]["enrolled"],
             "adapter": outputs["train"]["adapters"][v["voice_id"]], "tts_model": tts[v["voice_id"]]["model"]}
            for v in outputs["prepare"]["voices"]
        ],
        "training_run": outputs["train"]["run_id"],
        "training_metrics": outputs["train"]["metrics"],
    }


CAST_VOICES = PipelineSpec(
    name="cast_voices",
    description="Give each character a voice everywhere: their lines (timings and words) as a dataset, "
    "enrolled in the speaker service and, side by side, one TTS LoRA adapter each trained on their own "
    "lines (training.v1, progress in the job's stream), then a TTS voice per character with that adapter.",
    stages=(
        ANALYZE_SCENE.stage("decode"),
        StageSpec("prepare", prepare_stage, depends_on=("decode",), timeout_seconds=300),
        StageSpec("enroll", enroll_stage, service="speaker", depends_on=("prepare",), timeout_seconds=600),
        StageSpec("train", train_stage, service="tts", depends_on=("prepare",), timeout_seconds=6 * 3600,
                  max_attempts=2),
        StageSpec("add_voices", add_voices_stage, service="tts", depends_on=("prepare", "train"),
                  timeout_seconds=600),
    ),
    result=cast_result,
    params={"max_seconds": float, "characters": list, "training": dict, "base_model": str},
    check=lambda params: parse_cast(params.get("characters")),
    needs_shared_storage=True,
)
