"""The gateway under load: many analyze_scene jobs at once on the embedded stack, and its share of the
end-to-end time against calling the same services directly.

Needs a ``DRAMATURG_HOME`` whose store has the speaker, diarization, audio-LLM and evaluator models
and the demo corpus (what ``make demo`` leaves: ``DRAMATURG_HOME=<home> make demo`` first). The bench
starts the stack there (``dramaturg up``: every service its own process, the gateway with its SQLite
job store), enrolls the cast, then measures, on the demo's generated scenes:

* **direct**: the same service calls ``analyze_scene`` makes, made by a client — Diarize on the scene,
  Identify on its exclusive turns, then per line (the turns grouped as the job groups them, at least
  ``min_segment_seconds``) Generate and
  Evaluate on the line's audio (longer lines scored in 5-s pieces), transcripts and scores side by
  side with four requests of each in flight — wall time per scene, ``--repeat`` times;
* **one job**: the same scene as one ``analyze_scene`` job (submit → WatchJob to the end), as often;
  the gateway's share is ``(job − direct) / job``. On a small machine that difference drowns in
  the noise of the services' own times (two cores shared by six processes), so the bench also counts
  **CPU seconds** per process (``psutil``) over the one-job runs: the gateway's CPU seconds over the
  whole stack's are its share of the work, a figure the machine's size does not move much, and the
  services' CPU seconds per scene directly and through the gateway show it adds no work for them;
* **load**: ``--jobs`` jobs submitted at once (a thread each): how many were accepted and how many
  refused at submit (RESOURCE_EXHAUSTED, with their retry delay), that every accepted one finished,
  jobs per minute, p50 / p95 job latency, and the gateway's resident memory before and after.

``python -m bench.gateway_load [--jobs 50] [--repeat 3] [--quick]``; results in
``bench/results/gateway_load[_quick].json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import soundfile as sf

from bench.common import write_result

RATE = 16_000
MIN_SEGMENT_SECONDS = 0.5
LINE_CONCURRENCY = 4  # as the gateway's per-line stages


def wav_bytes(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def direct_scene(targets: dict[str, str], content: bytes, context: Any) -> float:
    """Seconds for analyze_scene's service calls made straight from a client, one scene."""
    from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc
    from dramaturg.common.v1 import common_pb2
    from dramaturg.diarization.v1 import diarization_pb2, diarization_pb2_grpc
    from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
    from dramaturg.services.gateway.pipelines import MERGE_GAP_SECONDS, speaker_lines, split_line
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    channels = {name: grpc.insecure_channel(target) for name, target in targets.items()}
    try:
        began = time.perf_counter()
        audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
        diarized = diarization_pb2_grpc.DiarizationStub(channels["diarization"]).Diarize(
            diarization_pb2.DiarizeRequest(audio=audio, uri="scene"), timeout=600)
        turns = [(t.span.start, t.span.end) for t in diarized.exclusive_turns
                 if t.span.end - t.span.start >= MIN_SEGMENT_SECONDS]
        speaker_pb2_grpc.SpeakerStub(channels["speaker"]).Identify(speaker_pb2.IdentifyRequest(
            audio=audio, top_k=1, segments=[common_pb2.TimeSpan(start=a, end=b) for a, b in turns]),
            timeout=600)
        # the script's lines, as the job groups the turns (merge_gap_seconds' default)
        grouped = speaker_lines([{"start": t.span.start, "end": t.span.end, "speaker": t.speaker}
                                 for t in diarized.exclusive_turns], MERGE_GAP_SECONDS)
        lines = [(g[0]["start"], g[-1]["end"]) for g in grouped
                 if g[-1]["end"] - g[0]["start"] >= MIN_SEGMENT_SECONDS]
        samples, _ = sf.read(io.BytesIO(content), dtype="int16")
        generate = audiollm_pb2_grpc.AudioLLMStub(channels["audiollm"]).Generate
        evaluate = evaluator_pb2_grpc.EvaluatorStub(channels["evaluator"]).Evaluate

        def clip(span: tuple[float, float]) -> Any:
            piece = samples[round(span[0] * RATE) : round(span[1] * RATE)]
            return common_pb2.AudioInput(encoding=common_pb2.WAV, content=wav_bytes(piece))

        def transcribe(span: tuple[float, float]) -> None:
            generate(audiollm_pb2.GenerateRequest(audio=clip(span), task=audiollm_pb2.TRANSCRIBE,
                                                  generation=audiollm_pb2.GenerationConfig(max_new_tokens=24)),
                     timeout=600)

        def score(span: tuple[float, float]) -> None:
            evaluate(evaluator_pb2.EvaluateRequest(audio=clip(span), rubric=evaluator_pb2.REALISM,
                                                   context=context), timeout=600)

        # as the job does: transcripts and scores side by side, four requests of each in flight, lines
        # longer than the evaluator's 5-s window scored in equal pieces
        pieces = [p for a, b in lines for p in split_line(a, b, 5.0)]
        with ThreadPoolExecutor(LINE_CONCURRENCY) as words, ThreadPoolExecutor(LINE_CONCURRENCY) as scores:
            done = [words.submit(transcribe, t) for t in lines] + [scores.submit(score, p) for p in pieces]
            for future in done:
                future.result()
        return time.perf_counter() - began
    finally:
        for channel in channels.values():
            channel.close()


def run_job(gateway: str, token: str, content: bytes, params: dict[str, Any]) -> tuple[str, float, str]:
    """(state, seconds, error) of one analyze_scene job, submit to its last event."""
    from dramaturg.common.v1 import common_pb2
    from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
    from dramaturg.shared.grpc.errors import details_from_error

    auth = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=content)
        request = gateway_pb2.SubmitJobRequest(pipeline="analyze_scene", audio=audio)
        request.params.update(params)
        began = time.perf_counter()
        try:
            job = stub.SubmitJob(request, metadata=auth, timeout=60)
        except grpc.RpcError as error:
            detail = details_from_error(error)
            return (f"refused:{detail.code.name}", 0.0, f"retry after {detail.retry_after_seconds}")
        watch = gateway_pb2.WatchJobRequest(job_id=job.job_id)
        events = list(stub.WatchJob(watch, metadata=auth, timeout=3600))
        final = events[-1].job
        return gateway_pb2.JobState.Name(final.state), time.perf_counter() - began, final.error


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds so far of each process (its threads included)."""
    import psutil

    out = {}
    for name, pid in pids.items():
        times = psutil.Process(pid).cpu_times()
        out[name] = times.user + times.system
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], runs: int) -> dict[str, float]:
    return {name: round((after[name] - before[name]) / runs, 3) for name in before}


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> int:
    from dramaturg.shared.cli.demo import enroll_cast, scene_context
    from dramaturg.shared.cli.stack import start_stack, stop_stack
    from dramaturg.shared.config import dramaturg_home

    parser = argparse.ArgumentParser(prog="python -m bench.gateway_load", description=__doc__)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few jobs: a smoke run, not a measurement")
    parser.add_argument("--skip-load", action="store_true", help="only the share (no concurrent jobs)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    jobs, repeat = (4, 1) if args.quick else (args.jobs, args.repeat)
    home = dramaturg_home()
    corpus = home / "demo-data"
    if not (corpus / "diarization" / "wav").is_dir():
        print(f"no demo corpus in {corpus}: run `DRAMATURG_HOME={home} make demo` first")
        return 2
    uri = (corpus / "diarization" / "lists" / "test.lst").read_text().split()[0]
    content = (corpus / "diarization" / "wav" / f"{uri}.wav").read_bytes()
    seconds = sf.info(corpus / "diarization" / "wav" / f"{uri}.wav").duration
    described = scene_context(corpus, uri)
    params = {"uri": uri, "min_segment_seconds": MIN_SEGMENT_SECONDS, "max_transcript_tokens": 24,
              **described}
    stack, _ = start_stack(home, gateway_port=0, say=lambda m: None)
    try:
        token = Path(stack.token_file).read_text().strip()
        targets = {p.service: f"127.0.0.1:{p.port}" for p in stack.processes}
        asyncio.run(enroll_cast(targets["speaker"], corpus))
        from dramaturg.evaluator.v1 import evaluator_pb2

        first = next(iter(described.get("characters", {}).values()), {})
        context = evaluator_pb2.RoleContext(local_scene=described.get("scene", "a scene"),
                                            char_profile=first.get("profile", "a character"),
                                            char_style=first.get("style", "not described"))
        run_job(stack.gateway, token, content, params)  # warm-up: every service's first request
        pids = {p.service: p.pid for p in stack.processes}
        start = cpu_seconds(pids)
        direct = [direct_scene(targets, content, context) for _ in range(repeat)]
        middle = cpu_seconds(pids)
        through = [run_job(stack.gateway, token, content, params)[1] for _ in range(repeat)]
        end = cpu_seconds(pids)
        cpu_direct, cpu_through = cpu_delta(start, middle, repeat), cpu_delta(middle, end, repeat)
        gateway_pid = pids["gateway"]
        rss_before = rss_mib(gateway_pid)
        began = time.perf_counter()
        if args.skip_load:
            jobs = 0
        with ThreadPoolExecutor(max(jobs, 1)) as pool:
            outcomes = list(pool.map(lambda _: run_job(stack.gateway, token, content, params), range(jobs)))
        wall = time.perf_counter() - began
        rss_after = rss_mib(gateway_pid)
    finally:
        stop_stack(home)
    finished = [o for o in outcomes if o[0] == "SUCCEEDED"]
    refused = [o for o in outcomes if o[0].startswith("refused")]
    latencies = [o[1] for o in finished]
    share = (statistics.fmean(through) - statistics.fmean(direct)) / statistics.fmean(through)
    services_direct = sum(v for k, v in cpu_direct.items() if k != "gateway")
    services_through = sum(v for k, v in cpu_through.items() if k != "gateway")
    cpu_share = cpu_through["gateway"] / (services_through + cpu_through["gateway"])
    result = {
        "bench": "gateway_load", "quick": args.quick, "scene": uri, "scene_seconds": round(seconds, 2),
        "direct_seconds": [round(x, 3) for x in direct], "job_seconds": [round(x, 3) for x in through],
        "gateway_share": round(share, 4),
        "cpu_seconds_per_scene": {"direct": cpu_direct, "through_gateway": cpu_through,
                                  "services_direct": round(services_direct, 3),
                                  "services_through_gateway": round(services_through, 3),
                                  "gateway_cpu_share": round(cpu_share, 4)},
        "load": {"jobs": jobs, "succeeded": len(finished), "refused": len(refused),
                 "other": [o for o in outcomes if o[0] != "SUCCEEDED" and not o[0].startswith("refused")],
                 "wall_seconds": round(wall, 1), "jobs_per_minute": round(60 * len(finished) / wall, 2),
                 "p50_seconds": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
                 "p95_seconds": round(float(np.percentile(latencies, 95)), 2) if latencies else None,
                 "gateway_rss_mib": [round(rss_before, 1), round(rss_after, 1)]},
    }
    print(f"scene {uri} ({seconds:.1f} s): direct {statistics.fmean(direct):.2f} s, one job "
          f"{statistics.fmean(through):.2f} s → gateway share {100 * share:.1f} %")
    print(f"CPU seconds per scene: services {services_direct:.2f} direct, {services_through:.2f} through "
          f"the gateway; the gateway {cpu_through['gateway']:.3f} → {100 * cpu_share:.2f} % of the stack's")
    load = result["load"]
    if jobs:
        print(f"{jobs} jobs at once: {load['succeeded']} succeeded, {load['refused']} refused at submit, "
              f"{len(load['other'])} other; {load['jobs_per_minute']} jobs/min, p50 {load['p50_seconds']} s, "
              f"p95 {load['p95_seconds']} s; gateway RSS {rss_before:.0f} → {rss_after:.0f} MiB")
    else:
        del result["load"]
    suffix = "_quick" if args.quick else "_share" if args.skip_load else ""
    write_result(result, args.out or f"gateway_load{suffix}.json")
    return 0 if not load.get("other") else 1


if __name__ == "__main__":
    raise SystemExit(main())
