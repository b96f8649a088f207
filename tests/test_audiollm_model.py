"""The audio LLM (SALMONN-lite): a tiny Whisper + BEATs → window Q-Former → Llama that builds from configs,
round-trips through save_pretrained/from_pretrained exactly, trains only the Q-Former, projection and
LoRA, drops all-padding windows, chunks audio longer than one Whisper window, and generates with the
library's generate (greedy equal to a hand-written loop, streamed text equal to the returned text)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dramaturg.services.audiollm import model as audiollm
from dramaturg.services.audiollm.encoders import (
    ConfiguredBEATs,
    beats_tokens,
    tiny_beats_config,
    tiny_whisper_config,
)
from dramaturg.services.audiollm.prompt import IGNORE_INDEX, TASK_INSTRUCTIONS, AudioLlmProcessor
from dramaturg.services.audiollm.qformer import tiny_qformer_config
from dramaturg.services.audiollm.tokenizer import AUDIO_TOKEN, SPECIAL_TOKENS, VOCAB_SIZE, build_tokenizer
from transformers import AutoModel, AutoProcessor, AutoTokenizer, LlamaForCausalLM, TextStreamer, WhisperModel
from transformers.generation.streamers import BaseStreamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 16_000
ASR = TASK_INSTRUCTIONS["asr"]
BATCH_TOLERANCE = 1e-5  # a row's logits in a left-padded batch vs alone (attention over padding, sums)
LIVELY_STD = 0.3  # weight scale that makes an untrained LM's greedy output vary (std 0.02 repeats one token)


@pytest.fixture(scope="module")
def tiny() -> tuple[audiollm.AudioLlmForConditionalGeneration, AudioLlmProcessor]:
    return audiollm.build_tiny_audiollm(seed=0)


@pytest.fixture(scope="module")
def lively(tiny) -> audiollm.AudioLlmForConditionalGeneration:
    """The tiny model with its LLM's matrices re-drawn larger: its greedy answers visit many tokens."""
    model = copy.deepcopy(tiny[0])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * LIVELY_STD)
    return model


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    """Something audio-like at 16 kHz: a gliding tone with noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def _windows(samples: int) -> int:
    """ceil(ceil(samples / 320) / 17): 0.34 s windows of 50 Hz frames that hold audio."""
    return math.ceil(math.ceil(samples / 320) / 17)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_small_deterministic_and_reloads(tmp_path: Path) -> None:
    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok.backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()  # same merges
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.audio_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    for text in (" Where were you all night, brother?", " Ünïcödé, 日本 & {braces}"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: any text comes back exactly
    ids = tok(f"USER: <Speech>{AUDIO_TOKEN}</Speech> {ASR}\nASSISTANT:")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.audio_token_id) == 1
    assert len(ids) < 30  # the prompt phrases were merged into few tokens
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded("a test")["input_ids"] == tok("a test")["input_ids"]
    assert loaded.audio_token == AUDIO_TOKEN
    # the tiny Llama's config without a tokenizer (from the constants) is the one built over it
    assert audiollm.tiny_llama_config().to_dict() == audiollm.tiny_llama_config(tok).to_dict()


# ------------------------------------------------------------------------------------- build & save


def test_tiny_model_parts_and_sizes(tiny) -> None:
    model, processor = tiny
    counts = audiollm.parameter_count(model)
    assert counts["other"] == 0 and 300_000 < counts["total"] < 1_000_000
    assert all(counts[part] > 0 for part in ("whisper", "beats", "qformer", "projection", "language_model"))
    config = model.config
    assert config.encoder_hidden_size == config.qformer_config.encoder_hidden_size == 64 + 64
    assert processor.audio_token_id == config.audio_token_id
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    assert tied["language_model.lm_head.weight"] == "language_model.model.embed_tokens.weight"
    assert tied["beats.encoder.layers.1.self_attn.relative_attention_bias.weight"].startswith(
        "beats.encoder.layers.0."
    )


def test_round_trip_reproduces_logits_exactly(tiny, tmp_path: Path) -> None:
    model, processor = tiny
    batch = processor([_clip(1.3), _clip(0.4, seed=1)], ASR)
    with torch.no_grad():
        before = model(**batch).logits
    audiollm.save_audiollm(model, processor, tmp_path / "m")
    loaded, loaded_processor = audiollm.load_audiollm(tmp_path / "m")
    again = loaded_processor([_clip(1.3), _clip(0.4, seed=1)], ASR)
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    with torch.no_grad():
        after = loaded(**again).logits
    assert torch.equal(before, after)
    # from_pretrained would have unfrozen the encoders (new parameters require grad) without apply_freezing
    assert not any(p.requires_grad for p in loaded.whisper.parameters())
    assert not any(p.requires_grad for p in loaded.beats.parameters())
    layers = loaded.beats.encoder.layers
    assert layers[1].self_attn.relative_attention_bias is layers[0].self_attn.relative_attention_bias
    assert loaded.language_model.lm_head.weight is loaded.language_model.get_input_embeddings().weight
    # the Auto classes find both, from the saved config and processor_config
    assert isinstance(
        AutoModel.from_pretrained(str(tmp_path / "m")), audiollm.AudioLlmForConditionalGeneration
    )
    assert isinstance(AutoProcessor.from_pretrained(str(tmp_path / "m")), AudioLlmProcessor)


def test_write_tiny_model_is_reproducible(tmp_path: Path) -> None:
    for name in ("a", "b"):
        audiollm.write_tiny_model(tmp_path / name, seed=0)
    for file in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_bfloat16_load_keeps_beats_in_float32(tiny, tmp_path: Path) -> None:
    audiollm.save_audiollm(*tiny, tmp_path)
    model, processor = audiollm.load_audiollm(tmp_path, dtype=torch.bfloat16)
    assert model.language_model.dtype == torch.bfloat16 and model.whisper.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.beats.parameters())  # speechbrain's fbank is float32
    with torch.no_grad():
        logits = model(**processor([_clip(0.7)], ASR)).logits
    assert torch.isfinite(logits.float()).all()


# -------------------------------------------------------------------------------------------- training


def test_training_forward_reaches_qformer_projection_and_lora_only(tiny) -> None:
    model, processor = tiny
    peft_model = audiollm.apply_lora(copy.deepcopy(model))
    peft_model.train()
    base = peft_model.get_base_model()
    assert not base.whisper.training and not base.beats.training  # frozen encoders keep eval mode
    assert base.speech_qformer.training
    batch = processor([_clip(1.0), _clip(0.5, seed=1)], ASR, ["I heard a bell.", "Nothing at all."])
    labels, ids = batch["labels"], batch["input_ids"]
    assert (labels[ids == processor.audio_token_id] == IGNORE_INDEX).all()
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    for row, answer in enumerate(["I heard a bell.", "Nothing at all."]):
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == processor.response_ids(answer) and kept[-1] == processor.tokenizer.eos_token_id
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters()}

    def nonzero(pattern: str) -> bool:
        hits = [g for name, g in grads.items() if re.search(pattern, name)]
        return bool(hits) and all(g is not None and g.abs().sum() > 0 for g in hits)

    assert nonzero(r"speech_projection\.modules_to_save\.default\.weight")
    assert nonzero(r"speech_qformer\.modules_to_save\.default\.query_tokens")
    assert nonzero(r"speech_qformer\.modules_to_save\.default\..*crossattention\.attention\.key\.weight")
    assert nonzero(r"speech_qformer\.modules_to_save\.default\.ln_(speech|audio)\.weight")
    assert nonzero(r"lora_B\.default\.weight")  # lora_A's gradient is zero at step 0: B starts at zero
    frozen = [name for name in grads if re.search(r"\.(whisper|beats)\.", name) or "base_layer" in name]
    assert frozen and all(grads[name] is None for name in frozen)
    assert all(grads[name] is None for name in grads if "embed_tokens" in name)


def test_lora_targets_no_encoder_module(tiny) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    def adapted(config: LoraConfig) -> list[str]:
        peft_model = get_peft_model(copy.deepcopy(tiny[0]), config)
        prefix = "base_model.model."
        return [n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]

    ours = adapted(audiollm.lora_config())
    layers = tiny[0].config.text_config.num_hidden_layers
    assert len(ours) == 4 * layers
    assert all(re.fullmatch(r"language_model\.model\.layers\.\d+\.self_attn\.[qkvo]_proj", n) for n in ours)
    # the trap the anchored regex avoids: "all-linear" and a bare q/k/v regex adapt the encoders too
    for careless in ("all-linear", r".*\.(q|k|v|o)_proj"):
        hit = adapted(LoraConfig(target_modules=careless))
        assert any(n.startswith(("whisper.", "beats.")) for n in hit), careless
    assert re.fullmatch(audiollm.LORA_TARGET_MODULES, "language_model.model.layers.27.self_attn.o_proj")
    assert not re.fullmatch(audiollm.LORA_TARGET_MODULES, "whisper.layers.0.self_attn.q_proj")


# ----------------------------------------------------------------------------------- windows, chunks


def test_windows_of_padding_are_dropped(tiny) -> None:
    model, processor = tiny
    long, short = _clip(2.0), _clip(0.5, seed=1)
    batch = processor([long, short], ASR)
    counts = (batch["input_ids"] == processor.audio_token_id).sum(dim=1).tolist()
    assert counts == [_windows(long.size), _windows(short.size)] == [6, 2]  # 100 and 25 frames, 17 a window
    assert (
        batch["attention_mask"].sum(dim=1).tolist()[0] - batch["attention_mask"].sum(dim=1).tolist()[1] == 4
    )
    with torch.no_grad():
        tokens, mask = model.encode_audio(
            batch["input_features"], batch["input_values"], batch["audio_lengths"]
        )
        assert tokens.shape[1] == 6 and mask.sum(dim=1).tolist() == [6, 2]
        assert (tokens[1, 2:] == 0).all()  # dropped windows never reach the Q-Former
        together = model(**batch).logits
        for row, clip in enumerate((long, short)):
            alone = model(**processor([clip], ASR)).logits[0]
            assert (together[row, -alone.shape[0] :] - alone).abs().max() < BATCH_TOLERANCE
        other = model(**processor([long, _clip(0.5, seed=7)], ASR)).logits
    assert (other[1] - together[1]).abs().max() > 1e-3  # the audio does reach the LLM


def test_more_queries_per_window() -> None:
    model, processor = audiollm.build_tiny_audiollm(seed=0, num_queries=2)
    batch = processor([_clip(1.0), _clip(0.3, seed=1)], ASR)
    assert (batch["input_ids"] == processor.audio_token_id).sum(dim=1).tolist() == [6, 2]  # 3 and 1 windows
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_audio_longer_than_one_whisper_window_is_chunked(tiny) -> None:
    model, processor = tiny
    window = model.config.max_source_positions  # 250 frames = 5 s for the tiny Whisper
    clip = _clip(6.3)
    batch = processor([clip, _clip(1.0, seed=1)], ASR)
    assert (
        batch["input_features"].shape[-1] == 2 * 2 * window and batch["input_values"].shape[-1] == 2 * 80_000
    )
    seen: list[int] = []
    handles = [
        model.whisper.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0])),
        model.beats.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0])),
    ]
    try:
        with torch.no_grad():
            _, mask = model.encode_audio(
                batch["input_features"], batch["input_values"], batch["audio_lengths"]
            )
    finally:
        for handle in handles:
            handle.remove()
    assert seen[:1] == [3]  # 2 chunks of the long clip + 1 of the short one (its 2nd chunk is skipped)
    assert mask[0].sum() == _windows(clip.size) == 19  # 315 frames: the prefix covers all 6.3 s
    assert (batch["input_ids"][0] == processor.audio_token_id).sum() == 19

    def audio_tokens(samples: np.ndarray) -> torch.Tensor:
        inputs = processor([samples], ASR)
        with torch.no_grad():
            return model.encode_audio(
                inputs["input_features"], inputs["input_values"], inputs["audio_lengths"]
            )[0][0]

    full = audio_tokens(clip)
    changed = clip.copy()
    changed[int(5.6 * RATE) :] = _clip(0.7, seed=3)
    late = audio_tokens(changed)
    first_chunk_windows = window // 17  # windows 0–13 lie inside the first chunk
    assert torch.equal(full[:first_chunk_windows], late[:first_chunk_windows])
    assert (full[-1] - late[-1]).abs().max() > 1e-4  # the last 0.7 s reach the last window
    prefix = audio_tokens(clip[: 5 * RATE])  # the first chunk alone: exactly one Whisper window
    assert torch.allclose(full[:first_chunk_windows], prefix[:first_chunk_windows], atol=1e-6)


def test_clips_of_a_few_samples_stay_finite(tiny) -> None:
    """A clip shorter than one BEATs fbank frame, and one a few samples into its second chunk: every
    key of such a chunk may be masked for BEATs, whose attention would then give NaN."""
    model, processor = tiny
    for samples in (1, 300, 80_000 + 100):
        clip = _clip(samples / RATE)
        batch = processor([clip, _clip(1.0, seed=1)], ASR)
        with torch.no_grad():
            tokens, mask = model.encode_audio(
                batch["input_features"], batch["input_values"], batch["audio_lengths"]
            )
            logits = model(**batch).logits
        assert mask[0].sum() == _windows(clip.size) and torch.isfinite(tokens).all(), samples
        assert torch.isfinite(logits).all(), samples


# ---------------------------------------------------------------------------------------- generation


def test_greedy_generate_equals_a_manual_greedy_loop(tiny, lively) -> None:
    processor = tiny[1]
    batch = processor([_clip(1.2)], ASR)
    steps = 12
    out = lively.generate(**batch, max_new_tokens=steps, do_sample=False)
    prompt = batch["input_ids"].shape[1]
    new = out[0, prompt:].tolist()
    assert len(set(new)) > 3  # a lively model: the comparison is not of one repeated token
    ids = batch["input_ids"]
    audio = {k: batch[k] for k in ("input_features", "input_values", "audio_lengths")}
    with torch.no_grad():
        for _ in range(len(new)):
            logits = lively(input_ids=ids, attention_mask=torch.ones_like(ids), **audio).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids[0, prompt:].tolist() == new
    # a left-padded batch generates what each row generates alone
    pair = processor([_clip(0.6, seed=2), _clip(1.2)], ASR)
    together = lively.generate(**pair, max_new_tokens=steps, do_sample=False)
    assert together[1, pair["input_ids"].shape[1] :].tolist() == new


class _Collect(TextStreamer):
    """A TextStreamer that keeps the text instead of printing it."""

    def __init__(self, tokenizer: object) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)


class _Ids(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_streamed_text_equals_generated_text(tiny, lively) -> None:
    processor = tiny[1]
    batch = processor([_clip(0.9, seed=4)], ASR)
    prompt = batch["input_ids"].shape[1]
    for streamer_cls in (_Collect, _Ids):
        streamer = streamer_cls(processor.tokenizer) if streamer_cls is _Collect else streamer_cls()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = lively.generate(**batch, max_new_tokens=16, do_sample=True, top_k=40, streamer=streamer)
        if isinstance(streamer, _Collect):
            text = processor.decode(out[0], prompt)
            assert text and "".join(streamer.pieces).strip() == text
        else:
            assert streamer.ended and streamer.puts[0] == batch["input_ids"][0].tolist()  # the prompt first
            assert [t for put in streamer.puts[1:] for t in put] == out[0, prompt:].tolist()


# ----------------------------------------------------------------------------------- production path


def test_assemble_from_pretrained_parts(tmp_path: Path) -> None:
    """The production assembly on tiny local parts: Whisper and Llama folders and a BEATs checkpoint
    file in the official layout (``cfg`` + ``model``), which speechbrain's own class loads too."""
    from speechbrain.lobes.models.beats import BEATs

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    WhisperModel(tiny_whisper_config()).save_pretrained(str(tmp_path / "whisper"))
    llm = LlamaForCausalLM(audiollm.tiny_llama_config(tokenizer))
    llm.save_pretrained(str(tmp_path / "llama"))
    tokenizer.save_pretrained(str(tmp_path / "llama"))
    cfg = tiny_beats_config()
    beats = ConfiguredBEATs(cfg).eval()
    torch.save({"cfg": cfg, "model": beats.state_dict()}, tmp_path / "beats.pt")

    official = BEATs(ckp_path=str(tmp_path / "beats.pt"))  # speechbrain: strict load of the same layout
    wav = torch.from_numpy(_clip(1.0))[None]
    lens = torch.tensor([1.0])
    assert torch.equal(official.extract_features(wav, lens)[0], beats.extract_features(wav, lens)[0])

    model, processor = audiollm.assemble_from_pretrained(
        beats_checkpoint=tmp_path / "beats.pt",
        whisper=tmp_path / "whisper",
        language_model=tmp_path / "llama",
        audio_token=AUDIO_TOKEN,
        qformer_config=tiny_qformer_config(128),
    )
    assert torch.equal(model.language_model.lm_head.weight, llm.lm_head.weight)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.beats.state_dict().values(), beats.state_dict().values(), strict=True)
    )
    assert not any(p.requires_grad for p in model.whisper.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(**processor([_clip(0.8)], ASR)).logits).all()


def test_production_preset_is_described_not_loaded() -> None:
    preset = audiollm.PRODUCTION_PRESET
    assert preset.whisper.startswith("openai/whisper-") and "Llama-3.2-3B" in preset.language_model
    assert "BEATs_iter3_plus_AS2M" in preset.beats_checkpoint and "cpt2" in preset.beats_checkpoint
    config = audiollm.AudioLlmConfig(
        whisper_config=tiny_whisper_config(num_mel_bins=128, max_source_positions=1500),
        qformer_config=audiollm.production_qformer_config(64 + 64),
    )
    processor = audiollm.build_processor(config)
    assert processor.chunk_samples == 30 * RATE and processor.feature_extractor.feature_size == 128
    # 30 s: 1,500 frames → 89 windows (SALMONN's unfold drops the last 4 frames and gives 88)
    assert processor.audio_tokens(30 * RATE) == 89
    # BEATs: 8 frequency patches per 160 ms → ~50 tokens a second, never more than Whisper's frames
    assert beats_tokens(30 * RATE) == 1496 and beats_tokens(5 * RATE) == 248
    saved = json.loads(config.to_json_string())
    assert saved["model_type"] == audiollm.MODEL_TYPE and saved["qformer_config"]["hidden_size"] == 768


# ------------------------------------------------------------------------------------------ CTC head


def test_ctc_targets_spell_transcripts_and_skip_other_items() -> None:
    rows = audiollm.ctc_targets(["Oh,  no -- Tom!", None, "a"])
    alphabet = audiollm.CTC_ALPHABET
    spelled = "".join(alphabet[i - 1] for i in rows[0].tolist() if i != IGNORE_INDEX)
    assert spelled == "oh no tom"
    assert (rows[1] == IGNORE_INDEX).all()
    assert rows[2, 0] == alphabet.index("a") + 1 and (rows[2, 1:] == IGNORE_INDEX).all()
    assert 0 not in rows  # 0 is the blank, never a target


def test_ctc_weight_adds_a_loss_that_trains_whisper_from_its_frames() -> None:
    """With ``ctc_weight`` the loss is the LM loss + weight × CTC on Whisper's frames; caption rows (all
    -100) add nothing; without a head, CTC labels are refused; the head round-trips."""
    model, processor = audiollm.build_tiny_audiollm(seed=0, use_beats=False, ctc_weight=0.5)
    audiollm.unfreeze(model, ["whisper"], lora=False)
    clips, texts = [_clip(1.0), _clip(0.8, seed=1)], ["I heard a bell.", "A low hum."]
    batch = processor(clips, ASR, texts)
    lm_loss = model(**batch).loss
    with_ctc = model(**batch, ctc_labels=audiollm.ctc_targets(texts))
    assert with_ctc.loss > lm_loss
    frames = model.encode_audio(
        batch["input_features"], None, batch["audio_lengths"], return_frames=True
    )[2:4]
    expected = lm_loss + 0.5 * model.ctc_loss(*frames, audiollm.ctc_targets(texts))
    torch.testing.assert_close(with_ctc.loss, expected)
    captions_only = model(**batch, ctc_labels=audiollm.ctc_targets([None, None]))
    torch.testing.assert_close(captions_only.loss, lm_loss)
    with_ctc.loss.backward()
    assert model.speech_ctc_head.weight.grad.abs().sum() > 0
    assert model.whisper.layers[0].fc1.weight.grad.abs().sum() > 0
    plain, _ = audiollm.build_tiny_audiollm(seed=0, use_beats=False)
    assert plain.speech_ctc_head is None
    with pytest.raises(ValueError, match="no CTC head"):
        plain(**batch, ctc_labels=audiollm.ctc_targets(texts))
    with pytest.raises(ValueError, match="needs Whisper"):
        audiollm.AudioLlmConfig(use_whisper=False, ctc_weight=0.5)


def test_query_ctc_weight_reads_the_qformer_tokens_the_llm_gets() -> None:
    model, processor = audiollm.build_tiny_audiollm(
        seed=0, use_beats=False, num_queries=8, ctc_weight=0.5, query_ctc_weight=0.25
    )
    clips, texts = [_clip(1.0), _clip(0.8, seed=1)], ["I heard a bell.", "A low hum."]
    batch = processor(clips, ASR, texts)
    targets = audiollm.ctc_targets(texts)
    _, token_mask, speech, frame_mask, queries = model.encode_audio(
        batch["input_features"], None, batch["audio_lengths"], return_frames=True
    )
    expected = (
        model(**batch).loss
        + 0.5 * model.ctc_loss(speech, frame_mask, targets)
        + 0.25 * model.ctc_loss(queries, token_mask, targets, model.query_ctc_head)
    )
    loss = model(**batch, ctc_labels=targets).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.query_ctc_head.weight.grad.abs().sum() > 0
    assert model.speech_qformer.query_tokens.grad.abs().sum() > 0
