"""Evaluation reports for an evaluator model, as Speech-DRAME reports its judges: error and correlation
against the raters' mean, per dimension, with bootstrap confidence intervals.

**What is scored.** The held-out items of the corpus's Speech-DRAME JSONL (``data.py``: the ``test``
split by default), each clip encoded once and every one of its dimensions scored on that encoding
(``scoring.score_item``, the same scorer the server and the training's held-out check use). The
prediction is the expected answer digit; the reference is the raters' mean (``data.rater_mean``). The
prompt style is the model's own (its store label ``prompts``, as the server reads it) unless
``--prompts`` says otherwise: a model prompted in a style it was not trained on scores off-format.

**Files** (``--output DIR``):

* ``results.jsonl`` — one row per (item, dimension): ``id``, ``dataset_name``, ``dimension``,
  ``predicted``, ``distribution`` (P(1..5) renormalised), ``digit_mass``, ``reference``. It is all the
  metrics need, so ``--from-results`` re-reports without re-scoring (:func:`metrics_from_results`).
* ``metrics.json`` — per dimension and ``overall`` (every row pooled over the dimensions): ``n`` (rows),
  ``items``, ``mae`` / ``rmse`` / ``pearson`` / ``spearman`` each as ``{"value", "ci": [low, high],
  "note"}``, the mean ``digit_mass`` (the format check: near 1 for a model that learnt
  ``<answer>N</answer>``), the ``histogram`` of predicted scores rounded half up (and the reference's,
  and ``middle_share``, the share rounded to 3: a judge collapsing to the middle score, which the GRPO
  issue warns of, shows here first); ``macro`` (the mean over dimensions, what training monitors);
  ``bootstrap`` (method, resamples, level, seed) and ``run`` (model, data, prompt style). NaN is
  written as ``null``.
* ``report.md`` — the table (dimension, n, MAE, RMSE, Pearson [CI], Spearman [CI], digit mass), the
  notes, the histograms; ``predicted_vs_reference.png`` — one scatter per dimension with y = x.

**Confidence intervals.** ``scipy.stats.bootstrap`` over *items*: a resample draws items with
replacement and each brings its prediction and reference together (paired), and for ``overall`` all of
its dimensions together (the dimensions of one clip are not independent, so resampling rows would
make the interval too narrow). All four metrics come from the same resamples. The default method is
BCa (scipy's default); where BCa is undefined — a degenerate bootstrap distribution, e.g. a perfect
predictor, or some resamples with a constant side — the percentile interval of the finite resamples is
given instead, with a note; if more than :data:`MAX_UNDEFINED_SHARE` of them are undefined, no
interval. A correlation is NaN, with a note saying why, when either side is constant or there are
fewer than :data:`MIN_ITEMS` rows; so are all intervals below :data:`MIN_ITEMS` items.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dramaturg.services.evaluator.config import EvaluatorSettings
from dramaturg.services.evaluator.data import evaluator_dir, load_clips, load_split, rater_mean
from dramaturg.services.evaluator.prompts import (
    DIMENSIONS,
    SCORES,
    detailed_for,
    item_dimensions,
    prompt_style,
)
from dramaturg.shared.store import ModelStore

log = logging.getLogger(__name__)

SERVICE = "evaluator"
RESULTS_FILE = "results.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOT_FILE = "predicted_vs_reference.png"
METRICS = ("mae", "rmse", "pearson", "spearman")
CORRELATIONS = ("pearson", "spearman")
OVERALL = "overall"
MIN_ITEMS = 3  # below this a correlation and any interval mean nothing
MAX_UNDEFINED_SHARE = 0.1  # resamples whose statistic is NaN, beyond which no interval is given
COLLAPSE_SHARE = 0.8  # predictions rounding to 3 beyond which the report warns of a collapse to the middle
CI_METHODS = ("BCa", "percentile", "basic")
ALL_DIMENSIONS: tuple[str, ...] = tuple(dict.fromkeys(d for dims in DIMENSIONS.values() for d in dims))


# ============================================================================================ model


@dataclass(frozen=True)
class ModelSource:
    """Where the model loads from and what its store record says (labels: the prompt style)."""

    path: Path
    ref: str
    labels: dict[str, str] = field(default_factory=dict)


def resolve_model(model: str, home: str | Path | None = None) -> ModelSource:
    """A model folder (``load_evaluator``'s), or a store ref (``name``, ``name:v3``, ``""`` = default),
    with its labels (a store version folder keeps them), so its prompt style is known. The store is
    ``home`` or ``DRAMATURG_HOME``, as for the server."""
    folder, source, labels = ModelStore(home).resolve_folder_or_ref(SERVICE, model)
    return ModelSource(folder, source, labels)


def detailed_prompts(labels: Mapping[str, str], override: str | None = None) -> bool:
    """The prompt style to use: ``override`` (simple | detailed), else the model's label, else the
    server's default setting — the same rule the server follows, so a report scores what serving would."""
    if override:
        if override not in ("simple", "detailed"):
            raise ValueError(f"prompts {override!r}: expected simple or detailed")
        return override == "detailed"
    default = bool(EvaluatorSettings.model_fields["detailed_prompts"].default)
    return detailed_for(dict(labels), default)


# ============================================================================================= data


def load_items(
    dataset: str | Path, *, split: str = "test", item_set: str = "realism", max_items: int = 0,
    dimensions: Sequence[str] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """The evaluator folder and the items to score: those with at least one wanted dimension, the first
    ``max_items`` of them (0 = all; realism items come before archetype ones under ``both``)."""
    folder = evaluator_dir(dataset)
    items = load_split(folder, item_set, split)
    if dimensions:
        items = [item for item in items if wanted_dimensions(item, dimensions)]
    if max_items > 0:
        items = items[:max_items]
    if not items:
        raise ValueError(f"{folder}: no {item_set} items in split {split!r}"
                         + (f" with dimensions {', '.join(dimensions)}" if dimensions else ""))
    return folder, items


def wanted_dimensions(item: Mapping[str, Any], dimensions: Sequence[str] | None) -> tuple[str, ...]:
    """The item's dimensions, restricted to ``dimensions`` when given (in the item's order)."""
    own = item_dimensions(item)
    return own if not dimensions else tuple(d for d in own if d in dimensions)


# ========================================================================================== scoring


def score_items(
    model: Any,
    processor: Any,
    folder: Path,
    items: Sequence[Mapping[str, Any]],
    *,
    detailed: bool,
    dimensions: Sequence[str] | None = None,
    batch_size: int | None = None,
    on_item: Callable[[Mapping[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Result rows (:data:`RESULTS_FILE`'s) for every item and wanted dimension.

    Each clip is read once and each item's dimensions are scored on one encoding (``score_item``);
    ``on_item`` is called after each item (the CLI's progress bar).
    """
    import torch
    from dramaturg.services.evaluator.scoring import score_item

    clips = load_clips(folder, items)
    rows: list[dict[str, Any]] = []
    model.eval()
    with torch.no_grad():
        for item in items:
            wanted = wanted_dimensions(item, dimensions)
            if wanted:
                scores = score_item(model, processor, clips[str(item["wav_path"])], item,
                                    dimensions=wanted, detailed=detailed, batch_size=batch_size)
                rows += [result_row(item, s.dimension, s.score, s.distribution, s.digit_mass)
                         for s in scores.values()]
            if on_item is not None:
                on_item(item)
    log.info("scored %d items: %d (item, dimension) rows", len(items), len(rows))
    return rows


def result_row(item: Mapping[str, Any], dimension: str, predicted: float, distribution: Sequence[float],
               digit_mass: float) -> dict[str, Any]:
    """One row of :data:`RESULTS_FILE`: the prediction and the raters' mean it is judged against."""
    return {
        "id": str(item["id"]),
        "dataset_name": str(item.get("dataset_name", "")),
        "dimension": dimension,
        "predicted": float(predicted),
        "distribution": [float(p) for p in distribution],
        "digit_mass": float(digit_mass),
        "reference": rater_mean(item, dimension),
    }


def write_results(rows: Iterable[Mapping[str, Any]], path: Path) -> Path:
    """Rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(row)) + "\n" for row in rows))
    return path


REQUIRED_FIELDS = ("id", "dimension", "predicted", "reference")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a :data:`RESULTS_FILE`; a row missing a field the metrics need is an error naming its line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [name for name in REQUIRED_FIELDS if name not in row]
        if missing:
            raise ValueError(f"{path}:{number}: row lacks {', '.join(missing)}")
        rows.append(row)
    return rows


# ========================================================================================== metrics


@dataclass(frozen=True)
class Estimate:
    """One metric: its value, its confidence interval, and why either is NaN (or how it was made)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": _finite(self.value), "ci": [_finite(self.low), _finite(self.high)],
                "note": self.note}


@dataclass(frozen=True)
class GroupMetrics:
    """The metrics of one dimension (or of every row pooled: ``overall``)."""

    name: str
    n: int  # rows
    items: int
    estimates: dict[str, Estimate]
    digit_mass: float
    histogram: dict[int, int]
    reference_histogram: dict[int, int]

    @property
    def middle_share(self) -> float:
        """Share of predictions rounded to the middle score (3): the collapse to watch for."""
        return self.histogram.get(3, 0) / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "items": self.items,
            **{name: estimate.to_dict() for name, estimate in self.estimates.items()},
            "digit_mass": _finite(self.digit_mass),
            "histogram": {str(k): v for k, v in self.histogram.items()},
            "reference_histogram": {str(k): v for k, v in self.reference_histogram.items()},
            "middle_share": _finite(self.middle_share),
        }


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are made: ``n_resamples`` resamples, ``method`` (scipy's), level, seed."""

    n_resamples: int = 2000
    confidence_level: float = 0.95
    method: str = "BCa"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CI_METHODS:
            raise ValueError(f"ci method {self.method!r}: expected one of {', '.join(CI_METHODS)}")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence level {self.confidence_level} is not in (0, 1)")
        if self.n_resamples < 1:
            raise ValueError("n_resamples must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n_resamples": self.n_resamples,
                "confidence_level": self.confidence_level, "seed": self.seed,
                "resampling": "items, paired (an item brings its prediction and reference; "
                              "overall: all of its dimensions)"}


def _finite(value: float) -> float | None:
    """JSON has no NaN: ``null`` instead."""
    return float(value) if value is not None and math.isfinite(value) else None


def correlation_note(predicted: np.ndarray, reference: np.ndarray) -> str:
    """Why a correlation of these rows is undefined, or ``""``."""
    if len(predicted) < MIN_ITEMS:
        return f"n = {len(predicted)} < {MIN_ITEMS}: no correlation"
    if np.ptp(predicted) == 0:
        return "the predictions are constant: correlation undefined"
    if np.ptp(reference) == 0:
        return "the reference is constant: correlation undefined"
    return ""


def point_metrics(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson and Spearman (``scipy.stats``); the correlations NaN where undefined."""
    from scipy.stats import pearsonr, spearmanr

    error = predicted - reference
    values = {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error**2)))}
    defined = not correlation_note(predicted, reference)
    values["pearson"] = float(pearsonr(predicted, reference).statistic) if defined else math.nan
    values["spearman"] = float(spearmanr(predicted, reference).statistic) if defined else math.nan
    return values


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.clip(np.dot(a, b) / denominator, -1.0, 1.0)) if denominator > 0 else math.nan


def resample_metrics(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """:func:`point_metrics` as one vector, in numpy (called once per resample: scipy's pearsonr and
    spearmanr validate and warn on each call). Spearman is Pearson of the average ranks, as in scipy."""
    from scipy.stats import rankdata

    error = predicted - reference
    if np.ptp(predicted) == 0 or np.ptp(reference) == 0:
        pearson = spearman = math.nan
    else:
        pearson = _pearson(predicted, reference)
        spearman = _pearson(rankdata(predicted), rankdata(reference))
    return np.array([np.mean(np.abs(error)), math.sqrt(float(np.mean(error**2))), pearson, spearman])


def bootstrap_intervals(
    predicted: np.ndarray, reference: np.ndarray, clusters: Sequence[np.ndarray], settings: BootstrapSettings,
    seed_key: str = "",
) -> list[tuple[float, float, str]]:
    """(low, high, note) per metric of :data:`METRICS`, from ``scipy.stats.bootstrap`` over ``clusters``
    (the row indices of each item: a resample draws items, each with all its rows)."""
    from scipy.stats import bootstrap

    def statistic(index: np.ndarray) -> np.ndarray:
        rows = np.concatenate([clusters[int(i)] for i in index])
        return resample_metrics(predicted[rows], reference[rows])

    rng = np.random.default_rng([settings.seed, zlib.crc32(seed_key.encode())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa's "degenerate distribution": handled below, with a note
        result = bootstrap((np.arange(len(clusters), dtype=float),), statistic,
                           n_resamples=settings.n_resamples, vectorized=False, paired=True,
                           confidence_level=settings.confidence_level, method=settings.method, rng=rng)
    lows = np.atleast_1d(result.confidence_interval.low)
    highs = np.atleast_1d(result.confidence_interval.high)
    distribution = np.atleast_2d(result.bootstrap_distribution)
    return [_interval(lows[k], highs[k], distribution[k], settings) for k in range(len(METRICS))]


def _interval(low: float, high: float, distribution: np.ndarray, settings: BootstrapSettings
              ) -> tuple[float, float, str]:
    """scipy's interval when finite; else the percentile interval of the finite resamples, with a note."""
    if math.isfinite(low) and math.isfinite(high):
        return float(low), float(high), ""
    finite = distribution[np.isfinite(distribution)]
    undefined = distribution.size - finite.size
    if finite.size == 0 or undefined > MAX_UNDEFINED_SHARE * distribution.size:
        return math.nan, math.nan, (f"no interval: {undefined} of {distribution.size} resamples undefined "
                                    "(a constant side)")
    tail = 50 * (1 - settings.confidence_level)
    low, high = np.percentile(finite, [tail, 100 - tail])
    note = f"{settings.method} undefined (degenerate bootstrap distribution): percentile interval"
    if undefined:
        note += f" of the {finite.size} resamples without a constant side ({undefined} left out)"
    return float(low), float(high), note


def rounded_histogram(scores: np.ndarray) -> dict[int, int]:
    """Counts of each score 1..5 after rounding half up (as a mean target is rounded in ``data.py``)."""
    rounded = np.clip(np.floor(scores + 0.5), SCORES[0], SCORES[-1]).astype(int)
    return {score: int(np.sum(rounded == score)) for score in SCORES}


def group_metrics(name: str, rows: Sequence[Mapping[str, Any]], settings: BootstrapSettings) -> GroupMetrics:
    """Every metric of ``rows`` (one dimension, or all pooled), intervals resampling items."""
    predicted = np.array([float(r["predicted"]) for r in rows])
    reference = np.array([float(r["reference"]) for r in rows])
    by_item: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_item.setdefault(str(row["id"]), []).append(index)
    clusters = [np.array(indices) for indices in by_item.values()]
    values = point_metrics(predicted, reference)
    notes = dict.fromkeys(METRICS, "")
    for metric in CORRELATIONS:
        notes[metric] = correlation_note(predicted, reference)
    if len(clusters) < MIN_ITEMS:
        intervals = [(math.nan, math.nan, f"{len(clusters)} items < {MIN_ITEMS}: no interval")] * len(METRICS)
    else:
        intervals = bootstrap_intervals(predicted, reference, clusters, settings, seed_key=name)
    estimates = {}
    for metric, (low, high, ci_note) in zip(METRICS, intervals, strict=True):
        if not math.isfinite(values[metric]):
            low, high, ci_note = math.nan, math.nan, ""
        note = "; ".join(n for n in (notes[metric], ci_note) if n)
        estimates[metric] = Estimate(values[metric], low, high, note)
    masses = [float(r["digit_mass"]) for r in rows if r.get("digit_mass") is not None]
    return GroupMetrics(
        name=name, n=len(rows), items=len(clusters), estimates=estimates,
        digit_mass=float(np.mean(masses)) if masses else math.nan,
        histogram=rounded_histogram(predicted), reference_histogram=rounded_histogram(reference),
    )


def dimensions_in(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The rows' dimensions in the rubrics' order (unknown ones after, in order of appearance)."""
    present = list(dict.fromkeys(str(r["dimension"]) for r in rows))
    return [d for d in ALL_DIMENSIONS if d in present] + [d for d in present if d not in ALL_DIMENSIONS]


def compute_metrics(
    rows: Sequence[Mapping[str, Any]], settings: BootstrapSettings | None = None,
    dimensions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``{"dimensions": {dim: GroupMetrics}, "overall": GroupMetrics, "macro": {metric: mean}}``.

    ``macro`` is the mean over dimensions of each finite per-dimension value (training's summaries are
    these means of MAE and Spearman).
    """
    settings = settings or BootstrapSettings()
    if dimensions:
        rows = [r for r in rows if r["dimension"] in dimensions]
    if not rows:
        wanted = f" for {', '.join(dimensions)}" if dimensions else ""
        raise ValueError(f"no result rows to report on{wanted}")
    groups = {d: group_metrics(d, [r for r in rows if r["dimension"] == d], settings)
              for d in dimensions_in(rows)}
    macro = {}
    for metric in METRICS:
        values = [g.estimates[metric].value for g in groups.values()]
        finite = [v for v in values if math.isfinite(v)]
        macro[metric] = float(np.mean(finite)) if finite else math.nan
    return {"dimensions": groups, "overall": group_metrics(OVERALL, rows, settings), "macro": macro}


def metrics_document(metrics: Mapping[str, Any], settings: BootstrapSettings,
                     run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`compute_metrics`' result as :data:`METRICS_FILE`'s JSON (NaN as null)."""
    return {
        "run": dict(run or {}),
        "bootstrap": settings.to_dict(),
        "dimensions": {name: group.to_dict() for name, group in metrics["dimensions"].items()},
        OVERALL: metrics[OVERALL].to_dict(),
        "macro": {metric: _finite(value) for metric, value in metrics["macro"].items()},
    }


# ========================================================================================== reports


def _cell(estimate: Estimate, with_ci: bool) -> str:
    if not math.isfinite(estimate.value):
        return "n/a"
    text = f"{estimate.value:.3f}"
    if with_ci:
        ci = (f"[{estimate.low:.3f}, {estimate.high:.3f}]"
              if math.isfinite(estimate.low) and math.isfinite(estimate.high) else "[n/a]")
        text += f" {ci}"
    return text


def report_markdown(metrics: Mapping[str, Any], settings: BootstrapSettings,
                    run: Mapping[str, Any] | None = None) -> str:
    """The report: the table, its notes, the histograms of rounded scores, the plot."""
    level = f"{100 * settings.confidence_level:g} %"
    lines = ["# Evaluator report", ""]
    lines += [f"- {key}: {value}" for key, value in (run or {}).items()]
    lines += [f"- intervals: {level} bootstrap ({settings.method}, {settings.n_resamples} resamples of "
              f"items, seed {settings.seed})", ""]
    lines += [f"| dimension | n | MAE | RMSE | Pearson [{level} CI] | Spearman [{level} CI] | digit mass |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    groups = [*metrics["dimensions"].values(), metrics[OVERALL]]
    notes: list[str] = []
    for group in groups:
        est = group.estimates
        name = f"**{group.name}**" if group.name == OVERALL else group.name
        mass = f"{group.digit_mass:.3f}" if math.isfinite(group.digit_mass) else "n/a"
        lines.append(f"| {name} | {group.n} | {_cell(est['mae'], False)} | {_cell(est['rmse'], False)} | "
                     f"{_cell(est['pearson'], True)} | {_cell(est['spearman'], True)} | {mass} |")
        notes += [f"- {group.name} {metric}: {est[metric].note}" for metric in METRICS if est[metric].note]
        if group.middle_share >= COLLAPSE_SHARE:
            notes.append(f"- {group.name}: {100 * group.middle_share:.0f} % of the predictions round to 3 "
                         "(collapsed to the middle score?)")
    macro = metrics["macro"]
    means = [f"{m} {macro[m]:.3f}" if math.isfinite(macro[m]) else f"{m} n/a" for m in METRICS]
    lines += ["", "Mean over dimensions: " + ", ".join(means)]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "## Predicted scores, rounded (reference in brackets)", "",
              "| dimension | " + " | ".join(str(s) for s in SCORES) + " | share at 3 |",
              "|---|" + "---:|" * (len(SCORES) + 1)]
    for group in groups:
        counts = " | ".join(f"{group.histogram[s]} ({group.reference_histogram[s]})" for s in SCORES)
        lines.append(f"| {group.name} | {counts} | {group.middle_share:.2f} |")
    lines += ["", f"![predicted vs reference]({PLOT_FILE})", ""]
    return "\n".join(lines)


def plot_predicted_vs_reference(rows: Sequence[Mapping[str, Any]], path: Path,
                                metrics: Mapping[str, Any] | None = None) -> Path:
    """A grid of scatter plots (reference on x, prediction on y, the y = x line), one per dimension.

    Drawn on an Agg canvas without pyplot: no display, no global figure state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dimensions = dimensions_in(rows)
    columns = min(4, len(dimensions))
    lines = math.ceil(len(dimensions) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.2 * lines), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(lines, columns, squeeze=False)
    for ax in axes.flat[len(dimensions):]:
        ax.set_visible(False)
    for ax, dimension in zip(axes.flat, dimensions, strict=False):
        chosen = [r for r in rows if r["dimension"] == dimension]
        ax.plot([1, 5], [1, 5], color="grey", linestyle="--", linewidth=1)
        ax.scatter([r["reference"] for r in chosen], [r["predicted"] for r in chosen], s=14, alpha=0.6)
        title = f"{dimension} (n={len(chosen)})"
        if metrics is not None and dimension in metrics["dimensions"]:
            rho = metrics["dimensions"][dimension].estimates["pearson"].value
            title += f"\nPearson {rho:.2f}" if math.isfinite(rho) else "\nPearson n/a"
        ax.set(xlim=(0.8, 5.2), ylim=(0.8, 5.2), xlabel="raters' mean", ylabel="predicted", title=title)
        ax.title.set_fontsize(9)
        ax.set_aspect("equal")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def write_report(rows: Sequence[Mapping[str, Any]], output: Path, settings: BootstrapSettings | None = None,
                 *, run: Mapping[str, Any] | None = None, dimensions: Sequence[str] | None = None
                 ) -> dict[str, Any]:
    """Metrics, ``metrics.json``, ``report.md`` and the plot in ``output``; returns the metrics."""
    settings = settings or BootstrapSettings()
    metrics = compute_metrics(rows, settings, dimensions)
    chosen = [r for r in rows if not dimensions or r["dimension"] in dimensions]
    output.mkdir(parents=True, exist_ok=True)
    document = metrics_document(metrics, settings, run)
    (output / METRICS_FILE).write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    (output / REPORT_FILE).write_text(report_markdown(metrics, settings, run))
    plot_predicted_vs_reference(chosen, output / PLOT_FILE, metrics)
    log.info("report written to %s", output)
    return metrics


def metrics_from_results(results: str | Path, output: Path | None = None,
                         settings: BootstrapSettings | None = None, *,
                         dimensions: Sequence[str] | None = None) -> dict[str, Any]:
    """Re-report an existing ``results.jsonl`` without scoring again (into ``output``, default its folder)."""
    results = Path(results)
    rows = read_results(results)
    return write_report(rows, output or results.parent, settings, run={"results": str(results)},
                        dimensions=dimensions)


# ============================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dramaturg eval evaluator",
        description="Score the held-out Speech-DRAME items with an evaluator model and report MAE, RMSE, "
                    "Pearson and Spearman per dimension with bootstrap confidence intervals.",
    )
    parser.add_argument("--model", default="",
                        help="a model folder, or a store ref NAME[:VERSION] (store: DRAMATURG_HOME); "
                             "empty: the store's default evaluator")
    parser.add_argument("--dataset", type=Path, help="a `dramaturg data synth` corpus (or its evaluator/)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--item-set", default="realism", choices=("realism", "archetype", "both"))
    parser.add_argument("--dimensions", nargs="+", default=None, metavar="DIM",
                        help=f"only these dimensions (known: {', '.join(ALL_DIMENSIONS)})")
    parser.add_argument("--max-items", type=int, default=0, help="the first N items only (0: all)")
    parser.add_argument("--prompts", choices=("simple", "detailed"), default=None,
                        help="prompt style (default: the model's store label, as the server does)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=0, help="prompts per language-model pass (0: all)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report folder (required unless --from-results: then that file's folder)")
    parser.add_argument("--from-results", type=Path, default=None, metavar="FILE",
                        help="re-report an existing results.jsonl instead of scoring")
    parser.add_argument("--n-resamples", type=int, default=BootstrapSettings.n_resamples)
    parser.add_argument("--confidence", type=float, default=BootstrapSettings.confidence_level)
    parser.add_argument("--ci-method", choices=CI_METHODS, default=BootstrapSettings.method)
    parser.add_argument("--seed", type=int, default=BootstrapSettings.seed, help="bootstrap seed")
    return parser


def _score_with_progress(args: argparse.Namespace, console: Any
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load the model and the items, score them under a progress bar; the rows and the run's description."""
    from dramaturg.services.evaluator.model import load_evaluator
    from dramaturg.shared.model_service import pick_device
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    source = resolve_model(args.model)
    detailed = detailed_prompts(source.labels, args.prompts)
    folder, items = load_items(args.dataset, split=args.split, item_set=args.item_set,
                               max_items=args.max_items, dimensions=args.dimensions)
    device = pick_device(args.device)
    model, processor = load_evaluator(source.path, device=device)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=len(items))
        rows = score_items(model, processor, folder, items, detailed=detailed, dimensions=args.dimensions,
                           batch_size=args.batch_size or None, on_item=lambda _: bar.advance(task))
    run = {"model": source.ref, "prompts": prompt_style(detailed), "dataset": str(args.dataset),
           "split": args.split, "item_set": args.item_set, "items": len(items), "device": device,
           "scored_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return rows, run


def main(argv: list[str] | None = None) -> int:
    """``dramaturg eval evaluator``: score and report, or re-report a results file."""
    from dramaturg.shared.grpc.errors import ServiceError
    from rich.console import Console
    from rich.markup import escape

    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [d for d in args.dimensions or () if d not in ALL_DIMENSIONS]
    if unknown:
        parser.error(f"unknown dimension(s) {', '.join(unknown)}; known: {', '.join(ALL_DIMENSIONS)}")
    if args.from_results is None and (args.dataset is None or args.output is None):
        parser.error("--dataset and --output are required unless --from-results is given")
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    try:
        settings = BootstrapSettings(args.n_resamples, args.confidence, args.ci_method, args.seed)
        if args.from_results is not None:
            output = args.output or args.from_results.parent
            metrics = metrics_from_results(args.from_results, output, settings, dimensions=args.dimensions)
        else:
            rows, run = _score_with_progress(args, console)
            output = args.output
            write_results(rows, output / RESULTS_FILE)
            metrics = write_report(rows, output, settings, run=run)
    except (FileNotFoundError, ValueError, ServiceError) as exc:
        console.print(f"[red]dramaturg eval evaluator:[/red] {escape(str(exc))}")
        return 2
    overall = metrics[OVERALL].estimates
    console.print(f"{metrics[OVERALL].n} rows: MAE {_cell(overall['mae'], False)}, "
                  f"Pearson {_cell(overall['pearson'], True)}, Spearman {_cell(overall['spearman'], True)}; "
                  f"report in {output / REPORT_FILE}", markup=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
