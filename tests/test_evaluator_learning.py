"""The evaluator's learning check (issue 16): held-out voices and held-out lines, four models side by side.

``.venv/bin/pytest -m slow tests/test_evaluator_learning.py -o log_cli=true`` (the figures are logged).

**Corpus.** ``presets/learning-check.yaml``'s ``synth:`` section, with ``text_source: grammar``: test
scenes and held-out speakers say only sentences that training never hears. The realism items are then
narrowed so that every held-out item is both a held-out voice and a held-out line: ``realism_test`` keeps
the test scenes' turns spoken by the ``heldout_speakers`` (test scenes may cast anyone), and
``realism_train`` drops the turns the held-out speakers have in the development scene (the writer puts
development scenes in ``train``). Training speakers only in training, held-out speakers only in the test.

**Dimensions.** Only the realism dimensions whose label is a direct measurement of the clip itself
(``shared/data/prosody.py``'s ``realism_labels``): ``pitch_variation`` (F0 spread), ``rhythmic_naturalness``
(syllable rate and pauses: the pace), ``stress_and_emphasis`` (syllable-peak contrast) and
``dynamic_range`` (loudness range). Left out: ``voice_identity_matching`` (distance to the speaker's own
mean F0, which a held-out voice's clip does not carry), ``emotion_accuracy`` and
``emotion_intensity_control`` (arousal against the line's intended emotion), ``trait_embodiment``
(against the character's style profile) and the two story dimensions (combinations of those).

**Models**, each scored on the same held-out items against the raters' mean with ``evaluate.py``'s
``score_items`` and ``compute_metrics``: (a) the untrained tiny evaluator (the SFT run's start), (b) the
simple baseline (``baseline.py``: ridge regression on MFCC statistics, fitted on the training items), (c)
the ``learning-check`` preset (SFT) and (d) GRPO from that SFT model. The predicted-score histograms of
SFT and GRPO are compared: GRPO must not collapse them.

**What is asserted** is what the tiny model achieves, not the issue's target (mean Spearman ≥ 0.6 after
SFT), which it does not reach (README, "The evaluator service"): the baseline ranks the clips (the
labels are learnable from the audio); SFT (with ``probe.py``'s training aids) learns the answer
format, is closer to the raters than the untrained model, ranks the clips better than it (mean ρ) and
ranks dynamic range; GRPO keeps the held-out MAE without narrowing the predicted histogram.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dramaturg.services.evaluator import model as evaluator
from dramaturg.services.evaluator.baseline import baseline_rows, fit_ridge
from dramaturg.services.evaluator.data import evaluator_dir, load_clips, load_split
from dramaturg.services.evaluator.evaluate import BootstrapSettings, compute_metrics, score_items
from dramaturg.services.evaluator.recipes import PRESETS_DIR, RECIPES
from dramaturg.services.evaluator.train import score_histogram, tiny_model
from dramaturg.shared.data.plan import plan_corpus
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from test_evaluator_train import SERVICE, inline_context

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # the figures show with `-o log_cli=true` alone (the root logger stays at WARNING)

pytestmark = pytest.mark.slow

PRESET = "learning-check"
SPEC: dict[str, Any] = yaml.safe_load((PRESETS_DIR / f"{PRESET}.yaml").read_text())
PROSODY_DIMENSIONS = ["pitch_variation", "rhythmic_naturalness", "stress_and_emphasis", "dynamic_range"]
BOOTSTRAP = BootstrapSettings(n_resamples=1000)
# GRPO from the SFT model: a short run on the same items, prompts and dimensions
GRPO: dict[str, Any] = {
    "item_set": "realism",
    "dimensions": PROSODY_DIMENSIONS,
    "detailed": bool(SPEC["overrides"]["detailed"]),
    "target": "mean",
    "peft": "full",
    "lr": 1e-4,
    "schedule": "constant_with_warmup",
    "warmup": 5,
    "max_steps": 60,
    "batch_size": 16,
    "num_generations": 8,
    "beta": 0.04,
    "rewards": ["graded", "format"],
    "eval_every": 30,
    "eval_at_start": False,
    "log_every": 10,
    "device": "cpu",
    "torch_threads": 0,
}


def narrow_to_heldout_voices(corpus: Path, config: SynthConfig) -> tuple[int, int]:
    """Rewrite ``realism_{train,test}.jsonl`` (module docstring): (training items, held-out items)."""
    heldout = plan_corpus(config).heldout_ids
    folder = evaluator_dir(corpus)
    counts = []
    for split, keep_heldout in (("train", False), ("test", True)):
        path = folder / f"realism_{split}.jsonl"
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [item for item in items if (item["speaker_id"] in heldout) == keep_heldout]
        path.write_text("".join(json.dumps(item) + "\n" for item in kept))
        counts.append(len(kept))
    return counts[0], counts[1]


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-dimension Spearman and MAE, their means over the dimensions, and the predicted histogram."""
    metrics = compute_metrics(rows, BOOTSTRAP, dimensions=PROSODY_DIMENSIONS)
    figures: dict[str, float] = {}
    for dimension, group in metrics["dimensions"].items():
        figures[f"spearman/{dimension}"] = group.estimates["spearman"].value
        figures[f"mae/{dimension}"] = group.estimates["mae"].value
    overall = metrics["overall"].estimates["spearman"]
    figures |= {
        "spearman": metrics["macro"]["spearman"],
        "mae": metrics["macro"]["mae"],
        "spearman_pooled_low": overall.low,
        "spearman_pooled_high": overall.high,
        "digit_mass": metrics["overall"].digit_mass,
    }
    histogram = score_histogram([float(r["predicted"]) for r in rows])
    figures |= {key.removeprefix("heldout/"): value for key, value in histogram.items()}
    return figures


def table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The figures as a text table, one row per model."""
    short = {"pitch_variation": "pitch", "rhythmic_naturalness": "pace", "stress_and_emphasis": "stress",
             "dynamic_range": "dyn.range"}
    head = (f"{'model':<14}" + "".join(f"{'ρ ' + short[d]:>12}" for d in PROSODY_DIMENSIONS)
            + f"{'mean ρ':>9}{'MAE':>7}{'std':>6}   predicted 1..5 (shares)")
    lines = [head]
    for name, f in results.items():
        shares = " ".join(f"{f[f'predicted/{k}']:.2f}" for k in range(1, 6))
        lines.append(f"{name:<14}" + "".join(f"{f[f'spearman/{d}']:>12.3f}" for d in PROSODY_DIMENSIONS)
                     + f"{f['spearman']:>9.3f}{f['mae']:>7.3f}{f['predicted_std']:>6.2f}   {shares}")
    return "\n".join(lines)


def score_model(source: str | Path | None, folder: Path, items: Sequence[Mapping[str, Any]]
                ) -> list[dict[str, Any]]:
    """Result rows of a published model (``source``) or of the untrained tiny one (``None``)."""
    if source is None:  # the SFT run's starting point, sized by the preset's `model:` section if it has one
        model, processor = tiny_model({**RECIPES[PRESET].defaults, **SPEC["overrides"]})
    else:
        model, processor = evaluator.load_evaluator(source)
    detailed = bool(SPEC["overrides"]["detailed"])  # the prompt style the preset trains with
    return score_items(model, processor, folder, items, detailed=detailed, dimensions=PROSODY_DIMENSIONS)


@pytest.mark.timeout(3600)
def test_sft_learns_prosody_on_heldout_voices_and_lines(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(int(SPEC["overrides"].get("torch_threads") or threads))
    try:
        _learning_check(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _learning_check(tmp_path_factory: pytest.TempPathFactory) -> None:
    started = time.monotonic()
    corpus = tmp_path_factory.mktemp("evaluator-learning")
    config = SynthConfig(**SPEC["synth"])
    synthesize_corpus(corpus, config)
    n_train, n_heldout = narrow_to_heldout_voices(corpus, config)
    folder = evaluator_dir(corpus)
    train_items = load_split(folder, "realism", "train")
    heldout_items = load_split(folder, "realism", "test")
    log.info("corpus: %d training items (training voices), %d held-out items (held-out voices and lines), "
             "%.0f s", n_train, n_heldout, time.monotonic() - started)

    results: dict[str, dict[str, float]] = {}
    results["untrained"] = summary(score_model(None, folder, heldout_items))

    clips = load_clips(folder, [*train_items, *heldout_items])
    ridge = fit_ridge(train_items, clips, PROSODY_DIMENSIONS)
    results["ridge-MFCC"] = summary(baseline_rows(ridge, heldout_items, clips))

    root = corpus / "state"
    store = ModelStore(root)
    mark = time.monotonic()
    sft = inline_context(root, PRESET, corpus, {}, run_id="sft", output_model="evaluator-learning-sft")
    RECIPES[PRESET].run(sft)
    sft.close()
    sft_s = time.monotonic() - mark
    sft_record = store.resolve(SERVICE, "evaluator-learning-sft")
    results["SFT"] = summary(score_model(sft_record.path, folder, heldout_items))

    mark = time.monotonic()
    grpo = inline_context(root, "grpo", corpus, {**GRPO, "base_model": "evaluator-learning-sft"},
                          run_id="grpo", output_model="evaluator-learning-grpo")
    RECIPES["grpo"].run(grpo)
    grpo.close()
    grpo_s = time.monotonic() - mark
    grpo_record = store.resolve(SERVICE, "evaluator-learning-grpo")
    results["GRPO from SFT"] = summary(score_model(grpo_record.path, folder, heldout_items))

    log.info("learning check on %d held-out items (held-out voices, held-out lines), prosody dimensions; "
             "SFT %.0f s (step %s published), GRPO %.0f s (step %s), whole check %.0f s\n%s",
             n_heldout, sft_s, sft_record.labels.get("step"), grpo_s, grpo_record.labels.get("step"),
             time.monotonic() - started, table(results))

    names = ("untrained", "ridge-MFCC", "SFT", "GRPO from SFT")
    untrained, ridge_f, sft_f, grpo_f = (results[name] for name in names)
    # the labels are learnable from the audio alone: the MFCC baseline ranks the held-out clips
    assert ridge_f["spearman"] > 0.2
    # SFT learnt the answer format (digit mass at <answer>) and is no further from the raters
    assert untrained["digit_mass"] < 0.05 and sft_f["digit_mass"] > 0.9
    assert sft_f["mae"] < untrained["mae"]
    # ... and reads the prosody: its answers vary with the clip and rank the held-out clips
    assert sft_f["predicted_std"] > 0.2
    assert sft_f["spearman"] > untrained["spearman"] + 0.1
    assert sft_f["spearman/dynamic_range"] > 0.4
    # GRPO from SFT: held-out MAE no worse, and no collapse of the predicted scores
    assert grpo_f["digit_mass"] > 0.9
    assert grpo_f["mae"] <= sft_f["mae"] + 0.02
    assert grpo_f["predicted_std"] >= 0.5 * sft_f["predicted_std"]
    assert grpo_f["predicted/3"] <= max(0.8, sft_f["predicted/3"])
