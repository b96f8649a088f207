from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Semantics(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class Sentence(_message.Message):
    __slots__ = ("texts", "semantics")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SEMANTICS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    semantics: _containers.RepeatedCompositeFieldContainer[Semantics]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., semantics: _Optional[_Iterable[_Union[Semantics, _Mapping]]] = ...) -> None: ...

class TextData(_message.Message):
    __slots__ = ("source", "name", "sentences")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    source: str
    name: str
    sentences: _containers.RepeatedCompositeFieldContainer[Sentence]
    def __init__(self, source: _Optional[str] = ..., name: _Optional[str] = ..., sentences: _Optional[_Iterable[_Union[Sentence, _Mapping]]] = ...) -> None: ...

class SampledData(_message.Message):
    __slots__ = ("source", "name", "samples")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    source: str
    name: str
    samples: _containers.RepeatedCompositeFieldContainer[Sentence]
    def __init__(self, source: _Optional[str] = ..., name: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sentence, _Mapping]]] = ...) -> None: ...
