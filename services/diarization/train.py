"""Diarization training (the worker runs it; :mod:`dramaturg.services.diarization.recipes` names the recipes).

The two steps of pyannote.audio's fine-tuning guide (its segmentation fine-tuning and
pipeline-optimisation tutorials), one run:

1. ``segmentation`` — train (or fine-tune) the segmentation model with pyannote's
   ``SpeakerDiarization`` task and a Lightning ``Trainer``; optimiser menu adam / adamw / radam /
   lookahead-radam / radam-cosine; optional ``freeze_up_to`` / ``unfreeze_at_epoch`` (pyannote's
   ``Model.freeze_up_to`` / ``unfreeze_up_to``). The shared Lightning bridge
   (:class:`~dramaturg.shared.training.lightning_bridge.LightningBridge`) connects it to the
   runner: progress, cancel, per-epoch validation metrics, a checkpoint after every epoch (a
   loadable pipeline artifact with the initial params, plus Lightning's own checkpoint under
   ``trainer_state/`` to resume with ``ckpt_path``), the lowest chunk-level DER marked best. Its
   diarization part writes the guide's table (``epochs.csv`` and ``epochs.png`` in the run folder),
   freezes layers and keeps the run's stage in ``trainer_state/state.json``.
2. Then the pipeline's hyper-parameters (``segmentation.min_duration_off``, the clustering's
   ``threshold`` / ``method`` / ``min_cluster_size``) are tuned on the development set with
   ``pyannote.pipeline.Optimizer`` (its trials persist in an Optuna journal in the run folder, so a
   killed run continues where it was), DER is measured before/after on dev and on test, and the
   tuned pipeline is published as ONE model-store artifact (``model.save_artifact``).

``pipeline`` runs step 2 alone over an existing segmentation (``base_model``: a published
diarization artifact, or ``pretrained``: a pyannote checkpoint).

What pyannote 4's task logs per epoch: ``loss/train``, ``loss/val`` and the validation metrics
``DiarizationErrorRate`` with ``/Confusion``, ``/FalseAlarm``, ``/Miss`` (plus ``/Precision``,
``/Recall``, ``/DetectionErrorRate``) — a chunk-level DER of the segmentation alone, not the
pipeline's. The guide's ``loss/val/segmentation`` and ``loss/val/vad`` came from pyannote 2's
multi-task (segmentation + VAD) loss and its ``/Threshold`` from a threshold sweep over soft
multi-label scores; pyannote 4 trains one powerset loss with hard decisions, so those three
columns have nothing to report and are not invented here.

torch, lightning and pyannote are imported inside the functions: ``RECIPES`` is still importable
from here (runs recorded before ``recipes.py`` existed name this module) without them.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dramaturg.services.diarization.recipes import (
    OPTIMIZERS,
    RECIPES,  # noqa: F401  (run.json of older runs names train)
)
from dramaturg.shared.training import TRAINER_STATE_DIR, RunContext
from dramaturg.shared.training.selection import Monitor, best_checkpoint

if TYPE_CHECKING:
    import lightning
    from dramaturg.services.diarization.evaluate import DERResult
    from dramaturg.services.diarization.model import DiarizationPipeline, EmbeddingChoice
    from pyannote.audio import Model
    from pyannote.audio.tasks import SpeakerDiarization as SpeakerDiarizationTask
    from pyannote.database.protocol import SpeakerDiarizationProtocol

log = logging.getLogger(__name__)

EPOCHS_CSV = "epochs.csv"
EPOCHS_PNG = "epochs.png"
TRIALS_CSV = "trials.csv"
DER_JSON = "der.json"
JOURNAL = "pipeline-optimization.journal"
STATE_FILE = "state.json"
# The guide's per-epoch table, in its order; pyannote 4 fills the ones it computes (module docstring).
GUIDE_COLUMNS = ("loss/train", "loss/val/segmentation", "loss/val/vad", "loss/val", "DiarizationErrorRate",
                 "DiarizationErrorRate/Confusion", "DiarizationErrorRate/FalseAlarm",
                 "DiarizationErrorRate/Miss", "DiarizationErrorRate/Threshold")
# The task's val_monitor: the best checkpoint is the lowest one; on ties the later epoch, which has
# seen more data.
MONITOR = Monitor("DiarizationErrorRate", "min", ties_to_newer=True)
EPOCH_PREFIXES = ("loss/", "DiarizationErrorRate")  # what an epoch's row keeps of the logged values


# ============================================================================================ setup


def _quiet_libraries() -> None:
    """Lightning's, pyannote's and Optuna's chatter that says nothing about this run."""
    from dramaturg.shared.training.lightning_bridge import quiet_lightning

    quiet_lightning()
    for pattern in (".*isinstance\\(treespec, LeafSpec\\).*", ".*Ignoring unexpected keyword.*",
                    ".*suggest_(uniform|loguniform|int).*"):
        warnings.filterwarnings("ignore", message=pattern)


def _system(cfg: Mapping[str, Any]) -> None:
    """Seed everything (Lightning also exports the seed pyannote's chunk sampler reads) and set threads."""
    import lightning
    import torch

    lightning.seed_everything(int(cfg["seed"]), workers=True, verbose=False)
    if int(cfg.get("num_threads") or 0) > 0:
        torch.set_num_threads(int(cfg["num_threads"]))


def device_of(cfg: Mapping[str, Any]) -> str:
    """The config's ``device`` by the platform's one rule (``shared.model_service.pick_device``)."""
    from dramaturg.shared.model_service import pick_device

    return pick_device(str(cfg.get("device") or "auto"))


def open_protocol(ctx: RunContext) -> SpeakerDiarizationProtocol:
    from dramaturg.services.diarization.evaluate import find_database_yml, load_protocol

    if ctx.dataset_path is None:
        raise ValueError("the diarization recipes read a local dataset (a folder or a database.yml)")
    yml = find_database_yml(ctx.dataset_path, str(ctx.config["database_yml"]))
    ctx.log(f"protocol {ctx.config['protocol']} from {yml}")
    return load_protocol(yml, str(ctx.config["protocol"]))


def initial_params(cfg: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where tuning starts: the clustering's defaults (or a base artifact's params, when it clusters the
    same way) with ``initial_params`` on top."""
    from dramaturg.services.diarization.model import default_params

    start = default_params(str(cfg.get("clustering") or "AgglomerativeClustering"))
    if base and set(base.get("clustering") or {}) == set(start["clustering"]):
        start = copy.deepcopy(dict(base))
    return _deep_merge(start, cfg.get("initial_params") or {})


def _deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def make_task(protocol: SpeakerDiarizationProtocol, cfg: Mapping[str, Any],
              cache: Path) -> SpeakerDiarizationTask:
    """pyannote's ``SpeakerDiarization`` task; ``cache`` holds its prepared metadata (rebuilt per attempt)."""
    from pyannote.audio.tasks import SpeakerDiarization as SpeakerDiarizationTask

    cache.unlink(missing_ok=True)  # a killed attempt may have left half a file; prepare_data would trust it
    return SpeakerDiarizationTask(protocol, cache=str(cache), duration=float(cfg["duration"]),
                                  max_speakers_per_chunk=int(cfg["max_speakers_per_chunk"]),
                                  max_speakers_per_frame=int(cfg["max_speakers_per_frame"]),
                                  batch_size=int(cfg["batch_size"]), num_workers=int(cfg["num_workers"]))


def set_optimizer(model: Model, cfg: Mapping[str, Any]) -> None:
    """Replace the model's ``configure_optimizers`` with the configured choice
    (the optimiser menu of pyannote.audio's fine-tuning tutorial).

    All parameters go to the optimiser, frozen ones included: they have no gradient while frozen
    and start moving once ``unfreeze_at_epoch`` releases them. ``radam-cosine`` anneals per step
    over the whole run (the guide's ``CosineAnnealingLR(T_max=epochs)`` at step resolution, which
    also resumes exactly). ``lookahead-radam`` needs the ``pytorch-optimizer`` package.
    """
    name = str(cfg["optimizer"])
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "lookahead-radam":
        _lookahead_class()  # fail at the start, not after the first validation

    lr, weight_decay = float(cfg["lr"]), float(cfg["weight_decay"])

    def configure_optimizers(self: Model) -> Any:
        import torch

        params = list(self.parameters())
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        radam = torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay)
        if name == "radam":
            return radam
        if name == "lookahead-radam":
            return _lookahead_class()(radam, k=int(cfg["lookahead_k"]), alpha=float(cfg["lookahead_alpha"]))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(radam, T_max=total)
        return {"optimizer": radam, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model.configure_optimizers = types.MethodType(configure_optimizers, model)


def _lookahead_class() -> type:
    try:
        from pytorch_optimizer import Lookahead
    except ImportError as err:
        raise ValueError("optimizer 'lookahead-radam' needs the pytorch-optimizer package "
                         "(pip install pytorch-optimizer)") from err
    return Lookahead


def make_trainer(cfg: Mapping[str, Any], root: Path, callbacks: Sequence[Any] = (), **overrides: Any
                 ) -> lightning.Trainer:
    """A Lightning Trainer without its own logger, checkpoints or progress bar (the RunContext does those).

    ``inference_mode=False``: under inference mode pyannote's torchmetrics states become inference
    tensors in ``validate()`` and the next ``fit()`` fails updating them; no_grad is what is needed.
    """
    import lightning
    from dramaturg.shared.training.lightning_bridge import BRIDGE_TRAINER_ARGS

    device = device_of(cfg)
    clip = float(cfg.get("gradient_clip", 0.0) or 0.0)
    gpu = device.startswith("cuda")
    kwargs: dict[str, Any] = {
        **BRIDGE_TRAINER_ARGS,
        "max_epochs": int(cfg.get("epochs", 1)),
        "devices": [int(device[5:])] if gpu and ":" in device else 1,
        "accelerator": "gpu" if gpu else "cpu", "inference_mode": False,
        "default_root_dir": str(root), "callbacks": list(callbacks), "gradient_clip_val": clip or None,
        "log_every_n_steps": 1,
    }
    kwargs.update(overrides)
    return lightning.Trainer(**kwargs)


# ==================================================================================== epoch table


def epoch_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of Lightning's ``callback_metrics`` (losses and the task's validation metrics)."""
    from dramaturg.shared.training.lightning_bridge import scalar_metrics

    return scalar_metrics(metrics, EPOCH_PREFIXES)


def write_epoch_table(rows: Sequence[Mapping[str, Any]], folder: Path) -> None:
    """``epochs.csv`` (the guide's columns first, then any other logged value) and ``epochs.png``."""
    keys = sorted({k for row in rows for k in row if k not in ("epoch", "step")})
    columns = ["epoch", "step", *[c for c in GUIDE_COLUMNS if c in keys],
               *[k for k in keys if k not in GUIDE_COLUMNS]]
    tmp = folder / f".{EPOCHS_CSV}.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.5f}" if isinstance(v, float) else v for k, v in row.items()
                             if k in columns})
    tmp.replace(folder / EPOCHS_CSV)
    try:
        plot_epochs(rows, folder / EPOCHS_PNG)
    except Exception as err:  # a plot must never fail a training run
        log.warning("could not draw %s: %s", EPOCHS_PNG, err)


def plot_epochs(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Losses and the validation DER with its components per epoch (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    panels = ((fig.add_subplot(1, 2, 1), ("loss/train", "loss/val"), "loss"),
              (fig.add_subplot(1, 2, 2), ("DiarizationErrorRate", "DiarizationErrorRate/Confusion",
                                          "DiarizationErrorRate/FalseAlarm", "DiarizationErrorRate/Miss"),
               "validation DER (chunk level)"))
    for axis, keys, title in panels:
        for key in keys:
            points = [(row["epoch"], row[key]) for row in rows if key in row]
            label = key.replace("DiarizationErrorRate/", "").replace("DiarizationErrorRate", "DER")
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                          label=label)
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


# ======================================================================================= checkpoints


@dataclass
class RunState:
    """What a checkpoint's ``trainer_state/state.json`` says about where the run is."""

    stage: str = "segmentation"       # "segmentation" | "pipeline"
    epoch: int = 0                    # completed training epochs
    step: int = 0                     # optimiser steps (segmentation) / train steps + trials (pipeline)
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_der: float = math.inf
    start_metrics: dict[str, float] = field(default_factory=dict)
    train_steps: int = 0              # optimiser steps the segmentation stage took
    folder: Path | None = None        # the checkpoint folder it was read from

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.epoch, "step": self.step, "rows": self.rows,
                "best_der": None if math.isinf(self.best_der) else self.best_der,
                "start_metrics": self.start_metrics, "train_steps": self.train_steps}

    @classmethod
    def from_checkpoint(cls, folder: Path) -> RunState:
        data = json.loads((folder / TRAINER_STATE_DIR / STATE_FILE).read_text())
        best = data.get("best_der")
        return cls(stage=str(data.get("stage", "segmentation")), epoch=int(data.get("epoch", 0)),
                   step=int(data.get("step", 0)), rows=list(data.get("rows") or []),
                   best_der=math.inf if best is None else float(best),
                   start_metrics={k: float(v) for k, v in (data.get("start_metrics") or {}).items()},
                   train_steps=int(data.get("train_steps", 0)), folder=folder)


def resume_state(ctx: RunContext) -> RunState | None:
    latest = ctx.latest_checkpoint()
    if latest is None:
        return None
    state = RunState.from_checkpoint(latest[0])
    ctx.log(f"resuming from checkpoint {latest[0].name}: stage {state.stage}, epoch {state.epoch}, "
            f"step {state.step}")
    return state


# ======================================================================================== the bridge


def _bridge_class() -> type:
    """The segmentation's bridge, defined once lightning is imported (keeps this module light)."""
    from dramaturg.shared.training.lightning_bridge import LightningBridge

    class SegmentationBridge(LightningBridge):
        """The shared Lightning bridge, plus the guide's epoch table, layer freezing and the run's state."""

        def __init__(self, ctx: RunContext, state: RunState, write_artifact: Callable[[Path, Model], None],
                     extra_steps: int) -> None:
            best = None if math.isinf(state.best_der) else state.best_der
            super().__init__(ctx, write_artifact, monitor=MONITOR, metrics=epoch_values,
                             extra_steps=extra_steps, best=best)
            self.cfg = ctx.config
            self.state = state

        # ------------------------------------------------------------------------------ freezing
        def on_fit_start(self, trainer: lightning.Trainer, pl_module: Model) -> None:
            self._apply_freeze(pl_module, trainer.current_epoch + 1)

        def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: Model) -> None:
            self._apply_freeze(pl_module, trainer.current_epoch + 1)

        def _apply_freeze(self, model: Model, epoch: int) -> None:
            module = str(self.cfg.get("freeze_up_to") or "")
            if not module:
                return
            unfreeze_at = int(self.cfg.get("unfreeze_at_epoch") or 0)
            if unfreeze_at and epoch >= unfreeze_at:
                if not getattr(model, "_dramaturg_unfrozen", False):
                    model.unfreeze_up_to(module)
                    model._dramaturg_unfrozen = True
                    self.ctx.log(f"epoch {epoch}: unfroze the layers up to {module}")
            elif not getattr(model, "_dramaturg_frozen", False):
                frozen = model.freeze_up_to(module)
                model._dramaturg_frozen = True
                self.ctx.log(f"frozen up to {module}: {', '.join(frozen)}")

        # ------------------------------------------------------------------------ table and state
        def record_epoch(self, epoch: int, step: int, values: Mapping[str, float]) -> None:
            self.state.rows = [r for r in self.state.rows if r["epoch"] != epoch] + [
                {"epoch": epoch, "step": step, **values}]
            write_epoch_table(self.state.rows, self.ctx.run_dir)
            super().record_epoch(epoch, step, values)

        def before_checkpoint(self, epoch: int, step: int, is_best: bool) -> None:
            self.state.best_der = math.inf if self.best is None else self.best
            self.state.epoch, self.state.step, self.state.train_steps = epoch, step, step

        def write_state(self, state_dir: Path) -> None:
            (state_dir / STATE_FILE).write_text(json.dumps(self.state.to_json(), indent=1))

    return SegmentationBridge


# ====================================================================================== recipe runs


def run_segmentation(ctx: RunContext) -> None:
    """Step 1 (train the segmentation) and step 2 (tune, evaluate, publish); resumes where it stopped."""
    _quiet_libraries()
    from dramaturg.services.diarization.model import build_segmentation, load_segmentation

    cfg = ctx.config
    _system(cfg)
    protocol = open_protocol(ctx)
    embedding = _embedding(ctx)
    params0 = initial_params(cfg)
    state = resume_state(ctx) or RunState()
    epochs = int(cfg["epochs"])

    def write_artifact(folder: Path, model: Model) -> None:
        _save_pipeline_artifact(folder, model, params0, embedding, cfg, metrics={})

    segmentation: Model | None = None
    if state.stage == "segmentation" and (state.folder is None or state.epoch < epochs):
        model = build_segmentation({"pretrained": cfg["pretrained"], **dict(cfg["model"])})
        model.task = make_task(protocol, cfg, ctx.run_dir / "task-cache.npz")
        set_optimizer(model, cfg)
        bridge = _bridge_class()(ctx, state, write_artifact, tuning_trials(cfg))
        trainer = make_trainer(cfg, ctx.run_dir / "lightning", [bridge])
        if state.folder is None:  # a fresh run: the starting point first (the table's epoch 0)
            if cfg["validate_first"]:
                trainer.validate(model, verbose=False)
            else:
                model.prepare_data()
                model.setup()
            if cfg["evaluate_start"]:
                state.start_metrics = evaluate_start(ctx, model, embedding, protocol, params0)
            if ctx.cancelled():
                return
            trainer.fit(model)
        else:
            from dramaturg.shared.training.lightning_bridge import lightning_checkpoint

            trainer.fit(model, ckpt_path=str(lightning_checkpoint(state.folder)), weights_only=False)
        if ctx.cancelled():
            ctx.log("segmentation training stopped (cancelled)", "WARNING")
            return
        if epochs == 0:
            segmentation = model.eval()
    else:
        ctx.log(f"segmentation training already done ({state.epoch} epochs)")

    if segmentation is None:
        if state.stage == "pipeline" and state.folder is not None:
            source = state.folder
        else:
            source = best_checkpoint(ctx.checkpoints()).path
        ctx.log(f"pipeline: segmentation from checkpoint {source.name}")
        from dramaturg.services.diarization.model import SEGMENTATION_DIR

        segmentation = load_segmentation(source / SEGMENTATION_DIR)
    tune_and_publish(ctx, segmentation, embedding, protocol, params0, state)


def run_pipeline(ctx: RunContext) -> None:
    """Step 2 alone, over ``base_model`` (a published diarization model) or ``pretrained`` (a checkpoint)."""
    _quiet_libraries()
    from dramaturg.services.diarization.model import (
        SEGMENTATION_DIR,
        EmbeddingChoice,
        load_embedding,
        load_segmentation,
        read_artifact,
    )

    cfg = ctx.config
    _system(cfg)
    protocol = open_protocol(ctx)
    state = resume_state(ctx) or RunState(stage="pipeline")
    base = ctx.base_model_path
    base_spec = read_artifact(base) if base is not None else None
    if state.folder is not None:
        segmentation = load_segmentation(state.folder / SEGMENTATION_DIR)
    elif base is not None:
        segmentation = load_segmentation(base / SEGMENTATION_DIR)
    elif cfg["pretrained"]:
        segmentation = load_segmentation(str(cfg["pretrained"]))
    else:
        raise ValueError("the pipeline recipe needs a segmentation: base_model (a diarization model) "
                         "or pretrained (a pyannote checkpoint)")
    if base is not None and base_spec is not None and cfg["embedding_from_base"]:
        spec = dict(base_spec["embedding"])
        spec["path"] = base / str(spec.get("path") or "embedding") if spec.get("path") else None
        if spec["path"] is None:
            spec.pop("path")
        embedding = EmbeddingChoice(load_embedding(base, base_spec), spec)
        ctx.log(f"embedding from the base model {ctx.base_model} ({spec.get('kind')})")
    else:
        embedding = _embedding(ctx)
    params0 = initial_params(cfg, base_spec["params"] if base_spec else None)
    if not state.start_metrics and cfg["evaluate_start"]:
        state.start_metrics = evaluate_start(ctx, segmentation, embedding, protocol, params0)
    tune_and_publish(ctx, segmentation, embedding, protocol, params0, state)


# ======================================================================================== step 2


def _pipeline_for(segmentation: Model, embedding: EmbeddingChoice, cfg: Mapping[str, Any],
                  params: Mapping[str, Any] | None = None) -> DiarizationPipeline:
    from dramaturg.services.diarization.model import build_pipeline, resolve_plda

    return build_pipeline(
        segmentation, embedding.model, params=params, clustering=str(cfg["clustering"]),
        plda=resolve_plda(str(cfg["plda"] or ""), embedding.spec),
        segmentation_step=float(cfg["segmentation_step"]),
        embedding_exclude_overlap=bool(cfg["embedding_exclude_overlap"]),
        offset_at_last_frame=bool(cfg["offset_at_last_frame"]),
        segmentation_batch_size=int(cfg["segmentation_batch_size"]),
        embedding_batch_size=int(cfg["embedding_batch_size"]), device=device_of(cfg))


def _embedding(ctx: RunContext) -> EmbeddingChoice:
    from dramaturg.services.diarization.model import resolve_embedding

    home = ctx.store.root if ctx.store else None
    return resolve_embedding(ctx.config["embedding"], home, seed=int(ctx.config["seed"]))


def _save_pipeline_artifact(folder: Path, segmentation: Model, params: Mapping[str, Any],
                            embedding: EmbeddingChoice, cfg: Mapping[str, Any],
                            metrics: Mapping[str, float]) -> None:
    from dramaturg.services.diarization.model import save_artifact

    save_artifact(folder, segmentation, params=params, embedding=embedding.spec, metrics=metrics,
                  clustering=str(cfg["clustering"]), plda=str(cfg["plda"]) or None,
                  segmentation_step=float(cfg["segmentation_step"]),
                  embedding_exclude_overlap=bool(cfg["embedding_exclude_overlap"]),
                  offset_at_last_frame=bool(cfg["offset_at_last_frame"]))


def evaluate_start(ctx: RunContext, segmentation: Model, embedding: EmbeddingChoice,
                   protocol: SpeakerDiarizationProtocol, params: Mapping[str, Any]) -> dict[str, float]:
    """Test DER of the starting segmentation with the initial params: the "before any training" figure."""
    from dramaturg.services.diarization.evaluate import evaluate_pipeline, subset_files

    pipeline = _pipeline_for(segmentation, embedding, ctx.config, params)
    result = evaluate_pipeline(pipeline, subset_files(protocol, "test"), subset="test")
    ctx.log(f"starting point: {result.describe()}")
    segmentation.train()  # the pipeline's Inference put it in eval mode
    return {"der_test_start": result.der, "der_test_start_confusion": result.confusion,
            "der_test_start_false_alarm": result.false_alarm, "der_test_start_miss": result.miss}


@dataclass
class TuneResult:
    """What tuning the pipeline on dev gave: the params to publish and DER before/after with them."""

    params: dict[str, Any]
    initial: dict[str, Any]
    before: DERResult
    after: DERResult
    trials: int
    best_trial_der: float
    kept_initial: bool
    history: list[dict[str, Any]] = field(default_factory=list)  # completed trials: number, der, params


TrialHook = Callable[[int, float, float, dict[str, Any]], bool]


def tune_pipeline(pipeline: DiarizationPipeline, files: Sequence[Any], *, initial: Mapping[str, Any],
                  iterations: int, sampler: str = "TPESampler", seed: int = 0, journal: Path | None = None,
                  study_name: str = "diarization", freeze: Mapping[str, Any] | None = None,
                  restarts: int = 1, on_trial: TrialHook | None = None) -> TuneResult:
    """Tune the pipeline on ``files`` with ``pyannote.pipeline.Optimizer``; never return worse params.

    ``restarts`` independent studies of ``iterations`` trials each (sampler seeds ``seed``,
    ``seed + 1``…), all warm-started from the initial params; the best trial of all of them wins.
    One TPE study can settle in the wrong basin — the clustering ``method`` is categorical and each
    method has its own threshold scale: one of four seeds over the same networks stopped at dev 18 %
    where the others reached 12 % — and restarts cost only clustering time, as the networks' outputs
    are cached. The initial params are every study's first trial, so the best trial is at most as bad
    as the start by the optimiser's own measure; the result is then re-scored with the reported DER
    and the initial params are kept if the tuned ones are not strictly better. ``journal`` (an Optuna
    journal file) makes the studies durable: a resumed call counts the trials already done and runs
    only the rest. ``on_trial(done, trial_der, best_der, best_params)`` is called after each trial
    (``done`` counts over all studies) and stops the tuning when it returns False. Files keep
    pyannote's per-file cache (segmentation and embeddings are computed once), so only the first
    trial runs the networks.
    """
    import optuna
    from dramaturg.services.diarization.evaluate import evaluate_pipeline
    from dramaturg.services.diarization.model import pipeline_params
    from pyannote.pipeline import Optimizer

    if restarts < 1:
        raise ValueError(f"optimize_restarts {restarts}: expected at least 1")
    if freeze:
        pipeline.freeze(dict(freeze))
    initial = _deep_merge(copy.deepcopy(dict(initial)), freeze or {})
    pipeline.instantiate(copy.deepcopy(initial))
    before = evaluate_pipeline(pipeline, files, subset="development", reuse_cache=True)
    frozen = set(_flatten(pipeline.parameters(frozen=True)))
    warm = {k: v for k, v in _flatten(initial).items() if k not in frozen}

    def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    # study 0 keeps the plain name, so journals written before restarts existed resume as they are
    optimizers = [Optimizer(pipeline, db=journal, study_name=(f"{study_name}-{r}" if r else study_name)
                            if journal else None, sampler=sampler, seed=seed + r) for r in range(restarts)]
    best: tuple[float, dict[str, Any]] = (math.inf, {})

    def consider(optimizer: Optimizer) -> None:
        nonlocal best
        if completed(optimizer.study_) and float(optimizer.best_loss) < best[0]:
            best = (float(optimizer.best_loss), dict(optimizer.best_params))

    done = sum(len(completed(o.study_)) for o in optimizers)
    for optimizer in optimizers:
        consider(optimizer)
    legacy = pipeline.legacy
    pipeline.legacy = True  # the Optimizer scores the output as an Annotation, not pyannote 4's DiarizeOutput
    stopped = False
    try:
        for optimizer in optimizers:
            for _ in range(len(completed(optimizer.study_)), int(iterations)):
                first = not optimizer.study_.trials
                optimizer.tune(files, n_iterations=1, warm_start=_unflatten(warm) if first else None,
                               show_progress=False)
                last = optimizer.study_.trials[-1]
                value = float(last.value) if last.value is not None else math.nan
                done += 1
                consider(optimizer)
                if on_trial is not None and not on_trial(done, value, best[0], dict(best[1])):
                    stopped = True
                    break
            if stopped:
                break
    finally:
        pipeline.legacy = legacy
    trials = [t for o in optimizers for t in completed(o.study_)]
    tuned = _deep_merge(copy.deepcopy(initial), best[1]) if trials else copy.deepcopy(initial)
    pipeline.instantiate(copy.deepcopy(tuned))
    after = evaluate_pipeline(pipeline, files, subset="development", reuse_cache=True)
    kept = after.der >= before.der and tuned != initial
    if kept:
        pipeline.instantiate(copy.deepcopy(initial))
        after = before
    history = [{"study": r, "trial": t.number, "der": float(t.value), **t.params}
               for r, o in enumerate(optimizers) for t in completed(o.study_)]
    return TuneResult(params=pipeline_params(pipeline), initial=initial, before=before, after=after,
                      trials=len(trials), best_trial_der=best[0], kept_initial=kept, history=history)


def tuning_trials(cfg: Mapping[str, Any]) -> int:
    """Trials the pipeline tuning runs in all (for progress totals)."""
    return int(cfg["optimize_iterations"]) * max(1, int(cfg["optimize_restarts"]))


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"clustering": {"threshold": x}}`` → ``{"clustering>threshold": x}`` (pyannote.pipeline's naming)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}>{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split(">")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def tune_and_publish(ctx: RunContext, segmentation: Model, embedding: EmbeddingChoice,
                     protocol: SpeakerDiarizationProtocol, params0: Mapping[str, Any],
                     state: RunState) -> None:
    """Step 2: tune on dev (durable trials, checkpoints of the best pipeline so far), DER on test, publish."""
    from dramaturg.services.diarization.evaluate import evaluate_pipeline, subset_files

    cfg = ctx.config
    iterations, restarts = int(cfg["optimize_iterations"]), int(cfg["optimize_restarts"])
    planned = tuning_trials(cfg)
    offset = state.train_steps
    total = offset + planned
    every = max(1, int(cfg["checkpoint_every"]))
    state.stage = "pipeline"
    pipeline = _pipeline_for(segmentation, embedding, cfg)
    dev = subset_files(protocol, "development")
    studies = f"{restarts} studies x {iterations} trials" if restarts > 1 else f"{iterations} trials"
    ctx.log(f"tuning {cfg['clustering']} + segmentation params on {len(dev)} dev files ({studies})")

    def on_trial(done: int, value: float, best: float, best_params: dict[str, Any]) -> bool:
        ctx.report(offset + done, total, float(state.epoch))
        ctx.log_metrics(offset + done, float(state.epoch),
                        {"pipeline/der_dev_trial": value, "pipeline/der_dev_best": best})
        if done % every == 0 and done < planned:
            state.step = offset + done
            params = _deep_merge(copy.deepcopy(dict(params0)), best_params)

            def write(folder: Path) -> None:
                _save_pipeline_artifact(folder, segmentation, params, embedding, cfg,
                                        {"der_dev_best_trial": best})
                (folder / TRAINER_STATE_DIR).mkdir(parents=True, exist_ok=True)
                (folder / TRAINER_STATE_DIR / STATE_FILE).write_text(json.dumps(state.to_json(), indent=1))

            ctx.save_checkpoint(write, offset + done, float(state.epoch), {"pipeline/der_dev_best": best})
        return not ctx.cancelled()

    result = tune_pipeline(pipeline, dev, initial=params0, iterations=iterations,
                           sampler=str(cfg["optimize_sampler"]), seed=int(cfg["seed"]),
                           journal=ctx.run_dir / JOURNAL, study_name="diarization",
                           freeze=cfg["freeze_params"] or None, restarts=restarts, on_trial=on_trial)
    if ctx.cancelled():
        ctx.log(f"pipeline tuning stopped after {result.trials} trials (cancelled)", "WARNING")
        return
    _write_trials(result.history, ctx.run_dir / TRIALS_CSV)
    ctx.log(f"dev before tuning: {result.before.describe()}")
    ctx.log(f"dev after {result.trials} trials: {result.after.describe()}"
            + (" (tuned params were not better: kept the initial ones)" if result.kept_initial else ""))
    test = evaluate_pipeline(pipeline, subset_files(protocol, "test"), subset="test")
    ctx.log(f"test: {test.describe()}")
    metrics = {
        "der_dev_before": result.before.der, "der_dev_after": result.after.der, "der_test": test.der,
        "der_test_confusion": test.confusion, "der_test_false_alarm": test.false_alarm,
        "der_test_miss": test.miss,
        "collar": 0.0, "pipeline_trials": float(result.trials), **state.start_metrics,
    }
    ctx.log_metrics(total, float(state.epoch), metrics)
    (ctx.run_dir / DER_JSON).write_text(json.dumps({
        "development_before": result.before.to_dict(), "development_after": result.after.to_dict(),
        "test": test.to_dict(), "params": result.params, "initial_params": result.initial,
        "trials": result.trials, "kept_initial": result.kept_initial, "start": state.start_metrics,
    }, indent=1))
    ctx.report(total, total, float(state.epoch))

    def publish(folder: Path) -> None:
        _save_pipeline_artifact(folder, segmentation, result.params, embedding, cfg, metrics)

    record = ctx.publish(publish, metrics)
    ctx.log(f"published {record.ref}: DER dev {100 * result.before.der:.2f}% -> "
            f"{100 * result.after.der:.2f}%, test {100 * test.der:.2f}% (collar 0, overlap scored, UEM)")


def _write_trials(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """trials.csv: every completed tuning trial (study, trial number) with its dev DER and params."""
    keys = sorted({k for row in history for k in row if k not in ("study", "trial", "der")})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study", "trial", "der_dev", *keys])
        for row in history:
            writer.writerow([row.get("study", 0), row["trial"], f"{row['der']:.5f}",
                             *[row.get(k, "") for k in keys]])
