"""The privacy budget ledger: every ε (and δ) a scene spends is reserved atomically before a
result exists, then charged when the result is made, or refunded if the job fails.

Two budgets pay for every prod query, in the caller's transaction, both or neither:

- the scene's own (`scene.budget_epsilon`, what the office approved for that use);
- the company's on the dataset the query reads, across all its scenes (`CompanyDatasetBudget`):
  without it, three identical scenes would spend three times the ε on the same data. Its cap is
  the office's (`PUT /budgets/{org}/{dataset}`) or, until the office sets one, the default
  `PDAO_COMPANY_DATASET_EPSILON` / `_DELTA`. The row is created at the first reservation
  (`INSERT … ON CONFLICT DO NOTHING` on the unique (org, dataset): two first reservations at once
  make one row and both count).

Concurrent queries can never overspend either budget: a reservation takes the scene's row, then
the company's (PostgreSQL: `SELECT … FOR NO KEY UPDATE`; SQLite: its single write lock), reads
what they hold now, decides, and only then adds the cost to both. Refunds take them in the same
order, so two transactions never wait on each other in a cycle. Every movement is a ledger
row whose state changes only reserved → charged or reserved → refunded, each by a conditional
update, so replaying a charge or a refund after a crash changes nothing (never double-charged,
never double-refunded); the row names the dataset and the company, so a refund credits both.
Costs add up by basic composition, as OpenDP's sequential composition of pure-DP measurements does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import UniqueConstraint, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, select

from pdao.kernel.config import Settings
from pdao.kernel.db import utcnow
from pdao.kernel.errors import PdaoError, conflict, invalid
from pdao.kernel.identity.models import Organization, Role, User
from policies import access
from sandbox.scenes import states
from sandbox.scenes.models import Scene, SceneItem

# Float sums of many small costs drift by a few ulps; a budget is never exceeded by more than this
# (δ is counted in millionths: its own, smaller slack).
TOLERANCE = 1e-9
DELTA_TOLERANCE = 1e-15


class BudgetEntry(SQLModel, table=True):
    __tablename__ = "budget_entry"

    id: int | None = Field(default=None, primary_key=True)
    scene_id: int = Field(foreign_key="scene.id", index=True)
    query_ref: str = Field(default="", max_length=64, index=True)  # the query it pays for
    epsilon: float
    delta: float = 0.0
    state: str = Field(default="reserved", max_length=10)  # reserved | charged | refunded
    # The company budget it also pays from: the scene's tenant and the dataset read (None: an entry
    # from before company budgets, 0012, that reads no recorded dataset — it credits the scene only).
    # No foreign key: SQLite adds a plain column in place; the scene's key already names the tenant.
    org_id: int | None = None
    dataset: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    settled_at: datetime | None = None


class CompanyDatasetBudget(SQLModel, table=True):
    """What one company may spend on one dataset across all its scenes, and has spent (reserved
    and charged). A cap of None is the default of the settings at the time of each reservation."""

    __tablename__ = "company_dataset_budget"
    __table_args__ = (UniqueConstraint("org_id", "dataset", name="uq_company_dataset_budget_org_dataset"),)

    id: int | None = Field(default=None, primary_key=True)
    org_id: int = Field(foreign_key="organization.id")
    dataset: str = Field(max_length=128)                 # the catalog code (Query.dataset)
    epsilon_cap: float | None = None                     # None: Settings.company_dataset_epsilon
    delta_cap: float | None = None                       # None: Settings.company_dataset_delta
    epsilon_spent: float = 0.0
    delta_spent: float = 0.0
    set_by_id: int | None = Field(default=None, foreign_key="app_user.id")  # the office member, last
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


# --- decisions (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Totals:
    """A budget and what has been spent from it."""

    epsilon_cap: float
    delta_cap: float
    epsilon_spent: float
    delta_spent: float

    @property
    def epsilon_left(self) -> float:
        return max(self.epsilon_cap - self.epsilon_spent, 0.0)

    @property
    def delta_left(self) -> float:
        return max(self.delta_cap - self.delta_spent, 0.0)

    def can_pay(self, epsilon: float, delta: float) -> bool:
        return (self.epsilon_spent + epsilon <= self.epsilon_cap + TOLERANCE
                and self.delta_spent + delta <= self.delta_cap + DELTA_TOLERANCE)


def company_totals(row: CompanyDatasetBudget | None, settings: Settings) -> Totals:
    """The company's totals on a dataset: the office's cap, else the default; nothing spent without a row."""
    if row is None:
        return Totals(settings.company_dataset_epsilon, settings.company_dataset_delta, 0.0, 0.0)
    return Totals(settings.company_dataset_epsilon if row.epsilon_cap is None else row.epsilon_cap,
                  settings.company_dataset_delta if row.delta_cap is None else row.delta_cap,
                  row.epsilon_spent, row.delta_spent)


def budget_scope(role: Role, org_id: int, org_kind: str) -> int | None | bool:
    """Whose company budgets a caller (already allowed `budget read` by casbin) may see
    (`policies.access`, resource `budget`): its own company's (an org id) for anyone in a company,
    every company's (None: the office, auditors), or nobody's (False)."""
    r = access.reach(role, org_kind, "budget")
    return org_id if r is access.OWN else None if r is access.ALL else False


# Scenes that may still spend: the company's other scenes count while one of these (a suspended one
# may be resumed); this scene counts until it can no longer run.
LIVE = frozenset({"approved", "active", "suspended"})
MAY_STILL_SPEND = LIVE | {"draft", "submitted", "returned"}


def overcommit_warning(dataset: str, company_left: float, this_left: float, others_left: float
                       ) -> tuple[str, str] | None:
    """The office's plain warning when the company's scenes together could spend more ε on a
    dataset than its cap has left: queries will then stop at the company's cap, not the scenes'."""
    could = this_left + others_left
    if could <= company_left + TOLERANCE:
        return None
    return (f"This scene could still spend ε={this_left:g} and the company's other live scenes ε={others_left:g} "
            f"on {dataset}: ε={could:g} in all, more than the ε={company_left:g} left of the company's cap on it. "
            f"Queries will stop at the company's cap before the scenes' budgets are spent.",
            f"本场景尚可消耗 ε={this_left:g}，该单位其他生效场景尚可消耗 ε={others_left:g}，合计 ε={could:g}，"
            f"超过该单位在数据集 {dataset} 上剩余的 ε={company_left:g}。查询将在场景预算用完之前先触及单位上限。")


def budget_exhausted(scene: Totals, epsilon: float) -> PdaoError:
    left = scene.epsilon_left
    return PdaoError(429, "budget_exhausted",
                     f"The scene's privacy budget cannot pay ε={epsilon:g}: {left:g} of {scene.epsilon_cap:g} left.",
                     f"场景隐私预算不足以支付 ε={epsilon:g}：总额 {scene.epsilon_cap:g}，剩余 {left:g}。",
                     details={"epsilon_requested": epsilon, "epsilon_left": left})


def company_budget_exhausted(dataset: str, company: Totals, epsilon: float, delta: float) -> PdaoError:
    details = {"dataset": dataset, "epsilon_requested": epsilon, "epsilon_cap": company.epsilon_cap,
               "epsilon_spent": company.epsilon_spent, "epsilon_left": company.epsilon_left,
               "delta_requested": delta, "delta_cap": company.delta_cap, "delta_spent": company.delta_spent,
               "delta_left": company.delta_left}
    if company.epsilon_spent + epsilon <= company.epsilon_cap + TOLERANCE:   # δ is what is short
        return PdaoError(429, "company_budget_exhausted",
                         f"Your company's privacy budget on {dataset}, shared by all its scenes, cannot pay δ={delta:g}: "
                         f"{company.delta_left:g} of its cap {company.delta_cap:g} left ({company.delta_spent:g} spent).",
                         f"贵单位在数据集 {dataset} 上的隐私预算（全部场景共用）不足以支付 δ={delta:g}："
                         f"上限 {company.delta_cap:g}，已用 {company.delta_spent:g}，剩余 {company.delta_left:g}。",
                         details=details)
    return PdaoError(429, "company_budget_exhausted",
                     f"Your company's privacy budget on {dataset}, shared by all its scenes, cannot pay ε={epsilon:g}: "
                     f"{company.epsilon_left:g} of its cap {company.epsilon_cap:g} left ({company.epsilon_spent:g} spent).",
                     f"贵单位在数据集 {dataset} 上的隐私预算（全部场景共用）不足以支付 ε={epsilon:g}："
                     f"上限 {company.epsilon_cap:g}，已用 {company.epsilon_spent:g}，剩余 {company.epsilon_left:g}。",
                     details=details)


# --- reserve, charge, refund ------------------------------------------------------------------------

def reserve(session: Session, scene_id: int, epsilon: float, delta: float = 0.0, query_ref: str = "", *,
            dataset: str, settings: Settings) -> BudgetEntry:
    """Reserve ε (and δ) in the caller's transaction from the scene's budget and the company's
    budget on `dataset`, both or neither: 429 `budget_exhausted` (the scene's) or
    `company_budget_exhausted`, 422 if it is above the scene's per-query cap."""
    scene = session.get(Scene, scene_id)
    if not epsilon > 0 or not delta >= 0:
        raise invalid("bad_epsilon", "ε must be positive and δ not negative.", "ε 必须为正数，δ 不能为负数。")
    if epsilon > scene.max_query_epsilon + TOLERANCE:
        raise invalid("epsilon_above_query_cap",
                      f"ε={epsilon:g} is above the scene's per-query cap of {scene.max_query_epsilon:g}.",
                      f"ε={epsilon:g} 超过场景单次查询上限 {scene.max_query_epsilon:g}。")
    org_id = scene.org_id
    # Scene first, then company (refund does the same); nothing is added before both can pay.
    scene_now = _take_scene(session, scene_id)
    if not scene_now.can_pay(epsilon, delta):
        raise budget_exhausted(scene_now, epsilon)
    company_now = company_totals(_take_company(session, org_id, dataset), settings)
    if not company_now.can_pay(epsilon, delta):
        raise company_budget_exhausted(dataset, company_now, epsilon, delta)
    session.exec(update(Scene).where(Scene.id == scene_id)
                 .values(epsilon_spent=Scene.epsilon_spent + epsilon, delta_spent=Scene.delta_spent + delta)
                 .execution_options(synchronize_session=False))
    session.exec(update(CompanyDatasetBudget)
                 .where(CompanyDatasetBudget.org_id == org_id, CompanyDatasetBudget.dataset == dataset)
                 .values(epsilon_spent=CompanyDatasetBudget.epsilon_spent + epsilon,
                         delta_spent=CompanyDatasetBudget.delta_spent + delta, updated_at=utcnow())
                 .execution_options(synchronize_session=False))
    entry = BudgetEntry(scene_id=scene_id, query_ref=query_ref, epsilon=epsilon, delta=delta, org_id=org_id,
                        dataset=dataset)
    session.add(entry)
    session.flush()
    return entry


def charge(session: Session, entry_id: int) -> bool:
    """Make a reservation final. True if this call did it; False if it was already settled."""
    return _settle(session, entry_id, "charged")


def refund(session: Session, entry_id: int) -> bool:
    """Give a reservation back to the scene and the company (the job failed or was cancelled). Idempotent."""
    entry = session.get(BudgetEntry, entry_id)
    if entry is None or not _settle(session, entry_id, "refunded"):
        return False
    session.exec(update(Scene).where(Scene.id == entry.scene_id)
                 .values(epsilon_spent=Scene.epsilon_spent - entry.epsilon, delta_spent=Scene.delta_spent - entry.delta)
                 .execution_options(synchronize_session=False))
    if entry.org_id is not None and entry.dataset is not None:
        session.exec(update(CompanyDatasetBudget)
                     .where(CompanyDatasetBudget.org_id == entry.org_id, CompanyDatasetBudget.dataset == entry.dataset)
                     .values(epsilon_spent=CompanyDatasetBudget.epsilon_spent - entry.epsilon,
                             delta_spent=CompanyDatasetBudget.delta_spent - entry.delta, updated_at=utcnow())
                     .execution_options(synchronize_session=False))
    return True


def _settle(session: Session, entry_id: int, state: str) -> bool:
    return session.exec(update(BudgetEntry).where(BudgetEntry.id == entry_id, BudgetEntry.state == "reserved")
                        .values(state=state, settled_at=utcnow())
                        .execution_options(synchronize_session=False)).rowcount == 1


def _on_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def _take_scene(session: Session, scene_id: int) -> Totals:
    """Lock the scene's row for this transaction and read its totals as they are now."""
    stmt = select(Scene.budget_epsilon, Scene.budget_delta, Scene.epsilon_spent, Scene.delta_spent).where(
        Scene.id == scene_id)
    if _on_sqlite(session):
        # SQLite's one write lock covers the database: a no-op UPDATE takes it, and every read after is current
        session.exec(update(Scene).where(Scene.id == scene_id).values(epsilon_spent=Scene.epsilon_spent)
                     .execution_options(synchronize_session=False))
    else:
        # FOR NO KEY UPDATE: waits for a racing reservation, then reads what it left; unlike FOR UPDATE
        # it does not wait on the key-share lock that inserting the query (scene_id → scene) holds
        stmt = stmt.with_for_update(key_share=True)
    return Totals(*session.exec(stmt).one())


def _take_company(session: Session, org_id: int, dataset: str) -> CompanyDatasetBudget:
    """Lock the company's row on the dataset for this transaction and read it as it is now; create
    it first if it has none (a racing creator's row wins, and is then used)."""
    stmt = (select(CompanyDatasetBudget)
            .where(CompanyDatasetBudget.org_id == org_id, CompanyDatasetBudget.dataset == dataset)
            .execution_options(populate_existing=True))
    sqlite_db = _on_sqlite(session)
    if not sqlite_db:
        row = session.exec(stmt.with_for_update(key_share=True)).one_or_none()
        if row is not None:
            return row
    now = utcnow()
    # On SQLite this write also takes the database's write lock, even when the row exists.
    session.exec((sqlite.insert if sqlite_db else postgresql.insert)(CompanyDatasetBudget)
                 .values(org_id=org_id, dataset=dataset, epsilon_spent=0.0, delta_spent=0.0, created_at=now,
                         updated_at=now)
                 .on_conflict_do_nothing(index_elements=["org_id", "dataset"]))
    return session.exec(stmt if sqlite_db else stmt.with_for_update(key_share=True)).one()


def entries(session: Session, scene_id: int) -> list[BudgetEntry]:
    return list(session.exec(select(BudgetEntry).where(BudgetEntry.scene_id == scene_id)
                             .order_by(BudgetEntry.id)).all())


# --- the office's caps ---------------------------------------------------------------------------

def set_company_cap(session: Session, settings: Settings, org_id: int, dataset: str, epsilon: float,
                    delta: float | None, by_user_id: int) -> tuple[Totals, Totals]:
    """Set a company's cap on a dataset in the caller's transaction (δ None: as it is); never below
    what it has already spent (409 `cap_below_spent`). Answers the totals before and after."""
    row = _take_company(session, org_id, dataset)
    before = company_totals(row, settings)
    after = Totals(epsilon, before.delta_cap if delta is None else delta, row.epsilon_spent, row.delta_spent)
    if after.epsilon_cap + TOLERANCE < after.epsilon_spent or after.delta_cap + DELTA_TOLERANCE < after.delta_spent:
        raise conflict("cap_below_spent",
                       f"The cap cannot be below what the company has already spent on {dataset}: "
                       f"ε={row.epsilon_spent:g}, δ={row.delta_spent:g} (reserved and charged).",
                       f"上限不能低于该单位在数据集 {dataset} 上已消耗的预算：ε={row.epsilon_spent:g}，"
                       f"δ={row.delta_spent:g}（含已预留和已扣除）。",
                       details={"dataset": dataset, "epsilon_spent": row.epsilon_spent, "delta_spent": row.delta_spent,
                                "epsilon_requested": epsilon, "delta_requested": after.delta_cap})
    session.exec(update(CompanyDatasetBudget).where(CompanyDatasetBudget.id == row.id)
                 .values(epsilon_cap=after.epsilon_cap, delta_cap=after.delta_cap, set_by_id=by_user_id,
                         updated_at=utcnow())
                 .execution_options(synchronize_session=False))
    return before, after


# --- what is shown ---------------------------------------------------------------------------------

class CompanyBudgetOut(BaseModel):
    """A company's budget on one dataset, across all its scenes (ε and δ: cap, spent, left)."""

    org: str
    dataset: str
    source: Literal["default", "office"]   # whose cap: the settings' default, or the office's
    epsilon_cap: float
    epsilon_spent: float                  # reserved (queued or running) and charged
    epsilon_left: float
    delta_cap: float
    delta_spent: float
    delta_left: float
    set_by: str | None = None
    updated_at: datetime | None = None


class OtherScene(BaseModel):
    id: int
    status: str
    epsilon_left: float


class SceneDatasetBudget(CompanyBudgetOut):
    """The company's budget on one of a scene's datasets, as the office weighs an approval: what
    this scene and the company's other live scenes reading the same dataset could still spend."""

    this_scene_epsilon_left: float
    other_scenes: list[OtherScene]
    other_scenes_epsilon_left: float
    warning: str | None = None
    warning_zh: str | None = None


def _budget_out(row: CompanyDatasetBudget | None, org: str, dataset: str, settings: Settings,
                set_by: str | None = None) -> CompanyBudgetOut:
    t = company_totals(row, settings)
    return CompanyBudgetOut(
        org=org, dataset=dataset, source="office" if row is not None and row.epsilon_cap is not None else "default",
        epsilon_cap=t.epsilon_cap, epsilon_spent=t.epsilon_spent, epsilon_left=t.epsilon_left,
        delta_cap=t.delta_cap, delta_spent=t.delta_spent, delta_left=t.delta_left, set_by=set_by,
        updated_at=None if row is None else row.updated_at)


def company_budgets(session: Session, settings: Settings, *, org_id: int | None | bool = None,
                    datasets: Iterable[str] | None = None) -> list[CompanyBudgetOut]:
    """Company budgets by org and dataset: every row (something reserved, or a cap set), and the
    default for each (company, dataset) that a scene submitted or live asks for and has no row yet.
    `org_id` None: every company's."""
    if org_id is False:      # nobody's (`budget_scope`)
        return []
    wanted = None if datasets is None else sorted(set(datasets))
    stmt = (select(CompanyDatasetBudget, Organization.code, User.username)
            .join(Organization, Organization.id == CompanyDatasetBudget.org_id)
            .join(User, User.id == CompanyDatasetBudget.set_by_id, isouter=True))
    if org_id is not None:
        stmt = stmt.where(CompanyDatasetBudget.org_id == org_id)
    if wanted is not None:
        stmt = stmt.where(CompanyDatasetBudget.dataset.in_(wanted))
    out = {(org, row.dataset): _budget_out(row, org, row.dataset, settings, set_by)
           for row, org, set_by in session.exec(stmt).all()}
    asked = (select(Organization.code, SceneItem.dataset).distinct()
             .join(Scene, Scene.id == SceneItem.scene_id).join(Organization, Organization.id == Scene.org_id)
             .where(Scene.status.in_(("submitted", "approved", "suspended")), SceneItem.struck == False))  # noqa: E712
    if org_id is not None:
        asked = asked.where(Scene.org_id == org_id)
    if wanted is not None:
        asked = asked.where(SceneItem.dataset.in_(wanted))
    for org, dataset in session.exec(asked).all():
        out.setdefault((org, dataset), _budget_out(None, org, dataset, settings))
    return [out[k] for k in sorted(out)]


def company_budget(session: Session, settings: Settings, org_id: int, org: str, dataset: str) -> CompanyBudgetOut:
    """One company's budget on one dataset (the default when nothing was reserved or set)."""
    found = session.exec(select(CompanyDatasetBudget, User.username)
                         .join(User, User.id == CompanyDatasetBudget.set_by_id, isouter=True)
                         .where(CompanyDatasetBudget.org_id == org_id, CompanyDatasetBudget.dataset == dataset)).first()
    row, set_by = found if found is not None else (None, None)
    return _budget_out(row, org, dataset, settings, set_by)


def scene_dataset_budgets(session: Session, settings: Settings, scene: Scene, org: str,
                          now: datetime | None = None) -> list[SceneDatasetBudget]:
    """Per dataset on the scene's data list (items not struck): the company's cap, spent and left,
    what this scene and the company's other live scenes on that dataset could still spend (their
    remaining scene budgets: a scene's budget may all go to any of its datasets), and a warning when
    together they could spend more than the company has left."""
    now = now or utcnow()
    datasets = sorted(set(session.exec(select(SceneItem.dataset).where(
        SceneItem.scene_id == scene.id, SceneItem.struck == False)).all()))  # noqa: E712
    if not datasets:
        return []
    companies = {b.dataset: b for b in company_budgets(session, settings, org_id=scene.org_id, datasets=datasets)}
    others: dict[str, list[OtherScene]] = {d: [] for d in datasets}
    rows = session.exec(select(Scene.id, Scene.status, Scene.valid_from, Scene.valid_to, Scene.budget_epsilon,
                               Scene.epsilon_spent, SceneItem.dataset).distinct()
                        .join(SceneItem, SceneItem.scene_id == Scene.id)
                        .where(Scene.org_id == scene.org_id, Scene.id != scene.id,
                               Scene.status.in_(("approved", "suspended")), SceneItem.struck == False,  # noqa: E712
                               SceneItem.dataset.in_(datasets))
                        .order_by(Scene.id)).all()
    for other_id, stored, valid_from, valid_to, budget, spent, dataset in rows:
        status = states.effective_status(stored, valid_from, valid_to, now)
        if status in LIVE:
            others[dataset].append(OtherScene(id=other_id, status=status, epsilon_left=max(budget - spent, 0.0)))
    status = states.effective_status(scene.status, scene.valid_from, scene.valid_to, now)
    this_left = max(scene.budget_epsilon - scene.epsilon_spent, 0.0) if status in MAY_STILL_SPEND else 0.0
    out = []
    for d in datasets:
        company = companies.get(d) or _budget_out(None, org, d, settings)
        others_left = sum(o.epsilon_left for o in others[d])
        warning = overcommit_warning(d, company.epsilon_left, this_left, others_left)
        out.append(SceneDatasetBudget(**company.model_dump(), this_scene_epsilon_left=this_left,
                                      other_scenes=others[d], other_scenes_epsilon_left=others_left,
                                      warning=warning[0] if warning else None,
                                      warning_zh=warning[1] if warning else None))
    return out
