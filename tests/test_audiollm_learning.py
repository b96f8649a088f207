"""The audio LLM's learning check (issue 15): held-out sentences spoken by held-out voices.

``.venv/bin/pytest -m slow tests/test_audiollm_learning.py -o log_cli=true`` (the figures are logged).

**Corpus.** ``presets/learning-check.yaml``'s ``synth:`` section with ``text_source: grammar``: test
scenes and held-out speakers say only sentences that training never hears. The SALMONN annotation is
then narrowed by its ``heldout`` flag so that every scored item is a held-out voice *and* a held-out
sentence: ``annotation_train.json`` drops the held-out voices' lines (development scenes, written to
``train``, may cast them) and the scored file keeps the test lines of held-out voices only.

**Models**, on the same items through ``evaluate.py`` (the code ``dramaturg eval audiollm`` runs): the
untrained model (the run's own starting point, ``base/``), the model the preset trains, and an
independent recogniser the project did not train (pocketsphinx's English model, ``tests/recogniser.py``)
on the same audio. Captions: a short stage-1 run on the caption items from the trained model, and the
untrained model, on the held-out voices' caption items, scored with ``caption_scores``.

**What is asserted** (README, "The audio LLM service", with the figures): the trained model's WER is
below the untrained model's and at most 35 % (the issue's target; an empty transcript, the simple
baseline, scores 1.0); and a short captioning run from the trained model (``CAPTIONS``) writes
captions that score above the untrained model's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dramaturg.services.audiollm.data import read_audio
from dramaturg.services.audiollm.evaluate import (
    asr_scores,
    caption_scores,
    load_model,
    read_annotation,
    run_items,
)
from dramaturg.services.audiollm.recipes import PRESETS_DIR, RECIPES
from dramaturg.services.audiollm.train import BASE_DIR
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training.recipe import RunContext
from recogniser import transcribe
from test_audiollm_train import SERVICE, inline_context

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # the figures show with `-o log_cli=true` alone

pytestmark = pytest.mark.slow

PRESET = "learning-check"
SPEC: dict[str, Any] = yaml.safe_load((PRESETS_DIR / f"{PRESET}.yaml").read_text())
HELDOUT_FILE = "annotation_heldout_voices.json"
MAX_NEW_TOKENS = 48
OVERRIDES: dict[str, Any] = {}  # on top of the preset (none: a smoke run of this file sets a few)
# The target; measured 0.324 with the preset on 2 CPU cores (README).
WER_BOUND = 0.35
# the captioning run: stage 1 on the caption items from the learning-check model
CAPTIONS: dict[str, Any] = {"tasks": ["audiocaption_v2"], "max_steps": 200, "lr": 1e-3, "eval_every": 100}


def narrow_to_heldout_voices(dataset: Path) -> dict[str, int]:
    """Training lines of training voices only; the scored file: test lines of held-out voices."""
    folder = dataset / "audiollm"
    counts: dict[str, int] = {}
    train = json.loads((folder / "annotation_train.json").read_text())["annotation"]
    kept = [a for a in train if not a["heldout"]]
    (folder / "annotation_train.json").write_text(json.dumps({"annotation": kept}))
    test = json.loads((folder / "annotation_test.json").read_text())["annotation"]
    scored = [a for a in test if a["heldout"]]
    (folder / HELDOUT_FILE).write_text(json.dumps({"annotation": scored}))
    counts["train lines"] = sum(a["task"] == "asr" for a in kept)
    counts["held-out voices' lines dropped"] = sum(a["task"] == "asr" for a in train) - counts["train lines"]
    counts["scored lines"] = sum(a["task"] == "asr" for a in scored)
    return counts


def scores_of(model: str, dataset: Path, tasks: list[str]) -> dict[str, Any]:
    """WER (and caption scores) of ``model`` on the held-out voices' items, as ``evaluate.py`` scores."""
    items = read_annotation(dataset / "audiollm" / HELDOUT_FILE, tasks)
    loaded = load_model(model, device="cpu")
    predictions = run_items(loaded, items, MAX_NEW_TOKENS, progress=False)
    asr = [p for p in predictions if p.task == "asr"]
    out: dict[str, Any] = {}
    if asr:
        out["asr"] = asr_scores([p.reference for p in asr], [p.text for p in asr])
        out["examples"] = [(p.reference, p.text) for p in asr[:3]]
    captions = [p for p in predictions if p.task == "audiocaption_v2"]
    if captions:
        out["captions"] = caption_scores([p.text for p in captions], [p.reference for p in captions])
    return out


@dataclass
class TrainedRun:
    corpus: Path
    ctx: RunContext
    published: Path
    corpus_seconds: float
    train_seconds: float


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The preset's corpus, narrowed, and the preset's run on it (one for both tests)."""
    root = tmp_path_factory.mktemp("audiollm-learning")
    started = time.monotonic()
    corpus = root / "corpus"
    synthesize_corpus(corpus, SynthConfig(**SPEC["synth"]))
    counts = narrow_to_heldout_voices(corpus)
    corpus_seconds = time.monotonic() - started
    log.info("corpus (%.0f s): %s", corpus_seconds, counts)
    ctx = inline_context(
        root, PRESET, corpus, OVERRIDES, run_id="learning-check", output_model="learning-check"
    )
    started = time.monotonic()
    RECIPES[PRESET].run(ctx)
    ctx.close()
    published = Path(ModelStore(root).resolve(SERVICE, "learning-check").path)
    return TrainedRun(corpus, ctx, published, corpus_seconds, time.monotonic() - started)


@pytest.mark.timeout(3600)
def test_trained_model_transcribes_held_out_voices_better_than_untrained(trained: TrainedRun) -> None:
    started = time.monotonic()
    corpus = trained.corpus
    untrained = scores_of(str(trained.ctx.run_dir / BASE_DIR), corpus, ["asr"])
    model = scores_of(str(trained.published), corpus, ["asr"])
    items = read_annotation(corpus / "audiollm" / HELDOUT_FILE, ["asr"])
    references = [it.text for it in items]
    sphinx = asr_scores(references, [transcribe(read_audio(it.path)) for it in items])

    rows = [("untrained", untrained["asr"]), ("trained (learning-check)", model["asr"]),
            ("pocketsphinx (not trained here)", sphinx),
            ("empty transcript (baseline)", asr_scores(references, [""] * len(items)))]
    table = "\n".join(
        f"  {name:34s} WER {s['wer']:.3f}  (S {s['substitutions']}, D {s['deletions']}, "
        f"I {s['insertions']} of {s['reference_words']} words, {s['items']} lines)"
        for name, s in rows
    )
    log.info(
        "held-out sentences by held-out voices — corpus %.0f s, training %.0f s, scoring %.0f s\n%s",
        trained.corpus_seconds, trained.train_seconds, time.monotonic() - started, table,
    )
    for reference, hypothesis in model["examples"]:
        log.info("  REF %s\n  HYP %s", reference, hypothesis)
    assert model["asr"]["wer"] < untrained["asr"]["wer"]
    assert model["asr"]["wer"] <= WER_BOUND


@pytest.mark.timeout(1800)
def test_captioning_from_the_trained_model_scores_above_the_untrained_model(trained: TrainedRun) -> None:
    """Stage 1 on the caption items, from the learning-check model (``base_model``), a short run; its
    captions of the held-out voices' clips against the untrained model's (CIDEr-D, BLEU, ROUGE-L)."""
    started = time.monotonic()
    root = Path(trained.ctx.store.root)
    overrides = {**OVERRIDES, **CAPTIONS, "base_model": "learning-check"}
    ctx = inline_context(root, PRESET, trained.corpus, overrides, run_id="captions", output_model="captions")
    RECIPES[PRESET].run(ctx)
    ctx.close()
    published = ModelStore(root).resolve(SERVICE, "captions")
    tasks = ["audiocaption_v2"]
    untrained = scores_of(str(trained.ctx.run_dir / BASE_DIR), trained.corpus, tasks)["captions"]
    model = scores_of(str(published.path), trained.corpus, tasks)["captions"]
    keys = ("cider_d", "bleu_1", "bleu_4", "rouge_l")
    log.info(
        "captions of held-out voices (%.0f s):\n  untrained %s\n  trained   %s",
        time.monotonic() - started,
        {k: round(untrained[k], 3) for k in keys},
        {k: round(model[k], 3) for k in keys},
    )
    assert model["cider_d"] > untrained["cider_d"]
    assert model["bleu_1"] > untrained["bleu_1"]
