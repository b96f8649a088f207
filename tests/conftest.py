"""Shared fixtures: an isolated DRAMATURG_HOME and small audio made on the spot."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(autouse=True)
def dramaturg_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DRAMATURG_HOME", str(home))
    monkeypatch.delenv("DRAMATURG_API_TOKEN", raising=False)
    return home


def tone_wav(seconds: float = 2.0, rate: int = 16_000, freq: float = 220.0, gaps: bool = True) -> bytes:
    """A tone with silent gaps: something with speech-like activity to measure."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    if gaps:
        x[(t % 1.0) > 0.6] = 0.0
    x += np.random.default_rng(0).normal(0, 1e-3, len(x))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two cores shared with other jobs: one torch thread per process is several times faster than
    two spinning ones. Modules that run models opt in with ``pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
