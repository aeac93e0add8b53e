"""PD with each speculative method: 1P1D greedy equals a mixed node WITHOUT speculation.

One prefill + decode pair per method (both nodes of a pair run the method: P drafts the first
step's tokens with its MTP head / n-gram matcher, D verifies them and drafts on). Verification is
lossless, so greedy tokens must equal plain decoding's and logprobs match it closely. The first decode
step verifies P's drafts: D proposes nothing of its own before it, so a first decode chunk of more
than one token is P's drafts accepted. MTP runs over shm; hybrid goes over ZMQ forced on (the MTP
layer's KV crosses the network too); n-gram over shm.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import pytest

from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    Result,
    assert_same_first_token,
    generate,
    sampling,
    scrape_metric,
    start_nodes,
    stop_nodes,
    tokenizer,
    wait_until,
)

CHUNK_BUDGET = 64  # the prefill nodes' step budget: the long prompt is prefilled (and shipped) in 4 chunks
METHODS: dict[str, tuple[dict[str, object], str]] = {  # name -> (speculative config, P's transport)
    "mtp": ({"method": "mtp", "num_speculative_tokens": 1}, "auto"),
    "ngram": ({"method": "ngram", "num_speculative_tokens": 3}, "auto"),
    "hybrid": ({"method": "mtp", "num_speculative_tokens": 3, "num_model_steps": 1,
                "mtp_strategy": "with_ngram"}, "zmq"),
}
TEXT = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n"
)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    # The reference prefills in the same 64-token chunks as the prefill nodes: where chunks are cut
    # moves logprobs by ~1e-5 on its own (test_pd.py), and this test is about the hand-off.
    specs = [NodeSpec("mixed", "mixed", ("--max-num-batched-tokens", str(CHUNK_BUDGET)))]
    for name, (config, transport) in METHODS.items():
        spec_flag = ("--speculative-config", json.dumps(config))
        specs.append(NodeSpec(f"prefill_{name}", "prefill",
                              (*spec_flag, "--max-num-batched-tokens", str(CHUNK_BUDGET),
                               "--transport", transport)))
        specs.append(NodeSpec(f"decode_{name}", "decode", (*spec_flag, "--prefill-timeout", "30",
                                                           "--metrics-port", "0")))
    started = start_nodes(specs, tmp_path_factory.mktemp("pd_spec_nodes"))
    yield started
    stop_nodes(started.values())


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    tok = tokenizer()
    text_ids = tok.encode(TEXT)
    # The text three times, cut where the demo model's first token continues the repetition, so the
    # n-gram match of prompt tail + first token gives the prefill node drafts the model confirms (cut
    # at a line end, the tiny model answers a blank line and n-gram finds nothing to propose).
    long_ids = (text_ids * 3)[:-3]
    assert len(long_ids) > 3 * CHUNK_BUDGET
    return {"short": tok.encode("def fibonacci(n):"), "medium": text_ids[:60], "long": long_ids}


_ids = itertools.count()


def rid(tag: str) -> str:
    return f"{tag}-{next(_ids)}-{time.monotonic_ns()}"


@pytest.mark.parametrize("method", list(METHODS))
def test_pd_speculative_greedy_equals_plain_mixed(nodes: dict[str, Node], prompts: dict[str, list[int]],
                                                  method: str) -> None:
    prefill, decode, mixed = nodes[f"prefill_{method}"], nodes[f"decode_{method}"], nodes["mixed"]
    params = sampling(24, logprobs=5, ignore_eos=True)
    first_decode_chunk_sizes = []
    accepted_total = 0
    for name, ids in prompts.items():
        pd: Result = generate(decode, rid(f"{method}-{name}"), ids, params, prefill=prefill)
        ref: Result = generate(mixed, rid(f"plain-{name}"), ids, params)
        assert pd.finish_reason == ref.finish_reason == "length", pd.chunks[-1].error
        assert pd.token_ids == ref.token_ids, name
        assert_same_first_token(pd, ref)
        assert pd.tokens.token_ids == pd.token_ids
        assert pd.tokens.logprobs == pytest.approx(ref.tokens.logprobs, abs=1e-4)
        assert len(pd.chunks[0].tokens.token_ids) == 1  # the prefill node's first token, on its own, at once
        first_decode_chunk_sizes.append(len(pd.chunks[1].tokens.token_ids))
        metrics = pd.chunks[-1].speculate_metrics
        assert 0 <= metrics.accepted_tokens <= len(pd.token_ids) - 1  # the first token is no draft's
        accepted_total += metrics.accepted_tokens
        assert not ref.chunks[-1].HasField("speculate_metrics")  # the reference really is plain decoding
    assert accepted_total > 0
    # The decode node's Prometheus counters add up the same per-request metrics.
    assert scrape_metric(decode.metrics_port, "pdserve_spec_accepted_tokens_total", {}) == accepted_total
    # D's first step only has P's drafts to verify: more than one token there means they were accepted.
    assert max(first_decode_chunk_sizes) >= 2, first_decode_chunk_sizes
    assert wait_until(lambda: prefill.all_blocks_free() and decode.all_blocks_free(), 2.0), (
        prefill.stats(), decode.stats())
