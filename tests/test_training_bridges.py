"""The shared trainer bridges connect any training loop to the runner's RunContext the same way.

A tiny causal LM (Llama, 2 layers, hidden 32, built from a config with a byte-level tokenizer made
on the spot: nothing downloaded) trains a few steps through ``hf_bridge.RunContextCallback`` under a
plain transformers ``Trainer``, TRL's ``SFTTrainer`` (with a LoRA adapter) and TRL's ``GRPOTrainer``;
a toy Lightning module goes through ``lightning_bridge.LightningBridge``. Each run checks what the
runner relies on: progress events, metrics, checkpoints with the trainer's own state, the best
checkpoint by the monitored metric (min and max), a cancel that stops the loop without a partial
checkpoint, resume from the trainer's checkpoint, and publishing the best. A few seconds each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training import TRAINER_STATE_DIR, Monitor, RunContext, publish_best
from dramaturg.shared.training.runs import EVENTS_FILE, EventLog, RunRecord, save_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["hello world", "good night", "to be or not", "all the world", "a stage", "exit, pursued by a bear",
         "the play is the thing", "what light", "once more", "now is the winter", "friends", "out, spot"]
STEPS = 6
EVAL_EVERY = 2
# The scripted evaluation: step 4 is the lowest, step 2 the highest; at step 4 the run is cancelled.
SCORES = {2: 0.5, 4: 0.3, 6: 0.4}
CANCEL_AT = 4


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level tokenizer with no merges (one token per byte), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1, **{char: i + 2 for i, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def tiny_lm(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return LlamaForCausalLM(config)


def run_context(root: Path, attempt: int = 1) -> RunContext:
    """A RunContext without a worker (what the worker builds), reporting every step."""
    run_dir = root / "runs" / "toy" / "r"
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_id="r", service="toy", recipe="tiny-lm", run_dir=run_dir,
                       config={"keep_checkpoints": 3}, store_root=str(root), output_model="tiny",
                       architecture="llama", attempts=attempt)
    save_run(record)
    return RunContext(record, EventLog(run_dir / "events.jsonl", "r", attempt=attempt), ModelStore(root),
                      progress_interval=0.0)


def events(ctx: RunContext, kind: str, attempt: int | None = None) -> list[dict[str, Any]]:
    lines = (ctx.run_dir / EVENTS_FILE).read_text().splitlines()
    found = [e for e in map(json.loads, lines) if e["type"] == kind]
    return [e for e in found if attempt is None or e["attempt"] == attempt]


def progress_steps(ctx: RunContext, attempt: int | None = None) -> list[int]:
    """Reported steps in order, once each (``ctx.close()`` repeats the last one)."""
    return list(dict.fromkeys(e["step"] for e in events(ctx, "progress", attempt)))


def scripted(ctx: RunContext, scores: Mapping[int, float] = SCORES, cancel_at: int | None = CANCEL_AT,
             metric: str = "eval/score") -> Callable[[int, float], dict[str, float]]:
    """An evaluate function with known results that asks the run to stop at ``cancel_at`` (as a cancel
    or a shutdown does, through the worker's signal handler)."""

    def evaluate(step: int, epoch: float) -> dict[str, float]:
        if step == cancel_at:
            ctx.request_stop()
        return {metric: scores[step]} if step in scores else {}

    return evaluate


def bridge(ctx: RunContext, mode: str = "min", **kwargs: Any) -> Any:
    from dramaturg.shared.training.hf_bridge import RunContextCallback

    monitor = Monitor("eval/score", mode)
    return RunContextCallback(ctx, monitor=monitor, evaluate=scripted(ctx), eval_every=EVAL_EVERY,
                              best=monitor.best_of(ctx.checkpoints()), **kwargs)


def check_cancelled_run(ctx: RunContext, trainer: Any, best_step: int) -> None:
    """What every bridged run must leave: progress, metrics, checkpoints, the best, a clean cancel."""
    assert progress_steps(ctx) == list(range(1, CANCEL_AT + 2))  # stopped one step after the cancel
    assert {e["total_steps"] for e in events(ctx, "progress")} == {STEPS}
    assert trainer.state.global_step == CANCEL_AT + 1
    logged: dict[str, list[int]] = {}
    for event in events(ctx, "metrics"):
        for key in event["values"]:
            logged.setdefault(key, []).append(event["step"])
    assert {"loss/train", "lr", "grad_norm"} <= set(logged)
    assert logged["loss/train"] == list(range(1, CANCEL_AT + 2))
    assert logged["eval/score"] == [2, 4]
    checkpoints = ctx.checkpoints()
    assert [c.step for c in checkpoints] == [2, 4]  # none for the step the cancel cut short
    assert [c.checkpoint_id for c in checkpoints if c.best] == [f"step-{best_step:08d}"]
    for checkpoint in checkpoints:
        assert checkpoint.metrics == {"eval/score": SCORES[checkpoint.step]}
        state = json.loads((checkpoint.path / TRAINER_STATE_DIR / "trainer_state.json").read_text())
        assert state["global_step"] == checkpoint.step
        assert (checkpoint.path / TRAINER_STATE_DIR / "optimizer.pt").exists()
    scratch = Path(trainer.args.output_dir)
    assert not list(scratch.glob("checkpoint-*")), "the Trainer's checkpoints move into the run's"
    saved = [e["checkpoint"] for e in events(ctx, "checkpoint")]
    assert [c["step"] for c in saved] == [2, 4]


def check_published(ctx: RunContext, step: int) -> Path:
    record = publish_best(ctx, architecture="llama")
    assert record.labels["checkpoint_id"] == f"step-{step:08d}" and record.labels["step"] == str(step)
    assert record.metrics["eval/score"] == SCORES[step]
    assert not (record.path / TRAINER_STATE_DIR).exists(), "resume state is not part of the model"
    return record.path


# --------------------------------------------------------------------------------------- selection


def test_monitor_compares_by_mode_ties_and_missing_values() -> None:
    low, high, newer = Monitor("eer"), Monitor("acc", "max"), Monitor("der", ties_to_newer=True)
    assert low.improves(0.2, None) and low.improves(0.1, 0.2) and not low.improves(0.3, 0.2)
    assert high.improves(0.9, 0.5) and not high.improves(0.4, 0.5)
    assert not low.improves(0.2, 0.2) and newer.improves(0.2, 0.2)
    # nothing measured: every checkpoint is the best (the newest wins); once measured, never again
    assert low.improves(None, None) and not low.improves(None, 0.2)
    assert low.value({"eer": math.nan}) is None and low.value({}) is None and low.value({"eer": 1}) == 1.0
    with pytest.raises(ValueError, match="mode"):
        Monitor("eer", "lowest")


# -------------------------------------------------------------------------------- the Trainer bridge


def plain_trainer(tokenizer: Any, out: Path, callback: Any) -> Any:
    from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, attach
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                             logging_steps=1, learning_rate=1e-3, use_cpu=True, seed=0, **BRIDGE_ARGUMENTS)
    data = [{"input_ids": tokenizer(text).input_ids} for text in TEXTS]
    trainer = Trainer(model=tiny_lm(tokenizer), args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    return attach(trainer, callback)


@pytest.mark.parametrize(("mode", "best_step"), [("min", 4), ("max", 2)])
def test_trainer_reports_checkpoints_keeps_the_best_and_stops_on_cancel(
    tokenizer: Any, tmp_path: Path, mode: str, best_step: int
) -> None:
    from transformers.trainer_callback import PrinterCallback

    ctx = run_context(tmp_path)
    trainer = plain_trainer(tokenizer, tmp_path / "hf", bridge(ctx, mode))
    assert not any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    ctx.close()
    check_cancelled_run(ctx, trainer, best_step)
    folder = check_published(ctx, best_step)
    # the default artifact: save_pretrained of the model and its tokenizer, loadable as the service would
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert LlamaForCausalLM.from_pretrained(str(folder)).config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token == "<pad>"


def test_trainer_resumes_from_its_own_checkpoint(tokenizer: Any, tmp_path: Path) -> None:
    """A stopped run starts again from the last checkpoint's trainer state, not from step 0, and the
    best-so-far carries over (step 6's 0.4 does not beat step 4's 0.3)."""
    from dramaturg.shared.training.hf_bridge import resume_path

    first = run_context(tmp_path)
    plain_trainer(tokenizer, tmp_path / "hf", bridge(first)).train()
    first.close()
    second = run_context(tmp_path, attempt=2)
    latest = second.latest_checkpoint()
    assert latest is not None and latest[1] == CANCEL_AT
    resumed = bridge(second)
    assert resumed.best == SCORES[CANCEL_AT]
    resumed.evaluate_fn = scripted(second, cancel_at=None)
    trainer = plain_trainer(tokenizer, tmp_path / "hf", resumed)
    trainer.train(resume_from_checkpoint=resume_path(latest[0]))
    second.close()
    assert progress_steps(second, attempt=2) == [5, 6]
    assert [c.step for c in second.checkpoints()] == [2, 4, 6]
    assert [c.step for c in second.checkpoints() if c.best] == [4]
    check_published(second, 4)


def test_sft_trainer_with_a_lora_adapter(tokenizer: Any, tmp_path: Path) -> None:
    """TRL's SFTTrainer through the same callback; the checkpoint is the adapter, and TRL's own logs
    (token accuracy, entropy) arrive under the log prefix."""
    from datasets import Dataset, disable_progress_bars
    from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, attach
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    ctx = run_context(tmp_path)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=STEPS, per_device_train_batch_size=2,
                     logging_steps=1, learning_rate=1e-3, max_length=32, use_cpu=True, bf16=False, seed=0,
                     **BRIDGE_ARGUMENTS)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=tiny_lm(tokenizer), args=args, processing_class=tokenizer, peft_config=lora,
                         train_dataset=Dataset.from_dict({"text": TEXTS}))
    attach(trainer, bridge(ctx, log_prefix="train/"))
    trainer.train()
    ctx.close()
    check_cancelled_run(ctx, trainer, best_step=4)
    logged = {key for event in events(ctx, "metrics") for key in event["values"]}
    assert "train/mean_token_accuracy" in logged and "train/train_runtime" not in logged
    folder = check_published(ctx, 4)
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()


def test_grpo_trainer(tokenizer: Any, tmp_path: Path) -> None:
    """TRL's GRPOTrainer (generation + a reward) through the same callback; rewards become metrics."""
    from datasets import Dataset, disable_progress_bars
    from dramaturg.shared.training.hf_bridge import BRIDGE_ARGUMENTS, attach
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        return [float(completion.count("a")) for completion in completions]

    disable_progress_bars()
    ctx = run_context(tmp_path)
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=STEPS, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=4, logging_steps=1, learning_rate=1e-3,
                      use_cpu=True, bf16=False, seed=0, **BRIDGE_ARGUMENTS)
    trainer = GRPOTrainer(model=tiny_lm(tokenizer), args=args, reward_funcs=reward,
                          processing_class=tokenizer, train_dataset=Dataset.from_dict({"prompt": TEXTS}))
    attach(trainer, bridge(ctx, log_prefix="train/"))
    trainer.train()
    ctx.close()
    check_cancelled_run(ctx, trainer, best_step=4)
    logged = {key for event in events(ctx, "metrics") for key in event["values"]}
    assert {"train/reward", "train/completions/mean_length"} <= logged
    check_published(ctx, 4)


# ------------------------------------------------------------------------------ the Lightning bridge


def test_lightning_bridge(tmp_path: Path) -> None:
    """A toy regression through LightningBridge: progress per batch, epoch metrics, a checkpoint per
    epoch with Lightning's own state, the best by the monitored value, a cancel mid-epoch, and a
    resume from Lightning's checkpoint."""
    import lightning
    from dramaturg.shared.training.lightning_bridge import (
        BRIDGE_TRAINER_ARGS,
        LightningBridge,
        lightning_checkpoint,
    )

    class Toy(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss/train", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Cancelling(LightningBridge):
        cancel_after: int | None = None

        def on_train_epoch_end(self, trainer: lightning.Trainer, module: lightning.LightningModule) -> None:
            super().on_train_epoch_end(trainer, module)
            if trainer.current_epoch + 1 == self.cancel_after:
                self.ctx.request_stop()  # the next epoch stops after its first batch

    def write(folder: Path, module: lightning.LightningModule) -> None:
        torch.save(module.state_dict(), folder / "model.pt")

    torch.manual_seed(0)
    x = torch.randn(32, 2)
    dataset = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    data = torch.utils.data.DataLoader(dataset, batch_size=8)
    monitor = Monitor("loss/train")

    def fit(ctx: RunContext, cancel_after: int | None = None, resume: Path | None = None) -> Cancelling:
        best = monitor.best_of(ctx.checkpoints())
        bridge_ = Cancelling(ctx, write, monitor=monitor, extra_steps=10, best=best)
        bridge_.cancel_after = cancel_after
        trainer = lightning.Trainer(max_epochs=4, accelerator="cpu", callbacks=[bridge_],
                                    default_root_dir=str(tmp_path), **BRIDGE_TRAINER_ARGS)
        trainer.fit(Toy(), data, ckpt_path=str(lightning_checkpoint(resume)) if resume else None,
                    weights_only=False)
        ctx.close()
        return bridge_

    first = run_context(tmp_path)
    bridge_ = fit(first, cancel_after=2)
    assert {e["total_steps"] for e in events(first, "progress")} == {4 * 4 + 10}  # + the work after the fit
    assert progress_steps(first) == list(range(1, 10))  # epoch 3 stopped after its first batch
    checkpoints = first.checkpoints()
    assert [(c.step, c.epoch) for c in checkpoints] == [(4, 1.0), (8, 2.0)]  # none for the cut epoch
    losses = [c.metrics["loss/train"] for c in checkpoints]
    assert losses[1] < losses[0] and [c.step for c in checkpoints if c.best] == [8]
    assert all(lightning_checkpoint(c.path).exists() and (c.path / "model.pt").exists() for c in checkpoints)
    assert bridge_.best == pytest.approx(losses[1])

    second = run_context(tmp_path, attempt=2)
    fit(second, resume=checkpoints[-1].path)
    assert progress_steps(second, attempt=2) == list(range(9, 17))  # epochs 3 and 4, not from zero
    resumed = second.checkpoints()
    assert [c.epoch for c in resumed] == [2.0, 3.0, 4.0]  # the newest three (keep_checkpoints) and the best
    best = min(resumed, key=lambda c: c.metrics["loss/train"])
    assert [c.step for c in resumed if c.best] == [best.step] and best.step > 8
