"""Company budgets per dataset, across scenes: what each company may spend on each dataset, and
has spent, whichever of its scenes the queries came through (`sandbox/budgets/ledger.py`). The office sets
the caps; the office and auditors read every company's, a tenant its own (another company's
answers 404, like a missing one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from api.deps import SessionDep, SettingsDep, caller
from catalog.models import Dataset
from catalog.service import find_dataset
from catalog.service import scoped as catalog_scoped
from pdao.kernel import audit
from pdao.kernel.errors import not_found
from pdao.kernel.identity.models import Organization
from pdao.kernel.identity.service import Principal
from policies.catalog_rules import CatalogScope, catalog_scope
from sandbox.budgets import ledger
from sandbox.budgets.ledger import CompanyBudgetOut

router = APIRouter(tags=["budgets"])

Reader = caller("budget", "read")
Writer = caller("budget", "write")
OrgCode = Annotated[str, Path(max_length=64)]
DatasetCode = Annotated[str, Path(max_length=128)]


class CapIn(BaseModel):
    epsilon: float = Field(ge=0, le=100, allow_inf_nan=False)
    delta: float | None = Field(default=None, ge=0, le=1e-3, allow_inf_nan=False)  # None: keep it as it is
    reason: str = Field(default="", max_length=500)


class BudgetList(BaseModel):
    default_epsilon: float    # the cap of a company on a dataset until the office sets one
    default_delta: float
    items: list[CompanyBudgetOut]


def _org(session: Session, principal: Principal, code: str) -> Organization:
    """The organization named, if the caller may see its budgets (else 404, like a missing one)."""
    org = session.exec(select(Organization).where(Organization.code == code)).first()
    scope = ledger.budget_scope(principal.role, principal.org_id, principal.org_kind)
    if org is None or (scope is not None and scope != org.id):
        raise not_found(f"Organization '{code}'", f"机构 {code} ")
    return org


def _scope(principal: Principal) -> CatalogScope:
    return catalog_scope(principal.role, principal.org_id, principal.org_kind)


def _dataset(session: Session, principal: Principal, code: str) -> str:
    """The dataset named, if it exists and the caller may see it in the catalog (a tenant never sees a
    prohibited one): else 404 either way."""
    return find_dataset(session, code, _scope(principal)).code


@router.get("/budgets", name="budgets.list", response_model=BudgetList)
def list_budgets(principal: Reader, session: SessionDep, settings: SettingsDep,
                 org: Annotated[str | None, Query(max_length=64)] = None,
                 dataset: Annotated[str | None, Query(max_length=128)] = None) -> BudgetList:
    """Every company's budget per dataset (a tenant: its own company's): each one something was
    reserved from or the office set, and the default for each dataset a submitted or live scene
    asks for."""
    scope = ledger.budget_scope(principal.role, principal.org_id, principal.org_kind)
    items = ledger.company_budgets(session, settings, org_id=scope, datasets=None if dataset is None else [dataset])
    visible = set(session.exec(catalog_scoped(select(Dataset.code), _scope(principal))).all())
    return BudgetList(default_epsilon=settings.company_dataset_epsilon, default_delta=settings.company_dataset_delta,
                      items=[b for b in items if (org is None or b.org == org) and b.dataset in visible])


@router.get("/budgets/{org}/{dataset}", name="budgets.read", response_model=CompanyBudgetOut)
def read_budget(org: OrgCode, dataset: DatasetCode, principal: Reader, session: SessionDep,
                settings: SettingsDep) -> CompanyBudgetOut:
    """One company's budget on one dataset, across all its scenes."""
    o = _org(session, principal, org)
    return ledger.company_budget(session, settings, o.id, o.code, _dataset(session, principal, dataset))


@router.put("/budgets/{org}/{dataset}", name="budgets.set", response_model=CompanyBudgetOut)
def set_budget(org: OrgCode, dataset: DatasetCode, body: CapIn, principal: Writer, session: SessionDep,
               settings: SettingsDep, request: Request) -> CompanyBudgetOut:
    """Set a company's cap on a dataset (ε, and δ if given), never below what it has already spent
    (409 `cap_below_spent`). The change and its audit event are one transaction."""
    request.state.object = f"budget:{org}/{dataset}"
    o = _org(session, principal, org)
    code = _dataset(session, principal, dataset)
    before, after = ledger.set_company_cap(session, settings, o.id, code, body.epsilon, body.delta, principal.user_id)
    detail = {"org": o.code, "dataset": code, "epsilon_cap": [before.epsilon_cap, after.epsilon_cap],
              "delta_cap": [before.delta_cap, after.delta_cap], "epsilon_spent": after.epsilon_spent,
              "delta_spent": after.delta_spent}
    audit.append(session, request_id=request.state.request_id, actor=principal.username, org=principal.org_code,
                 role=principal.role.value, auth_method=principal.auth_method, action="budget.cap_set",
                 object=request.state.object, decision="allow", reason=body.reason or None, detail=detail)
    session.commit()
    request.state.audit_detail = detail
    return ledger.company_budget(session, settings, o.id, o.code, code)
