"""``speaker/``: a VoxCeleb-style tree, speaker lists, verification trials and the enrollment cast.

``wav/{speaker}/{session}/{n:05d}.wav`` holds each speaker's utterances through their session's
channel; ``train_speakers.txt`` / ``test_speakers.txt`` split the pool (held-out speakers only in test);
``trials.txt`` (``label a b``, VoxCeleb's layout) pairs held-out speakers only; ``enroll/`` holds the
neutral casting references and ``cast.json`` describes every speaker with them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import seeds
from ..corpus import RenderedCorpus
from . import Report
from .files import write_wav

DIR = "speaker"

Trial = tuple[int, str, str]
"""``(label, path_a, path_b)``: 1 when both utterances are by the same speaker."""


def write_voxceleb(out: Path, corpus: RenderedCorpus) -> Report:
    """Write the speaker tree under ``out/speaker``; report the trial counts."""
    plan, sr = corpus.plan, corpus.sample_rate
    spk_dir = out / DIR
    files: dict[str, list[str]] = {v.speaker_id: [] for v in plan.pool}
    for clip in corpus.clips_of("session"):
        write_wav(spk_dir / "wav" / clip.rel_path, clip.samples, sr)
        files[clip.voice.speaker_id].append(clip.rel_path)
    enroll = corpus.clips_of("enroll")
    for clip in enroll:
        write_wav(spk_dir / "enroll" / clip.rel_path, clip.samples, sr)
    spk_dir.mkdir(parents=True, exist_ok=True)
    (spk_dir / "train_speakers.txt").write_text("".join(v.speaker_id + "\n" for v in plan.train_pool))
    (spk_dir / "test_speakers.txt").write_text("".join(v.speaker_id + "\n" for v in plan.heldout_pool))
    trials = make_trials({s: files[s] for s in sorted(plan.heldout_ids)}, plan.config.seed)
    (spk_dir / "trials.txt").write_text("".join(f"{lab} {a} {b}\n" for lab, a, b in trials))
    cast = [
        {
            **v.to_dict(),
            "heldout": v.speaker_id in plan.heldout_ids,
            "enroll": [
                {"path": c.rel_path, "text": c.line.text}
                for c in enroll
                if c.voice.speaker_id == v.speaker_id
            ],
        }
        for v in plan.pool
    ]
    (spk_dir / "enroll").mkdir(parents=True, exist_ok=True)
    (spk_dir / "enroll" / "cast.json").write_text(json.dumps({"speakers": cast}, indent=1) + "\n")
    return {"trials": len(trials), "trials_target": sum(1 for t in trials if t[0] == 1)}


def make_trials(heldout_files: dict[str, list[str]], seed: int) -> list[Trial]:
    """Balanced trials among held-out speakers: every same-speaker pair, as many different-speaker pairs.

    Different-speaker pairs are drawn without replacement, so labels are balanced exactly whenever
    there are enough of them (there always are for ≥ 2 speakers with ≥ 2 utterances each).
    """
    rng = seeds.rng(seed, seeds.TRIALS)
    targets = [
        (1, a, b)
        for spk in sorted(heldout_files)
        for i, a in enumerate(heldout_files[spk])
        for b in heldout_files[spk][i + 1 :]
    ]
    spks = sorted(heldout_files)
    nontarget_pool = [
        (0, a, b)
        for i, s1 in enumerate(spks)
        for s2 in spks[i + 1 :]
        for a in heldout_files[s1]
        for b in heldout_files[s2]
    ]
    n = min(len(targets), len(nontarget_pool))

    def sample(items: list[Trial]) -> list[Trial]:
        return [items[i] for i in sorted(int(i) for i in rng.choice(len(items), size=n, replace=False))]

    targets, nontargets = sample(targets), sample(nontarget_pool)
    nontargets = [(lab, b, a) if rng.random() < 0.5 else (lab, a, b) for lab, a, b in nontargets]
    trials = targets + nontargets
    order = rng.permutation(len(trials))
    return [trials[int(i)] for i in order]
