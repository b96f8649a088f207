from dramaturg.common.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SynthesisConfig(_message.Message):
    __slots__ = ("model", "voice_id", "reference_audio", "reference_text", "encoding", "sample_rate_hz", "temperature", "top_p", "max_new_tokens", "seed")
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
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., voice_id: _Optional[str] = ..., reference_audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., reference_text: _Optional[str] = ..., encoding: _Optional[_Union[_common_pb2.AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("request_id", "audio", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: _common_pb2.AudioOutput
    model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[_Union[_common_pb2.AudioOutput, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class SynthesizeOnlineResponse(_message.Message):
    __slots__ = ("request_id", "audio_chunk", "sample_rate_hz", "sequence", "audio_seconds", "is_final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio_chunk: bytes
    sample_rate_hz: int
    sequence: int
    audio_seconds: float
    is_final: bool
    def __init__(self, request_id: _Optional[str] = ..., audio_chunk: _Optional[bytes] = ..., sample_rate_hz: _Optional[int] = ..., sequence: _Optional[int] = ..., audio_seconds: _Optional[float] = ..., is_final: _Optional[bool] = ...) -> None: ...
