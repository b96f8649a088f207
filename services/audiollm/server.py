"""The audio-LLM service: text from audio over gRPC — transcripts, captions, answers to a prompt — whole
(Generate) or streamed as the tokens are produced (GenerateStream).

A request is checked completely before it queues for the model: first each field on its own (the
audio decoded, the task, the prompt's text, the decoding numbers and the max_new_tokens cap), then how
they combine (the span inside the audio; a task's own instruction or the prompt; the prompt's tokens
— audio tokens included — plus max_new_tokens inside the model's context). Field checks come first,
so an error names the broken field whatever else the request holds. Then the request takes the one
generation slot (``shared/admission``: a full waiting room is RESOURCE_EXHAUSTED with a retry delay)
and runs on the service's model thread: feature extraction, the audio encoders (audio longer than
one encoder window is read window by window, the model's chunking), prefill and decoding, with a
``generate`` streamer that times the tokens and, for GenerateStream, hands text deltas to the event
loop as they come. A deadline or a cancelled call stops decoding at the next token (a
``StoppingCriteria`` raising ``shared/cancellation``'s ``Stopped``).

One model call runs at a time (one model thread). With ``batching`` on (the default on a GPU),
concurrent greedy ``Generate`` requests join the model's dynamic batcher (``shared/batching``: a
bounded queue, RESOURCE_EXHAUSTED with a retry delay when full; a request whose caller left before its
batch runs is dropped) and decode together in one ``generate``: their prompts left-padded, each row
stopped at its own ``max_new_tokens``, end of answer, deadline or cancelled call (the others decode
on). A row's answer is the one it gets alone (a test checks this). Streams and sampled requests run
one at a time through the slot; they share the model thread with the batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc
from dramaturg.services.audiollm import generation
from dramaturg.services.audiollm.config import AudioLlmSettings
from dramaturg.services.audiollm.generation import Sampling, TextDeltas
from dramaturg.shared import audio as audio_io
from dramaturg.shared import metrics
from dramaturg.shared.admission import ConcurrencyLimiter
from dramaturg.shared.batching import DynamicBatcher
from dramaturg.shared.cancellation import ShouldStop, Stopped, never_stop, run_cancellable
from dramaturg.shared.grpc.errors import deadline_exceeded, invalid_argument
from dramaturg.shared.grpc.interceptors import deadline_of
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.model_service import ModelService, ModelServicer, require_model_type
from dramaturg.shared.store import ModelRecord
from dramaturg.shared.validation import require_finite

log = logging.getLogger(__name__)

SERVICE = "audiollm"
SAMPLE_RATE = 16_000
DEADLINE_HINT = (
    "allow for the audio's encoding plus max_new_tokens times the service's time per output token "
    "(dramaturg_audiollm_time_per_output_token_seconds), or ask for fewer tokens"
)


@dataclass
class Job:
    """One validated generation: what the model thread runs."""

    audio: np.ndarray  # 16 kHz mono, span applied
    instruction: str
    sampling: Sampling
    prompt_tokens: int
    audio_tokens: int
    # a batched job's own stop: set when its caller leaves or its deadline passes while it decodes
    stop: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic()

    def should_stop(self) -> str:
        if self.stop.is_set():
            return "the call ended"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "the deadline passed"
        return ""


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    first_token_at: float | None  # time.perf_counter()
    last_token_at: float | None
    rest: str = ""  # what the streamed deltas have not sent of ``text`` (GenerateStream's final delta)
    stopped: str = ""  # a batched row stopped before its end: why


class LoadedAudioLlm:
    """A loaded audio LLM with its processor. :meth:`generate` runs on the service's model thread."""

    def __init__(self, model: Any, processor: Any, record: ModelRecord, device: str,
                 settings: AudioLlmSettings, executor: Executor | None = None) -> None:
        from dramaturg.services.audiollm.prompt import TASK_INSTRUCTIONS

        self.model = model
        self.processor = processor
        self.record = record
        self.device = device
        self.context = int(model.config.text_config.max_position_embeddings)
        eos = model.config.text_config.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        self.pad_id = processor.tokenizer.pad_token_id
        self.task_instructions = dict(TASK_INSTRUCTIONS)
        # The event loop counts prompt tokens with its own processor and tokenizer: a fast tokenizer shared
        # with the model thread can fail with "Already borrowed" when both use it at once.
        self.counter = copy.copy(processor)
        self.counter.tokenizer = copy.deepcopy(processor.tokenizer)
        self.rules = generation.prompt_rules(
            self.counter.tokenizer,
            [processor.audio_token, processor.audio_placeholder, "<Speech>", "</Speech>"],
            settings.max_prompt_chars,
        )
        self.batcher: DynamicBatcher[Job, Result] | None = settings.batcher(
            self.generate_many, device=device, service=SERVICE, queue="generate-batch",
            name=f"audiollm:{record.ref}", executor=executor)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop(drain=True)

    def prompt_tokens(self, instruction: str, num_samples: int) -> tuple[int, int]:
        """(prompt tokens, audio ones included; audio tokens) of ``instruction`` over ``num_samples``."""
        return len(self.counter.prompt_ids(instruction, num_samples)), self.counter.audio_tokens(num_samples)

    def generate(self, job: Job, should_stop: ShouldStop,
                 on_delta: Callable[[str, int], None] | None = None) -> Result:
        import torch

        reason = should_stop()
        if reason:
            raise Stopped(reason)
        inputs = self.processor(job.audio, job.instruction).to(self.device)
        streamer = TextDeltas(self.processor.tokenizer, on_delta)
        kwargs = job.sampling.generate_kwargs()
        with torch.random.fork_rng(devices=[]):
            if job.sampling.seed:
                torch.manual_seed(job.sampling.seed)
            out = self.model.generate(
                **inputs,
                streamer=streamer,
                stopping_criteria=[generation.stop_check(should_stop)],
                pad_token_id=self.pad_id,
                **kwargs,
            )
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        finish = "stop" if new and new[-1] in self.eos_ids else "length"
        return Result(streamer.text(), finish, len(new), streamer.first_token_at, streamer.last_token_at,
                      streamer.rest())

    def generate_many(self, jobs: list[Job]) -> list[Result]:
        """Greedy jobs decoded together: one left-padded batch, each row stopped on its own."""
        import torch

        generation.RUNNING.inc(len(jobs))
        try:
            inputs = self.processor([j.audio for j in jobs], [j.instruction for j in jobs]).to(self.device)
            prompt_length = int(inputs["input_ids"].shape[1])
            limits = [j.sampling.max_new_tokens for j in jobs]
            steps = generation.StepTimes()
            stops = generation.row_stops(prompt_length, limits, [j.should_stop for j in jobs])
            with torch.random.fork_rng(devices=[]):
                out = self.model.generate(
                    **inputs,
                    streamer=steps,
                    stopping_criteria=[stops],
                    pad_token_id=self.pad_id,
                    **Sampling(max_new_tokens=max(limits)).generate_kwargs(),
                )
        finally:
            generation.RUNNING.dec(len(jobs))
        results = []
        for row, limit in enumerate(limits):
            ids: list[int] = []
            finish = "length"
            for token in out[row, prompt_length:prompt_length + limit].tolist():
                ids.append(int(token))
                if token in self.eos_ids:
                    finish = "stop"
                    break
            text = str(self.processor.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            first = steps.times[0] if ids and steps.times else None
            last = steps.times[min(len(ids), len(steps.times)) - 1] if ids and steps.times else None
            stopped = stops.stopped[row] if finish != "stop" and len(ids) < limit else ""
            results.append(Result(text, finish, len(ids), first, last, stopped=stopped))
        return results


class AudioLlmServicer(ModelServicer[LoadedAudioLlm], audiollm_pb2_grpc.AudioLLMServicer):
    service: AudioLlmService
    settings: AudioLlmSettings

    async def _job(self, request: audiollm_pb2.GenerateRequest, model: LoadedAudioLlm) -> Job:
        # each field on its own
        decoded = await self.decode(request.audio, target_rate=SAMPLE_RATE, field="audio")
        task = generation.check_task(int(request.task))
        prompt = generation.check_prompt(request.prompt, "prompt", model.rules)
        sampling = generation.sampling(
            request.generation, self.settings, lambda: secrets.randbelow(2**31 - 1) + 1
        )
        # how they combine
        clip = audio_io.crop(decoded, request.span if request.HasField("span") else None)
        samples = clip.samples if clip.samples.ndim == 1 else clip.samples.mean(axis=0)
        instruction = generation.instruction(task, prompt, model.task_instructions)
        prompt_tokens, audio_tokens = await asyncio.to_thread(model.prompt_tokens, instruction, samples.size)
        if prompt_tokens + sampling.max_new_tokens > model.context:
            text_tokens = prompt_tokens - audio_tokens
            where = "prompt" if text_tokens + sampling.max_new_tokens > model.context else "audio"
            raise invalid_argument(
                where,
                f"the prompt is {prompt_tokens} tokens ({audio_tokens} for {clip.duration:.1f} s of audio, "
                f"{text_tokens} of text) and with {sampling.max_new_tokens} new tokens exceeds model "
                f"{model.record.ref}'s context of {model.context} tokens; shorten the audio (span), the "
                "prompt, or ask for fewer tokens (generation.max_new_tokens)",
            )
        return Job(samples.astype(np.float32, copy=False), instruction, sampling, prompt_tokens, audio_tokens)

    async def _run(self, model: LoadedAudioLlm, job: Job, deadline: float | None,
                   on_delta: Callable[[str, int], None] | None = None) -> Result:
        generation.RUNNING.inc()
        try:
            return await run_cancellable(
                self.service.executor,
                lambda stop: model.generate(job, stop, on_delta),
                deadline,
                what="the generation",
                deadline_hint=DEADLINE_HINT,
            )
        finally:
            generation.RUNNING.dec()

    @staticmethod
    def _usage(method: str, job: Job, result: Result, began: float, generation_seconds: float
               ) -> audiollm_pb2.Usage:
        ttft = (result.first_token_at - began) if result.first_token_at is not None else 0.0
        tpot = 0.0
        if result.completion_tokens > 1 and result.first_token_at is not None and result.last_token_at:
            tpot = (result.last_token_at - result.first_token_at) / (result.completion_tokens - 1)
        ttft, tpot = (float(x) for x in require_finite([ttft, tpot], "the generation's timings"))
        if result.first_token_at is not None:
            generation.TIME_TO_FIRST_TOKEN.labels(method).observe(ttft)
        if result.completion_tokens > 1:
            generation.TIME_PER_OUTPUT_TOKEN.labels(method).observe(tpot)
        generation.PROMPT_TOKENS.labels(method).inc(job.prompt_tokens)
        generation.GENERATION_TOKENS.labels(method).inc(result.completion_tokens)
        metrics.observe_audio(SERVICE, method, job.audio.size / SAMPLE_RATE, generation_seconds)
        return audiollm_pb2.Usage(
            audio_tokens=job.audio_tokens,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=result.completion_tokens,
            time_to_first_token_seconds=ttft,
            time_per_output_token_seconds=tpot,
        )

    async def Generate(self, request: audiollm_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        began = time.perf_counter()
        model = await self.model(request.model)
        job = await self._job(request, model)
        deadline = deadline_of(context)
        if model.batcher is not None and job.sampling.batchable:
            job.deadline = deadline
            generation_began = time.perf_counter()
            try:  # waits for a batch; a caller gone before it runs costs nothing
                result = await model.batcher.submit(job, deadline=deadline)
            finally:
                job.stop.set()  # a row still decoding for a caller that left (or timed out) stops
            if result.stopped:
                raise deadline_exceeded(f"the generation stopped: {result.stopped}; {DEADLINE_HINT}")
            generation_seconds = time.perf_counter() - generation_began
        else:
            async with self.service.limiter.slot(deadline):
                generation_began = time.perf_counter()
                result = await self._run(model, job, deadline)
                generation_seconds = time.perf_counter() - generation_began
        return audiollm_pb2.GenerateResponse(
            request_id=request.request_id,
            text=result.text,
            finish_reason=result.finish_reason,
            usage=self._usage("Generate", job, result, began, generation_seconds),
            model=self.model_ref(model.record),
            seed=job.sampling.seed,
        )

    async def GenerateStream(
        self, request: audiollm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audiollm_pb2.GenerateStreamResponse]:
        """Text deltas as the tokens come: the model thread's streamer hands each delta to the event
        loop, which sends it while decoding goes on; the final message carries the rest and the usage."""
        began = time.perf_counter()
        model = await self.model(request.model)
        job = await self._job(request, model)
        deadline = deadline_of(context)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
        sent = 0

        def message(delta: str, index: int, **fields: Any) -> audiollm_pb2.GenerateStreamResponse:
            nonlocal sent
            out = audiollm_pb2.GenerateStreamResponse(
                request_id=request.request_id, text_delta=delta, token_index=index, **fields
            )
            if sent == 0:
                out.model.CopyFrom(self.model_ref(model.record))
                out.seed = job.sampling.seed
            sent += 1
            return out

        async with self.service.limiter.slot(deadline):
            generation_began = time.perf_counter()
            run = asyncio.ensure_future(
                self._run(model, job, deadline,
                          lambda delta, index: loop.call_soon_threadsafe(deltas.put_nowait, (delta, index)))
            )
            run.add_done_callback(lambda _: deltas.put_nowait(None))  # after every delta (FIFO)
            try:
                while (item := await deltas.get()) is not None:
                    yield message(*item)
                result = await run  # raises what stopped the generation
                generation_seconds = time.perf_counter() - generation_began
            finally:
                if not run.done():  # the client went away: stop decoding
                    run.cancel()
                    with contextlib.suppress(BaseException):
                        await run
        usage = self._usage("GenerateStream", job, result, began, generation_seconds)
        yield message(
            result.rest,
            max(result.completion_tokens - 1, 0),
            is_final=True,
            finish_reason=result.finish_reason,
            usage=usage,
        )


class AudioLlmService(ModelService):
    name = SERVICE

    def __init__(self, settings: AudioLlmSettings, home: Path | None = None) -> None:
        super().__init__(settings, home)
        self.settings: AudioLlmSettings = settings
        # One generation at a time (one model thread), a bounded queue (its depth: dramaturg_queue_depth).
        self.limiter = ConcurrencyLimiter(
            SERVICE, 1, settings.max_waiting, queue="generate", work="generation"
        )

    def load_model(self, record: ModelRecord, device: str) -> LoadedAudioLlm:
        from dramaturg.services.audiollm.model import load_audiollm

        require_servable(record)
        model, processor = load_audiollm(record.path, device=device)
        return LoadedAudioLlm(model, processor, record, device, self.settings, self.executor)

    def release_model(self, model: LoadedAudioLlm) -> None:
        if model.batcher is not None:
            asyncio.get_event_loop().create_task(model.close())

    async def warm_up(self, model: LoadedAudioLlm) -> None:
        audio = np.zeros(SAMPLE_RATE // 2, np.float32)
        instruction = model.task_instructions["asr"]
        prompt, audio_tokens = model.prompt_tokens(instruction, audio.size)
        job = Job(audio, instruction, Sampling(max_new_tokens=2), prompt, audio_tokens)
        await self.run_model(model.generate, job, never_stop)

    def service_registrations(self) -> list[Registration]:
        full_name = audiollm_pb2.DESCRIPTOR.services_by_name["AudioLLM"].full_name
        servicer = AudioLlmServicer(self)
        return [Registration(full_name, audiollm_pb2_grpc.add_AudioLLMServicer_to_server, servicer)]


def require_servable(record: ModelRecord) -> None:
    """FAILED_PRECONDITION unless ``record`` is an audio-LLM model folder (``load_audiollm`` reads it)."""
    from dramaturg.services.audiollm.model import MODEL_TYPE

    require_model_type(record, "audiollm", MODEL_TYPE, "an audio LLM")


def create_service(settings: AudioLlmSettings | None = None) -> AudioLlmService:
    return AudioLlmService(settings or AudioLlmSettings())
