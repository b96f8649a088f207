import datetime

from dramaturg.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Embedding(_message.Message):
    __slots__ = ("values", "audio_seconds")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    audio_seconds: float
    def __init__(self, values: _Optional[_Iterable[float]] = ..., audio_seconds: _Optional[float] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "model", "audio")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    audio: _containers.RepeatedCompositeFieldContainer[_common_pb2.AudioInput]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., audio: _Optional[_Iterable[_Union[_common_pb2.AudioInput, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "embeddings", "dimension", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimension: int
    model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimension: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("request_id", "model", "reference_audio", "voice_id", "test_audio")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    TEST_AUDIO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    reference_audio: _common_pb2.AudioInput
    voice_id: str
    test_audio: _common_pb2.AudioInput
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., reference_audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., voice_id: _Optional[str] = ..., test_audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("request_id", "score", "threshold", "same_speaker", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAME_SPEAKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    score: float
    threshold: float
    same_speaker: bool
    model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., same_speaker: _Optional[bool] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class Voice(_message.Message):
    __slots__ = ("voice_id", "display_name", "num_utterances", "total_seconds", "model", "labels", "created_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_UTTERANCES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    display_name: str
    num_utterances: int
    total_seconds: float
    model: _common_pb2.ModelRef
    labels: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, voice_id: _Optional[str] = ..., display_name: _Optional[str] = ..., num_utterances: _Optional[int] = ..., total_seconds: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("request_id", "model", "voice_id", "display_name", "audio", "overwrite", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    voice_id: str
    display_name: str
    audio: _containers.RepeatedCompositeFieldContainer[_common_pb2.AudioInput]
    overwrite: bool
    labels: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., voice_id: _Optional[str] = ..., display_name: _Optional[str] = ..., audio: _Optional[_Iterable[_Union[_common_pb2.AudioInput, _Mapping]]] = ..., overwrite: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("request_id", "voice")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    voice: Voice
    def __init__(self, request_id: _Optional[str] = ..., voice: _Optional[_Union[Voice, _Mapping]] = ...) -> None: ...

class VoiceScore(_message.Message):
    __slots__ = ("voice_id", "score")
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    score: float
    def __init__(self, voice_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SegmentIdentification(_message.Message):
    __slots__ = ("span", "candidates", "voice_id")
    SPAN_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    span: _common_pb2.TimeSpan
    candidates: _containers.RepeatedCompositeFieldContainer[VoiceScore]
    voice_id: str
    def __init__(self, span: _Optional[_Union[_common_pb2.TimeSpan, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[VoiceScore, _Mapping]]] = ..., voice_id: _Optional[str] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("request_id", "model", "audio", "segments", "voice_ids", "top_k")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    VOICE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    audio: _common_pb2.AudioInput
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.TimeSpan]
    voice_ids: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[_common_pb2.TimeSpan, _Mapping]]] = ..., voice_ids: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("request_id", "results", "threshold", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[SegmentIdentification]
    threshold: float
    model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[SegmentIdentification, _Mapping]]] = ..., threshold: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ListVoicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVoicesResponse(_message.Message):
    __slots__ = ("voices",)
    VOICES_FIELD_NUMBER: _ClassVar[int]
    voices: _containers.RepeatedCompositeFieldContainer[Voice]
    def __init__(self, voices: _Optional[_Iterable[_Union[Voice, _Mapping]]] = ...) -> None: ...

class DeleteVoiceRequest(_message.Message):
    __slots__ = ("voice_id",)
    VOICE_ID_FIELD_NUMBER: _ClassVar[int]
    voice_id: str
    def __init__(self, voice_id: _Optional[str] = ...) -> None: ...

class DeleteVoiceResponse(_message.Message):
    __slots__ = ("voice",)
    VOICE_FIELD_NUMBER: _ClassVar[int]
    voice: Voice
    def __init__(self, voice: _Optional[_Union[Voice, _Mapping]] = ...) -> None: ...
