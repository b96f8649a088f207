"""The model-service contract: what every registered model service does the same way, checked over real gRPC.

Runs once per service in ``shared.registry.model_services()`` — a new service is covered the moment
its package registers itself (with a ``tiny_model`` writer). Each service is started on a tiny
untrained model in its own ``DRAMATURG_HOME``; the checks know nothing service-specific: the RPCs
that take audio are found in the service's own proto descriptors.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from dramaturg.common.v1 import common_pb2, common_pb2_grpc
from dramaturg.shared import metrics, registry
from dramaturg.shared.grpc.errors import details_from_error
from dramaturg.shared.store import ModelStore
from dramaturg.shared.training.recipe import load_recipes
from dramaturg.training.v1 import training_pb2, training_pb2_grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ServerThread, wait_for
from hostile import NEEDS_SPEECH, make_context, run_audio_battery, speechlike, wav

MODEL_SERVICES = registry.model_services()
AUDIO_INPUT = common_pb2.AudioInput.DESCRIPTOR.full_name
MODEL_REF = common_pb2.ModelRef.DESCRIPTOR.full_name
GARBAGE = b"this is not audio, just bytes a client sent by mistake " * 20

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def publish_tiny(entry: registry.ServiceEntry, home: Path, name: str = "tiny", *, seed: int = 0,
                 default: bool = True) -> None:
    store = ModelStore(home)
    writer = store.create_version(entry.name, name, architecture="tiny", base_model="", recipe="contract")
    with writer as staging:
        entry.load_tiny_model_writer()(Path(staging), home, seed=seed)
    if default:
        store.set_default(entry.name, name)


@dataclass
class Running:
    entry: registry.ServiceEntry
    home: Path
    server: ServerThread
    channel: grpc.Channel
    service_names: list[str]
    health_while_loading: dict[str, int] = field(default_factory=dict)
    health_after_loading: dict[str, int] = field(default_factory=dict)


def _health(channel: grpc.Channel, names: list[str]) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {n: stub.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status for n in ["", *names]}


@pytest.fixture(scope="module", params=MODEL_SERVICES)
def running(request, tmp_path_factory) -> Iterator[Running]:
    entry = registry.get(request.param)
    home = tmp_path_factory.mktemp(f"{entry.name}-home")
    previous = os.environ.get("DRAMATURG_HOME")
    os.environ["DRAMATURG_HOME"] = str(home)
    try:
        publish_tiny(entry, home)
        settings = entry.load_settings_class()(audio_uri_roots=[str(home / "audio" / "allowed")])
        service = entry.load_factory()(settings)
        assert service.home == home
        # Hold the model load until health has been asked: NOT_SERVING while loading, then SERVING.
        gate = threading.Event()
        load = service.load_model

        def gated_load(record: Any, device: str) -> Any:
            gate.wait(60)
            return load(record, device)

        service.load_model = gated_load
        names = [r.full_name for r in service.service_registrations()]
        server = ServerThread(service, wait_ready=False)
        server.__enter__()
        channel = grpc.insecure_channel(server.target)
        try:
            while_loading = _health(channel, names)
            gate.set()
            wait_for(lambda: server._ready.is_set(), 120, "the model to load")
            if server._error:
                raise server._error
            yield Running(entry, home, server, channel, names, while_loading, _health(channel, names))
        finally:
            gate.set()
            channel.close()
            server.__exit__(None, None, None)
    finally:
        if previous is None:
            os.environ.pop("DRAMATURG_HOME", None)
        else:
            os.environ["DRAMATURG_HOME"] = previous


# -- discovering the audio RPCs from the service's descriptors ------------------------------------


def _methods(running: Running) -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    out = []
    for name in running.service_names:
        out.extend(pool.FindServiceByName(name).methods)
    return out


def _audio_paths(message: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Field paths of AudioInput fields in a request message type (nested up to two levels)."""
    out = []
    for f in message.fields:
        if f.message_type is None:
            continue
        path = f"{prefix}{f.name}"
        if f.message_type.full_name == AUDIO_INPUT:
            out.append(path)
        elif depth < 2 and f.message_type.full_name != MODEL_REF:
            out.extend(_audio_paths(f.message_type, f"{path}.", depth + 1))
    return out


def audio_rpcs(running: Running) -> list[MethodDescriptor]:
    """Unary-request RPCs whose request carries audio (client-streaming ones send raw PCM)."""
    return [m for m in _methods(running) if not m.client_streaming and _audio_paths(m.input_type)]


def build_request(method: MethodDescriptor, audio: common_pb2.AudioInput,
                  model: common_pb2.ModelRef | None = None) -> Any:
    """A request with every audio field set to ``audio`` and plausible values elsewhere.

    Singular strings get a harmless id (so an id check does not answer first), oneofs get their audio
    member, ModelRef fields get ``model`` when given.
    """
    cls = message_factory.GetMessageClass(method.input_type)
    request = cls()

    def fill(msg: Any, depth: int = 0) -> None:
        for f in msg.DESCRIPTOR.fields:
            repeated = f.is_repeated
            if f.message_type is not None and f.message_type.full_name == AUDIO_INPUT:
                if repeated:
                    getattr(msg, f.name).add().CopyFrom(audio)
                else:
                    getattr(msg, f.name).CopyFrom(audio)
            elif f.message_type is not None and f.message_type.full_name == MODEL_REF:
                if model is not None and not repeated:
                    getattr(msg, f.name).CopyFrom(model)
            elif f.message_type is not None and not repeated and depth < 2 and f.containing_oneof is None:
                fill(getattr(msg, f.name), depth + 1)
            elif f.type == FieldDescriptor.TYPE_STRING and not repeated and f.containing_oneof is None:
                setattr(msg, f.name, "contract-test")

    fill(request)
    return request


def call(running: Running, method: MethodDescriptor, request: Any, timeout: float = 60) -> Any:
    service = method.containing_service.full_name
    rpc = running.channel.unary_unary(
        f"/{service}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    if method.server_streaming:
        rpc = running.channel.unary_stream(
            f"/{service}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )
        return list(rpc(request, timeout=timeout))
    return rpc(request, timeout=timeout)


def failure(running: Running, method: MethodDescriptor, request: Any) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        call(running, method, request)
    return details_from_error(info.value)


# -- the contract ---------------------------------------------------------------------------------


def test_health_is_not_serving_until_the_model_is_loaded(running: Running) -> None:
    assert set(running.health_while_loading.values()) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert set(running.health_after_loading.values()) == {health_pb2.HealthCheckResponse.SERVING}


def test_reflection_lists_every_mounted_service(running: Running) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    listed = set(ProtoReflectionDescriptorDatabase(running.channel).get_services())
    expected = {"dramaturg.common.v1.ModelRepository", "dramaturg.training.v1.Training",
                "grpc.health.v1.Health"}
    assert {*running.service_names, *expected} <= listed
    assert any(n.startswith(f"dramaturg.{running.entry.name}.v1.") for n in running.service_names)


def test_model_repository_lists_loads_and_unloads(running: Running) -> None:
    repo = common_pb2_grpc.ModelRepositoryStub(running.channel)
    listed = {m.ref.name: m for m in repo.ListModels(common_pb2.ListModelsRequest(), timeout=10).models}
    assert listed["tiny"].loaded and listed["tiny"].is_default
    if "other" not in listed:
        publish_tiny(running.entry, running.home, "other", seed=1, default=False)
    other = common_pb2.ModelRef(name="other")
    loaded = repo.LoadModel(common_pb2.LoadModelRequest(model=other), timeout=120)
    assert loaded.model.loaded and not loaded.model.is_default and loaded.model.ref.version == "v1"
    repo.UnloadModel(common_pb2.UnloadModelRequest(model=other), timeout=30)
    with pytest.raises(grpc.RpcError) as again:
        repo.UnloadModel(common_pb2.UnloadModelRequest(model=other), timeout=30)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as missing:
        repo.LoadModel(common_pb2.LoadModelRequest(model=common_pb2.ModelRef(name="missing")), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "missing" in missing.value.details()


def test_training_lists_the_registered_recipes(running: Running) -> None:
    stub = training_pb2_grpc.TrainingStub(running.channel)
    reply = stub.ListRecipes(training_pb2.ListRecipesRequest(), timeout=30)
    expected = load_recipes(running.entry.recipes)
    assert expected and {r.name for r in reply.recipes} == set(expected)
    assert all(r.description for r in reply.recipes)


def test_the_service_takes_audio_somewhere(running: Running) -> None:
    assert audio_rpcs(running), "a model service with no audio RPC: is its proto registered?"


def test_garbage_audio_is_invalid_argument_naming_the_field(running: Running) -> None:
    garbage = common_pb2.AudioInput(content=GARBAGE)
    for method in audio_rpcs(running):
        detail = failure(running, method, build_request(method, garbage))
        assert detail.code == grpc.StatusCode.INVALID_ARGUMENT, (method.name, detail)
        paths = _audio_paths(method.input_type)
        fields = [v[0] for v in detail.field_violations]
        named = [f for f in fields for p in paths if f == p or f.startswith((f"{p}.", f"{p}["))]
        assert named, (method.name, fields, paths)
        assert detail.message and len(detail.message) < 2000


# Duration rules differ per RPC (Identify takes a whole scene), and only some services need speech in
# the audio: those cases run in tests/test_hostile_input.py against each RPC's own bounds.
NOT_GENERIC = frozenset({"too_long", "too_long_raw", "too_short", "zero_frames", *NEEDS_SPEECH})


def test_every_audio_field_refuses_the_hostile_battery(running: Running) -> None:
    """tests/hostile.py's malformed inputs (NUL and 10k-character URIs, traversal, corrupt headers,
    NaN and 1e30 samples, absurd rates…) in every audio field of every audio RPC: a clear
    INVALID_ARGUMENT naming the field, never INTERNAL, and status trailers under the client's limit."""
    settings = running.server.service.settings
    ctx = make_context(running.home / "audio", settings.min_seconds, settings.max_seconds)
    good = common_pb2.AudioInput(content=wav(speechlike(2.0)))  # in the other audio fields
    for method in audio_rpcs(running):
        for path in _audio_paths(method.input_type):
            def send(audio: common_pb2.AudioInput, method: MethodDescriptor = method,
                     path: str = path) -> Any:
                request = build_request(method, good)
                target = request
                *parents, last = path.split(".")
                for name in parents:
                    target = getattr(target, name)
                holder = getattr(target, last)
                if hasattr(holder, "add"):  # repeated: the hostile input first
                    del holder[:]
                    holder.add().CopyFrom(audio)
                else:
                    holder.CopyFrom(audio)
                return call(running, method, request)

            top = method.input_type.fields_by_name[path.split(".")[0]]
            run_audio_battery(send, ctx, f"{path}[0]" if top.is_repeated else path, exclude=NOT_GENERIC)


def test_a_model_that_does_not_exist_is_not_found(running: Running) -> None:
    for method in audio_rpcs(running):
        if not any(f.message_type is not None and f.message_type.full_name == MODEL_REF
                   for f in _all_fields(method.input_type)):
            continue
        request = build_request(method, common_pb2.AudioInput(content=GARBAGE),
                                common_pb2.ModelRef(name="no-such-model"))
        detail = failure(running, method, request)
        assert detail.code == grpc.StatusCode.NOT_FOUND, (method.name, detail)
        assert "no-such-model" in detail.message


def _all_fields(message: Any, depth: int = 0) -> list[FieldDescriptor]:
    out = list(message.fields)
    if depth < 2:
        for f in message.fields:
            if f.message_type is not None and f.message_type.full_name not in (AUDIO_INPUT, MODEL_REF):
                out.extend(_all_fields(f.message_type, depth + 1))
    return out


def test_metrics_have_the_grpc_and_gpu_families(running: Running) -> None:
    port = metrics.start_metrics_server(0, "127.0.0.1")
    repo = common_pb2_grpc.ModelRepositoryStub(running.channel)
    repo.ListModels(common_pb2.ListModelsRequest(), timeout=10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = ("grpc_server_started_total", "grpc_server_handled_total",
                "grpc_server_handling_seconds_bucket", "dramaturg_gpu_available", "dramaturg_gpu_count",
                "dramaturg_model_loaded", "dramaturg_training_runs")
    for family in families:
        assert family in text, family
    assert f'dramaturg_service_ready{{service="{running.entry.name}"}} 1.0' in text
    assert 'grpc_service="dramaturg.common.v1.ModelRepository"' in text


@pytest.mark.parametrize("name", MODEL_SERVICES)
def test_without_a_model_in_the_store_start_says_how_to_get_one(name: str, dramaturg_home: Path) -> None:
    entry = registry.get(name)
    service = entry.load_factory()(entry.load_settings_class()())
    assert service.home == dramaturg_home  # empty: the autouse fixture's fresh home
    with pytest.raises(RuntimeError, match=f"make train-{name}"), ServerThread(service):
        pass
