"""The speaker service's model is the platform's voice encoder (``shared/voice/encoder.py``).

The encoder lives in the voice library because the diarization pipeline embeds with it too; this
module is what the speaker service adds: the untrained tiny model the registry names
(``ServiceEntry.tiny_model``) for the model-service contract test and smoke checks of a stack that
has trained nothing yet.
"""

from __future__ import annotations

from pathlib import Path

TINY_ARCHITECTURE = "ecapa"


def write_tiny_model(folder: Path, home: Path | None = None, *, seed: int = 0) -> None:
    """An untrained tiny ECAPA encoder in ``folder`` (``save_pretrained``), the same for the same seed."""
    import torch
    from dramaturg.shared.voice.encoder import SpeakerEncoderConfig, build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = build_encoder(SpeakerEncoderConfig(architecture=TINY_ARCHITECTURE))
    encoder.save_pretrained(str(folder))
