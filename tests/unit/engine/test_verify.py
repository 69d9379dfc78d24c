"""Verify layout, K/V moves and speculation counters; then one tree-verify forward of the real model equals
verifying each of the tree's paths on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.engine.config import CacheConfig, SamplingParams
from specserve.engine.draft_tree import ROOT, DraftTree
from specserve.engine.model_runner import allocate_kv_cache
from specserve.engine.sampler import Sampler
from specserve.engine.scheduler import ScheduledSeq
from specserve.engine.sequence import Sequence
from specserve.engine.step_outcome import step_tokens
from specserve.engine.verify import SpecStats, kv_moves, verify_layout
from specserve.kernels.paged_attention import build_attention_metadata

# root ─ 5 ─ 9
#      └ 7
FORK = DraftTree(tokens=[5, 9, 7], parents=[ROOT, 0, ROOT], draft_probs=[1.0, 1.0, 1.0])


def test_layout_of_the_docstring_example():
    layout = verify_layout(11, FORK)
    assert layout.token_ids == [11, 5, 9, 7]
    assert layout.position_offsets == [0, 1, 2, 1]
    assert [[int(x) for x in row] for row in layout.tree_mask] == [
        [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1],
    ]


def test_chain_prefix_needs_no_kv_moves():
    assert kv_moves([0, 1, 2], num_computed=40) == []


def test_accepted_second_branch_moves_into_place():
    # Nodes 2 then 4 accepted: node 2 sits at 40 + 1 + 2 and belongs at 41; node 4 at 45 belongs at 42.
    assert kv_moves([2, 4], num_computed=40) == [(43, 41), (45, 42)]


def test_spec_stats_tau_and_acceptance_by_depth():
    stats = SpecStats()
    stats.record(DraftTree.chain([1, 2, 3]), accepted=2, emitted=3)  # depth 3 reached, 2 accepted
    stats.record(FORK, accepted=0, emitted=1)
    stats.record(None, accepted=0, emitted=1)  # a plain decode
    assert stats.forwards == 3 and stats.tokens == 5 and stats.verify_steps == 2
    assert stats.drafted == 6 and stats.accepted == 2
    assert stats.mean_accepted_len == 5 / 3
    assert stats.as_dict()["acceptance_by_depth"] == [0.5, 0.5, 0.0]
    assert stats.nodes_by_depth == [3, 2, 1]  # FORK has two nodes at depth 1
    total = SpecStats()
    total.add(stats)
    total.add(stats)
    assert total.tokens == 10 and total.accepted_by_depth == [2, 2] and total.nodes_by_depth == [6, 4, 2]


def forward_rows(model, cache_config, prefix: list[int], new_tokens: list[int], offsets: list[int], tree_mask):
    """Prefill `prefix`, then run `new_tokens` (RoPE positions len(prefix) + offsets) with `tree_mask`;
    returns the logits of every new row."""
    kv = allocate_kv_cache(model.config, cache_config, torch.float32)
    table = list(range(cache_config.num_blocks))
    n, q = len(prefix), len(new_tokens)
    meta = build_attention_metadata([n], [n], [table], cache_config.block_size)
    model(torch.tensor(prefix), torch.arange(n), kv, meta, torch.tensor([n - 1]))
    meta = build_attention_metadata([q], [n + q], [table], cache_config.block_size, tree_masks=[tree_mask])
    positions = torch.tensor([n + o for o in offsets])
    logits, _ = model(torch.tensor(new_tokens), positions, kv, meta, torch.arange(q))
    return logits


def test_tree_verify_equals_verifying_each_path_alone(llama_model, tokenizer):
    prompt = tokenizer.render_prompt_ids([{"role": "user", "content": "Name three colours."}])
    prefix, root = prompt[:-1], prompt[-1]
    # A tree over real token ids: root ─ a ─ b ─ c, root ─ d ─ e, a ─ f.
    a, b, c, d, e, f = tokenizer.encode(" Red, green and blue or pink")[:6]
    tree = DraftTree([a, b, c, d, e, f], [ROOT, 0, 1, ROOT, 3, 0], [1.0] * 6)
    layout = verify_layout(root, tree)
    cache = CacheConfig(block_size=16, num_blocks=8)
    tree_logits = forward_rows(llama_model, cache, prefix, layout.token_ids, layout.position_offsets, layout.tree_mask)
    for node in range(tree.num_nodes):
        path = tree.path_to(node)
        chain = [root] + [tree.tokens[i] for i in path]
        causal = [[j <= i for j in range(len(chain))] for i in range(len(chain))]
        chain_logits = forward_rows(llama_model, cache, prefix, chain, list(range(len(chain))), causal)
        torch.testing.assert_close(tree_logits[1 + node], chain_logits[-1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(tree_logits[0], chain_logits[0], atol=2e-4, rtol=1e-4)


class _NoKv:
    """step_tokens' runner, for logits given by hand: no cache to move."""

    def move_kv(self, block_table: list[int], moves: list[tuple[int, int]]) -> None:
        pass


@dataclass
class _State:
    seq: Sequence
    generator: None = None
    lossy: None = None
    lossy_budget_left: float = 0.0

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids


def test_a_tree_row_is_penalized_with_its_path():
    """Chain 1 -> 1 after the prompt [0]. Row 1 (after node 0) favours 1 over 2 by 0.1; a frequency penalty of
    0.5 on node 0's token turns that, as plain decoding would after emitting 1: node 1 is rejected, 2 follows."""
    seq = Sequence([0], SamplingParams(frequency_penalty=0.5), max_total_tokens=16)
    seq.num_computed_tokens = 0
    tree = DraftTree.chain([1, 1])
    logits = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 1.0, 0.9, 0.0], [0.0, 0.0, 0.0, 3.0]])
    out = step_tokens([ScheduledSeq(seq, 1, 2)], [tree], logits, {seq.seq_id: _State(seq)}, _NoKv(), Sampler())
    assert out[seq.seq_id].token_ids == [1, 2] and out[seq.seq_id].num_accepted == 1
