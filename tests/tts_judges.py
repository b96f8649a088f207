"""The TTS learning check's judges: does the model say the line, in the character's voice?

Both judges are models the TTS did not train (the issue's rule):

* **words** — pocketsphinx (tests/recogniser.py) transcribes held-out sentences spoken by the TTS and
  the same sentences read by espeak-ng with the character's voice settings (the audio the TTS learned
  from; pocketsphinx is weak on espeak-ng, so the TTS is judged relative to that reference, never in
  absolute terms); WER after Whisper's English normaliser, with jiwer;
* **voice** — the speaker service's encoder (a model trained by the speaker recipe on its own corpus)
  enrolls each cast character from their corpus clips and names, for every synthesised line, the cast
  member it sounds most like (cosine to the enrolled means): the share named right, chance 1 / cast.

``judge_tts`` runs both on four rows, side by side: espeak-ng's readings (the reference), the same
readings through the model's codec (the ceiling of any LM over that codec), the trained model, and the
untrained model (the same config and codec, the LM re-initialised); with each row's mean length and
the correlation of its lengths with the readings' and the share of lines it ended itself (before
``FRAME_ALLOWANCE`` × the reading's length): does it know when the line is over?

Run by hand on a finished learning check::

    .venv/bin/python tests/tts_judges.py CORPUS TTS_MODEL_FOLDER SPEAKER_MODEL_FOLDER
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CAST_SIZE = 4
LINES = 8  # held-out sentences, each spoken by every cast member
ENROLL_CLIPS = 6  # corpus clips per character for the enrolment mean
SPEAKER_RECIPES = "dramaturg.services.speaker.recipes:RECIPES"
RECOGNISER_ACCENT = "en-us"  # espeak-ng voice of the cast: pocketsphinx's model is US English
FRAME_ALLOWANCE = 1.5  # a synthesised line may run to 1.5 × the length of espeak-ng's reading


@dataclass(frozen=True)
class Spoken:
    """One line spoken by one cast member."""

    character: str  # the corpus speaker id (the TTS's speakers.json name)
    text: str
    audio: np.ndarray  # mono float32
    rate: int
    cut: bool = False  # the model was still speaking when the allowance ran out


def read_cast(
    corpus: Path, tts_speakers: Sequence[str], size: int = CAST_SIZE, accent: str = RECOGNISER_ACCENT
) -> list[Any]:
    """``size`` corpus voices (manifest.json) the TTS trained on: the recogniser's own accent first (its
    model is US English), as many of each gender, the driest (least reverb) first — the voices whose
    espeak-ng readings pocketsphinx hears best, so the words judge has room to tell good from bad."""
    from dramaturg.shared.data.voices import VoiceProfile

    names = {f.name for f in fields(VoiceProfile)}
    profiles = [
        VoiceProfile(**{k: (tuple(v) if k == "traits" else v) for k, v in s.items() if k in names})
        for s in json.loads((corpus / "manifest.json").read_text())["speakers"]
    ]
    trained_on = set(tts_speakers)
    known = [p for p in profiles if p.speaker_id in trained_on]
    if len(known) < size:
        raise ValueError(f"the TTS knows {len(known)} corpus voices, the judge needs {size}")
    ranked = sorted(known, key=lambda p: (p.accent != accent, p.reverb, p.speaker_id))
    cast: list[Any] = []
    for gender in ("male", "female"):
        cast += [p for p in ranked if p.gender == gender][: size // 2]
    cast += [p for p in ranked if p not in cast][: size - len(cast)]
    return cast


def espeak_reading(text: str, voice: Any, rate: int = 16_000) -> np.ndarray:
    """``text`` read by espeak-ng + sox with the character's neutral settings (the corpus renderer)."""
    from dramaturg.shared.data.render import Acting, render_line

    acting = Acting(
        emotion="neutral",
        pitch=voice.pitch,
        speed=voice.speed,
        amplitude=voice.amplitude,
        range_step=voice.range_step,
    )
    return render_line(text, voice, acting, sample_rate=rate).samples


def heldout_sentences(tree: Path, fraction: float, count: int = LINES) -> list[str]:
    """``count`` distinct held-out lines of the tree (texts training never saw), in a stable order."""
    from dramaturg.services.tts.collate import heldout_texts, normalise_text

    texts = sorted({lab.read_text().strip() for lab in tree.rglob("*.lab")})
    held = heldout_texts(texts, fraction)
    chosen = [text for text in texts if normalise_text(text) in held]
    return chosen[:count]


def untrained_like(model: Any, seed: int = 0) -> Any:
    """The same config with a fresh LM (backbone, depth decoder, embeddings) and the trained codec."""
    from transformers import CsmForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = CsmForConditionalGeneration(model.config)
    fresh.codec_model.load_state_dict(model.codec_model.state_dict())
    return fresh.eval()


def speak(model: Any, processor: Any, speakers: dict[str, int], references: Sequence[Spoken]) -> list[Spoken]:
    """Each reference's line in its character's voice (a fixed seed per line), at most
    ``FRAME_ALLOWANCE`` × the reference's length: a model that never stops is cut there, not at 10 s."""
    from dramaturg.services.tts.model import synthesize

    frame_rate = float(model.config.codec_config.frame_rate)
    out = []
    for i, ref in enumerate(references):
        frames = math.ceil(FRAME_ALLOWANCE * len(ref.audio) / ref.rate * frame_rate) + 1
        audio, rate = synthesize(
            model, processor, ref.text, speakers[ref.character], seed=i, max_new_frames=frames
        )
        spoken_frames = len(audio) / rate * frame_rate
        out.append(Spoken(ref.character, ref.text, audio, rate, cut=spoken_frames > frames - 0.5))
    return out


def through_codec(codec: Any, references: Sequence[Spoken]) -> list[Spoken]:
    """The references encoded to codes and decoded (the ceiling of any LM over this codec)."""
    from dramaturg.shared.audio import Audio, resample

    rate = int(codec.config.sampling_rate)
    out = []
    for ref in references:
        wave = torch.from_numpy(resample(Audio(ref.audio, ref.rate), rate).samples.astype(np.float32))
        with torch.no_grad():
            audio = codec.decode(codec.encode(wave[None, None]).audio_codes).audio_values[0, 0, : len(wave)]
        out.append(Spoken(ref.character, ref.text, audio.numpy(), rate))
    return out


def length_correlation(spoken: Sequence[Spoken], references: Sequence[Spoken]) -> float:
    """Pearson correlation of the spoken lengths with the references' (does the length follow the text?)."""
    ours = [len(s.audio) / s.rate for s in spoken]
    theirs = [len(r.audio) / r.rate for r in references]
    if np.std(ours) == 0 or np.std(theirs) == 0:
        return 0.0
    return float(np.corrcoef(ours, theirs)[0, 1])


def word_error_rate(spoken: Sequence[Spoken]) -> float:
    """pocketsphinx's WER over the lines (normalised as Whisper's English normaliser does)."""
    import jiwer
    from dramaturg.shared.audio import Audio, resample
    from recogniser import SAMPLE_RATE, transcribe
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    refs, hyps = [], []
    for s in spoken:
        heard = resample(Audio(s.audio, s.rate), SAMPLE_RATE).samples.astype(np.float32)
        refs.append(normalise(s.text))
        hyps.append(normalise(transcribe(heard)) if len(heard) else "")
    return float(jiwer.wer(refs, hyps))


class CastIdentifier:
    """The speaker encoder, each cast member enrolled as the mean of their corpus clips' embeddings."""

    def __init__(
        self, encoder_folder: str | Path, tree: Path, cast: Sequence[Any], clips: int = ENROLL_CLIPS
    ) -> None:
        from dramaturg.services.tts.codec_train import load_clip
        from dramaturg.shared.voice.encoder import SpeakerEncoder

        self.encoder = SpeakerEncoder.from_pretrained(str(encoder_folder)).eval()
        self.rate = int(self.encoder.config.sample_rate)
        self.names = [voice.speaker_id for voice in cast]
        means = []
        for name in self.names:
            wavs = sorted((tree / name).glob("*.wav"))[:clips]
            if not wavs:
                raise ValueError(f"no corpus clips for {name} under {tree}")
            vectors = self._embed([load_clip(w, self.rate) for w in wavs])
            mean = vectors.mean(axis=0)
            means.append(mean / np.linalg.norm(mean))
        self.enrolled = np.stack(means)

    def _embed(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        vectors = self.encoder.embed([np.asarray(w, dtype=np.float32) for w in waves])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-9)

    def accuracy(self, spoken: Sequence[Spoken]) -> float:
        """Share of lines whose nearest enrolled cast member is the intended one."""
        from dramaturg.shared.audio import Audio, resample

        waves = [resample(Audio(s.audio, s.rate), self.rate).samples for s in spoken]
        named = (self._embed(waves) @ self.enrolled.T).argmax(axis=1)
        return float(np.mean([self.names[i] == s.character for i, s in zip(named, spoken, strict=True)]))


def train_speaker_judge(folder: Path) -> Path:
    """The speaker service's ``demo`` recipe (ECAPA + AAM from scratch, about 2 minutes on 2 CPU cores) on
    its own synthetic corpus (other voices than the TTS corpus's); returns the published model's folder."""
    import yaml
    from dramaturg.services.speaker.recipes import PRESETS_DIR
    from dramaturg.shared.data.synth import SynthConfig, synthesize_corpus
    from dramaturg.shared.store import ModelStore
    from dramaturg.shared.training import TrainingRunner

    preset = yaml.safe_load((PRESETS_DIR / "demo.yaml").read_text())
    corpus = folder / "corpus"
    synthesize_corpus(corpus, SynthConfig(**preset["synth"]))
    store = ModelStore(folder / "state")
    runner = TrainingRunner(folder / "state", "speaker", SPEAKER_RECIPES, store)
    try:
        run = runner.start("demo", str(corpus), output_model="speaker-judge")
        final = runner.wait(run.run_id, timeout=1800)
    finally:
        runner.close()
    if final.state != "SUCCEEDED":
        raise RuntimeError(f"the speaker judge did not train: {final.error}")
    return Path(store.resolve("speaker", "speaker-judge").path)


def judge_tts(
    corpus: Path, tts_folder: str | Path, speaker_folder: str | Path, fraction: float, *, lines: int = LINES
) -> dict[str, Any]:
    """Both judges on the trained TTS, the untrained one and espeak-ng's own readings of the same lines."""
    from dramaturg.services.tts.model import load_tts_model
    from dramaturg.services.tts.voices import read_speakers

    tree = corpus / "tts"
    model, processor = load_tts_model(tts_folder)
    speakers = {name: int(i) for name, i in read_speakers(tts_folder).items()}
    cast = read_cast(corpus, list(speakers))
    texts = heldout_sentences(tree, fraction, lines)
    identify = CastIdentifier(speaker_folder, tree, cast)
    espeak = [Spoken(v.speaker_id, t, espeak_reading(t, v), 16_000) for v in cast for t in texts]
    rows = {
        "espeak": espeak,
        "codec": through_codec(model.codec_model, espeak),
        "trained": speak(model, processor, speakers, espeak),
        "untrained": speak(untrained_like(model), processor, speakers, espeak),
    }
    result: dict[str, Any] = {"cast": [v.speaker_id for v in cast], "lines": len(texts)}
    for name, spoken in rows.items():
        result[name] = {
            "wer": word_error_rate(spoken),
            "speaker_accuracy": identify.accuracy(spoken),
            "seconds": float(np.mean([len(s.audio) / s.rate for s in spoken])),
            "length_corr": length_correlation(spoken, espeak),
            "ended": float(np.mean([not s.cut for s in spoken])),
        }
    return result


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO)
    corpus, tts_folder, speaker_folder = (Path(a) for a in argv[:3])
    fraction = float(argv[3]) if len(argv) > 3 else 0.15
    print(json.dumps(judge_tts(corpus, tts_folder, speaker_folder, fraction), indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main(sys.argv[1:]))
