"""The evaluator's simple baseline: ridge regression on MFCC statistics, one regressor per dimension.

What the learning check (``tests/test_evaluator_learning.py``) sets the trained evaluator beside: a
model that sees only summary statistics of the clip's spectrum and is fitted, in closed form, to the
raters' mean of the training items. Per clip, :func:`mfcc_statistics` takes ``N_MFCC`` MFCCs
(torchaudio, 25 ms windows, 10 ms hop, 40 mel bands) and their first differences (deltas), and keeps
the mean and the standard deviation of each over the clip's frames: ``4 × N_MFCC`` numbers. Per
dimension, :func:`fit_ridge` standardises them and fits scikit-learn's ``RidgeCV`` (the penalty chosen
by leave-one-out over :data:`ALPHAS`) against :func:`~.data.rater_mean`; :func:`predict_ridge` clips the
predictions to the 1-5 scale. :func:`baseline_rows` gives the held-out predictions as
``evaluate.py``'s result rows, so that the same metric functions judge the baseline and the models.

No transcript, prompt or context is used: only the audio, as for the evaluator's prosody dimensions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import rater_mean
from .model import SAMPLE_RATE
from .prompts import item_dimensions

N_MFCC = 20
N_MELS = 40
WINDOW = 400  # samples: 25 ms at 16 kHz
HOP = 160  # samples: 10 ms
ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 25))


@functools.cache
def _mfcc_transform() -> Any:
    import torchaudio

    return torchaudio.transforms.MFCC(
        sample_rate=SAMPLE_RATE,
        n_mfcc=N_MFCC,
        melkwargs={"n_fft": WINDOW, "win_length": WINDOW, "hop_length": HOP, "n_mels": N_MELS},
    )


def mfcc_statistics(samples: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over frames of the MFCCs and their deltas: ``4 × N_MFCC`` floats.

    ``samples`` is mono float32 at 16 kHz (what :func:`~.data.load_clip` returns).
    """
    import torchaudio.functional as AF

    with torch.no_grad():
        wav = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        mfcc = _mfcc_transform()(wav)  # (N_MFCC, frames)
        delta = AF.compute_deltas(mfcc)
    parts = [mfcc.mean(dim=1), mfcc.std(dim=1), delta.mean(dim=1), delta.std(dim=1)]
    return torch.cat(parts).numpy().astype(np.float64)


def feature_matrix(items: Sequence[Mapping[str, Any]], clips: Mapping[str, np.ndarray]) -> np.ndarray:
    """One row of :func:`mfcc_statistics` per item (its clip by ``wav_path``)."""
    return np.stack([mfcc_statistics(clips[str(item["wav_path"])]) for item in items])


@dataclass
class RidgeBaseline:
    """One fitted standardise-then-``RidgeCV`` pipeline per dimension."""

    models: dict[str, Any]

    @property
    def dimensions(self) -> list[str]:
        return list(self.models)


def fit_ridge(
    items: Sequence[Mapping[str, Any]],
    clips: Mapping[str, np.ndarray],
    dimensions: Sequence[str],
) -> RidgeBaseline:
    """Fit one regressor per dimension on the items that have it, against the raters' mean."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = feature_matrix(items, clips)  # once per item, whatever the number of dimensions
    models: dict[str, Any] = {}
    for dimension in dimensions:
        having = [k for k, item in enumerate(items) if dimension in item_dimensions(item)]
        if len(having) < 2:
            raise ValueError(f"{dimension}: {len(having)} training items, at least 2 needed")
        target = np.array([rater_mean(items[k], dimension) for k in having])
        pipeline = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
        models[dimension] = pipeline.fit(features[having], target)
    return RidgeBaseline(models)


def predict_ridge(
    baseline: RidgeBaseline,
    items: Sequence[Mapping[str, Any]],
    clips: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Dimension → the predicted 1-5 score of every item (clipped to the scale), in ``items``' order."""
    features = feature_matrix(items, clips)
    return {d: np.clip(model.predict(features), 1.0, 5.0) for d, model in baseline.models.items()}


def baseline_rows(
    baseline: RidgeBaseline,
    items: Sequence[Mapping[str, Any]],
    clips: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """``evaluate.py``'s result rows (id, dataset_name, dimension, predicted, reference; no distribution
    and no digit mass: a regressor has neither) for every item and fitted dimension it has."""
    predicted = predict_ridge(baseline, items, clips)
    rows = []
    for index, item in enumerate(items):
        for dimension in baseline.dimensions:
            if dimension in item_dimensions(item):
                rows.append({
                    "id": str(item["id"]),
                    "dataset_name": str(item.get("dataset_name", "")),
                    "dimension": dimension,
                    "predicted": float(predicted[dimension][index]),
                    "distribution": [],
                    "digit_mass": None,
                    "reference": rater_mean(item, dimension),
                })
    return rows
