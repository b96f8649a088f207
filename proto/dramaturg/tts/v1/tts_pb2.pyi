import datetime

from dramaturg.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SynthesisConfig(_message.Message):
    __slots__ = ("model", "voice_id", "reference_audio", "reference_text", "encoding", "sample_rate_hz", "temperature", "top_p", "max_new_tokens", "seed", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TEXT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    voice_id: str
    reference_audio: _common_pb2.AudioInput
    reference_text: str
    encoding: _common_pb2.AudioEncoding
    sample_rate_hz: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    top_k: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., voice_id: _Optional[str] = ..., reference_audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., reference_text: _Optional[str] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ...) -> None: ...

class SynthesizeRequest(_message.Message):
    __slots__ = ("request_id", "text", "config")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    config: SynthesisConfig
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., config: _Optional[_Union[SynthesisConfig, _Mapping]] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("request_id", "audio", "model", "seed", "generated_frames")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: _common_pb2.AudioOutput
    model: _common_pb2.ModelRef
    seed: int
    generated_frames: int
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[_Union[_common_pb2.AudioOutput, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., seed: _Optional[int] = ..., generated_frames: _Optional[int] = ...) -> None: ...

class SynthesizeOnlineResponse(_message.Message):
    __slots__ = ("request_id", "audio_chunk", "sample_rate_hz", "sequence", "audio_seconds", "is_final", "model", "seed", "encoding")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio_chunk: bytes
    sample_rate_hz: int
    sequence: int
    audio_seconds: float
    is_final: bool
    model: _common_pb2.ModelRef
    seed: int
    encoding: _common_pb2.AudioEncoding
    def __init__(self, request_id: _Optional[str] = ..., audio_chunk: _Optional[bytes] = ..., sample_rate_hz: _Optional[int] = ..., sequence: _Optional[int] = ..., audio_seconds: _Optional[float] = ..., is_final: _Optional[bool] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., seed: _Optional[int] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("voice_id", "display_name", "model", "has_adapter", "has_reference", "reference_text", "reference_seconds", "speaker", "labels", "created_at", "adapter_source")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HAS_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    HAS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TEXT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    display_name: str
    model: _common_pb2.ModelRef
    has_adapter: bool
    has_reference: bool
    reference_text: str
    reference_seconds: float
    speaker: int
    labels: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    adapter_source: str
    def __init__(self, voice_id: _Optional[str] = ..., display_name: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., has_adapter: _Optional[bool] = ..., has_reference: _Optional[bool] = ..., reference_text: _Optional[str] = ..., reference_seconds: _Optional[float] = ..., speaker: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., adapter_source: _Optional[str] = ...) -> None: ...

class AddVoiceRequest(_message.Message):
    __slots__ = ("request_id", "voice_id", "display_name", "model", "reference_audio", "reference_text", "adapter_path", "speaker", "labels", "overwrite", "adapter_model")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TEXT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    voice_id: str
    display_name: str
    model: _common_pb2.ModelRef
    reference_audio: _common_pb2.AudioInput
    reference_text: str
    adapter_path: str
    speaker: int
    labels: _containers.ScalarMap[str, str]
    overwrite: bool
    adapter_model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., voice_id: _Optional[str] = ..., display_name: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference_audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., reference_text: _Optional[str] = ..., adapter_path: _Optional[str] = ..., speaker: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., overwrite: _Optional[bool] = ..., adapter_model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class AddVoiceResponse(_message.Message):
    __slots__ = ("request_id", "voice")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    voice: Voice
    def __init__(self, request_id: _Optional[str] = ..., voice: _Optional[_Union[Voice, _Mapping]] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices",)
    VOICES_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ...) -> None: ...

class GetVoiceRequest(_message.Message):
    __slots__ = ("voice_id",)
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    def __init__(self, voice_id: _Optional[str] = ...) -> None: ...

class RemoveVoiceRequest(_message.Message):
    __slots__ = ("voice_id",)
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    def __init__(self, voice_id: _Optional[str] = ...) -> None: ...

class RemoveVoiceResponse(_message.Message):
    __slots__ = ("voice",)
    VOICE_FIELD_NUMBER: _ClassVar[int]
    voice: Voice
    def __init__(self, voice: _Optional[_Union[Voice, _Mapping]] = ...) -> None: ...
