"""The evaluator's evaluation reports (``services/evaluator/evaluate.py``).

Metrics on hand-built result rows: MAE / RMSE as computed by hand, Pearson / Spearman equal to scipy's,
``overall`` pooled over every row; bootstrap intervals that hold 1 for a perfect predictor (and exclude
0), 0 for shuffled predictions (and exclude 1), NaN with a note for a constant side and for too few
items; the report files (strict JSON, the Markdown table, a real PNG); ``--from-results`` re-reports
without a model. End to end: ``main()`` on the untrained tiny evaluator (a folder, and a store ref whose
label says "simple") and a tiny synthetic corpus writes a row per (item, dimension) that equals
``score_item`` with the model's prompt style.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dramaturg.services.evaluator import evaluate as ev
from dramaturg.services.evaluator.data import evaluator_dir, load_clip, load_split, rater_mean
from dramaturg.services.evaluator.prompts import item_dimensions
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from scipy.stats import pearsonr, spearmanr
from test_evaluator_server import publish_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ev.BootstrapSettings(n_resamples=400, seed=3)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows_of(dimension: str, predicted: Any, reference: Any, *, prefix: str = "item") -> list[dict[str, Any]]:
    """Result rows, item ``prefix{i}`` for the i-th pair."""
    return [{"id": f"{prefix}{i}", "dataset_name": "ROLE", "dimension": dimension, "predicted": float(p),
             "distribution": [0.2] * 5, "digit_mass": 0.5, "reference": float(r)}
            for i, (p, r) in enumerate(zip(predicted, reference, strict=True))]


def strict_json(path: Path) -> Any:
    """JSON that refuses NaN / Infinity (what other tools can read)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_equal_hand_computation_and_scipy() -> None:
    pred_a, ref_a = [1.0, 2.0, 3.0, 4.0, 5.5], [1.5, 2.0, 2.5, 5.0, 4.0]
    pred_b, ref_b = [2.0, 2.5, 4.0, 1.0, 3.0], [2.0, 3.0, 3.5, 1.5, 4.0]
    rows = rows_of("pitch_variation", pred_a, ref_a) + rows_of("emotion_accuracy", pred_b, ref_b)
    metrics = ev.compute_metrics(rows, FAST)
    a = metrics["dimensions"]["pitch_variation"].estimates
    # |errors| 0.5, 0, 0.5, 1, 1.5 → MAE 3.5 / 5; squares 0.25, 0, 0.25, 1, 2.25 → RMSE √(3.75 / 5)
    assert a["mae"].value == pytest.approx(0.7)
    assert a["rmse"].value == pytest.approx(math.sqrt(0.75))
    assert a["pearson"].value == pytest.approx(pearsonr(pred_a, ref_a).statistic)
    assert a["spearman"].value == pytest.approx(spearmanr(pred_a, ref_a).statistic)
    b = metrics["dimensions"]["emotion_accuracy"].estimates
    # |errors| 0, 0.5, 0.5, 0.5, 1 → MAE 2.5 / 5; squares sum 1.75
    assert b["mae"].value == pytest.approx(0.5) and b["rmse"].value == pytest.approx(math.sqrt(0.35))
    overall = metrics["overall"]
    assert (overall.n, overall.items) == (10, 5)  # items pooled over both dimensions
    assert overall.estimates["mae"].value == pytest.approx(0.6)
    pooled_pred, pooled_ref = pred_a + pred_b, ref_a + ref_b
    assert overall.estimates["pearson"].value == pytest.approx(pearsonr(pooled_pred, pooled_ref).statistic)
    assert overall.estimates["spearman"].value == pytest.approx(spearmanr(pooled_pred, pooled_ref).statistic)
    assert metrics["macro"]["mae"] == pytest.approx(0.6)
    assert metrics["macro"]["spearman"] == pytest.approx((a["spearman"].value + b["spearman"].value) / 2)
    assert list(metrics["dimensions"]) == ["pitch_variation", "emotion_accuracy"]  # the rubric's order
    # histogram of predictions rounded half up: 1, 2, 3, 4, 6→5 (a) and 2, 3, 4, 1, 3 (b)
    assert metrics["dimensions"]["pitch_variation"].histogram == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert metrics["dimensions"]["emotion_accuracy"].histogram == {1: 1, 2: 1, 3: 2, 4: 1, 5: 0}
    assert overall.digit_mass == pytest.approx(0.5)


def test_resample_statistic_equals_scipy() -> None:
    """The bootstrap's numpy statistic is the same Pearson and Spearman (ties included) as scipy's."""
    rng = np.random.default_rng(0)
    pred = rng.normal(3, 1, 30)
    ref = np.round(pred + rng.normal(0, 1, 30))  # ties in the reference
    mae, rmse, pearson, spearman = ev.resample_metrics(pred, ref)
    assert mae == pytest.approx(np.mean(np.abs(pred - ref)))
    assert rmse == pytest.approx(np.sqrt(np.mean((pred - ref) ** 2)))
    assert pearson == pytest.approx(pearsonr(pred, ref).statistic)
    assert spearman == pytest.approx(spearmanr(pred, ref).statistic)


def test_a_perfect_predictor_has_pearson_one_inside_its_interval() -> None:
    reference = np.random.default_rng(1).uniform(1, 5, 40)
    rows = rows_of("pitch_variation", reference, reference)
    estimates = ev.compute_metrics(rows, FAST)["overall"].estimates
    for name in ("pearson", "spearman"):
        estimate = estimates[name]
        assert estimate.value == pytest.approx(1.0)
        assert estimate.low <= 1.0 + 1e-9 and estimate.high >= 1.0 - 1e-9, estimate
        assert estimate.low > 0.5  # an interval, not "anything"
    assert estimates["mae"].value == 0.0 and estimates["mae"].high == pytest.approx(0.0)


def test_shuffled_predictions_have_an_interval_around_zero() -> None:
    rng = np.random.default_rng(2)
    reference = rng.uniform(1, 5, 300)
    metrics = ev.compute_metrics(rows_of("dynamic_range", rng.permutation(reference), reference), FAST)
    for name in ("pearson", "spearman"):
        estimate = metrics["dimensions"]["dynamic_range"].estimates[name]
        assert estimate.low < 0.0 < estimate.high, estimate
        assert estimate.high - estimate.low < 0.35  # 300 items: a narrow interval
    # the same reference, predicted with noise, is clearly correlated: the interval excludes 0
    noisy = reference + rng.normal(0, 0.5, 300)
    rows = rows_of("dynamic_range", noisy, reference)
    pearson = ev.compute_metrics(rows, FAST)["overall"].estimates["pearson"]
    assert pearson.low > 0.5 and pearson.low <= pearson.value <= pearson.high


def test_constant_predictions_give_nan_with_a_note(tmp_path: Path) -> None:
    reference = np.random.default_rng(3).uniform(1, 5, 20)
    rows = rows_of("audio_quality", np.full(20, 3.0), reference)
    group = ev.compute_metrics(rows, FAST)["dimensions"]["audio_quality"]
    for name in ("pearson", "spearman"):
        estimate = group.estimates[name]
        assert math.isnan(estimate.value) and math.isnan(estimate.low) and math.isnan(estimate.high)
        assert "predictions are constant" in estimate.note
    assert math.isfinite(group.estimates["mae"].value) and group.middle_share == 1.0
    ev.write_report(rows, tmp_path, FAST)
    document = strict_json(tmp_path / ev.METRICS_FILE)  # NaN written as null
    assert document["dimensions"]["audio_quality"]["pearson"] == {
        "value": None, "ci": [None, None], "note": "the predictions are constant: correlation undefined"}
    report = (tmp_path / ev.REPORT_FILE).read_text()
    assert "predictions are constant" in report and "collapsed to the middle score" in report


def test_a_constant_reference_and_too_few_items_give_nan_with_a_note() -> None:
    flat = ev.compute_metrics(rows_of("audio_quality", [1.0, 2.0, 3.0, 4.0], [3.0] * 4), FAST)
    assert "reference is constant" in flat["overall"].estimates["pearson"].note
    few = ev.compute_metrics(rows_of("audio_quality", [1.0, 2.0], [1.0, 3.0]), FAST)["overall"].estimates
    assert math.isnan(few["pearson"].value) and "n = 2 < 3" in few["pearson"].note
    assert few["mae"].value == pytest.approx(0.5) and math.isnan(few["mae"].low)
    assert "no interval" in few["mae"].note


def test_the_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(4)
    reference = rng.uniform(1, 5, 30)
    rows = rows_of("pitch_variation", reference + rng.normal(0, 1, 30), reference)
    first = ev.compute_metrics(rows, FAST)["overall"].estimates["pearson"]
    again = ev.compute_metrics(rows, FAST)["overall"].estimates["pearson"]
    reseeded = ev.BootstrapSettings(n_resamples=400, seed=4)
    other = ev.compute_metrics(rows, reseeded)["overall"].estimates["pearson"]
    assert (first.low, first.high) == (again.low, again.high) != (other.low, other.high)


# -- files --------------------------------------------------------------------------------------------


def test_report_files_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = []
    for dimension in ("pitch_variation", "emotion_accuracy", "human_likeness"):
        reference = rng.uniform(1, 5, 12)
        rows += rows_of(dimension, reference + rng.normal(0, 0.5, 12), reference)
    ev.write_report(rows, tmp_path, FAST, run={"model": "tiny:v1"})
    document = strict_json(tmp_path / ev.METRICS_FILE)
    assert list(document["dimensions"]) == ["pitch_variation", "emotion_accuracy", "human_likeness"]
    assert document["overall"]["n"] == 36 and document["overall"]["items"] == 12
    assert document["bootstrap"]["n_resamples"] == 400 and document["run"] == {"model": "tiny:v1"}
    for group in (*document["dimensions"].values(), document["overall"]):
        for metric in ev.METRICS:
            low, high = group[metric]["ci"]
            assert low <= high
        assert sum(group["histogram"].values()) == group["n"]
    report = (tmp_path / ev.REPORT_FILE).read_text()
    assert "| dimension | n | MAE | RMSE | Pearson [95 % CI] | Spearman [95 % CI] | digit mass |" in report
    assert all(f"| {d} | 12 |" in report for d in document["dimensions"]) and "| **overall** | 36 |" in report
    png = (tmp_path / ev.PLOT_FILE).read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    image = imread(tmp_path / ev.PLOT_FILE)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300  # a 3-panel grid


def test_from_results_rereports_without_scoring(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    reference = rng.uniform(1, 5, 15)
    rows = rows_of("pitch_variation", reference + rng.normal(0, 1, 15), reference)
    results = ev.write_results(rows, tmp_path / "run" / ev.RESULTS_FILE)
    assert ev.read_results(results) == rows
    out = tmp_path / "again"
    args = ["--from-results", str(results), "--output", str(out), "--n-resamples", "400", "--seed", "3"]
    assert ev.main(args) == 0
    direct = ev.metrics_document(ev.compute_metrics(rows, FAST), FAST, {"results": str(results)})
    assert strict_json(out / ev.METRICS_FILE) == json.loads(json.dumps(direct))
    assert (out / ev.REPORT_FILE).is_file() and (out / ev.PLOT_FILE).is_file()


def test_cli_refuses_what_it_cannot_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ev.main(["--dataset", str(tmp_path)])  # no --output
    with pytest.raises(SystemExit):
        ev.main(["--from-results", "x.jsonl", "--dimensions", "charisma"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "dimension": "pitch_variation"}) + "\n")
    assert ev.main(["--from-results", str(bad)]) == 2
    assert "lacks predicted, reference" in capsys.readouterr().err
    # no such model in the (empty) store
    assert ev.main(["--model", "nothing", "--dataset", str(tmp_path), "--output", str(tmp_path / "o")]) == 2


# -- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny corpus of ``test_evaluator_train``: 3 realism and 4 archetype test items."""
    out = tmp_path_factory.mktemp("evaluator-eval-corpus")
    synthesize_corpus(out, SynthConfig(seed=5, num_speakers=4, heldout_speakers=2, utterances_per_speaker=2,
                                       scenes_train=2, scenes_dev=1, scenes_test=1, lines_per_scene=3))
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dramaturg.services.evaluator.model import write_tiny_model

    folder = tmp_path_factory.mktemp("tiny-evaluator")
    write_tiny_model(folder, seed=0)
    return folder


def test_main_scores_every_item_and_dimension(corpus: Path, tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = ev.main(["--model", str(tiny_folder), "--dataset", str(corpus), "--item-set", "both",
                    "--device", "cpu", "--output", str(out), "--n-resamples", "200"])
    assert code == 0
    items = load_split(evaluator_dir(corpus), "both", "test")
    expected = {(item["id"], d): rater_mean(item, d) for item in items for d in item_dimensions(item)}
    rows = ev.read_results(out / ev.RESULTS_FILE)
    assert len(rows) == len(expected) and {(r["id"], r["dimension"]) for r in rows} == set(expected)
    for row in rows:
        assert row["reference"] == pytest.approx(expected[row["id"], row["dimension"]])
        assert 1.0 <= row["predicted"] <= 5.0 and sum(row["distribution"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < row["digit_mass"] <= 1.0
    document = strict_json(out / ev.METRICS_FILE)
    assert set(document["dimensions"]) == {d for _, d in expected}
    assert document["overall"]["n"] == len(rows) and document["overall"]["items"] == len(items)
    assert document["run"]["prompts"] == "detailed"  # a bare folder has no label: the server's default
    assert (out / ev.REPORT_FILE).is_file()
    assert (out / ev.PLOT_FILE).read_bytes().startswith(PNG_SIGNATURE)


def test_main_on_a_store_ref_prompts_in_the_models_style(corpus: Path, dramaturg_home: Path,
                                                         tmp_path: Path) -> None:
    from dramaturg.services.evaluator.model import load_evaluator
    from dramaturg.services.evaluator.scoring import score_item
    from dramaturg.shared.store import ModelStore

    publish_tiny(dramaturg_home, name="tiny", labels={"prompts": "simple"})
    dimensions = ["pitch_variation", "emotion_accuracy"]
    out = tmp_path / "report"
    code = ev.main(["--model", "tiny", "--dataset", str(corpus), "--dimensions", *dimensions,
                    "--max-items", "2", "--device", "cpu", "--output", str(out), "--n-resamples", "200"])
    assert code == 0
    rows = ev.read_results(out / ev.RESULTS_FILE)
    assert len(rows) == 4 and {r["dimension"] for r in rows} == set(dimensions)
    document = strict_json(out / ev.METRICS_FILE)
    assert (document["run"]["model"], document["run"]["prompts"]) == ("tiny:v1", "simple")
    # 2 items < 3: per dimension no correlation, overall (4 rows) one without an interval; notes say why
    for dimension in dimensions:
        pearson = document["dimensions"][dimension]["pearson"]
        assert pearson["value"] is None and "n = 2 < 3" in pearson["note"]
    overall = document["overall"]["pearson"]
    assert overall["value"] is not None and overall["ci"] == [None, None] and "2 items < 3" in overall["note"]
    folder = evaluator_dir(corpus)
    item = load_split(folder, "realism", "test")[0]
    model, processor = load_evaluator(ModelStore(dramaturg_home).resolve("evaluator", "tiny").path)
    simple = score_item(model, processor, load_clip(folder / item["wav_path"]), item, dimensions=dimensions,
                        detailed=False)
    for row in rows:
        if row["id"] == item["id"]:
            assert row["predicted"] == pytest.approx(simple[row["dimension"]].score, abs=1e-5)
            assert row["distribution"] == pytest.approx(list(simple[row["dimension"]].distribution), abs=1e-5)


def test_overall_resamples_items_not_rows() -> None:
    """Ten dimensions that repeat each item's pair carry one dimension's information: resampling items
    gives ``overall`` the single dimension's interval; resampling rows would make it about √10 narrower."""
    rng = np.random.default_rng(7)
    reference = rng.uniform(1, 5, 40)
    predicted = reference + rng.normal(0, 1, 40)
    dimensions = ["pitch_variation", "rhythmic_naturalness", "stress_and_emphasis", "emotion_accuracy",
                  "emotion_intensity_control", "dynamic_range", "voice_identity_matching",
                  "trait_embodiment", "local_story_fit", "global_story_coherence"]
    rows = [row for d in dimensions for row in rows_of(d, predicted, reference)]
    metrics = ev.compute_metrics(rows, FAST)
    single = metrics["dimensions"]["pitch_variation"].estimates["pearson"]
    pooled = metrics["overall"].estimates["pearson"]
    assert pooled.value == pytest.approx(single.value)
    assert (pooled.high - pooled.low) == pytest.approx(single.high - single.low, rel=0.25)
