"""Jobs as graphs of stages: what a pipeline is, and the pipelines the gateway offers.

A stage is an async function of a :class:`StageContext` that returns a JSON-able dict (its output,
persisted with the job). Stages run when everything they depend on succeeded, independent stages run
concurrently, and each stage has its own deadline and retry budget. Stages that call a model service
do so over gRPC through ``ctx.channel(service)``.

Built so far: ``probe`` (decode → loudness ∥ activity → summary), whose stages run in the gateway
itself. The model services' stages (diarize, identify, transcribe, score, re-voice) join as those
services land (README: status).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from dramaturg.common.v1 import common_pb2
from dramaturg.shared import audio as audio_io
from dramaturg.shared.grpc.errors import invalid_argument

GATEWAY = "gateway"


@dataclass
class StageContext:
    """What a running stage sees."""

    job_id: str
    params: dict[str, Any]
    work_dir: Path
    inputs: dict[str, dict[str, Any]]  # outputs of the stages it depends on, by stage name
    audio: common_pb2.AudioInput
    deadline: float  # absolute time.monotonic() by which this attempt must finish
    channel: Callable[[str], grpc.aio.Channel]
    report: Callable[[float, str], Awaitable[None]]  # (fraction 0–1, message) → progress event


StageFn = Callable[[StageContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: StageFn
    service: str = GATEWAY
    depends_on: tuple[str, ...] = ()
    timeout_seconds: float = 120.0
    max_attempts: int = 3


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    stages: tuple[StageSpec, ...]
    result: Callable[[dict[str, dict[str, Any]]], dict[str, Any]]
    params: dict[str, type] = field(default_factory=dict)  # accepted params and their types

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline {self.name}: duplicate stage names")
        seen: set[str] = set()
        for stage in self.stages:  # stages are listed in a topological order
            missing = set(stage.depends_on) - seen
            if missing:
                raise ValueError(
                    f"pipeline {self.name}: stage {stage.name} depends on later/unknown {missing}"
                )
            seen.add(stage.name)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def validate_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise invalid_argument(
                    f"params.{key}", f"unknown parameter for pipeline {self.name!r}; known: {known}"
                )
            expected = self.params[key]
            # protobuf Struct carries every number as a double: 3.0 is a valid int parameter
            ok = (
                (isinstance(value, expected) and not isinstance(value, bool))
                or (expected is float and isinstance(value, int))
                or (expected is int and isinstance(value, float) and value.is_integer())
            )
            if not ok:
                raise invalid_argument(
                    f"params.{key}", f"expected {expected.__name__}, got {type(value).__name__}"
                )


# ---------------------------------------------------------------------------------------------------
# probe: decode and measure audio, all inside the gateway.

SAMPLE_RATE = 16_000
FRAME_SECONDS = 0.02


def _load(ctx: StageContext) -> audio_io.Audio:
    return audio_io.load_path(ctx.work_dir / "audio.wav")


async def decode_stage(ctx: StageContext) -> dict[str, Any]:
    """Decode whatever the client sent, validate it and keep a 16 kHz mono copy for later stages."""
    limits = audio_io.AudioLimits(max_seconds=float(ctx.params.get("max_seconds", 3 * 3600)))
    decoded = audio_io.decode_audio_input(ctx.audio, target_rate=SAMPLE_RATE, limits=limits, field="audio")
    (ctx.work_dir / "audio.wav").write_bytes(audio_io.encode_wav(decoded))
    await ctx.report(1.0, f"decoded {decoded.duration:.2f}s")
    return {
        "duration_seconds": round(decoded.duration, 4),
        "sample_rate_hz": SAMPLE_RATE,
        "samples": int(decoded.samples.shape[-1]),
    }


def _frame_db(samples: np.ndarray, frame: int) -> np.ndarray:
    n = len(samples) // frame
    frames = samples[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1) + 1e-12)
    return 20 * np.log10(rms)


async def loudness_stage(ctx: StageContext) -> dict[str, Any]:
    """Level statistics a mixing engineer checks first: RMS, peak, loudness range and clipping."""
    audio = _load(ctx)
    x = audio.samples
    db = _frame_db(x, int(0.4 * SAMPLE_RATE)) if len(x) >= int(0.4 * SAMPLE_RATE) else np.array([-120.0])
    audible = db[db > -70]
    lra = float(np.percentile(audible, 95) - np.percentile(audible, 10)) if len(audible) > 2 else 0.0
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    await ctx.report(1.0, "measured loudness")
    return {
        "rms_dbfs": round(20 * math.log10(max(rms, 1e-9)), 2),
        "peak_dbfs": round(20 * math.log10(max(peak, 1e-9)), 2),
        "loudness_range_db": round(lra, 2),
        "clipped_ratio": round(float(np.mean(np.abs(x) >= 0.999)), 6),
    }


async def activity_stage(ctx: StageContext) -> dict[str, Any]:
    """Energy-based speech activity: where there is something to diarize, transcribe and score."""
    audio = _load(ctx)
    frame = int(FRAME_SECONDS * SAMPLE_RATE)
    db = _frame_db(audio.samples, frame)
    if not len(db):
        return {"speech_seconds": 0.0, "speech_ratio": 0.0, "segments": []}
    floor = float(np.percentile(db, 10))
    threshold = max(floor + float(ctx.params.get("vad_margin_db", 12.0)), -60.0)
    active = db > threshold
    segments: list[list[float]] = []
    start = None
    min_gap = int(0.3 / FRAME_SECONDS)
    gap = 0
    for i, on in enumerate(active):
        if on:
            start = i if start is None else start
            gap = 0
        elif start is not None:
            gap += 1
            if gap > min_gap:
                segments.append([start * FRAME_SECONDS, (i - gap + 1) * FRAME_SECONDS])
                start, gap = None, 0
    if start is not None:
        segments.append([start * FRAME_SECONDS, (len(active) - gap) * FRAME_SECONDS])
    segments = [[round(a, 3), round(b, 3)] for a, b in segments if b - a >= 0.1]
    speech = sum(b - a for a, b in segments)
    await ctx.report(1.0, f"{len(segments)} speech segments")
    return {
        "speech_seconds": round(speech, 3),
        "speech_ratio": round(speech / max(audio.duration, 1e-9), 4),
        "threshold_dbfs": round(threshold, 2),
        "segments": segments,
    }


def _probe_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**outputs["decode"], **outputs["loudness"], **outputs["activity"]}


PROBE = PipelineSpec(
    name="probe",
    description="Decode and measure audio in the gateway: duration, loudness, speech activity.",
    stages=(
        StageSpec("decode", decode_stage, timeout_seconds=120),
        StageSpec("loudness", loudness_stage, depends_on=("decode",), timeout_seconds=120),
        StageSpec("activity", activity_stage, depends_on=("decode",), timeout_seconds=120),
    ),
    result=_probe_result,
    params={"max_seconds": float, "vad_margin_db": float},
)

# ---------------------------------------------------------------------------------------------------
# identify_lines: who speaks each line, against the voices enrolled in the speaker service.


def _segments(ctx: StageContext) -> list[list[float]]:
    """The line timings the client sent (a script with timecodes), else the detected speech segments."""
    given = ctx.params.get("segments")
    if given:
        segments = []
        for i, seg in enumerate(given):
            if not (isinstance(seg, list) and len(seg) == 2 and all(isinstance(x, int | float) for x in seg)):
                raise invalid_argument(
                    f"params.segments[{i}]", "each segment is [start_seconds, end_seconds]"
                )
            if not 0 <= seg[0] < seg[1]:
                raise invalid_argument(f"params.segments[{i}]", "needs 0 ≤ start < end")
            segments.append([float(seg[0]), float(seg[1])])
        return segments
    return ctx.inputs["activity"]["segments"]


async def identify_stage(ctx: StageContext) -> dict[str, Any]:
    """Speaker.Identify over every line; lines shorter than the service accepts are reported, not sent."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    segments = _segments(ctx)
    min_seconds = float(ctx.params.get("min_segment_seconds", 0.5))
    usable = [s for s in segments if s[1] - s[0] >= min_seconds]
    audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=(ctx.work_dir / "audio.wav").read_bytes())
    request = speaker_pb2.IdentifyRequest(
        request_id=ctx.job_id,
        audio=audio,
        top_k=3,
        segments=[common_pb2.TimeSpan(start=a, end=b) for a, b in usable],
        voice_ids=[str(v) for v in ctx.params.get("voice_ids", [])],
    )
    remaining = max(ctx.deadline - time.monotonic(), 0.1)
    reply = await speaker_pb2_grpc.SpeakerStub(ctx.channel("speaker")).Identify(request, timeout=remaining)
    lines = []
    for result in reply.results:
        best = result.candidates[0] if result.candidates else None
        lines.append(
            {
                "start": round(result.span.start, 3),
                "end": round(result.span.end, 3),
                "voice_id": result.voice_id,
                "best_candidate": best.voice_id if best else "",
                "score": round(best.score, 4) if best else 0.0,
            }
        )
    await ctx.report(1.0, f"identified {len(lines)} lines")
    return {
        "lines": lines,
        "skipped_short": len(segments) - len(usable),
        "model": f"{reply.model.name}:{reply.model.version}",
        "threshold": round(reply.threshold, 4),
    }


def _identify_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"duration_seconds": outputs["decode"]["duration_seconds"], **outputs["identify"]}


IDENTIFY_LINES = PipelineSpec(
    name="identify_lines",
    description="Who speaks each line: decode, find speech (or take the script's line timings), "
    "identify each line against the voices enrolled in the speaker service.",
    stages=(
        StageSpec("decode", decode_stage, timeout_seconds=120),
        StageSpec("activity", activity_stage, depends_on=("decode",), timeout_seconds=120),
        StageSpec(
            "identify",
            identify_stage,
            service="speaker",
            depends_on=("decode", "activity"),
            timeout_seconds=300,
        ),
    ),
    result=_identify_result,
    params={
        "max_seconds": float,
        "vad_margin_db": float,
        "segments": list,
        "voice_ids": list,
        "min_segment_seconds": float,
    },
)

# ---------------------------------------------------------------------------------------------------
# analyze_scene: who spoke when (diarization), then who each speaker is (speaker identification).


async def diarize_stage(ctx: StageContext) -> dict[str, Any]:
    """Diarization.Diarize on the decoded scene: turns, exclusive turns and RTTM."""
    from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc

    audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=(ctx.work_dir / "audio.wav").read_bytes())
    hints = diarization_pb2.DiarizationConfig(
        num_speakers=int(ctx.params.get("num_speakers", 0)),
        min_speakers=int(ctx.params.get("min_speakers", 0)),
        max_speakers=int(ctx.params.get("max_speakers", 0)),
    )
    request = diarization_pb2.DiarizeRequest(
        request_id=ctx.job_id, audio=audio, config=hints, uri=str(ctx.params.get("uri", ctx.job_id))
    )
    remaining = max(ctx.deadline - time.monotonic(), 0.1)
    reply = await diarization_pb2_grpc.DiarizationStub(ctx.channel("diarization")).Diarize(
        request, timeout=remaining
    )

    def turns(items) -> list[dict[str, Any]]:
        return [
            {
                "start": round(t.span.start, 3),
                "end": round(t.span.end, 3),
                "speaker": t.speaker,
                "confidence": round(t.confidence, 4),
            }
            for t in items
        ]

    await ctx.report(1.0, f"{len(reply.speakers)} speakers, {len(reply.turns)} turns")
    return {
        "turns": turns(reply.turns),
        "exclusive_turns": turns(reply.exclusive_turns),
        "rttm": reply.rttm,
        "speakers": list(reply.speakers),
        "model": f"{reply.model.name}:{reply.model.version}",
    }


async def identify_turns_stage(ctx: StageContext) -> dict[str, Any]:
    """Identify every exclusive turn, then name each diarized speaker by the votes of its turns."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    min_seconds = float(ctx.params.get("min_segment_seconds", 0.5))
    turns = ctx.inputs["diarize"]["exclusive_turns"]
    usable = [t for t in turns if t["end"] - t["start"] >= min_seconds]
    votes: dict[str, dict[str, float]] = {}
    identified: dict[tuple[float, float], tuple[str, float]] = {}
    if usable:
        audio = common_pb2.AudioInput(
            encoding=common_pb2.WAV, content=(ctx.work_dir / "audio.wav").read_bytes()
        )
        request = speaker_pb2.IdentifyRequest(
            request_id=ctx.job_id,
            audio=audio,
            top_k=1,
            segments=[common_pb2.TimeSpan(start=t["start"], end=t["end"]) for t in usable],
            voice_ids=[str(v) for v in ctx.params.get("voice_ids", [])],
        )
        remaining = max(ctx.deadline - time.monotonic(), 0.1)
        reply = await speaker_pb2_grpc.SpeakerStub(ctx.channel("speaker")).Identify(
            request, timeout=remaining
        )
        for turn, result in zip(usable, reply.results, strict=True):
            best = result.candidates[0] if result.candidates else None
            if best is None:
                continue
            identified[(turn["start"], turn["end"])] = (result.voice_id, best.score)
            if result.voice_id:  # only confident identifications vote, weighted by duration
                tally = votes.setdefault(turn["speaker"], {})
                tally[result.voice_id] = tally.get(result.voice_id, 0.0) + (turn["end"] - turn["start"])
    names = {label: max(tally, key=tally.get) for label, tally in votes.items()}
    script = []
    for turn in turns:
        voice, score = identified.get((turn["start"], turn["end"]), ("", 0.0))
        script.append(
            {
                **turn,
                "voice_id": names.get(turn["speaker"], ""),
                "turn_voice_id": voice,
                "score": round(score, 4),
            }
        )
    await ctx.report(
        1.0, f"named {len(names)} of {len(votes) or len({t['speaker'] for t in turns})} speakers"
    )
    return {"speaker_names": names, "script": script}


def _scene_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    diarized = outputs["diarize"]
    return {
        "duration_seconds": outputs["decode"]["duration_seconds"],
        "rttm": diarized["rttm"],
        "speakers": diarized["speakers"],
        "diarization_model": diarized["model"],
        **outputs["identify"],
    }


ANALYZE_SCENE = PipelineSpec(
    name="analyze_scene",
    description="Who spoke when and who they are: decode → diarize (diarization service) → identify each "
    "speaker against the enrolled voices (speaker service) → a labelled script.",
    stages=(
        StageSpec("decode", decode_stage, timeout_seconds=120),
        StageSpec(
            "diarize", diarize_stage, service="diarization", depends_on=("decode",), timeout_seconds=1800
        ),
        StageSpec(
            "identify",
            identify_turns_stage,
            service="speaker",
            depends_on=("decode", "diarize"),
            timeout_seconds=600,
        ),
    ),
    result=_scene_result,
    params={
        "max_seconds": float,
        "num_speakers": int,
        "min_speakers": int,
        "max_speakers": int,
        "uri": str,
        "voice_ids": list,
        "min_segment_seconds": float,
    },
)

PIPELINES: dict[str, PipelineSpec] = {p.name: p for p in (PROBE, IDENTIFY_LINES, ANALYZE_SCENE)}
