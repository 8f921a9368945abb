"""The catalog's logic: import descriptors all-or-nothing, register and update datasets, search."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, or_, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session, select

from catalog.descriptor import (
    Change,
    DatasetDescriptor,
    DatasetState,
    FieldState,
    OrganizationSpec,
    Problem,
    Source,
    descriptor_files,
    descriptor_kind,
    normalize_bounds,
    parse_descriptor_document,
    parse_organizations_document,
    reclassification_changes,
    shape_changes,
    state_of,
)
from catalog.models import Dataset, DatasetField, DatasetRevision, DatasetVersion
from catalog.schemas import (
    DatasetOut,
    DatasetPage,
    DatasetSummary,
    FieldOut,
    OrganizationOut,
    VersionOut,
)
from pdao.kernel.db import utcnow
from pdao.kernel.errors import PdaoError, conflict, invalid, not_found
from pdao.kernel.identity.models import Organization
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


@dataclass(frozen=True)
class ParsedOrganization:
    spec: OrganizationSpec
    source: Source
    index: int  # organizations[index] in its file


@dataclass(frozen=True)
class ParsedDataset:
    descriptor: DatasetDescriptor
    source: Source


# --- errors of the write paths ------------------------------------------------------------------

def concurrent_change(code: str) -> PdaoError:
    return conflict("concurrent_change",
                    f"Dataset '{code}' was changed by someone else at the same time; nothing was changed. "
                    "Read it again and retry.",
                    f"数据集 {code} 同时被他人修改，本次未做任何更改；请重新读取后再试。")


def is_write_conflict(session: Session, exc: DBAPIError) -> bool:
    """A database error that means "another writer got there first", not a broken database:
    a unique key taken by a concurrent insert, SQLite's lock / stale snapshot, PostgreSQL's
    serialization failure or deadlock."""
    if isinstance(exc, IntegrityError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    if session.get_bind().dialect.name == "sqlite":
        text = str(exc.orig).lower()
        return "locked" in text or "busy" in text
    return getattr(exc.orig, "sqlstate", None) in ("40001", "40P01")


class ChangeRefused(PdaoError):
    """A descriptor refused with reasons at paths of the descriptor (`changes`, e.g.
    `fields[3].sensitivity`); details carry them for clients, and an import points each at its
    file and line."""

    def __init__(self, code: str, message: str, message_zh: str, changes: list[Change], status: int = 409) -> None:
        super().__init__(status, code, message, message_zh, details=[c.as_dict() for c in changes])
        self.changes = changes


def _unknown_department(d: DatasetDescriptor) -> ChangeRefused:
    msg = f"'{d.source_department}' is not a registered source department."
    msg_zh = f"{d.source_department} 不是已登记的数据提供部门。"
    return ChangeRefused("unknown_department", msg, msg_zh, [Change("source_department", None, msg, msg_zh)],
                         status=422)


def _source_change(d: DatasetDescriptor) -> ChangeRefused:
    msg = f"Dataset '{d.code}' cannot move to another source department."
    msg_zh = f"数据集 {d.code} 不能更换数据提供部门（一数一源）。"
    return ChangeRefused("source_change", msg, msg_zh, [Change("source_department", None, msg, msg_zh)])


def _incompatible(code: str, changes: list[Change]) -> ChangeRefused:
    return ChangeRefused("descriptor_incompatible",
                         f"Dataset '{code}' has versions; its field names, order and types cannot change. "
                         "Register a new dataset code instead.",
                         f"数据集 {code} 已有数据版本，字段名称、顺序和类型不能更改；请登记新的数据集编码。", changes)


def _reclassification(code: str, changes: list[Change]) -> ChangeRefused:
    return ChangeRefused("reclassification_refused",
                         f"Dataset '{code}' has versions; this change would loosen its protection or narrow "
                         f"what its loaded data was checked against ({len(changes)} problem(s)). "
                         "Register a new dataset code instead.",
                         f"数据集 {code} 已有数据版本，本次更改将降低其保护级别或收窄已加载数据所依据的约束"
                         f"（{len(changes)} 处）；请登记新的数据集编码。", changes)


# --- import -------------------------------------------------------------------------------------

def read_descriptor_files(paths: list[Path], session: Session | None = None,
                          ) -> tuple[list[ParsedOrganization], list[ParsedDataset]]:
    """Parse every file first; refuse the whole set if any file has a problem. With a session,
    also check that each dataset's source department is a department, registered or in the set."""
    orgs: list[ParsedOrganization] = []
    datasets: list[ParsedDataset] = []
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
            parsed, ps, src = parse_organizations_document(text, str(f))
            orgs.extend(ParsedOrganization(o, src, i) for i, o in enumerate(parsed))
        else:
            desc, ps, src = parse_descriptor_document(text, str(f))
            if desc is not None:
                datasets.append(ParsedDataset(desc, src))
        problems.extend(ps)
    seen: dict[str, int] = {}
    for d in datasets:
        seen[d.descriptor.code] = seen.get(d.descriptor.code, 0) + 1
    problems.extend(Problem("(set)", None, "code", f"dataset '{c}' is described by {n} files")
                    for c, n in seen.items() if n > 1)
    if session is not None:
        kinds = dict(session.exec(select(Organization.code, Organization.kind)).all())
        kinds.update({o.spec.code: o.spec.kind.value for o in orgs})
        for d in datasets:
            dep = d.descriptor.source_department
            if kinds.get(dep) != "department":
                problems.append(d.source.problem(
                    "source_department", _unknown_department_message(dep, kinds.get(dep)),
                    f"{dep} 不是已登记的数据提供部门。"))
    if problems:
        raise DescriptorsRefused(problems)
    return orgs, datasets


def _unknown_department_message(code: str, kind: str | None) -> str:
    if kind is None:
        return f"'{code}' is not a registered source department (nor one in this set of files)."
    return f"'{code}' is not a registered source department (it is a {kind})."


def import_descriptors(session: Session, paths: list[Path]) -> ImportReport:
    """Validate all files, then apply them in the caller's one transaction.

    All or nothing: on any problem the session is rolled back (also what an earlier step of this
    import wrote) and DescriptorsRefused names every problem with its file and line; a commit the
    caller makes afterwards commits nothing of the set."""
    try:
        orgs, datasets = read_descriptor_files(paths, session)
        report = ImportReport()
        problems: list[Problem] = []
        for o in orgs:
            try:
                report.organizations[o.spec.code] = upsert_organization(session, o.spec)
            except PdaoError as e:
                problems.append(o.source.problem(("organizations", o.index, "kind"), e.message, e.message_zh))
        session.flush()
        for d in datasets:
            try:
                report.datasets[d.descriptor.code] = apply_descriptor(session, d.descriptor)
            except ChangeRefused as e:
                problems.extend(d.source.problem(c.path, c.message, c.message_zh) for c in e.changes)
            except PdaoError as e:
                if e.code == "concurrent_change":
                    raise  # the transaction is gone: nothing more can be checked in it
                problems.append(d.source.problem("", e.message, e.message_zh))
        if problems:
            raise DescriptorsRefused(problems)
        return report
    except BaseException:
        session.rollback()
        raise


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


# --- register and change one dataset ------------------------------------------------------------

def _field_row(dataset_id: int, position: int, f, dataset_grade: int) -> DatasetField:  # noqa: ANN001
    return DatasetField(
        dataset_id=dataset_id, position=position, name=f.name, type=f.type.value,
        sensitivity=f.sensitivity.value, pii_kind=f.pii_kind.value if f.pii_kind else None,
        masking=f.masking.value, grade=f.grade or dataset_grade, nullable=f.nullable, domain=f.domain,
        bounds=f.bounds.model_dump(mode="json") if f.bounds else None, unit=f.unit,
        description_zh=f.description.zh, description_en=f.description.en,
    )


def state_of_rows(ds: Dataset, fields: list[DatasetField]) -> DatasetState:
    """The registered protection of a dataset, as `catalog.descriptor.state_of` gives it for a descriptor."""
    return DatasetState(
        grade=ds.grade, opening_class=ds.opening_class, privacy_unit=ds.privacy_unit,
        fields=tuple(FieldState(name=f.name, type=f.type, sensitivity=f.sensitivity, pii_kind=f.pii_kind,
                                masking=f.masking, grade=f.grade, nullable=f.nullable,
                                domain=tuple(f.domain) if f.domain is not None else None,
                                bounds=normalize_bounds(f.bounds)) for f in fields))


def apply_descriptor(session: Session, d: DatasetDescriptor) -> str:
    """Create or update one dataset from a valid descriptor. Answers created|updated|unchanged.

    Safe against concurrent writers: the change is one conditional UPDATE of the dataset row
    (`revision` still the one read; `version_count` still 0 when the change is only allowed
    without versions), so a concurrent update or load makes it fail cleanly instead of being
    lost. Raises 409 `concurrent_change` (and rolls the session back) when another writer won,
    `descriptor_incompatible` / `reclassification_refused` (ChangeRefused, with per-field changes)
    when the dataset has versions, and 422 `unknown_department`."""
    org = session.exec(select(Organization).where(Organization.code == d.source_department)).first()
    if org is None or org.kind != "department":
        raise _unknown_department(d)
    digest = d.sha256()
    values = dict(
        title_zh=d.title.zh, title_en=d.title.en,
        description_zh=d.description.zh if d.description else "",
        description_en=d.description.en if d.description else "",
        source_org_id=org.id, standard=d.standard, update_cycle=d.update_cycle.value,
        category=d.category.value, grade=d.grade, opening_class=d.opening_class.value,
        privacy_unit=d.privacy_unit, keywords=list(d.keywords), descriptor_sha256=digest,
    )
    try:
        ds = session.exec(select(Dataset).where(Dataset.code == d.code)
                          .execution_options(populate_existing=True)).first()
        if ds is None:
            return _create(session, d, values, digest)
        return _update(session, ds, d, values, digest, org.id)
    except DBAPIError as e:
        if not is_write_conflict(session, e):
            raise
        session.rollback()
        raise concurrent_change(d.code) from None
    except PdaoError as e:
        if e.code == "concurrent_change":
            session.rollback()
        raise


def _record_revision(session: Session, dataset_id: int, revision: int, d: DatasetDescriptor, digest: str) -> None:
    session.add(DatasetRevision(dataset_id=dataset_id, revision=revision, descriptor=d.model_dump(mode="json"),
                                sha256=digest))


def _create(session: Session, d: DatasetDescriptor, values: dict, digest: str) -> str:
    ds = Dataset(code=d.code, revision=1, version_count=0, **values)
    session.add(ds)
    session.flush()  # a concurrent creator of the same code: IntegrityError here (after it commits)
    for i, f in enumerate(d.fields):
        session.add(_field_row(ds.id, i, f, d.grade))
    _record_revision(session, ds.id, 1, d, digest)
    session.flush()
    return "created"


def _update(session: Session, ds: Dataset, d: DatasetDescriptor, values: dict, digest: str, org_id: int) -> str:
    if ds.descriptor_sha256 == digest:
        return "unchanged"
    if ds.source_org_id != org_id:
        raise _source_change(d)
    seen_revision, seen_versions = ds.revision, ds.version_count
    old, new = state_of_rows(ds, dataset_fields(session, ds.id)), state_of(d)
    shape = shape_changes(old, new)
    reclass = [] if shape else reclassification_changes(old, new)
    if seen_versions and shape:
        raise _incompatible(d.code, shape)
    if seen_versions and reclass:
        raise _reclassification(d.code, reclass)
    stmt = (update(Dataset)
            .where(Dataset.id == ds.id, Dataset.revision == seen_revision)
            .values(revision=Dataset.revision + 1, updated_at=utcnow(), **values)
            .execution_options(synchronize_session=False))
    if shape or reclass:  # only allowed while nothing is loaded: a load must not slip in before this commits
        stmt = stmt.where(Dataset.version_count == 0)
    if session.exec(stmt).rowcount != 1:
        now = session.exec(select(Dataset.revision, Dataset.version_count).where(Dataset.id == ds.id)).one()
        session.expire(ds)
        if now[0] != seen_revision:
            raise concurrent_change(d.code)
        raise _incompatible(d.code, shape) if shape else _reclassification(d.code, reclass)
    session.expire(ds)
    session.exec(delete(DatasetField).where(DatasetField.dataset_id == ds.id))
    for i, f in enumerate(d.fields):
        session.add(_field_row(ds.id, i, f, d.grade))
    _record_revision(session, ds.id, seen_revision + 1, d, digest)
    session.flush()
    return "updated"


# --- reading -----------------------------------------------------------------------------------

def scoped(stmt, scope: CatalogScope):  # noqa: ANN001
    """`stmt` over Dataset narrowed to what `scope` may see (the catalog's one visibility filter)."""
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
    stmt = scoped(select(Dataset, Organization).join(Organization, Dataset.source_org_id == Organization.id), scope)
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
        stmt = scoped(stmt, scope)
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
