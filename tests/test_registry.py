"""shared/registry.py: each service registers once (an entry point), and everything finds it there."""

from __future__ import annotations

import pytest
from dramaturg.shared import registry
from dramaturg.shared.service import Service


def test_the_built_services_are_registered() -> None:
    assert {"gateway", "speaker", "diarization"} <= set(registry.built_services())
    assert registry.model_services() == sorted(registry.model_services())
    assert "gateway" not in registry.model_services()


@pytest.mark.parametrize("name", registry.built_services())
def test_every_entry_resolves(name: str) -> None:
    entry = registry.get(name)
    assert entry.package == f"dramaturg.services.{name}"
    settings = entry.load_settings_class()()
    service = entry.load_factory()
    assert callable(service)
    assert settings.server.max_message_bytes > 0
    if entry.is_model_service:
        assert entry.recipes.startswith(f"{entry.package}.")
        assert entry.demo_config and entry.resource(entry.demo_config).is_file(), entry.demo_config


def test_a_model_service_finds_its_recipes_through_the_registry(tmp_path) -> None:
    from dramaturg.services.speaker.config import SpeakerSettings
    from dramaturg.services.speaker.server import SpeakerService

    service = SpeakerService(SpeakerSettings(), home=tmp_path)
    try:
        assert isinstance(service, Service)
        assert service.recipes_import_path == registry.get("speaker").recipes
        assert "ecapa-aam" in service.runner.recipes()
    finally:
        service.executor.shutdown()
        service.runner.close()


def test_planned_and_unknown_services_are_told_apart() -> None:
    for name in set(registry.PLANNED) - set(registry.registered()):
        with pytest.raises(registry.ServiceNotBuilt, match="not built yet"):
            registry.get(name)
    with pytest.raises(KeyError, match="unknown service 'nope'"):
        registry.get("nope")
