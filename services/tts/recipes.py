"""The TTS recipes by name (``dramaturg.services.tts.recipes:RECIPES``), light enough for the server.

fish-speech's fine-tuning recipe, run by the shared runner: prepare the fish-speech tree (scan with a
report, EBU R128 loudness, codec tokens in batches, protobuf shards — all inside the run, resumable),
train, pick a checkpoint on held-out lines, merge.

* ``codec`` — train the tiny Mimi-layout codec from scratch on the corpus audio (multi-resolution STFT
  + commitment + waveform L1; EMA codebooks with k-means initialisation); publishes a codec the LM
  recipes take as ``codec: <ref>``;
* ``full`` — train every weight of the text → codes model (CSM's backbone, depth decoder, embeddings
  and heads; the codec stays frozen): from scratch for the tiny default (``model:`` sizes it), or
  from ``base_model``; ``codec: train`` trains the codec first in the same run;
* ``lora`` — peft LoRA (``lora_r`` 8, ``lora_alpha`` 16 as fish-speech) on the backbone, the depth
  decoder or both (``lora_targets``) of ``base_model`` (empty: the store's default tts model);
  publishes the adapter (a peft folder the server can hot-swap with ``PeftModel.load_adapter``), and
  with ``per_speaker: true`` (or a ``speakers:`` list) one adapter per voice trained on that voice's
  lines, each published with the base model and the speaker it belongs to; ``merge_after`` also
  publishes base + adapter merged;
* ``merge`` — ``base_model`` + ``adapter`` → ``merge_and_unload`` → a standalone model, checked equal
  to the unmerged one on a probe before it is published;

plus one recipe per ``presets/*.yaml``: ``cpu-quick`` (the CPU learning check), ``demo`` (the first
``make demo``), ``csm-1b-lora`` (production: ``sesame/csm-1b``; needs the hub).

Every evaluation scores the held-out lines — clips whose normalised text never occurs in training
(a stable hash of the text decides) — and goes to ``heldout.csv`` in the run folder and the run
log; the checkpoint with the lowest held-out loss is published, or with ``select_tolerance`` the
earliest one within that fraction of it (fish-speech: take the earliest checkpoint that is good
enough, voice fine-tunes overfit).

The server imports this module to list and validate recipes; the training code (``train``,
``codec_train``: torch, transformers, peft, auraloss) is imported by the worker when a recipe runs.
"""

from __future__ import annotations

from typing import Any

from dramaturg.shared.training.presets import LazyRecipe, presets_dir, recipes_with_presets

PRESETS_DIR = presets_dir(__file__)
METHODS = ("full", "lora")
LORA_TARGETS = ("backbone", "depth_decoder", "both")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
TRAIN = "dramaturg.services.tts.train:run_lm"
CODEC = "dramaturg.services.tts.codec_train:run_codec"
MERGE = "dramaturg.services.tts.train:run_merge"

# The data stages and the system: every training recipe.
COMMON_DEFAULTS: dict[str, Any] = {
    # --- data (scan, loudness, extraction)
    "min_seconds": 0.5,  # shorter clips are left out (and reported)
    "max_seconds": 30.0,  # longer clips are left out (and reported)
    "target_lufs": -23.0,  # EBU R128 programme loudness of every clip
    "heldout_fraction": 0.15,  # share of distinct lines (normalised text) held out from training
    "extract_batch_size": 16,
    "extract_workers": 0,  # DataLoader workers decoding clips for the codec
    # --- evaluation and checkpoint choice
    "eval_every": 50,
    "eval_at_start": True,  # score the untrained model first (step 0)
    "eval_batch_size": 8,
    "select_tolerance": 0.0,  # > 0: publish the earliest checkpoint within this fraction of the best
    # --- optimisation (shared)
    "warmup": 0.05,  # < 1: share of the steps; >= 1: steps
    "max_grad_norm": 1.0,
    # --- system
    "log_every": 5,
    "num_workers": 0,
    "device": "auto",  # auto | cpu | cuda
    "torch_threads": 0,  # CPU threads for torch (0: torch's default)
    "seed": 0,
}

# The codec recipe, and the LM recipes' ``codec: train`` stage.
CODEC_DEFAULTS: dict[str, Any] = {
    # tiny_mimi_config overrides: codebook_size, num_codebooks, hidden_size, num_filters, …
    "codec_model": {},
    "codec_max_steps": 300,
    "codec_batch_size": 8,
    "codec_crop_frames": 10,  # crop length in codec frames (12.5 a second: 10 = 0.8 s)
    "codec_lr": 3e-3,  # 1e-3 left the tiny codec answering one stationary sound for every input
    "codec_schedule": "cosine",
    "codec_eval_every": 100,
    "codec_eval_clips": 16,  # held-out clips encoded and decoded at each evaluation
    # commitment pulls the encoder's latents onto the codes; with the EMA codebooks following the latents
    # anyway, any weight tried here (1, 0.1, 0.01) let the tiny codec collapse to one stationary sound
    # (codec_train's docstring: measured), so it is off by default
    "codec_commitment_weight": 0.0,
    "codec_l1_weight": 0.1,
    "codec_fft_sizes": [1024, 512, 256, 128],  # multi-resolution STFT loss (hop = fft / 4)
    # floor of the STFT power in the log-magnitude term (auraloss' eps, 1e-8 by default). At 1e-8 the empty
    # band of 16-kHz audio resampled to the codec's 24 kHz (above 8 kHz) outweighs the speech
    "codec_stft_eps": 1e-3,
    "codec_ema_decay": 0.99,
    "codec_dead_code_ratio": 0.1,  # a code used less than this × the mean is moved onto a fresh latent
    "codec_kmeans_iters": 20,  # 0: keep the codebooks the codec starts with
    "codec_kmeans_crops": 64,  # crops whose latents the k-means initialisation clusters
}

# full and lora (``method`` tells them apart).
LM_DEFAULTS: dict[str, Any] = {
    "method": "full",  # full | lora
    "base_model": "",  # model-store ref, folder or hub id; "" for full: the tiny model from scratch
    "codec": "",  # "": the model's own codec; "train": train one first (codec_* keys); a codec ref / folder
    # tiny_csm_config overrides (hidden_size, num_hidden_layers, depth_hidden_size, …), from scratch
    "model": {},
    "max_steps": 300,
    "batch_size": 8,
    "lr": 1e-3,
    "schedule": "cosine",  # constant | constant_with_warmup | linear | cosine
    "weight_decay": 0.0,
    "depth_decoder_ratio": 1.0,  # share of frames the depth decoder trains on (csm-1b: 1/16)
    "max_frames": 0,  # > 0: frames beyond it are cut from a clip (0: keep every frame)
    "bf16": False,
    "gradient_checkpointing": False,
    # --- LoRA (method lora)
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_targets": "both",  # backbone | depth_decoder | both
    "per_speaker": False,  # one adapter per voice, from that voice's lines
    "speakers": [],  # only these voices (implies per_speaker)
    "merge_after": False,  # also publish base + adapter merged (not with per_speaker)
}

MERGE_DEFAULTS: dict[str, Any] = {
    "base_model": "",  # "": the base the adapter names in its metadata
    "adapter": "",  # model-store ref or folder of a peft adapter (the lora recipe's output)
    "merge_tolerance": 1e-4,  # largest |merged - unmerged| logit allowed on the probe
    "device": "cpu",
    "seed": 0,
}


def _base_recipes() -> list[LazyRecipe]:
    lm = {**COMMON_DEFAULTS, **CODEC_DEFAULTS, **LM_DEFAULTS}
    return [
        LazyRecipe(
            "codec",
            "train the tiny Mimi-layout codec from scratch (MR-STFT + commitment, EMA codebooks)",
            {**COMMON_DEFAULTS, **CODEC_DEFAULTS},
            CODEC,
            architecture="mimi",
        ),
        LazyRecipe(
            "full",
            "train every LM weight of CSM (tiny: from scratch; or from base_model), codec frozen",
            lm,
            TRAIN,
            overrides={"method": "full"},
            architecture="csm",
        ),
        LazyRecipe(
            "lora",
            "LoRA (r 8, alpha 16) on CSM's backbone and/or depth decoder; per_speaker: one adapter per voice",
            lm,
            TRAIN,
            overrides={"method": "lora", "lr": 1e-4},
            architecture="csm-lora",
        ),
        LazyRecipe(
            "merge",
            "base_model + adapter merged into a standalone model (checked equal first)",
            MERGE_DEFAULTS,
            MERGE,
            architecture="csm",
        ),
    ]


RECIPES: dict[str, LazyRecipe] = recipes_with_presets(_base_recipes(), PRESETS_DIR)
