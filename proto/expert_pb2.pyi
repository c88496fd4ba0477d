from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType

class DispatchRequest(_message.Message):
    __slots__ = ("layer", "epoch", "dtype", "num_tokens", "hidden_size", "hidden", "weights", "counts", "expert_ids", "call_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    epoch: int
    dtype: DType
    num_tokens: int
    hidden_size: int
    hidden: bytes
    weights: bytes
    counts: bytes
    expert_ids: bytes
    call_id: int
    def __init__(self, layer: _Optional[int] = ..., epoch: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., num_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., hidden: _Optional[bytes] = ..., weights: _Optional[bytes] = ..., counts: _Optional[bytes] = ..., expert_ids: _Optional[bytes] = ..., call_id: _Optional[int] = ...) -> None: ...

class DispatchReply(_message.Message):
    __slots__ = ("num_tokens", "hidden_size", "dtype", "partial", "call_id", "error_code", "error")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    hidden_size: int
    dtype: DType
    partial: bytes
    call_id: int
    error_code: int
    error: str
    def __init__(self, num_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., partial: _Optional[bytes] = ..., call_id: _Optional[int] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ExpertKey(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "expert", "tokens_served")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SERVED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens_served: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens_served: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("experts", "dtype", "epoch", "hidden_size", "dispatch_calls", "hidden_bytes", "inflight", "inflight_by_epoch", "busy_s", "inflight_s")
    class InflightByEpochEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_CALLS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_S_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    dtype: DType
    epoch: int
    hidden_size: int
    dispatch_calls: int
    hidden_bytes: int
    inflight: int
    inflight_by_epoch: _containers.ScalarMap[int, int]
    busy_s: float
    inflight_s: float
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., dtype: _Optional[_Union[DType, str]] = ..., epoch: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dispatch_calls: _Optional[int] = ..., hidden_bytes: _Optional[int] = ..., inflight: _Optional[int] = ..., inflight_by_epoch: _Optional[_Mapping[int, int]] = ..., busy_s: _Optional[float] = ..., inflight_s: _Optional[float] = ...) -> None: ...

class LoadExpertsRequest(_message.Message):
    __slots__ = ("experts", "epoch")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    epoch: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class DropExpertsRequest(_message.Message):
    __slots__ = ("experts", "epoch")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    epoch: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
