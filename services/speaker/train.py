"""Speaker training (the worker runs it; :mod:`dramaturg.services.speaker.recipes` names the recipes).

The loop is the transformers ``Trainer`` with our optimizer and scheduler (``optimizers=``), bridged
to the runner by the shared :class:`~dramaturg.shared.training.hf_bridge.RunContextCallback`:
progress, loss and learning rate, cancel, EER/minDCF on the held-out trials every ``eval_every``
steps and at the end, a checkpoint after each evaluation (``save_pretrained`` of the encoder, what
the service loads, plus the Trainer's own checkpoint under ``trainer_state/`` for resuming after a
crash), and the lowest EER marked best. The speaker's own part of the bridge is the AAM margin
warm-up and the cosine EER threshold written into the encoder's config as the service's decision
threshold. The best checkpoint is published to the model store with its metrics and a PLDA.

torch, transformers and speechbrain are imported inside the functions: ``RECIPES`` is still
importable from here (runs recorded before ``recipes.py`` existed name this module) without them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dramaturg.services.speaker.recipes import (
    MODES,
    OPTIMIZERS,
    RECIPES,  # noqa: F401  (run.json of older runs names train)
    SCHEDULES,
)
from dramaturg.shared.training import RunContext
from dramaturg.shared.training.selection import Monitor, best_checkpoint, publish_checkpoint

if TYPE_CHECKING:
    import torch
    from dramaturg.services.speaker.data import SpeakerCorpus
    from dramaturg.services.speaker.evaluate import VerificationResult
    from dramaturg.services.speaker.heads import SpeakerTrainingModel
    from dramaturg.shared.voice.encoder import SpeakerEncoder
    from torch.utils.data import Dataset
    from transformers import TrainerCallback

log = logging.getLogger(__name__)

EER = Monitor("eer", "min")  # the best checkpoint: the lowest held-out EER


def run_recipe(ctx: RunContext) -> None:
    """Every speaker recipe but ``lr-grid``: ``mode`` picks training or an LR range test."""
    if ctx.config["mode"] == "lr_find":
        run_lr_find(ctx)
    elif ctx.config["mode"] == "train":
        run_training(ctx)
    else:
        raise ValueError(f"mode {ctx.config['mode']!r}: expected one of {', '.join(MODES)}")


# ===================================================================================== the pieces


@dataclass
class Setup:
    """Everything a run builds from its config and dataset."""

    config: dict[str, Any]
    corpus: SpeakerCorpus
    encoder: SpeakerEncoder
    model: SpeakerTrainingModel
    dataset: Dataset
    collator: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]
    num_speakers: int
    extra: dict[str, Any] = field(default_factory=dict)


def encoder_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """SpeakerEncoderConfig fields from a recipe config."""
    fields: dict[str, Any] = {"architecture": cfg["architecture"], **dict(cfg.get("model") or {})}
    if int(cfg["embedding_dim"]) >= 0:
        fields["embedding_dim"] = int(cfg["embedding_dim"])
    if cfg["pooling"]:
        fields["pooling"] = cfg["pooling"]
    if cfg["pretrained"]:
        fields["pretrained_backbone" if cfg["architecture"] == "wav2vec2" else "pretrained_lobe"] = cfg[
            "pretrained"
        ]
    if cfg["architecture"] == "wav2vec2":
        fields["freeze_feature_encoder"] = bool(cfg["freeze_feature_encoder"])
        for key in (
            "layerdrop",
            "hidden_dropout",
            "attention_dropout",
            "activation_dropout",
            "feat_proj_dropout",
            "mask_time_prob",
        ):
            if cfg.get(key) is not None:
                fields[key] = float(cfg[key])
    return fields


def make_encoder(
    cfg: Mapping[str, Any], *, resume_from: Path | None = None, base_model: Path | None = None
) -> SpeakerEncoder:
    """The encoder to train: a checkpoint's (resume), a published model's (fine-tune), or a new one."""
    from dramaturg.shared.voice.encoder import SpeakerEncoder, build_encoder

    if resume_from is not None:  # the Trainer restores the weights; the folder gives the exact config
        return SpeakerEncoder.from_pretrained(str(resume_from))
    if base_model is not None:
        encoder = SpeakerEncoder.from_pretrained(str(base_model))
        log.info("fine-tuning the published model in %s (%s)", base_model, encoder.config.architecture)
        return encoder
    return build_encoder(encoder_config(cfg), reset_weights=bool(cfg["reset_weights"]))


def prepare(
    cfg: Mapping[str, Any],
    dataset_path: Path | None,
    *,
    resume_from: Path | None = None,
    base_model: Path | None = None,
) -> Setup:
    """Corpus, encoder, head, training model and dataset for a recipe config."""
    from dramaturg.services.speaker.data import (
        AugmentConfig,
        PairDataset,
        SpeakerCorpus,
        UtteranceDataset,
        collate_pairs,
        collate_utterances,
    )
    from dramaturg.services.speaker.heads import PAIR_HEADS, SpeakerTrainingModel, build_head
    from transformers import set_seed

    if dataset_path is None:
        raise ValueError("the speaker recipes read a local folder (dataset_uri)")
    if int(cfg["torch_threads"]) > 0:
        import torch

        torch.set_num_threads(int(cfg["torch_threads"]))
    set_seed(int(cfg["seed"]))
    corpus = SpeakerCorpus(dataset_path)
    encoder = make_encoder(cfg, resume_from=resume_from, base_model=base_model)
    augment = AugmentConfig(
        speed_perturb=bool(cfg["speed_perturb"]),
        channel_prob=float(cfg["channel_prob"]),
        noise_prob=float(cfg["noise_prob"]),
        reverb_prob=float(cfg["reverb_prob"]),
    )
    base = UtteranceDataset(
        corpus.train_utterances(),
        corpus.train_speakers,
        crop_seconds=float(cfg["crop_seconds"]),
        min_crop_seconds=None if cfg["min_crop_seconds"] is None else float(cfg["min_crop_seconds"]),
        sample_rate=int(encoder.config.sample_rate),
        augment=augment,
    )
    head = build_head(
        cfg["head"], encoder, base.num_speakers, margin=float(cfg["margin"]), scale=float(cfg["scale"])
    )
    pairs = cfg["head"] in PAIR_HEADS
    return Setup(
        dict(cfg),
        corpus,
        encoder,
        SpeakerTrainingModel(encoder, head),
        PairDataset(base) if pairs else base,
        collate_pairs if pairs else collate_utterances,
        base.num_speakers,
    )


@dataclass
class TriStage:
    """LambdaLR factor: linear warm-up, hold, exponential decay.

    The tri-stage schedule of the wav2vec2 recipes; ``exp_decay`` is its decay alone.
    """

    total_steps: int
    warmup_ratio: float
    hold_ratio: float
    initial_scale: float  # initial_lr / lr
    final_scale: float  # final_lr / lr

    def __call__(self, step: int) -> float:
        warmup = int(self.total_steps * self.warmup_ratio)
        hold = int(self.total_steps * self.hold_ratio)
        decay = max(1, self.total_steps - warmup - hold)
        if step < warmup:
            return self.initial_scale + (1.0 - self.initial_scale) * step / warmup
        if step < warmup + hold:
            return 1.0
        progress = min(1.0, (step - warmup - hold) / decay)
        return math.exp(math.log(max(self.final_scale, 1e-12)) * progress)


def build_optimizer(
    model: torch.nn.Module, cfg: Mapping[str, Any], lr: float | None = None
) -> torch.optim.Optimizer:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    lr = float(cfg["lr"] if lr is None else lr)
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=float(cfg["weight_decay"]))
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg["weight_decay"]))
    raise ValueError(f"optimizer {cfg['optimizer']!r}: expected one of {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The seed's four schedules: torch's OneCycleLR, and LambdaLR for constant / tri-stage / exp-decay."""
    from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

    lr = float(cfg["lr"])
    kind = cfg["schedule"]
    if kind == "constant":
        return LambdaLR(optimizer, lambda _step: 1.0)
    if kind == "one_cycle":
        return OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(2, total_steps), div_factor=float(cfg["div_factor"])
        )
    if kind == "tri_stage":
        return LambdaLR(
            optimizer,
            TriStage(
                total_steps,
                float(cfg["warmup_ratio"]),
                float(cfg["hold_ratio"]),
                float(cfg["initial_lr"]) / lr,
                float(cfg["final_lr"]) / lr,
            ),
        )
    if kind == "exp_decay":
        return LambdaLR(optimizer, TriStage(total_steps, 0.0, 0.0, 1.0, float(cfg["final_lr"]) / lr))
    raise ValueError(f"schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")


def total_steps_for(cfg: Mapping[str, Any], dataset_len: int) -> tuple[int, int]:
    """(batch size, optimisation steps): max_steps, else epochs × full batches per epoch."""
    batch_size = max(1, min(int(cfg["batch_size"]), dataset_len))
    if int(cfg["max_steps"]) > 0:
        return batch_size, int(cfg["max_steps"])
    if int(cfg["epochs"]) > 0:
        return batch_size, int(cfg["epochs"]) * max(1, dataset_len // batch_size)
    raise ValueError("set max_steps or epochs")


def training_arguments(
    cfg: Mapping[str, Any], output_dir: Path, batch_size: int, max_steps: int, log_every: int | None = None
) -> Any:
    from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        logging_steps=max(1, int(cfg["log_every"] if log_every is None else log_every)),
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        dataloader_num_workers=int(cfg["num_workers"]),
        dataloader_drop_last=True,  # batch norm cannot train on a last batch of one
        max_grad_norm=float(cfg["max_grad_norm"]),
        ignore_data_skip=True,  # crops are random anyway: on resume, skipping batches would only decode audio
        remove_unused_columns=False,
        use_cpu=cfg["device"] == "cpu",
        **BRIDGE_ARGUMENTS,  # the bridge decides when to evaluate and save
    )


def make_trainer(
    setup: Setup, args: Any, optimizer: Any, scheduler: Any, callbacks: list[TrainerCallback]
) -> Any:
    from dramaturg.shared.training.hf_bridge import attach
    from transformers import Trainer

    trainer = Trainer(
        model=setup.model,
        args=args,
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )
    return attach(trainer)


def evaluate_setup(setup: Setup) -> tuple[dict[str, float], VerificationResult | None, str]:
    """(metrics, primary result, back-end) on the held-out trials; empty when the corpus has none."""
    from dramaturg.services.speaker.evaluate import evaluate_trials

    if not setup.corpus.trials():
        return {}, None, ""
    cfg = setup.config
    results = evaluate_trials(
        setup.encoder,
        setup.corpus,
        asnorm=bool(cfg["asnorm"]),
        top_k=int(cfg["asnorm_top_k"]),
        max_seconds=float(cfg["eval_max_seconds"]) or None,
    )
    backend = "asnorm" if "asnorm" in results else "cosine"
    primary = results[backend]
    metrics = {"eer": primary.eer, "min_dcf": primary.min_dcf, "threshold": results["cosine"].threshold}
    for result in results.values():
        metrics.update(result.metrics())
    return metrics, primary, backend


# ========================================================================================= training


def _bridge_class() -> type:
    """The speaker's bridge, defined once transformers is imported (keeps this module light)."""
    from dramaturg.services.speaker.heads import AAMSoftmaxHead
    from dramaturg.shared.training.hf_bridge import RunContextCallback

    class SpeakerBridge(RunContextCallback):
        """The shared Trainer bridge, scoring EER on the held-out trials; the checkpoint is the encoder
        with its EER threshold in its config (and ``eval.json``: which back-end scored it).

        ``checkpoints=False`` (LR grid) evaluates at the end only and saves nothing.
        ``step_offset`` shifts reported steps so several short trainings share one run's axis.
        """

        def __init__(
            self,
            ctx: RunContext,
            setup: Setup,
            *,
            checkpoints: bool = True,
            step_offset: int = 0,
            total_override: int | None = None,
            best_eer: float | None = None,
        ) -> None:
            cfg = setup.config
            super().__init__(
                ctx,
                monitor=EER,
                evaluate=self._score,
                eval_every=max(1, int(cfg["eval_every"])),
                write_artifact=self._write,
                checkpoints=checkpoints,
                step_offset=step_offset,
                total_steps=total_override,
                best=best_eer,
            )
            self.setup = setup
            self.backend = ""
            self.described = ""
            self.margin = float(cfg["margin"])
            self.margin_warmup = int(cfg["margin_warmup_steps"])

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            head = self.setup.model.head
            if self.margin_warmup > 0 and isinstance(head, AAMSoftmaxHead):
                head.set_margin(self.margin * min(1.0, state.global_step / self.margin_warmup))

        def _score(self, step: int, epoch: float) -> dict[str, float]:
            metrics, primary, backend = evaluate_setup(self.setup)
            if primary is not None:
                self.backend, self.described = backend, primary.describe()
            return metrics

        def summary(self, step: int, metrics: Mapping[str, float]) -> str:
            return f"step {step}: {self.described}"

        def _write(self, folder: Path, metrics: Mapping[str, float]) -> None:
            encoder = self.setup.encoder
            if "threshold" in metrics:
                encoder.config.threshold = float(metrics["threshold"])
            encoder.save_pretrained(str(folder))
            (folder / "eval.json").write_text(json.dumps({"backend": self.backend, "metrics": dict(metrics)}))

    return SpeakerBridge


def run_training(ctx: RunContext) -> None:
    """Train, evaluate, checkpoint, resume after a crash, publish the best checkpoint."""
    from dramaturg.shared.training.hf_bridge import resume_path

    cfg = ctx.config
    latest = ctx.latest_checkpoint()
    resume_dir = latest[0] if latest is not None else None
    setup = prepare(cfg, ctx.dataset_path, resume_from=resume_dir, base_model=ctx.base_model_path)
    batch_size, max_steps = total_steps_for(cfg, len(setup.dataset))
    scratch = ctx.run_dir / "hf-trainer"
    args = training_arguments(cfg, scratch, batch_size, max_steps)
    setup.model.to(args.device)
    optimizer = build_optimizer(setup.model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    bridge = _bridge_class()(ctx, setup, best_eer=EER.best_of(ctx.checkpoints()))
    trainer = make_trainer(setup, args, optimizer, scheduler, [bridge])
    arch = setup.encoder.config.architecture
    ctx.log(
        f"{arch} encoder ({sum(p.numel() for p in setup.encoder.parameters()):,} parameters), "
        f"{cfg['head']} head over {setup.num_speakers} training speakers, {len(setup.dataset)} items, "
        f"{max_steps} steps of {batch_size} on {args.device}"
    )
    if latest is not None:
        ctx.log(f"resuming from {latest[0].name} (step {latest[1]})")
    elif cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)  # before train() seeds the Trainer: scoring does not shift its RNG
    trainer.train(resume_from_checkpoint=resume_path(resume_dir))
    shutil.rmtree(scratch, ignore_errors=True)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    publish_best(ctx, arch)


def publish_best(ctx: RunContext, architecture: str) -> None:
    """Publish the checkpoint with the lowest EER (the newest when nothing was evaluated), with a PLDA."""
    chosen = best_checkpoint(ctx.checkpoints())
    backend = ""
    eval_file = chosen.path / "eval.json"
    if eval_file.exists():
        backend = json.loads(eval_file.read_text()).get("backend", "")
    if ctx.config.get("plda", True):
        fit_plda(ctx, chosen.path)
    labels = {"eer_backend": backend} if backend else {}
    record = publish_checkpoint(ctx, chosen, architecture=architecture, labels=labels)
    if "eer" in chosen.metrics:
        ctx.log(
            f"published {record.ref}: step {chosen.step}, "
            f"EER {100 * chosen.metrics['eer']:.2f}% ({backend}), "
            f"minDCF {chosen.metrics.get('min_dcf', math.nan):.3f}, "
            f"threshold {chosen.metrics.get('threshold', math.nan):.3f}"
        )


def fit_plda(ctx: RunContext, folder: Path) -> None:
    """Fit a VBx PLDA on the training speakers with the encoder in ``folder``; save it in ``folder/plda``.

    The diarization service's VBx clustering reads it (``plda: embedding``), as pyannote's community-1
    pipeline ships its PLDA next to its embedding model. Skipped, with a warning, when the corpus has
    too few training speakers for one.
    """
    from dramaturg.services.speaker.data import SpeakerCorpus, load_audio
    from dramaturg.shared.voice.encoder import SpeakerEncoder
    from dramaturg.shared.voice.plda import PLDA_DIR, fit_for_encoder

    cfg = ctx.config
    if ctx.dataset_path is None:
        return
    corpus = SpeakerCorpus(ctx.dataset_path)
    per_speaker = int(cfg.get("plda_utterances_per_speaker", 20))
    chosen: dict[str, list[Path]] = {}
    for utt in corpus.train_utterances():
        paths = chosen.setdefault(utt.speaker, [])
        if len(paths) < per_speaker:
            paths.append(utt.path)
    from dramaturg.shared.model_service import pick_device

    encoder = SpeakerEncoder.from_pretrained(str(folder)).to(pick_device(str(cfg["device"]))).eval()
    rate = int(encoder.config.sample_rate)
    max_seconds = float(cfg.get("eval_max_seconds", 30.0))
    waves = [load_audio(p, rate, max_seconds=max_seconds) for paths in chosen.values() for p in paths]
    speakers = [s for s, paths in chosen.items() for _ in paths]
    try:
        plda = fit_for_encoder(encoder, waves, speakers, folder / PLDA_DIR,
                               lda_dimension=int(cfg.get("plda_dimension", 64)), seed=int(cfg["seed"]))
    except ValueError as err:
        ctx.log(f"no PLDA for VBx clustering: {err}", "WARNING")
        return
    ctx.log(f"PLDA for VBx clustering: {plda.dimension} dimensions from {len(chosen)} training speakers "
            f"({len(waves)} utterances and crops of them)")


# ========================================================================================= LR find


@dataclass
class LrFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float


def suggest_lr(
    lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = 5, skip_end: int = 1
) -> float:
    """The LR where the smoothed loss falls fastest against log(LR) (Lightning's and fastai's rule)."""
    import numpy as np

    lrs_a, loss_a = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    end = len(loss_a) - skip_end
    start = min(skip_start, max(0, end - 3))
    if end - start < 3:
        raise ValueError(f"the LR range test recorded {len(loss_a)} points; too few to suggest an LR")
    slope = np.gradient(loss_a[start:end], np.log(lrs_a[start:end]))
    return float(lrs_a[start + int(np.nanargmin(slope))])


def lr_range_test(
    setup: Setup,
    output_dir: Path,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    ctx: RunContext | None = None,
) -> LrFindResult:
    """Exponential LR sweep from ``min_lr`` to ``max_lr`` over ``steps`` Trainer steps.

    The loss is smoothed with a bias-corrected moving average; the sweep stops early once the
    smoothed loss exceeds ``diverge`` × its minimum. The model is left trained by the sweep:
    rebuild it before real training.
    """
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import TrainerCallback

    cfg = {**setup.config, "max_steps": steps}
    batch_size, _ = total_steps_for(cfg, len(setup.dataset))
    args = training_arguments(cfg, output_dir, batch_size, steps, log_every=1)
    setup.model.to(args.device)
    optimizer = build_optimizer(setup.model, cfg, lr=min_lr)
    ratio = max_lr / min_lr
    scheduler = LambdaLR(optimizer, lambda step: ratio ** (step / max(1, steps - 1)))
    result = LrFindResult([], [], [], math.nan)

    class Recorder(TrainerCallback):
        average = 0.0

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return
            loss, lr = float(logs["loss"]), float(logs["learning_rate"])
            self.average = beta * self.average + (1 - beta) * loss
            smooth = self.average / (1 - beta ** (len(result.losses) + 1))
            result.lrs.append(lr)
            result.losses.append(loss)
            result.smoothed.append(smooth)
            if ctx is not None:
                ctx.report(state.global_step, steps)
                ctx.log_metrics(
                    state.global_step,
                    0.0,
                    {"lr_find/loss": loss, "lr_find/smoothed": smooth, "lr_find/lr": lr},
                )
            best = min(result.smoothed)
            if not math.isfinite(smooth) or (len(result.smoothed) > 5 and smooth > diverge * best):
                control.should_training_stop = True
            if ctx is not None and ctx.cancelled():
                control.should_training_stop = True

    trainer = make_trainer(setup, args, optimizer, scheduler, [Recorder()])
    trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    result.suggestion = suggest_lr(result.lrs, result.smoothed)
    return result


def run_lr_find(ctx: RunContext) -> None:
    cfg = ctx.config
    setup = prepare(cfg, ctx.dataset_path, base_model=ctx.base_model_path)
    result = lr_range_test(
        setup,
        ctx.run_dir / "hf-trainer",
        min_lr=float(cfg["lr_find_min"]),
        max_lr=float(cfg["lr_find_max"]),
        steps=int(cfg["lr_find_steps"]),
        ctx=ctx,
    )
    if ctx.cancelled():
        return
    with open(ctx.run_dir / "lr_find.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.lrs, result.losses, result.smoothed, strict=True))
    ctx.log_metrics(len(result.lrs), 0.0, {"lr_find/suggested_lr": result.suggestion})
    ctx.log(
        f"LR range test: suggested lr {result.suggestion:.2e} (steepest descent of the smoothed loss over "
        f"{len(result.lrs)} steps); curve in {ctx.run_dir / 'lr_find.csv'}"
    )


# ========================================================================================== LR grid

GRID_COLUMNS = ("lr", "steps", "final_loss", "eer", "min_dcf", "eer_backend")


def run_lr_grid(ctx: RunContext) -> None:
    """One short training per LR (fresh model, same seed); rows survive a crash (the CSV is the state)."""
    cfg = ctx.config
    lrs = [float(x) for x in cfg["lrs"]]
    steps = int(cfg["grid_steps"])
    table_csv = ctx.run_dir / "lr_grid.csv"
    rows: list[dict[str, str]] = []
    if table_csv.exists():
        with open(table_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    done = {float(r["lr"]) for r in rows}
    bridge_cls = _bridge_class()
    for index, lr in enumerate(lrs):
        if lr in done:
            continue
        if ctx.cancelled():
            return
        run_cfg = {**cfg, "lr": lr, "max_steps": steps, "epochs": 0}
        setup = prepare(run_cfg, ctx.dataset_path, base_model=ctx.base_model_path)
        batch_size, _ = total_steps_for(run_cfg, len(setup.dataset))
        args = training_arguments(run_cfg, ctx.run_dir / "hf-trainer", batch_size, steps)
        setup.model.to(args.device)
        optimizer = build_optimizer(setup.model, run_cfg)
        bridge = bridge_cls(
            ctx, setup, checkpoints=False, step_offset=index * steps, total_override=len(lrs) * steps
        )
        make_trainer(setup, args, optimizer, build_scheduler(optimizer, run_cfg, steps), [bridge]).train()
        if ctx.cancelled():
            return
        metrics = bridge.last_eval
        rows.append(
            {
                "lr": repr(lr),
                "steps": str(steps),
                "final_loss": f"{bridge.last_loss:.4f}",
                "eer": f"{metrics.get('eer', math.nan):.4f}",
                "min_dcf": f"{metrics.get('min_dcf', math.nan):.4f}",
                "eer_backend": bridge.backend,
            }
        )
        write_grid_tables(ctx.run_dir, rows)
        ctx.log_metrics(
            index,
            0.0,
            {
                "lr_grid/lr": lr,
                "lr_grid/eer": metrics.get("eer", math.nan),
                "lr_grid/final_loss": bridge.last_loss,
            },
        )
        ctx.log(
            f"lr {lr:g}: EER {100 * metrics.get('eer', math.nan):.2f}% ({bridge.backend}), "
            f"final loss {bridge.last_loss:.4f}"
        )
    shutil.rmtree(ctx.run_dir / "hf-trainer", ignore_errors=True)
    scored = [r for r in rows if math.isfinite(float(r["eer"]))]
    if scored:
        best = min(scored, key=lambda r: float(r["eer"]))
        ctx.log(
            f"best lr {float(best['lr']):g}: EER {100 * float(best['eer']):.2f}% ({best['eer_backend']}); "
            f"table in {ctx.run_dir / 'lr_grid.md'}"
        )


def write_grid_tables(run_dir: Path, rows: Sequence[Mapping[str, str]]) -> None:
    """lr_grid.csv (machine-readable, also the resume state) and lr_grid.md (for a README)."""
    tmp = run_dir / ".lr_grid.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GRID_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(run_dir / "lr_grid.csv")
    lines = ["| lr | steps | final train loss | EER (%) | minDCF | back-end |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: float(r["lr"])):
        eer = float(r["eer"])
        lines.append(
            f"| {float(r['lr']):g} | {r['steps']} | {r['final_loss']} | "
            f"{100 * eer:.2f} | {r['min_dcf']} | {r['eer_backend'] or '-'} |"
        )
    (run_dir / "lr_grid.md").write_text("\n".join(lines) + "\n")
