"""Training runs for every service: recipes run in supervised worker subprocesses.

A service lists its recipes (:class:`Recipe`, usually :class:`LazyRecipe` plus ``presets/*.yaml``
through :func:`recipes_with_presets`) in a light module named by import path, and mounts
:class:`~dramaturg.shared.training.servicer.TrainingServicer` over a :class:`TrainingRunner`. The
servicer is not imported here, so the worker subprocess (which imports this package) does not pay
for the gRPC stubs; nor are the trainer bridges (``hf_bridge``: transformers ``Trainer`` and TRL,
``lightning_bridge``: Lightning), which import their frameworks and are for the worker alone: the
server imports this package, and it must stay free of torch, transformers and lightning.
"""

from dramaturg.shared.training.presets import LazyRecipe, load_presets, recipes_with_presets
from dramaturg.shared.training.recipe import RUNNER_KEYS, Recipe, RunContext, load_recipes, merge_config
from dramaturg.shared.training.runner import TrainingRunner
from dramaturg.shared.training.runs import (
    TERMINAL_STATES,
    TRAINER_STATE_DIR,
    CheckpointInfo,
    RunRecord,
)
from dramaturg.shared.training.selection import Monitor, best_checkpoint, publish_best, publish_checkpoint

__all__ = [
    "RUNNER_KEYS",
    "TERMINAL_STATES",
    "TRAINER_STATE_DIR",
    "CheckpointInfo",
    "LazyRecipe",
    "Monitor",
    "Recipe",
    "RunContext",
    "RunRecord",
    "TrainingRunner",
    "best_checkpoint",
    "load_presets",
    "load_recipes",
    "merge_config",
    "publish_best",
    "publish_checkpoint",
    "recipes_with_presets",
]
