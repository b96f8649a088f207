"""The diarization recipes by name (``dramaturg.services.diarization.recipes:RECIPES``), light for the server.

``segmentation`` trains (or fine-tunes) the segmentation model, then tunes the pipeline on dev and
publishes it with its DER; ``pipeline`` runs the tuning alone over an existing segmentation
(``base_model``: a published diarization artifact, or ``pretrained``: a pyannote checkpoint).
``presets/*.yaml`` add presets (``cpu-quick``, ``segmentation-3.0``), each a base recipe with
overrides. The training code (``train``: torch, lightning, pyannote) is imported by the worker when a
recipe runs, never by the server.
"""

from __future__ import annotations

from typing import Any

from dramaturg.shared.training.presets import LazyRecipe, presets_dir, recipes_with_presets

PRESETS_DIR = presets_dir(__file__)
ARCHITECTURE = "pyannote-pipeline"
OPTIMIZERS = ("adam", "adamw", "radam", "lookahead-radam", "radam-cosine")

# Keys both recipes understand (step 2). Defaults: the tiny CPU setup; presets/*.yaml scale up.
PIPELINE_DEFAULTS: dict[str, Any] = {
    # --- data
    "database_yml": "",              # "": DATASET/diarization/database.yml, else DATASET/database.yml
    "protocol": "Dramaturg.SpeakerDiarization.Synth",
    # --- models
    "pretrained": "",                # segmentation to start from: hub id or path; "": from scratch
    "embedding": {"kind": "speaker-store", "ref": "", "checkpoint": "", "subfolder": "", "min_seconds": 0.1},
    "embedding_from_base": True,     # pipeline recipe: keep the base artifact's embedding
    # --- pipeline
    "clustering": "AgglomerativeClustering",
    "plda": "",                      # VBxClustering: "embedding" (the speaker model's own) or a folder
                                     # with xvec_transform.npz + plda.npz
    "segmentation_step": 0.1,        # window step as a fraction of its duration (pyannote's default)
    "embedding_exclude_overlap": True,  # as pyannote's 3.1 / community-1 configs: purer embeddings
    "offset_at_last_frame": True,    # regions end on their last active frame (model.DiarizationPipeline)
    "initial_params": {},            # merged over model.default_params(clustering): 3.1's / community-1's
    "freeze_params": {},             # kept fixed while tuning, e.g. {"clustering": {"method": "centroid"}}
    "optimize_iterations": 40,
    "optimize_sampler": "TPESampler",
    "optimize_restarts": 1,          # independent tuning studies (seeds seed, seed+1…); the best on dev wins
    "checkpoint_every": 10,          # trials between checkpoints of the tuned pipeline
    "segmentation_batch_size": 32,
    "embedding_batch_size": 32,
    "evaluate_start": True,          # also score the starting segmentation on test (der_test_start)
    # --- system
    "device": "auto",                # auto | cpu | cuda
    "num_threads": 0,                # torch CPU threads; 0: torch's default (1 beats 2 on busy shared cores)
    "seed": 0,
}
SEGMENTATION_DEFAULTS: dict[str, Any] = {
    **PIPELINE_DEFAULTS,
    "model": {},                     # PyanNet sincnet / lstm / linear dicts (default: TINY_SEGMENTATION)
    # --- task (pyannote SpeakerDiarization)
    "duration": 5.0,
    "max_speakers_per_chunk": 3,
    "max_speakers_per_frame": 2,
    "batch_size": 16,
    "num_workers": 0,
    # --- optimisation
    "optimizer": "adam",             # adam | adamw | radam | lookahead-radam | radam-cosine
    "lr": 1e-3,
    "weight_decay": 0.0,
    "lookahead_k": 5,
    "lookahead_alpha": 0.5,
    "epochs": 10,
    "gradient_clip": 5.0,            # pyannote's own value for manual optimisation; 0 = off
    "freeze_up_to": "",              # e.g. "lstm": train only the layers after it (fine-tuning)
    "unfreeze_at_epoch": 0,          # 0: never; N: unfreeze before the N-th epoch (1-based)
    "validate_first": True,          # epoch 0 row = the starting model (the guide's table)
}

TRAIN = "dramaturg.services.diarization.train"
_BASE = [
    LazyRecipe("segmentation", "train the segmentation model (pyannote SpeakerDiarization task), then tune "
               "the pipeline on dev and publish it with its DER", SEGMENTATION_DEFAULTS,
               f"{TRAIN}:run_segmentation", architecture=ARCHITECTURE),
    LazyRecipe("pipeline", "tune the pipeline hyper-parameters of an existing segmentation model (base_model "
               "or pretrained) on dev, publish it with its DER", PIPELINE_DEFAULTS,
               f"{TRAIN}:run_pipeline", architecture=ARCHITECTURE),
]

RECIPES: dict[str, LazyRecipe] = recipes_with_presets(_BASE, PRESETS_DIR)
