"""Evaluator SFT (recipe ``sft`` and its presets); the worker runs this.

A run reads the corpus's Speech-DRAME JSONL (:mod:`.data`: the ``train`` files train, the ``test``
files are held out), writes one SFT row per item and dimension (:func:`.prompts.sft_examples`: the
dimension's prompt, ``<answer>N</answer>`` with N one rater's score or the raters' rounded mean), and
trains with TRL's stock ``SFTTrainer``: the :class:`.collate.EvaluatorCollator` (loss on the answer
only) fed by :class:`.data.WithAudio` (clips read once, rows keep a path), ``remove_unused_columns=False``
and TRL's dataset preparation skipped (it would tokenise the prompt without the audio). The shared
bridge (:class:`~dramaturg.shared.training.hf_bridge.RunContextCallback`) reports progress, logs the
loss, learning rate and gradient norm, stops on cancel, evaluates every ``eval_every`` steps and at
the end (and at step 0 unless resuming), checkpoints after each evaluation and resumes a killed run
from its newest checkpoint (the Trainer's own state — the adapter or the full weights, optimizer,
scheduler, RNG — sits in the checkpoint's ``trainer_state/``).

**Evaluation.** Each held-out item's clip is encoded once and every dimension scored on it
(:func:`.scoring.score_item`: the expected value over the digits 1..5 after ``<answer>``). Per
dimension: ``heldout/mae/<dim>`` (against the raters' mean) and ``heldout/spearman/<dim>`` (rank
correlation with it; NaN when either side is constant); overall ``heldout/mae``, ``heldout/spearman``
(the mean of the finite per-dimension correlations: the monitored metric, higher is better) and
``heldout/digit_mass`` (the probability the model puts on a digit at the answer position: whether it
has learnt the answer format at all).

**What is published.** The best checkpoint (by ``heldout/spearman``; the newest when nothing could be
measured), as a standalone folder :func:`.model.load_evaluator` reads: ``save_pretrained`` of the model
and the processor. With ``peft: lora`` the adapter is merged into the weights (``merge_and_unload`` of a
copy; the training model keeps its adapter) — one loader for every checkpoint, no peft at serving
time, and scoring costs what the base model's does. The adapter itself is kept only in the
checkpoint's ``trainer_state/`` for resume. (For the 7 B model the copy doubles the weights' memory
while a checkpoint is written.)
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.training import RunContext
from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, RunContextCallback, attach, resume_path
from dramaturg.shared.training.selection import Monitor, publish_best

from .collate import EvaluatorCollator
from .data import WithAudio, evaluator_dir, load_clips, load_split, rater_mean, sft_rows
from .model import build_tiny_evaluator, load_evaluator, lora_config, save_evaluator
from .prompts import PROMPTS_LABEL, item_dimensions, prompt_style
from .recipes import ARCHITECTURE, MONITORED, PEFT_METHODS, PLANNED_PEFT_METHODS, SCHEDULES, TARGETS

MONITOR = Monitor(MONITORED, "max")


def _check(cfg: Mapping[str, Any]) -> None:
    method = str(cfg["peft"])
    if method in PLANNED_PEFT_METHODS:
        raise ValueError(f"peft {method!r} is not implemented yet: use one of {', '.join(PEFT_METHODS)}")
    if method not in PEFT_METHODS:
        raise ValueError(f"peft {method!r}: expected one of {', '.join(PEFT_METHODS)}")
    if cfg["target"] not in TARGETS:
        raise ValueError(f"target {cfg['target']!r}: expected one of {', '.join(TARGETS)}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule {cfg['schedule']!r}: expected one of {', '.join(SCHEDULES)}")


def device_of(cfg: Mapping[str, Any]) -> str:
    wanted = str(cfg.get("device", "auto"))
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


# ========================================================================================== models


def base_source(ctx: RunContext, cfg: Mapping[str, Any]) -> str:
    """Where the base model loads from: the run's base model, else ``base_model`` ("" = the tiny one)."""
    if ctx.base_model_path is not None:
        return str(ctx.base_model_path)
    value = str(cfg.get("base_model") or "")
    if not value or Path(value).expanduser().is_dir():
        return str(Path(value).expanduser().resolve()) if value else ""
    if ctx.store is not None:
        try:
            return str(ctx.store.resolve(ctx.record.service, value).path)
        except ServiceError:
            pass
    return value  # a hub id


def build_model(ctx: RunContext, cfg: Mapping[str, Any]) -> tuple[Any, Any, str]:
    """(model to train, processor, where the base came from): the base with LoRA, or the base itself."""
    source = base_source(ctx, cfg)
    if source:
        dtype = torch.bfloat16 if cfg["bf16"] else None
        base, processor = load_evaluator(source, dtype=dtype)
    else:
        base, processor = build_tiny_evaluator(seed=int(cfg["seed"]))
    if cfg["peft"] == "lora":
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            config = lora_config(int(cfg["lora_r"]), int(cfg["lora_alpha"]), float(cfg["lora_dropout"]))
            config.modules_to_save = [str(m) for m in cfg["lora_modules_to_save"]] or None
            model = get_peft_model(base, config)
    else:
        model = base
    model.train()
    return model, processor, source or "tiny"


def standalone(model: Any) -> Any:
    """The model as :func:`load_evaluator` reads it: a copy with the LoRA merged in, or the model itself."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def evaluator_writer(model: Any, processor: Any) -> Any:
    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        save_evaluator(standalone(model), processor, folder)

    return write


def count_parameters(model: Any) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ===================================================================================== evaluation


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN with fewer than two items or a constant side."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def heldout_metrics(
    model: Any,
    processor: Any,
    items: Sequence[Mapping[str, Any]],
    clips: Mapping[str, np.ndarray],
    *,
    detailed: bool,
    dimensions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-dimension MAE and Spearman against the raters' mean, their summaries and the digit mass."""
    from .scoring import score_item

    if not items:
        return {}
    was_training = model.training
    model.eval()
    predicted: dict[str, list[float]] = {}
    reference: dict[str, list[float]] = {}
    masses: list[float] = []
    try:
        for item in items:
            wanted = [d for d in (dimensions or item_dimensions(item)) if d in item_dimensions(item)]
            if not wanted:
                continue
            scores = score_item(model, processor, clips[str(item["wav_path"])], item, dimensions=wanted,
                                detailed=detailed)
            for dimension, result in scores.items():
                predicted.setdefault(dimension, []).append(result.score)
                reference.setdefault(dimension, []).append(rater_mean(item, dimension))
                masses.append(result.digit_mass)
    finally:
        model.train(was_training)
    metrics: dict[str, float] = {}
    maes, rhos = [], []
    for dimension, pred in predicted.items():
        ref = reference[dimension]
        mae = float(np.mean(np.abs(np.asarray(pred) - np.asarray(ref))))
        rho = spearman(pred, ref)
        metrics[f"heldout/mae/{dimension}"] = mae
        metrics[f"heldout/spearman/{dimension}"] = rho
        maes.append(mae)
        if math.isfinite(rho):
            rhos.append(rho)
    metrics["heldout/mae"] = float(np.mean(maes)) if maes else math.nan
    metrics[MONITORED] = float(np.mean(rhos)) if rhos else math.nan
    metrics["heldout/digit_mass"] = float(np.mean(masses)) if masses else math.nan
    return metrics


# ========================================================================================= the recipe


def sft_config(ctx: RunContext, cfg: Mapping[str, Any], batch_size: int, device: str) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(ctx.run_dir / "hf-trainer"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=max(1, int(cfg["gradient_accumulation"])),
        max_steps=int(cfg["max_steps"]),
        learning_rate=float(cfg["lr"]),
        lr_scheduler_type=str(cfg["schedule"]),
        warmup_steps=float(cfg["warmup"]),  # < 1: a share of max_steps
        weight_decay=float(cfg["weight_decay"]),
        max_grad_norm=float(cfg["max_grad_norm"]),
        optim="adamw_torch",
        logging_steps=max(1, int(cfg["log_every"])),
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the collator needs the raw columns
        dataset_kwargs={"skip_prepare_dataset": True},  # TRL would tokenise the prompt without the audio
        max_length=None,
        use_cpu=device == "cpu",
        bf16=bool(cfg["bf16"]),
        **BRIDGE_ARGUMENTS,  # the bridge decides when to evaluate and save
    )


def run_sft(ctx: RunContext, cfg: Mapping[str, Any] | None = None) -> None:
    """Recipe ``sft``: JSONL → SFT rows → SFTTrainer + bridge → held-out scores → the best one published."""
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = dict(ctx.config if cfg is None else cfg)
    _check(cfg)
    if int(cfg["torch_threads"]) > 0:
        torch.set_num_threads(int(cfg["torch_threads"]))
    if ctx.dataset_path is None:
        raise ValueError(f"dataset {ctx.dataset_uri!r}: the evaluator trains from a local corpus folder")
    folder = evaluator_dir(ctx.dataset_path)
    train_items = load_split(folder, str(cfg["item_set"]), "train")
    held_items = load_split(folder, str(cfg["item_set"]), "test")
    if int(cfg["max_train_items"]) > 0:
        train_items = train_items[: int(cfg["max_train_items"])]
    if int(cfg["max_heldout_items"]) > 0:
        held_items = held_items[: int(cfg["max_heldout_items"])]
    if not train_items:
        raise ValueError(f"{folder}: no training items for item_set {cfg['item_set']!r}")
    dimensions = [str(d) for d in cfg["dimensions"]] or None
    detailed = bool(cfg["detailed"])
    rows = sft_rows(train_items, target=str(cfg["target"]), seed=int(cfg["seed"]), detailed=detailed,
                    dimensions=dimensions)
    if not rows:
        raise ValueError(f"no training rows: no item has any of the dimensions {dimensions}")
    clips = load_clips(folder, [*train_items, *held_items])

    model, processor, source = build_model(ctx, cfg)
    device = device_of(cfg)
    batch_size = max(1, min(int(cfg["batch_size"]), len(rows)))
    args = sft_config(ctx, cfg, batch_size, device)
    model.to(args.device)

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        return heldout_metrics(model, processor, held_items, clips, detailed=detailed, dimensions=dimensions)

    previous = ctx.checkpoints()
    bridge = RunContextCallback(
        ctx,
        monitor=MONITOR,
        evaluate=evaluate if held_items else None,
        eval_every=int(cfg["eval_every"]),
        write_artifact=evaluator_writer(model, processor),
        best=MONITOR.best_of(previous),
    )
    trainer = attach(
        SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            data_collator=WithAudio(EvaluatorCollator(processor), clips),
            processing_class=processor,
        ),
        bridge,
    )
    trainable, total = count_parameters(model)
    ctx.log(
        f"sft ({cfg['peft']}) from {source}: {trainable:,} of {total:,} parameters trained, "
        f"{len(train_items)} training items ({len(rows)} rows, target {cfg['target']}), "
        f"{len(held_items)} held-out items, {cfg['max_steps']} steps of {batch_size} on {args.device}"
    )
    if not held_items:
        ctx.log("no held-out item, so nothing to measure: the newest checkpoint is published", "WARNING")
    resume = previous[-1] if previous else None
    if resume is not None:
        ctx.log(f"resuming from {resume.checkpoint_id}")
    elif held_items and cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)  # before train() seeds the Trainer: scoring does not shift its RNG
    trainer.train(resume_from_checkpoint=resume_path(resume.path) if resume is not None else None)
    shutil.rmtree(ctx.run_dir / "hf-trainer", ignore_errors=True)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    labels = {"peft": str(cfg["peft"]), "base": source, PROMPTS_LABEL: prompt_style(bool(cfg["detailed"]))}
    record = publish_best(ctx, architecture=ARCHITECTURE, labels=labels)
    chosen = record.metrics.get(MONITORED, math.nan)
    ctx.log(f"published {record.ref}: held-out mean Spearman {chosen:.3f}")
