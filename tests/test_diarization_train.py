"""Diarization training: the segmentation task learns, every optimiser runs, the pipeline optimiser
helps and never hurts, a killed run resumes from its checkpoint, and the pipeline recipe publishes.

Everything runs on a tiny synthetic protocol (a few 10-second scenes) with a tiny PyanNet (sincnet
stride 20, 2-second chunks), so the whole module takes about a minute on two cores. The learning
check on a larger corpus (test DER from the untrained start to the published pipeline) is marked
slow.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from dramaturg.services.diarization.evaluate import (
    evaluate_pipeline,
    find_database_yml,
    load_protocol,
    subset_files,
)
from dramaturg.services.diarization.model import (
    DEFAULT_PARAMS,
    DiarizationPipeline,
    SpeakerStoreEmbedding,
    build_pipeline,
    build_segmentation,
    diarize,
    load_pipeline,
    read_artifact,
    save_artifact,
    tiny_speaker_encoder,
)
from dramaturg.services.diarization.recipes import OPTIMIZERS, PRESETS_DIR, RECIPES, SEGMENTATION_DEFAULTS
from dramaturg.services.diarization.train import (
    EPOCHS_CSV,
    EPOCHS_PNG,
    make_task,
    make_trainer,
    set_optimizer,
    tune_pipeline,
)
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import TrainingRunner
from dramaturg.shared.training.recipe import RunContext, merge_config
from dramaturg.shared.training.runs import (
    CHECKPOINTS_DIR,
    EVENTS_FILE,
    QUEUED,
    TENSORBOARD_DIR,
    EventLog,
    RunRecord,
    process_alive,
    save_run,
    transition,
)
from helpers import wait_for

SERVICE = "diarization"
RECIPES_PATH = "dramaturg.services.diarization.recipes:RECIPES"
TINY_MODEL = {"sincnet": {"stride": 20}, "lstm": {"hidden_size": 32, "num_layers": 1, "bidirectional": True},
              "linear": {"hidden_size": 32, "num_layers": 1}}
# The recipe keys of a test-sized run: 2 s chunks, the tiny model, the untrained tiny embedding.
TINY_RUN: dict[str, Any] = {
    "duration": 2.0, "batch_size": 4, "lr": 0.005, "model": TINY_MODEL, "segmentation_step": 0.5,
    "embedding": {"kind": "speaker-store", "ref": "tiny"}, "optimize_iterations": 4, "checkpoint_every": 2,
    "segmentation_batch_size": 8, "embedding_batch_size": 16, "device": "cpu", "num_threads": 1,
}
# Every speaker in one cluster, and pauses under a second filled with speech: clearly bad params.
BAD_PARAMS = {"segmentation": {"min_duration_off": 1.0},
              "clustering": {"method": "centroid", "min_cluster_size": 20, "threshold": 2.0}}



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diarization-corpus")
    synthesize_corpus(out, SynthConfig(num_speakers=4, heldout_speakers=2, scenes_train=3, scenes_dev=1,
                                       scenes_test=1, lines_per_scene=4, utterances_per_speaker=2))
    return out


@pytest.fixture(scope="module")
def protocol(corpus: Path):
    return load_protocol(find_database_yml(corpus))


def _config(**overrides: Any) -> dict[str, Any]:
    return merge_config(SEGMENTATION_DEFAULTS, {**TINY_RUN, **overrides})


@pytest.fixture(scope="module")
def trained(protocol, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny segmentation model trained for a few dozen steps, with its validation loss before and after."""
    cfg = _config(epochs=8)
    lightning.seed_everything(0, verbose=False)
    model = build_segmentation(cfg["model"])
    model.task = make_task(protocol, cfg, tmp_path_factory.mktemp("task") / "cache.npz")
    set_optimizer(model, cfg)
    trainer = make_trainer(cfg, tmp_path_factory.mktemp("lightning"))
    before = trainer.validate(model, verbose=False)[0]
    trainer.fit(model)
    after = trainer.validate(model, verbose=False)[0]
    return {"model": model.eval(), "before": before, "after": after, "steps": trainer.global_step}


def test_training_lowers_the_validation_loss(trained: dict[str, Any]) -> None:
    before, after = trained["before"], trained["after"]
    assert trained["steps"] >= 16
    assert after["loss/val"] < before["loss/val"] - 0.3, (before, after)
    # the task's own validation metrics are there for the epoch table
    assert {"DiarizationErrorRate", "DiarizationErrorRate/Confusion", "DiarizationErrorRate/FalseAlarm",
            "DiarizationErrorRate/Miss"} <= set(after)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains(optimizer: str, protocol, tmp_path: Path) -> None:
    if optimizer == "lookahead-radam":
        pytest.importorskip("pytorch_optimizer", reason="lookahead-radam needs the pytorch-optimizer package")
    cfg = _config(optimizer=optimizer, epochs=1)
    lightning.seed_everything(0, verbose=False)
    model = build_segmentation(cfg["model"])
    model.task = make_task(protocol, cfg, tmp_path / "cache.npz")
    set_optimizer(model, cfg)
    trainer = make_trainer(cfg, tmp_path, limit_train_batches=3, limit_val_batches=0)
    model.prepare_data()
    model.setup()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(model)
    assert trainer.global_step == 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("lstm") for k in changed) and any(k.startswith("classifier") for k in changed)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    (optim,) = trainer.optimizers
    name = type(optim).__name__
    assert name == {"adam": "Adam", "adamw": "AdamW", "radam": "RAdam", "lookahead-radam": "Lookahead",
                    "radam-cosine": "RAdam"}[optimizer]
    if optimizer == "radam-cosine":
        assert optim.param_groups[0]["lr"] < cfg["lr"]  # annealed


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        set_optimizer(build_segmentation(), _config(optimizer="sgd"))


def test_freeze_up_to_then_unfreeze(protocol, tmp_path: Path) -> None:
    """``freeze_up_to`` keeps the layers up to the named one fixed until ``unfreeze_at_epoch``."""
    from types import SimpleNamespace

    from dramaturg.services.diarization.train import RunState, _bridge_class

    cfg = _config(freeze_up_to="lstm", unfreeze_at_epoch=3)
    model = build_segmentation(cfg["model"])
    model.task = make_task(protocol, cfg, tmp_path / "cache.npz")
    model.prepare_data()
    model.setup()
    ctx = SimpleNamespace(config=cfg, log=lambda *args, **kwargs: None)
    bridge = _bridge_class()(ctx, RunState(), lambda folder, model: None, 0)

    def trainable(prefix: str) -> set[bool]:
        return {p.requires_grad for name, p in model.named_parameters() if name.startswith(prefix)}

    bridge.on_fit_start(SimpleNamespace(current_epoch=0), model)
    assert trainable("sincnet") == trainable("lstm") == {False} and trainable("classifier") == {True}
    bridge.on_train_epoch_start(SimpleNamespace(current_epoch=1), model)  # epoch 2: still frozen
    assert trainable("lstm") == {False}
    bridge.on_train_epoch_start(SimpleNamespace(current_epoch=2), model)  # epoch 3: released
    assert trainable("sincnet") == trainable("lstm") == {True}


def test_pipeline_optimizer_helps_and_never_hurts(trained: dict[str, Any], protocol) -> None:
    dev = subset_files(protocol, "development")
    embedding = SpeakerStoreEmbedding(tiny_speaker_encoder(seed=0))
    results = {}
    for name, start in (("bad", BAD_PARAMS), ("default", DEFAULT_PARAMS)):
        pipeline = build_pipeline(trained["model"], embedding, segmentation_step=0.5)
        results[name] = tune_pipeline(pipeline, dev, initial=start, iterations=12, seed=0)
    bad, default = results["bad"], results["default"]
    assert bad.trials == default.trials == 12
    assert bad.before.der > 0.3
    assert bad.after.der < bad.before.der - 0.1, (bad.before.describe(), bad.after.describe())
    assert default.after.der <= default.before.der
    # what tune_pipeline reports is what the tuned pipeline scores, with the reported metric
    pipeline = build_pipeline(trained["model"], embedding, params=bad.params, segmentation_step=0.5)
    again = evaluate_pipeline(pipeline, subset_files(protocol, "development"))
    assert again.der == pytest.approx(bad.after.der)


def _untuned_pipeline(trained: dict[str, Any]) -> DiarizationPipeline:
    """A fresh pipeline over the trained tiny segmentation, as a resumed tuning run builds one."""
    return build_pipeline(trained["model"], SpeakerStoreEmbedding(tiny_speaker_encoder(seed=0)),
                          segmentation_step=0.5)


def _stop_after(last: int, seen: list[int]) -> Callable[..., bool]:
    """An ``on_trial`` hook that records each trial count and stops the tuning after ``last``."""

    def hook(done: int, value: float, best: float, params: dict[str, Any]) -> bool:
        seen.append(done)
        return done < last

    return hook


def test_pipeline_tuning_resumes_from_its_journal(trained: dict[str, Any], protocol, tmp_path: Path) -> None:
    """A killed tuning run keeps its finished trials (Optuna journal): the next one runs only the rest."""
    dev = subset_files(protocol, "development")
    journal = tmp_path / "trials.journal"
    seen: list[int] = []
    first = tune_pipeline(_untuned_pipeline(trained), dev, initial=BAD_PARAMS, iterations=8, journal=journal,
                          on_trial=_stop_after(3, seen))
    assert first.trials == 3 and seen == [1, 2, 3]
    second = tune_pipeline(_untuned_pipeline(trained), dev, initial=BAD_PARAMS, iterations=8, journal=journal,
                           on_trial=_stop_after(99, seen))
    assert second.trials == 8 and seen[3:] == [4, 5, 6, 7, 8]
    assert second.history[:3] == first.history  # the same trials, not redone
    assert second.history[0]["clustering>threshold"] == BAD_PARAMS["clustering"]["threshold"]  # warm start


def test_tuning_restarts_keep_the_best_study_and_resume(trained: dict[str, Any], protocol,
                                                        tmp_path: Path) -> None:
    """``restarts`` studies with their own sampler seeds; the winner is the best trial of any of them."""
    dev = subset_files(protocol, "development")
    journal = tmp_path / "trials.journal"
    seen: list[int] = []
    first = tune_pipeline(_untuned_pipeline(trained), dev, initial=BAD_PARAMS, iterations=4, restarts=3,
                          seed=5, journal=journal, on_trial=_stop_after(6, seen))  # stops inside study 1
    assert seen == [1, 2, 3, 4, 5, 6] and first.trials == 6
    assert [row["study"] for row in first.history] == [0, 0, 0, 0, 1, 1]
    pipeline = _untuned_pipeline(trained)
    second = tune_pipeline(pipeline, dev, initial=BAD_PARAMS, iterations=4, restarts=3, seed=5,
                           journal=journal)
    assert second.trials == 12 and second.history[:6] == first.history
    studies = {r: [row for row in second.history if row["study"] == r] for r in range(3)}
    assert all(len(rows) == 4 for rows in studies.values())
    # each study starts from the initial params, then its own sampler seed takes it elsewhere
    assert {rows[0]["clustering>threshold"] for rows in studies.values()} == {
        BAD_PARAMS["clustering"]["threshold"]}
    assert len({rows[1]["clustering>threshold"] for rows in studies.values()}) == 3
    best = min(second.history, key=lambda row: row["der"])
    assert second.best_trial_der == pytest.approx(best["der"])
    assert not second.kept_initial  # BAD_PARAMS leave room: the tuned params must win
    assert second.params["clustering"]["threshold"] == pytest.approx(best["clustering>threshold"])
    with pytest.raises(ValueError, match="at least 1"):
        tune_pipeline(pipeline, dev, initial=BAD_PARAMS, iterations=1, restarts=0)


# ============================================================================== recipes end to end




def test_killed_segmentation_run_resumes_from_its_checkpoint(corpus: Path, tmp_path: Path) -> None:
    root, store = tmp_path / "home", ModelStore(tmp_path / "home")
    overrides = {**TINY_RUN, "epochs": 4, "evaluate_start": False}
    first = TrainingRunner(root, SERVICE, RECIPES_PATH, store, grace_seconds=5.0)
    run = first.start("segmentation", str(corpus), overrides, output_model="dz")
    wait_for(lambda: any(c.epoch >= 1 for c in first.checkpoints(run.run_id)), 120,
              "the first epoch's checkpoint")
    victim = first.get(run.run_id)
    first.close(stop_workers=False)  # the server is gone too
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: not process_alive(victim.pid, victim.pid_start_time), 10, "the worker to die")
    killed_at = max(c.step for c in first.checkpoints(run.run_id))

    second = TrainingRunner(root, SERVICE, RECIPES_PATH, store, grace_seconds=5.0)
    try:
        assert second.recover() == [run.run_id]
        final = second.wait(run.run_id, timeout=300)
    finally:
        second.close()
    assert final.state == "SUCCEEDED", final.error
    assert final.attempts == 2 and final.resumed_from is not None and final.resumed_from["step"] >= killed_at
    events = second.events(run.run_id)
    resumed = [e["step"] for e in events if e["type"] == "progress" and e["attempt"] == 2]
    assert resumed and min(resumed) > final.resumed_from["step"]  # not from zero

    with (final.run_dir / EPOCHS_CSV).open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]  # each epoch once, across both attempts
    assert rows[0]["loss/train"] == "" and all(float(r["loss/val"]) > 0 for r in rows)
    assert (final.run_dir / EPOCHS_PNG).stat().st_size > 1000

    model = store.resolve(SERVICE, "dz")
    assert model.labels["run_id"] == run.run_id and model.recipe == "segmentation"
    for key in ("der_dev_before", "der_dev_after", "der_test", "collar"):
        assert key in model.metrics
    assert model.metrics["der_dev_after"] <= model.metrics["der_dev_before"]
    assert model.metrics["collar"] == 0.0
    spec = read_artifact(model.path)
    assert spec["metrics"]["der_test"] == pytest.approx(model.metrics["der_test"])
    diarization, _ = diarize(load_pipeline(model.path), str(corpus / "diarization" / "wav" / "test_000.wav"))
    assert diarization.uri == "test_000"


def _record(root: Path, recipe: str, dataset: Path, overrides: dict[str, Any], base: Any = None) -> RunRecord:
    run_dir = root / "runs" / SERVICE / f"inline-{recipe}"
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True)
    (run_dir / TENSORBOARD_DIR).mkdir()
    record = RunRecord(
        run_id=run_dir.name, service=SERVICE, recipe=recipe, run_dir=run_dir, dataset_uri=str(dataset),
        overrides=overrides, config=merge_config(RECIPES[recipe].defaults, overrides), output_model="tuned",
        base_model=base.ref if base else "", base_model_path=str(base.path) if base else "",
        architecture="pyannote-pipeline", created_at=time.time(), store_root=str(root),
        recipes_import_path=RECIPES_PATH)
    transition(record, EventLog(run_dir / EVENTS_FILE, record.run_id), QUEUED)
    save_run(record)
    return record


def test_pipeline_recipe_tunes_a_published_model(trained: dict[str, Any], corpus: Path,
                                                 tmp_path: Path) -> None:
    root = tmp_path / "home"
    store = ModelStore(root)
    with store.create_version(SERVICE, "start", architecture="pyannote-pipeline", base_model="",
                              recipe="test") as staging:
        embedding = {"kind": "speaker-store", "ref": "untrained:ecapa", "model": tiny_speaker_encoder()}
        save_artifact(staging, trained["model"], params=BAD_PARAMS, metrics={}, segmentation_step=0.5,
                      embedding=embedding)
    base = store.resolve(SERVICE, "start")
    overrides = {"optimize_iterations": 10, "segmentation_step": 0.5, "device": "cpu",
                 "evaluate_start": False}
    record = _record(root, "pipeline", corpus, overrides, base)
    ctx = RunContext(record, EventLog(record.run_dir / EVENTS_FILE, record.run_id), store)
    try:
        RECIPES["pipeline"].run(ctx)
    finally:
        ctx.close()
    tuned = store.resolve(SERVICE, "tuned")
    assert tuned.metrics["der_dev_after"] < tuned.metrics["der_dev_before"]  # it started from BAD_PARAMS
    spec = read_artifact(tuned.path)
    assert spec["params"] != BAD_PARAMS and spec["embedding"]["ref"] == "untrained:ecapa"
    der = json.loads((record.run_dir / "der.json").read_text())
    assert der["initial_params"] == BAD_PARAMS and der["test"]["collar"] == 0.0
    assert math.isclose(der["test"]["der"], tuned.metrics["der_test"])


# ============================================================================= the learning check


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpu_recipe_learns_to_diarize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """presets/cpu-quick.yaml on its synthetic corpus: test DER (collar 0) from >= 60 % to <= 15 %.

    First the speaker service's own CPU recipe (``make train-speaker``: 110 synthetic speakers of
    another synthetic corpus) trains the embedding and becomes the speaker default, which the
    recipe's ``embedding.ref: ""`` picks up — the clustering is only as good as the embedding, and an
    untrained one leaves confusion at 40-50 % whatever the segmentation. Then the diarization recipe
    trains the segmentation from scratch, tunes the pipeline on dev and scores test. Both runs go
    through the runner, as ``make demo`` does.
    """
    import yaml
    from dramaturg.services.speaker.recipes import PRESETS_DIR as SPEAKER_PRESETS

    spec = yaml.safe_load((PRESETS_DIR / "cpu-quick.yaml").read_text())
    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, SynthConfig(**spec["synth"]))
    voices_corpus = tmp_path / "voices-corpus"
    speaker_spec = yaml.safe_load((SPEAKER_PRESETS / "cpu-quick.yaml").read_text())
    synthesize_corpus(voices_corpus, SynthConfig(**speaker_spec["synth"]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the speaker worker too: one thread on shared cores
    root = tmp_path / "home"
    store = ModelStore(root)
    timings = {}
    speaker = TrainingRunner(root, "speaker", "dramaturg.services.speaker.recipes:RECIPES", store)
    try:
        started = time.monotonic()
        voices = speaker.run_inline("cpu-quick", str(voices_corpus), {}, output_model="voices")
        timings["speaker"] = time.monotonic() - started
    finally:
        speaker.close()
    assert voices.state == "SUCCEEDED", voices.error
    store.set_default("speaker", "voices")
    runner = TrainingRunner(root, SERVICE, RECIPES_PATH, store)
    try:
        started = time.monotonic()
        final = runner.run_inline("cpu-quick", str(corpus), {}, output_model="learned")
        timings["diarization"] = time.monotonic() - started
    finally:
        runner.close()
    assert final.state == "SUCCEEDED", final.error
    model = store.resolve(SERVICE, "learned")
    assert read_artifact(model.path)["embedding"]["ref"] == "voices:v1"
    published_eer = store.resolve("speaker", "voices").metrics["eer"]
    print(f"\nspeaker embedding {timings['speaker']:.0f} s (published EER {100 * published_eer:.2f}%), "
          f"diarization cpu-quick {timings['diarization']:.0f} s: test DER "
          f"{100 * model.metrics['der_test_start']:.1f}% untrained -> {100 * model.metrics['der_test']:.1f}% "
          f"(dev {100 * model.metrics['der_dev_before']:.1f}% -> {100 * model.metrics['der_dev_after']:.1f}% "
          "by pipeline tuning; collar 0, overlap scored)")
    print((final.run_dir / EPOCHS_CSV).read_text())
    assert model.metrics["der_test_start"] >= 0.60
    assert read_artifact(model.path)["offset_at_last_frame"] is True
    assert model.metrics["der_test"] <= 0.15, (
        f"issue 5's target is test DER <= 15 % (36 scenes, collar 0); measured 13.5 % with these recipes "
        f"(README), got {100 * model.metrics['der_test']:.1f} %")
