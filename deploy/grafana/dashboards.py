"""Grafana dashboards for dramaturg, written as code: ``python deploy/grafana/dashboards.py`` rewrites
``deploy/grafana/dashboards/*.json`` (tests/test_deploy.py fails when the JSON and this file disagree).

Plain Python and the standard library only (no grafanalib): the JSON model used here is Grafana 10–12's
(schemaVersion 39). Every panel queries the data source chosen in the ``datasource`` variable, and every
expression filters on ``job=~"$job"`` — the job is the service name (see deploy/prometheus/prometheus.yml
and the ServiceMonitor), listed from ``up{part_of="dramaturg"}``, so a new service shows up on every board
without editing anything here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job=~"$job"'
# dramaturg's own RPCs: health and reflection would swamp the request and latency panels.
API = 'grpc_service=~"dramaturg\\\\..+"'
RATE = "$__rate_interval"


def _q(expr: str, legend: str = "", **extra) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS, **extra}


def timeseries(title: str, targets: list[dict], unit: str = "short", description: str = "", w: int = 12,
               stack: bool = False, minimum: float | None = 0) -> dict:
    defaults: dict = {"unit": unit, "custom": {"fillOpacity": 10, "showPoints": "never"}}
    if stack:
        defaults["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS, "w": w, "h": 8,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom",
                       "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, targets: list[dict], unit: str = "short", description: str = "", w: int = 6,
         thresholds: list[tuple[float | None, str]] | None = None) -> dict:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS, "w": w, "h": 4,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "area", "textMode": "value_and_name"},
    }


def table(title: str, expr: str, description: str = "", w: int = 12) -> dict:
    return {
        "type": "table", "title": title, "description": description, "datasource": DS, "w": w, "h": 8,
        "targets": [_q(expr, format="table", instant=True)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
        "options": {"showHeader": True},
    }


def text(title: str, markdown: str, w: int = 24, h: int = 6) -> dict:
    return {"type": "text", "title": title, "w": w, "h": h,
            "options": {"mode": "markdown", "content": markdown}}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "w": 24, "h": 1}


def quantiles(metric: str, by: str, selector: str, legend: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [
        _q(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
           f"p{round(q * 100)} {legend}")
        for q in qs
    ]


def dashboard(uid: str, title: str, description: str, panels: list[dict], extra_vars=()) -> dict:
    """Lay panels out left to right in Grafana's 24-column grid, a row panel starting a new line."""
    x = y = line_h = 0
    laid = []
    for pid, panel in enumerate(panels, start=1):
        panel = dict(panel)
        w, h = panel.pop("w"), panel.pop("h")
        if panel["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        panel["id"] = pid
        panel["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x, line_h = x + w, max(line_h, h)
        if panel["type"] == "row":
            x, y, line_h = 0, y + h, 0
        for ref, target in enumerate(panel.get("targets", [])):
            target["refId"] = chr(ord("A") + ref)
        laid.append(panel)
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
         "regex": ""},
        _query_var("job", "Service", 'label_values(up{part_of="dramaturg"}, job)'),
        *extra_vars,
    ]
    return {
        "uid": uid, "title": title, "description": description, "tags": ["dramaturg"],
        "editable": True, "graphTooltip": 1, "refresh": "30s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "timezone": "browser",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["dramaturg"], "title": "dramaturg", "asDropdown": True}],
        "templating": {"list": variables},
        "panels": laid,
    }


def _query_var(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS, "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"}, "refresh": 2, "sort": 1,
        "includeAll": True, "multi": True, "allValue": ".+",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0,
        "regex": "",
    }


# ------------------------------------------------------------------------------------------- overview
def overview() -> dict:
    handled = f"grpc_server_handled_total{{{JOB}, {API}}}"
    return dashboard("dramaturg-overview", "dramaturg / Overview",
                     "Requests, errors, latency, queues, batching, real-time factor and gateway jobs.", [
        row("Services"),
        stat("Ready", [_q(f"max by (job) (dramaturg_service_ready{{{JOB}}})", "{{job}}")],
             description="1 once the service's model is loaded and gRPC health says SERVING.",
             thresholds=[(None, "red"), (1, "green")], w=8),
        stat("Requests/s", [_q(f"sum by (job) (rate({handled}[{RATE}]))", "{{job}}")], unit="reqps", w=8),
        stat("Server error ratio (5m)", [_q(f"job:grpc_server_errors:ratio_rate5m{{{JOB}}}", "{{job}}")],
             unit="percentunit", w=8, thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
             description="Recording rule: INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, "
                         "UNKNOWN, UNIMPLEMENTED, DATA_LOSS over all of dramaturg's RPCs."),
        row("Requests"),
        timeseries("Requests/s by RPC",
                   [_q(f"sum by (job, grpc_method) (rate({handled}[{RATE}]))", "{{job}} {{grpc_method}}")],
                   unit="reqps"),
        timeseries("Non-OK responses/s by code",
                   [_q(f'sum by (job, grpc_method, grpc_code) (rate(grpc_server_handled_total{{{JOB}, {API}, '
                       f'grpc_code!="OK"}}[{RATE}]))', "{{job}} {{grpc_method}} {{grpc_code}}")],
                   unit="reqps", stack=True,
                   description="Client mistakes (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED) and server "
                               "errors alike; the error-ratio stat counts server errors only."),
        row("Latency"),
        timeseries("p50 / p95 / p99 latency by RPC",
                   quantiles("grpc_server_handling_seconds", "job, grpc_method", f"{JOB}, {API}",
                             "{{job}} {{grpc_method}}"),
                   unit="s", w=16,
                   description="Streams count from their first to their last message (WatchJob lasts as "
                               "long as the job)."),
        timeseries("Latency SLO burn rate (1h)",
                   [_q(f"job:grpc_server_slow_unary:ratio_rate1h{{{JOB}}} / 0.05", "{{job}}")], w=8,
                   description="Share of unary RPCs slower than 2.5 s divided by the 5 % budget: 1 spends "
                               "the budget exactly; 14.4 pages (alerts.yml)."),
        row("Queues and batching"),
        timeseries("Queue depth", [_q(f"sum by (job, service, queue) (dramaturg_queue_depth{{{JOB}}})",
                                      "{{service}} {{queue}}")], w=8),
        timeseries("Queue saturation (per replica)",
                   [_q("max by (job, service, queue) "
                       f"(instance_queue:dramaturg_queue_depth:saturation{{{JOB}}})",
                       "{{service}} {{queue}}")],
                   unit="percentunit", w=8,
                   description="Depth / capacity of the fullest replica; at 100 % requests get "
                               "RESOURCE_EXHAUSTED."),
        timeseries("Batch size p50 / p95 and mean",
                   [*quantiles("dramaturg_batch_size", "service, queue", JOB, "{{service}} {{queue}}",
                               qs=(0.5, 0.95)),
                    _q(f"sum by (service, queue) (rate(dramaturg_batch_size_sum{{{JOB}}}[{RATE}])) / "
                       f"sum by (service, queue) (rate(dramaturg_batch_size_count{{{JOB}}}[{RATE}]))",
                       "mean {{service}} {{queue}}")], w=8),
        timeseries("Model time per batch p50 / p95",
                   quantiles("dramaturg_batch_seconds", "service, queue", JOB, "{{service}} {{queue}}",
                             qs=(0.5, 0.95)), unit="s"),
        timeseries("Batches/s",
                   [_q(f"sum by (service, queue) (rate(dramaturg_batch_size_count{{{JOB}}}[{RATE}]))",
                       "{{service}} {{queue}}")], unit="ops"),
        row("Audio"),
        timeseries("Audio processed (seconds of audio per second)",
                   [_q(f"sum by (service, method) (rate(dramaturg_audio_seconds_total{{{JOB}}}[{RATE}]))",
                       "{{service}} {{method}}")],
                   description="Above 1: the service processes audio faster than real time in aggregate."),
        timeseries("Real-time factor p50 / p95",
                   quantiles("dramaturg_real_time_factor", "service, method", JOB, "{{service}} {{method}}",
                             qs=(0.5, 0.95)),
                   description="Processing time / audio duration per request; lower is faster."),
        row("Gateway jobs"),
        timeseries("Jobs finished/s by pipeline and state",
                   [_q(f"sum by (pipeline, state) (rate(dramaturg_jobs_total{{{JOB}}}[{RATE}]))",
                       "{{pipeline}} {{state}}")], unit="ops", stack=True, w=8),
        timeseries("Jobs running and pending",
                   [_q(f"sum(dramaturg_jobs_running{{{JOB}}})", "running"),
                    _q(f"sum(dramaturg_jobs_pending{{{JOB}}})", "pending")], w=8),
        timeseries("Stage retries/s",
                   [_q(f"sum by (pipeline, stage) (rate(dramaturg_job_stage_retries_total{{{JOB}}}[{RATE}]))",
                       "{{pipeline}} {{stage}}")], unit="ops", w=8),
        timeseries("Stage time p50 / p95",
                   quantiles("dramaturg_job_stage_seconds", "pipeline, stage", f'{JOB}, state="succeeded"',
                             "{{pipeline}} {{stage}}", qs=(0.5, 0.95)), unit="s", w=24),
        row("Models"),
        table("Loaded model versions",
              f"max by (job, instance, service, model, version) (dramaturg_model_loaded{{{JOB}}}) == 1",
              w=24),
    ])


# ------------------------------------------------------------------------------------------------ GPU
def gpu() -> dict:
    per_gpu = "{{job}} {{instance}} GPU {{gpu}}"
    by_gpu = "max by (job, instance, gpu, name)"
    return dashboard("dramaturg-gpu", "dramaturg / GPU",
                     "Utilisation, memory and power per GPU and per service, from the services' NVML "
                     "gauges (dramaturg_gpu_*).", [
        text("About these numbers",
             "Each service reports the GPUs **its container sees** (NVML, read at scrape time). Memory is "
             "per device, not per process: two services sharing one GPU both report its whole memory, so "
             "per-service sums take each GPU (uuid) once. `dramaturg_gpu_available 0` means no GPU — not an "
             "exporter failure. A cluster that already runs NVIDIA's DCGM exporter has `DCGM_FI_DEV_*` too.",
             h=3),
        stat("GPUs per service", [_q(f"sum by (job) (dramaturg_gpu_count{{{JOB}}})", "{{job}}")], w=8,
             description="GPUs visible to the service's replicas, added up (0: running on CPU).",
             thresholds=[(None, "orange"), (1, "green")]),
        stat("Fleet power", [_q(f"sum(max by (uuid) (dramaturg_gpu_power_watts{{{JOB}}}))", "watts")],
             unit="watt", w=8),
        stat("Fleet memory used",
             [_q(f"sum(max by (uuid) (dramaturg_gpu_memory_used_bytes{{{JOB}}})) / "
                 f"sum(max by (uuid) (dramaturg_gpu_memory_total_bytes{{{JOB}}}))", "used")],
             unit="percentunit", w=8, thresholds=[(None, "green"), (0.8, "orange"), (0.9, "red")]),
        row("Per GPU"),
        timeseries("Utilisation per GPU",
                   [_q(f"{by_gpu} (dramaturg_gpu_utilization_ratio{{{JOB}}})", per_gpu)],
                   unit="percentunit"),
        timeseries("Memory used per GPU",
                   [_q(f"{by_gpu} (dramaturg_gpu_memory_used_bytes{{{JOB}}})", per_gpu),
                    _q(f"{by_gpu} (dramaturg_gpu_memory_total_bytes{{{JOB}}})",
                       "total " + per_gpu)],
                   unit="bytes"),
        timeseries("Memory used / total per GPU",
                   [_q(f"{by_gpu} (instance_gpu:dramaturg_gpu_memory_used:ratio{{{JOB}}})",
                       per_gpu)], unit="percentunit",
                   description="The GPU-memory alert fires above 90 % for 10 minutes."),
        timeseries("Power per GPU",
                   [_q(f"{by_gpu} (dramaturg_gpu_power_watts{{{JOB}}})", per_gpu)],
                   unit="watt"),
        row("Per service"),
        timeseries("Mean utilisation per service",
                   [_q(f"avg by (job) (dramaturg_gpu_utilization_ratio{{{JOB}}})", "{{job}}")],
                   unit="percentunit", w=8),
        timeseries("Memory used per service",
                   [_q(f"sum by (job) (max by (job, uuid) (dramaturg_gpu_memory_used_bytes{{{JOB}}}))",
                       "{{job}}")],
                   unit="bytes", w=8),
        timeseries("Power per service",
                   [_q(f"sum by (job) (max by (job, uuid) (dramaturg_gpu_power_watts{{{JOB}}}))",
                       "{{job}}")],
                   unit="watt", w=8),
        timeseries("Audio seconds per GPU-second",
                   [_q(f"sum by (job) (rate(dramaturg_audio_seconds_total{{{JOB}}}[{RATE}])) / "
                       f"sum by (job) (dramaturg_gpu_count{{{JOB}}} > 0)", "{{job}}")],
                   w=24, description="Seconds of audio processed per second and per GPU the service's "
                                     "replicas hold: what a GPU buys."),
    ])


# ------------------------------------------------------------------------------------------- training
TRAINING = 'grpc_service="dramaturg.training.v1.Training"'
REPOSITORY = 'grpc_service="dramaturg.common.v1.ModelRepository"'
WATCH = f'{TRAINING}, grpc_method="WatchTraining"'
TRAINING_NOTE = """\
Runs come from the training runner's `dramaturg_training_*` metrics: a service exports the runs it
started over gRPC, and a `dramaturg train --metrics-port 9090` Job (deploy/k8s: the PodMonitor) exports
its own. Values are each run's latest logged figures (`run.json`); a finished run stays for an hour.
Full curves: TensorBoard under `$DRAMATURG_HOME/runs/<service>/<run>/tensorboard`.
"""
RUN = "{{service}} {{run_id}} ({{recipe}})"
EVAL = 'name!~"loss.*|lr|grad_norm|learning_rate"'
PER_RUN = "by (service, run_id, recipe)"


def training() -> dict:
    return dashboard("dramaturg-training", "dramaturg / Training",
                     "Training runs (losses, evaluation metrics, throughput) and model versions.", [
        text("Where these numbers come from", TRAINING_NOTE, h=4),
        stat("Runs running",
             [_q(f'sum by (service) (dramaturg_training_runs{{{JOB}, state="RUNNING"}})', "{{service}}")],
             w=6),
        stat("Runs queued",
             [_q(f'sum by (service) (dramaturg_training_runs{{{JOB}, state="QUEUED"}})', "{{service}}")],
             w=6),
        stat("Runs failed (on disk)",
             [_q(f'sum by (service) (dramaturg_training_runs{{{JOB}, state="FAILED"}})', "{{service}}")],
             w=6, thresholds=[(None, "green"), (1, "orange")]),
        stat("Runs started (time range)",
             [_q(f'sum by (job) (increase(grpc_server_handled_total{{{JOB}, {TRAINING}, '
                 f'grpc_method="StartTraining", grpc_code="OK"}}[$__range]))', "{{job}}")], w=6),
        timeseries("Training loss",
                   [_q(f'max by (service, run_id, recipe, name) (dramaturg_training_metric{{{JOB}, '
                       f'name=~"loss.*"}})', f"{RUN} {{{{name}}}}")], minimum=None),
        timeseries("Evaluation metrics (EER, DER, …)",
                   [_q(f"max by (service, run_id, recipe, name) (dramaturg_training_metric{{{JOB}, {EVAL}}})",
                       f"{RUN} {{{{name}}}}")], minimum=None,
                   description="Whatever the recipe evaluates: eer_* / min_dcf_* (speaker), "
                               "DiarizationErrorRate* and der_* (diarization)."),
        timeseries("Throughput (optimiser steps/s)",
                   [_q(f"sum {PER_RUN} (rate(dramaturg_training_steps_total{{{JOB}}}[{RATE}]))", RUN)]),
        timeseries("Progress",
                   [_q(f"max {PER_RUN} (dramaturg_training_progress_ratio{{{JOB}}})", RUN)],
                   unit="percentunit"),
        timeseries("Learning rate",
                   [_q(f'max {PER_RUN} (dramaturg_training_metric{{{JOB}, name=~"lr|learning_rate"}})',
                       RUN)], minimum=None),
        timeseries("Training RPCs/s by method and code",
                   [_q("sum by (job, grpc_method, grpc_code) "
                       f"(rate(grpc_server_handled_total{{{JOB}, {TRAINING}}}[{RATE}]))",
                       "{{job}} {{grpc_method}} {{grpc_code}}")], unit="reqps"),
        timeseries("Model repository RPCs/s",
                   [_q(f"sum by (job, grpc_method, grpc_code) (rate(grpc_server_handled_total{{{JOB}, "
                       f"{REPOSITORY}}}[{RATE}]))", "{{job}} {{grpc_method}} {{grpc_code}}")], unit="reqps"),
        timeseries("Loaded model versions over time",
                   [_q(f"count by (service, model, version) (dramaturg_model_loaded{{{JOB}}} == 1)",
                       "{{service}} {{model}}:{{version}}")], stack=True,
                   description="Replicas holding each version: a newly published version appears here once "
                               "loaded."),
        timeseries("GPU utilisation of training-capable services",
                   [_q(f"avg by (job) (dramaturg_gpu_utilization_ratio{{{JOB}}})", "{{job}}")],
                   unit="percentunit"),
    ])


BOARDS = {"overview.json": overview, "gpu.json": gpu, "training.json": training}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in BOARDS.items()}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, content in render().items():
        (OUT / name).write_text(content)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
