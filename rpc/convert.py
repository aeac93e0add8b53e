"""Conversions between node.proto messages and pdserve's own types (one place, both directions)."""

from __future__ import annotations

from pdserve.common.sampling_params import GrammarSpec, SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.rpc import node_pb2 as pb


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, seed=params.seed,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop), ignore_eos=params.ignore_eos, logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs, logit_bias=dict(params.logit_bias),
        grammar=(None if params.grammar is None
                 else pb.Grammar(kind=params.grammar.kind, text=params.grammar.text)),
        resumed_output_tokens=params.resumed_output_tokens,
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
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        grammar=GrammarSpec(msg.grammar.kind, msg.grammar.text) if msg.HasField("grammar") else None,
        resumed_output_tokens=msg.resumed_output_tokens,
    )


def tokens_to_proto(tokens: SampledTokens) -> pb.SampledTokens:
    return pb.SampledTokens(token_ids=tokens.token_ids, logprobs=tokens.logprobs, ranks=tokens.ranks,
                            top_k=tokens.top_k, top_ids=tokens.top_ids, top_logprobs=tokens.top_logprobs)


def tokens_from_proto(msg: pb.SampledTokens) -> SampledTokens:
    """Raises ValueError when the columns do not fit together."""
    return SampledTokens(list(msg.token_ids), list(msg.logprobs), list(msg.ranks), msg.top_k,
                         list(msg.top_ids), list(msg.top_logprobs))
