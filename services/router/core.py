"""The router's batching loop: every step, one batched Propose per drafter replica and one batched Verify
per verifier replica cover every active request (iteration-level continuous batching).

The router holds each request's token history (and, for feature drafters, its hidden states), its text
and stop state; replicas hold only what the router can rebuild. A replica that fails a call is skipped
for a while and its sequences are re-prefilled elsewhere from that history: a lost replica costs
compute, never a wrong or missing token.

One thread runs the loop (`run`); `submit` and `cancel` come from any thread (the gRPC servicer's).
Outputs go to each request's queue, which `RequestHandle` iterates.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace

import grpc
import torch

from specserve.engine.acceptance import LossyConfig
from specserve.engine.config import SamplingParams, SpecConfig
from specserve.engine.draft_tree import DraftTree
from specserve.engine.logprobs import TokenLogprob
from specserve.engine.sequence import Sequence, check_logit_bias, check_prompt
from specserve.engine.text_output import TextOutput, append_tokens
from specserve.engine.tokenizer import Tokenizer
from specserve.engine.verify import SpecStats
from specserve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    RpcError,
    SpecserveError,
    UnavailableError,
)
from specserve.router.ahead import AHEAD_MIN_CHANCE, AheadDrafts
from specserve.router.backends import Replica, rendezvous_order
from specserve.engine.draft_budget import RecentAcceptance, StepCost, acceptance_by_depth, draft_budgets
from specserve.rpc import convert
from specserve.rpc.logprobs import logprobs_from_proto
from specserve.v1 import common_pb2, drafter_pb2, verifier_pb2

log = logging.getLogger(__name__)

SPEC_MODES = ("off", "lossless", "lossy")


@dataclass(frozen=True)
class RouterConfig:
    max_num_seqs: int = 64  # requests decoding at once; the rest wait in the queue
    max_queue: int = 256  # waiting requests; beyond it submit raises OverloadedError
    max_num_batched_tokens: int = 512  # tokens of one step over all verifiers (decodes + drafts + chunks)
    # The speculation budget adapts to load. "cost" (engine/draft_budget.py): each step drafts only the nodes
    # whose expected accepted tokens pay for the rows they add, by the measured cost of a verify row and
    # each request's acceptance record. "static": the engine's rule (SpecConfig.budget_per_sequence),
    # min(num_draft_tokens, max_draft_tokens_per_step // speculating). Either way at 0 the step calls
    # no drafter at all.
    speculation_budget: str = "cost"
    num_draft_tokens: int = 8  # most nodes per request per step
    max_draft_tokens_per_step: int = 64  # most nodes per step over all requests
    # While a step verifies, token-only drafters draft the next step on the guess that the tree's first
    # path is accepted (router/ahead.py); a right guess saves the next step's Propose round trip.
    draft_ahead: bool = True
    default_speculation: str = "lossless"  # for requests that leave it unspecified
    lossy: LossyConfig = LossyConfig()  # defaults of lossy requests
    max_prompt_chars: int = 1 << 20
    # One Verify / Propose / Release call; a replica slower than this counts as failed. The loop waits
    # for each step's calls, so a hung (not dead) replica would stall every request for up to this long.
    rpc_timeout_s: float = 30.0
    # A Verify without prefill chunks that takes hang_factor times its predicted time (the step-cost fit),
    # and at least hang_floor_s, counts as failed too: its sequences are rebuilt on another replica.
    hang_factor: float = 20.0
    hang_floor_s: float = 5.0
    unavailable_timeout_s: float = 30.0  # a request with no healthy verifier fails after this long
    affinity_tokens: int = 64  # prompt tokens hashed for prefix-affinity routing
    affinity_slack: int = 4  # the preferred verifier may hold this many more sequences than the least loaded

    def __post_init__(self) -> None:
        if self.speculation_budget not in ("cost", "static"):
            raise InvalidRequestError(f"speculation_budget must be cost or static, got {self.speculation_budget!r}")
        if self.default_speculation not in SPEC_MODES:
            raise InvalidRequestError(f"default_speculation must be one of {', '.join(SPEC_MODES)}")
        if min(self.max_num_seqs, self.max_queue, self.max_num_batched_tokens) <= 0:
            raise InvalidRequestError("max_num_seqs, max_queue and max_num_batched_tokens must be positive")


@dataclass
class RouterOutput:
    """A streaming delta of one request."""

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    spec: SpecStats | None = None  # on the last output
    prompt_token_ids: list[int] | None = None  # on the first output
    seconds: float = 0.0  # on the last output: from submission to the last token
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asks for them


@dataclass(eq=False)  # identity: requests are compared with `in` on the running list
class _Request:
    rid: int
    seq: Sequence
    text: TextOutput
    mode: str
    lossy: LossyConfig | None
    drafter: str | None  # None: no speculation
    deadline: float | None  # time.monotonic()
    out: queue.Queue
    stats: SpecStats = field(default_factory=SpecStats)
    recent: RecentAcceptance = field(default_factory=RecentAcceptance)  # what prices its drafts
    start: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    sent_prompt: bool = False  # the first output (with the prompt ids) went out
    # What the current verifier holds: its replica, tokens sent or emitted, tokens with KV there.
    verifier: Replica | None = None
    v_tokens: int = 0
    v_computed: int = 0
    hidden: list[torch.Tensor] = field(default_factory=list)  # rows of tokens [0, v_computed)
    hidden_sent: int = 0  # rows its drafter replica holds (feature drafters): later calls send the rest
    hidden_sent_to: Replica | None = None
    lossy_spent: float = 0.0  # nats of its lossy budget spent so far, on whichever verifier
    drafter_replica: Replica | None = None
    stranded_since: float | None = None  # when it last had no healthy verifier

    @property
    def decoding(self) -> bool:
        return (self.verifier is not None and self.v_tokens == self.seq.num_tokens
                and self.v_computed == self.seq.num_tokens - 1)

    def reset_verifier(self) -> None:
        if self.verifier is not None:
            self.verifier.load -= 1
        self.verifier, self.v_tokens, self.v_computed, self.hidden = None, 0, 0, []
        self.hidden_sent = 0  # rebuilt rows may differ in the last bits: send them all again


def _decode_shape(items: list[verifier_pb2.VerifyItem]) -> tuple[int, int] | None:
    """(sequences, rows) of a Verify without prefill chunks, rows being every item's root and tree nodes;
    None when an item carries a prefill chunk."""
    if any(item.new_token_ids or item.max_compute_tokens for item in items):
        return None
    return len(items), sum(1 + len(item.tree.tokens) for item in items)


def rows_from(chunks: list[torch.Tensor], start: int) -> torch.Tensor:
    """Rows [start:] of the chunks stacked, without copying the rows before `start`."""
    tail, end = [], sum(len(chunk) for chunk in chunks)
    for chunk in reversed(chunks):
        if end <= start:
            break
        tail.append(chunk[max(0, start - (end - len(chunk))):])
        end -= len(chunk)
    return torch.cat(tail[::-1]) if tail else chunks[-1][:0]


class RequestHandle:
    """Iterate a request's outputs; the last has finished=True. A failure raises its SpecserveError."""

    def __init__(self, router: Router, rid: int, prompt_token_ids: list[int]) -> None:
        self._router = router
        self.rid = rid
        self.prompt_token_ids = prompt_token_ids
        self._queue: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator[RouterOutput]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def cancel(self) -> None:
        self._router.cancel(self.rid)


class Router:
    def __init__(self, tokenizer: Tokenizer, verifiers: list[Replica], drafters: dict[str, list[Replica]],
                 config: RouterConfig = RouterConfig(), model_name: str = "") -> None:
        if not verifiers:
            raise InvalidRequestError("the router needs at least one verifier")
        self.tokenizer = tokenizer
        self.verifiers = verifiers
        self.drafters = drafters
        self.config = config
        self.model_name = model_name
        self.spec = SpecConfig(method="auto", num_draft_tokens=config.num_draft_tokens,
                               max_draft_tokens_per_step=config.max_draft_tokens_per_step)
        self._check_replicas()
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.spec_stats = SpecStats()
        self.drafter_stats = {name: SpecStats() for name in drafters}  # finished requests, by drafter
        self.step_cost = StepCost()
        self._by_rid: dict[int, _Request] = {}
        self._cond = threading.Condition()
        self._stop = False
        # Verify calls, this step's drafts ahead and the next step's Propose can all be in flight at once.
        workers = len(verifiers) + 2 * sum(map(len, drafters.values()))
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, workers))
        self._releases: dict[int, tuple[Replica, list[int]]] = {}  # id(replica) -> (replica, seq ids)
        self.ahead = AheadDrafts(self._pool, config.rpc_timeout_s)
        self._thread: threading.Thread | None = None

    # ---- set-up ----------------------------------------------------------------------------------

    def _check_replicas(self) -> None:
        """Every replica must serve the same target; read the limits from the verifiers."""
        infos = [v.stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=self.config.rpc_timeout_s)
                 for v in self.verifiers]
        for replica, info in zip(self.verifiers, infos):
            replica.info = info
        fingerprints = {info.model_fingerprint for info in infos}
        for name, replicas in self.drafters.items():
            for replica in replicas:
                replica.info = replica.stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=self.config.rpc_timeout_s)
                fingerprints.add(replica.info.model_fingerprint)
        if len(fingerprints) != 1:
            raise InvalidRequestError("drafter and verifier replicas serve different target models")
        self.max_total_tokens = min(info.max_total_tokens for info in infos)
        self.vocab_size = infos[0].vocab_size

    def start(self) -> Router:
        self._thread = threading.Thread(target=self.run, name="router-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=False)

    @property
    def num_active(self) -> int:
        with self._cond:
            return len(self.waiting) + len(self.running)

    # ---- requests --------------------------------------------------------------------------------

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, raw: bool = False) -> list[int]:
        """The prompt's token ids: a user message through the chat template (unless raw), a conversation
        through the template, or ids as they are."""
        if prompt is not None:
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if len(prompt) > self.config.max_prompt_chars:
                raise InvalidRequestError(f"prompt has {len(prompt)} characters; the limit is "
                                          f"{self.config.max_prompt_chars}")
            if raw:
                return self.tokenizer.encode(prompt)
            return self.tokenizer.render_prompt_ids([{"role": "user", "content": prompt}])
        if messages is not None:
            if not messages:
                raise InvalidRequestError("messages is empty")
            for m in messages:
                if m.get("role") not in ("system", "user", "assistant"):
                    raise InvalidRequestError(f"message role must be system, user or assistant, got {m.get('role')!r}")
            if sum(len(m.get("content", "")) for m in messages) > self.config.max_prompt_chars:
                raise InvalidRequestError(f"messages exceed {self.config.max_prompt_chars} characters")
            return self.tokenizer.render_prompt_ids(messages)
        if prompt_token_ids is not None:
            return list(prompt_token_ids)
        raise InvalidRequestError("a request needs a prompt, messages or prompt_token_ids")

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, mode: str = "",
               drafter: str = "", lossy: LossyConfig | None = None, timeout: float | None = None) -> RequestHandle:
        """Queue a request (it joins the batch at the next step). `mode`: off | lossless | lossy, "" = the
        router's default; `drafter`: a name in `self.drafters`, "" = the first; `timeout`: seconds."""
        check_prompt(prompt_token_ids, self.max_total_tokens, self.vocab_size)
        check_logit_bias(params, self.vocab_size)
        mode = mode or self.config.default_speculation
        if mode not in SPEC_MODES:
            raise InvalidRequestError(f"speculation must be one of {', '.join(SPEC_MODES)}, got {mode!r}")
        if drafter and drafter not in self.drafters:
            known = ", ".join(self.drafters) or "none"
            raise InvalidRequestError(f"unknown drafter {drafter!r}; this router has: {known}")
        drafter_name = drafter or next(iter(self.drafters), None)
        if mode == "off":
            drafter_name = None
        rid = secrets.randbits(63)
        handle = RequestHandle(self, rid, prompt_token_ids)
        seq = Sequence(prompt_token_ids, params, self.max_total_tokens)
        request = _Request(
            rid=rid, seq=seq, text=TextOutput(self.tokenizer, params.stop), mode=mode,
            lossy=(lossy or self.config.lossy) if mode == "lossy" else None, drafter=drafter_name,
            deadline=time.monotonic() + timeout if timeout is not None else None, out=handle._queue,
        )
        with self._cond:
            if len(self.waiting) >= self.config.max_queue:
                raise OverloadedError(f"the router's queue is full ({self.config.max_queue} waiting requests)")
            self.waiting.append(request)
            self._by_rid[rid] = request
            self._cond.notify_all()
        return handle

    def cancel(self, rid: int) -> None:
        """Cancel a request: its KV is released at the start of the next step."""
        with self._cond:
            request = self._by_rid.get(rid)
            if request is not None:
                request.cancelled = True
                self._cond.notify_all()

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.waiting and not self.running:
                    self._cond.wait()
                if self._stop:
                    break
                self._reap()
                self._admit()
            try:
                progressed = self.step()
            except Exception as exc:  # never let one bad step kill the loop (and every request with it)
                log.exception("router step failed")
                for request in list(self.running):
                    self._fail(request, exc if isinstance(exc, SpecserveError) else UnavailableError(f"step failed: {exc}"))
                progressed = True
            self._flush_releases()
            if not progressed:
                time.sleep(0.02)  # nothing could run (no healthy verifier yet): do not spin
        for request in self.waiting + self.running:
            self._fail(request, UnavailableError("the router is shutting down"))
        self._flush_releases()

    def _reap(self) -> None:
        """Drop cancelled and expired requests (caller holds the lock)."""
        now = time.monotonic()
        for request in self.waiting + self.running:
            if request.cancelled:
                self._fail(request, RequestCancelledError("the request was cancelled"))
            elif request.deadline is not None and now > request.deadline:
                self._fail(request, DeadlineExceededError("the request ran past its deadline"))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            self.running.append(self.waiting.pop(0))

    def step(self) -> bool:
        """One iteration over the running requests; False when nothing could be sent."""
        trees = self._propose()
        batches = self._plan(trees)
        if not batches:
            return False
        hang = {key: self._hang_timeout([item for _, item in work]) for key, (_, work) in batches.items()}
        calls = {key: self._pool.submit(self._verify, replica, verifier_pb2.VerifyRequest(
                    items=[item for _, item in work],
                    return_hidden=any(self._needs_hidden(r) for r, _ in work)), hang[key])
                 for key, (replica, work) in batches.items()}
        if self.config.draft_ahead:
            self._draft_ahead(trees)
        for key, (replica, work) in batches.items():
            try:
                response = calls[key].result(timeout=hang[key])
            except futures.TimeoutError:  # hung, not dead (an in-process call cannot be cut short)
                self._replica_failed(replica, [r for r, _ in work], None)
                continue
            except grpc.RpcError as exc:
                self._replica_failed(replica, [r for r, _ in work], exc)
                continue
            except SpecserveError as exc:
                for request, _ in work:
                    self._fail(request, exc)
                continue
            for (request, item), result in zip(work, response.results):
                self._apply(request, item, result, trees.get(request.rid))
        return True

    def _hang_timeout(self, items: list[verifier_pb2.VerifyItem]) -> float | None:
        """How long to wait for a Verify before calling its replica hung; None (the RPC's own timeout) for
        one with prefill chunks, whose time the step-cost fit does not predict, or before any decode forward
        was timed."""
        shape = _decode_shape(items)
        predicted = None if shape is None else self.step_cost.bound(*shape)
        if predicted is None:
            return None
        return min(max(self.config.hang_factor * predicted, self.config.hang_floor_s), self.config.rpc_timeout_s)

    def _verify(self, replica: Replica, request: verifier_pb2.VerifyRequest,
                hang_timeout: float | None = None) -> verifier_pb2.VerifyResponse:
        """One Verify call, with `hang_timeout` (if any) as its deadline; one without prefill chunks is timed
        into the step-cost model (rows: root and tree nodes of every item). Prefill-heavy forwards are left
        out: their many rows sit in another regime (compute-bound) than the decode steps whose drafts the
        model prices; so is a call that ran past its hang timeout (its answer was not waited for)."""
        start = time.perf_counter()
        response = replica.stub.Verify(request, timeout=hang_timeout or self.config.rpc_timeout_s)
        seconds = time.perf_counter() - start
        shape = _decode_shape(request.items)
        if shape is not None and (hang_timeout is None or seconds < hang_timeout):
            self.step_cost.observe(*shape, seconds)
        return response

    def _call(self, method, request) -> futures.Future:
        return self._pool.submit(method, request, timeout=self.config.rpc_timeout_s)

    def _needs_hidden(self, request: _Request) -> bool:
        replicas = self.drafters.get(request.drafter or "", [])
        return bool(replicas) and replicas[0].info.needs_hidden

    # ---- drafting --------------------------------------------------------------------------------

    def _propose(self) -> dict[int, DraftTree]:
        """Draft trees of the decoding, speculating requests; {} (no drafter call) when every budget is 0."""
        speculating = [r for r in self.running if r.drafter is not None and r.decoding and r.verifier.healthy]
        budgets = self._budgets(speculating)
        trees: dict[int, DraftTree] = {}
        groups: dict[int, tuple[Replica, list[tuple[_Request, drafter_pb2.DraftItem]]]] = {}
        for request in speculating:
            seq = request.seq
            budget = budgets.get(request.rid, 0)
            replica = self._drafter_for(request) if budget > 0 else None
            if replica is None:
                continue
            ahead = self.ahead.take(request.rid, seq.all_token_ids, budget)
            if ahead is not None:
                trees[request.rid] = ahead
                continue
            item = drafter_pb2.DraftItem(seq_id=request.rid, token_ids=seq.all_token_ids,
                                         num_prompt_tokens=seq.num_prompt_tokens, budget=budget)
            if not seq.params.greedy:  # learned drafters sample their drafts at the request's settings
                item.sampling.CopyFrom(convert.sampling_to_proto(seq.params))
            if replica.info.needs_hidden:
                rows = sum(len(h) for h in request.hidden)
                if rows != request.v_computed:  # the verifier keeps no hidden states: nothing to draft from
                    continue
                # Only the rows this replica has not had yet (a few per step, not the whole history).
                item.hidden_offset = request.hidden_sent if request.hidden_sent_to is replica else 0
                item.hidden_states.CopyFrom(convert.tensor_to_proto(rows_from(request.hidden, item.hidden_offset)))
            groups.setdefault(id(replica), (replica, []))[1].append((request, item))
        start = time.perf_counter()
        calls = {key: self._call(replica.stub.Propose, drafter_pb2.ProposeRequest(items=[i for _, i in work]))
                 for key, (replica, work) in groups.items()}
        futures.wait(calls.values())
        if calls:
            self.step_cost.observe_draft(time.perf_counter() - start)
        self.ahead.clear()  # what no request took this step guessed wrong or went unused
        for key, (replica, work) in groups.items():
            try:
                response = calls[key].result()
            except (grpc.RpcError, SpecserveError) as exc:  # drafting is optional: decode plainly this step
                log.warning("drafter %s failed: %s", replica.address, exc)
                replica.mark_down()
                continue
            missing = set(response.need_all_hidden)
            for (request, _), tree in zip(work, response.trees):
                if replica.info.needs_hidden:
                    request.hidden_sent_to = replica
                    request.hidden_sent = 0 if request.rid in missing else request.v_computed
                if tree.tokens:
                    trees[request.rid] = convert.tree_from_proto(tree)
        return trees

    def _draft_ahead(self, trees: dict[int, DraftTree]) -> None:
        """Ask token-only drafters for the next step's drafts while this step verifies (router/ahead.py)."""
        work = []
        for request in self.running:
            tree, replica = trees.get(request.rid), request.drafter_replica
            if tree is None or replica is None or not replica.healthy or replica.info.needs_hidden:
                continue
            depth = len(tree.first_path())
            chance = acceptance_by_depth(request.recent, self.drafter_stats[request.drafter], depth)[-1]
            if chance >= AHEAD_MIN_CHANCE:
                work.append((replica, request.rid, request.seq.all_token_ids, request.seq.num_prompt_tokens,
                             tree, tree.num_nodes, request.seq.params))
        if work:
            self.ahead.send(work)

    def _budgets(self, speculating: list[_Request]) -> dict[int, int]:
        """Nodes each speculating request may draft this step (RouterConfig.speculation_budget)."""
        rooms = {}
        for request in speculating:
            seq = request.seq
            rooms[request.rid] = min(self.config.num_draft_tokens, seq.max_total_tokens - seq.num_tokens,
                                     seq.params.max_tokens - len(seq.output_token_ids) - 1)
        if self.config.speculation_budget == "static":
            budget = self.spec.budget_per_sequence(len(speculating))
            return {rid: min(budget, room) for rid, room in rooms.items()}
        # Drafts are priced against the decode step alone, never against a step made long by prefill
        # chunks: a chunk's tokens may be prefix-cache hits that cost the verifier nothing (the router
        # cannot know), and where they are computed the forward is compute-bound and a drafted row costs
        # its full share. Pricing against the long step made every node look free whenever a request
        # joined (measured at 16 clients: 20-50 nodes in each such step, most of them rejected).
        decoding = sum(r.decoding for r in self.running)
        row_ratio, draft_ratio = self.step_cost.ratios(decoding, decoding)
        acceptance = {r.rid: acceptance_by_depth(r.recent, self.drafter_stats[r.drafter], max(0, rooms[r.rid]))
                      for r in speculating}
        return draft_budgets(acceptance, float(decoding), row_ratio, self.config.max_draft_tokens_per_step, draft_ratio)

    def _drafter_for(self, request: _Request) -> Replica | None:
        """Sticky: the replica that drafted last time, while it stays healthy."""
        if request.drafter_replica is not None and request.drafter_replica.healthy:
            return request.drafter_replica
        healthy = [r for r in self.drafters[request.drafter] if r.healthy]
        if not healthy:
            return None
        request.drafter_replica = rendezvous_order(request.rid.to_bytes(8, "little"), healthy)[0]
        return request.drafter_replica

    # ---- verification ----------------------------------------------------------------------------

    def _plan(self, trees: dict[int, DraftTree]) -> dict[int, tuple[Replica, list[tuple[_Request, verifier_pb2.VerifyItem]]]]:
        """This step's Verify items, grouped by verifier, within the step's token budget."""
        budget = self.config.max_num_batched_tokens
        batches: dict[int, tuple[Replica, list]] = {}
        for request in list(self.running):
            if budget <= 0:
                break
            if request.verifier is not None and not request.verifier.healthy:
                request.reset_verifier()
            if request.verifier is None and not self._assign_verifier(request):
                continue
            seq = request.seq
            if request.decoding:
                tree = trees.get(request.rid)
                if tree is not None and 1 + tree.num_nodes > budget:
                    tree = None
                    trees.pop(request.rid)
                item = verifier_pb2.VerifyItem(seq_id=request.rid, position=request.v_tokens)
                if tree is not None:
                    item.tree.CopyFrom(convert.tree_to_proto(tree))
                budget -= 1 + (tree.num_nodes if tree is not None else 0)
            else:
                chunk = min(seq.num_tokens - request.v_computed, budget)
                item = verifier_pb2.VerifyItem(seq_id=request.rid, position=request.v_tokens,
                                               new_token_ids=seq.all_token_ids[request.v_tokens:],
                                               max_compute_tokens=chunk)
                if request.v_tokens == 0:
                    item.sampling.CopyFrom(convert.sampling_to_proto(seq.params))
                    item.num_prompt_tokens = seq.num_prompt_tokens
                    if request.lossy is not None:  # a rebuilt sequence goes on with what is left of its budget
                        left = replace(request.lossy, budget=max(0.0, request.lossy.budget - request.lossy_spent))
                        item.lossy.CopyFrom(convert.lossy_to_proto(left))
                budget -= chunk
            batches.setdefault(id(request.verifier), (request.verifier, []))[1].append((request, item))
        return batches

    def _assign_verifier(self, request: _Request) -> bool:
        """Prefix affinity (rendezvous hashing on the prompt's first tokens), unless the preferred replica
        carries more than `affinity_slack` sequences beyond the least loaded one."""
        healthy = [v for v in self.verifiers if v.healthy]
        now = time.monotonic()
        if not healthy:
            request.stranded_since = request.stranded_since or now
            if now - request.stranded_since > self.config.unavailable_timeout_s:
                self._fail(request, UnavailableError("no verifier replica is reachable"))
            return False
        request.stranded_since = None
        key = str(request.seq.prompt_token_ids[: self.config.affinity_tokens]).encode()
        preferred = rendezvous_order(key, healthy)[0]
        least = min(healthy, key=lambda v: v.load)
        chosen = preferred if preferred.load <= least.load + self.config.affinity_slack else least
        chosen.load += 1
        request.verifier = chosen
        return True

    def _apply(self, request: _Request, item: verifier_pb2.VerifyItem, result: verifier_pb2.VerifyResult,
               tree: DraftTree | None) -> None:
        if request not in self.running:  # failed meanwhile
            return
        if result.status == verifier_pb2.ITEM_STATUS_UNKNOWN_SEQUENCE:
            request.reset_verifier()  # re-prefill from the history next step
            return
        if result.status == verifier_pb2.ITEM_STATUS_NO_CAPACITY:
            if item.position > 0:  # a running sequence that cannot grow there: release it, re-prefill later
                self._queue_release(request.verifier, request.rid)
            request.reset_verifier()
            return
        if item.position == 0:
            request.hidden = []
        request.v_tokens += len(item.new_token_ids) + len(result.token_ids)
        request.lossy_spent += result.lossy_spent
        request.v_computed = result.num_computed_tokens
        if result.HasField("hidden_states"):
            request.hidden.append(convert.tensor_from_proto(result.hidden_states))
        if result.token_ids:
            token_ids, logprobs = list(result.token_ids), None
            if request.seq.params.logprobs is not None:
                try:
                    logprobs = logprobs_from_proto(result.logprobs, token_ids)
                except RpcError as exc:
                    self._fail(request, RpcError(f"verifier {request.verifier.address}: {exc}"))
                    return
            self._emit(request, token_ids, result.num_accepted, tree if item.HasField("tree") else None, logprobs)

    def _emit(self, request: _Request, token_ids: list[int], num_accepted: int, tree: DraftTree | None,
              logprobs: list[TokenLogprob] | None = None) -> None:
        seq = request.seq
        appended = append_tokens(seq, request.text, token_ids, self.tokenizer.eos_token_ids)
        request.stats.record(tree, num_accepted, len(appended))
        request.recent.record(tree, num_accepted)
        output = RouterOutput(appended, request.text.take_delta(final=seq.is_finished), seq.is_finished,
                              logprobs=None if logprobs is None else logprobs[: len(appended)])
        if not request.sent_prompt:
            output.prompt_token_ids = seq.prompt_token_ids
            request.sent_prompt = True
        if seq.is_finished:
            output.finish_reason = seq.finish_reason.value
            output.spec = request.stats
            output.seconds = time.perf_counter() - request.start
            self.spec_stats.add(request.stats)
            if request.drafter is not None:
                self.drafter_stats[request.drafter].add(request.stats)
            self._retire(request)
        request.out.put(output)

    def _replica_failed(self, replica: Replica, requests: list[_Request], exc: grpc.RpcError | None) -> None:
        """`exc` None: the replica hung (no answer within `_hang_timeout`)."""
        code = exc.code() if hasattr(exc, "code") else None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            for request in requests:
                self._fail(request, InvalidRequestError(exc.details()))
            return
        log.warning("verifier %s %s; re-prefilling its sequences elsewhere", replica.address,
                    "hung" if exc is None else f"failed ({code})")
        replica.mark_down()
        for request in requests:
            self._queue_release(replica, request.rid)  # if it is alive after all, free their KV there
            request.reset_verifier()

    # ---- endings ---------------------------------------------------------------------------------

    def _fail(self, request: _Request, error: SpecserveError) -> None:
        if request in self.running or request in self.waiting:
            self._retire(request)
            request.out.put(error)

    def _retire(self, request: _Request) -> None:
        """Forget a finished or failed request and release its state on the replicas."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._by_rid.pop(request.rid, None)
        if request.verifier is not None:
            self._queue_release(request.verifier, request.rid)
            request.reset_verifier()
        if request.drafter_replica is not None:
            self._queue_release(request.drafter_replica, request.rid)

    def _queue_release(self, replica: Replica, rid: int) -> None:
        self._releases.setdefault(id(replica), (replica, []))[1].append(rid)

    def _flush_releases(self) -> None:
        """Send the step's releases without waiting: a slow or dead replica never holds up the loop (one that
        lost its state has nothing to release; a release that never arrives costs that replica KV only
        until it restarts)."""
        releases, self._releases = self._releases, {}
        for replica, rids in releases.values():
            self._call(replica.stub.Release, common_pb2.ReleaseRequest(seq_ids=rids))
