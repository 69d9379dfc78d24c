"""Drafter service: an n-gram drafter on the real model behind a real gRPC server drafts what the drafter
drafts in-process; bad items and undecodable bytes are INVALID_ARGUMENT; `serve_drafter` runs as a process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from specserve.drafter.server import SERVICE, build_drafter_servicer
from specserve.drafter.servicer import DrafterServicer
from specserve.drafters.base import DraftRequest
from specserve.drafters.ngram import NgramDrafter
from specserve.engine.config import SpecConfig
from specserve.engine.draft_tree import DraftTree
from specserve.errors import InvalidRequestError
from specserve.learned.checkpoint import target_fingerprint
from specserve.rpc import convert
from specserve.rpc.server import RpcServer
from specserve.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc


@pytest.fixture(scope="module")
def fingerprint(llama_model) -> str:
    return target_fingerprint(llama_model)


@pytest.fixture(scope="module")
def served(fingerprint):
    """(servicer, channel): an n-gram DrafterServicer on a real server on a free loopback port."""
    servicer = DrafterServicer(NgramDrafter(), fingerprint)
    server = RpcServer([(servicer, SERVICE)], "127.0.0.1:0").start()
    channel = grpc.insecure_channel(server.address)
    yield servicer, channel
    channel.close()
    server.drain(0)


@pytest.fixture(scope="module")
def histories(tokenizer) -> list[list[int]]:
    """Real token histories: two that repeat themselves (the n-gram drafter finds matches), one that doesn't."""
    texts = ["one two three, one two three, one two", "The cat sat on the mat. The cat sat on", "Hello"]
    return [tokenizer.encode(text) for text in texts]


def item(seq_id: int, tokens: list[int], budget: int = 8, num_prompt_tokens: int | None = None,
         **fields) -> drafter_pb2.DraftItem:
    """A DraftItem whose whole history is prompt unless told otherwise."""
    prompt = len(tokens) if num_prompt_tokens is None else num_prompt_tokens
    return drafter_pb2.DraftItem(seq_id=seq_id, token_ids=tokens, num_prompt_tokens=prompt, budget=budget, **fields)


def assert_same_trees(messages, trees: list[DraftTree]) -> None:
    """Tokens and parents exactly; probabilities travel as float32."""
    assert len(messages) == len(trees)
    for message, tree in zip(messages, trees):
        assert list(message.tokens) == tree.tokens and list(message.parents) == tree.parents
        assert list(message.draft_probs) == pytest.approx(tree.draft_probs, rel=1e-6)


def test_token_drafter_replicas_load_no_weights(model_path, fingerprint, monkeypatch):
    """n-gram and retrieval replicas read tokens only: no model is built, and the fingerprint (from the
    config and embedding table alone) still matches the loaded target's."""
    import specserve.drafter.server as server

    def no_model(*args: object) -> None:
        raise AssertionError("an n-gram replica built the model")

    monkeypatch.setattr(server, "build_model", no_model)
    servicer = build_drafter_servicer(str(model_path), "float32", SpecConfig(method="ngram"))
    assert isinstance(servicer.drafter, NgramDrafter) and servicer.model_fingerprint == fingerprint
    merged = build_drafter_servicer(str(model_path), "float32", SpecConfig(method="auto"))  # n-gram alone here
    assert merged.drafter.name == "auto" and merged.model_fingerprint == fingerprint
    with pytest.raises(AssertionError, match="built the model"):  # early exit reads the weights
        build_drafter_servicer(str(model_path), "float32", SpecConfig(method="early-exit"))


def test_propose_over_grpc_matches_the_drafter(served, histories):
    servicer, channel = served
    seq_ids, budgets = [100, 101, 102], [8, 3, 8]
    request = drafter_pb2.ProposeRequest(items=[item(*args) for args in zip(seq_ids, histories, budgets)])
    expected = NgramDrafter().propose([DraftRequest(s, h, len(h), b) for s, h, b in zip(seq_ids, histories, budgets)])
    assert [tree.num_nodes > 0 for tree in expected] == [True, True, False]  # the histories test what they claim

    response = drafter_pb2_grpc.DrafterStub(channel).Propose(request)
    assert_same_trees(response.trees, expected)
    assert all(convert.tree_from_proto(tree).num_nodes <= b for tree, b in zip(response.trees, budgets))
    # The router's embedded mode calls the servicer directly, with no gRPC context.
    assert_same_trees(servicer.Propose(request, None).trees, expected)


def test_concurrent_calls_each_get_their_own_trees(served, histories):
    stub = drafter_pb2_grpc.DrafterStub(served[1])
    history, ends = histories[0], range(2, len(histories[0]) + 1)
    expected = NgramDrafter().propose([DraftRequest(0, history[:end], end, 8) for end in ends])

    def propose(end: int) -> common_pb2.DraftTree:
        return stub.Propose(drafter_pb2.ProposeRequest(items=[item(200 + end, history[:end])])).trees[0]

    with ThreadPoolExecutor(8) as pool:  # one sequence per call, all sharing the replica's drafter
        assert_same_trees(list(pool.map(propose, ends)), expected)


def test_empty_batch_gives_no_trees(served):
    assert list(drafter_pb2_grpc.DrafterStub(served[1]).Propose(drafter_pb2.ProposeRequest()).trees) == []


def test_info_names_the_drafter_and_target(served, fingerprint):
    info = drafter_pb2_grpc.DrafterStub(served[1]).Info(drafter_pb2.DrafterInfoRequest())
    assert (info.name, info.needs_hidden, info.model_fingerprint) == ("ngram", False, fingerprint)


def test_release_forgets_sequences_and_ignores_unknown_ids(served, histories):
    servicer, channel = served
    stub = drafter_pb2_grpc.DrafterStub(channel)
    stub.Propose(drafter_pb2.ProposeRequest(items=[item(7, histories[0])]))
    assert 7 in servicer.drafter.histories
    stub.Release(common_pb2.ReleaseRequest(seq_ids=[7, 123456]))
    assert 7 not in servicer.drafter.histories


@pytest.mark.parametrize("bad_item,needle", [
    (item(1, []), "token_ids is empty"),
    (item(1, [5, 6, 7], budget=0), "budget must be >= 1, got 0"),
    (item(1, [5, 6, 7], num_prompt_tokens=0), "num_prompt_tokens must be in [1, 3], got 0"),
    (item(1, [5, 6, 7], num_prompt_tokens=4), "num_prompt_tokens must be in [1, 3], got 4"),
])
def test_bad_item_is_invalid_argument(served, bad_item, needle):
    request = drafter_pb2.ProposeRequest(items=[item(2, [5, 6, 5]), bad_item])
    with pytest.raises(grpc.RpcError) as caught:
        drafter_pb2_grpc.DrafterStub(served[1]).Propose(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details() and "sequence 1" in caught.value.details()


def test_undecodable_bytes_are_invalid_argument(served):
    propose = served[1].unary_unary("/specserve.v1.Drafter/Propose")  # no serializers: bytes as they are
    truncated = b"\x0a\x05\x08\x01"  # field 1 (items) says 5 bytes follow, 2 do
    with pytest.raises(grpc.RpcError) as caught:
        propose(truncated)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ProposeRequest" in caught.value.details()


def test_hidden_states_are_not_decoded_for_a_drafter_that_ignores_them(served):
    garbage = common_pb2.Tensor(shape=[2, 4], dtype="float32", data=b"short")
    request = drafter_pb2.ProposeRequest(items=[item(3, [5, 6, 5], hidden_states=garbage)])
    assert len(served[0].Propose(request, None).trees) == 1


class FeatureDrafter:
    """Reads hidden states (like EAGLE); records its requests and drafts nothing."""

    name = "feature"
    needs_hidden = True

    def __init__(self) -> None:
        self.requests: list[DraftRequest] = []

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        self.requests += requests
        return [DraftTree() for _ in requests]

    def release(self, seq_id: int) -> None:
        pass


def test_hidden_states_reach_a_feature_drafter():
    drafter = FeatureDrafter()
    hidden = torch.randn(3, 8)  # [len(token_ids) - 1, hidden]
    request = drafter_pb2.ProposeRequest(items=[item(1, [4, 5, 6, 7], hidden_states=convert.tensor_to_proto(hidden))])
    DrafterServicer(drafter, "fp").Propose(request, None)
    assert torch.equal(drafter.requests[0].hidden_states, hidden)


def test_later_calls_carry_only_the_new_hidden_rows():
    """A call with hidden_offset k carries rows k.. only; the servicer adds the rows it kept from earlier
    calls, so the drafter sees the whole history's rows. A replica without them (restarted, or released
    the sequence) drafts nothing for it and asks for all rows."""
    drafter, servicer = FeatureDrafter(), DrafterServicer(FeatureDrafter(), "fp")
    servicer.drafter = drafter
    rows = torch.randn(6, 8)
    first = item(1, [4, 5, 6, 7], hidden_states=convert.tensor_to_proto(rows[:3]))
    servicer.Propose(drafter_pb2.ProposeRequest(items=[first]), None)
    later = item(1, [4, 5, 6, 7, 8, 9, 10], hidden_states=convert.tensor_to_proto(rows[3:]), hidden_offset=3)
    response = servicer.Propose(drafter_pb2.ProposeRequest(items=[later]), None)
    assert list(response.need_all_hidden) == [] and torch.equal(drafter.requests[-1].hidden_states, rows)
    servicer.Release(common_pb2.ReleaseRequest(seq_ids=[1]), None)
    drafted = len(drafter.requests)
    response = servicer.Propose(drafter_pb2.ProposeRequest(items=[later]), None)
    assert list(response.need_all_hidden) == [1] and len(response.trees) == 1
    assert len(drafter.requests) == drafted  # nothing drafted without the rows


@pytest.mark.parametrize("hidden,needle", [
    (None, "needs hidden_states"),
    (torch.zeros(4, 8), "must have 3 rows (one per token but the root) from hidden_offset 0, got shape (4, 8)"),
    (torch.zeros(24), "must have 3 rows"),
])
def test_feature_drafter_refuses_missing_or_misshapen_hidden_states(hidden, needle):
    fields = {} if hidden is None else {"hidden_states": convert.tensor_to_proto(hidden)}
    request = drafter_pb2.ProposeRequest(items=[item(1, [4, 5, 6, 7], **fields)])
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        DrafterServicer(FeatureDrafter(), "fp").Propose(request, None)


def test_off_is_refused_before_loading_anything():
    with pytest.raises(InvalidRequestError, match="needs a draft method"):
        build_drafter_servicer("/nonexistent/model.gguf", "float32", SpecConfig(method="off"))


SERVE = ("import sys; from specserve.drafter.server import serve_drafter; from specserve.engine.config import "
         "SpecConfig; serve_drafter('127.0.0.1:0', sys.argv[1], 'float32', SpecConfig(method='ngram'), 5.0)")


def test_serve_drafter_prints_one_line_serves_and_drains_on_sigterm(model_path: Path, tmp_path: Path):
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(model_path)], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = process.stdout.readline()
        match = re.fullmatch(r"drafter grpc=(127\.0\.0\.1:\d+) method=ngram\n", line)
        assert match, f"{line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        with grpc.insecure_channel(match[1]) as channel:
            info = drafter_pb2_grpc.DrafterStub(channel).Info(drafter_pb2.DrafterInfoRequest(), timeout=10)
        assert info.name == "ngram" and len(info.model_fingerprint) == 64
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read()
        assert process.stdout.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sampled_drafts_and_their_distributions_cross_the_wire(llama_model, fingerprint, histories):
    """A seeded sampling item drafts over gRPC what the drafter drafts in-process, q included."""
    from specserve.drafters.early_exit import EarlyExitConfig, EarlyExitDrafter
    from specserve.engine.config import SamplingParams

    make = lambda: EarlyExitDrafter(llama_model, EarlyExitConfig(exit_layer=2, min_confidence=0.0))  # noqa: E731
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    want = make().propose([DraftRequest(0, histories[0], len(histories[0]), 3, sampling=params)])[0]
    assert want.num_nodes == 3 and sorted(want.draft_dists) == [0, 1, 2]
    server = RpcServer([(DrafterServicer(make(), fingerprint), SERVICE)], "127.0.0.1:0").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            request = drafter_pb2.ProposeRequest(items=[item(0, histories[0], budget=3,
                                                             sampling=convert.sampling_to_proto(params))])
            (message,) = drafter_pb2_grpc.DrafterStub(channel).Propose(request, timeout=60).trees
    finally:
        server.drain(0)
    got = convert.tree_from_proto(message)
    assert got.tokens == want.tokens and got.draft_dists.keys() == want.draft_dists.keys()
    for row, (ids, probs) in want.draft_dists.items():
        assert got.draft_dists[row][0] == ids and got.draft_dists[row][1] == pytest.approx(probs, rel=1e-6)


def test_a_draft_distribution_missing_a_child_is_refused():
    message = common_pb2.DraftTree(tokens=[5], parents=[-1], draft_probs=[0.5],
                                   draft_dists=[common_pb2.DraftDist(row=0, token_ids=[6, 7], probs=[0.5, 0.5])])
    with pytest.raises(InvalidRequestError, match="outside its draft distribution"):
        convert.tree_from_proto(message)
