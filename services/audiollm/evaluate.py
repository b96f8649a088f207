"""Evaluation of the audio LLM the way the SALMONN-lite seed evaluates it: ASR / captioning scores,
submission CSVs and their validator, and the latency report (TTFT / TPOT).

Modes (the seed's ``evaluate_salmonn.py --mode``, its ``evaluate_efficiency_salmonn.py`` and its
``submission_validator.py`` in one command, ``dramaturg eval audiollm``):

- ``valid_asr``: transcribe the annotation's ``asr`` items and score them: WER after Whisper's English
  text normaliser (``whisper-normalizer``), edit operations counted by jiwer over the whole set (the
  seed sums edit distances and divides by the reference words: the same corpus-level figure).
- ``valid_aac``: caption the ``audiocaption_v2`` items and score them with aac-metrics: BLEU-1/4,
  ROUGE-L and CIDEr-D are pure Python; METEOR, SPICE and so SPIDEr (the seed's headline) run Java and
  their jars, so they are computed only when both are usable, and ``skipped`` in the results says
  which were not and why — nothing stands in for them.
- ``submission_asr`` / ``submission_aac``: answer every item of the task, references or not, and write
  ``submission.csv`` (``testset_id,text``, the seed's columns, header included), then validate it.
- ``efficiency``: time every item (both tasks unless ``--task``): TTFT and TPOT p50 / p95 and the peak
  memory. ``--efficiency`` adds the same report to a scoring mode.
- ``validate``: check a submission CSV against its annotation (:func:`validate_submission`).

Generation is the service's: greedy :class:`~.generation.Sampling` and the
:class:`~.generation.TextDeltas` streamer that times the tokens for the server's usage figures, over
``model.generate`` (one item at a time: batch 1, as the seed measures). TTFT is the seed's: from the
Whisper features on the device to the first token, i.e. the audio encoders (Whisper, BEATs, Q-Former,
projection), the prompt and one prefill forward; mel extraction is timed apart (the seed's data loader
did it before its clock started). TPOT is one decode step with the KV cache: the mean over the item's
steps after the first. Warm-up generations (``--warmup``) run before the timed set and are not counted.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PROG = "dramaturg eval audiollm"
SERVICE = "audiollm"
ASR, AAC = "asr", "audiocaption_v2"
TASK_OF_MODE = {"valid_asr": ASR, "submission_asr": ASR, "valid_aac": AAC, "submission_aac": AAC}
MODES = (*TASK_OF_MODE, "efficiency", "validate")
SUBMISSION_HEADER = ["testset_id", "text"]
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
SUBMISSION_FILE = "submission.csv"
TEST_ANNOTATION = "annotation_test.json"
_MAX_LISTED = 10


# ============================================================================================ data


@dataclass(frozen=True)
class EvalItem:
    """One annotation entry; ``text`` is the reference, "" where a test set has none (submissions)."""

    testset_id: str
    task: str
    path: Path
    text: str


def annotation_path(data: Path) -> Path:
    """``data`` itself, or a dataset folder's test annotation (``dramaturg data synth`` writes it under
    ``audiollm/``), so both the file and the corpus folder work as ``--data``."""
    if data.is_dir():
        from .data import annotation_file

        return annotation_file(data, TEST_ANNOTATION)
    if not data.is_file():
        raise FileNotFoundError(f"no annotation file or dataset folder at {data}")
    return data


def read_annotation(path: Path, tasks: Sequence[str] = ()) -> list[EvalItem]:
    """Every entry of ``tasks`` (all when empty), in file order.

    Unlike training's ``load_annotation`` nothing is left out for a missing text or a long clip: a
    submission must answer every id, and the model reads long audio window by window.
    """
    path = annotation_path(Path(path))
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["annotation"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a SALMONN annotation ({{\"annotation\": [...]}}): {exc}") from exc
    items: list[EvalItem] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        item = _entry_item(path, index, entry)
        if item.testset_id in seen:
            raise ValueError(f"{path}: testset_id {item.testset_id!r} appears more than once")
        seen.add(item.testset_id)
        if not tasks or item.task in tasks:
            items.append(item)
    return items


def _entry_item(path: Path, index: int, entry: Mapping[str, Any]) -> EvalItem:
    missing = [key for key in ("testset_id", "path", "task") if not str(entry.get(key) or "").strip()]
    if missing:
        raise ValueError(f"{path}: entry {index} has no {', '.join(missing)}")
    return EvalItem(
        testset_id=str(entry["testset_id"]).strip(),
        task=str(entry["task"]),
        path=path.parent / str(entry["path"]),
        text=str(entry.get("text") or "").strip(),
    )


# ============================================================================================ model


@dataclass
class LoadedModel:
    """A model with its processor, where it came from, and what generation needs from its config."""

    model: Any
    processor: Any
    device: str
    source: str
    eos_ids: frozenset[int]
    pad_id: int | None


def resolve_model(spec: str, home: Path | None = None) -> tuple[Path, str]:
    """(folder, description) for ``spec``: a model folder, or a model-store ref (``name``,
    ``name:version``; "" = the store's default) in ``home`` (``DRAMATURG_HOME`` when None)."""
    from dramaturg.shared.store import ModelStore

    folder, source, _ = ModelStore(home).resolve_folder_or_ref(SERVICE, spec)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    return folder, source


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str, device: str | None = None, home: Path | None = None) -> LoadedModel:
    """The model as the service loads it (``load_audiollm``, float32, eval mode) on ``device``."""
    from .model import load_audiollm

    folder, source = resolve_model(spec, home)
    device = device or default_device()
    model, processor = load_audiollm(folder, device=device)
    eos = model.config.text_config.eos_token_id
    eos_ids = frozenset(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None)
    log.info("loaded %s on %s", source, device)
    return LoadedModel(model, processor, device, source, eos_ids, processor.tokenizer.pad_token_id)


# ======================================================================================= generation


@dataclass
class Prediction:
    """One item's answer and how long it took (seconds; TPOT is None below two new tokens)."""

    testset_id: str
    task: str
    reference: str
    text: str
    completion_tokens: int
    finish_reason: str
    audio_seconds: float
    feature_seconds: float
    ttft_seconds: float | None
    tpot_seconds: float | None


def _synchronize(device: str) -> None:
    """Wait for queued GPU work, so a clock read after it measures the work, not its launch."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def generate_one(loaded: LoadedModel, item: EvalItem, audio: np.ndarray, max_new_tokens: int) -> Prediction:
    """Greedy generation for one item with the service's streamer timing the tokens.

    The clock starts once the Whisper features are on the device (the seed's TTFT starts at the
    encoders); the streamer's first token comes after the encoders, the prompt and the prefill, and
    every later one after one cached decode step. ``generate`` moves each token to the CPU before the
    streamer sees it, so on a GPU the token times are synchronised.
    """
    from .data import instruction_for
    from .generation import Sampling, TextDeltas

    began = time.perf_counter()
    inputs = loaded.processor(audio, instruction_for(item.task, "salmonn")).to(loaded.device)
    _synchronize(loaded.device)
    start = time.perf_counter()
    streamer = TextDeltas(loaded.processor.tokenizer)
    out = loaded.model.generate(
        **inputs, streamer=streamer, pad_token_id=loaded.pad_id,
        **Sampling(max_new_tokens=max_new_tokens).generate_kwargs(),
    )
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return Prediction(
        testset_id=item.testset_id,
        task=item.task,
        reference=item.text,
        text=streamer.text(),
        completion_tokens=len(new),
        finish_reason="stop" if new and new[-1] in loaded.eos_ids else "length",
        audio_seconds=audio.size / 16_000,
        feature_seconds=start - began,
        **token_timings(start, streamer.first_token_at, streamer.last_token_at, len(new)),
    )


def token_timings(start: float, first: float | None, last: float | None, tokens: int) -> dict[str, Any]:
    """TTFT and TPOT as the server's usage computes them, from the streamer's token times."""
    ttft = first - start if first is not None else None
    tpot = (last - first) / (tokens - 1) if tokens > 1 and first is not None and last is not None else None
    return {"ttft_seconds": ttft, "tpot_seconds": tpot}


class AudioCache:
    """Clips read once: an ASR and a caption item share a wav in SALMONN's layout."""

    def __init__(self) -> None:
        self._clips: dict[Path, np.ndarray] = {}

    def __call__(self, path: Path) -> np.ndarray:
        if path not in self._clips:
            from .data import read_audio

            if not path.is_file():
                raise FileNotFoundError(f"audio {path} (from the annotation) does not exist")
            self._clips[path] = read_audio(path)
        return self._clips[path]


def _progress(items: Sequence[EvalItem], show: bool, what: str) -> Iterator[EvalItem]:
    """``items`` with a rich progress bar on stderr when ``show`` and stderr is a terminal."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    if not show or not console.is_terminal:
        yield from items
        return
    yield from track(items, description=what, console=console, transient=True)


def run_items(loaded: LoadedModel, items: Sequence[EvalItem], max_new_tokens: int, *, warmup: int = 0,
              progress: bool = True) -> list[Prediction]:
    """Predictions for ``items`` in order, after ``warmup`` uncounted generations on the first item
    (the first calls pay for allocations and kernel selection, which the seed keeps out too)."""
    audio = AudioCache()
    if items and warmup:
        log.info("warm-up: %d generation(s) on %s", warmup, items[0].testset_id)
        for _ in range(warmup):
            generate_one(loaded, items[0], audio(items[0].path), max_new_tokens)
    return [
        generate_one(loaded, item, audio(item.path), max_new_tokens)
        for item in _progress(items, progress, f"generating ({len(items)} items)")
    ]


# ============================================================================================= ASR


def normaliser() -> Callable[[str], str]:
    """Whisper's English text normaliser (case, punctuation, numbers, British spellings, fillers)."""
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def asr_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Corpus-level WER = (S + D + I) / reference words, both sides normalised first."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    norm = normaliser()
    refs = [norm(r).strip() for r in references]
    hyps = [norm(h).strip() for h in hypotheses]
    words = jiwer.process_words(refs, hyps)
    reference_words = words.hits + words.substitutions + words.deletions
    if reference_words == 0:
        raise ValueError("the references hold no words after normalisation: WER is undefined")
    errors = words.substitutions + words.deletions + words.insertions
    return {
        "wer": errors / reference_words,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "hits": words.hits,
        "reference_words": reference_words,
        "items": len(refs),
        "normaliser": f"whisper_normalizer.english.EnglishTextNormalizer "
                      f"(whisper-normalizer {_package_version('whisper-normalizer')})",
    }


# ======================================================================================= captioning

_NOT_WORD = re.compile(r"[^\w\s']+")
CAPTION_TOKENISATION = (
    "lowercased, punctuation other than apostrophes removed, split on whitespace (aac-metrics' PTB "
    "tokenizer runs Java, so it is not used)"
)
# aac-metrics' Java metrics: the jar each needs under its cache folder
JAVA_JARS = {
    "meteor": Path("aac-metrics/meteor/meteor-1.5.jar"),
    "spice": Path("aac-metrics/spice/spice-1.0.jar"),
}


def caption_tokens(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def _java_major(java: str) -> int | None:
    """The major version ``java -version`` reports ("1.8.0" → 8, "17.0.15" → 17), None if it fails."""
    try:
        said = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', said)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def java_blocker(metric: str) -> str | None:
    """Why aac-metrics cannot run ``metric`` (METEOR / SPICE) here, or None when it can."""
    from aac_metrics.utils.checks import MAX_JAVA_MAJOR_VERSION, MIN_JAVA_MAJOR_VERSION
    from aac_metrics.utils.globals import _get_cache_path

    java = shutil.which(os.environ.get("AAC_METRICS_JAVA_PATH") or "java")
    if java is None:
        return "needs Java: no java executable on PATH"
    major = _java_major(java)
    if major is None or not MIN_JAVA_MAJOR_VERSION <= major <= MAX_JAVA_MAJOR_VERSION:
        return (f"needs Java {MIN_JAVA_MAJOR_VERSION}–{MAX_JAVA_MAJOR_VERSION} (aac-metrics' range); "
                f"{java} is Java {major if major is not None else '(version unreadable)'}")
    jar = Path(_get_cache_path()) / JAVA_JARS[metric]
    if not jar.is_file():
        return f"needs {jar}, which is not there (`aac-metrics-download` fetches it)"
    return None


def _corpus_score(result: Any, key: str) -> float:
    return float(result[0][key]) if isinstance(result, tuple) else float(result)


def caption_scores(candidates: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """BLEU-1/4, ROUGE-L, CIDEr-D (pure Python) and, where Java can run them, METEOR, SPICE and SPIDEr;
    ``skipped`` names each metric not computed and why. One reference per item, as in the seed."""
    from aac_metrics.functional.bleu import bleu
    from aac_metrics.functional.cider_d import cider_d
    from aac_metrics.functional.rouge_l import rouge_l

    if len(candidates) != len(references) or not candidates:
        raise ValueError(
            f"{len(candidates)} captions for {len(references)} references: need ≥ 1 of each, paired"
        )
    cands = [caption_tokens(c) for c in candidates]
    mrefs = [[caption_tokens(r)] for r in references]
    scores: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for n in (1, 4):
        scores[f"bleu_{n}"] = _corpus_score(bleu(cands, mrefs, n=n), f"bleu_{n}")
    scores["rouge_l"] = _corpus_score(rouge_l(cands, mrefs), "rouge_l")
    if len(cands) < 2:
        skipped["cider_d"] = "needs at least 2 items (its n-gram weights come from the whole set)"
    else:
        scores["cider_d"] = _corpus_score(cider_d(cands, mrefs), "cider_d")
    scores.update(_java_scores(cands, mrefs, skipped))
    if "spice" in scores and "cider_d" in scores:
        scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
    else:
        skipped["spider"] = "SPIDEr is the mean of CIDEr-D and SPICE: " + (
            skipped.get("spice") or skipped.get("cider_d") or "one is missing")
    return {**scores, "items": len(cands), "skipped": skipped, "tokenisation": CAPTION_TOKENISATION,
            "scorer": f"aac-metrics {_package_version('aac-metrics')}"}


def _java_scores(cands: list[str], mrefs: list[list[str]], skipped: dict[str, str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for metric in JAVA_JARS:
        reason = java_blocker(metric)
        if reason is not None:
            skipped[metric] = reason
            log.warning("%s skipped: %s", metric.upper(), reason)
            continue
        if metric == "meteor":
            from aac_metrics.functional.meteor import meteor as scorer
        else:
            from aac_metrics.functional.spice import spice as scorer
        scores[metric] = _corpus_score(scorer(cands, mrefs), metric)
    return scores


# ======================================================================================= efficiency


def percentiles(values: Iterable[float | None]) -> dict[str, float] | None:
    """p50 / p95 / mean / count over the values that exist; None when none does."""
    kept = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if kept.size == 0:
        return None
    return {"p50": float(np.percentile(kept, 50)), "p95": float(np.percentile(kept, 95)),
            "mean": float(kept.mean()), "count": int(kept.size)}


def reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> dict[str, Any]:
    """The GPU's peak allocation (the seed's figure), or on a CPU the process's peak RSS, said as such:
    it also holds Python, the libraries and the audio, so it is an upper bound on the model's share."""
    if str(device).startswith("cuda"):
        import torch

        return {"bytes": int(torch.cuda.max_memory_allocated(device)),
                "measure": "torch.cuda.max_memory_allocated (since the model was loaded)"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"bytes": int(rss_kib) * 1024,
            "measure": "process peak RSS (resource.getrusage ru_maxrss): the whole process, "
                       "not only the model"}


def efficiency_report(predictions: Sequence[Prediction], device: str, warmup: int) -> dict[str, Any]:
    return {
        "items": len(predictions),
        "warmup": warmup,
        "batch_size": 1,
        "device": device,
        "ttft_seconds": percentiles(p.ttft_seconds for p in predictions),
        "tpot_seconds": percentiles(p.tpot_seconds for p in predictions),
        "feature_seconds": percentiles(p.feature_seconds for p in predictions),
        "completion_tokens": percentiles(float(p.completion_tokens) for p in predictions),
        "peak_memory": peak_memory(device),
        "definitions": {
            "ttft": "audio encoders + prompt + prefill until the first token, features already on the device",
            "tpot": "one decode step with the KV cache: the mean of the item's steps after the first",
            "feature_seconds": "Whisper mel extraction and the copy to the device, outside TTFT",
        },
    }


# ======================================================================================= submission


def write_submission(path: Path, predictions: Sequence[Prediction]) -> Path:
    """The seed's CSV: header ``testset_id,text``, one row per item, UTF-8, minimal quoting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SUBMISSION_HEADER)
        writer.writerows([p.testset_id, p.text] for p in predictions)
    return path


def _listed(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _decode_csv(raw: bytes) -> tuple[str | None, list[str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [f"is not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}; save it as UTF-8"]
    if text.startswith("\ufeff"):
        return None, ["starts with a byte-order mark (UTF-8-SIG): the header would read '\\ufefftestset_id'"]
    return text, []


def _read_rows(text: str) -> tuple[dict[str, list[int]] | None, list[str]]:
    """testset_id → the lines it is on (None when the header is wrong: the rows mean nothing then), and
    the row-level errors (header, empty or malformed rows)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return None, ["is empty: expected the header 'testset_id,text'"]
    if header != SUBMISSION_HEADER:
        return None, [
            f"bad header {','.join(header)!r}: expected exactly 'testset_id,text' (those columns, that order)"
        ]
    lines: dict[str, list[int]] = {}
    errors: list[str] = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            errors.append(f"line {line}: empty row")
        elif len(row) != 2:
            errors.append(f"line {line}: {len(row)} fields, expected 2 (quote a text that holds commas)")
        elif not row[0].strip():
            errors.append(f"line {line}: empty testset_id")
        else:
            if not row[1].strip():
                errors.append(f"line {line}: empty text for {row[0]!r}")
            lines.setdefault(row[0], []).append(line)
    return lines, errors


def validate_submission(
    csv_path: str | Path, annotation_path: str | Path, tasks: Sequence[str] = ()
) -> list[str]:
    """Everything wrong with a submission CSV for the annotation's items of ``tasks`` (all when empty);
    an empty list means it is valid.

    The checks: UTF-8, the header ``testset_id,text``, no empty rows or fields, every expected id exactly
    once and no other id. The seed's validator also required ids like ``test0000``; the ids here are
    whatever the annotation holds, so they are checked against it instead.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return [f"{csv_path}: no such file"]
    expected = [item.testset_id for item in read_annotation(Path(annotation_path), tasks)]
    text, errors = _decode_csv(csv_path.read_bytes())
    if text is not None:
        try:
            lines, errors = _read_rows(text)
        except csv.Error as exc:
            lines, errors = None, [f"is not a readable CSV: {exc}"]
        if lines is not None:
            errors += _id_errors(lines, expected)
    return [f"{csv_path}: {e}" for e in errors]


def _id_errors(lines: Mapping[str, list[int]], expected: Sequence[str]) -> list[str]:
    errors = [f"testset_id {tid!r} appears {len(at)} times (lines {', '.join(map(str, at))})"
              for tid, at in lines.items() if len(at) > 1]
    known = set(expected)
    unknown = [tid for tid in lines if tid not in known]
    if unknown:
        errors.append(f"{len(unknown)} testset_id(s) not in the annotation: {_listed(unknown)}")
    missing = [tid for tid in expected if tid not in lines]
    if missing:
        errors.append(f"{len(missing)} testset_id(s) of the annotation missing: {_listed(missing)}")
    return errors


# ========================================================================================== running


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: what ``main`` parses, usable from Python as well."""

    mode: str
    data: Path
    output: Path
    model: str = ""
    device: str | None = None
    max_new_tokens: int = 128
    efficiency: bool = False
    warmup: int = 1
    limit: int = 0
    task: str | None = None
    progress: bool = True


def mode_tasks(config: EvalConfig) -> list[str]:
    if config.mode in TASK_OF_MODE:
        return [TASK_OF_MODE[config.mode]]
    return [config.task] if config.task else []


def evaluate(config: EvalConfig, home: Path | None = None) -> dict[str, Any]:
    """Run ``config``: generate, score, write ``results.json`` and ``predictions.jsonl`` (and the
    submission), and return the results."""
    if config.mode not in TASK_OF_MODE and config.mode != "efficiency":
        raise ValueError(f"mode {config.mode!r} does not generate; use one of {', '.join(MODES[:-1])}")
    started = time.perf_counter()
    data = annotation_path(config.data)
    items = read_annotation(data, mode_tasks(config))
    if config.limit:
        items = items[: config.limit]
    if not items:
        raise ValueError(f"{data} holds no items of task(s) {', '.join(mode_tasks(config)) or 'any'}")
    loaded = load_model(config.model, config.device, home)
    reset_peak_memory(loaded.device)
    timed = config.efficiency or config.mode == "efficiency"
    predictions = run_items(loaded, items, config.max_new_tokens, warmup=config.warmup if timed else 0,
                            progress=config.progress)
    results: dict[str, Any] = {
        "mode": config.mode,
        "model": loaded.source,
        "data": str(data),
        "device": loaded.device,
        "items": len(predictions),
        "decoding": {"strategy": "greedy", "max_new_tokens": config.max_new_tokens, "batch_size": 1},
    }
    results.update(_scores(config, data, predictions))
    if timed:
        results["efficiency"] = efficiency_report(predictions, loaded.device, config.warmup)
    results["seconds"] = time.perf_counter() - started
    write_results(config.output, results, predictions)
    return results


def _scores(config: EvalConfig, data: Path, predictions: Sequence[Prediction]) -> dict[str, Any]:
    texts = [p.text for p in predictions]
    refs = [p.reference for p in predictions]
    if config.mode.startswith("valid_"):
        unreferenced = [p.testset_id for p in predictions if not p.reference]
        if unreferenced:
            raise ValueError(f"{len(unreferenced)} item(s) have no reference text to score against "
                             f"({_listed(unreferenced)}): use a submission mode for an unlabelled test set")
        if config.mode == "valid_asr":
            return {"scores": asr_scores(refs, texts)}
        return {"scores": caption_scores(texts, refs)}
    if config.mode.startswith("submission_"):
        path = write_submission(config.output / SUBMISSION_FILE, predictions)
        errors = validate_submission(path, data, mode_tasks(config))
        return {"submission": {"path": str(path), "valid": not errors, "errors": errors}}
    return {}


def write_results(output: Path, results: Mapping[str, Any], predictions: Sequence[Prediction]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    (output / RESULTS_FILE).write_text(text, encoding="utf-8")
    with (output / PREDICTIONS_FILE).open("w", encoding="utf-8") as handle:
        for prediction in predictions:
            handle.write(json.dumps(asdict(prediction), ensure_ascii=False) + "\n")


# ========================================================================================== summary


def _ms(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "n/a"
    return f"p50 {stats['p50'] * 1000:.1f} ms, p95 {stats['p95'] * 1000:.1f} ms (n={stats['count']})"


def summary(results: Mapping[str, Any]) -> str:
    """A few lines for a person; results.json has everything."""
    lines = [f"{results['mode']}: {results['items']} item(s), model {results['model']}, {results['device']}"]
    scores = results.get("scores") or {}
    if "wer" in scores:
        lines.append(f"WER {scores['wer'] * 100:.2f} % (S {scores['substitutions']}, "
                     f"D {scores['deletions']}, I {scores['insertions']} "
                     f"over {scores['reference_words']} words)")
    elif scores:
        shown = [f"{k} {scores[k]:.4f}" for k in ("spider", "cider_d", "spice", "meteor", "bleu_1", "bleu_4",
                                                   "rouge_l") if k in scores]
        lines.append(", ".join(shown))
        lines += [f"skipped {name}: {why}" for name, why in scores.get("skipped", {}).items()]
    submission = results.get("submission")
    if submission:
        state = "valid" if submission["valid"] else "INVALID"
        lines.append(f"submission {submission['path']}: {state}")
        lines += [f"  {e}" for e in submission["errors"]]
    efficiency = results.get("efficiency")
    if efficiency:
        memory = efficiency["peak_memory"]
        lines.append(f"TTFT {_ms(efficiency['ttft_seconds'])}; TPOT {_ms(efficiency['tpot_seconds'])}")
        lines.append(f"peak memory {memory['bytes'] / 2**20:.1f} MiB ({memory['measure']})")
    return "\n".join(lines)


# ============================================================================================== CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score the audio LLM on a SALMONN annotation (WER, captioning), write or check a "
                    "submission CSV, or measure TTFT / TPOT.",
    )
    parser.add_argument("--mode", choices=MODES, default="valid_asr", help="what to run (default valid_asr)")
    parser.add_argument("--model", default="",
                        help="a model folder or a model-store ref NAME[:VERSION] (default: the store's "
                             "default audiollm model; DRAMATURG_HOME picks the store)")
    parser.add_argument("--data", type=Path,
                        help="a SALMONN annotation JSON, or a `dramaturg data synth` folder (its "
                             f"audiollm/{TEST_ANNOTATION})")
    parser.add_argument("--output", type=Path,
                        help="folder for results.json, predictions.jsonl, submission.csv")
    parser.add_argument("--submission", type=Path, help="--mode validate: the CSV to check")
    parser.add_argument("--task", choices=(ASR, AAC),
                        help="efficiency / validate: only this task's items (default: all)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per item (default 128)")
    parser.add_argument("--efficiency", action="store_true", help="add the TTFT / TPOT / memory report")
    parser.add_argument("--warmup", type=int, default=1,
                        help="uncounted generations before timing (default 1)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items (0: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="info logging")
    return parser


def _validate_command(args: argparse.Namespace) -> int:
    errors = validate_submission(args.submission, args.data, [args.task] if args.task else [])
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    print(f"{args.submission}: valid ({args.data})")
    return 0


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data is None:
        parser.error("--data is required")
    if args.mode == "validate" and args.submission is None:
        parser.error("--mode validate needs --submission CSV")
    if args.mode != "validate" and args.output is None:
        parser.error(f"--mode {args.mode} needs --output DIR")
    if args.max_new_tokens < 1 or args.warmup < 0 or args.limit < 0:
        parser.error("--max-new-tokens must be ≥ 1, --warmup and --limit ≥ 0")


def main(argv: list[str] | None = None) -> int:
    """``dramaturg eval audiollm``: 0 done (valid), 1 an invalid submission, 2 an error."""
    from dramaturg.shared.grpc.errors import ServiceError

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.mode == "validate":
            return _validate_command(args)
        config = EvalConfig(
            mode=args.mode, data=args.data, output=args.output, model=args.model, device=args.device,
            max_new_tokens=args.max_new_tokens, efficiency=args.efficiency, warmup=args.warmup,
            limit=args.limit, task=args.task, progress=not args.no_progress,
        )
        results = evaluate(config)
    except (ServiceError, FileNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(summary(results))
    print(f"results: {args.output / RESULTS_FILE}")
    submission = results.get("submission")
    return 1 if submission and not submission["valid"] else 0


if __name__ == "__main__":
    sys.exit(main())
