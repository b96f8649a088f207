"""Speaker training recipes for the shared training runner (``dramaturg.services.speaker.train:RECIPES``).

Recipes (seed 001): ``wav2vec2-ce``, ``wav2vec2-aam``, ``wav2vec2-bce``, ``wav2vec2-ctc``,
``xvector-aam``, ``ecapa-aam``; ``lr-find`` (exponential LR range test) and ``lr-grid`` (short runs
over a list of learning rates); plus one recipe per ``recipes/*.yaml`` file (``cpu-quick``,
``wav2vec2-base-aam``, ``ecapa-voxceleb``), each a base recipe with overrides. Every key of a
recipe's ``defaults`` can be overridden per run, ``head`` included, so any architecture × head
combination that makes sense (ctc reads wav2vec2 frames) can be asked for.

The loop is the transformers ``Trainer`` with our optimizer and scheduler (``optimizers=``). A
``TrainerCallback`` bridges it to the runner's :class:`RunContext`: progress, loss and learning rate
(TensorBoard is written by the context), cancel → ``should_training_stop``, EER/minDCF on the
held-out trials every ``eval_every`` steps and at the end, and a checkpoint after each evaluation:
``save_pretrained`` of the encoder (what the service loads) plus the Trainer's own checkpoint
(optimizer, scheduler, RNG, head) under ``trainer_state/`` for resuming after a crash. The
checkpoint with the lowest EER is published to the model store with its metrics; its config
carries the cosine EER threshold as the service's decision threshold.

torch, transformers and speechbrain are imported inside ``run``: the server imports this module to
list and validate recipes and must stay light.
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

import yaml
from dramaturg.shared.training import RUNNER_KEYS, TRAINER_STATE_DIR, Recipe, RunContext, merge_config

if TYPE_CHECKING:
    import torch
    from dramaturg.services.speaker.data import SpeakerCorpus
    from dramaturg.services.speaker.evaluate import VerificationResult
    from dramaturg.services.speaker.heads import SpeakerTrainingModel
    from dramaturg.shared.voice.encoder import SpeakerEncoder
    from torch.utils.data import Dataset
    from transformers import TrainerCallback

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent / "recipes"
SCHEDULES = ("constant", "one_cycle", "tri_stage", "exp_decay")
OPTIMIZERS = ("adam", "adamw")
MODES = ("train", "lr_find")

# Every speaker recipe understands these keys; the recipes below only change some defaults. The
# defaults are the tiny from-scratch models that train on a CPU in seconds (tests, the embedded
# stack); recipes/*.yaml name the production checkpoints and sizes.
COMMON_DEFAULTS: dict[str, Any] = {
    "mode": "train",  # "train" | "lr_find"
    # --- model
    "architecture": "wav2vec2",  # wav2vec2 | xvector | ecapa
    "pretrained": "",  # wav2vec2: Wav2Vec2Model hub id / path; lobes: speechbrain source
    "model": {},  # more SpeakerEncoderConfig fields (backbone, lobe, n_mels, …)
    "embedding_dim": -1,  # -1: the architecture's default (wav2vec2: the pooled vector)
    "pooling": "",  # "": the architecture's default (wav2vec2: mean+std)
    # --- head
    "head": "aam",  # ce | aam | bce | ctc
    "margin": 0.2,
    "scale": 30.0,
    "margin_warmup_steps": 0,  # linear AAM margin warm-up from 0 (0 = full margin from the start)
    # --- optimisation
    "optimizer": "adam",  # adam | adamw
    "lr": 1e-3,
    "weight_decay": 0.0,
    "schedule": "one_cycle",  # constant | one_cycle | tri_stage | exp_decay
    "div_factor": 25.0,  # one_cycle: start at lr / div_factor
    "warmup_ratio": 0.1,  # tri_stage
    "hold_ratio": 0.4,  # tri_stage (the rest decays exponentially)
    "initial_lr": 5e-6,  # tri_stage warm-up start
    "final_lr": 5e-6,  # tri_stage / exp_decay end
    "max_steps": 60,  # > 0 wins over epochs
    "epochs": 0,
    "batch_size": 8,
    "max_grad_norm": 5.0,
    "crop_seconds": 1.0,
    "min_crop_seconds": None,  # set: each crop's length is drawn in [min_crop_seconds, crop_seconds]
    # --- augmentation
    "speed_perturb": False,
    "channel_prob": 0.0,  # random band limits + EQ (another microphone)
    "noise_prob": 0.0,
    "reverb_prob": 0.0,
    # --- ablations (wav2vec2); null keeps the backbone config's value
    "freeze_feature_encoder": True,
    "reset_weights": False,
    "layerdrop": None,
    "hidden_dropout": None,
    "attention_dropout": None,
    "activation_dropout": None,
    "feat_proj_dropout": None,
    "mask_time_prob": None,
    # --- evaluation
    "eval_every": 20,
    "eval_at_start": True,  # score the untrained model first (step 0)
    "asnorm": False,
    "asnorm_top_k": 100,
    "eval_max_seconds": 30.0,
    # --- PLDA for diarization (VBx clustering): fitted on the training speakers at publish time
    "plda": True,
    "plda_dimension": 64,
    "plda_utterances_per_speaker": 20,  # whole utterances per speaker (+3 short crops of each)
    # --- lr_find
    "lr_find_min": 1e-7,
    "lr_find_max": 1.0,
    "lr_find_steps": 100,
    # --- system
    "log_every": 5,
    "num_workers": 0,
    "device": "auto",  # auto | cpu | cuda
    "torch_threads": 0,  # CPU threads for torch (0: torch's default, one per core)
    "seed": 0,
}
GRID_DEFAULTS: dict[str, Any] = {"lrs": [1e-4, 5e-4, 1e-3, 5e-3], "grid_steps": 30}


# ============================================================================================ recipes


class SpeakerRecipe(Recipe):
    """One preset of :data:`COMMON_DEFAULTS`; ``mode`` picks training or an LR range test."""

    architecture = ""  # the runner records config["architecture"]: recipes may switch it

    def __init__(
        self,
        name: str,
        description: str,
        overrides: Mapping[str, Any] | None = None,
        base: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.description = description
        merged = merge_config(dict(base or COMMON_DEFAULTS), overrides or {}, f"recipe {name}")
        self.defaults = {k: v for k, v in merged.items() if k not in RUNNER_KEYS}  # the runner adds them

    def run(self, ctx: RunContext) -> None:
        if ctx.config["mode"] == "lr_find":
            run_lr_find(ctx)
        elif ctx.config["mode"] == "train":
            run_training(ctx)
        else:
            raise ValueError(f"mode {ctx.config['mode']!r}: expected one of {', '.join(MODES)}")


class LrGridRecipe(SpeakerRecipe):
    """Short trainings over ``lrs`` (seed 001's grid searches); CSV and markdown tables in the run folder."""

    def run(self, ctx: RunContext) -> None:
        run_lr_grid(ctx)


def _yaml_recipes(base: Mapping[str, SpeakerRecipe]) -> dict[str, SpeakerRecipe]:
    """``recipes/NAME.yaml`` → recipe NAME: ``recipe`` (a base recipe) with ``overrides`` applied.

    The same files work with ``dramaturg train speaker --config recipes/NAME.yaml --dataset DIR``.
    """
    found: dict[str, SpeakerRecipe] = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        parent = base.get(str(spec.get("recipe", "")))
        if parent is None:
            raise ValueError(f"{path}: 'recipe' must name one of {', '.join(sorted(base))}")
        kind = LrGridRecipe if isinstance(parent, LrGridRecipe) else SpeakerRecipe
        found[path.stem] = kind(
            path.stem,
            str(spec.get("description") or f"{parent.name} as in {path.name}"),
            spec.get("overrides") or {},
            base=parent.defaults,
        )
    return found


def _base_recipes() -> dict[str, SpeakerRecipe]:
    w2v2 = "tiny from-scratch wav2vec2 (recipes/wav2vec2-base-aam.yaml: facebook/wav2vec2-base)"
    recipes = [
        SpeakerRecipe("wav2vec2-ce", f"{w2v2} + softmax cross-entropy", {"head": "ce"}),
        SpeakerRecipe("wav2vec2-aam", f"{w2v2} + AAM softmax (m=0.2, s=30)", {"head": "aam"}),
        SpeakerRecipe("wav2vec2-bce", f"{w2v2} + pairwise BCE on cosine", {"head": "bce"}),
        SpeakerRecipe("wav2vec2-ctc", f"{w2v2} + frame-level CTC over speaker tokens", {"head": "ctc"}),
        SpeakerRecipe(
            "xvector-aam",
            "speechbrain x-vector on fbank + AAM softmax",
            {"architecture": "xvector", "head": "aam"},
        ),
        SpeakerRecipe(
            "ecapa-aam",
            "speechbrain ECAPA-TDNN on fbank + AAM softmax "
            "(recipes/ecapa-voxceleb.yaml: speechbrain/spkrec-ecapa-voxceleb)",
            {"architecture": "ecapa", "head": "aam"},
        ),
        SpeakerRecipe(
            "lr-find",
            "LR range test: exponential LR sweep, smoothed loss, steepest descent",
            {"mode": "lr_find"},
        ),
        LrGridRecipe(
            "lr-grid",
            "short trainings over a list of learning rates (lrs), EER table",
            dict(GRID_DEFAULTS),
            base={**COMMON_DEFAULTS, **GRID_DEFAULTS},
        ),
    ]
    return {r.name: r for r in recipes}


def load_all_recipes() -> dict[str, SpeakerRecipe]:
    base = _base_recipes()
    return {**base, **_yaml_recipes(base)}


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
    """LambdaLR factor: linear warm-up, hold, exponential decay (seed 001's tri-stage; exp_decay: decay)."""

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
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        logging_strategy="steps",
        logging_steps=max(1, int(cfg["log_every"] if log_every is None else log_every)),
        save_strategy="no",
        eval_strategy="no",  # the callback decides when to evaluate and save
        report_to="none",
        disable_tqdm=True,
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        dataloader_num_workers=int(cfg["num_workers"]),
        dataloader_drop_last=True,  # batch norm cannot train on a last batch of one
        max_grad_norm=float(cfg["max_grad_norm"]),
        ignore_data_skip=True,  # crops are random anyway: on resume, skipping batches would only decode audio
        remove_unused_columns=False,
        use_cpu=cfg["device"] == "cpu",
    )


def make_trainer(
    setup: Setup, args: Any, optimizer: Any, scheduler: Any, callbacks: list[TrainerCallback]
) -> Any:
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    trainer = Trainer(
        model=setup.model,
        args=args,
        train_dataset=setup.dataset,
        data_collator=setup.collator,
        optimizers=(optimizer, scheduler),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the bridge logs them
    return trainer


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
    """The TrainerCallback subclass, defined once transformers is imported (keeps this module light)."""
    from dramaturg.services.speaker.heads import AAMSoftmaxHead
    from transformers import TrainerCallback

    class RunContextBridge(TrainerCallback):
        """Trainer events → RunContext: progress, metrics, cancel, evaluation and checkpoints.

        ``checkpoints=False`` (LR grid, LR find) evaluates at the end only and saves nothing.
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
            best_eer: float = math.inf,
        ) -> None:
            self.ctx = ctx
            self.setup = setup
            self.checkpoints = checkpoints
            self.step_offset = step_offset
            self.total_override = total_override
            self.best_eer = best_eer
            self.pending: dict[str, float] = {}
            self.backend = ""
            self.last_loss = math.nan
            self.last_eval: dict[str, float] = {}
            cfg = setup.config
            self.eval_every = max(1, int(cfg["eval_every"]))
            self.margin = float(cfg["margin"])
            self.margin_warmup = int(cfg["margin_warmup_steps"])

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            head = self.setup.model.head
            if self.margin_warmup > 0 and isinstance(head, AAMSoftmaxHead):
                head.set_margin(self.margin * min(1.0, state.global_step / self.margin_warmup))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            total = self.total_override or state.max_steps
            self.ctx.report(self.step_offset + step, total, state.epoch)
            if self.ctx.cancelled():
                control.should_training_stop = True
                return
            last = step >= state.max_steps
            if last or (self.checkpoints and step % self.eval_every == 0):
                self.pending = self.evaluate(step, state.epoch)
                control.should_save = self.checkpoints

        def evaluate(self, step: int, epoch: float) -> dict[str, float]:
            metrics, primary, backend = evaluate_setup(self.setup)
            if primary is not None:
                self.backend = backend
                self.ctx.log_metrics(self.step_offset + step, epoch, metrics)
                self.ctx.log(f"step {step}: {primary.describe()}")
            self.last_eval = metrics
            return metrics

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            names = {"loss": "loss/train", "learning_rate": "lr", "grad_norm": "grad_norm"}
            values = {tag: float(logs[key]) for key, tag in names.items() if key in logs}
            if "loss" in logs:
                self.last_loss = float(logs["loss"])
            if values:
                self.ctx.log_metrics(self.step_offset + state.global_step, state.epoch or 0.0, values)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.checkpoints:
                return
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            step = state.global_step
            trainer_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            metrics = dict(self.pending)
            self.pending = {}
            eer = metrics.get("eer", math.inf)
            is_best = eer < self.best_eer or (not math.isfinite(self.best_eer) and not metrics)
            encoder = self.setup.encoder
            if "threshold" in metrics:
                encoder.config.threshold = float(metrics["threshold"])

            def write(folder: Path) -> None:
                encoder.save_pretrained(str(folder))
                shutil.copytree(trainer_dir, folder / TRAINER_STATE_DIR)
                (folder / "eval.json").write_text(json.dumps({"backend": self.backend, "metrics": metrics}))

            self.ctx.save_checkpoint(write, step, float(state.epoch or 0.0), metrics, is_best)
            if is_best and math.isfinite(eer):
                self.best_eer = eer
            shutil.rmtree(trainer_dir, ignore_errors=True)

    return RunContextBridge


def run_training(ctx: RunContext) -> None:
    """Train, evaluate, checkpoint, resume after a crash, publish the best checkpoint."""
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
    best = min((c.metrics.get("eer", math.inf) for c in ctx.checkpoints()), default=math.inf)
    bridge = _bridge_class()(ctx, setup, best_eer=best)
    trainer = make_trainer(setup, args, optimizer, scheduler, [bridge])
    arch = setup.encoder.config.architecture
    ctx.log(
        f"{arch} encoder ({sum(p.numel() for p in setup.encoder.parameters()):,} parameters), "
        f"{cfg['head']} head over {setup.num_speakers} training speakers, {len(setup.dataset)} items, "
        f"{max_steps} steps of {batch_size} on {args.device}"
    )
    if resume_dir is not None:
        ctx.log(f"resuming from {resume_dir.name} (step {latest[1]})")
    elif cfg["eval_at_start"]:
        bridge.evaluate(0, 0.0)
    trainer.train(resume_from_checkpoint=str(resume_dir / TRAINER_STATE_DIR) if resume_dir else None)
    shutil.rmtree(scratch, ignore_errors=True)
    if ctx.cancelled():
        ctx.log("stopped before the end; nothing published", "WARNING")
        return
    publish_best(ctx, arch)


def publish_best(ctx: RunContext, architecture: str) -> None:
    """Publish the checkpoint with the lowest EER (the newest when nothing was evaluated)."""
    checkpoints = ctx.checkpoints()
    if not checkpoints:
        raise RuntimeError("training finished without a checkpoint to publish")
    chosen = next((c for c in reversed(checkpoints) if c.best), checkpoints[-1])
    backend = ""
    eval_file = chosen.path / "eval.json"
    if eval_file.exists():
        backend = json.loads(eval_file.read_text()).get("backend", "")
    if ctx.config.get("plda", True):
        fit_plda(ctx, chosen.path)
    labels = {"checkpoint_id": chosen.checkpoint_id, "step": str(chosen.step)}
    if backend:
        labels["eer_backend"] = backend
    record = ctx.publish(chosen.path, chosen.metrics, architecture=architecture, labels=labels)
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


RECIPES: dict[str, Recipe] = dict(load_all_recipes())
