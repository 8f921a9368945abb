"""Who may see and manage which catalog entries. Pure functions over roles and organizations."""

from __future__ import annotations

from dataclasses import dataclass

from pdao.kernel.identity.models import Role
from policies.visibility import tenant_scoped

OPEN_CLASSES = frozenset({"unconditional", "conditional"})
ALL_CLASSES = frozenset({"unconditional", "conditional", "prohibited"})

# Tenants see what could be authorized; prohibited data (禁止开放, §3.7) is none of their business.
# Providers see the open catalog plus everything of their own department; the office, reviewers,
# auditors and the operator oversee the whole catalog.
_VISIBLE_CLASSES: dict[Role, frozenset[str]] = {
    Role.applicant: OPEN_CLASSES,
    Role.provider: OPEN_CLASSES,
    Role.office: ALL_CLASSES,
    Role.reviewer: ALL_CLASSES,
    Role.auditor: ALL_CLASSES,
    Role.operator: ALL_CLASSES,
}


@dataclass(frozen=True)
class CatalogScope:
    """The part of the catalog a caller may see: these opening classes, plus all of `own_org_id`'s."""

    opening_classes: frozenset[str]
    own_org_id: int | None

    def allows(self, opening_class: str, source_org_id: int) -> bool:
        return opening_class in self.opening_classes or source_org_id == self.own_org_id


def catalog_scope(role: Role, org_id: int, org_kind: str) -> CatalogScope:
    """What part of the catalog a caller sees. Anyone tenant-scoped (an applicant, or anyone in a
    company, such as a company's own reviewer: `policies.visibility.tenant_scoped`) sees the open
    catalog only, whatever the role table says; a prohibited dataset named directly is then 404,
    like a missing one (`catalog.service.find_dataset`)."""
    if tenant_scoped(role, org_kind):
        return CatalogScope(OPEN_CLASSES, None)
    return CatalogScope(_VISIBLE_CLASSES[role], org_id if role is Role.provider else None)


def may_manage_dataset(role: Role, org_code: str, source_department: str) -> bool:
    """Only a provider of the source department registers, changes or loads a dataset (一数一源)."""
    return role is Role.provider and org_code == source_department
