"""The audio-LLM recipes by name (``dramaturg.services.audiollm.recipes:RECIPES``), light for the server.

SALMONN's two training stages, run by the shared runner on SALMONN annotation JSON (the synthetic
corpus's ``audiollm/annotation_{train,test}.json``: ``path`` / ``task`` / ``text`` items):

* ``stage1`` — speech / audio pre-training: ASR and audio captioning (``asr``, ``audiocaption_v2``)
  with SALMONN's fixed task prompts; trains the window-level Q-Former, the projection and LoRA on the
  LLM's attention, nothing else (Whisper, BEATs and the LLM's own weights stay frozen) — unless
  ``unfreeze`` names parts to train in full (a from-scratch tiny model has no pretrained Whisper or
  LLM to keep: its learning check trains them, ``lora_r: 0``);
* ``stage2`` — instruction tuning: the same trainable parts from a stage-1 model (``base_model``),
  every task in the data, each item's instruction drawn from several phrasings (``prompts: varied``)
  so the model follows the instruction rather than one fixed string; a lower learning rate;

plus one recipe per ``presets/*.yaml``: ``cpu-quick`` (the CPU learning check).

``base_model``: a published audiollm model (store ref), a folder :func:`~.model.load_audiollm`
reads, or "" for the tiny model built from scratch (``seed``). Every evaluation scores the held-out
annotation (the corpus's test split: its sentences never occur in training); the checkpoint with
the lowest held-out loss is published as a standalone model (the LoRA merged into the LLM) that
``load_audiollm`` reads — the next stage's ``base_model``.

The server imports this module to list and validate recipes; the training code (``train``: torch,
transformers, peft) is imported by the worker when a recipe runs.
"""

from __future__ import annotations

from typing import Any

from dramaturg.shared.training.presets import LazyRecipe, presets_dir, recipes_with_presets

PRESETS_DIR = presets_dir(__file__)
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
PROMPTS = ("salmonn", "varied")  # salmonn: TASK_INSTRUCTIONS[task]; varied: a phrasing drawn per item
TRAIN = "dramaturg.services.audiollm.train:run_stage"
ARCHITECTURE = "salmonn-lite"

COMMON_DEFAULTS: dict[str, Any] = {
    # --- model
    "base_model": "",  # audiollm store ref or folder; "": the tiny model from scratch (seed)
    "model": {},  # AudioLlmConfig overrides for the tiny model (num_queries, use_beats, …)
    # --- data (SALMONN annotation JSON, paths relative to its folder)
    "train_annotation": "annotation_train.json",
    "heldout_annotation": "annotation_test.json",
    "tasks": ["asr", "audiocaption_v2"],  # items of other tasks are left out (and reported)
    "prompts": "salmonn",  # salmonn | varied
    "max_seconds": 30.0,  # longer clips are left out (and reported)
    # training ASR clips cut as diarized turns may be: edges trimmed (≤ half of it) or given up to this
    # many seconds of another clip, over the edge or next to it (data.diarized_edges); 0: clean clips
    "edge_augment": 0.0,
    # --- optimisation (SALMONN: lr 3e-5, warm-up 3,000 steps, cosine; the tiny model wants more)
    "lr": 1e-3,
    "schedule": "cosine",  # constant | constant_with_warmup | linear | cosine
    "warmup": 0.05,  # < 1: share of the steps; >= 1: steps
    "weight_decay": 0.05,
    "max_grad_norm": 1.0,
    "max_steps": 200,
    "batch_size": 8,
    "gradient_accumulation": 1,
    # --- what trains. The Q-Former and the projection always; LoRA on the LLM's q/k/v/o projections
    # (SALMONN: r 8, alpha 32, dropout 0.1), or with lora_r 0 no adapter at all. `unfreeze` trains parts
    # in full besides: whisper / beats (with LoRA too) and language_model (only with lora_r 0: a tiny
    # LLM built here from scratch knows no language for LoRA to adapt)
    "unfreeze": [],
    "lora_r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    # --- evaluation and checkpoints
    "eval_every": 50,
    "eval_at_start": True,  # score the untrained model first (step 0)
    "eval_batch_size": 8,
    "merge_tolerance": 1e-3,  # largest |merged - unmerged| logit allowed before publishing
    # --- system
    "log_every": 5,
    "num_workers": 0,
    "device": "auto",  # auto | cpu | cuda
    "torch_threads": 0,  # CPU threads for torch (0: torch's default)
    # data-parallel processes (GPUs, or CPU processes over gloo): the runner starts the attempt under
    # torchrun (shared/training/distributed.py); batch_size is per process
    "nproc_per_node": 1,
    "seed": 0,
}


def _base_recipes() -> list[LazyRecipe]:
    return [
        LazyRecipe(
            "stage1",
            "ASR + captioning pre-training of the Q-Former, projection and LLM LoRA (encoders, LLM frozen)",
            COMMON_DEFAULTS,
            TRAIN,
            architecture=ARCHITECTURE,
        ),
        LazyRecipe(
            "stage2",
            "instruction tuning from a stage-1 model (base_model): every task, varied instructions",
            COMMON_DEFAULTS,
            TRAIN,
            overrides={"tasks": [], "prompts": "varied", "lr": 3e-4},
            architecture=ARCHITECTURE,
        ),
    ]


RECIPES: dict[str, LazyRecipe] = recipes_with_presets(_base_recipes(), PRESETS_DIR)
