"""The SysV output queue: codec round trips, backpressure, garbage, dead readers, key hygiene.

Every queue test runs against a real SysV queue and checks that the queue is gone afterwards.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import sysv_ipc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.engine.output_codec import (
    HEADER,
    MAGIC,
    SLOT_HEADER,
    WIRE_VERSION,
    OutputPart,
    OutputQueueError,
    SlotEvent,
    SlotOutput,
    StepAssembler,
    StepOutput,
    decode_part,
    decode_step,
    encode_step,
)
from pdserve.engine.output_queue import (
    OutputQueueAddress,
    OutputQueueConfig,
    OutputQueueReader,
    OutputQueueWriter,
    ReaderGoneError,
    pid_alive,
)

KERNEL_MSGMAX = 8192
KERNEL_MSGMNB = 16384
TOKEN_EVENTS = (SlotEvent.TOKENS, SlotEvent.FINISHED_STOPPED, SlotEvent.FINISHED_LENGTH)
MARKER_EVENTS = (SlotEvent.PREEMPTED, SlotEvent.ABORTED, SlotEvent.ERROR)


# ---------------------------------------------------------------- builders and comparisons


def make_slot(rng: np.random.Generator, seq_id: int, event: SlotEvent, n: int, k: int) -> SlotOutput:
    if event in MARKER_EVENTS:
        return SlotOutput.marker(seq_id, event)
    logprobs = -rng.exponential(2.0, size=n).astype(np.float32)
    topk_logprobs = -rng.exponential(2.0, size=(n, k)).astype(np.float32)
    if n and k:
        topk_logprobs[-1, -1] = -np.inf  # masked candidates are real values on the wire
    return SlotOutput(
        seq_id=seq_id,
        event=event,
        token_ids=rng.integers(0, 2**32, size=n, dtype=np.uint32),
        logprobs=logprobs,
        ranks=rng.integers(1, 200_000, size=n),
        topk_ids=rng.integers(0, 2**32, size=(n, k), dtype=np.uint32),
        topk_logprobs=topk_logprobs,
        num_accepted_drafts=int(rng.integers(0, n + 1)),
    )


def uniform_step(step: int, num_slots: int, n: int, k: int, seed: int = 0) -> StepOutput:
    rng = np.random.default_rng(seed)
    slots = [make_slot(rng, 1000 + i, SlotEvent.TOKENS, n, k) for i in range(num_slots)]
    return StepOutput(step, False, slots)


def up_to(rng: np.random.Generator, low: int, high: int) -> int:
    return high if rng.random() < 0.5 else int(rng.integers(low, high + 1))


@st.composite
def step_outputs(draw: st.DrawFn, min_slots: int = 0, wide: bool = False) -> StepOutput:
    """Random steps of up to 64 slots; `wide` ones use up to 6 tokens x top-20 and need several messages."""
    # Hypothesis draws the sizes' bounds; a seeded generator fills the slots uniformly inside them
    # (hypothesis alone keeps per-slot sizes near their minimum, so batches would never split).
    num_slots = draw(st.integers(min_slots, 64))
    max_tokens, max_k = (6, 20) if wide else (draw(st.integers(1, 6)), draw(st.integers(0, 20)))
    events = list(SlotEvent)
    event_p = [0.5 if event is SlotEvent.TOKENS else 0.1 for event in events]  # running slots dominate
    seq_ids = draw(st.lists(st.integers(0, 2**32 - 1), min_size=num_slots, max_size=num_slots,
                            unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Half the slots use the bounds themselves, so full-width speculative steps are common.
    slots = [make_slot(rng, seq_id, rng.choice(events, p=event_p), up_to(rng, 1, max_tokens),
                       up_to(rng, 0, max_k))
             for seq_id in seq_ids]
    return StepOutput(draw(st.integers(0, 2**64 - 1)), draw(st.booleans()), slots)


def assert_same_slot(got: SlotOutput, want: SlotOutput) -> None:
    assert (got.seq_id, got.event) == (want.seq_id, want.event)
    assert got.num_accepted_drafts == want.num_accepted_drafts
    for name in ("token_ids", "logprobs", "ranks", "topk_ids", "topk_logprobs"):
        got_array, want_array = getattr(got, name), getattr(want, name)
        assert got_array.shape == want_array.shape, name
        assert got_array.dtype == want_array.dtype, name
        assert got_array.tobytes() == want_array.tobytes(), name  # bitwise: -inf and NaN included


def assert_same_step(got: StepOutput | None, want: StepOutput) -> None:
    assert got is not None
    assert (got.step, got.is_draft, len(got.slots)) == (want.step, want.is_draft, len(want.slots))
    for got_slot, want_slot in zip(got.slots, want.slots, strict=True):
        assert_same_slot(got_slot, want_slot)


def queue_exists(key: int) -> bool:
    try:
        sysv_ipc.MessageQueue(key)
    except sysv_ipc.ExistentialError:
        return False
    return True


@pytest.fixture
def reader() -> Iterator[OutputQueueReader]:
    queue_reader = OutputQueueReader()
    yield queue_reader
    queue_reader.close()
    assert not queue_exists(queue_reader.address.key)


def send_in_thread(writer: OutputQueueWriter,
                   steps: list[StepOutput]) -> tuple[threading.Thread, list[object]]:
    """Start a thread sending `steps`; the list collects per-step completion times, or the raised error."""
    events: list[object] = []

    def run() -> None:
        try:
            for step_output in steps:
                writer.send(step_output)
                events.append(time.monotonic())
        except OutputQueueError as err:
            events.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, events


# ---------------------------------------------------------------- codec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_outputs() | step_outputs(min_slots=48, wide=True))  # the second mostly needs several messages
def test_codec_round_trips_random_batches_within_the_message_limit(step_output: StepOutput) -> None:
    messages = encode_step(step_output)
    assert all(len(message) <= KERNEL_MSGMAX for message in messages)
    parts = [decode_part(message) for message in messages]
    assert [part.part_index for part in parts] == list(range(len(messages)))
    assert all(part.part_count == len(messages) for part in parts)
    assert_same_step(decode_step(messages), step_output)


def test_six_tokens_with_top20_fit_one_message_and_slots_never_split() -> None:
    slot_bytes = SLOT_HEADER.size + 6 * (4 + 4 + 4 + 20 * (4 + 4))  # 8 + 1032
    assert len(encode_step(uniform_step(0, 1, n=6, k=20))) == 1
    # Independent count: whole slots per message, then messages per step.
    slots_per_message = (KERNEL_MSGMAX - HEADER.size) // slot_bytes
    messages = encode_step(uniform_step(0, 256, n=6, k=20))
    assert len(messages) == -(-256 // slots_per_message)
    assert [len(decode_part(m).slots) for m in messages[:-1]] == [slots_per_message] * (len(messages) - 1)


def test_a_slot_larger_than_a_message_is_rejected() -> None:
    with pytest.raises(OutputQueueError, match="one slot needs"):
        encode_step(uniform_step(0, 1, n=6, k=20), max_message_bytes=512)


def test_records_reject_inconsistent_fields() -> None:
    one = np.zeros(1, dtype=np.uint32)
    with pytest.raises(OutputQueueError, match="cannot carry 0 tokens"):
        SlotOutput(1, SlotEvent.TOKENS, [], [], [], [], [])
    with pytest.raises(OutputQueueError, match="cannot carry 1 tokens"):
        SlotOutput(1, SlotEvent.PREEMPTED, one, [0.0], one, [], [])
    with pytest.raises(OutputQueueError, match="token_ids"):
        SlotOutput(1, SlotEvent.TOKENS, [-3], [0.0], [1], [], [])
    with pytest.raises(OutputQueueError, match="topk_logprobs has shape"):
        SlotOutput(1, SlotEvent.TOKENS, [3], [0.0], [1], [[1, 2]], [[0.0]])
    with pytest.raises(OutputQueueError, match="top_k 21"):
        SlotOutput(1, SlotEvent.TOKENS, [3], [0.0], [1], np.ones((1, 21)), np.ones((1, 21)))
    with pytest.raises(OutputQueueError, match="num_accepted_drafts"):
        SlotOutput(1, SlotEvent.TOKENS, [3], [0.0], [1], [], [], num_accepted_drafts=2)
    with pytest.raises(OutputQueueError, match="unknown slot event"):
        SlotOutput(1, 9, [3], [0.0], [1], [], [])  # type: ignore[arg-type]
    with pytest.raises(OutputQueueError, match="twice"):
        StepOutput(1, False, [SlotOutput.marker(5, SlotEvent.ABORTED)] * 2)


# ---------------------------------------------------------------- garbage on the wire


def valid_message() -> bytes:
    rng = np.random.default_rng(3)
    slots = [make_slot(rng, 1, SlotEvent.TOKENS, 3, 4), SlotOutput.marker(2, SlotEvent.PREEMPTED)]
    (message,) = encode_step(StepOutput(9, False, slots))
    return message


def patched(message: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    data = bytearray(message)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


SLOT0 = HEADER.size  # byte offset of the first slot in valid_message()


@pytest.mark.parametrize(("offset", "fmt", "value", "match"), [
    (0, "<4s", b"XXXX", "bad magic"),
    (4, "<B", WIRE_VERSION + 1, "unsupported wire version"),
    (5, "<B", 0x80, "unknown flag"),
    (6, "<H", 1, "part 1 of 1"),
    (8, "<H", 0, "part 0 of 0"),
    (10, "<H", 3, "truncated"),  # one more slot announced than present
    (10, "<H", 1, "trailing bytes"),
    (20, "<I", 5, "header says"),
    (SLOT0 + 4, "<B", len(SlotEvent), "unknown slot event"),
    (SLOT0 + 4, "<B", SlotEvent.PREEMPTED, "cannot carry 3 tokens"),
    (SLOT0 + 5, "<B", 200, "truncated"),
    (SLOT0 + 6, "<B", 250, "top_k 250"),
    (SLOT0 + 7, "<B", 4, "num_accepted_drafts"),
])
def test_decoder_rejects_corrupted_fields(offset: int, fmt: str, value: int | bytes, match: str) -> None:
    decode_part(valid_message())  # the unpatched message is fine
    with pytest.raises(OutputQueueError, match=match):
        decode_part(patched(valid_message(), offset, fmt, value))


def test_every_truncation_and_extension_is_rejected() -> None:
    message = valid_message()
    for length in range(len(message)):
        with pytest.raises(OutputQueueError):
            decode_part(message[:length])
    with pytest.raises(OutputQueueError):
        decode_part(message + b"\0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_random_bytes_raise_only_output_queue_error(noise: bytes, offset: int, splice: bytes) -> None:
    message = valid_message()
    spliced = message[:offset] + splice + message[offset + len(splice):]
    for data in (noise, MAGIC + bytes([WIRE_VERSION]) + noise, spliced):
        try:
            decode_part(data)
        except OutputQueueError:
            continue


def test_assembler_rejects_missing_foreign_and_repeated_parts() -> None:
    messages = encode_step(uniform_step(4, 20, n=6, k=20))
    parts = [decode_part(m) for m in messages]
    assert len(parts) >= 3
    with pytest.raises(OutputQueueError, match="expected part 0"):
        StepAssembler().add(parts[1])
    assembler = StepAssembler()
    assert assembler.add(parts[0]) is None
    with pytest.raises(OutputQueueError, match="expected part 1"):
        assembler.add(parts[2])  # part 1 lost
    other = parts[1]
    foreign = OutputPart(other.step + 1, other.is_draft, other.part_index, other.part_count, other.slots)
    assembler = StepAssembler()
    assembler.add(parts[0])
    with pytest.raises(OutputQueueError, match="of step 5"):
        assembler.add(foreign)
    with pytest.raises(OutputQueueError, match="continue after"):
        decode_step(messages + messages[:1])
    with pytest.raises(OutputQueueError, match="incomplete"):
        decode_step(messages[:-1])


# ---------------------------------------------------------------- a real queue


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_outputs() | step_outputs(min_slots=48, wide=True), min_size=1, max_size=3))
def test_round_trip_through_a_real_queue(steps: list[StepOutput]) -> None:
    with OutputQueueReader() as reader:
        writer = OutputQueueWriter(reader.address)
        thread, events = send_in_thread(writer, steps)
        for want in steps:
            assert_same_step(reader.receive(timeout=10.0), want)
        thread.join(timeout=10.0)
        assert len(events) == len(steps) and not any(isinstance(e, Exception) for e in events)
        assert reader.receive(timeout=0.0) is None
    assert not queue_exists(reader.address.key)


def test_largest_batch_spans_many_messages_through_a_real_queue(reader: OutputQueueReader) -> None:
    largest = uniform_step(11, 256, n=6, k=20, seed=5)
    assert len(encode_step(largest)) > 30
    writer = OutputQueueWriter(reader.address)
    thread, events = send_in_thread(writer, [largest, uniform_step(12, 1, n=1, k=0)])
    assert_same_step(reader.receive(timeout=10.0), largest)
    assert reader.receive(timeout=10.0).step == 12  # type: ignore[union-attr]
    thread.join(timeout=10.0)
    assert len(events) == 2


def test_receive_times_out_and_keeps_a_partial_step(reader: OutputQueueReader) -> None:
    messages = encode_step(uniform_step(3, 30, n=6, k=20))
    raw = sysv_ipc.MessageQueue(reader.address.key, max_message_size=KERNEL_MSGMAX)
    raw.send(messages[0], type=1)
    started = time.monotonic()
    assert reader.receive(timeout=0.05) is None
    assert 0.04 <= time.monotonic() - started < 1.0
    writer_thread = threading.Thread(target=lambda: [raw.send(m, type=1) for m in messages[1:]], daemon=True)
    writer_thread.start()
    assert len(reader.receive(timeout=10.0).slots) == 30  # type: ignore[union-attr]
    writer_thread.join(timeout=10.0)


def test_starved_reader_blocks_the_writer_and_loses_nothing(reader: OutputQueueReader) -> None:
    steps = [uniform_step(step, 64, n=6, k=20, seed=step) for step in range(12)]
    bytes_per_step = sum(len(m) for m in encode_step(steps[0]))
    assert bytes_per_step > KERNEL_MSGMNB  # one step alone overflows the queue
    writer = OutputQueueWriter(reader.address)
    thread, events = send_in_thread(writer, steps)
    starve_s = 0.3
    time.sleep(starve_s)
    assert events == [] and thread.is_alive()  # not even the first step got through: backpressure
    for want in steps:
        assert_same_step(reader.receive(timeout=10.0), want)
    thread.join(timeout=10.0)
    assert len(events) == len(steps) and not any(isinstance(e, Exception) for e in events)
    assert writer.blocked_s >= starve_s * 0.5  # slack for a late-starting thread on a loaded machine


def test_garbage_on_the_queue_is_rejected(reader: OutputQueueReader) -> None:
    raw = sysv_ipc.MessageQueue(reader.address.key)
    raw.send(b"definitely not an output message", type=1)
    with pytest.raises(OutputQueueError, match="bad magic"):
        reader.receive(timeout=1.0)
    raw.send(patched(valid_message(), 4, "<B", 0), type=1)
    with pytest.raises(OutputQueueError, match="wire version"):
        reader.receive(timeout=1.0)


def test_closing_the_reader_releases_a_blocked_writer(reader: OutputQueueReader) -> None:
    writer = OutputQueueWriter(reader.address, reader_alive=lambda: True)
    thread, events = send_in_thread(writer, [uniform_step(0, 64, n=6, k=20)])
    time.sleep(0.1)
    assert thread.is_alive()
    reader.close()
    thread.join(timeout=5.0)
    assert len(events) == 1 and isinstance(events[0], ReaderGoneError)


def test_liveness_callback_stops_a_blocked_writer_and_removes_the_queue(reader: OutputQueueReader) -> None:
    alive = threading.Event()
    alive.set()
    writer = OutputQueueWriter(reader.address, OutputQueueConfig(liveness_interval_s=0.02), alive.is_set)
    thread, events = send_in_thread(writer, [uniform_step(0, 64, n=6, k=20)])
    time.sleep(0.1)
    assert thread.is_alive()
    alive.clear()
    thread.join(timeout=5.0)
    assert len(events) == 1 and isinstance(events[0], ReaderGoneError)
    assert not queue_exists(reader.address.key)


READER_PROCESS = """
import time
from pdserve.engine.output_queue import OutputQueueReader
address = OutputQueueReader().address
print(address.key, address.reader_pid, address.max_message_bytes, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(30)  # a writer that misses the death would block forever; fail instead
def test_a_killed_reader_process_is_detected_within_a_bounded_time() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", READER_PROCESS], stdout=subprocess.PIPE, env=env,
                               text=True)
    key = 0
    try:
        assert process.stdout is not None
        key, pid, max_message_bytes = (int(field) for field in process.stdout.readline().split())
        assert pid == process.pid and pid_alive(pid)
        writer = OutputQueueWriter(OutputQueueAddress(key, pid, max_message_bytes))
        killed_at: list[float] = []

        def kill_reader() -> None:
            time.sleep(0.2)
            killed_at.append(time.monotonic())
            process.kill()  # not reaped yet: the writer must see through the zombie

        threading.Thread(target=kill_reader, daemon=True).start()
        with pytest.raises(ReaderGoneError):
            for step in range(1000):
                writer.send(uniform_step(step, 64, n=6, k=20))
        detected_after = time.monotonic() - killed_at[0]
        assert detected_after < 1.0
        assert not pid_alive(pid)
        assert not queue_exists(key)  # the writer removed the orphaned queue
    finally:
        process.kill()
        process.wait(timeout=10.0)
        if key and queue_exists(key):
            sysv_ipc.MessageQueue(key).remove()


def test_keys_are_unique_and_queues_are_removed_on_close() -> None:
    readers = [OutputQueueReader() for _ in range(8)]
    keys = [r.address.key for r in readers]
    assert len(set(keys)) == len(keys) and all(0 < key < 2**31 for key in keys)
    assert all(r.address.reader_pid == os.getpid() for r in readers)
    for r in readers:
        r.close()
        r.close()  # idempotent
    for key in keys:
        with pytest.raises(sysv_ipc.ExistentialError):
            sysv_ipc.MessageQueue(key)
        with pytest.raises(ReaderGoneError):
            OutputQueueWriter(OutputQueueAddress(key, os.getpid(), KERNEL_MSGMAX))


def key_sequence(keys: list[int]) -> Callable[[], int]:
    remaining = iter(keys)
    return lambda: next(remaining)


def test_a_key_in_use_is_skipped_never_shared() -> None:
    with OutputQueueReader() as first:
        taken = first.address.key
        free = taken % (2**31 - 2) + 1
        while queue_exists(free):
            free = free % (2**31 - 2) + 1
        with OutputQueueReader(key_source=key_sequence([taken, taken, free])) as second:
            assert second.address.key == free
        with pytest.raises(OutputQueueError, match="no free SysV key"):
            OutputQueueReader(OutputQueueConfig(create_attempts=2), key_sequence([taken, taken]))
    assert not queue_exists(taken) and not queue_exists(free)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        OutputQueueConfig(max_message_bytes=16)
    with pytest.raises(ValueError, match="poll_min_s"):
        OutputQueueConfig(poll_min_s=0.01, poll_max_s=0.001)
