"""DER of a diarization pipeline on a pyannote.database protocol subset.

The figure is pyannote.metrics' ``DiarizationErrorRate`` with the project's convention
(REFERENCE.md): collar 0, overlapped speech scored, optimal speaker mapping, and always on the
UEM (``file["annotated"]``). pyannote's ``collar`` is the TOTAL width around each reference
boundary, so a published "md-eval -c 0.25" figure corresponds to ``collar=0.5`` here; every
report carries the collar and the overlap choice next to the number, plus its components
(confusion, false alarm, miss) as fractions of the reference speech.

Protocols load into a private ``Registry`` so that two corpora with the same protocol name (the
synthetic one is always ``Dramaturg.SpeakerDiarization.Synth``) can live in one process; a user's
own database.yml works the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dramaturg.services.diarization.model import DER_VARIANT, diarize
from dramaturg.shared.scoring import der_metric
from pyannote.database import FileFinder, get_annotated
from pyannote.database.protocol import SpeakerDiarizationProtocol
from pyannote.database.registry import Registry
from pyannote.metrics.diarization import DiarizationErrorRate
from pyannote.metrics.matcher import MATCH_CONFUSION, MATCH_FALSE_ALARM, MATCH_MISSED_DETECTION, MATCH_TOTAL

log = logging.getLogger(__name__)

SYNTH_PROTOCOL = "Dramaturg.SpeakerDiarization.Synth"
SUBSETS = ("train", "development", "test")


# ========================================================================================= protocol


def find_database_yml(dataset: Path, database_yml: str = "") -> Path:
    """The protocol YAML of a dataset.

    ``database_yml`` (absolute, or relative to the dataset) when given, else
    ``DATASET/diarization/database.yml`` (what ``dramaturg data synth`` writes), else
    ``DATASET/database.yml``, or the dataset itself when it is a YAML file.
    """
    dataset = Path(dataset)
    if database_yml:
        path = Path(database_yml).expanduser()
        path = path if path.is_absolute() else (dataset if dataset.is_dir() else dataset.parent) / path
        if not path.is_file():
            raise FileNotFoundError(f"database_yml {path} does not exist")
        return path
    if dataset.is_file() and dataset.suffix in (".yml", ".yaml"):
        return dataset
    for candidate in (dataset / "diarization" / "database.yml", dataset / "database.yml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no database.yml under {dataset} (looked in diarization/ and the top folder); "
                            "set the recipe's database_yml")


def load_protocol(database_yml: Path, name: str = SYNTH_PROTOCOL) -> SpeakerDiarizationProtocol:
    """``load_database`` + ``get_protocol`` on a private registry; audio found by ``FileFinder``."""
    registry = Registry()
    registry.load_database(str(database_yml))
    protocol = registry.get_protocol(name, preprocessors={"audio": FileFinder(registry=registry)})
    if not isinstance(protocol, SpeakerDiarizationProtocol):
        raise ValueError(f"{name} in {database_yml} is not a SpeakerDiarization protocol")
    return protocol


def subset_files(protocol: SpeakerDiarizationProtocol, subset: str) -> list[Any]:
    """The files of one subset, materialised (the pipeline caches per-file results in these dicts)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset {subset!r}: expected one of {', '.join(SUBSETS)}")
    return list(getattr(protocol, subset)())


# ============================================================================================= DER


@dataclass(frozen=True)
class DERResult:
    """Aggregate DER over a subset and its components, each a fraction of the reference speech."""

    subset: str
    der: float
    confusion: float
    false_alarm: float
    miss: float
    speech: float  # seconds of reference speech scored (inside the UEM)
    files: int
    collar: float = DER_VARIANT["collar"]
    skip_overlap: bool = DER_VARIANT["skip_overlap"]
    per_file: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}der": self.der, f"{prefix}confusion": self.confusion,
                f"{prefix}false_alarm": self.false_alarm, f"{prefix}miss": self.miss}

    def describe(self) -> str:
        overlap = "overlap excluded" if self.skip_overlap else "overlap scored"
        return (f"DER {100 * self.der:.2f}% on {self.subset} (confusion {100 * self.confusion:.2f}, "
                f"false alarm {100 * self.false_alarm:.2f}, miss {100 * self.miss:.2f}; "
                f"collar {self.collar:g} s total width, {overlap}, on the UEM; {self.files} files, "
                f"{self.speech:.1f} s of speech)")

    def to_dict(self) -> dict[str, Any]:
        return {"subset": self.subset, "der": self.der, "confusion": self.confusion,
                "false_alarm": self.false_alarm, "miss": self.miss, "speech_seconds": self.speech,
                "files": self.files, "collar": self.collar, "skip_overlap": self.skip_overlap,
                "per_file": dict(self.per_file)}


def result_from_metric(metric: DiarizationErrorRate, subset: str, per_file: Mapping[str, float]) -> DERResult:
    components = metric[:]
    total = float(components[MATCH_TOTAL])
    share = (lambda key: float(components[key]) / total) if total > 0 else (lambda key: 0.0)
    return DERResult(subset=subset, der=float(abs(metric)) if total > 0 else 0.0,
                     confusion=share(MATCH_CONFUSION), false_alarm=share(MATCH_FALSE_ALARM),
                     miss=share(MATCH_MISSED_DETECTION), speech=total, files=len(per_file),
                     collar=float(metric.collar), skip_overlap=bool(metric.skip_overlap),
                     per_file=dict(per_file))


def evaluate_pipeline(pipeline: Any, files: Iterable[Any], *, subset: str = "", collar: float = 0.0,
                      skip_overlap: bool = False, reuse_cache: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> DERResult:
    """Diarize every file and score it against its reference on its UEM.

    ``reuse_cache`` runs the pipeline in pyannote's training mode, which keeps each file's
    segmentation and embeddings in the file dict: scoring other clustering parameters on the same
    files then skips both networks. Only valid while the pipeline's models stay the same.
    """
    files = list(files)
    metric = der_metric(collar, skip_overlap)
    per_file: dict[str, float] = {}
    was_training = pipeline.training
    pipeline.training = bool(reuse_cache)
    try:
        for i, file in enumerate(files, 1):
            hypothesis, _ = diarize(pipeline, file)
            score = metric(file["annotation"], hypothesis, uem=get_annotated(file))
            per_file[str(file["uri"])] = float(score)
            if progress is not None:
                progress(i, len(files))
    finally:
        pipeline.training = was_training
    result = result_from_metric(metric, subset, per_file)
    log.info("%s", result.describe())
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m dramaturg.services.diarization.evaluate ARTIFACT DATASET``: DER of a published pipeline."""
    import argparse
    import json

    from dramaturg.services.diarization.model import load_pipeline

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("artifact", type=Path, help="a diarization model folder (with pipeline.json)")
    parser.add_argument("dataset", type=Path, help="a dataset folder or a pyannote.database YAML")
    parser.add_argument("--database-yml", default="", help="protocol YAML (absolute, or in the dataset)")
    parser.add_argument("--protocol", default=SYNTH_PROTOCOL)
    parser.add_argument("--subset", default="test", choices=SUBSETS)
    parser.add_argument("--collar", type=float, default=0.0, help="pyannote's collar: TOTAL width, seconds")
    parser.add_argument("--skip-overlap", action="store_true", help="do not score overlapped speech")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    protocol = load_protocol(find_database_yml(args.dataset, args.database_yml), args.protocol)
    result = evaluate_pipeline(load_pipeline(args.artifact, args.device), subset_files(protocol, args.subset),
                               subset=args.subset, collar=args.collar, skip_overlap=args.skip_overlap)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
