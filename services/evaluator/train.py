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
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.training import RunContext, distributed, zero
from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, RunContextCallback, attach, resume_path
from dramaturg.shared.training.selection import Monitor, publish_best
from transformers import TrainerCallback

from .collate import EvaluatorCollator
from .data import WithAudio, evaluator_dir, load_clips, load_split, rater_mean, sft_rows
from .model import (
    AUDIO_POSITIONS,
    MERGEABLE_PEFT,
    PROMPT_LEARNING,
    build_tiny_evaluator,
    hear_through_prompt_tuning,
    load_evaluator,
    peft_config,
    save_evaluator,
    set_audio_position,
    tiny_audio_config,
    tiny_text_config,
    virtual_tokens,
)
from .probe import ProbedSFTTrainer, attach_probe, without_probe
from .prompts import (
    PROMPTS_LABEL,
    item_dimensions,
    load_prompt_variations,
    prompt_style,
    row_prompt,
)
from .recipes import ARCHITECTURE, MONITORED, PEFT_METHODS, SCHEDULES, TARGETS
from .tokenizer import build_tokenizer

MONITOR = Monitor(MONITORED, "max")


def _check(cfg: Mapping[str, Any]) -> None:
    method = str(cfg["peft"])
    if method not in PEFT_METHODS:
        raise ValueError(f"peft {method!r}: expected one of {', '.join(PEFT_METHODS)}")
    if cfg["target"] not in TARGETS:
        raise ValueError(f"target {cfg['target']!r}: expected one of {', '.join(TARGETS)}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule {cfg['schedule']!r}: expected one of {', '.join(SCHEDULES)}")
    if cfg["audio_position"] not in AUDIO_POSITIONS:
        raise ValueError(f"audio_position {cfg['audio_position']!r}: expected first, last or \"\" (the base "
                         "model's own chat template)")
    zero.check(str(cfg["deepspeed"]), processes=int(cfg["nproc_per_node"]), quantized=method == "qlora")


def device_of(cfg: Mapping[str, Any]) -> str:
    """The run's device; each process of a data-parallel run on GPUs takes its own (``LOCAL_RANK``)."""
    wanted = str(cfg.get("device", "auto"))
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and distributed.is_distributed():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
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


def quantization_config(cfg: Mapping[str, Any]) -> Any:
    """QLoRA's 4-bit NF4 base (double quantisation), language model only.

    The audio encoder, the projector and the LM head stay in the compute dtype: the encoder is frozen
    and small beside the 7 B decoder, and the digits' logits are what the scores are made of.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cfg["bf16"] else torch.float32,
        llm_int8_skip_modules=["audio_tower", "multi_modal_projector", "lm_head"],
    )


def base_folder(ctx: RunContext, cfg: Mapping[str, Any]) -> str:
    """A folder or hub id the base loads from; the tiny model is written into the run first (QLoRA
    quantises while loading, and publishing reloads the base in full precision to merge into)."""
    source = base_source(ctx, cfg)
    if source:
        return source
    folder = ctx.run_dir / "base"
    if not (folder / "config.json").is_file():
        model, processor = tiny_model(cfg)
        save_evaluator(model, processor, folder)
    return str(folder)


def tiny_model(cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """The random tiny evaluator, its sub-configs widened field by field by the ``model`` section."""
    section = dict(cfg.get("model") or {})
    unknown = set(section) - {"audio_config", "text_config"}
    if unknown:
        raise ValueError(f"model: unknown keys {sorted(unknown)}; expected audio_config, text_config")
    overrides: dict[str, Any] = {}
    if section.get("audio_config"):
        overrides["audio_config"] = tiny_audio_config(**section["audio_config"])
    if section.get("text_config"):
        overrides["text_config"] = tiny_text_config(build_tokenizer(), **section["text_config"])
    return build_tiny_evaluator(seed=int(cfg["seed"]), **overrides)


def build_model(ctx: RunContext, cfg: Mapping[str, Any], device: str) -> tuple[Any, Any, str]:
    """(model to train, processor, where the base came from): the base with its adapter, or the base.

    ``peft`` lora | adalora | ia3 wrap the base with peft; ``qlora`` loads it 4-bit (bitsandbytes)
    first, then LoRA; ``full`` trains the base itself. The model is on ``device``.
    """
    method = str(cfg["peft"])
    source = base_source(ctx, cfg)
    dtype = torch.bfloat16 if cfg["bf16"] else None
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        with distributed.primary_first():  # a from-scratch base is written once, by rank 0
            source = base_folder(ctx, cfg)
        device_map = {"": torch.device(device).index or 0} if device.startswith("cuda") else None
        base, processor = load_evaluator(source, quantization_config=quantization_config(cfg),
                                         device_map=device_map)
        checkpointing = bool(cfg["gradient_checkpointing"])
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
    elif source:
        base, processor = load_evaluator(source, dtype=dtype, device=device)
        if virtual_tokens(base):
            raise ValueError(f"base model {source} is prompt-tuned (a soft prompt over a frozen base): train "
                             "from the model it was tuned from, or from a merged one")
    else:
        base, processor = tiny_model(cfg)
        base.to(device)
    set_audio_position(processor, str(cfg["audio_position"]))
    if method in (*MERGEABLE_PEFT, *PROMPT_LEARNING):
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            config = peft_config(
                method,
                rank=int(cfg["lora_r"]),
                alpha=int(cfg["lora_alpha"]),
                dropout=float(cfg["lora_dropout"]),
                total_steps=int(cfg["max_steps"]),
                modules_to_save=[str(m) for m in cfg["lora_modules_to_save"]],
                virtual_tokens=int(cfg["prompt_tokens"]),
            )
            model = get_peft_model(base, config)
        hear_through_prompt_tuning(model)  # prompt tuning: the audio into its embeddings (else a no-op)
    else:
        model = base
    model.train()
    return model, processor, source or "tiny"


def standalone(model: Any) -> Any:
    """The model as :func:`load_evaluator` reads it: a copy with the adapter merged in, or the model
    (a prompt-tuned one is saved as its base and its soft prompt)."""
    if not virtual_tokens(model) and hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def merged_over_full_precision(model: Any, base: str) -> Any:
    """A QLoRA model as a standalone one: the trained adapter merged into the base loaded unquantised.

    Merging into the 4-bit weights would publish a quantised model (and its rounding); the adapter
    was trained against the dequantised weights, so it goes onto the full-precision base instead.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    full, _ = load_evaluator(base)
    config = copy.deepcopy(model.peft_config["default"])
    target = get_peft_model(full, config)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(target, state)
    return target.merge_and_unload()


def evaluator_writer(model: Any, processor: Any, *, qlora_base: str | None = None) -> Any:
    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        with zero.gathered(model):  # ZeRO-3 holds a shard of each weight: merge and save whole ones
            merged = merged_over_full_precision(model, qlora_base) if qlora_base else standalone(model)
            with without_probe(merged):  # a training aid, never published
                save_evaluator(merged, processor, folder)

    return write


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA's rank reallocation after every optimizer step (peft leaves the call to the loop)."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
        model.base_model.update_and_allocate(state.global_step)


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
    metrics.update(score_histogram([s for pred in predicted.values() for s in pred]))
    return metrics


def score_histogram(scores: Sequence[float]) -> dict[str, float]:
    """The share of held-out predictions per rounded score 1..5, and their spread.

    What GRPO with a graded reward does from a weak start is collapse every answer to the middle
    score: the training reward rises while ``heldout/predicted/3`` goes to 1 and ``heldout/predicted_std``
    to 0. Logged at every evaluation, for SFT too (the baseline to compare against).
    """
    if not scores:
        return {}
    values = np.asarray(scores, dtype=np.float64)
    rounded = np.clip(np.floor(values + 0.5), 1, 5).astype(int)
    shares = {f"heldout/predicted/{k}": float(np.mean(rounded == k)) for k in range(1, 6)}
    return shares | {"heldout/predicted_std": float(values.std())}


# ========================================================================================= the recipes


@dataclass
class Corpus:
    """A run's items (training and held out) and every clip they name, read once."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    clips: dict[str, np.ndarray]
    dimensions: list[str] | None


def load_corpus(ctx: RunContext, cfg: Mapping[str, Any]) -> Corpus:
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
    return Corpus(train_items, held_items, load_clips(folder, [*train_items, *held_items]), dimensions)


def trainer_arguments(
    ctx: RunContext, cfg: Mapping[str, Any], batch_size: int, device: str
) -> dict[str, Any]:
    """The TrainingArguments SFTConfig and GRPOConfig share (the bridge decides evaluation and saving).

    ``deepspeed`` (zero1 | zero2 | zero3 | a JSON file) hands the optimisation to DeepSpeed through the
    Trainer (shared/training/zero.py); its "auto" values come from these arguments.
    """
    deepspeed = zero.resolve(str(cfg["deepspeed"]))
    if deepspeed is not None:
        zero.single_process_group()
    return {
        "output_dir": str(ctx.run_dir / "hf-trainer"),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": max(1, int(cfg["gradient_accumulation"])),
        "max_steps": int(cfg["max_steps"]),
        "learning_rate": float(cfg["lr"]),
        "lr_scheduler_type": str(cfg["schedule"]),
        "warmup_steps": float(cfg["warmup"]),  # < 1: a share of max_steps
        "weight_decay": float(cfg["weight_decay"]),
        "max_grad_norm": float(cfg["max_grad_norm"]),
        "optim": "adamw_torch",
        "logging_steps": max(1, int(cfg["log_every"])),
        "seed": int(cfg["seed"]),
        "data_seed": int(cfg["seed"]),
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,  # the collator / the audio trainer needs the raw columns
        "use_cpu": device == "cpu",
        "bf16": bool(cfg["bf16"]),
        "gradient_checkpointing": bool(cfg["gradient_checkpointing"]),
        **({"deepspeed": str(deepspeed)} if deepspeed is not None else {}),
        **BRIDGE_ARGUMENTS,
    }


def sft_config(ctx: RunContext, cfg: Mapping[str, Any], batch_size: int, device: str) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(ctx, cfg, batch_size, device),
        dataset_kwargs={"skip_prepare_dataset": True},  # TRL would tokenise the prompt without the audio
        max_length=None,
    )


def grpo_config(ctx: RunContext, cfg: Mapping[str, Any], batch_size: int, device: str) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        **trainer_arguments(ctx, cfg, batch_size, device),
        num_generations=int(cfg["num_generations"]),
        max_completion_length=int(cfg["max_completion_length"]),
        temperature=float(cfg["temperature"]),
        beta=float(cfg["beta"]),
        num_iterations=int(cfg["num_iterations"]),
        loss_type=str(cfg["loss_type"]),
        reward_weights=[float(w) for w in cfg["reward_weights"]] or None,
    )


def _train(ctx: RunContext, cfg: Mapping[str, Any], corpus: Corpus, model: Any, processor: Any,
           source: str, make_trainer: Any, describe: str) -> None:
    """What SFT and GRPO share: the bridge, resume, held-out evaluation, training, publishing."""
    detailed = bool(cfg["detailed"])
    qlora_base = source if cfg["peft"] == "qlora" else None

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        return heldout_metrics(model, processor, corpus.heldout, corpus.clips, detailed=detailed,
                               dimensions=corpus.dimensions)

    previous = ctx.checkpoints()
    bridge = RunContextCallback(
        ctx,
        monitor=MONITOR,
        evaluate=evaluate if corpus.heldout else None,
        eval_every=int(cfg["eval_every"]),
        write_artifact=evaluator_writer(model, processor, qlora_base=qlora_base),
        best=MONITOR.best_of(previous),
        log_prefix="train/",
    )
    trainer = attach(make_trainer(), bridge)
    if cfg["peft"] == "adalora":
        trainer.add_callback(AdaLoraBudget())
    trainable, total = count_parameters(model)
    ctx.log(f"{describe} ({cfg['peft']}) from {source}: {trainable:,} of {total:,} parameters trained, "
            f"{len(corpus.train)} training items, {len(corpus.heldout)} held-out items, "
            f"{cfg['max_steps']} steps on {trainer.args.device}"
            + (f" in each of {distributed.world_size()} processes" if distributed.is_distributed() else "")
            + (f" with {zero.describe(trainer)}" if trainer.is_deepspeed_enabled else ""))
    if not corpus.heldout:
        ctx.log("no held-out item, so nothing to measure: the newest checkpoint is published", "WARNING")
    resume = previous[-1] if previous else None
    if resume is not None:
        ctx.log(f"resuming from {resume.checkpoint_id}")
    elif corpus.heldout and cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)  # before train() seeds the Trainer: scoring does not shift its RNG
    trainer.train(resume_from_checkpoint=resume_path(resume.path) if resume is not None else None)
    distributed.barrier()  # every rank is done with the Trainer's scratch folder
    if not ctx.is_primary:
        return
    shutil.rmtree(ctx.run_dir / "hf-trainer", ignore_errors=True)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    labels = {"peft": str(cfg["peft"]), "base": source, PROMPTS_LABEL: prompt_style(detailed)}
    record = publish_best(ctx, architecture=ARCHITECTURE, labels=labels)
    chosen = record.metrics.get(MONITORED, math.nan)
    ctx.log(f"published {record.ref}: held-out mean Spearman {chosen:.3f}")


def prompt_variations(ctx: RunContext, cfg: Mapping[str, Any]) -> dict[str, tuple[str, ...]] | None:
    """The recipe's ``prompt_variations`` file, loaded and logged (None when off)."""
    value = str(cfg.get("prompt_variations") or "")
    if not value:
        return None
    variations = load_prompt_variations(Path(value).expanduser())
    counts = ", ".join(f"{dimension} {len(texts)}" for dimension, texts in variations.items())
    ctx.log(f"prompt variations from {value}: {counts} (training rows only)")
    return variations


def _prepare(ctx: RunContext, cfg: Mapping[str, Any]) -> tuple[Corpus, str]:
    _check(cfg)
    if int(cfg["torch_threads"]) > 0:
        torch.set_num_threads(int(cfg["torch_threads"]))
    return load_corpus(ctx, cfg), device_of(cfg)


def run_sft(ctx: RunContext, cfg: Mapping[str, Any] | None = None) -> None:
    """Recipe ``sft``: JSONL → SFT rows → SFTTrainer + bridge → held-out scores → the best one published."""
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = dict(ctx.config if cfg is None else cfg)
    corpus, device = _prepare(ctx, cfg)
    rows = sft_rows(corpus.train, target=str(cfg["target"]), seed=int(cfg["seed"]),
                    detailed=bool(cfg["detailed"]), dimensions=corpus.dimensions,
                    variations=prompt_variations(ctx, cfg))
    if not rows:
        raise ValueError(f"no training rows: no item has any of the dimensions {corpus.dimensions}")
    weights = {name: float(cfg.get(name, 0.0)) for name in ("probe_weight", "contour_weight", "score_weight")}
    probed = weights["probe_weight"] > 0 or weights["contour_weight"] > 0
    group_by_clip = bool(cfg.get("group_by_clip", False))
    if cfg["peft"] in PROMPT_LEARNING and (group_by_clip or any(w > 0 for w in weights.values())):
        raise ValueError("the training aids (probe_weight, contour_weight, score_weight, group_by_clip) read "
                         "the language model's positions, which a soft prompt shifts: use them with lora or "
                         f"full, or set them to 0 / false for peft: {cfg['peft']}")
    if probed and (cfg["peft"] != "full" or not corpus.dimensions):
        raise ValueError("probe_weight / contour_weight > 0 train the audio encoder through a probe: "
                         "they need peft: full (the other methods keep the encoder frozen) and the run's "
                         "dimensions")
    model, processor, source = build_model(ctx, cfg, device)
    if probed:
        attach_probe(model, corpus.dimensions)
    aided = group_by_clip or any(weight > 0 for weight in weights.values())
    # the aids' losses need each row's reference score (and dimension) in the batch
    references = list(corpus.dimensions or dict.fromkeys(str(row["dimension"]) for row in rows))
    batch_size = max(1, min(int(cfg["batch_size"]), len(rows)))
    args = sft_config(ctx, cfg, batch_size, device)

    def make_trainer() -> Any:
        collator = WithAudio(EvaluatorCollator(processor, probe_dimensions=references if aided else None,
                                               contours=weights["contour_weight"] > 0), corpus.clips)
        kwargs = {"model": model, "args": args, "train_dataset": Dataset.from_list(rows),
                  "data_collator": collator, "processing_class": processor}
        if aided:
            return ProbedSFTTrainer(**kwargs, **weights, group_by_clip=group_by_clip)
        return SFTTrainer(**kwargs)

    _train(ctx, cfg, corpus, model, processor, source, make_trainer,
           f"sft on {len(rows)} rows (target {cfg['target']}), batch {batch_size}")


def grpo_rows(items: Sequence[Mapping[str, Any]], *, detailed: bool, dimensions: Sequence[str] | None,
              variations: Mapping[str, Sequence[str]] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One GRPO row per item and dimension: the prompt (one of ``variations`` for its dimension when it
    has some), the clip, the rounded raters' mean to reward."""
    picker = np.random.default_rng(seed + 1)
    rows = []
    for item in items:
        for dimension in dimensions or item_dimensions(item):
            if dimension not in item_dimensions(item):
                continue
            mean = rater_mean(item, dimension)
            rows.append({
                "id": item["id"],
                "dimension": dimension,
                "prompt": row_prompt(item, dimension, detailed=detailed, variations=variations,
                                     picker=picker),
                "wav_path": str(item["wav_path"]),
                "reference": int(min(5, max(1, math.floor(mean + 0.5)))),
            })
    return rows


def run_grpo(ctx: RunContext, cfg: Mapping[str, Any] | None = None) -> None:
    """Recipe ``grpo``: JSONL → prompts → :class:`.grpo.AudioGRPOTrainer` + bridge → the best one published.

    Start from an SFT model (``base_model``: its store ref or folder): from a model that has not learnt
    the answer format every reward is 0, every group's advantage is 0 and nothing moves.
    """
    from datasets import Dataset

    from .grpo import AudioGRPOTrainer, reward_functions

    cfg = dict(ctx.config if cfg is None else cfg)
    if cfg["peft"] in PROMPT_LEARNING:
        raise ValueError(f"grpo with peft: {cfg['peft']} is not supported (the GRPO passes read the language "
                         "model's positions, which a soft prompt shifts): use lora, ia3 or full")
    corpus, device = _prepare(ctx, cfg)
    rewards = reward_functions([str(r) for r in cfg["rewards"]])
    if cfg["reward_weights"] and len(cfg["reward_weights"]) != len(rewards):
        raise ValueError(f"reward_weights {cfg['reward_weights']}: one weight per reward {cfg['rewards']}")
    rows = grpo_rows(corpus.train, detailed=bool(cfg["detailed"]), dimensions=corpus.dimensions,
                     variations=prompt_variations(ctx, cfg), seed=int(cfg["seed"]))
    if not rows:
        raise ValueError(f"no training rows: no item has any of the dimensions {corpus.dimensions}")
    deepspeed = zero.resolve(str(cfg["deepspeed"]))
    adapters_with_saved_modules = cfg["peft"] in MERGEABLE_PEFT and bool(cfg["lora_modules_to_save"])
    if deepspeed is not None and zero.zero_stage(zero.load(deepspeed)) == 3 and adapters_with_saved_modules:
        # TRL copies the adapter into a frozen "ref" adapter; ZeRO-3's gathered state dict then lacks the
        # copy of modules_to_save, and the Trainer's checkpoint fails (TRL 1.16, peft 0.21)
        raise ValueError("grpo with deepspeed ZeRO-3 cannot checkpoint lora_modules_to_save (TRL's reference "
                         "adapter copy is missing from the gathered weights): set lora_modules_to_save: [] "
                         "or use zero2")
    generations = int(cfg["num_generations"])
    batch_size = int(cfg["batch_size"])
    if generations < 2 or batch_size % generations:
        raise ValueError(f"batch_size {batch_size} must be a multiple of num_generations {generations} "
                         "(≥ 2): each prompt's completions are compared within their group")
    model, processor, source = build_model(ctx, cfg, device)
    args = grpo_config(ctx, cfg, batch_size, device)

    def make_trainer() -> Any:
        return AudioGRPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
            reward_funcs=rewards,
            clips=corpus.clips,
        )

    _train(ctx, cfg, corpus, model, processor, source, make_trainer,
           f"grpo on {len(rows)} prompts × {generations} completions, rewards {'+'.join(cfg['rewards'])}")
