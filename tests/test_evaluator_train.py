"""Evaluator SFT through the shared runner's context, on a tiny synthetic corpus.

One tiny corpus per module (``synthesize_corpus``: a few scenes, so ~12 realism items, 3 held out) and
one LoRA SFT run of the tiny evaluator on it (simple prompts, a few dimensions, a few dozen steps).
Checked: the training loss falls, every evaluation logs held-out MAE and Spearman per dimension plus
their summaries, and the published model loads with ``load_evaluator`` and puts far more probability
on a digit after ``<answer>`` than the untrained model (the answer format is learnt). ``peft: full``
trains a step too, so do ``adalora``, ``ia3`` and ``qlora`` (each published merged), a second attempt
resumes from the newest checkpoint, and the prompt-learning peft names are refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dramaturg.services.evaluator import model as evaluator
from dramaturg.services.evaluator.data import evaluator_dir, load_clip, load_split
from dramaturg.services.evaluator.prompts import user_messages
from dramaturg.services.evaluator.recipes import MONITORED, PRESETS_DIR, RECIPES
from dramaturg.services.evaluator.scoring import score_item
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training.recipe import RunContext, merge_config
from dramaturg.shared.training.runs import EVENTS_FILE, EventLog, RunRecord, save_run

log = logging.getLogger(__name__)

SERVICE = "evaluator"
DIMENSIONS = ["pitch_variation", "emotion_accuracy", "dynamic_range"]
RUN = {
    "peft": "lora",
    "item_set": "realism",
    "dimensions": DIMENSIONS,
    "detailed": False,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    # a random tiny model's LM head caps its logits (rows of norm ~0.16): LoRA alone plateaus near
    # ln(1024) (measured: 6.8 → 5.9 and flat), so the head trains in full beside the adapters
    "lora_modules_to_save": ["lm_head"],
    "lr": 1e-2,
    "schedule": "constant_with_warmup",
    "warmup": 2,
    "max_steps": 40,
    "batch_size": 4,
    "eval_every": 20,
    "log_every": 2,
    "device": "cpu",
    "torch_threads": 1,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluator-corpus")
    synthesize_corpus(
        out,
        SynthConfig(
            seed=5,
            num_speakers=4,
            heldout_speakers=2,
            utterances_per_speaker=2,
            scenes_train=2,
            scenes_dev=1,
            scenes_test=1,
            lines_per_scene=3,
        ),
    )
    return out


def inline_context(root: Path, recipe: str, dataset: Path, overrides: dict[str, Any], *,
                   run_id: str = "inline", output_model: str = "") -> RunContext:
    """A RunContext without a worker subprocess (what the worker builds, minus the process)."""
    run_dir = root / "runs" / SERVICE / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_id=run_id, service=SERVICE, recipe=recipe, run_dir=run_dir,
                       dataset_uri=str(dataset), config=merge_config(RECIPES[recipe].defaults, overrides),
                       store_root=str(root), output_model=output_model, attempts=1)
    save_run(record)
    return RunContext(record, EventLog(run_dir / EVENTS_FILE, run_id, attempt=1), ModelStore(root),
                      progress_interval=0.0)


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
    return [e for e in found if e["type"] == kind]


def metric_series(run_dir: Path, key: str) -> dict[int, float]:
    return {e["step"]: e["values"][key] for e in events(run_dir, "metrics") if key in e["values"]}


@pytest.fixture(scope="module")
def sft_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("evaluator-sft")
    ctx = inline_context(root, "sft", corpus, RUN, run_id="sft", output_model="evaluator-test")
    started = time.monotonic()
    RECIPES["sft"].run(ctx)
    ctx.close()
    log.info("sft (%d steps): %.1f s", RUN["max_steps"], time.monotonic() - started)
    return ctx


def test_recipes_and_presets_are_valid() -> None:
    assert {"sft", "cpu-quick"} <= set(RECIPES)
    sft = RECIPES["sft"].defaults
    assert (sft["peft"], sft["target"], sft["base_model"]) == ("lora", "per_rater", "")
    assert (PRESETS_DIR / "cpu-quick.yaml").is_file() and RECIPES["cpu-quick"].defaults["device"] == "cpu"


@pytest.mark.parametrize("method", ["adalora", "ia3", "qlora"])
def test_each_peft_method_trains_and_publishes_a_merged_model(
    method: str, corpus: Path, tmp_path: Path
) -> None:
    """A few steps of each method: finite loss, and the published folder is a plain Qwen2-Audio (adapter
    merged: no adapter parameters) whose language model differs from the base it started from."""
    overrides = {**RUN, "peft": method, "max_steps": 4, "eval_every": 0, "max_heldout_items": 1,
                 "eval_at_start": False, "lora_modules_to_save": []}
    if method == "ia3":
        overrides["lr"] = 5e-2  # IA3's scales start at 1 and move slowly
    ctx = inline_context(tmp_path, "sft", corpus, overrides, output_model=f"evaluator-{method}")
    RECIPES["sft"].run(ctx)
    ctx.close()
    loss = metric_series(ctx.run_dir, "loss/train")
    assert loss and all(math.isfinite(v) for v in loss.values())
    record = ModelStore(tmp_path).resolve(SERVICE, f"evaluator-{method}")
    assert record.labels["peft"] == method
    published, _ = evaluator.load_evaluator(record.path)
    names = [name for name, _ in published.named_parameters()]
    assert not any(tag in name for name in names for tag in ("lora_", "ia3_", "base_layer"))
    base, _ = evaluator.build_tiny_evaluator(seed=RUN.get("seed", 0))
    changed = [name for name, param in published.named_parameters()
               if not torch.allclose(param, base.get_parameter(name), atol=1e-6)]
    assert changed and all(name.startswith("model.language_model.layers.") for name in changed), changed
    if method == "ia3":  # scales on keys, values and the MLP's down projection only
        assert all(name.endswith(("k_proj.weight", "v_proj.weight", "down_proj.weight")) for name in changed)


def test_sft_loss_falls_and_heldout_metrics_are_logged(sft_run: RunContext) -> None:
    loss = metric_series(sft_run.run_dir, "loss/train")
    steps = sorted(loss)
    assert len(steps) >= 4 and all(math.isfinite(v) for v in loss.values())
    first, last = loss[steps[0]], loss[steps[-1]]
    log.info("training loss: step %d %.3f → step %d %.3f", steps[0], first, steps[-1], last)
    assert last < 0.5 * first
    for key in (MONITORED, "heldout/mae", "heldout/digit_mass",
                *(f"heldout/{m}/{d}" for m in ("mae", "spearman") for d in DIMENSIONS)):
        assert sorted(metric_series(sft_run.run_dir, key)) == [0, 20, 40], key
    checkpoints = [e["checkpoint"] for e in events(sft_run.run_dir, "checkpoint")]
    assert [c["step"] for c in checkpoints] == [20, 40]


def test_published_model_learnt_the_answer_format(sft_run: RunContext, corpus: Path) -> None:
    record = ModelStore(sft_run.record.store_root).resolve(SERVICE, "evaluator-test")
    assert record.architecture == "qwen2-audio" and MONITORED in record.metrics
    assert record.labels["prompts"] == "simple"  # the service prompts it the way it was trained
    trained, processor = evaluator.load_evaluator(record.path)
    untrained, _ = evaluator.build_tiny_evaluator(seed=0)
    folder = evaluator_dir(corpus)
    item = load_split(folder, "realism", "test")[0]
    clip = load_clip(folder / item["wav_path"])
    before = score_item(untrained, processor, clip, item, dimensions=DIMENSIONS, detailed=False)
    after = score_item(trained, processor, clip, item, dimensions=DIMENSIONS, detailed=False)
    mass_before = sum(s.digit_mass for s in before.values()) / len(before)
    mass_after = sum(s.digit_mass for s in after.values()) / len(after)
    log.info("digit mass after <answer>: untrained %.4f → trained %.4f", mass_before, mass_after)
    assert mass_after > 0.3 and mass_after > 10 * mass_before
    assert all(1.0 <= s.score <= 5.0 for s in after.values())


def test_full_fine_tune_trains_a_step(corpus: Path, tmp_path: Path) -> None:
    """Also with ``audio_position: last``: the published processor prompts with the clip after the text."""
    overrides = {**RUN, "peft": "full", "max_steps": 2, "eval_every": 0, "max_heldout_items": 1,
                 "audio_position": "last"}
    ctx = inline_context(tmp_path, "sft", corpus, overrides, output_model="evaluator-full")
    RECIPES["sft"].run(ctx)
    ctx.close()
    loss = metric_series(ctx.run_dir, "loss/train")
    assert loss and all(math.isfinite(v) for v in loss.values())
    record = ModelStore(tmp_path).resolve(SERVICE, "evaluator-full")
    model, processor = evaluator.load_evaluator(record.path)
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    text = processor.apply_chat_template(user_messages("Rate it."), add_generation_prompt=True,
                                         tokenize=False)
    assert text.index("Rate it.") < text.index(processor.audio_token)


def test_an_unknown_audio_position_is_refused(corpus: Path, tmp_path: Path) -> None:
    ctx = inline_context(tmp_path, "sft", corpus, {**RUN, "audio_position": "middle"})
    with pytest.raises(ValueError, match="audio_position 'middle'"):
        RECIPES["sft"].run(ctx)
    ctx.close()


def test_a_second_attempt_resumes_from_the_newest_checkpoint(corpus: Path, tmp_path: Path) -> None:
    """Attempt 1 stops at step 4 (checkpoints 2 and 4); attempt 2 of the same run, allowed 6 steps,
    resumes from step 4 (the adapter, optimizer and scheduler from ``trainer_state/``) and trains 2 more."""
    short = {**RUN, "max_steps": 4, "eval_every": 2, "max_heldout_items": 1, "eval_at_start": False}
    first = inline_context(tmp_path, "sft", corpus, short, run_id="resume", output_model="evaluator-resume")
    RECIPES["sft"].run(first)
    first.close()
    second = inline_context(tmp_path, "sft", corpus, {**short, "max_steps": 6}, run_id="resume",
                            output_model="evaluator-resume")
    RECIPES["sft"].run(second)
    second.close()
    logs = [e["message"] for e in events(second.run_dir, "log")]
    assert any("resuming from" in m for m in logs)
    loss_steps = sorted(metric_series(second.run_dir, "loss/train"))
    assert loss_steps == [2, 4, 6]  # steps 2 and 4 logged once (attempt 1), 6 by attempt 2
    assert [c["step"] for c in (e["checkpoint"] for e in events(second.run_dir, "checkpoint"))] == [2, 4, 6]


def test_score_probe_trains_the_encoder_and_is_not_published(corpus: Path, tmp_path: Path) -> None:
    """``probe_weight`` and ``contour_weight``: each probe loss is logged, its gradient reaches the audio
    encoder (which the answer loss alone also reaches under ``full``, so compare against a run without
    it), the probe sits in the Trainer's checkpoints (resume) but not in the published folder."""
    from safetensors import safe_open

    base = {**RUN, "peft": "full", "max_steps": 3, "eval_every": 3, "max_heldout_items": 1,
            "eval_at_start": False, "log_every": 1, "lr": 1e-3}
    runs = {"none": {}, "probe": {"probe_weight": 5.0}, "contour": {"contour_weight": 5.0},
            "score": {"score_weight": 5.0}}
    towers = {}
    for name, weights in runs.items():
        ctx = inline_context(tmp_path, "sft", corpus, {**base, **weights},
                             run_id=f"probe-{name}", output_model=f"evaluator-probe-{name}")
        RECIPES["sft"].run(ctx)
        ctx.close()
        record = ModelStore(tmp_path).resolve(SERVICE, f"evaluator-probe-{name}")
        model, _ = evaluator.load_evaluator(record.path)
        assert not any(key.startswith("score_probe") for key, _ in model.named_parameters())
        with safe_open(str(record.path / "model.safetensors"), "pt") as published:
            assert not any(key.startswith("score_probe") for key in published.keys())  # noqa: SIM118
        towers[name] = model.model.audio_tower.layers[0].fc1.weight.detach().clone()
        probe_loss = metric_series(ctx.run_dir, "train/probe_loss")
        contour_loss = metric_series(ctx.run_dir, "train/contour_loss")
        score_loss = metric_series(ctx.run_dir, "train/score_loss")
        assert bool(contour_loss) == (name == "contour") and bool(score_loss) == (name == "score")
        assert all(math.isfinite(v) for v in [*contour_loss.values(), *score_loss.values()])
        assert bool(probe_loss) == (name == "probe")
        assert all(math.isfinite(v) for v in probe_loss.values())
        saved = ctx.checkpoints()[-1].path
        keys = [k for f in saved.rglob("model.safetensors") for k in safe_open(str(f), "pt").keys()]  # noqa: SIM118
        assert any(key.startswith("score_probe.") for key in keys) == (name in ("probe", "contour"))
    assert not torch.allclose(towers["none"], towers["probe"])  # the probe's loss moved the encoder
    assert not torch.allclose(towers["none"], towers["contour"])  # and so did the contour head's
    assert not torch.allclose(towers["none"], towers["score"])  # and the expected score's, through the LM


def test_score_weight_trains_a_lora_evaluator(corpus: Path, tmp_path: Path) -> None:
    """``score_weight`` needs no probe and no full fine-tune: with LoRA (the LM head in ``modules_to_save``)
    its loss is computed and logged at every step."""
    base = {**RUN, "max_steps": 3, "eval_every": 3, "max_heldout_items": 1, "eval_at_start": False,
            "log_every": 1}
    logged = {}
    for weight in (0.0, 5.0):
        ctx = inline_context(tmp_path, "sft", corpus, {**base, "score_weight": weight},
                             run_id=f"score-{weight}", output_model=f"evaluator-score-{weight}")
        RECIPES["sft"].run(ctx)
        ctx.close()
        logged[weight] = metric_series(ctx.run_dir, "train/score_loss")
    assert not logged[0.0]
    assert len(logged[5.0]) == 3 and all(math.isfinite(v) for v in logged[5.0].values())


@pytest.mark.parametrize("weight", ["probe_weight", "contour_weight"])
def test_score_probe_needs_a_full_fine_tune(corpus: Path, tmp_path: Path, weight: str) -> None:
    ctx = inline_context(tmp_path, "sft", corpus, {**RUN, weight: 1.0})  # RUN is LoRA
    with pytest.raises(ValueError, match="peft: full"):
        RECIPES["sft"].run(ctx)
    ctx.close()


def test_tiny_sections_widen_the_tiny_model() -> None:
    from dramaturg.services.evaluator.train import tiny_model

    model, processor = tiny_model({"seed": 0, "model": {
        "audio_config": {"encoder_layers": 3, "d_model": 96},
        "text_config": {"hidden_size": 96, "intermediate_size": 192}}})
    assert model.config.audio_config.encoder_layers == 3 and model.config.audio_config.d_model == 96
    assert model.config.text_config.hidden_size == 96
    assert model.config.audio_config.num_mel_bins == 128  # untouched fields keep the tiny defaults
    evaluator.check_window(model, processor)
    default, _ = tiny_model({"seed": 0})
    base, _ = evaluator.build_tiny_evaluator(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), base.parameters(), strict=True))
    with pytest.raises(ValueError, match="unknown keys"):
        tiny_model({"seed": 0, "model": {"whisper_config": {}}})


def run_in_worker(root: Path, recipe: str, corpus: Path, overrides: dict[str, Any], output_model: str) -> Any:
    """One run through the runner's worker subprocess, as the service runs it (DeepSpeed joins a process
    group and sets transformers' global ZeRO state: neither may leak into the test process)."""
    from dramaturg.shared.registry import recipes_path
    from dramaturg.shared.training.runner import TrainingRunner
    from dramaturg.shared.training.runs import WORKER_LOG

    runner = TrainingRunner(root, SERVICE, recipes_path(SERVICE), ModelStore(root))
    try:
        record = runner.run_inline(recipe, str(corpus), overrides, output_model=output_model)
    finally:
        runner.close()
    assert record.state == "SUCCEEDED", (record.run_dir / WORKER_LOG).read_text()[-4000:]
    return record


@pytest.mark.parametrize(("recipe", "stage"), [("sft", "zero1"), ("sft", "zero2"), ("sft", "zero3"),
                                               ("grpo", "zero3")])
def test_deepspeed_zero_trains_and_publishes_whole_weights(
    recipe: str, stage: str, corpus: Path, tmp_path: Path
) -> None:
    """``deepspeed: zeroN`` (the shipped configs, in the Trainer's "auto" form): DeepSpeed initialises in
    one CPU process, trains, and the published model — gathered from ZeRO-3's shards — reproduces the
    held-out metrics it was published with (an empty or partial shard would not). GRPO under ZeRO-3 also
    gathers the weights to generate."""
    from dramaturg.services.evaluator.data import load_clips
    from dramaturg.services.evaluator.train import heldout_metrics

    overrides = {**RUN, "max_steps": 4, "eval_every": 2, "max_heldout_items": 2, "eval_at_start": False,
                 "deepspeed": stage}
    if recipe == "grpo":  # from the random tiny model: a mechanics check (generation, passes, saving)
        overrides.update({"lr": 1e-5, "num_generations": 2, "lora_modules_to_save": []})
    record = run_in_worker(tmp_path, recipe, corpus, overrides, f"evaluator-{stage}")
    logs = [e["message"] for e in events(record.run_dir, "log")]
    number = stage[-1]
    assert any(f"with DeepSpeed ZeRO-{number} (ds_zero{number}.json)" in m for m in logs), logs
    loss = metric_series(record.run_dir, "loss/train")
    assert sorted(loss) == [2, 4] and all(math.isfinite(v) for v in loss.values())

    published = ModelStore(tmp_path).resolve(SERVICE, record.published_model)
    model, processor = evaluator.load_evaluator(published.path)
    base, _ = evaluator.build_tiny_evaluator(seed=0)
    changed = [name for name, param in model.named_parameters()
               if not torch.allclose(param, base.get_parameter(name), atol=1e-7)]
    # GRPO from a random model earns no reward, so no advantage and no update: only SFT must move
    assert changed or recipe == "grpo", "the published weights are the untrained base"
    folder = evaluator_dir(corpus)
    heldout = load_split(folder, "realism", "test")[:2]
    again = heldout_metrics(model, processor, heldout, load_clips(folder, heldout), detailed=False,
                            dimensions=DIMENSIONS)
    assert again["heldout/mae"] == pytest.approx(published.metrics["heldout/mae"], abs=1e-4)


def test_deepspeed_follows_the_same_optimisation_as_the_trainer_alone(corpus: Path, tmp_path: Path) -> None:
    """ZeRO-2 partitions the optimizer state and gradients of the recipe's own AdamW (the shipped files
    carry no optimizer): in one process the losses equal those of the run without DeepSpeed."""
    overrides = {**RUN, "max_steps": 4, "eval_every": 0, "max_heldout_items": 1, "eval_at_start": False}
    with_zero = run_in_worker(tmp_path / "zero", "sft", corpus, {**overrides, "deepspeed": "zero2"}, "z")
    plain = inline_context(tmp_path / "plain", "sft", corpus, overrides)
    RECIPES["sft"].run(plain)
    plain.close()
    expected = metric_series(plain.run_dir, "loss/train")
    assert sorted(expected) == [2, 4]
    assert metric_series(with_zero.run_dir, "loss/train") == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("recipe", "overrides", "message"), [
    ("sft", {"deepspeed": "zero4"}, "neither zero1, zero2, zero3 nor a DeepSpeed JSON file"),
    ("sft", {"deepspeed": "zero3", "peft": "qlora"}, "cannot partition a 4-bit QLoRA base"),
    ("sft", {"deepspeed": "zero3", "nproc_per_node": 2}, "run ZeRO-3 in one process"),
    ("grpo", {"deepspeed": "zero3", "num_generations": 2}, "cannot checkpoint lora_modules_to_save"),
    ("sft", {"peft": "prompt", "score_weight": 1.0}, "a soft prompt shifts"),
    ("sft", {"peft": "prompt", "group_by_clip": True}, "a soft prompt shifts"),
    ("grpo", {"peft": "prompt", "num_generations": 2}, "grpo with peft: prompt is not supported"),
    ("grpo", {"peft": "prefix", "num_generations": 2}, "grpo with peft: prefix is not supported"),
])
def test_settings_that_cannot_run_are_refused_before_training(
    recipe: str, overrides: dict[str, Any], message: str, corpus: Path, tmp_path: Path
) -> None:
    ctx = inline_context(tmp_path, recipe, corpus, {**RUN, **overrides})
    with pytest.raises(ValueError, match=message):
        RECIPES[recipe].run(ctx)
    ctx.close()
    assert not (ctx.run_dir / "hf-trainer").exists()


def test_two_gloo_processes_with_zero2_train_what_one_process_trains(corpus: Path, tmp_path: Path) -> None:
    """``nproc_per_node: 2`` and ``deepspeed: zero2``: the runner starts torchrun, DeepSpeed partitions the
    optimizer state and gradients over two CPU processes (gloo), rank 0 alone scores and publishes — and
    2 processes × batch 2 give the losses of one process with batch 4 (the same global batches)."""
    overrides = {**RUN, "max_steps": 4, "eval_every": 2, "max_heldout_items": 2, "eval_at_start": False}
    record = run_in_worker(tmp_path / "ddp", "sft", corpus,
                           {**overrides, "batch_size": 2, "nproc_per_node": 2, "deepspeed": "zero2"}, "ddp")
    logs = [e["message"] for e in events(record.run_dir, "log")]
    assert any("in each of 2 processes with DeepSpeed ZeRO-2" in m for m in logs), logs
    assert [m for m in logs if m.startswith("published model")] == ["published model ddp:v1"]
    checkpoints = [e["checkpoint"]["step"] for e in events(record.run_dir, "checkpoint")]
    assert checkpoints == [2, 4]
    single = inline_context(tmp_path / "one", "sft", corpus, {**overrides, "batch_size": 4})
    RECIPES["sft"].run(single)
    single.close()
    expected = metric_series(single.run_dir, "loss/train")
    assert sorted(expected) == [2, 4]
    assert metric_series(record.run_dir, "loss/train") == pytest.approx(expected, rel=1e-4)
    scored = [e["step"] for e in events(record.run_dir, "metrics") if "heldout/mae" in e["values"]]
    assert scored == [2, 4]  # rank 0 scored, once per evaluation


def test_grpo_runs_on_two_gloo_processes(corpus: Path, tmp_path: Path) -> None:
    """GRPO under torchrun: each group's completions are gathered across the processes (TRL), the audio
    reaches every pass on each rank, rank 0 alone scores and publishes."""
    overrides = {**RUN, "max_steps": 2, "eval_every": 2, "max_heldout_items": 1, "eval_at_start": False,
                 "lr": 1e-5, "num_generations": 2, "batch_size": 2, "lora_modules_to_save": [],
                 "nproc_per_node": 2}
    record = run_in_worker(tmp_path, "grpo", corpus, overrides, "grpo-ddp")
    logs = [e["message"] for e in events(record.run_dir, "log")]
    assert any("in each of 2 processes" in m for m in logs), logs
    assert [m for m in logs if m.startswith("published model")] == ["published model grpo-ddp:v1"]
    assert sorted(metric_series(record.run_dir, "loss/train")) == [2]


@pytest.mark.parametrize(("method", "trained"), [("prompt", 512), ("prefix", 1024)])
def test_prompt_learning_trains_a_soft_prompt_over_the_frozen_model(
    method: str, trained: int, corpus: Path, tmp_path: Path
) -> None:
    """``peft: prompt | prefix``: only the virtual positions train; the published folder is the untouched
    base plus the soft prompt, which the loader wraps back with peft and which reproduces its held-out
    metrics."""
    from dramaturg.services.evaluator.data import load_clips
    from dramaturg.services.evaluator.train import heldout_metrics

    overrides = {**RUN, "peft": method, "prompt_tokens": 8, "lr": 0.3, "max_steps": 20, "eval_every": 10,
                 "max_heldout_items": 2, "lora_modules_to_save": []}
    ctx = inline_context(tmp_path, "sft", corpus, overrides, output_model="evaluator-prompt")
    RECIPES["sft"].run(ctx)
    ctx.close()
    logs = [e["message"] for e in events(ctx.run_dir, "log")]
    # prompt: 8 embeddings × width 64; prefix: 8 positions × 2 layers × (key + value) × KV width 32
    assert any(f"({method}) from tiny: {trained:,} of" in m for m in logs), logs
    loss = metric_series(ctx.run_dir, "loss/train")
    steps = sorted(loss)
    # the random tiny head caps the logits near ln(vocab): a soft prompt alone moves the loss a little
    assert all(math.isfinite(v) for v in loss.values()) and loss[steps[-1]] < loss[steps[0]] - 0.02
    record = ModelStore(tmp_path).resolve(SERVICE, "evaluator-prompt")
    assert record.labels["peft"] == method
    model, processor = evaluator.load_evaluator(record.path)
    assert evaluator.virtual_tokens(model) == 8
    base, _ = evaluator.build_tiny_evaluator(seed=0)
    for name, param in evaluator.unwrap(model).named_parameters():  # the base stayed frozen
        assert torch.equal(param, base.get_parameter(name)), name
    folder = evaluator_dir(corpus)
    heldout = load_split(folder, "realism", "test")[:2]
    again = heldout_metrics(model, processor, heldout, load_clips(folder, heldout), detailed=False,
                            dimensions=DIMENSIONS)
    assert again["heldout/mae"] == pytest.approx(record.metrics["heldout/mae"], abs=1e-5)


def test_prompt_variations_prompt_the_training_rows(corpus: Path, tmp_path: Path) -> None:
    """``prompt_variations``: the shipped example file (Speech-DRAME's layout) is read and logged, and a
    run trains on it; a missing file stops the run before any model is built."""
    variations = Path(evaluator.__file__).with_name("prompt_variations.json")
    overrides = {**RUN, "max_steps": 2, "eval_every": 0, "max_heldout_items": 1, "eval_at_start": False,
                 "prompt_variations": str(variations)}
    ctx = inline_context(tmp_path, "sft", corpus, overrides)
    RECIPES["sft"].run(ctx)
    ctx.close()
    logs = [e["message"] for e in events(ctx.run_dir, "log")]
    said = [m for m in logs if m.startswith(f"prompt variations from {variations}: ")]
    assert len(said) == 1 and all(f"{d} 3" in said[0] for d in DIMENSIONS), logs  # 3 wordings each
    assert all(math.isfinite(v) for v in metric_series(ctx.run_dir, "loss/train").values())
    missing = inline_context(tmp_path / "missing", "sft", corpus,
                             {**overrides, "prompt_variations": "nope.json"})
    with pytest.raises(ValueError, match="not readable JSON"):
        RECIPES["sft"].run(missing)
    missing.close()
