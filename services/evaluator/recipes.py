"""The evaluator recipes by name (``dramaturg.services.evaluator.recipes:RECIPES``), light for a server.

Speech-DRAME's DRAME-Eval recipe, run by the shared runner: supervised fine-tuning of Qwen2-Audio to
answer ``<answer>N</answer>`` to one-dimension prompts, on the corpus's Speech-DRAME JSONL
(``evaluator/{realism,archetype}_{train,test}.jsonl``).

* ``sft`` — TRL's ``SFTTrainer`` with the evaluator's collator (loss on the answer only). ``peft``
  chooses what trains, always in the language model only (the audio encoder and projector stay
  frozen): ``lora`` (peft LoRA on the attention and MLP projections), ``qlora`` (the same LoRA over a
  4-bit NF4 base, bitsandbytes), ``adalora`` (LoRA whose rank budget is pruned from 1.5 × ``lora_r``
  to ``lora_r`` during the run), ``ia3`` (learnt scales on keys, values and the MLP's down projection)
  ``prompt`` (``prompt_tokens`` learnt embeddings before every prompt), ``prefix`` (``prompt_tokens``
  learnt keys and values in every layer) — both with the model frozen, published as the base plus the
  soft prompt, which the loader wraps back with peft — or ``full`` (every weight but the encoder's
  frozen position table). ``target``
  picks each row's answer: ``per_rater`` (one rater's score
  drawn at random, as Speech-DRAME does) or ``mean`` (the raters' mean, rounded). Training aids for
  the random tiny model (``probe.py``): ``probe_weight`` > 0 (``peft: full``) adds the score probe's
  loss on the audio tokens, ``contour_weight`` > 0 (``peft: full``) its per-token pitch / voicing /
  level loss, ``score_weight`` > 0 the squared error of the expected score the service returns, and
  ``group_by_clip`` batches each clip's rows together. ``base_model`` ""
  trains the tiny evaluator (a random init; for tests and CPU checks), otherwise a model-store ref,
  folder or hub id.
* ``grpo`` — TRL's ``GRPOTrainer`` subclassed (``grpo.py``) so that the audio reaches generation and
  every log-probability pass; rewards ``accuracy``, ``format``, ``graded`` (1 − |Δ|/4) against the
  raters' rounded mean. Start it from an SFT model (``base_model``).

plus one recipe per ``presets/*.yaml`` (``cpu-quick``: the CPU learning check).

Every evaluation scores the held-out items (the writer's ``test`` split) on every dimension with the
expected value over the digits 1..5 and logs per dimension the MAE against the raters' mean and the
Spearman correlation with it; the mean Spearman over dimensions (``heldout/spearman``, higher is
better) picks the checkpoint that is published. The published model is always a standalone folder
that ``load_evaluator`` reads (LoRA merged into the weights): see ``train.py``.

The training code (``train``, ``data``: torch, transformers, trl, peft) is imported by the worker
when a recipe runs.
"""

from __future__ import annotations

from typing import Any

from dramaturg.shared.training.presets import LazyRecipe, presets_dir, recipes_with_presets

PRESETS_DIR = presets_dir(__file__)
PEFT_METHODS = ("lora", "qlora", "adalora", "ia3", "prompt", "prefix", "full")
TARGETS = ("per_rater", "mean")
ITEM_SETS = ("realism", "archetype", "both")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MONITORED = "heldout/spearman"
ARCHITECTURE = "qwen2-audio"
SFT = "dramaturg.services.evaluator.train:run_sft"
GRPO = "dramaturg.services.evaluator.train:run_grpo"

COMMON_DEFAULTS: dict[str, Any] = {
    # --- model
    "base_model": "",  # "": the tiny evaluator (random); else a model-store ref, folder or hub id
    # the tiny evaluator's sub-configs, field by field, as the audio LLM's `model:` section: {audio_config:
    # {encoder_layers: 4, d_model: 128}, text_config: {hidden_size: 128}}; ignored when base_model names one
    "model": {},
    # --- data
    "item_set": "both",  # realism | archetype | both
    "dimensions": [],  # only these dimensions ([]: every dimension of each item)
    "detailed": True,  # the detailed rubric prompts (False: the simple ones)
    # a JSON file of prompt wordings in Speech-DRAME's prompt_variations.json layout: each training row
    # is prompted with one drawn for its dimension (held-out scoring and serving keep the standard
    # prompt). "" off; services/evaluator/prompt_variations.json is a worked example
    "prompt_variations": "",
    # where the clip goes in the user turn: first (Speech-DRAME's order) | last (after the prompt) | ""
    # (the base model's own template); saved with the model's processor (model.set_audio_position)
    "audio_position": "",
    "target": "per_rater",  # per_rater | mean
    "max_train_items": 0,  # > 0: only the first N training items
    "max_heldout_items": 0,  # > 0: only the first N held-out items are scored
    # --- optimisation
    "lr": 5e-5,
    "schedule": "cosine",
    "warmup": 0.05,  # < 1: share of the steps; >= 1: steps
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_steps": 300,
    "batch_size": 4,
    "gradient_accumulation": 1,
    "bf16": False,
    "gradient_checkpointing": False,
    # DeepSpeed through the Trainer: "" off | zero1 | zero2 | zero3 (shared/training/zero_configs, in
    # Speech-DRAME's ZeRO stages) | the path of a DeepSpeed JSON; ZeRO-3 gathers the weights to publish
    "deepspeed": "",
    # --- LoRA (peft lora)
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    # modules trained in full beside the adapters (peft ``modules_to_save``): the random tiny model needs
    # ["lm_head"] (its head caps the logits; LoRA alone plateaus near ln(vocab)); [] for a pretrained one
    "lora_modules_to_save": [],
    # --- prompt learning (peft prompt | prefix): learnt virtual positions before every prompt
    "prompt_tokens": 20,
    # --- evaluation and checkpoints
    "eval_every": 50,
    "eval_at_start": True,  # score the model before training (step 0)
    "log_every": 5,
    # --- system
    "device": "auto",  # auto | cpu | cuda
    "torch_threads": 0,  # CPU threads for torch (0: torch's default)
    # data-parallel processes (GPUs, or CPU processes over gloo): the runner starts the attempt under
    # torchrun (shared/training/distributed.py); batch_size is per process; rank 0 scores and publishes
    "nproc_per_node": 1,
    "seed": 0,
}

SFT_DEFAULTS: dict[str, Any] = {
    "peft": "lora",  # lora | qlora | adalora | ia3 | full
    # > 0: the score probe's loss on the audio tokens (probe.py; a from-scratch model, peft full only)
    "probe_weight": 0.0,
    # > 0: the probe's per-token pitch/voicing/level loss (probe.py, "Contours"; peft full only)
    "contour_weight": 0.0,
    # > 0: squared error of the expected score (what the service returns) against the raters' mean
    "score_weight": 0.0,
    # batches keep each clip's rows (one per dimension) together (probe.py ClipGroupedSampler)
    "group_by_clip": False,
}

GRPO_DEFAULTS: dict[str, Any] = {
    "peft": "lora",
    "lr": 1e-5,
    "max_steps": 200,
    "batch_size": 8,  # completions per step: a multiple of num_generations
    "num_generations": 4,  # completions sampled per prompt (one GRPO group)
    "max_completion_length": 16,  # tokens; <answer>N</answer> and the end of the turn fit
    "temperature": 1.0,
    "beta": 0.04,  # KL to the reference (the start model)
    "num_iterations": 1,
    "loss_type": "dapo",  # TRL's default
    "rewards": ["accuracy", "format", "graded"],
    "reward_weights": [],  # [] = 1 each
}


def _base_recipes() -> list[LazyRecipe]:
    return [
        LazyRecipe(
            "sft",
            "SFT of Qwen2-Audio to answer <answer>N</answer> per dimension (peft: lora | full)",
            {**COMMON_DEFAULTS, **SFT_DEFAULTS},
            SFT,
            architecture=ARCHITECTURE,
        ),
        LazyRecipe(
            "grpo",
            "GRPO of an SFT evaluator with audio in every pass (rewards accuracy, format, graded)",
            {**COMMON_DEFAULTS, **GRPO_DEFAULTS},
            GRPO,
            architecture=ARCHITECTURE,
        ),
    ]


RECIPES: dict[str, LazyRecipe] = recipes_with_presets(_base_recipes(), PRESETS_DIR)
