"""A real Prometheus scrapes a real gateway and speaker service; every dashboard and rule expression runs.

The gateway and the speaker service run in-process on ephemeral loopback ports (a tiny ECAPA published
into a temporary model store) with their /metrics endpoint; Debian's Prometheus binary scrapes it every
second with deploy/prometheus/prometheus.yml's jobs re-pointed at it and the real rule files loaded.
After some traffic (successes, client errors, an unauthenticated call) every PromQL expression of the
dashboards and rules is evaluated through the HTTP API: none may error, and the core ones must return
data. prometheus_client's registry is process-global, so the gateway and speaker jobs scrape the same
endpoint; a third job points at a closed port, so the target-down alert has something to find.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
import yaml
from conftest import tone_wav
from dramaturg.common.v1 import common_pb2, common_pb2_grpc
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.server import GatewayService
from dramaturg.shared.metrics import start_metrics_server
from dramaturg.training.v1 import training_pb2, training_pb2_grpc
from helpers import ServerThread

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
TOKEN = "integration-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
RATE = 16_000
# What the dashboards' Grafana variables become: a 30 s rate window holds ~30 one-second scrapes.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__range": "5m", "$__interval": "1s", "$job": ".+"}

# Panels and recording rules that must return data after the traffic below. The rest (GPU gauges on a
# machine without a GPU, retries, alerts that should not fire) must evaluate without error only.
CORE_PANELS = {
    "overview.json": {
        "Ready",
        "Requests/s",
        "Server error ratio (5m)",
        "Requests/s by RPC",
        "Non-OK responses/s by code",
        "p50 / p95 / p99 latency by RPC",
        "Latency SLO burn rate (1h)",
        "Queue depth",
        "Queue saturation (per replica)",
        "Batch size p50 / p95 and mean",
        "Model time per batch p50 / p95",
        "Batches/s",
        "Audio processed (seconds of audio per second)",
        "Real-time factor p50 / p95",
        "Jobs finished/s by pipeline and state",
        "Jobs running and pending",
        "Stage time p50 / p95",
        "Loaded model versions",
    },
    "gpu.json": {"GPUs per service"},
    "training.json": {
        "Runs running",
        "Runs failed (on disk)",
        "Training loss",
        "Throughput (optimiser steps/s)",
        "Progress",
        "Training RPCs/s by method and code",
        "Model repository RPCs/s",
        "Loaded model versions over time",
    },
}
CORE_RULES = {
    "job:grpc_server_handled:rate5m",
    "job:grpc_server_errors:ratio_rate5m",
    "job_grpc_method:grpc_server_handling_seconds:quantile_rate5m",
    "job:grpc_server_slow_unary:ratio_rate5m",
    "job:grpc_server_slow_unary:ratio_rate1h",
    "instance_queue:dramaturg_queue_depth:saturation",
    "job_pipeline_state:dramaturg_jobs:rate5m",
    "DramaturgTargetDown",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def voice(seed: int, seconds: float = 1.5) -> common_pb2.AudioInput:
    """A buzzy vowel-like clip the speaker service accepts as speech."""
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 120.0 + 15 * seed
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    sf.write(buf, (0.3 * x / np.max(np.abs(x))).astype(np.float32), RATE, format="WAV", subtype="FLOAT")
    return common_pb2.AudioInput(encoding=common_pb2.WAV, content=buf.getvalue())


def publish_tiny_speaker_model(home: Path) -> None:
    import torch
    from dramaturg.shared.store import ModelStore
    from dramaturg.shared.voice.encoder import SpeakerEncoderConfig, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(SpeakerEncoderConfig(architecture="ecapa", threshold=0.8))
    store = ModelStore(home)
    writer = store.create_version("speaker", "tiny", architecture="ecapa", base_model="", recipe="test")
    with writer as staging:
        encoder.save_pretrained(staging)
    store.set_default("speaker", "tiny")


class Prometheus:
    """Debian's Prometheus on a loopback port, with a TSDB in a temporary folder."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("`prometheus` is not installed: run `make setup` (Debian package prometheus)")
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(p) for p in sorted((PROM / "rules").glob("*.yml"))]
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        config["scrape_configs"] = []
        for name, target in targets.items():
            job = jobs[name]  # the real job definitions, only the address changes
            job["static_configs"][0]["targets"] = [target]
            config["scrape_configs"].append(job)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
        )  # fmt: skip
        self.logfile = workdir / "prometheus.log"

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.load(exc)

    def query(self, expr: str) -> list[dict]:
        reply = self.api("query", query=expr)
        assert reply["status"] == "success", f"{expr}\n→ {reply.get('errorType')}: {reply.get('error')}"
        return reply["data"]["result"]

    def wait(self, what: str, ready, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.logfile.read_text()[-3000:]}"
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            time.sleep(0.25)
        pytest.fail(f"timed out waiting for {what}; prometheus log:\n{self.logfile.read_text()[-3000:]}")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def drive_traffic(gateway_target: str, speaker_target: str) -> None:
    """Successes and failures on both services: jobs, embeddings, client errors, an unauthenticated call."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    with (
        grpc.insecure_channel(gateway_target) as gw_channel,
        grpc.insecure_channel(speaker_target) as sp_channel,
    ):
        gateway = gateway_pb2_grpc.GatewayStub(gw_channel)
        speaker = speaker_pb2_grpc.SpeakerStub(sp_channel)
        jobs = [
            gateway.SubmitJob(
                gateway_pb2.SubmitJobRequest(
                    pipeline="probe",
                    audio=common_pb2.AudioInput(encoding=common_pb2.WAV, content=tone_wav(2.0)),
                ),
                metadata=AUTH,
                timeout=10,
            )
            for _ in range(2)
        ]
        for job in jobs:  # follow each job to its end: a server stream, the job's stage histograms
            events = list(
                gateway.WatchJob(gateway_pb2.WatchJobRequest(job_id=job.job_id), metadata=AUTH, timeout=30)
            )
            assert events[-1].job.state == gateway_pb2.SUCCEEDED, events[-1].job.error
        gateway.ListPipelines(gateway_pb2.ListPipelinesRequest(), metadata=AUTH, timeout=5)
        junk = speaker_pb2.EmbedRequest(audio=[common_pb2.AudioInput(content=b"junk" * 64)])
        for call in (
            lambda: gateway.SubmitJob(
                gateway_pb2.SubmitJobRequest(pipeline="nope"), metadata=AUTH, timeout=5
            ),
            lambda: gateway.ListJobs(gateway_pb2.ListJobsRequest(), timeout=5),  # no token
            lambda: speaker.Embed(junk, timeout=30),
        ):
            with pytest.raises(grpc.RpcError):
                call()
        for seed in range(3):
            speaker.Embed(speaker_pb2.EmbedRequest(audio=[voice(seed), voice(seed + 3, 2.0)]), timeout=60)
        common_pb2_grpc.ModelRepositoryStub(sp_channel).ListModels(common_pb2.ListModelsRequest(), timeout=10)
        training_pb2_grpc.TrainingStub(sp_channel).ListRecipes(training_pb2.ListRecipesRequest(), timeout=10)


@pytest.mark.timeout(120)
def test_dashboards_and_rules_run_against_live_services(tmp_path: Path, dramaturg_home: Path) -> None:
    from dramaturg.services.speaker.config import SpeakerSettings
    from dramaturg.services.speaker.server import SpeakerService

    home = dramaturg_home
    publish_tiny_speaker_model(home)
    metrics_port = start_metrics_server(0, "127.0.0.1")  # serves both services (one registry per process)
    speaker_service = SpeakerService(SpeakerSettings(min_seconds=0.5, max_wait_ms=20.0), home=home)
    with ServerThread(speaker_service) as speaker, training_run(home, tmp_path):
        gateway_settings = GatewaySettings(api_token=TOKEN, services={"speaker": speaker.target})
        with ServerThread(GatewayService(gateway_settings, home=home)) as gateway:
            prometheus = Prometheus(
                tmp_path,
                {
                    "gateway": f"127.0.0.1:{metrics_port}",
                    "speaker": f"127.0.0.1:{metrics_port}",
                    "diarization": f"127.0.0.1:{free_port()}",  # nothing listens: a down target
                },
            )
            try:
                check_against(prometheus, gateway.target, speaker.target)
            finally:
                prometheus.close()


@contextlib.contextmanager
def training_run(home: Path, tmp_path: Path):
    """A real (tiny) training run while Prometheus scrapes: the training board's dramaturg_training_*."""
    from dramaturg.shared.store import ModelStore
    from dramaturg.shared.training import TrainingRunner
    from dramaturg.shared.training.metrics import export_runner

    try:
        import training_fixtures
    except ImportError:  # tests/ imported as a package
        from tests import training_fixtures  # type: ignore[no-redef]

    dataset = tmp_path / "toy-data"
    dataset.mkdir()
    (dataset / "train.lst").write_text("x\n")
    runner = TrainingRunner(home, "toy", f"{training_fixtures.__name__}:RECIPES", ModelStore(home))
    export_runner(runner)
    try:
        runner.start("toy-linear", str(dataset), {"steps": 600, "sleep": 0.02, "checkpoint_every": 200})
        yield runner
    finally:
        runner.close(timeout=5.0)


def handled_in_process() -> float:
    """RPCs this process has answered so far, as its /metrics endpoint says."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "grpc_server_handled"
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
    )


def wait_scraped(prometheus: Prometheus) -> float:
    """Wait until both jobs scraped every RPC answered so far; returns the time (Unix seconds) it did."""
    total = handled_in_process()
    prometheus.wait(
        f"a scrape showing all {total:g} RPCs",
        lambda: (
            {
                r["metric"]["job"]
                for r in prometheus.query(
                    f'sum by (job) (grpc_server_handled_total{{part_of="dramaturg"}}) >= {total}'
                )
            }
            == {"gateway", "speaker"}
        ),
    )
    return time.time()


def has_numbers(result: list[dict]) -> bool:
    """At least one sample that is a number (histogram_quantile of no traffic is NaN)."""
    return any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result)


def check_against(prometheus: Prometheus, gateway_target: str, speaker_target: str) -> None:
    began = time.monotonic()
    # first scrape of both jobs, so the traffic below shows up as counter increases (rates > 0)
    prometheus.wait("first scrapes", lambda: len(prometheus.query('up{part_of="dramaturg"} == 1')) == 2)
    # every rule group loaded from the real files, evaluating without errors
    groups = prometheus.api("rules")["data"]["groups"]
    expected_groups = {
        g["name"] for p in PROM.glob("rules/*.yml") for g in yaml.safe_load(p.read_text())["groups"]
    }
    assert {g["name"] for g in groups} == expected_groups
    # Twice: a labelled counter child appears at its first increment, and Prometheus sees no increase
    # in a series' first sample — the second round makes every rate, error codes included, non-zero.
    drive_traffic(gateway_target, speaker_target)
    wait_scraped(prometheus)
    drive_traffic(gateway_target, speaker_target)
    scraped_at = wait_scraped(prometheus)
    recorded = sorted(name for name in CORE_RULES if ":" in name)
    prometheus.wait(
        "a rule evaluation after the last scrape",
        lambda: all(prometheus.query(f"timestamp({name}) > {scraped_at}") for name in recorded),
    )
    for group in prometheus.api("rules")["data"]["groups"]:
        for rule in group["rules"]:
            assert rule["health"] != "err", f"{group['name']}/{rule['name']}: {rule.get('lastError')}"

    boards = load_script(ROOT / "deploy" / "grafana" / "dashboards.py").render()
    empty = []
    for board, content in boards.items():
        for panel in json.loads(content)["panels"]:
            for target in panel.get("targets", []):
                result = prometheus.query(concrete(target["expr"]))  # asserts success
                if panel["title"] in CORE_PANELS[board] and not has_numbers(result):
                    empty.append(f"{board} / {panel['title']}: {target['expr']}")
    for path in sorted(PROM.glob("rules/*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule["alert"]
                result = prometheus.query(rule["expr"])
                if name in CORE_RULES and not has_numbers(result):
                    empty.append(f"{path.name} / {name}: {rule['expr']}")
    assert not empty, "no data for core expressions:\n" + "\n".join(empty)

    # The numbers mean what the panels say they mean.
    ready = {
        r["metric"]["service"]: float(r["value"][1]) for r in prometheus.query("dramaturg_service_ready")
    }
    # (other services' tests in the same process may have left their gauges at 0)
    assert ready["gateway"] == ready["speaker"] == 1.0, ready
    non_ok = prometheus.query('sum by (grpc_code) (rate(grpc_server_handled_total{grpc_code!="OK"}[30s]))')
    codes = {r["metric"]["grpc_code"] for r in non_ok if float(r["value"][1]) > 0}
    assert {"INVALID_ARGUMENT", "UNAUTHENTICATED"} <= codes, codes
    # client mistakes are not the service's errors
    ratios = {
        r["metric"]["job"]: float(r["value"][1])
        for r in prometheus.query("job:grpc_server_errors:ratio_rate5m")
    }
    assert ratios == {"gateway": 0.0, "speaker": 0.0}, ratios
    down = prometheus.query('up{part_of="dramaturg"} == 0')
    assert [r["metric"]["job"] for r in down] == ["diarization"]
    jobs = prometheus.query(
        'job_pipeline_state:dramaturg_jobs:rate5m{pipeline="probe", state="SUCCEEDED"} > 0'
    )
    assert jobs, "the probe jobs that succeeded"
    assert time.monotonic() - began < 60, "keep the live check short"
