"""Scheduler: token budget, admission, chunked prefill, preemption under block pressure."""

from specserve.engine.block_manager import BlockManager
from specserve.engine.config import SamplingParams, SchedulerConfig
from specserve.engine.scheduler import Scheduler, SchedulerOutput
from specserve.engine.sequence import Sequence, SequenceStatus


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens),
                     BlockManager(num_blocks, block_size))


def make_seq(n: int, first: int = 0) -> Sequence:
    return Sequence(list(range(first, first + n)), SamplingParams(max_tokens=64), max_total_tokens=4096)


def run_step(sched: Scheduler, out: SchedulerOutput, sampled_token: int = 7) -> None:
    """Apply a step's effect as the engine would: KV computed, one token sampled where due."""
    for s in out.scheduled:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_new_tokens
        sched.block_manager.commit(s.seq)
        if samples:
            s.seq.append_token(sampled_token)


def test_prefill_is_chunked_by_token_budget():
    sched = make_scheduler(max_tokens=5)
    seq = make_seq(12)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append([(s.num_new_tokens, s.samples) for s in out.scheduled])
        run_step(sched, out)
    assert chunks == [[(5, False)], [(5, False)], [(2, True)]]


def test_decodes_go_first_then_new_prompts_fill_the_budget():
    sched = make_scheduler(max_tokens=6)
    a = make_seq(3)
    sched.add(a)
    run_step(sched, sched.schedule())
    b = make_seq(10, first=100)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 5)]


def test_max_num_seqs_caps_admission():
    sched = make_scheduler(max_num_seqs=2, max_tokens=64)
    seqs = [make_seq(3, first=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING


def test_youngest_is_preempted_when_blocks_run_out():
    sched = make_scheduler(num_blocks=3, block_size=4, max_tokens=64)
    a, b = make_seq(4), make_seq(4, first=50)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # a and b each hold 1 block; each has 5 tokens now
    run_step(sched, sched.schedule())  # a grows into a 2nd block, b would need a 4th: b is preempted
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b]
    assert a.status is SequenceStatus.RUNNING


def test_preempted_sequence_resumes_with_its_output():
    sched = make_scheduler(num_blocks=3, block_size=4, max_tokens=64)
    a, b = make_seq(4), make_seq(4, first=50)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    run_step(sched, sched.schedule())
    sched.finish(a)
    out = sched.schedule()
    assert b.num_tokens == 5  # prompt + the token sampled before preemption
    # Its full first block was hashed before preemption, so only the rest is recomputed.
    assert b.num_cached_tokens == 4
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(b, 1)]


def test_finish_frees_blocks():
    sched = make_scheduler()
    seq = make_seq(9)
    sched.add(seq)
    run_step(sched, sched.schedule())
    sched.finish(seq)
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished()
