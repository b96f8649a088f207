"""Which checkpoint is the best, and publishing it: one rule for every training loop.

A bridge (Hugging Face Trainer or Lightning) asks :class:`Monitor` whether a checkpoint's metrics
beat the best so far and saves it with ``is_best``; the runner's checkpoint list then marks the
newest such checkpoint ``best`` (pruning keeps it), and :func:`publish_best` publishes it. Until
anything was measured every checkpoint counts as the best, so a run without evaluation publishes
its newest. Light: the server's runner imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dramaturg.shared.training.runs import CheckpointInfo

if TYPE_CHECKING:
    from dramaturg.shared.store import ModelRecord
    from dramaturg.shared.training.recipe import RunContext

MODES = ("min", "max")


@dataclass(frozen=True)
class Monitor:
    """The metric that picks the best checkpoint: lower (``min``: loss, EER, DER) or higher (``max``) wins.

    ``ties_to_newer``: an equal value also wins — the later checkpoint has seen more data (the
    diarization segmentation's rule); otherwise the first to reach a value keeps it (the speaker's).
    """

    metric: str
    mode: str = "min"
    ties_to_newer: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"monitor mode {self.mode!r}: expected one of {', '.join(MODES)}")

    def value(self, metrics: Mapping[str, float]) -> float | None:
        """The monitored value in ``metrics``; None when it is missing or not finite."""
        raw = metrics.get(self.metric)
        if raw is None or not math.isfinite(float(raw)):
            return None
        return float(raw)

    def improves(self, value: float | None, best: float | None) -> bool:
        """Whether a checkpoint with ``value`` is the new best; one without a value is best only before
        anything was measured (``best`` None)."""
        if value is None or best is None:
            return best is None
        if value == best:
            return self.ties_to_newer
        return value < best if self.mode == "min" else value > best

    def best_of(self, checkpoints: Iterable[CheckpointInfo]) -> float | None:
        """The best value among saved checkpoints: where a resumed run's comparison starts."""
        values = [v for v in (self.value(c.metrics) for c in checkpoints) if v is not None]
        if not values:
            return None
        return min(values) if self.mode == "min" else max(values)


def best_checkpoint(checkpoints: list[CheckpointInfo]) -> CheckpointInfo:
    """The checkpoint marked best, else the newest; RuntimeError when the run saved none."""
    if not checkpoints:
        raise RuntimeError("training finished without a checkpoint to publish")
    return next((c for c in reversed(checkpoints) if c.best), checkpoints[-1])


def publish_checkpoint(ctx: RunContext, checkpoint: CheckpointInfo, *, architecture: str | None = None,
                       labels: Mapping[str, str] | None = None) -> ModelRecord:
    """Publish one checkpoint's folder with its metrics; labels say which checkpoint it was."""
    return ctx.publish(checkpoint.path, checkpoint.metrics, architecture=architecture,
                       labels={"checkpoint_id": checkpoint.checkpoint_id, "step": str(checkpoint.step),
                               **(labels or {})})


def publish_best(ctx: RunContext, *, architecture: str | None = None,
                 labels: Mapping[str, str] | None = None) -> ModelRecord:
    """Publish the run's best checkpoint (the newest when nothing was measured)."""
    return publish_checkpoint(ctx, best_checkpoint(ctx.checkpoints()), architecture=architecture,
                              labels=labels)
