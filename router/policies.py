"""Node selection policies, one small class each, chosen per role by name from ``POLICIES``."""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.router.config import PolicyConfig
from pdserve.rpc.registry import NodeInfo

LoadFn = Callable[[NodeInfo], float]


@dataclass(frozen=True)
class RouteContext:
    prompt_token_ids: Sequence[int]
    load: LoadFn  # a node's current load relative to its capacity (registry load + router inflight)


class Policy(ABC):
    """Picks one node from a non-empty candidate list.

    Invariants: the result is one of ``candidates``; candidates are already filtered (healthy, not
    draining, right role) and given in a stable order; a policy never blocks or does I/O.
    """

    @abstractmethod
    def choose(self, candidates: Sequence[NodeInfo], ctx: RouteContext) -> NodeInfo: ...


class RoundRobin(Policy):
    def __init__(self, config: PolicyConfig, seed: int | None = None) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[NodeInfo], ctx: RouteContext) -> NodeInfo:
        node = candidates[self._next % len(candidates)]
        self._next += 1
        return node


class RandomChoice(Policy):
    def __init__(self, config: PolicyConfig, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[NodeInfo], ctx: RouteContext) -> NodeInfo:
        return self._rng.choice(candidates)


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded wins (Mitzenmacher): near least-loaded balance without
    every router herding onto the same momentarily idle node."""

    def __init__(self, config: PolicyConfig, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[NodeInfo], ctx: RouteContext) -> NodeInfo:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if ctx.load(a) <= ctx.load(b) else b


def _rendezvous_score(key: bytes, node_id: str) -> int:
    digest = hashlib.blake2b(key + b"\0" + node_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class PrefixAware(Policy):
    """Requests whose first ``prefix_tokens`` (rounded down to whole KV blocks) match go to the same
    node, so its prefix cache is reused. Rendezvous hashing over the candidates: when a node leaves,
    only the prefixes it owned move. Prompts shorter than one block have no shared prefix worth
    keeping and go to the less loaded of two nodes."""

    def __init__(self, config: PolicyConfig, seed: int | None = None) -> None:
        self._prefix_tokens = config.prefix_tokens
        self._block_size = config.block_size
        self._fallback = PowerOfTwo(config, seed)

    def prefix_key(self, prompt_token_ids: Sequence[int]) -> bytes | None:
        n = min(self._prefix_tokens, len(prompt_token_ids)) // self._block_size * self._block_size
        if n == 0:
            return None
        return array("I", prompt_token_ids[:n]).tobytes()

    def choose(self, candidates: Sequence[NodeInfo], ctx: RouteContext) -> NodeInfo:
        key = self.prefix_key(ctx.prompt_token_ids)
        if key is None:
            return self._fallback.choose(candidates, ctx)
        return max(candidates, key=lambda node: _rendezvous_score(key, node.node_id))


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "power_of_two": PowerOfTwo,
    "prefix_aware": PrefixAware,
}


def build_policy(name: str, config: PolicyConfig, seed: int | None = None) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
    return cls(config, seed)
