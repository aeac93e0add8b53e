"""Decode-side reservations: reserve, renew, release, and lease expiry on an explicit clock."""

from __future__ import annotations

import pytest

from pdserve.transfer.reservations import KVReservations, ReservationError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock) -> KVReservations:
    return KVReservations(num_layers=2, num_blocks=16, block_size=4, clock=clock)


def test_reserve_get_release() -> None:
    reservations = make(FakeClock())
    made = reservations.reserve("a", [3, 4, 5], num_tokens=10, lease_s=5.0)
    assert reservations.get("a") is made and made.block_ids == (3, 4, 5) and not made.complete
    assert len(reservations) == 1
    assert reservations.release("a") is made
    assert reservations.get("a") is None and reservations.release("a") is None
    reservations.reserve("b", [3, 4, 5], num_tokens=9, lease_s=5.0)  # released blocks can be reserved again


def test_lease_expiry_releases_only_the_expired() -> None:
    clock = FakeClock()
    reservations = make(clock)
    reservations.reserve("short", [1], num_tokens=4, lease_s=1.0)
    reservations.reserve("long", [2], num_tokens=4, lease_s=10.0)
    clock.now += 0.5
    assert reservations.expired() == [] and reservations.expire() == []
    clock.now += 0.5
    assert reservations.expired() == ["short"]
    assert [r.request_id for r in reservations.expire()] == ["short"]
    assert reservations.get("short") is None and reservations.get("long") is not None
    reservations.reserve("again", [1], num_tokens=4, lease_s=1.0)  # block 1 is free again


def test_renew_extends_from_now() -> None:
    clock = FakeClock()
    reservations = make(clock)
    reservations.reserve("a", [1], num_tokens=4, lease_s=1.0)
    clock.now += 0.9
    assert reservations.renew("a", 1.0)
    clock.now += 0.9
    assert reservations.expire() == []
    clock.now += 0.2
    assert [r.request_id for r in reservations.expire()] == ["a"]
    assert not reservations.renew("a", 1.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(request_id="held", block_ids=[9], num_tokens=4, lease_s=1.0), "already has"),
    (dict(request_id="x", block_ids=[1, 2], num_tokens=4, lease_s=1.0), "another request"),
    (dict(request_id="x", block_ids=[9], num_tokens=5, lease_s=1.0), "does not fit"),
    (dict(request_id="x", block_ids=[9], num_tokens=0, lease_s=1.0), "does not fit"),
    (dict(request_id="x", block_ids=[9, 9], num_tokens=4, lease_s=1.0), "distinct"),
    (dict(request_id="x", block_ids=[16], num_tokens=4, lease_s=1.0), "distinct and in"),
    (dict(request_id="x", block_ids=[9], num_tokens=4, lease_s=0.0), "lease_s"),
])
def test_bad_reservations_are_refused_and_change_nothing(kwargs: dict[str, object], match: str) -> None:
    reservations = make(FakeClock())
    reservations.reserve("held", [1, 2], num_tokens=8, lease_s=1.0)
    with pytest.raises(ReservationError, match=match):
        reservations.reserve(**kwargs)  # type: ignore[arg-type]
    assert len(reservations) == 1 and reservations.get("x") is None


def test_renew_rejects_a_non_positive_lease() -> None:
    reservations = make(FakeClock())
    reservations.reserve("a", [1], num_tokens=4, lease_s=1.0)
    with pytest.raises(ReservationError, match="lease_s"):
        reservations.renew("a", -1.0)
