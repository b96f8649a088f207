"""Audio-LLM speed: TTFT / TPOT and tokens a second in process and through the service, 1 / 8 clients,
with and without batching.

One model (the tiny SALMONN-lite, random weights: its answers are noise, its shapes are the embedded
default's), one 10-s clip, greedy decoding of ``TOKENS`` new tokens (the tiny model does not produce
its end token that soon, so every run decodes them all):

* **in process**: the model's own ``generate`` (the transformers path the service wraps) with the
  service's token-timing streamer: time to first token (encoders + prefill + one step), time per output
  token, wall time;
* **service**: ``Generate`` on ``dramaturg serve audiollm`` (its own process, the same weights) — one
  client (its latency over the in-process wall time: the service's overhead), then 8 concurrent clients
  with ``batching: false`` (one generation at a time) and ``batching: true`` (concurrent requests in one
  left-padded ``generate``): requests and tokens a second.

``python -m bench.audiollm_generate [--repeat N] [--quick]``; results in
``bench/results/audiollm_generate[_quick].json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import serve, write_result

TOKENS = 64
SECONDS = 10.0
RATE = 16_000


def clip() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS * RATE)) / RATE
    voiced = 0.3 * np.sin(2 * np.pi * 140 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = (voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    return np.round(np.clip(audio, -1, 1) * 32767) / 32767  # what a 16-bit WAV carries


def in_process(folder: Path, repeat: int) -> dict[str, Any]:
    import torch
    from dramaturg.services.audiollm.generation import TextDeltas
    from dramaturg.services.audiollm.model import load_audiollm
    from dramaturg.services.audiollm.prompt import TASK_INSTRUCTIONS

    model, processor = load_audiollm(folder)
    audio = clip().astype(np.float32)

    def once(tokens: int) -> tuple[float, float, float]:
        streamer = TextDeltas(processor.tokenizer)
        t0 = time.perf_counter()
        batch = processor(audio, TASK_INSTRUCTIONS["asr"])
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=tokens, do_sample=False, streamer=streamer,
                           pad_token_id=processor.tokenizer.pad_token_id)
        wall = time.perf_counter() - t0
        assert streamer.first_token_at is not None and streamer.last_token_at is not None
        tpot = (streamer.last_token_at - streamer.first_token_at) / max(len(streamer.ids) - 1, 1)
        return wall, streamer.first_token_at - t0, tpot

    once(4)  # warm-up
    runs = [once(TOKENS) for _ in range(repeat)]
    wall, ttft, tpot = (statistics.median(r[i] for r in runs) for i in range(3))
    return {"wall_seconds": round(wall, 4), "ttft_seconds": round(ttft, 4), "tpot_seconds": round(tpot, 5),
            "tokens_per_s": round(TOKENS / wall, 2), "runs": repeat}


def through_service(home: Path, repeat: int, batching: bool, clients: int) -> dict[str, Any]:
    import grpc
    from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc
    from dramaturg.common.v1 import common_pb2
    from dramaturg.shared.audio import Audio, encode_wav
    from dramaturg.shared.cli.stack import free_port

    config = home / f"audiollm-{batching}.yaml"
    config.write_text(f"batching: {str(batching).lower()}\nmax_batch_items: 8\nmax_wait_ms: 10\n"
                      "max_queue: 32\n")
    port = free_port()
    proc = serve("audiollm", home, port, config)
    try:
        target = f"127.0.0.1:{port}"
        request = audiollm_pb2.GenerateRequest(
            audio=common_pb2.AudioInput(content=encode_wav(Audio(clip().astype(np.float32), RATE))),
            task=audiollm_pb2.TRANSCRIBE,
            generation=audiollm_pb2.GenerationConfig(max_new_tokens=TOKENS))
        channel = grpc.insecure_channel(target)
        stub = audiollm_pb2_grpc.AudioLLMStub(channel)

        def one(_: int) -> tuple[float, Any]:
            t0 = time.perf_counter()
            reply = stub.Generate(request, timeout=600)
            return time.perf_counter() - t0, reply.usage

        one(0)  # warm-up
        solo = [one(0) for _ in range(repeat)]
        row: dict[str, Any] = {
            "one_client_seconds": round(statistics.median(s[0] for s in solo), 4),
            "one_client_ttft_seconds": round(statistics.median(s[1].time_to_first_token_seconds
                                                               for s in solo), 4),
            "one_client_tpot_seconds": round(statistics.median(s[1].time_per_output_token_seconds
                                                               for s in solo), 5),
        }
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(one, range(clients * repeat)))
        elapsed = time.perf_counter() - t0
        tokens = sum(d[1].completion_tokens for d in done)
        row[f"{clients}_clients"] = {
            "requests_per_s": round(len(done) / elapsed, 3), "tokens_per_s": round(tokens / elapsed, 2),
            "p50_latency_seconds": round(statistics.median(d[0] for d in done), 3),
            "p95_latency_seconds": round(float(np.percentile([d[0] for d in done], 95)), 3)}
        channel.close()
        return row
    finally:
        proc.kill()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    import torch
    from dramaturg.services.audiollm.model import write_tiny_model
    from dramaturg.shared.store import ModelStore

    parser = argparse.ArgumentParser(prog="python -m bench.audiollm_generate", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one run each: a smoke run, not a measurement")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = ModelStore(home)
        with store.create_version("audiollm", "tiny", architecture="tiny", base_model="",
                                  recipe="bench") as staging:
            write_tiny_model(Path(staging), home, seed=0)
        store.set_default("audiollm", "tiny")
        folder = Path(store.resolve("audiollm", "tiny").path)
        result: dict[str, Any] = {
            "bench": "audiollm_generate", "quick": args.quick, "device": "cpu", "tokens": TOKENS,
            "audio_seconds": SECONDS,
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                        "platform": platform.platform()},
            "in_process": in_process(folder, repeat),
        }
        result["service_unbatched"] = through_service(home, repeat, batching=False, clients=8)
        result["service_batched"] = through_service(home, repeat, batching=True, clients=8)
    local, plain, batched = result["in_process"], result["service_unbatched"], result["service_batched"]
    result["ratios"] = {
        "service_over_in_process_one_client": round(plain["one_client_seconds"] / local["wall_seconds"], 3),
        "batched_over_unbatched_tokens_per_s_8_clients": round(
            batched["8_clients"]["tokens_per_s"] / plain["8_clients"]["tokens_per_s"], 3),
    }
    print(f"in process: {local}")
    print(f"service, batching off: {plain}")
    print(f"service, batching on:  {batched}")
    print(f"ratios: {result['ratios']}")
    write_result(result, args.out or f"audiollm_generate{'_quick' if args.quick else ''}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
