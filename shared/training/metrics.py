"""Prometheus metrics of training runs, read from the runs' own ``run.json`` at scrape time.

A run's worker is a separate process that mirrors its progress and latest metrics into ``run.json``
(five times a second at most, see :class:`~dramaturg.shared.training.recipe.RunContext`). Reading
those files when Prometheus scrapes keeps the worker free of any metrics server and makes the
numbers the same ones ``GetTraining`` answers, whether the runner lives in a service (runs started
over gRPC) or in ``dramaturg train --metrics-port`` (a training Job).

Exported (labels ``service``, ``run_id``, ``recipe`` on the per-run families):

* ``dramaturg_training_runs{service,state}`` — runs on disk by state.
* ``dramaturg_training_steps_total`` — the run's optimiser step (a counter: ``rate()`` is
  the training throughput in steps/s; a resume from an earlier checkpoint reads as a counter reset).
* ``dramaturg_training_progress_ratio`` — step / total steps (0 while the total is unknown).
* ``dramaturg_training_metric{name}`` — the latest value of each metric the recipe logged
  (``loss/train``, ``lr``, ``eer_cosine``, ``DiarizationErrorRate``, …).

Per-run families cover runs that are queued or running and runs that ended less than
``recent_seconds`` ago, so a finished run's last figures stay on the board for a while without the
label set growing with every run ever made.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dramaturg.shared.training.runs import STATES, RunRecord
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from dramaturg.shared.training.runner import TrainingRunner

RECENT_SECONDS = 3600.0
RUN_LABELS = ("service", "run_id", "recipe")


class TrainingCollector:
    """One collector for every :class:`TrainingRunner` of the process (held weakly)."""

    def __init__(self, recent_seconds: float = RECENT_SECONDS) -> None:
        self.recent_seconds = recent_seconds
        self._runners: weakref.WeakSet[TrainingRunner] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, runner: TrainingRunner) -> None:
        with self._lock:
            self._runners.add(runner)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # families depend on what is on disk; nothing to check at registration

    def _shown(self, record: RunRecord, now: float) -> bool:
        return not record.terminal or (now - (record.finished_at or now)) <= self.recent_seconds

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        runs = GaugeMetricFamily("dramaturg_training_runs", "Training runs on disk by state.",
                                 labels=("service", "state"))
        steps = CounterMetricFamily("dramaturg_training_steps", "Optimiser steps done by a run.",
                                    labels=RUN_LABELS)
        progress = GaugeMetricFamily("dramaturg_training_progress_ratio",
                                     "Steps done / total steps of a run (0 while unknown).",
                                     labels=RUN_LABELS)
        values = GaugeMetricFamily("dramaturg_training_metric", "Latest value of a metric a run logged.",
                                   labels=(*RUN_LABELS, "name"))
        with self._lock:
            runners = list(self._runners)
        now = time.time()
        seen: set[tuple[str, str]] = set()
        for runner in runners:
            key = (runner.service, str(runner.runs_dir))
            if key in seen:  # two runners over one folder (a service and its tests): count once
                continue
            seen.add(key)
            counts = dict.fromkeys(STATES, 0)
            try:
                records = runner.list()
            except OSError:  # its folder is gone (a finished test, a removed volume)
                continue
            for record in records:
                counts[record.state] = counts.get(record.state, 0) + 1
                if not self._shown(record, now):
                    continue
                labels = [runner.service, record.run_id, record.recipe]
                steps.add_metric(labels, float(record.step))
                total = record.total_steps
                progress.add_metric(labels, min(record.step / total, 1.0) if total > 0 else 0.0)
                for name, value in sorted(record.metrics.items()):
                    values.add_metric([*labels, name], float(value))
            for state, count in counts.items():
                runs.add_metric([runner.service, state], float(count))
        yield from (runs, steps, progress, values)


_COLLECTOR: TrainingCollector | None = None
_COLLECTOR_LOCK = threading.Lock()


def export_runner(runner: TrainingRunner) -> TrainingCollector:
    """Export ``runner``'s runs on the process's default registry (the one ``/metrics`` serves)."""
    global _COLLECTOR
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            _COLLECTOR = TrainingCollector()
            REGISTRY.register(_COLLECTOR)
        _COLLECTOR.add(runner)
        return _COLLECTOR
