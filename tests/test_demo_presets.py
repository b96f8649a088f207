"""The presets ``make demo`` trains on a fresh home: valid recipes, and smaller than the learning check.

A newcomer's first ``make demo`` trains the speaker, diarization, audio-LLM, evaluator and TTS models
before it can run its jobs, so it runs each service's own ``demo_config`` (``presets/demo.yaml``),
not the learning check's ``cpu-quick.yaml``. These tests read both the way the demo does (through
the registry) and validate them the way the runner would (the service's recipes, the overrides
merged over the base recipe's defaults, the ``synth:`` corpus), so a typo fails here and not minutes
into a first demo; and they hold the demo presets to being cheaper than cpu-quick on every axis that
costs time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from dramaturg.shared import registry
from dramaturg.shared.cli.demo import DEMO_SERVICES, demo_preset, describe_plan, training_plan
from dramaturg.shared.data.config import SynthConfig
from dramaturg.shared.training import load_recipes
from dramaturg.shared.training.recipe import RUNNER_KEYS, merge_config


def spec_of(path: Path) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    assert isinstance(spec, dict), path
    return spec


def demo_and_learning_check(service: str) -> tuple[dict[str, Any], dict[str, Any]]:
    entry = registry.get(service)
    demo = entry.resource(entry.demo_config)
    return spec_of(demo), spec_of(demo.with_name("cpu-quick.yaml"))


@pytest.mark.parametrize("service", DEMO_SERVICES)
def test_demo_config_is_a_valid_recipe_config(service: str) -> None:
    entry = registry.get(service)
    path = entry.resource(entry.demo_config)
    assert path == demo_preset(service)
    assert path.name == "demo.yaml" and path.parent.name == "presets", "the demo has its own preset"
    spec = spec_of(path)
    recipes = load_recipes(registry.recipes_path(service))  # the light recipes module, as the server
    assert spec["recipe"] in recipes, f"{path}: no base recipe {spec['recipe']!r}"
    merged = merge_config(recipes[spec["recipe"]].defaults, spec["overrides"])  # raises on a bad key
    # every preset is also a recipe of its name: the runner would run exactly these values
    assert recipes["demo"].defaults == {k: v for k, v in merged.items() if k not in RUNNER_KEYS}
    assert spec["dataset"] == "synthetic"
    SynthConfig(**spec["synth"])  # the corpus `dramaturg train` generates for it
    assert spec["output_model"], "the demo's model gets its own name in the store"
    assert float(spec["estimated_minutes"]) > 0, "the demo's plan line says how long it trains"


def test_demo_presets_are_smaller_than_the_learning_check() -> None:
    speaker, speaker_check = demo_and_learning_check("speaker")
    assert speaker["recipe"] == speaker_check["recipe"], "the same recipe as cpu-quick, smaller"
    assert speaker["overrides"]["max_steps"] < speaker_check["overrides"]["max_steps"]
    assert speaker["synth"]["num_speakers"] <= speaker_check["synth"]["num_speakers"]
    assert speaker["synth"]["utterances_per_speaker"] <= speaker_check["synth"]["utterances_per_speaker"]

    diarization, diarization_check = demo_and_learning_check("diarization")
    assert diarization["recipe"] == diarization_check["recipe"]
    ours, theirs = diarization["overrides"], diarization_check["overrides"]
    assert ours["epochs"] < theirs["epochs"]
    trials = ours["optimize_iterations"] * max(1, ours.get("optimize_restarts", 1))
    assert trials < theirs["optimize_iterations"] * max(1, theirs.get("optimize_restarts", 1))
    assert ours.get("optimize_restarts", 1) <= theirs.get("optimize_restarts", 1)
    scenes = [sum(s["synth"][f"scenes_{split}"] for split in ("train", "dev", "test"))
              for s in (diarization, diarization_check)]
    assert scenes[0] < scenes[1]
    # the model itself is cpu-quick's: only the amount of work shrinks
    assert ours["model"] == theirs["model"] and ours["duration"] == theirs["duration"]


def test_cpu_quick_stays_the_learning_check() -> None:
    for service in DEMO_SERVICES:
        assert registry.get(service).demo_config != "presets/cpu-quick.yaml"
        assert "cpu-quick" in load_recipes(registry.recipes_path(service))


def test_a_first_demo_says_what_it_trains_and_for_how_long(dramaturg_home: Path) -> None:
    plan = training_plan(dramaturg_home)
    # the speaker model first (the diarization pipeline embeds with it), then the per-line services
    assert [service for service, _ in plan] == ["speaker", "diarization", "audiollm", "evaluator", "tts"]
    line = describe_plan(plan)
    assert line.startswith("first run: trains speaker (demo preset, ≈ ")
    for service in ("diarization", "audiollm", "evaluator", "tts"):
        assert f"{service} (demo preset, ≈ " in line
    assert "later runs reuse the models" in line
    assert "no training" in describe_plan([])
