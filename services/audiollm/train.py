"""Audio-LLM training (recipes ``stage1``, ``stage2`` and their presets); the worker runs these.

A run: read the SALMONN annotation (:mod:`.data`: training and held-out files), load the base model
(``base_model``: a store ref or folder; "" builds the tiny model from ``seed``, written once to the run
folder's ``base/`` so a resumed run and the final merge see the same weights), wrap it with peft
(:func:`~.model.apply_lora`: LoRA on the LLM's q/k/v/o projections only, the Q-Former and projection
as ``modules_to_save``; Whisper, BEATs and the LLM's own weights frozen), then train under
``transformers.Trainer`` with the shared :class:`~dramaturg.shared.training.hf_bridge.RunContextCallback`:
progress, loss / lr / grad-norm metrics, cancel, the held-out loss (``loss/val``, lower is better)
every ``eval_every`` steps and at the end, a checkpoint after each, resume from the newest.

**Checkpoints vs. the published model.** A checkpoint is the peft folder (``adapter_config.json`` +
``adapter_model.safetensors``: LoRA and the trained Q-Former / projection, a few MB even for the
production model) with ``adapter_meta.json`` naming the base, plus the Trainer's state for resume.
The published model is the best checkpoint (lowest held-out loss) merged into its base
(``merge_and_unload``) and saved with :func:`~.model.save_audiollm` — a standalone folder that
:func:`~.model.load_audiollm` reads and the next stage takes as ``base_model``. The merge is checked
first: merged and unmerged logits on a held-out batch must agree within ``merge_tolerance``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.store import atomic_write_json
from dramaturg.shared.training import RunContext, distributed
from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, RunContextCallback, attach, resume_path
from dramaturg.shared.training.selection import Monitor, best_checkpoint
from transformers import Trainer, TrainingArguments

from .data import AudioItem, AudioItems, SalmonnCollator, annotation_file, load_annotation, task_counts
from .model import (
    AudioLlmForConditionalGeneration,
    build_tiny_audiollm,
    load_audiollm,
    refreeze,
    save_audiollm,
    unfreeze,
)
from .recipes import ARCHITECTURE, PROMPTS, SCHEDULES

HELDOUT = Monitor("loss/val", "min")
BASE_DIR = "base"  # the run folder's copy of a from-scratch base model
ADAPTER_META = "adapter_meta.json"


def device_of(cfg: Mapping[str, Any]) -> str:
    wanted = str(cfg.get("device", "auto"))
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _check(cfg: Mapping[str, Any]) -> None:
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule {cfg['schedule']!r}: expected one of {', '.join(SCHEDULES)}")
    if cfg["prompts"] not in PROMPTS:
        raise ValueError(f"prompts {cfg['prompts']!r}: expected one of {', '.join(PROMPTS)}")
    if float(cfg["edge_augment"]) < 0:
        raise ValueError(f"edge_augment {cfg['edge_augment']!r}: seconds, 0 (off) or more")


# ========================================================================================= the base


def base_folder(ctx: RunContext, cfg: Mapping[str, Any]) -> tuple[Path, str]:
    """(folder to load, ref to record): StartTraining's base model, the config's, or the tiny one."""
    if ctx.base_model_path is not None:
        return Path(ctx.base_model_path), ctx.base_model or str(ctx.base_model_path)
    value = str(cfg.get("base_model") or "")
    if value:
        path = Path(value).expanduser()
        if path.is_dir():
            return path.resolve(), str(path.resolve())
        if ctx.store is not None:
            try:
                record = ctx.store.resolve(ctx.record.service, value)
                return Path(record.path), record.ref
            except ServiceError:
                pass
        raise ValueError(f"base_model {value!r}: not a published audiollm model nor a folder")
    folder = ctx.run_dir / BASE_DIR
    if not (folder / "config.json").is_file():  # once per run: a resumed run trains the same base
        model, processor = build_tiny_audiollm(seed=int(cfg["seed"]), **dict(cfg.get("model") or {}))
        tmp = folder.with_name(f".{BASE_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_audiollm(model, processor, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    return folder, f"tiny (seed {cfg['seed']})"


# ====================================================================================== evaluation


@torch.no_grad()
def heldout_loss(model: Any, collator: SalmonnCollator, items: Sequence[AudioItem], batch_size: int) -> float:
    """Mean answer-token cross-entropy over the held-out items (every token weighs the same)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(p for p in model.parameters()).device
    for start in range(0, len(items), max(1, batch_size)):
        batch = {k: v.to(device) for k, v in collator(items[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        tokens += int((target != -100).sum())
    model.train(was_training)
    return total / max(1, tokens)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ======================================================================================= the stage


def training_arguments(cfg: Mapping[str, Any], output_dir: Path, batch_size: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
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
        dataloader_num_workers=int(cfg["num_workers"]),
        remove_unused_columns=False,
        use_cpu=device_of(cfg) == "cpu",
        ddp_find_unused_parameters=False,  # every trainable part is in every forward pass
        **BRIDGE_ARGUMENTS,  # the bridge decides when to evaluate and save
    )


def adapter_writer(model: Any, base_ref: str, cfg: Mapping[str, Any]) -> Any:
    meta = {
        "base_model": base_ref,
        "lora_r": int(cfg["lora_r"]),
        "lora_alpha": int(cfg["lora_alpha"]),
        "tasks": list(cfg["tasks"]),
        "prompts": str(cfg["prompts"]),
    }

    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        model.save_pretrained(str(folder))
        atomic_write_json(folder / ADAPTER_META, meta)

    return write


def run_stage(ctx: RunContext) -> None:
    """Recipes ``stage1`` / ``stage2``: data, base + LoRA, Trainer through the bridge, merge, publish."""
    from .model import apply_lora

    cfg = ctx.config
    _check(cfg)
    if int(cfg["torch_threads"]) > 0:
        torch.set_num_threads(int(cfg["torch_threads"]))
    if ctx.dataset_path is None:
        raise ValueError("the audiollm recipes need a dataset folder with SALMONN annotation JSON")
    tasks = [str(t) for t in cfg["tasks"]]
    max_seconds = float(cfg["max_seconds"])
    train_items, train_out = load_annotation(
        annotation_file(ctx.dataset_path, str(cfg["train_annotation"])), tasks, max_seconds
    )
    held_items, held_out = load_annotation(
        annotation_file(ctx.dataset_path, str(cfg["heldout_annotation"])), tasks, max_seconds
    )
    ctx.log(
        f"data: {len(train_items)} training items {task_counts(train_items)}, {len(held_items)} held-out "
        f"items {task_counts(held_items)}; left out: training {train_out or 'none'}, "
        f"held-out {held_out or 'none'}"
    )
    if not train_items:
        raise ValueError("no training item: check train_annotation and tasks")

    with distributed.primary_first():  # a from-scratch base is built and written once, by rank 0
        folder, base_ref = base_folder(ctx, cfg)
    model, processor = load_audiollm(folder)
    ctx.log(f"base model: {base_ref}")
    lora = int(cfg["lora_r"]) > 0
    parts = unfreeze(model, cfg["unfreeze"], lora=lora)
    if lora:
        with torch.random.fork_rng(devices=[]):  # LoRA's initialisation does not move the run's RNG
            torch.manual_seed(int(cfg["seed"]))
            model = apply_lora(
                model, rank=int(cfg["lora_r"]), alpha=int(cfg["lora_alpha"]),
                dropout=float(cfg["lora_dropout"]), also_train=parts,
            )
    batch_size = max(1, min(int(cfg["batch_size"]), len(train_items)))
    scratch = ctx.run_dir / "hf-trainer"
    args = training_arguments(cfg, scratch, batch_size)
    model.to(args.device)
    scorer = SalmonnCollator(processor, str(cfg["prompts"]))

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        return {"loss/val": heldout_loss(model, scorer, held_items, int(cfg["eval_batch_size"]))}

    previous = ctx.checkpoints()
    bridge = RunContextCallback(
        ctx,
        monitor=HELDOUT,
        evaluate=evaluate if held_items else None,
        eval_every=int(cfg["eval_every"]),
        write_artifact=adapter_writer(model, base_ref, cfg) if lora else full_writer(model, processor),
        best=HELDOUT.best_of(previous),
    )
    trainer = attach(
        Trainer(
            model=model,
            args=args,
            train_dataset=AudioItems(train_items),
            data_collator=SalmonnCollator(
                processor, str(cfg["prompts"]), seed=int(cfg["seed"]), ctc_alphabet=ctc_alphabet(model),
                edge_augment=float(cfg["edge_augment"]),
            ),
        ),
        bridge,
    )
    trainable, total = count_parameters(model)
    ctx.log(
        f"{ctx.record.recipe}: {trainable:,} of {total:,} parameters trained "
        f"({', '.join(['Q-Former', 'projection', *(['LoRA'] if lora else []), *parts])}), "
        f"{int(cfg['max_steps'])} steps of {batch_size} × {int(cfg['gradient_accumulation'])} "
        f"on {args.device}" + (f" in each of {distributed.world_size()} processes"
                               if distributed.is_distributed() else "")
    )
    resume = previous[-1] if previous else None
    if resume is not None:
        ctx.log(f"resuming from {resume.checkpoint_id}")
    elif held_items and cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)  # before train() seeds the Trainer: scoring does not shift its RNG
    elif not held_items:
        ctx.log("no held-out item, so no held-out loss: the newest checkpoint is published", "WARNING")
    trainer.train(resume_from_checkpoint=resume_path(resume.path) if resume is not None else None)
    distributed.barrier()  # every rank is done with the Trainer's scratch folder
    if not ctx.is_primary:
        return
    shutil.rmtree(scratch, ignore_errors=True)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    publish(ctx, cfg, folder, base_ref, scorer, held_items or train_items[:4], lora=lora)


def ctc_alphabet(model: Any) -> str:
    """What the training batches spell for the model's CTC head ("" without one; peft wraps the model)."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return str(config.ctc_alphabet) if float(config.ctc_weight) + float(config.query_ctc_weight) > 0 else ""


def full_writer(model: AudioLlmForConditionalGeneration, processor: Any) -> Any:
    """Checkpoints without LoRA: the whole model and its processor (a tiny model's few MB)."""

    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        save_audiollm(model, processor, folder)

    return write


def merge_checkpoint(
    base: Path, adapter: Path, collator: SalmonnCollator, probe: Sequence[AudioItem]
) -> tuple[AudioLlmForConditionalGeneration, Any, float]:
    """(merged model, processor, max |merged - unmerged| logit on the probe items)."""
    from peft import PeftModel

    model, processor = load_audiollm(base)
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    batch = collator(list(probe[:4]))
    batch.pop("labels", None)
    with torch.no_grad():
        unmerged = peft_model(**batch).logits
        merged = peft_model.merge_and_unload().eval()
        gap = float((merged(**batch).logits - unmerged).abs().max())
    merged.apply_freezing()
    return merged, processor, gap


def publish(
    ctx: RunContext,
    cfg: Mapping[str, Any],
    base: Path,
    base_ref: str,
    collator: SalmonnCollator,
    probe: Sequence[AudioItem],
    *,
    lora: bool = True,
) -> None:
    chosen = best_checkpoint(ctx.checkpoints())
    lines = [f"held-out loss of the kept checkpoints (published: {chosen.checkpoint_id})"]
    for c in ctx.checkpoints():
        mark = "  <- published" if c.checkpoint_id == chosen.checkpoint_id else ""
        lines.append(f"  step {c.step}: {c.metrics.get('loss/val', math.nan):.4g}{mark}")
    ctx.log("\n".join(lines))
    if lora:
        merged, processor, gap = merge_checkpoint(base, chosen.path, collator, probe)
    else:  # the checkpoint is the whole model: nothing to merge
        merged, processor = load_audiollm(chosen.path)
        gap = 0.0
    refreeze(merged)
    if not gap <= float(cfg["merge_tolerance"]):
        raise ValueError(
            f"the merged model differs from base + adapter by {gap:.3g} (> merge_tolerance "
            f"{cfg['merge_tolerance']}): not published"
        )
    record = ctx.publish(
        lambda folder: save_audiollm(merged, processor, folder),
        {**chosen.metrics, "merge/max_abs_diff": gap},
        architecture=ARCHITECTURE,
        labels={
            "checkpoint_id": chosen.checkpoint_id,
            "step": str(chosen.step),
            "base_model": base_ref,
            "stage": ctx.record.recipe,
        },
    )
    ctx.log(
        f"published {record.ref} ("
        + (f"LoRA merged, max |merged - unmerged| logit {gap:.2e}" if lora else "trained in full")
        + f"): step "
        f"{chosen.step}, held-out loss {chosen.metrics.get('loss/val', math.nan):.4g}"
    )


__all__ = ["run_stage"]
