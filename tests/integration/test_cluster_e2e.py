"""End to end: `pdserve up` (router + prefill + decode nodes, real processes) driven by the official
`openai` client, compared with the offline mixed engine (`pdserve generate`) on the same model.

PD with speculative decoding must give the mixed node's greedy tokens and logprobs exactly; usage,
speculate_metrics, streaming and chat must be what the OpenAI API promises.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer

SPEC = '{"method": "mtp", "num_speculative_tokens": 1, "num_model_steps": 1}'
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main(argv):", "class Stack:"]
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--prefill", "1", "--decode", "1",
         "--speculative-config", SPEC, "--num-blocks", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    line = ""
    while time.monotonic() < deadline and "pdserve is up" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"pdserve up exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    assert "pdserve is up" in line
    yield f"http://127.0.0.1:{port}/v1"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    leftover = subprocess.run(["pgrep", "-f", f"--registry http://127.0.0.1:{port}"], capture_output=True)
    assert leftover.stdout == b"", "pdserve up left node processes behind"


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """The mixed (single-engine) greedy output, without speculation."""
    argv = [sys.executable, "-m", "pdserve.cli", "generate", "--json", "--max-tokens", str(MAX_TOKENS),
            "--logprobs", "2", "--threads", "1"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True).stdout
    return {row["prompt"]: row for row in map(json.loads, out.splitlines())}


def test_pd_completions_equal_the_mixed_engine(cluster, reference) -> None:
    client = OpenAI(base_url=cluster, api_key="unused")
    tokenizer = Tokenizer.from_dir(default_model_dir())
    for prompt in PROMPTS:
        response = client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, logprobs=2)
        choice = response.choices[0]
        expected = reference[prompt]
        assert choice.text == expected["text"]
        assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert response.usage.completion_tokens == len(expected["token_ids"])
        assert choice.finish_reason == expected["finish_reason"]
        assert choice.logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-4)
        top = [lp for d in choice.logprobs.top_logprobs for lp in sorted(d.values(), reverse=True)]
        assert top == pytest.approx([lp for row in expected["top_logprobs"] for _, lp in row], abs=1e-4)
        metrics = response.model_extra.get("speculate_metrics") or choice.model_extra.get("speculate_metrics")
        assert metrics is not None and metrics["accepted_tokens"] + metrics["rejected_tokens"] > 0


def test_pd_streaming_and_chat(cluster, reference) -> None:
    client = OpenAI(base_url=cluster, api_key="unused")
    prompt = PROMPTS[0]
    stream = client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[prompt]["text"]
    assert chunks[-1].usage.completion_tokens == len(reference[prompt]["token_ids"])
    chat = client.chat.completions.create(model="pdserve-demo", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "def add(a, b):"}],
                                          logprobs=True, top_logprobs=3)
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)
