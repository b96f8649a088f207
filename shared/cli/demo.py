"""``dramaturg demo`` (``make demo``): the whole embedded stack on CPU, and a real job through it.

It generates a small synthetic drama corpus (espeak-ng + sox), starts every built service and the
gateway as local processes, submits a generated scene to the gateway, follows the job's progress
stream, and prints the result next to the reference the generator wrote — then stops the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.shared.cli.jobs import audio_input, stage_table, watch_job
from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.grpc.client import open_channel
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

console = Console()


def demo_corpus(home: Path) -> Path:
    """The demo's data: a small corpus made once under $DRAMATURG_HOME/demo-data."""
    from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus

    out = home / "demo-data"
    if not (out / "manifest.json").exists():
        console.print(f"[bold]1/4[/] generating a synthetic drama corpus in {out} (espeak-ng + sox) …")
        config = SynthConfig(
            seed=7,
            num_speakers=5,
            heldout_speakers=2,
            scenes_train=2,
            scenes_dev=1,
            scenes_test=1,
            lines_per_scene=8,
            utterances_per_speaker=3,
        )
        synthesize_corpus(out, config)
    else:
        console.print(f"[bold]1/4[/] using the synthetic corpus in {out}")
    return out


def reference_turns(corpus: Path, uri: str) -> list[dict[str, Any]]:
    turns = []
    for line in (corpus / "diarization" / "rttm" / f"{uri}.rttm").read_text().splitlines():
        f = line.split()
        turns.append({"start": float(f[3]), "end": float(f[3]) + float(f[4]), "speaker": f[7]})
    return turns


def detection_report(reference: list[dict[str, Any]], segments: list[list[float]], duration: float) -> dict:
    """Speech detection error of the gateway's activity stage against the generator's exact RTTM."""
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.detection import DetectionErrorRate

    ref = Annotation()
    for i, t in enumerate(reference):
        ref[Segment(t["start"], t["end"]), i] = "speech"
    hyp = Annotation()
    for i, (a, b) in enumerate(segments):
        hyp[Segment(a, b), i] = "speech"
    metric = DetectionErrorRate(collar=0.0)
    components = metric(ref, hyp, uem=Timeline([Segment(0, duration)]), detailed=True)
    return {k: round(float(v), 4) for k, v in components.items()}


async def run_job(gateway: str, token: str, wav: Path) -> gateway_pb2.Job:
    channel = open_channel(gateway, token=token)
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        pipelines = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=10)
        names = [p.name for p in pipelines.pipelines]
        pipeline = "probe"
        console.print(f"gateway offers pipelines: {', '.join(names)} → running [bold]{pipeline}[/]")
        job = await stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(
                pipeline=pipeline, audio=audio_input(wav), request_id=f"demo-{time.time()}"
            ),
            timeout=60,
        )
        console.print(f"submitted job [bold]{job.job_id}[/]")
        return await watch_job(stub, job.job_id)
    finally:
        await channel.close()


def run(args: argparse.Namespace) -> int:
    from dramaturg.shared.cli.stack import describe, start_stack, stop_stack

    home = dramaturg_home()
    corpus = demo_corpus(home)
    uri = (corpus / "diarization" / "lists" / "test.lst").read_text().split()[0]
    wav = corpus / "diarization" / "wav" / f"{uri}.wav"
    console.print("[bold]2/4[/] starting the embedded stack (gateway + built services, CPU, loopback) …")
    stack, _ = start_stack(home, say=lambda m: console.print(f"  {m}"))
    try:
        console.print(describe(stack))
        console.print(f"[bold]3/4[/] submitting scene {uri} ({wav}) to the gateway")
        token = Path(stack.token_file).read_text().strip()
        job = asyncio.run(run_job(stack.gateway, token, wav))
        console.print(stage_table(job))
        if job.state != gateway_pb2.SUCCEEDED:
            console.print(f"[red]job failed:[/] {job.error}")
            return 1
        result = json_format.MessageToDict(job.result)
        console.print("[bold]4/4[/] result")
        table = Table(title=f"scene {uri}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key in (
            "duration_seconds",
            "rms_dbfs",
            "peak_dbfs",
            "loudness_range_db",
            "speech_seconds",
            "speech_ratio",
        ):
            table.add_row(key, f"{result[key]}")
        reference = reference_turns(corpus, uri)
        speakers = sorted({t["speaker"] for t in reference})
        table.add_row("reference turns / speakers (RTTM)", f"{len(reference)} / {len(speakers)}")
        report = detection_report(reference, result["segments"], result["duration_seconds"])
        table.add_row("speech detection error vs RTTM (collar 0)", f"{report['detection error rate']:.1%}")
        table.add_row("  miss / false alarm (s)", f"{report['miss']:.2f} / {report['false alarm']:.2f}")
        console.print(table)
        console.print(
            "detected speech segments (s):", ", ".join(f"{a:.2f}–{b:.2f}" for a, b in result["segments"])
        )
        if args.json:
            print(json.dumps({"job_id": job.job_id, "result": result, "detection": report}, indent=2))
        return 0
    finally:
        stop_stack(home)
        console.print("stack stopped")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the embedded stack, run a real job through the gateway, stop")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=run)
