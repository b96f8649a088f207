"""Prometheus metrics written once: gRPC server families, serving gauges, and per-GPU gauges.

gRPC families use the conventional go-grpc-prometheus names (``grpc_server_started_total``,
``grpc_server_handled_total{grpc_code}``, ``grpc_server_handling_seconds``) so existing dashboards and
alerts work. GPU gauges are in base units (ratio 0–1, bytes, watts) labelled by index and uuid, like
Triton's ``nv_gpu_*``; on a machine without a GPU the collector reports ``dramaturg_gpu_available 0``
and nothing else rather than failing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    (*_RPC_LABELS, "grpc_code"),
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from RPC start to its last response, in seconds.",
    _RPC_LABELS,
    buckets=_LATENCY_BUCKETS,
)
GRPC_MSG_RECEIVED = Counter("grpc_server_msg_received_total", "Stream messages received.", _RPC_LABELS)
GRPC_MSG_SENT = Counter("grpc_server_msg_sent_total", "Stream messages sent.", _RPC_LABELS)

QUEUE_DEPTH = Gauge("dramaturg_queue_depth", "Requests waiting in a service queue.", ("service", "queue"))
QUEUE_CAPACITY = Gauge("dramaturg_queue_capacity", "Bound of a service queue.", ("service", "queue"))
BATCH_SIZE = Histogram(
    "dramaturg_batch_size",
    "Items per dispatched batch.",
    ("service", "queue"),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_SECONDS = Histogram(
    "dramaturg_batch_seconds",
    "Model time per dispatched batch, in seconds.",
    ("service", "queue"),
    buckets=_LATENCY_BUCKETS,
)
AUDIO_SECONDS = Counter(
    "dramaturg_audio_seconds_total",
    "Seconds of audio processed.",
    ("service", "method"),
)
REAL_TIME_FACTOR = Histogram(
    "dramaturg_real_time_factor",
    "Processing time divided by audio duration (lower is faster).",
    ("service", "method"),
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
MODEL_LOADED = Gauge(
    "dramaturg_model_loaded",
    "1 while a model version is loaded.",
    ("service", "model", "version"),
)
SERVICE_READY = Gauge(
    "dramaturg_service_ready", "1 once the service's model is loaded and it serves.", ("service",)
)


def observe_audio(service: str, method: str, audio_seconds: float, processing_seconds: float) -> None:
    """Count audio processed and record the real-time factor of one request."""
    if audio_seconds <= 0:
        return
    AUDIO_SECONDS.labels(service, method).inc(audio_seconds)
    REAL_TIME_FACTOR.labels(service, method).observe(processing_seconds / audio_seconds)


def batcher_hooks(service: str, queue: str, capacity: int) -> dict:
    """Callbacks for :class:`dramaturg.shared.batching.DynamicBatcher` that feed the queue/batch families."""
    QUEUE_CAPACITY.labels(service, queue).set(capacity)
    depth = QUEUE_DEPTH.labels(service, queue)
    sizes = BATCH_SIZE.labels(service, queue)
    seconds = BATCH_SECONDS.labels(service, queue)

    def on_batch(size: int, elapsed: float) -> None:
        sizes.observe(size)
        seconds.observe(elapsed)

    return {"on_batch": on_batch, "on_queue_depth": depth.set}


class GpuCollector(Collector):
    """Per-GPU gauges read from NVML at scrape time.

    NVML is initialised once; when it is missing (no driver, no GPU) the collector reports
    ``dramaturg_gpu_available 0`` so a dashboard can tell "no GPU" from "exporter down".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml = None
        self._error: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # pynvml.NVMLError without a driver; ImportError without the package
            self._error = str(exc) or type(exc).__name__
            log.info("no GPU metrics: %s", self._error)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # collected lazily; describing nothing keeps registration free of NVML calls

    def collect(self) -> Iterable[GaugeMetricFamily]:
        available = GaugeMetricFamily("dramaturg_gpu_available", "1 when NVML sees at least one GPU.")
        count = GaugeMetricFamily("dramaturg_gpu_count", "GPUs visible to NVML.")
        labels = ("gpu", "uuid", "name")
        util = GaugeMetricFamily("dramaturg_gpu_utilization_ratio", "GPU busy ratio (0–1).", labels=labels)
        mem_used = GaugeMetricFamily("dramaturg_gpu_memory_used_bytes", "GPU memory used.", labels=labels)
        mem_total = GaugeMetricFamily("dramaturg_gpu_memory_total_bytes", "GPU memory total.", labels=labels)
        power = GaugeMetricFamily("dramaturg_gpu_power_watts", "GPU power draw.", labels=labels)
        n = 0
        if self._nvml is not None:
            nv = self._nvml
            with self._lock:
                try:
                    n = nv.nvmlDeviceGetCount()
                    for index in range(n):
                        handle = nv.nvmlDeviceGetHandleByIndex(index)
                        uuid = _text(nv.nvmlDeviceGetUUID(handle))
                        name = _text(nv.nvmlDeviceGetName(handle))
                        key = [str(index), uuid, name]
                        util.add_metric(key, nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                        memory = nv.nvmlDeviceGetMemoryInfo(handle)
                        mem_used.add_metric(key, float(memory.used))
                        mem_total.add_metric(key, float(memory.total))
                        try:
                            power.add_metric(key, nv.nvmlDeviceGetPowerUsage(handle) / 1000.0)
                        except nv.NVMLError:
                            pass  # some boards do not report power
                except nv.NVMLError as exc:
                    log.warning("NVML read failed: %s", exc)
                    n = 0
        available.add_metric([], 1.0 if n else 0.0)
        count.add_metric([], float(n))
        yield available
        yield count
        if n:
            yield from (util, mem_used, mem_total, power)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_gpu_lock = threading.Lock()
_gpu_registered: dict[int, GpuCollector] = {}


def register_gpu_collector(registry: CollectorRegistry = REGISTRY) -> GpuCollector:
    """Register the GPU collector once per registry (idempotent: several servers may share a process)."""
    with _gpu_lock:
        if id(registry) not in _gpu_registered:
            collector = GpuCollector()
            registry.register(collector)
            _gpu_registered[id(registry)] = collector
        return _gpu_registered[id(registry)]


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` over HTTP; returns the bound port (``port=0`` picks a free one)."""
    register_gpu_collector()
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])
