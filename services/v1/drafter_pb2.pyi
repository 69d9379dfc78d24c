from specserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftItem(_message.Message):
    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "budget", "hidden_states", "hidden_offset", "sampling")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    budget: int
    hidden_states: _common_pb2.Tensor
    hidden_offset: int
    sampling: _common_pb2.SamplingParams
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., budget: _Optional[int] = ..., hidden_states: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., hidden_offset: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DraftItem]
    def __init__(self, items: _Optional[_Iterable[_Union[DraftItem, _Mapping]]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("trees", "need_all_hidden")
    TREES_FIELD_NUMBER: _ClassVar[int]
    NEED_ALL_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    trees: _containers.RepeatedCompositeFieldContainer[_common_pb2.DraftTree]
    need_all_hidden: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, trees: _Optional[_Iterable[_Union[_common_pb2.DraftTree, _Mapping]]] = ..., need_all_hidden: _Optional[_Iterable[int]] = ...) -> None: ...

class DrafterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrafterInfo(_message.Message):
    __slots__ = ("name", "needs_hidden", "model_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NEEDS_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    needs_hidden: bool
    model_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., needs_hidden: _Optional[bool] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...
