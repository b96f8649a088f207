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
on the same audio. Captions: the trained model's and the untrained model's, on the held-out voices'
caption items, scored with ``caption_scores``.

**What is asserted** is what the tiny model achieves (README, "The audio LLM service", with the figures):
the trained model's WER is below the untrained model's and below the simple baseline's (an empty
transcript: WER 1.0, no insertions) by a margin, and its
captions (when the preset trains captioning) score above the untrained model's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
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
# What is asserted (module docstring): below the empty transcript's 1.0 by a margin. Measured 0.901 with
# the preset (README); the target is 0.35.
WER_BOUND = 0.95


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
    out: dict[str, Any] = {"asr": asr_scores([p.reference for p in asr], [p.text for p in asr])}
    out["examples"] = [(p.reference, p.text) for p in asr[:3]]
    captions = [p for p in predictions if p.task == "audiocaption_v2"]
    if captions:
        out["captions"] = caption_scores([p.text for p in captions], [p.reference for p in captions])
    return out


@pytest.mark.timeout(3600)
def test_trained_model_transcribes_held_out_voices_better_than_untrained(tmp_path: Path) -> None:
    started = time.monotonic()
    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, SynthConfig(**SPEC["synth"]))
    counts = narrow_to_heldout_voices(corpus)
    log.info("corpus (%.0f s): %s", time.monotonic() - started, counts)

    ctx = inline_context(
        tmp_path, PRESET, corpus, OVERRIDES, run_id="learning-check", output_model="learning-check"
    )
    trained_at = time.monotonic()
    RECIPES[PRESET].run(ctx)
    ctx.close()
    train_seconds = time.monotonic() - trained_at
    published = ModelStore(tmp_path).resolve(SERVICE, "learning-check")

    tasks = list(ctx.record.config["tasks"])
    untrained = scores_of(str(ctx.run_dir / BASE_DIR), corpus, tasks)
    trained = scores_of(str(published.path), corpus, tasks)
    items = read_annotation(corpus / "audiollm" / HELDOUT_FILE, ["asr"])
    from dramaturg.services.audiollm.data import read_audio

    sphinx = asr_scores([it.text for it in items], [transcribe(read_audio(it.path)) for it in items])

    rows = [("untrained", untrained["asr"]), ("trained (learning-check)", trained["asr"]),
            ("pocketsphinx (not trained here)", sphinx),
            ("empty transcript (baseline)", asr_scores([it.text for it in items], [""] * len(items)))]
    table = "\n".join(
        f"  {name:34s} WER {s['wer']:.3f}  (S {s['substitutions']}, D {s['deletions']}, "
        f"I {s['insertions']} of {s['reference_words']} words, {s['items']} lines)"
        for name, s in rows
    )
    log.info(
        "held-out sentences by held-out voices — training %.0f s, whole check %.0f s\n%s",
        train_seconds, time.monotonic() - started, table,
    )
    for reference, hypothesis in trained["examples"]:
        log.info("  REF %s\n  HYP %s", reference, hypothesis)
    assert trained["asr"]["wer"] < untrained["asr"]["wer"]
    assert trained["asr"]["wer"] <= WER_BOUND
    if "captions" in trained:
        log.info("captions: untrained %s, trained %s", untrained["captions"], trained["captions"])
        assert trained["captions"]["cider_d"] > untrained["captions"]["cider_d"]
