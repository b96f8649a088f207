"""Speaker training: heads learn, EER/minDCF are right, runs resume after a kill, LR tools work.

One tiny synthetic corpus per module (6 speakers, 2 held out, 4 utterances each). The learning
check on a larger corpus is marked slow: ``.venv/bin/pytest -m slow tests/test_speaker_train.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from dramaturg.services.speaker.data import (
    PairDataset,
    SpeakerCorpus,
    UtteranceDataset,
    collate_pairs,
    collate_utterances,
    convert_to_wav,
    read_trials,
)
from dramaturg.services.speaker.evaluate import asnorm_scores, eer_min_dcf, evaluate_trials
from dramaturg.services.speaker.heads import build_head
from dramaturg.services.speaker.recipes import PRESETS_DIR, RECIPES
from dramaturg.services.speaker.train import (
    build_optimizer,
    lr_range_test,
    prepare,
    run_lr_grid,
)
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import TRAINER_STATE_DIR, TrainingRunner
from dramaturg.shared.training.recipe import RunContext, merge_config
from dramaturg.shared.training.runs import EVENTS_FILE, EventLog, RunRecord, process_alive, save_run
from dramaturg.shared.voice.encoder import SpeakerEncoder, SpeakerEncoderConfig
from helpers import wait_for

log = logging.getLogger(__name__)

SERVICE = "speaker"
RECIPES_PATH = "dramaturg.services.speaker.recipes:RECIPES"
# One torch thread: on two cores shared with other jobs, torch's spinning worker threads make every
# step several times slower than a single thread does.
FAST = {"crop_seconds": 0.5, "batch_size": 4, "log_every": 1, "device": "cpu", "torch_threads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speaker-corpus")
    synthesize_corpus(
        out,
        SynthConfig(
            seed=5,
            num_speakers=6,
            heldout_speakers=2,
            utterances_per_speaker=4,
            scenes_train=1,
            scenes_dev=1,
            scenes_test=1,
            lines_per_scene=2,
        ),
    )
    return out


def _config(recipe: str, **overrides: Any) -> dict[str, Any]:
    return merge_config(RECIPES[recipe].defaults, {**FAST, **overrides})


# --------------------------------------------------------------------------------------- learning

COMBINATIONS = [(arch, head) for arch in ("wav2vec2", "xvector", "ecapa") for head in ("ce", "aam", "bce")]
COMBINATIONS.append(("wav2vec2", "ctc"))


@pytest.mark.parametrize(("architecture", "head"), COMBINATIONS, ids=[f"{a}-{h}" for a, h in COMBINATIONS])
def test_each_architecture_and_head_learns_a_fixed_batch(corpus: Path, architecture: str, head: str) -> None:
    cfg = _config(
        f"{architecture}-aam" if architecture != "wav2vec2" else "wav2vec2-aam",
        head=head,
        architecture=architecture,
        lr=3e-3,
    )
    setup = prepare(cfg, corpus)
    torch.manual_seed(0)
    batch = setup.collator([setup.dataset[i] for i in range(8)])
    assert batch["input_values"].shape[1] == 8000
    model = setup.model.train()
    optimizer = build_optimizer(model, cfg)
    losses = []
    for _ in range(14):
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses), losses
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, f"{architecture}/{head}: loss {first:.3f} → {last:.3f} ({losses})"


def test_ctc_is_for_wav2vec2_only() -> None:
    encoder = SpeakerEncoder(SpeakerEncoderConfig(architecture="ecapa"))
    with pytest.raises(ValueError, match="wav2vec2 frames"):
        build_head("ctc", encoder, 4)


# ------------------------------------------------------------------------------------------- data


def test_corpus_datasets_and_collators(corpus: Path) -> None:
    c = SpeakerCorpus(corpus)  # the corpus root is accepted as well as its speaker/ folder
    assert c.root == corpus / "speaker" and len(c.train_speakers) == 4 and len(c.test_speakers) == 2
    assert not set(c.train_speakers) & set(c.test_speakers)
    utterances = c.train_utterances()
    assert {u.speaker for u in utterances} == set(c.train_speakers)
    trials = read_trials(c.trials_path)
    assert {t.label for t in trials} == {0, 1}
    assert all(t.enroll.split("/")[0] in c.test_speakers for t in trials)  # held out from training

    base = UtteranceDataset(utterances, c.train_speakers, crop_seconds=0.5, sample_rate=16000)
    batch = collate_utterances([base[0], base[1]])
    assert batch["input_values"].shape == (2, 8000) and batch["labels"].dtype == torch.long
    pairs = PairDataset(base)
    torch.manual_seed(0)
    labels = {pairs[i % len(pairs)]["labels"] for i in range(24)}
    assert labels == {0, 1}
    paired = collate_pairs([pairs[0], pairs[1], pairs[2]])
    assert paired["input_values"].shape[0] == 6 and paired["labels"].shape == (3,)

def test_variable_crops_span_the_range_and_are_padded_with_their_lengths(corpus: Path) -> None:
    c = SpeakerCorpus(corpus)
    base = UtteranceDataset(
        c.train_utterances(), c.train_speakers, crop_seconds=0.8, min_crop_seconds=0.3, sample_rate=16000
    )
    torch.manual_seed(0)
    items = [base[i % len(base)] for i in range(24)]
    lengths = [item["input_values"].shape[0] for item in items]
    assert min(lengths) >= 0.3 * 16000 and max(lengths) <= 0.8 * 16000
    assert max(lengths) - min(lengths) > 0.2 * 16000  # drawn, not one fixed window
    batch = collate_utterances(items[:4])
    assert batch["lengths"].tolist() == lengths[:4] and batch["input_values"].shape[1] == max(lengths[:4])
    with pytest.raises(ValueError, match="min_crop_seconds"):
        UtteranceDataset(c.train_utterances(), c.train_speakers, crop_seconds=0.5, min_crop_seconds=0.6,
                         sample_rate=16000)



def test_convert_to_wav_resamples_and_downmixes(tmp_path: Path) -> None:
    src = tmp_path / "stereo.flac"
    t = np.arange(44100) / 44100.0
    sf.write(src, np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], axis=1) * 0.3, 44100)
    dst = convert_to_wav(src, tmp_path / "out" / "mono.wav")
    info = sf.info(dst)
    assert (info.samplerate, info.channels) == (16000, 1) and abs(info.duration - 1.0) < 0.01


# ----------------------------------------------------------------------------------------- scoring


def test_eer_and_min_dcf_on_a_hand_checked_example() -> None:
    # targets 0.9 0.8 0.7 0.3, non-targets 0.6 0.4 0.2 0.1: at 0.4 one target of four is missed
    # (0.3) and one non-target of four accepted (0.6), so EER = 25 %. The cheapest operating point
    # at P_target = 0.01 accepts no non-target and misses 0.3: 0.01 · 1/4 = 0.0025, i.e. 0.25 of the
    # default cost min(0.01, 0.99) = 0.01.
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    result = eer_min_dcf(scores, labels)
    assert result.backend == "cosine"
    assert result.eer == pytest.approx(0.25)
    assert result.threshold == pytest.approx(0.4)
    assert result.min_dcf == pytest.approx(0.25)
    assert (result.n_target, result.n_nontarget) == (4, 4)
    separated = eer_min_dcf([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])
    assert separated.eer == 0.0 and separated.min_dcf == 0.0 and 0.2 <= separated.threshold < 0.8
    with pytest.raises(ValueError, match="both"):
        eer_min_dcf([0.5, 0.6], [1, 1])


def test_asnorm_on_a_hand_checked_example() -> None:
    enroll, test = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    cohort = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # enroll vs cohort: 1, 0, 0.6 → top-2 mean 0.8, std 0.2; test: 0, 1, 0.8 → mean 0.9, std 0.1
    score = asnorm_scores(np.array([0.0]), enroll, test, cohort, top_k=2)
    assert score == pytest.approx([0.5 * ((0 - 0.8) / 0.2 + (0 - 0.9) / 0.1)])


def test_evaluate_trials_reports_each_backend(corpus: Path) -> None:
    torch.manual_seed(0)
    encoder = SpeakerEncoder(SpeakerEncoderConfig(architecture="ecapa"))
    results = evaluate_trials(encoder, SpeakerCorpus(corpus), asnorm=True, top_k=2)
    assert set(results) == {"cosine", "asnorm"}
    for name, result in results.items():
        assert result.backend == name and 0.0 <= result.eer <= 1.0 and math.isfinite(result.min_dcf)
    assert "(cosine)" in results["cosine"].describe()


# ------------------------------------------------------------------------------------ LR find/grid


def test_lr_range_test_suggests_a_finite_lr(corpus: Path, tmp_path: Path) -> None:
    setup = prepare(_config("lr-find", architecture="ecapa"), corpus)
    result = lr_range_test(setup, tmp_path / "scratch", min_lr=1e-5, max_lr=1.0, steps=16)
    assert len(result.lrs) >= 8 and all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    assert math.isfinite(result.suggestion) and 1e-5 <= result.suggestion <= 1.0


def _inline_context(tmp_path: Path, recipe: str, dataset: Path, overrides: dict[str, Any]) -> RunContext:
    """A RunContext without a worker subprocess (what the worker builds, minus the process)."""
    run_dir = tmp_path / "runs" / SERVICE / "inline"
    run_dir.mkdir(parents=True)
    record = RunRecord(
        run_id="inline",
        service=SERVICE,
        recipe=recipe,
        run_dir=run_dir,
        dataset_uri=str(dataset),
        config=merge_config(RECIPES[recipe].defaults, overrides),
        store_root=str(tmp_path),
    )
    save_run(record)
    return RunContext(record, EventLog(run_dir / EVENTS_FILE, "inline"), ModelStore(tmp_path))


def test_lr_grid_writes_its_tables(corpus: Path, tmp_path: Path) -> None:
    ctx = _inline_context(
        tmp_path, "lr-grid", corpus, {**FAST, "architecture": "ecapa", "lrs": [1e-4, 3e-3], "grid_steps": 3}
    )
    run_lr_grid(ctx)
    ctx.close()
    with open(ctx.run_dir / "lr_grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == [1e-4, 3e-3]
    assert all(r["eer_backend"] == "cosine" and 0.0 <= float(r["eer"]) <= 1.0 for r in rows)
    table = (ctx.run_dir / "lr_grid.md").read_text()
    assert "| 0.003 | 3 |" in table and "cosine" in table
    run_lr_grid(ctx)  # a resumed grid skips the learning rates it already has
    with open(ctx.run_dir / "lr_grid.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_recipes_are_complete_and_validated() -> None:
    expected = {
        "wav2vec2-ce",
        "wav2vec2-aam",
        "wav2vec2-bce",
        "wav2vec2-ctc",
        "xvector-aam",
        "ecapa-aam",
        "lr-find",
        "lr-grid",
        "cpu-quick",
        "wav2vec2-base-aam",
        "ecapa-voxceleb",
    }
    assert expected <= set(RECIPES)
    assert RECIPES["wav2vec2-base-aam"].defaults["pretrained"] == "facebook/wav2vec2-base"
    assert RECIPES["ecapa-voxceleb"].defaults["pretrained"] == "speechbrain/spkrec-ecapa-voxceleb"
    assert RECIPES["wav2vec2-ctc"].defaults["head"] == "ctc"
    assert (
        RECIPES["wav2vec2-aam"].defaults["margin"] == 0.2
        and RECIPES["wav2vec2-aam"].defaults["scale"] == 30.0
    )


# ------------------------------------------------------------------------------------ crash resume




def test_killed_run_resumes_from_its_checkpoint_and_publishes(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "state"
    store = ModelStore(root)
    first = TrainingRunner(root, SERVICE, RECIPES_PATH, store, grace_seconds=5.0)
    overrides = {**FAST, "crop_seconds": 1.5, "max_steps": 24, "eval_every": 8, "eval_at_start": False}
    run = first.start("ecapa-aam", str(corpus), overrides, output_model="spk-test")
    try:
        wait_for(
            lambda: any(c.step >= 8 for c in first.checkpoints(run.run_id)), 120, "the first checkpoint"
        )
        victim = first.get(run.run_id)
        first.close(stop_workers=False)  # the server is gone too: nobody watches the worker
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(victim.pid, victim.pid_start_time), 10, "the worker to die")
        assert first.get(run.run_id).state == "RUNNING" and first.get(run.run_id).step < 24
    finally:
        first.close(stop_workers=False)

    second = TrainingRunner(root, SERVICE, RECIPES_PATH, store, grace_seconds=5.0)
    try:
        assert second.recover() == [run.run_id]
        final = second.wait(run.run_id, timeout=240)
    finally:
        second.close()
    assert final.state == "SUCCEEDED", final.error
    assert final.attempts == 2 and final.resumed_from is not None and final.resumed_from["step"] >= 8
    events = second.events(run.run_id)
    resumed_steps = [e["step"] for e in events if e["type"] == "progress" and e["attempt"] == 2]
    assert resumed_steps and min(resumed_steps) > final.resumed_from["step"]  # not from zero
    last = second.checkpoints(run.run_id)[-1]
    assert last.step == 24
    state = json.loads((last.path / TRAINER_STATE_DIR / "trainer_state.json").read_text())
    assert state["global_step"] == 24

    model = store.resolve(SERVICE, "spk-test")
    assert final.published_model == model.ref and model.labels["eer_backend"] == "cosine"
    assert {"eer", "min_dcf", "threshold"} <= set(model.metrics)
    assert model.architecture == "ecapa" and not (model.path / TRAINER_STATE_DIR).exists()
    # published with a PLDA over its training speakers (4 here: 3 LDA dimensions), for VBx diarization
    from pyannote.audio.core.plda import PLDA

    plda = PLDA.from_pretrained(str(model.path / "plda"))
    assert plda.phi.shape == (3,) and np.all(plda.phi > 0)
    encoder = SpeakerEncoder.from_pretrained(str(model.path))
    assert encoder.config.threshold == pytest.approx(model.metrics["threshold"])
    vectors = encoder.embed([np.zeros(8000, np.float32) + 0.01 * np.arange(8000, dtype=np.float32) % 1])
    assert vectors.shape == (1, encoder.embedding_size)


# --------------------------------------------------------------------------------- learning check


# 110 training speakers, 10 held out (280 target and 280 non-target trials among them): the corpus
# `make train-speaker` builds from the recipe's synth: section.
LEARNING_CORPUS: dict[str, Any] = yaml.safe_load((PRESETS_DIR / "cpu-quick.yaml").read_text())["synth"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # minutes on an idle 2-core machine; much longer when it is shared
def test_cpu_quick_learns_to_verify_held_out_speakers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """cpu-quick on a larger corpus: held-out EER (cosine) from the untrained model's to ≤ 5 %.

    The figures are logged; see them with ``-o log_cli=true --log-cli-level=INFO``.
    """
    out = tmp_path_factory.mktemp("speaker-learning")
    started = time.monotonic()
    synthesize_corpus(out, SynthConfig(**LEARNING_CORPUS))
    synth_s = time.monotonic() - started
    root = out / "state"
    store = ModelStore(root)
    runner = TrainingRunner(root, SERVICE, RECIPES_PATH, store)
    started = time.monotonic()
    try:
        run = runner.start("cpu-quick", str(out), output_model="speaker-cpu-quick")
        final = runner.wait(run.run_id, timeout=3600)
    finally:
        runner.close()
    train_s = time.monotonic() - started
    assert final.state == "SUCCEEDED", final.error
    evals = {
        e["step"]: e["values"]
        for e in runner.events(run.run_id)
        if e["type"] == "metrics" and "eer_cosine" in e["values"]
    }
    untrained, last = evals[0], evals[max(evals)]
    model = store.resolve(SERVICE, "speaker-cpu-quick")
    log.info(
        "learning check: corpus %.0f s, training run %.0f s (%d steps); held-out EER (cosine) "
        "%.2f%% untrained → %.2f%% at the last step, %.2f%% published (step %s); "
        "minDCF %.3f → %.3f / %.3f; threshold %.3f",
        synth_s,
        train_s,
        max(evals),
        100 * untrained["eer_cosine"],
        100 * last["eer_cosine"],
        100 * model.metrics["eer_cosine"],
        model.labels["step"],
        untrained["min_dcf_cosine"],
        last["min_dcf_cosine"],
        model.metrics["min_dcf_cosine"],
        model.metrics["threshold"],
    )
    assert untrained["eer_cosine"] > 0.15
    assert model.metrics["eer_cosine"] <= 0.05 and last["eer_cosine"] <= 0.05
