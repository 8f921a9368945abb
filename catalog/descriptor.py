"""Dataset descriptors: the YAML a provider writes, its schema, and the checks that refuse a bad one.

`parse_descriptor_file` reads a YAML file and answers either a valid `DatasetDescriptor` or a list
of `Problem`s, each with the file, the line and what is wrong. Nothing here touches the database.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class FieldType(StrEnum):
    string = "string"
    integer = "integer"
    float = "float"
    decimal = "decimal"  # money: stored as DECIMAL(18,2)
    date = "date"
    timestamp = "timestamp"
    boolean = "boolean"


NUMERIC_TYPES = {FieldType.integer, FieldType.float, FieldType.decimal}
TEMPORAL_TYPES = {FieldType.date, FieldType.timestamp}


class Sensitivity(StrEnum):
    identifier = "identifier"              # points at one person: ID number, name, phone, record ids
    quasi_identifier = "quasi_identifier"  # identifies in combination: birth date, district, sex
    sensitive = "sensitive"                # the attribute worth protecting: diagnosis, cost
    free_text = "free_text"                # may hide anything: chief complaint, notes
    public = "public"


class PiiKind(StrEnum):
    cn_id = "cn_id"
    name = "name"
    phone = "phone"
    address = "address"
    bank_card = "bank_card"
    email = "email"
    uscc = "uscc"
    passport = "passport"            # ordinary passport number (护照号)
    travel_permit = "travel_permit"  # HK/Macao/Taiwan travel permits (通行证, 回乡证, 台胞证)
    plate = "plate"                  # vehicle licence plate (车牌号)
    person_key = "person_key"  # a surrogate key of a person (the privacy unit)


class Masking(StrEnum):
    none = "none"
    pseudonym = "pseudonym"          # keyed HMAC per scene
    partial_id = "partial_id"        # ID number keeps region and last character
    partial_phone = "partial_phone"  # 139****5678
    partial_name = "partial_name"    # 张*
    year = "year"                    # date -> year
    month = "month"                  # date -> month
    age_band = "age_band"            # birth date -> 5-year age band
    district = "district"            # address -> district
    round = "round"                  # number -> rounded band
    pii_redact = "pii_redact"        # free text through the PII recognizers
    suppress = "suppress"            # never output


class OpeningClass(StrEnum):
    unconditional = "unconditional"
    conditional = "conditional"
    prohibited = "prohibited"


class Category(StrEnum):
    """The six categories of health data in GB/T 39725-2020."""

    personal_attributes = "personal_attributes"
    health_status = "health_status"
    medical_application = "medical_application"
    medical_payment = "medical_payment"
    health_resources = "health_resources"
    public_health = "public_health"


class UpdateCycle(StrEnum):
    realtime = "realtime"
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"
    quarterly = "quarterly"
    yearly = "yearly"
    once = "once"


class OrgKind(StrEnum):
    department = "department"
    company = "company"
    office = "office"
    operator = "operator"
    regulator = "regulator"


class Text(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)


class Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | date
    max: float | date


IDENT = r"^[a-z][a-z0-9_]{0,62}$"


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=IDENT)
    type: FieldType
    sensitivity: Sensitivity
    pii_kind: PiiKind | None = None
    masking: Masking = Masking.none
    grade: int | None = Field(default=None, ge=1, le=5)  # defaults to the dataset's grade
    nullable: bool = True
    domain: list[str] | None = None  # the public value domain of a category field
    bounds: Bounds | None = None     # the public bounds of a number or date, used to clamp
    unit: str | None = None
    description: Text


class DatasetDescriptor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(pattern=r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$", max_length=128)
    title: Text
    description: Text | None = None
    source_department: str = Field(min_length=1)
    standard: str = Field(min_length=1)
    update_cycle: UpdateCycle
    category: Category
    grade: int = Field(ge=1, le=5)
    opening_class: OpeningClass
    privacy_unit: str | None = None
    keywords: list[str] = []
    fields: list[FieldSpec] = Field(min_length=1)

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)

    def sha256(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


class OrganizationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    name: Text
    kind: OrgKind
    credit_code: str | None = None


class OrganizationsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    organizations: list[OrganizationSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a descriptor: where (file, line, dotted path) and what."""

    file: str
    line: int | None
    path: str
    message: str
    message_zh: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(document)'}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "line": self.line, "path": self.path, "message": self.message}
        if self.message_zh:
            out["message_zh"] = self.message_zh
        return out


Loc = tuple[str | int, ...]

# What the domain store can hold (sandbox/engine/store.py DUCK_TYPES): bounds outside these would be
# accepted here and make every later load fail on the cast.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
DECIMAL_SCALE = 2
DECIMAL_LIMIT = Decimal(10) ** (18 - DECIMAL_SCALE)  # DECIMAL(18,2): |x| < 10^16


def _bound_storage_problem(ftype: FieldType, value: float) -> str | None:
    """Why a numeric bound cannot be stored in the field's type, or None."""
    if not math.isfinite(value):
        return "bounds must be finite numbers"
    if ftype is FieldType.integer:
        if not float(value).is_integer():
            return f"bounds of an integer field must be whole numbers, got {value!r}"
        if not BIGINT_MIN <= value < 2.0**63:  # compared as the float the bound was parsed to
            return f"bound {value!r} is outside the integer (BIGINT) range [{BIGINT_MIN}, {BIGINT_MAX}]"
    elif ftype is FieldType.decimal:
        exact = Decimal(repr(float(value)))
        if abs(exact) >= DECIMAL_LIMIT:
            return (f"bound {value!r} is outside the decimal range of DECIMAL(18,2) "
                    f"(|x| < {DECIMAL_LIMIT:,})")
        if exact.normalize().as_tuple().exponent < -DECIMAL_SCALE:  # type: ignore[operator]
            return f"bound {value!r} has more than {DECIMAL_SCALE} decimal places (DECIMAL(18,2))"
    return None


def semantic_problems(d: DatasetDescriptor) -> list[tuple[Loc, str]]:
    """Rules a well-typed descriptor must still satisfy. Pure: (location, message) pairs."""
    out: list[tuple[Loc, str]] = []
    seen: set[str] = set()
    for i, f in enumerate(d.fields):
        at: Loc = ("fields", i)
        if f.name in seen:
            out.append(((*at, "name"), f"duplicate field name '{f.name}'"))
        seen.add(f.name)
        if f.grade is not None and f.grade > d.grade:
            out.append(((*at, "grade"), f"field grade {f.grade} is above the dataset grade {d.grade}"))
        if f.domain is not None:
            if f.type is not FieldType.string:
                out.append(((*at, "domain"), "a value domain is only for string fields"))
            if not f.domain:
                out.append(((*at, "domain"), "a value domain cannot be empty"))
            if len(set(f.domain)) != len(f.domain):
                out.append(((*at, "domain"), "a value domain lists a value twice"))
        if f.bounds is not None:
            if f.type in NUMERIC_TYPES:
                if isinstance(f.bounds.min, date) or isinstance(f.bounds.max, date):
                    out.append(((*at, "bounds"), "bounds of a number field must be numbers"))
                else:
                    for key in ("min", "max"):
                        why = _bound_storage_problem(f.type, getattr(f.bounds, key))
                        if why:
                            out.append(((*at, "bounds", key), why))
            elif f.type in TEMPORAL_TYPES:
                if not (isinstance(f.bounds.min, date) and isinstance(f.bounds.max, date)):
                    out.append(((*at, "bounds"), "bounds of a date field must be dates (YYYY-MM-DD)"))
            else:
                out.append(((*at, "bounds"), "bounds are only for number and date fields"))
            try:
                if f.bounds.min > f.bounds.max:  # type: ignore[operator]
                    out.append(((*at, "bounds"), "bounds: min is greater than max"))
            except TypeError:
                pass
        if f.sensitivity is Sensitivity.identifier and f.masking is Masking.none:
            out.append(((*at, "masking"), "an identifier needs a masking other than 'none'"))
        if f.sensitivity is Sensitivity.free_text and f.masking not in (Masking.pii_redact, Masking.suppress):
            out.append(((*at, "masking"), "free text must be masked with 'pii_redact' or 'suppress'"))
        if f.pii_kind is not None and f.sensitivity is Sensitivity.public:
            out.append(((*at, "sensitivity"), f"a field holding PII ({f.pii_kind}) cannot be 'public'"))
        if f.masking in (Masking.year, Masking.month, Masking.age_band) and f.type not in TEMPORAL_TYPES:
            out.append(((*at, "masking"), f"masking '{f.masking}' needs a date field"))
        if f.masking is Masking.round and f.type not in NUMERIC_TYPES:
            out.append(((*at, "masking"), "masking 'round' needs a number field"))
    if d.privacy_unit is not None:
        unit = d.field(d.privacy_unit)
        if unit is None:
            out.append((("privacy_unit",), f"privacy unit '{d.privacy_unit}' is not a field of this dataset"))
        else:
            if unit.nullable:
                out.append((("privacy_unit",), f"privacy unit '{d.privacy_unit}' must be declared nullable: false"))
            if unit.sensitivity is not Sensitivity.identifier:
                out.append((("privacy_unit",), f"privacy unit '{d.privacy_unit}' must be an identifier"))
    elif any(f.pii_kind is not None for f in d.fields):
        out.append((("privacy_unit",), "a dataset with personal data needs a privacy_unit (the person key)"))
    return out


def _line_of(node: yaml.Node | None, loc: Loc) -> int | None:
    """Walk the composed YAML node tree along a pydantic location; the deepest node found gives the line."""
    if node is None:
        return None
    best = node.start_mark.line + 1
    for key in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(key, str):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    nxt = v
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            nxt = node.value[key]
        if nxt is None:
            break
        node = nxt
        best = node.start_mark.line + 1
    return best


def _dotted(loc: Loc) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise yaml.MarkedYAMLError("while constructing a mapping", node.start_mark,
                                       f"duplicate key '{key}'", k.start_mark)
        seen[key] = 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _first_alias_line(text: str) -> int | None:
    """Anchors and aliases let a few hundred bytes expand into millions of nodes; descriptors need none."""
    try:
        for tok in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(tok, (yaml.AliasToken, yaml.AnchorToken)):
                return tok.start_mark.line + 1
    except yaml.YAMLError:
        return None  # malformed: the parser below reports it with its line
    return None


def _load_yaml(text: str, file: str) -> tuple[Any, yaml.Node | None, list[Problem]]:
    alias_line = _first_alias_line(text)
    if alias_line is not None:
        return None, None, [Problem(file, alias_line, "", "YAML anchors and aliases are not allowed in a descriptor")]
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        return None, None, [Problem(file, mark.line + 1 if mark else None, "", f"YAML: {e.problem}")]
    except yaml.YAMLError as e:
        return None, None, [Problem(file, None, "", f"YAML: {e}")]
    return data, node, []


def _validation_problems(err: ValidationError, node: yaml.Node | None, file: str) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "enum":
            msg = f"{msg}, got {str(e.get('input'))[:40]!r}"
        out.append(Problem(file, _line_of(node, loc), _dotted(loc), msg))
    return out


def _model_or_problems(model: type[BaseModel], data: Any, node: yaml.Node | None, file: str):
    if not isinstance(data, dict):
        return None, [Problem(file, 1, "", "the document must be a mapping of keys to values")]
    try:
        return model.model_validate(data), []
    except ValidationError as err:
        return None, _validation_problems(err, node, file)


@dataclass(frozen=True)
class Source:
    """Where a parsed document came from (file and YAML node tree), so that a problem found later,
    at the apply stage, still points at a file and a line."""

    file: str
    node: yaml.Node | None = None

    def problem(self, where: Loc | str, message: str, message_zh: str = "") -> Problem:
        loc = parse_dotted(where) if isinstance(where, str) else where
        return Problem(self.file, _line_of(self.node, loc), _dotted(loc), message, message_zh)


def parse_dotted(path: str) -> Loc:
    """'fields[3].type' -> ('fields', 3, 'type'): the inverse of the dotted paths in problems."""
    out: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        out.append(int(index) if index else name)
    return tuple(out)


def parse_descriptor_document(text: str, file: str) -> tuple[DatasetDescriptor | None, list[Problem], Source]:
    """Like `parse_descriptor_text`, also answering the `Source` to point later problems with."""
    data, node, problems = _load_yaml(text, file)
    src = Source(file, node)
    if problems:
        return None, problems, src
    desc, problems = _model_or_problems(DatasetDescriptor, data, node, file)
    if desc is None:
        return None, problems, src
    problems = [src.problem(loc, msg) for loc, msg in semantic_problems(desc)]
    return (None, problems, src) if problems else (desc, [], src)


def parse_descriptor_text(text: str, file: str) -> tuple[DatasetDescriptor | None, list[Problem]]:
    desc, problems, _ = parse_descriptor_document(text, file)
    return desc, problems


def parse_descriptor_dict(data: dict[str, Any], file: str = "request") -> tuple[DatasetDescriptor | None, list[Problem]]:
    """The same checks for a descriptor sent as JSON (no lines to point at)."""
    desc, problems = _model_or_problems(DatasetDescriptor, data, None, file)
    if desc is None:
        return None, problems
    problems = [Problem(file, None, _dotted(loc), msg) for loc, msg in semantic_problems(desc)]
    return (None, problems) if problems else (desc, [])


def parse_organizations_document(text: str, file: str) -> tuple[list[OrganizationSpec], list[Problem], Source]:
    """Organizations of one file (the nth at `organizations[n]` of the `Source`)."""
    from catalog.identifiers import is_valid_uscc

    data, node, problems = _load_yaml(text, file)
    src = Source(file, node)
    if problems:
        return [], problems, src
    parsed, problems = _model_or_problems(OrganizationsFile, data, node, file)
    if parsed is None:
        return [], problems, src
    seen: set[str] = set()
    for i, org in enumerate(parsed.organizations):
        loc: Loc = ("organizations", i)
        if org.code in seen:
            problems.append(Problem(file, _line_of(node, (*loc, "code")), _dotted((*loc, "code")),
                                    f"duplicate organization code '{org.code}'"))
        seen.add(org.code)
        if org.credit_code is not None and not is_valid_uscc(org.credit_code):
            problems.append(Problem(file, _line_of(node, (*loc, "credit_code")), _dotted((*loc, "credit_code")),
                                    "not a valid unified social credit code (GB 32100 check character)"))
    return (parsed.organizations, [], src) if not problems else ([], problems, src)


DescriptorKind = Literal["dataset", "organizations"]


def descriptor_kind(path: Path) -> DescriptorKind:
    return "organizations" if path.stem in ("organizations", "orgs") else "dataset"


PACKAGED_DESCRIPTORS = Path(__file__).parent / "descriptors"


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def descriptor_files(paths: list[Path]) -> list[Path]:
    """Expand directories; organizations files first so datasets can name their departments."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.y*ml"), key=lambda q: _natural(q.name)) if p.is_dir() else [p])
    return sorted(files, key=lambda f: descriptor_kind(f) != "organizations")


# --- changes to a registered dataset ------------------------------------------------------------
#
# Pure functions comparing what is registered with a new descriptor. catalog.service decides when
# they apply (a dataset with loaded versions) and makes the decision stick (a conditional UPDATE).

# From most to least protected. Moving a field down this order, once data is loaded, is a
# reclassification that needs a new dataset code, not a descriptor edit.
SENSITIVITY_ORDER = (Sensitivity.identifier, Sensitivity.free_text, Sensitivity.sensitive,
                     Sensitivity.quasi_identifier, Sensitivity.public)
OPENING_ORDER = (OpeningClass.prohibited, OpeningClass.conditional, OpeningClass.unconditional)


@dataclass(frozen=True)
class FieldState:
    """What of a field protects it or constrains its values (not titles or descriptions)."""

    name: str
    type: str
    sensitivity: str
    pii_kind: str | None
    masking: str
    grade: int  # effective: the field's own or the dataset's
    nullable: bool
    domain: tuple[str, ...] | None
    bounds: tuple[Any, Any] | None  # (min, max): floats, or dates


@dataclass(frozen=True)
class DatasetState:
    grade: int
    opening_class: str
    privacy_unit: str | None
    fields: tuple[FieldState, ...]


def _bound_value(v: Any) -> Any:
    if isinstance(v, str):  # a date bound as stored in the catalog (JSON)
        return date.fromisoformat(v)
    return v


def normalize_bounds(bounds: Bounds | dict[str, Any] | None) -> tuple[Any, Any] | None:
    if bounds is None:
        return None
    lo, hi = (bounds.min, bounds.max) if isinstance(bounds, Bounds) else (bounds["min"], bounds["max"])
    lo, hi = _bound_value(lo), _bound_value(hi)
    return (float(lo), float(hi)) if not isinstance(lo, date) else (lo, hi)


def state_of(d: DatasetDescriptor) -> DatasetState:
    return DatasetState(
        grade=d.grade, opening_class=d.opening_class.value, privacy_unit=d.privacy_unit,
        fields=tuple(FieldState(
            name=f.name, type=f.type.value, sensitivity=f.sensitivity.value,
            pii_kind=f.pii_kind.value if f.pii_kind else None, masking=f.masking.value, grade=f.grade or d.grade,
            nullable=f.nullable, domain=tuple(f.domain) if f.domain is not None else None,
            bounds=normalize_bounds(f.bounds)) for f in d.fields))


@dataclass(frozen=True)
class Change:
    """One change a descriptor may not make: where (dotted path), which field, and why, in English and Chinese."""

    path: str
    field: str | None
    message: str
    message_zh: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "field": self.field, "message": self.message, "message_zh": self.message_zh}


def shape_changes(old: DatasetState, new: DatasetState) -> list[Change]:
    """Differences in field names, order and types (frozen once a dataset has versions)."""
    out = []
    for i, (a, b) in enumerate(zip(old.fields, new.fields, strict=False)):
        if a.name != b.name:
            out.append(Change(f"fields[{i}].name", a.name, f"field {i + 1} was '{a.name}', now '{b.name}'",
                              f"第 {i + 1} 个字段原为 {a.name}，现为 {b.name}"))
        elif a.type != b.type:
            out.append(Change(f"fields[{i}].type", a.name, f"field '{a.name}' was {a.type}, now {b.type}",
                              f"字段 {a.name} 的类型原为 {a.type}，现为 {b.type}"))
    if len(old.fields) != len(new.fields):
        out.append(Change("fields", None, f"the dataset had {len(old.fields)} fields, now {len(new.fields)}",
                          f"数据集原有 {len(old.fields)} 个字段，现为 {len(new.fields)} 个"))
    return out


def _rank(order: tuple[StrEnum, ...], value: str) -> int:
    return [v.value for v in order].index(value)


def _show(v: Any) -> str:
    return "none" if v is None else str(v)


def reclassification_changes(old: DatasetState, new: DatasetState) -> list[Change]:
    """Every way `new` protects the data less than `old`, or constrains values that loaded
    versions were checked against more narrowly. Tightening, and metadata (titles, descriptions,
    keywords, standard, update cycle), answer nothing. Fields are compared by name."""
    out: list[Change] = []
    if new.grade < old.grade:
        out.append(Change("grade", None, f"the dataset grade would go down from {old.grade} to {new.grade}",
                          f"数据集分级将由 {old.grade} 级降为 {new.grade} 级"))
    if _rank(OPENING_ORDER, new.opening_class) > _rank(OPENING_ORDER, old.opening_class):
        out.append(Change("opening_class", None,
                          f"the opening class would open from '{old.opening_class}' to '{new.opening_class}'",
                          f"开放类型将由 {old.opening_class} 放宽为 {new.opening_class}"))
    if old.privacy_unit is not None and new.privacy_unit != old.privacy_unit:
        out.append(Change("privacy_unit", None,
                          f"the privacy unit would change from '{old.privacy_unit}' to '{_show(new.privacy_unit)}'",
                          f"隐私单元（个人键）将由 {old.privacy_unit} 改为 {_show(new.privacy_unit)}"))
    olds = {f.name: f for f in old.fields}
    for i, b in enumerate(new.fields):
        a = olds.get(b.name)
        if a is None:
            continue
        at = f"fields[{i}]"
        if b.grade < a.grade:
            out.append(Change(f"{at}.grade", b.name, f"field '{b.name}': grade would go down from {a.grade} to {b.grade}",
                              f"字段 {b.name}：分级将由 {a.grade} 级降为 {b.grade} 级"))
        if _rank(SENSITIVITY_ORDER, b.sensitivity) > _rank(SENSITIVITY_ORDER, a.sensitivity):
            out.append(Change(f"{at}.sensitivity", b.name,
                              f"field '{b.name}': sensitivity would move from '{a.sensitivity}' toward public "
                              f"('{b.sensitivity}')",
                              f"字段 {b.name}：敏感类别将由 {a.sensitivity} 降为 {b.sensitivity}"))
        if a.masking != b.masking and (b.masking == Masking.none or a.masking == Masking.suppress):
            out.append(Change(f"{at}.masking", b.name,
                              f"field '{b.name}': masking would be loosened from '{a.masking}' to '{b.masking}'",
                              f"字段 {b.name}：脱敏方式将由 {a.masking} 放宽为 {b.masking}"))
        if a.pii_kind != b.pii_kind:
            out.append(Change(f"{at}.pii_kind", b.name,
                              f"field '{b.name}': PII kind would change from {_show(a.pii_kind)} to {_show(b.pii_kind)}",
                              f"字段 {b.name}：个人信息类型将由 {_show(a.pii_kind)} 改为 {_show(b.pii_kind)}"))
        if a.nullable and not b.nullable:
            out.append(Change(f"{at}.nullable", b.name,
                              f"field '{b.name}' would become non-nullable; loaded versions may hold empty values",
                              f"字段 {b.name} 将改为不可为空，已加载的数据版本可能含空值"))
        if b.domain is not None and (a.domain is None or not set(a.domain) <= set(b.domain)):
            lost = "" if a.domain is None else f" (drops {len(set(a.domain) - set(b.domain))} value(s))"
            out.append(Change(f"{at}.domain", b.name,
                              f"field '{b.name}': the value domain would be narrowed or added{lost}; loaded versions "
                              "may hold values outside it",
                              f"字段 {b.name}：值域将被收窄或新增，已加载的数据版本可能含值域外的值"))
        if b.bounds is not None and (a.bounds is None or b.bounds[0] > a.bounds[0] or b.bounds[1] < a.bounds[1]):
            was = "none" if a.bounds is None else f"[{a.bounds[0]}, {a.bounds[1]}]"
            out.append(Change(f"{at}.bounds", b.name,
                              f"field '{b.name}': bounds would narrow from {was} to [{b.bounds[0]}, {b.bounds[1]}]; "
                              "loaded versions may fall outside them",
                              f"字段 {b.name}：取值范围将由 {was} 收窄为 [{b.bounds[0]}, {b.bounds[1]}]，"
                              "已加载的数据版本可能超出"))
    return out
