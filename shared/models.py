"""Loaded models, written once: which store versions a server holds, and the ModelRepository RPCs.

A model service gives :class:`ModelManager` a loader (store record → loaded model object); the manager
resolves refs (``name``, ``name:latest``, ``name:v3``, empty = the default), loads on first use or on
LoadModel, keeps a bounded number loaded (least recently used goes first), and answers
ListModels / LoadModel / UnloadModel for every service the same way (Triton's model-repository idea).

Resolving a ref runs on every RPC. The store answers it from its in-memory snapshot after one
``stat`` (shared/store.py); only when the store changed does the manager let it rescan its folders,
and then in a worker thread, so no folder scan or JSON parsing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from dramaturg.common.v1 import common_pb2, common_pb2_grpc
from dramaturg.shared import metrics
from dramaturg.shared.grpc.errors import failed_precondition
from dramaturg.shared.store import ModelRecord, ModelRefLike, ModelStore

log = logging.getLogger(__name__)

M = TypeVar("M")
R = TypeVar("R")


@dataclass
class Loaded(Generic[M]):
    record: ModelRecord
    model: M
    device: str


async def run_in(executor: Executor | None, fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` on ``executor`` (None: asyncio's default), context variables kept as to_thread does."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, context.run, fn, *args)


class ModelManager(Generic[M]):
    """Resolves and loads one service's models from the store; thread-safe for one event loop."""

    def __init__(
        self,
        service: str,
        store: ModelStore,
        loader: Callable[[ModelRecord], tuple[M, str]],
        *,
        max_loaded: int = 2,
        release: Callable[[M], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.service = service
        # Where models load: None = asyncio's default executor. Model services pass their model threads
        # (ModelService.executor), so torch's OpenMP pool lives in those threads only.
        self.executor = executor
        self.store = store
        self.loader = loader
        self.release = release
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, Loaded[M]] = OrderedDict()
        self._lock = asyncio.Lock()
        self._default_ref: str | None = None

    def resolve(self, ref: ModelRefLike) -> ModelRecord:
        """Store record for a ref; an empty ref is this server's default (LoadModel make_default),
        else the store's default. May scan the store: async code calls :meth:`lookup`."""
        empty = (isinstance(ref, common_pb2.ModelRef) and not ref.name) or (isinstance(ref, str) and not ref)
        if empty and self._default_ref:
            ref = self._default_ref
        return self.store.resolve(self.service, ref)

    async def lookup(self, ref: ModelRefLike) -> ModelRecord:
        """:meth:`resolve` without blocking the event loop: from the store's snapshot when it is
        current, else after refreshing it in a worker thread."""
        if not self.store.is_current(self.service):
            await asyncio.to_thread(self.store.refresh, self.service)
        return self.resolve(ref)

    async def records(self) -> list[ModelRecord]:
        """Every published version of this service (ListModels), without blocking the event loop."""
        if not self.store.is_current(self.service):
            await asyncio.to_thread(self.store.refresh, self.service)
        return self.store.list(service=self.service)

    async def get(self, ref: ModelRefLike) -> Loaded[M]:
        """The loaded model for ``ref``, loading it (in a worker thread) if needed."""
        record = await self.lookup(ref)
        key = record.ref
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            return loaded
        async with self._lock:
            loaded = self._loaded.get(key)
            if loaded is None:
                loaded = await self._load(record)
        return loaded

    async def _load(self, record: ModelRecord) -> Loaded[M]:
        log.info("loading %s model %s from %s", self.service, record.ref, record.path)
        model, device = await run_in(self.executor, self.loader, record)
        loaded = Loaded(record, model, device)
        self._loaded[record.ref] = loaded
        metrics.MODEL_LOADED.labels(self.service, record.name, record.version).set(1)
        while len(self._loaded) > self.max_loaded:
            _, evicted = self._loaded.popitem(last=False)
            self._release(evicted)
        return loaded

    def _release(self, loaded: Loaded[M]) -> None:
        log.info("unloading %s model %s", self.service, loaded.record.ref)
        metrics.MODEL_LOADED.labels(self.service, loaded.record.name, loaded.record.version).set(0)
        if self.release is not None:
            self.release(loaded.model)

    async def load(self, ref: ModelRefLike, make_default: bool = False) -> Loaded[M]:
        loaded = await self.get(ref)
        if make_default:
            self._default_ref = loaded.record.ref
        return loaded

    async def unload(self, ref: ModelRefLike) -> ModelRecord:
        record = await self.lookup(ref)
        async with self._lock:
            loaded = self._loaded.pop(record.ref, None)
        if loaded is None:
            raise failed_precondition(
                f"{self.service} model {record.ref} is not loaded; ListModels shows what is",
                reason="MODEL_NOT_LOADED",
            )
        if self._default_ref == record.ref:
            self._default_ref = None
        self._release(loaded)
        return record

    def is_loaded(self, record: ModelRecord) -> Loaded[M] | None:
        return self._loaded.get(record.ref)

    def info(self, record: ModelRecord) -> common_pb2.ModelInfo:
        loaded = self._loaded.get(record.ref)
        info = record.to_proto(loaded=loaded is not None, device=loaded.device if loaded else "")
        if self._default_ref is not None:
            info.is_default = self._default_ref == record.ref
        return info

    async def close(self) -> None:
        while self._loaded:
            _, loaded = self._loaded.popitem()
            self._release(loaded)


class ModelRepositoryServicer(common_pb2_grpc.ModelRepositoryServicer):
    """ListModels / LoadModel / UnloadModel over a :class:`ModelManager`."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def ListModels(self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        records = await self.manager.records()
        infos = [self.manager.info(r) for r in records]
        if request.loaded_only:
            infos = [i for i in infos if i.loaded]
        return common_pb2.ListModelsResponse(models=infos)

    async def LoadModel(self, request: common_pb2.LoadModelRequest, context: grpc.aio.ServicerContext):
        loaded = await self.manager.load(request.model, make_default=request.make_default)
        return common_pb2.LoadModelResponse(model=self.manager.info(loaded.record))

    async def UnloadModel(self, request: common_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext):
        record = await self.manager.unload(request.model)
        return common_pb2.UnloadModelResponse(model=self.manager.info(record))


MODEL_REPOSITORY = common_pb2.DESCRIPTOR.services_by_name["ModelRepository"].full_name
