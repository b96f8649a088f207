"""The evaluator (Qwen2-Audio, Speech-DRAME-style): a tiny model built from configs that round-trips exactly,
Speech-DRAME's single-dimension prompts, expected-value scores over the digits 1..5 (checked against a
head whose answer distribution is known), one audio encoding shared by every dimension (equal to scoring
each dimension through the stock forward), an SFT collator whose loss is on the answer only, and one
TRL SFTTrainer + LoRA step that changes nothing but the adapters, none of which sit in the audio encoder."""

from __future__ import annotations

import copy
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from dramaturg.services.evaluator import model as evaluator
from dramaturg.services.evaluator import prompts, scoring
from dramaturg.services.evaluator.collate import IGNORE_INDEX, EvaluatorCollator
from dramaturg.services.evaluator.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, SPECIAL_TOKENS
from dramaturg.shared.data.prosody import ARCHETYPE_DIMENSIONS, REALISM_DIMENSIONS
from torch import nn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 16_000
# A row scored in a left-padded batch on the shared encoding vs through the stock forward alone (float
# sums in another order, attention over padding): observed ≤ 3e-7.
BATCH_TOLERANCE = 1e-5
# Hand-computed expected values vs float32 softmax arithmetic.
EXACT_TOLERANCE = 1e-5
# The answer distribution of the patched head (test_expected_score_of_a_known_head): P(1..5) and the mass.
KNOWN_DISTRIBUTION = (0.1, 0.2, 0.3, 0.25, 0.15)
KNOWN_MASS = 0.8


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    """Something audio-like at 16 kHz: a gliding tone with noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return evaluator.build_tiny_evaluator(seed=0)


@pytest.fixture(scope="module")
def items() -> dict[str, dict]:
    """A realism and an archetype item shaped like the synthetic corpus's JSONL, built from its plan."""
    from dramaturg.shared.data.config import SynthConfig
    from dramaturg.shared.data.plan import plan_corpus
    from dramaturg.shared.data.writers.speech_drame import local_scene

    plan = plan_corpus(SynthConfig())
    scene = plan.scenes[0]
    prev, turn = scene.turns[0], scene.turns[1]
    voice = turn.voice
    raters = [3, 4, 4, 2, 5, 3]
    role = {
        "id": "role-synth_v1_0001",
        "dataset_name": "ROLE",
        "local_scene": local_scene(turn, scene, prev),
        "char_age": voice.age,
        "char_style": voice.char_style,
        "char_profile": voice.char_profile,
        "transcript": turn.line.text,
        "wav_path": "wav/role/0001.wav",
        "annotations": {d: raters for d in REALISM_DIMENSIONS},
    }
    arche = {
        "id": "synth_en_0000",
        "dataset_name": "Arche",
        "question": f"You are {voice.name}. {turn.line.cue} Respond in a {turn.line.emotion} tone. You say:",
        "wav_path": "wav/arche/0000.wav",
        "annotations": {"content_pass": [True] * 6, **{d: raters for d in ARCHETYPE_DIMENSIONS}},
    }
    return {"role": role, "arche": arche}


def _known_head(model: nn.Module, digit_ids: tuple[int, ...]) -> nn.Module:
    """A copy of ``model`` whose LM head ignores the hidden state: logits = a bias with a known softmax.

    The digits get ``KNOWN_MASS × KNOWN_DISTRIBUTION``; the other tokens share the rest equally.
    """
    patched = copy.deepcopy(model)
    hidden, vocab = patched.lm_head.in_features, patched.lm_head.out_features
    head = nn.Linear(hidden, vocab, bias=True)
    probs = torch.full((vocab,), (1.0 - KNOWN_MASS) / (vocab - len(digit_ids)), dtype=torch.float64)
    probs[list(digit_ids)] = torch.tensor(KNOWN_DISTRIBUTION, dtype=torch.float64) * KNOWN_MASS
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(probs.log().float())
    patched.lm_head = head
    return patched


# ------------------------------------------------------------------------------- config, tokenizer


def test_tiny_model_config_tokenizer_and_window(tiny):
    model, processor = tiny
    tokenizer = processor.tokenizer
    config = model.config
    # the audio special tokens are single ids inside the vocabulary; the digits are single tokens
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert (
        config.audio_token_id == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) < config.text_config.vocab_size
    )
    assert config.image_token_id == config.audio_token_id  # for TRL's GRPOTrainer
    digits = scoring.digit_token_ids(tokenizer)
    assert len(set(digits)) == 5
    assert tokenizer.encode("<answer>4</answer>", add_special_tokens=False)[3] == digits[3]
    assert "<answer>" not in tokenizer.all_special_tokens
    assert tokenizer.eos_token == IM_END and tokenizer.bos_token is None
    # Qwen2-Audio-Instruct's chat layout
    text = processor.apply_chat_template(
        prompts.user_messages("Rate it."), add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"Audio 1: {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}\nRate it.<|im_end|>\n<|im_start|>assistant\n"
    )
    # audio_position last: the same turn with the clip after the prompt, saved with the processor
    last = copy.deepcopy(processor)
    evaluator.set_audio_position(last, "last")
    text_last = last.apply_chat_template(prompts.user_messages("Rate it."), add_generation_prompt=True,
                                         tokenize=False)
    assert text_last == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"Rate it.\nAudio 1: {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}<|im_end|>\n<|im_start|>assistant\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        last.save_pretrained(folder)
        loaded = evaluator.AutoProcessor.from_pretrained(folder)
        assert loaded.apply_chat_template(prompts.user_messages("Rate it."), add_generation_prompt=True,
                                          tokenize=False) == text_last
    evaluator.set_audio_position(last, "first")
    assert last.apply_chat_template(prompts.user_messages("Rate it."), add_generation_prompt=True,
                                    tokenize=False) == text
    evaluator.set_audio_position(last, "")  # keep the model's own
    assert last.chat_template == processor.chat_template
    with pytest.raises(ValueError, match="audio_position"):
        evaluator.set_audio_position(last, "middle")
    # the answer prefix tokenises the same alone and followed by the answer (scoring reads the next token)
    prefix = tokenizer.encode(text + "<answer>", add_special_tokens=False)
    full = tokenizer.encode(text + prompts.format_answer(3) + IM_END, add_special_tokens=False)
    assert full[: len(prefix)] == prefix and full[len(prefix)] == digits[2]
    # the 5 s window: the processor pads to exactly the encoder's input length; tokens follow the real length
    assert 2 * config.audio_config.max_source_positions == processor.feature_extractor.nb_max_frames == 500
    for seconds, tokens in ((2.0, 50), (8.0, 125)):  # 25 tokens a second; past 5 s the clip is cut
        batch = processor(text=[text], audio=[_clip(seconds)], sampling_rate=RATE, return_tensors="pt")
        assert int((batch["input_ids"] == config.audio_token_id).sum()) == tokens
        assert batch["input_features"].shape == (1, 128, 500)
    counts = evaluator.parameter_count(model)
    assert counts["other"] == 0 and 250_000 < counts["total"] < 500_000, counts


def test_prompts_follow_speech_drame_format(items):
    role, arche = items["role"], items["arche"]
    assert set(prompts.RUBRICS) == {*REALISM_DIMENSIONS, *ARCHETYPE_DIMENSIONS}
    text = prompts.item_prompt(role, "pitch_variation")
    assert text.startswith("Please evaluate the audio based on the following criteria:\n\nBased on the given")
    assert "\nDimension: PitchDynamics — " in text and "\n5: " in text and "\n1: " in text
    assert "\nExample output: 4\n\n" in text
    context = (
        f"Global Profile: {role['char_profile']}, Local Scene: {role['local_scene']}, "
        f"Available Traits: {role['char_style']}"
    )
    assert text.endswith(f"\n\n{context}\n\nOutput the answer in <answer> </answer>.")
    simple = prompts.item_prompt(role, "pitch_variation", detailed=False)
    assert "\n5: " not in simple and len(simple) < len(text)
    assert prompts.item_prompt(arche, "human_likeness").endswith(
        f"\n\n{arche['question']}\n\n{prompts.FRAME_CLOSE}"
    )
    assert prompts.item_dimensions(arche) == ARCHETYPE_DIMENSIONS
    with pytest.raises(ValueError):
        prompts.item_prompt(arche, "pitch_variation")
    assert prompts.parse_answer(prompts.format_answer(5)) == 5
    assert prompts.parse_answer("I think <answer> 2 </answer>.") == 2
    assert prompts.parse_answer("<answer>7</answer>") is None and prompts.parse_answer("4") is None
    rows = prompts.sft_examples([role, arche], rng=np.random.default_rng(0))
    assert len(rows) == len(REALISM_DIMENSIONS) + len(ARCHETYPE_DIMENSIONS)
    assert all(re.fullmatch(r"<answer>[2-5]</answer>", r["completion"]) for r in rows)  # raters gave 2..5


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip_gives_equal_logits(tiny, tmp_path: Path):
    model, processor = tiny
    evaluator.save_evaluator(model, processor, tmp_path / "saved")
    loaded, loaded_processor = evaluator.load_evaluator(tmp_path / "saved")
    text = processor.apply_chat_template(
        prompts.user_messages("Rate it."), add_generation_prompt=True, tokenize=False
    )
    batch = processor(text=[text], audio=[_clip(1.5)], sampling_rate=RATE, return_tensors="pt")
    reloaded_batch = loaded_processor(
        text=[text], audio=[_clip(1.5)], sampling_rate=RATE, return_tensors="pt"
    )
    assert all(torch.equal(batch[k], reloaded_batch[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.config.image_token_id == model.config.audio_token_id
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert not loaded.model.audio_tower.embed_positions.weight.requires_grad  # re-frozen after loading
    # the registry's writer: same seed, same weights
    evaluator.write_tiny_model(tmp_path / "written", seed=0)
    written, _ = evaluator.load_evaluator(tmp_path / "written")
    with torch.no_grad():
        assert torch.equal(written(**batch).logits, loaded(**batch).logits)
    assert not evaluator.production_available(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        evaluator.load_pretrained_evaluator(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- scoring


def test_score_logits_matches_hand_computation():
    digit_ids = (3, 4, 5, 6, 7)  # a 10-token vocabulary
    logits = torch.zeros(10)
    logits[list(digit_ids)] = torch.tensor([0.0, 0.0, math.log(2.0), math.log(4.0), 0.0])
    result = scoring.score_logits(logits[None], digit_ids)
    # digits' weights 1, 1, 2, 4, 1 (sum 9); five other tokens weigh 1 each: mass 9 / 14
    expected = (1 * 1 + 2 * 1 + 3 * 2 + 4 * 4 + 5 * 1) / 9
    assert float(result.score[0]) == pytest.approx(expected, abs=EXACT_TOLERANCE)
    assert result.distribution[0].tolist() == pytest.approx([1 / 9, 1 / 9, 2 / 9, 4 / 9, 1 / 9], abs=1e-6)
    assert float(result.digit_mass[0]) == pytest.approx(9 / 14, abs=1e-6)


def test_expected_score_of_a_known_head(tiny, items):
    model, processor = tiny
    digit_ids = scoring.digit_token_ids(processor.tokenizer)
    known = _known_head(model, digit_ids)
    results = scoring.score_item(known, processor, _clip(2.0), items["role"])
    expected = sum(k * p for k, p in zip(prompts.SCORES, KNOWN_DISTRIBUTION, strict=True))  # 3.15
    assert list(results) == list(REALISM_DIMENSIONS)
    for result in results.values():
        assert result.score == pytest.approx(expected, abs=EXACT_TOLERANCE)
        assert result.distribution == pytest.approx(KNOWN_DISTRIBUTION, abs=EXACT_TOLERANCE)
        assert result.digit_mass == pytest.approx(KNOWN_MASS, abs=EXACT_TOLERANCE)
        assert result.mode == 3
    # greedy generation after "<answer>" writes the same most likely digit
    encoding = scoring.encode_audio(known, processor, _clip(2.0))
    prompt = prompts.item_prompt(items["role"], "pitch_variation")
    answers = scoring.generate_answers(
        known, processor, encoding, [prompt], max_new_tokens=1, answer_prefix=True
    )
    assert answers == ["<answer>3"]


def test_digit_mass_is_a_probability(tiny, items):
    model, processor = tiny
    for item, seconds in ((items["role"], 3.0), (items["arche"], 0.7)):
        for result in scoring.score_item(model, processor, _clip(seconds), item, detailed=False).values():
            assert 0.0 <= result.digit_mass <= 1.0
            assert sum(result.distribution) == pytest.approx(1.0, abs=1e-6)
            assert 1.0 <= result.score <= 5.0


def test_dimensions_share_one_audio_encoding(tiny, items):
    model, processor = tiny
    clip, item = _clip(2.3, seed=1), items["role"]
    calls: list[tuple[int, ...]] = []
    hook = model.model.audio_tower.register_forward_hook(
        lambda m, args, out: calls.append(tuple(args[0].shape))
    )
    try:
        shared = scoring.score_item(model, processor, clip, item)
    finally:
        hook.remove()
    assert calls == [(1, 128, 500)]  # ten dimensions, one encoder pass over one clip
    digit_ids = scoring.digit_token_ids(processor.tokenizer)
    for dimension, result in shared.items():
        # the stock path: the processor expands the audio, the model encodes it again for this prompt alone
        messages = prompts.user_messages(prompts.item_prompt(item, dimension))
        text = (
            processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "<answer>"
        )
        batch = processor(text=[text], audio=[clip], sampling_rate=RATE, return_tensors="pt")
        with torch.no_grad():
            alone = scoring.score_logits(model(**batch).logits[:, -1], digit_ids)
        assert result.score == pytest.approx(float(alone.score[0]), abs=BATCH_TOLERANCE)
        assert result.distribution == pytest.approx(alone.distribution[0].tolist(), abs=BATCH_TOLERANCE)
        assert result.digit_mass == pytest.approx(float(alone.digit_mass[0]), abs=BATCH_TOLERANCE)
    # smaller language-model batches give the same scores
    chunked = scoring.score_item(model, processor, clip, item, batch_size=3)
    assert [r.score for r in chunked.values()] == pytest.approx([r.score for r in shared.values()], abs=1e-6)
    # plain generation on the shared encoding: its first digit-position token is the scoring argmax
    encoding = scoring.encode_audio(model, processor, clip)
    texts = [prompts.item_prompt(item, d) for d in REALISM_DIMENSIONS[:3]]
    inputs = scoring.embed_prompts(model, processor, encoding, texts, answer_prefix=True)
    with torch.no_grad():
        argmax = scoring.answer_logits(model, inputs).argmax(-1).tolist()
    generated = scoring.generate_answers(
        model, processor, encoding, texts, max_new_tokens=1, answer_prefix=True
    )
    assert generated == ["<answer>" + processor.tokenizer.decode([i]) for i in argmax]
    assert len(scoring.generate_answers(model, processor, encoding, texts, max_new_tokens=4)) == 3


def test_a_batch_of_requests_scores_as_each_alone(tiny, items):
    """Several clips of different lengths, each with its own prompts: one encoder pass for all of them,
    one language-model batch over every row, and each clip's scores those of :func:`score_item`."""
    model, processor = tiny
    clips = [_clip(seconds, seed=i) for i, seconds in enumerate((0.8, 2.3, 4.1))]
    cases = [(items["role"], REALISM_DIMENSIONS[:4]), (items["arche"], None),
             (items["role"], REALISM_DIMENSIONS)]
    prompts_per_clip = [[prompts.item_prompt(item, d) for d in (dims or prompts.item_dimensions(item))]
                        for item, dims in cases]
    calls: list[tuple[int, ...]] = []
    hook = model.model.audio_tower.register_forward_hook(
        lambda m, args, out: calls.append(tuple(args[0].shape))
    )
    try:
        batched = scoring.score_batch(model, processor, clips, prompts_per_clip)
    finally:
        hook.remove()
    assert calls == [(3, 128, 500)]  # three clips, one encoder pass
    for clip, (item, dims), result in zip(clips, cases, batched, strict=True):
        alone = scoring.score_item(model, processor, clip, item, dimensions=dims)
        assert result.score.tolist() == pytest.approx([r.score for r in alone.values()], abs=BATCH_TOLERANCE)
        assert result.digit_mass.tolist() == pytest.approx([r.digit_mass for r in alone.values()],
                                                           abs=BATCH_TOLERANCE)
    chunked = scoring.score_batch(model, processor, clips, prompts_per_clip, batch_size=4)
    assert [c.score.tolist() for c in chunked] == [
        pytest.approx(b.score.tolist(), abs=1e-6) for b in batched]


# ------------------------------------------------------------------------------------- SFT collator


def _sft_rows(items: dict[str, dict]) -> list[dict]:
    rows = prompts.sft_examples(
        [items["role"], items["arche"]],
        rng=np.random.default_rng(0),
        detailed=False,
        dimensions=["pitch_variation", "audio_quality"],
    )
    for i, row in enumerate(rows):
        row["audio"] = _clip(1.0 + 1.5 * i, seed=i)  # different lengths: different audio-token counts
    return rows


def test_collator_masks_prompt_and_audio_keeps_the_answer(tiny, items):
    model, processor = tiny
    rows = _sft_rows(items)
    batch = EvaluatorCollator(processor)(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    audio = ids == model.config.audio_token_id
    assert audio.sum(dim=1).tolist() == [25, 62]  # 1 s and 2.5 s
    for row, data in enumerate(rows):
        target = processor.tokenizer.encode(data["completion"] + IM_END, add_special_tokens=False)
        kept = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        end = int(mask[row].nonzero().max()) + 1
        assert kept.tolist() == list(range(end - len(target), end))  # exactly the answer's positions
        assert labels[row, kept].tolist() == ids[row, kept].tolist() == target
        assert processor.tokenizer.decode(labels[row, kept]) == data["completion"] + IM_END
    assert bool((labels[audio] == IGNORE_INDEX).all()) and bool((labels[mask == 0] == IGNORE_INDEX).all())
    # the model's loss is the cross-entropy of the answer tokens only
    with torch.no_grad():
        out = model(**batch)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != IGNORE_INDEX
    manual = nn.functional.cross_entropy(logits[keep], targets[keep])
    assert float(out.loss) == pytest.approx(float(manual), abs=1e-5)


def test_clip_contour_follows_a_known_glide_and_its_silence():
    """One octave up over 2 s, then 0.5 s of silence: voicing, F0 and level as ``clip_contour`` says."""
    from dramaturg.services.evaluator.probe import F0_SCALE_ST, clip_contour

    t = np.arange(2 * RATE) / RATE
    f0 = 150.0 * 2.0 ** (t / 2.0)  # 150 → 300 Hz
    tone = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / RATE)
    clip = np.concatenate([tone, np.zeros(RATE // 2)]).astype(np.float32)
    contour = clip_contour(clip, RATE, 300)  # 3 s of 10 ms frames: the last 0.5 s is past the clip
    assert contour.shape == (300, 3)
    assert np.isnan(contour[260:]).all()
    voicing, pitch, level = contour[:250, 0], contour[:250, 1], contour[:250, 2]
    assert voicing[20:180].min() == 1.0 and voicing[210:240].max() == 0.0
    rise = (np.nanmax(pitch[10:190]) - np.nanmin(pitch[10:190])) * F0_SCALE_ST
    assert rise == pytest.approx(12.0 * 180 / 200, abs=1.0)  # semitones covered by frames 10..190
    assert abs(float(np.nanmedian(pitch[:200]))) < 0.05  # relative to the clip's median F0
    assert np.isnan(pitch[210:240]).all()
    assert level[20:180].min() > 1.4 and level[210:240].max() == pytest.approx(-1.5)  # loudest vs floor


def test_token_contours_average_four_frames_and_mask_what_is_undefined():
    from dramaturg.services.evaluator.probe import token_contours

    nan = float("nan")
    frames = torch.tensor([[[1, 0.2, 1.0], [1, 0.4, 1.0], [0, nan, 0.0], [0, nan, 0.0],   # token 0
                            [1, 0.6, 0.5], [0, nan, 0.5], [0, nan, 0.5], [0, nan, 0.5],   # token 1
                            [nan, nan, nan]] * 1], dtype=torch.float32)                    # dropped
    mean, defined = token_contours(frames)
    assert mean.shape == defined.shape == (1, 2, 3)
    assert mean[0, 0].tolist() == pytest.approx([0.5, 0.3, 0.5])
    assert defined[0].tolist() == [[True, True, True], [True, False, True]]  # one voiced frame: no F0


def test_expected_score_loss_reads_the_logits_before_each_rows_digit():
    """Row 0 answers at position 3, row 1 at position 2 (and has a later digit too); the logits one
    position earlier give P(1..5) ∝ 1,1,1,1,0 (expected 2.5) and all on "5" (5); the loss is the mean
    squared error against scores 3 and 5 on the -1..1 scale."""
    from dramaturg.services.evaluator.probe import digit_positions, expected_score_loss

    digits = [5, 6, 7, 8, 9]
    labels = torch.tensor([[-100, -100, -100, 7, 2], [-100, -100, 9, 5, 1]])
    positions = digit_positions(labels, digits)
    assert positions.tolist() == [3, 2]
    logits = torch.zeros(2, 5, 10)
    logits[0, 2, digits] = torch.tensor([0.0, 0.0, 0.0, 0.0, -1e4])
    logits[0, 1, digits] = torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0])  # a decoy one position too early
    logits[1, 1, digits] = torch.tensor([-1e4, -1e4, -1e4, -1e4, 0.0])
    before = logits[torch.arange(2), positions - 1]
    loss = expected_score_loss(before, torch.tensor([0.0, 1.0]), digits)
    assert float(loss) == pytest.approx(((2.5 - 3.0) / 2.0) ** 2 / 2, abs=1e-6)
    with pytest.raises(ValueError, match="no digit"):
        digit_positions(torch.full((2, 5), -100), digits)


def test_clip_grouped_sampler_keeps_each_clips_rows_together_and_reshuffles():
    from dramaturg.services.evaluator.probe import ClipGroupedSampler

    ids = [f"clip{i // 4}" for i in range(40)]  # 10 clips × 4 dimensions
    sampler = ClipGroupedSampler(ids, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(sampler) == 40 and sorted(first) == sorted(second) == list(range(40))
    for order in (first, second):
        clips = [ids[i] for i in order]
        assert all(len(set(clips[k:k + 4])) == 1 for k in range(0, 40, 4))  # a clip's rows in a row
    assert first != second  # the clips are reshuffled every epoch
    sampler.set_epoch(1)
    assert list(sampler) == second  # an epoch's order is reproducible (a resumed run)


def test_collator_adds_each_clips_contour_when_asked(tiny, items):
    from dramaturg.services.evaluator.probe import clip_contour

    _, processor = tiny
    rows = _sft_rows(items)
    plain = EvaluatorCollator(processor)(rows)
    assert "contour_target" not in plain
    batch = EvaluatorCollator(processor, contours=True)(rows)
    frames = batch["input_features"].shape[-1]
    assert batch["contour_target"].shape == (len(rows), frames, 3)
    for row, data in enumerate(rows):
        expected = clip_contour(data["audio"], RATE, frames)
        assert np.array_equal(batch["contour_target"][row].numpy(), expected, equal_nan=True)


# --------------------------------------------------------------------------------------- LoRA, SFT


def test_lora_targets_the_language_model_only(tiny):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny
    adapted = evaluator.apply_lora(copy.deepcopy(model), rank=4, alpha=8, dropout=0.0)
    names = {n.split(".lora_A")[0] for n, _ in adapted.named_parameters() if ".lora_A." in n}
    assert names and not any("audio_tower" in n or "multi_modal_projector" in n for n in names)
    layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers  # q, k, v, o, gate, up, down in every decoder layer
    # scoring reads through the adapters: equal to the base model while lora_B is zero, different after
    clip, item = _clip(1.0), {"dataset_name": "Arche", "question": "You say:"}
    base_scores = [r.score for r in scoring.score_item(model, processor, clip, item).values()]
    assert [r.score for r in scoring.score_item(adapted, processor, clip, item).values()] == base_scores
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    assert [r.score for r in scoring.score_item(adapted, processor, clip, item).values()] != base_scores
    # the trap the anchored regex avoids: "all-linear" adapts the audio encoder's projections too
    everything = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear"))
    assert any("audio_tower" in n and ".lora_A." in n for n, _ in everything.named_parameters())


def test_one_sft_step_changes_only_adapters(tiny, items):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, processor = tiny
    adapted = evaluator.apply_lora(copy.deepcopy(model), rank=4, alpha=8, dropout=0.0)
    before = {name: p.detach().clone() for name, p in adapted.named_parameters()}
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=2,  # the first step moves only lora_B (it starts at zero), the second lora_A too
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = SFTTrainer(
            model=adapted,
            args=args,
            train_dataset=Dataset.from_list(_sft_rows(items)),
            data_collator=EvaluatorCollator(processor),
            processing_class=processor,
        )
        result = trainer.train()
    assert math.isfinite(result.training_loss)
    changed = {name for name, p in adapted.named_parameters() if not torch.equal(p.detach(), before[name])}
    lora = {name for name in before if ".lora_" in name}
    assert changed == lora


def test_grpo_trainer_accepts_the_model(tiny):
    """Only GRPOTrainer's construction: it reads ``config.image_token_id``, which Qwen2-Audio lacks (the
    builder sets it to the audio token). GRPO training on audio prompts is not checked here."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, processor = tiny
    rows = [{"prompt": prompts.user_messages("Rate it."), "audio": _clip(1.0)} for _ in range(2)]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            max_steps=1,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        GRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
            peft_config=evaluator.lora_config(rank=4),
        )


# ------------------------------------------------------------------------------------- prompt tuning


@pytest.fixture(params=["prompt", "prefix"])
def prompt_tuned(tiny, request):
    """The tiny evaluator with 6 learnt embeddings (prompt) or keys and values (prefix), moved off peft's
    random init so they matter."""
    from peft import get_peft_model

    model, processor = tiny
    tuned = get_peft_model(copy.deepcopy(model), evaluator.peft_config(request.param, virtual_tokens=6))
    with torch.no_grad():
        tuned.prompt_encoder["default"].embedding.weight.mul_(5.0)
    tuned.eval()
    return evaluator.hear_through_prompt_tuning(tuned), processor


def _answer_row(processor, item, dimension: str, audio: np.ndarray) -> dict[str, torch.Tensor]:
    prompt = prompts.item_prompt(item, dimension, detailed=False)
    row = {"prompt": prompt, "completion": "<answer>3</answer>", "audio": audio}
    return EvaluatorCollator(processor)([row])


def test_stock_prompt_tuning_is_deaf_and_the_hook_makes_it_hear(tiny, items):
    """peft's prompt tuning hands Qwen2-Audio ``inputs_embeds``, and Qwen2-Audio then drops the audio
    without a word (transformers 5.23, peft 0.21): this test keeps that observation honest. With
    :func:`hear_through_prompt_tuning` the audio is in the embeddings the soft prompt is put before."""
    from peft import get_peft_model

    model, processor = tiny
    stock = get_peft_model(copy.deepcopy(model), evaluator.peft_config("prompt", virtual_tokens=6)).eval()
    first = _answer_row(processor, items["role"], "pitch_variation", _clip(1.5, seed=0))
    second = {**first, "input_features": first["input_features"] * 0.0 + 0.5}
    with torch.no_grad():
        assert torch.equal(stock(**first).logits, stock(**second).logits)  # deaf
        evaluator.hear_through_prompt_tuning(stock)
        heard_first, heard_second = stock(**first).logits, stock(**second).logits
    assert heard_first.shape[1] == first["input_ids"].shape[1] + 6  # the soft prompt's positions first
    assert not torch.allclose(heard_first, heard_second, atol=1e-4)
    # with the hook, the text after the soft prompt is what the plain model sees: its embeddings, audio in
    embeds = evaluator.audio_inputs_embeds(model, first["input_ids"], first["input_features"],
                                           first["feature_attention_mask"])
    with torch.no_grad():
        plain = model(input_ids=first["input_ids"], input_features=first["input_features"],
                      feature_attention_mask=first["feature_attention_mask"],
                      attention_mask=first["attention_mask"]).logits
        from_embeds = model(inputs_embeds=embeds, attention_mask=first["attention_mask"]).logits
    torch.testing.assert_close(from_embeds, plain, atol=BATCH_TOLERANCE, rtol=0)


def test_scoring_a_prompt_tuned_model_reads_what_its_forward_predicts(prompt_tuned, items):
    """The service's scoring path (soft prompt or prefix put before the left-padded rows) gives the digit
    distribution that peft's own forward predicts after ``<answer>``, three prompts in one batch."""
    model, processor = prompt_tuned
    offset = 6 if evaluator.soft_prompt_kind(model) == "prompt" else 0  # a prefix adds no logits
    audio = _clip(1.5, seed=3)
    item = items["role"]
    dimensions = ["pitch_variation", "rhythmic_naturalness", "dynamic_range"]
    scored = scoring.score_item(model, processor, audio, item, dimensions=dimensions, detailed=False)
    digits = scoring.digit_token_ids(processor.tokenizer)
    for dimension in dimensions:
        row = _answer_row(processor, item, dimension, audio)
        with torch.no_grad():  # no labels: Qwen2-Audio's own loss trips over a prefix's longer mask
            logits = model(**{k: v for k, v in row.items() if k != "labels"}).logits[0]
        ids = row["input_ids"][0].tolist()
        digit_at = next(i for i in range(len(ids) - 1, -1, -1) if ids[i] in digits)
        expected = scoring.score_logits(logits[offset + digit_at - 1][None], digits)
        torch.testing.assert_close(torch.tensor(scored[dimension].distribution), expected.distribution[0],
                                   atol=BATCH_TOLERANCE, rtol=0)
    other = scoring.score_item(model, processor, _clip(2.5, seed=4), item, dimensions=dimensions,
                               detailed=False)
    assert any(abs(other[d].score - scored[d].score) > 1e-4 for d in dimensions)  # it hears the clip


def test_a_prompt_tuned_model_round_trips_as_base_plus_soft_prompt(prompt_tuned, items, tmp_path: Path):
    model, processor = prompt_tuned
    folder = evaluator.save_evaluator(model, processor, tmp_path / "prompt")
    assert (folder / evaluator.PROMPT_ADAPTER_DIR / "adapter_config.json").is_file()
    assert (folder / "config.json").is_file()  # the frozen base beside it
    loaded, loaded_processor = evaluator.load_evaluator(folder)
    assert evaluator.virtual_tokens(loaded) == 6
    audio = _clip(1.5, seed=5)
    before = scoring.score_item(model, processor, audio, items["role"], detailed=False)
    after = scoring.score_item(loaded, loaded_processor, audio, items["role"], detailed=False)
    for dimension, score in before.items():
        assert after[dimension].score == pytest.approx(score.score, abs=1e-6)


def test_generation_follows_the_soft_prompt_and_a_prefix_is_refused(prompt_tuned, items):
    """Greedy generation after ``<answer>`` from a prompt-tuned model writes the digit its scoring ranks
    first (both read the same positions); a prefix-tuned one refuses to generate, saying why."""
    model, processor = prompt_tuned
    encoding = scoring.encode_audio(model, processor, _clip(2.0))
    prompt = prompts.item_prompt(items["role"], "pitch_variation", detailed=False)
    if evaluator.soft_prompt_kind(model) == "prefix":
        with pytest.raises(ValueError, match="prefix-tuned evaluator"):
            scoring.generate_answers(model, processor, encoding, [prompt], max_new_tokens=1)
        return
    logits = scoring.answer_logits(model, scoring.embed_prompts(model, processor, encoding, [prompt],
                                                                answer_prefix=True))
    answer = scoring.generate_answers(model, processor, encoding, [prompt], max_new_tokens=1,
                                      answer_prefix=True)
    assert answer == ["<answer>" + processor.tokenizer.decode([int(logits[0].argmax())])]


# --------------------------------------------------------------------------------- prompt variations

VARIATIONS_FILE = Path(evaluator.__file__).with_name("prompt_variations.json")


def test_the_shipped_prompt_variations_load_in_speech_drames_layout():
    variations = prompts.load_prompt_variations(VARIATIONS_FILE)
    assert sorted(variations) == sorted(REALISM_DIMENSIONS)  # Speech-DRAME's keys mapped to the fields
    for dimension, texts in variations.items():
        assert len(texts) == 3 and len(set(texts)) == 3
        assert all(prompts.RUBRICS[dimension].name in text and "<answer>" in text for text in texts)


@pytest.mark.parametrize(("content", "message"), [
    ("{oops", "not readable JSON"),
    ('{"variations": {}}', "expected variations.dimension_prompts"),
    ('{"variations": {"dimension_prompts": [{"dimension_name": "charisma", "prompt_text": "x"}]}}',
     r"dimension_prompts\[0\] names dimension 'charisma'"),
    ('{"variations": {"dimension_prompts": [{"dimension_name": "pitch_variation", "prompt_text": " "}]}}',
     r"dimension_prompts\[0\] has no prompt_text"),
])
def test_a_malformed_variations_file_names_its_fault(content: str, message: str, tmp_path: Path):
    path = tmp_path / "variations.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        prompts.load_prompt_variations(path)


def test_variations_change_the_training_prompts_not_the_targets(items):
    """Rows of a dimension with variations are prompted with one of them (Speech-DRAME's RoleVariation
    layout: the block, then the context); the drawn targets are those of a run without variations."""
    role = items["role"]
    variations = {"pitch_variation": ("Wording A for pitch.", "Wording B for pitch.")}
    many = [dict(role, id=f"r{i}") for i in range(12)]
    plain = prompts.sft_examples(many, rng=np.random.default_rng(3), detailed=False)
    varied = prompts.sft_examples(many, rng=np.random.default_rng(3), detailed=False, variations=variations,
                                  variation_rng=np.random.default_rng(4))
    assert [r["completion"] for r in varied] == [r["completion"] for r in plain]
    used = set()
    for before, after in zip(plain, varied, strict=True):
        if after["dimension"] == "pitch_variation":
            wording = after["prompt"].split("\n\n")[0]
            assert wording in variations["pitch_variation"]
            assert after["prompt"] == f"{wording}\n\n{prompts.realism_context(role)}\n\n"
            used.add(wording)
        else:
            assert after["prompt"] == before["prompt"]
    assert used == set(variations["pitch_variation"])  # both wordings drawn over 12 rows
