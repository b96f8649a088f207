"""Evaluator GRPO: the rewards, the audio in every log-probability pass, and the recipe end to end.

The blind spot this guards: stock TRL computes GRPO's log-probabilities from ``input_ids`` alone for
an audio model (its extra model inputs are built for images only), so a trained evaluator would never
have looked at the audio. :class:`AudioGRPOTrainer`'s passes must change when the audio changes —
and the stock trainer's must not (if TRL ever carries audio itself, that test fails and says so).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from dramaturg.services.evaluator import model as evaluator
from dramaturg.services.evaluator.grpo import (
    AudioGRPOTrainer,
    accuracy_reward,
    format_reward,
    graded_reward,
    reward_functions,
)
from dramaturg.services.evaluator.prompts import build_prompt, user_messages
from dramaturg.services.evaluator.recipes import MONITORED, RECIPES
from dramaturg.services.evaluator.train import grpo_rows, score_histogram
from dramaturg.shared.store import ModelStore
from test_evaluator_train import RUN, SERVICE, corpus, inline_context, metric_series  # noqa: F401
from trl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECONDS = 2


def _clips(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"c{i}.wav": (0.1 * rng.standard_normal(16_000 * SECONDS)).astype(np.float32) for i in range(n)}


def _trainer(tmp_path: Path, cls: type = AudioGRPOTrainer, *, beta: float = 0.04,
             config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A GRPO trainer over a LoRA'd tiny evaluator and 4 rows (``config``: GRPOConfig overrides)."""
    from peft import get_peft_model

    model, processor = evaluator.build_tiny_evaluator(seed=0)
    model = get_peft_model(model, evaluator.lora_config(8, 16, 0.0))
    prompt = build_prompt("pitch_variation", "", detailed=False)
    rows = [{"prompt": prompt, "wav_path": f"c{i}.wav", "reference": i % 5 + 1} for i in range(4)]
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "grpo"), "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": 6, "max_steps": 2, "learning_rate": 1e-3, "use_cpu": True,
        "report_to": "none", "logging_steps": 1, "save_strategy": "no", "beta": beta,
        "remove_unused_columns": False, "disable_tqdm": True, "seed": 0,
    }
    args = GRPOConfig(**(settings | (config or {})))
    return cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
               reward_funcs=reward_functions(["format", "graded"]), **kwargs)


# ============================================================================================ rewards


def test_rewards_on_hand_made_completions() -> None:
    completions = ["<answer>3</answer>", " <answer> 5 </answer>\n", "<answer>1</answer> because", "three"]
    reference = [3, 4, 5, 2]
    assert accuracy_reward([], completions, reference) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward([], completions) == [1.0, 1.0, 0.0, 0.0]
    assert graded_reward([], completions, reference) == [1.0, 0.75, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": "<answer>2</answer>"}]]  # TRL's conversational completions
    assert graded_reward([], chat, [4]) == [0.5]
    with pytest.raises(ValueError, match="expected one or more of"):
        reward_functions(["accuracy", "vibes"])


def test_score_histogram_shows_a_collapse_to_the_middle() -> None:
    spread = score_histogram([1.2, 2.0, 3.1, 3.9, 4.6])
    collapsed = score_histogram([2.9, 3.0, 3.1, 3.2, 2.8])
    assert [spread[f"heldout/predicted/{k}"] for k in range(1, 6)] == [0.2, 0.2, 0.2, 0.2, 0.2]
    assert collapsed["heldout/predicted/3"] == 1.0 and collapsed["heldout/predicted_std"] < 0.2
    assert spread["heldout/predicted_std"] > 1.0


# ============================================================================ audio in every pass


def _logps(trainer: Any, clip: np.ndarray, audio_aware: bool) -> torch.Tensor:
    """The completion's log-probabilities for one fixed prompt + completion, given ``clip``."""
    processor = trainer.processing_class
    prompt = build_prompt("pitch_variation", "", detailed=False)
    text = processor.apply_chat_template(user_messages(prompt), add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text + "<answer>3</answer>"], audio=[clip], sampling_rate=16_000,
                      return_tensors="pt")
    completion = len(processor.tokenizer("<answer>3</answer>", add_special_tokens=False)["input_ids"])
    if audio_aware:
        trainer._audio_inputs = {"input_features": batch["input_features"],
                                 "feature_attention_mask": batch["feature_attention_mask"]}
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, batch["input_ids"], batch["attention_mask"], completion)
    trainer._audio_inputs = None
    return logps


def test_log_probabilities_change_with_the_audio(tmp_path: Path) -> None:
    clips = _clips(2)
    trainer = _trainer(tmp_path, clips=clips)
    a = _logps(trainer, clips["c0.wav"], audio_aware=True)
    again = _logps(trainer, clips["c0.wav"], audio_aware=True)
    b = _logps(trainer, clips["c1.wav"], audio_aware=True)
    assert torch.allclose(a, again)  # deterministic for the same audio
    assert (a - b).abs().max() > 1e-4  # the audio reaches the pass
    with pytest.raises(RuntimeError, match="audio-blind"):
        _logps(trainer, clips["c0.wav"], audio_aware=False)


def test_stock_trl_log_probabilities_are_audio_blind(tmp_path: Path) -> None:
    """What the subclass exists for: stock GRPOTrainer's pass gives the same numbers whatever the audio."""
    clips = _clips(2)
    stock = _trainer(tmp_path, GRPOTrainer)
    a = _logps(stock, clips["c0.wav"], audio_aware=False)
    b = _logps(stock, clips["c1.wav"], audio_aware=False)
    assert torch.equal(a, b)


def test_every_pass_of_a_training_step_runs_the_audio_encoder(tmp_path: Path) -> None:
    """Per step: generation and the reference pass (no grad), then the policy's loss pass (grad) —
    each one runs the audio tower on the batch's clips."""
    trainer = _trainer(tmp_path, clips=_clips(4), beta=0.04)
    calls: list[tuple[bool, int]] = []
    tower = evaluator.unwrap(trainer.model).model.audio_tower
    tower.register_forward_hook(lambda m, a, o: calls.append((torch.is_grad_enabled(), int(a[0].shape[0]))))
    trainer.train()
    assert calls == [(False, 4), (False, 4), (True, 4)] * 2


# ============================================================================== the recipe end to end


def test_grpo_rows_reward_the_rounded_rater_mean() -> None:
    item = {"id": "x", "wav_path": "a.wav", "char_profile": "p", "local_scene": "l", "char_style": "s",
            "annotations": {"pitch_variation": [2, 3, 3, 3, 4, 4], "emotion_accuracy": [1, 1, 2, 2, 2, 2]}}
    rows = grpo_rows([item], detailed=False, dimensions=["pitch_variation", "emotion_accuracy", "absent"])
    found = [(r["dimension"], r["reference"]) for r in rows]
    assert found == [("pitch_variation", 3), ("emotion_accuracy", 2)]


def test_grpo_recipe_from_an_sft_model_logs_rewards_and_publishes(
    corpus: Path, tmp_path: Path  # noqa: F811
) -> None:
    sft = inline_context(tmp_path, "sft", corpus, {**RUN, "max_steps": 16, "eval_every": 0,
                                                   "max_heldout_items": 1, "eval_at_start": False},
                         run_id="sft", output_model="evaluator-sft")
    RECIPES["sft"].run(sft)
    sft.close()
    overrides = {"item_set": "realism", "dimensions": RUN["dimensions"], "detailed": False,
                 "base_model": "evaluator-sft", "max_steps": 2, "batch_size": 4, "num_generations": 2,
                 "max_train_items": 2, "max_heldout_items": 2, "eval_every": 0, "lr": 1e-3,
                 "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "device": "cpu", "torch_threads": 1}
    ctx = inline_context(tmp_path, "grpo", corpus, overrides, run_id="grpo", output_model="evaluator-grpo")
    RECIPES["grpo"].run(ctx)
    ctx.close()
    rewards = metric_series(ctx.run_dir, "train/rewards/format_reward/mean")
    assert rewards and all(0.0 <= v <= 1.0 for v in rewards.values())
    shares = [metric_series(ctx.run_dir, f"heldout/predicted/{k}") for k in range(1, 6)]
    assert all(sorted(s) == [0, 2] for s in shares)
    assert math.isclose(sum(s[2] for s in shares), 1.0)
    record = ModelStore(tmp_path).resolve(SERVICE, "evaluator-grpo")
    assert record.labels["peft"] == "lora" and MONITORED in record.metrics
    evaluator.load_evaluator(record.path)


def test_grpo_refuses_a_batch_that_splits_a_group(corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    ctx = inline_context(tmp_path, "grpo", corpus, {"batch_size": 3, "num_generations": 2, "device": "cpu"})
    with pytest.raises(ValueError, match="multiple of num_generations"):
        RECIPES["grpo"].run(ctx)
    ctx.close()
