"""Speaker Embed: dynamic batching vs none at 1/8/32 clients, and gRPC overhead vs in-process.

Both servers run the same encoder (the store's default speaker model, or a production-size ECAPA-TDNN
with SpeechBrain's VoxCeleb configuration when ``--model ecapa-voxceleb``) on the same utterances:

* throughput (utterances/s) of ``Speaker.Embed`` with the shared dynamic batcher on and off, at 1, 8
  and 32 concurrent clients — the ratio is what batching buys (target ≥ 4× at 32 clients on a GPU);
* the gRPC path (decode, validate, batch, serialise) against ``SpeakerEncoder.embed`` called in
  process on the same 8 s utterances, one at a time (target ≤ 5 % overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf

RATE = 16_000
ECAPA_VOXCELEB = {
    "architecture": "ecapa",
    "n_mels": 80,
    "embedding_dim": 192,
    "lobe": {
        "channels": [1024, 1024, 1024, 1024, 3072],
        "kernel_sizes": [5, 3, 3, 3, 1],
        "dilations": [1, 2, 3, 4, 1],
        "attention_channels": 128,
        "res2net_scale": 8,
        "se_channels": 128,
    },
}


def utterance(seed: int, seconds: float) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = np.sin(2 * np.pi * (120 + 40 * rng.random()) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    x = (0.3 * x + rng.normal(0, 0.02, len(t))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Server:
    """A speaker service on loopback in a thread of its own (its own event loop)."""

    def __init__(self, home: Path, batching: bool) -> None:
        from dramaturg.services.speaker.config import SpeakerSettings
        from dramaturg.services.speaker.server import SpeakerService
        from dramaturg.shared.config import ServerSettings

        settings = SpeakerSettings(
            batching=batching,
            max_batch_size=32,
            max_wait_ms=5.0,
            max_queue=4096,
            server=ServerSettings(port=0, drain_notice_seconds=0),
        )
        self.service = SpeakerService(settings, home=home)
        self.ready = threading.Event()
        self.port = 0
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

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
        self.ready.wait(300)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def throughput(port: int, clients: int, requests: list[bytes]) -> float:
    from dramaturg.common.v1 import common_pb2
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [speaker_pb2_grpc.SpeakerStub(c) for c in channels]

    def work(i: int) -> None:
        stub = stubs[i % clients]
        audio = common_pb2.AudioInput(encoding=common_pb2.WAV, content=requests[i])
        stub.Embed(speaker_pb2.EmbedRequest(audio=[audio]), timeout=600)

    work(0)  # warm
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, range(len(requests))))
    elapsed = time.perf_counter() - began
    for c in channels:
        c.close()
    return len(requests) / elapsed


def overhead(port: int, encoder, clips: list[bytes], repeats: int) -> tuple[float, float]:
    from dramaturg.common.v1 import common_pb2
    from dramaturg.speaker.v1 import speaker_pb2, speaker_pb2_grpc

    waves = [sf.read(io.BytesIO(c), dtype="float32")[0] for c in clips]
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = speaker_pb2_grpc.SpeakerStub(channel)
        local, remote = [], []
        for r in range(repeats + 1):
            for clip, wave in zip(clips, waves, strict=True):
                t0 = time.perf_counter()
                encoder.embed([wave])
                t1 = time.perf_counter()
                stub.Embed(
                    speaker_pb2.EmbedRequest(
                        audio=[common_pb2.AudioInput(encoding=common_pb2.WAV, content=clip)]
                    ),
                    timeout=600,
                )
                t2 = time.perf_counter()
                if r:  # the first round warms both paths
                    local.append(t1 - t0)
                    remote.append(t2 - t1)
    return statistics.median(local), statistics.median(remote)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        default="ecapa-voxceleb",
        choices=["ecapa-voxceleb", "store"],
        help="production-size ECAPA (untrained weights: speed only) or the store's default",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="utterance length for throughput")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench/results/speaker_embed.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 64
    import torch
    from dramaturg.shared.store import ModelStore
    from dramaturg.shared.voice.encoder import SpeakerEncoder, SpeakerEncoderConfig, build_encoder

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = ModelStore(home)
        if args.model == "store":
            source = ModelStore(Path(os.environ.get("DRAMATURG_HOME", "~/.dramaturg")).expanduser())
            record = source.resolve("speaker", "")
            store.publish_folder(
                "speaker",
                record.name,
                record.path,
                architecture=record.architecture,
                base_model=record.base_model,
                recipe=record.recipe,
            )
        else:
            torch.manual_seed(0)
            encoder = build_encoder(SpeakerEncoderConfig(**ECAPA_VOXCELEB))
            with store.create_version(
                "speaker",
                "ecapa-voxceleb-size",
                architecture="ecapa",
                base_model="speechbrain/spkrec-ecapa-voxceleb (config only)",
                recipe="bench",
            ) as staging:
                encoder.save_pretrained(staging)
        store.set_default("speaker", store.list(service="speaker")[0].name)
        record = store.resolve("speaker", "")
        encoder = SpeakerEncoder.from_pretrained(str(record.path)).eval()
        requests = [utterance(i, args.seconds) for i in range(args.requests)]
        rows = []
        for batching in (False, True):
            with Server(home, batching) as server:
                for clients in (1, 8, 32):
                    n = requests if clients > 1 else requests[: max(16, len(requests) // 8)]
                    rows.append(
                        {
                            "batching": batching,
                            "clients": clients,
                            "utt_per_s": round(throughput(server.port, clients, n), 2),
                        }
                    )
                    print(
                        f"batching={batching!s:<5} clients={clients:<3} {rows[-1]['utt_per_s']:8.2f} utt/s",
                        flush=True,
                    )
                if not batching:
                    clips = [utterance(1000 + i, 8.0) for i in range(4)]
                    local, remote = overhead(server.port, encoder, clips, repeats=2 if args.quick else 5)
        ratio = {
            c: next(r["utt_per_s"] for r in rows if r["batching"] and r["clients"] == c)
            / next(r["utt_per_s"] for r in rows if not r["batching"] and r["clients"] == c)
            for c in (1, 8, 32)
        }
        result = {
            "model": record.ref,
            "architecture": record.architecture,
            "device": str(encoder.device),
            "cpu_threads": torch.get_num_threads(),
            "utterance_seconds": args.seconds,
            "rows": rows,
            "batching_speedup": {str(k): round(v, 2) for k, v in ratio.items()},
            "grpc_overhead_8s": {
                "in_process_s": round(local, 4),
                "grpc_s": round(remote, 4),
                "overhead": round(remote / local - 1, 4),
            },
        }
    print("\n| clients | no batching (utt/s) | batching (utt/s) | speed-up |\n|---|---|---|---|")
    for c in (1, 8, 32):
        off = next(r["utt_per_s"] for r in rows if not r["batching"] and r["clients"] == c)
        on = next(r["utt_per_s"] for r in rows if r["batching"] and r["clients"] == c)
        print(f"| {c} | {off} | {on} | {ratio[c]:.2f}× |")
    o = result["grpc_overhead_8s"]
    print(
        f"\ngRPC vs in-process, 8 s utterances: {o['grpc_s'] * 1000:.1f} ms "
        f"vs {o['in_process_s'] * 1000:.1f} ms → overhead {o['overhead']:+.1%}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
