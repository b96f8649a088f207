"""The evaluator service: 1-5 scores per acting dimension (Speech-DRAME realism and archetype rubrics)
over gRPC — Evaluate and ListDimensions.

A request is checked completely before it queues for the model: first each field on its own (the model
named, the audio decoded, the rubric, the dimensions, each context field's length), then how they
combine (the span inside the audio and inside the model's encoder window; the context the rubric's
prompts need). Field checks come first, so an error names the broken field whatever else the request
holds. Then, with ``batching`` on (the default on a GPU), it joins the model's dynamic batcher
(``shared/batching``: a bounded queue, RESOURCE_EXHAUSTED with a retry delay when full; a request whose
caller went away or whose deadline passed before its batch runs is dropped): concurrent requests run
together on the service's model thread — their clips through the encoder in one pass and every prompt
of every request in one language-model batch (``scoring.score_batch``), each clip encoded ONCE for all
its dimensions. With batching off, the request takes the one model slot (``shared/admission``) and a
deadline or a cancelled call stops the work between the encoding and the scoring
(``shared/cancellation``). Scores are the expected value of the answer digit, its renormalised
distribution and the mass the five digits had (the format check).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from dramaturg.services.evaluator.config import EvaluatorSettings
from dramaturg.services.evaluator.prompts import (
    ARCHETYPE,
    DIMENSIONS,
    REALISM,
    RUBRICS,
    build_prompt,
    detailed_for,
    realism_context,
)
from dramaturg.shared import audio as audio_io
from dramaturg.shared import metrics
from dramaturg.shared.admission import ConcurrencyLimiter
from dramaturg.shared.batching import DynamicBatcher
from dramaturg.shared.cancellation import ShouldStop, Stopped, never_stop, run_cancellable
from dramaturg.shared.grpc.errors import echo, invalid_argument
from dramaturg.shared.grpc.interceptors import deadline_of
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.model_service import ModelService, ModelServicer, require_model_type
from dramaturg.shared.store import ModelRecord
from dramaturg.shared.validation import require_finite

log = logging.getLogger(__name__)

SERVICE = "evaluator"
SAMPLE_RATE = 16_000
Rubric = evaluator_pb2.Rubric
# proto rubric → the JSONL's dataset_name (prompts.DIMENSIONS' key)
RUBRIC_KINDS: dict[int, str] = {Rubric.REALISM: REALISM, Rubric.ARCHETYPE: ARCHETYPE}
# the RoleContext fields each rubric's prompts read
REQUIRED_CONTEXT: dict[int, tuple[str, ...]] = {
    Rubric.REALISM: ("char_profile", "local_scene", "char_style"),
    Rubric.ARCHETYPE: ("question",),
}
CONTEXT_FIELDS = ("local_scene", "char_age", "char_style", "char_profile", "transcript", "question")
RUBRIC_HELP = ", ".join(Rubric.Name(r) for r in RUBRIC_KINDS)
DEADLINE_HINT = "allow for one audio encoding plus one language-model pass over the requested dimensions"


def rubric_dimensions(rubric: int) -> tuple[str, ...]:
    return DIMENSIONS[RUBRIC_KINDS[rubric]]


@dataclass
class Job:
    """One validated evaluation: what the model thread runs."""

    audio: np.ndarray  # 16 kHz mono, span applied
    dimensions: tuple[str, ...]
    prompts: list[str]


@dataclass
class Scores:
    score: np.ndarray  # (D,)
    distribution: np.ndarray  # (D, 5)
    digit_mass: np.ndarray  # (D,)


class LoadedEvaluator:
    """A loaded evaluator with its processor. :meth:`score` runs on the service's model thread."""

    def __init__(self, model: Any, processor: Any, record: ModelRecord, device: str,
                 detailed: bool = True, settings: EvaluatorSettings | None = None,
                 executor: Executor | None = None) -> None:
        self.model = model
        self.processor = processor
        self.record = record
        self.device = device
        self.detailed = detailed  # the prompt style it was trained on (its store label), else the setting
        audio_config = model.config.audio_config
        self.window_seconds = 2 * int(audio_config.max_source_positions) * 160 / SAMPLE_RATE
        self.batch_size = settings.batch_size if settings is not None else 0
        self.batcher: DynamicBatcher[Job, Scores] | None = None
        if settings is not None:
            self.batcher = settings.batcher(self.score_many, device=device, service=SERVICE, queue="evaluate",
                                            name=f"evaluator:{record.ref}", executor=executor)

    def score_many(self, jobs: list[Job]) -> list[Scores]:
        """Several requests in one pass: their clips through the encoder together, then all their
        prompts (each with its own clip's audio) through the language model."""
        from dramaturg.services.evaluator.scoring import score_batch

        results = score_batch(self.model, self.processor, [j.audio for j in jobs], [j.prompts for j in jobs],
                              batch_size=self.batch_size or None)
        return [Scores(r.score.cpu().numpy(), r.distribution.cpu().numpy(), r.digit_mass.cpu().numpy())
                for r in results]

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop(drain=True)

    def score(self, job: Job, should_stop: ShouldStop, batch_size: int = 0) -> Scores:
        import torch
        from dramaturg.services.evaluator.scoring import encode_audio, score_prompts

        reason = should_stop()
        if reason:
            raise Stopped(reason)
        with torch.no_grad():
            encoding = encode_audio(self.model, self.processor, job.audio)
            reason = should_stop()
            if reason:
                raise Stopped(reason)
            result = score_prompts(self.model, self.processor, encoding, job.prompts,
                                   batch_size=batch_size or None)
        return Scores(result.score.cpu().numpy(), result.distribution.cpu().numpy(),
                      result.digit_mass.cpu().numpy())


class EvaluatorServicer(ModelServicer[LoadedEvaluator], evaluator_pb2_grpc.EvaluatorServicer):
    service: EvaluatorService
    settings: EvaluatorSettings

    def _rubric(self, rubric: int) -> int:
        if rubric not in RUBRIC_KINDS:
            what = "is unset" if rubric == Rubric.RUBRIC_UNSPECIFIED else f"{rubric} is not a rubric"
            raise invalid_argument("rubric", f"{what}; use one of {RUBRIC_HELP}")
        return rubric

    @staticmethod
    def _dimensions(rubric: int, names: Any) -> tuple[str, ...]:
        known = rubric_dimensions(rubric)
        if not names:
            return known
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name not in known:
                raise invalid_argument(
                    f"dimensions[{i}]",
                    f"{echo(name)} is not a dimension of rubric {Rubric.Name(rubric)}; known: "
                    f"{', '.join(known)} (ListDimensions)",
                )
            if name in seen:
                raise invalid_argument(f"dimensions[{i}]", f"{echo(name)} is asked for twice")
            seen.add(name)
        return tuple(names)

    def _context(self, context: evaluator_pb2.RoleContext) -> dict[str, str]:
        values = {}
        for name in CONTEXT_FIELDS:
            value = getattr(context, name)
            if len(value) > self.settings.max_context_chars:
                raise invalid_argument(
                    f"context.{name}",
                    f"is {len(value)} characters, above the service's {self.settings.max_context_chars}",
                )
            if "\x00" in value:
                raise invalid_argument(f"context.{name}", "holds a NUL character")
            values[name] = value.strip()
        return values

    async def _job(self, request: evaluator_pb2.EvaluateRequest, model: LoadedEvaluator) -> Job:
        # each field on its own
        decoded = await self.decode(request.audio, target_rate=SAMPLE_RATE, field="audio")
        rubric = self._rubric(int(request.rubric))
        dimensions = self._dimensions(rubric, list(request.dimensions))
        context = self._context(request.context)
        # how they combine
        has_span = request.HasField("span")
        clip = audio_io.crop(decoded, request.span if has_span else None)
        where = "span" if has_span and (request.span.start or request.span.end) else "audio"
        if clip.duration < self.settings.min_seconds:
            raise invalid_argument(
                where,
                f"is {clip.duration:.3f} s, below the service's minimum of {self.settings.min_seconds:g} s",
            )
        if clip.duration > model.window_seconds + 1e-3:
            raise invalid_argument(
                where,
                f"is {clip.duration:.1f} s, longer than model {model.record.ref}'s "
                f"{model.window_seconds:g}-s audio window (one line is judged at a time); send a span of "
                "at most that",
            )
        missing = [f"context.{name}" for name in REQUIRED_CONTEXT[rubric] if not context[name]]
        if missing:
            raise invalid_argument(
                missing[0],
                f"is empty, and rubric {Rubric.Name(rubric)}'s prompts need "
                f"{', '.join(f'context.{n}' for n in REQUIRED_CONTEXT[rubric])}",
            )
        text = realism_context(context) if rubric == Rubric.REALISM else context["question"]
        prompts = [build_prompt(d, text, detailed=model.detailed) for d in dimensions]
        samples = clip.samples if clip.samples.ndim == 1 else clip.samples.mean(axis=0)
        return Job(samples.astype(np.float32, copy=False), dimensions, prompts)

    async def Evaluate(self, request: evaluator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext):
        model = await self.model(request.model)
        job = await self._job(request, model)
        deadline = deadline_of(context)
        began = time.perf_counter()
        if model.batcher is not None:  # waits for a batch; a caller gone before it runs costs nothing
            scores = await model.batcher.submit(job, deadline=deadline)
        else:
            async with self.service.limiter.slot(deadline):
                scores = await run_cancellable(
                    self.service.executor,
                    lambda stop: model.score(job, stop, self.settings.batch_size),
                    deadline,
                    what="the evaluation",
                    deadline_hint=DEADLINE_HINT,
                )
        seconds = time.perf_counter() - began
        ref = model.record.ref
        score = require_finite(scores.score, "the scores", model=ref)
        distribution = require_finite(scores.distribution, "the score distributions", model=ref)
        mass = require_finite(scores.digit_mass, "the digit masses", model=ref)
        metrics.observe_audio(SERVICE, "Evaluate", job.audio.size / SAMPLE_RATE, seconds)
        return evaluator_pb2.EvaluateResponse(
            request_id=request.request_id,
            scores=[
                evaluator_pb2.DimensionScore(
                    dimension=d,
                    score=float(score[i]),
                    probabilities=[float(p) for p in distribution[i]],
                    digit_mass=float(mass[i]),
                )
                for i, d in enumerate(job.dimensions)
            ],
            mean_score=float(np.mean(score)),
            model=self.model_ref(model.record),
        )

    async def ListDimensions(self, request: evaluator_pb2.ListDimensionsRequest,
                             context: grpc.aio.ServicerContext):
        rubric = int(request.rubric)
        rubrics = list(RUBRIC_KINDS) if rubric == Rubric.RUBRIC_UNSPECIFIED else [self._rubric(rubric)]
        info = [
            evaluator_pb2.DimensionInfo(
                dimension=d, rubric=r, display_name=RUBRICS[d].name, summary=RUBRICS[d].summary
            )
            for r in rubrics
            for d in rubric_dimensions(r)
        ]
        return evaluator_pb2.ListDimensionsResponse(dimensions=[i.dimension for i in info], info=info)


class EvaluatorService(ModelService):
    name = SERVICE

    def __init__(self, settings: EvaluatorSettings, home: Path | None = None) -> None:
        super().__init__(settings, home)
        self.settings: EvaluatorSettings = settings
        # One evaluation at a time (one model thread), a bounded queue (its depth: dramaturg_queue_depth).
        self.limiter = ConcurrencyLimiter(
            SERVICE, 1, settings.max_waiting, queue="evaluate", work="evaluation"
        )

    def load_model(self, record: ModelRecord, device: str) -> LoadedEvaluator:
        from dramaturg.services.evaluator.model import load_evaluator

        require_servable(record)
        model, processor = load_evaluator(record.path, device=device)
        detailed = detailed_for(record.labels, self.settings.detailed_prompts)
        return LoadedEvaluator(model, processor, record, device, detailed, self.settings, self.executor)

    def release_model(self, model: LoadedEvaluator) -> None:
        if model.batcher is not None:
            asyncio.get_event_loop().create_task(model.close())

    async def warm_up(self, model: LoadedEvaluator) -> None:
        dimension = rubric_dimensions(Rubric.ARCHETYPE)[0]
        prompt = build_prompt(dimension, "warm-up", detailed=model.detailed)
        job = Job(np.zeros(SAMPLE_RATE // 2, np.float32), (dimension,), [prompt])
        await self.run_model(model.score, job, never_stop)

    def service_registrations(self) -> list[Registration]:
        full_name = evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"].full_name
        servicer = EvaluatorServicer(self)
        return [Registration(full_name, evaluator_pb2_grpc.add_EvaluatorServicer_to_server, servicer)]


def require_servable(record: ModelRecord) -> None:
    """FAILED_PRECONDITION unless ``record`` is a Qwen2-Audio model folder (``load_evaluator`` reads it)."""
    require_model_type(record, "evaluator", "qwen2_audio", "a Qwen2-Audio evaluator")


def create_service(settings: EvaluatorSettings | None = None) -> EvaluatorService:
    return EvaluatorService(settings or EvaluatorSettings())
