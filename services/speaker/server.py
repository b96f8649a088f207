"""The speaker service: embeddings, verification, and a registry of enrolled voices, over gRPC.

Every request's audio is decoded and validated by the shared audio module, then each utterance goes
through the model's dynamic batcher (length-aware: utterances of similar length share a batch), so
concurrent clients share forward passes. Voices are compared only with embeddings of the model
version that enrolled them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

import grpc
import numpy as np
from dramaturg.common.v1 import common_pb2
from dramaturg.services.speaker.config import SpeakerSettings
from dramaturg.services.speaker.voices import Voice, VoiceRegistry
from dramaturg.shared import audio as audio_io
from dramaturg.shared import metrics
from dramaturg.shared.batching import DynamicBatcher
from dramaturg.shared.grpc.errors import failed_precondition, invalid_argument
from dramaturg.shared.grpc.interceptors import deadline_of
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.model_service import ModelService, ModelServicer
from dramaturg.shared.models import run_in
from dramaturg.shared.store import ModelRecord
from dramaturg.shared.validation import require_finite
from dramaturg.shared.voice.catalog import check_voice_id
from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "speaker"


class LoadedSpeakerModel:
    """A loaded encoder with its batcher: what the servicer calls."""

    def __init__(self, encoder, record: ModelRecord, settings: SpeakerSettings, executor: Executor) -> None:
        self.encoder = encoder
        self.executor = executor  # the service's model thread: every forward pass runs there
        self.record = record
        self.sample_rate = int(encoder.config.sample_rate)
        self.threshold = float(getattr(encoder.config, "threshold", 0.5))
        self.settings = settings
        self.batcher: DynamicBatcher[np.ndarray, np.ndarray] | None = None
        if settings.batching:
            self.batcher = DynamicBatcher(
                self._embed_batch,
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                max_queue=settings.max_queue,
                length_of=len,
                max_batch_length=settings.max_batch_seconds * self.sample_rate,
                executor=executor,
                name=f"speaker:{record.ref}",
                **metrics.batcher_hooks(SERVICE, "embed", settings.max_queue),
            )

    def _embed_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.encoder.embed(waveforms))

    async def embed(self, waveforms: Sequence[np.ndarray], deadline: float | None) -> np.ndarray:
        if self.batcher is None:
            return await run_in(self.executor, self.encoder.embed, list(waveforms))
        vectors = await asyncio.gather(*(self.batcher.submit(w, deadline=deadline) for w in waveforms))
        return np.stack(vectors)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop(drain=True)


def _normalise(vector: np.ndarray) -> np.ndarray:
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


class SpeakerServicer(ModelServicer[LoadedSpeakerModel], speaker_pb2_grpc.SpeakerServicer):
    service: SpeakerService
    settings: SpeakerSettings

    # -- helpers -------------------------------------------------------------------------------
    def _limits(self) -> audio_io.AudioLimits:
        """Embed's rules, for every RPC: silence carries no voice."""
        return self.audio_limits(reject_silence=True)

    async def _decode(
        self, inputs: Sequence[common_pb2.AudioInput], model: LoadedSpeakerModel, field_name: str
    ) -> list[audio_io.Audio]:
        if not inputs:
            raise invalid_argument(field_name, "send at least one audio input")
        if len(inputs) > self.settings.max_inputs_per_request:
            raise invalid_argument(
                field_name,
                f"{len(inputs)} inputs; at most "
                f"{self.settings.max_inputs_per_request} per request (split the request)",
            )
        limits = self._limits()
        return await asyncio.to_thread(
            lambda: [
                audio_io.decode_audio_input(
                    msg, target_rate=model.sample_rate, limits=limits, field=f"{field_name}[{i}]"
                )
                for i, msg in enumerate(inputs)
            ]
        )

    async def _embed(
        self,
        audios: Sequence[audio_io.Audio],
        model: LoadedSpeakerModel,
        context: grpc.aio.ServicerContext,
        method: str,
    ) -> np.ndarray:
        began = time.perf_counter()
        vectors = await model.embed([a.samples for a in audios], deadline_of(context))
        require_finite(vectors, f"the {method} embeddings", model=model.record.ref)
        seconds = sum(a.duration for a in audios)
        metrics.observe_audio(SERVICE, method, seconds, time.perf_counter() - began)
        return vectors

    def _ref(self, model: LoadedSpeakerModel) -> common_pb2.ModelRef:
        return self.model_ref(model.record)

    def _voice_proto(self, voice: Voice) -> speaker_pb2.Voice:
        name, _, version = voice.model_ref.partition(":")
        out = speaker_pb2.Voice(
            voice_id=voice.voice_id,
            display_name=voice.display_name,
            num_utterances=voice.num_utterances,
            total_seconds=voice.total_seconds,
            model=common_pb2.ModelRef(name=name, version=version),
            labels=voice.labels,
        )
        if voice.created_at:
            out.created_at.FromJsonString(voice.created_at.replace("+00:00", "Z"))
        return out

    def _voice_for(self, voice_id: str, model: LoadedSpeakerModel, field_name: str) -> Voice:
        voice = self.service.voices.get(voice_id, field_name)
        if voice.model_ref != model.record.ref:
            raise failed_precondition(
                f"voice {voice_id!r} was enrolled with model {voice.model_ref}, not {model.record.ref}: "
                f"pass model {voice.model_ref} or enroll the voice again with this model",
                reason="VOICE_MODEL_MISMATCH",
            )
        return voice

    # -- RPCs ----------------------------------------------------------------------------------
    async def Embed(self, request: speaker_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
        model = await self.model(request.model)
        audios = await self._decode(request.audio, model, "audio")
        vectors = await self._embed(audios, model, context, "Embed")
        return speaker_pb2.EmbedResponse(
            request_id=request.request_id,
            dimension=int(vectors.shape[1]),
            model=self._ref(model),
            embeddings=[
                speaker_pb2.Embedding(values=v.tolist(), audio_seconds=a.duration)
                for v, a in zip(vectors, audios, strict=True)
            ],
        )

    async def Verify(self, request: speaker_pb2.VerifyRequest, context: grpc.aio.ServicerContext):
        model = await self.model(request.model)
        if not request.HasField("test_audio"):
            raise invalid_argument("test_audio", "set the audio to verify")
        which = request.WhichOneof("reference")
        if which is None:
            raise invalid_argument("reference", "set reference_audio or voice_id")
        test = await self._decode([request.test_audio], model, "test_audio")
        if which == "voice_id":
            reference = self._voice_for(request.voice_id, model, "voice_id").embedding
            vectors = await self._embed(test, model, context, "Verify")
            test_vector = vectors[0]
        else:
            ref_audio = await self._decode([request.reference_audio], model, "reference_audio")
            vectors = await self._embed([*ref_audio, *test], model, context, "Verify")
            reference, test_vector = vectors[0], vectors[1]
        score = float(np.dot(reference, test_vector))
        require_finite([score], "the Verify score", model=model.record.ref)  # a voice stored before the guard
        return speaker_pb2.VerifyResponse(
            request_id=request.request_id,
            score=score,
            threshold=model.threshold,
            same_speaker=score >= model.threshold,
            model=self._ref(model),
        )

    async def Enroll(self, request: speaker_pb2.EnrollRequest, context: grpc.aio.ServicerContext):
        check_voice_id(request.voice_id)
        model = await self.model(request.model)
        if not request.overwrite:
            self.service.voices.check_new(request.voice_id)  # fail before paying for embeddings
        audios = await self._decode(request.audio, model, "audio")
        vectors = await self._embed(audios, model, context, "Enroll")
        voice = Voice(
            voice_id=request.voice_id,
            display_name=request.display_name or request.voice_id,
            model_ref=model.record.ref,
            embedding=_normalise(vectors.mean(axis=0)),
            num_utterances=len(audios),
            total_seconds=round(sum(a.duration for a in audios), 3),
            labels=dict(request.labels),
        )
        voice = self.service.voices.enroll(voice, overwrite=request.overwrite)
        return speaker_pb2.EnrollResponse(request_id=request.request_id, voice=self._voice_proto(voice))

    async def Identify(self, request: speaker_pb2.IdentifyRequest, context: grpc.aio.ServicerContext):
        model = await self.model(request.model)
        if request.top_k < 0:
            raise invalid_argument("top_k", "must be ≥ 0 (0 means the default)")
        if not request.HasField("audio"):
            raise invalid_argument("audio", "set the audio to identify")
        # The request first (bad input is INVALID_ARGUMENT whatever is enrolled), then the voices.
        # Embed's rules for the file, bar its length (identify_max_seconds: a scene holds many segments);
        # each segment then gets exactly Embed's rules (length, silence) through check_clip.
        limits = self._limits()
        whole_limits = dataclasses.replace(limits, max_seconds=self.settings.identify_max_seconds)
        whole = await self.decode(request.audio, target_rate=model.sample_rate, field="audio",
                                  limits=whole_limits)
        if request.voice_ids:
            voices = [self._voice_for(v, model, f"voice_ids[{i}]") for i, v in enumerate(request.voice_ids)]
        else:
            voices = [v for v in self.service.voices.list() if v.model_ref == model.record.ref]
            if not voices:
                raise failed_precondition(
                    f"no voices are enrolled with model {model.record.ref}; Enroll some first",
                    reason="NO_VOICES",
                )
        spans = list(request.segments) or [common_pb2.TimeSpan(start=0.0, end=whole.duration)]
        clips = []
        for i, span in enumerate(spans):
            clip = audio_io.crop(whole, span, field=f"segments[{i}]")
            clips.append(audio_io.check_clip(clip, limits, f"segments[{i}]"))
        vectors = await self._embed(clips, model, context, "Identify")
        bank = np.stack([v.embedding for v in voices])
        scores = require_finite(vectors @ bank.T, "the Identify scores", model=model.record.ref)
        top_k = min(request.top_k or self.settings.default_top_k, len(voices))
        results = []
        for span, row in zip(spans, scores, strict=True):
            order = np.argsort(-row)[:top_k]
            candidates = [
                speaker_pb2.VoiceScore(voice_id=voices[j].voice_id, score=float(row[j])) for j in order
            ]
            best = candidates[0].voice_id if candidates[0].score >= model.threshold else ""
            results.append(
                speaker_pb2.SegmentIdentification(
                    span=common_pb2.TimeSpan(start=span.start, end=span.end),
                    candidates=candidates,
                    voice_id=best,
                )
            )
        return speaker_pb2.IdentifyResponse(
            request_id=request.request_id, results=results, threshold=model.threshold, model=self._ref(model)
        )

    async def ListVoices(self, request: speaker_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext):
        return speaker_pb2.ListVoicesResponse(
            voices=[self._voice_proto(v) for v in self.service.voices.list()]
        )

    async def DeleteVoice(self, request: speaker_pb2.DeleteVoiceRequest, context: grpc.aio.ServicerContext):
        return speaker_pb2.DeleteVoiceResponse(
            voice=self._voice_proto(self.service.voices.delete(request.voice_id))
        )


class SpeakerService(ModelService):
    name = SERVICE

    def __init__(self, settings: SpeakerSettings, home: Path | None = None) -> None:
        super().__init__(settings, home)
        self.settings: SpeakerSettings = settings
        self.voices = VoiceRegistry(self.home / "voices" / SERVICE)

    def load_model(self, record: ModelRecord, device: str) -> LoadedSpeakerModel:
        from dramaturg.shared.voice.encoder import SpeakerEncoder

        encoder = SpeakerEncoder.from_pretrained(str(record.path)).to(device).eval()
        return LoadedSpeakerModel(encoder, record, self.settings, self.executor)

    def release_model(self, model: LoadedSpeakerModel) -> None:
        if model.batcher is not None:
            asyncio.get_event_loop().create_task(model.close())

    async def warm_up(self, model: LoadedSpeakerModel) -> None:
        noise = np.random.default_rng(0).normal(0, 0.1, model.sample_rate).astype(np.float32)
        await self.run_model(model.encoder.embed, [noise])

    def service_registrations(self) -> list[Registration]:
        full_name = speaker_pb2.DESCRIPTOR.services_by_name["Speaker"].full_name
        return [
            Registration(full_name, speaker_pb2_grpc.add_SpeakerServicer_to_server, SpeakerServicer(self))
        ]


def create_service(settings: SpeakerSettings | None = None) -> SpeakerService:
    return SpeakerService(settings or SpeakerSettings())

