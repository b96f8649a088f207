from dramaturg.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DiarizationConfig(_message.Message):
    __slots__ = ("model", "num_speakers", "min_speakers", "max_speakers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    num_speakers: int
    min_speakers: int
    max_speakers: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., num_speakers: _Optional[int] = ..., min_speakers: _Optional[int] = ..., max_speakers: _Optional[int] = ...) -> None: ...

class DiarizeRequest(_message.Message):
    __slots__ = ("request_id", "audio", "config", "uri")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: _common_pb2.AudioInput
    config: DiarizationConfig
    uri: str
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., config: _Optional[_Union[DiarizationConfig, _Mapping]] = ..., uri: _Optional[str] = ...) -> None: ...

class DiarizeResponse(_message.Message):
    __slots__ = ("request_id", "turns", "exclusive_turns", "rttm", "speakers", "audio_seconds", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_TURNS_FIELD_NUMBER: _ClassVar[int]
    RTTM_FIELD_NUMBER: _ClassVar[int]
    SPEAKERS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    turns: _containers.RepeatedCompositeFieldContainer[_common_pb2.SpeakerTurn]
    exclusive_turns: _containers.RepeatedCompositeFieldContainer[_common_pb2.SpeakerTurn]
    rttm: str
    speakers: _containers.RepeatedScalarFieldContainer[str]
    audio_seconds: float
    model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[_common_pb2.SpeakerTurn, _Mapping]]] = ..., exclusive_turns: _Optional[_Iterable[_Union[_common_pb2.SpeakerTurn, _Mapping]]] = ..., rttm: _Optional[str] = ..., speakers: _Optional[_Iterable[str]] = ..., audio_seconds: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class StreamingDiarizationConfig(_message.Message):
    __slots__ = ("request_id", "config", "encoding", "sample_rate_hz", "uri")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config: DiarizationConfig
    encoding: _common_pb2.AudioEncoding
    sample_rate_hz: int
    uri: str
    def __init__(self, request_id: _Optional[str] = ..., config: _Optional[_Union[DiarizationConfig, _Mapping]] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., uri: _Optional[str] = ...) -> None: ...

class StreamingDiarizeRequest(_message.Message):
    __slots__ = ("streaming_config", "audio_content")
    STREAMING_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CONTENT_FIELD_NUMBER: _ClassVar[int]
    streaming_config: StreamingDiarizationConfig
    audio_content: bytes
    def __init__(self, streaming_config: _Optional[_Union[StreamingDiarizationConfig, _Mapping]] = ..., audio_content: _Optional[bytes] = ...) -> None: ...

class StreamingDiarizeResponse(_message.Message):
    __slots__ = ("request_id", "turns", "processed_seconds", "is_final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    turns: _containers.RepeatedCompositeFieldContainer[_common_pb2.SpeakerTurn]
    processed_seconds: float
    is_final: bool
    def __init__(self, request_id: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[_common_pb2.SpeakerTurn, _Mapping]]] = ..., processed_seconds: _Optional[float] = ..., is_final: _Optional[bool] = ...) -> None: ...
