"""The synthetic corpus: every format parses, runs are deterministic, labels match the audio; the bank
loads from its data file, the plan is pure, and every writer runs on its own."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from dramaturg.shared.cli import data as data_cli
from dramaturg.shared.data import plan, prosody, scripts
from dramaturg.shared.data.corpus import RenderedCorpus, render_corpus
from dramaturg.shared.data.prosody import REALISM_DIMENSIONS
from dramaturg.shared.data.render import add_noise
from dramaturg.shared.data.synth import PROTOCOL, SCRIPT_BANK, WRITERS, SynthConfig, synthesize_corpus
from dramaturg.shared.data.voices import make_voice_pool
from dramaturg.shared.data.writers import fish_speech, pyannote, salmonn, speech_drame, voxceleb
from dramaturg.shared.data.writers.manifest import write_manifest

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng and sox"
)

SR = 16000
SMALL = SynthConfig(
    seed=7,
    num_speakers=5,
    heldout_speakers=2,
    scenes_train=2,
    scenes_dev=1,
    scenes_test=1,
    lines_per_scene=6,
    utterances_per_speaker=3,
    overlap_probability=0.5,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    stages: list[tuple[str, int, int]] = []
    manifest = synthesize_corpus(out, SMALL, lambda s, d, t: stages.append((s, d, t)))
    assert stages and stages[-1][1] == stages[-1][2], "progress must end at its total"
    return out, manifest


def _rttm(path: Path) -> list[tuple[str, float, float, str]]:
    rows = []
    for line in path.read_text().splitlines():
        f = line.split()
        assert len(f) == 10 and f[0] == "SPEAKER" and f[2] == "1", line
        rows.append((f[1], float(f[3]), float(f[4]), f[7]))
    return rows


def _uris(root: Path, split: str) -> list[str]:
    return (root / "diarization" / "lists" / f"{split}.lst").read_text().split()


# ---------------------------------------------------------------------------------------- formats


def test_manifest_and_tree(corpus):
    out, manifest = corpus
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]
    assert manifest["config"] == SMALL.model_dump()
    c = manifest["counts"]
    assert c["scenes"] == {"train": 2, "development": 1, "test": 1}
    assert c["speakers"] == 5 and c["speaker_utterances"] == 5 * 3
    for sub in (
        "diarization/wav",
        "diarization/rttm",
        "diarization/uem",
        "diarization/lab",
        "speaker/wav",
        "speaker/enroll",
        "tts",
        "audiollm/wav",
        "evaluator/wav",
    ):
        assert (out / sub).is_dir(), sub


def test_diarization_protocol_loads(corpus):
    out, _ = corpus
    database = pytest.importorskip("pyannote.database")
    yml = out / "diarization" / "database.yml"
    spec = yaml.safe_load(yml.read_text())
    assert spec["Databases"] == {"Dramaturg": "wav/{uri}.wav"}
    database.registry.load_database(str(yml))
    protocol = database.registry.get_protocol(PROTOCOL, preprocessors={"audio": database.FileFinder()})
    files = list(protocol.train())
    assert [f["uri"] for f in files] == _uris(out, "train")
    for f in files:
        assert Path(f["audio"]).is_file()
        assert len(f["annotation"]) > 0 and f["annotated"].duration() > 0
        assert set(f["annotation"].labels()) <= {
            s["speaker_id"] for s in json.loads((out / "manifest.json").read_text())["speakers"]
        }
    assert len(list(protocol.development())) == 1 and len(list(protocol.test())) == 1


def test_rttm_uem_lab_consistent(corpus):
    out, _ = corpus
    d = out / "diarization"
    for split in ("train", "development", "test"):
        uris = _uris(out, split)
        joined = _rttm(d / f"{split}.rttm")
        assert {r[0] for r in joined} == set(uris)
        uem_lines = (d / f"{split}.uem").read_text().splitlines()
        assert [u.split()[0] for u in uem_lines] == uris
        for uri in uris:
            info = sf.info(str(d / "wav" / f"{uri}.wav"))
            assert info.samplerate == SR and info.channels == 1
            duration = info.frames / SR
            _, _, start, end = (d / "uem" / f"{uri}.uem").read_text().split()
            assert float(start) == 0.0 and abs(float(end) - duration) < 1e-5
            rows = _rttm(d / "rttm" / f"{uri}.rttm")
            assert rows == [r for r in joined if r[0] == uri]
            for _, onset, dur, _ in rows:
                assert dur > 0 and onset >= float(start) and onset + dur <= float(end) + 1e-6
            turns = [json.loads(x) for x in (d / "lab" / f"{uri}.jsonl").read_text().splitlines()]
            assert len(turns) == 6
            for t in turns:
                assert t["text"] in {s.text for s in SCRIPT_BANK} and 0 <= t["start"] < t["end"] <= duration
                # the turn's extent is exactly the union of its speaker's RTTM regions inside it
                mine = [r for r in rows if r[3] == t["speaker"] and t["start"] - 1e-6 <= r[1] < t["end"]]
                assert abs(mine[0][1] - t["start"]) < 1e-5
                assert abs(max(r[1] + r[2] for r in mine) - t["end"]) < 1e-5


def test_speaker_tree_lists_and_trials(corpus):
    out, manifest = corpus
    s = out / "speaker"
    train = s.joinpath("train_speakers.txt").read_text().split()
    test = s.joinpath("test_speakers.txt").read_text().split()
    assert len(test) == 2 and len(train) == 3 and not set(train) & set(test)
    wavs = sorted(p.relative_to(s / "wav").as_posix() for p in (s / "wav").rglob("*.wav"))
    assert len(wavs) == 15
    for w in wavs:
        assert re.fullmatch(r"id\d{5}/[A-Za-z0-9_-]{11}/\d{5}\.wav", w), w
    sessions = {w.rsplit("/", 1)[0] for w in wavs}
    assert all(len({x for x in sessions if x.startswith(spk)}) >= 2 for spk in train + test)
    trials = [line.split() for line in s.joinpath("trials.txt").read_text().splitlines()]
    assert trials
    for label, a, b in trials:
        assert (s / "wav" / a).is_file() and (s / "wav" / b).is_file() and a != b
        spk_a, spk_b = a.split("/")[0], b.split("/")[0]
        assert spk_a in test and spk_b in test, "trials must only use held-out speakers"
        assert label == ("1" if spk_a == spk_b else "0")
    labels = [t[0] for t in trials]
    assert labels.count("1") == labels.count("0")
    cast = json.loads((s / "enroll" / "cast.json").read_text())["speakers"]
    assert len(cast) == 5
    for spk in cast:
        assert spk["enroll"] and all((s / "enroll" / e["path"]).is_file() for e in spk["enroll"])
    # held-out speakers never appear in the training scenes either
    train_rttm = {r[3] for r in _rttm(out / "diarization" / "train.rttm")}
    assert train_rttm and not train_rttm & set(test)
    assert {x["speaker_id"] for x in manifest["speakers"] if x["heldout"]} == set(test)


def test_tts_and_audiollm(corpus):
    out, _ = corpus
    labs = sorted((out / "tts").rglob("*.lab"))
    assert len(labs) == 15
    for lab in labs:
        assert lab.with_suffix(".wav").is_file() and lab.read_text().strip()
        assert lab.parent.name.startswith("id")
    ann = json.loads((out / "audiollm" / "annotation.json").read_text())["annotation"]
    assert {a["task"] for a in ann} == {"asr", "audiocaption_v2"}
    assert len({a["testset_id"] for a in ann}) == len(ann)
    manifest = json.loads((out / "manifest.json").read_text())
    heldout = {x["speaker_id"] for x in manifest["speakers"] if x["heldout"]}
    for a in ann:
        assert not Path(a["path"]).is_absolute() and (out / "audiollm" / a["path"]).is_file()
        assert a["text"]
        assert a["heldout"] == (a["speaker"] in heldout)
    # Dev/test scenes may cast held-out voices (dev lands in the train file), so a check filters by the flag.
    assert heldout and {a["speaker"] for a in ann if a["split"] == "train" and a["heldout"]} <= heldout
    caps = [a["text"] for a in ann if a["task"] == "audiocaption_v2"]
    assert all(re.match(r"^An? .* with an? .* accent speaks ", c) for c in caps)


def test_evaluator_records(corpus):
    out, _ = corpus
    ev = out / "evaluator"
    realism = [json.loads(x) for x in (ev / "realism.jsonl").read_text().splitlines()]
    arche = [json.loads(x) for x in (ev / "archetype.jsonl").read_text().splitlines()]
    assert len(realism) == 4 * 6 and len(arche) == 15
    for r in realism:
        for key in ("id", "local_scene", "char_age", "char_style", "char_profile", "transcript", "wav_path"):
            assert isinstance(r[key], str) and r[key], key
        assert r["dataset_name"] == "ROLE" and (ev / r["wav_path"]).is_file()
        assert set(r["annotations"]) == set(REALISM_DIMENSIONS)
        for scores in r["annotations"].values():
            assert len(scores) == 6 and all(isinstance(v, int) and 1 <= v <= 5 for v in scores)
    for a in arche:
        assert a["dataset_name"] == "Arche" and a["question"] and (ev / a["wav_path"]).is_file()
        ann = a["annotations"]
        assert len(ann["content_pass"]) == 6 and all(isinstance(v, bool) for v in ann["content_pass"])
        for dim in ("audio_quality", "human_likeness", "appropriateness"):
            assert len(ann[dim]) == 6 and all(isinstance(v, int) and 1 <= v <= 5 for v in ann[dim])
    splits = {r["split"] for r in realism + arche}
    assert splits == {"train", "test"}
    n_split = sum(len((ev / f"realism_{s}.jsonl").read_text().splitlines()) for s in ("train", "test"))
    assert n_split == len(realism)
    # raters disagree but follow the measured label
    ref = np.array([r["reference"]["pitch_variation"] for r in realism])
    mean = np.array([np.mean(r["annotations"]["pitch_variation"]) for r in realism])
    assert np.corrcoef(ref, mean)[0, 1] > 0.7
    assert any(len(set(r["annotations"]["pitch_variation"])) > 1 for r in realism)
    # labels are not constant: the acting varies
    assert len({r["reference"]["pitch_variation"] for r in realism}) >= 3


def test_audio_quality_follows_measured_snr(corpus):
    out, _ = corpus
    arche = [json.loads(x) for x in (out / "evaluator" / "archetype.jsonl").read_text().splitlines()]
    snr = np.array([a["measures"]["snr_db"] for a in arche])
    quality = np.array([a["reference"]["audio_quality"] for a in arche])
    assert np.corrcoef(snr, quality)[0, 1] > 0.8


# ----------------------------------------------------------------------------------- RTTM vs audio


def _frame_agreement(x: np.ndarray, regions: list[tuple[int, int]], shift: int = 0) -> float:
    """Share of 50 ms frames (at least 100 ms from any reference boundary) where a simple energy VAD
    (noise floor + 6 dB, gaps under 150 ms filled) agrees with the reference."""
    hop = SR // 20
    n = len(x) // hop
    ref = np.zeros(len(x), dtype=bool)
    bounds = []
    for a, b in regions:
        ref[max(0, a + shift) : max(0, b + shift)] = True
        bounds += [a + shift, b + shift]
    db = 10 * np.log10(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    speech = ref[: n * hop].reshape(n, hop).mean(axis=1) >= 0.5
    vad = db > np.percentile(db, 5) + 6.0
    idx = np.flatnonzero(vad)
    for a, b in itertools.pairwise(idx):
        if 1 < b - a <= 4:
            vad[a:b] = True
    centre = (np.arange(n) + 0.5) * hop
    far = np.min(np.abs(centre[:, None] - np.asarray(bounds)[None, :]), axis=1) >= 0.1 * SR
    return float(np.mean((vad == speech)[far]))


def test_rttm_matches_audio_energy(corpus):
    out, _ = corpus
    d = out / "diarization"
    agree, shifted, jumps = [], [], []
    for split in ("train", "development", "test"):
        for uri in _uris(out, split):
            x, sr = sf.read(str(d / "wav" / f"{uri}.wav"))
            assert sr == SR
            regions = [
                (round(o * SR), round((o + du) * SR)) for _, o, du, _ in _rttm(d / "rttm" / f"{uri}.rttm")
            ]
            agree.append(_frame_agreement(x, regions))
            shifted.append(_frame_agreement(x, regions, shift=int(0.4 * SR)))
            ref = np.zeros(len(x), dtype=bool)
            for a, b in regions:
                ref[a:b] = True
            w = SR // 20
            for a, _ in regions:  # onsets after silence: energy must jump exactly at the RTTM onset
                if a >= 2 * w and not ref[a - 2 * w : a].any():
                    after = np.mean(x[a : a + w] ** 2)
                    before = np.mean(x[a - w : a] ** 2)
                    jumps.append(10 * np.log10(after / before))
    assert np.mean(agree) >= 0.95 and min(agree) >= 0.9, agree
    # the check has teeth: the same reference 0.4 s late disagrees clearly
    assert np.mean(shifted) < np.mean(agree) - 0.1, (shifted, agree)
    assert jumps and min(jumps) > 3.0 and np.median(jumps) > 10.0, jumps


def test_overlaps_exist_and_stay_sane(corpus):
    out, manifest = corpus
    d = out / "diarization"
    total_overlap = 0.0
    for split in ("train", "development", "test"):
        for uri in _uris(out, split):
            rows = _rttm(d / "rttm" / f"{uri}.rttm")
            n = max(round((o + du) * SR) for _, o, du, _ in rows) + 1
            count = np.zeros(n, dtype=np.int8)
            for spk in {r[3] for r in rows}:
                mine = np.zeros(n, dtype=np.int8)
                for _, o, du, s in rows:
                    if s == spk:
                        mine[round(o * SR) : round((o + du) * SR)] += 1
                assert mine.max() <= 1, f"{spk} overlaps itself in {uri}"
                count += mine
            assert count.max() <= 2, "at most two voices at once"
            total_overlap += float(np.sum(count == 2)) / SR
    assert total_overlap > 0.5
    assert abs(total_overlap - manifest["counts"]["overlap_s"]) < 0.01


# ------------------------------------------------------------------------------------- determinism


def test_cli_determinism_and_force(corpus, tmp_path):
    """The CLI with the same flags reproduces the fixture byte for byte; another seed does not."""
    out, _ = corpus
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    data_cli.register(sub)
    flags = [
        "--seed",
        "7",
        "--num-speakers",
        "5",
        "--heldout-speakers",
        "2",
        "--scenes-train",
        "2",
        "--scenes-dev",
        "1",
        "--scenes-test",
        "1",
        "--lines-per-scene",
        "6",
        "--utterances-per-speaker",
        "3",
        "--overlap-probability",
        "0.5",
    ]
    args = parser.parse_args(["data", "synth", str(tmp_path / "again"), *flags])
    assert data_cli.config_from_args(args) == SMALL
    assert args.func(args) == 0
    again = tmp_path / "again"
    for rel in (
        "diarization/train.rttm",
        "diarization/test.rttm",
        "diarization/wav/train_000.wav",
        "speaker/trials.txt",
        "evaluator/realism.jsonl",
        "tts/id10001/id10001_00000.wav",
    ):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    # an existing corpus is not overwritten without --force
    assert args.func(args) == 1
    # a different seed changes the data
    other = synthesize_corpus(tmp_path / "other", SMALL.model_copy(update={"seed": 8, "scenes_dev": 1}))
    assert other["config"]["seed"] == 8
    assert (tmp_path / "other/diarization/train.rttm").read_bytes() != (
        out / "diarization/train.rttm"
    ).read_bytes()


def test_cli_rejects_bad_config(tmp_path):
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["data", "synth", str(tmp_path / "x"), "--num-speakers", "3", "--heldout-speakers", "2"]
    )
    assert args.func(args) == 2
    assert not (tmp_path / "x").exists()


def test_voice_pool_distinct_and_stable():
    a, b = make_voice_pool(12, 3), make_voice_pool(12, 3)
    assert a == b and a != make_voice_pool(12, 4)
    assert [v.speaker_id for v in a] == [f"id{10001 + i}" for i in range(12)]
    assert len({v.espeak_voice for v in a}) == 12
    assert len({v.name for v in a}) == 12
    assert {v.gender for v in a} == {"male", "female"}


# ---------------------------------------------------------------------------------------- prosody


def _tone(freq_hz: np.ndarray | float, seconds: float = 1.5, amp: float | np.ndarray = 0.3) -> np.ndarray:
    n = int(seconds * SR)
    f = np.broadcast_to(np.asarray(freq_hz, dtype=np.float64), (n,))
    return amp * np.sin(2 * np.pi * np.cumsum(f) / SR)


def test_f0_tracker_accuracy_and_spread():
    _, f0 = prosody.f0_track(_tone(180.0), SR)
    voiced = f0[np.isfinite(f0)]
    assert len(voiced) > 0.9 * len(f0) and abs(np.median(voiced) - 180.0) < 2.0
    steady = prosody.f0_spread_st(f0)
    t = np.arange(int(1.5 * SR)) / SR
    _, f0_sweep = prosody.f0_track(_tone(120.0 * 2 ** (t / 1.5)), SR)  # one octave up
    sweep = prosody.f0_spread_st(f0_sweep)
    assert steady < 0.5 and 7.0 < sweep < 12.5
    # silence is unvoiced
    _, f0_sil = prosody.f0_track(np.zeros(SR), SR)
    assert not np.isfinite(f0_sil).any()


def test_loudness_range_and_stress_respond():
    n = int(3.0 * SR)
    t = np.arange(n) / SR
    steady = _tone(200.0, 3.0)
    alternating = _tone(200.0, 3.0, amp=np.where((t // 0.5) % 2 == 0, 0.3, 0.3 * 10 ** (-12 / 20)))
    flat = prosody.loudness_range_db(steady, SR)
    alt = prosody.loudness_range_db(alternating, SR)
    assert flat < 1.0 and alt > 8.0
    # syllables: 8 equal bursts vs the same with one burst 10 dB louder
    env = np.where((t % 0.25) < 0.15, 1.0, 0.0)
    bursts = steady * env
    louder = bursts.copy()
    louder[(t >= 1.0) & (t < 1.25)] *= 10 ** (10 / 20)
    assert len(prosody.energy_peaks(bursts, SR)) == 12  # one peak per 250 ms "syllable"
    plain = prosody.stress_contrast_db(prosody.energy_peaks(bursts, SR))
    stressed = prosody.stress_contrast_db(prosody.energy_peaks(louder, SR))
    assert plain < 1.0 and stressed > 5.0


def test_speech_regions_rate_pauses_and_snr():
    x = np.zeros(3 * SR)
    x[4000:20000] = _tone(150.0, 1.0)
    x[28000:44000] = _tone(150.0, 1.0)
    regions = prosody.detect_speech_regions(x, SR)
    assert len(regions) == 2
    assert abs(regions[0][0] - 4000) <= 2 and abs(regions[0][1] - 20000) <= 2
    assert abs(regions[1][0] - 28000) <= 2 and abs(regions[1][1] - 44000) <= 2
    text = "one two three four five six seven eight"
    m = prosody.measure_prosody(x, SR, text, regions)
    assert abs(m.speech_s - 2.0) < 0.01 and abs(m.pause_ratio - 0.5 / 2.5) < 0.01
    assert abs(m.rate_sps - prosody.count_syllables(text) / 2.0) < 0.05
    rng = np.random.default_rng(0)
    for snr in (10.0, 30.0):
        noisy = add_noise(x, snr, rng, regions)
        assert abs(prosody.estimate_snr_db(noisy, regions) - snr) < 2.0


def test_labels_follow_measures():
    base = prosody.measure_prosody(np.zeros(SR), SR, "hello")

    def labels(**changes):
        m = prosody.ProsodyMeasures(
            **{
                **base.__dict__,
                "f0_mean_hz": 150.0,
                "f0_mean_st": 7.0,
                "rate_sps": 4.5,
                "level_dbfs": -22.0,
                "voiced_ratio": 0.5,
                **changes,
            }
        )
        return prosody.realism_labels(m, emotion="neutral", style="Warm", speaker_f0_st=7.0, baseline=m)

    assert labels(f0_spread_st=1.0)["pitch_variation"] < labels(f0_spread_st=8.0)["pitch_variation"]
    assert labels(loudness_range_db=3.0)["dynamic_range"] < labels(loudness_range_db=16.0)["dynamic_range"]
    assert labels(rate_sps=4.5)["rhythmic_naturalness"] > labels(rate_sps=9.0)["rhythmic_naturalness"]
    assert (
        labels(f0_mean_st=7.2)["voice_identity_matching"] > labels(f0_mean_st=12.0)["voice_identity_matching"]
    )
    scores = prosody.rater_scores(3, np.random.default_rng(0), [0.0] * 6)
    assert len(scores) == 6 and all(1 <= s <= 5 for s in scores)


# ------------------------------------------------------------------------------ script bank and plan


def test_script_bank_loads_from_its_data_file():
    raw = yaml.safe_load(scripts.DEFAULT_PATH.read_text())
    bank = scripts.load_script_bank()
    assert scripts.DEFAULT_PATH.name == "scripts.yaml" and bank == scripts.default_script_bank()
    assert [(s.emotion, s.cue, s.text) for s in bank.lines] == [
        (emotion, item["cue"], item["text"]) for emotion, items in raw["lines"].items() for item in items
    ]
    assert list(bank.settings) == raw["settings"]
    assert bank.lines == SCRIPT_BANK and len(bank.lines) == 60 and len(bank.settings) == 12


def test_script_bank_rejects_what_would_render_wrong(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"settings": ["A room."], "lines": {"angy": [{"cue": "c", "text": "t"}]}}))
    with pytest.raises(ValueError, match="unknown emotion 'angy'"):
        scripts.load_script_bank(bad)
    bad.write_text(yaml.safe_dump({"settings": ["A room."], "lines": {"sad": [{"cue": "c"}]}}))
    with pytest.raises(ValueError, match=r"lines\.sad\[0\]"):
        scripts.load_script_bank(bad)


def _planned_lines(p: plan.CorpusPlan) -> list[plan.PlannedLine]:
    return [
        *(t for s in p.scenes for t in s.turns),
        *(x for lines in p.sessions.values() for x in lines),
        *(x for lines in p.enrollment.values() for x in lines),
    ]


def test_plan_is_pure_and_draws_from_the_bank(tmp_path):
    default = plan.plan_corpus(SMALL)
    assert default == plan.plan_corpus(SMALL)
    assert default != plan.plan_corpus(SMALL.model_copy(update={"seed": 8}))
    assert default.bank == scripts.default_script_bank()
    assert {x.line for x in _planned_lines(default)} <= set(SCRIPT_BANK)
    assert len(default.render_jobs()) == 4 * 6 + 5 * (3 + plan.ENROLL_LINES)
    # another bank file: every line and setting of the plan now comes from it
    own = tmp_path / "own.yaml"
    own.write_text(
        yaml.safe_dump(
            {
                "settings": ["A submarine.", "A tram."],
                "lines": {
                    "sad": [{"cue": "It sank.", "text": "It went down."}],
                    "happy": [
                        {"cue": "It floats.", "text": "Up she comes."},
                        {"cue": "Sun.", "text": "Look!"},
                    ],
                },
            }
        )
    )
    bank = scripts.load_script_bank(own)
    mine = plan.plan_corpus(SMALL, bank)
    assert {x.line for x in _planned_lines(mine)} == set(bank.lines)
    assert {s.setting for s in mine.scenes} <= {"A submarine.", "A tram."}
    assert [v.speaker_id for v in mine.pool] == [v.speaker_id for v in default.pool]


# ------------------------------------------------------------------------------------------- writers


@pytest.fixture(scope="module")
def rendered() -> RenderedCorpus:
    """SMALL's plan rendered once, outside synthesize_corpus, for the writers to share."""
    return render_corpus(plan.plan_corpus(SMALL))


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("write", "folder", "counts"),
    [
        (pyannote.write_pyannote, "diarization", set()),
        (voxceleb.write_voxceleb, "speaker", {"trials", "trials_target"}),
        (fish_speech.write_fish_speech, "tts", {"tts_clips"}),
        (salmonn.write_salmonn, "audiollm", {"audiollm_items"}),
        (speech_drame.write_speech_drame, "evaluator", {"realism_items", "archetype_items"}),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_each_writer_runs_on_its_own(write, folder, counts, rendered, corpus, tmp_path):
    """Alone, over a plan rendered apart, a writer makes exactly its own folder, byte-identical to the
    same folder of a full run: writers share no state and depend on no other writer."""
    full, manifest = corpus
    out = tmp_path / "alone"
    report = write(out, rendered)
    assert {p.name for p in out.iterdir()} == {folder}
    assert _files(out / folder) == _files(full / folder)
    for rel in sorted(_files(out / folder)):
        assert (out / folder / rel).read_bytes() == (full / folder / rel).read_bytes(), rel
    assert {k: report[k] for k in counts} == {k: manifest["counts"][k] for k in counts}
    if write is speech_drame.write_speech_drame:
        assert report["label_histogram"] == manifest["label_histogram"]


def test_manifest_writer_runs_on_its_own(rendered, corpus, tmp_path):
    full, manifest = corpus
    alone = write_manifest(tmp_path / "alone", rendered, {}, elapsed_s=1.0)
    assert _files(tmp_path / "alone") == {"manifest.json"}
    assert alone["paths"] == {} and "label_histogram" not in alone and "trials" not in alone["counts"]
    assert alone["speakers"] == manifest["speakers"] and alone["scenes"] == manifest["scenes"]
    # with every writer's report it is the full run's manifest, but for the wall time
    reports: dict = {}
    for write in WRITERS:
        reports.update(write(tmp_path / "all", rendered))
    again = write_manifest(tmp_path / "all", rendered, reports, elapsed_s=manifest["elapsed_s"])
    assert (tmp_path / "all" / "manifest.json").read_bytes() == (full / "manifest.json").read_bytes()
    assert again == manifest
