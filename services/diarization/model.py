"""The diarization model: pyannote.audio's ``SpeakerDiarization`` pipeline, built from local parts only.

A diarization "model" is one tuned pipeline: a segmentation model (pyannote ``PyanNet``: who is
active in each frame of a 5-10 s window, powerset-encoded), an embedding model (one vector per
speaker and window) and the clustering that links windows into speakers, with the
hyper-parameters tuned on a development set (``segmentation.min_duration_off``,
``clustering.threshold`` / ``method`` / ``min_cluster_size``). One model-store version holds all
of it (:func:`save_artifact`)::

    pipeline.json                   embedding spec, clustering, region-end rule, params, DER figures,
                                    collar convention
    segmentation/pytorch_model.bin  a pyannote checkpoint: Model.from_pretrained(folder / "segmentation")
    embedding/                      SpeakerEncoder.save_pretrained (kind "speaker-store")
                                    or a pyannote checkpoint (kind "pyannote")
    embedding/plda/ or plda/        VBx clustering only: xvec_transform.npz + plda.npz

VBx clustering (pyannote's community-1 pipeline) scores embeddings with a PLDA. ``plda: embedding``
takes the one shipped with the embedding model — speaker-service models fit one on their training
speakers when they are published (``shared/voice/plda.py``), as community-1 ships its PLDA next
to its WeSpeaker embedding; any other folder with the two files is copied into the artifact.

The embedding comes from one of two places:

* ``speaker-store`` — a dramaturg speaker-service model (``SpeakerEncoder``), copied into the
  artifact so it is self-contained. pyannote only knows how to wrap its own ``Model`` subclasses
  (``PretrainedSpeakerEmbedding`` → ``PyannoteAudioPretrainedSpeakerEmbedding``, which calls
  ``model(waveforms, weights=masks)``), so :class:`SpeakerStoreEmbedding` is a small pyannote
  ``Model`` around the encoder: the pipeline then gets the inference interface it expects
  (``sample_rate``, ``dimension``, ``metric``, ``min_num_samples``, ``__call__(waveforms, masks)``)
  from pyannote's own wrapper, the same code path as WeSpeaker's ResNet.
* ``pyannote`` — a pyannote embedding checkpoint (production: community-1's WeSpeaker ResNet34,
  ``Model.from_pretrained("pyannote/speaker-diarization-community-1", subfolder="embedding")``;
  here only a local path can be loaded).

pyannote traps handled here: the pipeline's constructor defaults point at the Hugging Face hub,
so every part is passed as an object; pyannote 4.0.7 loads a PLDA even for agglomerative
clustering, which never uses it (pyannote-audio#2044), so a placeholder stands in; and pyannote
sends usage telemetry unless told not to, which this module turns off.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from dramaturg.shared.scoring import DER_CONVENTION, DER_VARIANT
from dramaturg.shared.voice.plda import PLDA_DIR, PLDA_FILE, TRANSFORM_FILE, has_plda
from dramaturg.shared.voice.pyannote_embedding import (
    TINY_EMBEDDING,
    SpeakerStoreEmbedding,
    load_speaker_encoder,
    tiny_speaker_encoder,
)
from pyannote.audio import Model
from pyannote.audio import __version__ as pyannote_audio_version
from pyannote.audio.core.plda import PLDA
from pyannote.audio.core.task import Problem, Resolution, Specifications
from pyannote.audio.models.segmentation import PyanNet
from pyannote.audio.pipelines import SpeakerDiarization
from pyannote.audio.telemetry import set_telemetry_metrics
from pyannote.audio.utils.signal import Binarize
from pyannote.core import Annotation, SlidingWindowFeature
from pyannote.metrics.diarization import DiarizationErrorRate

log = logging.getLogger(__name__)

# pyannote.audio 4 reports model loads and audio durations to its vendor by default. A service that
# runs on users' audio, often offline, keeps that off; DRAMATURG_PYANNOTE_TELEMETRY=1 opts back in.
if os.environ.get("DRAMATURG_PYANNOTE_TELEMETRY", "") != "1":
    set_telemetry_metrics(False)

FORMAT = "dramaturg-diarization/1"
PIPELINE_FILE = "pipeline.json"
SEGMENTATION_DIR = "segmentation"
EMBEDDING_DIR = "embedding"
PLDA_FROM_EMBEDDING = "embedding"  # the recipes' ``plda`` value for "the PLDA next to the embedding"
CHECKPOINT_FILE = "pytorch_model.bin"  # pyannote's AssetFileName.Model: what from_pretrained(folder) reads
EMBEDDING_KINDS = ("speaker-store", "pyannote")
CLUSTERINGS = ("AgglomerativeClustering", "VBxClustering")

# Small enough to train on two CPU cores in minutes. Production (presets/segmentation-3.0.yaml)
# starts from pyannote/segmentation-3.0 instead (PyanNet, sincnet stride 10, 2x128 BiLSTM, 10 s).
TINY_SEGMENTATION: dict[str, Any] = {
    "sincnet": {"stride": 10},
    "lstm": {"hidden_size": 32, "num_layers": 1, "bidirectional": True, "monolithic": True, "dropout": 0.0},
    "linear": {"hidden_size": 32, "num_layers": 1},
}
# What a segmentation model that never saw a task is built for (the task sets them when training).
DEFAULT_CHUNK: dict[str, Any] = {"duration": 5.0, "max_speakers_per_chunk": 3, "max_speakers_per_frame": 2}
# pyannote/speaker-diarization-3.1's tuned values: a sensible start for agglomerative clustering.
DEFAULT_PARAMS: dict[str, Any] = {
    "segmentation": {"min_duration_off": 0.0},
    "clustering": {"method": "centroid", "min_cluster_size": 12, "threshold": 0.7045654963945799},
}
# pyannote/speaker-diarization-community-1's values: where VBx clustering starts (AHC threshold, Fa, Fb).
VBX_DEFAULT_PARAMS: dict[str, Any] = {
    "segmentation": {"min_duration_off": 0.0},
    "clustering": {"threshold": 0.6, "Fa": 0.07, "Fb": 0.8},
}


# ===================================================================================== segmentation


def build_segmentation(config: Mapping[str, Any] | None = None) -> PyanNet:
    """The segmentation model to train: ``pretrained`` (hub id or local path) or a new ``PyanNet``.

    ``config`` keys: ``pretrained`` ("" = from scratch), ``sincnet`` / ``lstm`` / ``linear``
    (PyanNet's own keyword dicts, default :data:`TINY_SEGMENTATION`), ``sample_rate``. A pretrained
    checkpoint keeps its architecture: the size keys are ignored then. A model built from scratch
    has no output layer until a task (training) or :func:`attach_specifications` gives it one.
    """
    config = dict(config or {})
    pretrained = str(config.get("pretrained") or "")
    if pretrained:
        model = load_segmentation(pretrained, subfolder=config.get("subfolder") or None)
        log.info("segmentation model from %s (%s)", pretrained, type(model).__name__)
        return model
    return PyanNet(sincnet=dict(config.get("sincnet") or TINY_SEGMENTATION["sincnet"]),
                   lstm=dict(config.get("lstm") or TINY_SEGMENTATION["lstm"]),
                   linear=dict(config.get("linear") or TINY_SEGMENTATION["linear"]),
                   sample_rate=int(config.get("sample_rate", 16000)))


def attach_specifications(model: Model, *, duration: float = DEFAULT_CHUNK["duration"],
                          max_speakers_per_chunk: int = DEFAULT_CHUNK["max_speakers_per_chunk"],
                          max_speakers_per_frame: int = DEFAULT_CHUNK["max_speakers_per_frame"]) -> Model:
    """Give an untrained segmentation model the powerset output a ``SpeakerDiarization`` task would.

    The same ``Specifications`` the task sets in ``setup`` (powerset multi-class, frame resolution,
    permutation-invariant), then ``model.setup()`` builds the classifier. Only for models that never
    saw a task: an untrained pipeline for tests and the embedded default.
    """
    model.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=float(duration),
        min_duration=float(duration), powerset_max_classes=int(max_speakers_per_frame),
        classes=[f"speaker#{i + 1}" for i in range(int(max_speakers_per_chunk))], permutation_invariant=True)
    model.setup()
    return model


def save_pyannote_checkpoint(model: Model, folder: Path) -> Path:
    """Write ``folder/pytorch_model.bin`` in the form ``Model.from_pretrained(folder)`` reloads.

    These are the keys pyannote's own ``strip`` command keeps from a Lightning checkpoint (weights,
    hyper-parameters, Lightning version, and ``on_save_checkpoint``'s architecture + specifications),
    so loading goes through pyannote's code, not ours. An embedding model built outside a task
    gets the representation specifications pyannote's WeSpeaker converter gives it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _ = model.specifications
    except Exception:  # UnknownSpecificationsError: a bare embedding model
        model.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK,
                                              duration=DEFAULT_CHUNK["duration"])
    checkpoint: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    path = folder / CHECKPOINT_FILE
    torch.save(checkpoint, path)
    return path


def load_segmentation(checkpoint: str | Path, *, subfolder: str | None = None,
                      map_location: str | torch.device = "cpu") -> Model:
    """``Model.from_pretrained`` of a local folder/file (or, in production, a hub id), in eval mode."""
    model = Model.from_pretrained(str(checkpoint), subfolder=subfolder, strict=False,
                                  map_location=torch.device(map_location))
    if model is None:
        raise FileNotFoundError(f"no pyannote checkpoint at {checkpoint}")
    return model.eval()


def segmentation_info(model: Model) -> dict[str, Any]:
    """What pipeline.json records about a segmentation model (its chunking and powerset)."""
    spec = model.specifications
    return {"class": f"{type(model).__module__}.{type(model).__name__}", "duration": float(spec.duration),
            "max_speakers_per_chunk": len(spec.classes or []),
            "max_speakers_per_frame": spec.powerset_max_classes, "powerset": bool(spec.powerset),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


# ======================================================================================== embedding


def load_pyannote_embedding(checkpoint: str | Path, subfolder: str | None = None) -> Model:
    """A pyannote embedding model (WeSpeaker ResNet, x-vector…) by ``Model.from_pretrained``."""
    model = Model.from_pretrained(str(checkpoint), subfolder=subfolder or None, strict=False,
                                  map_location=torch.device("cpu"))
    if model is None:
        raise FileNotFoundError(f"no pyannote embedding checkpoint at {checkpoint}")
    return model.eval()


@dataclass
class EmbeddingChoice:
    """A resolved embedding: the pyannote model the pipeline gets and the spec :func:`save_artifact` takes."""

    model: Model
    spec: dict[str, Any] = field(default_factory=dict)


def resolve_embedding(spec: Mapping[str, Any], home: Path | None = None, *, seed: int = 0) -> EmbeddingChoice:
    """Turn a recipe's embedding spec into a model.

    * ``{"kind": "speaker-store", "ref": "name[:version]"}`` — that speaker-service model from the
      store under ``home``; ``ref: ""`` — the speaker service's default model, or the tiny untrained
      encoder when there is none; ``ref: "tiny"`` — always the tiny untrained encoder (tests).
    * ``{"kind": "pyannote", "checkpoint": PATH_OR_HUB_ID, "subfolder": ""}`` — a pyannote embedding.
    """
    kind = str(spec.get("kind") or "speaker-store")
    if kind == "pyannote":
        checkpoint = str(spec.get("checkpoint") or "")
        if not checkpoint:
            raise ValueError("embedding kind 'pyannote' needs a checkpoint (local path or hub id)")
        subfolder = str(spec.get("subfolder") or "") or None
        model = load_pyannote_embedding(checkpoint, subfolder)
        local = Path(checkpoint) / (subfolder or "") if Path(checkpoint).exists() else None
        return EmbeddingChoice(model, {"kind": kind, "checkpoint": checkpoint, "subfolder": subfolder or "",
                                       **({"path": local} if local is not None else {})})
    if kind != "speaker-store":
        raise ValueError(f"embedding kind {kind!r}: expected one of {', '.join(EMBEDDING_KINDS)}")
    ref = str(spec.get("ref") or "")
    min_seconds = float(spec.get("min_seconds", 0.1))
    if ref != "tiny":
        from dramaturg.shared.store import ModelStore

        store = ModelStore(home) if home is not None else None
        record = None
        if store is not None:
            record = store.resolve("speaker", ref) if ref else store.default("speaker")
        elif ref:
            raise ValueError(f"embedding ref {ref!r} needs a model store (home)")
        if record is not None:
            encoder = load_speaker_encoder(record.path)
            log.info("embedding: speaker model %s (%s)", record.ref, encoder.config.architecture)
            return EmbeddingChoice(SpeakerStoreEmbedding(encoder, min_seconds),
                                   {"kind": kind, "ref": record.ref, "path": record.path,
                                    "min_seconds": min_seconds})
        log.warning("no speaker model in the store: using an untrained tiny %s encoder as the embedding",
                    TINY_EMBEDDING["architecture"])
    encoder = tiny_speaker_encoder(seed, spec.get("config"))
    return EmbeddingChoice(SpeakerStoreEmbedding(encoder, min_seconds),
                           {"kind": kind, "ref": f"untrained:{encoder.config.architecture}", "model": encoder,
                            "min_seconds": min_seconds})


# ========================================================================================= pipeline


class _NoPLDA(PLDA):
    """Stands in for the PLDA that ``SpeakerDiarization.__init__`` always loads.

    pyannote 4.0.7 fetches community-1's PLDA from the hub even for agglomerative clustering, which
    never uses it, and ``get_plda(None)`` raises (pyannote-audio#2044). Calling this one raises too.
    """

    def __init__(self) -> None:
        self.lda_dimension = 0

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        raise RuntimeError("this pipeline has no PLDA: VBxClustering needs one (pipeline.json 'plda')")


class DiarizationPipeline(SpeakerDiarization):
    """pyannote's ``SpeakerDiarization``, optimised for the DER the project reports.

    pyannote's ``get_metric`` is a greedy-mapping DER; the optimiser here minimises the
    optimal-mapping ``DiarizationErrorRate`` with :data:`DER_VARIANT` on the UEM, the figure every
    report quotes, so the tuned parameters are the best ones by the published metric.
    ``default_parameters`` follows the clustering (pyannote's are VBx's). With
    ``offset_at_last_frame`` (the default for new pipelines) regions end one frame earlier than
    pyannote's, on the frame a pyannote-trained model marks as a turn's last (``to_annotation``).
    """

    def __init__(self, *args: Any, offset_at_last_frame: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offset_at_last_frame = bool(offset_at_last_frame)

    def to_annotation(self, discrete_diarization: SlidingWindowFeature, min_duration_on: float = 0.0,
                      min_duration_off: float = 0.0) -> Annotation:
        """pyannote's frames → regions, but a region ends on its last active frame's centre.

        Why: pyannote's segmentation task marks a label's frames ``y[start_idx : end_idx + 1]``, the
        end frame included, so a trained model's last active frame is the one centred nearest the
        true end; ``Binarize`` ends a region at the *next* (first inactive) frame's centre, one frame
        late at every offset while onsets are exact. Measured on the cpu-quick test scenes: offsets
        +35 ms late (median; 33.75 ms frames), onsets 0 ms; the late frame scored 2.3 of the 6.0
        points of false alarm (README). ``offset_at_last_frame=False`` is pyannote's conversion.
        """
        if not self.offset_at_last_frame:
            return super().to_annotation(discrete_diarization, min_duration_on=min_duration_on,
                                         min_duration_off=min_duration_off)
        binarize = Binarize(onset=0.5, offset=0.5, min_duration_on=min_duration_on,
                            min_duration_off=min_duration_off,
                            pad_offset=-float(discrete_diarization.sliding_window.step))
        return binarize(discrete_diarization)

    def default_parameters(self) -> dict[str, Any]:
        return copy.deepcopy(default_params(self.klustering))

    def get_metric(self) -> DiarizationErrorRate:
        return DiarizationErrorRate(**self.der_variant)


def resolve_plda(plda: str | Path | None, embedding: Mapping[str, Any]) -> Path | None:
    """Where the PLDA files are: ``None`` (no PLDA), a folder, or ``"embedding"`` — the embedding
    model's own ``plda/`` (``embedding`` is an embedding spec with its local ``path``)."""
    if not plda:
        return None
    if str(plda) == PLDA_FROM_EMBEDDING:
        source = embedding.get("path")
        folder = Path(source) / PLDA_DIR if source else None
        if folder is None or not has_plda(folder):
            raise ValueError(
                f"plda: embedding, but the embedding model "
                f"({embedding.get('ref') or embedding.get('checkpoint')}) "
                f"has no {PLDA_DIR}/ with {TRANSFORM_FILE} and {PLDA_FILE}; speaker models fit one when "
                "they are published (retrain it with `make train-speaker`), or set a PLDA folder, or "
                "use clustering: AgglomerativeClustering")
        return folder
    folder = Path(plda)
    if not has_plda(folder):
        raise ValueError(f"plda {str(plda)!r}: expected a folder with {TRANSFORM_FILE} and {PLDA_FILE}")
    return folder


def default_params(clustering: str) -> dict[str, Any]:
    """Where a pipeline with this clustering starts: pyannote 3.1's (agglomerative) or community-1's (VBx)."""
    return copy.deepcopy(VBX_DEFAULT_PARAMS if clustering == "VBxClustering" else DEFAULT_PARAMS)


def build_pipeline(segmentation: Model, embedding: Model, *, params: Mapping[str, Any] | None = None,
                   clustering: str = "AgglomerativeClustering", plda: str | Path | None = None,
                   segmentation_step: float = 0.1, embedding_exclude_overlap: bool = False,
                   segmentation_batch_size: int = 32, embedding_batch_size: int = 32,
                   offset_at_last_frame: bool = True,
                   device: str | torch.device = "cpu") -> DiarizationPipeline:
    """A pipeline over model objects (never the hub defaults), instantiated with ``params`` when given.

    Without ``params`` the pipeline is left uninstantiated, as the optimiser wants it.
    """
    if clustering not in CLUSTERINGS:
        raise ValueError(f"clustering {clustering!r}: expected one of {', '.join(CLUSTERINGS)}")
    if clustering == "VBxClustering" and not plda:
        raise ValueError("VBxClustering needs a PLDA (a local folder with xvec_transform.npz and plda.npz)")
    plda_model: PLDA = PLDA.from_pretrained(str(plda)) if plda else _NoPLDA()
    pipeline = DiarizationPipeline(
        legacy=False, segmentation=segmentation, segmentation_step=float(segmentation_step),
        embedding=embedding, embedding_exclude_overlap=bool(embedding_exclude_overlap), plda=plda_model,
        clustering=clustering, embedding_batch_size=int(embedding_batch_size),
        segmentation_batch_size=int(segmentation_batch_size), der_variant=dict(DER_VARIANT),
        offset_at_last_frame=bool(offset_at_last_frame))
    if params is not None:
        pipeline.instantiate(copy.deepcopy(dict(params)))
    return pipeline.to(torch.device(device))


def pipeline_params(pipeline: SpeakerDiarization) -> dict[str, Any]:
    """The instantiated hyper-parameters as plain JSON values."""
    return _plain(pipeline.parameters(instantiated=True))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def diarize(pipeline: SpeakerDiarization, file: Any, num_speakers: int | None = None,
            min_speakers: int | None = None, max_speakers: int | None = None
            ) -> tuple[Annotation, Annotation]:
    """(diarization, exclusive diarization) of one file: a path or ``{"waveform", "sample_rate"}``.

    pyannote 4 returns a ``DiarizeOutput``; the first annotation may overlap (overlapped speech is
    scored), the second has at most one speaker at a time (for transcript alignment). A legacy
    pipeline returns one annotation: it is then both. Labels are ``SPEAKER_00``… unless the file
    carries a reference annotation, in which case pyannote maps them onto the reference labels.
    """
    output = pipeline(file, num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers)
    if isinstance(output, Annotation):
        return output, output
    return output.speaker_diarization, output.exclusive_speaker_diarization


# ========================================================================================= artifact


def save_artifact(folder: Path, segmentation: Model, *, params: Mapping[str, Any],
                  embedding: Mapping[str, Any], metrics: Mapping[str, float],
                  clustering: str = "AgglomerativeClustering", plda: str | Path | None = None,
                  segmentation_step: float = 0.1,
                  embedding_exclude_overlap: bool = False,
                  offset_at_last_frame: bool = True) -> None:
    """Write one tuned pipeline as a model-store artifact (layout in the module docstring).

    ``embedding`` is an embedding spec (:func:`resolve_embedding`'s ``spec``): ``kind``, ``ref`` or
    ``checkpoint``/``subfolder``, and where its files are — ``path`` (a folder to copy) or ``model``
    (an in-memory encoder or pyannote model to save). A pyannote embedding named by hub id only is
    recorded by name (the artifact then needs the hub to load). ``metrics`` (DER before/after…) and
    the DER convention go into pipeline.json next to the params.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_pyannote_checkpoint(segmentation, folder / SEGMENTATION_DIR)
    kind = str(embedding.get("kind") or "speaker-store")
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"embedding kind {kind!r}: expected one of {', '.join(EMBEDDING_KINDS)}")
    target = folder / EMBEDDING_DIR
    record: dict[str, Any] = {k: _plain(v) for k, v in embedding.items()
                              if k not in ("model", "path") and not isinstance(v, Path)}
    record["kind"] = kind
    model, source = embedding.get("model"), embedding.get("path")
    if model is not None:
        if isinstance(model, SpeakerStoreEmbedding):
            model = model.encoder
        if kind == "speaker-store":
            model.save_pretrained(str(target))
        else:
            save_pyannote_checkpoint(model, target)
        record["path"] = EMBEDDING_DIR
    elif source is not None:
        source = Path(source)
        if source.is_dir():
            skip = shutil.ignore_patterns("dramaturg-model.json", "checkpoint.json")  # store / run metadata
            shutil.copytree(source, target, ignore=skip)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / CHECKPOINT_FILE)
        record["path"] = EMBEDDING_DIR
    elif kind == "speaker-store":
        raise ValueError("a speaker-store embedding needs 'path' or 'model' to be copied into the artifact")
    else:
        log.warning("embedding %s is recorded by name only: loading this artifact needs the hub",
                    record.get("checkpoint"))
    plda_record = None
    if plda:
        if str(plda) == PLDA_FROM_EMBEDDING:
            if not has_plda(target / PLDA_DIR):
                raise ValueError(f"plda: embedding, but the artifact's embedding has no {PLDA_DIR}/")
            plda_record = f"{EMBEDDING_DIR}/{PLDA_DIR}"
        else:
            source_plda = Path(plda)
            if source_plda.resolve() != (folder / PLDA_DIR).resolve():
                shutil.copytree(source_plda, folder / PLDA_DIR, dirs_exist_ok=True)
            plda_record = PLDA_DIR
    spec = {
        "format": FORMAT,
        "pipeline": "pyannote.audio.pipelines.SpeakerDiarization",
        "pyannote.audio": pyannote_audio_version,
        "segmentation": {"path": SEGMENTATION_DIR, **segmentation_info(segmentation)},
        "embedding": record,
        "clustering": clustering,
        "plda": plda_record,
        "segmentation_step": float(segmentation_step),
        "embedding_exclude_overlap": bool(embedding_exclude_overlap),
        "offset_at_last_frame": bool(offset_at_last_frame),
        "params": _plain(dict(params)),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "der": dict(DER_CONVENTION),
    }
    (folder / PIPELINE_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def read_artifact(folder: Path) -> dict[str, Any]:
    """pipeline.json of an artifact (what a server shows as model info)."""
    path = Path(folder) / PIPELINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a diarization artifact (no {PIPELINE_FILE})")
    spec = json.loads(path.read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r}, expected {FORMAT!r}")
    return spec


def load_embedding(folder: Path, spec: Mapping[str, Any] | None = None) -> Model:
    """The embedding model of an artifact, as a pyannote ``Model`` the pipeline can take."""
    folder = Path(folder)
    record = dict((spec or read_artifact(folder))["embedding"])
    local = folder / str(record.get("path") or EMBEDDING_DIR)
    if record["kind"] == "speaker-store":
        return SpeakerStoreEmbedding(load_speaker_encoder(local), float(record.get("min_seconds", 0.1)))
    if (local / CHECKPOINT_FILE).is_file():
        return load_pyannote_embedding(local)
    return load_pyannote_embedding(record["checkpoint"], record.get("subfolder") or None)


def load_pipeline(folder: Path, device: str = "cpu", *, segmentation_batch_size: int = 32,
                  embedding_batch_size: int = 32) -> DiarizationPipeline:
    """The artifact's pipeline, instantiated with its tuned params and moved to ``device``.

    The segmentation model is reloaded by pyannote's own ``Model.from_pretrained``. Batch sizes are
    inference-only settings (not part of the artifact): change them later with
    ``pipeline.segmentation_batch_size = n`` / ``pipeline.embedding_batch_size = n``. Apply with
    :func:`diarize`.
    """
    folder = Path(folder)
    spec = read_artifact(folder)
    segmentation = load_segmentation(folder / spec["segmentation"]["path"])
    plda = spec.get("plda")
    if plda and not Path(plda).is_absolute() and (folder / plda).exists():
        plda = str(folder / plda)
    return build_pipeline(segmentation, load_embedding(folder, spec), params=spec["params"],
                          clustering=spec.get("clustering", "AgglomerativeClustering"), plda=plda,
                          segmentation_step=float(spec.get("segmentation_step", 0.1)),
                          embedding_exclude_overlap=bool(spec.get("embedding_exclude_overlap", False)),
                          # artifacts written before the key existed used pyannote's offsets
                          offset_at_last_frame=bool(spec.get("offset_at_last_frame", False)),
                          segmentation_batch_size=segmentation_batch_size,
                          embedding_batch_size=embedding_batch_size, device=device)


def default_artifact(folder: Path, home: Path | None = None, *, seed: int = 0) -> None:
    """A working artifact without training: untrained tiny segmentation, an embedding, default params.

    The embedding is the speaker service's default model when the store under ``home`` has one,
    else the tiny untrained ECAPA. Deterministic for a given seed (weights drawn under a forked RNG),
    so two calls write the same weights. Its output is a diarization in form only: for tests and a
    stack that has not trained anything yet.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        segmentation = attach_specifications(build_segmentation())
    choice = resolve_embedding({"kind": "speaker-store", "ref": ""}, home, seed=seed)
    save_artifact(Path(folder), segmentation.eval(), params=DEFAULT_PARAMS, embedding=choice.spec,
                  metrics={})
