from dramaturg.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Rubric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUBRIC_UNSPECIFIED: _ClassVar[Rubric]
    REALISM: _ClassVar[Rubric]
    ARCHETYPE: _ClassVar[Rubric]
RUBRIC_UNSPECIFIED: Rubric
REALISM: Rubric
ARCHETYPE: Rubric

class RoleContext(_message.Message):
    __slots__ = ("local_scene", "char_age", "char_style", "char_profile", "transcript", "question")
    LOCAL_SCENE_FIELD_NUMBER: _ClassVar[int]
    CHAR_AGE_FIELD_NUMBER: _ClassVar[int]
    CHAR_STYLE_FIELD_NUMBER: _ClassVar[int]
    CHAR_PROFILE_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    local_scene: str
    char_age: str
    char_style: str
    char_profile: str
    transcript: str
    question: str
    def __init__(self, local_scene: _Optional[str] = ..., char_age: _Optional[str] = ..., char_style: _Optional[str] = ..., char_profile: _Optional[str] = ..., transcript: _Optional[str] = ..., question: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("request_id", "model", "audio", "span", "rubric", "dimensions", "context")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    audio: _common_pb2.AudioInput
    span: _common_pb2.TimeSpan
    rubric: Rubric
    dimensions: _containers.RepeatedScalarFieldContainer[str]
    context: RoleContext
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., span: _Optional[_Union[_common_pb2.TimeSpan, _Mapping]] = ..., rubric: _Optional[_Union[Rubric, str]] = ..., dimensions: _Optional[_Iterable[str]] = ..., context: _Optional[_Union[RoleContext, _Mapping]] = ...) -> None: ...

class DimensionScore(_message.Message):
    __slots__ = ("dimension", "score", "probabilities", "digit_mass")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    DIGIT_MASS_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    score: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    digit_mass: float
    def __init__(self, dimension: _Optional[str] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., digit_mass: _Optional[float] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("request_id", "scores", "mean_score", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    scores: _containers.RepeatedCompositeFieldContainer[DimensionScore]
    mean_score: float
    model: _common_pb2.ModelRef
    def __init__(self, request_id: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[DimensionScore, _Mapping]]] = ..., mean_score: _Optional[float] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class ListDimensionsRequest(_message.Message):
    __slots__ = ("rubric",)
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    rubric: Rubric
    def __init__(self, rubric: _Optional[_Union[Rubric, str]] = ...) -> None: ...

class ListDimensionsResponse(_message.Message):
    __slots__ = ("dimensions", "info")
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    dimensions: _containers.RepeatedScalarFieldContainer[str]
    info: _containers.RepeatedCompositeFieldContainer[DimensionInfo]
    def __init__(self, dimensions: _Optional[_Iterable[str]] = ..., info: _Optional[_Iterable[_Union[DimensionInfo, _Mapping]]] = ...) -> None: ...

class DimensionInfo(_message.Message):
    __slots__ = ("dimension", "rubric", "display_name", "summary")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    rubric: Rubric
    display_name: str
    summary: str
    def __init__(self, dimension: _Optional[str] = ..., rubric: _Optional[_Union[Rubric, str]] = ..., display_name: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...
