"""CURVE on the zmq data plane: keys derived from the cluster secret; only a peer holding the same
secret gets a message through."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import numpy as np
import pytest

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.secret import ClusterSecret
from pdserve.transfer.channel import Outbox, TransferError
from pdserve.transfer.config import CurveKeys, TransferConfig, TransferConfigError
from pdserve.transfer.endpoint import KVEndpoint
from pdserve.transfer.messages import Abort
from pdserve.transfer.receiver import ChunkResult
from pdserve.transfer.transport import KVChunker, open_kv_sender

SPEC = KVCacheSpec(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
REFUSED_TIMEOUT_S = 0.5
SECRET = ClusterSecret(b"the-cluster-secret-of-this-test")
OTHER_SECRET = ClusterSecret(b"a-different-cluster-secret-entirely")

Secure = tuple[KVEndpoint, queue.Queue[object]]


@pytest.fixture
def secure_endpoint() -> Iterator[Secure]:
    events: queue.Queue[object] = queue.Queue()
    pool = KVCachePool.allocate(SPEC)
    config = TransferConfig(curve=CurveKeys.from_cluster_secret(SECRET))
    endpoint = KVEndpoint(pool, config, events.put).start()
    yield endpoint, events
    endpoint.close()


def client_config(secret: ClusterSecret | None, timeout_s: float = 5.0) -> TransferConfig:
    curve = CurveKeys.from_cluster_secret(secret) if secret is not None else None
    return TransferConfig(send_timeout_s=timeout_s, curve=curve)


def test_keys_are_derived_from_the_secret_alone() -> None:
    a, b = CurveKeys.from_cluster_secret(SECRET), CurveKeys.from_cluster_secret(SECRET)
    assert a == b and len(a.public) == 40
    assert CurveKeys.from_cluster_secret(OTHER_SECRET).public != a.public
    assert a.secret.decode() not in repr(a)
    with pytest.raises(TransferConfigError, match="curve"):
        CurveKeys(public=b"short", secret=b"short")


def test_a_peer_with_the_secret_delivers_kv(secure_endpoint: Secure) -> None:
    endpoint, events = secure_endpoint
    src = KVCachePool.allocate(SPEC)
    src.array[...] = np.random.default_rng(0).standard_normal(SPEC.shape)
    endpoint.reservations.reserve("r", [6, 2], 7, lease_s=30.0)
    outbox = Outbox(endpoint.address, client_config(SECRET))
    try:
        sender = open_kv_sender("zmq", outbox, endpoint.target(), SPEC)
        chunker = KVChunker("r", [6, 2], 7, SPEC.num_layers, SPEC.block_size)
        sender.send_chunk(chunker.next_chunk([0, 1], 7), src)
        result = events.get(timeout=5.0)
    finally:
        outbox.close()
    assert isinstance(result, ChunkResult) and result.complete
    np.testing.assert_array_equal(endpoint.pool.array[:, :, [6, 2]], src.array[:, :, [0, 1]])


@pytest.mark.parametrize("who", ["no_curve", "other_secret"])
def test_a_peer_without_the_secret_cannot_push_kv(secure_endpoint: Secure, who: str) -> None:
    endpoint, events = secure_endpoint
    before = endpoint.pool.array.copy()
    endpoint.reservations.reserve("r", [6, 2], 7, lease_s=30.0)
    src = KVCachePool.allocate(SPEC)
    src.array[...] = 1.0
    outbox = Outbox(endpoint.address, client_config(None if who == "no_curve" else OTHER_SECRET,
                                                    REFUSED_TIMEOUT_S))
    try:
        sender = open_kv_sender("zmq", outbox, endpoint.target(), SPEC)
        chunker = KVChunker("r", [6, 2], 7, SPEC.num_layers, SPEC.block_size)
        with pytest.raises(TransferError, match="refused the handshake"):
            sender.send_chunk(chunker.next_chunk([0, 1], 7), src)
        with pytest.raises(TransferError, match="refused the handshake"):
            outbox.send(Abort("r", "from a stranger"))
    finally:
        outbox.close()
    assert events.empty()
    np.testing.assert_array_equal(endpoint.pool.array, before)
    # The endpoint still serves peers holding the secret afterwards.
    trusted = Outbox(endpoint.address, client_config(SECRET))
    try:
        trusted.send(Abort("r", "trusted"))
        assert events.get(timeout=5.0) == Abort("r", "trusted")
    finally:
        trusted.close()
