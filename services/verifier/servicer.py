"""specserve.v1.Verifier over a VerifierCore. The methods also serve in-process calls (context None):
the router's embedded mode calls them directly with the same messages."""

from __future__ import annotations

import grpc

from specserve.errors import InvalidRequestError
from specserve.rpc import convert
from specserve.rpc.logprobs import logprobs_to_proto
from specserve.v1 import common_pb2, verifier_pb2
from specserve.verifier.core import VerifierCore, VerifyWork


class VerifierServicer:
    def __init__(self, core: VerifierCore, model_fingerprint: str, dtype: str) -> None:
        self.core = core
        self.model_fingerprint = model_fingerprint
        self.dtype = dtype

    def Verify(self, request: verifier_pb2.VerifyRequest, context: grpc.ServicerContext | None):
        work = [self._work(item) for item in request.items]
        outcomes = self.core.step(work, return_hidden=request.return_hidden)
        results = []
        for outcome in outcomes:
            result = verifier_pb2.VerifyResult(
                seq_id=outcome.seq_id, status=int(outcome.status), token_ids=outcome.token_ids,
                num_accepted=outcome.num_accepted, num_computed_tokens=outcome.num_computed_tokens,
                lossy_spent=outcome.lossy_spent,
            )
            if outcome.logprobs is not None:
                result.logprobs.CopyFrom(logprobs_to_proto(outcome.logprobs))
            if outcome.hidden_states is not None:
                result.hidden_states.CopyFrom(convert.tensor_to_proto(outcome.hidden_states))
            results.append(result)
        return verifier_pb2.VerifyResponse(results=results)

    def Prefill(self, request: verifier_pb2.VerifyRequest, context: grpc.ServicerContext | None):
        if any(item.tree.tokens for item in request.items):
            raise InvalidRequestError("Prefill items carry no draft trees (use Verify)")
        return self.Verify(request, context)

    def Release(self, request: common_pb2.ReleaseRequest, context: grpc.ServicerContext | None):
        self.core.release(list(request.seq_ids))
        return common_pb2.ReleaseResponse()

    def Info(self, request: verifier_pb2.VerifierInfoRequest, context: grpc.ServicerContext | None):
        config = self.core.model.config
        free_blocks, num_sequences = self.core.occupancy()
        return verifier_pb2.VerifierInfo(
            model_fingerprint=self.model_fingerprint, vocab_size=config.vocab_size,
            hidden_size=config.hidden_size, max_total_tokens=self.core.max_total_tokens, dtype=self.dtype,
            block_size=self.core.cache.block_size, num_blocks=self.core.cache.num_blocks,
            free_blocks=free_blocks, num_sequences=num_sequences,
        )

    @staticmethod
    def _work(item: verifier_pb2.VerifyItem) -> VerifyWork:
        return VerifyWork(
            seq_id=item.seq_id,
            new_token_ids=list(item.new_token_ids),
            params=convert.sampling_from_proto(item.sampling) if item.HasField("sampling") else None,
            max_compute_tokens=item.max_compute_tokens,
            tree=convert.tree_from_proto(item.tree) if item.tree.tokens else None,
            lossy=convert.lossy_from_proto(item.lossy) if item.HasField("lossy") else None,
            position=item.position,
            num_prompt_tokens=item.num_prompt_tokens,
        )
