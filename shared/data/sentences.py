"""The sentence grammar: thousands of distinct drama lines, and a train/dev/test split by their text.

Why: the script bank (``scripts.yaml``) has a few dozen lines, so every split of a corpus built from
it speaks the same sentences. The TTS and audio-LLM services must be measured on text they never
trained on, which needs many more sentences and a split of the *text*, not only of the scenes. So
``grammar.yaml`` holds word lists and templates, and this module expands them into a fixed bank
(:func:`generate_sentences`) and splits it (:func:`split_sentences`).

Determinism: nothing here draws random numbers or depends on hash ordering. A template's sentences
are its slot combinations in file order; a template with more than ``max_per_template`` combinations
keeps those with the smallest SHA-256 of their normalised text; splits are SHA-256 buckets. The bank is
therefore the same bytes on every machine and Python or numpy version.

The split and near-duplicates: a sentence's split is a pure function of its normalised text (a
salted SHA-256 bucket), so adding words or templates never moves an existing sentence to another
split, and no text (normalised: lowercase, no punctuation) is in two splits. Near-duplicates — two
fillings of one template, "You sold my boat..." in train and "You sold my watch..." in test — ARE
allowed across splits by default: held-out text is then unseen sentences in familiar frames, which is
what the TTS and ASR checks need (a recogniser must not have memorised the exact line). For unseen
frames too, ``split_sentences(unit="template")`` puts every filling of a template in the same split.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .render import EMOTION_ACTING
from .scripts import ScriptLine

GRAMMAR_PATH = Path(__file__).with_name("grammar.yaml")
"""The grammar every bank is expanded from unless told otherwise (shipped as package data)."""
TEXT_SPLITS = ("train", "dev", "test")
"""The text splits, in the order :func:`split_sentences` returns them."""
DEV_FRACTION = 0.1
TEST_FRACTION = 0.1
"""Default shares of the held-out splits (of sentences, or of templates with ``unit="template"``)."""
MIN_WORDS, MAX_WORDS = 4, 14
"""Words per sentence: long enough to carry an emotion, short enough for one breath of a TTS clip."""

SplitUnit = Literal["sentence", "template"]

_SLOT = re.compile(r"\{([a-z_]+)(?:#([2-9]))?\}")
_TEXT = re.compile(r"[A-Z][A-Za-z ,.?!']*[.?!]")
_SENTENCE_START = re.compile(r"([.?!] )([a-z])")
_NOT_WORD = re.compile(r"[^a-z']+")
# Different salts for choosing a template's combinations and for splitting: with one hash, the
# combinations a capped template keeps (its smallest hashes) would all land in the same split.
_SELECT_SALT = b"dramaturg/grammar-select/1\0"
_SPLIT_SALT = b"dramaturg/text-split/1\0"


@dataclass(frozen=True)
class Sentence:
    """One generated line: its words, the emotion it is acted with, the situation that cues it, and the
    template it came from (its identity for template-level hold-out)."""

    text: str
    emotion: str
    cue: str
    template: str

    @property
    def key(self) -> str:
        """The normalised text: what distinctness and the split are decided on."""
        return normalise_text(self.text)

    def script_line(self) -> ScriptLine:
        """As a script-bank line, so the corpus plan can draw it like any other."""
        return ScriptLine(emotion=self.emotion, cue=self.cue, text=self.text)


@dataclass(frozen=True)
class Template:
    """A line with ``{slot}`` holes, the emotion it is acted with and its cue (same slots or fewer)."""

    emotion: str
    text: str
    cue: str

    @property
    def slots(self) -> tuple[str, ...]:
        """The slot tokens of the text (``list`` or ``list#2``), first appearance first."""
        return tuple(dict.fromkeys(m.group(0)[1:-1] for m in _SLOT.finditer(self.text)))


@dataclass(frozen=True)
class Grammar:
    """Word lists and templates (in file order) and the cap on sentences per template."""

    words: Mapping[str, tuple[str, ...]]
    templates: tuple[Template, ...]
    max_per_template: int


def normalise_text(text: str) -> str:
    """Lowercase words separated by single spaces, punctuation dropped.

    An apostrophe inside a word is kept: "we'll" and "well" are different lines (and different
    dictionary entries), and dropping it would merge them.
    """
    words = (w.strip("'") for w in _NOT_WORD.split(text.lower()))
    return " ".join(w for w in words if w)


def load_grammar(path: str | Path | None = None) -> Grammar:
    """Read and validate a grammar (default: :data:`GRAMMAR_PATH`).

    Raises ValueError naming the file and the entry: an unknown emotion, an undefined or unused word
    list, or a cue slot the text lacks would otherwise produce wrong labels or silently dead data.
    """
    source = Path(path) if path is not None else GRAMMAR_PATH
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(doc, Mapping) or set(doc) != {"max_per_template", "words", "templates"}:
        raise ValueError(f"{source}: expected exactly the keys 'max_per_template', 'words' and 'templates'")
    cap = doc["max_per_template"]
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"{source}: 'max_per_template' must be a positive integer")
    words = _word_lists(source, doc["words"])
    templates = _templates(source, doc["templates"], words)
    used = {_list_of(slot) for t in templates for slot in t.slots}
    unused = [name for name in words if name not in used]
    if unused:
        raise ValueError(f"{source}: word lists used by no template: {', '.join(unused)}")
    return Grammar(words=words, templates=tuple(templates), max_per_template=cap)


@functools.cache
def default_grammar() -> Grammar:
    """The shipped grammar, read once per process."""
    return load_grammar()


def expand_template(template: Template, grammar: Grammar) -> list[Sentence]:
    """The template's sentences: every slot combination (one list's slots never repeat a word), or,
    over the cap, the ``max_per_template`` with the smallest selection hash, still in combination order.

    Raises ValueError on a sentence that breaks the rules (characters, 4-14 words): a grammar bug is
    fixed in the file, not filtered away.
    """
    slots = template.slots
    filled: list[tuple[str, str]] = []
    for values in itertools.product(*(grammar.words[_list_of(s)] for s in slots)):
        binding = dict(zip(slots, values, strict=True))
        if _repeats_a_word(binding):
            continue
        filled.append((_fill(template.text, binding), _fill(template.cue, binding)))
    for text, _ in filled:  # all of them, so that a change of cap or word list cannot expose a bad one
        check_sentence(text, where=f"template {template.text!r}")
    if len(filled) > grammar.max_per_template:
        ranked = sorted(range(len(filled)), key=lambda i: _digest(_SELECT_SALT, normalise_text(filled[i][0])))
        keep = sorted(ranked[: grammar.max_per_template])
        filled = [filled[i] for i in keep]
    return [Sentence(text, template.emotion, cue, template.text) for text, cue in filled]


def check_sentence(text: str, *, where: str = "sentence") -> None:
    """Raise ValueError unless ``text`` is one line a TTS and a recogniser handle as is: letters and
    ``,.?!'`` only (no digits to verbalise), capitalised, 4-14 words, ending in ``.``, ``?`` or ``!``."""
    if not _TEXT.fullmatch(text) or "  " in text:
        raise ValueError(f"{where}: {text!r} must be letters, spaces and ,.?!' ending in . ? or !")
    n = len(text.split())
    if not MIN_WORDS <= n <= MAX_WORDS:
        raise ValueError(f"{where}: {text!r} has {n} words (allowed {MIN_WORDS}-{MAX_WORDS})")


def generate_sentences(grammar: Grammar | str | Path | None = None) -> tuple[Sentence, ...]:
    """The bank: every template's sentences in file order, each normalised text once (first wins)."""
    if not isinstance(grammar, Grammar):
        grammar = default_grammar() if grammar is None else load_grammar(grammar)
    seen: set[str] = set()
    bank: list[Sentence] = []
    for template in grammar.templates:
        for sentence in expand_template(template, grammar):
            if sentence.key not in seen:
                seen.add(sentence.key)
                bank.append(sentence)
    return tuple(bank)


@functools.cache
def default_sentences() -> tuple[Sentence, ...]:
    """The shipped grammar's bank, expanded once per process."""
    return generate_sentences()


def text_split(key: str, *, dev_fraction: float = DEV_FRACTION, test_fraction: float = TEST_FRACTION) -> str:
    """The split of one split key (a normalised sentence, or a template's text): ``test`` below
    ``test_fraction`` of the hash range, then ``dev``, then ``train``.

    Fixed intervals of a salted SHA-256: growing ``dev_fraction`` moves sentences only from train to
    dev, and the test split depends on ``test_fraction`` alone.
    """
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction > 1:
        raise ValueError("dev_fraction and test_fraction must be >= 0 and add up to at most 1")
    u = _digest(_SPLIT_SALT, key) / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + dev_fraction:
        return "dev"
    return "train"


def split_sentences(
    sentences: Iterable[Sentence] | None = None,
    *,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float = TEST_FRACTION,
    unit: SplitUnit = "sentence",
) -> dict[str, list[Sentence]]:
    """``{"train": [...], "dev": [...], "test": [...]}``: the bank (default: the shipped one), each
    sentence in exactly one split, bank order kept within a split.

    ``unit="sentence"`` (default) decides each sentence by its normalised text: exact texts never
    cross splits, near-duplicates may (see the module docstring). ``unit="template"`` decides by the
    template, so held-out sentences also have held-out frames. Raises ValueError when two sentences
    share a normalised text (a bank not made by :func:`generate_sentences`): they could not be kept apart.
    """
    items = default_sentences() if sentences is None else tuple(sentences)
    keys = [s.key for s in items]
    if len(set(keys)) != len(keys):
        raise ValueError("sentences repeat a normalised text; deduplicate them before splitting")
    splits: dict[str, list[Sentence]] = {name: [] for name in TEXT_SPLITS}
    for s, key in zip(items, keys, strict=True):
        by = key if unit == "sentence" else s.template
        splits[text_split(by, dev_fraction=dev_fraction, test_fraction=test_fraction)].append(s)
    return splits


def bank_digest(sentences: Sequence[Sentence] | Sequence[ScriptLine]) -> str:
    """SHA-256 of the texts, one a line, in order: names a bank in a manifest, pins it in a test."""
    return hashlib.sha256("".join(s.text + "\n" for s in sentences).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------- internals


def _list_of(slot: str) -> str:
    """The word list a slot token draws from (``kin#2`` → ``kin``)."""
    return slot.split("#", 1)[0]


def _repeats_a_word(binding: Mapping[str, str]) -> bool:
    """Two slots of one list with the same word (``{kin}`` and ``{kin#2}`` must differ)."""
    chosen = [(_list_of(slot), word) for slot, word in binding.items()]
    return len(set(chosen)) != len(chosen)


def _fill(pattern: str, binding: Mapping[str, str]) -> str:
    """Slots replaced by their words; the first letter, and any after ``. `` ``? `` ``! ``, capitalised."""
    text = _SLOT.sub(lambda m: binding[m.group(0)[1:-1]], pattern)
    text = text[:1].upper() + text[1:]
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _digest(salt: bytes, key: str) -> int:
    """The first 64 bits of SHA-256(salt + key): stable across machines and Python versions."""
    return int.from_bytes(hashlib.sha256(salt + key.encode("utf-8")).digest()[:8], "big")


def _word_lists(source: Path, raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{source}: 'words' must map list names to lists of words")
    words: dict[str, tuple[str, ...]] = {}
    for name, items in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"{source}: word list name {name!r} must be lowercase letters and _")
        if not isinstance(items, list) or not items or not all(isinstance(w, str) and w for w in items):
            raise ValueError(f"{source}: words.{name} must be a non-empty list of non-empty strings")
        if len(set(items)) != len(items):
            raise ValueError(f"{source}: words.{name} repeats a word")
        words[name] = tuple(items)
    return words


def _templates(source: Path, raw: Any, words: Mapping[str, tuple[str, ...]]) -> list[Template]:
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{source}: 'templates' must map emotions to lists of templates")
    templates: list[Template] = []
    for emotion, items in raw.items():
        if emotion not in EMOTION_ACTING:
            known = ", ".join(EMOTION_ACTING)
            raise ValueError(f"{source}: unknown emotion {emotion!r} (the renderer acts: {known})")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{source}: templates.{emotion} must be a non-empty list")
        for i, item in enumerate(items):
            where = f"{source}: templates.{emotion}[{i}]"
            if not isinstance(item, Mapping) or set(item) != {"text", "cue"}:
                raise ValueError(f"{where} must have exactly 'text' and 'cue'")
            text, cue = item["text"], item["cue"]
            if not isinstance(text, str) or not isinstance(cue, str) or not text.strip() or not cue.strip():
                raise ValueError(f"{where}: 'text' and 'cue' must be non-empty strings")
            template = Template(emotion=emotion, text=text, cue=cue)
            missing = [s for s in template.slots if _list_of(s) not in words]
            if missing:
                raise ValueError(f"{where}: no word list for slot(s) {', '.join(missing)}")
            extra = {m.group(0)[1:-1] for m in _SLOT.finditer(cue)} - set(template.slots)
            if extra:
                raise ValueError(f"{where}: the cue uses slot(s) the text lacks: {', '.join(sorted(extra))}")
            templates.append(template)
    return templates
