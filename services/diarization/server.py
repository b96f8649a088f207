"""The diarization service: who spoke when, over gRPC, for whole files and for live streams.

``Diarize`` decodes and validates the audio, then runs the requested store version's pyannote
pipeline (``inference``) on the service's model threads and answers overlapping turns, exclusive
turns, RTTM and the speakers. ``StreamingDiarize`` takes a config and raw PCM chunks
(``shared.pcm_stream``) and re-diarizes a sliding window as audio arrives (``streaming``), sending
each turn once it has settled, with stream-wide speaker labels.

Work is bounded (``shared.admission``): at most ``max_concurrent`` diarizations run at once and
``max_waiting`` wait; the rest get RESOURCE_EXHAUSTED with a RetryInfo delay. A diarization checks
for client cancellation and the RPC deadline between pyannote's batches (``shared.cancellation``)
and stops there, so an abandoned 3-hour request does not keep a slot busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
from dramaturg.services.diarization.config import DiarizationSettings
from dramaturg.services.diarization.inference import (
    DiarizationResult,
    LoadedDiarizationModel,
    SpeakerHints,
    Turn,
    check_hints,
    check_uri,
    rttm_lines,
)
from dramaturg.services.diarization.streaming import StreamTracker, Window
from dramaturg.shared import metrics
from dramaturg.shared.admission import ConcurrencyLimiter
from dramaturg.shared.cancellation import ShouldStop, run_cancellable
from dramaturg.shared.grpc.errors import failed_precondition, invalid_argument
from dramaturg.shared.grpc.interceptors import current_request_id, deadline_of
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.model_service import ModelService, ModelServicer
from dramaturg.shared.pcm_stream import AudioBuffer, PcmStream, check_stream_format
from dramaturg.shared.store import ModelRecord

log = logging.getLogger(__name__)

# pyannote.audio 4 sends usage telemetry to otel.pyannote.ai by default; a server must not phone home
# (and cannot, offline). pyannote is imported lazily (load_model), after this; operators can opt in.
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

SERVICE = "diarization"

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# The servicer


class DiarizationServicer(ModelServicer[LoadedDiarizationModel], diarization_pb2_grpc.DiarizationServicer):
    service: DiarizationService
    settings: DiarizationSettings

    async def _run(self, work: Callable[[ShouldStop], T], context: grpc.aio.ServicerContext) -> T:
        """Run ``work(should_stop)`` on the diarization threads; stop it when the RPC goes away."""
        return await run_cancellable(
            self.service.executor, work, deadline_of(context), what="the diarization",
            deadline_hint="give long files a longer deadline (about the audio duration × the service's "
            "real-time factor)")

    # -- Diarize -------------------------------------------------------------------------------------
    async def Diarize(self, request: diarization_pb2.DiarizeRequest, context: grpc.aio.ServicerContext):
        """Diarize a whole file: hints and uri are checked before any audio is decoded (cheap errors
        first); the run slot is taken before decoding, so at most max_concurrent decoded files sit
        in memory at once."""
        began = time.perf_counter()
        request_id = request.request_id or current_request_id()
        hints = check_hints(request.config, self.settings.max_speakers_hint)
        uri = check_uri(request.uri, "uri") if request.uri else check_uri(request_id, "request_id")
        if not request.HasField("audio"):
            raise invalid_argument("audio", "set the audio to diarize (content or uri)")
        model = await self.model(request.config.model)
        async with self.service.limiter.slot(deadline_of(context)):
            decoded = await self.decode(request.audio, target_rate=model.sample_rate, field="audio")
            samples = decoded.samples
            duration = decoded.duration
            del decoded
            result = await self._run(lambda stop: model.diarize(samples, uri, hints, stop), context)
        metrics.observe_audio(SERVICE, "Diarize", duration, time.perf_counter() - began)
        return diarization_pb2.DiarizeResponse(
            request_id=request_id,
            turns=[t.to_proto() for t in result.turns],
            exclusive_turns=[t.to_proto() for t in result.exclusive_turns],
            rttm=rttm_lines(result.turns, uri),
            speakers=result.speakers,
            audio_seconds=duration,
            model=self.model_ref(model.record),
        )

    # -- StreamingDiarize -----------------------------------------------------------------------------
    async def StreamingDiarize(
        self,
        request_iterator: AsyncIterator[diarization_pb2.StreamingDiarizeRequest],
        context: grpc.aio.ServicerContext,
    ):
        """Config first, then raw mono PCM chunks of any size; turns stream back as they settle.

        A reader task decodes chunks into the buffer while windows are diarized, so a live client is
        not blocked by a window in progress; it stops reading (gRPC flow control then holds the
        client back) when stream_max_buffer_seconds are waiting.
        """
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise failed_precondition(
                "send streaming_config first: the stream ended before any message",
                reason="NO_STREAMING_CONFIG",
            ) from None
        if first.WhichOneof("streaming_request") != "streaming_config":
            raise failed_precondition(
                "send streaming_config first: the first message of a stream says how the audio that follows "
                "is encoded (encoding, sample_rate_hz) and which model to use; audio_content comes after it",
                reason="NO_STREAMING_CONFIG",
            )
        config = first.streaming_config
        request_id = config.request_id or current_request_id()
        check_stream_format(
            config.encoding, config.sample_rate_hz, "streaming_config", whole_file_rpc="Diarize"
        )
        hints = check_hints(config.config, self.settings.max_speakers_hint, prefix="streaming_config.config")
        uri = check_uri(config.uri or request_id, "streaming_config.uri")
        model = await self.model(config.config.model)
        self.service.limiter.check_admission()

        began = time.perf_counter()
        pcm = PcmStream(config.encoding, config.sample_rate_hz, model.sample_rate)
        buffer = AudioBuffer(model.sample_rate)
        tracker = StreamTracker(self.settings, hints)
        arrived = asyncio.Event()
        room = asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            async for message in requests:
                if message.WhichOneof("streaming_request") != "audio_content":
                    raise invalid_argument(
                        "streaming_config",
                        "send streaming_config once, as the first message; every later message carries "
                        "audio_content",
                    )
                buffer.append(pcm.feed(message.audio_content))
                if pcm.received_seconds > self.settings.max_seconds:
                    raise invalid_argument(
                        "audio_content",
                        f"the stream is longer than this service accepts ({self.settings.max_seconds:g} s); "
                        "end it and start a new one",
                    )
                arrived.set()
                while buffer.end - tracker.processed > self.settings.stream_max_buffer_seconds:
                    room.clear()
                    await room.wait()
            buffer.append(pcm.feed(b"", last=True))
            ended = True
            arrived.set()

        reader = asyncio.create_task(read())
        settled: list[Turn] = []
        finished = False
        try:
            while True:
                window = tracker.next_window(buffer.end, ended)
                if window is None:
                    if ended:
                        break
                    arrived.clear()
                    waiter = asyncio.ensure_future(arrived.wait())
                    try:
                        await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if reader.done() and reader.exception() is not None:
                        raise reader.exception()
                    continue
                if window.last and buffer.end < self.settings.min_seconds:
                    raise invalid_argument(
                        "audio_content",
                        f"the stream carried {buffer.end:.2f} s of audio; diarization needs at least "
                        f"{self.settings.min_seconds:g} s",
                    )
                settled = await self._stream_window(model, buffer, tracker, window, uri, hints, context)
                buffer.drop_before(tracker.keep_from())
                room.set()
                if window.last:
                    settled += tracker.finish()
                    finished = True
                    break
                yield diarization_pb2.StreamingDiarizeResponse(
                    request_id=request_id,
                    turns=[t.to_proto() for t in settled],
                    processed_seconds=round(tracker.processed, 3),
                )
            if buffer.end <= 0:
                raise invalid_argument(
                    "audio_content", "the stream ended before any audio_content; send audio after the config"
                )
            if not finished:
                settled = tracker.finish()
            metrics.observe_audio(SERVICE, "StreamingDiarize", buffer.end, time.perf_counter() - began)
            yield diarization_pb2.StreamingDiarizeResponse(
                request_id=request_id,
                turns=[t.to_proto() for t in settled],
                processed_seconds=round(tracker.processed, 3),
                is_final=True,
            )
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _stream_window(
        self,
        model: LoadedDiarizationModel,
        buffer: AudioBuffer,
        tracker: StreamTracker,
        window: Window,
        uri: str,
        hints: SpeakerHints,
        context: grpc.aio.ServicerContext,
    ) -> list[Turn]:
        samples = buffer.slice(window.start, window.end)
        # Each window may hold only some of the stream's speakers: pass the bound, not the exact count.
        window_hints = SpeakerHints(max=hints.upper)
        if len(samples) < self.settings.min_seconds * model.sample_rate:
            result = DiarizationResult([], [], [])
        else:
            async with self.service.limiter.slot(deadline_of(context), admit=False):
                result = await self._run(
                    lambda stop: model.diarize(samples, uri, window_hints, stop), context
                )
        return tracker.absorb(window, result.shifted(window.start))


# ---------------------------------------------------------------------------------------------------
# The service


class DiarizationService(ModelService):
    name = SERVICE

    def __init__(self, settings: DiarizationSettings, home: Path | None = None) -> None:
        super().__init__(settings, home)
        self.settings: DiarizationSettings = settings
        self.limiter = ConcurrencyLimiter(
            SERVICE, settings.max_concurrent, settings.max_waiting, queue="diarize", work="diarization"
        )

    def model_threads(self) -> int:
        # A long diarization must not wait behind another, nor occupy the default executor that
        # decodes audio: one model thread per concurrent diarization.
        return self.settings.max_concurrent

    def load_model(self, record: ModelRecord, device: str) -> LoadedDiarizationModel:
        from dramaturg.services.diarization.model import load_pipeline  # torch + pyannote: model threads only

        pipeline = load_pipeline(
            record.path,
            device,
            segmentation_batch_size=self.settings.segmentation_batch_size,
            embedding_batch_size=self.settings.embedding_batch_size,
        )
        return LoadedDiarizationModel(pipeline, record, self.settings)

    def release_model(self, model: LoadedDiarizationModel) -> None:
        del model
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def warm_up(self, model: LoadedDiarizationModel) -> None:
        noise = np.random.default_rng(0).normal(0, 0.05, 3 * model.sample_rate).astype(np.float32)
        try:
            await self.run_model(model.diarize, noise, "warm-up", SpeakerHints())
        except Exception:  # noise is not speech; a pipeline that trips on it still serves speech
            log.warning("warm-up diarization failed", exc_info=True)

    def service_registrations(self) -> list[Registration]:
        full_name = diarization_pb2.DESCRIPTOR.services_by_name["Diarization"].full_name
        return [
            Registration(
                full_name, diarization_pb2_grpc.add_DiarizationServicer_to_server, DiarizationServicer(self)
            )
        ]


def create_service(settings: DiarizationSettings | None = None) -> DiarizationService:
    return DiarizationService(settings or DiarizationSettings())

