"""Who may see whose objects: one table, one decision, one way to narrow a statement.

casbin (`policies/permissions.csv`) says which *actions* a role may take on a resource. This module
says, for a caller allowed to read a resource, *whose* objects it reaches:

- `own`: its own organization's (anyone tenant-scoped: an applicant, or anyone employed by a
  company whatever their role, `policies.visibility.tenant_scoped`);
- `all`: every organization's, as metadata (the office, reviewers, auditors, the operator);
- `department`: those that use its department's data (a provider's scenes);
- `none`: nobody's: lists are empty and a named object answers 404 like a missing one;
- `forbidden`: the read itself is refused (403), whatever the role table allows — a tenant never
  reads the audit trail, even as an auditor employed by a company.

Each domain's repository narrows its statements with `readable` (lists) or asks `may_read` (one
object), so another tenant's object is 404 everywhere by construction; the authorization path
(`api/deps.Authorized`) refuses `forbidden` reads before any route runs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import false

from pdao.kernel.identity.models import Role
from policies.visibility import tenant_scoped


class Reach(StrEnum):
    OWN = "own"
    ALL = "all"
    DEPARTMENT = "department"
    NONE = "none"
    FORBIDDEN = "forbidden"


OWN, ALL, DEPARTMENT, NONE, FORBIDDEN = Reach.OWN, Reach.ALL, Reach.DEPARTMENT, Reach.NONE, Reach.FORBIDDEN

# resource -> who reaches whose objects. "tenant" is anyone tenant-scoped, whatever the role; the
# other columns are roles outside companies. (An applicant is always tenant-scoped.)
REACH: dict[str, dict[str, Reach]] = {
    #             tenant     provider    office  reviewer  auditor  operator
    "scene":  dict(tenant=OWN, provider=DEPARTMENT, office=ALL, reviewer=ALL, auditor=ALL, operator=ALL),
    "query":  dict(tenant=OWN, provider=NONE, office=ALL, reviewer=ALL, auditor=ALL, operator=ALL),
    "result": dict(tenant=OWN, provider=NONE, office=ALL, reviewer=ALL, auditor=ALL, operator=ALL),
    "upload": dict(tenant=OWN, provider=NONE, office=ALL, reviewer=ALL, auditor=ALL, operator=NONE),
    "budget": dict(tenant=OWN, provider=FORBIDDEN, office=ALL, reviewer=FORBIDDEN, auditor=ALL, operator=FORBIDDEN),
    "audit":  dict(tenant=FORBIDDEN, provider=FORBIDDEN, office=ALL, reviewer=FORBIDDEN, auditor=ALL,
                   operator=FORBIDDEN),
    "trace":  dict(tenant=FORBIDDEN, provider=FORBIDDEN, office=ALL, reviewer=FORBIDDEN, auditor=ALL,
                   operator=FORBIDDEN),
}


def reach(role: Role | str, org_kind: str, resource: str) -> Reach:
    """Whose objects of `resource` a caller with this role, in an organization of this kind, reaches.
    A resource not in the table is not per-organization: `all` (casbin alone decides)."""
    row = REACH.get(resource)
    if row is None:
        return ALL
    if tenant_scoped(role, org_kind):
        return row["tenant"]
    return row[Role(role).value]


def reach_of(principal: Any, resource: str) -> Reach:
    """`reach` for a principal (anything with `role` and `org_kind`)."""
    return reach(principal.role, principal.org_kind, resource)


def may_read(principal: Any, resource: str, org_id: int) -> bool:
    """Whether the caller sees one object of `resource` owned by organization `org_id` (`department`
    reach needs the object itself: the domain decides with `reach_of`)."""
    r = reach_of(principal, resource)
    return r is ALL or (r is OWN and org_id == principal.org_id)


def readable(stmt: Any, principal: Any, resource: str, org_column: Any, department: Any = None) -> Any:
    """`stmt` narrowed to the objects of `resource` the caller reaches: `org_column` is the owning
    organization's column; `department`, for a `department` reach, the condition that the object
    uses the caller's department's data. Nothing reached: a statement that finds nothing."""
    r = reach_of(principal, resource)
    if r is ALL:
        return stmt
    if r is OWN:
        return stmt.where(org_column == principal.org_id)
    if r is DEPARTMENT and department is not None:
        return stmt.where(department)
    return stmt.where(false())


__all__ = ["REACH", "Reach", "may_read", "reach", "reach_of", "readable"]
