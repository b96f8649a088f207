"""A PLDA fitted on a speaker model's own training speakers, in the VBx format pyannote reads.

pyannote's VBx clustering (the community-1 pipeline) scores embeddings in a PLDA space. Its PLDA is
two files next to the embedding model: ``xvec_transform.npz`` (``mean1``, ``lda``, ``mean2``: centre,
length-normalise, project with LDA, centre, length-normalise again) and ``plda.npz`` (``mu``, ``tr``,
``psi``: a two-covariance PLDA whose transform ``tr`` makes the within-speaker covariance the identity
and the between-speaker covariance ``diag(psi)``). pyannote only loads them
(``pyannote.audio.core.plda.PLDA``); this module fits them, so a speaker model trained here can drive
VBx without the hub. The LDA is scikit-learn's; the two covariances and their joint diagonalisation
(``scipy.linalg.eigh(B, W)``) are the textbook two-covariance PLDA estimate.

Embeddings come from whole training utterances and from short random crops of them (0.5–2 s, what a
diarization chunk gives a speaker), so the PLDA models the variability the clustering sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PLDA_DIR = "plda"  # inside a speaker model's folder
TRANSFORM_FILE = "xvec_transform.npz"
PLDA_FILE = "plda.npz"


@dataclass
class VbxPlda:
    """The arrays of the two VBx files."""

    mean1: np.ndarray  # (D,) mean of the raw embeddings
    lda: np.ndarray    # (D, d) LDA projection
    mean2: np.ndarray  # (d,) mean after projection
    mu: np.ndarray     # (d,) PLDA mean
    tr: np.ndarray     # (d, d) rows: directions that whiten within-speaker covariance
    psi: np.ndarray    # (d,) between-speaker variances along them

    @property
    def dimension(self) -> int:
        return int(self.lda.shape[1])

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / TRANSFORM_FILE, mean1=self.mean1, mean2=self.mean2, lda=self.lda)
        np.savez(folder / PLDA_FILE, mu=self.mu, tr=self.tr, psi=self.psi)
        return folder


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_vbx_plda(embeddings: np.ndarray, speakers: Sequence[str], lda_dimension: int = 64) -> VbxPlda:
    """Fit the transform and the PLDA on ``embeddings`` (n, D) labelled by ``speakers``.

    The LDA keeps ``min(lda_dimension, speakers - 1, D)`` dimensions (shrinkage LDA: stable with few
    utterances per speaker). Needs at least 3 speakers with 2 embeddings each.
    """
    from scipy.linalg import eigh
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(list(speakers))
    classes, counts = np.unique(labels, return_counts=True)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"embeddings {x.shape} and {len(labels)} speaker labels do not match")
    if len(classes) < 3 or counts.min() < 2:
        raise ValueError(f"a PLDA needs at least 3 speakers with 2 embeddings each; got {len(classes)} "
                         f"speakers, the smallest with {counts.min() if len(counts) else 0}")
    dim_in = x.shape[1]
    dim = max(1, min(int(lda_dimension), len(classes) - 1, dim_in))
    mean1 = x.mean(axis=0)
    x1 = np.sqrt(dim_in) * _l2(x - mean1)  # as vbx_setup's xvec_tf, before the projection
    lda = LinearDiscriminantAnalysis(n_components=dim, solver="eigen", shrinkage="auto").fit(x1, labels)
    projection = np.asarray(lda.scalings_[:, :dim], dtype=np.float64)
    y = x1 @ projection
    mean2 = y.mean(axis=0)
    z = np.sqrt(dim) * _l2(y - mean2)
    mu = z.mean(axis=0)
    centroids = np.stack([z[labels == c].mean(axis=0) for c in classes])
    within = sum((z[labels == c] - centroids[i]).T @ (z[labels == c] - centroids[i])
                 for i, c in enumerate(classes)) / len(z)
    between = np.cov((centroids - mu).T, bias=True)
    psi, vectors = eigh(between, within)  # vectors.T @ within @ vectors = I
    return VbxPlda(mean1=mean1, lda=projection, mean2=mean2, mu=mu, tr=vectors.T, psi=psi)


def crops_for_plda(waveforms: Sequence[np.ndarray], sample_rate: int, *, crops: int = 3,
                   min_seconds: float = 0.5, max_seconds: float = 2.0, seed: int = 0
                   ) -> tuple[list[np.ndarray], list[int]]:
    """Each waveform whole plus ``crops`` random crops of it; returns the pieces and their source index."""
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    sources: list[int] = []
    for index, wav in enumerate(waveforms):
        pieces.append(wav)
        sources.append(index)
        for _ in range(crops):
            n = int(rng.uniform(min_seconds, max_seconds) * sample_rate)
            if len(wav) > n:
                start = int(rng.integers(0, len(wav) - n))
                pieces.append(wav[start:start + n])
                sources.append(index)
    return pieces, sources


def fit_for_encoder(encoder, waveforms: Sequence[np.ndarray], speakers: Sequence[str], folder: Path, *,
                    lda_dimension: int = 64, crops: int = 3, seed: int = 0) -> VbxPlda:
    """Embed ``waveforms`` (and crops) with ``encoder`` (a SpeakerEncoder), fit, save under ``folder``."""
    rate = int(encoder.config.sample_rate)
    pieces, sources = crops_for_plda(waveforms, rate, crops=crops, seed=seed)
    vectors = encoder.embed(pieces)
    plda = fit_vbx_plda(vectors, [speakers[i] for i in sources], lda_dimension)
    plda.save(folder)
    log.info("PLDA (%d dimensions) fitted on %d embeddings of %d speakers -> %s",
             plda.dimension, len(pieces), len(set(speakers)), folder)
    return plda


def has_plda(folder: Path) -> bool:
    return (Path(folder) / TRANSFORM_FILE).is_file() and (Path(folder) / PLDA_FILE).is_file()
