"""TTS training: the fish-speech recipe through the shared runner, on a tiny synthetic corpus.

One tiny corpus per module (``synthesize_corpus``: 4 espeak voices × 5 lines, plus two accidents the
scan must report), and one trained pipeline shared by several tests (``full`` with ``codec: train``:
the codec stage, then the LM, published). Each stage is checked against what it promises: the
codes path equals CSM's own audio path, the split is text-disjoint, the codec and LM losses fall
(held-out), every checkpoint's held-out figures are logged, LoRA trains only adapter weights and
merges exactly, per-speaker adapters are published with the base and speaker they belong to and
hot-swap on one base, a cancelled codec stage and a killed run resume from their checkpoints.

The learning check (``cpu-quick`` on its ``synth:`` corpus) is marked slow:
``.venv/bin/pytest -m slow tests/test_tts_train.py -o log_cli=true --log-cli-level=INFO``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from dramaturg.services.tts import model as tts
from dramaturg.services.tts.bridge import HELDOUT_CSV, read_heldout, stage_of
from dramaturg.services.tts.collate import (
    CsmCodesCollator,
    TtsItem,
    csm_forward,
    heldout_texts,
    normalise_text,
    speaker_ids,
    split_by_text,
)
from dramaturg.services.tts.recipes import PRESETS_DIR, RECIPES
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import TRAINER_STATE_DIR, TrainingRunner
from dramaturg.shared.training.recipe import RunContext, merge_config
from dramaturg.shared.training.runs import EVENTS_FILE, EventLog, RunRecord, process_alive, save_run
from helpers import wait_for

log = logging.getLogger(__name__)

SERVICE = "tts"
RECIPES_PATH = "dramaturg.services.tts.recipes:RECIPES"
FAST = {
    "device": "cpu",
    "torch_threads": 1,
    "log_every": 5,
    "batch_size": 4,
    "codec_batch_size": 4,
    "codec_eval_clips": 4,
    "codec_kmeans_crops": 16,
    "codec_kmeans_iters": 5,
}
# the shared pipeline: codec stage (30 steps), then the LM from scratch (40 steps)
PIPELINE = {
    **FAST,
    "codec": "train",
    "codec_max_steps": 30,
    "codec_eval_every": 15,
    "max_steps": 40,
    "eval_every": 10,
}
MERGE_TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic corpus (its tts/ tree: 4 voices × 5 lines, lines shared between voices) plus an empty
    transcript and a clip too short to learn from, which the scan must report and leave out."""
    out = tmp_path_factory.mktemp("tts-corpus")
    synthesize_corpus(
        out,
        SynthConfig(
            seed=5,
            num_speakers=4,
            heldout_speakers=2,
            utterances_per_speaker=5,
            scenes_train=1,
            scenes_dev=1,
            scenes_test=1,
            lines_per_scene=2,
        ),
    )
    voice = sorted(p for p in (out / "tts").iterdir() if p.is_dir())[0]
    sf.write(str(voice / "empty.wav"), np.zeros(16000, np.float32) + 0.01, 16000)
    (voice / "empty.lab").write_text("  \n")
    sf.write(str(voice / "short.wav"), np.zeros(1600, np.float32) + 0.01, 16000)
    (voice / "short.lab").write_text("Ah.\n")
    return out


def inline_context(
    root: Path,
    recipe: str,
    dataset: Path,
    overrides: dict[str, Any],
    *,
    run_id: str = "inline",
    attempt: int = 1,
    output_model: str = "",
    base_model: str = "",
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
        output_model=output_model,
        base_model=base_model,
        attempts=attempt,
    )
    save_run(record)
    return RunContext(
        record,
        EventLog(run_dir / EVENTS_FILE, run_id, attempt=attempt),
        ModelStore(root),
        progress_interval=0.0,
    )


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
    return [e for e in found if e["type"] == kind]


def metric_series(run_dir: Path, key: str) -> dict[int, float]:
    return {e["step"]: e["values"][key] for e in events(run_dir, "metrics") if key in e["values"]}


def messages(run_dir: Path) -> list[str]:
    return [e["message"] for e in events(run_dir, "log")]


@pytest.fixture(scope="module")
def pipeline(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    """``full`` with ``codec: train``, run once: the codec stage, then the LM from scratch, both published."""
    root = tmp_path_factory.mktemp("tts-pipeline")
    ctx = inline_context(root, "full", corpus, PIPELINE, run_id="pipeline", output_model="tts-test")
    started = time.monotonic()
    RECIPES["full"].run(ctx)
    ctx.close()
    log.info(
        "pipeline (codec %d + LM %d steps): %.1f s",
        PIPELINE["codec_max_steps"],
        PIPELINE["max_steps"],
        time.monotonic() - started,
    )
    return ctx


# ------------------------------------------------------------------------------------------ pieces


def test_codes_path_equals_csms_own_audio_path() -> None:
    """Training from stored codes gives CSM's loss exactly: same prompt, same embeddings, same labels."""
    model, processor = tts.build_tiny_tts_model(seed=0)
    audio = (np.random.default_rng(0).standard_normal(30000) * 0.1).astype(np.float32)
    reference_inputs = tts.training_inputs(processor, "Who left the door open?", audio, speaker=3)
    with torch.no_grad():
        reference = model(**reference_inputs)
        codes = model.codec_model.encode(torch.from_numpy(audio)[None, None]).audio_codes[0]
    collator = CsmCodesCollator(processor, model.config)
    batch = collator(
        [
            {"speaker_id": 3, "text": "Who left the door open?", "codes": codes.numpy()},
            {"speaker_id": 1, "text": "Nobody.", "codes": codes[:, :5].numpy()},
        ]
    )
    assert torch.equal(batch["input_ids"][:1], reference_inputs["input_ids"])
    with torch.no_grad():
        ours = csm_forward(model, {k: v[:1] for k, v in batch.items()})
        padded = csm_forward(model, batch)  # a shorter second item pads the first: its logits do not move
    for name in ("loss", "backbone_loss", "depth_decoder_loss"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.logits, reference.logits, rtol=0, atol=1e-5)
    length = reference_inputs["input_ids"].shape[1]
    torch.testing.assert_close(padded.logits[:1, :length], ours.logits, rtol=0, atol=1e-5)
    # a depth-decoder share keeps every frame for the backbone and a share of them for the depth decoder
    torch.manual_seed(0)
    sparse = CsmCodesCollator(processor, model.config, depth_decoder_ratio=0.25)(
        [{"speaker_id": 0, "text": "x", "codes": codes.numpy()}]
    )["labels"]
    frames = int((sparse[0, :, 0] >= 0).sum())
    assert frames == codes.shape[1] + 1  # every frame and the audio end train the backbone
    kept = codes.shape[1] - int(codes.shape[1] * 0.75)
    assert int((sparse[0, :, 1:] >= 0).all(dim=-1).sum()) == kept + 1


def test_split_is_text_disjoint_stable_and_never_empty() -> None:
    lines = [f"Line number {i}, said plainly." for i in range(200)]
    items = [
        TtsItem(spk, i, text, np.zeros((8, 3), np.int16)) for i, spk in enumerate("ab") for text in lines
    ]
    items.append(TtsItem("c", 2, "LINE number 7 said plainly!", np.zeros((8, 3), np.int16)))  # = line 7
    train, heldout = split_by_text(items, 0.2)
    held = {normalise_text(it.text) for it in heldout}
    assert held and not held & {normalise_text(it.text) for it in train}
    assert 0.1 < len(held) / 200 < 0.3
    for text in held:  # a held-out line is held out for every voice that speaks it
        assert {it.speaker for it in heldout if normalise_text(it.text) == text} >= {"a", "b"}
    assert split_by_text(list(reversed(items)), 0.2)[1] != []  # order does not matter
    assert {normalise_text(it.text) for it in split_by_text(list(reversed(items)), 0.2)[1]} == held
    assert len(heldout_texts(["one", "two"], 0.01)) == 1  # a tiny corpus still gets one held-out line
    assert heldout_texts(lines[:40], 0.2) == {"line number 6 said plainly"}  # none under 0.2: the lowest
    assert heldout_texts(["only"], 0.5) == set() and heldout_texts(lines, 0.0) == set()
    assert speaker_ids(["b", "a", "z"], {"z": 4}) == {"z": 4, "a": 5, "b": 6}


def test_activation_checkpointing_gives_the_same_lora_gradients() -> None:
    """csm-1b-lora checkpoints activations; CSM's depth decoder breaks under transformers' own set-up
    (an in-place write into an embedding output made to require grad), so the recipe sets it up itself."""
    from dramaturg.services.tts.train import checkpoint_activations, lora_config
    from peft import get_peft_model

    cfg = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": "both"}
    grads = []
    for checkpointing in (False, True):
        model, processor = tts.build_tiny_tts_model(seed=0)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, lora_config(cfg))
        if checkpointing:
            checkpoint_activations(model)
        peft_model.train()
        codes = np.random.default_rng(0).integers(1, 64, (8, 9))
        batch = CsmCodesCollator(processor, model.config)([{"speaker_id": 0, "text": "hi", "codes": codes}])
        csm_forward(peft_model, batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(float(g.abs().max()) > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_recipes_and_presets_are_valid() -> None:
    assert {"codec", "full", "lora", "merge", "cpu-quick", "demo", "csm-1b-lora"} <= set(RECIPES)
    lora = RECIPES["lora"].defaults
    assert (lora["lora_r"], lora["lora_alpha"], lora["method"]) == (8, 16, "lora")
    production = RECIPES["csm-1b-lora"].defaults
    assert production["base_model"] == "sesame/csm-1b" and production["method"] == "lora"
    assert (production["lora_r"], production["lora_alpha"]) == (8, 16)
    for name in ("cpu-quick", "demo"):
        spec = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
        assert spec["dataset"] == "synthetic" and spec["output_model"]
        SynthConfig(**spec["synth"])
        assert RECIPES[name].defaults["method"] == "full" and RECIPES[name].defaults["codec"] == "train"
    demo, check = (yaml.safe_load((PRESETS_DIR / f"{n}.yaml").read_text()) for n in ("demo", "cpu-quick"))
    assert float(demo["estimated_minutes"]) <= 5
    for key in ("max_steps", "codec_max_steps"):
        assert demo["overrides"][key] < check["overrides"][key]


# ----------------------------------------------------------------------------- the shared pipeline


def test_data_stages_report_what_they_leave_out(pipeline: RunContext) -> None:
    said = messages(pipeline.run_dir)
    scan = next(m for m in said if m.startswith("scan: "))
    assert "20 pairs from 4 speakers" in scan and "skipped 2" in scan
    warnings = [e["message"] for e in events(pipeline.run_dir, "log") if e["level"] == "WARNING"]
    assert any("empty.lab" in m and "empty text" in m for m in warnings)
    assert any("short.wav" in m and "too short" in m for m in warnings)
    assert any(m.startswith("normalise: normalised 20 clips to -23 LUFS") for m in said)
    assert any(m.startswith("extract: extracted codes for 20 clips") for m in said)
    assert any(m.startswith("pack: packed 20 sentences of 4 speakers") for m in said)
    shards = pipeline.run_dir / "data" / "shards"
    assert sorted(shards.glob("*.protos")) and (shards / ".built.json").exists()
    npys = sorted((pipeline.run_dir / "data" / "normalized").rglob("*.npy"))
    assert len(npys) == 20 and np.load(npys[0]).shape[0] == 8  # (codebooks, frames) beside each clip


def test_level_envelope_correlation_tells_a_following_codec_from_a_stationary_one() -> None:
    """The codec's health figure: a copy at another level and with a little noise follows (≈ 1); steady
    noise at the clip's average level does not (≈ 0); silence is NaN, not a number to average."""
    from dramaturg.services.tts.codec_train import level_envelope_correlation

    rate = 24_000
    rng = np.random.default_rng(0)
    t = np.arange(2 * rate) / rate
    syllables = (np.sin(2 * np.pi * 4 * t) > 0).astype(np.float64)  # 4 bursts a second
    speech = syllables * rng.standard_normal(t.size) * 0.1
    assert (
        level_envelope_correlation(0.3 * speech + 0.001 * rng.standard_normal(t.size), speech, rate=rate)
        > 0.9
    )
    steady = rng.standard_normal(t.size) * speech.std()
    assert abs(level_envelope_correlation(steady, speech, rate=rate)) < 0.2
    assert np.isnan(level_envelope_correlation(np.zeros_like(speech), speech, rate=rate))


def test_voiced_frames_tell_a_voiced_codec_from_a_whispering_one() -> None:
    """The codec's voicing figure: a pitched copy is as voiced as the speech; noise under the same
    envelope (what a codec trained on spectral losses alone can answer) has no voiced frames."""
    from dramaturg.services.tts.codec_train import voiced_frames

    rate = 24_000
    rng = np.random.default_rng(0)
    t = np.arange(2 * rate) / rate
    syllables = (np.sin(2 * np.pi * 2 * t) > 0).astype(np.float64)
    vowel = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    speech = 0.1 * syllables * vowel
    out, ref = voiced_frames(0.5 * speech, speech, rate=rate)
    assert ref > 50 and out / ref > 0.9
    whisper = syllables * rng.standard_normal(t.size) * speech.std()
    out, ref = voiced_frames(whisper, speech, rate=rate)
    assert out / ref < 0.1


def test_codec_stage_learns_and_is_published(pipeline: RunContext) -> None:
    from transformers import MimiModel

    held = metric_series(pipeline.run_dir, "codec/val_stft")
    assert sorted(held) == [0, 15, 30]
    assert held[30] < 0.7 * held[0], held
    assert any("codec/val_level_corr" in e["values"] for e in events(pipeline.run_dir, "metrics"))
    train = metric_series(pipeline.run_dir, "codec/loss_train")
    assert train[max(train)] < train[min(train)]
    assert {"codec/stft", "codec/commitment", "codec/l1"} <= {
        k for e in events(pipeline.run_dir, "metrics") for k in e["values"]
    }
    store = ModelStore(pipeline.store.root)
    codec_record = store.resolve(SERVICE, "tts-test-codec")
    assert codec_record.architecture == "mimi" and codec_record.labels["kind"] == "codec"
    codec = MimiModel.from_pretrained(str(codec_record.path))
    # the EMA codebooks moved off their k-means start and decode distinct centroids
    codebook = codec.quantizer.acoustic_residual_vector_quantizer.layers[0].codebook
    assert float(codebook.cluster_usage.std()) > 0 and torch.isfinite(codebook.embed_sum).all()
    assert len(torch.unique(codebook.embed.round(decimals=4), dim=0)) > 0.5 * codebook.codebook_size
    # the LM was trained over exactly this codec
    lm = store.resolve(SERVICE, "tts-test")
    model, _ = tts.load_tts_model(lm.path)
    for name, tensor in codec.state_dict().items():
        torch.testing.assert_close(model.codec_model.state_dict()[name], tensor, rtol=0, atol=0)


def test_full_recipe_loss_falls_and_every_checkpoint_has_held_out_figures(pipeline: RunContext) -> None:
    held = metric_series(pipeline.run_dir, "loss/val")
    offset = PIPELINE["codec_max_steps"]
    assert sorted(held) == [offset + s for s in (0, 10, 20, 30, 40)]
    assert held[offset + 40] < 0.75 * held[offset], held
    train = metric_series(pipeline.run_dir, "loss/train")
    lm_steps = sorted(s for s in train if s > offset)
    assert np.mean([train[s] for s in lm_steps[-2:]]) < 0.8 * np.mean([train[s] for s in lm_steps[:2]])

    saved = [e["checkpoint"] for e in events(pipeline.run_dir, "checkpoint")]
    lm_saved = [c for c in saved if c["step"] > offset]
    assert [c["step"] for c in lm_saved] == [offset + s for s in (10, 20, 30, 40)]
    for checkpoint in lm_saved:  # held-out figures for every checkpoint, for choosing the earliest good one
        assert {"loss/val", "loss/val_backbone", "loss/val_depth"} <= set(checkpoint["metrics"])
    rows = [r for r in read_heldout(pipeline.run_dir) if r["stage"] == "lm"]
    assert [int(r["step"]) for r in rows] == sorted(held)
    assert all(float(r["loss/val"]) == pytest.approx(held[int(r["step"])], rel=1e-5) for r in rows)
    assert any(
        "held-out figures of the kept checkpoints" in m and "<- published" in m
        for m in messages(pipeline.run_dir)
    )

    record = ModelStore(pipeline.store.root).resolve(SERVICE, "tts-test")
    assert record.architecture == "csm" and record.labels["kind"] == "model"
    assert record.metrics["loss/val"] == pytest.approx(min(held.values()))
    assert not (record.path / TRAINER_STATE_DIR).exists()
    speakers = json.loads((record.path / "speakers.json").read_text())
    assert sorted(speakers.values()) == [0, 1, 2, 3]
    model, processor = tts.load_tts_model(record.path)
    audio, rate = tts.synthesize(model, processor, "Hello.", speaker=0, max_new_frames=6, seed=0)
    assert rate == tts.SAMPLE_RATE and np.isfinite(audio).all() and len(audio) > 0


def test_a_cancelled_codec_stage_resumes_from_its_checkpoint(corpus: Path, tmp_path: Path) -> None:
    fast = {k: v for k, v in FAST.items() if k in RECIPES["codec"].defaults}
    overrides = {**fast, "codec_max_steps": 20, "codec_eval_every": 10, "eval_at_start": False}
    first = inline_context(tmp_path, "codec", corpus, overrides, run_id="codec", output_model="codec-test")
    save = first.save_checkpoint

    def save_then_stop(*args: Any, **kwargs: Any) -> str:  # a cancel right after the first checkpoint
        checkpoint = save(*args, **kwargs)
        first.request_stop()
        return checkpoint

    first.save_checkpoint = save_then_stop  # type: ignore[method-assign]
    RECIPES["codec"].run(first)
    first.close()
    assert [c.step for c in first.checkpoints()] == [10]
    assert not (first.run_dir / "codec" / "done.json").exists()
    with pytest.raises(Exception, match="codec-test"):
        ModelStore(tmp_path).resolve(SERVICE, "codec-test")

    second = inline_context(
        tmp_path, "codec", corpus, overrides, run_id="codec", attempt=2, output_model="codec-test"
    )
    RECIPES["codec"].run(second)
    second.close()
    assert any(m == "codec: resuming from step-00000010" for m in messages(second.run_dir))
    resumed = [e["step"] for e in events(second.run_dir, "progress") if e["attempt"] == 2]
    assert resumed and min(resumed) > 10
    assert [c.step for c in second.checkpoints()] == [10, 20]
    state = json.loads((second.checkpoints()[-1].path / TRAINER_STATE_DIR / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    record = ModelStore(tmp_path).resolve(SERVICE, "codec-test")
    assert record.architecture == "mimi" and "codec/val_stft" in record.metrics


# ----------------------------------------------------------------------------------- LoRA and merge


def _peft_outputs(base_path: Path, adapter: Path, batch: dict[str, torch.Tensor]) -> Any:
    from peft import PeftModel

    model, _ = tts.load_tts_model(base_path)
    with torch.no_grad():
        return csm_forward(PeftModel.from_pretrained(model, str(adapter)).eval(), batch)


def test_lora_trains_only_the_adapter_and_merges_exactly(pipeline: RunContext, corpus: Path) -> None:
    root = Path(pipeline.store.root)
    store = ModelStore(root)
    base = store.resolve(SERVICE, "tts-test")
    overrides = {
        **FAST,
        "base_model": "tts-test",
        "max_steps": 12,
        "eval_every": 6,
        "lr": 3e-3,
        "lora_targets": "backbone",
        "merge_after": True,
    }
    ctx = inline_context(
        root, "lora", corpus, overrides, run_id="lora", output_model="tts-lora", base_model="tts-test"
    )
    RECIPES["lora"].run(ctx)
    ctx.close()
    adapter = store.resolve(SERVICE, "tts-lora")
    assert adapter.architecture == "csm-lora" and adapter.labels["base_model"] == base.ref
    meta = json.loads((adapter.path / "adapter_meta.json").read_text())
    assert meta["base_model"] == base.ref and (meta["lora_r"], meta["lora_alpha"]) == (8, 16)
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    said = messages(ctx.run_dir)
    trained = next(m for m in said if m.startswith("lora: "))
    assert trained.startswith("lora: 16,384 of ")  # 2 layers × 7 backbone projections, r 8, width 64/128

    from safetensors.torch import load_file

    weights = load_file(str(adapter.path / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights)  # the adapter holds LoRA weights only
    assert all("backbone_model" in name for name in weights)  # lora_targets: backbone
    assert any("lora_B" in name and float(t.abs().max()) > 0 for name, t in weights.items())  # B left zero
    model, processor = tts.load_tts_model(base.path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter.path))
    for name, tensor in peft_model.get_base_model().state_dict().items():  # the base is untouched
        plain = name.replace(".base_layer", "")
        if "lora_" not in name:
            torch.testing.assert_close(tensor, before[plain], rtol=0, atol=0)

    # merge_after published base + adapter merged; the merge recipe does the same from the adapter's metadata
    merged_after = store.resolve(SERVICE, "tts-lora-merged")
    assert merged_after.metrics["merge/max_abs_diff"] < MERGE_TOLERANCE
    merge_ctx = inline_context(
        root, "merge", corpus, {"adapter": "tts-lora"}, run_id="merge", output_model="tts-merged"
    )
    RECIPES["merge"].run(merge_ctx)
    merge_ctx.close()
    merged = store.resolve(SERVICE, "tts-merged")
    assert merged.labels["adapter"] == adapter.ref and merged.labels["base_model"] == base.ref
    shards = pipeline.run_dir / "data" / "shards"
    from dramaturg.services.tts.prepare import load_items

    items = load_items(shards, json.loads((base.path / "speakers.json").read_text()))[:4]
    collator = CsmCodesCollator(processor, model.config)
    batch = collator([{"speaker_id": it.speaker_id, "text": it.text, "codes": it.codes} for it in items])
    unmerged = _peft_outputs(base.path, adapter.path, batch)
    with torch.no_grad():
        plain = csm_forward(tts.load_tts_model(base.path)[0], batch)
    assert float((unmerged.logits - plain.logits).abs().max()) > 1e-4  # the adapter does change the outputs
    for record in (merged, merged_after):
        merged_model, _ = tts.load_tts_model(record.path)
        assert not any("lora" in name for name, _ in merged_model.named_parameters())
        with torch.no_grad():
            out = csm_forward(merged_model, batch)
        for name in ("logits", "depth_decoder_logits"):
            gap = float((getattr(out, name) - getattr(unmerged, name)).abs().max())
            assert gap < MERGE_TOLERANCE, (record.ref, name, gap)


def test_per_speaker_adapters_are_published_with_their_base_and_speaker(
    pipeline: RunContext, corpus: Path
) -> None:
    from peft import PeftModel

    root = Path(pipeline.store.root)
    store = ModelStore(root)
    base = store.resolve(SERVICE, "tts-test")
    speakers_map = json.loads((base.path / "speakers.json").read_text())
    voices = sorted(speakers_map)[:2]
    overrides = {
        **FAST,
        "base_model": "tts-test",
        "max_steps": 4,
        "eval_every": 4,
        "lr": 3e-3,
        "speakers": voices,
        "eval_at_start": False,
    }
    ctx = inline_context(root, "lora", corpus, overrides, run_id="voices", output_model="voice")
    RECIPES["lora"].run(ctx)
    ctx.close()
    records = [store.resolve(SERVICE, f"voice-{v}") for v in voices]
    for voice, record in zip(voices, records, strict=True):
        meta = json.loads((record.path / "adapter_meta.json").read_text())
        assert meta["speaker"] == voice and meta["speaker_id"] == speakers_map[voice]
        assert meta["base_model"] == base.ref
        assert record.labels["speaker"] == voice and record.labels["speaker_id"] == str(speakers_map[voice])
        assert record.labels["kind"] == "lora-adapter" and record.labels["base_model"] == base.ref
    checkpoints = ctx.checkpoints()
    assert {stage_of(c)["speaker"] for c in checkpoints} <= set(voices)
    assert [c.step for c in checkpoints] == [4, 8]  # one axis: the second voice after the first
    assert json.loads((ctx.run_dir / "adapters.json").read_text()) == {
        v: r.ref for v, r in zip(voices, records, strict=True)
    }
    # the server's hot swap: both adapters on one base, switched by name
    model, processor = tts.load_tts_model(base.path)
    swapped = PeftModel.from_pretrained(model, str(records[0].path), adapter_name=voices[0])
    swapped.load_adapter(str(records[1].path), adapter_name=voices[1])
    batch = CsmCodesCollator(processor, model.config)(
        [{"speaker_id": 0, "text": "swap", "codes": np.ones((8, 4), np.int64)}]
    )
    outs = []
    with torch.no_grad():
        for voice in voices:
            swapped.set_adapter(voice)
            outs.append(csm_forward(swapped.eval(), batch).logits)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-6
    # run again (a resumed run): the adapters already published are not trained again
    again = inline_context(root, "lora", corpus, overrides, run_id="voices", output_model="voice", attempt=2)
    RECIPES["lora"].run(again)
    again.close()
    assert sum("already published" in m for m in messages(again.run_dir)) == 2
    assert len(store.list(SERVICE, f"voice-{voices[0]}")) == 1


# ------------------------------------------------------------------------------------- crash resume


def test_killed_run_resumes_from_its_checkpoint_and_publishes(
    pipeline: RunContext, corpus: Path, tmp_path: Path
) -> None:
    codec = ModelStore(pipeline.store.root).resolve(SERVICE, "tts-test-codec")
    root = tmp_path / "state"
    store = ModelStore(root)
    first = TrainingRunner(root, SERVICE, RECIPES_PATH, store, grace_seconds=5.0)
    overrides = {
        **FAST,
        "codec": str(codec.path),
        "max_steps": 120,
        "eval_every": 20,
        "batch_size": 8,
        "eval_at_start": False,
    }
    run = first.start("full", str(corpus), overrides, output_model="tts-resumed")
    try:
        wait_for(
            lambda: any(c.step >= 20 for c in first.checkpoints(run.run_id)),
            120,
            "the first checkpoint",
            interval=0.02,
        )
        victim = first.get(run.run_id)
        first.close(stop_workers=False)  # the server is gone too: nobody watches the worker
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(victim.pid, victim.pid_start_time), 10, "the worker to die")
        assert first.get(run.run_id).state == "RUNNING" and first.get(run.run_id).step < 120
    finally:
        first.close(stop_workers=False)

    second = TrainingRunner(root, SERVICE, RECIPES_PATH, store, grace_seconds=5.0)
    try:
        assert second.recover() == [run.run_id]
        final = second.wait(run.run_id, timeout=240)
    finally:
        second.close()
    assert final.state == "SUCCEEDED", final.error
    assert final.attempts == 2 and final.resumed_from is not None and final.resumed_from["step"] >= 20
    all_events = second.events(run.run_id)
    resumed_steps = [e["step"] for e in all_events if e["type"] == "progress" and e["attempt"] == 2]
    assert resumed_steps and min(resumed_steps) > final.resumed_from["step"]  # not from zero
    said = [e["message"] for e in all_events if e["type"] == "log" and e["attempt"] == 2]
    assert any(m.startswith("normalise: normalised 0 clips") and "20 already done" in m for m in said)
    assert any(m.startswith("extract + pack: already done") for m in said)
    assert any(m.startswith("lm: resuming from step-") for m in said)
    last = second.checkpoints(run.run_id)[-1]
    assert last.step == 120 and "loss/val" in last.metrics
    state = json.loads((last.path / TRAINER_STATE_DIR / "trainer_state.json").read_text())
    assert state["global_step"] == 120
    model = store.resolve(SERVICE, "tts-resumed")
    assert final.published_model == model.ref and "loss/val" in model.metrics
    assert (root / "runs" / SERVICE / run.run_id / HELDOUT_CSV).exists()


# --------------------------------------------------------------------------------- learning check


LEARNING_PRESET = yaml.safe_load((PRESETS_DIR / "cpu-quick.yaml").read_text())


@pytest.fixture(scope="module")
def learning_check(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """cpu-quick end to end on its synthetic corpus, then the issue's judges on what it published: the
    codec judge (pocketsphinx on held-out clips through the codec) and the TTS judges (tests/tts_judges.py:
    held-out sentences in four cast voices, pocketsphinx's WER and the speaker service's identification,
    against espeak-ng's readings, the same readings through the codec and the untrained model)."""
    from tts_judges import judge_tts, train_speaker_judge

    out = tmp_path_factory.mktemp("tts-learning")
    started = time.monotonic()
    synthesize_corpus(out, SynthConfig(**LEARNING_PRESET["synth"]))
    synth_s = time.monotonic() - started
    root = out / "state"
    store = ModelStore(root)
    runner = TrainingRunner(root, SERVICE, RECIPES_PATH, store)
    started = time.monotonic()
    try:
        run = runner.start("cpu-quick", str(out), output_model=LEARNING_PRESET["output_model"])
        final = runner.wait(run.run_id, timeout=3600)
    finally:
        runner.close()
    train_s = time.monotonic() - started
    assert final.state == "SUCCEEDED", final.error
    run_dir = root / "runs" / SERVICE / run.run_id
    shutil.rmtree(run_dir / "data", ignore_errors=True)
    published = store.resolve(SERVICE, LEARNING_PRESET["output_model"])
    codec_record = store.resolve(SERVICE, f"{LEARNING_PRESET['output_model']}-codec")
    fraction = float(LEARNING_PRESET["overrides"].get("heldout_fraction", 0.15))
    started = time.monotonic()
    codec_judged = codec_keeps_the_words(out / "tts", codec_record.path, fraction)
    speaker_folder = train_speaker_judge(tmp_path_factory.mktemp("speaker-judge"))
    tts_judged = judge_tts(out, published.path, speaker_folder, fraction)
    judge_s = time.monotonic() - started
    log.info(
        "learning check: corpus %.0f s, run %.0f s, judges %.0f s (speaker judge trained)",
        synth_s,
        train_s,
        judge_s,
    )
    for row in read_heldout(run_dir):
        log.info("  %s", row)
    log.info(
        "codec judge (pocketsphinx on %d held-out clips): WER originals %.3f, resynthesised %.3f; "
        "level-contour correlation %.3f",
        codec_judged["clips"],
        codec_judged["wer_original"],
        codec_judged["wer_resynthesised"],
        codec_judged["level_corr"],
    )
    log.info("TTS judges (cast %s, %d held-out lines each):", tts_judged["cast"], tts_judged["lines"])
    for name in ("espeak", "codec", "trained", "untrained"):
        log.info("  %-9s %s", name, {k: round(v, 3) for k, v in tts_judged[name].items()})
    return {
        "run_dir": run_dir,
        "published": published,
        "codec": codec_judged,
        "tts": tts_judged,
    }


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpu_quick_learns(learning_check: dict[str, Any]) -> None:
    """The codec's held-out reconstruction and the LM's held-out loss fall; the codec keeps the words;
    the trained TTS ends its lines itself, near where espeak-ng's readings end (figures:
    ``-o log_cli=true --log-cli-level=INFO``)."""
    run_dir, published = learning_check["run_dir"], learning_check["published"]
    codec = metric_series(run_dir, "codec/val_stft")
    lm = metric_series(run_dir, "loss/val")
    follows = metric_series(run_dir, "codec/val_level_corr")
    log.info(
        "codec held-out STFT %.3f → %.3f, level correlation %.3f → %.3f; LM held-out loss %.3f → %.3f "
        "(published %.3f at step %s)",
        codec[min(codec)],
        codec[max(codec)],
        follows[min(follows)],
        follows[max(follows)],
        lm[min(lm)],
        lm[max(lm)],
        published.metrics["loss/val"],
        published.labels["step"],
    )
    # the codec's output follows the speech it encoded (a codec answering one stationary sound: ≈ 0)
    assert follows[max(follows)] > 0.8 and follows[max(follows)] > follows[min(follows)] + 0.5, follows
    # the issue's codec judge: the recogniser's WER through the codec within 15 points of the originals'
    judged = learning_check["codec"]
    assert judged["wer_resynthesised"] <= judged["wer_original"] + 0.15, judged
    steps = sorted(codec)
    assert codec[steps[-1]] < 0.5 * codec[steps[0]]  # the untrained codec's level and noise are gone
    assert codec[steps[-1]] < codec[steps[1]]  # and the reconstruction keeps improving after that
    assert math.isfinite(published.metrics["loss/val"])
    assert published.metrics["loss/val"] < 0.7 * lm[min(lm)]  # on lines the model never trained on
    tts = learning_check["tts"]
    # what the trained LM has learnt of a line: where it ends (the untrained one runs to the allowance)
    trained, untrained, espeak = tts["trained"], tts["untrained"], tts["espeak"]
    assert trained["ended"] >= 0.9 and untrained["ended"] <= 0.5, (trained, untrained)
    assert abs(trained["seconds"] - espeak["seconds"]) < abs(untrained["seconds"] - espeak["seconds"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,  # a bar not met; anything else (a crash in the judges) stays an error
    reason="not met yet (README, The TTS service): the tiny codec whispers (no pitch), so voices and words "
    "are lost through it, and the LM does not learn the words in the CPU budget",
)
def test_cpu_quick_meets_the_tts_judges(learning_check: dict[str, Any]) -> None:
    """The issue's TTS bars: the speaker model names the intended character among the cast for ≥ 75 % of
    the lines, and pocketsphinx's WER on them is within 15 points of its WER on espeak-ng's readings —
    both better than the untrained model; and the codec keeps the words of the cast's readings within
    15 points. Strict xfail: it turns red the day they are met."""
    tts = learning_check["tts"]
    # the codec judge on voices the recogniser hears (pocketsphinx WER ≈ 0.7 on their readings, ≈ 0.9 on
    # the corpus's average held-out clip, which test_cpu_quick_learns judges)
    assert tts["codec"]["wer"] <= tts["espeak"]["wer"] + 0.15
    assert tts["trained"]["speaker_accuracy"] >= 0.75
    assert tts["trained"]["speaker_accuracy"] > tts["untrained"]["speaker_accuracy"]
    assert tts["trained"]["wer"] <= tts["espeak"]["wer"] + 0.15
    assert tts["trained"]["wer"] < tts["untrained"]["wer"]


def codec_keeps_the_words(
    tree: Path, codec_folder: str | Path, fraction: float, limit: int = 40
) -> dict[str, Any]:
    """The issue's codec judge: held-out clips (lines training never heard) and the same clips through
    the codec (encode → codes → decode), each transcribed by pocketsphinx (tts_judges.word_error_rate:
    WER against the .lab text after Whisper's English normaliser) — side by side, never alone."""
    from dramaturg.services.tts.codec_train import level_envelope_correlation, load_clip
    from dramaturg.shared.audio import Audio, resample
    from recogniser import SAMPLE_RATE as RECOGNISER_RATE
    from transformers import MimiModel
    from tts_judges import Spoken, through_codec, word_error_rate

    codec = MimiModel.from_pretrained(str(codec_folder)).eval()
    labs = sorted(tree.rglob("*.lab"))
    held = heldout_texts((lab.read_text() for lab in labs), fraction)
    chosen = [lab for lab in labs if normalise_text(lab.read_text()) in held][:limit]
    originals = [
        Spoken(
            lab.parent.name,
            lab.read_text().strip(),
            load_clip(lab.with_suffix(".wav"), RECOGNISER_RATE),
            RECOGNISER_RATE,
        )
        for lab in chosen
    ]
    resynthesised = through_codec(codec, originals)
    follows = [
        level_envelope_correlation(r.audio, resample(Audio(o.audio, o.rate), r.rate).samples, rate=r.rate)
        for o, r in zip(originals, resynthesised, strict=True)
    ]
    return {
        "clips": len(chosen),
        "wer_original": word_error_rate(originals),
        "wer_resynthesised": word_error_rate(resynthesised),
        "level_corr": float(np.nanmean(follows)),
    }
