"""Raw PCM streams in, continuous mono audio out: what every streaming RPC buffers the same way.

Clients of streaming RPCs (StreamingDiarize today; streamed transcription and the like next) send a
config message, then raw mono PCM chunks cut anywhere. :func:`check_stream_format` refuses what
cannot be streamed with messages that say what to send instead; :class:`PcmStream` turns chunks into
float32 samples at the model's rate, continuous across chunk boundaries; :class:`AudioBuffer` keeps
the audio a consumer still needs and drops the rest.
"""

from __future__ import annotations

import math

import numpy as np
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.audio import MAX_ABS_AMPLITUDE
from dramaturg.shared.grpc.errors import invalid_argument

AudioEncoding = common_pb2.AudioEncoding
STREAM_SAMPLE_BYTES = {AudioEncoding.LINEAR_PCM_S16LE: 2, AudioEncoding.LINEAR_PCM_F32LE: 4}


def check_stream_format(encoding: int, sample_rate_hz: int, prefix: str, *, whole_file_rpc: str) -> None:
    """INVALID_ARGUMENT unless ``encoding`` is raw mono PCM and ``sample_rate_hz`` a plausible rate."""
    if encoding not in STREAM_SAMPLE_BYTES:
        name = AudioEncoding.Name(encoding) if encoding in AudioEncoding.values() else encoding
        raise invalid_argument(
            f"{prefix}.encoding",
            f"{name} cannot be streamed; stream raw LINEAR_PCM_S16LE or LINEAR_PCM_F32LE mono chunks, "
            f"or send a whole file to {whole_file_rpc}",
        )
    if not 1000 <= sample_rate_hz <= 768_000:
        raise invalid_argument(
            f"{prefix}.sample_rate_hz",
            f"raw PCM needs its sample rate in Hz (e.g. 16000), got {sample_rate_hz}",
        )


class PcmStream:
    """Raw PCM chunks → mono float32 at the model's rate, continuous across chunk boundaries.

    Clients cut their byte stream anywhere, so a sample can be torn across two messages: the
    remainder is kept for the next chunk. Resampling uses soxr's streaming resampler so the filter
    state carries over between chunks (resampling each chunk alone would click at every boundary).
    """

    def __init__(self, encoding: int, sample_rate: int, target_rate: int, *,
                 field: str = "audio_content") -> None:
        import soxr

        self.encoding = encoding
        self.field = field
        self.sample_bytes = STREAM_SAMPLE_BYTES[encoding]
        self.sample_rate = sample_rate
        self.target_rate = target_rate
        self._rest = b""
        self._resampler = (
            None
            if sample_rate == target_rate
            else soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ")
        )
        self.received_seconds = 0.0

    def feed(self, data: bytes, *, last: bool = False) -> np.ndarray:
        data = self._rest + data
        usable = len(data) - len(data) % self.sample_bytes
        if last and usable != len(data):
            raise invalid_argument(
                self.field,
                f"the stream ended with {len(data) - usable} stray byte(s): raw PCM of this encoding has "
                f"{self.sample_bytes}-byte samples, so the total must be a multiple of {self.sample_bytes}",
            )
        self._rest = data[usable:]
        if self.encoding == AudioEncoding.LINEAR_PCM_S16LE:
            samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data[:usable], dtype="<f4").astype(np.float32)
            total = float(np.sum(np.abs(samples), dtype=np.float64)) if samples.size else 0.0
            peak = float(np.abs(samples).max()) if samples.size else 0.0
            if not math.isfinite(total) or peak > MAX_ABS_AMPLITUDE:
                raise invalid_argument(
                    self.field,
                    f"NaN, Inf or a sample beyond ±{MAX_ABS_AMPLITUDE:g} near "
                    f"{self.received_seconds:.2f} s; "
                    "float PCM must be scaled to about ±1.0",
                )
        self.received_seconds += samples.size / self.sample_rate
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        return np.asarray(samples, dtype=np.float32)


class AudioBuffer:
    """The stream's audio from ``start`` (seconds) to its end; older audio is dropped."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._chunks: list[np.ndarray] = []
        self._samples = np.zeros(0, np.float32)
        self._offset = 0  # samples dropped before self._samples[0]

    @property
    def end(self) -> float:
        return (self._offset + len(self._samples) + sum(len(c) for c in self._chunks)) / self.sample_rate

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)

    def _join(self) -> None:
        if self._chunks:
            self._samples = np.concatenate([self._samples, *self._chunks])
            self._chunks = []

    def slice(self, start: float, end: float) -> np.ndarray:
        self._join()
        a = max(0, round(start * self.sample_rate) - self._offset)
        b = max(a, round(end * self.sample_rate) - self._offset)
        return self._samples[a:b].copy()

    def drop_before(self, t: float) -> None:
        cut = round(t * self.sample_rate) - self._offset
        if cut > 0:
            self._join()
            self._samples = self._samples[cut:].copy()
            self._offset += cut
