"""Engine objects <-> specserve.v1 messages. Each conversion lives here once, for every service."""

from __future__ import annotations

import numpy as np
import torch

from specserve.engine.acceptance import LossyConfig
from specserve.engine.config import SamplingParams
from specserve.engine.draft_tree import DraftTree
from specserve.engine.verify import SpecStats
from specserve.v1 import common_pb2

DEFAULT_MAX_TOKENS = 256


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Zero values mean the documented defaults; invalid values raise InvalidRequestError."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.max_tokens != 0 else DEFAULT_MAX_TOKENS,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p != 0 else 1.0,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.repetition_penalty != 0 else 1.0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias),
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def tree_to_proto(tree: DraftTree) -> common_pb2.DraftTree:
    dists = [common_pb2.DraftDist(row=row, token_ids=ids, probs=probs)
             for row, (ids, probs) in tree.draft_dists.items()]
    return common_pb2.DraftTree(tokens=tree.tokens, parents=tree.parents, draft_probs=tree.draft_probs,
                                draft_dists=dists)


def tree_from_proto(msg: common_pb2.DraftTree) -> DraftTree:
    """A malformed tree (parents out of order, duplicate siblings, probabilities outside (0, 1], a draft
    distribution that is none or misses a child of its row) raises InvalidRequestError."""
    from specserve.errors import InvalidRequestError

    try:
        dists = {d.row: (list(d.token_ids), list(d.probs)) for d in msg.draft_dists}
        assert len(dists) == len(msg.draft_dists), "one draft distribution per row"
        return DraftTree(list(msg.tokens), list(msg.parents), list(msg.draft_probs), dists)
    except AssertionError as exc:
        raise InvalidRequestError(f"malformed draft tree: {exc}") from None


def lossy_from_proto(msg: common_pb2.LossyParams) -> LossyConfig:
    """Unset fields keep LossyConfig's defaults; out-of-range values raise InvalidRequestError."""
    fields = {name: getattr(msg, name) for name in ("top_k", "min_ratio", "budget") if msg.HasField(name)}
    return LossyConfig(**fields)


def lossy_to_proto(lossy: LossyConfig) -> common_pb2.LossyParams:
    return common_pb2.LossyParams(top_k=lossy.top_k, min_ratio=lossy.min_ratio, budget=lossy.budget)


_DTYPES = {"float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, None)}


def tensor_to_proto(tensor: torch.Tensor) -> common_pb2.Tensor:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        data = tensor.view(torch.int16).numpy().tobytes()
        return common_pb2.Tensor(shape=list(tensor.shape), dtype="bfloat16", data=data)
    data = tensor.to(torch.float32).numpy().tobytes()
    return common_pb2.Tensor(shape=list(tensor.shape), dtype="float32", data=data)


def tensor_from_proto(msg: common_pb2.Tensor) -> torch.Tensor:
    from specserve.errors import InvalidRequestError

    shape = tuple(msg.shape)
    count = int(np.prod(shape)) if shape else 1
    if msg.dtype == "float32":
        if len(msg.data) != 4 * count:
            raise InvalidRequestError(f"tensor of shape {shape} needs {4 * count} bytes, got {len(msg.data)}")
        return torch.from_numpy(np.frombuffer(msg.data, dtype=np.float32).copy()).reshape(shape)
    if msg.dtype == "bfloat16":
        if len(msg.data) != 2 * count:
            raise InvalidRequestError(f"tensor of shape {shape} needs {2 * count} bytes, got {len(msg.data)}")
        raw = torch.from_numpy(np.frombuffer(msg.data, dtype=np.int16).copy())
        return raw.view(torch.bfloat16).reshape(shape)
    raise InvalidRequestError(f"unsupported tensor dtype {msg.dtype!r}; expected float32 or bfloat16")


def spec_stats_to_proto(stats: SpecStats) -> common_pb2.SpecStats:
    d = stats.as_dict()
    return common_pb2.SpecStats(
        forwards=stats.forwards, tokens=stats.tokens, verify_steps=stats.verify_steps, drafted=stats.drafted,
        accepted=stats.accepted, mean_accepted_len=d["mean_accepted_len"],
        acceptance_by_depth=d["acceptance_by_depth"],
    )
