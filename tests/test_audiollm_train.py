"""Audio-LLM training: SALMONN's stage 1 through the shared runner's context, on a tiny synthetic corpus.

One tiny corpus (grammar sentences, one scene per split, its ``audiollm/`` SALMONN annotation) and one
``stage1`` run from the tiny model built from scratch, shared by the tests: the held-out loss falls,
every checkpoint is a peft adapter with held-out figures, and the published model — LoRA merged — is a
folder ``load_audiollm`` reads and generates with, in which only the Q-Former, the projection and the
LLM's LoRA-targeted projections differ from the base (Whisper, BEATs, the rest of the LLM frozen).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from dramaturg.services.audiollm.data import (
    VARIED_INSTRUCTIONS,
    AudioItem,
    SalmonnCollator,
    annotation_file,
    diarized_edges,
    instruction_for,
    load_annotation,
)
from dramaturg.services.audiollm.model import load_audiollm
from dramaturg.services.audiollm.prompt import TASK_INSTRUCTIONS
from dramaturg.services.audiollm.recipes import PRESETS_DIR, RECIPES
from dramaturg.services.audiollm.train import ADAPTER_META, BASE_DIR
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import TRAINER_STATE_DIR
from dramaturg.shared.training.recipe import RunContext, merge_config
from dramaturg.shared.training.runs import EVENTS_FILE, EventLog, RunRecord, save_run
from safetensors.torch import load_file

log = logging.getLogger(__name__)

SERVICE = "audiollm"
STAGE1 = {
    "device": "cpu",
    "torch_threads": 1,
    "max_steps": 40,
    "eval_every": 10,
    "batch_size": 4,
    "lr": 1e-2,
    "log_every": 5,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audiollm-corpus")
    synthesize_corpus(
        out,
        SynthConfig(
            seed=3,
            num_speakers=5,
            heldout_speakers=2,
            utterances_per_speaker=2,
            scenes_train=1,
            scenes_dev=1,
            scenes_test=1,
            lines_per_scene=6,
            text_source="grammar",
        ),
    )
    return out


def inline_context(
    root: Path,
    recipe: str,
    dataset: Path,
    overrides: dict[str, Any],
    *,
    run_id: str = "inline",
    attempt: int = 1,
    **extra: Any,
) -> RunContext:
    """A RunContext without a worker subprocess (what the worker builds, minus the process)."""
    run_dir = root / "runs" / SERVICE / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(
        run_id=run_id,
        service=SERVICE,
        recipe=recipe,
        run_dir=run_dir,
        dataset_uri=str(dataset),
        config=merge_config(RECIPES[recipe].defaults, overrides),
        store_root=str(root),
        attempts=attempt,
        **extra,
    )
    save_run(record)
    return RunContext(
        record,
        EventLog(run_dir / EVENTS_FILE, run_id, attempt=attempt),
        ModelStore(root),
        progress_interval=0.0,
    )


def metric_series(run_dir: Path, key: str) -> dict[int, float]:
    found = [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
    return {e["step"]: e["values"][key] for e in found if e["type"] == "metrics" and key in e["values"]}


@pytest.fixture(scope="module")
def stage1(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    root = tmp_path_factory.mktemp("audiollm-stage1")
    ctx = inline_context(root, "stage1", corpus, STAGE1, output_model="audiollm-test")
    started = time.monotonic()
    RECIPES["stage1"].run(ctx)
    ctx.close()
    log.info("stage1 (%d steps): %.1f s", STAGE1["max_steps"], time.monotonic() - started)
    return ctx


def test_recipes_and_presets_are_valid() -> None:
    assert {"stage1", "stage2", "cpu-quick"} <= set(RECIPES)
    assert RECIPES["stage2"].defaults["prompts"] == "varied" and RECIPES["stage2"].defaults["tasks"] == []
    for path in PRESETS_DIR.glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        SynthConfig(**spec["synth"])
        merge_config(RECIPES[path.stem].defaults, spec.get("overrides"))


def test_annotation_reads_both_tasks_and_instructions(corpus: Path) -> None:
    items, left_out = load_annotation(annotation_file(corpus, "annotation_train.json"), ["asr"], 30.0)
    assert items and {it.task for it in items} == {"asr"} and left_out == {"task audiocaption_v2": len(items)}
    assert all(it.audio.dtype.name == "float32" and it.audio.ndim == 1 for it in items)
    assert instruction_for("asr", "salmonn") == TASK_INSTRUCTIONS["asr"]
    assert instruction_for("asr", "varied") == TASK_INSTRUCTIONS["asr"]  # evaluation: the test prompt
    rng = random.Random(0)
    drawn = {instruction_for("asr", "varied", rng) for _ in range(40)}
    assert drawn == set(VARIED_INSTRUCTIONS["asr"])
    train, _ = load_annotation(annotation_file(corpus, "annotation_train.json"), [], 30.0)
    held, _ = load_annotation(annotation_file(corpus, "annotation_test.json"), [], 30.0)
    asr_text = {it.text for it in train if it.task == "asr"}
    assert asr_text and not asr_text & {it.text for it in held if it.task == "asr"}  # text-disjoint


def test_edge_augment_cuts_asr_clips_as_diarized_turns_and_leaves_the_rest() -> None:
    """Each edge is trimmed, or takes in a piece of the neighbour (before it, over it), never more than
    the limit; half the clip always stays; captions, evaluation and 0 s are left alone."""
    rate = 16_000
    clip = np.full(2 * rate, 0.25, dtype=np.float32)
    neighbour = np.full(3 * rate, 0.5, dtype=np.float32)
    rng = random.Random(0)
    shapes = set()
    for _ in range(200):
        out = diarized_edges(clip, neighbour, 0.6, rng)
        assert clip.size // 2 <= out.size <= clip.size + 2 * int(0.6 * rate)
        kept = np.isclose(out, 0.25).sum() + np.isclose(out, 0.75).sum()  # alone, or under the neighbour
        assert kept >= clip.size // 2
        shapes.add((out.size < clip.size, out.size > clip.size, bool(np.isclose(out, 0.75).any())))
    assert len(shapes) >= 3  # trims, additions beside the clip, additions over it all happen
    assert diarized_edges(clip, neighbour, 0.0, rng) is clip

    class Echo:  # the processor's place: hands back the audio it was given
        def __call__(self, audio, instructions, texts):
            return {"audio": audio}

    items = [AudioItem(clip, "asr", "a", "0"), AudioItem(neighbour, "audiocaption_v2", "b", "1")]
    augmented = SalmonnCollator(Echo(), "salmonn", seed=1, edge_augment=0.6)(items)["audio"]
    assert augmented[1] is neighbour and augmented[0] is not clip
    assert SalmonnCollator(Echo(), "salmonn", edge_augment=0.6)(items)["audio"][0] is clip  # evaluation
    assert SalmonnCollator(Echo(), "salmonn", seed=1)(items)["audio"][0] is clip  # off by default


def test_stage1_held_out_loss_falls_and_checkpoints_are_adapters(stage1: RunContext) -> None:
    series = metric_series(stage1.run_dir, "loss/val")
    steps = sorted(series)
    assert steps[0] == 0 and steps[-1] == STAGE1["max_steps"]
    log.info("stage1 held-out loss: %s", {s: round(series[s], 3) for s in steps})
    published = stage1.store.resolve(SERVICE, "audiollm-test")
    # the LLM is the tiny random one, frozen: its tied 64-wide embeddings (std 0.02) cap how far any
    # logit can move, so the fall is small in nats (measured 6.92 -> 6.72) but steady
    assert published.metrics["loss/val"] < series[0] - 0.1
    assert series[steps[-1]] < series[steps[1]] < series[0]
    assert published.metrics["merge/max_abs_diff"] <= 1e-3
    for checkpoint in stage1.checkpoints():
        assert "loss/val" in checkpoint.metrics
        assert (checkpoint.path / "adapter_config.json").is_file()
        assert (checkpoint.path / ADAPTER_META).is_file()
    saved = load_file(str(stage1.checkpoints()[-1].path / "adapter_model.safetensors"))
    # the adapter holds LoRA on the LLM's attention and the Q-Former / projection, nothing else
    assert all(
        re.search(r"language_model\.model\.layers\.\d+\.self_attn\.[qkvo]_proj\.lora_[AB]", k)
        or ".speech_qformer." in k
        or ".speech_projection." in k
        for k in saved
    ), sorted(saved)


def test_published_model_loads_generates_and_only_trained_parts_changed(stage1: RunContext) -> None:
    published = stage1.store.resolve(SERVICE, "audiollm-test")
    model, processor = load_audiollm(published.path)
    base, _ = load_audiollm(stage1.run_dir / BASE_DIR)
    after, before = dict(model.state_dict()), dict(base.state_dict())
    assert set(after) == set(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    lora_targets = re.compile(r"language_model\.model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight")
    trained = ("speech_qformer.", "speech_projection.")
    allowed = {k for k in after if k.startswith(trained) or lora_targets.match(k)}
    assert changed and changed <= allowed, sorted(changed - allowed)
    assert any(k.startswith("speech_qformer.") for k in changed)
    assert any(k.startswith("speech_projection.") for k in changed)
    assert any(lora_targets.match(k) for k in changed)
    # encoders and the LLM's own weights frozen (as loaded) and untouched
    assert not any(p.requires_grad for p in model.whisper.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())

    dataset = Path(stage1.record.dataset_uri)
    items, _ = load_annotation(annotation_file(dataset, "annotation_test.json"), ["asr"], 30.0)
    batch = SalmonnCollator(processor, "salmonn")(items[:2])
    batch.pop("labels")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]
    texts = processor.batch_decode(out, prompt_length=batch["input_ids"].shape[1])
    log.info("generated: %s", texts)
    assert all(isinstance(t, str) for t in texts)


def test_stage2_continues_from_the_published_stage1_model(stage1: RunContext, tmp_path: Path) -> None:
    """stage2 takes stage 1's published model by store ref, trains it with varied instructions, publishes."""
    root = Path(stage1.store.root)
    run_dir = root / "runs" / SERVICE / "inline"
    moved = tmp_path / "stage1-run"
    run_dir.rename(moved)  # stage 2 gets a fresh run folder in the same store
    try:
        overrides = {**STAGE1, "max_steps": 10, "eval_every": 5, "base_model": "audiollm-test"}
        ctx = inline_context(
            root, "stage2", Path(stage1.record.dataset_uri), overrides, output_model="stage2"
        )
        RECIPES["stage2"].run(ctx)
        ctx.close()
        stage1_model = stage1.store.resolve(SERVICE, "audiollm-test")
        published = stage1.store.resolve(SERVICE, "stage2")
        assert published.labels["base_model"] == stage1_model.ref and published.labels["stage"] == "stage2"
        assert not (ctx.run_dir / BASE_DIR).exists()  # a published base is not copied
        series = metric_series(ctx.run_dir, "loss/val")
        assert series[0] == pytest.approx(stage1_model.metrics["loss/val"], rel=1e-4)  # stage 1's figure
        model, _ = load_audiollm(published.path)
        assert not any(p.requires_grad for p in model.language_model.parameters())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        moved.rename(run_dir)


def test_a_cancelled_run_resumes_from_its_checkpoint(corpus: Path, tmp_path: Path) -> None:
    overrides = {**STAGE1, "max_steps": 10, "eval_every": 5, "eval_at_start": False}
    first = inline_context(tmp_path, "stage1", corpus, overrides, run_id="resume", output_model="resumed")
    save = first.save_checkpoint

    def save_then_stop(*args: Any, **kwargs: Any) -> str:  # a cancel right after the first checkpoint
        checkpoint = save(*args, **kwargs)
        first.request_stop()
        return checkpoint

    first.save_checkpoint = save_then_stop  # type: ignore[method-assign]
    RECIPES["stage1"].run(first)
    first.close()
    assert [c.step for c in first.checkpoints()] == [5]
    with pytest.raises(Exception, match="resumed"):
        ModelStore(tmp_path).resolve(SERVICE, "resumed")

    second = inline_context(
        tmp_path, "stage1", corpus, overrides, run_id="resume", attempt=2, output_model="resumed"
    )
    RECIPES["stage1"].run(second)
    second.close()
    said = [json.loads(line) for line in (second.run_dir / EVENTS_FILE).read_text().splitlines()]
    assert any(e["type"] == "log" and e["message"] == "resuming from step-00000005" for e in said)
    resumed = [e["step"] for e in said if e["type"] == "progress" and e["attempt"] == 2]
    assert resumed and min(resumed) > 5
    assert [c.step for c in second.checkpoints()] == [5, 10]
    state = json.loads((second.checkpoints()[-1].path / TRAINER_STATE_DIR / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    record = ModelStore(tmp_path).resolve(SERVICE, "resumed")
    assert record.labels["base_model"] == "tiny (seed 0)" and "loss/val" in record.metrics


def test_two_gloo_processes_train_one_run_under_torchrun(corpus: Path, tmp_path: Path) -> None:
    """``nproc_per_node: 2``: the runner starts the attempt under torchrun; two CPU processes train one
    DistributedDataParallel model over gloo, rank 0 alone writes the run's checkpoints and publishes."""
    from dramaturg.shared.registry import recipes_path
    from dramaturg.shared.training.runner import TrainingRunner
    from dramaturg.shared.training.runs import WORKER_LOG, list_checkpoints

    store = ModelStore(tmp_path)
    runner = TrainingRunner(tmp_path, SERVICE, recipes_path(SERVICE), store)
    overrides = {**STAGE1, "max_steps": 6, "eval_every": 3, "batch_size": 2, "nproc_per_node": 2}
    try:
        record = runner.run_inline("stage1", str(corpus), overrides, output_model="audiollm-ddp")
    finally:
        runner.close()
    worker_log = (record.run_dir / WORKER_LOG).read_text()
    assert record.state == "SUCCEEDED", worker_log[-4000:]
    for rank in (0, 1):
        assert f"data parallel: 2 processes (gloo), this is rank {rank}" in worker_log
    assert "in each of 2 processes" in worker_log
    # the books were kept once: one checkpoint per evaluation, one publish, one progress stream
    assert [c.step for c in list_checkpoints(record.run_dir)] == [3, 6]
    events = [json.loads(line) for line in (record.run_dir / EVENTS_FILE).read_text().splitlines()]
    checkpoints = [e["checkpoint"]["step"] for e in events if e["type"] == "checkpoint"]
    assert checkpoints == [3, 6]
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    assert sorted(metric_series(record.run_dir, "loss/val")) == [0, 3, 6]
    published = store.resolve(SERVICE, record.published_model)
    model, _ = load_audiollm(Path(published.path))
    assert model is not None


def test_lora_r_0_with_unfreeze_trains_whisper_and_the_llm_in_full(corpus: Path, tmp_path: Path) -> None:
    """A tiny model from scratch has no pretrained Whisper or LLM to keep: ``lora_r: 0`` and
    ``unfreeze`` train them in full; checkpoints are whole models; the published one is re-frozen."""
    overrides = {
        **STAGE1,
        "max_steps": 6,
        "eval_every": 3,
        "lora_r": 0,
        "unfreeze": ["whisper", "language_model"],
    }
    ctx = inline_context(tmp_path, "stage1", corpus, overrides, run_id="full", output_model="full")
    RECIPES["stage1"].run(ctx)
    ctx.close()
    for checkpoint in ctx.checkpoints():
        assert not (checkpoint.path / "adapter_config.json").exists()
        load_audiollm(checkpoint.path)  # a whole model folder
    published = ModelStore(tmp_path).resolve(SERVICE, "full")
    assert published.metrics["merge/max_abs_diff"] == 0.0
    model, _ = load_audiollm(published.path)
    base, _ = load_audiollm(ctx.run_dir / BASE_DIR)
    after, before = dict(model.state_dict()), dict(base.state_dict())
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert {"whisper", "language_model", "speech_qformer", "speech_projection"} <= changed
    assert not any(p.requires_grad for p in model.whisper.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())


@pytest.mark.parametrize(
    ("parts", "lora", "message"),
    [
        (["decoder"], False, "not one of"),
        (["language_model"], True, "lora_r: 0"),
    ],
)
def test_unfreeze_refuses_what_it_cannot_train(parts: list[str], lora: bool, message: str) -> None:
    from dramaturg.services.audiollm.model import build_tiny_audiollm, unfreeze

    model, _ = build_tiny_audiollm(seed=0)
    with pytest.raises(ValueError, match=message):
        unfreeze(model, parts, lora=lora)
    without_beats, _ = build_tiny_audiollm(seed=0, use_beats=False)
    with pytest.raises(ValueError, match="no beats"):
        unfreeze(without_beats, ["beats"], lora=False)


def test_a_model_section_changes_only_the_fields_it_names() -> None:
    """``model: {text_config: {hidden_size: 96}}`` widens the tiny LLM and keeps the tiny rest (not
    transformers' own defaults); the Q-Former reads the encoder's new width."""
    from dramaturg.services.audiollm.model import build_tiny_audiollm

    tiny, _ = build_tiny_audiollm(seed=0, use_beats=False)
    wider, _ = build_tiny_audiollm(
        seed=0,
        use_beats=False,
        text_config={"hidden_size": 96},
        whisper_config={"d_model": 48},
        qformer_config={"hidden_size": 80},
    )
    assert wider.config.text_config.hidden_size == 96
    assert wider.config.text_config.num_hidden_layers == tiny.config.text_config.num_hidden_layers
    assert wider.config.whisper_config.d_model == 48
    assert wider.config.whisper_config.max_source_positions == tiny.config.whisper_config.max_source_positions
    assert wider.config.qformer_config.hidden_size == 80
    assert wider.config.qformer_config.encoder_hidden_size == 48
