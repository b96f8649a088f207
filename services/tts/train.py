"""TTS LM training (recipes ``full``, ``lora`` and their presets) and ``merge``; the worker runs these.

A run: the data stages of :mod:`.prepare` (scan → normalise → extract → shards), optionally the codec
stage of :mod:`.codec_train` (``codec: train``), then the text → codes model under
``transformers.Trainer`` with the shared bridge (:class:`.bridge.StageBridge`): progress, loss, learning
rate, cancel, the held-out loss every ``eval_every`` steps and at the end, a checkpoint after each
(the model as the service loads it plus the Trainer's state for resume), and the chosen checkpoint
published.

**Training from codes.** Batches are built from the packed shards by :class:`.collate.CsmCodesCollator`
and fed to CSM as ``inputs_embeds`` + ``(batch, sequence, codebooks)`` labels (:func:`.collate.csm_forward`)
— the tensors CSM's own audio path computes after running its codec on every clip, so the codec
never runs during training (see :mod:`.collate`). The codec inside the model stays frozen.

**What is trained.** ``full``: every parameter but the codec's (backbone, depth decoder, text and
codebook embeddings, heads). ``lora``: peft LoRA adapters on the attention and MLP projections of the
backbone, the depth decoder or both (``lora_targets``), nothing else; the checkpoint and the published
model are the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, which
``PeftModel.load_adapter`` hot-swaps) with ``adapter_meta.json``: the base model's ref, the speaker
(for per-speaker adapters) and its CSM speaker id.

**Speakers.** CSM's prompt names a speaker by number (``[3]text``). The model's ``speakers.json`` maps
the dataset's speaker folders to those numbers (sorted; a base model's own map is kept and extended),
and is saved with every model and adapter.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.store import atomic_write_json
from dramaturg.shared.training import RunContext
from dramaturg.shared.training.hf_bridge import attach, resume_path
from transformers import Trainer

from .bridge import (
    HELDOUT,
    StageBridge,
    choose_checkpoint,
    device_of,
    log_checkpoint_table,
    set_threads,
    stage_checkpoints,
    training_arguments,
)
from .codec_train import CODEC_STAGE, train_codec
from .collate import CsmCodesCollator, TtsItem, TtsItems, csm_forward, speaker_ids, split_by_text
from .prepare import load_items, prepare_audio, prepare_shards, speakers_in, split_report
from .recipes import LORA_TARGETS, METHODS, SCHEDULES
from .voices import SPEAKERS_FILE, read_speakers

ADAPTER_META = "adapter_meta.json"
ADAPTERS_STATE = "adapters.json"  # per-speaker runs: the adapters already published (resume skips them)
LM_STAGE, LORA_STAGE = "lm", "lora"
_PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj"


# ========================================================================================= sources


@dataclass(frozen=True)
class Source:
    """Where a model comes from: ``load`` is a folder or hub id for ``from_pretrained``, ``ref`` what the
    metadata names (a model-store ``name:version``, a folder, a hub id)."""

    load: str
    ref: str


def resolve_source(ctx: RunContext, value: str) -> Source | None:
    """A model-store ref of this service, a folder, or (anything else) a hub id; None for ""."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        return Source(str(path.resolve()), str(path.resolve()))
    if ctx.store is not None:
        try:
            record = ctx.store.resolve(ctx.record.service, value)
            return Source(str(record.path), record.ref)
        except ServiceError:
            pass
    return Source(value, value)


def base_source(ctx: RunContext, cfg: Mapping[str, Any]) -> Source | None:
    """The base model: the run's ``base_model`` (StartTraining), else the config's."""
    if ctx.base_model_path is not None:
        return Source(str(ctx.base_model_path), ctx.base_model or str(ctx.base_model_path))
    return resolve_source(ctx, str(cfg.get("base_model") or ""))


def default_base(ctx: RunContext) -> Source | None:
    """The store's default model of this service (what the server speaks with), if it has one."""
    if ctx.store is None:
        return None
    try:
        record = ctx.store.resolve(ctx.record.service, "")
    except ServiceError:
        return None
    return Source(str(record.path), record.ref)


def load_codec(source: Source) -> Any:
    from transformers import MimiModel

    return MimiModel.from_pretrained(source.load)


# ========================================================================================== models


def freeze_codec(model: Any) -> None:
    csm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for param in csm.codec_model.parameters():
        param.requires_grad_(False)


def _codec_layout(config: Any) -> tuple[Any, ...]:
    return tuple(
        getattr(config, key, None)
        for key in (
            "sampling_rate",
            "frame_rate",
            "num_quantizers",
            "codebook_size",
            "codebook_dim",
            "hidden_size",
            "num_filters",
            "upsampling_ratios",
            "num_hidden_layers",
            "num_semantic_quantizers",
        )
    )


def build_model(cfg: Mapping[str, Any], base: Source | None, codec: Any | None) -> tuple[Any, Any]:
    """(model, processor): ``base`` loaded, or the tiny CSM built from scratch (``model:`` sizes) around
    ``codec`` (or its own random codec)."""
    from .model import build_tiny_tts_model, load_tts_model

    if base is not None:
        model, processor = load_tts_model(base.load)
        if codec is not None:
            if _codec_layout(codec.config) != _codec_layout(model.codec_model.config):
                raise ValueError(
                    "codec: the codec's layout differs from the base model's; a base model keeps "
                    "the codec it was trained with"
                )
            model.codec_model.load_state_dict(codec.state_dict())
        return model, processor
    overrides = dict(cfg.get("model") or {})
    if codec is not None:
        overrides["codec_config"] = codec.config
    model, processor = build_tiny_tts_model(seed=int(cfg["seed"]), **overrides)
    if codec is not None:
        model.codec_model.load_state_dict(codec.state_dict())
    return model, processor


def lora_config(cfg: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    parts = {
        "backbone": r"backbone_model",
        "depth_decoder": r"depth_decoder",
        "both": r"backbone_model|depth_decoder",
    }
    target = str(cfg["lora_targets"])
    if target not in parts:
        raise ValueError(f"lora_targets {target!r}: expected one of {', '.join(LORA_TARGETS)}")
    return LoraConfig(
        r=int(cfg["lora_r"]),
        lora_alpha=int(cfg["lora_alpha"]),
        lora_dropout=float(cfg["lora_dropout"]),
        target_modules=rf".*({parts[target]})\..*\.{_PROJECTIONS}",
        bias="none",
    )


def with_lora(model: Any, cfg: Mapping[str, Any]) -> Any:
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))
        peft_model = get_peft_model(model, lora_config(cfg))
    freeze_codec(peft_model)
    return peft_model


def checkpoint_activations(csm: Any) -> None:
    """Activation checkpointing for CSM, set up here rather than by the Trainer.

    transformers (and peft) enable checkpointing with forward hooks that make every input embedding's
    output require grad; CSM's depth decoder then writes the backbone state into its embedding output
    in place (``inputs_embeds[:, 0] = ...``), which autograd refuses for such a tensor. Non-reentrant
    checkpointing needs no input that requires grad (and the backbone's inputs are built by
    :func:`.collate.merge_codes` anyway), so the hooks are removed.
    """
    csm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    csm.disable_input_require_grads()


def count_parameters(model: Any) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ===================================================================================== evaluation


@torch.no_grad()
def heldout_loss(
    model: Any, collator: CsmCodesCollator, items: Sequence[TtsItem], batch_size: int
) -> dict[str, float]:
    """CSM's loss on the held-out items (every frame for both heads), weighted by labelled frames."""
    if not items:
        return {}
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    backbone = depth = 0.0
    frames = 0
    dataset = TtsItems(items)
    for start in range(0, len(items), max(1, batch_size)):
        batch = collator([dataset[i] for i in range(start, min(len(items), start + batch_size))])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = csm_forward(model, batch)
        n = int((batch["labels"][:, :, 0] != -100).sum())
        backbone += float(out.backbone_loss) * n
        depth += float(out.depth_decoder_loss) * n
        frames += n
    model.train(was_training)
    b, d = backbone / frames, depth / frames
    return {"loss/val": b + d, "loss/val_backbone": b, "loss/val_depth": d}


class CsmCodesTrainer(Trainer):
    """The Trainer over collated codes: the loss is CSM's own, on the merged embeddings."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        outputs = csm_forward(model, inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


# ========================================================================================= a stage


@dataclass
class StagePlan:
    stage: str
    speaker: str
    step_offset: int
    total_steps: int


def train_stage(
    ctx: RunContext,
    cfg: Mapping[str, Any],
    model: Any,
    processor: Any,
    train_items: Sequence[TtsItem],
    held_items: Sequence[TtsItem],
    plan: StagePlan,
    write_artifact: Any,
) -> None:
    """Train one stage (the LM, or one adapter) through the Trainer bridge; resumes its own checkpoints."""
    csm = model.get_base_model() if hasattr(model, "get_base_model") else model
    collator = CsmCodesCollator(
        processor,
        csm.config,
        depth_decoder_ratio=float(cfg["depth_decoder_ratio"]),
        max_frames=int(cfg["max_frames"]),
    )
    scorer = CsmCodesCollator(processor, csm.config, max_frames=int(cfg["max_frames"]))
    device = device_of(cfg)
    max_steps = int(cfg["max_steps"])
    batch_size = max(1, min(int(cfg["batch_size"]), len(train_items)))
    scratch = ctx.run_dir / "hf-trainer"
    args = training_arguments(
        scratch,
        batch_size=batch_size,
        max_steps=max_steps,
        lr=float(cfg["lr"]),
        schedule=str(cfg["schedule"]),
        warmup=float(cfg["warmup"]),
        weight_decay=float(cfg["weight_decay"]),
        max_grad_norm=float(cfg["max_grad_norm"]),
        log_every=int(cfg["log_every"]),
        seed=int(cfg["seed"]),
        device=device,
        bf16=bool(cfg["bf16"]),
        num_workers=int(cfg["num_workers"]),
    )
    model.to(args.device)
    if cfg["gradient_checkpointing"]:
        checkpoint_activations(csm)

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        return heldout_loss(model, scorer, held_items, int(cfg["eval_batch_size"]))

    bridge = StageBridge(
        ctx,
        stage=plan.stage,
        speaker=plan.speaker,
        evaluate=evaluate if held_items else None,
        eval_every=int(cfg["eval_every"]),
        write_artifact=write_artifact,
        step_offset=plan.step_offset,
        total_steps=plan.total_steps,
    )
    trainer = attach(
        CsmCodesTrainer(model=model, args=args, train_dataset=TtsItems(train_items), data_collator=collator),
        bridge,
    )
    previous = stage_checkpoints(ctx, plan.stage, plan.speaker)
    resume = previous[-1] if previous else None
    trainable, total = count_parameters(model)
    who = f" for {plan.speaker}" if plan.speaker else ""
    ctx.log(
        f"{plan.stage}{who}: {trainable:,} of {total:,} parameters trained, "
        f"{len(train_items)} training clips, "
        f"{len(held_items)} held-out clips, {max_steps} steps of {batch_size} on {args.device}"
    )
    if not held_items:
        ctx.log(
            f"{plan.stage}{who}: no held-out clip, so no held-out loss: the newest checkpoint is published",
            "WARNING",
        )
    if resume is not None:
        ctx.log(f"{plan.stage}{who}: resuming from {resume.checkpoint_id}")
    elif held_items and cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)  # before train() seeds the Trainer: scoring does not shift its RNG
    trainer.train(resume_from_checkpoint=resume_path(resume.path) if resume is not None else None)
    shutil.rmtree(scratch, ignore_errors=True)


# ==================================================================================== the recipes


def _check(cfg: Mapping[str, Any]) -> None:
    if cfg["method"] not in METHODS:
        raise ValueError(f"method {cfg['method']!r}: expected one of {', '.join(METHODS)}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule {cfg['schedule']!r}: expected one of {', '.join(SCHEDULES)}")
    per_speaker = bool(cfg["per_speaker"]) or bool(cfg["speakers"])
    if per_speaker and cfg["method"] != "lora":
        raise ValueError("per_speaker / speakers train one LoRA adapter per voice: use method lora")
    if per_speaker and cfg["merge_after"]:
        raise ValueError("merge_after merges one adapter: not with per_speaker (run merge per adapter)")
    if cfg["codec"] and cfg["method"] == "lora":
        raise ValueError("codec: a LoRA adapter is trained on its base model's own codec (leave codec empty)")


def store_name(ctx: RunContext, suffix: str = "") -> str:
    base = ctx.output_model or ctx.record.recipe
    if not suffix:
        return base
    return f"{base}-{re.sub(r'[^A-Za-z0-9._-]+', '-', suffix)}"[:128]


def run_lm(ctx: RunContext) -> None:
    """Recipes ``full`` and ``lora``: data stages, optional codec stage, the LM or adapter(s), publish."""
    cfg = ctx.config
    _check(cfg)
    set_threads(cfg)
    audio = prepare_audio(ctx, cfg)
    base = base_source(ctx, cfg)
    if cfg["method"] == "lora" and base is None:
        base = default_base(ctx)
        if base is None:
            raise ValueError(
                "lora trains adapters on a base model: set base_model (a tts model ref, a folder, "
                "or a hub id such as sesame/csm-1b), pass one to StartTraining, or publish a default "
                "tts model first"
            )
        ctx.log(f"lora on the service's default model {base.ref} (no base_model given)")
    per_speaker = bool(cfg["per_speaker"]) or bool(cfg["speakers"])
    codec_steps = int(cfg["codec_max_steps"]) if cfg["codec"] == "train" else 0

    codec = None
    if cfg["codec"] == "train":
        total = codec_steps + int(cfg["max_steps"])
        final = train_codec(ctx, cfg, audio, step_offset=0, total_steps=total)
        if ctx.cancelled():
            ctx.log("stopped before the end; nothing published", "WARNING")
            return
        publish_run_codec(ctx, final)
        codec = load_codec(Source(str(final), str(final)))
    elif cfg["codec"]:
        source = resolve_source(ctx, str(cfg["codec"]))
        assert source is not None
        codec = load_codec(source)
        ctx.log(f"codec: {source.ref}")

    model, processor = build_model(cfg, base, codec)
    model.codec_model.to(device_of(cfg))  # extraction runs where training will
    shards = prepare_shards(ctx, cfg, model.codec_model, audio)
    speaker_map = speaker_ids(speakers_in(shards), read_speakers(base.load) if base is not None else {})
    items = load_items(shards, speaker_map)
    train_items, held_items = split_by_text(items, float(cfg["heldout_fraction"]))
    ctx.log(f"split: {split_report(train_items, held_items)}")
    if not train_items:
        raise ValueError("every clip is held out: lower heldout_fraction or add lines")

    if per_speaker:
        run_adapters(ctx, cfg, base, processor, train_items, held_items, speaker_map)
        return
    plan = StagePlan(
        LM_STAGE if cfg["method"] == "full" else LORA_STAGE,
        "",
        codec_steps,
        codec_steps + int(cfg["max_steps"]),
    )
    if cfg["method"] == "full":
        previous = stage_checkpoints(ctx, LM_STAGE)
        if previous:  # the Trainer restores the weights; the folder gives the exact config
            from .model import load_tts_model

            model, processor = load_tts_model(previous[-1].path)
        freeze_codec(model)
        writer = full_writer(model, processor, speaker_map, cfg)
    else:
        model = with_lora(model, cfg)
        assert base is not None
        writer = adapter_writer(model, base, "", None, speaker_map, cfg)
    train_stage(ctx, cfg, model, processor, train_items, held_items, plan, writer)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    kept = stage_checkpoints(ctx, plan.stage)
    chosen = choose_checkpoint(kept, HELDOUT, float(cfg["select_tolerance"]))
    log_checkpoint_table(ctx, kept, chosen, plan.stage)
    if cfg["method"] == "full":
        record = ctx.publish(
            chosen.path, chosen.metrics, architecture="csm", labels=_labels(chosen, kind="model")
        )
        ctx.log(
            f"published {record.ref}: step {chosen.step}, held-out loss "
            f"{chosen.metrics.get('loss/val', math.nan):.4g}"
        )
        return
    assert base is not None
    record = ctx.publish(
        chosen.path,
        chosen.metrics,
        architecture="csm-lora",
        labels=_labels(chosen, kind="lora-adapter", base_model=base.ref),
    )
    ctx.log(
        f"published adapter {record.ref} for base {base.ref}: step {chosen.step}, held-out loss "
        f"{chosen.metrics.get('loss/val', math.nan):.4g}"
    )
    if cfg["merge_after"]:
        merged, merged_processor, gap = merge_adapter(base, chosen.path)
        merged_record = ctx.publish(
            lambda folder: _write_merged(merged, merged_processor, speaker_map, folder),
            {**chosen.metrics, "merge/max_abs_diff": gap},
            name=store_name(ctx, "merged"),
            architecture="csm",
            labels=_labels(chosen, kind="model", adapter=record.ref),
        )
        ctx.log(f"published merged model {merged_record.ref} (max |merged - unmerged| logit {gap:.2e})")


def run_adapters(
    ctx: RunContext,
    cfg: Mapping[str, Any],
    base: Source | None,
    processor: Any,
    train_items: Sequence[TtsItem],
    held_items: Sequence[TtsItem],
    speaker_map: Mapping[str, int],
) -> None:
    """``per_speaker``: one adapter per voice (sorted, on one step axis), each published when done."""
    from .model import load_tts_model

    assert base is not None
    wanted = [str(s) for s in cfg["speakers"]] or sorted({item.speaker for item in train_items})
    unknown = sorted(set(wanted) - set(speaker_map))
    if unknown:
        raise ValueError(
            f"speakers {', '.join(unknown)} are not in the dataset ({', '.join(sorted(speaker_map))})"
        )
    state_path = ctx.run_dir / ADAPTERS_STATE
    published: dict[str, str] = json.loads(state_path.read_text()) if state_path.exists() else {}
    steps = int(cfg["max_steps"])
    for index, speaker in enumerate(wanted):
        if speaker in published:
            ctx.log(f"adapter for {speaker}: already published as {published[speaker]}")
            continue
        if ctx.cancelled():
            return
        own_train = [it for it in train_items if it.speaker == speaker]
        own_held = [it for it in held_items if it.speaker == speaker]
        if not own_train:
            ctx.log(
                f"adapter for {speaker}: no training clip (all its lines are held out); skipped", "WARNING"
            )
            continue
        model, _ = load_tts_model(base.load)
        model = with_lora(model, cfg)
        plan = StagePlan(LORA_STAGE, speaker, index * steps, len(wanted) * steps)
        writer = adapter_writer(model, base, speaker, speaker_map[speaker], speaker_map, cfg)
        train_stage(ctx, cfg, model, processor, own_train, own_held, plan, writer)
        if ctx.cancelled():
            ctx.log("stopped before the end; the adapters published so far stay", "WARNING")
            return
        kept = stage_checkpoints(ctx, LORA_STAGE, speaker)
        chosen = choose_checkpoint(kept, HELDOUT, float(cfg["select_tolerance"]))
        log_checkpoint_table(ctx, kept, chosen, f"adapter for {speaker}")
        record = ctx.publish(
            chosen.path,
            chosen.metrics,
            name=store_name(ctx, speaker),
            architecture="csm-lora",
            labels=_labels(
                chosen,
                kind="lora-adapter",
                base_model=base.ref,
                speaker=speaker,
                speaker_id=str(speaker_map[speaker]),
            ),
        )
        published[speaker] = record.ref
        atomic_write_json(state_path, published)
        ctx.log(
            f"published adapter {record.ref} for {speaker} "
            f"(speaker id {speaker_map[speaker]}, base {base.ref}): "
            f"step {chosen.step}, held-out loss {chosen.metrics.get('loss/val', math.nan):.4g}"
        )
        del model


# ======================================================================================= artifacts


def _labels(chosen: Any, **extra: str) -> dict[str, str]:
    return {"checkpoint_id": chosen.checkpoint_id, "step": str(chosen.step), **extra}


def full_writer(model: Any, processor: Any, speaker_map: Mapping[str, int], cfg: Mapping[str, Any]) -> Any:
    from .model import save_tts_model

    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        save_tts_model(model, processor, folder)
        atomic_write_json(folder / SPEAKERS_FILE, dict(speaker_map))

    return write


def adapter_writer(
    model: Any,
    base: Source,
    speaker: str,
    speaker_id: int | None,
    speaker_map: Mapping[str, int],
    cfg: Mapping[str, Any],
) -> Any:
    meta = {
        "base_model": base.ref,
        "speaker": speaker,
        "speaker_id": speaker_id,
        "lora_r": int(cfg["lora_r"]),
        "lora_alpha": int(cfg["lora_alpha"]),
        "lora_targets": str(cfg["lora_targets"]),
    }

    def write(folder: Path, metrics: Mapping[str, float]) -> None:
        model.save_pretrained(str(folder))
        atomic_write_json(folder / ADAPTER_META, meta)
        atomic_write_json(folder / SPEAKERS_FILE, dict(speaker_map))

    return write


def _write_merged(model: Any, processor: Any, speaker_map: Mapping[str, int], folder: Path) -> None:
    from .model import save_tts_model

    save_tts_model(model, processor, folder)
    if speaker_map:
        atomic_write_json(folder / SPEAKERS_FILE, dict(speaker_map))


def publish_run_codec(ctx: RunContext, final: Path) -> None:
    """Publish the codec a run trained (once: a resumed run finds it published)."""
    marker = ctx.run_dir / "codec" / "published.json"
    if marker.exists():
        return
    done = json.loads((ctx.run_dir / "codec" / "done.json").read_text())
    record = ctx.publish(
        final,
        done["metrics"],
        name=store_name(ctx, "codec"),
        architecture="mimi",
        labels={"kind": "codec", "checkpoint_id": done["checkpoint"], "step": str(done["step"])},
    )
    atomic_write_json(marker, {"ref": record.ref})
    ctx.log(
        f"published codec {record.ref} (step {done['step']}, held-out STFT loss "
        f"{done['metrics'].get('codec/val_stft', math.nan):.4g})"
    )


# ========================================================================================== merge


def probe_batch(processor: Any, config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed input for comparing two models: two prompts with seeded random codes."""
    generator = torch.Generator().manual_seed(seed)
    collator = CsmCodesCollator(processor, config)
    size = int(config.codec_config.codebook_size)
    items = [
        {
            "speaker_id": i,
            "text": text,
            "codes": torch.randint(1, size, (int(config.num_codebooks), frames), generator=generator).numpy(),
        }
        for i, (text, frames) in enumerate((("a probe line to compare.", 12), ("and another one!", 7)))
    ]
    return collator(items)


@torch.no_grad()
def output_gap(a: Any, b: Any, batch: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference of the backbone and depth-decoder logits of two models on ``batch``."""
    out_a, out_b = csm_forward(a, batch), csm_forward(b, batch)
    return max(
        float((out_a.logits - out_b.logits).abs().max()),
        float((out_a.depth_decoder_logits - out_b.depth_decoder_logits).abs().max()),
    )


def merge_adapter(base: Source, adapter: str | Path) -> tuple[Any, Any, float]:
    """(merged model, processor, max |merged − unmerged| logit on a probe)."""
    from peft import PeftModel

    from .model import load_tts_model

    model, processor = load_tts_model(base.load)
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    batch = probe_batch(processor, model.config)
    with torch.no_grad():
        unmerged = csm_forward(peft_model, batch)
        merged = peft_model.merge_and_unload().eval()
        out = csm_forward(merged, batch)
    gap = max(
        float((out.logits - unmerged.logits).abs().max()),
        float((out.depth_decoder_logits - unmerged.depth_decoder_logits).abs().max()),
    )
    return merged, processor, gap


def run_merge(ctx: RunContext) -> None:
    """Recipe ``merge``: base + adapter → one standalone model, published when it equals the unmerged one."""
    cfg = ctx.config
    torch.manual_seed(int(cfg["seed"]))
    adapter = resolve_source(ctx, str(cfg["adapter"]))
    if adapter is None or not Path(adapter.load).is_dir():
        raise ValueError(
            f"adapter {cfg['adapter']!r}: name a published adapter (the lora recipe's output) or a folder"
        )
    meta_path = Path(adapter.load) / ADAPTER_META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    base = base_source(ctx, cfg) or resolve_source(ctx, str(meta.get("base_model") or ""))
    if base is None:
        raise ValueError("merge needs base_model (the adapter names none)")
    if meta.get("base_model") and base.ref != meta["base_model"]:
        ctx.log(f"the adapter was trained on {meta['base_model']}, merging it into {base.ref}", "WARNING")
    merged, processor, gap = merge_adapter(base, adapter.load)
    ctx.log(f"merged {adapter.ref} into {base.ref}: max |merged - unmerged| logit {gap:.2e} on the probe")
    if not gap <= float(cfg["merge_tolerance"]):
        raise ValueError(
            f"the merged model differs from base + adapter by {gap:.3g} (> merge_tolerance "
            f"{cfg['merge_tolerance']}): not published"
        )
    speakers = read_speakers(adapter.load) or read_speakers(base.load)
    labels = {"kind": "model", "adapter": adapter.ref, "base_model": base.ref}
    if meta.get("speaker"):
        labels.update(speaker=str(meta["speaker"]), speaker_id=str(meta.get("speaker_id")))
    record = ctx.publish(
        lambda folder: _write_merged(merged, processor, speakers, folder),
        {"merge/max_abs_diff": gap},
        architecture="csm",
        labels=labels,
    )
    ctx.log(f"published merged model {record.ref}")


__all__ = ["CODEC_STAGE", "run_lm", "run_merge"]
