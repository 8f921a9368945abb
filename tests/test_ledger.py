"""The budget ledger: concurrent reservations never overspend; refunds and charges are idempotent."""

from __future__ import annotations

import threading

import pytest
from sqlmodel import Session

from pdao.errors import PdaoError
from policies.models import Scene
from sandbox import ledger
from tests.scene_helpers import active_scene


@pytest.fixture
def scene_id(client, auth) -> int:
    # budget 3.0, per-query cap 0.5 (tests/scene_helpers.application)
    return active_scene(client, auth)["id"]


def test_twenty_parallel_reservations_never_overspend(engine, scene_id):
    barrier = threading.Barrier(20)
    won, lost, errors = [], [], []

    def spend(i: int) -> None:
        try:
            with Session(engine) as s:
                barrier.wait()
                try:
                    ledger.reserve(s, scene_id, 0.3, query_ref=f"q{i}")
                    s.commit()
                    won.append(i)
                except PdaoError as e:
                    s.rollback()
                    lost.append(e.code)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(won) == 10 and lost == ["budget_exhausted"] * 10
    with Session(engine) as s:
        scene = s.get(Scene, scene_id)
        assert scene.epsilon_spent == pytest.approx(3.0)
        assert len(ledger.entries(s, scene_id)) == 10


def test_refund_and_charge_are_idempotent(engine, scene_id, client, auth):
    with Session(engine) as s:
        a = ledger.reserve(s, scene_id, 0.5, 1e-7, query_ref="qa")
        b = ledger.reserve(s, scene_id, 0.25, query_ref="qb")
        s.commit()
        assert ledger.refund(s, a.id) is True
        assert ledger.refund(s, a.id) is False  # a replay after a crash gives nothing back twice
        assert ledger.charge(s, a.id) is False  # a refunded reservation is never charged
        assert ledger.charge(s, b.id) is True and ledger.charge(s, b.id) is False
        assert ledger.refund(s, b.id) is False  # a charged one is never refunded
        s.commit()
    got = client.get(f"/api/v1/scenes/{scene_id}", headers=auth("insurer_a")).json()["budget"]
    assert got["epsilon_spent"] == pytest.approx(0.25) and got["epsilon_left"] == pytest.approx(2.75)
    assert got["delta_spent"] == pytest.approx(0.0)


def test_reservation_refusals(engine, scene_id):
    with Session(engine) as s:
        with pytest.raises(PdaoError) as err:
            ledger.reserve(s, scene_id, 0.6)
        assert (err.value.status, err.value.code) == (422, "epsilon_above_query_cap")
        with pytest.raises(PdaoError):
            ledger.reserve(s, scene_id, 0)
        for _ in range(6):
            ledger.reserve(s, scene_id, 0.5)
        with pytest.raises(PdaoError) as err:
            ledger.reserve(s, scene_id, 0.01)
        assert (err.value.status, err.value.code) == (429, "budget_exhausted")
        assert err.value.details["epsilon_left"] == pytest.approx(0.0, abs=1e-9)
