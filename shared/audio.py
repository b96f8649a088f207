"""Audio in and out for every dramaturg service, written once so that every service fails the same way.

Every model service receives :class:`~dramaturg.common.v1.common_pb2.AudioInput` messages and the
most common serving failures are about the audio, not the model: a client sends raw PCM without a
sample rate, an MP3 it calls WAV, a four-hour recording, a file of zeros, NaNs from a broken
pipeline. :func:`decode_audio_input` turns such requests into ``INVALID_ARGUMENT`` errors whose
BadRequest violation names the request field and says how to fix it, and hands the model a clean
mono float32 signal at the rate it was trained on.

Hostile input is refused the same way, never with INTERNAL: a uri longer than ``MAX_URI_CHARS`` or
holding a control character (a NUL byte made path resolution raise outside the validation), a path
the operating system refuses to look up, a container whose header claims an implausible sample rate,
and float samples beyond ``±MAX_ABS_AMPLITUDE`` (finite but absurd values, e.g. 1e30, overflow the
model's float32 features and came back as an all-NaN embedding). Error messages quote client input
through :func:`~dramaturg.shared.grpc.errors.echo`, so a 10,000-character uri is named, not replayed.

Decoding uses libsndfile (through soundfile: WAV, FLAC, OGG Vorbis/Opus, MP3) first because it is
fast and has no heavy imports; only what libsndfile cannot read (M4A/AAC, WebM, …) goes to
torchcodec's FFmpeg-based ``AudioDecoder``, imported lazily so that the gateway and the tests of the
core never import torch. Decoding a long file takes real CPU time: services should call these
functions in a worker thread (``asyncio.to_thread``), not on the event loop.

Nothing here keeps global state; all functions are pure and thread-safe.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
import numpy as np
import soundfile as sf
import soxr
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import ServiceError, echo, invalid_argument

__all__ = [
    "ACCEPTED_ENCODINGS",
    "MAX_ABS_AMPLITUDE",
    "MAX_URI_CHARS",
    "Audio",
    "AudioLimits",
    "check_clip",
    "crop",
    "decode_audio_input",
    "decode_bytes",
    "decode_pcm",
    "downmix",
    "encode_audio",
    "encode_wav",
    "load_path",
    "resample",
    "resolve_uri",
    "to_audio_output",
]

logger = logging.getLogger(__name__)

AudioEncoding = common_pb2.AudioEncoding

#: Said in every "cannot decode" error so the client knows what to send instead.
ACCEPTED_ENCODINGS = (
    "accepted are WAV, FLAC, OGG (Vorbis or Opus) and MP3 files (other containers FFmpeg reads, such as "
    "M4A/AAC, where the server has torchcodec), or raw little-endian PCM with encoding LINEAR_PCM_S16LE or "
    "LINEAR_PCM_F32LE plus sample_rate_hz and channels"
)

# Sample rates outside this range are typos (Hz vs kHz), not audio.
_MIN_RATE_HZ = 1_000
_MAX_RATE_HZ = 768_000

#: Longest AudioInput.uri accepted: Linux's PATH_MAX. A longer string names no file; refusing it early
#: keeps path resolution (and the error message) cheap.
MAX_URI_CHARS = 4096

# C0 controls, DEL and C1 controls: NUL cannot be in a path at all (the OS call raises), and newlines,
# escapes and the like in a file name are an injection attempt or a bug, never a file a client meant.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: Float samples beyond ±this are refused. Float audio is nominally within ±1; real mixes overshoot by
#: a few dB (a peak of 4 is +12 dBFS), so clipping at 1.0 would refuse good files. 1000 is +60 dBFS:
#: no capture or mix produces it, while a scaling bug does (16-bit integer values stored as float peak
#: near 32768) and so does garbage (1e30 overflows the model's float32 features into an all-NaN
#: embedding, which Enroll would have stored as a voice).
MAX_ABS_AMPLITUDE = 1000.0

_RAW_SAMPLE_BYTES = {AudioEncoding.LINEAR_PCM_S16LE: 2, AudioEncoding.LINEAR_PCM_F32LE: 4}

# libsndfile (format, subtype) for each container AudioEncoding we can write.
_WRITE_FORMATS = {
    AudioEncoding.WAV: ("WAV", "PCM_16"),
    AudioEncoding.FLAC: ("FLAC", "PCM_16"),
    AudioEncoding.OGG: ("OGG", "VORBIS"),
    AudioEncoding.MP3: ("MP3", "MPEG_LAYER_III"),
}


@dataclass(eq=False)
class Audio:
    """Decoded audio: float32 samples, ``(n,)`` for mono or ``(channels, n)``, at ``sample_rate`` Hz.

    Channels-first matches torch/torchaudio, so services can hand ``samples`` to a model unchanged.
    """

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        self.samples = np.asarray(self.samples, dtype=np.float32)
        if self.samples.ndim not in (1, 2):
            raise ValueError(f"samples must be (n,) or (channels, n), got shape {self.samples.shape}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")

    @property
    def num_frames(self) -> int:
        """Samples per channel."""
        return int(self.samples.shape[-1])

    @property
    def channels(self) -> int:
        return 1 if self.samples.ndim == 1 else int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.num_frames / self.sample_rate


@dataclass
class AudioLimits:
    """What a service accepts; each service tightens the defaults for its model.

    ``allowed_uri_roots`` is empty by default so that a server never reads files from its disk unless
    its operator said which folders clients may name.
    """

    max_seconds: float = 3600.0
    min_seconds: float = 0.0
    max_bytes: int | None = None
    allowed_channels: Collection[int] = frozenset({1, 2})
    allowed_uri_roots: Sequence[str | Path] = ()
    reject_silence: bool = False
    #: With ``reject_silence``, audio whose peak magnitude is at most this counts as silent.
    silence_threshold: float = 0.0
    #: Decoded samples whose magnitude exceeds this are refused (see ``MAX_ABS_AMPLITUDE``).
    max_abs_amplitude: float = MAX_ABS_AMPLITUDE


def _limits(limits: AudioLimits | None) -> AudioLimits:
    return limits if limits is not None else AudioLimits()


# ---------------------------------------------------------------------------------------------------
# Validation shared by every decoder


def _check_channels(channels: int, limits: AudioLimits, field_path: str) -> None:
    if channels not in limits.allowed_channels:
        allowed = ", ".join(str(c) for c in sorted(limits.allowed_channels))
        raise invalid_argument(
            field_path,
            f"audio has {channels} channels; this service accepts {allowed} channel(s) "
            "(stereo is mixed down to mono); mix the audio down before sending it",
        )


def _check_max_duration(seconds: float, limits: AudioLimits, field_path: str) -> None:
    if seconds > limits.max_seconds:
        raise invalid_argument(
            field_path,
            f"audio is {seconds:.2f} s long but this service accepts at most {limits.max_seconds:g} s; "
            "split it into shorter requests or use the streaming RPC",
        )


def _check_duration(seconds: float, limits: AudioLimits, field_path: str) -> None:
    if seconds <= 0:
        raise invalid_argument(field_path, "audio contains no samples (0 s long)")
    _check_max_duration(seconds, limits, field_path)
    if seconds < limits.min_seconds:
        raise invalid_argument(
            field_path,
            f"audio is {seconds:.2f} s long but this service needs at least {limits.min_seconds:g} s",
        )


def _check_bytes(size: int, limits: AudioLimits, field_path: str) -> None:
    # A payload over the operator's byte limit is RESOURCE_EXHAUSTED (as gRPC itself answers for an
    # oversized message), without RetryInfo: sending the same bytes again cannot succeed.
    if limits.max_bytes is not None and size > limits.max_bytes:
        description = (
            f"audio is {size} bytes but this service accepts at most {limits.max_bytes} bytes; "
            "send compressed audio (FLAC, OGG, MP3), shorter requests, or use the streaming RPC"
        )
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{field_path}: {description}",
            reason="PAYLOAD_TOO_LARGE",
            field_violations=[(field_path, description)],
        )


def _check_plausible_rate(rate: int, fmt: str, field_path: str) -> None:
    # A header can claim any rate; 1 Hz would make resampling to 16 kHz blow a short file up
    # 16,000-fold in memory, so containers get the same range as raw PCM.
    if not _MIN_RATE_HZ <= rate <= _MAX_RATE_HZ:
        raise invalid_argument(
            field_path,
            f"the {fmt} header says {rate} Hz, not a plausible sample rate ({_MIN_RATE_HZ} to "
            f"{_MAX_RATE_HZ} Hz); the file is corrupt or was written with the wrong rate",
        )


def _check_declared_rate(declared: int, actual: int, fmt: str, field: str) -> None:
    if declared and declared != actual:
        raise invalid_argument(
            f"{field}.sample_rate_hz",
            f"says {declared} Hz but the {fmt} header says {actual} Hz; leave sample_rate_hz at 0 to use "
            "the header's rate, or fix whichever is wrong",
        )


def _check_finite(samples: np.ndarray, sample_rate: int, field_path: str) -> None:
    # One float64 pass: NaN and Inf propagate into the sum (Inf - Inf = NaN) and finite float32 values
    # cannot overflow a float64 sum, so no temporary boolean array is needed for clean audio.
    if math.isfinite(float(np.sum(samples, dtype=np.float64))):
        return
    bad = ~np.isfinite(samples)
    count = int(bad.sum())
    first = int(np.flatnonzero(bad.reshape(-1) if samples.ndim == 1 else bad.any(axis=0))[0])
    raise invalid_argument(
        field_path,
        f"audio contains {count} NaN or Inf sample(s), the first at {first / sample_rate:.3f} s; "
        "the sender's processing produced invalid floats",
    )


def _check_amplitude(samples: np.ndarray, sample_rate: int, limits: AudioLimits, field_path: str) -> None:
    """Refuse finite but absurd samples (after :func:`_check_finite`, so NaN and Inf have been named)."""
    if samples.size == 0:
        return
    peak = max(abs(float(samples.max())), abs(float(samples.min())))
    if peak <= limits.max_abs_amplitude:
        return
    over = np.abs(samples) > limits.max_abs_amplitude
    first = int(np.flatnonzero(over.reshape(-1) if samples.ndim == 1 else over.any(axis=0))[0])
    raise invalid_argument(
        field_path,
        f"audio peaks at {peak:.3g}, the first sample beyond ±{limits.max_abs_amplitude:g} at "
        f"{first / sample_rate:.3f} s; float audio must be scaled to about ±1.0 (this service accepts "
        f"at most ±{limits.max_abs_amplitude:g}): 16-bit integer values stored as float must be divided "
        "by 32768, anything larger is corrupt",
        reason="AMPLITUDE_OUT_OF_RANGE",
    )


def _check_silence(samples: np.ndarray, limits: AudioLimits, field_path: str) -> None:
    if not limits.reject_silence or samples.size == 0:
        return
    peak = max(abs(float(samples.max())), abs(float(samples.min())))
    if peak <= limits.silence_threshold:
        raise invalid_argument(
            field_path,
            "audio is silent (every sample is zero"
            + (f" or within ±{limits.silence_threshold:g}" if limits.silence_threshold else "")
            + "); check the capture device or that the right file was sent",
            reason="SILENT_AUDIO",
        )


# ---------------------------------------------------------------------------------------------------
# Decoders


def decode_pcm(
    data: bytes,
    *,
    encoding: int,
    sample_rate_hz: int,
    channels: int = 1,
    limits: AudioLimits | None = None,
    field: str = "audio",
) -> Audio:
    """Decode raw interleaved little-endian PCM (``LINEAR_PCM_S16LE`` or ``LINEAR_PCM_F32LE``).

    Raw PCM has no header, so every inconsistency (missing rate, a torn last frame) must be caught
    here: otherwise the model silently hears noise at the wrong speed.
    """
    limits = _limits(limits)
    if encoding not in _RAW_SAMPLE_BYTES:
        raise invalid_argument(f"{field}.encoding", f"{encoding} is not a raw PCM encoding")
    if sample_rate_hz <= 0:
        raise invalid_argument(
            f"{field}.sample_rate_hz",
            "raw PCM has no header, so sample_rate_hz is required (e.g. 16000); or send a WAV/FLAC file",
        )
    if not _MIN_RATE_HZ <= sample_rate_hz <= _MAX_RATE_HZ:
        raise invalid_argument(
            f"{field}.sample_rate_hz",
            f"{sample_rate_hz} Hz is not a plausible sample rate; give it in Hz "
            f"({_MIN_RATE_HZ} to {_MAX_RATE_HZ}), e.g. 16000",
        )
    if channels < 0:
        raise invalid_argument(f"{field}.channels", f"must be 0 (meaning 1) or positive, got {channels}")
    channels = channels or 1
    _check_channels(channels, limits, f"{field}.channels")
    sample_bytes = _RAW_SAMPLE_BYTES[encoding]
    frame_bytes = sample_bytes * channels
    if len(data) % frame_bytes:
        raise invalid_argument(
            f"{field}.content",
            f"raw PCM is {len(data)} bytes, not a multiple of the frame size {frame_bytes} bytes "
            f"({channels} channel(s) x {sample_bytes} bytes per sample); the data is truncated, or "
            "encoding/channels are wrong",
        )
    frames = len(data) // frame_bytes
    _check_max_duration(frames / sample_rate_hz, limits, f"{field}.content")
    if encoding == AudioEncoding.LINEAR_PCM_S16LE:
        flat = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        flat = np.frombuffer(data, dtype="<f4").astype(np.float32)
    samples = flat if channels == 1 else flat.reshape(frames, channels).T.copy()
    return Audio(samples, sample_rate_hz)


def _decode_with_torchcodec(
    source: bytes | Path, limits: AudioLimits, field_path: str, field: str, declared_rate: int
) -> Audio | None:
    """FFmpeg fallback for containers libsndfile cannot read; ``None`` if it cannot either."""
    try:
        from torchcodec.decoders import AudioDecoder  # lazy: imports torch (seconds)
    except Exception as exc:  # ImportError, or FFmpeg libraries missing at load time
        logger.debug("torchcodec unavailable for the decode fallback: %s", exc)
        return None
    try:
        decoder = AudioDecoder(source if isinstance(source, bytes) else str(source))
        meta = decoder.metadata
    except Exception as exc:  # FFmpeg raises RuntimeError/ValueError for data it cannot probe
        logger.debug("torchcodec cannot open the audio either: %s", exc)
        return None
    fmt = (meta.codec or "audio").upper()
    if meta.num_channels:
        _check_channels(int(meta.num_channels), limits, field_path)
    if meta.sample_rate:
        _check_plausible_rate(int(meta.sample_rate), fmt, field_path)
        _check_declared_rate(declared_rate, int(meta.sample_rate), fmt, field)
    if meta.duration_seconds:
        _check_max_duration(float(meta.duration_seconds), limits, field_path)
    try:
        decoded = decoder.get_all_samples()
    except Exception as exc:
        raise invalid_argument(field_path, f"the {fmt} stream is corrupt or truncated ({exc})") from exc
    samples = np.ascontiguousarray(decoded.data.numpy(), dtype=np.float32)
    if samples.shape[0] == 1:
        samples = samples[0]
    return Audio(samples, int(decoded.sample_rate))


def _decode_container(
    source: bytes | Path, limits: AudioLimits, field_path: str, field: str, declared_rate: int
) -> Audio:
    try:
        handle = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (RuntimeError, TypeError, ValueError) as exc:  # LibsndfileError is a RuntimeError
        audio = _decode_with_torchcodec(source, limits, field_path, field, declared_rate)
        if audio is None:
            # LibsndfileError's str() names the BytesIO object; its error_string is the useful part.
            reason = getattr(exc, "error_string", None) or str(exc)
            raise invalid_argument(
                field_path,
                f"could not decode the audio ({reason}); {ACCEPTED_ENCODINGS}",
                reason="UNDECODABLE",
            ) from exc
        return audio
    with handle:
        fmt = handle.format
        _check_channels(handle.channels, limits, field_path)
        _check_plausible_rate(handle.samplerate, fmt, field_path)
        _check_declared_rate(declared_rate, handle.samplerate, fmt, field)
        if handle.frames > 0:  # check before decoding so a 10-hour file costs nothing
            _check_max_duration(handle.frames / handle.samplerate, limits, field_path)
        try:
            data = handle.read(dtype="float32", always_2d=True)
        except RuntimeError as exc:
            raise invalid_argument(
                field_path, f"the {fmt} stream is corrupt or truncated ({exc})", reason="UNDECODABLE"
            ) from exc
        rate = handle.samplerate
    samples = data[:, 0].copy() if data.shape[1] == 1 else np.ascontiguousarray(data.T)
    return Audio(samples, rate)


def decode_bytes(
    data: bytes, *, limits: AudioLimits | None = None, field: str = "audio", sample_rate_hz: int = 0
) -> Audio:
    """Decode a container file held in memory (WAV, FLAC, OGG, MP3; M4A & co via torchcodec).

    Returns the file's own channels and rate; :func:`decode_audio_input` downmixes and resamples.
    ``sample_rate_hz``, when non-zero, must agree with the header: a mismatch means the client's idea
    of the audio is wrong, and silently trusting either side hides a bug.
    """
    limits = _limits(limits)
    field_path = f"{field}.content"
    if not data:
        raise invalid_argument(field_path, "audio content is empty (0 bytes)")
    _check_bytes(len(data), limits, field_path)
    return _decode_container(bytes(data), limits, field_path, field, sample_rate_hz)


def load_path(
    path: str | Path, *, limits: AudioLimits | None = None, field: str = "audio", sample_rate_hz: int = 0
) -> Audio:
    """Decode an audio file from disk (no root check: callers with client paths use :func:`resolve_uri`)."""
    limits = _limits(limits)
    path = Path(path)
    field_path = f"{field}.uri"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise invalid_argument(field_path, f"cannot read {echo(str(path))}: {exc.strerror or exc}") from exc
    if size == 0:
        raise invalid_argument(field_path, f"{echo(str(path))} is empty (0 bytes)")
    _check_bytes(size, limits, field_path)
    return _decode_container(path, limits, field_path, field, sample_rate_hz)


def _check_uri_text(text: str, field_path: str, what: str) -> None:
    """Refuse a uri (or its percent-decoded path) that cannot name a file, before the OS sees it."""
    if len(text) > MAX_URI_CHARS:
        raise invalid_argument(
            field_path,
            f"{what} is {len(text)} characters long; at most {MAX_URI_CHARS} are accepted (the longest "
            "path the server's file system can name)",
            reason="INVALID_URI",
        )
    bad = _CONTROL_CHARS.search(text)
    if bad is not None:
        raise invalid_argument(
            field_path,
            f"{what} contains the control character {bad.group()!r} at position {bad.start()}; NUL, "
            "newlines and other control characters (U+0000-U+001F, U+007F-U+009F) are refused in a uri",
            reason="INVALID_URI",
        )


def resolve_uri(uri: str, roots: Sequence[str | Path], field: str = "audio") -> Path:
    """Map a client URI to a file under one of ``roots``, refusing everything else.

    Symlinks and ``..`` are resolved before the check, so a link inside a root cannot reach outside.
    Relative paths are looked up under each root in order. The uri's length and characters are checked
    first, and any error the OS raises while looking the path up (a name too long, a folder it may not
    enter) is answered as INVALID_ARGUMENT on the uri: each is about the path the client named.
    """
    field_path = f"{field}.uri"
    _check_uri_text(uri, field_path, "uri")
    if not roots:
        raise invalid_argument(
            field_path,
            "this server reads no URIs (no allowed roots are configured); send the audio inline in content",
            reason="URI_NOT_ALLOWED",
        )
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    allowed = ", ".join(str(r) for r in resolved_roots)
    if not uri:
        raise invalid_argument(field_path, "uri is empty; set content or a path under: " + allowed)
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise invalid_argument(
                field_path,
                f"file:// URIs must name a local path (file:///path), not host {echo(parts.netloc)}",
            )
        raw_path = unquote(parts.path)
        _check_uri_text(raw_path, field_path, "the uri's percent-decoded path")
    elif parts.scheme == "":
        raw_path = uri
    else:
        raise invalid_argument(
            field_path,
            f"{echo(parts.scheme)}:// URIs are not supported; use file:// or a plain path under one of the "
            f"allowed roots: {allowed}",
            reason="URI_NOT_ALLOWED",
        )
    try:
        candidate = Path(raw_path)
        if candidate.is_absolute():
            candidates = [candidate.resolve()]
        else:
            candidates = [(root / candidate).resolve() for root in resolved_roots]
        inside = [c for c in candidates if any(c.is_relative_to(root) for root in resolved_roots)]
        if not inside:
            raise invalid_argument(
                field_path,
                f"{echo(uri)} is outside the folders this server may read; allowed roots: {allowed}",
                reason="URI_NOT_ALLOWED",
            )
        for path in inside:
            if path.is_file():
                return path
    except (OSError, RuntimeError, ValueError) as exc:  # ENAMETOOLONG, EACCES; a symlink loop (3.11)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise invalid_argument(
            field_path, f"cannot look up {echo(uri)} ({reason}); name a readable file under: {allowed}"
        ) from exc
    raise invalid_argument(field_path, f"no readable file at {echo(uri)} (allowed roots: {allowed})")


def downmix(audio: Audio) -> Audio:
    """Average the channels to mono (models here are mono; averaging keeps the level of centred speech)."""
    if audio.samples.ndim == 1:
        return audio
    if audio.channels == 1:
        return Audio(audio.samples[0], audio.sample_rate)
    return Audio(audio.samples.mean(axis=0, dtype=np.float32), audio.sample_rate)


def resample(audio: Audio, rate: int) -> Audio:
    """Resample with soxr's high-quality filter (fast, and no torch needed)."""
    if rate <= 0:
        raise ValueError(f"target rate must be positive, got {rate}")
    if rate == audio.sample_rate or audio.num_frames == 0:
        return audio if rate == audio.sample_rate else Audio(audio.samples, rate)
    if audio.samples.ndim == 1:
        out = soxr.resample(audio.samples, audio.sample_rate, rate, quality="HQ")
    else:  # soxr wants (frames, channels)
        out = soxr.resample(audio.samples.T, audio.sample_rate, rate, quality="HQ").T
    return Audio(np.ascontiguousarray(out, dtype=np.float32), rate)


def decode_audio_input(
    msg: common_pb2.AudioInput, *, target_rate: int | None, limits: AudioLimits, field: str = "audio"
) -> Audio:
    """Turn a request's ``AudioInput`` into mono float32 at ``target_rate`` (``None``: keep the file's).

    Every way the input can be wrong raises ``INVALID_ARGUMENT`` with a BadRequest violation on
    ``field`` (e.g. ``"audio[2]"``) or one of its sub-fields and a description of the fix.
    """
    source = msg.WhichOneof("source")
    if source is None:
        raise invalid_argument(
            field, "no audio given: set content (inline bytes) or uri (a file the server may read)"
        )
    if msg.sample_rate_hz < 0:
        raise invalid_argument(f"{field}.sample_rate_hz", f"must be 0 or positive, got {msg.sample_rate_hz}")
    if source == "uri":
        path = resolve_uri(msg.uri, limits.allowed_uri_roots, field)
        if msg.encoding in _RAW_SAMPLE_BYTES:
            try:
                _check_bytes(path.stat().st_size, limits, f"{field}.uri")  # before reading it all
                data = path.read_bytes()
            except OSError as exc:
                raise invalid_argument(
                    f"{field}.uri", f"cannot read {echo(msg.uri)}: {exc.strerror or exc}"
                ) from exc
            audio = decode_pcm(
                data,
                encoding=msg.encoding,
                sample_rate_hz=msg.sample_rate_hz,
                channels=msg.channels,
                limits=limits,
                field=field,
            )
        else:
            audio = load_path(path, limits=limits, field=field, sample_rate_hz=msg.sample_rate_hz)
        field_path = f"{field}.uri"
    else:
        data = msg.content
        field_path = f"{field}.content"
        if not data:
            raise invalid_argument(field_path, "audio content is empty (0 bytes)")
        _check_bytes(len(data), limits, field_path)
        if msg.encoding in _RAW_SAMPLE_BYTES:
            audio = decode_pcm(
                data,
                encoding=msg.encoding,
                sample_rate_hz=msg.sample_rate_hz,
                channels=msg.channels,
                limits=limits,
                field=field,
            )
        else:
            audio = decode_bytes(data, limits=limits, field=field, sample_rate_hz=msg.sample_rate_hz)
    return _finish(audio, target_rate, limits, field_path)


def _finish(audio: Audio, target_rate: int | None, limits: AudioLimits, field_path: str) -> Audio:
    """The checks every decoder's output goes through, in the order that names the real problem:
    values are checked before the downmix, which could hide them (+x and -x average to 0) or make
    them overflow (two channels near the float32 maximum sum to Inf)."""
    _check_channels(audio.channels, limits, field_path)
    _check_duration(audio.duration, limits, field_path)
    _check_finite(audio.samples, audio.sample_rate, field_path)
    _check_amplitude(audio.samples, audio.sample_rate, limits, field_path)
    mono = downmix(audio)
    _check_silence(mono.samples, limits, field_path)
    if target_rate is not None and target_rate != mono.sample_rate:
        mono = resample(mono, target_rate)
    return mono


def check_clip(clip: Audio, limits: AudioLimits, field_path: str) -> Audio:
    """Hold a clip cut out of already decoded audio (one segment of a scene) to the per-utterance rules.

    A service that decodes a whole file once and crops segments (Speaker.Identify) checks the file
    with :func:`decode_audio_input` (finite, amplitude, channels; a longer ``max_seconds``) and each
    segment here with the same ``limits`` an utterance sent on its own gets, so a segment is refused
    exactly when it would be refused as an Embed input: too short, too long, or silent.
    """
    seconds = clip.duration
    if seconds < limits.min_seconds or seconds <= 0:
        raise invalid_argument(
            field_path,
            f"{seconds:.2f} s is too short; this service needs at least {limits.min_seconds:g} s per segment",
        )
    if seconds > limits.max_seconds:
        raise invalid_argument(
            field_path,
            f"{seconds:.2f} s is too long; this service accepts at most {limits.max_seconds:g} s per "
            "segment; split it into shorter segments",
        )
    _check_silence(clip.samples, limits, field_path)
    return clip


# ---------------------------------------------------------------------------------------------------
# Output and editing


def _frames_last(audio: Audio) -> np.ndarray:
    """(frames,) or (frames, channels), clipped: libsndfile wraps out-of-range floats when writing ints."""
    samples = np.clip(audio.samples, -1.0, 1.0)
    return samples if samples.ndim == 1 else samples.T


def encode_wav(audio: Audio) -> bytes:
    """16-bit PCM WAV: what every player and every training script reads."""
    return encode_audio(audio, AudioEncoding.WAV)


def encode_audio(audio: Audio, encoding: int) -> bytes:
    """Encode to a container (WAV/FLAC/OGG Vorbis/MP3) or raw interleaved PCM (S16LE/F32LE)."""
    if encoding == AudioEncoding.AUDIO_ENCODING_UNSPECIFIED:
        encoding = AudioEncoding.WAV
    if encoding == AudioEncoding.LINEAR_PCM_S16LE:
        pcm = np.round(_frames_last(audio) * 32767.0).astype("<i2")
        return pcm.tobytes()
    if encoding == AudioEncoding.LINEAR_PCM_F32LE:
        samples = audio.samples if audio.samples.ndim == 1 else audio.samples.T
        return np.ascontiguousarray(samples, dtype="<f4").tobytes()
    if encoding not in _WRITE_FORMATS:
        raise ValueError(f"cannot encode audio as {encoding}")
    fmt, subtype = _WRITE_FORMATS[encoding]
    buffer = io.BytesIO()
    sf.write(buffer, _frames_last(audio), audio.sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def to_audio_output(audio: Audio, encoding: int = AudioEncoding.WAV) -> common_pb2.AudioOutput:
    """Wrap audio for a response; ``AUDIO_ENCODING_UNSPECIFIED`` means WAV."""
    if encoding == AudioEncoding.AUDIO_ENCODING_UNSPECIFIED:
        encoding = AudioEncoding.WAV
    return common_pb2.AudioOutput(
        encoding=encoding,
        sample_rate_hz=audio.sample_rate,
        content=encode_audio(audio, encoding),
        duration_seconds=audio.duration,
    )


#: How far past the end a span may reach and still be clamped: clients compute ends from their own
#: duration estimate, which differs by codec padding (MP3 adds ~26 ms of priming).
_END_TOLERANCE_SECONDS = 0.05


def crop(audio: Audio, span: common_pb2.TimeSpan | None, field: str = "span") -> Audio:
    """Cut ``[span.start, span.end)`` out of ``audio``; ``None`` or an all-zero (unset) span keeps all.

    An end at most 50 ms past the end of the audio is clamped rather than refused (codec padding).
    """
    if span is None or (span.start == 0 and span.end == 0):
        return audio
    start, end = float(span.start), float(span.end)
    duration = audio.duration
    if not math.isfinite(start) or start < 0:
        raise invalid_argument(f"{field}.start", f"must be a finite number of seconds ≥ 0, got {start}")
    if not math.isfinite(end) or end <= start:
        raise invalid_argument(f"{field}.end", f"must be after start ({start:g} s), got {end:g} s")
    if start >= duration:
        raise invalid_argument(
            f"{field}.start", f"{start:g} s is at or past the end of the audio ({duration:.3f} s long)"
        )
    if end > duration + _END_TOLERANCE_SECONDS:
        raise invalid_argument(
            f"{field}.end", f"{end:g} s is past the end of the audio ({duration:.3f} s long)"
        )
    first = round(start * audio.sample_rate)
    last = min(round(end * audio.sample_rate), audio.num_frames)
    if last <= first:
        raise invalid_argument(field, f"span [{start:g}, {end:g}) s is shorter than one sample")
    return Audio(audio.samples[..., first:last].copy(), audio.sample_rate)
