"""Drafter servicer: DraftItems in, one `Drafter.propose` call, DraftTrees out.

Gets proto messages from gRPC (a thread pool) or, with `context=None`, straight from the router's embedded
mode; it never touches `context`, so both paths behave the same.
"""

from __future__ import annotations

import threading

from specserve.drafters.base import DraftRequest, Drafter
from specserve.errors import InvalidRequestError
from specserve.rpc import convert
from specserve.v1 import common_pb2, drafter_pb2


class DrafterServicer:
    def __init__(self, drafter: Drafter, model_fingerprint: str) -> None:
        self.drafter = drafter
        self.model_fingerprint = model_fingerprint
        # Drafters keep per-sequence state in plain dicts; gRPC runs calls on many threads at once.
        self._lock = threading.Lock()

    def Propose(self, request: drafter_pb2.ProposeRequest, context: object) -> drafter_pb2.ProposeResponse:
        drafts = [draft_request_from_proto(item, self.drafter.needs_hidden) for item in request.items]
        with self._lock:
            trees = self.drafter.propose(drafts) if drafts else []
        return drafter_pb2.ProposeResponse(trees=[convert.tree_to_proto(tree) for tree in trees])

    def Release(self, request: common_pb2.ReleaseRequest, context: object) -> common_pb2.ReleaseResponse:
        with self._lock:
            for seq_id in request.seq_ids:
                self.drafter.release(seq_id)
        return common_pb2.ReleaseResponse()

    def Info(self, request: drafter_pb2.DrafterInfoRequest, context: object) -> drafter_pb2.DrafterInfo:
        return drafter_pb2.DrafterInfo(name=self.drafter.name, needs_hidden=self.drafter.needs_hidden,
                                       model_fingerprint=self.model_fingerprint)


def draft_request_from_proto(item: drafter_pb2.DraftItem, needs_hidden: bool) -> DraftRequest:
    """A checked `DraftRequest`; hidden states are decoded only for a drafter that reads them."""
    num_tokens = len(item.token_ids)
    where = f"draft item for sequence {item.seq_id}"
    if num_tokens == 0:
        raise InvalidRequestError(f"{where}: token_ids is empty (the last token is the tree's root)")
    if item.budget < 1:
        raise InvalidRequestError(f"{where}: budget must be >= 1, got {item.budget}")
    if not 1 <= item.num_prompt_tokens <= num_tokens:
        raise InvalidRequestError(
            f"{where}: num_prompt_tokens must be in [1, {num_tokens}], got {item.num_prompt_tokens}")
    hidden = None
    if needs_hidden:
        if not item.HasField("hidden_states"):
            raise InvalidRequestError(f"{where}: this drafter needs hidden_states")
        hidden = convert.tensor_from_proto(item.hidden_states)
        if hidden.dim() != 2 or hidden.shape[0] != num_tokens - 1:
            raise InvalidRequestError(f"{where}: hidden_states must have {num_tokens - 1} rows "
                                      f"(one per token but the root), got shape {tuple(hidden.shape)}")
    return DraftRequest(item.seq_id, list(item.token_ids), item.num_prompt_tokens, item.budget, hidden)
