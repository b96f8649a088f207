"""The evaluator at Qwen2-Audio-7B's shapes with random weights, on a GPU: items/s and peak memory.

Nothing is downloaded: the model is ``Qwen2AudioForConditionalGeneration`` built from the production
preset's shapes (a Whisper-large-v3 encoder, 32 × 1280, 30-s window; a 32-layer, 4096-wide Qwen2 with a
156,032-entry vocabulary) with random bf16 weights, straight on the device. The tiny model's tokenizer
and chat template stand in for Qwen's (every id stays inside the big vocabulary), so the prompts are the
service's prompts with other token ids: the work per item — one 30-s-window encoder pass, then the
language model over every dimension's prompt — is the production model's.

Measured, one item at a time, on the same synthetic 3-4 s utterances as ``evaluator_items``:

* all ten realism dimensions in one pass (one encoding, ten prompts in one batch: ``score_item``) vs
  one pass per dimension (ten encodings, ten one-prompt passes) — items/s and latency;
* eight requests as the service's batcher hands them to the model (``score_batch``: eight clips in
  one encoder pass, their eighty prompts in one language-model batch) — items/s, latency per batch;
* peak GPU memory (``torch.cuda.max_memory_allocated``) of each, with the weights' own size.

``python -m bench.evaluator_production_shapes [--items N] [--quick]``; results in
``bench/results/evaluator_production_shapes[_quick].json``. Needs CUDA (``make test-gpu``'s machine).
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

from bench.common import write_result
from bench.evaluator_items import Item, summary

PRODUCTION_AUDIO = {"encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                    "d_model": 1280, "max_source_positions": 1500}
PRODUCTION_TEXT = {"vocab_size": 156_032, "hidden_size": 4096, "intermediate_size": 11_008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}


def production_shaped(device: str) -> tuple[Any, Any]:
    """A random bf16 Qwen2-Audio at the 7 B preset's shapes on ``device``, and a 30-s-window processor."""
    import torch
    from dramaturg.services.evaluator.model import (
        PRODUCTION_WINDOW_SECONDS,
        _set_generation_defaults,
        build_processor,
        check_window,
        evaluator_config,
        tiny_audio_config,
        tiny_text_config,
    )
    from dramaturg.services.evaluator.tokenizer import build_tokenizer
    from transformers import Qwen2AudioForConditionalGeneration

    tokenizer = build_tokenizer()
    config = evaluator_config(tokenizer, audio_config=tiny_audio_config(**PRODUCTION_AUDIO),
                              text_config=tiny_text_config(tokenizer, **PRODUCTION_TEXT))
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    _set_generation_defaults(model, tokenizer)
    model.eval()
    processor = build_processor(tokenizer, window_seconds=PRODUCTION_WINDOW_SECONDS)
    check_window(model, processor)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    import torch
    from dramaturg.services.evaluator.prompts import DIMENSIONS, REALISM, item_prompt
    from dramaturg.services.evaluator.scoring import score_batch, score_item

    parser = argparse.ArgumentParser(prog="python -m bench.evaluator_production_shapes", description=__doc__)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a few items: a smoke run, not a measurement")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("evaluator_production_shapes: needs a CUDA device (7 B parameters in bf16: about 16 GB)")
        return 0
    device = "cuda"
    n = 4 if args.quick else args.items
    started = time.perf_counter()
    model, processor = production_shaped(device)
    built = time.perf_counter() - started
    weights = torch.cuda.memory_allocated()
    parameters = sum(p.numel() for p in model.parameters())
    warm = 5  # one item of each length first: new shapes pick their kernels once
    items = [Item(i, 3.0 + (i % 5) / 5) for i in range(n + warm)]
    dimensions = DIMENSIONS[REALISM]

    def one_pass(item: Item) -> None:
        score_item(model, processor, item.audio, item.item, detailed=True)

    def per_dimension(item: Item) -> None:
        for dimension in dimensions:
            score_item(model, processor, item.audio, item.item, dimensions=[dimension], detailed=True)

    def batched(group: list[Item]) -> None:
        prompts = [[item_prompt(item.item, d, detailed=True) for d in dimensions] for item in group]
        score_batch(model, processor, [item.audio for item in group], prompts)

    rows = {}
    for name, fn in (("one pass, all dimensions", one_pass), ("one pass per dimension", per_dimension)):
        for item in items[:warm]:  # warm-up (kernels, allocator), not timed
            fn(item)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        latencies = []
        began = time.perf_counter()
        for item in items[warm:]:
            t0 = time.perf_counter()
            fn(item)
            torch.cuda.synchronize()
            latencies.append(time.perf_counter() - t0)
        rows[name] = summary(n, time.perf_counter() - began, latencies) | {
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    group = 8  # what the service's batcher hands the model from 8 concurrent requests
    for item_group in (items[:group],):  # warm-up
        batched(item_group)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    latencies, began = [], time.perf_counter()
    timed = items[warm:]
    for start in range(0, len(timed) - group + 1, group):
        t0 = time.perf_counter()
        batched(timed[start : start + group])
        torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
    done = group * len(latencies)
    rows[f"{group} requests batched"] = summary(done, time.perf_counter() - began, latencies) | {
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "latency_is": "per batch"}
    ratio = rows["one pass, all dimensions"]["items_per_s"] / rows["one pass per dimension"]["items_per_s"]
    result = {
        "bench": "evaluator_production_shapes",
        "quick": args.quick,
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "model": {"parameters": parameters, "dtype": "bfloat16", "weights_gib": round(weights / 2**30, 2),
                  "built_seconds": round(built, 1), "window_seconds": 30, "dimensions": len(dimensions)},
        "items": n,
        "rows": rows,
        "one_pass_over_per_dimension": round(ratio, 2),
        "batched_over_one_pass": round(rows[f"{group} requests batched"]["items_per_s"]
                                       / rows["one pass, all dimensions"]["items_per_s"], 2),
    }
    for name, row in rows.items():
        print(f"{name:28s} {row['items_per_s']:8.2f} items/s  p50 {row['p50_ms']:8.1f} ms  "
              f"p95 {row['p95_ms']:8.1f} ms  peak {row['peak_gib']:6.2f} GiB")
    print(f"{parameters / 1e9:.2f} B parameters, weights {weights / 2**30:.2f} GiB; one pass / per dimension "
          f"{ratio:.2f}×; {group} batched / one pass {result['batched_over_one_pass']:.2f}×")
    write_result(result, args.out or f"evaluator_production_shapes{'_quick' if args.quick else ''}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
