"""The engine's one record stream: fragments, the assembler, and a real SysV queue between a
`RecordWriter` (engine side) and a `RecordReader` (node side) within the kernel defaults."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgspec
import numpy as np
import pytest
import sysv_ipc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.common.leftovers import pid_alive, queue_marker, remove_leftovers
from pdserve.common.tokens import SampledTokens
from pdserve.engine.output_stream import ReaderGoneError, RecordWriter, StreamError, WriterConfig
from pdserve.engine.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FRAGMENT_HEADER,
    PROTOCOL_VERSION,
    EngineStats,
    KVReserved,
    PrefillProgress,
    ProtocolError,
    RecordAssembler,
    RequestOutput,
    StepOutputs,
    StreamAddress,
    encode_record,
    fragments,
)
from pdserve.engine.request import RequestStatus
from pdserve.node.engine_stream import EngineExited, RecordReader, StreamClosed
from pdserve.tests.support.cluster import queue_exists

KERNEL_MSGMAX = 8192  # Linux default: every message must fit, no sysctl


def tokens(rng: np.random.Generator, n: int, k: int, with_logprobs: bool = True) -> SampledTokens:
    ids = rng.integers(0, 2**31, n).tolist()
    if not with_logprobs:
        return SampledTokens(ids)
    return SampledTokens(ids, (-rng.random(n)).tolist(), rng.integers(1, 5000, n).tolist(), k,
                         rng.integers(0, 2**31, n * k).tolist(), (-rng.random(n * k)).tolist())


def step(rng: np.random.Generator, num_outputs: int, n: int = 6, k: int = 20) -> StepOutputs:
    statuses = list(RequestStatus)
    outputs = [RequestOutput(f"req-{i:032x}", statuses[int(rng.integers(2, len(statuses)))],
                             tokens(rng, n, k), int(rng.integers(0, n)))
               for i in range(num_outputs)]
    progress = [PrefillProgress(f"pre-{i:032x}", int(rng.integers(1, 2**20)),
                                rng.integers(0, 2**31, int(rng.integers(1, 64))).tolist())
                for i in range(int(rng.integers(0, 4)))]
    return StepOutputs(int(rng.integers(0, 2**40)), outputs, progress)


@st.composite
def steps(draw: st.DrawFn) -> StepOutputs:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return step(rng, draw(st.integers(0, 80)), draw(st.integers(1, 6)), draw(st.integers(0, 20)))


def assemble(messages: list[bytes]) -> object:
    assembler = RecordAssembler()
    results = [assembler.add(m) for m in messages]
    assert all(r is None for r in results[:-1])
    return results[-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps())
def test_a_record_round_trips_through_fragments_within_the_kernel_limit(record: StepOutputs) -> None:
    messages = fragments(encode_record(record), 7, KERNEL_MSGMAX)
    assert all(len(m) <= KERNEL_MSGMAX for m in messages)
    assert assemble(messages) == record


def test_records_carry_consecutive_numbers_and_a_gap_or_a_foreign_fragment_is_an_error() -> None:
    rng = np.random.default_rng(0)
    big = encode_record(step(rng, 64))  # several fragments
    small = encode_record(EngineStats(1, 2, 3, 4, 5))
    first, second = fragments(big, 0, KERNEL_MSGMAX), fragments(small, 1, KERNEL_MSGMAX)
    assert len(first) > 2
    assembler = RecordAssembler()
    for m in first[:-1]:
        assert assembler.add(m) is None
    assert assembler.add(first[-1]) is not None
    assert assembler.add(second[0]) == EngineStats(1, 2, 3, 4, 5)
    skipped = fragments(small, 3, KERNEL_MSGMAX)[0]  # record 2 never came
    with pytest.raises(ProtocolError, match="record 2 was due"):
        assembler.add(skipped)
    interleaved = RecordAssembler()
    interleaved.add(first[0])
    with pytest.raises(ProtocolError, match="record 0 was due"):
        interleaved.add(fragments(small, 5, KERNEL_MSGMAX)[0])


@pytest.mark.parametrize("message", [
    b"",
    b"PD",
    FRAGMENT_HEADER.pack(b"XX", PROTOCOL_VERSION, 0, 0) + b"\x90",
    FRAGMENT_HEADER.pack(b"PD", PROTOCOL_VERSION + 1, 0, 0) + b"\x90",
    FRAGMENT_HEADER.pack(b"PD", PROTOCOL_VERSION, 0x80, 0) + b"\x90",
    FRAGMENT_HEADER.pack(b"PD", PROTOCOL_VERSION, 0, 0) + bytes([PROTOCOL_VERSION]) + b"\xc1",
    FRAGMENT_HEADER.pack(b"PD", PROTOCOL_VERSION, 0, 0) + bytes([PROTOCOL_VERSION]) + b"\x81\xa1x\x01",
], ids=["empty", "short", "magic", "version", "flags", "not-msgpack", "untagged"])
def test_malformed_fragments_raise_protocol_errors(message: bytes) -> None:
    with pytest.raises(ProtocolError):
        RecordAssembler().add(message)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_protocol_errors(noise: bytes) -> None:
    try:
        RecordAssembler().add(FRAGMENT_HEADER.pack(b"PD", PROTOCOL_VERSION, 0, 0) + noise)
    except ProtocolError:
        pass


def test_a_record_of_inconsistent_columns_is_rejected_on_decode() -> None:
    # What a forged or broken writer could send: two tokens but one logprob (msgspec runs __post_init__).
    two_tokens_one_logprob = [[1, 2], [-0.1], [1], 0, [], []]
    forged = {"type": "step", "step": 0,
              "outputs": [["r", int(RequestStatus.RUNNING), two_tokens_one_logprob, 0, "", None, []]]}
    payload = bytes([PROTOCOL_VERSION]) + msgspec.msgpack.encode(forged)
    with pytest.raises(ProtocolError, match="logprobs"):
        assemble(fragments(payload, 0, KERNEL_MSGMAX))


# -- over a real SysV queue ---------------------------------------------------------------------------


@pytest.fixture
def reader() -> RecordReader:
    with RecordReader() as r:
        yield r


def send_in_thread(writer: RecordWriter, records: list[object]) -> tuple[threading.Thread, list[object]]:
    errors: list[object] = []

    def run() -> None:
        try:
            for record in records:
                writer.send(record)
        except ReaderGoneError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_large_step_spans_many_messages_and_arrives_whole(reader: RecordReader) -> None:
    record = step(np.random.default_rng(1), 256)  # ~0.2 MB: many times what the queue holds at once
    writer = RecordWriter(reader.address)
    thread, errors = send_in_thread(writer, [record, EngineStats(0, 0, 1, 1, 1)])
    time.sleep(0.3)  # the reader starts late: the writer has filled the queue and waits on it
    assert reader.receive() == record
    assert reader.receive() == EngineStats(0, 0, 1, 1, 1)
    thread.join(5.0)
    assert not errors and writer.blocked_s > 0  # 16 KiB per queue: the writer waited on the reader


def test_a_blocked_reader_wakes_as_soon_as_a_record_arrives(reader: RecordReader) -> None:
    got: list[tuple[float, object]] = []
    thread = threading.Thread(target=lambda: got.append((time.monotonic(), reader.receive())), daemon=True)
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive()  # blocked in the kernel, no timeout
    sent_at = time.monotonic()
    RecordWriter(reader.address).send(KVReserved("r", [1, 2]))
    thread.join(5.0)
    (received_at, record), = got
    assert record == KVReserved("r", [1, 2])
    assert received_at - sent_at < 0.1  # a wake-up, not the next tick of a poll


def test_the_exit_notice_comes_after_every_record_the_engine_wrote(reader: RecordReader) -> None:
    writer = RecordWriter(reader.address)
    writer.send(KVReserved("a", [1]))
    writer.send(KVReserved("b", [2]))
    reader.notify_exit(-9)
    assert [reader.receive(), reader.receive(), reader.receive()] == [
        KVReserved("a", [1]), KVReserved("b", [2]), EngineExited(-9)]


def test_closing_the_reader_wakes_a_blocked_receive_and_releases_a_blocked_writer(
        reader: RecordReader) -> None:
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            reader.receive()
        except StreamClosed as exc:
            errors.append(exc)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    time.sleep(0.1)
    reader.close()
    receiver.join(5.0)
    assert len(errors) == 1


def test_a_starved_queue_blocks_the_writer_until_the_reader_closes(reader: RecordReader) -> None:
    writer = RecordWriter(reader.address, reader_alive=lambda: True)
    thread, errors = send_in_thread(writer, [step(np.random.default_rng(2), 64)])
    time.sleep(0.2)
    assert thread.is_alive()
    reader.close()
    thread.join(5.0)
    assert len(errors) == 1 and isinstance(errors[0], ReaderGoneError)


def test_liveness_check_stops_a_blocked_writer_and_removes_the_queue(reader: RecordReader) -> None:
    alive = threading.Event()
    alive.set()
    writer = RecordWriter(reader.address, WriterConfig(liveness_interval_s=0.02), alive.is_set)
    thread, errors = send_in_thread(writer, [step(np.random.default_rng(3), 64)])
    time.sleep(0.1)
    assert thread.is_alive()
    alive.clear()
    thread.join(5.0)
    assert len(errors) == 1 and isinstance(errors[0], ReaderGoneError)
    assert not queue_exists(reader.address.key)


def test_garbage_and_foreign_message_types_break_the_stream_loudly(reader: RecordReader) -> None:
    raw = sysv_ipc.MessageQueue(reader.address.key)
    raw.send(b"definitely not a fragment", type=1)
    with pytest.raises(ProtocolError, match="not a fragment"):
        reader.receive()
    raw.send(b"x", type=7)
    with pytest.raises(StreamError, match="unknown type 7"):
        reader.receive()


READER_PROCESS = """
import time
from pdserve.node.engine_stream import RecordReader
address = RecordReader().address
print(address.key, address.reader_pid, address.max_message_bytes, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(30)  # a writer that misses the death would block forever; fail instead
def test_a_killed_reader_process_is_detected_within_a_bounded_time() -> None:
    process = subprocess.Popen([sys.executable, "-c", READER_PROCESS], stdout=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), text=True)
    key = 0
    try:
        key, pid, max_message_bytes = (int(field) for field in process.stdout.readline().split())
        assert pid == process.pid and pid_alive(pid)
        writer = RecordWriter(StreamAddress(key, pid, max_message_bytes))
        killed_at: list[float] = []

        def kill_reader() -> None:
            time.sleep(0.2)
            killed_at.append(time.monotonic())
            process.kill()  # not reaped yet: the writer must see through the zombie

        threading.Thread(target=kill_reader, daemon=True).start()
        rng = np.random.default_rng(4)
        with pytest.raises(ReaderGoneError):
            for _ in range(1000):
                writer.send(step(rng, 16))
        assert time.monotonic() - killed_at[0] < 1.0
        assert not queue_exists(key)  # the writer removed the orphaned queue
    finally:
        process.kill()
        process.wait(timeout=10.0)
        if key and queue_exists(key):
            sysv_ipc.MessageQueue(key).remove()
    # The killed reader's marker of its queue is what the next node on the host removes.
    marker = queue_marker(pid, key)
    assert marker.exists()
    remove_leftovers()
    assert not marker.exists()


def key_sequence(keys: list[int]) -> Callable[[], int]:
    remaining = iter(keys)
    return lambda: next(remaining)


def test_keys_are_unique_a_key_in_use_is_skipped_and_queues_go_on_close() -> None:
    readers = [RecordReader() for _ in range(4)]
    keys = [r.address.key for r in readers]
    assert len(set(keys)) == len(keys) and all(0 < key < 2**31 for key in keys)
    taken = keys[0]
    free = taken % (2**31 - 2) + 1
    while queue_exists(free):
        free = free % (2**31 - 2) + 1
    with RecordReader(key_source=key_sequence([taken, taken, free])) as other:
        assert other.address.key == free
    for r in readers:
        r.close()
        r.close()  # idempotent
    for key in [*keys, free]:
        assert not queue_exists(key)
        with pytest.raises(ReaderGoneError):
            RecordWriter(StreamAddress(key, os.getpid()))


def test_addresses_and_writer_config_are_validated() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        StreamAddress(1, 1, FRAGMENT_HEADER.size)
    with pytest.raises(ValueError, match="backoff"):
        WriterConfig(backoff_min_s=0.01, backoff_max_s=0.001)
    assert StreamAddress(1, 1).max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == KERNEL_MSGMAX
    assert struct.calcsize("<2sBBI") == FRAGMENT_HEADER.size
