"""The speaker recipes by name (``dramaturg.services.speaker.recipes:RECIPES``), light enough for the server.

Recipes (after the wav2vec2 speaker-verification recipes of the SpeechBrain / Hugging Face
fine-tuning guides): ``wav2vec2-ce``, ``wav2vec2-aam``, ``wav2vec2-bce``, ``wav2vec2-ctc``,
``xvector-aam``, ``ecapa-aam``; ``lr-find`` (exponential LR range test) and ``lr-grid`` (short runs
over a list of learning rates); plus one recipe per ``presets/*.yaml`` file (``cpu-quick``,
``wav2vec2-base-aam``, ``ecapa-voxceleb``), each a base recipe with overrides. Every key of a
recipe's ``defaults`` can be overridden per run, ``head`` included, so any architecture × head
combination that makes sense (ctc reads wav2vec2 frames) can be asked for.

The server imports this module to list and validate recipes; the training code (``train``, which
loads torch, transformers and speechbrain) is imported by the worker when a recipe runs.
"""

from __future__ import annotations

from typing import Any

from dramaturg.shared.training.presets import LazyRecipe, presets_dir, recipes_with_presets

PRESETS_DIR = presets_dir(__file__)
SCHEDULES = ("constant", "one_cycle", "tri_stage", "exp_decay")
OPTIMIZERS = ("adam", "adamw")
MODES = ("train", "lr_find")
TRAIN = "dramaturg.services.speaker.train:run_recipe"
LR_GRID = "dramaturg.services.speaker.train:run_lr_grid"

# Every speaker recipe understands these keys; the recipes below only change some defaults. The
# defaults are the tiny from-scratch models that train on a CPU in seconds (tests, the embedded
# stack); presets/*.yaml name the production checkpoints and sizes.
COMMON_DEFAULTS: dict[str, Any] = {
    "mode": "train",  # "train" | "lr_find"
    # --- model
    "architecture": "wav2vec2",  # wav2vec2 | xvector | ecapa
    "pretrained": "",  # wav2vec2: Wav2Vec2Model hub id / path; lobes: speechbrain source
    "model": {},  # more SpeakerEncoderConfig fields (backbone, lobe, n_mels, …)
    "embedding_dim": -1,  # -1: the architecture's default (wav2vec2: the pooled vector)
    "pooling": "",  # "": the architecture's default (wav2vec2: mean+std)
    # --- head
    "head": "aam",  # ce | aam | bce | ctc
    "margin": 0.2,
    "scale": 30.0,
    "margin_warmup_steps": 0,  # linear AAM margin warm-up from 0 (0 = full margin from the start)
    # --- optimisation
    "optimizer": "adam",  # adam | adamw
    "lr": 1e-3,
    "weight_decay": 0.0,
    "schedule": "one_cycle",  # constant | one_cycle | tri_stage | exp_decay
    "div_factor": 25.0,  # one_cycle: start at lr / div_factor
    "warmup_ratio": 0.1,  # tri_stage
    "hold_ratio": 0.4,  # tri_stage (the rest decays exponentially)
    "initial_lr": 5e-6,  # tri_stage warm-up start
    "final_lr": 5e-6,  # tri_stage / exp_decay end
    "max_steps": 60,  # > 0 wins over epochs
    "epochs": 0,
    "batch_size": 8,
    "max_grad_norm": 5.0,
    "crop_seconds": 1.0,
    "min_crop_seconds": None,  # set: each crop's length is drawn in [min_crop_seconds, crop_seconds]
    # --- augmentation
    "speed_perturb": False,
    "channel_prob": 0.0,  # random band limits + EQ (another microphone)
    "noise_prob": 0.0,
    "reverb_prob": 0.0,
    # --- ablations (wav2vec2); null keeps the backbone config's value
    "freeze_feature_encoder": True,
    "reset_weights": False,
    "layerdrop": None,
    "hidden_dropout": None,
    "attention_dropout": None,
    "activation_dropout": None,
    "feat_proj_dropout": None,
    "mask_time_prob": None,
    # --- evaluation
    "eval_every": 20,
    "eval_at_start": True,  # score the untrained model first (step 0)
    "asnorm": False,
    "asnorm_top_k": 100,
    "eval_max_seconds": 30.0,
    # --- PLDA for diarization (VBx clustering): fitted on the training speakers at publish time
    "plda": True,
    "plda_dimension": 64,
    "plda_utterances_per_speaker": 20,  # whole utterances per speaker (+3 short crops of each)
    # --- lr_find
    "lr_find_min": 1e-7,
    "lr_find_max": 1.0,
    "lr_find_steps": 100,
    # --- system
    "log_every": 5,
    "num_workers": 0,
    "device": "auto",  # auto | cpu | cuda
    "torch_threads": 0,  # CPU threads for torch (0: torch's default, one per core)
    "seed": 0,
}
GRID_DEFAULTS: dict[str, Any] = {"lrs": [1e-4, 5e-4, 1e-3, 5e-3], "grid_steps": 30}


def _recipe(name: str, description: str, overrides: dict[str, Any]) -> LazyRecipe:
    # architecture "": the runner records config["architecture"], since a recipe may switch it
    return LazyRecipe(name, description, COMMON_DEFAULTS, TRAIN, overrides=overrides)


def _base_recipes() -> list[LazyRecipe]:
    w2v2 = "tiny from-scratch wav2vec2 (presets/wav2vec2-base-aam.yaml: facebook/wav2vec2-base)"
    return [
        _recipe("wav2vec2-ce", f"{w2v2} + softmax cross-entropy", {"head": "ce"}),
        _recipe("wav2vec2-aam", f"{w2v2} + AAM softmax (m=0.2, s=30)", {"head": "aam"}),
        _recipe("wav2vec2-bce", f"{w2v2} + pairwise BCE on cosine", {"head": "bce"}),
        _recipe("wav2vec2-ctc", f"{w2v2} + frame-level CTC over speaker tokens", {"head": "ctc"}),
        _recipe("xvector-aam", "speechbrain x-vector on fbank + AAM softmax",
                {"architecture": "xvector", "head": "aam"}),
        _recipe("ecapa-aam", "speechbrain ECAPA-TDNN on fbank + AAM softmax "
                "(presets/ecapa-voxceleb.yaml: speechbrain/spkrec-ecapa-voxceleb)",
                {"architecture": "ecapa", "head": "aam"}),
        _recipe("lr-find", "LR range test: exponential LR sweep, smoothed loss, steepest descent",
                {"mode": "lr_find"}),
        LazyRecipe("lr-grid", "short trainings over a list of learning rates (lrs), EER table",
                   {**COMMON_DEFAULTS, **GRID_DEFAULTS}, LR_GRID),
    ]


RECIPES: dict[str, LazyRecipe] = recipes_with_presets(_base_recipes(), PRESETS_DIR)
