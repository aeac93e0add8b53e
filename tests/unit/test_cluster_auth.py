"""The cluster secret and what is derived from it: signed data-plane messages (MAC, expiry, replay),
sealed registry entries, and the node RPC credential."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
from pathlib import Path

import grpc
import msgspec
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.secret import (
    ClusterSecret,
    ClusterSecretError,
    add_cluster_secret_flags,
    require_secret_or_insecure,
    secret_from_args,
)
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc import node_pb2_grpc
from pdserve.rpc.auth import RequireToken, auth_metadata
from pdserve.rpc.registry import NodeInfo, RegistryAuth, RegistryAuthError
from pdserve.transfer.auth import AuthReject, MessageSigner, MessageVerifier
from pdserve.transfer.messages import Abort, KVTarget, LeaseRenewal, PrefillTask, WireCodec

SECRET = ClusterSecret(b"unit-test-cluster-secret-0001")
OTHER = ClusterSecret(b"unit-test-cluster-secret-0002")
SPEC = KVCacheSpec(num_layers=2, num_blocks=64, block_size=4, num_kv_heads=2, head_dim=8)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def task(request_id: str = "r1", block_ids: tuple[int, ...] = (3, 4)) -> PrefillTask:
    target = KVTarget("tcp://127.0.0.1:5555", "host-a", SPEC, shm_name="pdserve-kv-x")
    return PrefillTask(request_id=request_id, prompt_token_ids=(1, 2, 3, 4, 5), sampling=SamplingParams(),
                       block_ids=block_ids, decode_node_id="decode-0", kv_target=target, lease_ms=5000)


# -- the secret ---------------------------------------------------------------------------------------

def test_the_secret_never_shows_and_must_be_long_enough(tmp_path: Path) -> None:
    assert b"unit-test" not in repr(SECRET).encode()
    with pytest.raises(ClusterSecretError, match="16-4096 bytes"):
        ClusterSecret(b"short")
    path = SECRET.write(tmp_path / "secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ClusterSecret.from_file(path) == SECRET
    with pytest.raises(FileExistsError):
        SECRET.write(path)  # never overwrites a secret in place
    assert SECRET.derive("a") != SECRET.derive("b") != OTHER.derive("a")
    assert ClusterSecret.generate() != ClusterSecret.generate()


def test_flags_name_a_file_or_a_variable_or_opt_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_cluster_secret_flags(parser)
    path = SECRET.write(tmp_path / "secret")
    assert secret_from_args(parser.parse_args(["--cluster-secret-file", str(path)])) == SECRET
    monkeypatch.setenv("MY_CLUSTER_SECRET", SECRET.value.decode())
    assert secret_from_args(parser.parse_args(["--cluster-secret-env", "MY_CLUSTER_SECRET"])) == SECRET
    assert secret_from_args(parser.parse_args(["--insecure"])) is None
    with pytest.raises(ClusterSecretError, match="no cluster secret"):
        secret_from_args(parser.parse_args([]))  # on by default: nothing named is an error
    with pytest.raises(ClusterSecretError, match="NOT_SET_ANYWHERE"):
        secret_from_args(parser.parse_args(["--cluster-secret-env", "NOT_SET_ANYWHERE"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--insecure", "--cluster-secret-file", str(path)])
    with pytest.raises(ClusterSecretError, match="needs a cluster secret"):
        require_secret_or_insecure(None, False, "the router")


# -- signed data-plane messages -----------------------------------------------------------------------

def test_a_signed_task_passes_once_and_survives_the_wire() -> None:
    clock = Clock()
    signer, verifier = MessageSigner(SECRET, clock=clock), MessageVerifier(SECRET, clock=clock)
    codec = WireCodec()
    signed = codec.decode(codec.encode(signer.sign(task())))
    assert verifier.check(signed) is None
    assert verifier.check(signed) is AuthReject.REPLAYED
    assert verifier.check(signer.sign(task())) is None  # the same task signed again is a new message
    for message in (LeaseRenewal("r1", 1000), Abort("r1", "gone")):
        assert verifier.check(signer.sign(message)) is None


@pytest.mark.parametrize("field, value", [("block_ids", (3, 5)), ("request_id", "r2"),
                                          ("decode_node_id", "decode-9"), ("lease_ms", 9000),
                                          ("prompt_token_ids", (1, 2, 3, 4, 6))])
def test_any_change_to_a_signed_task_breaks_its_mac(field: str, value: object) -> None:
    signed = MessageSigner(SECRET).sign(task())
    forged = msgspec.structs.replace(signed, **{field: value})
    assert MessageVerifier(SECRET).check(forged) is AuthReject.BAD_MAC


def test_the_pool_a_task_points_at_is_signed_too() -> None:
    signed = MessageSigner(SECRET).sign(task())
    elsewhere = msgspec.structs.replace(signed.kv_target, shm_name="pdserve-kv-other")
    redirected = msgspec.structs.replace(signed, kv_target=elsewhere)
    assert MessageVerifier(SECRET).check(redirected) is AuthReject.BAD_MAC


def test_unsigned_and_foreign_messages_are_refused() -> None:
    verifier = MessageVerifier(SECRET)
    assert verifier.check(task()) is AuthReject.UNSIGNED
    assert verifier.check(MessageSigner(OTHER).sign(task())) is AuthReject.BAD_MAC
    signed = MessageSigner(SECRET).sign(task())
    stripped = msgspec.structs.replace(signed, auth=msgspec.structs.replace(signed.auth, mac=b""))
    assert verifier.check(stripped) is AuthReject.UNSIGNED
    assert len(verifier) == 0  # nothing unverified is remembered


def test_expired_and_too_long_lived_messages_are_refused() -> None:
    clock = Clock()
    verifier = MessageVerifier(SECRET, max_validity_s=60.0, max_clock_skew_s=5.0, clock=clock)
    old = MessageSigner(SECRET, validity_s=30.0, clock=clock).sign(task())
    clock.now += 30.0 + 5.0 + 0.01
    assert verifier.check(old) is AuthReject.EXPIRED
    long_lived = MessageSigner(SECRET, validity_s=3600.0, clock=clock).sign(task())
    assert verifier.check(long_lived) is AuthReject.TOO_LONG_LIVED


def test_seen_nonces_are_kept_only_while_their_message_lives() -> None:
    clock = Clock()
    signer = MessageSigner(SECRET, validity_s=10.0, clock=clock)
    verifier = MessageVerifier(SECRET, max_clock_skew_s=1.0, max_nonces=3, clock=clock)
    messages = [signer.sign(task(f"r{i}")) for i in range(4)]
    assert [verifier.check(m) for m in messages] == [None, None, None, AuthReject.NONCE_CACHE_FULL]
    clock.now += 11.5  # every one expired: forgotten, and a replay is refused as expired
    assert verifier.check(signer.sign(task("r9"))) is None
    assert len(verifier) == 1
    assert verifier.check(messages[0]) is AuthReject.EXPIRED


# -- registry entries ---------------------------------------------------------------------------------

NODE = NodeInfo(node_id="decode-0", role="decode", model="m", grpc_address="127.0.0.1:7001")


def test_sealed_registry_entries_open_only_with_the_secret() -> None:
    clock, rejected = Clock(), []
    router = RegistryAuth(SECRET, max_age_s=10.0, clock=clock)
    router.on_reject = rejected.append
    assert router.open(RegistryAuth(SECRET, clock=clock).seal(NODE)) == NODE
    for data, reason in [(RegistryAuth(None).seal(NODE), "unsigned"),
                         (RegistryAuth(OTHER, clock=clock).seal(NODE), "bad_mac"),
                         (b'{"node_id": "x"}', "malformed")]:
        with pytest.raises(RegistryAuthError) as info:
            router.open(data)
        assert info.value.reason == reason
    sealed = RegistryAuth(SECRET, clock=clock).seal(NODE)
    forged = sealed.replace(b"127.0.0.1:7001", b"10.6.6.6:7001")
    with pytest.raises(RegistryAuthError, match="wrong signature"):
        router.open(forged)
    clock.now += 10.5
    with pytest.raises(RegistryAuthError, match="signed 10.5 s ago"):
        router.open(sealed)  # a replayed old heartbeat cannot revive a node
    assert rejected == ["unsigned", "bad_mac", "malformed", "bad_mac", "stale"]


def test_an_insecure_registry_takes_unsigned_entries_and_removals() -> None:
    insecure = RegistryAuth(None)
    assert insecure.open(insecure.seal(NODE)) == NODE
    insecure.check_removal("decode-0", "")


def test_removals_need_a_fresh_token_for_that_node() -> None:
    clock = Clock()
    auth = RegistryAuth(SECRET, max_age_s=10.0, clock=clock)
    token = auth.removal_token("decode-0")
    auth.check_removal("decode-0", token)
    for node_id, bad in [("decode-1", token), ("decode-0", ""), ("decode-0", "123.abc"),
                         ("decode-0", RegistryAuth(OTHER, clock=clock).removal_token("decode-0"))]:
        with pytest.raises(RegistryAuthError):
            auth.check_removal(node_id, bad)
    clock.now += 11
    with pytest.raises(RegistryAuthError, match="stale"):
        auth.check_removal("decode-0", token)


# -- node RPCs ----------------------------------------------------------------------------------------

def test_node_rpcs_need_the_credential_but_health_stays_open() -> None:
    rejected: list[str] = []

    async def scenario() -> None:
        server = grpc.aio.server(interceptors=[RequireToken(SECRET, rejected.append)])
        node_pb2_grpc.add_NodeServicer_to_server(node_pb2_grpc.NodeServicer(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                node = node_pb2_grpc.NodeStub(channel)
                codes = []
                for metadata in [(), auth_metadata(OTHER), auth_metadata(SECRET)]:
                    try:
                        await node.Stats(pb.StatsRequest(), metadata=metadata, timeout=5)
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code())
                    try:
                        async for _ in node.Generate(pb.GenerateRequest(request_id="x"), metadata=metadata,
                                                     timeout=5):
                            pass
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code())
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                        timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)
        unauthenticated, passed = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED
        assert codes == [unauthenticated] * 4 + [passed] * 2  # with the credential: the servicer answers

    asyncio.run(scenario())
    assert rejected == ["missing_token", "missing_token", "bad_token", "bad_token"]


def test_a_generated_secret_file_is_private(tmp_path: Path) -> None:
    path = ClusterSecret.generate().write(tmp_path / "s")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(ClusterSecret.from_file(path).value) == 64
