"""The TTS model: a tiny CSM + Mimi codec + character tokenizer that builds from configs, round-trips
through save_pretrained/from_pretrained, trains (loss reaches backbone and depth decoder), takes LoRA
adapters that merge exactly, generates decodable codes, and streams audio equal to a whole decode."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dramaturg.services.tts import model as tts
from dramaturg.services.tts.codec_stream import CsmAudioStreamer, StreamingMimiDecoder
from dramaturg.services.tts.tokenizer import (
    AUDIO_EOS_TOKEN,
    AUDIO_TOKEN,
    VOCABULARY,
    build_tokenizer,
    reset_padding_state,
)
from transformers import AutoTokenizer, MimiModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CODEBOOK_SIZE = 64
NUM_CODEBOOKS = 8
FRAME = 1920  # samples per codec frame at 24 kHz / 12.5 Hz
STREAM_TOLERANCE = 1e-4  # streamed vs whole decode, relative to the whole decode's peak
MERGE_TOLERANCE = 1e-5  # LoRA merged vs unmerged logits


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return tts.build_tiny_tts_model(seed=0)


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Something audio-like at 24 kHz: a gliding tone with noise."""
    t = np.arange(int(seconds * tts.SAMPLE_RATE)) / tts.SAMPLE_RATE
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_small_round_trips_and_reloads(tmp_path: Path) -> None:
    tok = build_tokenizer()
    assert len(tok) == len(VOCABULARY) < 100
    text = "[0]hello, world! it's 9:30 - (really)?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    with_specials = tok(text)["input_ids"]
    assert with_specials[0] == tok.bos_token_id and with_specials[-1] == tok.eos_token_id
    # normalisation: case, accents, typography, whitespace runs
    assert (
        tok.decode(tok("Héllo  \u201cWorld\u201d", add_special_tokens=False)["input_ids"]) == 'hello "world"'
    )
    # the CSM tokens are single tokens, untouched by lower-casing
    marked = tok(f"[1]hi{AUDIO_TOKEN}{AUDIO_TOKEN}{AUDIO_EOS_TOKEN}", add_special_tokens=False)["input_ids"]
    assert marked[-3:] == [tok.audio_token_id, tok.audio_token_id, tok.convert_tokens_to_ids(AUDIO_EOS_TOKEN)]
    assert tok.pad_token_id != tok.audio_token_id
    assert tok("\u00df", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]

    tok(["a", "abc"], padding=True)  # leaves padding switched on in the backend …
    reset_padding_state(tok)  # … which save_tts_model clears before saving
    tok.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is None
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.audio_token == AUDIO_TOKEN and len(loaded) == len(tok)


# ------------------------------------------------------------------------------------------- model


def test_tiny_model_is_small_and_matches_its_codec(tiny) -> None:
    model, _ = tiny
    counts = tts.parameter_count(model)
    assert 200_000 < counts["total"] < 1_000_000, counts
    assert model.config.num_codebooks == model.config.codec_config.num_quantizers == NUM_CODEBOOKS
    assert model.config.codec_config.codebook_size == CODEBOOK_SIZE
    assert model.config.vocab_size == CODEBOOK_SIZE + 3
    assert model.config.codec_config.frame_size == FRAME
    assert tts.suppressed_codes(model) == [64, 65, 66]
    # the random codec's codebooks are not all zero (Mimi's initialisation), so codes decode apart
    codes = torch.arange(NUM_CODEBOOKS)[None, :, None].repeat(1, 1, 3) + torch.tensor([0, 7, 30])
    with torch.no_grad():
        audio = model.codec_model.decode(codes).audio_values[0, 0]
    assert audio.shape == (3 * FRAME,)
    assert not torch.allclose(audio[FRAME : 2 * FRAME], audio[2 * FRAME :], atol=1e-3)
    assert float(audio.abs().max()) < 2.0


def test_save_and_load_round_trip(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    tts.save_tts_model(model, processor, tmp_path)
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (tmp_path / name).exists(), name
    loaded, loaded_processor = tts.load_tts_model(tmp_path)
    assert type(loaded_processor).__name__ == "CsmProcessor"
    assert loaded.config.codec_config.codebook_size == CODEBOOK_SIZE

    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # weights, codec codebooks (buffers) included, bit for bit
        assert torch.equal(before[key], after[key]), key

    audio = _speech(0.5)
    inputs = tts.training_inputs(processor, "Round trip.", audio)
    again = tts.training_inputs(loaded_processor, "Round trip.", audio)
    for key in inputs:
        assert torch.equal(inputs[key], again[key]), key
    with torch.no_grad():
        out, out_loaded = model(**inputs), loaded(**again)
    torch.testing.assert_close(out.logits, out_loaded.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.depth_decoder_logits, out_loaded.depth_decoder_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, out_loaded.loss, rtol=0, atol=1e-6)


def test_write_tiny_model_is_deterministic(tmp_path: Path) -> None:
    tts.write_tiny_model(tmp_path / "a", seed=3)
    tts.write_tiny_model(tmp_path / "b", seed=3)
    tts.write_tiny_model(tmp_path / "c", seed=4)
    blobs = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert blobs["a"] == blobs["b"] != blobs["c"]
    assert (tmp_path / "a" / "chat_template.jinja").exists()


# ---------------------------------------------------------------------------------------- training


def test_training_forward_reaches_backbone_and_depth_decoder(tiny) -> None:
    model, processor = tiny
    model = copy.deepcopy(model).train()
    audio = _speech(0.4)
    inputs = tts.training_inputs(processor, "A line to learn.", audio, speaker=2)
    frames = int((inputs["input_ids"] == processor.audio_token_id).sum())
    assert frames == len(audio) // FRAME  # the processor's count agrees with the codec layout
    assert int((inputs["labels"] >= 0).sum()) == frames + 1  # every frame + the audio end
    out = model(**inputs)
    assert (
        torch.isfinite(out.loss)
        and torch.isfinite(out.backbone_loss)
        and torch.isfinite(out.depth_decoder_loss)
    )
    torch.testing.assert_close(out.loss, out.backbone_loss + out.depth_decoder_loss)
    out.loss.backward()
    for module in (
        model.backbone_model.layers[0].self_attn.q_proj,
        model.backbone_model.layers[-1].mlp.down_proj,
        model.depth_decoder.model.layers[0].self_attn.q_proj,
        model.depth_decoder.model.layers[-1].mlp.down_proj,
        model.lm_head,
        model.embed_text_tokens,
    ):
        assert module.weight.grad is not None and float(module.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.codec_model.parameters())  # the codec encodes under no_grad


def test_lora_merge_matches_unmerged(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    inputs = tts.training_inputs(processor, "Adapted.", _speech(0.4, seed=1))
    with torch.no_grad():
        base = model(**inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=tts.LORA_TARGET_MODULES, init_lora_weights=False
        )  # random B: the adapter changes the outputs, so merging has something to get wrong
        peft_model = get_peft_model(copy.deepcopy(model), config)
    targeted = {name for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert any(".backbone_model." in name for name in targeted)
    assert any(".depth_decoder." in name for name in targeted)
    assert not any("codec_model" in name for name in targeted)
    assert len(targeted) == 2 * 2 * 7  # 2 layers × (backbone, depth decoder) × 7 projections

    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(**inputs)
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(**inputs)
    assert float((unmerged.logits - base.logits).abs().max()) > 1e-3
    for name in ("logits", "depth_decoder_logits"):
        gap = float((getattr(merged, name) - getattr(unmerged, name)).abs().max())
        assert gap < MERGE_TOLERANCE, (name, gap)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())


# -------------------------------------------------------------------------------------- generation


def test_generate_emits_decodable_codes_and_audio_of_their_length(tiny) -> None:
    model, processor = tiny
    inputs = tts.prompt_inputs(processor, "Say something.", speaker=1)
    kwargs = tts.sampling_kwargs(model, temperature=1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=6, output_audio=True, return_dict_in_generate=True, **kwargs
        )
    codes = out.sequences
    assert codes.shape == (1, 6, NUM_CODEBOOKS)
    assert int(codes.min()) >= 0 and int(codes.max()) < CODEBOOK_SIZE
    assert out.audio[0].shape == (6 * FRAME,)
    assert torch.isfinite(out.audio[0]).all()

    # the trap the suppression avoids: an untrained head emits ids the codec cannot decode. None is
    # passed explicitly: CSM's generate keeps depth_decoder_* settings from the previous call.
    unsuppressed = {**kwargs, "suppress_tokens": None, "depth_decoder_suppress_tokens": None}
    torch.manual_seed(0)
    with torch.no_grad():
        raw = model.generate(**inputs, max_new_tokens=16, **unsuppressed)
    assert int(raw.max()) >= CODEBOOK_SIZE


def test_synthesize_is_seeded_and_leaves_the_global_rng_alone(tiny) -> None:
    model, processor = tiny
    state = torch.get_rng_state()
    audio, rate = tts.synthesize(model, processor, "Hello there.", speaker=1, max_new_frames=4, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    assert rate == tts.SAMPLE_RATE and audio.dtype == np.float32 and audio.shape == (4 * FRAME,)
    same, _ = tts.synthesize(model, processor, "Hello there.", speaker=1, max_new_frames=4, seed=7)
    other, _ = tts.synthesize(model, processor, "Hello there.", speaker=1, max_new_frames=4, seed=8)
    np.testing.assert_array_equal(audio, same)
    assert not np.allclose(audio, other)
    context = [(0, "Earlier line.", _speech(0.3, seed=2))]
    prompted, _ = tts.synthesize(
        model, processor, "Hello there.", speaker=1, max_new_frames=3, seed=7, context=context, temperature=0
    )
    assert prompted.shape == (3 * FRAME,)


# --------------------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def short_window_codec() -> MimiModel:
    """A codec whose transformer window (5 steps = 2.5 frames) is shorter than the test sequence."""
    model, _ = tts.build_tiny_tts_model(seed=1, codec_config=tts.tiny_mimi_config(sliding_window=5))
    return model.codec_model


@pytest.mark.parametrize(("chunk", "window"), [(1, "default"), (3, "default"), (8, "default"), (3, "short")])
def test_streamed_decode_equals_whole_decode(tiny, short_window_codec, chunk: int, window: str) -> None:
    codec = tiny[0].codec_model if window == "default" else short_window_codec
    generator = torch.Generator().manual_seed(chunk)
    codes = torch.randint(0, CODEBOOK_SIZE, (1, NUM_CODEBOOKS, 10), generator=generator)
    with torch.no_grad():
        whole = codec.decode(codes).audio_values
        naive = torch.cat(
            [codec.decode(codes[..., i : i + chunk]).audio_values for i in range(0, codes.shape[-1], chunk)],
            -1,
        )
    decoder = StreamingMimiDecoder(codec)
    parts = [decoder.decode(codes[..., i : i + chunk]) for i in range(0, codes.shape[-1], chunk)]
    assert all(p.shape[-1] == min(chunk, codes.shape[-1] - i * chunk) * FRAME for i, p in enumerate(parts))
    streamed = torch.cat(parts, dim=-1)
    assert streamed.shape == whole.shape == (1, 1, 10 * FRAME)
    peak = float(whole.abs().max())
    gap = float((streamed - whole).abs().max())
    assert gap < STREAM_TOLERANCE * peak, (gap, peak)
    # the test can fail: decoding the chunks independently (MimiModel.decode per chunk) is far off
    assert float((naive - whole).abs().max()) > 1e-2 * peak

    decoder.reset()  # a reset decoder starts a new utterance: the same audio again
    torch.testing.assert_close(
        torch.cat([decoder.decode(codes[..., :5]), decoder.decode(codes[..., 5:])], -1), streamed
    )


def test_streamer_in_generate_gives_the_returned_audio(tiny) -> None:
    model, processor = tiny
    chunks: list[tuple[int, int]] = []
    streamer = CsmAudioStreamer.for_model(
        model, chunk_frames=2, on_audio=lambda row, a: chunks.append((row, a.size))
    )
    audio, _ = tts.synthesize(model, processor, "Stream me.", max_new_frames=5, seed=1, streamer=streamer)
    assert streamer.ended
    assert chunks == [(0, 2 * FRAME), (0, 2 * FRAME), (0, FRAME)]
    streamed = streamer.audio(0)
    assert streamed.shape == audio.shape == (5 * FRAME,)
    assert float(np.abs(streamed - audio).max()) < STREAM_TOLERANCE * float(np.abs(audio).max())
    assert [(row, a.size) for row, a in streamer] == chunks  # the queue a serving thread would drain


def test_streamer_skips_the_prompt_and_stops_at_the_end_frame(tiny) -> None:
    codec = tiny[0].codec_model
    streamer = CsmAudioStreamer(codec, eos_code=0, chunk_frames=3)
    streamer.put(torch.tensor([[5, 6, 7, 8]]))  # the text prompt generate() hands over first
    frames = torch.randint(1, CODEBOOK_SIZE, (4, NUM_CODEBOOKS), generator=torch.Generator().manual_seed(0))
    for frame in frames:
        streamer.put(frame[None])
    streamer.put(torch.zeros(1, NUM_CODEBOOKS, dtype=torch.long))  # all-eos frame: the row ends
    streamer.put(frames[:1])  # ignored
    streamer.end()
    with torch.no_grad():
        whole = codec.decode(frames.T[None]).audio_values[0, 0].numpy()
    assert streamer.audio(0).shape == whole.shape == (4 * FRAME,)
    assert float(np.abs(streamer.audio(0) - whole).max()) < STREAM_TOLERANCE * float(np.abs(whole).max())
