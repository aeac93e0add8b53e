"""Per-step engine outputs and their binary wire codec (engine process -> node server).

Modelled on FastDeploy's `speculate_save_output_with_topk` message, but sized for the SysV kernel
defaults (msgmax 8192): one `StepOutput` is split into as many messages ("parts") as it needs, each at
most `max_message_bytes` long including its header, and a slot is never split across parts.

Wire format (little-endian, version 1):

    message   = header slot*
    header    = magic "PDSO" | version u8 | flags u8 (bit 0: is_draft) | part_index u16 | part_count u16
                | num_slots u16 | step u64 | payload_bytes u32                                  (24 bytes)
    slot      = seq_id u32 | event u8 | num_tokens u8 | top_k u8 | num_accepted_drafts u8      (8 bytes)
                | token_ids u32[n] | logprobs f32[n] | ranks u32[n]
                | topk_ids u32[n * k] | topk_logprobs f32[n * k]

The event byte says what happened to the slot; counts are never overloaded as markers.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from pdserve.common.sampling_params import MAX_TOP_LOGPROBS

MAGIC = b"PDSO"
WIRE_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 8192  # Linux kernel.msgmax default: no sysctl is ever required

HEADER = struct.Struct("<4sBBHHHQI")
SLOT_HEADER = struct.Struct("<IBBBB")
_FLAG_IS_DRAFT = 0x01
_KNOWN_FLAGS = _FLAG_IS_DRAFT

_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

_ID_DTYPE = np.dtype("<u4")
_LOGPROB_DTYPE = np.dtype("<f4")


class OutputQueueError(Exception):
    """An output record, the bytes on the wire, or the output queue itself is invalid or unusable."""


class SlotEvent(enum.IntEnum):
    """What happened to one sequence in one engine step."""

    TOKENS = 0  # new tokens, the sequence keeps running
    PREEMPTED = 1  # blocks were taken back; the sequence will be recomputed later
    FINISHED_STOPPED = 2  # an eos / stop token ended it (its last tokens ride along)
    FINISHED_LENGTH = 3  # max_tokens or the context length ended it (its last tokens ride along)
    ABORTED = 4
    ERROR = 5

    @property
    def is_terminal(self) -> bool:
        """The engine's last event for a sequence: its seq_id may be reused afterwards."""
        return self in (SlotEvent.FINISHED_STOPPED, SlotEvent.FINISHED_LENGTH, SlotEvent.ABORTED,
                        SlotEvent.ERROR)

    @property
    def min_tokens(self) -> int:
        return 1 if self is SlotEvent.TOKENS else 0

    @property
    def max_tokens(self) -> int:
        # Preemption, abort and errors happen instead of a forward pass, so they carry no tokens.
        carries = self in (SlotEvent.TOKENS, SlotEvent.FINISHED_STOPPED, SlotEvent.FINISHED_LENGTH)
        return _U8_MAX if carries else 0


def _id_array(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype != _ID_DTYPE:
        if array.size and array.dtype.kind not in "iu":
            raise OutputQueueError(f"{name} must hold integers (got dtype {array.dtype})")
        if array.size and (int(array.min()) < 0 or int(array.max()) > _U32_MAX):
            raise OutputQueueError(f"{name} must hold values in [0, 2**32)")
        array = array.astype(_ID_DTYPE)
    return _with_shape(name, array, shape)


def _logprob_array(name: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype != _LOGPROB_DTYPE:
        if array.size and array.dtype.kind not in "fiu":
            raise OutputQueueError(f"{name} must hold floats (got dtype {array.dtype})")
        array = array.astype(_LOGPROB_DTYPE)
    return _with_shape(name, array, shape)


def _with_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.size == 0 and 0 in shape:
        return np.ascontiguousarray(array.reshape(shape))  # [] given for an empty [n, 0] top-k
    if array.shape != shape:
        raise OutputQueueError(f"{name} has shape {array.shape}, expected {shape}")
    return np.ascontiguousarray(array)


@dataclass(frozen=True, eq=False)
class SlotOutput:
    """One sequence's output for one step; arrays are normalized to little-endian uint32 / float32."""

    seq_id: int  # uint32
    event: SlotEvent
    token_ids: np.ndarray  # [n] uint32: accepted drafts then the bonus/sampled token (n <= k + 1)
    logprobs: np.ndarray  # [n] float32: raw logprob of each emitted token
    ranks: np.ndarray  # [n] uint32: rank of each emitted token in the target distribution
    topk_ids: np.ndarray  # [n, k] uint32
    topk_logprobs: np.ndarray  # [n, k] float32
    num_accepted_drafts: int = 0  # for speculate_metrics

    @classmethod
    def marker(cls, seq_id: int, event: SlotEvent) -> SlotOutput:
        """A slot that carries an event and no tokens (preempted, aborted, error)."""
        empty = np.zeros(0, dtype=_ID_DTYPE)
        return cls(seq_id, event, empty, empty, empty, empty.reshape(0, 0), empty.reshape(0, 0))

    def __post_init__(self) -> None:
        if not 0 <= self.seq_id <= _U32_MAX:
            raise OutputQueueError(f"seq_id must be in [0, 2**32) (got {self.seq_id})")
        try:
            object.__setattr__(self, "event", SlotEvent(self.event))
        except ValueError as err:
            raise OutputQueueError(f"unknown slot event {self.event!r}") from err
        token_ids = _id_array("token_ids", self.token_ids, (int(np.size(self.token_ids)),))
        n = len(token_ids)
        if not self.event.min_tokens <= n <= self.event.max_tokens:
            raise OutputQueueError(f"event {self.event.name} cannot carry {n} tokens (seq {self.seq_id})")
        topk_shape = np.shape(self.topk_ids)
        k = topk_shape[1] if len(topk_shape) == 2 else 0
        if k > MAX_TOP_LOGPROBS:
            raise OutputQueueError(f"top_k {k} exceeds {MAX_TOP_LOGPROBS} (seq {self.seq_id})")
        if not 0 <= self.num_accepted_drafts <= n:
            raise OutputQueueError(f"num_accepted_drafts {self.num_accepted_drafts} not in [0, {n}]")
        object.__setattr__(self, "token_ids", token_ids)
        object.__setattr__(self, "logprobs", _logprob_array("logprobs", self.logprobs, (n,)))
        object.__setattr__(self, "ranks", _id_array("ranks", self.ranks, (n,)))
        object.__setattr__(self, "topk_ids", _id_array("topk_ids", self.topk_ids, (n, k)))
        object.__setattr__(self, "topk_logprobs", _logprob_array("topk_logprobs", self.topk_logprobs, (n, k)))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]


@dataclass(frozen=True, eq=False)
class StepOutput:
    """Everything one engine step emits: target-model outputs, or the draft model's (`is_draft`)."""

    step: int  # uint64, increases by one per engine step
    is_draft: bool
    slots: tuple[SlotOutput, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.step <= _U64_MAX:
            raise OutputQueueError(f"step must be in [0, 2**64) (got {self.step})")
        object.__setattr__(self, "slots", tuple(self.slots))
        seq_ids = [slot.seq_id for slot in self.slots]
        if len(set(seq_ids)) != len(seq_ids):
            raise OutputQueueError(f"step {self.step} lists a sequence twice")


@dataclass(frozen=True, eq=False)
class OutputPart:
    """One decoded message: a run of whole slots of one step."""

    step: int
    is_draft: bool
    part_index: int
    part_count: int
    slots: tuple[SlotOutput, ...]


def encode_slot(slot: SlotOutput) -> bytes:
    header = SLOT_HEADER.pack(slot.seq_id, slot.event, slot.num_tokens, slot.top_k, slot.num_accepted_drafts)
    arrays = (slot.token_ids, slot.logprobs, slot.ranks, slot.topk_ids, slot.topk_logprobs)
    return b"".join([header, *(array.tobytes() for array in arrays)])


def _group_slots(encoded_slots: Sequence[bytes], payload_budget: int) -> list[list[bytes]]:
    """Greedy packing of whole slots into parts; keeps slot order so the reader can simply concatenate."""
    groups: list[list[bytes]] = [[]]
    used = 0
    for encoded in encoded_slots:
        if len(encoded) > payload_budget:
            raise OutputQueueError(f"one slot needs {len(encoded)} bytes, a message holds {payload_budget}")
        if used + len(encoded) > payload_budget or len(groups[-1]) == _U16_MAX:
            groups.append([])
            used = 0
        groups[-1].append(encoded)
        used += len(encoded)
    return groups


def encode_step(step_output: StepOutput, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes]:
    """Encode one step as messages of at most `max_message_bytes` each (header included)."""
    groups = _group_slots([encode_slot(slot) for slot in step_output.slots], max_message_bytes - HEADER.size)
    if len(groups) > _U16_MAX:
        raise OutputQueueError(f"step {step_output.step} needs {len(groups)} messages (max {_U16_MAX})")
    flags = _FLAG_IS_DRAFT if step_output.is_draft else 0
    messages = []
    for part_index, group in enumerate(groups):
        payload = b"".join(group)
        header = HEADER.pack(MAGIC, WIRE_VERSION, flags, part_index, len(groups), len(group),
                             step_output.step, len(payload))
        messages.append(header + payload)
    return messages


class _ByteReader:
    """Bounds-checked sequential reads: garbage raises OutputQueueError, never IndexError."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._data = data
        self._offset = offset

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def _claim(self, nbytes: int, what: str) -> int:
        if nbytes > self.remaining:
            raise OutputQueueError(f"message truncated: {what} needs {nbytes} bytes, {self.remaining} left")
        start = self._offset
        self._offset += nbytes
        return start

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        return layout.unpack_from(self._data, self._claim(layout.size, what))

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        start = self._claim(count * dtype.itemsize, what)
        return np.frombuffer(self._data, dtype=dtype, count=count, offset=start)  # read-only view


def _decode_slot(reader: _ByteReader) -> SlotOutput:
    seq_id, event, n, k, num_accepted = reader.unpack(SLOT_HEADER, "slot header")
    if k > MAX_TOP_LOGPROBS:  # checked before reading so a garbage k cannot claim a huge array
        raise OutputQueueError(f"top_k {k} exceeds {MAX_TOP_LOGPROBS} (seq {seq_id})")
    # One read of the whole body, then views: every field is 4 bytes wide, and per-field reads cost
    # more than the copy-free slicing (decoding runs per slot per step in the node server).
    body = reader.array(_ID_DTYPE, 3 * n + 2 * n * k, f"slot {seq_id} body")
    token_ids, logprobs, ranks = body[:n], body[n:2 * n].view(_LOGPROB_DTYPE), body[2 * n:3 * n]
    topk_ids = body[3 * n:3 * n + n * k].reshape(n, k)
    topk_logprobs = body[3 * n + n * k:].view(_LOGPROB_DTYPE).reshape(n, k)
    return SlotOutput(seq_id, event, token_ids, logprobs, ranks, topk_ids, topk_logprobs, num_accepted)


def _check_header(fields: tuple[int | bytes, ...], message_len: int) -> None:
    magic, version, flags, part_index, part_count, _num_slots, _step, payload_bytes = fields
    if magic != MAGIC:
        raise OutputQueueError(f"bad magic {magic!r}")
    if version != WIRE_VERSION:
        raise OutputQueueError(f"unsupported wire version {version} (this reader speaks {WIRE_VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise OutputQueueError(f"unknown flag bits {flags:#04x}")
    if not 0 <= part_index < part_count:
        raise OutputQueueError(f"part {part_index} of {part_count} is out of range")
    if HEADER.size + payload_bytes != message_len:
        raise OutputQueueError(f"message is {message_len} bytes, header says {HEADER.size + payload_bytes}")


def decode_part(message: bytes) -> OutputPart:
    """Decode and validate one message; any inconsistency raises OutputQueueError."""
    if len(message) < HEADER.size:
        raise OutputQueueError(f"{len(message)}-byte message is shorter than the {HEADER.size}-byte header")
    fields = HEADER.unpack_from(message)
    _check_header(fields, len(message))
    _magic, _version, flags, part_index, part_count, num_slots, step, _payload = fields
    reader = _ByteReader(message, HEADER.size)
    slots = tuple(_decode_slot(reader) for _ in range(num_slots))
    if reader.remaining:
        raise OutputQueueError(f"{reader.remaining} trailing bytes after {num_slots} slots")
    return OutputPart(step, bool(flags & _FLAG_IS_DRAFT), part_index, part_count, slots)


class StepAssembler:
    """Joins the parts of one step. There is one writer and the queue is FIFO, so parts arrive in order:
    anything else means a lost or foreign message and is reported, never papered over."""

    def __init__(self) -> None:
        self._parts: list[OutputPart] = []

    @property
    def pending_parts(self) -> int:
        return len(self._parts)

    def add(self, part: OutputPart) -> StepOutput | None:
        """Take the next part; returns the whole step once its last part arrived."""
        expected = len(self._parts)
        first = self._parts[0] if self._parts else part
        same_step = (part.step, part.is_draft, part.part_count) == (
            first.step, first.is_draft, first.part_count)
        if part.part_index != expected or not same_step:
            self._parts = []
            raise OutputQueueError(f"expected part {expected} of step {first.step}, got part "
                                   f"{part.part_index}/{part.part_count} of step {part.step}")
        self._parts.append(part)
        if len(self._parts) < part.part_count:
            return None
        slots = tuple(chain.from_iterable(p.slots for p in self._parts))
        self._parts = []
        return StepOutput(part.step, part.is_draft, slots)


def decode_step(messages: Iterable[bytes]) -> StepOutput:
    """Decode exactly one step from its messages (all of them, in order)."""
    assembler = StepAssembler()
    result: StepOutput | None = None
    for message in messages:
        if result is not None:
            raise OutputQueueError("messages continue after the step's last part")
        result = assembler.add(decode_part(message))
    if result is None:
        raise OutputQueueError(f"step incomplete: {assembler.pending_parts} parts received")
    return result
