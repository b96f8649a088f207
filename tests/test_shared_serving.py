"""shared/admission.py, shared/cancellation.py, shared/pcm_stream.py: the serving pieces every heavy
or streaming RPC uses (diarization today; synthesis and token streaming next)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from dramaturg.common.v1 import common_pb2
from dramaturg.shared.admission import ConcurrencyLimiter
from dramaturg.shared.cancellation import Stopped, run_cancellable
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.pcm_stream import AudioBuffer, PcmStream, check_stream_format

S16 = common_pb2.AudioEncoding.LINEAR_PCM_S16LE
F32 = common_pb2.AudioEncoding.LINEAR_PCM_F32LE


def test_limiter_admits_runs_then_queues_then_refuses_with_a_retry_delay() -> None:
    async def scenario() -> None:
        limiter = ConcurrencyLimiter("test", 1, 1, queue="q", work="test run")
        release = asyncio.Event()

        async def hold() -> None:
            async with limiter.slot(None):
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(hold())  # waits in the room
        await asyncio.sleep(0.01)
        assert (limiter.running, limiter.waiting) == (1, 1)
        with pytest.raises(ServiceError) as refused:
            limiter.check_admission()
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.retry_after_seconds and refused.value.retry_after_seconds >= 1.0
        with pytest.raises(ServiceError) as late:  # an admitted stream waits, but not past its deadline
            async with limiter.slot(time.monotonic() + 0.05, admit=False):
                pass
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "test run slot" in late.value.message
        release.set()
        await asyncio.gather(first, second)
        assert (limiter.running, limiter.waiting) == (0, 0)

    asyncio.run(scenario())


request_id = contextvars.ContextVar("request_id", default="")


def test_a_cancellable_run_stops_at_its_deadline_and_keeps_the_request_id() -> None:
    seen: list[str] = []

    def work(should_stop) -> int:
        seen.append(request_id.get())
        for _ in range(1000):
            if reason := should_stop():
                raise Stopped(reason)
            time.sleep(0.005)
        return 0

    async def scenario() -> None:
        request_id.set("req-42")
        with ThreadPoolExecutor(1) as pool:
            with pytest.raises(ServiceError) as exc:
                await run_cancellable(pool, work, time.monotonic() + 0.05, what="the test run",
                                      deadline_hint="give it longer")
            assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "give it longer" in exc.value.message
            assert await run_cancellable(pool, lambda stop: 7, None) == 7

    asyncio.run(scenario())
    assert seen == ["req-42"]


def test_a_cancelled_caller_stops_the_worker_before_giving_its_slot_back() -> None:
    stopped_at: list[float] = []

    def work(should_stop) -> None:
        while not should_stop():
            time.sleep(0.005)
        stopped_at.append(time.monotonic())
        raise Stopped("cancelled")

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            task = asyncio.create_task(run_cancellable(pool, work, None))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert stopped_at, "the caller returned before the worker stopped"

    asyncio.run(scenario())


def test_pcm_chunks_cut_anywhere_give_the_whole_signal() -> None:
    rng = np.random.default_rng(0)
    signal = (rng.uniform(-0.5, 0.5, 16000) * 32767).astype("<i2")
    data = signal.tobytes()
    stream = PcmStream(S16, 16000, 16000)
    cuts = sorted(rng.choice(len(data), 20, replace=False))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out = np.concatenate([stream.feed(p) for p in pieces] + [stream.feed(b"", last=True)])
    np.testing.assert_allclose(out, signal.astype(np.float32) / 32768.0)
    assert stream.received_seconds == pytest.approx(1.0)


def test_pcm_stream_refuses_torn_ends_and_absurd_floats() -> None:
    stream = PcmStream(S16, 16000, 16000)
    stream.feed(b"\x01\x02\x03")
    with pytest.raises(ServiceError, match="stray byte"):
        stream.feed(b"", last=True)
    for bad in (np.float32(np.nan), np.float32(1e30)):
        floats = PcmStream(F32, 16000, 16000)
        with pytest.raises(ServiceError) as exc:
            floats.feed(np.array([0.1, bad], dtype="<f4").tobytes())
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_resampled_stream_matches_one_resample_of_the_whole() -> None:
    import soxr

    t = np.arange(48000) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype("<f4")
    stream = PcmStream(F32, 48000, 16000)
    out = np.concatenate([stream.feed(tone[i:i + 4801].tobytes()) for i in range(0, len(tone), 4801)]
                         + [stream.feed(b"", last=True)])
    whole = soxr.resample(tone, 48000, 16000, quality="HQ")
    assert abs(len(out) - len(whole)) <= 2
    n = min(len(out), len(whole))
    assert np.max(np.abs(out[100:n - 100] - whole[100:n - 100])) < 1e-3  # no clicks at chunk seams


def test_audio_buffer_keeps_what_is_needed() -> None:
    buffer = AudioBuffer(10)
    buffer.append(np.arange(30, dtype=np.float32))
    buffer.append(np.arange(30, 50, dtype=np.float32))
    assert buffer.end == 5.0
    np.testing.assert_array_equal(buffer.slice(1.0, 2.0), np.arange(10, 20))
    buffer.drop_before(3.0)
    np.testing.assert_array_equal(buffer.slice(2.5, 3.5), np.arange(30, 35))  # dropped audio is gone
    assert buffer.end == 5.0


def test_stream_format_errors_name_the_field_and_the_alternative() -> None:
    with pytest.raises(ServiceError) as exc:
        check_stream_format(common_pb2.AudioEncoding.FLAC, 16000, "streaming_config",
                            whole_file_rpc="Diarize")
    assert "Diarize" in exc.value.message and exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServiceError, match="sample rate"):
        check_stream_format(S16, 8, "streaming_config", whole_file_rpc="Diarize")
