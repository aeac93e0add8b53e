"""The registry's record of one node, shared by the router (which stores and reads it) and the nodes
(which heartbeat it): the record, its JSON codec, its signature, where it lives in Redis, and the
router's HTTP paths for heartbeats.

On the wire and in Redis a record travels sealed in a `RegistryEntry`: the node's JSON, when it was
signed, and an HMAC of both under a key derived from the cluster secret. A router with the secret
takes only entries whose MAC checks and whose signing time is within the heartbeat TTL (a replayed
old heartbeat cannot revive a node); `RegistryAuth.open` says why it refused one, for the counters.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis

from pdserve.common.secret import ClusterSecret, mac, mac_matches

HEARTBEAT_PATH = "/internal/v1/nodes/heartbeat"
NODES_PATH = "/internal/v1/nodes"


class Role(enum.StrEnum):
    """What a node does. Its gRPC services follow: every node serves Node.Stats/Drain and health;
    decode and mixed nodes serve Generate (a prefill node answers it UNIMPLEMENTED) and prefill nodes
    take their work on the KV data plane."""

    PREFILL = "prefill"  # prefills prompts for decode nodes, pushes their KV
    DECODE = "decode"  # owns requests, takes KV from prefill nodes, decodes
    MIXED = "mixed"  # prefills and decodes in one engine (the single-node baseline)


REDIS_KEY_PREFIX = "pdserve:node:"


class NodeInfoError(ValueError):
    """A node's registration is malformed; the message names the field."""


class NodeInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node_id: str
    role: Role
    model: str
    grpc_address: str  # host:port of the node's Node service
    data_address: str = ""  # host:port of its KV data plane (prefill/decode)
    capacity: int = 1  # requests it runs at once (its max_num_seqs)
    load: float = 0.0  # requests running + waiting, as the node last reported
    draining: bool = False
    last_seen: float = 0.0  # unix time of the last heartbeat, set by whoever stores the entry

    def __post_init__(self) -> None:
        checks = [
            ("node_id", 0 < len(self.node_id) <= 128, "must be 1-128 characters"),
            ("model", bool(self.model), "must be non-empty"),
            ("grpc_address", self.grpc_address.rpartition(":")[2].isdigit(), "must be host:port"),
            ("capacity", self.capacity >= 1, "must be >= 1"),
            ("load", self.load >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise NodeInfoError(f"{name} {why} (got {getattr(self, name)!r})")

    def seen_now(self) -> NodeInfo:
        return msgspec.structs.replace(self, last_seen=time.time())


def encode_node(node: NodeInfo) -> bytes:
    return msgspec.json.encode(node)


def decode_node(data: bytes | str) -> NodeInfo:
    """Raises NodeInfoError for anything that is not a valid NodeInfo JSON object."""
    try:
        return msgspec.json.decode(data, type=NodeInfo)
    except msgspec.ValidationError as e:
        raise NodeInfoError(str(e)) from e
    except msgspec.DecodeError as e:
        raise NodeInfoError(f"not valid JSON: {e}") from e


class RegistryEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: msgspec.Raw  # the NodeInfo's JSON exactly as signed
    signed_at_ms: int = 0  # unix time
    mac: str = ""  # hex HMAC of (node JSON, signed_at_ms); empty in an insecure cluster


class RegistryAuthError(ValueError):
    """An entry the registry refuses; `reason` labels the counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_REGISTRY_PURPOSE = "registry"
MAX_CLOCK_SKEW_S = 5.0  # a node's clock may run this far ahead of the router's
_entry_decoder = msgspec.json.Decoder(RegistryEntry)


class RegistryAuth:
    """Seals entries (nodes, and routers writing Redis) and opens them (routers).

    Without a secret (an insecure cluster) entries are sealed unsigned and any valid one is taken.
    `on_reject(reason)` counts refusals; `max_age_s` is the oldest signature accepted.
    """

    def __init__(self, secret: ClusterSecret | None, max_age_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._key = secret.derive(_REGISTRY_PURPOSE) if secret is not None else None
        self._max_age_ms = int(max_age_s * 1000)
        self._clock = clock
        self.on_reject: Callable[[str], None] = lambda reason: None

    @property
    def secure(self) -> bool:
        return self._key is not None

    def seal(self, node: NodeInfo) -> bytes:
        body = encode_node(node)
        now_ms = int(self._clock() * 1000)
        tag = mac(self._key, body, str(now_ms).encode()).hex() if self._key else ""
        return msgspec.json.encode(RegistryEntry(msgspec.Raw(body), now_ms, tag))

    def open(self, data: bytes | str) -> NodeInfo:
        """The entry's node; raises RegistryAuthError (malformed, unsigned, bad_mac, stale)."""
        try:
            entry = _entry_decoder.decode(data)
            node = decode_node(bytes(entry.node))
        except (msgspec.ValidationError, msgspec.DecodeError, NodeInfoError) as e:
            raise self._reject("malformed", f"not a valid registry entry: {e}") from e
        if self._key is None:
            return node
        if not entry.mac:
            raise self._reject("unsigned", f"entry of {node.node_id!r} is not signed")
        try:
            tag = bytes.fromhex(entry.mac)
        except ValueError:
            tag = b""
        if not mac_matches(self._key, tag, bytes(entry.node), str(entry.signed_at_ms).encode()):
            raise self._reject("bad_mac", f"entry of {node.node_id!r} has a wrong signature")
        age_ms = int(self._clock() * 1000) - entry.signed_at_ms
        if not -MAX_CLOCK_SKEW_S * 1000 <= age_ms <= self._max_age_ms:
            raise self._reject("stale", f"entry of {node.node_id!r} was signed {age_ms / 1000:.1f} s ago")
        return node

    def removal_token(self, node_id: str) -> str:
        """What a node sends to deregister itself (empty in an insecure cluster)."""
        if self._key is None:
            return ""
        now_ms = int(self._clock() * 1000)
        return f"{now_ms}.{mac(self._key, b'remove', node_id.encode(), str(now_ms).encode()).hex()}"

    def check_removal(self, node_id: str, token: str) -> None:
        """Raises RegistryAuthError unless `token` is a fresh removal_token for `node_id`."""
        if self._key is None:
            return
        stamp, _, tag = token.partition(".")
        try:
            ok = mac_matches(self._key, bytes.fromhex(tag), b"remove", node_id.encode(), stamp.encode())
            age_ms = int(self._clock() * 1000) - int(stamp)
        except ValueError:
            ok, age_ms = False, 0
        if not ok:
            raise self._reject("bad_mac" if token else "unsigned", f"removal of {node_id!r} is not signed")
        if not -MAX_CLOCK_SKEW_S * 1000 <= age_ms <= self._max_age_ms:
            raise self._reject("stale", f"removal of {node_id!r} is stale")

    def _reject(self, reason: str, message: str) -> RegistryAuthError:
        self.on_reject(reason)
        return RegistryAuthError(reason, message)


REMOVAL_HEADER = "X-Pdserve-Removal"


async def redis_put(client: aioredis.Redis, auth: RegistryAuth, node: NodeInfo, ttl_s: float) -> None:
    await client.set(REDIS_KEY_PREFIX + node.node_id, auth.seal(node), px=max(1, int(ttl_s * 1000)))
