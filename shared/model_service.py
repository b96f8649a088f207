"""What every model service shares, written once: its store, loaded models, training runner, RPCs.

A model service subclasses :class:`ModelService`, says how to load a store record (``load_model``)
and which service-specific servicer it mounts (``service_registrations``); ModelRepository and
Training come for free, the default model is loaded before health says SERVING, and runs that a
crash interrupted resume when the service starts.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

from dramaturg.common.v1 import common_pb2, common_pb2_grpc
from dramaturg.shared import metrics
from dramaturg.shared.audio import Audio, AudioLimits, decode_audio_input
from dramaturg.shared.batching import DynamicBatcher
from dramaturg.shared.blobs import default_blob_root
from dramaturg.shared.config import ServiceSettings, dramaturg_home
from dramaturg.shared.grpc.errors import ServiceError, failed_precondition
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.models import MODEL_REPOSITORY, Loaded, ModelManager, ModelRepositoryServicer, run_in
from dramaturg.shared.registry import recipes_path
from dramaturg.shared.service import Service
from dramaturg.shared.store import ModelRecord, ModelStore
from dramaturg.training.v1 import training_pb2, training_pb2_grpc
from pydantic import Field

log = logging.getLogger(__name__)

T = TypeVar("T")

TRAINING = training_pb2.DESCRIPTOR.services_by_name["Training"].full_name


class ModelServiceSettings(ServiceSettings):
    """Settings every model service has."""

    # Model served when a request names none: "name" or "name:version"; empty = the store's default.
    default_model: str = ""
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1"
    max_loaded_models: int = 2
    max_concurrent_trainings: int = 1
    # Roots under which AudioInput.uri may point (empty: URIs refused). The default is the gateway's
    # blob store, $DRAMATURG_HOME/blobs, so jobs whose audio the gateway sends by URI are readable.
    audio_uri_roots: list[str] = Field(default_factory=lambda: [str(default_blob_root())])
    # Audio inputs shorter or longer than these are refused (each service sets its own defaults).
    min_seconds: float = Field(0.0, ge=0)
    max_seconds: float = Field(600.0, gt=0)

    def audio_limits(self, **extra: Any) -> AudioLimits:
        """What an RPC accepts as audio, from these settings (``extra``: e.g. ``reject_silence``)."""
        return AudioLimits(max_seconds=self.max_seconds, min_seconds=self.min_seconds,
                           allowed_uri_roots=self.audio_uri_roots, **extra)


class BatchedModelServiceSettings(ModelServiceSettings):
    """Settings of a model service that batches concurrent requests (``shared/batching.py``)."""

    # Unset: on for a CUDA device, where a padded batch costs about one request, off on CPU.
    batching: bool | None = None
    max_batch_items: int = Field(8, ge=1)  # requests per batch
    max_wait_ms: float = Field(5.0, ge=0)  # how long the first request waits for others
    max_queue: int = Field(64, ge=1)  # requests waiting for a batch; more are RESOURCE_EXHAUSTED

    def batcher(self, process: Callable[[list[Any]], Any], *, device: str, service: str, queue: str,
                name: str, executor: Any = None) -> DynamicBatcher | None:
        """The model's batcher, or None when batching is off for ``device``. ``executor``: the service's
        model thread, so batches run where every other model call runs."""
        batching = self.batching if self.batching is not None else str(device).startswith("cuda")
        if not batching:
            return None
        return DynamicBatcher(process, max_batch_size=self.max_batch_items, max_wait_ms=self.max_wait_ms,
                              max_queue=self.max_queue, executor=executor, name=name,
                              **metrics.batcher_hooks(service, queue, self.max_queue))


def pick_device(setting: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cpu`` / ``cuda`` / ``cuda:N`` as given.

    One rule for serving and training, so a config's ``device`` means the same everywhere.
    """
    setting = str(setting or "auto")
    if setting == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting not in ("cpu", "cuda") and not (setting.startswith("cuda:") and setting[5:].isdigit()):
        raise ValueError(f"device {setting!r}: expected auto, cpu, cuda or cuda:N")
    return setting


class ModelService(Service, abc.ABC):
    """Base of the five model services."""

    name: str
    # Where the Training RPCs find the recipes; empty: the service's registry entry (shared/registry.py).
    recipes_import_path: str = ""

    def __init__(self, settings: ModelServiceSettings, home: Path | None = None) -> None:
        from dramaturg.shared.training.metrics import export_runner
        from dramaturg.shared.training.runner import TrainingRunner

        self.settings = settings
        self.home = home or dramaturg_home()
        self.device = pick_device(settings.device)
        self.store = ModelStore(self.home)
        # The model threads: models load, warm up and run on these and nowhere else, so torch's
        # OpenMP pool lives in them only. An idle pool in another thread (a loader's, asyncio's
        # default executor's) makes libgomp count more threads than cores and stop spin-waiting;
        # pyannote's CPU LSTM then ran 1.7x slower than in a fresh process (bench/diarization_rtf.py).
        self.executor = ThreadPoolExecutor(self.model_threads(), thread_name_prefix=f"{self.name}-model")
        self.models: ModelManager[Any] = ModelManager(
            self.name,
            self.store,
            self._load,
            max_loaded=settings.max_loaded_models,
            release=self.release_model,
            executor=self.executor,
        )
        self.recipes_import_path = self.recipes_import_path or recipes_path(self.name)
        self.runner = TrainingRunner(
            self.home,
            self.name,
            self.recipes_import_path,
            self.store,
            max_concurrent=settings.max_concurrent_trainings,
        )
        export_runner(self.runner)  # dramaturg_training_* on this service's /metrics

    # -- what a service provides ----------------------------------------------------------------
    @abc.abstractmethod
    def load_model(self, record: ModelRecord, device: str) -> Any:
        """Load a store record onto ``device`` (runs in a worker thread)."""

    @abc.abstractmethod
    def service_registrations(self) -> list[Registration]:
        """The service's own gRPC services (Speaker, Diarization, …)."""

    def release_model(self, model: Any) -> None:
        """Free what ``load_model`` took (GPU memory)."""

    async def warm_up(self, model: Any) -> None:
        """Run one tiny request so the first real one does not pay for lazy initialisation."""

    def model_threads(self) -> int:
        """How many model calls may run at once (threads of :attr:`executor`); one by default."""
        return 1

    async def run_model(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking model call on the model threads (context variables kept, as to_thread does)."""
        return await run_in(self.executor, fn, *args)

    # -- shared plumbing ---------------------------------------------------------------------------
    def _load(self, record: ModelRecord) -> tuple[Any, str]:
        return self.load_model(record, self.device), self.device

    def registrations(self) -> list[Registration]:
        from dramaturg.shared.training.servicer import TrainingServicer

        return [
            *self.service_registrations(),
            Registration(
                MODEL_REPOSITORY,
                common_pb2_grpc.add_ModelRepositoryServicer_to_server,
                ModelRepositoryServicer(self.models),
            ),
            Registration(
                TRAINING,
                training_pb2_grpc.add_TrainingServicer_to_server,
                TrainingServicer(self.runner, on_activate=self._on_activate),
            ),
        ]

    async def _on_activate(self, record: ModelRecord) -> common_pb2.ModelInfo:
        loaded = await self.models.load(record.ref, make_default=True)
        return self.models.info(loaded.record)

    async def start(self) -> None:
        try:
            loaded = await self.models.load(self.settings.default_model, make_default=True)
        except ServiceError as exc:
            raise RuntimeError(
                f"the {self.name} service has no model to serve ({exc.message}); train one with "
                f"`make train-{self.name}` or `dramaturg train {self.name}`, or set default_model"
            ) from exc
        log.info("%s serving %s on %s", self.name, loaded.record.ref, loaded.device)
        await self.warm_up(loaded.model)
        recovered = await asyncio.to_thread(self.runner.recover)
        if recovered:
            log.info("resumed %d interrupted training run(s): %s", len(recovered), ", ".join(recovered))

    async def stop(self) -> None:
        await asyncio.to_thread(self.runner.close)
        await self.models.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


M = TypeVar("M")


class ModelServicer(Generic[M]):
    """What every model service's servicer repeats, written once: the model a request names, its
    reference for the response, the audio rules and decoding.

    ``M`` is the service's loaded-model type (what :meth:`ModelService.load_model` returns); it must
    carry the store ``record`` it was loaded from.
    """

    def __init__(self, service: ModelService) -> None:
        self.service = service
        self.settings = service.settings

    async def model(self, ref: common_pb2.ModelRef) -> M:
        """The loaded model ``ref`` names (empty: the default); NOT_FOUND / FAILED_PRECONDITION otherwise."""
        loaded: Loaded[M] = await self.service.models.get(ref)
        return loaded.model

    @staticmethod
    def model_ref(record: ModelRecord) -> common_pb2.ModelRef:
        """The exact version that answered, for the response (so a client can pin it)."""
        return common_pb2.ModelRef(name=record.name, version=record.version)

    def audio_limits(self, **extra: Any) -> AudioLimits:
        """The one set of audio rules every RPC of this service applies (settings + ``extra``)."""
        return self.settings.audio_limits(**extra)

    async def decode(
        self, audio: common_pb2.AudioInput, *, target_rate: int, field: str, limits: AudioLimits | None = None
    ) -> Audio:
        """Decode and validate one AudioInput off the event loop (INVALID_ARGUMENT names ``field``)."""
        limits = limits or self.audio_limits()
        return await asyncio.to_thread(decode_audio_input, audio, target_rate=target_rate, limits=limits,
                                       field=field)


def model_type_of(record: ModelRecord) -> str | None:
    """The ``model_type`` of a store version's ``config.json`` (a transformers model), None if it has none."""
    config = record.path / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def require_model_type(record: ModelRecord, service: str, accepted: str, what: str, hint: str = "") -> None:
    """FAILED_PRECONDITION unless ``record`` is a transformers model of type ``accepted``.

    A service's store also holds what its recipes publish beside servable models (a TTS codec, a voice's
    LoRA adapter), and a ModelRepository Load of one must say so instead of failing inside
    ``from_pretrained``. ``what`` names the servable kind ("a CSM model"); ``hint`` says what to do
    instead (default: name a model a recipe published).
    """
    kind = model_type_of(record)
    if kind == accepted:
        return
    found = f"a {kind} model" if kind else "not a model folder"
    hint = hint or "name one that a recipe published (ListModels)"
    raise failed_precondition(
        f"{service} model {record.ref} is {found}, not {what} this service can serve; {hint}",
        reason="NOT_A_SERVABLE_MODEL",
    )
