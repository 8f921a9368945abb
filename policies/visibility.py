"""Who counts as a tenant when deciding what a caller may see. One pure predicate, over the role and
the kind of the caller's organization, used by every visibility rule that separates tenants.

A tenant is a data-using company. Its analysts are applicants, but a company may also name its own
compliance reviewer (`pdao.kernel.identity.models.ROLE_ORG_KINDS`: reviewers sit in the office, the
operating entity or a company). Deciding by role alone would give that reviewer the office's view of
every company's objects. So anyone in a company is tenant-scoped whatever their role, and so is an
applicant whatever organization it sits in (an applicant's organization is always a company; the
role alone is enough to scope it).

Used by the reach table (`policies.access`: whose scenes, queries, results, uploads and budgets a
caller reaches, and who may read the audit trail) and the catalog
(`policies.catalog_rules.catalog_scope`).
"""

from __future__ import annotations

from pdao.kernel.identity.models import Role

TENANT_ORG_KIND = "company"


def tenant_scoped(role: Role | str, org_kind: str) -> bool:
    """True if the caller sees only its own organization's objects (and the catalog a tenant sees):
    an applicant, or anyone whose organization is a company."""
    return role == Role.applicant or org_kind == TENANT_ORG_KIND


__all__ = ["TENANT_ORG_KIND", "tenant_scoped"]
