"""The evaluator service over real gRPC, on the untrained tiny Qwen2-Audio: Evaluate equals the scoring in
process (one encoding, every dimension in one batch), span equals the cropped audio, ListDimensions,
every bad input with its status, deadlines and admission (the model thread held busy by the test).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from dramaturg.common.v1 import common_pb2
from dramaturg.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from dramaturg.services.evaluator.config import EvaluatorSettings
from dramaturg.services.evaluator.prompts import DIMENSIONS, REALISM
from dramaturg.services.evaluator.server import EvaluatorService
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.store import ModelStore
from helpers import ServerThread, wait_for
from hostile import speechlike, wav

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 16_000
Rubric = evaluator_pb2.Rubric
REALISM_DIMS = list(DIMENSIONS[REALISM])
CONTEXT = evaluator_pb2.RoleContext(
    local_scene="a storm at sea", char_age="40", char_style="gruff, commanding",
    char_profile="an old captain", transcript="hold fast", question="Does this sound like a pirate?",
)


def publish_tiny(home: Path, name: str = "tiny", seed: int = 0, labels: dict | None = None) -> None:
    from dramaturg.services.evaluator.model import write_tiny_model

    store = ModelStore(home)
    with store.create_version("evaluator", name, architecture="tiny", base_model="",
                              recipe="test", labels=labels) as staging:
        write_tiny_model(Path(staging), home, seed=seed)
    store.set_default("evaluator", name)


class Served:
    """The evaluator service on a loopback port, with a stub (``service``: the ModelService itself)."""

    def __init__(self, home: Path, **settings: object) -> None:
        self.home = home
        self.server = ServerThread(EvaluatorService(EvaluatorSettings(**settings), home=home)).__enter__()
        self.service: EvaluatorService = self.server.service
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = evaluator_pb2_grpc.EvaluatorStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.__exit__(None, None, None)


@pytest.fixture()
def served(dramaturg_home: Path) -> Iterator[Served]:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home)
    yield running
    running.stop()


AUDIO = speechlike(3.0, seed=1)
QUANTISED = np.round(np.clip(AUDIO, -1, 1) * 32767) / 32767  # what the 16-bit WAV carries


def request(audio: np.ndarray = AUDIO, **fields: object) -> evaluator_pb2.EvaluateRequest:
    fields.setdefault("rubric", Rubric.REALISM)
    fields.setdefault("context", CONTEXT)
    return evaluator_pb2.EvaluateRequest(
        request_id="r1", audio=common_pb2.AudioInput(content=wav(audio)), **fields
    )


def error(call) -> tuple[grpc.StatusCode, str, list]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    detail = details_from_error(info.value)
    return detail.code, detail.message, [f for f, _ in detail.field_violations]


def in_process(home: Path, audio: np.ndarray, item: dict, dimensions: list[str],
               detailed: bool = True) -> dict:
    from dramaturg.services.evaluator.model import load_evaluator
    from dramaturg.services.evaluator.scoring import score_item

    model, processor = load_evaluator(ModelStore(home).resolve("evaluator", "tiny").path)
    return score_item(model, processor, audio.astype(np.float32), item, dimensions=dimensions,
                      detailed=detailed)


ITEM = {"dataset_name": "ROLE", "char_profile": CONTEXT.char_profile, "local_scene": CONTEXT.local_scene,
        "char_style": CONTEXT.char_style}


def check_equal(reply: evaluator_pb2.EvaluateResponse, expected: dict, dimensions: list[str]) -> None:
    assert [s.dimension for s in reply.scores] == dimensions
    for s in reply.scores:
        want = expected[s.dimension]
        assert s.score == pytest.approx(want.score, abs=1e-4)
        assert list(s.probabilities) == pytest.approx(list(want.distribution), abs=1e-4)
        assert s.digit_mass == pytest.approx(want.digit_mass, abs=1e-4)
        assert 1 <= s.score <= 5 and sum(s.probabilities) == pytest.approx(1, abs=1e-5)
    assert reply.mean_score == pytest.approx(np.mean([s.score for s in reply.scores]), abs=1e-6)


# -- scoring ------------------------------------------------------------------------------------------


def test_evaluate_equals_scoring_in_process(served: Served) -> None:
    reply = served.stub.Evaluate(request(), timeout=60)
    assert reply.request_id == "r1" and reply.model.name == "tiny" and reply.model.version == "v1"
    check_equal(reply, in_process(served.home, QUANTISED, ITEM, REALISM_DIMS), REALISM_DIMS)
    some = ["emotion_accuracy", "pitch_variation"]  # the request's order, not the rubric's
    reply = served.stub.Evaluate(request(dimensions=some), timeout=60)
    check_equal(reply, in_process(served.home, QUANTISED, ITEM, some), some)


def test_archetype_reads_the_question(served: Served) -> None:
    item = {"dataset_name": "Arche", "question": CONTEXT.question}
    dims = list(DIMENSIONS["Arche"])
    reply = served.stub.Evaluate(
        request(rubric=Rubric.ARCHETYPE, context=evaluator_pb2.RoleContext(question=CONTEXT.question)),
        timeout=60,
    )
    check_equal(reply, in_process(served.home, QUANTISED, item, dims), dims)


def test_span_is_the_cropped_audio(served: Served) -> None:
    dims = REALISM_DIMS[:3]
    spanned = served.stub.Evaluate(
        request(dimensions=dims, span=common_pb2.TimeSpan(start=0.5, end=2.0)), timeout=60
    )
    cropped = served.stub.Evaluate(request(AUDIO[RATE // 2 : 2 * RATE], dimensions=dims), timeout=60)
    for a, b in zip(spanned.scores, cropped.scores, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    whole = served.stub.Evaluate(request(dimensions=dims), timeout=60)
    assert any(abs(a.score - b.score) > 1e-6 for a, b in zip(spanned.scores, whole.scores, strict=True))


def test_list_dimensions(served: Served) -> None:
    realism = served.stub.ListDimensions(evaluator_pb2.ListDimensionsRequest(rubric=Rubric.REALISM))
    assert list(realism.dimensions) == REALISM_DIMS
    assert [i.dimension for i in realism.info] == REALISM_DIMS
    assert all(i.display_name and i.summary and i.rubric == Rubric.REALISM for i in realism.info)
    archetype = served.stub.ListDimensions(evaluator_pb2.ListDimensionsRequest(rubric=Rubric.ARCHETYPE))
    assert list(archetype.dimensions) == list(DIMENSIONS["Arche"])
    every = served.stub.ListDimensions(evaluator_pb2.ListDimensionsRequest())
    assert list(every.dimensions) == REALISM_DIMS + list(DIMENSIONS["Arche"])


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"audio": common_pb2.AudioInput(content=b"not audio at all " * 20)}, "audio", ""),
        ({"rubric": Rubric.RUBRIC_UNSPECIFIED}, "rubric", "REALISM, ARCHETYPE"),
        ({"rubric": 7}, "rubric", "REALISM, ARCHETYPE"),
        ({"dimensions": ["pitch_variation", "charisma"]}, "dimensions[1]", "pitch_variation, "),
        ({"dimensions": ["audio_quality"]}, "dimensions[0]", "known"),  # an archetype one under realism
        ({"dimensions": ["pitch_variation", "pitch_variation"]}, "dimensions[1]", "twice"),
        ({"context": evaluator_pb2.RoleContext(local_scene="x", char_style="y")}, "context.char_profile",
         "need"),
        ({"rubric": Rubric.ARCHETYPE, "context": evaluator_pb2.RoleContext(char_profile="x")},
         "context.question", "need"),
        ({"context": evaluator_pb2.RoleContext(char_profile="x" * 5000)}, "context.char_profile", "5000"),
        ({"span": common_pb2.TimeSpan(start=2.0, end=1.0)}, "span.end", ""),
        ({"span": common_pb2.TimeSpan(start=0.0, end=9.0)}, "span.end", ""),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(served: Served, change: dict, field: str,
                                                            words: str) -> None:
    fields = dict(change)
    audio = fields.pop("audio", None)
    req = request(**fields)
    if audio is not None:
        req.audio.CopyFrom(audio)
    code, message, fields_named = error(lambda: served.stub.Evaluate(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert fields_named, message
    assert fields_named[0] == field or fields_named[0].startswith(f"{field}."), fields_named
    assert words in message


def test_audio_longer_than_the_window_is_refused(served: Served) -> None:
    code, message, fields = error(lambda: served.stub.Evaluate(request(speechlike(7.0, seed=2)), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fields == ["audio"] and "5-s" in message
    # a span of it inside the window is fine
    reply = served.stub.Evaluate(
        request(speechlike(7.0, seed=2), span=common_pb2.TimeSpan(start=1.0, end=4.0)), timeout=60
    )
    assert len(reply.scores) == len(REALISM_DIMS)


def test_unknown_model_is_not_found(served: Served) -> None:
    req = request(model=common_pb2.ModelRef(name="no-such-model"))
    code, message, _ = error(lambda: served.stub.Evaluate(req, timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-model" in message


# -- deadlines, admission -------------------------------------------------------------------------------


@pytest.fixture()
def strict(dramaturg_home: Path) -> Iterator[Served]:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home, max_waiting=0)  # on CPU: one request at a time, the admission path
    yield running
    running.stop()


def hold_model_thread(service: EvaluatorService) -> threading.Event:
    """Occupy the one model thread until the returned event is set."""
    release = threading.Event()
    service.executor.submit(release.wait, 30)
    return release


def test_deadline_is_deadline_exceeded_and_the_work_is_dropped(strict: Served) -> None:
    release = hold_model_thread(strict.service)
    try:
        code, _, _ = error(lambda: strict.stub.Evaluate(request(), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    wait_for(lambda: strict.service.limiter.running == 0, 5, "the slot to be released")
    assert len(strict.stub.Evaluate(request(), timeout=60).scores) == len(REALISM_DIMS)


def test_full_waiting_room_is_resource_exhausted(strict: Served) -> None:
    release = hold_model_thread(strict.service)
    first: list = []
    worker = threading.Thread(target=lambda: first.append(strict.stub.Evaluate(request(), timeout=60)))
    try:
        worker.start()
        wait_for(lambda: strict.service.limiter.running == 1, 10, "the first request to take the slot")
        code, message, _ = error(lambda: strict.stub.Evaluate(request(), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    finally:
        release.set()
        worker.join(60)
    assert first and len(first[0].scores) == len(REALISM_DIMS)


def test_concurrent_requests_queue_and_agree(served: Served) -> None:
    replies: list[evaluator_pb2.EvaluateResponse] = []
    threads = [threading.Thread(target=lambda: replies.append(served.stub.Evaluate(request(), timeout=60)))
               for _ in range(3)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 3 and len({r.mean_score for r in replies}) == 1
    assert time.monotonic() - began < 60


def loaded(service: EvaluatorService):
    """The one model the service has loaded (its warm-up loaded the default)."""
    (entry,) = service.models._loaded.values()
    return entry.model


def evaluate_calls() -> float:
    from prometheus_client import REGISTRY

    labels = {"grpc_service": "dramaturg.evaluator.v1.Evaluator", "grpc_method": "Evaluate",
              "grpc_type": "unary"}
    return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0


def batch_sizes() -> tuple[float, float]:
    from prometheus_client import REGISTRY

    labels = {"service": "evaluator", "queue": "evaluate"}
    return (REGISTRY.get_sample_value("dramaturg_batch_size_sum", labels) or 0.0,
            REGISTRY.get_sample_value("dramaturg_batch_size_count", labels) or 0.0)


@pytest.fixture()
def batching(dramaturg_home: Path) -> Iterator[Served]:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home, batching=True)  # on CPU batching is off unless asked for
    yield running
    running.stop()


def test_concurrent_requests_are_batched_and_score_as_alone(batching: Served) -> None:
    """Four requests arrive while the model thread is busy: they run as one batch (one encoder pass,
    one language-model batch) and each gets the scores it gets alone."""
    served = batching
    clips = [speechlike(1.5 + 0.7 * i, seed=10 + i) for i in range(4)]
    some = ["pitch_variation", "dynamic_range", "emotion_accuracy"]
    replies: dict[int, evaluator_pb2.EvaluateResponse] = {}
    release = hold_model_thread(served.service)
    before, arrived = batch_sizes(), evaluate_calls()
    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(
        i, served.stub.Evaluate(request(clips[i], dimensions=some), timeout=60))) for i in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: evaluate_calls() - arrived >= 4, 10, "the requests to arrive")
        time.sleep(0.5)  # decoded and queued (or in a first batch waiting for the model thread)
    finally:
        release.set()
        for t in threads:
            t.join(60)
    total, batches = (a - b for a, b in zip(batch_sizes(), before, strict=True))
    assert total == 4 and batches <= 2  # four requests in at most two model calls
    for i, clip in enumerate(clips):
        quantised = np.round(np.clip(clip, -1, 1) * 32767) / 32767
        check_equal(replies[i], in_process(served.home, quantised, ITEM, some), some)


def test_a_full_batch_queue_is_resource_exhausted(dramaturg_home: Path) -> None:
    publish_tiny(dramaturg_home)
    running = Served(dramaturg_home, max_queue=1, max_batch_items=1, batching=True)
    release = hold_model_thread(running.service)
    first: list = []
    workers = [threading.Thread(target=lambda: first.append(running.stub.Evaluate(request(), timeout=60)))
               for _ in range(2)]
    try:
        workers[0].start()
        model = loaded(running.service)
        wait_for(lambda: evaluate_calls() >= 1, 10, "the first request to arrive")
        time.sleep(0.5)  # the scheduler takes it into a batch, which waits for the busy model thread
        assert model.batcher.queue_depth == 0
        workers[1].start()
        wait_for(lambda: model.batcher.queue_depth == 1, 10, "the second request to queue")
        code, message, _ = error(lambda: running.stub.Evaluate(request(), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    finally:
        release.set()
        for w in workers:
            w.join(60)
        running.stop()
    assert len(first) == 2


def test_a_model_is_prompted_in_the_style_it_was_trained_on(dramaturg_home: Path) -> None:
    """The sft recipe labels its models with their prompt style; the service follows the label."""
    publish_tiny(dramaturg_home, labels={"prompts": "simple"})
    running = Served(dramaturg_home)  # detailed_prompts defaults to True: the label must win
    try:
        some = ["emotion_accuracy", "pitch_variation"]
        reply = running.stub.Evaluate(request(dimensions=some), timeout=60)
        check_equal(reply, in_process(dramaturg_home, QUANTISED, ITEM, some, detailed=False), some)
        detailed = in_process(dramaturg_home, QUANTISED, ITEM, some, detailed=True)
        assert any(abs(s.score - detailed[s.dimension].score) > 1e-4 for s in reply.scores)
    finally:
        running.stop()


def publish_prompt_tuned(home: Path, method: str, name: str = "tiny") -> None:
    """The tiny evaluator with a soft prompt (``peft: prompt | prefix``'s published layout: the base and
    the soft prompt beside it)."""
    from dramaturg.services.evaluator.model import (
        build_tiny_evaluator,
        hear_through_prompt_tuning,
        peft_config,
        save_evaluator,
    )
    from peft import get_peft_model

    model, processor = build_tiny_evaluator(seed=0)
    tuned = hear_through_prompt_tuning(get_peft_model(model, peft_config(method, virtual_tokens=6)))
    with torch.no_grad():
        tuned.prompt_encoder["default"].embedding.weight.mul_(5.0)
    store = ModelStore(home)
    with store.create_version("evaluator", name, architecture="qwen2-audio", base_model="", recipe="test",
                              labels={"peft": method}) as staging:
        save_evaluator(tuned, processor, Path(staging))
    store.set_default("evaluator", name)


@pytest.mark.parametrize(("method", "batched"), [("prompt", False), ("prompt", True), ("prefix", True)])
def test_a_prompt_tuned_model_is_served_with_its_soft_prompt(
    dramaturg_home: Path, method: str, batched: bool
) -> None:
    """A ``peft: prompt | prefix`` model serves alone and in batches, scoring as in process; its soft
    prompt counts (the scores differ from the base's)."""
    publish_tiny(dramaturg_home, name="base")
    publish_prompt_tuned(dramaturg_home, method)
    running = Served(dramaturg_home, batching=batched)
    try:
        some = ["emotion_accuracy", "pitch_variation"]
        reply = running.stub.Evaluate(request(dimensions=some), timeout=60)
        check_equal(reply, in_process(dramaturg_home, QUANTISED, ITEM, some), some)
        base = running.stub.Evaluate(request(dimensions=some, model=common_pb2.ModelRef(name="base")),
                                     timeout=60)
        assert any(abs(a.score - b.score) > 1e-4 for a, b in zip(reply.scores, base.scores, strict=True))
    finally:
        running.stop()
