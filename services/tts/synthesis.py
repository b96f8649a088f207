"""What a synthesis request means, checked, and how its audio goes out: the parts of serving TTS that
need no gRPC context and no model thread.

:func:`check_text` refuses text the model cannot read *before* it waits for the model: a character the
tokenizer maps to ``<unk>`` would be spoken as noise (the message says which characters), and a
special-token string (``<eos>``, ``<|AUDIO|>``) inside the text would be read as that token and
break the prompt's layout. :func:`sampling` turns the request's zero-means-default numbers into the
values ``generate`` gets. :class:`OutputFormat` says what comes back (encoding and rate) and
:class:`StreamEncoder` encodes streamed chunks so that their concatenation is the whole synthesis:
resampling runs through one ``soxr.ResampleStream`` (its output equals a whole ``soxr.resample``),
and a streamed WAV starts with a header whose sizes say "unknown" (0xFFFFFFFF, what streaming
servers send; libsndfile and FFmpeg read such files to their end).

:class:`StopCheck` is how a deadline or a cancelled call stops generation: CSM's ``generate`` drops
every custom ``StoppingCriteria`` (it keeps only its max-length one and logs "Csm does not support
… stopping criteria, it will be ignored"), but it runs the logits processors once per generated
frame, so the check lives there and raises :class:`~dramaturg.shared.cancellation.Stopped`.
"""

from __future__ import annotations

import math
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.cancellation import ShouldStop, Stopped
from dramaturg.shared.grpc.errors import echo, invalid_argument
from prometheus_client import Counter, Histogram

Enc = common_pb2.AudioEncoding

#: Encodings Synthesize returns (UNSPECIFIED = WAV) and the ones SynthesizeOnline can stream.
WHOLE_ENCODINGS = (Enc.WAV, Enc.LINEAR_PCM_S16LE, Enc.LINEAR_PCM_F32LE, Enc.FLAC, Enc.OGG, Enc.MP3)
STREAM_ENCODINGS = (Enc.WAV, Enc.LINEAR_PCM_S16LE, Enc.LINEAR_PCM_F32LE)
_MAX_LISTED = 10  # characters named in one error

# -- metrics: the shared families (dramaturg_real_time_factor, dramaturg_audio_seconds_total, the
# limiter's dramaturg_queue_depth) plus what only a generator has.
TIME_TO_FIRST_AUDIO = Histogram(
    "dramaturg_tts_time_to_first_audio_seconds",
    "From the request's arrival to its first audio sent (Synthesize: the whole response).",
    ("method",),
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
FRAMES_PER_SECOND = Histogram(
    "dramaturg_tts_frames_per_second",
    "Codec frames generated per second of generation (12.5 frames = 1 s of Mimi audio).",
    ("method",),
    buckets=(1, 2.5, 5, 10, 12.5, 20, 30, 50, 75, 100, 200, 500, 1000),
)
FRAMES = Counter("dramaturg_tts_generated_frames_total", "Codec frames generated.", ("method",))


@dataclass(frozen=True)
class TextRules:
    """What text a loaded model accepts: its tokenizer's unknown id and special tokens."""

    max_chars: int
    unk_token_id: int | None
    special_tokens: tuple[str, ...]


def text_rules(tokenizer: Any, max_chars: int) -> TextRules:
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    specials |= {str(t) for t in getattr(tokenizer, "get_added_vocab", dict)()}
    return TextRules(max_chars, tokenizer.unk_token_id, tuple(sorted(t for t in specials if t)))


def _name(char: str) -> str:
    return f"{char!r} (U+{ord(char):04X} {unicodedata.name(char, 'unnamed')})"


def check_text(text: str, field_path: str, rules: TextRules, tokenizer: Any) -> str:
    """``text`` if the model can speak it, else INVALID_ARGUMENT on ``field_path`` saying what to change.

    ``tokenizer`` is a copy the event loop may use (a fast tokenizer shared with the model thread can
    fail with "Already borrowed" when both use it at once).
    """
    if not text.strip():
        raise invalid_argument(field_path, "is empty: send the words to speak")
    if len(text) > rules.max_chars:
        raise invalid_argument(
            field_path,
            f"is {len(text)} characters long; at most {rules.max_chars} per request (send one line of "
            "dialogue per request, or stream them one after another)",
        )
    controls = sorted({c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"})
    if controls:
        named = ", ".join(_name(c) for c in controls[:_MAX_LISTED])
        raise invalid_argument(field_path, f"holds control characters the model cannot speak: {named}")
    specials = [t for t in rules.special_tokens if t in text]
    if specials:
        raise invalid_argument(
            field_path,
            f"holds the model's special token(s) {', '.join(echo(t) for t in specials[:_MAX_LISTED])}; "
            "they would be read as prompt structure, not words: remove them",
        )
    if rules.unk_token_id is not None:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        unknown: list[str] = []
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            if token == rules.unk_token_id:
                unknown.extend(c for c in text[start:end] if c not in unknown)
        if unknown:
            named = ", ".join(_name(c) for c in unknown[:_MAX_LISTED])
            more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
            raise invalid_argument(
                field_path,
                f"holds characters this model's tokenizer cannot represent: {named}{more}; spell them out "
                "or remove them",
            )
    return text


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings for ``model.synthesize``."""

    max_new_frames: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int


def sampling(config: Any, settings: Any, seed: int) -> Sampling:
    """The request's numbers with 0 = the settings' default; INVALID_ARGUMENT on nonsense."""
    temperature = float(config.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid_argument(
            "config.temperature", f"{temperature:g} is not a temperature: use a number > 0 (0 = the default)"
        )
    top_p = float(config.top_p)
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise invalid_argument("config.top_p", f"{top_p:g} is outside (0, 1] (0 = the default)")
    if config.top_k < 0:
        raise invalid_argument("config.top_k", f"{config.top_k} is negative: use ≥ 1 (0 = the default)")
    frames = int(config.max_new_tokens)
    if frames < 0:
        raise invalid_argument("config.max_new_tokens", f"{frames} is negative (0 = the default)")
    if frames > settings.max_new_tokens:
        raise invalid_argument(
            "config.max_new_tokens",
            f"{frames} is above this service's cap of {settings.max_new_tokens} frames "
            f"({settings.max_new_tokens / 12.5:g} s at 12.5 frames a second); split the text",
        )
    top_p = top_p or settings.default_top_p
    top_k = int(config.top_k) or settings.default_top_k
    return Sampling(
        max_new_frames=frames or settings.default_max_new_tokens,
        temperature=temperature or settings.default_temperature,
        top_p=top_p if 0 < top_p < 1 else None,
        top_k=top_k or None,
        seed=seed,
    )


@dataclass(frozen=True)
class OutputFormat:
    encoding: int
    sample_rate: int


def output_format(config: Any, model_rate: int, allowed_rates: list[int], *, streaming: bool) -> OutputFormat:
    """The encoding and rate a request asks for, refused with the list of what is possible."""
    encoding = int(config.encoding) or Enc.WAV
    allowed = STREAM_ENCODINGS if streaming else WHOLE_ENCODINGS
    if encoding not in allowed:
        names = ", ".join(Enc.Name(e) for e in allowed)
        known = Enc.Name(encoding) if encoding in Enc.values() else str(encoding)
        hint = " (compressed formats need the whole audio: use Synthesize)" if streaming else ""
        raise invalid_argument("config.encoding", f"{known} is not supported here; use one of {names}{hint}")
    rate = int(config.sample_rate_hz) or model_rate
    rates = sorted({model_rate, *allowed_rates})
    if rate not in rates:
        raise invalid_argument(
            "config.sample_rate_hz",
            f"{rate} Hz is not offered; use 0 (the model's {model_rate} Hz) or one of {rates}",
        )
    return OutputFormat(encoding, rate)


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono PCM WAV header whose RIFF and data sizes say "unknown" (0xFFFFFFFF)."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    unknown = struct.pack("<I", 0xFFFFFFFF)
    return b"RIFF" + unknown + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + unknown


def pcm_bytes(samples: np.ndarray, encoding: int) -> bytes:
    """Raw little-endian PCM as ``shared.audio.encode_audio`` writes it (S16 clipped and rounded)."""
    if encoding == Enc.LINEAR_PCM_F32LE:
        return np.ascontiguousarray(samples, dtype="<f4").tobytes()
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class StreamEncoder:
    """Chunks of model audio → bytes of the requested format; the concatenation is the whole audio."""

    def __init__(self, fmt: OutputFormat, model_rate: int) -> None:
        self.fmt = fmt
        self._resampler = (
            soxr.ResampleStream(model_rate, fmt.sample_rate, 1, dtype="float32", quality="HQ")
            if fmt.sample_rate != model_rate
            else None
        )
        self._header = wav_stream_header(fmt.sample_rate) if fmt.encoding == Enc.WAV else b""
        self.samples_sent = 0

    def encode(self, samples: np.ndarray, *, last: bool = False) -> bytes:
        samples = np.asarray(samples, dtype=np.float32)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        self.samples_sent += len(samples)
        pcm_encoding = Enc.LINEAR_PCM_S16LE if self.fmt.encoding == Enc.WAV else self.fmt.encoding
        out, self._header = self._header + pcm_bytes(samples, pcm_encoding), b""
        return out

    @property
    def seconds_sent(self) -> float:
        return self.samples_sent / self.fmt.sample_rate


class StopCheck:
    """A ``LogitsProcessor`` that changes nothing and raises ``Stopped`` once the call should stop.

    Duck-typed rather than subclassed so that this module loads without transformers; ``generate``
    only calls it. See the module docstring for why this is not a ``StoppingCriteria``.
    """

    def __init__(self, should_stop: ShouldStop) -> None:
        self.should_stop = should_stop
        self.steps = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        reason = self.should_stop()
        if reason:
            raise Stopped(reason)
        self.steps += 1
        return scores
