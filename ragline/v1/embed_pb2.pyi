from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_QUERY: _ClassVar[InputKind]
    INPUT_KIND_PASSAGE: _ClassVar[InputKind]
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_QUERY: InputKind
INPUT_KIND_PASSAGE: InputKind

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "kind", "truncate")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    kind: InputKind
    truncate: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[InputKind, str]] = ..., truncate: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("vectors", "dimension", "count", "model", "token_counts", "total_tokens", "normalized")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    vectors: bytes
    dimension: int
    count: int
    model: str
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    total_tokens: int
    normalized: bool
    def __init__(self, vectors: _Optional[bytes] = ..., dimension: _Optional[int] = ..., count: _Optional[int] = ..., model: _Optional[str] = ..., token_counts: _Optional[_Iterable[int]] = ..., total_tokens: _Optional[int] = ..., normalized: _Optional[bool] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("texts", "kind")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    kind: InputKind
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[InputKind, str]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_counts", "max_input_tokens")
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    max_input_tokens: int
    def __init__(self, token_counts: _Optional[_Iterable[int]] = ..., max_input_tokens: _Optional[int] = ...) -> None: ...

class EmbedInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EmbedInfo(_message.Message):
    __slots__ = ("model", "dimension", "max_input_tokens", "pooling", "normalize", "query_instruction", "max_client_batch_size", "providers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    QUERY_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    dimension: int
    max_input_tokens: int
    pooling: str
    normalize: bool
    query_instruction: str
    max_client_batch_size: int
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., dimension: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., pooling: _Optional[str] = ..., normalize: _Optional[bool] = ..., query_instruction: _Optional[str] = ..., max_client_batch_size: _Optional[int] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...
