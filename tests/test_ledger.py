"""The budget ledger: concurrent reservations never overspend a scene's budget nor a company's
budget on a dataset across its scenes; a reservation pays from both or neither; refunds and
charges are idempotent and credit both."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from sqlmodel import Session, select

from pdao.kernel.errors import PdaoError
from sandbox.budgets import ledger
from sandbox.budgets.ledger import CompanyDatasetBudget
from sandbox.scenes.models import Scene
from tests.scene_helpers import VISITS, active_scene


@pytest.fixture
def scene_id(client, auth) -> int:
    # budget 3.0, per-query cap 0.5 (tests/scene_helpers.application)
    return active_scene(client, auth)["id"]


def company_row(engine, dataset: str = VISITS) -> CompanyDatasetBudget | None:
    with Session(engine) as s:
        return s.exec(select(CompanyDatasetBudget).where(CompanyDatasetBudget.dataset == dataset)).one_or_none()


def scene_spent(engine, scene_id: int) -> tuple[float, float]:
    with Session(engine) as s:
        return s.exec(select(Scene.epsilon_spent, Scene.delta_spent).where(Scene.id == scene_id)).one()


def race(engine, settings, scene_ids: list[int], n: int, epsilon: float) -> tuple[list[int], list[str]]:
    """n threads, released at once, each reserving ε from scene_ids[i % len] on the visits."""
    barrier = threading.Barrier(n)
    won, lost, errors = [], [], []

    def spend(i: int) -> None:
        try:
            with Session(engine) as s:
                barrier.wait()
                try:
                    ledger.reserve(s, scene_ids[i % len(scene_ids)], epsilon, query_ref=f"q{i}", dataset=VISITS,
                                   settings=settings)
                    s.commit()
                    won.append(i)
                except PdaoError as e:
                    s.rollback()
                    lost.append(e.code)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return won, lost


def test_twenty_parallel_reservations_never_overspend(engine, settings, scene_id):
    won, lost = race(engine, settings, [scene_id], 20, 0.3)
    assert len(won) == 10 and lost == ["budget_exhausted"] * 10
    with Session(engine) as s:
        scene = s.get(Scene, scene_id)
        assert scene.epsilon_spent == pytest.approx(3.0)
        assert len(ledger.entries(s, scene_id)) == 10
    assert company_row(engine).epsilon_spent == pytest.approx(3.0)


def test_parallel_reservations_across_scenes_never_overspend_the_company_cap(client, auth, engine, settings):
    """Three scenes of one company (ε 3 each) race for one dataset whose company cap is ε 2: the
    first reservations also race to create the company's row — one row, every reservation counted."""
    scenes = [active_scene(client, auth)["id"] for _ in range(3)]
    capped = dataclasses.replace(settings, company_dataset_epsilon=2.0)
    assert company_row(engine) is None
    won, lost = race(engine, capped, scenes, 21, 0.3)
    assert len(won) == 6 and lost == ["company_budget_exhausted"] * 15, (won, lost)
    with Session(engine) as s:
        rows = s.exec(select(CompanyDatasetBudget)).all()
        assert len(rows) == 1 and rows[0].epsilon_spent == pytest.approx(1.8) and rows[0].epsilon_cap is None
        entries = [e for sid in scenes for e in ledger.entries(s, sid)]
        assert len(entries) == 6 and {(e.org_id, e.dataset) for e in entries} == {(rows[0].org_id, VISITS)}
        assert sum(s.get(Scene, sid).epsilon_spent for sid in scenes) == pytest.approx(1.8)


def test_a_reservation_pays_from_both_budgets_or_neither(engine, settings, scene_id):
    capped = dataclasses.replace(settings, company_dataset_epsilon=0.4)
    with Session(engine) as s:
        ledger.reserve(s, scene_id, 0.3, dataset=VISITS, settings=capped)
        s.commit()
        with pytest.raises(PdaoError) as err:       # the scene can pay, the company cannot
            ledger.reserve(s, scene_id, 0.3, dataset=VISITS, settings=capped)
        assert (err.value.status, err.value.code) == (429, "company_budget_exhausted")
        assert err.value.details["dataset"] == VISITS
        assert err.value.details["epsilon_cap"] == pytest.approx(0.4)
        assert err.value.details["epsilon_spent"] == pytest.approx(0.3)
        assert err.value.details["epsilon_left"] == pytest.approx(0.1)
        assert "ε=0.3" in err.value.message and "0.1" in err.value.message and VISITS in err.value.message_zh
        # nothing partial, even before the caller rolls back: the scene was not charged
        assert s.exec(select(Scene.epsilon_spent).where(Scene.id == scene_id)).one() == pytest.approx(0.3)
        assert len(ledger.entries(s, scene_id)) == 1
        s.rollback()
    assert scene_spent(engine, scene_id)[0] == pytest.approx(0.3)
    roomy = dataclasses.replace(settings, company_dataset_epsilon=100.0)
    with Session(engine) as s:
        for _ in range(5):
            ledger.reserve(s, scene_id, 0.5, dataset=VISITS, settings=roomy)
        s.commit()
        with pytest.raises(PdaoError) as err:       # the company can pay, the scene cannot
            ledger.reserve(s, scene_id, 0.5, dataset=VISITS, settings=roomy)
        assert err.value.code == "budget_exhausted"
        s.rollback()
    assert company_row(engine).epsilon_spent == pytest.approx(2.8)


def test_the_company_delta_cap_is_enforced_too(engine, settings, scene_id):
    capped = dataclasses.replace(settings, company_dataset_delta=1e-7)
    with Session(engine) as s:
        ledger.reserve(s, scene_id, 0.1, 1e-7, dataset=VISITS, settings=capped)
        with pytest.raises(PdaoError) as err:
            ledger.reserve(s, scene_id, 0.1, 1e-8, dataset=VISITS, settings=capped)
        assert err.value.code == "company_budget_exhausted" and "δ=1e-08" in err.value.message
        assert err.value.details["delta_left"] == pytest.approx(0.0, abs=1e-15)


def test_refund_and_charge_are_idempotent(engine, settings, scene_id, client, auth):
    with Session(engine) as s:
        a = ledger.reserve(s, scene_id, 0.5, 1e-7, query_ref="qa", dataset=VISITS, settings=settings)
        b = ledger.reserve(s, scene_id, 0.25, query_ref="qb", dataset=VISITS, settings=settings)
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
    row = company_row(engine)       # the refund credited the company too, once
    assert row.epsilon_spent == pytest.approx(0.25) and row.delta_spent == pytest.approx(0.0)


def test_reservation_refusals(engine, settings, scene_id):
    with Session(engine) as s:
        with pytest.raises(PdaoError) as err:
            ledger.reserve(s, scene_id, 0.6, dataset=VISITS, settings=settings)
        assert (err.value.status, err.value.code) == (422, "epsilon_above_query_cap")
        for bad in (0, float("nan")):
            with pytest.raises(PdaoError) as err:
                ledger.reserve(s, scene_id, bad, dataset=VISITS, settings=settings)
            assert err.value.code == "bad_epsilon"
        for _ in range(6):
            ledger.reserve(s, scene_id, 0.5, dataset=VISITS, settings=settings)
        with pytest.raises(PdaoError) as err:
            ledger.reserve(s, scene_id, 0.01, dataset=VISITS, settings=settings)
        assert (err.value.status, err.value.code) == (429, "budget_exhausted")
        assert err.value.details["epsilon_left"] == pytest.approx(0.0, abs=1e-9)


def test_the_office_cap_is_never_below_what_is_spent(engine, settings, scene_id):
    with Session(engine) as s:
        ledger.reserve(s, scene_id, 0.5, dataset=VISITS, settings=settings)
        user_id = s.exec(select(Scene.applicant_id)).first()
        with pytest.raises(PdaoError) as err:
            ledger.set_company_cap(s, settings, s.get(Scene, scene_id).org_id, VISITS, 0.4, None, user_id)
        assert (err.value.status, err.value.code) == (409, "cap_below_spent")
        before, after = ledger.set_company_cap(s, settings, s.get(Scene, scene_id).org_id, VISITS, 0.5, None, user_id)
        assert (before.epsilon_cap, after.epsilon_cap) == (settings.company_dataset_epsilon, 0.5)
        assert after.delta_cap == settings.company_dataset_delta
        with pytest.raises(PdaoError) as err:       # the office's cap, now spent, binds
            ledger.reserve(s, scene_id, 0.01, dataset=VISITS, settings=settings)
        assert err.value.code == "company_budget_exhausted"


def test_pure_decisions():
    t = ledger.Totals(epsilon_cap=1.0, delta_cap=0.0, epsilon_spent=0.7, delta_spent=0.0)
    assert t.can_pay(0.3, 0.0) and not t.can_pay(0.31, 0.0) and not t.can_pay(0.1, 1e-9)
    assert t.epsilon_left == pytest.approx(0.3)
    assert ledger.overcommit_warning("d", company_left=3.0, this_left=2.0, others_left=1.0) is None
    en, zh = ledger.overcommit_warning("d", company_left=3.0, this_left=2.0, others_left=1.5)
    assert "ε=3.5" in en and "ε=3" in en and "d" in zh
