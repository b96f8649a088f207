"""Audio-LLM evaluation (``services/audiollm/evaluate.py``): the scorers on hand-built cases, the
submission CSV and its validator on a small annotation, and ``main`` end to end on the untrained tiny
model over a tiny synthetic corpus (the scores mean nothing there; that they are computed and written
does).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dramaturg.services.audiollm import evaluate as ev
from dramaturg.services.audiollm.model import write_tiny_model
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from test_audiollm_server import publish_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training tests' tiny corpus (`dramaturg data synth`'s writer): 6 ASR + 6 caption test items."""
    out = tmp_path_factory.mktemp("audiollm-eval-corpus")
    synthesize_corpus(
        out,
        SynthConfig(seed=3, num_speakers=5, heldout_speakers=2, utterances_per_speaker=2, scenes_train=1,
                    scenes_dev=1, scenes_test=1, lines_per_scene=6, text_source="grammar"),
    )
    return out


# ---------------------------------------------------------------------------------------------- ASR


def test_normaliser_makes_case_and_punctuation_match() -> None:
    norm = ev.normaliser()
    assert norm("Hello, World!").strip() == norm("hello world").strip() == "hello world"
    assert ev.asr_scores(["Hello, World!"], ["hello world"])["wer"] == 0.0
    # numbers and titles too: Whisper's normaliser, not a lower-case-and-strip stand-in
    assert ev.asr_scores(["Mr. Smith paid twenty dollars."], ["mister smith paid $20"])["wer"] == 0.0


def test_wer_equals_the_hand_computed_value() -> None:
    refs = ["The cat sat on the mat.", "A dog barks"]
    hyps = ["the cat sit on mat", "a dog barks loudly"]
    # sat→sit (S), the second "the" dropped (D), "loudly" added (I); 6 + 3 reference words
    scores = ev.asr_scores(refs, hyps)
    assert (scores["substitutions"], scores["deletions"], scores["insertions"]) == (1, 1, 1)
    assert scores["hits"] == 7 and scores["reference_words"] == 9 and scores["items"] == 2
    assert scores["wer"] == pytest.approx(3 / 9)
    assert ev.asr_scores(["red blue"], ["green pink black"])["wer"] == pytest.approx(3 / 2)  # past 100 %
    with pytest.raises(ValueError, match="no words"):
        ev.asr_scores([""], ["something"])


# --------------------------------------------------------------------------------------- captioning

CAPTIONS = [
    "A young woman with a British accent speaks quickly, sounding defiant.",
    "An elderly man speaks slowly and softly in a flat, monotone voice.",
    "A middle-aged woman with an Irish accent speaks loudly, sounding angry.",
]
UNRELATED = ["Rain falls on a tin roof.", "Birds sing at dawn near the river.", "Traffic hums downtown."]


def test_identical_captions_score_higher_than_unrelated_ones() -> None:
    same = ev.caption_scores(CAPTIONS, CAPTIONS)
    other = ev.caption_scores(UNRELATED, CAPTIONS)
    for metric in ("bleu_1", "bleu_4", "rouge_l", "cider_d"):
        assert same[metric] > other[metric], metric
    assert same["bleu_4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    # every Java metric is either computed or skipped with its reason, never silently absent
    for metric in ("meteor", "spice", "spider"):
        assert (metric in same) != bool(same["skipped"].get(metric)), metric
    assert "Java" in ev.CAPTION_TOKENISATION


def test_java_metrics_say_why_they_are_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    monkeypatch.delenv("AAC_METRICS_JAVA_PATH", raising=False)
    assert ev.java_blocker("spice") == "needs Java: no java executable on PATH"
    scores = ev.caption_scores(CAPTIONS, CAPTIONS)
    no_java = "needs Java: no java executable on PATH"
    assert scores["skipped"]["meteor"] == scores["skipped"]["spice"] == no_java
    assert "spice" not in scores and "spider" not in scores and "meteor" not in scores
    assert scores["skipped"]["spider"].startswith("SPIDEr is the mean of CIDEr-D and SPICE")
    one = ev.caption_scores(CAPTIONS[:1], CAPTIONS[:1])
    assert "cider_d" not in one and "at least 2" in one["skipped"]["cider_d"]


# --------------------------------------------------------------------------------------- submission


def annotation(tmp_path: Path, ids: list[str]) -> Path:
    entries = [{"testset_id": i, "path": f"wav/{i}.wav", "task": "asr"} for i in ids]  # a test set: no text
    entries.append({"testset_id": "aac_0", "path": "wav/a.wav", "task": "audiocaption_v2"})
    path = tmp_path / "annotation_test.json"
    path.write_text(json.dumps({"annotation": entries}))
    return path


def prediction(testset_id: str, text: str) -> ev.Prediction:
    return ev.Prediction(testset_id, "asr", "", text, 3, "length", 1.0, 0.01, 0.02, 0.003)


IDS = ["asr_0", "asr_1", "asr_2"]


def test_a_written_submission_passes_the_validator(tmp_path: Path) -> None:
    ann = annotation(tmp_path, IDS)
    texts = ["hello, world", 'she said "no"', "ünïcode ✓"]
    rows = [prediction(i, t) for i, t in zip(IDS, texts, strict=True)]
    path = ev.write_submission(tmp_path / "s.csv", rows)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "testset_id,text"
    assert ev.validate_submission(path, ann, ["asr"]) == []
    # the caption item belongs to the annotation too: without the task filter it is missing
    assert any("missing" in e and "aac_0" in e for e in ev.validate_submission(path, ann))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("testset_id,text\nasr_0,a\nasr_1,b\n", "1 testset_id(s) of the annotation missing: 'asr_2'"),
        ("testset_id,text\nasr_0,a\nasr_1,b\nasr_2,c\nasr_1,d\n", "'asr_1' appears 2 times (lines 3, 5)"),
        ("testset_id,text\nasr_0,a\nasr_1,b\nasr_2,c\nasr_9,d\n",
         "1 testset_id(s) not in the annotation: 'asr_9'"),
        ("id,text\nasr_0,a\nasr_1,b\nasr_2,c\n", "bad header 'id,text'"),
        ("text,testset_id\na,asr_0\nb,asr_1\nc,asr_2\n", "bad header 'text,testset_id'"),
        ("testset_id,text\nasr_0,a\n\nasr_1,b\nasr_2,c\n", "line 3: empty row"),
        ("testset_id,text\nasr_0,a\nasr_1,\nasr_2,c\n", "line 3: empty text for 'asr_1'"),
        ("testset_id,text\nasr_0,a,extra\nasr_1,b\nasr_2,c\n", "line 2: 3 fields"),
        ("", "is empty"),
    ],
)
def test_broken_submissions_fail_with_a_specific_message(tmp_path: Path, body: str, expected: str) -> None:
    ann = annotation(tmp_path, IDS)
    path = tmp_path / "s.csv"
    path.write_text(body, encoding="utf-8")
    errors = ev.validate_submission(path, ann, ["asr"])
    assert errors and any(expected in e for e in errors), errors


def test_non_utf8_submission_fails(tmp_path: Path) -> None:
    ann = annotation(tmp_path, ["asr_0"])
    path = tmp_path / "s.csv"
    path.write_bytes("testset_id,text\nasr_0,café\n".encode("latin-1"))
    [error] = ev.validate_submission(path, ann, ["asr"])
    assert "not UTF-8: byte 0xe9" in error


def test_validate_mode_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = annotation(tmp_path, IDS)
    good = ev.write_submission(tmp_path / "good.csv", [prediction(i, "x") for i in IDS])
    args = ["--mode", "validate", "--data", str(ann), "--task", "asr"]
    assert ev.main([*args, "--submission", str(good)]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("testset_id,text\nasr_0,x\n")
    assert ev.main([*args, "--submission", str(bad)]) == 1
    assert "missing: 'asr_1', 'asr_2'" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- end to end


def read_results(out: Path) -> tuple[dict, list[dict]]:
    results = json.loads((out / ev.RESULTS_FILE).read_text())
    predictions = [json.loads(line) for line in (out / ev.PREDICTIONS_FILE).read_text().splitlines()]
    return results, predictions


def test_valid_asr_with_efficiency_on_a_published_tiny_model(
    dramaturg_home: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_tiny(dramaturg_home, "tiny-eval")
    out = tmp_path / "asr"
    argv = ["--mode", "valid_asr", "--model", "tiny-eval", "--data", str(corpus), "--output", str(out),
            "--efficiency", "--max-new-tokens", "6", "--warmup", "1", "--no-progress", "--device", "cpu"]
    assert ev.main(argv) == 0
    results, predictions = read_results(out)
    expected = ev.read_annotation(corpus, ["asr"])
    assert results["items"] == len(expected) == len(predictions) == 6
    assert [p["testset_id"] for p in predictions] == [it.testset_id for it in expected]
    assert all(p["reference"] and p["completion_tokens"] == 6 for p in predictions)  # never ends early
    scores = results["scores"]
    assert scores["wer"] > 0 and scores["reference_words"] > 0
    assert scores["wer"] == pytest.approx(
        (scores["substitutions"] + scores["deletions"] + scores["insertions"]) / scores["reference_words"]
    )
    efficiency = results["efficiency"]
    for key in ("ttft_seconds", "tpot_seconds"):
        stats = efficiency[key]
        assert stats["count"] == 6 and 0 < stats["p50"] <= stats["p95"], key
    assert efficiency["ttft_seconds"]["p50"] > efficiency["tpot_seconds"]["p50"]  # encoders + prefill
    assert efficiency["peak_memory"]["bytes"] > 0 and "peak RSS" in efficiency["peak_memory"]["measure"]
    assert "tiny-eval" in results["model"]
    shown = capsys.readouterr().out
    assert "WER" in shown and "TTFT p50" in shown and "TPOT p50" in shown


def test_submission_aac_from_a_model_folder_is_valid(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_tiny_model(folder)
    out = tmp_path / "aac"
    argv = ["--mode", "submission_aac", "--model", str(folder), "--data",
            str(corpus / "audiollm" / ev.TEST_ANNOTATION), "--output", str(out), "--max-new-tokens", "3",
            "--no-progress", "--device", "cpu"]
    assert ev.main(argv) == 0
    results, predictions = read_results(out)
    assert results["submission"]["valid"] and results["submission"]["errors"] == []
    assert "efficiency" not in results and {p["task"] for p in predictions} == {"audiocaption_v2"}
    submission = out / ev.SUBMISSION_FILE
    assert ev.validate_submission(submission, corpus, ["audiocaption_v2"]) == []
    rows = submission.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "testset_id,text" and len(rows) == 1 + len(predictions)


def test_valid_aac_reports_scores_and_skips(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write_tiny_model(folder)
    out = tmp_path / "valid-aac"
    argv = ["--mode", "valid_aac", "--model", str(folder), "--data", str(corpus), "--output", str(out),
            "--max-new-tokens", "3", "--limit", "3", "--no-progress", "--device", "cpu"]
    assert ev.main(argv) == 0
    scores, _ = read_results(out)
    scores = scores["scores"]
    assert scores["items"] == 3 and {"bleu_4", "rouge_l", "cider_d"} <= set(scores)
    assert "spider" in scores or scores["skipped"]["spider"]


def test_unknown_model_ref_is_an_error_not_a_traceback(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--mode", "valid_asr", "--model", "nope", "--data", str(corpus), "--output", str(tmp_path / "o")]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dramaturg eval audiollm: error:") and "nope" in err
