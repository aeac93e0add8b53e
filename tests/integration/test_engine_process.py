"""The engine in its own process: `EngineClient`, the task pipe, the SysV record stream, the CLI.

Every test runs real processes on the bundled demo model and checks that no SysV queue and no
/dev/shm KV pool outlives it, whichever side died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sysv_ipc

from pdserve.common.leftovers import pid_alive
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.protocol import (
    PROTOCOL_VERSION,
    EngineProcessConfig,
    EngineReady,
    GenerateTask,
    RequestRejected,
    ShutdownTask,
    StepOutputs,
    decode_config,
    encode_config,
    encode_task,
    write_frame,
)
from pdserve.engine.request import RequestStatus
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_client import EngineClient, EngineClientConfig, EngineError
from pdserve.node.engine_stream import EngineExited, RecordReader
from pdserve.node.offline import generate
from pdserve.tests.support.cluster import queue_exists, wait_until
from pdserve.tests.support.secret import secret_flags

ENGINE = EngineConfig(
    cache=CacheConfig(num_blocks=128, block_size=16),
    scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, max_model_len=512),
)
PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n"]
EXIT_BOUND_S = 15.0  # an orphaned or failed engine must be gone within this
SHM_DIR = Path("/dev/shm")


def client_config(**overrides: object) -> EngineClientConfig:
    fields: dict[str, object] = {"model_dir": str(default_model_dir()), "engine": ENGINE,
                                 "eos_token_ids": (0,), "omp_num_threads": 1, "startup_timeout_s": 90.0}
    return EngineClientConfig(**{**fields, **overrides})


def queue_is_full(key: int) -> bool:
    """The queue holds messages and none arrived for 0.3 s although the writer has more to send."""
    queue = sysv_ipc.MessageQueue(key)
    before = queue.current_messages
    time.sleep(0.3)
    return before > 0 and queue.current_messages == before


def engine_process_config(pid: int) -> EngineProcessConfig:
    """The config an engine process was started with, from its command line (the queue key is in it)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return decode_config(argv[argv.index(b"pdserve.engine.process") + 1].decode())


@dataclass
class Resources:
    """SysV queue keys and /dev/shm files a test created, all of which must be gone when it ends."""

    queue_keys: list[int] = field(default_factory=list)
    shm_names: list[str] = field(default_factory=list)
    engine_pids: list[int] = field(default_factory=list)

    def track_client(self, client: EngineClient) -> None:
        self.engine_pids.append(client.pid)
        self.queue_keys.append(engine_process_config(client.pid).records.key)
        if client.ready.kv_pool_name:
            self.shm_names.append(client.ready.kv_pool_name)


@pytest.fixture
def resources() -> Iterator[Resources]:
    tracked = Resources()
    yield tracked
    leaked_pids = [pid for pid in tracked.engine_pids if pid_alive(pid)]
    leaked_queues = [key for key in tracked.queue_keys if queue_exists(key)]
    leaked_shm = [name for name in tracked.shm_names if (SHM_DIR / name).exists()]
    for pid in leaked_pids:  # clean up what a failing test left, then fail it
        os.kill(pid, signal.SIGKILL)
    for key in leaked_queues:
        sysv_ipc.MessageQueue(key).remove()
    for name in leaked_shm:
        (SHM_DIR / name).unlink(missing_ok=True)
    assert not (leaked_pids or leaked_queues or leaked_shm), (
        f"left behind: engines {leaked_pids}, queues {leaked_queues}, shm {leaked_shm}")


@pytest.fixture(scope="module")
def shared_client() -> Iterator[EngineClient]:
    """One engine (KV pool in /dev/shm) for the tests that do not kill anything."""
    client = EngineClient(client_config(shared_kv_pool=True))
    client.start()
    key = engine_process_config(client.pid).records.key
    pool = SHM_DIR / client.ready.kv_pool_name
    assert queue_exists(key) and pool.exists()
    yield client
    client.close()
    assert not queue_exists(key) and not pool.exists()


def receive_until_done(client: EngineClient, request_ids: set[str],
                       on_step: Callable[[StepOutputs], None] | None = None
                       ) -> dict[str, list[RequestStatus]]:
    """Statuses per request until each one finished (the client's receive blocks: pytest's timeout
    bounds a test that never gets there)."""
    statuses: dict[str, list[RequestStatus]] = {r: [] for r in request_ids}
    while any(not (s and s[-1].is_finished) for s in statuses.values()):
        record = client.receive()
        assert not isinstance(record, EngineExited), statuses
        if not isinstance(record, StepOutputs):
            continue
        for output in record.outputs:
            if output.request_id in statuses:
                statuses[output.request_id].append(output.status)
        if on_step is not None:
            on_step(record)
    return statuses


# -- the offline path ----------------------------------------------------------------------------------


def in_process_greedy(prompt_ids: list[list[int]], max_tokens: int, logprobs: int) -> list[dict]:
    """The same request through an `LLMEngine` in this process: the CLI's expected output."""
    from pdserve.common.kv_cache import KVCachePool
    from pdserve.engine.engine import LLMEngine, kv_spec_for
    from pdserve.models.loader import load_model

    model = load_model(default_model_dir())
    engine = LLMEngine(model, ENGINE, KVCachePool.allocate(kv_spec_for(model, ENGINE)), (0,))
    for i, ids in enumerate(prompt_ids):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                        logprobs=logprobs))
    results = {f"r{i}": {"token_ids": [], "logprobs": [], "top": []} for i in range(len(prompt_ids))}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            results[out.request_id]["token_ids"] += out.tokens.token_ids
            results[out.request_id]["logprobs"] += out.tokens.logprobs
            results[out.request_id]["top"] += [[t for t, _ in out.tokens.top(i)]
                                               for i in range(len(out.tokens))]
    assert not engine.has_unfinished()
    return [results[f"r{i}"] for i in range(len(prompt_ids))]


def test_cli_generate_json_equals_the_in_process_engine(tokenizer: Tokenizer) -> None:
    cmd = [sys.executable, "-m", "pdserve.cli", "generate", "--json", "--max-tokens", "10",
           "--logprobs", "3", "--threads", "1", "--num-blocks", "64"]
    for prompt in PROMPTS:
        cmd += ["--prompt", prompt]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    expected = in_process_greedy([tokenizer.encode(p) for p in PROMPTS], max_tokens=10, logprobs=3)
    assert [line["prompt"] for line in lines] == PROMPTS
    for line, ref in zip(lines, expected, strict=True):
        assert line["token_ids"] == ref["token_ids"] and len(ref["token_ids"]) == 10
        assert line["text"] == tokenizer.decode(ref["token_ids"])
        assert line["finish_reason"] == "length"
        assert line["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-5)
        assert [[pair[0] for pair in top] for top in line["top_logprobs"]] == ref["top"]


def test_stop_string_cuts_the_text_and_finishes_with_stop(shared_client: EngineClient,
                                                          tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0)
    full = generate(shared_client, tokenizer, [PROMPTS[1]], params)[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    stop = full.text[8:12]
    cut = full.text[: full.text.find(stop)]
    stopped = generate(shared_client, tokenizer, [PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0.0,
                                                                               stop=(stop,)))[0]
    assert stopped.text == cut and stopped.finish_reason == "stop"
    assert len(stopped.token_ids) < len(full.token_ids)


def test_abort_of_a_running_request_while_another_continues(shared_client: EngineClient,
                                                            tokenizer: Tokenizer) -> None:
    shared_client.generate("long", tokenizer.encode(PROMPTS[0]),
                           SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    shared_client.generate("short", tokenizer.encode(PROMPTS[1]),
                           SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    tokens = {"long": 0, "short": 0}

    def count_and_abort(step: StepOutputs) -> None:
        for output in step.outputs:
            if output.request_id in tokens:
                tokens[output.request_id] += len(output.tokens)
        if tokens["long"] >= 3:
            shared_client.abort("long")  # repeated until the engine's ABORTED output arrives: harmless

    statuses = receive_until_done(shared_client, {"long", "short"}, on_step=count_and_abort)
    assert statuses["long"][-1] is RequestStatus.FINISHED_ABORTED and 3 <= tokens["long"] < 400
    assert statuses["short"][-1] is RequestStatus.FINISHED_LENGTH and tokens["short"] == 30


def test_a_rejected_request_gets_a_clear_error_while_others_continue(shared_client: EngineClient,
                                                                     tokenizer: Tokenizer) -> None:
    too_long = "x = 1\n" * 400
    assert len(tokenizer.encode(too_long)) >= ENGINE.scheduler.max_model_len
    results = generate(shared_client, tokenizer, [too_long, PROMPTS[0]],
                       SamplingParams(max_tokens=6, temperature=0.0))
    assert results[0].finish_reason == "error" and "max_model_len" in results[0].error
    assert results[0].token_ids == []
    assert results[1].error is None and len(results[1].token_ids) == 6


@pytest.mark.parametrize("command", ["mixed", "generate"])
def test_a_dtype_the_cpu_cannot_compute_in_is_refused_at_start_naming_the_flag(command: str) -> None:
    args = ["--prompt", "x"] if command == "generate" else ["--port", "0", *secret_flags()]
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", command, "--dtype", "bfloat16",
                           "--threads", "1", "--num-blocks", "16", *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode != 0
    assert "--dtype bfloat16 does not run on the CPU" in done.stderr, done.stderr[-2000:]


# -- a raw engine process: what a broken or dying node server does to it ---------------------------------


class RawEngine:
    """An engine process started by hand, so a test can write any bytes into its task pipe."""

    def __init__(self, reader: RecordReader) -> None:
        self.reader = reader
        config = EngineProcessConfig(model_dir=str(default_model_dir()), engine=ENGINE,
                                     records=reader.address, eos_token_ids=(0,))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.engine.process", encode_config(config)],
            stdin=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert isinstance(reader.receive(), EngineReady)  # the first record

    def send_raw(self, payload: bytes) -> None:
        write_frame(self.process.stdin, payload)

    def records_until_exit(self) -> list[object]:
        """Every record until the process exits (nobody else reaps it here, so this does)."""
        self.reader.notify_exit(self.process.wait(timeout=EXIT_BOUND_S))
        records = []
        while not isinstance(record := self.reader.receive(), EngineExited):
            records.append(record)
        return records


def test_malformed_task_frames_are_dropped_and_the_engine_keeps_serving(tokenizer: Tokenizer) -> None:
    with RecordReader() as reader:
        engine = RawEngine(reader)
        try:
            valid = encode_task(GenerateTask("ok", tokenizer.encode(PROMPTS[0]),
                                             SamplingParams(max_tokens=5, temperature=0.0)))
            bad_params = valid.replace(b"max_tokens\x05", b"max_tokens\xff")  # -1 fails validation
            assert bad_params != valid
            wrong_version = bytes([PROTOCOL_VERSION + 1]) + valid[1:]
            not_msgpack = bytes([PROTOCOL_VERSION]) + b"\xc1"
            for garbage in (b"", wrong_version, not_msgpack, valid[:-3], bad_params, os.urandom(64)):
                engine.send_raw(garbage)
            engine.send_raw(valid)
            tokens, statuses = [], []
            while RequestStatus.FINISHED_LENGTH not in statuses:
                record = reader.receive()
                assert not isinstance(record, RequestRejected), record  # garbage is dropped, not admitted
                for output in record.outputs if isinstance(record, StepOutputs) else ():
                    assert output.request_id == "ok"
                    tokens += output.tokens.token_ids
                    statuses.append(output.status)
            assert len(tokens) == 5
            engine.send_raw(encode_task(ShutdownTask()))
            engine.process.stdin.close()
            assert not any(isinstance(r, RequestRejected) for r in engine.records_until_exit())
            assert engine.process.returncode == 0
        finally:
            if engine.process.poll() is None:
                engine.process.kill()
            engine.process.wait()


PARENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pdserve.node.engine_client import EngineClient, EngineClientConfig
    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.common.sampling_params import SamplingParams
    model_dir, num_requests = sys.argv[1], int(sys.argv[2])
    engine = EngineConfig(cache=CacheConfig(num_blocks=128, block_size=16))
    client = EngineClient(EngineClientConfig(model_dir=model_dir, engine=engine, eos_token_ids=(0,),
                                             shared_kv_pool=True, startup_timeout_s=90.0))
    ready = client.start()
    for i in range(num_requests):
        client.generate(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True,
                                                           logprobs=20))
    print(json.dumps({"pid": client.pid, "pool": ready.kv_pool_name}), flush=True)
    time.sleep(600)  # never reads a single output: the queue fills up, then this process is killed
""")


@pytest.mark.parametrize("num_requests", [0, 4], ids=["idle-engine", "engine-blocked-on-a-full-queue"])
def test_engine_exits_cleanly_when_its_node_server_is_killed(resources: Resources, num_requests: int,
                                                            tmp_path: Path) -> None:
    stderr_path = tmp_path / "stderr.txt"  # the parent's and, inherited, its engine's
    with stderr_path.open("w") as stderr:
        parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(default_model_dir()),
                                   str(num_requests)], stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        started = json.loads(parent.stdout.readline())
        engine_pid = started["pid"]
        resources.engine_pids.append(engine_pid)
        resources.queue_keys.append(engine_process_config(engine_pid).records.key)
        resources.shm_names.append(started["pool"])
        if num_requests:  # let the unread outputs fill the 16 KiB queue: the engine now waits on it
            assert wait_until(lambda: queue_is_full(resources.queue_keys[-1]), 30)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        killed_at = time.monotonic()
        assert wait_until(lambda: not pid_alive(engine_pid), EXIT_BOUND_S), "orphaned engine kept running"
        assert time.monotonic() - killed_at < EXIT_BOUND_S
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stdout.close()
    log = stderr_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    if num_requests:  # blocked on the full queue, the writer's liveness check is what stopped it
        assert "reader is gone" in log, log[-3000:]
    # The resources fixture checks that the engine removed the queue and its KV pool on the way out.


def test_killed_engine_makes_receive_raise_and_close_cleans_up(resources: Resources,
                                                               tokenizer: Tokenizer) -> None:
    client = EngineClient(client_config(shared_kv_pool=True))
    client.start()
    try:
        resources.track_client(client)
        client.generate("r", tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=400, temperature=0.0,
                                                                         ignore_eos=True))
        while not isinstance(client.receive(), StepOutputs):  # its first tokens (after a stats record)
            pass
        os.kill(client.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # What the engine wrote before it died drains first; then the reaper's notice ends the stream.
        while not isinstance(record := client.receive(), EngineExited):
            assert time.monotonic() - killed_at < EXIT_BOUND_S, record
        assert record.returncode == -signal.SIGKILL
        with pytest.raises(EngineError):
            client.generate("late", [1, 2, 3], SamplingParams(max_tokens=2))
    finally:
        client.close()


# -- the stall watchdog --------------------------------------------------------------------------------


def test_a_stopped_engine_is_killed_after_the_stall_timeout(resources: Resources,
                                                            tokenizer: Tokenizer) -> None:
    client = EngineClient(client_config(shared_kv_pool=True, stall_timeout_s=2.0))
    client.start()
    try:
        resources.track_client(client)
        client.generate("r", tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=400, temperature=0.0,
                                                                         ignore_eos=True))
        while not isinstance(client.receive(), StepOutputs):
            pass
        os.kill(client.pid, signal.SIGSTOP)  # alive, holding its request, silent
        stopped_at = time.monotonic()
        while not isinstance(record := client.receive(), EngineExited):
            pass  # what it wrote before the stop
        waited = time.monotonic() - stopped_at
        assert record.returncode == -signal.SIGKILL
        assert 2.0 <= waited < 2.0 + 1.5, f"killed {waited:.2f} s after it stopped"
        assert client.stalled is not None and "no record for" in client.stalled, client.stalled
    finally:
        client.close()


def test_an_idle_engine_is_not_taken_for_a_stalled_one(tokenizer: Tokenizer) -> None:
    # A stall timeout just above the engine's one-second stats: only those keep this engine alive.
    client = EngineClient(client_config(stall_timeout_s=1.6))
    client.start()
    try:
        until = time.monotonic() + 4.0
        while time.monotonic() < until:  # idle: nothing but stats records
            assert not isinstance(client.receive(), EngineExited), client.stalled
        assert client.alive() and client.stalled is None
        client.generate("after", tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=4, temperature=0.0))
        assert receive_until_done(client, {"after"})["after"][-1].is_finished
    finally:
        client.close()


@pytest.mark.parametrize("stall_timeout_s", [0.5, 1.0, 4000.0])
def test_a_stall_timeout_the_engine_cannot_meet_is_refused(stall_timeout_s: float) -> None:
    with pytest.raises(ValueError, match="stall_timeout_s"):
        client_config(stall_timeout_s=stall_timeout_s)
