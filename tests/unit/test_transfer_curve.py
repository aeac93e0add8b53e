"""CURVE on the zmq data plane: keys from files; only authorized clients get a message through."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.transfer.channel import Outbox, TransferError, create_curve_keys
from pdserve.transfer.config import CurveClientKeys, CurveServerKeys, TransferConfig, TransferConfigError
from pdserve.transfer.endpoint import KVEndpoint
from pdserve.transfer.messages import Abort
from pdserve.transfer.receiver import ChunkResult
from pdserve.transfer.transport import KVChunker, open_kv_sender

SPEC = KVCacheSpec(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
REFUSED_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Keys:
    server_public: Path
    server_secret: Path
    authorized_dir: Path
    client_secret: Path
    stranger_secret: Path  # a well-formed key pair the server does not know


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    server_public, server_secret = create_curve_keys(tmp_path / "server", "server")
    client_public, client_secret = create_curve_keys(tmp_path / "clients", "prefill-0")
    _, stranger_secret = create_curve_keys(tmp_path / "strangers", "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / client_public.name).write_bytes(client_public.read_bytes())
    return Keys(server_public, server_secret, authorized, client_secret, stranger_secret)


@pytest.fixture
def secure_endpoint(keys: Keys) -> Iterator[tuple[KVEndpoint, queue.Queue[object]]]:
    events: queue.Queue[object] = queue.Queue()
    pool = KVCachePool.allocate(SPEC)
    config = TransferConfig(curve_server=CurveServerKeys(keys.server_secret, keys.authorized_dir))
    endpoint = KVEndpoint(pool, config, events.put).start()
    yield endpoint, events
    endpoint.close()


def client_config(secret: Path, keys: Keys, timeout_s: float = 5.0) -> TransferConfig:
    return TransferConfig(send_timeout_s=timeout_s, curve_client=CurveClientKeys(secret, keys.server_public))


Secure = tuple[KVEndpoint, queue.Queue[object]]


def test_authorized_client_delivers_kv(keys: Keys, secure_endpoint: Secure) -> None:
    endpoint, events = secure_endpoint
    src = KVCachePool.allocate(SPEC)
    src.array[...] = np.random.default_rng(0).standard_normal(SPEC.shape)
    endpoint.reservations.reserve("r", [6, 2], 7, lease_s=30.0)
    outbox = Outbox(endpoint.address, client_config(keys.client_secret, keys))
    try:
        sender = open_kv_sender("zmq", outbox, endpoint.target(), SPEC)
        chunker = KVChunker("r", [6, 2], 7, SPEC.num_layers, SPEC.block_size)
        sender.send_chunk(chunker.next_chunk([0, 1], 7), src)
        result = events.get(timeout=5.0)
    finally:
        outbox.close()
    assert isinstance(result, ChunkResult) and result.complete
    np.testing.assert_array_equal(endpoint.pool.array[:, :, [6, 2]], src.array[:, :, [0, 1]])


@pytest.mark.parametrize("who", ["no_curve", "unknown_key"])
def test_unauthenticated_client_is_refused(
        keys: Keys, secure_endpoint: Secure, who: str) -> None:
    endpoint, events = secure_endpoint
    config = (TransferConfig(send_timeout_s=REFUSED_TIMEOUT_S) if who == "no_curve"
              else client_config(keys.stranger_secret, keys, REFUSED_TIMEOUT_S))
    outbox = Outbox(endpoint.address, config)
    try:
        with pytest.raises(TransferError, match="refused the handshake"):
            outbox.send(Abort("r", "from a stranger"))
    finally:
        outbox.close()
    assert events.empty()
    # The endpoint still serves authorized peers afterwards.
    trusted = Outbox(endpoint.address, client_config(keys.client_secret, keys))
    try:
        trusted.send(Abort("r", "trusted"))
        assert events.get(timeout=5.0) == Abort("r", "trusted")
    finally:
        trusted.close()


def test_missing_key_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(TransferConfigError, match="curve_server.secret_file"):
        CurveServerKeys(tmp_path / "nope.key_secret", tmp_path)
    with pytest.raises(TransferConfigError, match="curve_client.server_public_file"):
        _, secret = create_curve_keys(tmp_path, "c")
        CurveClientKeys(secret, tmp_path / "nope.key")
