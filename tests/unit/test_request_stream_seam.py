"""The node side of a migrated stream's seam (node/request_stream.py): a continuation whose prompt ends
with the outputs already sent gives the client exactly the rest of the undisturbed run's text — for a
seam at every position, through multi-byte characters split across tokens and stop strings that
started before the seam."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.engine.protocol import RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.request_stream import RequestStream

PROMPT = "Cities:"
OUTPUT = " Café au lait, naïve résumé, 東京 and 北京 are cities. 🎉🚀 done"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


@dataclass
class Client:
    """What a client of the router received: text deltas, tokens and the finish reason."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None


def _feed(stream: RequestStream, token_ids: list[int], client: Client, last_is_final: bool) -> None:
    for i, token_id in enumerate(token_ids):
        final = last_is_final and i == len(token_ids) - 1
        status = RequestStatus.FINISHED_LENGTH if final else RequestStatus.RUNNING
        delta = stream.on_output(RequestOutput("r", status, SampledTokens([token_id])))
        client.text += delta.text
        client.token_ids += tuple(delta.tokens.token_ids)
        client.finish_reason = delta.finish_reason
        if delta.finish_reason is not None:
            return


def _undisturbed(tokenizer: Tokenizer, prompt: list[int], outputs: list[int],
                 params: SamplingParams) -> Client:
    client = Client()
    _feed(RequestStream("r", params, tokenizer, prompt), outputs, client, last_is_final=True)
    return client


def _migrated(tokenizer: Tokenizer, prompt: list[int], outputs: list[int], params: SamplingParams,
              seam: int) -> Client:
    """The first node sends ``seam`` tokens and dies; a continuation gets what the router would send."""
    client = Client()
    _feed(RequestStream("r", params, tokenizer, prompt), outputs[:seam], client, last_is_final=False)
    if client.finish_reason is not None:
        return client
    sent = list(client.token_ids)
    resumed = replace(params, max_tokens=params.max_tokens - len(sent), resumed_output_tokens=len(sent))
    continuation = RequestStream("r/migrate-1", resumed, tokenizer, prompt + sent,
                                 resumed_output_chars=len(client.text))
    _feed(continuation, outputs[len(sent):], client, last_is_final=True)
    return client


def _case(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    prompt = tokenizer.encode(PROMPT)
    outputs = tokenizer.encode(PROMPT + OUTPUT)[len(prompt):]
    assert tokenizer.decode(prompt + outputs) == PROMPT + OUTPUT
    return prompt, outputs


def test_multi_byte_characters_split_at_any_seam_arrive_once(tokenizer: Tokenizer) -> None:
    prompt, outputs = _case(tokenizer)
    # the byte-level tokenizer splits some of these characters across tokens: some seams cut them
    split = [i for i in range(1, len(outputs)) if "\ufffd" in tokenizer.decode(outputs[:i])]
    assert split, "the case must put a seam inside a multi-byte character"
    params = SamplingParams(max_tokens=len(outputs), temperature=0.0)
    expected = _undisturbed(tokenizer, prompt, outputs, params)
    assert expected.text == OUTPUT
    for seam in range(1, len(outputs)):
        got = _migrated(tokenizer, prompt, outputs, params, seam)
        assert (got.text, got.token_ids, got.finish_reason) == \
               (expected.text, expected.token_ids, "length"), seam


@pytest.mark.parametrize("stop", ["東京 and 北京", "résumé, 東", "🎉🚀"])
def test_a_stop_string_that_spans_the_seam_still_stops_the_stream(tokenizer: Tokenizer, stop: str) -> None:
    prompt, outputs = _case(tokenizer)
    params = SamplingParams(max_tokens=len(outputs), temperature=0.0, stop=(stop,))
    expected = _undisturbed(tokenizer, prompt, outputs, params)
    assert expected.finish_reason == "stop" and expected.text == OUTPUT[: OUTPUT.index(stop)]
    for seam in range(1, len(outputs)):
        got = _migrated(tokenizer, prompt, outputs, params, seam)
        assert (got.text, got.token_ids, got.finish_reason) == \
               (expected.text, expected.token_ids, expected.finish_reason), seam


def test_a_continuation_must_leave_a_prompt_token_and_cannot_claim_unsent_text(tokenizer: Tokenizer) -> None:
    prompt, outputs = _case(tokenizer)
    with pytest.raises(ValueError, match="resumes"):
        RequestStream("r", SamplingParams(resumed_output_tokens=3), tokenizer, outputs[:3])
    with pytest.raises(ValueError, match="already sent"):
        RequestStream("r", SamplingParams(resumed_output_tokens=2), tokenizer, prompt + outputs[:2],
                      resumed_output_chars=1000)
