"""The catalog's logic: import descriptors all-or-nothing, register and update datasets, search."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, or_
from sqlmodel import Session, select

from catalog.descriptor import (
    DatasetDescriptor,
    OrganizationSpec,
    Problem,
    descriptor_files,
    descriptor_kind,
    parse_descriptor_text,
    parse_organizations_text,
)
from catalog.models import Dataset, DatasetField, DatasetVersion, Organization
from catalog.schemas import (
    DatasetOut,
    DatasetPage,
    DatasetSummary,
    FieldOut,
    OrganizationOut,
    VersionOut,
)
from pdao.db import utcnow
from pdao.errors import PdaoError, conflict, invalid, not_found
from policies.catalog_rules import CatalogScope


class DescriptorsRefused(PdaoError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(422, "descriptor_invalid",
                         f"The descriptor has {len(problems)} problem(s); nothing was imported.",
                         f"描述文件有 {len(problems)} 处问题，未导入任何内容。",
                         details=[p.as_dict() for p in problems])
        self.problems = problems


@dataclass
class ImportReport:
    organizations: dict[str, str] = field(default_factory=dict)  # code -> created|updated|unchanged
    datasets: dict[str, str] = field(default_factory=dict)


def read_descriptor_files(paths: list[Path]) -> tuple[list[OrganizationSpec], list[DatasetDescriptor]]:
    """Parse every file first; refuse the whole set if any file has a problem."""
    orgs: list[OrganizationSpec] = []
    datasets: list[DatasetDescriptor] = []
    problems: list[Problem] = []
    files = descriptor_files(paths)
    if not files:
        raise invalid("no_descriptors", "No descriptor files were found.", "未找到描述文件。")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(str(f), None, "", f"cannot read: {e}"))
            continue
        if descriptor_kind(f) == "organizations":
            parsed, ps = parse_organizations_text(text, str(f))
            orgs.extend(parsed)
        else:
            desc, ps = parse_descriptor_text(text, str(f))
            if desc is not None:
                datasets.append(desc)
        problems.extend(ps)
    seen: dict[str, int] = {}
    for d in datasets:
        seen[d.code] = seen.get(d.code, 0) + 1
    problems.extend(Problem("(set)", None, "code", f"dataset '{c}' is described by {n} files")
                    for c, n in seen.items() if n > 1)
    if problems:
        raise DescriptorsRefused(problems)
    return orgs, datasets


def import_descriptors(session: Session, paths: list[Path]) -> ImportReport:
    """Validate all files, then apply them in the caller's one transaction."""
    orgs, datasets = read_descriptor_files(paths)
    report = ImportReport()
    for o in orgs:
        report.organizations[o.code] = upsert_organization(session, o)
    session.flush()
    problems = []
    for d in datasets:
        try:
            report.datasets[d.code] = apply_descriptor(session, d)
        except PdaoError as e:
            problems.append(Problem(d.code, None, "", e.message))
    if problems:
        raise DescriptorsRefused(problems)
    return report


def upsert_organization(session: Session, spec: OrganizationSpec) -> str:
    org = session.exec(select(Organization).where(Organization.code == spec.code)).first()
    values = {"name_zh": spec.name.zh, "name_en": spec.name.en, "kind": spec.kind.value,
              "credit_code": spec.credit_code}
    if org is None:
        session.add(Organization(code=spec.code, **values))
        return "created"
    if all(getattr(org, k) == v for k, v in values.items()):
        return "unchanged"
    if org.kind != spec.kind.value:
        raise conflict("org_kind_change", f"Organization '{spec.code}' cannot change its kind.",
                       f"机构 {spec.code} 不能更改类型。")
    for k, v in values.items():
        setattr(org, k, v)
    session.add(org)
    return "updated"


def _field_row(dataset_id: int, position: int, f, dataset_grade: int) -> DatasetField:  # noqa: ANN001
    return DatasetField(
        dataset_id=dataset_id, position=position, name=f.name, type=f.type.value,
        sensitivity=f.sensitivity.value, pii_kind=f.pii_kind.value if f.pii_kind else None,
        masking=f.masking.value, grade=f.grade or dataset_grade, nullable=f.nullable, domain=f.domain,
        bounds=f.bounds.model_dump(mode="json") if f.bounds else None, unit=f.unit,
        description_zh=f.description.zh, description_en=f.description.en,
    )


def apply_descriptor(session: Session, d: DatasetDescriptor) -> str:
    """Create or update one dataset from a valid descriptor. Answers created|updated|unchanged."""
    org = session.exec(select(Organization).where(Organization.code == d.source_department)).first()
    if org is None or org.kind != "department":
        raise invalid("unknown_department", f"'{d.source_department}' is not a registered source department.",
                      f"{d.source_department} 不是已登记的数据提供部门。")
    digest = d.sha256()
    values = dict(
        title_zh=d.title.zh, title_en=d.title.en,
        description_zh=d.description.zh if d.description else "",
        description_en=d.description.en if d.description else "",
        source_org_id=org.id, standard=d.standard, update_cycle=d.update_cycle.value,
        category=d.category.value, grade=d.grade, opening_class=d.opening_class.value,
        privacy_unit=d.privacy_unit, keywords=list(d.keywords), descriptor_sha256=digest,
    )
    ds = session.exec(select(Dataset).where(Dataset.code == d.code)).first()
    if ds is None:
        ds = Dataset(code=d.code, **values)
        session.add(ds)
        session.flush()
        for i, f in enumerate(d.fields):
            session.add(_field_row(ds.id, i, f, d.grade))
        return "created"
    if ds.descriptor_sha256 == digest:
        return "unchanged"
    if ds.source_org_id != org.id:
        raise conflict("source_change", f"Dataset '{d.code}' cannot move to another source department.",
                       f"数据集 {d.code} 不能更换数据提供部门（一数一源）。")
    old_fields = list(session.exec(select(DatasetField).where(DatasetField.dataset_id == ds.id)
                                   .order_by(DatasetField.position)).all())
    has_versions = session.exec(select(DatasetVersion.id).where(DatasetVersion.dataset_id == ds.id)).first()
    old_shape = [(f.name, f.type) for f in old_fields]
    new_shape = [(f.name, f.type.value) for f in d.fields]
    if has_versions is not None and old_shape != new_shape:
        raise conflict("descriptor_incompatible",
                       f"Dataset '{d.code}' has versions; its field names, order and types cannot change. "
                       "Register a new dataset code instead.",
                       f"数据集 {d.code} 已有数据版本，字段名称、顺序和类型不能更改；请登记新的数据集编码。")
    for k, v in values.items():
        setattr(ds, k, v)
    ds.revision += 1
    ds.updated_at = utcnow()
    session.add(ds)
    for f in old_fields:
        session.delete(f)
    session.flush()
    for i, f in enumerate(d.fields):
        session.add(_field_row(ds.id, i, f, d.grade))
    return "updated"


# --- reading -----------------------------------------------------------------------------------

def _scoped(stmt, scope: CatalogScope):  # noqa: ANN001
    conds = [Dataset.opening_class.in_(sorted(scope.opening_classes))]
    if scope.own_org_id is not None:
        conds.append(Dataset.source_org_id == scope.own_org_id)
    return stmt.where(or_(*conds))


@dataclass(frozen=True)
class DatasetFilters:
    q: str | None = None
    department: str | None = None
    category: str | None = None
    grade: int | None = None
    max_grade: int | None = None
    opening_class: str | None = None
    sensitivity: str | None = None  # datasets having at least one field of this sensitivity
    limit: int = 50
    offset: int = 0


def list_datasets(session: Session, scope: CatalogScope, flt: DatasetFilters) -> DatasetPage:
    stmt = _scoped(select(Dataset, Organization).join(Organization, Dataset.source_org_id == Organization.id), scope)
    if flt.q:
        q = flt.q.lower()

        def hit(col):  # noqa: ANN001, ANN202 - a literal substring: '_' and '%' are not wildcards
            return func.lower(col).contains(q, autoescape=True)

        field_hit = select(DatasetField.dataset_id).where(
            or_(hit(DatasetField.name), hit(DatasetField.description_zh), hit(DatasetField.description_en)))
        stmt = stmt.where(or_(hit(Dataset.code), hit(Dataset.title_zh), hit(Dataset.title_en),
                              hit(Dataset.description_zh), hit(Dataset.description_en), Dataset.id.in_(field_hit)))
    if flt.department:
        stmt = stmt.where(Organization.code == flt.department)
    if flt.category:
        stmt = stmt.where(Dataset.category == flt.category)
    if flt.grade is not None:
        stmt = stmt.where(Dataset.grade == flt.grade)
    if flt.max_grade is not None:
        stmt = stmt.where(Dataset.grade <= flt.max_grade)
    if flt.opening_class:
        stmt = stmt.where(Dataset.opening_class == flt.opening_class)
    if flt.sensitivity:
        stmt = stmt.where(Dataset.id.in_(select(DatasetField.dataset_id).where(
            DatasetField.sensitivity == flt.sensitivity)))
    total = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    rows = session.exec(stmt.order_by(Dataset.code).limit(flt.limit).offset(flt.offset)).all()
    ids = [ds.id for ds, _ in rows]
    counts = dict(session.exec(select(DatasetField.dataset_id, func.count()).where(DatasetField.dataset_id.in_(ids))
                               .group_by(DatasetField.dataset_id)).all()) if ids else {}
    latest: dict[int, dict[str, int | None]] = {i: {"prod": None, "dev": None} for i in ids}
    if ids:
        for ds_id, env, n in session.exec(select(DatasetVersion.dataset_id, DatasetVersion.env,
                                                 func.max(DatasetVersion.number))
                                          .where(DatasetVersion.dataset_id.in_(ids))
                                          .group_by(DatasetVersion.dataset_id, DatasetVersion.env)).all():
            latest[ds_id][env] = n
    items = [DatasetSummary(code=ds.code, title_zh=ds.title_zh, title_en=ds.title_en,
                            source_department=_org_out(org), category=ds.category, grade=ds.grade,
                            opening_class=ds.opening_class, update_cycle=ds.update_cycle,
                            field_count=counts.get(ds.id, 0), latest_version=latest[ds.id], updated_at=ds.updated_at)
             for ds, org in rows]
    return DatasetPage(items=items, total=total, limit=flt.limit, offset=flt.offset)


def _org_out(org: Organization) -> OrganizationOut:
    return OrganizationOut(code=org.code, name_zh=org.name_zh, name_en=org.name_en, kind=org.kind)


def find_dataset(session: Session, code: str, scope: CatalogScope | None = None) -> Dataset:
    """The dataset, if it exists and (with a scope) the caller may see it; else 404 either way."""
    stmt = select(Dataset).where(Dataset.code == code)
    if scope is not None:
        stmt = _scoped(stmt, scope)
    ds = session.exec(stmt).first()
    if ds is None:
        raise not_found(f"Dataset '{code}'", f"数据集 {code} ")
    return ds


def dataset_fields(session: Session, dataset_id: int) -> list[DatasetField]:
    return list(session.exec(select(DatasetField).where(DatasetField.dataset_id == dataset_id)
                             .order_by(DatasetField.position)).all())


def get_dataset(session: Session, code: str, scope: CatalogScope) -> DatasetOut:
    ds = find_dataset(session, code, scope)
    org = session.get(Organization, ds.source_org_id)
    versions = session.exec(select(DatasetVersion).where(DatasetVersion.dataset_id == ds.id)
                            .order_by(DatasetVersion.env, DatasetVersion.number)).all()
    return DatasetOut(
        **ds.model_dump(include={"code", "title_zh", "title_en", "description_zh", "description_en", "standard",
                                 "update_cycle", "category", "grade", "opening_class", "privacy_unit", "keywords",
                                 "revision", "descriptor_sha256", "created_at", "updated_at"}),
        source_department=_org_out(org),
        fields=[FieldOut(**f.model_dump(exclude={"id", "dataset_id", "position"})) for f in dataset_fields(session, ds.id)],
        versions=[VersionOut(**v.model_dump(include=set(VersionOut.model_fields))) for v in versions],
    )


def source_department_of(session: Session, code: str) -> str | None:
    """The code of the department a dataset belongs to, or None if there is no such dataset."""
    row = session.exec(select(Organization.code).join(Dataset, Dataset.source_org_id == Organization.id)
                       .where(Dataset.code == code)).first()
    return row
