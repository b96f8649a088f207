"""Checks that need a CUDA device (``make test-gpu``; skipped without one, never run by CI).

What only a GPU exercises: QLoRA's 4-bit base through bitsandbytes' CUDA kernels with bf16 compute,
GRPO in bf16 with the audio in every pass, the audio LLM's efficiency report from the CUDA allocator,
and the TTS streaming decoder against a whole decode under GPU arithmetic.

``DRAMATURG_TEST_CORPUS`` names a corpus folder to use instead of synthesising one (a GPU machine
without espeak-ng gets one written elsewhere by ``dramaturg data synth``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
from dramaturg.shared.store import ModelStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# the evaluator training tests' corpus, with generated sentences (the audio LLM reads the same corpus)
CORPUS = SynthConfig(seed=5, num_speakers=4, heldout_speakers=2, utterances_per_speaker=2, scenes_train=2,
                     scenes_dev=1, scenes_test=1, lines_per_scene=3, text_source="grammar")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("DRAMATURG_TEST_CORPUS")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("gpu-corpus")
    synthesize_corpus(out, CORPUS)
    return out


def test_evaluator_qlora_sft_runs_4bit_on_cuda_in_bf16(corpus: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from dramaturg.services.evaluator import model as evaluator
    from dramaturg.services.evaluator.train import build_model
    from test_evaluator_train import RUN, SERVICE, inline_context, metric_series

    overrides = {**RUN, "peft": "qlora", "bf16": True, "device": "cuda", "max_steps": 8, "eval_every": 4,
                 "max_heldout_items": 2, "lora_modules_to_save": [], "lr": 5e-3, "torch_threads": 0}
    ctx = inline_context(tmp_path, "sft", corpus, overrides, output_model="evaluator-qlora")
    model, _, _ = build_model(ctx, ctx.config, "cuda")
    linear = model.get_base_model().model.language_model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.device.type == "cuda"
    assert linear.weight.quant_state.quant_type == "nf4"
    del model
    torch.cuda.reset_peak_memory_stats()
    from dramaturg.services.evaluator.recipes import RECIPES

    RECIPES["sft"].run(ctx)
    ctx.close()
    loss = metric_series(ctx.run_dir, "loss/train")
    assert loss and all(math.isfinite(v) for v in loss.values())
    assert sorted(metric_series(ctx.run_dir, "heldout/digit_mass")) == [0, 4, 8]
    assert torch.cuda.max_memory_allocated() > 0
    record = ModelStore(tmp_path).resolve(SERVICE, "evaluator-qlora")
    published, _ = evaluator.load_evaluator(record.path)  # merged into the unquantised base: plain weights
    assert all(p.dtype == torch.float32 for p in published.parameters())
    base, _ = evaluator.build_tiny_evaluator(seed=0)
    changed = [n for n, p in published.named_parameters() if not torch.allclose(p, base.get_parameter(n))]
    assert changed and all(n.startswith("model.language_model.layers.") for n in changed)


def test_evaluator_grpo_in_bf16_on_cuda_runs_the_audio_in_every_pass(tmp_path: Path) -> None:
    from dramaturg.services.evaluator import model as evaluator
    from test_evaluator_grpo import _clips, _trainer

    trainer = _trainer(tmp_path, clips=_clips(4), beta=0.04, config={"use_cpu": False, "bf16": True})
    calls: list[tuple[bool, str]] = []
    tower = evaluator.unwrap(trainer.model).model.audio_tower
    tower.register_forward_hook(lambda m, a, o: calls.append((torch.is_grad_enabled(), a[0].device.type)))
    trainer.train()
    assert calls == [(False, "cuda"), (False, "cuda"), (True, "cuda")] * 2
    assert all(math.isfinite(float(e.get("loss", 0.0))) for e in trainer.state.log_history)


def test_audiollm_efficiency_on_cuda_reads_the_allocator(corpus: Path, dramaturg_home: Path,
                                                         tmp_path: Path) -> None:
    from dramaturg.services.audiollm import evaluate as ev
    from test_audiollm_server import publish_tiny

    publish_tiny(dramaturg_home, "tiny-gpu")
    out = tmp_path / "asr"
    argv = ["--mode", "valid_asr", "--model", "tiny-gpu", "--data", str(corpus), "--output", str(out),
            "--efficiency", "--max-new-tokens", "6", "--warmup", "1", "--no-progress", "--device", "cuda"]
    assert ev.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    efficiency = results["efficiency"]
    for key in ("ttft_seconds", "tpot_seconds"):
        assert 0 < efficiency[key]["p50"] <= efficiency[key]["p95"], key
    assert efficiency["peak_memory"]["bytes"] > 0
    assert "max_memory_allocated" in efficiency["peak_memory"]["measure"]
    assert results["scores"]["wer"] >= 0


def test_tts_streamed_decode_equals_whole_decode_on_cuda() -> None:
    from dramaturg.services.tts import model as tts
    from dramaturg.services.tts.codec_stream import StreamingMimiDecoder

    model, _ = tts.build_tiny_tts_model(seed=0)
    codec = model.codec_model.to("cuda").eval()
    config = codec.config
    codes = torch.randint(0, config.codebook_size, (1, config.num_quantizers, 12),
                          generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        whole = codec.decode(codes).audio_values
    decoder = StreamingMimiDecoder(codec)
    streamed = torch.cat([decoder.decode(codes[..., i : i + 3]) for i in range(0, 12, 3)], dim=-1)
    assert streamed.shape == whole.shape and streamed.device.type == "cuda"
    peak = float(whole.abs().max())
    assert float((streamed - whole).abs().max()) < 1e-3 * peak
