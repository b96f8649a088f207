"""The TTS recipes' part of the Trainer bridge: stages on one step axis, held-out tables, checkpoint choice.

A TTS run can train several things one after another on one run's step axis — the codec and then the
LM (``full`` with ``codec: train``), or one LoRA adapter per speaker (``per_speaker``) — each a
``transformers.Trainer`` bridged to the runner by the shared
:class:`~dramaturg.shared.training.hf_bridge.RunContextCallback`. :class:`StageBridge` adds:

* **a stage tag in every checkpoint** (``stage.json``: ``{"stage": "codec" | "lm" | "lora",
  "speaker": ...}``), so a resumed run resumes each stage from its own checkpoints only;
* **checkpoint ids on the run's axis** (``step_offset`` + the Trainer's step): the shared bridge
  offsets progress and metrics but saves checkpoints at the Trainer's own step, so two stages would
  write ``step-00000050`` over each other;
* **the held-out table**: every evaluation is a row of ``heldout.csv`` in the run folder (stage,
  speaker, step, every metric) and a line in the run log, so the user can pick the earliest checkpoint
  that is good enough (fish-speech's advice for voice fine-tunes, which overfit).

:func:`choose_checkpoint` then picks a stage's checkpoint to publish: the lowest monitored value, or
with ``select_tolerance`` > 0 the earliest checkpoint within that fraction of it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dramaturg.shared.training import RunContext
from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, RunContextCallback
from dramaturg.shared.training.runs import CheckpointInfo
from dramaturg.shared.training.selection import Monitor
from transformers import TrainingArguments

STAGE_FILE = "stage.json"
HELDOUT_CSV = "heldout.csv"
HELDOUT = Monitor("loss/val", "min")  # the LM stages: CSM's loss on the held-out lines, lower is better
CODEC_HELDOUT = Monitor("codec/val_stft", "min")  # the codec stage: STFT loss of the held-out clips
CODEC_LOG_NAMES = {"loss": "codec/loss_train", "learning_rate": "codec/lr", "grad_norm": "codec/grad_norm"}


def stage_of(checkpoint: CheckpointInfo) -> dict[str, str]:
    try:
        return json.loads((checkpoint.path / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def stage_checkpoints(ctx: RunContext, stage: str, speaker: str = "") -> list[CheckpointInfo]:
    """The run's checkpoints of one stage (and speaker), in step order."""
    return [
        c
        for c in ctx.checkpoints()
        if stage_of(c).get("stage") == stage and stage_of(c).get("speaker", "") == speaker
    ]


def choose_checkpoint(
    checkpoints: Sequence[CheckpointInfo], monitor: Monitor = HELDOUT, tolerance: float = 0.0
) -> CheckpointInfo:
    """The lowest monitored value (the earliest of equals); with ``tolerance`` the earliest checkpoint
    within ``(1 + tolerance)`` × that value; the newest when nothing was measured."""
    if not checkpoints:
        raise RuntimeError("the stage finished without a checkpoint to publish")
    scored = [(c, monitor.value(c.metrics)) for c in checkpoints]
    scored = [(c, v) for c, v in scored if v is not None]
    if not scored:
        return checkpoints[-1]
    best = min(v for _, v in scored) if monitor.mode == "min" else max(v for _, v in scored)
    if monitor.mode == "min":
        bound = best + abs(best) * max(0.0, tolerance)
        return next(c for c, v in scored if v <= bound)
    bound = best - abs(best) * max(0.0, tolerance)
    return next(c for c, v in scored if v >= bound)


def training_arguments(
    output_dir: Path,
    *,
    batch_size: int,
    max_steps: int,
    lr: float,
    schedule: str,
    warmup: float,
    weight_decay: float,
    max_grad_norm: float,
    log_every: int,
    seed: int,
    device: str,
    bf16: bool = False,
    num_workers: int = 0,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=lr,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,  # < 1: a share of max_steps
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        optim="adamw_torch",
        logging_steps=max(1, log_every),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=num_workers,
        remove_unused_columns=False,
        ignore_data_skip=False,
        use_cpu=device == "cpu",
        bf16=bf16,
        **BRIDGE_ARGUMENTS,  # the bridge decides when to evaluate and save
    )


class StageBridge(RunContextCallback):
    """The shared bridge for one stage of a TTS run (see the module docstring)."""

    def __init__(
        self,
        ctx: RunContext,
        *,
        stage: str,
        speaker: str = "",
        evaluate: Callable[[int, float], Mapping[str, float]] | None,
        eval_every: int,
        write_artifact: Callable[[Path, Mapping[str, float]], None],
        step_offset: int = 0,
        total_steps: int | None = None,
        extra_logs: Callable[[], Mapping[str, float]] | None = None,
        monitor: Monitor = HELDOUT,
        log_names: Mapping[str, str] | None = None,
    ) -> None:
        self.stage = {"stage": stage, "speaker": speaker}
        tag = dict(self.stage)

        def write_tagged(folder: Path, metrics: Mapping[str, float]) -> None:
            # the stage tag lets a resumed run find its own stage's checkpoints (stage_checkpoints)
            write_artifact(folder, metrics)
            (folder / STAGE_FILE).write_text(json.dumps(tag))

        super().__init__(
            ctx,
            monitor=monitor,
            evaluate=evaluate,
            eval_every=eval_every,
            write_artifact=write_tagged,
            step_offset=step_offset,
            total_steps=total_steps,
            best=monitor.best_of(stage_checkpoints(ctx, stage, speaker)),
            **({"log_names": log_names} if log_names is not None else {}),
        )
        self.extra_logs = extra_logs

    def summary(self, step: int, metrics: Mapping[str, float]) -> str:
        who = f" [{self.stage['speaker']}]" if self.stage["speaker"] else ""
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return f"step {self.step_offset + step} ({self.stage['stage']}{who}): held-out {shown}"

    def evaluate(self, step: int, epoch: float) -> dict[str, float]:
        metrics = super().evaluate(step, epoch)
        if metrics:
            append_heldout_row(self.ctx.run_dir, {**self.stage, "step": self.step_offset + step}, metrics)
        return metrics

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        super().on_log(args, state, control, logs=logs, **kwargs)
        if self.extra_logs is not None and logs and "loss" in logs:
            values = {k: float(v) for k, v in self.extra_logs().items() if math.isfinite(float(v))}
            if values:
                self.ctx.log_metrics(self.step_offset + state.global_step, state.epoch or 0.0, values)



def append_heldout_row(run_dir: Path, where: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """One evaluation as a row of ``heldout.csv`` (columns grow as new metrics appear)."""
    path = run_dir / HELDOUT_CSV
    rows: list[dict[str, str]] = []
    if path.exists():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    row = {**{k: str(v) for k, v in where.items()}, **{k: f"{float(v):.6g}" for k, v in metrics.items()}}
    # a resumed stage evaluates a step again: the newer row replaces the older
    rows = [
        r
        for r in rows
        if (r.get("stage"), r.get("speaker"), r.get("step")) != (row["stage"], row["speaker"], row["step"])
    ]
    rows.append(row)
    columns = list(dict.fromkeys(key for r in rows for key in r))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_heldout(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / HELDOUT_CSV
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_checkpoint_table(
    ctx: RunContext, checkpoints: Sequence[CheckpointInfo], chosen: CheckpointInfo, title: str
) -> None:
    """Every kept checkpoint's held-out figures, the published one marked (the run log and WatchTraining)."""
    lines = [f"{title}: held-out figures of the kept checkpoints (published: {chosen.checkpoint_id})"]
    for c in checkpoints:
        figures = ", ".join(f"{k} {v:.4g}" for k, v in sorted(c.metrics.items()))
        mark = "  <- published" if c.checkpoint_id == chosen.checkpoint_id else ""
        lines.append(f"  step {c.step}: {figures or 'not evaluated'}{mark}")
    ctx.log("\n".join(lines))


def device_of(cfg: Mapping[str, Any]) -> str:
    """``device`` (auto | cpu | cuda) made concrete."""
    import torch

    wanted = str(cfg.get("device", "auto"))
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def set_threads(cfg: Mapping[str, Any]) -> None:
    if int(cfg.get("torch_threads", 0)) > 0:
        import torch

        torch.set_num_threads(int(cfg["torch_threads"]))
