"""Drafter servicer: DraftItems in, one `Drafter.propose` call, DraftTrees out.

Gets proto messages from gRPC (a thread pool) or, with `context=None`, straight from the router's embedded
mode; it never touches `context`, so both paths behave the same.
"""

from __future__ import annotations

import threading

import torch

from specserve.drafters.base import DraftRequest, Drafter
from specserve.engine.draft_tree import DraftTree
from specserve.errors import InvalidRequestError
from specserve.rpc import convert
from specserve.v1 import common_pb2, drafter_pb2


class DrafterServicer:
    def __init__(self, drafter: Drafter, model_fingerprint: str) -> None:
        self.drafter = drafter
        self.model_fingerprint = model_fingerprint
        # Drafters keep per-sequence state in plain dicts; gRPC runs calls on many threads at once.
        self._lock = threading.Lock()
        # Feature drafters: each sequence's hidden rows so far, so a call need only carry the new ones.
        self._hidden: dict[int, torch.Tensor] = {}

    def Propose(self, request: drafter_pb2.ProposeRequest, context: object) -> drafter_pb2.ProposeResponse:
        drafts = [draft_request_from_proto(item, self.drafter.needs_hidden) for item in request.items]
        with self._lock:
            complete = [self._with_earlier_rows(draft, item.hidden_offset)
                        for draft, item in zip(drafts, request.items)]
            ready = [draft for draft in complete if draft is not None]
            trees = iter(self.drafter.propose(ready) if ready else [])
        missing = [item.seq_id for item, draft in zip(request.items, complete) if draft is None]
        return drafter_pb2.ProposeResponse(
            trees=[convert.tree_to_proto(DraftTree() if draft is None else next(trees)) for draft in complete],
            need_all_hidden=missing)

    def _with_earlier_rows(self, draft: DraftRequest, offset: int) -> DraftRequest | None:
        """The request with its hidden rows before `offset` taken from earlier calls; None when this replica
        does not hold them. Keeps the rows for the next call (caller holds the lock)."""
        if draft.hidden_states is None:
            return draft
        if offset:
            earlier = self._hidden.get(draft.seq_id)
            if earlier is None or earlier.shape[0] < offset:
                return None
            draft.hidden_states = torch.cat([earlier[:offset], draft.hidden_states])
        self._hidden[draft.seq_id] = draft.hidden_states
        return draft

    def Release(self, request: common_pb2.ReleaseRequest, context: object) -> common_pb2.ReleaseResponse:
        with self._lock:
            for seq_id in request.seq_ids:
                self.drafter.release(seq_id)
                self._hidden.pop(seq_id, None)
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
        if not 0 <= item.hidden_offset < num_tokens:
            raise InvalidRequestError(
                f"{where}: hidden_offset must be in [0, {num_tokens - 1}], got {item.hidden_offset}")
        hidden = convert.tensor_from_proto(item.hidden_states)
        rows = num_tokens - 1 - item.hidden_offset
        if hidden.dim() != 2 or hidden.shape[0] != rows:
            raise InvalidRequestError(f"{where}: hidden_states must have {rows} rows (one per token but the root) "
                                      f"from hidden_offset {item.hidden_offset}, got shape {tuple(hidden.shape)}")
    sampling = convert.sampling_from_proto(item.sampling) if item.HasField("sampling") else None
    return DraftRequest(item.seq_id, list(item.token_ids), item.num_prompt_tokens, item.budget, hidden, sampling)
