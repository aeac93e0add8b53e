"""Conversions between node.proto messages and pdserve's own types (one place, both directions)."""

from __future__ import annotations

from pdserve.common.sampling_params import SamplingParams
from pdserve.node.request_stream import StreamDelta, TokenLogprob
from pdserve.rpc import node_pb2 as pb


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, seed=params.seed,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop), ignore_eos=params.ignore_eos, logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
    )


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises SamplingParamsError (a ValueError) naming the bad field."""
    return SamplingParams(
        max_tokens=msg.max_tokens, min_tokens=msg.min_tokens, temperature=msg.temperature,
        top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        repetition_penalty=msg.repetition_penalty, presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty, stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop), ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    )


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def delta_to_chunk(delta: StreamDelta) -> pb.GenerateChunk:
    return pb.GenerateChunk(
        token_ids=list(delta.token_ids), text=delta.text,
        logprobs=[logprob_to_proto(lp) for lp in delta.logprobs],
        finish_reason=delta.finish_reason or "",
    )
