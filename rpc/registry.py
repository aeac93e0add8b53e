"""The registry's record of one node, shared by the router (which stores and reads it) and the nodes
(which heartbeat it): the record, its JSON codec, where it lives in Redis, and the router's HTTP paths
for heartbeats.
"""

from __future__ import annotations

import enum
import time

import msgspec
import redis.asyncio as aioredis

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


async def redis_put(client: aioredis.Redis, node: NodeInfo, ttl_s: float) -> None:
    await client.set(REDIS_KEY_PREFIX + node.node_id, encode_node(node), px=max(1, int(ttl_s * 1000)))
