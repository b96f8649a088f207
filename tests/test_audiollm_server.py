"""The audio-LLM service over real gRPC, on the untrained tiny SALMONN-lite: Generate and GenerateStream
(streamed text equal to the whole answer), span and long audio, every bad input with its status,
deadlines that stop decoding, admission, metrics. The tiny model never produces its end token in the
lengths asked for here, so every generation runs exactly ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from dramaturg.audiollm.v1 import audiollm_pb2, audiollm_pb2_grpc
from dramaturg.common.v1 import common_pb2
from dramaturg.services.audiollm.config import AudioLlmSettings
from dramaturg.services.audiollm.server import AudioLlmService
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.store import ModelStore
from helpers import ServerThread, wait_for
from hostile import speechlike, wav
from prometheus_client import REGISTRY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 16_000
Task = audiollm_pb2.Task


def publish_tiny(home: Path, name: str = "tiny", seed: int = 0) -> None:
    from dramaturg.services.audiollm.model import write_tiny_model

    store = ModelStore(home)
    with store.create_version("audiollm", name, architecture="tiny", base_model="", recipe="test") as staging:
        write_tiny_model(Path(staging), home, seed=seed)
    store.set_default("audiollm", name)


class Served:
    def __init__(self, home: Path, **settings: object) -> None:
        self.home = home
        self.server = ServerThread(AudioLlmService(AudioLlmSettings(**settings), home=home)).__enter__()
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = audiollm_pb2_grpc.AudioLLMStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.__exit__(None, None, None)

    @property
    def limiter(self):
        return self.server.service.limiter


@pytest.fixture()
def served(dramaturg_home: Path) -> Iterator[Served]:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home)
    yield running
    running.stop()


AUDIO = speechlike(3.0, seed=1)


def request(audio: np.ndarray = AUDIO, **fields: object) -> audiollm_pb2.GenerateRequest:
    generation = fields.pop("generation", {"max_new_tokens": 12})
    fields.setdefault("task", Task.TRANSCRIBE)
    return audiollm_pb2.GenerateRequest(
        request_id="r1",
        audio=common_pb2.AudioInput(content=wav(audio)),
        generation=audiollm_pb2.GenerationConfig(**generation),
        **fields,
    )


def error(call) -> tuple[grpc.StatusCode, str, list, float | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    detail = details_from_error(info.value)
    return detail.code, detail.message, [f for f, _ in detail.field_violations], detail.retry_after_seconds


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def in_process(home: Path, audio: np.ndarray, instruction: str, max_new_tokens: int) -> str:
    from dramaturg.services.audiollm.model import load_audiollm

    model, processor = load_audiollm(ModelStore(home).resolve("audiollm", "tiny").path)
    batch = processor(audio.astype(np.float32), instruction)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0], batch["input_ids"].shape[1])


# -- generation ---------------------------------------------------------------------------------------


def test_generate_answers_like_the_model_in_process_with_usage(served: Served) -> None:
    from dramaturg.services.audiollm.prompt import TASK_INSTRUCTIONS

    ttft_before = metric("dramaturg_audiollm_time_to_first_token_seconds_count", method="Generate")
    tokens_before = metric("dramaturg_audiollm_generation_tokens_total", method="Generate")
    reply = served.stub.Generate(request(), timeout=60)
    assert reply.request_id == "r1" and reply.model.name == "tiny" and reply.model.version == "v1"
    assert reply.finish_reason == "length" and reply.seed == 0  # greedy
    usage = reply.usage
    assert usage.completion_tokens == 12 and usage.audio_tokens == 9  # 3 s: 9 windows of 0.34 s
    assert usage.prompt_tokens > usage.audio_tokens
    assert 0 < usage.time_to_first_token_seconds < 30 and 0 < usage.time_per_output_token_seconds < 5
    # the WAV round trip is 16-bit: the model in process reads the same quantised samples
    quantised = np.round(np.clip(AUDIO, -1, 1) * 32767) / 32767
    assert reply.text == in_process(served.home, quantised, TASK_INSTRUCTIONS["asr"], 12)
    ttft_count = metric("dramaturg_audiollm_time_to_first_token_seconds_count", method="Generate")
    assert ttft_count == ttft_before + 1
    assert metric("dramaturg_audiollm_generation_tokens_total", method="Generate") == tokens_before + 12
    assert metric("dramaturg_audiollm_requests_running") == 0


@pytest.mark.parametrize("generation", [{"max_new_tokens": 40}, {"max_new_tokens": 40, "temperature": 1.3,
                                                                 "seed": 5}])
def test_streamed_deltas_add_up_to_generates_text(served: Served, generation: dict) -> None:
    whole = served.stub.Generate(request(task=Task.CAPTION, generation=generation), timeout=60)
    streamed = served.stub.GenerateStream(request(task=Task.CAPTION, generation=generation), timeout=60)
    messages = list(streamed)
    assert messages[0].model.name == "tiny" and messages[0].seed == whole.seed
    *deltas, final = messages
    assert final.is_final and not any(m.is_final for m in deltas)
    assert "".join(m.text_delta for m in messages) == whole.text
    assert final.finish_reason == whole.finish_reason == "length"
    assert final.usage.completion_tokens == 40 and final.token_index == 39
    assert final.usage.prompt_tokens == whole.usage.prompt_tokens
    indices = [m.token_index for m in messages]
    assert indices == sorted(indices)
    if whole.text.strip(":"):  # sampled: varied text arrives in several pieces
        assert len(deltas) >= 2


def test_sampling_is_reproducible_by_seed_and_reports_a_drawn_one(served: Served) -> None:
    config = {"max_new_tokens": 20, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 11}
    first = served.stub.Generate(request(generation=config), timeout=60)
    again = served.stub.Generate(request(generation=config), timeout=60)
    assert first.text == again.text and first.seed == 11
    drawn = served.stub.Generate(request(generation={**config, "seed": 0}), timeout=60)
    assert drawn.seed > 0
    replay = served.stub.Generate(request(generation={**config, "seed": drawn.seed}), timeout=60)
    assert replay.text == drawn.text


def test_span_crops_the_audio_and_long_audio_is_read_in_windows(served: Served) -> None:
    long = speechlike(12.0, seed=2)  # the tiny Whisper window is 5 s: three windows
    whole = served.stub.Generate(request(long), timeout=60)
    assert whole.usage.audio_tokens == 36
    part = served.stub.Generate(request(long, span=common_pb2.TimeSpan(start=6.0, end=9.0)), timeout=60)
    cropped = served.stub.Generate(request(long[6 * RATE: 9 * RATE]), timeout=60)
    assert part.usage.audio_tokens == cropped.usage.audio_tokens == 9
    assert part.text == cropped.text


def test_prompt_tasks(served: Served) -> None:
    answer = served.stub.Generate(request(task=Task.ANSWER, prompt="Who speaks?"), timeout=60)
    free = served.stub.Generate(request(task=Task.TASK_UNSPECIFIED, prompt="Who speaks?"), timeout=60)
    assert answer.text == free.text and answer.usage.prompt_tokens == free.usage.prompt_tokens


# -- bad requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"audio": common_pb2.AudioInput(content=b"not audio at all" * 40)}, "audio", ""),
        ({"audio": common_pb2.AudioInput()}, "audio", ""),
        ({"task": 42}, "task", "TRANSCRIBE"),
        ({"task": Task.TASK_UNSPECIFIED}, "prompt", "TRANSCRIBE"),
        ({"task": Task.ANSWER}, "prompt", "question"),
        ({"task": Task.TRANSCRIBE, "prompt": "Say more."}, "prompt", "own instruction"),
        ({"prompt": "   ", "task": Task.ANSWER}, "prompt", "whitespace"),
        ({"prompt": "a\x00b", "task": Task.ANSWER}, "prompt", "control"),
        ({"prompt": "Where is <SpeechHere> here?", "task": Task.ANSWER}, "prompt", "special token"),
        ({"prompt": "x" * 4001, "task": Task.ANSWER}, "prompt", "4000"),
        ({"generation": {"max_new_tokens": 513}}, "generation.max_new_tokens", "cap of 512"),
        ({"generation": {"max_new_tokens": -1}}, "generation.max_new_tokens", "negative"),
        ({"generation": {"temperature": float("nan")}}, "generation.temperature", ""),
        ({"generation": {"top_p": 1.5}}, "generation.top_p", ""),
        ({"generation": {"top_k": -3}}, "generation.top_k", ""),
        ({"generation": {"repetition_penalty": -1}}, "generation.repetition_penalty", ""),
        ({"span": common_pb2.TimeSpan(start=5.0, end=6.0)}, "span.start", "past the end"),
        ({"span": common_pb2.TimeSpan(start=1.0, end=0.5)}, "span.end", "after start"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(served: Served, change: dict, field: str,
                                                            words: str) -> None:
    fields = dict(change)
    audio = fields.pop("audio", None)
    built = request(**fields)
    if audio is not None:
        built.audio.CopyFrom(audio)
    def stream(r: audiollm_pb2.GenerateRequest, timeout: float) -> list:
        return list(served.stub.GenerateStream(r, timeout=timeout))

    for rpc in (served.stub.Generate, stream):
        code, message, fields_named, _ = error(lambda rpc=rpc: rpc(built, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert any(f == field or f.startswith(f"{field}.") for f in fields_named), (fields_named, message)
        assert words in message


def test_a_prompt_over_the_context_is_invalid_argument(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home, max_new_tokens=1900, max_prompt_chars=20_000)
    try:
        minute = speechlike(60.0, seed=3)  # 180 audio tokens
        code, message, fields, _ = error(
            lambda: running.stub.Generate(request(minute, generation={"max_new_tokens": 1900}), timeout=30)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["audio"] and "2048" in message
        words = " ".join(f"w{i}" for i in range(2500))  # > 2048 tokens of text alone
        code, message, fields, _ = error(
            lambda: running.stub.Generate(request(task=Task.ANSWER, prompt=words), timeout=30)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["prompt"] and "context" in message
    finally:
        running.stop()


def test_unknown_model_is_not_found(served: Served) -> None:
    code, message, _, _ = error(
        lambda: served.stub.Generate(request(model=common_pb2.ModelRef(name="nope")), timeout=30)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message


# -- deadlines, cancellation, admission -------------------------------------------------------------------


LONG = {"max_new_tokens": 1900}  # seconds of decoding on the tiny model, the whole context


@pytest.fixture()
def roomy(dramaturg_home: Path) -> Iterator[Served]:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home, max_new_tokens=1900, max_waiting=0)
    yield running
    running.stop()


def test_a_deadline_stops_decoding(roomy: Served) -> None:
    began = time.monotonic()
    code, _, _, _ = error(lambda: roomy.stub.Generate(request(AUDIO[:RATE], generation=LONG), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: roomy.limiter.running == 0, 3, "decoding to stop")
    stopped_after = time.monotonic() - began
    # the whole run takes far longer: it really was stopped, not finished
    began = time.monotonic()
    whole = roomy.stub.Generate(request(AUDIO[:RATE], generation=LONG), timeout=120)
    assert whole.usage.completion_tokens == 1900
    assert time.monotonic() - began > 2 * stopped_after


def test_full_waiting_room_is_resource_exhausted_and_a_cancelled_stream_stops(roomy: Served) -> None:
    stream = roomy.stub.GenerateStream(request(AUDIO[:RATE], generation=LONG), timeout=120)
    first = next(stream)  # decoding has begun: the one slot is taken
    assert first.text_delta or first.is_final
    assert roomy.limiter.running == 1
    depth = metric("dramaturg_queue_depth", service="audiollm", queue="generate")
    assert depth == 0
    code, message, _, retry = error(lambda: roomy.stub.Generate(request(), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry and retry > 0 and "busy" in message
    stream.cancel()
    wait_for(lambda: roomy.limiter.running == 0, 3, "the cancelled stream to stop decoding")
    assert roomy.stub.Generate(request(), timeout=60).usage.completion_tokens == 12


def test_concurrent_requests_queue_and_all_finish(served: Served) -> None:
    replies: list[audiollm_pb2.GenerateResponse] = []

    def one() -> None:
        replies.append(served.stub.Generate(request(), timeout=60))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 3 and len({r.text for r in replies}) == 1


# -- batching -------------------------------------------------------------------------------------------


def concurrently(calls: list) -> list:
    """Run the calls at once (threads), return their results (or the RpcError each raised), in order."""
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except grpc.RpcError as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_batched_requests_answer_what_each_gets_alone(dramaturg_home: Path) -> None:
    """Different clip lengths, tasks and max_new_tokens in one left-padded generate: each row's text
    and token count equal the same request's on a server that does not batch."""
    publish_tiny(dramaturg_home)
    other = speechlike(2.2, seed=7)
    requests = [
        request(AUDIO, generation={"max_new_tokens": 12}),
        request(AUDIO[:RATE], task=Task.CAPTION, generation={"max_new_tokens": 20}),
        request(other, generation={"max_new_tokens": 5}),
        request(other, task=Task.TASK_UNSPECIFIED, prompt="Who is speaking, and how fast?",
                generation={"max_new_tokens": 16}),
    ]
    alone = Served(dramaturg_home, batching=False)
    try:
        expected = [alone.stub.Generate(r, timeout=60) for r in requests]
    finally:
        alone.stop()
    batches = metric("dramaturg_batch_size_count", service="audiollm", queue="generate-batch")
    rows = metric("dramaturg_batch_size_sum", service="audiollm", queue="generate-batch")
    batched = Served(dramaturg_home, batching=True, max_batch_items=4, max_wait_ms=300)
    try:
        replies = concurrently([lambda r=r: batched.stub.Generate(r, timeout=60) for r in requests])
    finally:
        batched.stop()
    for reply, want in zip(replies, expected, strict=True):
        assert isinstance(reply, audiollm_pb2.GenerateResponse), reply
        assert (reply.text, reply.usage.completion_tokens, reply.finish_reason) == (
            want.text, want.usage.completion_tokens, want.finish_reason)
        assert reply.usage.prompt_tokens == want.usage.prompt_tokens
        assert 0 < reply.usage.time_to_first_token_seconds < 60
    new_batches = metric("dramaturg_batch_size_count", service="audiollm", queue="generate-batch") - batches
    new_rows = metric("dramaturg_batch_size_sum", service="audiollm", queue="generate-batch") - rows
    assert new_rows == len(requests) and new_batches < len(requests)  # some really ran together


def test_a_batched_row_past_its_deadline_stops_and_the_others_finish(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    served = Served(dramaturg_home, max_new_tokens=1900, batching=True, max_batch_items=2, max_wait_ms=300)
    try:
        began = time.monotonic()
        whole = served.stub.Generate(request(AUDIO[:RATE], generation=LONG), timeout=120)
        solo_seconds = time.monotonic() - began
        assert whole.usage.completion_tokens == 1900
        timed: list[float] = []

        def short_one() -> audiollm_pb2.GenerateResponse:
            start = time.monotonic()
            reply = served.stub.Generate(request(AUDIO[:RATE], generation={"max_new_tokens": 200}),
                                         timeout=120)
            timed.append(time.monotonic() - start)
            return reply

        doomed, kept = concurrently([
            lambda: served.stub.Generate(request(AUDIO[:RATE], generation=LONG), timeout=0.8),
            short_one,
        ])
        wait_for(lambda: metric("dramaturg_audiollm_requests_running") == 0, 10, "the batch to end")
    finally:
        served.stop()
    assert isinstance(doomed, grpc.RpcError) and doomed.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(kept, audiollm_pb2.GenerateResponse) and kept.usage.completion_tokens == 200
    assert kept.text == whole.text[: len(kept.text)]  # greedy: the long answer's beginning
    # the batch ended with the short row: the long row had stopped, it did not decode to 1900
    assert timed[0] < 0.6 * solo_seconds, (timed, solo_seconds)
