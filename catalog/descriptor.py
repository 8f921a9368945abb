"""Dataset descriptors: the YAML a provider writes, its schema, and the checks that refuse a bad one.

`parse_descriptor_file` reads a YAML file and answers either a valid `DatasetDescriptor` or a list
of `Problem`s, each with the file, the line and what is wrong. Nothing here touches the database.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date
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

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(document)'}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


Loc = tuple[str | int, ...]


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


def parse_descriptor_text(text: str, file: str) -> tuple[DatasetDescriptor | None, list[Problem]]:
    data, node, problems = _load_yaml(text, file)
    if problems:
        return None, problems
    desc, problems = _model_or_problems(DatasetDescriptor, data, node, file)
    if desc is None:
        return None, problems
    problems = [Problem(file, _line_of(node, loc), _dotted(loc), msg) for loc, msg in semantic_problems(desc)]
    return (None, problems) if problems else (desc, [])


def parse_descriptor_dict(data: dict[str, Any], file: str = "request") -> tuple[DatasetDescriptor | None, list[Problem]]:
    """The same checks for a descriptor sent as JSON (no lines to point at)."""
    desc, problems = _model_or_problems(DatasetDescriptor, data, None, file)
    if desc is None:
        return None, problems
    problems = [Problem(file, None, _dotted(loc), msg) for loc, msg in semantic_problems(desc)]
    return (None, problems) if problems else (desc, [])


def parse_organizations_text(text: str, file: str) -> tuple[list[OrganizationSpec], list[Problem]]:
    from catalog.identifiers import is_valid_uscc

    data, node, problems = _load_yaml(text, file)
    if problems:
        return [], problems
    parsed, problems = _model_or_problems(OrganizationsFile, data, node, file)
    if parsed is None:
        return [], problems
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
    return (parsed.organizations, []) if not problems else ([], problems)


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
