"""Evaluator: items per second over gRPC at 1 / 8 clients vs in process, and one pass vs one per dimension.

One run, one model (the store's default evaluator with ``--model store``, else an untrained tiny
Qwen2-Audio published into a temporary model store), the same weights and the same items everywhere:
N synthetic 3-4 s speech-like utterances, each with a realism context (character profile, scene,
traits) and all ten realism dimensions.

* **in process, one pass**: ``scoring.score_item`` on each item, one at a time — one ``encode_audio``,
  then every dimension's prompt in one ``score_prompts`` batch (what the service runs);
* **in process, one pass per dimension**: ``score_item`` once per dimension — ten encodings and ten
  language-model passes of one prompt each (what scoring "one (prompt, clip) pair at a time" costs);
* **gRPC**: ``Evaluator.Evaluate`` (WAV decode, validation, prompts, the model slot, the same scoring,
  serialisation) on the evaluator service on loopback, in a thread with its own event loop, at 1 and 8
  concurrent clients: items/s and the p50 / p95 latency of a request. With ``--batching on`` (the
  service's default on a GPU) concurrent requests share model calls (``scoring.score_batch``); with
  ``off`` (its default on CPU, this bench's) they run one at a time, so 8 clients measure queueing.

Every model call — loading, warm-up, the in-process scoring and the service's own — runs on the
service's ONE model thread with the same torch thread count (``--threads``): an idle OpenMP pool in
another thread makes libgomp stop spin-waiting and slows torch's CPU kernels (README, diarization
bench), so the process has one pool only. In-process and gRPC runs never overlap. Warm-up requests are
not timed. The first item's scores are checked: gRPC against in process (the same weights), and one
pass against one pass per dimension (the same scores, within float error of the padding).

``python -m bench.evaluator_items [--quick] [--model tiny|store] [--items N] [--threads T]``; results
in ``bench/results/evaluator_items[_quick].json``. ``--quick`` is a smoke run, not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf

RATE = 16_000
CONTEXTS = [
    {
        "char_profile": "an old sea captain",
        "local_scene": "a storm breaks over the deck at night",
        "char_style": "gruff, commanding, weary",
    },
    {
        "char_profile": "a young court herald",
        "local_scene": "announcing the queen to a crowded hall",
        "char_style": "bright, formal, nervous",
    },
    {
        "char_profile": "a retired detective",
        "local_scene": "a quiet confession in a rainy kitchen",
        "char_style": "low, patient, sceptical",
    },
    {
        "char_profile": "a street vendor",
        "local_scene": "haggling at a noisy market at dawn",
        "char_style": "quick, playful, loud",
    },
]


def utterance(seed: int, seconds: float) -> np.ndarray:
    """A speech-like buzz: a wandering pitch with a syllable-rate envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = (110 + 60 * rng.random()) * (1 + 0.08 * np.sin(2 * np.pi * (0.5 + rng.random()) * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 6))
    x = x * np.clip(np.sin(2 * np.pi * (3 + 2 * rng.random()) * t), 0, None) ** 0.5
    x = x + rng.normal(0, 0.01, len(t))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Item:
    """One evaluation: the WAV the client sends, the samples it decodes to, the realism context."""

    def __init__(self, index: int, seconds: float) -> None:
        from dramaturg.services.evaluator.prompts import REALISM

        self.wav = wav(utterance(index, seconds))
        self.audio = sf.read(io.BytesIO(self.wav), dtype="float32")[0]  # what the service decodes
        self.context = CONTEXTS[index % len(CONTEXTS)]
        self.item = {"dataset_name": REALISM, **self.context}


class Server:
    """The evaluator service on loopback in a thread of its own (its own event loop).

    The service (and its one model thread, :meth:`on_model_thread`) exists before it serves, so the
    bench can publish the model and set torch's threads there first.
    """

    def __init__(self, home: Path, device: str, waiting: int, batching: bool = True) -> None:
        from dramaturg.services.evaluator.config import EvaluatorSettings
        from dramaturg.services.evaluator.server import EvaluatorService
        from dramaturg.shared.config import ServerSettings

        settings = EvaluatorSettings(
            device=device,
            max_waiting=waiting,
            batching=batching,
            server=ServerSettings(port=0, drain_notice_seconds=0),
        )
        self.service = EvaluatorService(settings, home=home)
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def on_model_thread(self, fn: Any, *args: Any) -> Any:
        return self.service.executor.submit(fn, *args).result()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by __enter__
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        from dramaturg.shared.service import serving

        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with serving(self.service, self.service.settings.server) as server:
            self.port = server.port
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> Server:
        self._thread.start()
        self.ready.wait(600)
        if self.error is not None or not self.port:
            raise RuntimeError(f"the evaluator service did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


# ------------------------------------------------------------------------------------------- model


def publish(home: Path, which: str) -> None:
    """The bench's model into ``home``'s store, as its default: tiny (seed 0) or a copy of the store's."""
    from dramaturg.services.evaluator.model import write_tiny_model
    from dramaturg.shared.store import ModelStore

    store = ModelStore(home)
    if which == "store":
        source = ModelStore(Path(os.environ.get("DRAMATURG_HOME", "~/.dramaturg")).expanduser())
        record = source.resolve("evaluator", "")
        store.publish_folder(
            "evaluator",
            record.name,
            record.path,
            architecture=record.architecture,
            base_model=record.base_model,
            recipe=record.recipe,
            labels=record.labels,
        )
        store.set_default("evaluator", record.name)
        return
    with store.create_version(
        "evaluator", "tiny", architecture="tiny", base_model="", recipe="bench"
    ) as staging:
        write_tiny_model(Path(staging), home, seed=0)
    store.set_default("evaluator", "tiny")


class InProcess:
    """The library called directly: the same store version, loaded apart from the service, run on the
    service's model thread (via :meth:`Server.on_model_thread`) while the service is idle."""

    def __init__(self, home: Path, device: str, default_detailed: bool) -> None:
        from dramaturg.services.evaluator.model import load_evaluator, parameter_count
        from dramaturg.services.evaluator.prompts import detailed_for
        from dramaturg.shared.store import ModelStore

        self.record = ModelStore(home).resolve("evaluator", "")
        self.model, self.processor = load_evaluator(self.record.path, device=device)
        self.detailed = detailed_for(self.record.labels, default_detailed)
        self.parameters = parameter_count(self.model)["total"]
        config = self.model.config.audio_config
        self.window_seconds = 2 * int(config.max_source_positions) * 160 / RATE

    def one_pass(self, item: Item) -> dict[str, float]:
        from dramaturg.services.evaluator.scoring import score_item

        scores = score_item(self.model, self.processor, item.audio, item.item, detailed=self.detailed)
        return {d: s.score for d, s in scores.items()}

    def per_dimension(self, item: Item, dimensions: tuple[str, ...]) -> dict[str, float]:
        from dramaturg.services.evaluator.scoring import score_item

        out = {}
        for d in dimensions:  # one encode_audio + one score_prompts of one prompt, per dimension
            scores = score_item(
                self.model, self.processor, item.audio, item.item, dimensions=[d], detailed=self.detailed
            )
            out[d] = scores[d].score
        return out


def timed(fn: Any, items: list[Item], warm: int) -> dict[str, Any]:
    """``fn`` on each item, one at a time, the first ``warm`` untimed; items/s and per-item latency."""
    for item in items[:warm]:
        fn(item)
    latencies = []
    began = time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - began
    return summary(len(items), elapsed, latencies)


def summary(n: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "items": n,
        "seconds": round(elapsed, 4),
        "items_per_s": round(n / elapsed, 3),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p95_ms": round(1000 * float(np.percentile(latencies, 95)), 2),
        "mean_ms": round(1000 * statistics.fmean(latencies), 2),
    }


# -------------------------------------------------------------------------------------------- gRPC


def request(item: Item) -> Any:
    from dramaturg.common.v1 import common_pb2
    from dramaturg.evaluator.v1 import evaluator_pb2

    return evaluator_pb2.EvaluateRequest(
        audio=common_pb2.AudioInput(encoding=common_pb2.WAV, content=item.wav),
        rubric=evaluator_pb2.Rubric.REALISM,
        context=evaluator_pb2.RoleContext(**item.context),
    )


def through_grpc(port: int, clients: int, items: list[Item]) -> tuple[dict[str, Any], Any]:
    """``Evaluate`` on every item from ``clients`` threads (a channel each); one warm-up per channel."""
    from dramaturg.evaluator.v1 import evaluator_pb2_grpc

    requests = [request(item) for item in items]  # built before the clock starts
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [evaluator_pb2_grpc.EvaluatorStub(c) for c in channels]

    def work(i: int) -> tuple[float, Any]:
        t0 = time.perf_counter()
        reply = stubs[i % clients].Evaluate(requests[i], timeout=600)
        return time.perf_counter() - t0, reply

    try:
        with ThreadPoolExecutor(clients) as pool:
            for s in stubs:  # warm every channel (connection, first call), untimed
                s.Evaluate(requests[0], timeout=600)
            began = time.perf_counter()
            results = list(pool.map(work, range(len(requests))))
            elapsed = time.perf_counter() - began
    finally:
        for c in channels:
            c.close()
    return summary(len(items), elapsed, [r[0] for r in results]), results[0][1]


# -------------------------------------------------------------------------------------------- main


def machine(threads: int, device: str, load_before: tuple[float, ...]) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "device": device,
        # 1/5/15-minute load averages before and after the run: a loaded machine skews every figure
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "store"],
        help="untrained tiny evaluator (seed 0) or the default evaluator of $DRAMATURG_HOME's store",
    )
    parser.add_argument("--items", type=int, default=64, help="items per measured run")
    parser.add_argument("--seconds", type=float, nargs=2, default=(3.0, 4.0), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads, service and in process (on cores busy with other work 2 threads stall "
        "in OpenMP barriers: benchmark on a quiet machine, or compare with --threads 1)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    parser.add_argument("--batching", choices=("on", "off"), default="off",
                        help="the service's dynamic batching of concurrent requests (its default: on a GPU)")
    parser.add_argument("--quick", action="store_true", help="a few items: a smoke run, not a measurement")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.items = min(args.items, 6)
    suffix = ("_quick" if args.quick else "") + ("_batched" if args.batching == "on" else "")
    out = Path(args.out or f"bench/results/evaluator_items{suffix}.json")
    warm = 1 if args.quick else 2
    clients_list = (1, 8)

    import torch
    from dramaturg.services.evaluator.prompts import DIMENSIONS, REALISM

    dimensions = DIMENSIONS[REALISM]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        server = Server(home, args.device, waiting=max(clients_list), batching=args.batching == "on")
        device = server.service.device

        def prepare() -> InProcess:
            torch.set_num_threads(args.threads)
            publish(home, args.model)
            return InProcess(home, device, server.service.settings.detailed_prompts)

        local = server.on_model_thread(prepare)
        span = min(args.seconds[1], local.window_seconds)
        lengths = np.linspace(min(args.seconds[0], span), span, args.items)
        items = [Item(i, float(s)) for i, s in enumerate(lengths)]
        print(
            f"model {local.record.ref} ({local.parameters:,} parameters, {local.window_seconds:g}-s window, "
            f"{'detailed' if local.detailed else 'simple'} prompts) on {device}, {args.threads} torch "
            f"threads; {len(items)} items of {lengths[0]:.1f}-{lengths[-1]:.1f} s × {len(dimensions)} "
            "dimensions",
            flush=True,
        )
        with server:
            rows: dict[str, dict[str, Any]] = {}
            first: dict[str, float] = {}
            single: dict[str, float] = {}

            def run_local() -> None:
                assert torch.get_num_threads() == args.threads
                rows["in_process_one_pass"] = timed(local.one_pass, items, warm)
                first.update(local.one_pass(items[0]))
                single.update(local.per_dimension(items[0], dimensions))
                rows["in_process_per_dimension"] = timed(
                    lambda item: local.per_dimension(item, dimensions), items, warm
                )

            server.on_model_thread(run_local)
            for name in ("in_process_one_pass", "in_process_per_dimension"):
                print(f"{name:<26} {rows[name]['items_per_s']:8.2f} items/s", flush=True)
            replies = {}
            for clients in clients_list:
                name = f"grpc_{clients}_clients"
                rows[name], replies[clients] = through_grpc(server.port, clients, items)
                print(f"{name:<26} {rows[name]['items_per_s']:8.2f} items/s", flush=True)
        differences = [abs(s.score - first[s.dimension]) for s in replies[1].scores]
        if len(differences) != len(dimensions):
            raise RuntimeError(f"Evaluate answered {len(differences)} dimensions, not {len(dimensions)}")

    def rate(name: str) -> float:
        return rows[name]["items_per_s"]

    ratios = {
        "grpc_1_client_over_in_process": round(rate("grpc_1_clients") / rate("in_process_one_pass"), 4),
        "grpc_8_clients_over_grpc_1_client": round(rate("grpc_8_clients") / rate("grpc_1_clients"), 4),
        "one_pass_over_per_dimension": round(
            rate("in_process_one_pass") / rate("in_process_per_dimension"), 4
        ),
    }
    result = {
        "bench": "evaluator-items",
        "quick": args.quick,
        "note": "a smoke run, not a measurement" if args.quick else "",
        "machine": machine(args.threads, device, load_before),
        "batching": args.batching,
        "model": {
            "ref": local.record.ref,
            "source": args.model,
            "architecture": local.record.architecture,
            "parameters": local.parameters,
            "window_seconds": local.window_seconds,
            "detailed_prompts": local.detailed,
        },
        "items": len(items),
        "item_seconds": [round(float(lengths[0]), 3), round(float(lengths[-1]), 3)],
        "dimensions": list(dimensions),
        "warm_up_items": warm,
        "rows": rows,
        "ratios": ratios,
        "grpc_vs_in_process_max_abs_score_difference": round(max(differences), 7),
        "one_pass_vs_per_dimension_max_abs_score_difference": round(
            max(abs(single[d] - first[d]) for d in dimensions), 7
        ),
    }
    report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = {
        "in_process_one_pass": "in process, all dimensions in one pass",
        "in_process_per_dimension": "in process, one pass per dimension",
        "grpc_1_clients": "gRPC Evaluate, 1 client",
        "grpc_8_clients": "gRPC Evaluate, 8 clients",
    }
    m = result["machine"]
    title = (
        f"evaluator items — {result['model']['ref']} on {m['device']}, {m['torch_threads']} torch threads, "
        f"{result['items']} items × {len(result['dimensions'])} dimensions"
        + (" (SMOKE RUN, not a measurement)" if result["quick"] else "")
    )
    table = Table(title=title)
    for column in ("path", "items/s", "p50 ms", "p95 ms", "mean ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for key, label in labels.items():
        r = result["rows"][key]
        table.add_row(
            label,
            f"{r['items_per_s']:.2f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['mean_ms']:.1f}",
        )
    console = Console()
    console.print(table)
    ratios = Table(title="ratios (items/s over items/s)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    ratios.add_row(
        "gRPC (1 client) / in process (one pass)", f"{result['ratios']['grpc_1_client_over_in_process']:.3f}×"
    )
    ratios.add_row(
        "gRPC (8 clients) / gRPC (1 client)", f"{result['ratios']['grpc_8_clients_over_grpc_1_client']:.3f}×"
    )
    ratios.add_row(
        "one pass / one pass per dimension", f"{result['ratios']['one_pass_over_per_dimension']:.3f}×"
    )
    console.print(ratios)
    console.print(
        f"gRPC vs in-process scores (first item): max |Δ| = "
        f"{result['grpc_vs_in_process_max_abs_score_difference']:.2e}; one pass vs one per dimension: "
        f"{result['one_pass_vs_per_dimension_max_abs_score_difference']:.2e}"
    )
    if result["quick"]:
        console.print("[bold]--quick: a smoke run, not a measurement[/bold]")


if __name__ == "__main__":
    raise SystemExit(main())
