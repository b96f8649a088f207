"""dramaturg.shared.audio: every container decodes to the same signal, every bad input is actionable."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.audio import (
    MAX_ABS_AMPLITUDE,
    MAX_URI_CHARS,
    Audio,
    AudioLimits,
    check_clip,
    crop,
    decode_audio_input,
    decode_bytes,
    encode_audio,
    encode_wav,
    load_path,
    resample,
    to_audio_output,
)
from dramaturg.shared.grpc.errors import ServiceError
from hostile import riff_wav

Enc = common_pb2.AudioEncoding
LIMITS = AudioLimits()


def tone(freq: float = 440.0, rate: int = 16000, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def container(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """Write ``samples`` ((n,) or (n, channels)) with libsndfile."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def peak_hz(audio: Audio) -> float:
    spectrum = np.abs(np.fft.rfft(audio.samples * np.hanning(audio.num_frames)))
    return float(np.fft.rfftfreq(audio.num_frames, 1 / audio.sample_rate)[np.argmax(spectrum)])


def decode(msg: common_pb2.AudioInput, target_rate: int | None = 16000, **limits: object) -> Audio:
    return decode_audio_input(msg, target_rate=target_rate, limits=AudioLimits(**limits), field="audio")


def expect_invalid(msg: common_pb2.AudioInput, *keywords: str, target_rate: int | None = 16000, **limits):
    with pytest.raises(ServiceError) as info:
        decode(msg, target_rate, **limits)
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    for keyword in keywords:
        assert keyword.lower() in error.message.lower(), (keyword, error.message)
    assert error.field_violations and error.field_violations[0][0].startswith("audio"), error.field_violations
    return error


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "min_corr"),
    [
        ("WAV", "PCM_16", 16000, 0.999),
        ("WAV", "FLOAT", 16000, 0.999),
        ("FLAC", "PCM_16", 16000, 0.999),
        ("OGG", "VORBIS", 16000, 0.95),
        ("OGG", "OPUS", 48000, None),  # Opus adds a pre-skip delay; check the pitch only
        ("MP3", "MPEG_LAYER_III", 16000, None),  # MP3 adds encoder delay; check the pitch only
    ],
)
def test_container_round_trip(fmt: str, subtype: str, rate: int, min_corr: float | None) -> None:
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    signal = tone(rate=rate)
    msg = common_pb2.AudioInput(content=container(signal, rate, fmt, subtype))
    audio = decode(msg, target_rate=rate)
    assert audio.sample_rate == rate
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.duration - 1.0) < 0.1
    assert abs(peak_hz(audio) - 440) <= 2
    if min_corr is not None:
        assert correlation(audio.samples, signal) > min_corr


def test_mp3_made_by_ffmpeg_decodes(tmp_path: Path) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    out = tmp_path / "tone.mp3"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
         "-ar", "22050", "-ac", "1", "-y", str(out)],
        check=True,
    )  # fmt: skip
    audio = decode(common_pb2.AudioInput(content=out.read_bytes()))
    assert audio.sample_rate == 16000
    assert abs(peak_hz(audio) - 440) <= 2


def test_m4a_falls_back_to_torchcodec(tmp_path: Path) -> None:
    pytest.importorskip("torchcodec")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    out = tmp_path / "tone.m4a"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
         "-ar", "22050", "-ac", "2", "-c:a", "aac", "-y", str(out)],
        check=True,
    )  # fmt: skip
    audio = decode(common_pb2.AudioInput(content=out.read_bytes()))
    assert audio.sample_rate == 16000 and audio.samples.ndim == 1
    assert abs(peak_hz(audio) - 440) <= 2


def test_raw_pcm_s16_and_f32() -> None:
    signal = tone()
    s16 = np.round(signal * 32767).astype("<i2").tobytes()
    audio = decode(common_pb2.AudioInput(encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=16000, content=s16))
    assert audio.num_frames == 16000
    assert np.max(np.abs(audio.samples - signal)) < 1e-3

    f32 = signal.astype("<f4").tobytes()
    audio = decode(common_pb2.AudioInput(encoding=Enc.LINEAR_PCM_F32LE, sample_rate_hz=16000, content=f32))
    np.testing.assert_array_equal(audio.samples, signal)


def test_raw_pcm_stereo_is_deinterleaved_and_downmixed() -> None:
    left, right = tone(amp=0.6), np.zeros(16000, np.float32)
    interleaved = np.stack([left, right], axis=1).astype("<f4").tobytes()
    msg = common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_F32LE, sample_rate_hz=16000, channels=2, content=interleaved
    )
    audio = decode(msg)
    np.testing.assert_allclose(audio.samples, left / 2, atol=1e-6)


def test_stereo_container_is_downmixed() -> None:
    left, right = tone(440, amp=0.4), tone(440, amp=0.2)
    msg = common_pb2.AudioInput(content=container(np.stack([left, right], axis=1), 16000, "WAV", "FLOAT"))
    audio = decode(msg)
    assert audio.samples.ndim == 1
    np.testing.assert_allclose(audio.samples, (left + right) / 2, atol=1e-6)
    # Without downmixing the helper keeps the channels, channels-first.
    raw = decode_bytes(msg.content)
    assert raw.samples.shape == (2, 16000) and raw.channels == 2


@pytest.mark.parametrize("source_rate", [8000, 44100])
def test_resampling_to_16k_keeps_the_pitch(source_rate: int) -> None:
    msg = common_pb2.AudioInput(content=container(tone(rate=source_rate), source_rate, "WAV", "PCM_16"))
    audio = decode(msg, target_rate=16000)
    assert audio.sample_rate == 16000
    assert abs(audio.num_frames - 16000) <= 2
    assert abs(peak_hz(audio) - 440) <= 2
    assert 0.3 < float(np.max(np.abs(audio.samples))) < 0.7  # level preserved too


def test_target_rate_none_keeps_the_file_rate() -> None:
    msg = common_pb2.AudioInput(content=container(tone(rate=22050), 22050, "FLAC"))
    assert decode(msg, target_rate=None).sample_rate == 22050


def test_declared_rate_that_matches_the_header_is_fine() -> None:
    msg = common_pb2.AudioInput(sample_rate_hz=16000, content=container(tone(), 16000, "WAV"))
    assert decode(msg).num_frames == 16000


# ---------------------------------------------------------------------------------------------- bad input


def test_no_source() -> None:
    expect_invalid(common_pb2.AudioInput(), "no audio", "content", "uri")


def test_empty_bytes() -> None:
    expect_invalid(common_pb2.AudioInput(content=b""), "empty")


def test_undecodable_bytes_name_the_accepted_encodings() -> None:
    error = expect_invalid(common_pb2.AudioInput(content=b"this is not audio at all" * 50), "decode", "WAV")
    assert "LINEAR_PCM_S16LE" in error.message and "FLAC" in error.message
    assert error.reason == "UNDECODABLE"


def test_corrupt_header_is_refused() -> None:
    good = container(tone(), 16000, "FLAC")
    expect_invalid(common_pb2.AudioInput(content=good[:4] + b"\x00" * 40 + good[44:]), "decode")


def test_raw_pcm_without_sample_rate() -> None:
    msg = common_pb2.AudioInput(encoding=Enc.LINEAR_PCM_S16LE, content=b"\x00\x01" * 100)
    error = expect_invalid(msg, "sample_rate_hz", "required")
    assert error.field_violations[0][0] == "audio.sample_rate_hz"


@pytest.mark.parametrize(
    ("encoding", "channels", "size", "frame"),
    [(Enc.LINEAR_PCM_S16LE, 1, 3, 2), (Enc.LINEAR_PCM_F32LE, 2, 12, 8), (Enc.LINEAR_PCM_S16LE, 2, 6, 4)],
)
def test_raw_pcm_with_a_torn_frame(encoding: int, channels: int, size: int, frame: int) -> None:
    msg = common_pb2.AudioInput(
        encoding=encoding, sample_rate_hz=16000, channels=channels, content=b"\x01" * size
    )
    expect_invalid(msg, "multiple", f"frame size {frame}")


def test_declared_rate_contradicting_the_header() -> None:
    msg = common_pb2.AudioInput(sample_rate_hz=8000, content=container(tone(), 16000, "WAV"))
    error = expect_invalid(msg, "8000", "16000", "header")
    assert error.field_violations[0][0] == "audio.sample_rate_hz"


def test_too_long_gives_both_numbers() -> None:
    msg = common_pb2.AudioInput(content=container(tone(seconds=2.0), 16000, "WAV"))
    expect_invalid(msg, "2.00 s", "at most 1.5 s", max_seconds=1.5)


def test_too_long_raw_pcm_is_refused_before_decoding() -> None:
    msg = common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=8000, content=bytes(2 * 8000 * 3)
    )
    expect_invalid(msg, "3.00 s", "at most 2 s", max_seconds=2)


def test_too_short_gives_both_numbers() -> None:
    msg = common_pb2.AudioInput(content=container(tone(seconds=0.2), 16000, "WAV"))
    expect_invalid(msg, "0.20 s", "at least 0.5 s", min_seconds=0.5)


def test_channel_count_not_allowed() -> None:
    three = np.stack([tone()] * 3, axis=1)
    expect_invalid(common_pb2.AudioInput(content=container(three, 16000, "WAV")), "3 channels", "1, 2")
    expect_invalid(
        common_pb2.AudioInput(content=container(np.stack([tone()] * 2, axis=1), 16000, "WAV")),
        "2 channels",
        allowed_channels={1},
    )
    raw = common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=16000, channels=4, content=bytes(8 * 100)
    )
    expect_invalid(raw, "4 channels")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad: float) -> None:
    signal = tone()
    signal[8000] = bad
    raw = common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_F32LE, sample_rate_hz=16000, content=signal.astype("<f4").tobytes()
    )
    expect_invalid(raw, "NaN or Inf", "0.500 s")
    wav = common_pb2.AudioInput(content=container(signal, 16000, "WAV", "FLOAT"))
    expect_invalid(wav, "NaN or Inf")


@pytest.mark.parametrize("peak", [1e30, 32767.0, float(np.finfo(np.float32).max)])
def test_absurd_amplitudes_are_refused(peak: float) -> None:
    """Finite but absurd floats (1e30 made an all-NaN embedding; 32767 is int16 stored as float)."""
    signal = tone(amp=0.3)
    signal[4000:] = peak
    wav = common_pb2.AudioInput(content=container(signal, 16000, "WAV", "FLOAT"))
    error = expect_invalid(wav, "peaks at", "0.250 s", "32768", f"±{MAX_ABS_AMPLITUDE:g}")
    assert error.reason == "AMPLITUDE_OUT_OF_RANGE"
    assert error.field_violations[0][0] == "audio.content"
    raw = common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_F32LE, sample_rate_hz=16000, content=signal.astype("<f4").tobytes()
    )
    expect_invalid(raw, "peaks at")


def test_float_audio_a_little_over_full_scale_is_fine() -> None:
    """A mix that overshoots ±1.0 is real audio: only the documented bound (or the service's) refuses."""
    for amp in (1.5, 8.0, MAX_ABS_AMPLITUDE):
        msg = common_pb2.AudioInput(content=container(tone(amp=amp), 16000, "WAV", "FLOAT"))
        assert np.max(np.abs(decode(msg).samples)) == pytest.approx(amp, rel=1e-3)
    loud = common_pb2.AudioInput(content=container(tone(amp=8.0), 16000, "WAV", "FLOAT"))
    expect_invalid(loud, "peaks at 8", max_abs_amplitude=4.0)


def test_amplitude_is_checked_before_the_downmix() -> None:
    """+x and -x average to silence: the check must see the channels, not the mono mix."""
    left = np.full(16000, 1e30, np.float32)
    stereo = np.stack([left, -left], axis=1)  # (frames, channels): interleaved on the wire
    raw = common_pb2.AudioInput(
        encoding=Enc.LINEAR_PCM_F32LE,
        sample_rate_hz=16000,
        channels=2,
        content=stereo.astype("<f4").tobytes(),
    )
    expect_invalid(raw, "peaks at 1e+30")


@pytest.mark.parametrize("rate", [1, 999, 1_000_000])
def test_implausible_header_rate_is_refused(rate: int) -> None:
    """A header can claim any rate; 1 Hz resampled to 16 kHz would blow a short file up 16,000-fold."""
    data = np.round(tone() * 32767).astype("<i2").tobytes()
    error = expect_invalid(common_pb2.AudioInput(content=riff_wav(data, rate)), "not a plausible sample rate")
    assert error.field_violations[0][0] == "audio.content"


def test_check_clip_applies_the_per_utterance_rules() -> None:
    limits = AudioLimits(min_seconds=0.5, max_seconds=2.0, reject_silence=True)
    speech = Audio(tone(seconds=3.0), 16000)
    assert (
        check_clip(crop(speech, common_pb2.TimeSpan(start=0.0, end=1.0)), limits, "segments[0]").duration
        == 1.0
    )
    for span, keyword in (((0.0, 0.2), "too short"), ((0.0, 2.5), "at most 2 s")):
        with pytest.raises(ServiceError) as info:
            check_clip(crop(speech, common_pb2.TimeSpan(start=span[0], end=span[1])), limits, "segments[3]")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and keyword in info.value.message
        assert info.value.field_violations[0][0] == "segments[3]"
    with pytest.raises(ServiceError) as info:
        check_clip(Audio(np.zeros(16000, np.float32), 16000), limits, "segments[1]")
    assert info.value.reason == "SILENT_AUDIO"


def test_silence_is_refused_only_when_asked() -> None:
    msg = common_pb2.AudioInput(content=container(np.zeros(16000, np.float32), 16000, "WAV"))
    assert decode(msg).num_frames == 16000
    error = expect_invalid(msg, "silent", reject_silence=True)
    assert error.reason == "SILENT_AUDIO"
    loud = common_pb2.AudioInput(content=container(tone(), 16000, "WAV"))
    assert decode(loud, reject_silence=True).num_frames == 16000


def test_zero_length_file_is_refused() -> None:
    msg = common_pb2.AudioInput(content=container(np.zeros(0, np.float32), 16000, "WAV"))
    expect_invalid(msg, "no samples")


def test_field_path_is_used_in_the_violation() -> None:
    with pytest.raises(ServiceError) as info:
        decode_audio_input(common_pb2.AudioInput(), target_rate=16000, limits=LIMITS, field="audio[2]")
    assert info.value.field_violations[0][0] == "audio[2]"
    assert info.value.message.startswith("audio[2]")


def test_too_many_bytes_is_resource_exhausted() -> None:
    msg = common_pb2.AudioInput(content=container(tone(), 16000, "WAV"))
    with pytest.raises(ServiceError) as info:
        decode(msg, max_bytes=1000)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000" in info.value.message


# ---------------------------------------------------------------------------------------------------- URIs


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    inside, outside = tmp_path / "allowed", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.wav").write_bytes(container(tone(), 16000, "WAV"))
    (outside / "secret.wav").write_bytes(container(tone(), 16000, "WAV"))
    return inside, outside


def test_uri_inside_an_allowed_root(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    for uri in (f"file://{inside / 'a.wav'}", str(inside / "a.wav"), "a.wav"):
        audio = decode(common_pb2.AudioInput(uri=uri), allowed_uri_roots=[inside])
        assert audio.num_frames == 16000, uri


def test_uri_outside_the_roots_names_the_allowed_ones(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    for uri in (str(outside / "secret.wav"), f"file://{outside / 'secret.wav'}", "../private/secret.wav"):
        error = expect_invalid(
            common_pb2.AudioInput(uri=uri), "outside", str(inside), allowed_uri_roots=[inside]
        )
        assert error.field_violations[0][0] == "audio.uri"


def test_symlink_out_of_a_root_is_refused(roots: tuple[Path, Path]) -> None:
    inside, outside = roots
    link = inside / "link.wav"
    try:
        os.symlink(outside / "secret.wav", link)
    except OSError:
        pytest.skip("cannot create symlinks here")
    expect_invalid(common_pb2.AudioInput(uri=str(link)), "outside", allowed_uri_roots=[inside])


def test_uris_are_refused_without_roots(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    expect_invalid(common_pb2.AudioInput(uri=str(inside / "a.wav")), "no allowed roots", "content")


def test_other_schemes_and_missing_files(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    expect_invalid(
        common_pb2.AudioInput(uri="https://example.com/a.wav"),
        "https",
        str(inside),
        allowed_uri_roots=[inside],
    )
    expect_invalid(common_pb2.AudioInput(uri="s3://bucket/a.wav"), "s3", allowed_uri_roots=[inside])
    expect_invalid(
        common_pb2.AudioInput(uri=str(inside / "missing.wav")), "no readable file", allowed_uri_roots=[inside]
    )


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("a\x00.wav", "'\\x00'"),
        ("a.wav\nrm -rf /", "'\\n'"),
        ("a\x7f.wav", "'\\x7f'"),
        ("a\x85.wav", "'\\x85'"),
        ("file:///srv/a%00.wav", "percent-decoded"),
    ],
)
def test_control_characters_in_a_uri_are_refused(roots: tuple[Path, Path], uri: str, shown: str) -> None:
    """A NUL used to reach the OS and come back as INTERNAL; every control character is refused first."""
    inside, _ = roots
    # the raw uri is checked before the roots, so the answer names the real problem; a percent-encoded
    # one only once there are roots to look it up under
    for allowed in ([inside], [] if "%" not in uri else [inside]):
        error = expect_invalid(
            common_pb2.AudioInput(uri=uri), "control character", shown, allowed_uri_roots=allowed
        )
        assert error.reason == "INVALID_URI" and error.field_violations[0][0] == "audio.uri"


def test_an_overlong_uri_names_the_limit_without_replaying_it(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    error = expect_invalid(
        common_pb2.AudioInput(uri="a" * 10_000),
        "10000 characters",
        str(MAX_URI_CHARS),
        allowed_uri_roots=[inside],
    )
    assert error.reason == "INVALID_URI" and len(error.message) < 300
    # at the limit the uri reaches the roots check, and is quoted shortened
    long_outside = "/elsewhere/" + "b" * (MAX_URI_CHARS - 20)
    error = expect_invalid(common_pb2.AudioInput(uri=long_outside), "outside", allowed_uri_roots=[inside])
    assert f"({len(long_outside)} characters)" in error.message and len(error.message) < 600


def test_os_errors_while_looking_up_a_uri_are_invalid_argument(roots: tuple[Path, Path]) -> None:
    """ENAMETOOLONG (and a symlink loop, which Python 3.11 raises as RuntimeError) are about the path."""
    inside, _ = roots
    expect_invalid(
        common_pb2.AudioInput(uri=f"{'c' * 300}.wav"),
        "cannot look up",
        "too long",
        allowed_uri_roots=[inside],
    )
    loop = inside / "loop.wav"
    try:
        os.symlink(loop, loop)
    except OSError:
        pytest.skip("cannot create symlinks here")
    expect_invalid(common_pb2.AudioInput(uri="loop.wav"), allowed_uri_roots=[inside])


def test_raw_pcm_by_uri_is_sized_before_it_is_read(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    (inside / "big.pcm").write_bytes(bytes(64_000))
    msg = common_pb2.AudioInput(uri="big.pcm", encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=16000)
    with pytest.raises(ServiceError) as info:
        decode(msg, allowed_uri_roots=[inside], max_bytes=1000)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_raw_pcm_by_uri(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    (inside / "a.pcm").write_bytes(np.round(tone() * 32767).astype("<i2").tobytes())
    msg = common_pb2.AudioInput(uri="a.pcm", encoding=Enc.LINEAR_PCM_S16LE, sample_rate_hz=16000)
    assert decode(msg, allowed_uri_roots=[inside]).num_frames == 16000


def test_load_path_reads_the_native_layout(tmp_path: Path) -> None:
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([tone(), tone()], axis=1), 22050)
    audio = load_path(path)
    assert audio.sample_rate == 22050 and audio.samples.shape == (2, 16000)


# ------------------------------------------------------------------------------------------ output and crop


def test_encode_wav_round_trip_and_clipping() -> None:
    signal = tone()
    signal[0] = 1.5  # must clip, not wrap around to a negative full-scale click
    data = encode_wav(Audio(signal, 16000))
    back, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 16000 and sf.info(io.BytesIO(data)).subtype == "PCM_16"
    assert back[0] > 0.99
    raw = np.frombuffer(encode_audio(Audio(signal, 16000), Enc.LINEAR_PCM_S16LE), "<i2")
    assert raw[0] == 32767
    assert np.max(np.abs(back[1:] - signal[1:])) < 1e-3


@pytest.mark.parametrize("encoding", [Enc.WAV, Enc.FLAC, Enc.OGG, Enc.LINEAR_PCM_S16LE, Enc.LINEAR_PCM_F32LE])
def test_to_audio_output_decodes_back(encoding: int) -> None:
    out = to_audio_output(Audio(tone(), 16000), encoding)
    assert out.encoding == encoding and out.sample_rate_hz == 16000
    assert out.duration_seconds == pytest.approx(1.0)
    msg = common_pb2.AudioInput(encoding=out.encoding, sample_rate_hz=out.sample_rate_hz, content=out.content)
    assert abs(peak_hz(decode(msg)) - 440) <= 2


def test_stereo_output_is_interleaved() -> None:
    stereo = Audio(np.stack([tone(amp=0.5), np.zeros(16000, np.float32)]), 16000)
    raw = np.frombuffer(encode_audio(stereo, Enc.LINEAR_PCM_F32LE), "<f4").reshape(-1, 2)
    np.testing.assert_array_equal(raw[:, 1], 0)
    assert sf.info(io.BytesIO(encode_wav(stereo))).channels == 2


def test_crop() -> None:
    audio = Audio(np.arange(16000, dtype=np.float32), 16000)
    part = crop(audio, common_pb2.TimeSpan(start=0.25, end=0.5))
    assert part.num_frames == 4000 and part.samples[0] == 4000
    assert crop(audio, None) is audio
    assert crop(audio, common_pb2.TimeSpan()) is audio  # unset span: whole audio
    assert crop(audio, common_pb2.TimeSpan(start=0.5, end=1.02)).num_frames == 8000  # codec padding clamps


@pytest.mark.parametrize(
    ("start", "end", "bad_field", "keyword"),
    [
        (0.5, 0.5, "span.end", "after start"),
        (0.6, 0.2, "span.end", "after start"),
        (-0.1, 0.5, "span.start", "≥ 0"),
        (1.5, 2.0, "span.start", "past the end"),
        (0.5, 3.0, "span.end", "past the end"),
        (float("nan"), 0.5, "span.start", "finite"),
    ],
)
def test_crop_refuses_bad_spans(start: float, end: float, bad_field: str, keyword: str) -> None:
    audio = Audio(np.zeros(16000, np.float32), 16000)
    with pytest.raises(ServiceError) as info:
        crop(audio, common_pb2.TimeSpan(start=start, end=end))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations[0][0] == bad_field
    assert keyword in info.value.message


def test_resample_multichannel_and_identity() -> None:
    stereo = Audio(np.stack([tone(rate=8000), tone(rate=8000)]), 8000)
    up = resample(stereo, 16000)
    assert up.samples.shape == (2, 16000) and up.sample_rate == 16000
    assert resample(up, 16000) is up


def test_audio_module_does_not_import_torch() -> None:
    code = "import sys, dramaturg.shared.audio; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
