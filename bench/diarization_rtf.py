"""Diarization: real-time factor of the service vs pyannote's own pipeline, and peak memory on a long file.

One run, the same weights, the same long file (synthetic drama scenes concatenated to ``--minutes``,
default 60; ``--quick`` makes it 5):

* ``service`` — ``Diarization.Diarize`` over gRPC on loopback (the file by uri, as long files are
  sent: 1 h of 16-bit WAV is over the 64 MiB message limit), with the service's batch sizes;
* ``pyannote (defaults)`` — ``SpeakerDiarization`` called directly on the file path, built on the same
  segmentation/embedding models and parameters with pyannote's constructor defaults (batch size 1
  for segmentation and embeddings): what a user who calls pyannote gets;
* ``pyannote (same batches)`` — the same, with the service's batch sizes;
* ``pyannote (in memory)`` — the same batches, the file decoded once and passed as
  ``{"waveform", "sample_rate"}`` (decoding timed too), as the service does: given a path, pyannote
  reads and decodes the file again for every chunk it crops (segmentation, then every embedding).
  What is left between this and the service is the service's own cost (gRPC, validation,
  confidences) or saving (the clustering cap, on files long enough for it to engage).

The pyannote variants load the artifact with ``load_pipeline``: pyannote's ``SpeakerDiarization``
class with the project's two additions (the optimal-mapping DER for tuning, and regions that end on
their last active frame when the artifact says so) — neither costs measurable time, and both sides
then produce the same regions, so the agreement DER isolates the service's own effect.

Each variant runs in a fresh child process (so its peak RSS, ``ru_maxrss``, is its own: model,
warm-up and the long file) after a warm-up call on one scene; the RTF is processing seconds / audio
seconds. DER (collar 0, overlap scored) of each against the synthetic reference, and of the service
against pyannote with the same batches (agreement), say whether the outputs are the same diarization.

``--model tiny`` (default) is the untrained artifact of the tests (tiny PyanNet, tiny ECAPA);
``production-size`` is pyannote segmentation-3.0's architecture with a WeSpeaker ResNet34 embedding
(random weights: speed and memory only, clustering as 3.1 since no PLDA exists offline);
``store`` is the default diarization model of ``DRAMATURG_HOME``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

log = logging.getLogger("bench.diarization_rtf")

RATE = 16_000
GAP_SECONDS = 1.0
# name → (label, child kind, batch size: None = the service's, in memory)
VARIANTS: dict[str, tuple[str, str, int | None, bool]] = {
    "service": ("service", "service", None, False),
    "pyannote-defaults": ("pyannote (defaults)", "pyannote", 1, False),
    "pyannote-batched": ("pyannote (same batches)", "pyannote", None, False),
    "pyannote-memory": ("pyannote (in memory)", "pyannote", None, True),
}
PRODUCTION_SEGMENTATION = {
    "sincnet": {"stride": 10},
    "lstm": {"hidden_size": 128, "num_layers": 4, "bidirectional": True, "monolithic": True, "dropout": 0.0},
    "linear": {"hidden_size": 128, "num_layers": 2},
}


# --------------------------------------------------------------------------------------------- inputs


def make_long_file(work: Path, minutes: float) -> tuple[Path, Path, Path, float]:
    """Concatenate synthetic scenes (cycling through them) into one WAV of at least ``minutes``.

    Written scene by scene so the parent never holds the hour in memory. Returns the long WAV, its
    reference RTTM, a one-scene WAV for warm-ups, and the duration in seconds.
    """
    from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus

    corpus = work / "corpus"
    config = SynthConfig(
        num_speakers=6,
        heldout_speakers=2,
        scenes_train=1,
        scenes_dev=1,
        scenes_test=8,
        lines_per_scene=8,
        utterances_per_speaker=2,
        raters=1,
    )
    synthesize_corpus(corpus, config)
    ddir = corpus / "diarization"
    uris = (ddir / "lists" / "test.lst").read_text().split()
    scenes = []
    for uri in uris:
        samples, rate = sf.read(ddir / "wav" / f"{uri}.wav", dtype="float32")
        assert rate == RATE
        rttm = [line.split() for line in (ddir / "rttm" / f"{uri}.rttm").read_text().splitlines()]
        scenes.append((samples, [(float(f[3]), float(f[4]), f[7]) for f in rttm]))
    long_wav, long_rttm = work / "long.wav", work / "long.rttm"
    gap = np.zeros(int(GAP_SECONDS * RATE), np.float32)
    offset, k = 0.0, 0
    with sf.SoundFile(long_wav, "w", RATE, 1, subtype="PCM_16") as out, open(long_rttm, "w") as ref:
        while offset < minutes * 60:
            samples, turns = scenes[k % len(scenes)]
            out.write(samples)
            out.write(gap)
            for onset, duration, speaker in turns:
                ref.write(
                    f"SPEAKER long 1 {offset + onset:.3f} {duration:.3f} <NA> <NA> {speaker} <NA> <NA>\n"
                )
            offset += (len(samples) + len(gap)) / RATE
            k += 1
    warm = work / "warm.wav"
    sf.write(warm, scenes[0][0], RATE, subtype="PCM_16")
    return long_wav, long_rttm, warm, offset


def publish_model(home: Path, kind: str) -> str:
    """Put the benchmarked pipeline into a fresh store under ``home``; returns its ref."""
    import torch
    from dramaturg.services.diarization import model as dm
    from dramaturg.shared.store import ModelStore

    store = ModelStore(home)
    if kind == "store":
        source = ModelStore(Path(os.environ.get("DRAMATURG_HOME", "~/.dramaturg")).expanduser())
        record = source.resolve("diarization", "")
        store.publish_folder(
            "diarization",
            record.name,
            record.path,
            architecture=record.architecture,
            base_model=record.base_model,
            recipe=record.recipe,
        )
        name = record.name
    else:
        name = kind
        writer = store.create_version(
            "diarization", name, architecture="pyannote", base_model="", recipe="bench"
        )
        with writer as staging:
            if kind == "tiny":
                dm.default_artifact(staging, home)
            else:
                from pyannote.audio.models.embedding import WeSpeakerResNet34

                torch.manual_seed(0)
                segmentation = dm.attach_specifications(
                    dm.build_segmentation(PRODUCTION_SEGMENTATION), duration=10.0
                )
                embedding = WeSpeakerResNet34()
                dm.save_artifact(
                    staging,
                    segmentation.eval(),
                    params=dm.DEFAULT_PARAMS,
                    embedding={"kind": "pyannote", "checkpoint": "random-init", "model": embedding.eval()},
                    metrics={},
                )
    store.set_default("diarization", name)
    return store.resolve("diarization", name).ref


# ------------------------------------------------------------------------------------ child processes


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): less sensitive than wall time to other
    processes competing for the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_rttm(turns: list[tuple[float, float, str]], path: Path) -> None:
    with open(path, "w") as f:
        for start, end, speaker in turns:
            f.write(f"SPEAKER long 1 {start:.3f} {end - start:.3f} <NA> <NA> {speaker} <NA> <NA>\n")


def child_service(args: argparse.Namespace) -> dict[str, Any]:
    """Serve the store's default model in this process and time one Diarize of the long file."""
    import asyncio
    import threading

    import grpc
    from dramaturg.common.v1 import common_pb2
    from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
    from dramaturg.services.diarization.config import DiarizationSettings
    from dramaturg.services.diarization.server import DiarizationService
    from dramaturg.shared.config import ServerSettings
    from dramaturg.shared.grpc.server import channel_options
    from dramaturg.shared.service import serving

    settings = DiarizationSettings(
        device=args.device,
        audio_uri_roots=[str(Path(args.wav).parent)],
        segmentation_batch_size=args.batch,
        embedding_batch_size=args.batch,
        server=ServerSettings(port=0, drain_notice_seconds=0.0),
    )
    service = DiarizationService(settings, home=Path(args.home))
    ready, stop, port = threading.Event(), None, {}

    async def run() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with serving(service, settings.server) as server:
            port["port"] = server.port
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    if not ready.wait(600):
        raise RuntimeError("the diarization service did not start")
    options = channel_options(settings.server.max_message_bytes)
    with grpc.insecure_channel(f"127.0.0.1:{port['port']}", options=options) as channel:
        stub = diarization_pb2_grpc.DiarizationStub(channel)

        def diarize(path: str) -> diarization_pb2.DiarizeResponse:
            audio = common_pb2.AudioInput(uri=path)
            return stub.Diarize(diarization_pb2.DiarizeRequest(audio=audio, uri="long"), timeout=6 * 3600)

        diarize(args.warm)
        rss_before = _rss_bytes()
        cpu = _cpu_seconds()
        began = time.perf_counter()
        reply = diarize(args.wav)
        seconds = time.perf_counter() - began
        cpu = _cpu_seconds() - cpu
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)
    _write_rttm([(t.span.start, t.span.end, t.speaker) for t in reply.turns], Path(args.rttm))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "audio_seconds": reply.audio_seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": _peak_rss_bytes(),
        "speakers": len(reply.speakers),
        "turns": len(reply.turns),
    }


def child_pyannote(args: argparse.Namespace) -> dict[str, Any]:
    """pyannote's pipeline on the artifact's models, on the file path (as pyannote's README calls it)
    or, with ``--in-memory``, on the decoded waveform."""
    import torch
    from dramaturg.services.diarization.model import load_pipeline
    from dramaturg.shared.store import ModelStore

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    record = ModelStore(Path(args.home)).resolve("diarization", "")
    pipeline = load_pipeline(
        record.path, device, segmentation_batch_size=args.batch, embedding_batch_size=args.batch
    )

    def load(path: str) -> Any:
        if not args.in_memory:
            return path
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        return {"waveform": torch.from_numpy(np.ascontiguousarray(samples.T)), "sample_rate": rate}

    pipeline(load(args.warm))
    rss_before = _rss_bytes()
    cpu = _cpu_seconds()
    began = time.perf_counter()
    output = pipeline(load(args.wav))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    cpu = _cpu_seconds() - cpu
    annotation = output.speaker_diarization
    duration = sf.info(args.wav).duration
    turns = [
        (s.start, min(s.end, duration), str(label)) for s, _, label in annotation.itertracks(yield_label=True)
    ]
    _write_rttm(turns, Path(args.rttm))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "audio_seconds": duration,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": _peak_rss_bytes(),
        "speakers": len(annotation.labels()),
        "turns": len(turns),
    }


def run_child(
    kind: str, home: Path, wav: Path, warm: Path, rttm: Path, batch: int, device: str, in_memory: bool
) -> dict:
    command = [sys.executable, "-m", "bench.diarization_rtf", "--child", kind, "--home", str(home)]
    command += ["--wav", str(wav), "--warm", str(warm), "--rttm", str(rttm), "--batch", str(batch)]
    command += ["--device", device, *(["--in-memory"] if in_memory else [])]
    env = {**os.environ, "PYANNOTE_METRICS_ENABLED": "false"}
    root = Path(__file__).resolve().parent.parent
    log.info("running %s (batch %d)", kind, batch)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- DER


def read_rttm(path: Path):
    from pyannote.core import Annotation, Segment

    annotation = Annotation(uri="long")
    for i, line in enumerate(path.read_text().splitlines()):
        f = line.split()
        annotation[Segment(float(f[3]), float(f[3]) + float(f[4])), i] = f[7]
    return annotation


def der(reference: Path, hypothesis: Path, duration: float) -> float:
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=0.0, skip_overlap=False)
    uem = Timeline([Segment(0.0, duration)], uri="long")
    return float(metric(read_rttm(reference), read_rttm(hypothesis), uem=uem))


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.diarization_rtf", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 5-minute file instead of 60")
    parser.add_argument("--minutes", type=float, default=None, help="length of the long file (default 60)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "production-size", "store"])
    parser.add_argument(
        "--batch", type=int, default=32, help="the service's segmentation/embedding batch size"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each variant (median)")
    parser.add_argument(
        "--only",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} (service is always run)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON result (default bench/results/diarization_rtf*.json)"
    )
    # internal: one measured variant in a fresh process
    parser.add_argument("--child", choices=["service", "pyannote"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--wav", help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    parser.add_argument("--rttm", help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    if args.child:
        result = (child_service if args.child == "service" else child_pyannote)(args)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    minutes = args.minutes or (5.0 if args.quick else 60.0)
    out = Path(args.out or f"bench/results/diarization_rtf{'_quick' if args.quick else ''}.json")
    work = Path(tempfile.mkdtemp(prefix="dramaturg-diar-bench-"))
    try:
        home = work / "home"
        home.mkdir()
        log.info("making a %.0f-minute file", minutes)
        wav, reference, warm, duration = make_long_file(work, minutes)
        ref = publish_model(home, args.model)
        chosen = ["service", *(v for v in args.only.split(",") if v in VARIANTS and v != "service")]
        variants = [
            (VARIANTS[v][0], VARIANTS[v][1], VARIANTS[v][2] or args.batch, VARIANTS[v][3]) for v in chosen
        ]
        runs: dict[str, list[dict]] = {name: [] for name, _, _, _ in variants}
        for r in range(args.repeats):  # interleaved, so load drift hits every variant alike
            for name, kind, batch, in_memory in variants:
                rttm = work / f"{kind}-{batch}-{in_memory}-{r}.rttm"
                result = run_child(kind, home, wav, warm, rttm, batch, args.device, in_memory)
                result["der"] = der(reference, rttm, duration)
                result["rttm"] = rttm
                runs[name].append(result)
                log.info("%s: %.1f s for %.0f s of audio", name, result["seconds"], duration)
        rows = []
        for name, _, batch, _ in variants:
            results = runs[name]
            seconds = float(np.median([x["seconds"] for x in results]))
            cpu = float(np.median([x["cpu_seconds"] for x in results]))
            rows.append(
                {
                    "variant": name,
                    "batch_size": batch,
                    "seconds": round(seconds, 2),
                    "rtf": round(seconds / duration, 4),
                    "cpu_seconds": round(cpu, 2),
                    "cpu_rtf": round(cpu / duration, 4),
                    "peak_rss_mib": round(max(x["peak_rss_bytes"] for x in results) / 2**20, 1),
                    "rss_before_mib": round(min(x["rss_before_bytes"] for x in results) / 2**20, 1),
                    "der": round(results[0]["der"], 4),
                    "speakers": results[0]["speakers"],
                    "turns": results[0]["turns"],
                }
            )
        service = rows[0]
        ratios = {row["variant"]: round(service["rtf"] / row["rtf"], 3) for row in rows[1:]}
        cpu_ratios = {row["variant"]: round(service["cpu_rtf"] / row["cpu_rtf"], 3) for row in rows[1:]}
        agreement = {
            name: round(der(runs[name][0]["rttm"], runs["service"][0]["rttm"], duration), 4)
            for name, kind, batch, _ in variants[1:]
            if batch == args.batch
        }
        import torch

        result = {
            "model": ref,
            "model_kind": args.model,
            "device": args.device,
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "audio_seconds": round(duration, 2),
            "repeats": args.repeats,
            "rows": rows,
            "service_rtf_over": ratios,
            "service_cpu_rtf_over": cpu_ratios,
            "target_ratio": 0.8,
            "der_of_service_against": agreement,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"\nDiarization, {duration / 60:.1f} min of synthetic drama, model {ref} ({args.model}), "
        f"device {args.device}, {result['cpu_threads']} CPU threads\n",
        "| variant | batch | wall s | RTF | CPU s | CPU RTF | peak RSS MiB | RSS before MiB | DER vs ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {row['seconds']} | {row['rtf']:.4f} | "
            f"{row['cpu_seconds']} | {row['cpu_rtf']:.4f} | {row['peak_rss_mib']} | "
            f"{row['rss_before_mib']} | {row['der']:.3f} |"
        )
    lines.append(
        "\nservice RTF / pyannote RTF (target ≤ 0.8×): "
        + ", ".join(f"{r:.3f}× vs {n}" for n, r in ratios.items())
        + "; in CPU time: "
        + ", ".join(f"{r:.3f}× vs {n}" for n, r in cpu_ratios.items())
    )
    lines.append(
        "DER of the service's turns against pyannote's (same weights and batches; 0 = the same diarization): "
        + ", ".join(f"{d:.4f} vs {n}" for n, d in agreement.items())
    )
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
