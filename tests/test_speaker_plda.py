"""shared/voice/plda.py: a VBx PLDA fitted here is one pyannote loads and that separates speakers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dramaturg.shared.voice.plda import crops_for_plda, fit_vbx_plda, has_plda


def _speakers(n_speakers: int, per_speaker: int, dim: int, seed: int, identity_dims: int = 8
              ) -> tuple[np.ndarray, list[str]]:
    """Unit-norm embeddings whose identity lives in a few dimensions and whose within-speaker
    variability (a "channel") is large in all the others: raw distances barely tell speakers apart,
    a PLDA that learned which directions carry identity does."""
    rng = np.random.default_rng(seed)
    k = identity_dims
    rows = []
    for _ in range(n_speakers):
        centre = np.concatenate([rng.normal(size=k), np.zeros(dim - k)])
        noise = np.concatenate([0.3 * rng.normal(size=(per_speaker, k)),
                                2.0 * rng.normal(size=(per_speaker, dim - k))], axis=1)
        rows.append(centre + noise)
    x = np.concatenate(rows)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [f"s{i}" for i in range(n_speakers) for _ in range(per_speaker)]


def _same_to_different_distance(fea: np.ndarray, speakers: list[str]) -> float:
    labels = np.array(speakers)
    dist = np.linalg.norm(fea[:, None] - fea[None], axis=-1)
    same = labels[:, None] == labels[None]
    return float(dist[same & ~np.eye(len(labels), dtype=bool)].mean() / dist[~same].mean())


def test_fitted_plda_loads_in_pyannote_and_separates_held_out_speakers(tmp_path: Path) -> None:
    from pyannote.audio.core.plda import PLDA

    x, speakers = _speakers(40, 12, 32, seed=0)
    plda = fit_vbx_plda(x, speakers, lda_dimension=16)
    assert plda.lda.shape == (32, 16) and plda.tr.shape == (16, 16) and plda.dimension == 16
    plda.save(tmp_path / "plda")
    assert has_plda(tmp_path / "plda") and not has_plda(tmp_path)

    loaded = PLDA.from_pretrained(str(tmp_path / "plda"))
    assert np.all(loaded.phi > 0) and np.all(np.diff(loaded.phi) <= 1e-9)  # between-speaker variances, sorted
    # speakers the PLDA never saw: in its space same-speaker pairs are far closer than the rest,
    # which raw distances (channel-dominated) are not; a PLDA fitted on shuffled labels learns nothing
    held, held_speakers = _speakers(6, 10, 32, seed=1)
    assert _same_to_different_distance(held, held_speakers) > 0.85
    assert _same_to_different_distance(loaded(held), held_speakers) < 0.6
    shuffled = list(np.random.default_rng(0).permutation(speakers))
    fit_vbx_plda(x, shuffled, lda_dimension=16).save(tmp_path / "shuffled")
    noise = PLDA.from_pretrained(str(tmp_path / "shuffled"))
    assert _same_to_different_distance(noise(held), held_speakers) > 0.85


def test_too_few_speakers_is_refused() -> None:
    x, speakers = _speakers(2, 5, 8, seed=0)
    with pytest.raises(ValueError, match="at least 3 speakers"):
        fit_vbx_plda(x, speakers)
    with pytest.raises(ValueError, match="do not match"):
        fit_vbx_plda(x[:3], speakers)


def test_the_lda_keeps_at_most_speakers_minus_one_dimensions() -> None:
    x, speakers = _speakers(5, 6, 16, seed=2)
    assert fit_vbx_plda(x, speakers, lda_dimension=64).dimension == 4


def test_crops_are_whole_waveforms_plus_short_pieces() -> None:
    waves = [np.arange(16_000 * 3, dtype=np.float32), np.arange(4_000, dtype=np.float32)]
    pieces, sources = crops_for_plda(waves, 16_000, crops=3, seed=0)
    assert sources.count(0) == 4 and sources.count(1) == 1  # a 0.25 s clip is too short to crop
    assert pieces[0] is waves[0]
    for piece in pieces[1:4]:
        assert 8_000 <= len(piece) <= 32_000 and piece[0] + len(piece) - 1 == piece[-1]  # contiguous
