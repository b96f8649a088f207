"""Recipes as light data: a recipe that imports its training code only when it runs, and YAML presets.

The server imports a service's recipes to list and validate them, so that module must not pull in
torch, transformers or pyannote. A :class:`LazyRecipe` is a name, a description, the config schema
(its defaults) and the ``"module:function"`` that trains; only the worker subprocess, calling
``run``, imports that function. A service's ``recipes.py`` is then a list of these plus its presets.

A preset is a YAML file ``presets/NAME.yaml`` that becomes recipe NAME: ``recipe`` names a base
recipe, ``overrides`` change some of its defaults, ``description`` says what it is for. The same
file is a complete ``dramaturg train SERVICE --config FILE`` config (it may also carry ``dataset``,
``synth`` and ``output_model``, which the CLI reads and the recipe ignores).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dramaturg.shared.training.recipe import RUNNER_KEYS, Recipe, RunContext, merge_config

PRESETS_DIR = "presets"  # next to a service's recipes.py


class LazyRecipe(Recipe):
    """A recipe whose training function is imported when it runs (``target``: ``"module:function"``).

    ``defaults`` is ``base`` with ``overrides`` applied and validated (a typo in a preset fails when
    the recipes load, not hours into a run); the runner adds :data:`RUNNER_KEYS` itself.
    ``architecture`` is what the model store records; empty, the runner takes the config's
    ``architecture`` key (for recipes whose config switches it).
    """

    def __init__(self, name: str, description: str, base: Mapping[str, Any], target: str, *,
                 overrides: Mapping[str, Any] | None = None, architecture: str = "") -> None:
        if ":" not in target:
            raise ValueError(f"recipe {name}: target {target!r} must look like 'package.module:function'")
        self.name = name
        self.description = description
        self.target = target
        self.architecture = architecture
        merged = merge_config(dict(base), overrides or {}, f"recipe {name}")
        self.defaults = {k: v for k, v in merged.items() if k not in RUNNER_KEYS}

    def run(self, ctx: RunContext) -> None:
        self.train_function()(ctx)

    def train_function(self) -> Callable[[RunContext], None]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def derive(self, name: str, description: str, overrides: Mapping[str, Any]) -> LazyRecipe:
        """The same training function over these defaults with ``overrides`` (what a preset is)."""
        return LazyRecipe(name, description, self.defaults, self.target, overrides=overrides,
                          architecture=self.architecture)


@dataclass(frozen=True)
class Preset:
    """One ``presets/NAME.yaml``: the base recipe it refines and how; ``spec`` is the whole file."""

    name: str
    path: Path
    recipe: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)


def read_preset(path: Path) -> Preset:
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with recipe, overrides and description")
    return Preset(name=path.stem, path=path, recipe=str(spec.get("recipe", "")),
                  description=str(spec.get("description") or ""),
                  overrides=dict(spec.get("overrides") or {}), spec=spec)


def presets_dir(module_file: str | Path) -> Path:
    """``presets/`` next to a service's ``recipes.py`` (pass ``__file__``)."""
    return Path(module_file).resolve().parent / PRESETS_DIR


def load_presets(folder: Path, base: Mapping[str, LazyRecipe]) -> dict[str, LazyRecipe]:
    """Every ``folder/*.yaml`` as a recipe derived from the base recipe it names."""
    found: dict[str, LazyRecipe] = {}
    for path in sorted(folder.glob("*.yaml")):
        preset = read_preset(path)
        parent = base.get(preset.recipe)
        if parent is None:
            raise ValueError(f"{path}: 'recipe' must name one of {', '.join(sorted(base))}")
        if preset.name in base:
            raise ValueError(f"{path}: preset {preset.name!r} would replace the recipe of that name")
        found[preset.name] = parent.derive(preset.name, preset.description or f"{parent.name} ({path.name})",
                                           preset.overrides)
    return found


def recipes_with_presets(base: Iterable[LazyRecipe], folder: Path) -> dict[str, LazyRecipe]:
    """Name → recipe: the base recipes, then one per preset in ``folder`` (what ``recipes.py`` exports)."""
    recipes = {recipe.name: recipe for recipe in base}
    return {**recipes, **load_presets(folder, recipes)}
