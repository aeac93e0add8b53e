"""Drive the Scheduler directly with a tiny paged "model": a deterministic next-token function that
reads its context back from a simulated KV pool through the chunks' block tables and positions."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import CacheConfig, EngineConfigError, SchedulerConfig
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import AdmissionError, Scheduler, SchedulerOutput

VOCAB = 40
EOS = 0


def next_token(context: list[int]) -> int:
    """The model stand-in: any deterministic function of the whole context."""
    return (sum((i + 3) * t for i, t in enumerate(context[-6:])) * 7 + len(context)) % VOCAB


def reference_output(prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """What an unbatched, unpreempted run produces (stop rules written out independently)."""
    tokens, output = list(prompt), []
    while True:
        token = next_token(tokens)
        tokens.append(token)
        output.append(token)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
        if (len(output) > params.min_tokens and token in stops) or len(output) >= params.max_tokens \
                or len(tokens) >= max_model_len:
            return output


@dataclass
class FakeRunner:
    """Writes each fed token into its slot and samples from the context read back through the
    block table, so wrong positions, block tables or a block shared by two requests show up."""

    block_size: int
    num_blocks: int
    drafts_correct: float = 0.0  # chance that a proposed draft token is the model's choice
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __post_init__(self) -> None:
        self.slots: list[tuple[str, int, int] | None] = [None] * (self.block_size * self.num_blocks)

    def _slot(self, block_table: tuple[int, ...], position: int) -> int:
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _context(self, request_id: str, block_table: tuple[int, ...], length: int) -> list[int]:
        context = []
        for position in range(length):
            entry = self.slots[self._slot(block_table, position)]
            assert entry is not None and entry[:2] == (request_id, position), (request_id, position, entry)
            context.append(entry[2])
        return context

    def run(self, output: SchedulerOutput) -> dict[str, list[int]]:
        sampled: dict[str, list[int]] = {}
        for chunk in output.chunks:
            request_id = chunk.request.request_id
            for offset, token_id in enumerate(chunk.token_ids):
                position = chunk.start_position + offset
                self.slots[self._slot(chunk.block_table, position)] = (request_id, position, token_id)
            if chunk.sample:
                sampled[request_id] = self._verify(chunk.request.request_id, chunk.block_table,
                                                   chunk.context_len, chunk.num_draft_tokens)
        return sampled

    def _verify(self, request_id: str, block_table: tuple[int, ...], context_len: int,
                num_drafts: int) -> list[int]:
        # Greedy verification: accept drafts while they equal the model's token, then one more.
        context = self._context(request_id, block_table, context_len)
        real_len = context_len - num_drafts
        accepted = []
        for i in range(num_drafts + 1):
            token = next_token(context[:real_len + i])
            accepted.append(token)
            if i == num_drafts or context[real_len + i] != token:
                return accepted
        raise AssertionError("unreachable")

    def propose(self, request: Request, k: int) -> list[int]:
        context, drafts = request.all_token_ids, []
        for _ in range(k):
            token = next_token(context) if self.rng.random() < self.drafts_correct else VOCAB + 1
            drafts.append(token)
            context = [*context, token]
        return drafts


def make_scheduler(num_blocks: int = 16, block_size: int = 4, num_speculative_tokens: int = 0,
                   **config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size),  # type: ignore[arg-type]
                     num_speculative_tokens)


def make_request(request_id: str, prompt_len: int, variant: int = 0, **params: object) -> Request:
    prompt = [(variant * 13 + i * 5) % (VOCAB - 1) + 1 for i in range(prompt_len)]  # no eos in prompts
    return Request(request_id, prompt, SamplingParams(**params), eos_token_ids=(EOS,))


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.on_step_done(output, runner.run(output))
    return output


def test_config_validation_names_the_field() -> None:
    with pytest.raises(EngineConfigError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)
    with pytest.raises(EngineConfigError, match="num_blocks"):
        CacheConfig(num_blocks=0)


def test_chunked_prefill_positions_are_continuous_and_only_the_last_chunk_samples() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_model_len=64)
    runner = FakeRunner(4, 16)
    request = make_request("a", 10, max_tokens=3, ignore_eos=True)
    scheduler.add(request)
    seen = [(c.start_position, len(c.token_ids), c.sample) for c in step(scheduler, runner).chunks]
    for _ in range(4):
        seen += [(c.start_position, len(c.token_ids), c.sample) for c in step(scheduler, runner).chunks]
    assert seen == [(0, 4, False), (4, 4, False), (8, 2, True), (10, 1, True), (11, 1, True)]
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == reference_output(list(request.prompt_token_ids),
                                                        request.sampling_params, 64)


def test_decodes_go_first_and_prefill_takes_the_remaining_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=6, max_model_len=64)
    runner = FakeRunner(4, 16)
    decoding = make_request("decoding", 3, variant=1, max_tokens=8, ignore_eos=True)
    scheduler.add(decoding)
    step(scheduler, runner)
    long_prompt = make_request("long", 20, variant=2, max_tokens=2, ignore_eos=True)
    scheduler.add(long_prompt)
    for _ in range(3):
        output = step(scheduler, runner)
        assert [c.request.request_id for c in output.chunks] == ["decoding", "long"]
        assert [len(c.token_ids) for c in output.chunks] == [1, 5]
        assert output.num_batched_tokens == 6


def test_long_prefill_threshold_lets_prompts_share_a_step() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8, max_model_len=64, long_prefill_token_threshold=4)
    for i in range(2):
        scheduler.add(make_request(f"r{i}", 10, variant=i))
    output = scheduler.schedule()
    assert [(c.request.request_id, len(c.token_ids)) for c in output.chunks] == [("r0", 4), ("r1", 4)]


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_it_fits() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8, max_model_len=8, enable_chunked_prefill=False)
    runner = FakeRunner(4, 16)
    scheduler.add(make_request("short", 2, variant=1, max_tokens=3, ignore_eos=True))
    scheduler.add(make_request("shorter", 2, variant=2, max_tokens=2, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add(make_request("whole", 7, variant=3, max_tokens=1))
    output = step(scheduler, runner)  # two decodes leave 6 tokens of budget: "whole" (7) waits
    assert [c.request.request_id for c in output.chunks] == ["short", "shorter"]
    output = step(scheduler, runner)  # "shorter" finished last step; 7 tokens left
    assert [c.request.request_id for c in output.chunks] == ["short", "whole"]
    assert [len(c.token_ids) for c in output.chunks] == [1, 7]


def test_max_num_seqs_caps_the_running_batch() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_model_len=64)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", 2, variant=i))
    output = scheduler.schedule()
    assert [c.request.request_id for c in output.chunks] == ["r0", "r1"]
    assert len(scheduler.waiting) == 1


def test_a_request_that_cannot_grow_preempts_the_newest_and_it_recomputes_identically() -> None:
    scheduler = make_scheduler(num_blocks=2, block_size=4, max_model_len=64)
    runner = FakeRunner(4, 2)
    old = make_request("old", 4, variant=1, max_tokens=4, ignore_eos=True)
    new = make_request("new", 4, variant=2, max_tokens=4, ignore_eos=True)
    scheduler.add(old)
    scheduler.add(new)
    step(scheduler, runner)  # both prompts fill one block each, both sampled a first token
    output = step(scheduler, runner)  # "old" needs a second block: none free
    assert output.preempted_request_ids == ("new",)
    assert [c.request.request_id for c in output.chunks] == ["old"]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert len(new.output_token_ids) == 1 and scheduler.waiting[0] is new
    while old.status is RequestStatus.RUNNING:
        step(scheduler, runner)
    readmitted = step(scheduler, runner).chunks[0]
    assert (readmitted.request, readmitted.start_position, readmitted.token_ids) == \
        (new, 0, tuple(new.all_token_ids[:5]))
    while scheduler.num_unfinished:
        step(scheduler, runner)
    for request in (old, new):
        assert request.output_token_ids == reference_output(list(request.prompt_token_ids),
                                                            request.sampling_params, 64)
    assert scheduler.block_manager.num_free_blocks == 2


def test_the_newest_request_preempts_itself_when_it_is_the_only_candidate() -> None:
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_model_len=64)
    runner = FakeRunner(4, 3)
    first = make_request("first", 4, variant=1, max_tokens=6, ignore_eos=True)
    second = make_request("second", 4, variant=2, max_tokens=6, ignore_eos=True)
    scheduler.add(first)
    scheduler.add(second)
    step(scheduler, runner)
    output = step(scheduler, runner)  # "first" takes the last block; "second" has nobody newer
    assert output.preempted_request_ids == ("second",)
    assert [c.request.request_id for c in output.chunks] == ["first"]


@pytest.mark.parametrize(("prompt_len", "max_tokens", "match"), [
    (16, 1, "max_model_len"),  # no room for output
    (9, 4, "KV blocks"),  # 13 tokens need 4 blocks of a 3-block pool
])
def test_requests_that_can_never_fit_are_rejected(prompt_len: int, max_tokens: int, match: str) -> None:
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_model_len=16)
    request = make_request("big", prompt_len, max_tokens=max_tokens)
    with pytest.raises(AdmissionError, match=match):
        scheduler.add(request)
    assert request.status is RequestStatus.FINISHED_ERROR and match in (request.error or "")
    assert scheduler.num_unfinished == 0 and not scheduler.schedule().chunks


def test_duplicate_ids_are_refused() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 2, variant=1))
    with pytest.raises(ValueError, match="in use"):
        scheduler.add(make_request("a", 2, variant=2))
    scheduler.add(make_request("b", 2, variant=1))  # the same prompt under another id is another request


def test_abort_of_waiting_and_running_requests_frees_blocks_and_is_reported() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=8, max_model_len=64)
    runner = FakeRunner(4, 8)
    running = make_request("running", 12, variant=1, max_tokens=5)
    waiting = make_request("waiting", 12, variant=2, max_tokens=5)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler, runner)  # "running" holds 2 blocks (8 of 12 prompt tokens), "waiting" none
    assert scheduler.block_manager.num_free_blocks == 6 and scheduler.waiting[0] is waiting
    assert scheduler.abort("running") and scheduler.abort("waiting")
    assert not scheduler.abort("running") and not scheduler.abort("unknown")
    assert scheduler.block_manager.num_free_blocks == 8
    assert running.status is waiting.status is RequestStatus.FINISHED_ABORTED
    output = scheduler.schedule()
    assert output.chunks == () and set(output.finished_request_ids) == {"running", "waiting"}
    assert scheduler.schedule().finished_request_ids == ()


def test_abort_between_schedule_and_step_done_skips_the_request() -> None:
    scheduler = make_scheduler(max_model_len=64)
    runner = FakeRunner(4, 16)
    request = make_request("a", 3)
    scheduler.add(request)
    output = scheduler.schedule()
    sampled = runner.run(output)
    scheduler.abort("a")
    assert scheduler.on_step_done(output, sampled) == []
    assert request.output_token_ids == [] and scheduler.block_manager.num_free_blocks == 16


def test_finish_request_from_outside_for_stop_strings() -> None:
    scheduler = make_scheduler(max_model_len=64)
    runner = FakeRunner(4, 16)
    request = make_request("a", 3, max_tokens=10, ignore_eos=True)
    scheduler.add(request)
    step(scheduler, runner)
    assert scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert request.finish_reason == "stop" and scheduler.block_manager.num_free_blocks == 16


def test_drafts_are_fed_after_the_last_token_and_accepted_ones_count_as_computed() -> None:
    scheduler = make_scheduler(max_model_len=64, num_speculative_tokens=3)
    runner = FakeRunner(4, 16, drafts_correct=1.0)
    request = make_request("a", 5, max_tokens=20, ignore_eos=True)
    scheduler.add(request)
    step(scheduler, runner)
    request.set_draft_tokens(runner.propose(request, 3))
    output = scheduler.schedule()
    (chunk,) = output.chunks
    assert chunk.num_draft_tokens == 3 and chunk.start_position == 5
    assert chunk.token_ids == (request.output_token_ids[-1], *request.draft_token_ids)
    (update,) = scheduler.on_step_done(output, runner.run(output))
    assert update.num_accepted_draft_tokens == 3 and len(update.new_token_ids) == 4
    assert request.num_computed_tokens == 9 and request.num_tokens == 10
    assert request.output_token_ids == reference_output(list(request.prompt_token_ids),
                                                        request.sampling_params, 64)[:5]


def test_sampled_tokens_that_contradict_the_drafts_are_refused() -> None:
    scheduler = make_scheduler(max_model_len=64, num_speculative_tokens=2)
    runner = FakeRunner(4, 16)
    request = make_request("a", 5, max_tokens=20, ignore_eos=True)
    scheduler.add(request)
    step(scheduler, runner)
    request.set_draft_tokens([7, 8])
    output = scheduler.schedule()
    assert output.chunks[0].num_draft_tokens == 2
    with pytest.raises(ValueError, match="prefix of the drafts"):
        scheduler.on_step_done(output, {"a": [9, 3]})
    with pytest.raises(ValueError, match="expected 1..3"):
        scheduler.on_step_done(output, {"a": [7, 8, 1, 2]})


@dataclass(frozen=True)
class Workload:
    num_blocks: int
    budget: int
    max_num_seqs: int
    threshold: int
    num_spec: int
    drafts_correct: float
    # (prompt_len, max_tokens, min_tokens, arrival step, abort step or None)
    requests: list[tuple[int, int, int, int, int | None]]


workloads = st.builds(
    Workload,
    num_blocks=st.integers(3, 8),
    budget=st.integers(4, 24),
    max_num_seqs=st.integers(1, 4),
    threshold=st.sampled_from([0, 3]),
    num_spec=st.integers(0, 3),
    drafts_correct=st.sampled_from([0.0, 0.7, 1.0]),
    requests=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 10), st.integers(0, 2),
                                st.integers(0, 6), st.none() | st.integers(0, 12)), min_size=1, max_size=6),
)


@settings(max_examples=80, deadline=None)
@given(workloads)
def test_random_workloads_finish_correctly_and_return_every_block(work: Workload) -> None:
    block_size, max_model_len = 4, 24
    config = SchedulerConfig(max_num_batched_tokens=work.budget, max_num_seqs=work.max_num_seqs,
                             max_model_len=max_model_len, long_prefill_token_threshold=work.threshold)
    scheduler = Scheduler(config, BlockManager(work.num_blocks, block_size), work.num_spec)
    runner = FakeRunner(block_size, work.num_blocks, work.drafts_correct)
    requests: dict[str, Request] = {}
    computed: dict[str, int] = {}  # expected num_computed_tokens, tracked from the outputs alone
    for step_index in range(400):
        for i, (prompt_len, max_tokens, min_tokens, arrival, abort_at) in enumerate(work.requests):
            request_id = f"r{i}"
            if arrival == step_index:
                request = make_request(request_id, prompt_len, variant=i, max_tokens=max_tokens,
                                       min_tokens=min(min_tokens, max_tokens))
                fits = (prompt_len < max_model_len and -(-min(prompt_len + max_tokens, max_model_len)
                                                       // block_size) <= work.num_blocks)
                requests[request_id] = request
                computed[request_id] = 0
                if fits:
                    scheduler.add(request)
                else:
                    with pytest.raises(AdmissionError):
                        scheduler.add(request)
            if abort_at == step_index and request_id in requests:
                scheduler.abort(request_id)
        output = scheduler.schedule()
        _check_step(output, config, scheduler.num_speculative_tokens, computed)
        for update in scheduler.on_step_done(output, runner.run(output)):
            computed[update.request.request_id] = update.request.num_computed_tokens
        for chunk in output.chunks:
            if not chunk.sample:
                computed[chunk.request.request_id] += len(chunk.token_ids)
        for request in scheduler.running:
            if request.num_uncomputed_tokens == 1 and work.num_spec:
                request.set_draft_tokens(runner.propose(request, work.num_spec))
        if step_index > 6 and scheduler.num_unfinished == 0:
            break
    assert scheduler.num_unfinished == 0, "workload did not drain"
    assert scheduler.block_manager.num_free_blocks == work.num_blocks
    for request in requests.values():
        assert request.is_finished
        if request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            assert request.output_token_ids == reference_output(
                list(request.prompt_token_ids), request.sampling_params, max_model_len)


def _check_step(output: SchedulerOutput, config: SchedulerConfig, num_speculative_tokens: int,
                computed: dict[str, int]) -> None:
    for request_id in output.preempted_request_ids:
        computed[request_id] = 0
    assert output.num_batched_tokens == sum(len(c.token_ids) for c in output.chunks)
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    assert len(output.chunks) <= config.max_num_seqs
    assert len({c.request.request_id for c in output.chunks}) == len(output.chunks)
    for chunk in output.chunks:
        assert chunk.start_position == computed[chunk.request.request_id]  # continuous positions
        assert chunk.num_draft_tokens <= num_speculative_tokens
        assert chunk.sample == (chunk.context_len - chunk.num_draft_tokens == chunk.request.num_tokens)
