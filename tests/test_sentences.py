"""The sentence grammar: thousands of distinct, speakable lines, the same on every machine, split by text
so that no dev/test sentence is ever heard in training — and wired into the corpus without changing a
``text_source="bank"`` corpus."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from dramaturg.shared.data import plan, scripts, sentences
from dramaturg.shared.data.config import SynthConfig
from dramaturg.shared.data.render import EMOTION_ACTING
from dramaturg.shared.data.synth import synthesize_corpus

BANK_SHA256 = "64f297480a0bfab27e55d71fbd7ec8ac2f02151fb8010178b629f2f473fa57ff"
"""The whole shipped bank (texts, in order). Changes when grammar.yaml does: update it on purpose, and
know that every grammar corpus of a given seed changes with it."""
FIRST_20_SHA256 = "5729cf016bc5e54905228c93e7abe294112b8a1d4ce2a86cf3665b38188adec9"
SPLIT_SIZES = {"train": 3802, "dev": 527, "test": 500}

BANK_PLAN_SHA256 = "76ac734d99cda8dd518a63d6b99506a953731a04eaa037542aa242607f7d8192"
"""Render keys and texts of SMALL's plan with the default ``text_source="bank"``, taken from the code
before text sources existed: the bank corpus must not change (its files were compared byte for byte)."""
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
TINY_GRAMMAR = SynthConfig(
    seed=3,
    num_speakers=4,
    heldout_speakers=2,
    scenes_train=1,
    scenes_dev=1,
    scenes_test=1,
    lines_per_scene=4,
    utterances_per_speaker=2,
    text_source="grammar",
)


# ------------------------------------------------------------------------------------------ the bank


def test_bank_has_thousands_of_distinct_speakable_lines():
    bank = sentences.default_sentences()
    keys = [s.key for s in bank]
    assert len(bank) >= 3000 and len(set(keys)) == len(bank)
    for s in bank:
        sentences.check_sentence(s.text)  # letters and ,.?!' only, 4-14 words, capitalised, terminated
        assert not re.search(r"\d", s.text + s.cue) and s.cue.strip()
        assert s.emotion in EMOTION_ACTING
        # no capitals but the first letter of a sentence and "I" (no proper names)
        for i, ch in enumerate(s.text):
            if ch.isupper() and i > 0:
                assert s.text[i - 2 : i] in (". ", "? ", "! ") or re.match(r"I\b", s.text[i:]), s.text
    emotions = collections.Counter(s.emotion for s in bank)
    assert set(emotions) == set(EMOTION_ACTING) and min(emotions.values()) >= 200
    ends = collections.Counter(s.text[-1] for s in bank)
    assert min(ends[p] for p in ".?!") >= 300  # statements, questions and exclamations


def test_every_word_is_in_the_recognisers_dictionary():
    """espeak-ng says any spelling, but a judge (and a real ASR) only knows dictionary words."""
    pocketsphinx = pytest.importorskip("pocketsphinx")
    dictionary = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    known = {line.split(" ", 1)[0] for line in dictionary.read_text(encoding="utf-8").splitlines()}
    words = {w for s in sentences.default_sentences() for w in s.key.split()}
    assert len(words) > 500 and sorted(words - known) == []


def test_bank_is_deterministic_and_pinned():
    again = sentences.generate_sentences(sentences.GRAMMAR_PATH)  # a fresh read and expansion
    assert again == sentences.default_sentences()
    assert sentences.bank_digest(again[:20]) == FIRST_20_SHA256
    assert sentences.bank_digest(again) == BANK_SHA256


def test_normalised_text():
    assert sentences.normalise_text("Hush, now!  Don't  'go'.") == "hush now don't go"
    assert sentences.normalise_text("We'll go.") != sentences.normalise_text("Well, go!")


def test_cap_keeps_combinations_by_hash(tmp_path):
    """Over the cap a template keeps a fixed subset, in combination order; growing the cap only adds."""
    grammar = _grammar_file(tmp_path, {"a": ["red", "blue", "green", "grey"], "b": ["cat", "dog", "hen"]})
    full = sentences.generate_sentences(grammar)
    assert len(full) == 12 and full[0].text == "The red cat is here."
    texts = [s.text for s in full]
    for cap in (3, 5, 8):
        capped = [s.text for s in sentences.generate_sentences(_grammar_file(tmp_path, None, cap=cap))]
        assert len(capped) == cap and capped == [t for t in texts if t in capped]
        smaller = [s.text for s in sentences.generate_sentences(_grammar_file(tmp_path, None, cap=cap - 1))]
        assert set(smaller) < set(capped)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"templates": {"angy": [{"text": "The {a} {b} is here.", "cue": "c"}]}}, "unknown emotion 'angy'"),
        ({"templates": {"sad": [{"text": "The {a} {b} is here.", "cue": "A {c}."}]}}, r"cue uses slot.*c"),
        ({"templates": {"sad": [{"text": "The {a} is here.", "cue": "c"}]}}, "used by no template: b"),
        ({"templates": {"sad": [{"text": "The {a} {b} {z}.", "cue": "c"}]}}, "no word list for slot"),
        ({"words": {"a": ["two"], "b": ["cat", "cat"]}}, r"words\.b repeats"),
        ({"words": {"a": ["nine", "9"], "b": ["cat"]}}, "must be letters"),
        ({"words": {"a": ["red"], "b": [" ".join(["cat"] * 12)]}}, r"16 words \(allowed 4-14\)"),
    ],
)
def test_grammar_rejects_what_would_speak_or_label_wrong(tmp_path, edit, message):
    doc = {
        "max_per_template": 10,
        "words": {"a": ["red"], "b": ["cat"]},
        "templates": {"sad": [{"text": "The {a} {b} is here.", "cue": "c"}]},
        **edit,
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=message):
        sentences.generate_sentences(path)


def test_second_draw_from_one_list_differs(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "max_per_template": 100,
                "words": {"town": ["mill", "farm", "inn"]},
                "templates": {"neutral": [{"text": "How far is the {town} from the {town#2}?", "cue": "c"}]},
            }
        )
    )
    texts = [s.text for s in sentences.generate_sentences(path)]
    assert len(texts) == 6 and "How far is the mill from the mill?" not in texts


# ----------------------------------------------------------------------------------------- the split


def test_split_is_disjoint_complete_and_stable():
    bank = sentences.default_sentences()
    split = sentences.split_sentences()
    assert list(split) == list(sentences.TEXT_SPLITS)
    assert {k: len(v) for k, v in split.items()} == SPLIT_SIZES
    keys = {name: {s.key for s in items} for name, items in split.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not keys[a] & keys[b], (a, b)
    assert sum(len(v) for v in split.values()) == len(bank)
    for name, items in split.items():
        members = set(items)
        assert items == [s for s in bank if s in members]  # bank order kept
        assert all(sentences.text_split(s.key) == name for s in items)
    # a sentence's split depends on its text alone: splitting a part of the bank (or a bigger bank)
    # never moves a sentence, so adding sentences to grammar.yaml reshuffles nothing
    part = bank[::3]
    in_part = set(part)
    assert sentences.split_sentences(part) == {k: [s for s in v if s in in_part] for k, v in split.items()}
    # a bigger dev share moves sentences from train to dev only; test stays as it was
    wider = sentences.split_sentences(dev_fraction=0.2)
    assert wider["test"] == split["test"] and set(split["dev"]) < set(wider["dev"])
    assert set(wider["train"]) < set(split["train"])
    with pytest.raises(ValueError, match="deduplicate"):
        sentences.split_sentences([bank[0], bank[0]])


def test_template_split_holds_out_whole_frames():
    """unit="template": every filling of a template is in one split, so held-out lines have unseen frames."""
    split = sentences.split_sentences(unit="template")
    frames = {name: {s.template for s in items} for name, items in split.items()}
    assert not frames["train"] & frames["test"] and not frames["train"] & frames["dev"]
    assert not frames["dev"] & frames["test"]
    assert all(frames.values()) and sum(len(v) for v in split.values()) == len(sentences.default_sentences())


# ------------------------------------------------------------------------------------ in the corpus


def test_config_dump_omits_the_default_source():
    """A bank config dumps as before the field existed (manifest bytes, train's corpus cache key)."""
    assert "text_source" not in SynthConfig().model_dump()
    grammar = SynthConfig(text_source="grammar")
    assert grammar.model_dump()["text_source"] == "grammar"
    assert SynthConfig(**grammar.model_dump()) == grammar
    with pytest.raises(ValueError):
        SynthConfig(text_source="web")


def test_bank_plan_is_unchanged():
    p = plan.plan_corpus(SMALL)
    rows = [[job.key, job.text] for job in p.render_jobs()]
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == BANK_PLAN_SHA256
    assert all(bank is p.bank for bank in p.texts.values())


def test_grammar_plan_draws_each_part_from_its_text_split():
    config = SMALL.model_copy(update={"text_source": "grammar", "scenes_dev": 2, "scenes_test": 2})
    p = plan.plan_corpus(config)
    split = sentences.split_sentences()
    texts = {name: {s.text for s in items} for name, items in split.items()}
    assert {k: len(v.lines) for k, v in p.texts.items()} == SPLIT_SIZES
    for scene in p.scenes:
        assert {t.line.text for t in scene.turns} <= texts[plan.SCENE_TEXT_SPLIT[scene.split]], scene.uri
    for voice in p.pool:
        lines = [*p.sessions[voice.speaker_id], *p.enrollment[voice.speaker_id]]
        expected = "test" if voice.speaker_id in p.heldout_ids else "train"
        assert {x.line.text for x in lines} <= texts[expected], voice.speaker_id
    # the acting follows each sentence's emotion; the settings still come from the script bank
    emotion = {s.text: s.emotion for s in sentences.default_sentences()}
    turns = [t for s in p.scenes for t in s.turns]
    assert all(t.acting.emotion == t.line.emotion == emotion[t.line.text] for t in turns)
    assert {s.setting for s in p.scenes} <= set(scripts.default_script_bank().settings)
    assert p == plan.plan_corpus(config)


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng and sox"
)
def test_tiny_grammar_corpus_keeps_evaluation_text_out_of_training(tmp_path):
    out = tmp_path / "corpus"
    manifest = synthesize_corpus(out, TINY_GRAMMAR)
    assert manifest["config"]["text_source"] == "grammar"
    assert manifest["text"] == {
        "source": "grammar",
        "split_by": "sentence",
        "sentences": len(sentences.default_sentences()),
        "splits": SPLIT_SIZES,
        "sha256": BANK_SHA256,
    }
    assert json.loads((out / "manifest.json").read_text())["text"] == manifest["text"]
    lab = out / "diarization" / "lab"
    spoken = {
        split: {
            sentences.normalise_text(json.loads(row)["text"])
            for f in sorted(lab.glob(f"{prefix}_*.jsonl"))
            for row in f.read_text().splitlines()
        }
        for split, prefix in (("train", "train"), ("dev", "dev"), ("test", "test"))
    }
    assert all(spoken.values())
    assert not spoken["train"] & (spoken["dev"] | spoken["test"]) and not spoken["dev"] & spoken["test"]
    for split, keys in spoken.items():
        assert {sentences.text_split(k) for k in keys} == {split}
    # the TTS tree: training speakers read training text, held-out speakers held-out text
    heldout = {s["speaker_id"] for s in manifest["speakers"] if s["heldout"]}
    for lab_file in (out / "tts").rglob("*.lab"):
        expected = "test" if lab_file.parent.name in heldout else "train"
        assert sentences.text_split(sentences.normalise_text(lab_file.read_text())) == expected, lab_file


def _grammar_file(tmp_path: Path, words: dict[str, list[str]] | None, *, cap: int = 100) -> Path:
    """A one-template grammar (``words`` as given, or as the last call wrote them)."""
    path = tmp_path / "g.yaml"
    if words is None:
        words = yaml.safe_load(path.read_text())["words"]
    doc = {
        "max_per_template": cap,
        "words": words,
        "templates": {"happy": [{"text": "The {a} {b} is here.", "cue": "A {b}."}]},
    }
    path.write_text(yaml.safe_dump(doc))
    return path
