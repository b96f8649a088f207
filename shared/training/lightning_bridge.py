"""The Lightning bridge: a ``lightning.Trainer`` → the runner's :class:`RunContext`.

One :class:`LightningBridge` callback gives a Lightning fit what the runner promises: progress per
batch (``ctx.report``, with ``extra_steps`` of later work in the total), cancel →
``trainer.should_stop``, the epoch's logged values as metrics (TensorBoard, WatchTraining,
Prometheus), a ``validate()`` before ``fit()`` recorded as epoch 0, and after every completed epoch
a checkpoint — the model as the service loads it (the pluggable ``write_artifact``) plus
Lightning's own checkpoint under ``trainer_state/`` (:func:`lightning_checkpoint`, for
``fit(ckpt_path=…)``) — marked best by a :class:`~dramaturg.shared.training.selection.Monitor`.
Service specifics (a per-epoch table, layer freezing, resume state of a multi-stage recipe) are
subclass hooks: :meth:`LightningBridge.record_epoch`, :meth:`~LightningBridge.before_checkpoint`,
:meth:`~LightningBridge.write_state`.

The Trainer must not log, checkpoint or draw a progress bar itself: build it over
:data:`BRIDGE_TRAINER_ARGS`. lightning is imported at module level: only the worker imports this.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning
from dramaturg.shared.training.recipe import RunContext
from dramaturg.shared.training.runs import TRAINER_STATE_DIR
from dramaturg.shared.training.selection import Monitor

LIGHTNING_CKPT = "lightning.ckpt"
# lightning.Trainer arguments every bridged fit runs with: the RunContext logs and checkpoints.
BRIDGE_TRAINER_ARGS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}

ArtifactWriter = Callable[[Path, lightning.LightningModule], None]


def scalar_metrics(metrics: Mapping[str, Any], prefixes: Iterable[str] = ()) -> dict[str, float]:
    """The finite numbers in Lightning's ``callback_metrics`` (keys starting with ``prefixes``, if given)."""
    wanted = tuple(prefixes)
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if (not wanted or str(key).startswith(wanted)) and math.isfinite(number):
            out[str(key)] = number
    return out


def lightning_checkpoint(folder: Path) -> Path:
    """Where a run checkpoint keeps Lightning's own checkpoint (``fit(ckpt_path=…)`` on resume)."""
    return folder / TRAINER_STATE_DIR / LIGHTNING_CKPT


def quiet_lightning() -> None:
    """Lightning's chatter about what the bridge replaces on purpose (no logger: the RunContext
    writes TensorBoard) or what says nothing about this run."""
    for pattern in (".*have no logger configured.*", ".*`IterableDataset` has `__len__` defined.*",
                    ".*does not have many workers.*", ".*The number of training batches.*"):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


class LightningBridge(lightning.Callback):
    """Lightning events → RunContext: progress, cancel, epoch metrics, checkpoints, the best one.

    ``write_artifact(folder, module)`` writes the model as the service loads it; ``metrics(callback_
    metrics)`` picks the epoch's values (default: every finite scalar); ``best`` is the monitored
    value to beat (a resumed run: ``monitor.best_of(ctx.checkpoints())``). An epoch cut short by a
    cancel leaves neither metrics nor a checkpoint.
    """

    def __init__(self, ctx: RunContext, write_artifact: ArtifactWriter, *, monitor: Monitor | None = None,
                 metrics: Callable[[Mapping[str, Any]], dict[str, float]] = scalar_metrics,
                 extra_steps: int = 0, best: float | None = None) -> None:
        self.ctx = ctx
        self.write_artifact = write_artifact
        self.monitor = monitor
        self.metrics = metrics
        self.extra_steps = extra_steps  # work after the fit (e.g. tuning trials), for the progress total
        self.best = best
        self.total = 0

    # ------------------------------------------------------------------------------------ hooks

    def record_epoch(self, epoch: int, step: int, values: Mapping[str, float]) -> None:
        """An epoch's values (epoch 0: a ``validate()`` before the fit): metrics and a line for the user."""
        self.ctx.log_metrics(step, float(epoch), values)
        keys = ("loss/train", "loss/val", *((self.monitor.metric,) if self.monitor else ()))
        summary = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k in keys)
        self.ctx.log(f"epoch {epoch}: {summary}")

    def before_checkpoint(self, epoch: int, step: int, is_best: bool) -> None:
        """Called after the best is updated, before the checkpoint is written (update resume state here)."""

    def write_state(self, state_dir: Path) -> None:
        """Extra resume state next to Lightning's checkpoint (``trainer_state/``)."""

    # ---------------------------------------------------------------------------- Lightning events

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        # the train dataloader (hence the number of batches per epoch) exists from here on
        self.total = int(trainer.max_epochs or 0) * int(trainer.num_training_batches) + self.extra_steps

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        fraction = (batch_idx + 1) / max(1, int(trainer.num_training_batches))
        self.ctx.report(trainer.global_step, self.total, trainer.current_epoch + fraction)
        if self.ctx.cancelled():
            trainer.should_stop = True

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.state.fn != "validate":
            return  # during fit the epoch is recorded once the training loss is in, at the epoch's end
        self.record_epoch(0, 0, self.metrics(trainer.callback_metrics))

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if self.ctx.cancelled():
            return  # a partial epoch: neither a row nor a checkpoint
        epoch, step = trainer.current_epoch + 1, trainer.global_step
        values = self.metrics(trainer.callback_metrics)
        self.record_epoch(epoch, step, values)
        value = self.monitor.value(values) if self.monitor is not None else None
        is_best = self.monitor.improves(value, self.best) if self.monitor is not None else True
        if is_best and value is not None:
            self.best = value
        self.before_checkpoint(epoch, step, is_best)

        def write(folder: Path) -> None:
            self.write_artifact(folder, pl_module)
            ckpt = lightning_checkpoint(folder)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(ckpt, weights_only=False)
            self.write_state(ckpt.parent)

        self.ctx.save_checkpoint(write, step, float(epoch), values, is_best=is_best)
