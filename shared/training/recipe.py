"""The contract between the shared training runner and a service's training code.

A service implements :class:`Recipe` (a name, a description, the default config, and ``run``) and
exposes its recipes at an import path such as ``"dramaturg.services.speaker.recipes:RECIPES"`` (a dict
name → Recipe, a list of recipes, or a function returning either; see ``presets.LazyRecipe``). The
runner imports that path in the server, to validate requests, and again in the worker subprocess, to
run them: a recipe never runs in the server process, so a crash or an OOM in training cannot take the
server down.

``run`` receives a :class:`RunContext`: everything a training loop needs to report progress, log
metrics (TensorBoard and the event stream), write atomic checkpoints, resume after a crash, honour
a cancel, and publish its result into the model store.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dramaturg.shared.grpc.errors import invalid_argument
from dramaturg.shared.store import ModelRecord, ModelStore, atomic_write_json, data_hash, fsync_dir
from dramaturg.shared.training.runs import (
    CANCEL_MARKER,
    CHECKPOINT_META,
    PREEMPT_MARKER,
    TRAINER_STATE_DIR,
    CheckpointInfo,
    EventLog,
    RunRecord,
    checkpoint_id_for,
    list_checkpoints,
    remove_tree,
    update_run,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

StateWriter = Callable[[Path], None]

# Keys every recipe accepts without declaring them in its defaults: they steer the runner, not the model.
RUNNER_KEYS: dict[str, Any] = {"keep_checkpoints": 3}


class Recipe(ABC):
    """One way of fine-tuning a service's model (e.g. ``"ecapa-aam"``).

    ``defaults`` is the complete set of config keys the recipe understands: a request may override
    only those keys (plus :data:`RUNNER_KEYS`), so a typo fails at StartTraining, not hours later.
    ``architecture`` is recorded in the model store for every model the recipe produces.
    """

    name: str = ""
    description: str = ""
    defaults: dict[str, Any] = {}
    architecture: str = ""

    @abstractmethod
    def run(self, ctx: RunContext) -> None:
        """Train. Runs in a worker subprocess; must poll ``ctx.cancelled()`` and return early when set.

        To survive crashes, save checkpoints with ``ctx.save_checkpoint`` and start by looking at
        ``ctx.latest_checkpoint()``: after a crash the worker is started again in the same run folder.
        """


def load_recipes(import_path: str) -> dict[str, Recipe]:
    """Import ``"package.module:ATTRIBUTE"`` and return its recipes by name."""
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"recipes import path {import_path!r} must look like 'package.module:ATTRIBUTE'")
    target: Any = getattr(importlib.import_module(module_name), attr)
    if callable(target) and not isinstance(target, Recipe):
        target = target()
    if isinstance(target, Mapping):
        names, items = [str(k) for k in target], list(target.values())
    else:
        items = list(target)
        names = [getattr(r, "name", "") for r in items]
    recipes: dict[str, Recipe] = {}
    for name, recipe in zip(names, items, strict=True):
        if not name or not callable(getattr(recipe, "run", None)):
            raise TypeError(f"{import_path}: {recipe!r} is not a recipe (needs a name and run(ctx))")
        recipes[str(name)] = recipe
    return recipes


def merge_config(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                 field_path: str = "overrides") -> dict[str, Any]:
    """Defaults with ``overrides`` applied; unknown keys and wrong types raise INVALID_ARGUMENT.

    Values arriving through ``google.protobuf.Struct`` are all floats, so a whole float is accepted
    for an int default and turned back into an int (``epochs: 3.0`` → ``3``).
    """
    return _merge({**RUNNER_KEYS, **dict(defaults)}, overrides or {}, field_path)


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any], field_path: str) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in overrides.items():
        path = f"{field_path}.{key}"
        if key not in merged:
            raise invalid_argument(path, f"unknown key {key!r}; accepted here: {', '.join(sorted(merged))}")
        default = merged[key]
        if isinstance(default, Mapping) and isinstance(value, Mapping):
            # An empty default dict is free-form (e.g. extra model kwargs); a filled one is a schema.
            merged[key] = _merge(default, value, path) if default else dict(value)
        else:
            merged[key] = _coerce(path, default, value)
    return merged


def _coerce(path: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise invalid_argument(path, f"expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_argument(path, f"expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise invalid_argument(path, f"expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_argument(path, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise invalid_argument(path, f"expected a string, got {value!r}")
        return value
    if isinstance(default, list | tuple):
        if not isinstance(value, list | tuple):
            raise invalid_argument(path, f"expected a list, got {value!r}")
        return list(value)
    if isinstance(default, Mapping):
        raise invalid_argument(path, f"expected an object, got {value!r}")
    return value


class RunContext:
    """What a running recipe can see and do. Built by the worker; one per attempt.

    Progress is throttled (``progress_interval``) because a training loop may report every step and
    the event stream is read by every watcher; metrics, logs and checkpoints are never throttled.
    """

    #: False on ranks 1…N-1 of a data-parallel run (shared/training/distributed.py): they train but
    #: do not publish
    is_primary = True

    def __init__(self, record: RunRecord, events: EventLog, store: ModelStore | None = None, *,
                 progress_interval: float = 0.2, purge_step: int | None = None) -> None:
        self.record = record
        self.events = events
        self.store = store
        self.run_id = record.run_id
        self.run_dir = record.run_dir
        self.config: dict[str, Any] = dict(record.config)
        self.dataset_uri = record.dataset_uri
        self.dataset_path: Path | None = local_path(record.dataset_uri)
        self.base_model = record.base_model
        self.base_model_path: Path | None = Path(record.base_model_path) if record.base_model_path else None
        self.output_model = record.output_model
        self.attempt = record.attempts
        self.log_dir = record.log_dir
        self.checkpoints_dir = record.checkpoints_dir
        self.keep_checkpoints = max(1, int(self.config.get("keep_checkpoints", 3)))
        self.logger = logging.getLogger(f"dramaturg.training.{record.service}.{record.recipe}")
        self.progress_interval = progress_interval
        self._stop_requested = False
        self._last_marker_check = 0.0
        self._last_progress = 0.0
        self._last_save = 0.0
        self._progress: tuple[int, int, float] = (record.step, record.total_steps, record.epoch)
        self._metrics: dict[str, float] = dict(record.metrics)
        self._writer: SummaryWriter | None = None
        self._purge_step = purge_step
        self._data_hash: str | None = record.data_hash or None

    # ------------------------------------------------------------------------------------ reporting

    def report(self, step: int, total_steps: int | None = None, epoch: float | None = None) -> None:
        """Where training is. Cheap to call every step: events and run.json are written 5 times a second."""
        total = self._progress[1] if total_steps is None else int(total_steps)
        ep = self._progress[2] if epoch is None else float(epoch)
        self._progress = (int(step), total, ep)
        now = time.monotonic()
        if now - self._last_progress < self.progress_interval and not (total and step >= total):
            return
        self._last_progress = now
        self.events.append("progress", step=int(step), total_steps=total, epoch=ep)
        self._save_progress(force=True)

    def log_metrics(self, step: int, epoch: float, values: Mapping[str, float]) -> None:
        """Scalars to TensorBoard (``log_dir``) and to the event stream; run.json keeps the latest."""
        clean = {str(k): float(v) for k, v in values.items()}
        writer = self._tensorboard()
        for key, value in clean.items():
            writer.add_scalar(key, value, int(step))
        self._metrics.update(clean)
        self._progress = (int(step), self._progress[1], float(epoch))
        self.events.append("metrics", step=int(step), epoch=float(epoch), values=clean)
        self._save_progress()

    def log(self, message: str, level: str = "INFO") -> None:
        """A line for the user, in the event stream (WatchTraining) and the worker log."""
        level = level.upper()
        self.logger.log(logging.getLevelNamesMapping().get(level, logging.INFO), message)
        self.events.message(message, level)

    def _tensorboard(self) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # torch only where metrics are logged

            self.log_dir.mkdir(parents=True, exist_ok=True)
            # purge_step makes TensorBoard drop what a crashed attempt logged after the resumed checkpoint.
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def _save_progress(self, force: bool = False) -> None:
        """Mirror progress and the latest metrics into run.json (GetTraining reads it), throttled."""
        now = time.monotonic()
        if not force and now - self._last_save < self.progress_interval:
            return
        self._last_save = now
        step, total, epoch = self._progress
        metrics = dict(self._metrics)

        def mutate(rec: RunRecord) -> None:
            rec.step, rec.total_steps, rec.epoch = step, total, epoch
            rec.metrics.update(metrics)

        update_run(self.run_dir, mutate, durable=False)

    # ---------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, state_writer: StateWriter, step: int, epoch: float = 0.0,
                        metrics: Mapping[str, float] | None = None, is_best: bool = False) -> str:
        """Write a checkpoint atomically; returns its id. Keeps the newest ``keep_checkpoints`` plus the best.

        ``state_writer(folder)`` writes the model the way the service loads it (``save_pretrained``);
        resume-only state (optimizer, scheduler, RNG) belongs in ``folder / TRAINER_STATE_DIR`` so
        that activating the checkpoint publishes just the model.
        """
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_id = checkpoint_id_for(int(step))
        staging = self.checkpoints_dir / f".staging-{checkpoint_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            state_writer(staging)
            meta = {"checkpoint_id": checkpoint_id, "step": int(step), "epoch": float(epoch),
                    "metrics": {k: float(v) for k, v in (metrics or {}).items()},
                    "created_at": time.time(), "is_best": bool(is_best), "attempt": self.attempt}
            _fsync_tree(staging)
            atomic_write_json(staging / CHECKPOINT_META, meta, durable=True)
            final = self.checkpoints_dir / checkpoint_id
            remove_tree(final)  # the same step saved again (a resumed attempt): the new one wins
            os.rename(staging, final)
            fsync_dir(self.checkpoints_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self._writer is not None:
            self._writer.flush()
        self._prune()
        infos = {c.checkpoint_id: c for c in list_checkpoints(self.run_dir)}
        info = infos.get(checkpoint_id)
        best_id = next((c.checkpoint_id for c in infos.values() if c.best), "")
        self.events.append("checkpoint", checkpoint={
            "checkpoint_id": checkpoint_id, "step": int(step), "epoch": float(epoch),
            "metrics": meta["metrics"], "created_at": meta["created_at"],
            "best": bool(info and info.best)})

        def mutate(rec: RunRecord) -> None:
            rec.last_checkpoint, rec.best_checkpoint = checkpoint_id, best_id
            rec.step, rec.epoch = int(step), float(epoch)

        update_run(self.run_dir, mutate)
        return checkpoint_id

    def _prune(self) -> None:
        infos = list_checkpoints(self.run_dir)
        keep = {c.checkpoint_id for c in infos[-self.keep_checkpoints:]} | {c.checkpoint_id for c in infos
                                                                             if c.best}
        for info in infos:
            if info.checkpoint_id not in keep:
                remove_tree(info.path)
        for stale in self.checkpoints_dir.glob(".staging-*"):  # left by a killed attempt
            shutil.rmtree(stale, ignore_errors=True)

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.run_dir)

    def latest_checkpoint(self) -> tuple[Path, int, float] | None:
        """(folder, step, epoch) of the newest checkpoint, or None: where a resumed attempt starts."""
        infos = list_checkpoints(self.run_dir)
        if not infos:
            return None
        last = infos[-1]
        return last.path, last.step, last.epoch

    # ------------------------------------------------------------------------------------- stopping

    def cancelled(self) -> bool:
        """True once the run should stop (cancel, or the server shutting down): return from ``run`` soon."""
        if self._stop_requested:
            return True
        now = time.monotonic()
        if now - self._last_marker_check >= 0.25:
            self._last_marker_check = now
            if (self.run_dir / CANCEL_MARKER).exists() or (self.run_dir / PREEMPT_MARKER).exists():
                self._stop_requested = True
        return self._stop_requested

    def request_stop(self) -> None:
        """Called by the worker's signal handler."""
        self._stop_requested = True

    # ----------------------------------------------------------------------------------- publishing

    @property
    def data_hash(self) -> str:
        """Fingerprint of the dataset (computed once, on first use)."""
        if self._data_hash is None:
            try:
                self._data_hash = data_hash(self.dataset_path) if self.dataset_path else ""
            except OSError as err:
                self.logger.warning("could not fingerprint %s: %s", self.dataset_path, err)
                self._data_hash = ""
            value = self._data_hash

            def mutate(rec: RunRecord) -> None:
                rec.data_hash = value

            update_run(self.run_dir, mutate, durable=False)
        return self._data_hash

    def publish(self, source: Path | str | StateWriter, metrics: Mapping[str, float] | None = None, *,
                name: str | None = None, version: str | None = None, architecture: str | None = None,
                labels: Mapping[str, str] | None = None) -> ModelRecord:
        """Put the trained model into the store under ``name`` (default: the run's ``output_model``).

        ``source`` is a folder to copy or a writer called with the staging folder.
        """
        if self.store is None:
            raise RuntimeError("this run has no model store to publish into")
        name = name or self.output_model or self.record.recipe
        meta: dict[str, Any] = {
            "architecture": architecture if architecture is not None else self.record.architecture,
            "base_model": self.base_model, "recipe": self.record.recipe, "data_hash": self.data_hash,
            "parent": self.base_model if self.base_model_path else "",
            "metrics": {**self._metrics, **{k: float(v) for k, v in (metrics or {}).items()}},
            "labels": {"run_id": self.run_id, **(labels or {})},
        }
        if callable(source):
            writer = self.store.create_version(self.record.service, name, version=version, **meta)
            with writer as staging:
                source(staging)
            assert writer.record is not None
            record = writer.record
        else:
            record = self.store.publish_folder(self.record.service, name, Path(source), version=version,
                                               exclude=(CHECKPOINT_META, TRAINER_STATE_DIR), **meta)
        self.events.message(f"published model {record.ref}")

        def mutate(rec: RunRecord) -> None:
            rec.published_model = record.ref

        update_run(self.run_dir, mutate)
        return record

    def close(self) -> None:
        """Flush what is buffered (TensorBoard, the last progress): called by the worker on every exit."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        step, total, epoch = self._progress
        if (step, total, epoch) != (self.record.step, self.record.total_steps, self.record.epoch):
            self.events.append("progress", step=step, total_steps=total, epoch=epoch)
        self._save_progress(force=True)


def local_path(uri: str) -> Path | None:
    """The local path a dataset URI names (a plain path or file://), or None for a remote scheme."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        return None
    return Path(uri).expanduser()


def _fsync_tree(folder: Path) -> None:
    """Flush a checkpoint's files before it is renamed into place (a rename can outlive unflushed data)."""
    for dirpath, _dirnames, filenames in os.walk(folder):
        for fname in filenames:
            try:
                fd = os.open(os.path.join(dirpath, fname), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
