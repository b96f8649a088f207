"""The ``dramaturg.training.v1.Training`` gRPC service over a :class:`TrainingRunner` (grpc.aio).

Every service mounts this same servicer with its own runner, so training looks identical across
services. Errors are raised as ``ServiceError`` and turned into gRPC status by the shared server
interceptor. Blocking work (importing recipes, scanning runs, copying checkpoints) goes to a thread so
the event loop keeps serving inference while a large checkpoint is published.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import invalid_argument
from dramaturg.shared.store import ModelRecord
from dramaturg.shared.training.recipe import RUNNER_KEYS
from dramaturg.shared.training.runner import TrainingRunner
from dramaturg.shared.training.runs import CheckpointInfo, RunRecord
from dramaturg.training.v1 import training_pb2, training_pb2_grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

log = logging.getLogger(__name__)

# Called for ActivateCheckpoint(load=true): load the published model and make it the server's default.
ActivateHook = Callable[[ModelRecord], Awaitable[common_pb2.ModelInfo]]


def _timestamp(target: timestamp_pb2.Timestamp, seconds: float | None) -> None:
    if seconds:
        target.FromNanoseconds(int(seconds * 1e9))


def _to_struct(values: Mapping[str, Any], target: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """A JSON-able copy of ``values`` as a Struct (tuples become lists; odd objects their str)."""
    message = target if target is not None else struct_pb2.Struct()
    json_format.ParseDict(json.loads(json.dumps(dict(values), default=str)), message)
    return message


def run_to_proto(record: RunRecord) -> training_pb2.TrainingRun:
    message = training_pb2.TrainingRun(
        run_id=record.run_id, service=record.service, recipe=record.recipe,
        state=training_pb2.RunState.Value(record.state), step=record.step, total_steps=record.total_steps,
        epoch=record.epoch, metrics={k: float(v) for k, v in record.metrics.items()}, error=record.error,
        log_dir=str(record.log_dir), attempts=record.attempts, dataset_uri=record.dataset_uri,
    )
    _timestamp(message.created_at, record.created_at)
    _timestamp(message.started_at, record.started_at)
    _timestamp(message.finished_at, record.finished_at)
    if record.published_model:
        name, _, version = record.published_model.partition(":")
        message.output_model.CopyFrom(common_pb2.ModelRef(name=name, version=version))
    if record.overrides:
        _to_struct(record.overrides, message.overrides)
    return message


def checkpoint_to_proto(checkpoint: CheckpointInfo | Mapping[str, Any]) -> training_pb2.Checkpoint:
    if isinstance(checkpoint, CheckpointInfo):
        data: Mapping[str, Any] = {
            "checkpoint_id": checkpoint.checkpoint_id, "step": checkpoint.step, "epoch": checkpoint.epoch,
            "metrics": checkpoint.metrics, "created_at": checkpoint.created_at, "best": checkpoint.best,
        }
    else:
        data = checkpoint
    message = training_pb2.Checkpoint(
        checkpoint_id=str(data.get("checkpoint_id", "")), step=int(data.get("step", 0)),
        epoch=float(data.get("epoch", 0.0)), best=bool(data.get("best", False)),
        metrics={k: float(v) for k, v in (data.get("metrics") or {}).items()},
    )
    _timestamp(message.created_at, data.get("created_at"))
    return message


def event_to_proto(event: Mapping[str, Any]) -> training_pb2.TrainingEvent:
    message = training_pb2.TrainingEvent(run_id=str(event.get("run_id", "")),
                                         sequence=int(event.get("sequence", 0)))
    _timestamp(message.time, event.get("time"))
    kind = event.get("type")
    if kind == "state":
        message.state = training_pb2.RunState.Value(str(event.get("state", "RUN_STATE_UNSPECIFIED")))
    elif kind == "progress":
        message.progress.CopyFrom(training_pb2.Progress(
            step=int(event.get("step", 0)), total_steps=int(event.get("total_steps", 0)),
            epoch=float(event.get("epoch", 0.0))))
    elif kind == "metrics":
        message.metrics.CopyFrom(training_pb2.MetricsUpdate(
            step=int(event.get("step", 0)), epoch=float(event.get("epoch", 0.0)),
            values={k: float(v) for k, v in (event.get("values") or {}).items()}))
    elif kind == "log":
        message.log.CopyFrom(training_pb2.LogLine(level=str(event.get("level", "INFO")),
                                                  message=str(event.get("message", ""))))
    elif kind == "checkpoint":
        message.checkpoint.CopyFrom(checkpoint_to_proto(event.get("checkpoint") or {}))
    return message


def _encode_token(record: RunRecord) -> str:
    raw = json.dumps({"c": record.created_at, "r": record.run_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return float(data["c"]), str(data["r"])
    except (binascii.Error, ValueError, KeyError, TypeError) as err:
        raise invalid_argument("page_token", "not a page token this server issued") from err


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    """All Training RPCs over one service's runner.

    ``on_activate`` is the model server's hook for ``ActivateCheckpoint(load=true)``; without one the
    published version only becomes the store default (picked up by the next LoadModel or restart).
    """

    def __init__(self, runner: TrainingRunner, *, on_activate: ActivateHook | None = None,
                 default_page_size: int = 50, max_page_size: int = 1000, poll_interval: float = 0.1) -> None:
        self.runner = runner
        self.on_activate = on_activate
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.poll_interval = poll_interval

    async def ListRecipes(self, request: training_pb2.ListRecipesRequest,
                          context: grpc.aio.ServicerContext | None) -> training_pb2.ListRecipesResponse:
        recipes = await asyncio.to_thread(self.runner.recipes)
        return training_pb2.ListRecipesResponse(recipes=[
            training_pb2.Recipe(name=name, description=getattr(recipe, "description", ""),
                                defaults=_to_struct({**RUNNER_KEYS, **dict(recipe.defaults)}))
            for name, recipe in sorted(recipes.items())
        ])

    async def StartTraining(self, request: training_pb2.StartTrainingRequest,
                            context: grpc.aio.ServicerContext | None) -> training_pb2.TrainingRun:
        if not request.recipe:
            raise invalid_argument("recipe", "required: one of the names ListRecipes returns")
        overrides = json_format.MessageToDict(request.overrides) if request.HasField("overrides") else {}
        base = None
        if request.HasField("base_model") and request.base_model.name:
            base = (request.base_model.name, request.base_model.version)
        record = await asyncio.to_thread(self.runner.start, request.recipe, request.dataset_uri, overrides,
                                         request.output_model, base, request.request_id)
        return run_to_proto(record)

    async def GetTraining(self, request: training_pb2.GetTrainingRequest,
                          context: grpc.aio.ServicerContext | None) -> training_pb2.TrainingRun:
        return run_to_proto(await asyncio.to_thread(self.runner.get, request.run_id))

    async def WatchTraining(self, request: training_pb2.WatchTrainingRequest,
                            context: grpc.aio.ServicerContext | None,
                            ) -> AsyncIterator[training_pb2.TrainingEvent]:
        if request.after_sequence < 0:
            raise invalid_argument("after_sequence", "must be 0 or a sequence number seen before")
        await asyncio.to_thread(self.runner.get, request.run_id)  # NOT_FOUND before the stream starts
        # A client that goes away cancels this coroutine; the generator below is closed with it.
        async for event in self.runner.watch(request.run_id, request.after_sequence,
                                             poll_interval=self.poll_interval):
            yield event_to_proto(event)

    async def CancelTraining(self, request: training_pb2.CancelTrainingRequest,
                             context: grpc.aio.ServicerContext | None) -> training_pb2.TrainingRun:
        return run_to_proto(await asyncio.to_thread(self.runner.cancel, request.run_id))

    async def ListTrainings(self, request: training_pb2.ListTrainingsRequest,
                            context: grpc.aio.ServicerContext | None) -> training_pb2.ListTrainingsResponse:
        if request.page_size < 0:
            raise invalid_argument("page_size", "must not be negative")
        size = min(request.page_size or self.default_page_size, self.max_page_size)
        records = await asyncio.to_thread(self.runner.list)
        if request.page_token:
            # Keyset paging (newest first): runs created while a client pages do not shift its pages.
            after = _decode_token(request.page_token)
            records = [r for r in records if (r.created_at, r.run_id) < after]
        page = records[:size]
        token = _encode_token(page[-1]) if len(records) > size else ""
        return training_pb2.ListTrainingsResponse(runs=[run_to_proto(r) for r in page], next_page_token=token)

    async def ListCheckpoints(self, request: training_pb2.ListCheckpointsRequest,
                              context: grpc.aio.ServicerContext | None,
                              ) -> training_pb2.ListCheckpointsResponse:
        checkpoints = await asyncio.to_thread(self.runner.checkpoints, request.run_id)
        return training_pb2.ListCheckpointsResponse(checkpoints=[checkpoint_to_proto(c) for c in checkpoints])

    async def ActivateCheckpoint(self, request: training_pb2.ActivateCheckpointRequest,
                                 context: grpc.aio.ServicerContext | None,
                                 ) -> training_pb2.ActivateCheckpointResponse:
        model = await asyncio.to_thread(self.runner.activate, request.run_id, request.checkpoint_id,
                                        request.model_name)
        if request.load:
            if self.on_activate is not None:
                return training_pb2.ActivateCheckpointResponse(model=await self.on_activate(model))
            model = await asyncio.to_thread(self.runner.store.set_default, self.runner.service, model.name,
                                            model.version)
            log.info("%s: %s is now the default model (no loader hook: loads on next LoadModel/restart)",
                     self.runner.service, model.ref)
        return training_pb2.ActivateCheckpointResponse(model=model.to_proto())
