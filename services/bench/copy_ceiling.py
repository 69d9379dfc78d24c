"""How many tokens a step could accept if drafts are copied from the request's own text: ceilings for the
training-free drafters, computed from a finished greedy output.

Lossless greedy speculation reproduces plain greedy output, so the output is known in advance and any
drafter's best case can be replayed over it: at each step the drafter proposes a chain of at most
`budget` tokens after the accepted text, the target keeps the prefix that matches its own output plus
one token of its own, and tau = output tokens / steps. Three drafters are replayed, each one a bound for
a family of real ones:

- "any copy": the chain is the longest start of the true continuation found anywhere in the prompt or
  the output so far. No drafter that copies from the request's own text (n-gram, prompt lookup, suffix
  trees) can beat it, however it picks where to copy from.
- "best suffix match": the chain follows an earlier occurrence of the text's last n tokens (n from 1 to
  `max_n`, the n-gram drafter's levels), the occurrence that matches best. A drafter that keys on the
  suffix, as drafters/ngram.py does, reaches it only with a perfect pick among the occurrences.
- "most recent match": the chain follows the most recent occurrence of the longest matching suffix, as
  a plain prompt-lookup chain does.

`tree_drafter` replays a real drafter (drafters/base.py) the same way, through the engine's greedy
acceptance (the longest path of its tree that matches the target's output), so its tau here is what
the engine would measure at batch 1.

Functions of token id lists, so tests can check them on hand-made sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from specserve.drafters.base import DraftRequest, common_prefix_len
from specserve.drafters.base import Drafter as TreeDrafter
from specserve.engine.acceptance import accept_greedy
from specserve.engine.draft_tree import DraftTree

# Picks the drafted chain for one step: (history, true continuation, budget) -> accepted drafted tokens.
Drafter = Callable[[Sequence[int], Sequence[int], int], int]


def match_len(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    """Length of the common start of `a` and `b`, at most `cap`."""
    return common_prefix_len(list(a[:cap]), list(b[:cap]))


def _occurs(history: Sequence[int], needle: Sequence[int]) -> bool:
    n = len(needle)
    return any(history[s:s + n] == needle for s in range(len(history) - n + 1) if history[s] == needle[0])


def any_copy(history: Sequence[int], future: Sequence[int], budget: int) -> int:
    """The longest start of `future` (at most `budget` tokens) that occurs anywhere in `history`."""
    history, future = list(history), list(future)
    n = 0
    while n < min(budget, len(future)) and _occurs(history, future[:n + 1]):
        n += 1
    return n


def _followers(history: Sequence[int], n: int) -> list[int]:
    """Positions right after the earlier occurrences of `history`'s last n tokens, oldest first."""
    suffix = list(history[-n:])
    return [s + n for s in range(len(history) - n) if list(history[s:s + n]) == suffix]


def best_suffix_match(max_n: int = 4) -> Drafter:
    def draft(history: Sequence[int], future: Sequence[int], budget: int) -> int:
        best = 0
        for n in range(1, min(max_n, len(history)) + 1):
            for p in _followers(history, n):
                best = max(best, match_len(history[p:], future, budget))
        return best

    return draft


def most_recent_match(max_n: int = 4) -> Drafter:
    def draft(history: Sequence[int], future: Sequence[int], budget: int) -> int:
        for n in range(min(max_n, len(history)), 0, -1):
            followers = _followers(history, n)
            if followers:
                return match_len(history[followers[-1]:], future, budget)
        return 0

    return draft


def accepted_path(tree: DraftTree, future: Sequence[int]) -> int:
    """Drafted tokens greedy verification keeps when the target's tokens are `future`: the engine's own
    rule (`accept_greedy`), fed at each row the future token at that row's depth (-1 past its end)."""
    def target_token(depth: int) -> int:
        return future[depth] if depth < len(future) else -1

    argmax = [target_token(0), *(target_token(d) for d in tree.depths())]
    return len(accept_greedy(tree, argmax).accepted_tokens)


def tree_drafter(drafter: TreeDrafter, seq_id: int, num_prompt_tokens: int) -> Drafter:
    """A real drafter as a `Drafter` for one sequence (call `drafter.release(seq_id)` after the replay)."""
    def draft(history: Sequence[int], future: Sequence[int], budget: int) -> int:
        request = DraftRequest(seq_id, list(history), num_prompt_tokens, budget)
        return accepted_path(drafter.propose([request])[0], future)

    return draft


def replay(prompt: Sequence[int], output: Sequence[int], drafter: Drafter, budget: int) -> int:
    """Target steps to produce `output` after `prompt` when each step accepts what `drafter` gets right,
    plus the target's own token."""
    history, steps, i = list(prompt), 0, 0
    while i < len(output):
        accepted = min(drafter(history, output[i:], budget), len(output) - i - 1)
        history += output[i:i + accepted + 1]
        i += accepted + 1
        steps += 1
    return steps


DRAFTERS: dict[str, Drafter] = {
    "any copy": any_copy,
    "best suffix match": best_suffix_match(),
    "most recent match": most_recent_match(),
}
