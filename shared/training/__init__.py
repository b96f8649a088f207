"""Training runs for every service: recipes run in supervised worker subprocesses.

A service writes recipes (:class:`Recipe`, given a :class:`RunContext`), names them by import path,
and mounts :class:`~dramaturg.shared.training.servicer.TrainingServicer` over a
:class:`TrainingRunner`. The servicer is not imported here, so the worker subprocess (which imports
this package) does not pay for the gRPC stubs.
"""

from dramaturg.shared.training.recipe import RUNNER_KEYS, Recipe, RunContext, load_recipes, merge_config
from dramaturg.shared.training.runner import TrainingRunner
from dramaturg.shared.training.runs import (
    TERMINAL_STATES,
    TRAINER_STATE_DIR,
    CheckpointInfo,
    RunRecord,
)

__all__ = [
    "RUNNER_KEYS",
    "TERMINAL_STATES",
    "TRAINER_STATE_DIR",
    "CheckpointInfo",
    "Recipe",
    "RunContext",
    "RunRecord",
    "TrainingRunner",
    "load_recipes",
    "merge_config",
]
