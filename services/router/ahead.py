"""Drafting ahead: the next step's draft, made while this step's Verify runs.

A drafter that reads only tokens (ngram, rest, a small draft model; not one that needs the target's
hidden states) can draft before the verify result is known. While the verifier checks a request's
tree, the router asks the drafter to continue the history as if the tree's first path were accepted;
the depth-1 nodes of that draft then guess the token the target adds after the path. When the result
is exactly that path plus one of the guesses, the next step uses the draft's part below the guess and
the request skips the Propose round trip; otherwise the draft is dropped and the request drafts as
usual. Whether output is lossless never depends on a draft, only on the acceptance rule, so a wrong
guess costs drafter time, never a token.

A draft ahead is asked for only where the request's recent record gives its first path a fair chance
of being accepted whole: on Spec-Bench text with ngram (tau ~1.5) an unconditional one was used in 18 of
371 steps, and on 2 shared CPU cores the extra drafting cost more than the round trips it saved.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc

from specserve.engine.config import SamplingParams
from specserve.engine.draft_tree import DraftTree
from specserve.errors import SpecserveError
from specserve.router.backends import Replica
from specserve.rpc import convert
from specserve.v1 import drafter_pb2

AHEAD_MIN_CHANCE = 0.5  # estimated chance that the whole first path is accepted


@dataclass
class _Ahead:
    base_len: int  # history length when the draft was asked for
    path: list[int]  # the tree's first path, assumed accepted
    call: futures.Future  # the Propose call
    index: int  # this request's tree in its response


class AheadDrafts:
    """Drafts in flight for the next step, by request id; `sent` and `used` count them."""

    def __init__(self, pool: futures.Executor, timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._pending: dict[int, _Ahead] = {}
        self.sent = 0
        self.used = 0

    def send(self, work: list[tuple[Replica, int, list[int], int, DraftTree, int, SamplingParams]]) -> None:
        """Ask for drafts past each tree's first path: (replica, request id, history, prompt tokens, tree
        being verified, budget, sampling settings) per request."""
        groups: dict[int, tuple[Replica, list[tuple[int, int, list[int]]], list[drafter_pb2.DraftItem]]] = {}
        for replica, rid, history, num_prompt_tokens, tree, budget, params in work:
            path = tree.first_path()
            item = drafter_pb2.DraftItem(seq_id=rid, token_ids=history + path, num_prompt_tokens=num_prompt_tokens,
                                         budget=budget + 1)  # one more node: the guesses of the next token
            if not params.greedy:
                item.sampling.CopyFrom(convert.sampling_to_proto(params))
            group = groups.setdefault(id(replica), (replica, [], []))
            group[1].append((rid, len(history), path))
            group[2].append(item)
        for replica, meta, items in groups.values():
            call = self._pool.submit(replica.stub.Propose, drafter_pb2.ProposeRequest(items=items),
                                     timeout=self._timeout_s)
            for index, (rid, base_len, path) in enumerate(meta):
                self._pending[rid] = _Ahead(base_len, path, call, index)
        self.sent += len(work)

    def clear(self) -> None:
        self._pending = {}

    def take(self, rid: int, history: list[int], budget: int) -> DraftTree | None:
        """The draft made ahead for this request, if it guessed the history right, cut to `budget` nodes;
        else None. Waits for the call when it is still running (it has had the whole verify to run), so
        whether a draft is used never depends on timing."""
        ahead = self._pending.pop(rid, None)
        if ahead is None:
            return None
        end = ahead.base_len + len(ahead.path)
        if len(history) != end + 1 or history[ahead.base_len:end] != ahead.path:
            return None
        try:
            response = ahead.call.result(timeout=self._timeout_s)
        except (grpc.RpcError, SpecserveError, futures.TimeoutError):  # the step's own Propose will tell
            return None
        tree = convert.tree_from_proto(response.trees[ahead.index]).after(history[-1])
        if tree is None or tree.num_nodes == 0:
            return None
        self.used += 1
        return tree.subtree(range(min(budget, tree.num_nodes)))
