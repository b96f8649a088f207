"""Settings: defaults ← YAML ← environment ← overrides, with typos caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.shared.config import load_settings
from pydantic import ValidationError


def test_layers_and_env_keys(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("max_running_jobs: 2\nserver: {port: 7000, host: 0.0.0.0}\nservices: {speaker: a:1}\n")
    monkeypatch.setenv("DRAMATURG_GATEWAY_SERVER__PORT", "7001")
    monkeypatch.setenv("DRAMATURG_GATEWAY_MAX_PENDING_JOBS", "9")
    monkeypatch.setenv("DRAMATURG_GATEWAY_SERVICES__DIARIZATION", "b:2")
    monkeypatch.setenv("DRAMATURG_API_TOKEN", "not a gateway setting key")
    settings = load_settings(
        GatewaySettings, config, env_prefix="DRAMATURG_GATEWAY_", overrides={"server": {"metrics_port": 9100}}
    )
    assert settings.max_running_jobs == 2 and settings.max_pending_jobs == 9
    assert (
        settings.server.port == 7001
        and settings.server.host == "0.0.0.0"
        and settings.server.metrics_port == 9100
    )
    assert settings.services == {"speaker": "a:1", "diarization": "b:2"}


def test_a_typo_fails_loudly(monkeypatch) -> None:
    monkeypatch.setenv("DRAMATURG_GATEWAY_MAX_RUNING_JOBS", "3")
    with pytest.raises(ValidationError, match="max_runing_jobs"):
        load_settings(GatewaySettings, None, env_prefix="DRAMATURG_GATEWAY_")
