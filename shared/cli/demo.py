"""``dramaturg demo`` (``make demo``): the whole embedded stack on CPU, and a real job through it.

It generates a small synthetic drama corpus (espeak-ng + sox), starts every built service and the
gateway as local processes, submits a generated scene to the gateway, follows the job's progress
stream, and prints the result next to the reference the generator wrote — then stops the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.shared.cli.jobs import audio_input, download_files, stage_table, watch_job
from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.grpc.client import open_channel
from dramaturg.shared.scoring import word_error_rate
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

console = Console()


def demo_corpus(home: Path) -> Path:
    """The demo's data: a small corpus made once under $DRAMATURG_HOME/demo-data."""
    from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus

    out = home / "demo-data"
    if not (out / "manifest.json").exists():
        console.print(f"[bold]1.[/] generating a synthetic drama corpus in {out} (espeak-ng + sox) …")
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
        started = time.monotonic()
        synthesize_corpus(out, config)
        console.print(f"     corpus ready after {minutes(time.monotonic() - started)}")
    else:
        console.print(f"[bold]1.[/] using the synthetic corpus in {out}")
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


def script_lines(corpus: Path, uri: str) -> list[dict[str, Any]]:
    """The scene's script with timecodes, as the generator wrote it (who really speaks each line)."""
    path = corpus / "diarization" / "lab" / f"{uri}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# The services the demo's job needs, in training order: the diarization recipe's pipeline embeds
# with the speaker service's default model (one voice model for the platform), so speaker first; then
# the audio LLM (each line's transcript), the evaluator (each line's acting scores) and the TTS
# (re-voicing the weakest line).
DEMO_SERVICES: tuple[str, ...] = ("speaker", "diarization", "audiollm", "evaluator", "tts")


def demo_preset(service: str) -> Path | None:
    """The train config ``make demo`` runs for ``service`` (its ``demo_config``), None if it has none."""
    from dramaturg.shared import registry

    entry = registry.get(service)
    return entry.resource(entry.demo_config) if entry.demo_config else None


def training_plan(home: Path) -> list[tuple[str, Path]]:
    """(service, demo preset) of each service the demo must train first: those with no model yet."""
    from dramaturg.shared.cli.stack import has_model

    plan = []
    for service in DEMO_SERVICES:
        preset = demo_preset(service)
        if preset is not None and not has_model(home, service):
            plan.append((service, preset))
    return plan


def describe_plan(plan: list[tuple[str, Path]]) -> str:
    """The line a first ``make demo`` starts with: what it trains, for about how long, and that it is once.

    A newcomer otherwise sees a demo that says nothing for minutes. The durations are each preset's
    ``estimated_minutes``: measured on 2 CPU cores, corpus generation included; the rest of the demo
    (its scene, the stack, enrolment, the job) adds about a minute.
    """
    if not plan:
        return "models found in the store: no training; the job's result comes in about a minute"
    parts, total = [], 0.0
    for service, preset in plan:
        minutes = (yaml.safe_load(preset.read_text()) or {}).get("estimated_minutes")
        total += float(minutes or 0)
        parts.append(f"{service} ({preset.stem} preset" + (f", ≈ {minutes} min)" if minutes else ")"))
    cores = os.cpu_count() or 0
    where = "on 2 CPU cores" if cores == 2 else f"(times for 2 CPU cores; this machine has {cores})"
    result = f", so the first result comes after ≈ {round(total) + 1} min" if total else ""
    return f"first run: trains {' and '.join(parts)} {where}{result}; later runs reuse the models"


def ensure_model(home: Path, service: str) -> None:
    """A stage needs a trained model: train the service's demo preset once if the store has none."""
    from dramaturg.shared.cli import train
    from dramaturg.shared.cli.stack import has_model

    config = demo_preset(service)
    if config is None or has_model(home, service):
        return
    console.print(f"     no {service} model yet: training the {config.stem} preset ({config})")
    started = time.monotonic()
    args = argparse.Namespace(service=service, config=str(config), recipe=None, dataset=None, set=[],
                              list_recipes=False, metrics_port=0)
    if train.run(args) != 0:
        raise SystemExit(f"training the demo's {service} model failed; see the run's worker.log above")
    console.print(f"     {service} model ready after {minutes(time.monotonic() - started)}")


def minutes(seconds: float) -> str:
    """``12 min 5 s``: how the demo reports how long each part took."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


async def enroll_cast(target: str, corpus: Path) -> dict[str, str]:
    """Enroll every character from their reference lines (the cast list the generator wrote)."""
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    cast = json.loads((corpus / "speaker" / "enroll" / "cast.json").read_text())["speakers"]
    names = {}
    channel = open_channel(target)
    try:
        stub = speaker_pb2_grpc.SpeakerStub(channel)
        for person in cast:
            audio = [audio_input(corpus / "speaker" / "enroll" / e["path"]) for e in person["enroll"]]
            request = speaker_pb2.EnrollRequest(voice_id=person["speaker_id"], display_name=person["name"],
                                                audio=audio, overwrite=True)
            await stub.Enroll(request, timeout=120)
            names[person["speaker_id"]] = person["name"]
    finally:
        await channel.close()
    return names


async def run_job(gateway: str, token: str, wav: Path, pipeline: str,
                  params: dict[str, Any]) -> gateway_pb2.Job:
    channel = open_channel(gateway, token=token)
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        pipelines = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=10)
        names = [p.name for p in pipelines.pipelines]
        console.print(f"gateway offers pipelines: {', '.join(names)} → running [bold]{pipeline}[/]")
        request = gateway_pb2.SubmitJobRequest(pipeline=pipeline, audio=audio_input(wav),
                                               request_id=f"demo-{time.time()}")
        request.params.update(params)
        job = await stub.SubmitJob(request, timeout=60)
        console.print(f"submitted job [bold]{job.job_id}[/]")
        return await watch_job(stub, job.job_id)
    finally:
        await channel.close()


def run(args: argparse.Namespace) -> int:
    from dramaturg.shared.cli.stack import describe, start_stack, stop_stack

    home = dramaturg_home()
    started = time.monotonic()
    console.print(describe_plan(training_plan(home)))
    corpus = demo_corpus(home)
    uri = (corpus / "diarization" / "lists" / "test.lst").read_text().split()[0]
    wav = corpus / "diarization" / "wav" / f"{uri}.wav"
    for service in DEMO_SERVICES:
        ensure_model(home, service)
    console.print("[bold]2.[/] starting the embedded stack (gateway + built services, CPU, loopback) …")
    stack_started = time.monotonic()
    stack, _ = start_stack(home, say=lambda m: console.print(f"  {m}"))
    console.print(f"     stack up after {minutes(time.monotonic() - stack_started)}")
    try:
        console.print(describe(stack))
        token = Path(stack.token_file).read_text().strip()
        running = {p.service: p for p in stack.processes}
        speaker = running.get("speaker")
        if speaker is not None and "diarization" in running:
            status = analyze_demo(stack.gateway, token, f"127.0.0.1:{speaker.port}", corpus, uri, wav, args)
            tts = running.get("tts")
            if status == 0 and tts is not None and {"audiollm", "evaluator"} <= set(running):
                status = revoice_demo(stack.gateway, token, f"127.0.0.1:{tts.port}", corpus, uri, wav)
            return status
        if speaker is not None:
            return identify_demo(stack.gateway, token, f"127.0.0.1:{speaker.port}", corpus, uri, wav, args)
        console.print(f"[bold]3.[/] submitting scene {uri} ({wav}) to the gateway")
        job = asyncio.run(run_job(stack.gateway, token, wav, "probe", {}))
        console.print(stage_table(job))
        if job.state != gateway_pb2.SUCCEEDED:
            console.print(f"[red]job failed:[/] {job.error}")
            return 1
        result = json_format.MessageToDict(job.result)
        console.print("[bold]4.[/] result")
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
        took = minutes(time.monotonic() - started)
        console.print(f"demo ran {took} (training included); stopping the stack")
        stop_stack(home)
        console.print("stack stopped")


def identify_demo(gateway: str, token: str, speaker: str, corpus: Path, uri: str, wav: Path,
                  args: argparse.Namespace) -> int:
    """Enroll the cast, then ask the gateway who speaks each line of a scene it has never heard."""
    console.print("[bold]3.[/] enrolling the cast from their reference lines (speaker service)")
    names = asyncio.run(enroll_cast(speaker, corpus))
    console.print("     " + ", ".join(f"{n} ({v})" for v, n in names.items()))
    lines = script_lines(corpus, uri)
    console.print(f"[bold]4.[/] who speaks each of the {len(lines)} lines of scene {uri}? (a gateway job)")
    params = {"segments": [[round(x["start"], 3), round(x["end"], 3)] for x in lines],
              "min_segment_seconds": 0.5}
    job = asyncio.run(run_job(gateway, token, wav, "identify_lines", params))
    console.print(stage_table(job))
    if job.state != gateway_pb2.SUCCEEDED:
        console.print(f"[red]job failed:[/] {job.error}")
        return 1
    result = json_format.MessageToDict(job.result)
    found = {(round(r["start"], 2), round(r["end"], 2)): r for r in result["lines"]}
    table = Table(title=f"scene {uri}: labelled script (model {result['model']}, "
                        f"threshold {result['threshold']})")
    for col in ("time", "line", "spoken by", "identified as", "score", ""):
        table.add_column(col)
    right = total = 0
    for line in lines:
        when = f"{line['start']:.1f}–{line['end']:.1f}"
        r = found.get((round(line["start"], 2), round(line["end"], 2)))
        if r is None:
            table.add_row(when, line["text"][:40], line["name"], "(too short)", "", "")
            continue
        guess = r["voice_id"] or r["best_candidate"]
        ok = guess == line["speaker"]
        right, total = right + ok, total + 1
        shown = names.get(guess, guess) + ("" if r["voice_id"] else " (below threshold)")
        table.add_row(when, line["text"][:40], line["name"], shown, f"{r['score']:.2f}",
                      "[green]✓[/]" if ok else "[red]✗[/]")
    console.print(table)
    console.print(f"identified {right}/{total} lines correctly ({right / max(total, 1):.0%})")
    if args.json:
        summary = {"job_id": job.job_id, "result": result, "accuracy": right / max(total, 1)}
        print(json.dumps(summary, indent=2))
    return 0


def reference_annotation(corpus: Path, uri: str):
    """The generator's exact RTTM and UEM of one scene, as pyannote objects."""
    from pyannote.database.util import load_rttm, load_uem

    folder = corpus / "diarization"
    return load_rttm(folder / "rttm" / f"{uri}.rttm")[uri], load_uem(folder / "uem" / f"{uri}.uem")[uri]


def score_rttm(rttm: str, reference, uem) -> dict[str, float]:
    """DER of the job's RTTM against the reference: collar 0, overlap scored, on the UEM."""
    from dramaturg.shared.scoring import der_metric
    from pyannote.core import Annotation, Segment

    hypothesis = Annotation()
    for i, line in enumerate(rttm.splitlines()):
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER":
            start = float(f[3])
            hypothesis[Segment(start, start + float(f[4])), i] = f[7]
    metric = der_metric()
    components = metric(reference, hypothesis, uem=uem, detailed=True)
    total = max(float(components["total"]), 1e-9)
    return {
        "der": float(components["diarization error rate"]),
        "confusion": float(components["confusion"]) / total,
        "false_alarm": float(components["false alarm"]) / total,
        "miss": float(components["missed detection"]) / total,
    }


def scene_context(corpus: Path, uri: str) -> dict[str, Any]:
    """The scene's setting and its characters as the generator wrote them (the evaluator's context):
    ``scene`` and ``characters`` (voice id → profile, style, age) job parameters."""
    path = corpus / "evaluator" / "realism.jsonl"
    if not path.is_file():
        return {}
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = [it for it in items if it.get("scene_uri") == uri]
    if not items:
        return {}
    characters = {
        str(it["speaker_id"]): {"profile": it["char_profile"], "style": it["char_style"],
                                "age": it["char_age"]}
        for it in items
    }
    return {"scene": items[0]["local_scene"].split(". ")[0], "characters": characters}


def analyze_demo(gateway: str, token: str, speaker: str, corpus: Path, uri: str, wav: Path,
                 args: argparse.Namespace) -> int:
    """Enroll the cast, then ask the gateway who spoke when in a scene, who each speaker is, what each
    line says and how well it was acted."""
    from pyannote.core import Segment

    console.print("[bold]3.[/] enrolling the cast from their reference lines (speaker service)")
    names = asyncio.run(enroll_cast(speaker, corpus))
    console.print("     " + ", ".join(f"{n} ({v})" for v, n in names.items()))
    console.print(f"[bold]4.[/] analyze_scene on {uri}: diarize → identify each speaker → transcribe and "
                  "score each line (a gateway job)")
    params = {"uri": uri, "min_segment_seconds": 0.5, "max_transcript_tokens": 24,
              **scene_context(corpus, uri)}
    job = asyncio.run(run_job(gateway, token, wav, "analyze_scene", params))
    console.print(stage_table(job))
    if job.state != gateway_pb2.SUCCEEDED:
        console.print(f"[red]job failed:[/] {job.error}")
        return 1
    result = json_format.MessageToDict(job.result)
    reference, uem = reference_annotation(corpus, uri)
    table = Table(title=f"scene {uri}: labelled script (diarization {result['diarization_model']})")
    for col in ("time", "diarized as", "named", "really spoken by", "", "transcript", "acting (1–5)"):
        table.add_column(col)
    right = total = 0
    for turn in result.get("script", []):
        span = Segment(turn["start"], turn["end"])
        overlap = reference.crop(span).chart()
        truth = overlap[0][0] if overlap else ""
        voice = turn.get("voice_id", "")
        ok = bool(truth) and voice == truth
        if truth:
            right, total = right + ok, total + 1
        score = turn.get("mean_score")
        table.add_row(f"{turn['start']:.1f}–{turn['end']:.1f}", turn["speaker"],
                      names.get(voice, voice) or "(unnamed)", names.get(truth, truth or "(silence)"),
                      "[green]✓[/]" if ok else "[red]✗[/]", turn.get("text", ""),
                      "" if score is None else f"{score:.2f}")
    console.print(table)
    transcripts = [turn.get("text", "") for turn in result.get("script", [])]
    if any(transcripts):
        said = " ".join(line["text"] for line in script_lines(corpus, uri))
        console.print(f"transcripts: WER {word_error_rate(said, ' '.join(transcripts)):.1%} against the "
                      "scene's script (every turn's transcript, in order, against every line)")
    for stage, reason in result.get("skipped_stages", {}).items():
        console.print(f"[yellow]{stage} skipped:[/] {reason}")
    if "transcription_model" in result or "evaluator_model" in result:
        console.print(
            f"transcripts by {result.get('transcription_model', '—')}, acting scores by "
            f"{result.get('evaluator_model', '—')} (the demo's tiny models train for seconds: their words "
            "and scores show the wiring, not accuracy — README: learning checks)"
        )
    der = score_rttm(result["rttm"], reference, uem)
    console.print(
        f"DER {der['der']:.1%} against the generated RTTM (confusion {der['confusion']:.1%}, "
        f"false alarm {der['false_alarm']:.1%}, miss {der['miss']:.1%}; collar 0, overlap scored, on the UEM)"
    )
    console.print(f"named the right character in {right}/{total} turns ({right / max(total, 1):.0%})")
    if job.files:
        folder = dramaturg_home() / "demo-report" / job.job_id
        written = asyncio.run(fetch_files(gateway, token, job, folder))
        console.print(f"the job's files (`dramaturg job get {job.job_id} --output DIR`): "
                      + ", ".join(str(p) for p in written))
    if args.json:
        print(json.dumps({"job_id": job.job_id, "result": result, "der": der,
                          "naming_accuracy": right / max(total, 1)}, indent=2))
    return 0


async def add_tts_voices(target: str, corpus: Path) -> list[str]:
    """Give every character a TTS voice: its first reference line and that line's words as the prompt."""
    from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc

    cast = json.loads((corpus / "speaker" / "enroll" / "cast.json").read_text())["speakers"]
    channel = open_channel(target)
    try:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        for person in cast:
            first = person["enroll"][0]
            await stub.AddVoice(tts_pb2.AddVoiceRequest(
                voice_id=person["speaker_id"], display_name=person["name"], overwrite=True,
                reference_audio=audio_input(corpus / "speaker" / "enroll" / first["path"]),
                reference_text=first["text"]), timeout=120)
    finally:
        await channel.close()
    return [person["speaker_id"] for person in cast]


def scene_script(corpus: Path, uri: str) -> list[dict[str, Any]]:
    """The scene's lines with their timings and words, as the generator wrote them."""
    return [{"start": t["start"], "end": t["end"], "text": t["text"]} for t in script_lines(corpus, uri)]


def revoice_demo(gateway: str, token: str, tts: str, corpus: Path, uri: str, wav: Path) -> int:
    """Give the cast TTS voices, then re-voice the scene's weakest line (revoice_scene)."""
    console.print("[bold]5.[/] revoice_scene on the weakest line: TTS takes in the character's voice, "
                  "each scored, transcribed and verified, the best spliced in (a gateway job)")
    voices = asyncio.run(add_tts_voices(tts, corpus))
    console.print(f"     TTS voices for {len(voices)} characters from their reference lines")
    console.print("     [yellow]guards off[/] (max_wer, require_same_speaker): the demo's TTS trains for "
                  "minutes and does not speak intelligibly yet, so no take would pass them (README: the TTS "
                  "service)")
    params = {"uri": uri, "min_segment_seconds": 0.5, "max_transcript_tokens": 24, "threshold": 5.0,
              "max_lines": 1, "candidates": 2, "max_wer": 100.0, "require_same_speaker": False,
              "script": scene_script(corpus, uri), **scene_context(corpus, uri)}
    job = asyncio.run(run_job(gateway, token, wav, "revoice_scene", params))
    console.print(stage_table(job))
    if job.state != gateway_pb2.SUCCEEDED:
        console.print(f"[red]job failed:[/] {job.error}")
        return 1
    result = json_format.MessageToDict(job.result)
    for line in result["lines"]:
        before, after = line["before"]["mean_score"], line.get("after", {}).get("mean_score")
        outcome = (f"take {int(line['chosen'])} spliced in: mean acting score {before:.2f} → {after:.2f}"
                   if line.get("chosen") is not None else f"kept: {line.get('reason')}")
        console.print(f"     line {int(line['index'])} ({line['start']:.1f}–{line['end']:.1f} s, "
                      f"{line['voice_id']}): “{line['text']}” — {outcome}")
    for line in result.get("passed_over", []):
        console.print(f"     line {int(line['index'])} passed over: {line['reason']}")
    folder = dramaturg_home() / "demo-report" / job.job_id
    written = asyncio.run(fetch_files(gateway, token, job, folder))
    console.print("the re-voicing's files: " + ", ".join(str(p) for p in written))
    return 0


async def fetch_files(gateway: str, token: str, job: gateway_pb2.Job, folder: Path) -> list[Path]:
    channel = open_channel(gateway, token=token)
    try:
        return await download_files(gateway_pb2_grpc.GatewayStub(channel), job, folder)
    finally:
        await channel.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the embedded stack, run a real job through the gateway, stop")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(func=run)
