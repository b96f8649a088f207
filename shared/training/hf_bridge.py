"""The Hugging Face ``Trainer`` bridge: any transformers Trainer → the runner's :class:`RunContext`.

Every service that trains with ``transformers.Trainer`` or a subclass of it (TRL's ``SFTTrainer``,
``GRPOTrainer``, a service's own) adds one :class:`RunContextCallback` and gets what the runner
promises: progress (``ctx.report``), the logged loss / learning rate / gradient norm as metrics
(TensorBoard, WatchTraining, Prometheus), cancel → ``should_training_stop``, an evaluation every
``eval_every`` steps and at the last step, a checkpoint after each (the model as the service loads
it, written by a pluggable artifact writer, plus the Trainer's own checkpoint — optimizer,
scheduler, RNG — under ``trainer_state/`` for :func:`resume_path`), and the best checkpoint chosen
by a :class:`~dramaturg.shared.training.selection.Monitor`. Service specifics (a loss's warm-up,
a calibrated threshold written into the model's config) are subclass hooks or the writer's job.

The Trainer must not save or evaluate on its own schedule: build its arguments over
:data:`BRIDGE_ARGUMENTS` (TRL's configs accept them too) and :func:`attach` the callback.

In a data-parallel run (shared/training/distributed.py) every rank runs the Trainer with this callback:
a cancel stops all ranks at the same step, every rank takes part in a checkpoint's save (the Trainer
writes each rank's RNG state), and only rank 0 evaluates and writes the run's checkpoint.

transformers is imported at module level: only the worker subprocess imports this module (from a
recipe's training function), never the server.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dramaturg.shared.training import distributed
from dramaturg.shared.training.recipe import RunContext
from dramaturg.shared.training.runs import TRAINER_STATE_DIR
from dramaturg.shared.training.selection import Monitor
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

log = logging.getLogger(__name__)

# TrainingArguments (or SFTConfig / GRPOConfig) every bridged Trainer runs with: the callback decides
# when to evaluate and save, the RunContext writes TensorBoard, and nothing prints progress bars.
BRIDGE_ARGUMENTS: dict[str, Any] = {
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_strategy": "steps",
    "report_to": "none",
    "disable_tqdm": True,
}
# Trainer log keys → metric names (what TensorBoard, WatchTraining and Prometheus show).
LOG_NAMES: dict[str, str] = {"loss": "loss/train", "learning_rate": "lr", "grad_norm": "grad_norm"}
# The end-of-training summary the Trainer logs once; not a time series.
_SUMMARY_KEYS = frozenset({"epoch", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                           "total_flos", "train_loss"})

Evaluate = Callable[[int, float], Mapping[str, float]]
ArtifactWriter = Callable[[Path, Mapping[str, float]], None]


class RunContextCallback(TrainerCallback):
    """Trainer events → RunContext: progress, metrics, cancel, evaluation, checkpoints, the best one.

    ``evaluate(step, epoch)`` returns metrics (empty: nothing to score); ``write_artifact(folder,
    metrics)`` writes the model as the service loads it (default: ``save_pretrained`` of the model
    and its processing class). ``checkpoints=False`` (short sweeps) evaluates at the last step only
    and saves nothing. ``step_offset`` / ``total_steps`` put several short trainings on one run's
    step axis. ``best`` is the monitored value to beat (a resumed run:
    ``monitor.best_of(ctx.checkpoints())``).
    ``log_prefix`` also logs every other numeric Trainer log (TRL's rewards, KL, entropy …) under it.
    """

    def __init__(self, ctx: RunContext, *, monitor: Monitor | None = None, evaluate: Evaluate | None = None,
                 eval_every: int = 0, write_artifact: ArtifactWriter | None = None, checkpoints: bool = True,
                 step_offset: int = 0, total_steps: int | None = None, best: float | None = None,
                 log_names: Mapping[str, str] = LOG_NAMES, log_prefix: str | None = None) -> None:
        self.ctx = ctx
        self.monitor = monitor
        self.evaluate_fn = evaluate
        self.eval_every = max(0, int(eval_every))
        self.write_artifact = write_artifact
        self.checkpoints = checkpoints
        self.step_offset = step_offset
        self.total_steps = total_steps
        self.best = best
        self.log_names = dict(log_names)
        self.log_prefix = log_prefix
        self.pending: dict[str, float] = {}  # the last evaluation, for the checkpoint that follows it
        self.last_eval: dict[str, float] = {}
        self.last_loss = math.nan

    # ------------------------------------------------------------------------------------ hooks

    def summary(self, step: int, metrics: Mapping[str, float]) -> str:
        """The line an evaluation logs for the user."""
        shown = {k: v for k, v in metrics.items() if self.monitor is None or k == self.monitor.metric}
        return f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())

    # ------------------------------------------------------------------------------- evaluation

    def due(self, step: int, max_steps: int) -> bool:
        """Evaluate (and checkpoint) at this step: every ``eval_every`` steps and at the last one."""
        periodic = self.checkpoints and self.eval_every > 0 and step % self.eval_every == 0
        return step >= max_steps or periodic

    def evaluate(self, step: int, epoch: float) -> dict[str, float]:
        """Score now, log the metrics; also callable before ``trainer.train()`` to score the start
        (before the Trainer seeds its RNG, so the scoring does not shift training's random stream)."""
        # rank 0 scores for the run; the other ranks of a data-parallel run wait at the next all-reduce
        scoring = self.evaluate_fn is not None and self.ctx.is_primary
        metrics = dict(self.evaluate_fn(step, epoch)) if scoring else {}
        if metrics:
            self.ctx.log_metrics(self.step_offset + step, epoch, metrics)
            self.ctx.log(self.summary(step, metrics))
        self.last_eval = metrics
        return metrics

    # ---------------------------------------------------------------------------- Trainer events

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        step = state.global_step
        self.ctx.report(self.step_offset + step, self.total_steps or state.max_steps, state.epoch)
        if distributed.any_rank(self.ctx.cancelled()):
            control.should_training_stop = True
            return
        if self.due(step, state.max_steps):
            self.pending = self.evaluate(step, float(state.epoch or 0.0))
            control.should_save = self.checkpoints

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        values = {tag: float(logs[key]) for key, tag in self.log_names.items() if key in logs}
        if self.log_prefix is not None:
            for key, value in logs.items():
                if key in self.log_names or key in _SUMMARY_KEYS or isinstance(value, bool):
                    continue
                if isinstance(value, int | float) and math.isfinite(value):
                    values[f"{self.log_prefix}{key}"] = float(value)
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
        if values:
            self.ctx.log_metrics(self.step_offset + state.global_step, state.epoch or 0.0, values)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not self.checkpoints:
            return
        step = state.global_step
        trainer_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        distributed.barrier()  # every rank has written its part of the Trainer's checkpoint
        if not self.ctx.is_primary:
            return
        metrics, self.pending = dict(self.pending), {}
        value = self.monitor.value(metrics) if self.monitor is not None else None
        is_best = self.monitor.improves(value, self.best) if self.monitor is not None else True
        writer = self.write_artifact or save_pretrained_writer(kwargs.get("model"),
                                                                kwargs.get("processing_class"))

        def write(folder: Path) -> None:
            writer(folder, metrics)
            if trainer_dir.is_dir():  # the Trainer's own checkpoint, for resume_from_checkpoint
                shutil.move(str(trainer_dir), str(folder / TRAINER_STATE_DIR))

        # on the run's step axis: two stages of one run must not write the same checkpoint id
        self.ctx.save_checkpoint(write, self.step_offset + step, float(state.epoch or 0.0), metrics, is_best)
        if is_best and value is not None:
            self.best = value
        shutil.rmtree(trainer_dir, ignore_errors=True)


def save_pretrained_writer(model: Any, processing_class: Any = None) -> ArtifactWriter:
    """The default artifact: ``save_pretrained`` of the model (a PEFT model saves its adapter) and of its
    tokenizer / processor, so the folder loads with ``from_pretrained``."""
    if model is None or not hasattr(model, "save_pretrained"):
        raise TypeError("the Trainer's model has no save_pretrained: pass write_artifact to the bridge")

    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        model.save_pretrained(str(folder))
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(str(folder))

    return write


def attach(trainer: Trainer, *callbacks: TrainerCallback) -> Trainer:
    """Add the bridge (and any other callbacks) and drop the printer that dumps every log dict to stdout."""
    for callback in callbacks:
        if callback not in trainer.callback_handler.callbacks:
            trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def resume_path(checkpoint: Path | None) -> str | None:
    """``resume_from_checkpoint`` for a run checkpoint's folder (None: start fresh)."""
    if checkpoint is None:
        return None
    return str(checkpoint / TRAINER_STATE_DIR)
