"""The engine loop: schedule, run the model, sample, append, stop, stream.

`LLMEngine.step()` advances every active request by one forward; requests join (`add_request`) and
leave (finish / `abort`) between steps, which is continuous batching in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from specserve.drafters import build_drafter, check_sources
from specserve.drafters.base import DraftRequest, Drafter
from specserve.engine.acceptance import LossyConfig
from specserve.engine.block_manager import BlockManager
from specserve.engine.config import EngineConfig, SamplingParams
from specserve.engine.draft_budget import RecentAcceptance, StepCost, acceptance_by_depth, draft_budgets
from specserve.engine.draft_tree import DraftTree
from specserve.engine.logprobs import TokenLogprob
from specserve.engine.loader import load_checkpoint, load_config
from specserve.engine.model import LlamaModel
from specserve.engine.model_runner import ModelRunner
from specserve.engine.quant import apply_weight_dtype
from specserve.engine.sampler import Sampler, request_generator
from specserve.engine.scheduler import Scheduler
from specserve.engine.smoothing import calibration_text
from specserve.engine.step_outcome import step_tokens
from specserve.engine.sequence import FinishReason, Sequence, check_logit_bias, check_prompt
from specserve.engine.text_output import TextOutput, append_tokens
from specserve.engine.tokenizer import Tokenizer
from specserve.engine.verify import SpecStats
from specserve.errors import InvalidRequestError


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: int
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    spec: SpecStats | None = None  # the request's speculation counters, on its last output
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asks for them


@dataclass
class Completion:
    """A finished request, as `generate` returns it."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    seconds: float
    spec: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


@dataclass
class _Request:
    seq: Sequence
    text: TextOutput
    generator: torch.Generator | None
    on_output: Callable[[RequestOutput], None] | None
    start_time: float = field(default_factory=time.perf_counter)
    spec: SpecStats = field(default_factory=SpecStats)
    lossy: LossyConfig | None = None  # relaxed acceptance, or None = lossless
    lossy_budget_left: float = 0.0
    recent: RecentAcceptance = field(default_factory=RecentAcceptance)  # what prices its drafts

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids


def load_tokenizer(model_path: str) -> Tokenizer:
    """The tokenizer that ships with a checkpoint: GGUF metadata or a HF directory's tokenizer.json."""
    return Tokenizer.from_gguf(model_path) if str(model_path).endswith(".gguf") else Tokenizer.from_hf_dir(model_path)


def build_model(model_path: str, dtype: str) -> LlamaModel:
    """Load a checkpoint into our Llama and apply the weight precision (a module swap)."""
    model_config, state_dict = load_checkpoint(model_path)
    model = LlamaModel(model_config)
    model.load_hf_state_dict(state_dict)
    # int8 first folds SmoothQuant scales measured on a short bundled text (engine/smoothing.py).
    calibration_ids = load_tokenizer(model_path).encode(calibration_text()) if dtype == "int8" else None
    return apply_weight_dtype(model.eval(), dtype, calibration_ids=calibration_ids)


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LlamaModel, tokenizer: Tokenizer,
                 drafter: Drafter | None = None) -> None:
        """`drafter`: a draft source built elsewhere (a test's, a custom one); default: the one
        `config.spec.method` names (config.spec still sets the budgets)."""
        self.config = config
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        cache = config.cache
        self.block_manager = BlockManager(cache.num_blocks, cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler()
        self.drafter = drafter if drafter is not None else build_drafter(config.spec, model, tokenizer)
        self.runner = ModelRunner(model, cache, batch_invariant=config.batch_invariant,
                                  attention_backend=config.attention_backend,
                                  keep_hidden=self.drafter is not None and self.drafter.needs_hidden)
        # A request may use the whole context, but never more slots than the cache has.
        self.max_total_tokens = min(model.config.max_position_embeddings, cache.num_blocks * cache.block_size)
        self.requests: dict[int, _Request] = {}
        self.spec_stats = SpecStats()  # summed over finished requests
        self.draft_seconds = 0.0  # time in drafter.propose
        self.forward_seconds = 0.0  # time in target forwards (verification included)
        self.step_cost = StepCost()  # decode/verify forwards' time by shape, for the "cost" budget

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        check_sources(config.spec, load_config(config.model_path))  # a bad drafter setting fails before the load
        return cls(config, build_model(config.model_path, config.dtype), load_tokenizer(config.model_path))

    # ---- requests -------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        if chat:
            return self.tokenizer.render_prompt_ids([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> int:
        """Queue a request; it joins the running batch at the next step. Returns its id."""
        check_prompt(prompt_token_ids, self.max_total_tokens, self.model_config.vocab_size)
        check_logit_bias(params, self.model_config.vocab_size)
        seq = Sequence(prompt_token_ids, params, self.max_total_tokens)
        request = _Request(seq, TextOutput(self.tokenizer, params.stop), request_generator(params), on_output)
        if self.config.spec.lossy is not None:
            request.lossy = self.config.spec.lossy
            request.lossy_budget_left = self.config.spec.lossy.budget
        self.requests[seq.seq_id] = request
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, request_id: int) -> None:
        """Cancel a request now: its KV blocks are freed before the next step."""
        request = self.requests.get(request_id)
        if request is not None:
            request.seq.finish(FinishReason.ABORT)
            self._finish(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Propose, schedule, verify, accept, stream: one target forward over every scheduled sequence."""
        trees = self._propose()
        plan = self.scheduler.schedule({seq_id: tree.num_nodes for seq_id, tree in trees.items()})
        if not plan.scheduled:
            return []
        step_trees = [trees[s.seq.seq_id] if s.num_draft_tokens else None for s in plan.scheduled]
        start = time.perf_counter()
        logits = self.runner.execute(plan.scheduled, step_trees)
        seconds = time.perf_counter() - start
        self.forward_seconds += seconds
        if self.drafter is not None and all(s.num_new_tokens == 1 and s.samples for s in plan.scheduled):
            # Decode/verify steps only: prefill chunks are compute-bound, another regime than the rows priced.
            self.step_cost.observe(len(plan.scheduled), sum(s.num_query_tokens for s in plan.scheduled), seconds)
        emitted = step_tokens(plan.scheduled, step_trees, logits, self.requests, self.runner, self.sampler)
        for s in plan.scheduled:
            if s.seq.seq_id not in emitted:  # a prefill chunk; the others commit once their tokens are in
                self.block_manager.commit(s.seq)
        return [self._emit(self.requests[seq_id], out.token_ids, out.tree, out.logprobs)
                for seq_id, out in emitted.items()]

    def _propose(self) -> dict[int, DraftTree]:
        """Draft trees for the sequences about to decode; none at all when the budget is 0 (no drafter call)."""
        if self.drafter is None:
            return {}
        decoding = [seq for seq in self.scheduler.running if seq.num_uncomputed_tokens == 1]
        budgets = self._budgets(decoding)
        requests = []
        for seq in decoding:
            room = budgets.get(seq.seq_id, 0)
            if room > 0:
                hidden = None
                if self.drafter.needs_hidden:
                    hidden = self.runner.hidden_states(seq.block_table, seq.num_computed_tokens)
                requests.append(DraftRequest(seq.seq_id, seq.all_token_ids, seq.num_prompt_tokens, room, hidden,
                                             seq.params))
        if not requests:
            return {}
        start = time.perf_counter()
        trees = self.drafter.propose(requests)
        seconds = time.perf_counter() - start
        self.draft_seconds += seconds
        self.step_cost.observe_draft(seconds)
        return {r.seq_id: tree for r, tree in zip(requests, trees) if tree.num_nodes}

    def _budgets(self, decoding: list[Sequence]) -> dict[int, int]:
        """Nodes each decoding sequence may draft this step (`SpecConfig.speculation_budget`), within the
        static budget and the room left: nodes in the context, accepted + 1 tokens within max_tokens."""
        spec = self.config.spec
        budget = spec.budget_per_sequence(len(decoding))
        rooms = {seq.seq_id: min(budget, seq.max_total_tokens - seq.num_tokens,
                                 seq.params.max_tokens - len(seq.output_token_ids) - 1) for seq in decoding}
        # Seeded sampling keeps the static budget: which drafts a step verifies decides which random draws
        # its acceptance makes, so a budget that follows measured timings would make the output vary.
        priced = [seq for seq in decoding if seq.params.seed is None or seq.params.temperature == 0]
        if spec.speculation_budget == "static" or not priced:
            return rooms
        row_ratio, draft_ratio = self.step_cost.ratios(len(decoding), len(decoding))
        acceptance = {seq.seq_id: acceptance_by_depth(self.requests[seq.seq_id].recent, self.spec_stats,
                                                      max(0, rooms[seq.seq_id])) for seq in priced}
        return rooms | draft_budgets(acceptance, float(len(decoding)), row_ratio, spec.max_draft_tokens_per_step,
                                     draft_ratio)

    def _emit(self, request: _Request, token_ids: list[int], tree: DraftTree | None,
              logprobs: list[TokenLogprob] | None) -> RequestOutput:
        """Append a step's tokens one by one, stopping at the first that finishes the request; stream them."""
        seq = request.seq
        appended = append_tokens(seq, request.text, token_ids, self.tokenizer.eos_token_ids)
        request.spec.record(tree, len(token_ids) - 1, len(appended))
        request.recent.record(tree, len(token_ids) - 1)
        # Hash the blocks the accepted tokens filled (their token ids are in the sequence only now). A stop
        # may cut the step's tokens short of the K/V computed for them.
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
        self.block_manager.commit(seq)
        output = RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=appended,
            text_delta=request.text.take_delta(final=seq.is_finished),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            spec=request.spec if seq.is_finished else None,
            logprobs=None if logprobs is None else logprobs[: len(appended)],
        )
        if seq.is_finished:
            self._finish(request)
        if request.on_output is not None:
            request.on_output(output)
        return output

    def _finish(self, request: _Request) -> None:
        self.scheduler.finish(request.seq)
        if self.requests.pop(request.seq.seq_id, None) is not None:
            self.spec_stats.add(request.spec)
        if self.drafter is not None:
            self.drafter.release(request.seq.seq_id)

    # ---- conveniences ---------------------------------------------------------------------------

    def stream(self, prompt_token_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Run one request to completion (alongside any others queued), yielding its deltas."""
        outputs: list[RequestOutput] = []
        request_id = self.add_request(prompt_token_ids, params, outputs.append)
        try:
            while True:
                self.step()
                yield from outputs
                if outputs and outputs[-1].finished:
                    return
                outputs.clear()
        finally:
            self.abort(request_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run many requests concurrently (continuous batching) and return them in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        assert len(params_list) == len(prompts)
        collected: dict[int, list[RequestOutput]] = {}
        ids = [self.add_request(p, sp, lambda o: collected.setdefault(o.request_id, []).append(o))
               for p, sp in zip(prompts, params_list)]
        start = time.perf_counter()
        while self.has_unfinished():
            self.step()
        seconds = time.perf_counter() - start
        completions = []
        for request_id, prompt, request_params in zip(ids, prompts, params_list):
            outs = collected[request_id]
            completions.append(Completion(
                request_id=request_id,
                prompt_token_ids=prompt,
                token_ids=[t for o in outs for t in o.new_token_ids],
                text="".join(o.text_delta for o in outs),
                finish_reason=outs[-1].finish_reason or "",
                seconds=seconds,
                spec=outs[-1].spec or SpecStats(),
                logprobs=None if request_params.logprobs is None else [lp for o in outs for lp in o.logprobs],
            ))
        return completions
