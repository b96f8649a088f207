"""Speaker verification scoring: embed every trial file once, score trials, EER and minDCF.

Back-ends: ``cosine`` (raw cosine of L2-normalised embeddings — what the service serves) and
``asnorm`` (adaptive symmetric score normalisation: each score is standardised against the top-k
closest cohort scores of both sides; the cohort is one mean embedding per training speaker). Every
EER is reported with the name of its back-end.

EER and minDCF come from speechbrain (``speechbrain.utils.metric_stats.EER`` / ``minDCF``) with
P_target = 0.01 and C_miss = C_fa = 1. speechbrain returns the raw detection cost; we report it
normalised by min(C_miss · P_target, C_fa · (1 − P_target)) as NIST and the VoxCeleb literature do,
so 1.0 is the cost of always answering "different" and published numbers compare directly.

The cosine EER threshold becomes the model's ``config.threshold``: the service answers "same
speaker" for cosine scores at or above it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dramaturg.services.speaker.data import SpeakerCorpus, Trial, load_audio
from dramaturg.shared.voice.encoder import SpeakerEncoder
from speechbrain.utils.metric_stats import EER, minDCF

log = logging.getLogger(__name__)

P_TARGET = 0.01
C_MISS = 1.0
C_FA = 1.0
BACKENDS = ("cosine", "asnorm")


@dataclass(frozen=True)
class VerificationResult:
    """One back-end's figures on one trial list."""

    backend: str
    eer: float  # fraction (0.05 = 5 %)
    min_dcf: float  # normalised (see module docstring)
    threshold: float  # score at the EER operating point, in this back-end's score space
    n_target: int
    n_nontarget: int

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}eer_{self.backend}": self.eer,
            f"{prefix}min_dcf_{self.backend}": self.min_dcf,
            f"{prefix}threshold_{self.backend}": self.threshold,
        }

    def describe(self) -> str:
        return (
            f"EER {100 * self.eer:.2f}% ({self.backend}), minDCF {self.min_dcf:.3f}, "
            f"threshold {self.threshold:.3f}"
        )


def eer_min_dcf(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, backend: str = "cosine"
) -> VerificationResult:
    """EER, its threshold and normalised minDCF of scored trials (labels 1 = same speaker)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("EER needs both target (label 1) and non-target (label 0) trials")
    positive = torch.from_numpy(scores[labels])
    negative = torch.from_numpy(scores[~labels])
    eer, threshold = EER(positive, negative)
    raw_dcf, _ = minDCF(positive, negative, c_miss=C_MISS, c_fa=C_FA, p_target=P_TARGET)
    default_cost = min(C_MISS * P_TARGET, C_FA * (1 - P_TARGET))
    return VerificationResult(
        backend,
        float(eer),
        float(raw_dcf) / default_cost,
        float(threshold),
        int(labels.sum()),
        int((~labels).sum()),
    )


def cosine_scores(enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays of L2-normalised embeddings."""
    return np.einsum("nd,nd->n", enroll, test)


def asnorm_scores(
    raw: np.ndarray, enroll: np.ndarray, test: np.ndarray, cohort: np.ndarray, top_k: int = 100
) -> np.ndarray:
    """Adaptive symmetric normalisation (AS-norm 1) of raw cosine scores against a cohort.

    Each side is scored against every cohort embedding; the mean and spread of its ``top_k``
    highest cohort scores standardise the trial score, and the two standardised scores average.
    """
    k = max(1, min(int(top_k), cohort.shape[0]))

    def stats(side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        top = -np.partition(-(side @ cohort.T), k - 1, axis=1)[:, :k]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)

    mu_e, sd_e = stats(enroll)
    mu_t, sd_t = stats(test)
    return 0.5 * ((raw - mu_e) / sd_e + (raw - mu_t) / sd_t)


def embed_files(
    encoder: SpeakerEncoder,
    paths: Sequence[Path],
    *,
    max_seconds: float | None = 30.0,
    chunk: int = 64,
    batch_size: int = 16,
) -> np.ndarray:
    """Embeddings (n, d) of whole files (at most ``max_seconds`` of each), ``chunk`` files at a time."""
    rate = int(encoder.config.sample_rate)
    out = np.zeros((len(paths), encoder.embedding_size), dtype=np.float32)
    for start in range(0, len(paths), chunk):
        waves = [load_audio(p, rate, max_seconds=max_seconds) for p in paths[start : start + chunk]]
        out[start : start + len(waves)] = encoder.embed(waves, batch_size=batch_size)
    return out


def speaker_cohort(
    encoder: SpeakerEncoder, corpus: SpeakerCorpus, *, per_speaker: int = 3, max_seconds: float | None = 30.0
) -> np.ndarray:
    """One L2-normalised mean embedding per training speaker, from up to ``per_speaker`` utterances."""
    by_speaker: dict[str, list[Path]] = {}
    for utt in corpus.train_utterances():
        files = by_speaker.setdefault(utt.speaker, [])
        if len(files) < per_speaker:
            files.append(utt.path)
    if not by_speaker:
        raise ValueError("AS-norm needs training speakers for its cohort")
    paths = [p for files in by_speaker.values() for p in files]
    vectors = embed_files(encoder, paths, max_seconds=max_seconds)
    cohort, row = [], 0
    for files in by_speaker.values():
        mean = vectors[row : row + len(files)].mean(axis=0)
        cohort.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        row += len(files)
    return np.stack(cohort).astype(np.float32)


def evaluate_trials(
    encoder: SpeakerEncoder,
    corpus: SpeakerCorpus,
    trials: Sequence[Trial] | None = None,
    *,
    asnorm: bool = False,
    top_k: int = 100,
    cohort_per_speaker: int = 3,
    max_seconds: float | None = 30.0,
) -> dict[str, VerificationResult]:
    """Score the corpus's trials (or ``trials``) with cosine, and AS-norm when asked.

    Returns ``{"cosine": …}`` plus ``"asnorm"`` with ``asnorm=True``. The encoder's train/eval mode
    is restored afterwards (``embed`` evaluates in eval mode).
    """
    trials = list(corpus.trials() if trials is None else trials)
    if not trials:
        raise ValueError(f"{corpus.root}: no trials to evaluate on (trials.txt)")
    files = sorted({t.enroll for t in trials} | {t.test for t in trials})
    index = {f: i for i, f in enumerate(files)}
    vectors = embed_files(encoder, [corpus.wav_dir / f for f in files], max_seconds=max_seconds)
    enroll = vectors[[index[t.enroll] for t in trials]]
    test = vectors[[index[t.test] for t in trials]]
    labels = np.array([t.label for t in trials])
    raw = cosine_scores(enroll, test)
    results = {"cosine": eer_min_dcf(raw, labels, "cosine")}
    if asnorm:
        cohort = speaker_cohort(encoder, corpus, per_speaker=cohort_per_speaker, max_seconds=max_seconds)
        results["asnorm"] = eer_min_dcf(asnorm_scores(raw, enroll, test, cohort, top_k), labels, "asnorm")
    for result in results.values():
        log.info("%d trials: %s", len(trials), result.describe())
    return results
