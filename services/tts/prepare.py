"""The data stages of a TTS training run: scan → normalise → extract codes → pack shards.

The fish-speech user's preparation, run inside the recipe on the run's dataset, each stage reported to
the run log (WatchTraining and ``worker.log``) and each one skipped or continued when a killed run is
resumed:

1. **scan** (:func:`~.dataset.scan_dataset`): every pair of the fish-speech tree, and every file left
   out with its reason (counts in the log; the full list in ``data/scan_issues.txt``);
2. **normalise** (:func:`~.dataset.normalize_loudness`): a copy of the tree at one EBU R128 loudness in
   ``data/normalized/`` (the user's files are never touched); clips already written are skipped;
3. **extract** (:func:`~.extract.extract_codes`): the codec's codes, ``clip.npy`` beside each
   normalised clip, in batches; clips that have their ``.npy`` are skipped;
4. **pack** (:func:`~.shards.build_shards`): fish-speech ``TextData`` shards in ``data/shards/``,
   marked done by ``data/shards/.built.json`` (a run killed while packing packs again).

Everything lives under the run's folder, so the codes always come from the codec this run trains
with. The dataset may be the corpus root that ``dramaturg data synth`` writes (its ``tts/`` folder is
used) or a fish-speech tree itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dramaturg.shared.store import atomic_write_json

from .collate import TtsItem, split_by_text
from .dataset import Pair, normalize_loudness, scan_dataset

DATA_DIR = "data"
SHARDS_DONE = ".built.json"
SHOWN_ISSUES = 20  # issues written to the event stream; all of them go to data/scan_issues.txt


def tts_root(path: Path | None) -> Path:
    """The fish-speech tree in a dataset folder: ``path/tts`` for a synthetic corpus, else ``path``."""
    if path is None:
        raise ValueError(
            "the TTS recipes read a local folder (dataset_uri): a fish-speech tree SPK/*.wav + .lab"
        )
    path = Path(path)
    return path / "tts" if (path / "tts").is_dir() else path


@dataclass
class PreparedAudio:
    """The normalised tree and its pairs (what the codec trains on and extraction reads)."""

    root: Path
    pairs: list[Pair]


def prepare_audio(ctx: Any, cfg: Mapping[str, Any]) -> PreparedAudio:
    """Stages 1 and 2: scan the dataset (report), loudness-normalise a copy (resumable)."""
    source = tts_root(ctx.dataset_path)
    data_dir = ctx.run_dir / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    scan = scan_dataset(source, min_seconds=float(cfg["min_seconds"]), max_seconds=float(cfg["max_seconds"]))
    head = scan.summary().splitlines()[0]
    ctx.log(f"scan: {head}")
    if scan.issues:
        (data_dir / "scan_issues.txt").write_text("".join(f"{issue}\n" for issue in scan.issues))
        for issue in scan.issues[:SHOWN_ISSUES]:
            ctx.log(f"scan: left out {issue}", "WARNING")
        if len(scan.issues) > SHOWN_ISSUES:
            ctx.log(
                f"scan: {len(scan.issues) - SHOWN_ISSUES} more in {data_dir / 'scan_issues.txt'}", "WARNING"
            )
    if not scan.pairs:
        raise ValueError(f"no usable clip under {source}: {head}")
    loud = normalize_loudness(scan.pairs, data_dir / "normalized", target_lufs=float(cfg["target_lufs"]))
    ctx.log(f"normalise: {loud.summary().splitlines()[0]} ({time.monotonic() - started:.1f} s with the scan)")
    for issue in loud.failed:
        ctx.log(f"normalise: left out {issue}", "WARNING")
    pairs = loud.pairs
    if not pairs:
        raise ValueError("loudness normalisation failed for every clip")
    return PreparedAudio(data_dir / "normalized", pairs)


def prepare_shards(ctx: Any, cfg: Mapping[str, Any], codec: Any, audio: PreparedAudio) -> Path:
    """Stages 3 and 4: codes beside every normalised clip (resumable), then shards (once)."""
    from .extract import extract_codes
    from .shards import build_shards

    shards = ctx.run_dir / DATA_DIR / "shards"
    done = shards / SHARDS_DONE
    if done.exists():
        ctx.log(f"extract + pack: already done ({json.loads(done.read_text())['summary']})")
        return shards
    report = extract_codes(
        codec, audio.pairs, batch_size=int(cfg["extract_batch_size"]), num_workers=int(cfg["extract_workers"])
    )
    ctx.log(f"extract: {report.summary().splitlines()[0]}")
    for issue in report.failed:
        ctx.log(f"extract: left out {issue}", "WARNING")
    packed = build_shards(audio.root, shards, overwrite=True)
    summary = packed.summary().splitlines()[0]
    ctx.log(f"pack: {summary}")
    for issue in packed.issues:
        ctx.log(f"pack: left out {issue}", "WARNING")
    if not packed.sentences:
        raise ValueError("no sentence was packed: nothing to train on")
    atomic_write_json(done, {"summary": summary, "sentences": packed.sentences, "speakers": packed.speakers})
    return shards


def load_items(shards: Path, speaker_map: Mapping[str, int]) -> list[TtsItem]:
    """Every utterance of the shards, with its CSM speaker id (codes kept as int16 when they fit)."""
    import numpy as np

    from .shards import iter_samples

    items = []
    for sample in iter_samples(shards):
        codes = sample.codes
        if codes.size and codes.max() < np.iinfo(np.int16).max:
            codes = codes.astype(np.int16)
        items.append(TtsItem(sample.speaker, int(speaker_map[sample.speaker]), sample.text, codes))
    return items


def speakers_in(shards: Path) -> list[str]:
    """Speaker names of the packed shards, sorted."""
    done = shards / SHARDS_DONE
    return sorted(json.loads(done.read_text())["speakers"])


def split_report(train: list[TtsItem], heldout: list[TtsItem]) -> str:
    lines = {it.text for it in heldout}
    return (
        f"{len(train)} training clips, {len(heldout)} held-out clips ({len(lines)} lines never in "
        f"training; split by a hash of the normalised text)"
    )


__all__ = [
    "DATA_DIR",
    "PreparedAudio",
    "load_items",
    "prepare_audio",
    "prepare_shards",
    "speakers_in",
    "split_by_text",
    "split_report",
    "tts_root",
]
