"""`pdserve generate --speculative-config` through a real engine process and the SysV output queue:
greedy tokens equal the plain run, and every output line carries consistent speculate_metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HYBRID = '{"method": "mtp", "num_speculative_tokens": 5, "num_model_steps": 1, "mtp_strategy": "with_ngram"}'
ARGS = [
    "--prompt",
    "import os",
    "--prompt",
    "def f(",
    "--max-tokens",
    "24",
    "--json",
    "--threads",
    "1",
    "--num-blocks",
    "64",
    "--max-model-len",
    "256",
]


def generate(*extra: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "generate", *ARGS, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_generate_with_speculative_config_reports_metrics() -> None:
    plain = generate()
    spec = generate("--speculative-config", HYBRID)
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    assert all("speculate_metrics" not in r for r in plain)
    for result in spec:
        m = result["speculate_metrics"]
        per_head = m["accepted_tokens_per_head"]
        assert len(per_head) == 6 and len(m["accept_ratio_per_head"]) == 5
        # Every token after the prefill's first one came from a decode step.
        assert m["accepted_tokens"] == sum(per_head) == len(result["token_ids"]) - 1
        assert m["rejected_tokens"] == per_head[0] * 6 - m["accepted_tokens"]


def test_generate_rejects_a_bad_speculative_config() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "generate",
            "--prompt",
            "x",
            "--speculative-config",
            '{"method": "mtp", "num_speculative_tokens": 2, '
            '"num_model_steps": 3, "mtp_strategy": "with_ngram"}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "num_model_steps" in done.stderr
