"""Jobs as graphs of stages: what a pipeline is, and the pipelines the gateway offers.

A stage is an async function of a :class:`StageContext` that returns a JSON-able dict (its output,
persisted with the job). Stages run when everything they depend on succeeded, independent stages run
concurrently, and each stage has its own deadline and retry budget. Stages that call a model service
do so over gRPC through ``ctx.channel(service)``.

A job's audio is decoded once, when it is submitted, into a 16 kHz mono WAV blob (shared/blobs.py);
stages see it as :class:`JobAudio` and never decode the client's bytes again. Remote stages hand it
to the model services as the settings' :class:`AudioTransport` says: by reference (``uri``: the
services read the blob) or inline, where a per-segment stage sends only its lines' audio, split
across requests that stay below the services' message limit. CPU work on the samples (reading them,
measuring them, cropping) runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.services.gateway.config import CHANNEL_MESSAGE_LIMIT_BYTES
from dramaturg.services.gateway.reports import write_scene_report
from dramaturg.shared import audio as audio_io
from dramaturg.shared.blobs import BlobRef
from dramaturg.shared.grpc.errors import ServiceError, invalid_argument

GATEWAY = "gateway"
SAMPLE_RATE = 16_000
FRAME_SECONDS = 0.02
WAV_HEADER_BYTES = 44  # a plain PCM WAV header, as libsndfile writes it
# Room in an inline request for everything but the audio (ids, model ref, config, voice ids).
REQUEST_OVERHEAD_BYTES = 64 * 1024
# A TimeSpan in a request: two doubles plus tags and a length prefix, rounded up.
SPAN_BYTES = 24


def wav_bytes(num_samples: int) -> int:
    """Size of a 16-bit mono WAV of ``num_samples`` samples: what an inline request carries."""
    return WAV_HEADER_BYTES + 2 * num_samples


@dataclass
class JobAudio:
    """A job's input as the gateway keeps it: a 16 kHz mono 16-bit WAV blob, decoded once at submit.

    The samples are read from the blob at most once per running job (in a worker thread) and shared
    by the stages that need them; remote stages usually need only :attr:`blob`.
    """

    blob: BlobRef
    sample_rate: int
    num_samples: int
    _pcm: np.ndarray | None = field(default=None, repr=False)
    _float: audio_io.Audio | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    async def pcm16(self) -> np.ndarray:
        """The samples exactly as stored (int16): crops re-encoded from these lose nothing."""
        async with self._lock:
            if self._pcm is None:
                self._pcm = await asyncio.to_thread(_read_blob, self.blob.path, "int16")
            return self._pcm

    async def samples(self) -> audio_io.Audio:
        """The samples as float32 in [-1, 1) (what the in-gateway measurements use)."""
        async with self._lock:
            if self._float is None:
                data = await asyncio.to_thread(_read_blob, self.blob.path, "float32")
                self._float = audio_io.Audio(data, self.sample_rate)
            return self._float


def _read_blob(path: Path, dtype: str) -> np.ndarray:
    data, _rate = sf.read(str(path), dtype=dtype, always_2d=False)
    return np.ascontiguousarray(data)


@dataclass(frozen=True)
class AudioTransport:
    """How remote stages send the job's audio (``GatewaySettings.audio_transport``)."""

    mode: Literal["uri", "inline"] = "uri"
    inline_limit_bytes: int = CHANNEL_MESSAGE_LIMIT_BYTES

    @property
    def audio_budget_bytes(self) -> int:
        """What one inline request may spend on audio."""
        return self.inline_limit_bytes - REQUEST_OVERHEAD_BYTES


@dataclass
class StageContext:
    """What a running stage sees."""

    job_id: str
    params: dict[str, Any]
    work_dir: Path
    inputs: dict[str, dict[str, Any]]  # outputs of the stages it depends on, by stage name
    audio: JobAudio
    deadline: float  # absolute time.monotonic() by which this attempt must finish
    channel: Callable[[str], grpc.aio.Channel]
    report: Callable[[float, str], Awaitable[None]]  # (fraction 0–1, message) → progress event
    transport: AudioTransport = field(default_factory=AudioTransport)


StageFn = Callable[[StageContext], Awaitable[dict[str, Any]]]
# What a remote stage sends of the job's audio: nothing, the whole scene, or the audio of some lines.
StageAudio = Literal["", "whole", "segments"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: StageFn
    service: str = GATEWAY
    depends_on: tuple[str, ...] = ()
    timeout_seconds: float = 120.0
    max_attempts: int = 3
    audio: StageAudio = ""  # lets the gateway refuse at submit what an inline request cannot carry
    # An optional stage is skipped (STAGE_SKIPPED, the reason in its output) when the gateway has no
    # endpoint for its service; the job goes on without it. Required stages fail the job instead.
    optional: bool = False


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    stages: tuple[StageSpec, ...]
    result: Callable[[dict[str, dict[str, Any]]], dict[str, Any]]
    params: dict[str, type] = field(default_factory=dict)  # accepted params and their types
    # writes the job's files (a report, scripts, plots) from its result into a folder (reports.py),
    # given the job's work folder too (files its stages left there)
    report: Callable[[dict[str, Any], Path, Path], None] | None = None
    # the pipeline's own checks of its params at submit (after their types): INVALID_ARGUMENT
    check: Callable[[dict[str, Any]], Any] | None = None
    # a model service reads files the gateway writes (a training dataset): refused at submit unless
    # the gateway and the services share a file system (audio_transport: uri)
    needs_shared_storage: bool = False

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
                (isinstance(value, expected) and (expected is bool or not isinstance(value, bool)))
                or (expected is float and isinstance(value, int))
                or (expected is int and isinstance(value, float) and value.is_integer())
            )
            if not ok:
                raise invalid_argument(
                    f"params.{key}", f"expected {expected.__name__}, got {type(value).__name__}"
                )
        if "segments" in params:
            parse_segments(params["segments"])
        if self.check is not None:
            self.check(params)

    def check_inline(self, audio_seconds: float, num_samples: int, params: dict[str, Any],
                     transport: AudioTransport) -> None:
        """Refuse at submit what an inline request to a remote stage could never carry.

        Only with ``audio_transport: inline``: by URI a request names the blob whatever its length.
        """
        if transport.mode != "inline":
            return
        limit = transport.inline_limit_bytes
        budget = transport.audio_budget_bytes
        for stage in self.stages:
            if stage.service == GATEWAY or not stage.audio:
                continue
            if stage.audio == "whole" and wav_bytes(num_samples) > budget:
                fits = (budget - WAV_HEADER_BYTES) / 2 / SAMPLE_RATE
                raise invalid_argument(
                    "audio",
                    f"the audio is {audio_seconds:.1f} s, {wav_bytes(num_samples) / 2**20:.1f} MiB as 16 kHz "
                    f"WAV, and stage {stage.name} sends it whole to the {stage.service} service, but this "
                    f"gateway sends audio inline in requests of at most {limit} bytes "
                    f"(inline_message_limit_bytes; about {fits:.0f} s of audio): send shorter audio, or run "
                    "the gateway with audio_transport: uri on a file system the services can read",
                    reason="AUDIO_TOO_LARGE_FOR_INLINE",
                )
            if stage.audio == "segments" and params.get("segments"):
                longest = max(end - start for start, end in parse_segments(params["segments"]))
                if wav_bytes(round(longest * SAMPLE_RATE)) + SPAN_BYTES > budget:
                    raise invalid_argument(
                        "params.segments",
                        f"a {longest:.1f} s segment does not fit one inline request of at most {limit} "
                        "bytes (inline_message_limit_bytes): split it, or run the gateway with "
                        "audio_transport: uri",
                        reason="AUDIO_TOO_LARGE_FOR_INLINE",
                    )


def parse_segments(given: Any) -> list[list[float]]:
    """The ``segments`` parameter as [[start, end], …] seconds, or INVALID_ARGUMENT naming the bad one."""
    if not isinstance(given, list):
        raise invalid_argument("params.segments", "a list of [start_seconds, end_seconds]")
    segments = []
    for i, seg in enumerate(given):
        ok = isinstance(seg, list) and len(seg) == 2
        ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in seg)
        if not ok:
            raise invalid_argument(f"params.segments[{i}]", "each segment is [start_seconds, end_seconds]")
        if not (math.isfinite(seg[0]) and math.isfinite(seg[1]) and 0 <= seg[0] < seg[1]):
            raise invalid_argument(f"params.segments[{i}]", "needs 0 ≤ start < end")
        segments.append([float(seg[0]), float(seg[1])])
    return segments


# What the evaluator's realism rubric knows about a character (RoleContext's fields).
CHARACTER_FIELDS = ("profile", "style", "age")


def check_scene_params(params: dict[str, Any]) -> None:
    """analyze_scene's params beyond their types: the line grouping, the characters' descriptions."""
    if float(params.get("merge_gap_seconds", 0.0)) < 0:
        raise invalid_argument("params.merge_gap_seconds", "seconds, 0 (every turn its own line) or more")
    if "characters" in params:
        parse_characters(params["characters"])


def parse_characters(given: Any) -> dict[str, dict[str, str]]:
    """The ``characters`` parameter: voice id → {profile, style, age} (strings), or INVALID_ARGUMENT."""
    if not isinstance(given, dict):
        raise invalid_argument("params.characters", "a map of voice id → {profile, style, age}")
    characters = {}
    for voice, fields in given.items():
        if not isinstance(fields, dict):
            raise invalid_argument(f"params.characters.{voice}", "a map with profile, style, age")
        unknown = sorted(set(fields) - set(CHARACTER_FIELDS))
        if unknown:
            raise invalid_argument(f"params.characters.{voice}.{unknown[0]}",
                                   f"unknown field; known: {', '.join(CHARACTER_FIELDS)}")
        for key, value in fields.items():
            if not isinstance(value, str):
                raise invalid_argument(f"params.characters.{voice}.{key}", "a string")
        characters[str(voice)] = {k: str(v) for k, v in fields.items()}
    return characters


# ---------------------------------------------------------------------------------------------------
# Sending the job's audio to a model service.


async def whole_audio(ctx: StageContext, stage: str) -> common_pb2.AudioInput:
    """The whole scene for a request: the blob's URI, or its bytes when the transport is inline."""
    if ctx.transport.mode == "uri":
        return common_pb2.AudioInput(encoding=common_pb2.WAV, uri=ctx.audio.blob.uri)
    if ctx.audio.blob.size > ctx.transport.audio_budget_bytes:  # refused at submit unless settings changed
        raise invalid_argument(
            "audio",
            f"stage {stage}: the audio ({ctx.audio.blob.size} bytes as WAV) is larger than an inline request "
            f"may be ({ctx.transport.inline_limit_bytes} bytes, inline_message_limit_bytes); run the "
            "gateway with audio_transport: uri",
            reason="AUDIO_TOO_LARGE_FOR_INLINE",
        )
    content = await asyncio.to_thread(ctx.audio.blob.path.read_bytes)
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)


@dataclass
class SegmentBatch:
    """One request's worth of lines: its audio and each line's span within that audio."""

    audio: common_pb2.AudioInput
    spans: list[common_pb2.TimeSpan]


async def segment_batches(ctx: StageContext, segments: list[list[float]]) -> list[SegmentBatch]:
    """Requests for a per-segment stage: by URI one request with the lines' spans; inline, the lines'
    audio cut out in the gateway and joined, in as many requests as the message limit needs."""
    if not segments:
        return []
    if ctx.transport.mode == "uri":
        spans = [common_pb2.TimeSpan(start=a, end=b) for a, b in segments]
        return [SegmentBatch(common_pb2.AudioInput(encoding=common_pb2.WAV, uri=ctx.audio.blob.uri), spans)]
    pcm = await ctx.audio.pcm16()
    return await asyncio.to_thread(_crop_batches, pcm, ctx.audio.sample_rate, segments,
                                   ctx.transport.audio_budget_bytes, ctx.transport.inline_limit_bytes)


def _encode_pcm16(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _crop_batches(pcm: np.ndarray, rate: int, segments: list[list[float]], budget: int,
                  limit: int) -> list[SegmentBatch]:
    total = len(pcm)
    batches: list[SegmentBatch] = []
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    used = WAV_HEADER_BYTES

    def flush() -> None:
        nonlocal pieces, spans, used
        if pieces:
            joined = np.concatenate(pieces)
            audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=_encode_pcm16(joined, rate))
            batches.append(SegmentBatch(audio, [common_pb2.TimeSpan(start=a / rate, end=b / rate)
                                                for a, b in spans]))
        pieces, spans, used = [], [], WAV_HEADER_BYTES

    for i, (start, end) in enumerate(segments):
        # the same sample arithmetic as the services' crop (shared/audio.py), so lines match exactly
        first, last = round(start * rate), min(round(end * rate), total)
        if first >= total or last <= first:
            raise invalid_argument(
                f"segments[{i}]", f"[{start:g}, {end:g}) s is outside the audio ({total / rate:.3f} s long)"
            )
        cost = 2 * (last - first) + SPAN_BYTES
        if WAV_HEADER_BYTES + cost > budget:
            raise invalid_argument(
                f"segments[{i}]",
                f"a {end - start:.1f} s line does not fit one inline request of at most {limit} bytes "
                "(inline_message_limit_bytes); run the gateway with audio_transport: uri",
                reason="AUDIO_TOO_LARGE_FOR_INLINE",
            )
        if used + cost > budget:
            flush()
        offset = sum(len(p) for p in pieces)
        pieces.append(pcm[first:last])
        spans.append((offset, offset + last - first))
        used += cost
    flush()
    return batches


async def line_audio(ctx: StageContext, segments: list[list[float]]) -> list[tuple[Any, Any]]:
    """(audio, span) per line for one request per line: the line's own audio, cropped as
    :func:`segment_batches` crops, whatever the transport.

    Not the scene by URI: a service's audio limits apply to the whole input it is given, span or not,
    and a scene can be longer than a line-level service accepts (the evaluator takes 30 s) — a line's
    few seconds inline always fit.
    """
    pcm = await ctx.audio.pcm16()

    def crop() -> list[tuple[Any, Any]]:
        pieces = []
        for segment in segments:
            (batch,) = _crop_batches(pcm, ctx.audio.sample_rate, [segment], ctx.transport.audio_budget_bytes,
                                     ctx.transport.inline_limit_bytes)
            pieces.append((batch.audio, batch.spans[0]))
        return pieces

    return await asyncio.to_thread(crop)


# Per-line requests a stage keeps in flight at once: enough to keep a service's queue fed (its own
# admission limits and batching decide the rest), few enough not to flood it with one job.
LINE_CONCURRENCY = 4


async def fan_out(ctx: StageContext, items: list[Any], call: Callable[[Any], Awaitable[Any]],
                  what: str) -> list[Any]:
    """``call(item)`` for every item, :data:`LINE_CONCURRENCY` at a time, results in order, progress
    reported; the first failure cancels the requests still running and is raised as it came."""
    semaphore = asyncio.Semaphore(LINE_CONCURRENCY)
    done = 0

    async def one(item: Any) -> Any:
        nonlocal done
        async with semaphore:
            result = await call(item)
        done += 1
        await ctx.report(done / len(items), f"{what} {done}/{len(items)}")
        return result

    tasks = [asyncio.create_task(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def remaining(ctx: StageContext) -> float:
    """Seconds left before the stage's deadline: every request's timeout."""
    return max(ctx.deadline - time.monotonic(), 0.1)


# ---------------------------------------------------------------------------------------------------
# probe: decode and measure audio, all inside the gateway.


async def decode_stage(ctx: StageContext) -> dict[str, Any]:
    """Report the decoded audio. The decoding itself happened at submit (where bad audio is the
    client's INVALID_ARGUMENT); this stage checks that the blob is still there for the others."""
    exists = await asyncio.to_thread(ctx.audio.blob.path.is_file)
    if not exists:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the job's decoded audio {ctx.audio.blob.path} is gone from the blob store; "
            "submit the job again",
            reason="AUDIO_GONE",
        )
    await ctx.report(1.0, f"decoded {ctx.audio.duration:.2f}s")
    return {
        "duration_seconds": round(ctx.audio.duration, 4),
        "sample_rate_hz": ctx.audio.sample_rate,
        "samples": ctx.audio.num_samples,
    }


def _frame_db(samples: np.ndarray, frame: int) -> np.ndarray:
    n = len(samples) // frame
    frames = samples[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1) + 1e-12)
    return 20 * np.log10(rms)


def _loudness(x: np.ndarray) -> dict[str, Any]:
    window = int(0.4 * SAMPLE_RATE)
    db = _frame_db(x, window) if len(x) >= window else np.array([-120.0])
    audible = db[db > -70]
    lra = float(np.percentile(audible, 95) - np.percentile(audible, 10)) if len(audible) > 2 else 0.0
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return {
        "rms_dbfs": round(20 * math.log10(max(rms, 1e-9)), 2),
        "peak_dbfs": round(20 * math.log10(max(peak, 1e-9)), 2),
        "loudness_range_db": round(lra, 2),
        "clipped_ratio": round(float(np.mean(np.abs(x) >= 0.999)), 6),
    }


async def loudness_stage(ctx: StageContext) -> dict[str, Any]:
    """Level statistics a mixing engineer checks first: RMS, peak, loudness range and clipping."""
    audio = await ctx.audio.samples()
    result = await asyncio.to_thread(_loudness, audio.samples)
    await ctx.report(1.0, "measured loudness")
    return result


def _activity(x: np.ndarray, duration: float, margin_db: float) -> dict[str, Any]:
    frame = int(FRAME_SECONDS * SAMPLE_RATE)
    db = _frame_db(x, frame)
    if not len(db):
        return {"speech_seconds": 0.0, "speech_ratio": 0.0, "segments": []}
    floor = float(np.percentile(db, 10))
    threshold = max(floor + margin_db, -60.0)
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
    return {
        "speech_seconds": round(speech, 3),
        "speech_ratio": round(speech / max(duration, 1e-9), 4),
        "threshold_dbfs": round(threshold, 2),
        "segments": segments,
    }


async def activity_stage(ctx: StageContext) -> dict[str, Any]:
    """Energy-based speech activity: where there is something to diarize, transcribe and score."""
    audio = await ctx.audio.samples()
    margin = float(ctx.params.get("vad_margin_db", 12.0))
    result = await asyncio.to_thread(_activity, audio.samples, audio.duration, margin)
    await ctx.report(1.0, f"{len(result['segments'])} speech segments")
    return result


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
        return parse_segments(given)
    return ctx.inputs["activity"]["segments"]


@dataclass
class _Identified:
    results: list[Any]  # speaker_pb2.SegmentIdentification, one per line, in order
    model: str
    threshold: float
    requests: int


async def _identify(ctx: StageContext, segments: list[list[float]], top_k: int) -> _Identified:
    """Speaker.Identify over ``segments``: one request by URI, or inline as many as the limit needs."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    batches = await segment_batches(ctx, segments)
    stub = speaker_pb2_grpc.SpeakerStub(ctx.channel("speaker"))
    out = _Identified(results=[], model="", threshold=0.0, requests=len(batches))
    for batch in batches:
        request = speaker_pb2.IdentifyRequest(
            request_id=ctx.job_id,
            audio=batch.audio,
            top_k=top_k,
            segments=batch.spans,
            voice_ids=[str(v) for v in ctx.params.get("voice_ids", [])],
        )
        remaining = max(ctx.deadline - time.monotonic(), 0.1)
        reply = await stub.Identify(request, timeout=remaining)
        if len(reply.results) != len(batch.spans):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"the speaker service answered {len(reply.results)} results for {len(batch.spans)} segments",
            )
        out.results.extend(reply.results)
        out.model, out.threshold = f"{reply.model.name}:{reply.model.version}", reply.threshold
    return out


async def identify_stage(ctx: StageContext) -> dict[str, Any]:
    """Speaker.Identify over every line; lines shorter than the service accepts are reported, not sent."""
    segments = _segments(ctx)
    min_seconds = float(ctx.params.get("min_segment_seconds", 0.5))
    usable = [s for s in segments if s[1] - s[0] >= min_seconds]
    identified = await _identify(ctx, usable, top_k=3)
    lines = []
    for (start, end), result in zip(usable, identified.results, strict=True):
        best = result.candidates[0] if result.candidates else None
        lines.append(
            {
                "start": round(start, 3),
                "end": round(end, 3),
                "voice_id": result.voice_id,
                "best_candidate": best.voice_id if best else "",
                "score": round(best.score, 4) if best else 0.0,
            }
        )
    await ctx.report(1.0, f"identified {len(lines)} lines")
    return {
        "lines": lines,
        "skipped_short": len(segments) - len(usable),
        "model": identified.model,
        "threshold": round(identified.threshold, 4),
        "audio_transport": ctx.transport.mode,
        "requests": identified.requests,
    }


# Stage-output keys that say how a stage ran (kept with the stage, left out of the job's result).
_RUN_KEYS = frozenset({"audio_transport", "requests"})


def _public(output: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in output.items() if k not in _RUN_KEYS}


def _identify_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"duration_seconds": outputs["decode"]["duration_seconds"], **_public(outputs["identify"])}


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
            audio="segments",
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

    audio = await whole_audio(ctx, "diarize")
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
        "audio_transport": ctx.transport.mode,
    }


MERGE_GAP_SECONDS = 1.0  # analyze_scene's default ``merge_gap_seconds``


def speaker_lines(turns: list[dict[str, Any]], max_gap: float) -> list[list[dict[str, Any]]]:
    """Exclusive turns grouped into lines: consecutive turns of one speaker less than ``max_gap``
    seconds apart are one line (pyannote's ``Annotation.support(collar)``; 0: every turn its own line).

    Why: diarization splits a line at its pauses ("Calm. … Of course. … Why didn't I think of that?"
    comes back as three turns) and at a neighbour's short overlap; transcribed or scored alone, each
    piece is a fragment of the line. A script reads, and is transcribed and scored, line by line."""
    lines: list[list[dict[str, Any]]] = []
    for turn in sorted(turns, key=lambda t: (t["start"], t["end"])):
        last = lines[-1][-1] if lines else None
        if last is not None and last["speaker"] == turn["speaker"] and turn["start"] - last["end"] < max_gap:
            lines[-1].append(turn)
        else:
            lines.append([turn])
    return lines


async def identify_turns_stage(ctx: StageContext) -> dict[str, Any]:
    """Identify every exclusive turn, name each diarized speaker by the votes of its turns, and write
    the script: the turns grouped into lines (:func:`speaker_lines`, ``merge_gap_seconds``)."""
    min_seconds = float(ctx.params.get("min_segment_seconds", 0.5))
    turns = ctx.inputs["diarize"]["exclusive_turns"]
    usable = [t for t in turns if t["end"] - t["start"] >= min_seconds]
    votes: dict[str, dict[str, float]] = {}
    identified: dict[tuple[float, float], tuple[str, float]] = {}
    reply = await _identify(ctx, [[t["start"], t["end"]] for t in usable], top_k=1)
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
    for group in speaker_lines(turns, float(ctx.params.get("merge_gap_seconds", MERGE_GAP_SECONDS))):
        # the line's own identification: that of its longest identified turn
        known = [t for t in group if (t["start"], t["end"]) in identified]
        longest = max(known, key=lambda t: t["end"] - t["start"], default=None)
        voice, score = identified[(longest["start"], longest["end"])] if longest else ("", 0.0)
        seconds = sum(t["end"] - t["start"] for t in group)
        script.append(
            {
                "start": group[0]["start"],
                "end": group[-1]["end"],
                "speaker": group[0]["speaker"],
                "confidence": round(sum(t["confidence"] * (t["end"] - t["start"]) for t in group)
                                    / max(seconds, 1e-9), 4),
                "voice_id": names.get(group[0]["speaker"], ""),
                "turn_voice_id": voice,
                "score": round(score, 4),
                "turns": len(group),
            }
        )
    await ctx.report(
        1.0, f"named {len(names)} of {len(votes) or len({t['speaker'] for t in turns})} speakers; "
        f"{len(turns)} turns → {len(script)} lines"
    )
    return {
        "speaker_names": names,
        "script": script,
        "audio_transport": ctx.transport.mode,
        "requests": reply.requests,
    }


def scene_lines(ctx: StageContext) -> list[dict[str, Any]]:
    """The script's turns long enough to transcribe and score (``min_segment_seconds``)."""
    min_seconds = float(ctx.params.get("min_segment_seconds", 0.5))
    return [t for t in ctx.inputs["identify"]["script"] if t["end"] - t["start"] >= min_seconds]


async def transcribe_stage(ctx: StageContext) -> dict[str, Any]:
    """AudioLLM.Generate (task TRANSCRIBE) on every line of the script, one request per line."""
    from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc

    lines = scene_lines(ctx)
    pieces = await line_audio(ctx, [[t["start"], t["end"]] for t in lines])
    stub = audiollm_pb2_grpc.AudioLLMStub(ctx.channel("audiollm"))
    generation = audiollm_pb2.GenerationConfig(max_new_tokens=int(ctx.params.get("max_transcript_tokens", 0)))

    async def transcribe(piece: tuple[Any, Any]) -> Any:
        audio, span = piece
        request = audiollm_pb2.GenerateRequest(request_id=ctx.job_id, audio=audio, span=span,
                                               task=audiollm_pb2.TRANSCRIBE, generation=generation)
        return await stub.Generate(request, timeout=remaining(ctx))

    replies = await fan_out(ctx, pieces, transcribe, "transcribed line")
    model = f"{replies[0].model.name}:{replies[0].model.version}" if replies else ""
    return {
        "lines": [
            {"start": t["start"], "end": t["end"], "text": r.text, "finish_reason": r.finish_reason}
            for t, r in zip(lines, replies, strict=True)
        ],
        "model": model,
        "audio_transport": ctx.transport.mode,
        "requests": len(replies),
    }


def role_context(ctx: StageContext, voice_id: str, speaker: str) -> Any:
    """What the realism rubric knows about a line: the scene and the character's profile and style.

    From the job's ``scene`` and ``characters`` parameters; a character the job does not describe is
    named by its voice id (or its diarization label when unidentified), so the prompt stays well formed.
    """
    from dramaturg.evaluator.v1 import evaluator_pb2

    described = parse_characters(ctx.params.get("characters", {})).get(voice_id, {})
    who = f"the character {voice_id}" if voice_id else f"an unidentified speaker ({speaker})"
    return evaluator_pb2.RoleContext(
        local_scene=str(ctx.params.get("scene") or "a scene from an audio drama"),
        char_profile=described.get("profile") or who,
        char_style=described.get("style") or "not described",
        char_age=described.get("age", ""),
    )


# The longest piece of a line the evaluator judges at once: the tiny model's 5-s audio window (the 7 B
# model's is 30 s: raise ``max_score_seconds`` up to that). A longer line is split into equal pieces,
# each scored, and its scores are the duration-weighted mean of its pieces'.
MAX_SCORE_SECONDS = 5.0


def split_line(start: float, end: float, longest: float) -> list[list[float]]:
    """``[start, end]`` as the fewest equal pieces no longer than ``longest`` seconds."""
    pieces = max(1, math.ceil((end - start) / longest - 1e-9))
    step = (end - start) / pieces
    return [[start + i * step, end if i == pieces - 1 else start + (i + 1) * step] for i in range(pieces)]


async def score_stage(ctx: StageContext) -> dict[str, Any]:
    """Evaluator.Evaluate (realism rubric, the character's context) on every line of the script."""
    from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc

    lines = scene_lines(ctx)
    longest = float(ctx.params.get("max_score_seconds", MAX_SCORE_SECONDS))
    pieces = [(i, piece) for i, t in enumerate(lines) for piece in split_line(t["start"], t["end"], longest)]
    audio = await line_audio(ctx, [piece for _, piece in pieces])
    stub = evaluator_pb2_grpc.EvaluatorStub(ctx.channel("evaluator"))
    dimensions = [str(d) for d in ctx.params.get("dimensions", [])]

    async def score(item: tuple[tuple[int, list[float]], tuple[Any, Any]]) -> Any:
        (index, _), (clip, span) = item
        turn = lines[index]
        request = evaluator_pb2.EvaluateRequest(
            request_id=ctx.job_id, audio=clip, span=span, rubric=evaluator_pb2.REALISM,
            dimensions=dimensions, context=role_context(ctx, turn.get("voice_id", ""), turn["speaker"]),
        )
        return await stub.Evaluate(request, timeout=remaining(ctx))

    replies = await fan_out(ctx, list(zip(pieces, audio, strict=True)), score, "scored piece")
    per_line: list[list[tuple[float, Any]]] = [[] for _ in lines]
    for (index, (start, end)), reply in zip(pieces, replies, strict=True):
        per_line[index].append((end - start, reply))
    model = f"{replies[0].model.name}:{replies[0].model.version}" if replies else ""
    return {
        "lines": [line_scores(t, parts) for t, parts in zip(lines, per_line, strict=True)],
        "model": model,
        "audio_transport": ctx.transport.mode,
        "requests": len(replies),
    }


def line_scores(turn: dict[str, Any], parts: list[tuple[float, Any]]) -> dict[str, Any]:
    """A line's scores: its pieces' (duration-weighted) mean per dimension, the mean over dimensions."""
    weights = np.array([w for w, _ in parts], dtype=np.float64)
    weights /= weights.sum()
    dimensions = [s.dimension for s in parts[0][1].scores]
    scores = {d: float(sum(w * next(s.score for s in r.scores if s.dimension == d)
                           for w, (_, r) in zip(weights, parts, strict=True))) for d in dimensions}
    mass = [s.digit_mass for _, r in parts for s in r.scores]
    return {
        "start": turn["start"],
        "end": turn["end"],
        "mean_score": round(float(np.mean(list(scores.values()))) if scores else 0.0, 4),
        "scores": {d: round(v, 4) for d, v in scores.items()},
        "digit_mass": round(float(np.mean(mass)) if mass else 0.0, 4),
        "pieces": len(parts),
    }


def _by_span(output: dict[str, Any] | None) -> dict[tuple[float, float], dict[str, Any]]:
    if not output or "lines" not in output:
        return {}
    return {(line["start"], line["end"]): line for line in output["lines"]}


def scene_markdown(result: dict[str, Any]) -> str:
    """The readable script: one row per turn with who, what and how well it was acted."""
    rows = ["| time | speaker | character | line | mean score |", "|---|---|---|---|---|"]
    for turn in result["script"]:
        score = turn.get("mean_score")
        text = str(turn.get("text", "")).replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| {turn['start']:.2f}–{turn['end']:.2f} | {turn['speaker']} | {turn.get('voice_id') or '—'} "
            f"| {text or '—'} | {'—' if score is None else f'{score:.2f}'} |"
        )
    return "\n".join(rows) + "\n"


def _scene_result(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    diarized = outputs["diarize"]
    identified = _public(outputs["identify"])
    transcripts = _by_span(outputs.get("transcribe"))
    scores = _by_span(outputs.get("score"))
    script = []
    for turn in identified.pop("script"):
        key = (turn["start"], turn["end"])
        line = dict(turn)
        if key in transcripts:
            line["text"] = transcripts[key]["text"]
        if key in scores:
            line.update({k: scores[key][k] for k in ("mean_score", "scores", "digit_mass", "pieces")})
        script.append(line)
    result = {
        "duration_seconds": outputs["decode"]["duration_seconds"],
        "rttm": diarized["rttm"],
        "speakers": diarized["speakers"],
        "diarization_model": diarized["model"],
        **identified,
        "script": script,
        "skipped_stages": {name: out["skipped"] for name, out in outputs.items() if "skipped" in out},
    }
    for stage, key in (("transcribe", "transcription_model"), ("score", "evaluator_model")):
        if outputs.get(stage, {}).get("model"):
            result[key] = outputs[stage]["model"]
    result["script_markdown"] = scene_markdown(result)
    return result


ANALYZE_SCENE = PipelineSpec(
    name="analyze_scene",
    description="A scene end to end: decode → diarize (diarization service) → identify each speaker "
    "against the enrolled voices (speaker service), one speaker's turns less than merge_gap_seconds apart "
    "(default 1 s) grouped into a line → transcribe each line (audiollm) and score its acting "
    "(evaluator, realism rubric) side by side → a labelled, scored script. Transcription and scoring are "
    "skipped, and say so, where the gateway has no endpoint for their service.",
    stages=(
        StageSpec("decode", decode_stage, timeout_seconds=120),
        StageSpec(
            "diarize",
            diarize_stage,
            service="diarization",
            depends_on=("decode",),
            timeout_seconds=1800,
            audio="whole",
        ),
        StageSpec(
            "identify",
            identify_turns_stage,
            service="speaker",
            depends_on=("decode", "diarize"),
            timeout_seconds=600,
            audio="segments",
        ),
        # transcripts and scores need only the named script: they run side by side
        StageSpec(
            "transcribe",
            transcribe_stage,
            service="audiollm",
            depends_on=("identify",),
            timeout_seconds=1800,
            audio="segments",
            optional=True,
        ),
        StageSpec(
            "score",
            score_stage,
            service="evaluator",
            depends_on=("identify",),
            timeout_seconds=1800,
            audio="segments",
            optional=True,
        ),
    ),
    result=_scene_result,
    report=write_scene_report,
    check=check_scene_params,
    params={
        "max_seconds": float,
        "num_speakers": int,
        "min_speakers": int,
        "max_speakers": int,
        "uri": str,
        "voice_ids": list,
        "min_segment_seconds": float,
        "merge_gap_seconds": float,
        "max_transcript_tokens": int,
        "max_score_seconds": float,
        "dimensions": list,
        "scene": str,
        "characters": dict,
    },
)
