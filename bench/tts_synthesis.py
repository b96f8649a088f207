"""TTS speed: time to first audio, real-time factor in process and through the service, 1 / 8 clients.

One model, one text, one seed, a 10-s utterance (125 codec frames at 12.5 a second; the end-of-audio
code is suppressed so every run speaks the whole 10 s — an untrained model would otherwise stop at
random):

* **in process**: the model's own ``generate(..., output_audio=True)`` + decode (``model.synthesize``),
  wall time and RTF (seconds of compute per second of audio); and the same with the streaming decoder
  (``codec_stream.CsmAudioStreamer``, 2 frames a chunk): time to first audio, and its ratio to the whole
  synthesis (target ≤ 0.25);
* **service** (``--shapes tiny`` only): ``Synthesize`` and ``SynthesizeOnline`` on ``dramaturg serve tts``
  (its own process, the same weights): RTF, time to the first streamed chunk, and utterances per second
  at 1 and 8 concurrent clients.

``--shapes csm-1b`` builds CSM at sesame/csm-1b's shapes (a 1 B Llama backbone, a 4-layer depth
decoder over 32 codebooks, the full Mimi codec) with random weights — in process only, for a GPU.

``python -m bench.tts_synthesis [--shapes tiny|csm-1b] [--repeat N] [--quick]``; results in
``bench/results/tts_synthesis[_<shapes>][_quick].json``.
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

from bench.common import serve, write_result

TEXT = "The storm broke over the harbour, and every lantern on the quay went out at once."
FRAMES = 125  # 10 s at 12.5 frames a second
SEED = 1


def tiny_model(device: str) -> tuple[Any, Any]:
    from dramaturg.services.tts.model import build_tiny_tts_model

    model, processor = build_tiny_tts_model(seed=0)
    return model.to(device).eval(), processor


def csm_1b_shaped(device: str) -> tuple[Any, Any]:
    """CSM at csm-1b's shapes (transformers' CsmConfig defaults) with random bf16 weights and random
    Mimi codebooks; the tiny character tokenizer's ids stand in for Llama-3's."""
    import torch
    from dramaturg.services.tts.model import (
        AUDIO_EOS_TOKEN,
        AUDIO_TOKEN,
        build_processor,
        randomise_codebooks,
    )
    from dramaturg.services.tts.tokenizer import build_tokenizer
    from transformers import CsmConfig, CsmForConditionalGeneration

    tokenizer = build_tokenizer()
    config = CsmConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=None, audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
                       audio_eos_token_id=tokenizer.convert_tokens_to_ids(AUDIO_EOS_TOKEN))
    with torch.device(device):
        torch.manual_seed(0)
        model = CsmForConditionalGeneration(config)
    randomise_codebooks(model.codec_model)
    model = model.to(dtype=torch.bfloat16).eval()
    model.codec_model.float()  # the codec decodes in float32, as the service runs it
    return model, build_processor(tokenizer)


def no_end(model: Any) -> Any:
    """A logits processor that never lets the first codebook end the utterance."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    eos = int(model.config.codebook_eos_token_id)

    class NoEnd(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, eos] = -float("inf")
            return scores

    return LogitsProcessorList([NoEnd()])


def in_process(model: Any, processor: Any, repeat: int, device: str) -> dict[str, Any]:
    import torch
    from dramaturg.services.tts.codec_stream import CsmAudioStreamer
    from dramaturg.services.tts.model import synthesize

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    synthesize(model, processor, TEXT, max_new_frames=8, seed=SEED, logits_processor=no_end(model))  # warm-up
    whole, first, audio_seconds = [], [], 0.0
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        audio, rate = synthesize(model, processor, TEXT, max_new_frames=FRAMES, seed=SEED,
                                 logits_processor=no_end(model))
        sync()
        whole.append(time.perf_counter() - t0)
        audio_seconds = audio.size / rate
        arrived: list[float] = []
        streamer = CsmAudioStreamer.for_model(
            model, chunk_frames=2, on_audio=lambda row, a, _seen=arrived: _seen.append(time.perf_counter()))
        t0 = time.perf_counter()
        synthesize(model, processor, TEXT, max_new_frames=FRAMES, seed=SEED, streamer=streamer,
                   logits_processor=no_end(model))
        first.append(arrived[0] - t0)
    w, f = statistics.median(whole), statistics.median(first)
    return {"audio_seconds": round(audio_seconds, 3), "whole_seconds": round(w, 3),
            "rtf": round(w / audio_seconds, 4), "first_audio_seconds": round(f, 4),
            "first_over_whole": round(f / w, 4), "runs": repeat}


def through_service(repeat: int, clients: tuple[int, ...]) -> dict[str, Any]:
    import grpc
    from dramaturg.services.tts.model import write_tiny_model
    from dramaturg.shared.cli.stack import free_port
    from dramaturg.shared.store import ModelStore
    from dramaturg.tts.v1 import tts_pb2, tts_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = ModelStore(home)
        version = store.create_version("tts", "tiny", architecture="tiny", base_model="", recipe="bench")
        with version as staging:
            write_tiny_model(Path(staging), home, seed=0)
        store.set_default("tts", "tiny")
        port = free_port()
        proc = serve("tts", home, port)
        try:
            target = f"127.0.0.1:{port}"
            config = tts_pb2.SynthesisConfig(seed=SEED, max_new_tokens=FRAMES)
            request = tts_pb2.SynthesizeRequest(text=TEXT, config=config)

            def one(_: int) -> tuple[float, float, float]:
                with grpc.insecure_channel(target) as channel:
                    stub = tts_pb2_grpc.TextToSpeechStub(channel)
                    t0 = time.perf_counter()
                    reply = stub.Synthesize(request, timeout=600)
                    return time.perf_counter() - t0, reply.audio.duration_seconds, reply.generated_frames

            one(0)  # warm-up
            rows: dict[str, Any] = {}
            runs = [one(0) for _ in range(repeat)]
            wall = statistics.median(r[0] for r in runs)
            rows["synthesize_1_client"] = {"seconds": round(wall, 3), "audio_seconds": round(runs[0][1], 3),
                                           "frames": runs[0][2], "rtf": round(wall / runs[0][1], 4)}
            with grpc.insecure_channel(target) as channel:
                stub = tts_pb2_grpc.TextToSpeechStub(channel)
                firsts, totals = [], []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    chunks = [(time.perf_counter(), c) for c in stub.SynthesizeOnline(request, timeout=600)]
                    firsts.append(chunks[0][0] - t0)
                    totals.append(chunks[-1][0] - t0)
            first, whole = statistics.median(firsts), statistics.median(totals)
            rows["stream"] = {"first_chunk_seconds": round(first, 4), "whole_seconds": round(whole, 3),
                              "first_over_whole": round(first / whole, 4)}
            for n in clients:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    done = list(pool.map(one, range(n * repeat)))
                elapsed = time.perf_counter() - t0
                audio = sum(d[1] for d in done)
                rows[f"throughput_{n}_clients"] = {"utterances_per_s": round(len(done) / elapsed, 3),
                                                   "audio_seconds_per_s": round(audio / elapsed, 3)}
            return rows
        finally:
            proc.kill()
            proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.tts_synthesis", description=__doc__)
    parser.add_argument("--shapes", choices=("tiny", "csm-1b"), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one run each: a smoke run, not a measurement")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.shapes == "csm-1b" and not device.startswith("cuda"):
        print("tts_synthesis --shapes csm-1b: needs a CUDA device")
        return 0
    torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else args.repeat
    model, processor = (tiny_model if args.shapes == "tiny" else csm_1b_shaped)(device)
    parameters = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "bench": "tts_synthesis", "shapes": args.shapes, "quick": args.quick, "device": device,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "",
                    "platform": platform.platform()},
        "parameters": parameters, "text": TEXT, "frames": FRAMES,
        "in_process": in_process(model, processor, repeat, device),
    }
    del model
    if args.shapes == "tiny":
        result["service"] = through_service(repeat, (1, 8))
    local = result["in_process"]
    print(f"{args.shapes} ({parameters / 1e6:.1f} M parameters) on {device}: "
          f"a {local['audio_seconds']:.1f}-s utterance in {local['whole_seconds']:.2f} s "
          f"(RTF {local['rtf']:.3f}); first audio after {local['first_audio_seconds']:.3f} s = "
          f"{local['first_over_whole']:.3f} of the whole")
    for name, row in result.get("service", {}).items():
        print(f"  service {name}: {row}")
    suffix = ("" if args.shapes == "tiny" else f"_{args.shapes}") + ("_quick" if args.quick else "")
    write_result(result, args.out or f"tts_synthesis{suffix}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
