from specserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATUS_OK: _ClassVar[ItemStatus]
    ITEM_STATUS_UNKNOWN_SEQUENCE: _ClassVar[ItemStatus]
    ITEM_STATUS_NO_CAPACITY: _ClassVar[ItemStatus]
ITEM_STATUS_OK: ItemStatus
ITEM_STATUS_UNKNOWN_SEQUENCE: ItemStatus
ITEM_STATUS_NO_CAPACITY: ItemStatus

class VerifyItem(_message.Message):
    __slots__ = ("seq_id", "new_token_ids", "sampling", "max_compute_tokens", "tree", "lossy", "position", "num_prompt_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPUTE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    max_compute_tokens: int
    tree: _common_pb2.DraftTree
    lossy: _common_pb2.LossyParams
    position: int
    num_prompt_tokens: int
    def __init__(self, seq_id: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_compute_tokens: _Optional[int] = ..., tree: _Optional[_Union[_common_pb2.DraftTree, _Mapping]] = ..., lossy: _Optional[_Union[_common_pb2.LossyParams, _Mapping]] = ..., position: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("items", "return_hidden")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RETURN_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[VerifyItem]
    return_hidden: bool
    def __init__(self, items: _Optional[_Iterable[_Union[VerifyItem, _Mapping]]] = ..., return_hidden: _Optional[bool] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("seq_id", "status", "token_ids", "num_accepted", "hidden_states", "num_computed_tokens", "lossy_spent", "logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_SPENT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    status: ItemStatus
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_accepted: int
    hidden_states: _common_pb2.Tensor
    num_computed_tokens: int
    lossy_spent: float
    logprobs: _common_pb2.TokenLogprobs
    def __init__(self, seq_id: _Optional[int] = ..., status: _Optional[_Union[ItemStatus, str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_accepted: _Optional[int] = ..., hidden_states: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_computed_tokens: _Optional[int] = ..., lossy_spent: _Optional[float] = ..., logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VerifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[VerifyResult, _Mapping]]] = ...) -> None: ...

class VerifierInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifierInfo(_message.Message):
    __slots__ = ("model_fingerprint", "vocab_size", "hidden_size", "max_total_tokens", "dtype", "block_size", "num_blocks", "free_blocks", "num_sequences")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    vocab_size: int
    hidden_size: int
    max_total_tokens: int
    dtype: str
    block_size: int
    num_blocks: int
    free_blocks: int
    num_sequences: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., max_total_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., num_sequences: _Optional[int] = ...) -> None: ...
