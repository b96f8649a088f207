from dramaturg.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TRANSCRIBE: _ClassVar[Task]
    CAPTION: _ClassVar[Task]
    ANSWER: _ClassVar[Task]
TASK_UNSPECIFIED: Task
TRANSCRIBE: Task
CAPTION: Task
ANSWER: Task

class GenerationConfig(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "audio", "span", "task", "prompt", "generation")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelRef
    audio: _common_pb2.AudioInput
    span: _common_pb2.TimeSpan
    task: Task
    prompt: str
    generation: GenerationConfig
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., audio: _Optional[_Union[_common_pb2.AudioInput, _Mapping]] = ..., span: _Optional[_Union[_common_pb2.TimeSpan, _Mapping]] = ..., task: _Optional[_Union[Task, str]] = ..., prompt: _Optional[str] = ..., generation: _Optional[_Union[GenerationConfig, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("audio_tokens", "prompt_tokens", "completion_tokens", "time_to_first_token_seconds", "time_per_output_token_seconds")
    AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    audio_tokens: int
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_seconds: float
    time_per_output_token_seconds: float
    def __init__(self, audio_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., time_to_first_token_seconds: _Optional[float] = ..., time_per_output_token_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "finish_reason", "usage", "model", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    finish_reason: str
    usage: Usage
    model: _common_pb2.ModelRef
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "text_delta", "token_index", "is_final", "finish_reason", "usage", "model", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    IS_FINAL_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text_delta: str
    token_index: int
    is_final: bool
    finish_reason: str
    usage: Usage
    model: _common_pb2.ModelRef
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., text_delta: _Optional[str] = ..., token_index: _Optional[int] = ..., is_final: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...
