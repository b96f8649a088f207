"""One device rule for serving and training (shared.model_service.pick_device)."""

from __future__ import annotations

import pytest
import torch
from dramaturg.services.diarization.train import device_of, make_trainer
from dramaturg.shared.model_service import pick_device


def test_auto_follows_cuda_visibility() -> None:
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("") == pick_device("auto")


@pytest.mark.parametrize("setting", ["cpu", "cuda", "cuda:1"])
def test_explicit_devices_pass_through(setting: str) -> None:
    assert pick_device(setting) == setting


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "tpu", "CPU"])
def test_unknown_devices_are_refused_with_the_choices(setting: str) -> None:
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        pick_device(setting)
    with pytest.raises(ValueError, match=repr(setting)):
        device_of({"device": setting})


def test_training_runs_where_the_config_says(tmp_path) -> None:
    trainer = make_trainer({"device": "cpu", "epochs": 1}, tmp_path)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
