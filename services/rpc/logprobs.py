"""Generated tokens' log probabilities <-> specserve.v1.TokenLogprobs; torch-free, so the client SDK
shares it with the services."""

from __future__ import annotations

from specserve.engine.logprobs import TokenLogprob
from specserve.errors import RpcError
from specserve.v1 import common_pb2


def logprobs_to_proto(logprobs: list[TokenLogprob]) -> common_pb2.TokenLogprobs:
    msg = common_pb2.TokenLogprobs(logprobs=[lp.logprob for lp in logprobs])
    if any(lp.top for lp in logprobs):
        msg.top.extend(common_pb2.TopLogprobs(token_ids=[t for t, _ in lp.top], logprobs=[v for _, v in lp.top])
                       for lp in logprobs)
    return msg


def logprobs_from_proto(msg: common_pb2.TokenLogprobs, token_ids: list[int]) -> list[TokenLogprob]:
    """The log probabilities of `token_ids` (the message's tokens); RpcError when the counts disagree."""
    if len(msg.logprobs) != len(token_ids) or len(msg.top) not in (0, len(token_ids)):
        raise RpcError(f"malformed answer: {len(msg.logprobs)} log probabilities for {len(token_ids)} tokens")
    tops = [list(zip(top.token_ids, top.logprobs)) for top in msg.top] or [[] for _ in token_ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, msg.logprobs, tops)]
