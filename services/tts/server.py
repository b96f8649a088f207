"""The TTS service: speech in a character's voice over gRPC, whole (Synthesize) or streamed as it is
generated (SynthesizeOnline), and the voices it speaks with.

A request is checked completely before it queues for the model: first each field on its own (text,
encoding and rate, sampling numbers, the reference audio decoded), then how the fields combine (a
reference needs its transcript; a voice *or* a reference), then what the server holds (the voice,
and whether it belongs to the model asked for). Field checks come first so that an error names the
broken field whatever else the request holds. Then the request takes the one synthesis slot
(``shared/admission``: a full waiting room is RESOURCE_EXHAUSTED with a retry delay) and runs on the
service's model thread, where a deadline or a cancelled call stops generation at the next frame
(``shared/cancellation`` through :class:`~dramaturg.services.tts.synthesis.StopCheck`).

One synthesis runs at a time: the model thread is one, and a LoRA voice is switched onto the shared
model for its request (peft adapters, loaded on first use, never merged, the base model restored by
disabling them). Batching concurrent requests is not built: they queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from dramaturg.common.v1 import common_pb2
from dramaturg.services.tts import synthesis
from dramaturg.services.tts.config import TtsSettings
from dramaturg.services.tts.synthesis import OutputFormat, Sampling, StopCheck, StreamEncoder
from dramaturg.services.tts.voices import (
    AdapterSource,
    Voice,
    VoiceRegistry,
    check_adapter_files,
    check_tts_voice_fields,
    check_voice_id,
    read_speakers,
    resolve_adapter_path,
)
from dramaturg.shared import audio as audio_io
from dramaturg.shared import metrics
from dramaturg.shared.admission import ConcurrencyLimiter
from dramaturg.shared.cancellation import ShouldStop, never_stop, run_cancellable
from dramaturg.shared.grpc.errors import ServiceError, echo, failed_precondition, invalid_argument, not_found
from dramaturg.shared.grpc.interceptors import deadline_of
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.model_service import ModelService, ModelServicer, require_model_type
from dramaturg.shared.store import ModelRecord
from dramaturg.shared.validation import require_finite
from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "tts"
DEADLINE_HINT = (
    "allow about max_new_tokens / 12.5 seconds of audio times the service's real-time factor "
    '(dramaturg_real_time_factor{service="tts"}), or ask for fewer frames'
)
Turn = tuple[int, str, np.ndarray]  # (speaker, text, audio at the model's rate): model.Turn


@dataclass
class Job:
    """One validated synthesis: what the model thread runs."""

    text: str
    sampling: Sampling
    speaker: int = 0
    context: list[Turn] = field(default_factory=list)
    adapter: tuple[str, Path] | None = None  # (name on the model, folder) of a LoRA voice


class LoadedTtsModel:
    """A loaded CSM with its processor and the LoRA adapters loaded onto it.

    Every method but the constructor runs on the service's model thread (adapters change the shared
    model, so they are switched only there, between requests).
    """

    def __init__(self, model: Any, processor: Any, record: ModelRecord, settings: TtsSettings) -> None:
        self.model = model
        self.processor = processor
        self.record = record
        codec = model.config.codec_config
        self.sample_rate = int(codec.sampling_rate)
        self.frame_rate = float(getattr(codec, "frame_rate", 12.5))
        self.max_positions = int(model.config.max_position_embeddings)
        # The event loop checks request text with its own copy of the tokenizer: a fast tokenizer shared
        # with the model thread can fail with "Already borrowed" when both use it at once.
        self.tokenizer = copy.deepcopy(processor.tokenizer)
        self.text_rules = synthesis.text_rules(self.tokenizer, settings.max_text_chars)
        self.max_adapters = settings.max_loaded_adapters
        self._adapters: OrderedDict[str, None] = OrderedDict()  # loaded adapter names, least recent first
        # the voices the model was trained on (its speakers.json: name → the CSM speaker id)
        self.speakers: dict[str, int] = read_speakers(record.path)

    # -- adapters ------------------------------------------------------------------------------------
    def _load_adapter(self, name: str, path: Path) -> None:
        try:
            self.model.load_adapter(str(path), adapter_name=name)
        except Exception:
            self._forget(name)  # a failed load may leave the adapter half-registered
            raise

    def _forget(self, name: str) -> None:
        if name in (getattr(self.model, "peft_config", None) or {}):
            self.model.delete_adapter(name)
        self._adapters.pop(name, None)

    def use_adapter(self, adapter: tuple[str, Path] | None) -> None:
        """Switch the model to ``adapter`` (loading it, unloading the least recent beyond the bound),
        or to the base model (adapters disabled, not unloaded) for None."""
        if adapter is None:
            if self._adapters:
                self.model.disable_adapters()
            return
        name, path = adapter
        if name not in self._adapters:
            while len(self._adapters) >= self.max_adapters:
                self._forget(next(iter(self._adapters)))
            try:
                self._load_adapter(name, path)
            except Exception as exc:
                log.exception("cannot load the adapter in %s", path)
                raise failed_precondition(
                    f"the voice's LoRA adapter no longer loads onto model {self.record.ref} "
                    f"({_first_line(exc)}); add the voice again (AddVoice with overwrite)",
                    reason="ADAPTER_UNLOADABLE",
                ) from exc
            self._adapters[name] = None
        self._adapters.move_to_end(name)
        self.model.set_adapter(name)
        self.model.enable_adapters()

    def check_adapter(self, path: Path) -> None:
        """Load ``path`` under a probe name and unload it: INVALID_ARGUMENT if it does not fit this model."""
        name = f"probe_{uuid.uuid4().hex[:12]}"
        try:
            self._load_adapter(name, path)
        except Exception as exc:
            raise invalid_argument(
                "adapter_path",
                f"the adapter does not fit model {self.record.ref} ({_first_line(exc)}); "
                "use an adapter trained on this model, or name the model it was trained on",
            ) from exc
        finally:
            self._forget(name)

    # -- synthesis -----------------------------------------------------------------------------------
    def synthesize(self, job: Job, should_stop: ShouldStop, streamer: Any = None) -> tuple[np.ndarray, int]:
        """Audio (float32 at :attr:`sample_rate`) and the number of frames generated."""
        from dramaturg.services.tts.model import prompt_inputs, synthesize
        from transformers import LogitsProcessorList

        self.use_adapter(job.adapter)
        prompt = int(prompt_inputs(self.processor, job.text, job.speaker, job.context)["input_ids"].shape[1])
        if prompt + job.sampling.max_new_frames > self.max_positions:
            raise invalid_argument(
                "config.max_new_tokens",
                f"the prompt ({prompt} positions: text plus reference audio) and "
                f"{job.sampling.max_new_frames} new frames exceed the model's {self.max_positions} "
                "positions; shorten the text or the reference, or ask for fewer frames",
            )
        stop = StopCheck(should_stop)
        samples, _ = synthesize(
            self.model,
            self.processor,
            job.text,
            job.speaker,
            context=job.context,
            max_new_frames=job.sampling.max_new_frames,
            seed=job.sampling.seed,
            temperature=job.sampling.temperature,
            top_p=job.sampling.top_p,
            top_k=job.sampling.top_k,
            streamer=streamer,
            logits_processor=LogitsProcessorList([stop]),
        )
        return samples, stop.steps


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class TtsServicer(ModelServicer[LoadedTtsModel], tts_pb2_grpc.TextToSpeechServicer):
    service: TtsService
    settings: TtsSettings

    # -- request → job -------------------------------------------------------------------------------
    def _reference_limits(self) -> audio_io.AudioLimits:
        return self.audio_limits(reject_silence=True)  # a silent prompt carries no voice

    async def _reference(
        self, holder: Any, model: LoadedTtsModel, audio_field: str, text_field: str
    ) -> np.ndarray | None:
        """The decoded reference audio of ``holder`` (a SynthesisConfig or an AddVoiceRequest), its
        transcript checked on its own; None when it has none."""
        reference = None
        if holder.HasField("reference_audio"):
            decoded = await self.decode(
                holder.reference_audio,
                target_rate=model.sample_rate,
                field=audio_field,
                limits=self._reference_limits(),
            )
            reference = decoded.samples
        if holder.reference_text:
            synthesis.check_text(holder.reference_text, text_field, model.text_rules, model.tokenizer)
        return reference

    @staticmethod
    def _reference_pair(reference: np.ndarray | None, text: str, audio_field: str, text_field: str) -> None:
        if reference is not None and not text:
            raise invalid_argument(
                text_field, f"is empty: a reference prompt ({audio_field}) needs the transcript of its audio"
            )
        if text and reference is None:
            raise invalid_argument(text_field, f"is set without {audio_field}: send the audio it transcribes")

    def _voice_for(self, voice_id: str, model: LoadedTtsModel, field_path: str) -> Voice:
        if self.service.voices.find(voice_id) is None:
            trained = ", ".join(sorted(model.speakers)[:20]) or "none named"
            raise not_found("voice", voice_id, f"AddVoice it first, or ListVoices to see the voices there "
                            f"are; model {model.record.ref} was trained on speakers: {trained}")
        voice = self.service.voices.get(voice_id, field_path)
        if voice.model_ref != model.record.ref:
            raise failed_precondition(
                f"voice {voice_id!r} belongs to model {voice.model_ref}, not {model.record.ref}: set "
                f"config.model to {voice.model_ref}, or AddVoice it again for {model.record.ref} (a LoRA "
                "voice needs an adapter trained on that model)",
                reason="VOICE_MODEL_MISMATCH",
            )
        return voice

    async def _job(
        self, request: tts_pb2.SynthesizeRequest, model: LoadedTtsModel, *, streaming: bool
    ) -> tuple[Job, OutputFormat]:
        config = request.config
        # each field on its own
        text = synthesis.check_text(request.text, "text", model.text_rules, model.tokenizer)
        fmt = synthesis.output_format(
            config, model.sample_rate, self.settings.output_sample_rates, streaming=streaming
        )
        seed = int(config.seed) or secrets.randbelow(2**31 - 1) + 1
        sampling = synthesis.sampling(config, self.settings, seed)
        if config.voice_id:
            check_voice_id(config.voice_id, "config.voice_id")
        reference = await self._reference(config, model, "config.reference_audio", "config.reference_text")
        # how they combine
        self._reference_pair(
            reference, config.reference_text, "config.reference_audio", "config.reference_text"
        )
        if config.voice_id and reference is not None:
            raise invalid_argument(
                "config.voice_id",
                "set voice_id or reference_audio, not both: a voice brings its own prompt (AddVoice can "
                "store this reference as a voice)",
            )
        job = Job(text=text, sampling=sampling)
        # what the server holds: a voice added with AddVoice, else a speaker the model was trained on
        if config.voice_id and self.service.voices.find(config.voice_id) is None \
                and config.voice_id in model.speakers:
            job.speaker = model.speakers[config.voice_id]
        elif config.voice_id:
            voice = self._voice_for(config.voice_id, model, "config.voice_id")
            job.speaker = voice.speaker
            if voice.has_reference:
                audio = await asyncio.to_thread(self.service.voices.reference, voice)
                job.context = [(voice.speaker, voice.reference_text, audio)]
            if voice.has_adapter:
                job.adapter = (voice.adapter_name, self.service.voices.adapter_path(voice))
        elif reference is not None:
            job.context = [(0, config.reference_text, reference)]
        return job, fmt

    async def _run(
        self, model: LoadedTtsModel, job: Job, deadline: float | None, streamer: Any = None
    ) -> tuple[np.ndarray, int]:
        return await run_cancellable(
            self.service.executor,
            lambda stop: model.synthesize(job, stop, streamer),
            deadline,
            what="the synthesis",
            deadline_hint=DEADLINE_HINT,
        )

    @staticmethod
    def _observe(method: str, seconds: float, generation_seconds: float, frames: int) -> None:
        metrics.observe_audio(SERVICE, method, seconds, generation_seconds)
        synthesis.FRAMES.labels(method).inc(frames)
        if generation_seconds > 0 and frames:
            synthesis.FRAMES_PER_SECOND.labels(method).observe(frames / generation_seconds)

    # -- synthesis RPCs ------------------------------------------------------------------------------
    async def Synthesize(self, request: tts_pb2.SynthesizeRequest, context: grpc.aio.ServicerContext):
        began = time.perf_counter()
        model = await self.model(request.config.model)
        job, fmt = await self._job(request, model, streaming=False)
        deadline = deadline_of(context)
        async with self.service.limiter.slot(deadline):
            generation_began = time.perf_counter()
            samples, frames = await self._run(model, job, deadline)
            generation_seconds = time.perf_counter() - generation_began
        samples = require_finite(samples, "the synthesized audio", model=model.record.ref)
        audio = audio_io.Audio(samples, model.sample_rate)
        output = await asyncio.to_thread(
            lambda: audio_io.to_audio_output(audio_io.resample(audio, fmt.sample_rate), fmt.encoding)
        )
        self._observe("Synthesize", audio.duration, generation_seconds, frames)
        synthesis.TIME_TO_FIRST_AUDIO.labels("Synthesize").observe(time.perf_counter() - began)
        return tts_pb2.SynthesizeResponse(
            request_id=request.request_id,
            audio=output,
            model=self.model_ref(model.record),
            seed=job.sampling.seed,
            generated_frames=frames,
        )

    async def SynthesizeOnline(
        self, request: tts_pb2.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tts_pb2.SynthesizeOnlineResponse]:
        """Audio chunks as the frames are generated: the model thread's streamer hands each decoded
        chunk to the event loop, which encodes and sends it while generation goes on."""
        from dramaturg.services.tts.codec_stream import CsmAudioStreamer

        began = time.perf_counter()
        model = await self.model(request.config.model)
        job, fmt = await self._job(request, model, streaming=True)
        deadline = deadline_of(context)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        streamer = CsmAudioStreamer.for_model(
            model.model,
            chunk_frames=self.settings.stream_chunk_frames,
            on_audio=lambda _row, samples: loop.call_soon_threadsafe(chunks.put_nowait, samples),
        )
        encoder = StreamEncoder(fmt, model.sample_rate)
        sequence = 0

        def message(data: bytes, *, final: bool = False) -> tts_pb2.SynthesizeOnlineResponse:
            nonlocal sequence
            out = tts_pb2.SynthesizeOnlineResponse(
                request_id=request.request_id,
                audio_chunk=data,
                sample_rate_hz=fmt.sample_rate,
                sequence=sequence,
                audio_seconds=encoder.seconds_sent,
                is_final=final,
            )
            if sequence == 0:
                out.model.CopyFrom(self.model_ref(model.record))
                out.seed = job.sampling.seed
                out.encoding = fmt.encoding
                synthesis.TIME_TO_FIRST_AUDIO.labels("SynthesizeOnline").observe(time.perf_counter() - began)
            sequence += 1
            return out

        async with self.service.limiter.slot(deadline):
            generation_began = time.perf_counter()
            run = asyncio.ensure_future(self._run(model, job, deadline, streamer))
            run.add_done_callback(lambda _: chunks.put_nowait(None))  # after every chunk (FIFO)
            try:
                while (samples := await chunks.get()) is not None:
                    samples = require_finite(samples, "the synthesized audio", model=model.record.ref)
                    data = encoder.encode(samples)
                    if data:
                        yield message(data)
                _, frames = await run  # raises what stopped the generation
                generation_seconds = time.perf_counter() - generation_began
            finally:
                if not run.done():  # the client went away or a chunk was refused: stop the model
                    run.cancel()
                    with contextlib.suppress(BaseException):
                        await run
        yield message(encoder.encode(np.zeros(0, np.float32), last=True), final=True)
        self._observe(
            "SynthesizeOnline", streamer.audio(0).size / model.sample_rate, generation_seconds, frames
        )

    # -- voices --------------------------------------------------------------------------------------
    def _voice_proto(self, voice: Voice) -> tts_pb2.Voice:
        name, _, version = voice.model_ref.partition(":")
        out = tts_pb2.Voice(
            voice_id=voice.voice_id,
            display_name=voice.display_name,
            model=common_pb2.ModelRef(name=name, version=version),
            has_adapter=voice.has_adapter,
            has_reference=voice.has_reference,
            reference_text=voice.reference_text,
            reference_seconds=voice.reference_seconds,
            speaker=voice.speaker,
            labels=voice.labels,
            adapter_source=voice.adapter_source,
        )
        if voice.created_at:
            out.created_at.FromJsonString(voice.created_at.replace("+00:00", "Z"))
        return out

    async def ListVoices(self, request: tts_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext):
        return tts_pb2.ListVoicesResponse(voices=[self._voice_proto(v) for v in self.service.voices.list()])

    async def GetVoice(self, request: tts_pb2.GetVoiceRequest, context: grpc.aio.ServicerContext):
        return self._voice_proto(self.service.voices.get(request.voice_id))

    async def _adapter(self, request: tts_pb2.AddVoiceRequest) -> AdapterSource | None:
        """The adapter AddVoice names: a folder under the adapter roots, or a store version."""
        limit = self.settings.max_adapter_bytes
        if request.adapter_path:
            return await asyncio.to_thread(
                lambda: check_adapter_files(
                    resolve_adapter_path(request.adapter_path, self.settings.adapter_roots),
                    limit,
                    "adapter_path",
                    echo(request.adapter_path),
                    request.adapter_path,
                )
            )
        if request.adapter_model.name:
            record = await self.service.models.lookup(request.adapter_model)
            return await asyncio.to_thread(
                check_adapter_files, record.path, limit, "adapter_model", record.ref, record.ref
            )
        return None

    async def _adapter_base(
        self, adapter: AdapterSource, model: LoadedTtsModel, model_named: bool
    ) -> LoadedTtsModel:
        """The model a LoRA voice belongs to: the one the request names, which must be the base the
        adapter was trained on when its metadata names a base in the store; else that base."""
        if not adapter.base_model:
            return model
        try:
            base = await self.service.models.lookup(adapter.base_model)
        except ServiceError:  # a hub id or a folder the training run was given: nothing to compare with
            return model
        if base.ref == model.record.ref:
            return model
        if model_named:
            raise failed_precondition(
                f"the adapter was trained on model {base.ref}, not {model.record.ref}: set model to "
                f"{base.ref}, or leave it empty to add the voice for {base.ref}",
                reason="VOICE_MODEL_MISMATCH",
            )
        return await self.model(common_pb2.ModelRef(name=base.name, version=base.version))

    async def AddVoice(self, request: tts_pb2.AddVoiceRequest, context: grpc.aio.ServicerContext):
        check_voice_id(request.voice_id)
        labels = dict(request.labels)
        check_tts_voice_fields(request.display_name, labels, request.speaker)
        model = await self.model(request.model)
        if not request.overwrite:
            self.service.voices.check_new(request.voice_id)  # before paying for decoding and copying
        # each field on its own
        reference = await self._reference(request, model, "reference_audio", "reference_text")
        adapter = await self._adapter(request)
        # how they combine
        self._reference_pair(reference, request.reference_text, "reference_audio", "reference_text")
        if request.adapter_path and request.adapter_model.name:
            raise invalid_argument("adapter_model", "set adapter_path or adapter_model, not both")
        if reference is None and adapter is None:
            raise invalid_argument(
                "reference_audio",
                "a voice needs a reference prompt (reference_audio + reference_text), a LoRA adapter "
                "(adapter_path or adapter_model), or both",
            )
        speaker = int(request.speaker)
        if adapter is not None:
            rate = model.sample_rate
            model = await self._adapter_base(adapter, model, bool(request.model.name))
            if reference is not None and model.sample_rate != rate:
                reference = audio_io.resample(audio_io.Audio(reference, rate), model.sample_rate).samples
            await self.service.run_model(model.check_adapter, adapter.folder)
            if speaker == 0 and adapter.speaker_id is not None:
                speaker = adapter.speaker_id
        voice = Voice(
            voice_id=request.voice_id,
            display_name=request.display_name or request.voice_id,
            model_ref=model.record.ref,
            speaker=speaker,
            reference_text=request.reference_text,
            reference_seconds=round(len(reference) / model.sample_rate, 3) if reference is not None else 0.0,
            labels=labels,
        )
        voice = await asyncio.to_thread(
            lambda: self.service.voices.add(
                voice,
                reference=reference,
                sample_rate=model.sample_rate,
                adapter=adapter,
                overwrite=request.overwrite,
            )
        )
        log.info(
            "voice %s added for %s (adapter: %s, reference: %.1f s)",
            voice.voice_id,
            voice.model_ref,
            voice.adapter_source or "none",
            voice.reference_seconds,
        )
        return tts_pb2.AddVoiceResponse(request_id=request.request_id, voice=self._voice_proto(voice))

    async def RemoveVoice(self, request: tts_pb2.RemoveVoiceRequest, context: grpc.aio.ServicerContext):
        voice = await asyncio.to_thread(self.service.voices.remove, request.voice_id)
        return tts_pb2.RemoveVoiceResponse(voice=self._voice_proto(voice))


class TtsService(ModelService):
    name = SERVICE

    def __init__(self, settings: TtsSettings, home: Path | None = None) -> None:
        super().__init__(settings, home)
        self.settings: TtsSettings = settings
        self.voices = VoiceRegistry(self.home / "voices" / SERVICE)
        # One synthesis at a time (one model thread; LoRA voices switch the shared model), a bounded queue.
        self.limiter = ConcurrencyLimiter(
            SERVICE, 1, settings.max_waiting, queue="synthesize", work="synthesis"
        )

    def load_model(self, record: ModelRecord, device: str) -> LoadedTtsModel:
        from dramaturg.services.tts.model import load_tts_model

        require_servable(record)
        model, processor = load_tts_model(record.path, device=device)
        return LoadedTtsModel(model, processor, record, self.settings)

    async def warm_up(self, model: LoadedTtsModel) -> None:
        job = Job(
            text="warm up.",
            sampling=Sampling(max_new_frames=2, temperature=0.9, top_p=None, top_k=None, seed=1),
        )
        await self.run_model(model.synthesize, job, never_stop)

    def service_registrations(self) -> list[Registration]:
        full_name = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name
        return [Registration(full_name, tts_pb2_grpc.add_TextToSpeechServicer_to_server, TtsServicer(self))]


def require_servable(record: ModelRecord) -> None:
    """FAILED_PRECONDITION unless ``record`` is a CSM model: the tts store also holds what the recipes
    publish beside models (LoRA adapters, codecs), which load as voices or training inputs instead."""
    if (record.path / "adapter_config.json").is_file():
        hint = f"it is a LoRA adapter: add it as a voice (AddVoice with adapter_model {record.ref})"
    else:
        hint = "name a CSM model (ListModels: architecture csm or tiny)"
    require_model_type(record, "tts", "csm", "a CSM model", hint)


def create_service(settings: TtsSettings | None = None) -> TtsService:
    return TtsService(settings or TtsSettings())
