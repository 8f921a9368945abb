"""The privacy budget ledger: every ε (and δ) a scene spends is reserved atomically before a
result exists, then charged when the result is made, or refunded if the job fails.

Concurrent queries can never overspend: the reservation is one conditional UPDATE of the scene's
spent totals (`… WHERE spent + cost <= budget`), which PostgreSQL re-checks on the locked row and
SQLite runs under its single write lock. Every movement is a ledger row whose state changes only
reserved → charged or reserved → refunded, each by a conditional update, so replaying a charge or
a refund after a crash changes nothing (never double-charged, never double-refunded). Costs add
up by basic composition, as OpenDP's sequential composition of pure-DP measurements does.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlmodel import Field, Session, SQLModel, select

from pdao.db import utcnow
from pdao.errors import PdaoError, invalid
from policies.models import Scene

# Float sums of many small costs drift by a few ulps; a budget is never exceeded by more than this.
TOLERANCE = 1e-9


class BudgetEntry(SQLModel, table=True):
    __tablename__ = "budget_entry"

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    query_ref: str = Field(default="", max_length=64, index=True)  # the query it pays for
    epsilon: float
    delta: float = 0.0
    state: str = Field(default="reserved", max_length=10)  # reserved | charged | refunded
    created_at: datetime = Field(default_factory=utcnow)
    settled_at: datetime | None = None


def budget_exhausted(scene: Scene, epsilon: float) -> PdaoError:
    left = max(scene.budget_epsilon - scene.epsilon_spent, 0.0)
    return PdaoError(429, "budget_exhausted",
                     f"The scene's privacy budget cannot pay ε={epsilon:g}: {left:g} of {scene.budget_epsilon:g} left.",
                     f"场景隐私预算不足以支付 ε={epsilon:g}：总额 {scene.budget_epsilon:g}，剩余 {left:g}。",
                     details={"epsilon_requested": epsilon, "epsilon_left": left})


def reserve(session: Session, scene_id: int, epsilon: float, delta: float = 0.0, query_ref: str = "") -> BudgetEntry:
    """Reserve ε (and δ) in the caller's transaction; 429 `budget_exhausted` if it would overspend,
    422 if it is above the scene's per-query cap."""
    scene = session.get(Scene, scene_id)
    if epsilon <= 0 or delta < 0:
        raise invalid("bad_epsilon", "ε must be positive and δ not negative.", "ε 必须为正数，δ 不能为负数。")
    if epsilon > scene.max_query_epsilon + TOLERANCE:
        raise invalid("epsilon_above_query_cap",
                      f"ε={epsilon:g} is above the scene's per-query cap of {scene.max_query_epsilon:g}.",
                      f"ε={epsilon:g} 超过场景单次查询上限 {scene.max_query_epsilon:g}。")
    took = session.exec(
        update(Scene).where(Scene.id == scene_id,
                            Scene.epsilon_spent + epsilon <= Scene.budget_epsilon + TOLERANCE,
                            Scene.delta_spent + delta <= Scene.budget_delta + TOLERANCE)
        .values(epsilon_spent=Scene.epsilon_spent + epsilon, delta_spent=Scene.delta_spent + delta)
        .execution_options(synchronize_session=False)).rowcount
    if took != 1:
        session.refresh(scene)
        raise budget_exhausted(scene, epsilon)
    entry = BudgetEntry(scene_id=scene_id, query_ref=query_ref, epsilon=epsilon, delta=delta)
    session.add(entry)
    session.flush()
    return entry


def charge(session: Session, entry_id: int) -> bool:
    """Make a reservation final. True if this call did it; False if it was already settled."""
    return _settle(session, entry_id, "charged")


def refund(session: Session, entry_id: int) -> bool:
    """Give a reservation back (the job failed or was cancelled). Idempotent."""
    entry = session.get(BudgetEntry, entry_id)
    if entry is None or not _settle(session, entry_id, "refunded"):
        return False
    session.exec(update(Scene).where(Scene.id == entry.scene_id)
                 .values(epsilon_spent=Scene.epsilon_spent - entry.epsilon, delta_spent=Scene.delta_spent - entry.delta)
                 .execution_options(synchronize_session=False))
    return True


def _settle(session: Session, entry_id: int, state: str) -> bool:
    return session.exec(update(BudgetEntry).where(BudgetEntry.id == entry_id, BudgetEntry.state == "reserved")
                        .values(state=state, settled_at=utcnow())
                        .execution_options(synchronize_session=False)).rowcount == 1


def entries(session: Session, scene_id: int) -> list[BudgetEntry]:
    return list(session.exec(select(BudgetEntry).where(BudgetEntry.scene_id == scene_id)
                             .order_by(BudgetEntry.id)).all())
