"""Signed decode -> prefill messages: a prefill node acts only on what a decode node of the cluster
sent, once.

A decode node signs every `PrefillTask`, `LeaseRenewal` and `Abort` it sends (`MessageSigner.sign`):
a fresh random nonce, an expiry, and an HMAC-SHA256 over the whole message (request id, prompt,
sampling, block ids, KV target with its shared-pool name, decode node id, lease, nonce, expiry) under
a key derived from the cluster secret. The prefill node checks each one (`MessageVerifier.check`)
before it schedules or writes anything: a missing or wrong MAC, an expired message, one that claims
to live longer than any genuine one, and a nonce already seen are refused with a reason to count.

Seen nonces are kept until their message expires (plus the allowed clock skew), so the set is
bounded by the rate of genuine messages times their validity; past `max_nonces` new messages are
refused rather than forgetting a nonce early (which would let its message be replayed).
"""

from __future__ import annotations

import enum
import heapq
import os
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec

from pdserve.common.secret import ClusterSecret, mac, mac_matches
from pdserve.transfer.messages import Abort, LeaseRenewal, MessageAuth, PrefillTask

NONCE_BYTES = 16
SignedMessage = PrefillTask | LeaseRenewal | Abort
M = TypeVar("M", PrefillTask, LeaseRenewal, Abort)
_PURPOSE = "data-plane-messages"


class AuthReject(enum.StrEnum):
    UNSIGNED = "unsigned"
    BAD_MAC = "bad_mac"
    EXPIRED = "expired"
    TOO_LONG_LIVED = "too_long_lived"  # expiry further ahead than any genuine signer sets it
    REPLAYED = "replayed"
    NONCE_CACHE_FULL = "nonce_cache_full"


def _signed_bytes(message: SignedMessage, auth: MessageAuth) -> bytes:
    unsigned = msgspec.structs.replace(auth, mac=b"")
    return msgspec.msgpack.encode(msgspec.structs.replace(message, auth=unsigned))


class MessageSigner:
    """Decode side. `validity_s` covers a send queued behind others to a slow peer."""

    def __init__(self, secret: ClusterSecret, validity_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        if validity_s <= 0:
            raise ValueError(f"validity_s must be > 0 (got {validity_s})")
        self._key = secret.derive(_PURPOSE)
        self._validity_ms = int(validity_s * 1000)
        self._clock = clock

    def sign(self, message: M) -> M:
        auth = MessageAuth(nonce=os.urandom(NONCE_BYTES),
                           expires_unix_ms=int(self._clock() * 1000) + self._validity_ms)
        tag = mac(self._key, _signed_bytes(message, auth))
        return msgspec.structs.replace(message, auth=msgspec.structs.replace(auth, mac=tag))


class MessageVerifier:
    """Prefill side; one thread uses it (the inbox thread)."""

    def __init__(self, secret: ClusterSecret, max_validity_s: float = 60.0, max_clock_skew_s: float = 5.0,
                 max_nonces: int = 1 << 20, clock: Callable[[], float] = time.time) -> None:
        self._key = secret.derive(_PURPOSE)
        self._max_validity_ms = int(max_validity_s * 1000)
        self._skew_ms = int(max_clock_skew_s * 1000)
        self._max_nonces = max_nonces
        self._clock = clock
        self._seen: set[bytes] = set()
        self._forget_at: list[tuple[int, bytes]] = []  # heap of (unix ms, nonce)

    def check(self, message: SignedMessage) -> AuthReject | None:
        """None when the message is genuine and new (its nonce is then remembered)."""
        auth = message.auth
        if auth is None or not auth.mac:
            return AuthReject.UNSIGNED
        if not mac_matches(self._key, auth.mac, _signed_bytes(message, auth)):
            return AuthReject.BAD_MAC
        now_ms = int(self._clock() * 1000)
        self._forget(now_ms)
        if auth.expires_unix_ms + self._skew_ms < now_ms:
            return AuthReject.EXPIRED
        if auth.expires_unix_ms > now_ms + self._max_validity_ms + self._skew_ms:
            return AuthReject.TOO_LONG_LIVED
        if auth.nonce in self._seen:
            return AuthReject.REPLAYED
        if len(self._seen) >= self._max_nonces:
            return AuthReject.NONCE_CACHE_FULL
        self._seen.add(auth.nonce)
        heapq.heappush(self._forget_at, (auth.expires_unix_ms + self._skew_ms, auth.nonce))
        return None

    def _forget(self, now_ms: int) -> None:
        """Nonces of expired messages: a replay of those is refused as expired already."""
        while self._forget_at and self._forget_at[0][0] < now_ms:
            self._seen.discard(heapq.heappop(self._forget_at)[1])

    def __len__(self) -> int:
        return len(self._seen)
