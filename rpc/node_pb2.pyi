from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAUSE_UNSPECIFIED: _ClassVar[FailureCause]
    CAUSE_DECODE_NODE_FAILED: _ClassVar[FailureCause]
    CAUSE_PREFILL_PEER_FAILED: _ClassVar[FailureCause]
    CAUSE_PREFILL_PEER_UNREACHABLE: _ClassVar[FailureCause]
    CAUSE_KV_CAPACITY: _ClassVar[FailureCause]
    CAUSE_BAD_REQUEST: _ClassVar[FailureCause]
    CAUSE_DEADLINE: _ClassVar[FailureCause]
    CAUSE_ABORTED: _ClassVar[FailureCause]
    CAUSE_DRAINING: _ClassVar[FailureCause]
    CAUSE_DECODE_NODE_UNREACHABLE: _ClassVar[FailureCause]
CAUSE_UNSPECIFIED: FailureCause
CAUSE_DECODE_NODE_FAILED: FailureCause
CAUSE_PREFILL_PEER_FAILED: FailureCause
CAUSE_PREFILL_PEER_UNREACHABLE: FailureCause
CAUSE_KV_CAPACITY: FailureCause
CAUSE_BAD_REQUEST: FailureCause
CAUSE_DEADLINE: FailureCause
CAUSE_ABORTED: FailureCause
CAUSE_DRAINING: FailureCause
CAUSE_DECODE_NODE_UNREACHABLE: FailureCause

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop_token_ids", "stop", "ignore_eos", "logprobs", "prompt_logprobs", "logit_bias", "grammar", "resumed_output_tokens")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    RESUMED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    logit_bias: _containers.ScalarMap[int, float]
    grammar: Grammar
    resumed_output_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., grammar: _Optional[_Union[Grammar, _Mapping]] = ..., resumed_output_tokens: _Optional[int] = ...) -> None: ...

class Grammar(_message.Message):
    __slots__ = ("kind", "text")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    text: str
    def __init__(self, kind: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class PrefillTarget(_message.Message):
    __slots__ = ("node_id", "grpc_address", "data_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_address: str
    data_address: str
    def __init__(self, node_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., data_address: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "prefill", "resumed_output_chars", "first_token_timeout_s", "silence_timeout_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    RESUMED_OUTPUT_CHARS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SILENCE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    prefill: PrefillTarget
    resumed_output_chars: int
    first_token_timeout_s: float
    silence_timeout_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., prefill: _Optional[_Union[PrefillTarget, _Mapping]] = ..., resumed_output_chars: _Optional[int] = ..., first_token_timeout_s: _Optional[float] = ..., silence_timeout_s: _Optional[float] = ...) -> None: ...

class SampledTokens(_message.Message):
    __slots__ = ("token_ids", "logprobs", "ranks", "top_k", "top_ids", "top_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., ranks: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class SpeculateMetrics(_message.Message):
    __slots__ = ("accepted_tokens", "rejected_tokens", "accept_ratio", "average_accept_length", "accepted_tokens_per_head", "accept_ratio_per_head")
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_RATIO_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_ACCEPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_PER_HEAD_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_RATIO_PER_HEAD_FIELD_NUMBER: _ClassVar[int]
    accepted_tokens: int
    rejected_tokens: int
    accept_ratio: float
    average_accept_length: float
    accepted_tokens_per_head: _containers.RepeatedScalarFieldContainer[int]
    accept_ratio_per_head: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, accepted_tokens: _Optional[int] = ..., rejected_tokens: _Optional[int] = ..., accept_ratio: _Optional[float] = ..., average_accept_length: _Optional[float] = ..., accepted_tokens_per_head: _Optional[_Iterable[int]] = ..., accept_ratio_per_head: _Optional[_Iterable[float]] = ...) -> None: ...

class TimingInfo(_message.Message):
    __slots__ = ("queue_s", "prefill_s", "transfer_s", "decode_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    prefill_s: float
    transfer_s: float
    decode_s: float
    def __init__(self, queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., decode_s: _Optional[float] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("tokens", "text", "finish_reason", "usage", "speculate_metrics", "timing", "error", "prompt_logprobs", "cause", "failed_node_id")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_METRICS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    FAILED_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    tokens: SampledTokens
    text: str
    finish_reason: str
    usage: Usage
    speculate_metrics: SpeculateMetrics
    timing: TimingInfo
    error: str
    prompt_logprobs: SampledTokens
    cause: FailureCause
    failed_node_id: str
    def __init__(self, tokens: _Optional[_Union[SampledTokens, _Mapping]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., speculate_metrics: _Optional[_Union[SpeculateMetrics, _Mapping]] = ..., timing: _Optional[_Union[TimingInfo, _Mapping]] = ..., error: _Optional[str] = ..., prompt_logprobs: _Optional[_Union[SampledTokens, _Mapping]] = ..., cause: _Optional[_Union[FailureCause, str]] = ..., failed_node_id: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node_id", "role", "running", "waiting", "free_blocks", "total_blocks", "kv_usage", "draining", "model", "unreachable_peer_addresses")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_PEER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    kv_usage: float
    draining: bool
    model: str
    unreachable_peer_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., free_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., kv_usage: _Optional[float] = ..., draining: _Optional[bool] = ..., model: _Optional[str] = ..., unreachable_peer_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("draining", "inflight")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    inflight: int
    def __init__(self, draining: _Optional[bool] = ..., inflight: _Optional[int] = ...) -> None: ...
