"""A battery of hostile AudioInputs, and the check that a service answered each with a clear status.

Independent of any service: a case is a named ``AudioInput`` built from a :class:`HostileContext`
(the service's allowed uri root, a file outside it, its duration bounds), and :func:`run_audio_battery`
sends every case through any callable that puts an ``AudioInput`` into an RPC (``lambda audio:
stub.Embed(EmbedRequest(audio=[audio]))``). It exists because a battery of 107 malformed requests
found five that ended as INTERNAL or as a status too big for the client to read; each of those is a
case here, so a new service can be held to the same contract by calling it with its own RPCs.

A clear status (:func:`assert_clear_status`) has the expected code (never INTERNAL or UNKNOWN for a
bad request), a non-empty message bounded in size, a field violation naming the request field when
one is expected, and trailers small enough for every client: under gRPC's default soft metadata limit
of 8 KiB (where clients start refusing headers at random), half the 16 KiB hard limit.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.grpc.errors import MAX_MESSAGE_BYTES, ErrorDetails, details_from_error

Enc = common_pb2.AudioEncoding

#: gRPC's default soft limit on a metadata block (grpc.max_metadata_size); the hard one is 16 KiB.
METADATA_BUDGET_BYTES = 8 * 1024
#: HTTP/2 counts each header as name + value + 32 bytes against the header-list size.
_HEADER_OVERHEAD = 32
#: Long enough to break any limit that was forgotten, short enough to stay fast.
LONG = 10_000

AudioCall = Callable[[common_pb2.AudioInput], object]


@dataclass(frozen=True)
class HostileContext:
    """What the cases need to know about the service under test.

    ``allowed_root`` must be one of the service's ``audio_uri_roots``; ``outside`` a readable audio file
    that is not under any of them. ``min_seconds``/``max_seconds`` are the service's duration bounds
    for the audio field the battery is sent through.
    """

    allowed_root: Path
    outside: Path
    min_seconds: float
    max_seconds: float
    rate: int = 16_000


@dataclass(frozen=True)
class HostileCase:
    """One malformed input; ``huge`` marks the finite-but-absurd samples a model turns into NaN."""

    name: str
    audio: common_pb2.AudioInput
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    huge: bool = False


def make_context(
    tmp_path: Path, min_seconds: float, max_seconds: float, rate: int = 16_000
) -> HostileContext:
    """An allowed root holding one good file, and a readable file outside it (what a traversal wants)."""
    allowed, private = tmp_path / "allowed", tmp_path / "private"
    allowed.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    (allowed / "good.wav").write_bytes(wav(speechlike(2.0, rate), rate))
    outside = private / "secret.wav"
    outside.write_bytes(wav(speechlike(2.0, rate), rate))
    return HostileContext(allowed, outside, min_seconds, max_seconds, rate)


# ------------------------------------------------------------------------------------------------ audio


def speechlike(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A harmonic buzz with a syllable-rate envelope: valid, non-silent audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * 150.0 * k * t) / k for k in range(1, 6))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + rng.normal(0, 0.01, len(t))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def wav(samples: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def riff_wav(
    data: bytes, rate: int, channels: int = 1, bits: int = 16, declared_data_bytes: int | None = None
) -> bytes:
    """A hand-made PCM WAV whose header says whatever the case needs (libsndfile would refuse to write it)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    size = len(data) if declared_data_bytes is None else declared_data_bytes
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 0xFFFFFFFF)) + body


def _content(data: bytes, **fields: int) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(content=data, **fields)


def _raw_f32(samples: np.ndarray, rate: int) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_F32LE, sample_rate_hz=rate, content=samples.astype("<f4").tobytes()
    )


def audio_battery(ctx: HostileContext) -> list[HostileCase]:
    """Every malformed AudioInput, each expected to give INVALID_ARGUMENT on the audio field."""
    rate = ctx.rate
    good = speechlike(2.0, rate)
    good_wav = wav(good, rate)
    pcm16 = np.round(good * 32767).astype("<i2").tobytes()
    root, outside = ctx.allowed_root, ctx.outside
    nan, inf, huge, int_scaled = good.copy(), good.copy(), good.copy(), good * 32767.0
    nan[rate // 2] = np.nan
    inf[rate // 2] = np.inf
    huge[:] = 1e30
    too_long_rate = 8_000
    too_long = np.zeros(int((ctx.max_seconds + 1) * too_long_rate), "<i2")
    too_long[::7] = 1000  # not silent, so only its length is wrong
    cases = [
        # uris: the OS must never see these, or must be asked only inside the allowed root
        HostileCase("uri_with_nul", common_pb2.AudioInput(uri="good\x00.wav")),
        HostileCase("uri_with_nul_absolute", common_pb2.AudioInput(uri=f"{root}/good.wav\x00.txt")),
        HostileCase("uri_percent_encoded_nul", common_pb2.AudioInput(uri=f"file://{root}/good%00.wav")),
        HostileCase("uri_with_newline", common_pb2.AudioInput(uri="good.wav\nrm -rf /")),
        HostileCase("uri_10k_chars", common_pb2.AudioInput(uri="a" * LONG)),
        HostileCase("uri_10k_multibyte", common_pb2.AudioInput(uri="é" * LONG)),
        HostileCase("uri_component_too_long", common_pb2.AudioInput(uri=f"{root}/{'a' * 300}.wav")),
        HostileCase("uri_outside_roots", common_pb2.AudioInput(uri=str(outside))),
        HostileCase("uri_file_outside_roots", common_pb2.AudioInput(uri=f"file://{outside}")),
        HostileCase(
            "uri_relative_dotdot", common_pb2.AudioInput(uri=f"../{outside.parent.name}/{outside.name}")
        ),
        HostileCase(
            "uri_absolute_dotdot", common_pb2.AudioInput(uri=f"{root}/../{outside.parent.name}/x.wav")
        ),
        HostileCase("uri_etc_passwd", common_pb2.AudioInput(uri="/etc/passwd")),
        HostileCase("uri_relative_missing", common_pb2.AudioInput(uri="missing.wav")),
        HostileCase("uri_is_the_root_folder", common_pb2.AudioInput(uri=str(root))),
        HostileCase("uri_http", common_pb2.AudioInput(uri="http://169.254.169.254/latest/meta-data")),
        HostileCase("uri_file_remote_host", common_pb2.AudioInput(uri="file://evil.example/etc/passwd")),
        HostileCase("uri_empty", common_pb2.AudioInput(uri="")),
        # content that is not audio
        HostileCase("no_source", common_pb2.AudioInput()),
        HostileCase("empty_content", _content(b"")),
        HostileCase("garbage_bytes", _content(np.random.default_rng(1).bytes(4096))),
        HostileCase("riff_then_junk", _content(b"RIFF" + b"junk" * 200)),
        HostileCase("text_called_wav", _content(b"hello, this is not audio\n" * 40, encoding=Enc.WAV)),
        HostileCase("id3_then_junk", _content(b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 300)),
        HostileCase("wav_header_only", _content(good_wav[:44])),
        HostileCase("wav_truncated_data", _content(good_wav[:144])),
        HostileCase(
            "wav_claims_4gib_data", _content(riff_wav(pcm16[:200], rate, declared_data_bytes=2**32 - 2))
        ),
        HostileCase("wav_rate_1_hz", _content(riff_wav(pcm16, 1))),
        HostileCase("wav_rate_4_ghz", _content(riff_wav(pcm16, 4_000_000_000))),
        HostileCase("wav_1000_channels", _content(riff_wav(pcm16[:16000], rate, channels=1000))),
        HostileCase("wav_zero_channels", _content(riff_wav(pcm16, rate, channels=0))),
        # samples that are not sound
        HostileCase("wav_float_nan", _content(wav(nan, rate, "FLOAT"))),
        HostileCase("wav_float_inf", _content(wav(inf, rate, "FLOAT"))),
        HostileCase("wav_float_1e30", _content(wav(huge, rate, "FLOAT")), huge=True),
        HostileCase("wav_float_int_scaled", _content(wav(int_scaled, rate, "FLOAT")), huge=True),
        HostileCase("raw_f32_nan", _raw_f32(nan, rate)),
        HostileCase("raw_f32_1e30", _raw_f32(huge, rate), huge=True),
        HostileCase("raw_f32_max_float", _raw_f32(np.full(rate, np.finfo(np.float32).max), rate), huge=True),
        HostileCase("silence", _content(wav(np.zeros(2 * rate, np.float32), rate))),
        # lengths
        HostileCase("too_long", _content(riff_wav(too_long.tobytes(), too_long_rate))),
        HostileCase(
            "too_long_raw",
            common_pb2.AudioInput(
                encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=too_long_rate, content=too_long.tobytes()
            ),
        ),
        HostileCase("zero_frames", _content(wav(np.zeros(0, np.float32), rate))),
        # parameters that contradict the data or make no sense
        HostileCase("raw_without_rate", _content(pcm16, encoding=Enc.LINEAR_PCM_S16LE)),
        HostileCase("raw_rate_in_khz", _content(pcm16, encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=16)),
        HostileCase(
            "raw_rate_absurd", _content(pcm16, encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=2**31 - 1)
        ),
        HostileCase(
            "raw_torn_frame", _content(pcm16 + b"\x01", encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=rate)
        ),
        HostileCase(
            "raw_negative_channels",
            _content(pcm16, encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=rate, channels=-2),
        ),
        HostileCase(
            "raw_1000_channels",
            _content(pcm16[:32000], encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=rate, channels=1000),
        ),
        HostileCase("wav_negative_rate", _content(good_wav, sample_rate_hz=-16000)),
        HostileCase("wav_rate_contradicts_header", _content(good_wav, sample_rate_hz=rate // 2)),
        HostileCase("unknown_encoding_value", _content(pcm16, encoding=999, sample_rate_hz=rate)),
    ]
    if ctx.min_seconds > 0:
        too_short = speechlike(min(ctx.min_seconds / 2, 0.1), rate)
        cases.append(HostileCase("too_short", _content(wav(too_short, rate))))
    return cases


#: Cases whose audio is well-formed sound, refused only by services that need speech in it.
NEEDS_SPEECH = frozenset({"silence"})


def hostile_strings() -> dict[str, str]:
    """Values for free-text request fields (ids, names, labels): long, multibyte, with control chars."""
    return {
        "ascii_10k": "v" * LONG,
        "multibyte_10k": "语" * LONG,
        "emoji_10k": "🎭" * LONG,
        "nul_inside": "alice\x00bob",
        "trailing_newline": "alice\n",
        "path_traversal": "../../etc/passwd",
    }


# ------------------------------------------------------------------------------------------ the checks


def _wire_size(metadata: object) -> int:
    """Bytes a metadata block counts against the limit: ``-bin`` values travel base64-encoded."""
    total = 0
    for key, value in metadata or ():
        raw = value if isinstance(value, bytes) else str(value).encode()
        size = 4 * math.ceil(len(raw) / 3) if key.endswith("-bin") else len(raw)
        total += len(key) + size + _HEADER_OVERHEAD
    return total


def _percent_encoded_size(message: str) -> int:
    """``grpc-message`` on the wire: printable ASCII but ``%`` as is, every other byte as ``%XX``."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode())


def assert_clear_status(exc: BaseException, code: grpc.StatusCode, field: str | None = None) -> ErrorDetails:
    """The client got ``code`` with a bounded, non-empty message and trailers it can read.

    ``field``: a BadRequest violation must name it or one of its sub-fields (``"audio[0]"`` matches
    ``"audio[0].uri"``). Returns the unpacked details for further checks.
    """
    assert isinstance(exc, grpc.RpcError), f"expected a gRPC error, got {exc!r}"
    detail = details_from_error(exc)
    message = detail.message
    assert detail.code == code, f"expected {code.name}, got {detail.code.name}: {message[:300]!r}"
    assert message.strip(), "empty status message"
    assert len(message.encode()) <= MAX_MESSAGE_BYTES, f"message is {len(message.encode())} bytes"
    trailers = exc.trailing_metadata()  # type: ignore[attr-defined]
    size = (
        _wire_size(trailers)
        + len("grpc-message") + _percent_encoded_size(message) + _HEADER_OVERHEAD
        + len("grpc-status") + 2 + _HEADER_OVERHEAD
    )  # fmt: skip
    assert size <= METADATA_BUDGET_BYTES, f"trailers are {size} bytes, over {METADATA_BUDGET_BYTES}"
    initial = _wire_size(exc.initial_metadata())  # type: ignore[attr-defined]
    assert initial <= METADATA_BUDGET_BYTES, f"initial metadata is {initial} bytes"
    assert detail.reason, "no ErrorInfo reason in the status details"
    if field is not None:
        fields = [f for f, _ in detail.field_violations]
        assert any(f == field or f.startswith((f"{field}.", f"{field}[")) for f in fields), (
            f"no field violation on {field!r}: {detail.field_violations}"
        )
    return detail


def run_audio_battery(
    call: AudioCall,
    ctx: HostileContext,
    field: str,
    *,
    exclude: Collection[str] = (),
    cases: list[HostileCase] | None = None,
) -> dict[str, ErrorDetails]:
    """Send every case through ``call`` and check each answer; fail once, listing every bad case.

    ``field`` is where the RPC puts the audio (``"audio[0]"``, ``"test_audio"``), so each status must
    carry a violation on it. Returns the details per case name.
    """
    failures: list[str] = []
    answers: dict[str, ErrorDetails] = {}
    for case in cases if cases is not None else audio_battery(ctx):
        if case.name in exclude:
            continue
        try:
            call(case.audio)
        except grpc.RpcError as exc:
            try:
                answers[case.name] = assert_clear_status(exc, case.code, field)
            except AssertionError as error:
                failures.append(f"{case.name}: {error}")
        else:
            failures.append(f"{case.name}: the call succeeded")
    assert not failures, f"{len(failures)} hostile case(s) without a clear status:\n" + "\n".join(failures)
    return answers
