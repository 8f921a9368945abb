"""Approved analysis templates: the only way per-person values come out of the domain (issue #6).

A *template* is parameterized SQL written by the applicant and approved by the office together with
the scene, like the analysis templates of cloud clean rooms, or the "insurer's rules run inside"
model of medical-insurance platforms. It reads the tenant's upload (one row per applicant or claim,
with a consent reference) and the catalog's datasets, and answers one row per *consented* upload
row whose columns are declared derived values — a flag, a band, a count band, a match result — and
exactly one passthrough: the upload's own row reference. Never a source field.

This module is the pure part and the engine part; scenes and HTTP are wired elsewhere:

- the model (`Template`, `UploadSpec`, `Param`, `Output`), read from YAML or a mapping
  (`template_from_mapping`, `load_template`, `library`), and its `template_digest` (what an
  approval records: any change to a template is a new template that needs a new approval);
- `check_template(template, catalog, upload_columns) -> list[Problem]`: parse once with sqlglot
  (DuckDB dialect), refuse anything that is not one SELECT of the accepted subset (an allow-list of
  node types and functions; no table functions such as `read_parquet`, no COPY/ATTACH/DDL/DML),
  check every table (a catalog dataset, the upload, or a CTE) and every column (sqlglot's
  `qualify`), and classify each top-level output by tracing it through CTEs and subqueries: a
  `flag` must only ever be TRUE/FALSE/0/1 (a predicate, BOOL_OR, a CASE of those literals), a
  `band`/`count_band`/`match` only ever one of its declared string labels, the `ref` exactly the
  upload's reference column — anything that can carry a source value (`r.name`,
  `MAX(s.total_cost)`, a CTE column passing one through, `CONCAT(hospital, '')`, a CASE returning
  a column) is refused, naming the output and why, in English and Chinese;
- `render(template, params, *, as_of)`: validate the parameters against their declared types and
  ranges, put them into the checked tree as typed literals, rename tables to the engine's views
  (`sandbox.engine.sql.view_name`, `upload_view_name`), wrap the upload in the consent filter (added here,
  never by the template's author), select only the declared outputs in a fixed order, and
  regenerate SQL from the tree — never by formatting text;
- `run_template(...)`: run it with `sandbox.engine.connection.domain_connection` (DuckDB bound to exactly the
  snapshots it reads and the upload), count the rows left out for consent by reason, check that
  the answer has one row per consented upload row and only declared values, and answer a
  `TemplateAnswer`.

See docs/templates.md.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from sqlglot import exp
from sqlglot.errors import OptimizeError, SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, build_scope

from pdao.kernel.errors import PdaoError, invalid
from sandbox.engine.connection import domain_connection
from sandbox.engine.execute import DatasetMeta
from sandbox.engine.sql import DIALECT, Problem, QueryRefused, parse_statement, upload_view_name, view_name
from sandbox.engine.store import DUCK_TYPES

__all__ = [
    "LEVELS", "OUTPUT_KINDS", "PARAM_TYPES", "KEY_FIELD", "EXCLUSION_REASONS", "LIBRARY_DIR",
    "Param", "Output", "UploadSpec", "Template", "TemplateAnswer", "TemplateRefused",
    "template_from_mapping", "load_template", "library", "library_template", "template_digest",
    "descriptor_catalog", "check_template", "template_reads", "template_disclosure", "MAX_COMBINATIONS", "validate_params", "render",
    "consent_condition", "run_template",
]

LEVELS = ("individual",)
OUTPUT_KINDS = ("flag", "band", "count_band", "match", "ref")
LABEL_KINDS = ("band", "count_band", "match")
PARAM_TYPES = ("date", "number", "string")
KEY_FIELD = ("health.resident", "id_number")   # what the upload's key column is joined to
EXCLUSION_REASONS = ("no_consent_ref", "invalid_period", "not_yet_valid", "expired")
REASON_TEXT = {
    "no_consent_ref": ("no consent reference", "缺少授权书编号"),
    "invalid_period": ("the consent's validity period is missing, unreadable or ends before it starts",
                       "授权有效期缺失、无法识别或起止颠倒"),
    "not_yet_valid": ("the consent is not valid yet on the run date", "授权在运行日期尚未生效"),
    "expired": ("the consent has expired on the run date", "授权在运行日期已过期"),
}
LIBRARY_DIR = Path(__file__).parent / "template_library"

MAX_OUTPUTS = 32
MAX_LABELS = 32
MAX_LABEL_CHARS = 64
MAX_PARAMS = 16
MAX_STRING_PARAM_CHARS = 200
# What all the outputs of one run may say together about one person's records in one dataset: the
# product of the value counts (NULL included) of the outputs that depend on any of its fields. 1,024
# combinations (10 bits) fit the shipped templates (underwriting says 320 about inpatient stays) and
# stop a template spelling out a value bit by bit (a phone number needs ~27 bits, a birth date ~15).
MAX_COMBINATIONS = 1024
# The pseudo-field of a dataset that stands for which of its rows there are, and how many: what a
# key, a join on it, or COUNT(*) depends on.
ROWS = "(rows)"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_RESERVED_PREFIXES = ("v_", "u_", "__pdao")   # engine view names and internal columns
_OUT_ALIAS = "t"                              # the template's answer inside the final projection


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Param:
    """A typed parameter, `:name` in the SQL. date/number: `min` and `max` (inclusive) are required;
    string: `choices` is required (a free string would let the caller steer the SQL at run time)."""

    name: str
    type: str                                   # date | number | string
    min: Any = None                             # dt.date | Decimal
    max: Any = None
    choices: tuple[str, ...] | None = None
    default: Any = None
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        for k in ("min", "max", "default"):
            v = getattr(self, k)
            if v is not None:
                out[k] = _jsonable(v)
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class Output:
    """One output column: `ref` (the upload's row reference, the only passthrough) or a derived
    value: `flag` (TRUE/FALSE), `band` / `count_band` / `match` (one of `labels`)."""

    name: str
    kind: str
    labels: tuple[str, ...] | None = None
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class UploadSpec:
    """The tenant's upload as the template reads it: a table named `name` in the SQL.

    key: the column joined to health.resident.id_number (the ID number: never output);
    ref: the upload's own row reference, the one passthrough output, unique per row;
    consent_ref / valid_from / valid_until: the applicant's signed authorization and its validity."""

    name: str
    columns: tuple[str, ...]
    key: str
    ref: str
    consent_ref: str
    valid_from: str
    valid_until: str
    # How many consented rows may name one ID number in a run. Each row asks the template's question
    # again about the same person (with the row's own values), so what a run can say about a person
    # is the per-dataset bound to this power: 1 for underwriting; a few for claims.
    max_rows_per_person: int = 1

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "columns": list(self.columns), "key": self.key, "ref": self.ref,
               "consent": {"ref": self.consent_ref, "valid_from": self.valid_from,
                           "valid_until": self.valid_until}}
        if self.max_rows_per_person != 1:     # (absent when 1: the digests approved before it existed stay)
            out["max_rows_per_person"] = self.max_rows_per_person
        return out


@dataclass(frozen=True)
class Template:
    name: str
    version: int
    level: str
    upload: UploadSpec
    params: tuple[Param, ...]
    sql: str
    outputs: tuple[Output, ...]
    title: tuple[str, str] = ("", "")           # (en, zh)
    description: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def ref_output(self) -> Output | None:
        refs = [o for o in self.outputs if o.kind == "ref"]
        return refs[0] if len(refs) == 1 else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "title": {"en": self.title[0], "zh": self.title[1]},
                "description": self.description, "level": self.level, "upload": self.upload.as_dict(),
                "params": [p.as_dict() for p in self.params], "sql": self.sql,
                "outputs": [o.as_dict() for o in self.outputs]}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return format(v, "f")
    return v


def template_digest(template: Template) -> str:
    """SHA-256 of the template's canonical JSON: what an approval records. Any change (SQL,
    outputs, labels, params, upload contract) gives another digest, hence needs a new approval."""
    text = json.dumps(template.as_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TemplateRefused(PdaoError):
    """422: the template (or its parameters) cannot be approved or run; details list each problem."""

    def __init__(self, problems: Sequence[Problem], code: str = "template_refused") -> None:
        self.problems = tuple(problems)
        first, more = self.problems[0], len(self.problems) - 1
        what_en, what_zh = (("The parameters were refused", "参数被拒绝") if code == "template_params_invalid"
                            else ("The template was refused", "分析模板被拒绝"))
        en, zh = f"{what_en}: {first.message}", f"{what_zh}：{first.message_zh}"
        if more:
            en += f" (and {more} more problem{'s' if more > 1 else ''}; see details)"
            zh += f"（另有 {more} 个问题，见 details）"
        super().__init__(422, code, en, zh, details=[p.as_dict() for p in self.problems])


# -- reading a template -------------------------------------------------------------------------


class _Shape:
    """Collects problems while reading a template mapping."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def bad(self, where: str, en: str, zh: str) -> None:
        self.problems.append(Problem(f"template {where}", f"{where}: {en}", f"{where}：{zh}"))

    def mapping(self, data: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            self.bad(where, "must be a mapping", "必须是映射（键值对）")
            return {}
        return data

    def text(self, data: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
        v = data.get(key)
        if v is None and not required:
            return ""
        if not isinstance(v, str) or not v.strip():
            self.bad(f"{where}.{key}", "must be a non-empty string", "必须是非空字符串")
            return ""
        return v

    def name(self, data: Mapping[str, Any], key: str, where: str) -> str:
        v = self.text(data, key, where)
        if v and not _NAME_RE.match(v):
            self.bad(f"{where}.{key}", f"{v!r} must be a lower-case name (a-z, 0-9, _; at most 63 characters)",
                     f"{v!r} 必须是小写名称（a-z、0-9、_，最多 63 个字符）")
        return v

    def names(self, data: Any, where: str) -> tuple[str, ...]:
        if not isinstance(data, list) or not data:
            self.bad(where, "must be a non-empty list of names", "必须是非空的名称列表")
            return ()
        out = []
        for i, v in enumerate(data):
            if not isinstance(v, str) or not _NAME_RE.match(v):
                self.bad(f"{where}[{i}]", f"{v!r} must be a lower-case name", f"{v!r} 必须是小写名称")
            else:
                out.append(v)
        return tuple(out)


def _as_date(v: Any) -> dt.date | None:
    if isinstance(v, dt.datetime):
        return None
    if isinstance(v, dt.date):
        return v
    if isinstance(v, str):
        try:
            return dt.date.fromisoformat(v.strip()) if len(v.strip()) == 10 else None
        except ValueError:
            return None
    return None


def _as_number(v: Any) -> Decimal | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, Decimal, str)):
        return None
    try:
        d = Decimal(str(v).strip())
    except InvalidOperation:
        return None
    if not d.is_finite() or abs(d.adjusted()) > 15:
        return None
    return d


def template_from_mapping(data: Any, source: str = "template") -> Template:
    """Build a Template from a mapping (e.g. parsed YAML or a JSON body), or raise TemplateRefused
    listing every shape problem. (The SQL itself is checked by `check_template`.)"""
    s = _Shape()
    d = s.mapping(data, source)
    known = {"name", "version", "title", "description", "level", "upload", "params", "sql", "outputs"}
    for k in d:
        if k not in known:
            s.bad(f"{source}.{k}", "is not a template field", "不是模板字段")
    name = s.name(d, "name", source)
    version = d.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        s.bad(f"{source}.version", "must be a positive whole number", "必须是正整数")
        version = 1
    title = d.get("title") or {}
    if isinstance(title, str):
        title = {"en": title, "zh": title}
    title = s.mapping(title, f"{source}.title")
    level = d.get("level", "individual")
    if level not in LEVELS:
        s.bad(f"{source}.level", f"must be one of {', '.join(LEVELS)}", f"必须是 {', '.join(LEVELS)} 之一")
    sql = s.text(d, "sql", source)

    u = s.mapping(d.get("upload"), f"{source}.upload")
    consent = s.mapping(u.get("consent"), f"{source}.upload.consent") if u else {}
    upload = UploadSpec(
        name=s.name(u, "name", f"{source}.upload") if u else "",
        columns=s.names(u.get("columns"), f"{source}.upload.columns") if u else (),
        key=s.name(u, "key", f"{source}.upload") if u else "",
        ref=s.name(u, "ref", f"{source}.upload") if u else "",
        consent_ref=s.name(consent, "ref", f"{source}.upload.consent") if consent else "",
        valid_from=s.name(consent, "valid_from", f"{source}.upload.consent") if consent else "",
        valid_until=s.name(consent, "valid_until", f"{source}.upload.consent") if consent else "",
        max_rows_per_person=_rows_per_person(s, u, f"{source}.upload") if u else 1,
    )

    params: list[Param] = []
    raw_params = d.get("params") or []
    if not isinstance(raw_params, list):
        s.bad(f"{source}.params", "must be a list", "必须是列表")
        raw_params = []
    for i, rp in enumerate(raw_params):
        where = f"{source}.params[{i}]"
        p = s.mapping(rp, where)
        if not p:
            continue
        for k in p:
            if k not in ("name", "type", "min", "max", "choices", "default", "description"):
                s.bad(f"{where}.{k}", "is not a parameter field", "不是参数字段")
        pname = s.name(p, "name", where)
        ptype = p.get("type")
        if ptype not in PARAM_TYPES:
            s.bad(f"{where}.type", f"must be one of {', '.join(PARAM_TYPES)}", f"必须是 {', '.join(PARAM_TYPES)} 之一")
            continue
        conv = _as_date if ptype == "date" else _as_number if ptype == "number" else None
        lo = hi = default = None
        choices = None
        if conv is not None:
            lo, hi = conv(p.get("min")), conv(p.get("max"))
            if lo is None or hi is None:
                s.bad(where, f"a {ptype} parameter needs min and max (inclusive) of its type",
                      f"{ptype} 类型的参数需要同类型的 min 和 max（含端点）")
            elif lo > hi:
                s.bad(where, "min is above max", "min 大于 max")
            if p.get("choices") is not None:
                s.bad(f"{where}.choices", "only a string parameter has choices", "只有字符串参数才有 choices")
            if p.get("default") is not None:
                default = conv(p.get("default"))
                if default is None or (lo is not None and hi is not None and not lo <= default <= hi):
                    s.bad(f"{where}.default", "must be of the parameter's type, within min and max",
                          "必须与参数类型一致并位于 min 与 max 之间")
        else:
            raw = p.get("choices")
            if not isinstance(raw, list) or not raw or not all(
                    isinstance(c, str) and 0 < len(c) <= MAX_STRING_PARAM_CHARS for c in raw):
                s.bad(f"{where}.choices", "a string parameter needs a non-empty list of allowed strings",
                      "字符串参数需要非空的可选值列表")
            else:
                choices = tuple(raw)
            if p.get("min") is not None or p.get("max") is not None:
                s.bad(where, "a string parameter has choices, not min/max", "字符串参数使用 choices，而不是 min/max")
            if p.get("default") is not None:
                default = p.get("default")
                if choices is not None and default not in choices:
                    s.bad(f"{where}.default", "must be one of the choices", "必须是可选值之一")
        params.append(Param(pname, ptype, lo, hi, choices, default, str(p.get("description") or "")))

    outputs: list[Output] = []
    raw_outputs = d.get("outputs")
    if not isinstance(raw_outputs, list) or not raw_outputs:
        s.bad(f"{source}.outputs", "must be a non-empty list", "必须是非空列表")
        raw_outputs = []
    for i, ro in enumerate(raw_outputs):
        where = f"{source}.outputs[{i}]"
        o = s.mapping(ro, where)
        if not o:
            continue
        for k in o:
            if k not in ("name", "kind", "labels", "bands", "description"):
                s.bad(f"{where}.{k}", "is not an output field", "不是输出字段")
        oname = s.name(o, "name", where)
        kind = o.get("kind")
        if kind not in OUTPUT_KINDS:
            s.bad(f"{where}.kind", f"must be one of {', '.join(OUTPUT_KINDS)}", f"必须是 {', '.join(OUTPUT_KINDS)} 之一")
            continue
        raw_labels = o.get("labels", o.get("bands"))
        labels = None
        if raw_labels is not None:
            if not isinstance(raw_labels, list) or not all(isinstance(x, str) for x in raw_labels):
                s.bad(f"{where}.labels", "must be a list of strings", "必须是字符串列表")
            else:
                labels = tuple(raw_labels)
        outputs.append(Output(oname, kind, labels, str(o.get("description") or "")))

    if s.problems:
        raise TemplateRefused(s.problems)
    return Template(name=name, version=version, level=str(level), upload=upload, params=tuple(params), sql=sql,
                    outputs=tuple(outputs), title=(str(title.get("en") or ""), str(title.get("zh") or "")),
                    description=str(d.get("description") or ""))


MAX_ROWS_PER_PERSON = 12


def _rows_per_person(s: _Shape, u: Mapping[str, Any], where: str) -> int:
    v = u.get("max_rows_per_person", 1)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_ROWS_PER_PERSON:
        s.bad(f"{where}.max_rows_per_person", f"must be a whole number from 1 to {MAX_ROWS_PER_PERSON}",
              f"必须是 1 到 {MAX_ROWS_PER_PERSON} 之间的整数")
        return 1
    return v


def load_template(path: Path | str) -> Template:
    """Read a template from a YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TemplateRefused([Problem(f"template {path.name}", f"{path.name} is not valid YAML: {e}",
                                       f"{path.name} 不是有效的 YAML：{e}")]) from None
    return template_from_mapping(data, source=path.stem)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[tuple[str, Template], ...]:
    out = []
    for p in sorted(LIBRARY_DIR.glob("*.yaml")):
        t = load_template(p)
        out.append((t.name, t))
    return tuple(out)


def library() -> dict[str, Template]:
    """The templates shipped with pdao (sandbox/templates/template_library/*.yaml), by name."""
    return dict(_library())


def library_template(name: str) -> Template:
    try:
        return library()[name]
    except KeyError:
        raise KeyError(f"no shipped template named {name!r}") from None


# ---------------------------------------------------------------------------------------------
# The catalog facts the checker needs


@functools.lru_cache(maxsize=1)
def _descriptor_catalog() -> tuple[tuple[str, DatasetMeta], ...]:
    from catalog.descriptor import PACKAGED_DESCRIPTORS, parse_descriptor_text

    out = []
    for p in sorted(PACKAGED_DESCRIPTORS.glob("*.yaml")):
        desc, problems = parse_descriptor_text(p.read_text(encoding="utf-8"), p.name)
        if desc is None or problems or not getattr(desc, "fields", None):
            continue
        out.append((desc.code, DatasetMeta.from_fields(desc.code, desc.privacy_unit, desc.fields)))
    return tuple(out)


def descriptor_catalog() -> dict[str, DatasetMeta]:
    """The packaged catalog (catalog/descriptors/*.yaml): code -> DatasetMeta (types, sensitivity). The default catalog
    of `render` and `run_template`; the scene layer passes the metadata database's facts instead."""
    return dict(_descriptor_catalog())


def _catalog_fields(catalog: Mapping[str, Any]) -> dict[str, dict[str, str | None]]:
    """code -> {field: catalog type or None}, from DatasetInfo, DatasetMeta, or a plain mapping of
    field names (or field -> type)."""
    out: dict[str, dict[str, str | None]] = {}
    for code, info in catalog.items():
        fields = getattr(info, "fields", info)
        types = getattr(info, "types", None) or {}
        if isinstance(fields, Mapping):     # field -> FieldMeta / {"type": …} / type name
            typed = {name: (f.get("type") if isinstance(f, Mapping) else getattr(f, "type", f))
                     for name, f in fields.items()}
            out[code.lower()] = {k: (str(v) if isinstance(v, str) else None) for k, v in typed.items()}
        else:
            out[code.lower()] = {name: types.get(name) for name in fields}
    return out


def _field_class(sensitivity: Any, pii_kind: Any) -> str:
    """How a template may use a field: `key` (a record or person key: joined, grouped, never a value),
    `direct` (a direct identifier — name, phone, address, ID number — or free text: never used), or
    `value`."""
    sensitivity = getattr(sensitivity, "value", sensitivity)
    pii_kind = getattr(pii_kind, "value", pii_kind)
    if sensitivity == "free_text":
        return "direct"        # notes and complaints quote names, ID numbers and phone numbers
    if sensitivity != "identifier":
        return "value"
    return "key" if pii_kind in (None, "person_key") else "direct"


@functools.lru_cache(maxsize=1)
def _descriptor_classes() -> dict[str, dict[str, str]]:
    return {code: {name: _field_class(f.sensitivity, f.pii_kind) for name, f in meta.fields.items()}
            for code, meta in _descriptor_catalog()}


def _field_nullable(catalog: Mapping[str, Any]) -> dict[str, dict[str, bool]]:
    """code -> {field: may be NULL}; unknown: True (a key whose non-nullness is not known is not
    trusted to keep groups apart)."""
    packaged = {code: {n: bool(f.nullable) for n, f in meta.fields.items()} for code, meta in _descriptor_catalog()}
    out: dict[str, dict[str, bool]] = {}
    for code, info in catalog.items():
        fields = getattr(info, "fields", info)
        known = packaged.get(code.lower(), {})
        out[code.lower()] = {}
        for name in (fields.keys() if isinstance(fields, Mapping) else fields):
            f = fields[name] if isinstance(fields, Mapping) else None
            nullable = f.get("nullable") if isinstance(f, Mapping) else getattr(f, "nullable", None)
            out[code.lower()][name] = bool(nullable) if nullable is not None else known.get(name, True)
    return out


def _field_classes(catalog: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """code -> {field: key | direct | value}. A catalog that gives field names only (no sensitivity)
    takes the packaged descriptors' facts; a field known to neither is a plain value."""
    packaged = _descriptor_classes()
    out: dict[str, dict[str, str]] = {}
    for code, info in catalog.items():
        fields = getattr(info, "fields", info)
        known = packaged.get(code.lower(), {})
        classes: dict[str, str] = {}
        for name in (fields.keys() if isinstance(fields, Mapping) else fields):
            f = fields[name] if isinstance(fields, Mapping) else None
            sens = f.get("sensitivity") if isinstance(f, Mapping) else getattr(f, "sensitivity", None)
            pii = f.get("pii_kind") if isinstance(f, Mapping) else getattr(f, "pii_kind", None)
            classes[name] = _field_class(sens, pii) if sens is not None else known.get(name, "value")
        out[code.lower()] = classes
    return out


def _upload_column_names(upload_columns: Iterable[str] | Mapping[str, Any] | None) -> list[str] | None:
    if upload_columns is None:
        return None
    return [str(c) for c in (upload_columns.keys() if isinstance(upload_columns, Mapping) else upload_columns)]


# ---------------------------------------------------------------------------------------------
# The checker

# Every node of an accepted template is one of these (plus exp.Table, checked on its own).
_STRUCTURE = (
    exp.Select, exp.From, exp.Join, exp.Where, exp.Group, exp.Having, exp.Qualify, exp.Order, exp.Ordered,
    exp.Limit, exp.With, exp.CTE, exp.TableAlias, exp.Subquery, exp.Alias, exp.Identifier, exp.Column,
    exp.Star, exp.Paren, exp.Window, exp.Filter, exp.Distinct, exp.Placeholder, exp.Literal,
    exp.Boolean, exp.Null, exp.DataType, exp.DataTypeParam, exp.Interval, exp.Var, exp.Cast, exp.TryCast,
)
_PREDICATES = (
    exp.And, exp.Or, exp.Not, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ,
    exp.NullSafeNEQ, exp.Is, exp.In, exp.Between, exp.Like, exp.ILike, exp.Exists, exp.StartsWith,
)
# No `%` and no `//`: they turn a value into its digits or bits (`YEAR(birth_date) % 2`), the way a
# template would smuggle a source value out through flags.
_ARITHMETIC = (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Neg)
_CONDITIONALS = (exp.Case, exp.If, exp.Coalesce, exp.Nullif, exp.Greatest, exp.Least)
_AGGREGATES = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.LogicalOr, exp.LogicalAnd, exp.CountIf)
_WINDOW_FUNCS = (exp.RowNumber, exp.Rank, exp.DenseRank)
_SCALARS = (
    exp.Abs, exp.Round, exp.Floor, exp.Ceil, exp.DateDiff, exp.DateAdd, exp.DateSub, exp.DateTrunc,
    exp.TimestampTrunc, exp.Extract, exp.Year, exp.Month, exp.Day, exp.Upper, exp.Lower, exp.Trim,
    exp.Length, exp.Substring, exp.Concat, exp.DPipe,
)
_ALLOWED = _STRUCTURE + _PREDICATES + _ARITHMETIC + _CONDITIONALS + _AGGREGATES + _WINDOW_FUNCS + _SCALARS
ALLOWED_FUNCTIONS = (
    "CASE", "IF", "COALESCE", "NULLIF", "GREATEST", "LEAST", "COUNT", "COUNT_IF", "SUM", "AVG", "MIN", "MAX",
    "BOOL_OR", "BOOL_AND", "ROW_NUMBER", "RANK", "DENSE_RANK", "ABS", "ROUND", "FLOOR", "CEIL", "DATE_DIFF",
    "DATE_ADD", "DATE_SUB", "DATE_TRUNC", "EXTRACT", "YEAR", "MONTH", "DAY", "UPPER", "LOWER", "TRIM",
    "LENGTH", "SUBSTRING (of upload columns and literals)", "CONCAT", "STARTS_WITH", "TRY_CAST",
    "CAST (of a literal or parameter, to BOOLEAN of a predicate, or to VARCHAR)", "+ - * /",
)
# The value of these is always a boolean (or NULL).
_BOOLEAN_VALUED = _PREDICATES + (exp.LogicalOr, exp.LogicalAnd)
_TEXT_TYPES = (exp.DataType.Type.VARCHAR, exp.DataType.Type.TEXT, exp.DataType.Type.CHAR, exp.DataType.Type.NCHAR,
               exp.DataType.Type.NVARCHAR)
_SELECT_ARGS = {"expressions", "from_", "joins", "where", "group", "having", "qualify", "order", "limit", "with_",
                "distinct"}
_JOIN_ARGS = {"this", "on", "side", "kind", "using"}
_BOOL = frozenset({True, False, None})


def _name_of(node: exp.Expression) -> str:
    """How a user would name a construct: `function READ_PARQUET`, `operator DPIPE`, `UNION`."""
    if isinstance(node, exp.Anonymous):
        return f"function {str(node.this).upper()}"
    if isinstance(node, exp.Func):
        head = node.sql(dialect=DIALECT, comments=False).split("(", 1)[0].strip()
        return f"function {head if head.replace('_', '').isalnum() else node.sql_name()}"
    if isinstance(node, (exp.Binary, exp.Unary)):
        return f"operator {node.key.upper()}"
    return node.key.upper()


def _short(node: exp.Expression, limit: int = 80) -> str:
    text = node.sql(dialect=DIALECT, comments=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _projection(select: exp.Select, name: str) -> exp.Expression | None:
    """The projection of `select` named `name` (DuckDB matches names case-insensitively; duplicates
    are refused by the checker, so there is at most one)."""
    return next((p for p in select.expressions if p.alias_or_name.lower() == name.lower()), None)


@dataclass(frozen=True)
class _Val:
    """What an expression's value can be: `values`, a finite set of literals (None is NULL), or
    opaque (values None): a source value, an upload column (`upload`), a number computed from data."""

    values: frozenset | None
    upload: str | None = None
    why: str = ""
    why_zh: str = ""


def _opaque(why: str, why_zh: str, upload: str | None = None) -> _Val:
    return _Val(None, upload, why, why_zh)


@dataclass
class _Analysis:
    problems: list[Problem]
    tree: exp.Select | None = None              # qualified, tables renamed, placeholders kept
    datasets: set[str] = field(default_factory=set)
    reads: set[tuple[str, str]] = field(default_factory=set)


class _Checker:
    def __init__(self, template: Template, catalog: Mapping[str, Any],
                 upload_columns: Iterable[str] | Mapping[str, Any] | None) -> None:
        self.t = template
        self.fields = _catalog_fields(catalog)
        self.upload_columns = _upload_column_names(upload_columns)
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()
        self.views: dict[str, tuple[str, str]] = {}     # view name -> ("dataset", code) | ("upload", name)
        self._memo: dict[tuple[int, str], _Val] = {}
        self._busy: set[tuple[int, str]] = set()
        self.scopes: dict[int, Scope] = {}
        self._reads_upload: dict[int, bool] = {}
        self.classes = _field_classes(catalog)
        self.nullable = _field_nullable(catalog)
        self.output_values: dict[str, int] = {}            # output -> how many values it can take
        self._deps: dict[tuple[int, str], frozenset[tuple[str, str]]] = {}
        self.output_deps: dict[str, list[str]] = {}       # output -> "dataset.field" it depends on
        self.field_combinations: dict[str, int] = {}      # "dataset.field" -> what all outputs say of it
        self.dataset_combinations: dict[str, int] = {}    # dataset -> what all outputs say of its records

    def refuse(self, construct: str, en: str, zh: str, **kw: Any) -> None:
        if (construct, en) not in self._seen:
            self._seen.add((construct, en))
            self.problems.append(Problem(construct, en, zh, **kw))

    # -- the model's own invariants -----------------------------------------------------------
    def model(self) -> None:
        t, u = self.t, self.t.upload
        if t.level not in LEVELS:
            self.refuse("level", f"level must be one of {', '.join(LEVELS)}", f"级别必须是 {', '.join(LEVELS)} 之一")
        for what, v in (("template name", t.name), ("upload name", u.name), ("upload key", u.key),
                        ("upload ref", u.ref), ("consent ref", u.consent_ref), ("consent valid_from", u.valid_from),
                        ("consent valid_until", u.valid_until)):
            if not isinstance(v, str) or not _NAME_RE.match(v):
                self.refuse(what, f"the {what} {v!r} must be a lower-case name", f"{what} {v!r} 必须是小写名称")
        if u.name.startswith(_RESERVED_PREFIXES):
            self.refuse("upload name", f"the upload name may not start with {', '.join(_RESERVED_PREFIXES)}",
                        f"上传表名称不能以 {', '.join(_RESERVED_PREFIXES)} 开头")
        cols = list(u.columns)
        if len(set(cols)) != len(cols):
            self.refuse("upload columns", "the upload's columns must be unique", "上传表的列名必须唯一")
        for role, col in (("key", u.key), ("ref", u.ref), ("consent ref", u.consent_ref),
                          ("consent valid_from", u.valid_from), ("consent valid_until", u.valid_until)):
            if col not in cols:
                self.refuse(f"upload {role}", f"the upload's {role} column {col} is not one of its columns",
                            f"上传表的 {role} 列 {col} 不在其列清单中")
        if u.ref == u.key:
            self.refuse("upload ref", "the row reference cannot be the ID number column: the ID number never "
                        "comes out", "行引用不能是身份证号列：身份证号不得输出")
        if self.upload_columns is not None:
            missing = [c for c in cols if c not in self.upload_columns]
            if missing:
                self.refuse("upload columns", f"the upload lacks the template's columns: {', '.join(missing)}",
                            f"上传数据缺少模板所需的列：{', '.join(missing)}")
        if not t.outputs:
            self.refuse("outputs", "a template needs outputs", "模板必须声明输出列")
        if len(t.outputs) > MAX_OUTPUTS:
            self.refuse("outputs", f"a template has at most {MAX_OUTPUTS} outputs", f"模板最多 {MAX_OUTPUTS} 个输出列")
        names = [o.name for o in t.outputs]
        if len(set(names)) != len(names):
            self.refuse("outputs", "output names must be unique", "输出列名必须唯一")
        refs = [o for o in t.outputs if o.kind == "ref"]
        if len(refs) != 1:
            self.refuse("outputs", f"a template has exactly one ref output (the upload's row reference), not "
                        f"{len(refs)}", f"模板必须恰有一个 ref 输出（上传表的行引用），而不是 {len(refs)} 个")
        for o in t.outputs:
            c = f"output {o.name}"
            if not _NAME_RE.match(o.name or ""):
                self.refuse(c, f"output name {o.name!r} must be a lower-case name", f"输出列名 {o.name!r} 必须是小写名称")
            if o.kind not in OUTPUT_KINDS:
                self.refuse(c, f"output {o.name}: kind must be one of {', '.join(OUTPUT_KINDS)}",
                            f"输出列 {o.name}：类型必须是 {', '.join(OUTPUT_KINDS)} 之一")
            elif o.kind in LABEL_KINDS:
                labels = o.labels or ()
                if not labels or len(labels) > MAX_LABELS or len(set(labels)) != len(labels) or not all(
                        isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels):
                    self.refuse(c, f"output {o.name} ({o.kind}) needs 1 to {MAX_LABELS} distinct labels of 1 to "
                                f"{MAX_LABEL_CHARS} characters", f"输出列 {o.name}（{o.kind}）需要 1 到 {MAX_LABELS} "
                                f"个互不相同、1 到 {MAX_LABEL_CHARS} 个字符的标签")
            elif o.labels:
                self.refuse(c, f"output {o.name} ({o.kind}) takes no labels", f"输出列 {o.name}（{o.kind}）不带标签")
        if len(t.params) > MAX_PARAMS:
            self.refuse("params", f"a template has at most {MAX_PARAMS} parameters", f"模板最多 {MAX_PARAMS} 个参数")
        pnames = [p.name for p in t.params]
        if len(set(pnames)) != len(pnames):
            self.refuse("params", "parameter names must be unique", "参数名必须唯一")
        for p in t.params:
            c = f"parameter {p.name}"
            if p.type not in PARAM_TYPES:
                self.refuse(c, f"parameter {p.name}: type must be one of {', '.join(PARAM_TYPES)}",
                            f"参数 {p.name}：类型必须是 {', '.join(PARAM_TYPES)} 之一")
            elif p.type == "string":
                if not p.choices:
                    self.refuse(c, f"parameter {p.name}: a string parameter needs its choices",
                                f"参数 {p.name}：字符串参数需要可选值列表")
            elif p.min is None or p.max is None or p.min > p.max:
                self.refuse(c, f"parameter {p.name}: a {p.type} parameter needs min <= max",
                            f"参数 {p.name}：{p.type} 参数需要 min <= max")

    # -- tables ---------------------------------------------------------------------------------
    def table(self, node: exp.Table, ctes: set[str]) -> None:
        if not isinstance(node.this, exp.Identifier):
            inner = node.this
            what = _name_of(inner) if isinstance(inner, exp.Expression) else "table expression"
            self.refuse(f"table {what}", f"{what} is not accepted: a template reads catalog datasets by their code "
                        "and its upload by name; files and table functions are never read",
                        f"不接受 {what}：模板只能按代码读取数据目录中的数据集、按名称读取上传表，不能读取文件或表函数")
            return
        extra = [k for k, v in node.args.items() if v and k not in ("this", "db", "alias")]
        if extra:
            what = extra[0].rstrip("_").upper()
            self.refuse(f"table {what}", f"{what} on a table is not accepted", f"不接受对表使用 {what}")
            return
        alias = node.args.get("alias")
        if alias is not None and (alias.args.get("columns") or not isinstance(alias.this, exp.Identifier)):
            self.refuse("table alias with columns", "a table alias may not rename columns", "表别名不能重命名列")
            return
        name = node.this.name
        db = node.args.get("db")
        if isinstance(db, exp.Identifier):
            code = f"{db.name}.{name}".lower()
            if code not in self.fields:
                self.refuse(f"table {code}", f"{code} is not a dataset of the catalog", f"{code} 不是数据目录中的数据集",
                            dataset=code)
                return
            view = view_name(code)
            self.views[view] = ("dataset", code)
            short = name.lower()
        elif name.lower() in ctes:
            # A CTE is visible only below it: in the main query, or in a later CTE. Elsewhere the
            # engine would read a table of its own by that name.
            holder = node.find_ancestor(exp.CTE)
            order = getattr(self, "_cte_order", [])
            mine = order.index(holder.alias_or_name.lower()) if holder is not None and \
                holder.alias_or_name.lower() in order else len(order)
            if name.lower() in order[:mine]:
                return
            self.refuse(f"table {name}", f"{name} is used before (or inside) the CTE of that name: a CTE can be read "
                        "only by the main query and by the CTEs after it", f"{name} 在同名 CTE 定义之前（或其内部）被引用："
                        "CTE 只能被主查询及其后的 CTE 读取")
            return
        elif name.lower() == self.t.upload.name:
            view = upload_view_name(self.t.upload.name)
            self.views[view] = ("upload", self.t.upload.name)
            short = self.t.upload.name
        else:
            hint_en = hint_zh = ""
            matches = [c for c in self.fields if c.split(".", 1)[-1] == name.lower()]
            if len(matches) == 1:
                hint_en, hint_zh = f" (did you mean {matches[0]}?)", f"（是否指 {matches[0]}？）"
            self.refuse(f"table {name}", f"{name} is neither a catalog dataset, the upload {self.t.upload.name}, nor a "
                        f"CTE of the template{hint_en}", f"{name} 既不是数据目录中的数据集、上传表 {self.t.upload.name}，"
                        f"也不是模板中的 CTE{hint_zh}")
            return
        node.set("this", exp.to_identifier(view, quoted=True))
        node.set("db", None)
        if alias is None:
            node.set("alias", exp.TableAlias(this=exp.to_identifier(short, quoted=True)))

    # -- the walk over every node ---------------------------------------------------------------
    def walk(self, tree: exp.Select) -> set[str]:
        """Refuse every node outside the accepted subset; collect placeholders; rename tables."""
        ctes: set[str] = set()
        for w in tree.find_all(exp.With):
            if w.parent is not tree:
                self.refuse("nested WITH", "WITH is accepted only at the top of the template: a nested WITH would let "
                            "a name mean a CTE in one place and an engine table in another",
                            "WITH 只能出现在模板最外层：嵌套的 WITH 会使同一名称在一处指 CTE、在另一处指引擎中的表")
        order = [c.alias_or_name.lower() for c in (tree.args["with_"].expressions if tree.args.get("with_") else [])]
        self._cte_order = order
        for cte in tree.find_all(exp.CTE):
            alias = cte.alias_or_name.lower()
            if cte.args.get("alias") is not None and cte.args["alias"].args.get("columns"):
                self.refuse(f"CTE {alias}", f"CTE {alias}: name its columns in its SELECT, not after its name",
                            f"CTE {alias}：请在其 SELECT 中为列命名，而不是在名称后")
            if alias == self.t.upload.name or alias.startswith(_RESERVED_PREFIXES) or not alias:
                self.refuse(f"CTE {alias}", f"CTE {alias}: the name is taken (the upload, or an engine view prefix "
                            f"{', '.join(_RESERVED_PREFIXES)})", f"CTE {alias}：名称已被占用（上传表名或引擎视图前缀 "
                            f"{', '.join(_RESERVED_PREFIXES)}）")
            if alias in ctes:
                self.refuse(f"CTE {alias}", f"CTE {alias} is defined twice", f"CTE {alias} 重复定义")
            ctes.add(alias)
        placeholders: set[str] = set()
        tables: list[exp.Table] = []
        for node in tree.walk():
            if isinstance(node, exp.Table):
                tables.append(node)
                continue
            if isinstance(node, exp.Identifier) and isinstance(node.parent, exp.Table):
                continue
            if isinstance(node, exp.Func) and isinstance(node.parent, exp.Table) and node.arg_key == "this":
                continue   # a table function: refused by `table`
            if type(node) not in _ALLOWED:
                self.refuse_node(node)
                continue
            if isinstance(node, exp.Select):
                odd = [k for k, v in node.args.items() if v and k not in _SELECT_ARGS]
                if odd:
                    what = odd[0].rstrip("_").upper()
                    self.refuse(f"SELECT {what}", f"{what} is not accepted in a template", f"模板中不接受 {what}")
            elif isinstance(node, exp.Join):
                side = str(node.args.get("side") or "").upper()
                kind = str(node.args.get("kind") or "").upper()
                if kind not in ("", "INNER", "OUTER", "CROSS"):
                    self.refuse(f"{kind} JOIN", f"{kind} JOIN is not accepted: use EXISTS / NOT EXISTS tied to the row, "
                                "or [LEFT|INNER] JOIN … ON …", f"不接受 {kind} JOIN：请使用与该行关联的 EXISTS / NOT EXISTS，"
                                "或 [LEFT|INNER] JOIN … ON …")
                if side in ("RIGHT", "FULL"):
                    self.refuse(f"{side} JOIN", f"{side} JOIN is not accepted: use [LEFT|INNER] JOIN … ON …, with the "
                                "upload's rows on the left", f"不接受 {side} JOIN：请使用 [LEFT|INNER] JOIN … ON …，"
                                "并将上传表的行放在左侧")
                odd = [k for k, v in node.args.items() if v and k not in _JOIN_ARGS]
                if odd:
                    what = f"JOIN {odd[0].rstrip('_').upper()}"
                    self.refuse(what, f"{what} is not accepted: use [LEFT|INNER] JOIN … ON …",
                                f"不接受 {what}：请使用 [LEFT|INNER] JOIN … ON …")
            elif isinstance(node, exp.TableAlias) and node.args.get("columns"):
                self.refuse("alias with columns", "an alias may not rename columns: name them in the SELECT",
                            "别名不能重命名列：请在 SELECT 中为列命名")
            elif isinstance(node, exp.Star) and any(v for v in node.args.values()):
                self.refuse("SELECT * with modifiers", "* EXCLUDE / REPLACE / RENAME is not accepted: list the columns",
                            "不接受 * EXCLUDE / REPLACE / RENAME：请列出各列")
            elif isinstance(node, exp.With) and node.args.get("recursive"):
                self.refuse("WITH RECURSIVE", "recursive CTEs are not accepted", "不接受递归 CTE")
            elif type(node) is exp.Cast and not self.safe_cast(node):
                self.refuse("CAST", f"CAST of a column can fail on a value, and a failure would say something about "
                            f"the data ({_short(node)}): use TRY_CAST",
                            f"对列使用 CAST 可能因某个值而失败，失败本身会泄露数据信息（{_short(node)}）：请使用 TRY_CAST")
            elif isinstance(node, exp.Placeholder):
                if not isinstance(node.this, str) or not node.this:
                    self.refuse("parameter", "parameters are named: write :name", "参数必须命名：请写成 :name")
                else:
                    placeholders.add(node.this)
            elif isinstance(node, exp.Literal) and node.is_string and len(node.this) > MAX_STRING_PARAM_CHARS * 5:
                self.refuse("string literal", "a string literal is too long", "字符串常量过长")
            elif isinstance(node, exp.Column) and node.args.get("db") is not None:
                # `health.resident.id_number`: the dataset's code as qualifier
                code = f"{node.args['db'].name}.{node.table}".lower()
                if code in self.fields and node.args.get("catalog") is None:
                    node.set("db", None)
        for t in tables:
            self.table(t, ctes)
        uses = sum(1 for t in tables if t.name == upload_view_name(self.t.upload.name))
        if uses > 1:
            self.refuse("upload read twice", f"the upload {self.t.upload.name} is read {uses} times: read it once (in a "
                        "CTE if several parts need it), so that each row's reference stays with that row's own values",
                        f"上传表 {self.t.upload.name} 被读取了 {uses} 次：只能读取一次（如多处需要，请放在 CTE 中），"
                        "以保证每行的引用只对应该行自身的值")
        return placeholders

    def safe_cast(self, node: exp.Cast) -> bool:
        arg = node.this
        while isinstance(arg, exp.Paren):
            arg = arg.this
        if isinstance(arg, (exp.Literal, exp.Placeholder, exp.Null, exp.Boolean)):
            return True
        to = node.args.get("to")
        if isinstance(to, exp.DataType) and to.this in _TEXT_TYPES and not to.expressions:
            return True
        return isinstance(to, exp.DataType) and to.this == exp.DataType.Type.BOOLEAN \
            and isinstance(arg, _BOOLEAN_VALUED)

    def refuse_node(self, node: exp.Expression) -> None:
        if isinstance(node, (exp.Union, exp.Intersect, exp.Except)):
            what = node.key.upper()
            self.refuse(what, f"{what} is not accepted in a template", f"模板中不接受 {what}")
        elif isinstance(node, exp.Anonymous):
            name = str(node.this).upper()
            self.refuse(f"function {name}", f"function {name} is not on the template allow-list ({', '.join(ALLOWED_FUNCTIONS)})",
                        f"函数 {name} 不在模板允许的函数清单中（{', '.join(ALLOWED_FUNCTIONS)}）")
        elif isinstance(node, exp.Func):
            what = _name_of(node)
            self.refuse(what, f"{what} is not accepted in a template (allowed: {', '.join(ALLOWED_FUNCTIONS)})",
                        f"模板中不接受 {what}（允许：{', '.join(ALLOWED_FUNCTIONS)}）")
        else:
            what = _name_of(node)
            self.refuse(what, f"{what} is not accepted in a template", f"模板中不接受 {what}")

    # -- columns and values, traced through scopes ------------------------------------------------
    def source_of(self, col: exp.Column, scope: Scope) -> exp.Table | Scope | None:
        s: Scope | None = scope
        while s is not None:
            src = s.sources.get(col.table)
            if src is not None:
                return src
            s = s.parent
        return None

    def base(self, table: exp.Table) -> tuple[str, str] | None:
        return self.views.get(table.name)

    def column_value(self, col: exp.Column, scope: Scope) -> _Val:
        val = self._column_value(col, scope)
        if val.values is not None and col.table in scope.selected_sources and self.left_joined(scope, col.table):
            return _Val(val.values | {None})     # no match: NULL
        return val

    def _column_value(self, col: exp.Column, scope: Scope) -> _Val:
        src = self.source_of(col, scope)
        if isinstance(src, exp.Table):
            b = self.base(src)
            if b is None:
                return _opaque(f"column {col.table}.{col.name}", f"列 {col.table}.{col.name}")
            kind, name = b
            if kind == "upload":
                return _opaque(f"the upload column {name}.{col.name}", f"上传表的列 {name}.{col.name}", upload=col.name)
            return _opaque(f"the source field {name}.{col.name}", f"源字段 {name}.{col.name}")
        if isinstance(src, Scope):
            key = (id(src), col.name)
            if key in self._memo:
                return self._memo[key]
            if key in self._busy or not isinstance(src.expression, exp.Select):
                return _opaque(f"column {col.table}.{col.name}", f"列 {col.table}.{col.name}")
            self._busy.add(key)
            proj = _projection(src.expression, col.name)
            if proj is None:
                val = _opaque(f"column {col.table}.{col.name}", f"列 {col.table}.{col.name}")
            else:
                inner = self.value(proj.unalias(), src)
                if inner.values is None and not isinstance(proj.unalias(), exp.Column):
                    val = _opaque(f"{col.table}.{col.name}, which is {inner.why}", f"{col.table}.{col.name}，即{inner.why_zh}",
                                  inner.upload)
                else:
                    val = inner
            self._busy.discard(key)
            self._memo[key] = val
            return val
        return _opaque(f"column {col.sql(dialect=DIALECT)}", f"列 {col.sql(dialect=DIALECT)}")

    def union(self, parts: list[_Val], node: exp.Expression) -> _Val:
        for p in parts:
            if p.values is None:
                what = _name_of(node) if not isinstance(node, (exp.Case, exp.If)) else "CASE"
                return _opaque(f"{what} returning {p.why}", f"返回{p.why_zh}的 {what}")
        out: set = set()
        for p in parts:
            out |= p.values   # type: ignore[operator]
        return _Val(frozenset(out))

    def value(self, node: exp.Expression, scope: Scope) -> _Val:
        """What values `node` (in `scope`) can take."""
        while isinstance(node, (exp.Paren, exp.Alias)):
            node = node.this
        if isinstance(node, exp.Literal):
            if node.is_string:
                return _Val(frozenset({node.this}))
            try:
                return _Val(frozenset({Decimal(node.this)}))
            except InvalidOperation:
                return _opaque("a number", "数值")
        if isinstance(node, exp.Boolean):
            return _Val(frozenset({bool(node.this)}))
        if isinstance(node, exp.Null):
            return _Val(frozenset({None}))
        if isinstance(node, exp.Column):
            return self.column_value(node, scope)
        if isinstance(node, (exp.Exists, exp.Is)):
            return _Val(frozenset({True, False}))      # never NULL
        if isinstance(node, exp.Not):
            inner = self.value(node.this, scope)
            return _Val(frozenset({True, False}) if inner.values is not None and None not in inner.values else _BOOL)
        if isinstance(node, _BOOLEAN_VALUED):
            return _Val(_BOOL)
        if isinstance(node, exp.Case):
            parts = [self.value(i.args["true"], scope) for i in node.args.get("ifs") or []]
            default = node.args.get("default")
            parts.append(self.value(default, scope) if default is not None else _Val(frozenset({None})))
            return self.union(parts, node)
        if isinstance(node, exp.If):
            other = node.args.get("false")
            return self.union([self.value(node.args["true"], scope),
                               self.value(other, scope) if other is not None else _Val(frozenset({None}))], node)
        if isinstance(node, exp.Coalesce):
            parts = [self.value(node.this, scope)] + [self.value(e, scope) for e in node.expressions]
            val = self.union(parts, node)
            if val.values is not None and any(p.values is not None and None not in p.values for p in parts):
                return _Val(val.values - {None})    # one argument is never NULL, so neither is the result
            return val
        if isinstance(node, exp.Nullif):
            return self.union([self.value(node.this, scope), _Val(frozenset({None}))], node)
        if isinstance(node, (exp.Max, exp.Min)):
            inner = self.value(node.this, scope)
            if inner.values is not None:
                return _Val(inner.values | {None})
            return _opaque(f"{_name_of(node)} of {inner.why}", f"{inner.why_zh}的 {_name_of(node)}")
        if isinstance(node, (exp.Window, exp.Filter)):
            inner = node.this
            if isinstance(inner, (exp.Max, exp.Min, exp.LogicalOr, exp.LogicalAnd, exp.Filter)):
                return self.value(inner, scope)
            return _opaque(f"{_name_of(inner)} (a number computed from the data)", f"{_name_of(inner)}（由数据计算的数值）")
        if isinstance(node, (exp.Cast, exp.TryCast)):
            to = node.args.get("to")
            inner = self.value(node.this, scope)
            if isinstance(to, exp.DataType) and to.this == exp.DataType.Type.BOOLEAN:
                return _Val(_BOOL)
            if isinstance(to, exp.DataType) and to.this in _TEXT_TYPES and inner.values is not None \
                    and all(v is None or isinstance(v, str) for v in inner.values):
                return inner
            return _opaque(f"a CAST of {inner.why or 'a value'}", f"对{inner.why_zh or '某个值'}的类型转换")
        if isinstance(node, exp.Subquery) and isinstance(node.this, exp.Select):
            inner_scope = self.scopes.get(id(node.this))
            if inner_scope is not None and len(node.this.expressions) == 1:
                return self.value(node.this.expressions[0].unalias(), inner_scope)
            return _opaque("a subquery", "子查询")
        if isinstance(node, exp.Placeholder):
            return _opaque(f"the parameter :{node.this}", f"参数 :{node.this}")
        if isinstance(node, exp.Count):
            return _opaque("COUNT (a count computed from the data)", "COUNT（由数据计算的计数）")
        if isinstance(node, (exp.Concat, exp.DPipe)):
            return _opaque(f"a string concatenation ({_short(node)})", f"字符串拼接（{_short(node)}）")
        return _opaque(f"{_name_of(node)} ({_short(node)}), a value computed from the data",
                       f"{_name_of(node)}（{_short(node)}），即由数据计算的值")

    def trace(self, col: exp.Column, scope: Scope) -> tuple[str, str, str] | None:
        """The base column a column passes through unchanged: (kind, dataset code | upload, field)."""
        for _ in range(64):
            src = self.source_of(col, scope)
            if isinstance(src, exp.Table):
                b = self.base(src)
                return (b[0], b[1], col.name) if b else None
            if not isinstance(src, Scope) or not isinstance(src.expression, exp.Select):
                return None
            proj = _projection(src.expression, col.name)
            inner = proj.unalias() if proj is not None else None
            if not isinstance(inner, exp.Column):
                return None
            col, scope = inner, src
        return None

    # -- one applicant per row -------------------------------------------------------------------
    def reads_upload(self, src: exp.Table | Scope | None, _depth: int = 0) -> bool:
        """Whether a source holds rows of the upload (the upload itself, or a CTE / derived table /
        subquery built on it)."""
        if isinstance(src, exp.Table):
            b = self.base(src)
            return bool(b and b[0] == "upload")
        if not isinstance(src, Scope) or _depth > 64:
            return False
        key = id(src)
        if key not in self._reads_upload:
            self._reads_upload[key] = False   # (no cycles in a checked tree; this only guards)
            self._reads_upload[key] = any(self.reads_upload(s, _depth + 1) for _, s in src.selected_sources.values()) \
                or any(self.reads_upload(s, _depth + 1) for s in src.subquery_scopes)
        return self._reads_upload[key]

    def is_ref(self, node: exp.Expression, scope: Scope) -> bool:
        u = self.t.upload
        return isinstance(node, exp.Column) and self.trace(node, scope) == ("upload", u.name, u.ref)

    def own(self, node: exp.Expression, scope: Scope) -> bool:
        """Whether `node` belongs to `scope`'s own SELECT (not to a nested one)."""
        return node.find_ancestor(exp.Select) is scope.expression

    def per_applicant(self, scope: Scope) -> None:
        """Rows of the upload stay apart: whatever reads them keeps each row with its own reference.

        - two sources holding upload rows are joined on equal references (traced to the upload's
          ref), so one applicant's reference is never attached to another's values;
        - an aggregate over upload rows groups by the reference, a window partitions by it;
        - a subquery inside an expression does not read upload rows (it would compare an applicant
          with the others)."""
        sel = scope.expression
        if not isinstance(sel, exp.Select):
            return
        if scope.is_subquery and self.reads_upload(scope):
            self.refuse("subquery on the upload", "a subquery inside an expression may not read the upload's rows: "
                        "it would compare an applicant with the other applicants", "表达式中的子查询不能读取上传表的行："
                        "那样会把一个申请人与其他申请人比较")
        dep = [alias for alias, (_, src) in scope.selected_sources.items() if self.reads_upload(src)]
        if not dep:
            return
        if len(dep) > 1:
            find = self.components(scope, only="ref")
            if len({find(a) for a in dep}) > 1:
                self.refuse("upload rows joined", f"{', '.join(dep)} all hold rows of the upload: join them on equal "
                            f"row references ({self.t.upload.ref}), so that each row keeps its own applicant",
                            f"{', '.join(dep)} 都包含上传表的行：请按相同的行引用（{self.t.upload.ref}）关联，"
                            "使每一行只对应其自身的申请人")
        group = sel.args.get("group")
        keys = group.expressions if group is not None else []
        # an aggregate of this SELECT (not of a nested one, not a window function)
        aggregated = group is not None or any(n.find_ancestor(exp.Window, exp.Select) is sel
                                              for n in sel.find_all(exp.AggFunc))
        if aggregated and not any(self.is_ref(k, scope) for k in keys):
            self.refuse("aggregate over upload rows", f"an aggregate over the upload's rows must GROUP BY the row "
                        f"reference ({self.t.upload.ref}): otherwise it mixes applicants",
                        f"对上传表行的聚合必须按行引用（{self.t.upload.ref}）GROUP BY，否则会混合不同申请人")
        for w in sel.find_all(exp.Window):
            if self.own(w, scope) and not any(self.is_ref(k, scope) for k in w.args.get("partition_by") or []):
                self.refuse("window over upload rows", f"a window over the upload's rows must PARTITION BY the row "
                            f"reference ({self.t.upload.ref}): otherwise it mixes applicants",
                            f"对上传表行的窗口函数必须按行引用（{self.t.upload.ref}）PARTITION BY，否则会混合不同申请人")

    # -- identifiers, and every row tied to an applicant ---------------------------------------------
    def field_class(self, code: str, name: str) -> str:
        return self.classes.get(code, {}).get(name, "value")

    def key_of(self, col: exp.Column, scope: Scope) -> str | None:
        """What a column joins as: `ref` (the upload's row reference), `id` (the upload's key, or
        health.resident.id_number), `key:<field>` (a catalog key such as person_id or stay_id, passed
        through unchanged); None for anything else."""
        t = self.trace(col, scope)
        if t is None:
            return None
        kind, name, f = t
        u = self.t.upload
        if kind == "upload":
            return "ref" if f == u.ref else "id" if f == u.key else None
        if (name, f) == KEY_FIELD:
            return "id"
        return f"key:{f}" if self.field_class(name, f) == "key" else None

    def identifier_use_ok(self, col: exp.Column, scope: Scope, cls: str) -> bool:
        node, parent = col, col.parent
        while isinstance(parent, exp.Paren):
            node, parent = parent, parent.parent
        if isinstance(parent, exp.Alias) and isinstance(parent.parent, exp.Select) and parent.arg_key == "expressions":
            return True                      # passed through by a CTE or derived table; its uses are checked there
        if isinstance(parent, exp.Select) and node.arg_key == "expressions":
            return True
        if isinstance(parent, exp.EQ):
            other = parent.expression if node is parent.this else parent.this
            while isinstance(other, exp.Paren):
                other = other.this
            if not isinstance(other, exp.Column):
                return False
            mine = self.key_of(col, scope)
            return mine is not None and mine == self.key_of(other, self.scope_of(other, scope))
        if cls == "direct":
            return False
        if isinstance(parent, exp.Group):
            return True
        if isinstance(parent, exp.Window) and node.arg_key == "partition_by":
            return True
        if isinstance(parent, exp.Ordered) and isinstance(parent.parent, exp.Order) \
                and isinstance(parent.parent.parent, exp.Window):
            return True                      # a tie-break inside ROW_NUMBER: says nothing of the key's value
        if isinstance(parent, exp.Is) and node.arg_key == "this" and isinstance(parent.expression, exp.Null):
            return True
        if isinstance(parent, exp.Count) or (isinstance(parent, exp.Distinct) and isinstance(parent.parent, exp.Count)):
            return True
        return False

    def scope_of(self, node: exp.Expression, default: Scope) -> Scope:
        """The scope of the SELECT a node belongs to (a subquery's columns are listed by its parents too)."""
        return self.scopes.get(id(node.find_ancestor(exp.Select)), default)

    def identifiers(self, scope: Scope) -> None:
        """Keys and direct identifiers are never values. A key (person_id, stay_id, …) may only be
        joined (=) to the same key, grouped or partitioned by, ordered by inside a window, tested
        IS NULL or counted; a direct identifier (name, phone, address, ID number) may only be the
        ID number joined to the upload's key. So no literal or parameter ever picks a person
        (`id_number = '…'`, `person_id = 42`), and no key is turned into digits."""
        if not isinstance(scope.expression, exp.Select):
            return
        for col in scope.columns:
            if col.find_ancestor(exp.Select) is not scope.expression:
                continue
            t = self.trace(col, scope)
            if t is None or t[0] != "dataset":
                continue
            cls = self.field_class(t[1], t[2])
            if cls == "value" or self.identifier_use_ok(col, scope, cls):
                continue
            where = col.parent.sql(dialect=DIALECT, comments=False) if col.parent is not None else col.sql()
            where = where if len(where) <= 80 else where[:79] + "…"
            for view, (_, name) in self.views.items():
                where = where.replace(f'"{view}"', name)
            if cls == "direct":
                self.refuse(f"identifier {t[1]}.{t[2]}", f"{t[1]}.{t[2]} is a direct identifier: a template may use "
                            f"it only to join the upload's key to {KEY_FIELD[0]}.{KEY_FIELD[1]} (here: {where})",
                            f"{t[1]}.{t[2]} 是直接标识符：模板只能用它将上传表的关联键与 {KEY_FIELD[0]}.{KEY_FIELD[1]} "
                            f"关联（此处：{where}）", dataset=t[1], field=t[2])
            else:
                self.refuse(f"key {t[1]}.{t[2]}", f"{t[1]}.{t[2]} is a key: it may only be joined (=) to the same key, "
                            f"grouped or partitioned by, ordered by inside a window, tested IS NULL or counted — never "
                            f"compared with a literal or parameter or computed with (here: {where})",
                            f"{t[1]}.{t[2]} 是关联键：只能与同名关联键等值关联、用于 GROUP BY / PARTITION BY、"
                            f"窗口内排序、IS NULL 判断或计数，不能与常量或参数比较，也不能参与计算（此处：{where}）",
                            dataset=t[1], field=t[2])

    def aggregated(self, sel: exp.Select) -> bool:
        return sel.args.get("group") is not None or any(n.find_ancestor(exp.Window, exp.Select) is sel
                                                         for n in sel.find_all(exp.AggFunc))

    _OUTER = "\0outer"

    def components(self, scope: Scope, only: str | None = None) -> Callable[[str], str]:
        """Which sources of a SELECT (and, in a subquery, the outer row `_OUTER`) key equalities really
        tie together: a `find` of a union-find. A WHERE term or an inner join's ON term filters the
        joined rows, so it ties any two sources. A LEFT JOIN's ON only decides which rows of the table
        it brings in match: it attaches that table to the left side when its partners there are
        already one component, and never connects two parts of the left side. `only`: a key kind
        (`ref`)."""
        sel = scope.expression
        own = set(scope.selected_sources)
        parent = {a: a for a in [*own, self._OUTER]}

        def find(a: str) -> str:
            while parent[a] != a:
                a = parent[a]
            return a

        def node_of(c: exp.Column) -> str | None:
            if c.table in own:
                return c.table
            return self._OUTER if scope.is_subquery and self.source_of(c, scope) is not None else None

        def pairs(cond: exp.Expression | None) -> Iterable[tuple[str, str]]:
            for eq in (cond.flatten() if isinstance(cond, exp.And) else [cond]) if cond is not None else []:
                while isinstance(eq, exp.Paren):
                    eq = eq.this
                if not (isinstance(eq, exp.EQ) and isinstance(eq.this, exp.Column)
                        and isinstance(eq.expression, exp.Column)):
                    continue
                k = self.key_of(eq.this, scope)
                a, b = node_of(eq.this), node_of(eq.expression)
                if k is not None and k == self.key_of(eq.expression, scope) and (only is None or k == only) \
                        and a and b and a != b:
                    yield a, b

        joins = sel.args.get("joins") or []
        is_left = [str(j.args.get("side") or "").upper() == "LEFT" for j in joins]
        conds = [sel.args["where"].this] if sel.args.get("where") is not None else []
        conds += [j.args.get("on") for j, left in zip(joins, is_left) if not left]
        for cond in conds:
            for a, b in pairs(cond):
                parent[find(a)] = find(b)
        from_ = sel.args.get("from_")
        seen = {self._OUTER} | ({from_.this.alias_or_name} if from_ is not None and isinstance(from_.this, exp.Expression)
                                else set())
        for j, left in zip(joins, is_left):
            name = j.this.alias_or_name
            if left:
                partners = {b if a == name else a for a, b in pairs(j.args.get("on")) if name in (a, b)}
                partners = {x for x in partners if x in seen}
                if len({find(x) for x in partners}) == 1:
                    parent[find(name)] = find(next(iter(partners)))
            seen.add(name)
        return find

    def left_joined(self, scope: Scope, alias: str) -> bool:
        return any(j.this.alias_or_name == alias and str(j.args.get("side") or "").upper() == "LEFT"
                   for j in scope.expression.args.get("joins") or [])

    def not_null_in_where(self, col: exp.Column, scope: Scope) -> bool:
        where = scope.expression.args.get("where")
        cond = where.this if where is not None else None
        for t in (cond.flatten() if isinstance(cond, exp.And) else [cond]) if cond is not None else []:
            while isinstance(t, exp.Paren):
                t = t.this
            if isinstance(t, exp.Not) and isinstance(t.this, exp.Is) and isinstance(t.this.expression, exp.Null) \
                    and isinstance(t.this.this, exp.Column) and t.this.this.table == col.table \
                    and t.this.this.name == col.name:
                return True
        return False

    def never_null(self, col: exp.Column, scope: Scope) -> bool:
        """A key that can never be NULL here: a non-nullable catalog key read from the FROM table or
        an inner-joined one (through CTE pass-throughs), or tested IS NOT NULL in the WHERE. Only such
        a key keeps groups and window partitions to one person or record: NULLs would gather everyone."""
        for _ in range(64):
            if self.not_null_in_where(col, scope):
                return True
            if col.table not in scope.selected_sources or self.left_joined(scope, col.table):
                return False
            src = scope.selected_sources[col.table][1]
            if isinstance(src, exp.Table):
                b = self.base(src)
                return bool(b and b[0] == "dataset" and not self.nullable.get(b[1], {}).get(col.name, True))
            if not isinstance(src, Scope) or not isinstance(src.expression, exp.Select):
                return False
            proj = _projection(src.expression, col.name)
            inner = proj.unalias() if proj is not None else None
            if not isinstance(inner, exp.Column):
                return False
            col, scope = inner, src
        return False

    def entity_key(self, k: exp.Expression, scope: Scope) -> bool:
        return isinstance(k, exp.Column) and (self.key_of(k, scope) or "").startswith("key:") and self.never_null(k, scope)

    def tied(self, scope: Scope) -> None:
        """Every row a template reads belongs to one applicant.

        In each SELECT, the tables, CTEs and derived tables it reads are connected by equalities of
        keys (a top-level AND term of ON or WHERE): the upload's key to health.resident.id_number,
        person_id to person_id, stay_id to stay_id, row reference to row reference. A SELECT that
        reads no upload rows (a CTE over a dataset) keeps rows of one person or record: it groups and
        partitions by a key, and is joined on that key where it is used. A subquery inside an
        expression is tied to the outer row by such an equality. So no part reads residents the
        upload does not name, and nothing aggregates over the whole population."""
        sel = scope.expression
        if not isinstance(sel, exp.Select):
            return
        sources = list(scope.selected_sources)
        if not sources:
            return
        outer = self._OUTER
        find = self.components(scope)
        if scope.is_subquery:
            holder = sel.parent
            if isinstance(holder, exp.Subquery) and not isinstance(holder.parent, exp.In) \
                    and not (self.aggregated(sel) and sel.args.get("group") is None):
                self.refuse("scalar subquery", f"a scalar subquery must aggregate without GROUP BY, so that it "
                            f"answers exactly one row ({_short(holder)}): whether it answers several would depend on "
                            "the data", f"标量子查询必须是不带 GROUP BY 的聚合，以保证恰好返回一行（{_short(holder)}）："
                            "否则是否返回多行取决于数据")
            loose = [a for a in sources if find(a) != find(outer)]
            if loose:
                self.refuse("subquery not tied to the row", f"a subquery inside an expression reads {', '.join(loose)} "
                            "without tying it to the outer row: equate one of its keys (person_id, stay_id, …) with the "
                            "outer query's same key, so it reads only that applicant's records",
                            f"表达式中的子查询读取 {', '.join(loose)}，但没有与外层行关联：请将其关联键（person_id、"
                            "stay_id 等）与外层查询的同名关联键等值关联，使其只读取该申请人的记录")
            return
        if len({find(a) for a in sources}) > 1:
            groups: dict[str, list[str]] = {}
            for a in sources:
                groups.setdefault(find(a), []).append(a)
            shown = " | ".join(", ".join(g) for g in groups.values())
            self.refuse("sources not joined on keys", f"the tables of a SELECT must be joined on keys (the upload's key "
                        f"to {KEY_FIELD[0]}.{KEY_FIELD[1]}, person_id = person_id, stay_id = stay_id, row reference = "
                        f"row reference), as a top-level AND term of ON or WHERE; these are not connected: {shown}",
                        f"一个 SELECT 中的各表必须按关联键连接（上传表关联键与 {KEY_FIELD[0]}.{KEY_FIELD[1]}、person_id = "
                        f"person_id、stay_id = stay_id、行引用 = 行引用），且须是 ON 或 WHERE 中顶层 AND 条件；"
                        f"以下部分互不相连：{shown}")
        if self.reads_upload(scope):
            return          # grouped and partitioned by the row reference: per_applicant
        if self.aggregated(sel):
            keys = (sel.args["group"].expressions if sel.args.get("group") is not None else [])
            if not any(self.entity_key(k, scope) for k in keys):
                self.refuse("aggregate over a whole dataset", "an aggregate over a dataset must GROUP BY a key "
                            "(person_id, stay_id, …) that is never NULL (from the FROM table or an inner join, or "
                            "tested IS NOT NULL) and be joined on it: a template never computes over the whole "
                            "population", "对数据集的聚合必须按不为 NULL 的关联键（person_id、stay_id 等，来自 FROM 表或内连接，"
                            "或经 IS NOT NULL 判断）GROUP BY 并按其关联：模板不能对全体人群计算")
        for w in sel.find_all(exp.Window):
            if self.own(w, scope) and not any(self.entity_key(k, scope) for k in w.args.get("partition_by") or []):
                self.refuse("window over a whole dataset", "a window over a dataset must PARTITION BY a key (person_id, "
                            "stay_id, …) that is never NULL (from the FROM table or an inner join, or tested IS NOT "
                            "NULL)", "对数据集的窗口函数必须按不为 NULL 的关联键（person_id、stay_id 等，来自 FROM 表或"
                            "内连接，或经 IS NOT NULL 判断）PARTITION BY")

    # -- what each output depends on ------------------------------------------------------------------
    def col_deps(self, col: exp.Column, scope: Scope) -> frozenset[tuple[str, str]]:
        src = self.source_of(col, scope)
        if isinstance(src, exp.Table):
            b = self.base(src)
            if not b or b[0] != "dataset":
                return frozenset()
            if self.field_class(b[1], col.name) == "value":
                return frozenset({(b[1], col.name)})
            return frozenset({(b[1], ROWS)})   # a key says which of the dataset's rows there are
        if not isinstance(src, Scope) or not isinstance(src.expression, exp.Select):
            return frozenset()
        key = (id(src), col.name.lower())
        if key not in self._deps:
            self._deps[key] = frozenset()      # (a checked tree has no cycles; this only guards)
            proj = _projection(src.expression, col.name)
            inner = self.expr_deps(proj.unalias(), src) if proj is not None else frozenset()
            self._deps[key] = inner | self.row_deps(src)
        return self._deps[key]

    def is_key_term(self, term: exp.Expression, scope: Scope) -> bool:
        while isinstance(term, exp.Paren):
            term = term.this
        if not (isinstance(term, exp.EQ) and isinstance(term.this, exp.Column) and isinstance(term.expression, exp.Column)):
            return False
        k = self.key_of(term.this, scope)
        return k is not None and k == self.key_of(term.expression, scope)

    def source_rows(self, scope: Scope, alias: str, *, all_sources: bool) -> frozenset[tuple[str, str]]:
        src = scope.selected_sources.get(alias, (None, None))[1]
        if isinstance(src, Scope) and isinstance(src.expression, exp.Select):
            return self.row_deps(src, all_sources=all_sources)
        b = self.base(src) if isinstance(src, exp.Table) else None
        return frozenset({(b[1], ROWS)}) if b and b[0] == "dataset" else frozenset()

    def row_deps(self, scope: Scope, *, all_sources: bool = False) -> frozenset[tuple[str, str]]:
        """The fields that decide which rows a SELECT holds: its conditions (WHERE, HAVING, QUALIFY,
        GROUP BY, the projections of a DISTINCT, ON terms other than key equalities) and the rows of
        the sources it keeps only when they match (FROM and inner joins). A LEFT-joined source
        decides whether its own columns are NULL, which their own dependencies carry, and how many
        times a row repeats: that matters to whatever counts rows, so an aggregate or a window takes
        every source's rows, all the way down (`all_sources`). (At the top, a repeated row fails
        the run's one-row-per-applicant check.)"""
        sel = scope.expression
        key = (id(scope), "\0rows*" if all_sources else "\0rows")
        if key in self._deps:
            return self._deps[key]
        self._deps[key] = frozenset()
        parts: list[exp.Expression] = []
        for k in ("where", "having", "qualify"):
            if sel.args.get(k) is not None:
                parts.append(sel.args[k].this)
        if sel.args.get("group") is not None:
            parts += list(sel.args["group"].expressions)
        if sel.args.get("distinct") is not None:
            parts += [p.unalias() for p in sel.expressions]     # which duplicates go depends on the values
        kept = []
        from_ = sel.args.get("from_")
        if from_ is not None and isinstance(from_.this, exp.Expression):
            kept.append(from_.this.alias_or_name)
        for j in sel.args.get("joins") or []:
            on = j.args.get("on")
            left = str(j.args.get("side") or "").upper() == "LEFT"
            if on is not None:
                # an inner join's key terms decide which rows pair up; a LEFT JOIN's only which of
                # the joined table's rows match, which its own columns (and ROWS) carry
                parts += [t for t in (on.flatten() if isinstance(on, exp.And) else [on])
                          if not (left and self.is_key_term(t, scope))]
            if all_sources or not left:
                kept.append(j.this.alias_or_name)
        out: set[tuple[str, str]] = set()
        for p in parts:
            out |= self.expr_deps(p, scope)
        for alias in kept:
            out |= self.source_rows(scope, alias, all_sources=all_sources)
        self._deps[key] = frozenset(out)
        return self._deps[key]

    def expr_deps(self, node: exp.Expression, scope: Scope) -> frozenset[tuple[str, str]]:
        """The catalog value fields `node` can depend on: what flows into it, what its conditions test,
        and what decides the rows it is computed over (keys and upload columns are not counted)."""
        out: set[tuple[str, str]] = set()
        for n in node.walk(prune=lambda x: isinstance(x, exp.Select) and x is not node):
            if isinstance(n, exp.Column):
                out |= self.col_deps(n, scope)
            elif isinstance(n, (exp.AggFunc, exp.Window)) and isinstance(scope.expression, exp.Select):
                out |= self.row_deps(scope, all_sources=True)
            elif isinstance(n, exp.Select) and n is not node:
                sub = self.scopes.get(id(n))
                if sub is not None:
                    out |= self.row_deps(sub, all_sources=True)
                    for p in n.expressions:
                        out |= self.expr_deps(p.unalias(), sub)
        return frozenset(out)

    def field_budget(self, root: Scope) -> None:
        """All outputs together take at most MAX_COMBINATIONS values that depend on one dataset: the
        product of the value counts (NULL included) of the outputs depending on any of its fields.
        Per dataset, not per field, because a record's fields tell of each other (admit date,
        discharge date, length of stay)."""
        rows = self.row_deps(root)
        per_field: dict[str, int] = {}
        per_dataset: dict[str, int] = {}
        users: dict[str, list[str]] = {}
        for o in self.t.outputs:
            proj = _projection(root.expression, o.name)
            if proj is None or o.kind == "ref":
                continue
            deps = self.expr_deps(proj.unalias(), root) | rows
            self.output_deps[o.name] = sorted(f"{d}.{f}" for d, f in deps)
            values = self.output_values.get(o.name) or (3 if o.kind == "flag" else len(o.labels or ()) + 1)
            for f in self.output_deps[o.name]:
                per_field[f] = per_field.get(f, 1) * values
            for d in sorted({d for d, _ in deps}):
                per_dataset[d] = per_dataset.get(d, 1) * values
                users.setdefault(d, []).append(o.name)
        self.field_combinations = dict(sorted(per_field.items()))
        self.dataset_combinations = dict(sorted(per_dataset.items()))
        for d, n in per_dataset.items():
            if n > MAX_COMBINATIONS:
                outs = ", ".join(users[d])
                self.refuse(f"dataset {d}", f"the outputs {outs} together can take {n:,} combinations of values that "
                            f"depend on {d}: at most {MAX_COMBINATIONS:,} per dataset, so that a template cannot "
                            "spell a value out bit by bit; use fewer or coarser outputs",
                            f"输出列 {outs} 合计可取 {n:,} 种依赖 {d} 的取值组合：每个数据集最多 "
                            f"{MAX_COMBINATIONS:,} 种，以免模板逐位拼出某个值；请减少输出列或使用更粗的分档")

    def substrings(self, scope: Scope) -> None:
        """SUBSTRING cuts a value into characters: only of the upload's own columns and literals."""
        sel = scope.expression
        if not isinstance(sel, exp.Select):
            return
        for node in sel.find_all(exp.Substring):
            if node.find_ancestor(exp.Select) is not sel:
                continue
            touched = any(self.reads_dataset_value(c, scope) for c in node.this.find_all(exp.Column)) \
                if isinstance(node.this, exp.Expression) else False
            if isinstance(node.this, exp.Column):
                touched = touched or self.reads_dataset_value(node.this, scope)
            if touched:
                self.refuse("SUBSTRING of a source field", f"SUBSTRING of a catalog field is not accepted "
                            f"({_short(node)}): it would spell a value out character by character",
                            f"不接受对数据目录字段使用 SUBSTRING（{_short(node)}）：那样会逐字符拼出某个值")

    def reads_dataset_value(self, col: exp.Column, scope: Scope) -> bool:
        t = self.trace(col, scope)
        if t is not None:
            return t[0] == "dataset"
        return bool(self.col_deps(col, scope))

    # -- the whole check ------------------------------------------------------------------------
    def analyse(self) -> _Analysis:
        self.model()
        if self.problems:
            return _Analysis(self.problems)
        try:
            tree = parse_statement(self.t.sql)
        except QueryRefused as e:
            return _Analysis(list(e.problems))
        placeholders = self.walk(tree)
        declared = {p.name for p in self.t.params}
        for name in sorted(placeholders - declared):
            self.refuse(f"parameter :{name}", f":{name} is not a declared parameter", f":{name} 不是已声明的参数")
        for name in sorted(declared - placeholders):
            self.refuse(f"parameter {name}", f"parameter {name} is declared but the SQL never uses it",
                        f"参数 {name} 已声明，但 SQL 中从未使用")
        for key, what in (("order", "ORDER BY"), ("limit", "LIMIT"), ("offset", "OFFSET"), ("distinct", "DISTINCT")):
            if tree.args.get(key):
                self.refuse(f"top-level {what}", f"{what} is not accepted on the template's answer: it has one row "
                            "per consented upload row, ordered by the row reference (pdao adds that order)",
                            f"模板结果不接受 {what}：结果对每个已授权的上传行恰有一行，并按行引用排序（由 pdao 添加）")
        if self.problems:
            return _Analysis(self.problems)

        schema: dict[str, dict[str, str]] = {}
        for view, (kind, name) in self.views.items():
            if kind == "dataset":
                schema[view] = {f: DUCK_TYPES.get(ty or "", "VARCHAR") for f, ty in self.fields[name].items()}
            else:
                schema[view] = {c: "VARCHAR" for c in self.t.upload.columns}
        try:
            tree = qualify(tree, schema=schema, dialect=DIALECT, validate_qualify_columns=True,
                           quote_identifiers=True, identify=True)
            root = build_scope(tree)
        except (OptimizeError, SqlglotError, RecursionError, KeyError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            for view, (_, name) in self.views.items():
                msg = msg.replace(view, name)
            self.refuse("column", f"a column could not be resolved (unknown or ambiguous): {msg}",
                        f"有列无法解析（不存在或有歧义）：{msg}")
            return _Analysis(self.problems)
        if root is None or not isinstance(tree, exp.Select):
            self.refuse("query", "the template could not be analysed", "无法分析该模板")
            return _Analysis(self.problems)

        for sel in tree.find_all(exp.Select):
            names = [p.alias_or_name.lower() for p in sel.expressions]
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                self.refuse("duplicate column name", f"a SELECT names {', '.join(dups)} more than once (names are "
                            "compared without case): name each column once", f"某个 SELECT 中 {', '.join(dups)} "
                            "出现了多次（名称不区分大小写）：每列只能命名一次")
        if self.problems:
            return _Analysis(self.problems)
        scopes = list(root.traverse())
        self.scopes = {id(s.expression): s for s in scopes}
        col_scope: dict[int, Scope] = {}
        reads: set[tuple[str, str]] = set()
        for s in scopes:
            for c in s.columns:
                col_scope[id(c)] = s
                src = self.source_of(c, s)
                if isinstance(src, exp.Table):
                    b = self.base(src)
                    if b and b[0] == "dataset":
                        reads.add((b[1], c.name))

        for s in scopes:
            self.per_applicant(s)
            self.identifiers(s)
            self.tied(s)
            self.substrings(s)

        # The upload's key is joined to health.resident.id_number somewhere.
        u = self.t.upload
        want = {("upload", u.name, u.key), ("dataset", KEY_FIELD[0], KEY_FIELD[1])}
        joined = False
        for eq in tree.find_all(exp.EQ):
            a, b = eq.this, eq.expression
            if isinstance(a, exp.Column) and isinstance(b, exp.Column) and id(a) in col_scope and id(b) in col_scope:
                if {self.trace(a, col_scope[id(a)]), self.trace(b, col_scope[id(b)])} == want:
                    joined = True
        if not joined:
            self.refuse("upload key", f"the upload's key {u.name}.{u.key} is never joined (=) to "
                        f"{KEY_FIELD[0]}.{KEY_FIELD[1]}", f"上传表的关联键 {u.name}.{u.key} 没有与 "
                        f"{KEY_FIELD[0]}.{KEY_FIELD[1]} 进行等值关联")

        # Every output: declared, and a derived value of its declared kind.
        declared_out = {o.name: o for o in self.t.outputs}
        seen: set[str] = set()
        for proj in tree.expressions:
            name = proj.alias_or_name
            if name in seen:
                self.refuse(f"output {name}", f"output {name} appears twice", f"输出列 {name} 出现了两次")
                continue
            seen.add(name)
            decl = declared_out.get(name)
            if decl is None:
                self.refuse(f"output {name}", f"output {name} is not a declared output; every output column is "
                            "declared with its kind", f"输出列 {name} 未声明；每个输出列都必须声明其类型")
                continue
            self.output(decl, self.value(proj.unalias(), root))
        for name in declared_out:
            if name not in seen:
                self.refuse(f"output {name}", f"declared output {name} is not in the SELECT", f"已声明的输出列 {name} 不在 SELECT 中")
        if not self.problems:
            self.field_budget(root)
        datasets = {name for kind, name in self.views.values() if kind == "dataset"}
        return _Analysis(self.problems, tree if not self.problems else None, datasets, reads)

    def output(self, o: Output, val: _Val) -> None:
        c = f"output {o.name}"
        if val.values is not None:
            self.output_values[o.name] = len(val.values)
        if o.kind == "ref":
            if val.upload != self.t.upload.ref:
                got = val.why or "a derived value"
                self.refuse(c, f"output {o.name} (ref) must be the upload's row reference {self.t.upload.name}."
                            f"{self.t.upload.ref} unchanged; it is {got}",
                            f"输出列 {o.name}（ref）必须原样输出上传表的行引用 {self.t.upload.name}.{self.t.upload.ref}；"
                            f"实际为{val.why_zh or '派生值'}")
            return
        if val.values is None:
            need_en, need_zh = {
                "flag": ("a boolean expression, or a CASE yielding only TRUE/FALSE/0/1",
                         "布尔表达式，或只产生 TRUE/FALSE/0/1 的 CASE"),
            }.get(o.kind, ("a CASE whose results are all string literals among its declared labels",
                           "结果均为已声明标签（字符串常量）的 CASE"))
            self.refuse(c, f"output {o.name} ({o.kind}) is not a derived value: it returns {val.why}; a {o.kind} "
                        f"must be {need_en}", f"输出列 {o.name}（{o.kind}）不是派生值：它返回{val.why_zh}；{o.kind} "
                        f"必须是{need_zh}")
            return
        values = val.values - {None}
        if o.kind == "flag":
            bad = [v for v in values if not (isinstance(v, bool) or (isinstance(v, Decimal) and v in (0, 1)))]
            if bad:
                shown = ", ".join(sorted(repr(_jsonable(v)) for v in bad))
                self.refuse(c, f"output {o.name} (flag) can be {shown}: a flag is only TRUE/FALSE (or 0/1)",
                            f"输出列 {o.name}（flag）可能取值 {shown}：标志只能是 TRUE/FALSE（或 0/1）")
            return
        bad = [v for v in values if not isinstance(v, str) or v not in (o.labels or ())]
        if bad:
            shown = ", ".join(sorted(repr(_jsonable(v)) for v in bad))
            self.refuse(c, f"output {o.name} ({o.kind}) can be {shown}, not among its declared labels "
                        f"({', '.join(o.labels or ())})", f"输出列 {o.name}（{o.kind}）可能取值 {shown}，不在其声明的标签中"
                        f"（{', '.join(o.labels or ())}）")


def _analyse(template: Template, catalog: Mapping[str, Any] | None,
             upload_columns: Iterable[str] | Mapping[str, Any] | None) -> _Analysis:
    checker = _Checker(template, descriptor_catalog() if catalog is None else catalog, upload_columns)
    try:
        return checker.analyse()
    except RecursionError:
        return _Analysis([Problem("syntax", "the template is nested too deeply", "模板嵌套过深")])


def check_template(template: Template, catalog: Mapping[str, Any] | None = None,
                   upload_columns: Iterable[str] | Mapping[str, Any] | None = None) -> list[Problem]:
    """Every reason the template cannot be approved (empty: it can). Pure: reads no data.

    catalog: dataset code -> DatasetInfo / DatasetMeta (or a mapping of field names); default: the
    packaged descriptors. upload_columns: the actual upload's columns (names, or name -> type);
    None checks the template against its own declared upload columns."""
    return _analyse(template, catalog, upload_columns).problems


def template_disclosure(template: Template, catalog: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the office sees before approving: for each output, the catalog fields its value can depend
    on (keys and the upload's own columns aside) and how many values it can take; for each dataset
    and each field, how many combinations of values all outputs together can take for one person
    (per dataset at most MAX_COMBINATIONS). Raises
    TemplateRefused if the template does not pass `check_template`."""
    checker = _Checker(template, descriptor_catalog() if catalog is None else catalog, None)
    a = checker.analyse()
    if a.problems:
        raise TemplateRefused(a.problems)
    return {"outputs": dict(checker.output_deps), "output_values": dict(checker.output_values),
            "datasets": dict(checker.dataset_combinations), "fields": dict(checker.field_combinations),
            "max_combinations": MAX_COMBINATIONS}


def template_reads(template: Template, catalog: Mapping[str, Any] | None = None) -> set[tuple[str, str]]:
    """Every (dataset code, field) the template reads: what the scene's data list must cover.
    Raises TemplateRefused if the template does not pass `check_template`."""
    a = _analyse(template, catalog, None)
    if a.problems:
        raise TemplateRefused(a.problems)
    return set(a.reads)


# ---------------------------------------------------------------------------------------------
# Parameters and rendering


def validate_params(template: Template, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parameters as typed values (dt.date, Decimal, str), defaults filled in; or raise
    TemplateRefused (code `template_params_invalid`) naming each bad one."""
    params = dict(params or {})
    problems: list[Problem] = []

    def bad(name: str, en: str, zh: str) -> None:
        problems.append(Problem(f"parameter {name}", f"parameter {name}: {en}", f"参数 {name}：{zh}"))

    for name in params:
        if template.param(name) is None:
            bad(name, "is not a parameter of this template", "不是本模板的参数")
    out: dict[str, Any] = {}
    for p in template.params:
        if p.name not in params or params[p.name] is None:
            if p.default is None:
                bad(p.name, "is required", "为必填项")
                continue
            raw = p.default
        else:
            raw = params[p.name]
        if p.type == "date":
            v = _as_date(raw)
            if v is None:
                bad(p.name, "must be a date (YYYY-MM-DD)", "必须是日期（YYYY-MM-DD）")
                continue
        elif p.type == "number":
            v = _as_number(raw)
            if v is None:
                bad(p.name, "must be a finite number", "必须是有限数值")
                continue
        else:
            if not isinstance(raw, str) or raw not in (p.choices or ()):
                bad(p.name, f"must be one of {', '.join(p.choices or ())}", f"必须是 {', '.join(p.choices or ())} 之一")
                continue
            v = raw
        if p.type in ("date", "number") and not (p.min <= v <= p.max):
            bad(p.name, f"{_jsonable(v)} is outside the approved range {_jsonable(p.min)} … {_jsonable(p.max)}",
                f"{_jsonable(v)} 超出已批准的范围 {_jsonable(p.min)} … {_jsonable(p.max)}")
            continue
        out[p.name] = v
    if problems:
        raise TemplateRefused(problems, code="template_params_invalid")
    return out


def _literal(value: Any) -> exp.Expression:
    if isinstance(value, dt.date):
        return exp.Cast(this=exp.Literal.string(value.isoformat()), to=exp.DataType.build("DATE"))
    if isinstance(value, Decimal):
        text = format(abs(value), "f")
        lit = exp.Literal.number(text)
        return exp.Paren(this=exp.Neg(this=lit)) if value < 0 else lit
    return exp.Literal.string(str(value))


def _col(name: str, table: str | None = None) -> exp.Column:
    return exp.Column(this=exp.to_identifier(name, quoted=True),
                      table=exp.to_identifier(table, quoted=True) if table else None)


def _consent_parts(upload: UploadSpec) -> tuple[exp.Expression, exp.Expression, exp.Expression]:
    ref = exp.Nullif(this=exp.Trim(this=exp.Cast(this=_col(upload.consent_ref), to=exp.DataType.build("VARCHAR"))),
                     expression=exp.Literal.string(""))
    start = exp.TryCast(this=_col(upload.valid_from), to=exp.DataType.build("DATE"))
    end = exp.TryCast(this=_col(upload.valid_until), to=exp.DataType.build("DATE"))
    return ref, start, end


def consent_condition(upload: UploadSpec, as_of: dt.date) -> exp.Expression:
    """The rows of the upload a template may read: a non-empty consent reference whose validity
    period (readable dates) covers `as_of`. Added by pdao, never by the template's author."""
    ref, start, end = _consent_parts(upload)
    return exp.and_(exp.Not(this=exp.Is(this=ref, expression=exp.Null())),
                    exp.LTE(this=start, expression=_literal(as_of)),
                    exp.GTE(this=end, expression=_literal(as_of)))


def _exclusion_reason(upload: UploadSpec, as_of: dt.date) -> exp.Expression:
    """Why a row is left out (NULL: it is not). Exactly the complement of `consent_condition`."""
    ref, start, end = _consent_parts(upload)
    case = exp.Case(ifs=[
        exp.If(this=exp.Is(this=ref.copy(), expression=exp.Null()), true=exp.Literal.string("no_consent_ref")),
        exp.If(this=exp.or_(exp.Is(this=start.copy(), expression=exp.Null()), exp.Is(this=end.copy(), expression=exp.Null()),
                            exp.GT(this=start.copy(), expression=end.copy())),
               true=exp.Literal.string("invalid_period")),
        exp.If(this=exp.GT(this=start.copy(), expression=_literal(as_of)), true=exp.Literal.string("not_yet_valid")),
        exp.If(this=exp.LT(this=end.copy(), expression=_literal(as_of)), true=exp.Literal.string("expired")),
    ], default=exp.Null())
    return case


@dataclass(frozen=True)
class _Rendered:
    sql: str
    tree: exp.Select
    params: dict[str, Any]
    as_of: dt.date
    datasets: frozenset[str]


def rendered_run(template: Template, params: Mapping[str, Any] | None, upload: Path, *, as_of: dt.date,
                 catalog: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """What a run of `template` will execute (its SQL) and with which parameters (JSON-able), from
    the template, the parameters and the upload's column names alone: what its query shows, the
    same whether the run then succeeds or fails inside the domain."""
    r = _render(template, params, as_of=as_of, catalog=catalog, upload_columns=pq.read_schema(upload).names)
    return r.sql, {k: _jsonable(v) for k, v in r.params.items()}


def _render(template: Template, params: Mapping[str, Any] | None, *, as_of: dt.date | None,
            catalog: Mapping[str, Any] | None, upload_columns: Iterable[str] | Mapping[str, Any] | None) -> _Rendered:
    analysis = _analyse(template, catalog, upload_columns)
    if analysis.problems or analysis.tree is None:
        raise TemplateRefused(analysis.problems or [Problem("template", "the template could not be checked",
                                                            "无法检查该模板")])
    given = dict(params or {})
    p_as_of = template.param("as_of")
    if as_of is not None and p_as_of is not None and p_as_of.type == "date" and given.get("as_of") is None:
        given["as_of"] = as_of     # the run's date is the analysis date unless the caller says otherwise
    values = validate_params(template, given)
    if as_of is None:
        as_of = values.get("as_of") if isinstance(values.get("as_of"), dt.date) else None
    if as_of is None:
        raise TemplateRefused([Problem("as_of", "the date consent is checked against (as_of) is required",
                                       "需要给出核验授权的日期（as_of）")], code="template_params_invalid")

    tree = analysis.tree.copy()
    for ph in list(tree.find_all(exp.Placeholder)):
        ph.replace(_literal(values[ph.this]))
    up = template.upload
    up_view = upload_view_name(up.name)
    for table in list(tree.find_all(exp.Table)):
        if table.name == up_view and table.args.get("db") is None:
            alias = table.alias or up.name
            inner = exp.Select(expressions=[_col(c) for c in up.columns])
            inner.set("from_", exp.From(this=exp.Table(this=exp.to_identifier(up_view, quoted=True))))
            inner.set("where", exp.Where(this=consent_condition(up, as_of)))
            table.replace(exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier(alias, quoted=True))))

    casts = {"ref": "VARCHAR", "flag": "BOOLEAN"}
    outer = exp.Select(expressions=[
        exp.Alias(this=exp.Cast(this=_col(o.name, _OUT_ALIAS), to=exp.DataType.build(casts.get(o.kind, "VARCHAR"))),
                  alias=exp.to_identifier(o.name, quoted=True))
        for o in template.outputs])
    outer.set("from_", exp.From(this=exp.Subquery(this=tree, alias=exp.TableAlias(
        this=exp.to_identifier(_OUT_ALIAS, quoted=True)))))
    ref_out = template.ref_output
    assert ref_out is not None
    outer.set("order", exp.Order(expressions=[exp.Ordered(this=_col(ref_out.name), nulls_first=False)]))
    sql = outer.sql(dialect=DIALECT, identify=True, comments=False)
    return _Rendered(sql, outer, values, as_of, frozenset(analysis.datasets))


def render(template: Template, params: Mapping[str, Any] | None = None, *, as_of: dt.date | None = None,
           catalog: Mapping[str, Any] | None = None,
           upload_columns: Iterable[str] | Mapping[str, Any] | None = None) -> str:
    """The SQL the engine runs for `template` with `params`: checked (TemplateRefused otherwise),
    parameters as typed literals, tables as engine views, the upload wrapped in the consent filter
    for `as_of` (default: the `as_of` parameter), only the declared outputs, ordered by the ref.

    When the template declares a date parameter `as_of` and `params` does not give it, the run's
    `as_of` is used for it too."""
    return _render(template, params, as_of=as_of, catalog=catalog, upload_columns=upload_columns).sql


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class TemplateAnswer:
    """A template's answer. `table` holds only the declared outputs, one row per consented upload
    row, ordered by the row reference; nothing in it is a source value. `exclusions` lists the
    tenant's own row references left out and why (it depends on the upload alone)."""

    template: str
    version: int
    digest: str
    as_of: dt.date
    params: Mapping[str, Any]
    table: pa.Table
    upload_rows: int
    persons: int                                 # rows output
    excluded: int
    excluded_by_reason: Mapping[str, int]
    exclusions: pa.Table                         # (ref, reason)
    sql: str = field(repr=False)

    def report(self) -> dict[str, Any]:
        """What the result's report shows (JSON-able)."""
        return {
            "template": self.template, "version": self.version, "digest": self.digest,
            "as_of": self.as_of.isoformat(), "params": {k: _jsonable(v) for k, v in self.params.items()},
            "upload_rows": self.upload_rows, "persons": self.persons, "excluded": self.excluded,
            "excluded_by_reason": dict(self.excluded_by_reason),
            "reasons": {k: {"message": en, "message_zh": zh} for k, (en, zh) in REASON_TEXT.items()},
        }


_ALL_PREFIX = "__pdao_all_"          # a dataset's whole snapshot, bound under this name; never named by a template
_PERSONS_VIEW = "__pdao_persons"


def _applicant_views(template: Template, datasets: Iterable[str], catalog: Mapping[str, Any],
                     as_of: dt.date) -> list[str]:
    """The statements that make each dataset's view hold only the records of the persons the
    consented upload rows name: a check on the SQL the checker did not foresee still cannot reach
    anyone else's rows. Every dataset a template reads is keyed by its privacy unit (person_id)."""
    up = template.upload
    res_all = exp.to_identifier(_ALL_PREFIX + view_name(KEY_FIELD[0]), quoted=True)
    unit = {}
    for code in datasets:
        info = catalog.get(code)
        pu = getattr(info, "privacy_unit", None) or getattr(_descriptor_dict().get(code), "privacy_unit", None)
        if not pu:
            raise invalid("template_dataset_unkeyed", f"{code} has no privacy unit: a template reads only datasets "
                          "keyed by person.", f"{code} 没有隐私单元：分析模板只能读取按人关联的数据集。")
        unit[code] = pu
    consented = exp.Select(expressions=[_col(up.key)]).from_(
        exp.Table(this=exp.to_identifier(upload_view_name(up.name), quoted=True))).where(consent_condition(up, as_of))
    persons = exp.Select(expressions=[exp.Alias(this=_col(unit[KEY_FIELD[0]], "r"),
                                                alias=exp.to_identifier("person_id", quoted=True))]) \
        .from_(exp.Table(this=res_all, alias=exp.TableAlias(this=exp.to_identifier("r", quoted=True)))) \
        .where(exp.In(this=_col(KEY_FIELD[1], "r"), query=consented.subquery()))
    # a table, computed once: every dataset's view filters on it
    out = [exp.Create(kind="TABLE", this=exp.Table(this=exp.to_identifier(_PERSONS_VIEW, quoted=True)),
                      expression=persons, properties=exp.Properties(expressions=[exp.TemporaryProperty()]))
           .sql(dialect=DIALECT, identify=True)]
    for code in sorted(unit):
        keep = exp.Select(expressions=[_col("person_id")]).from_(
            exp.Table(this=exp.to_identifier(_PERSONS_VIEW, quoted=True)))
        view = exp.Select(expressions=[exp.Star()]).from_(
            exp.Table(this=exp.to_identifier(_ALL_PREFIX + view_name(code), quoted=True))).where(
            exp.In(this=_col(unit[code]), query=keep.subquery()))
        out.append(exp.Create(kind="VIEW", this=exp.Table(this=exp.to_identifier(view_name(code), quoted=True)),
                              expression=view).sql(dialect=DIALECT, identify=True))
    return out


def _descriptor_dict() -> dict[str, Any]:
    return dict(_descriptor_catalog())


def _failed() -> PdaoError:
    return invalid("template_failed", "The template could not be run on this data. The engine's message is not "
                   "shown: it could quote a record.", "分析模板无法在该数据上运行。引擎的错误信息不予显示，因为其中可能引用记录内容。")


def _mismatch(en: str, zh: str) -> PdaoError:
    return PdaoError(500, "template_output_mismatch", f"The template's answer was withheld: {en}",
                     f"分析模板的结果被拦截：{zh}")


@contextmanager
def _attached(con: Any, on_connection: Callable[[Any], None] | None) -> Iterator[None]:
    """Hand the open connection to `on_connection`, and take it back before the connection closes."""
    if on_connection is None:
        yield
        return
    on_connection(con)
    try:
        yield
    finally:
        on_connection(None)


def run_template(template: Template, params: Mapping[str, Any] | None, snapshots: Mapping[str, Path],
                 upload: Path, *, as_of: dt.date, catalog: Mapping[str, Any] | None = None,
                 threads: int = 2, memory_limit: str = "1GB",
                 on_connection: Callable[[Any], None] | None = None) -> TemplateAnswer:
    """Run a checked template inside the domain.

    snapshots: dataset code -> Parquet snapshot (only those the template reads are bound);
    upload: the tenant's upload as Parquet; as_of: the date consent must be valid on (and the
    template's `as_of` parameter when not given in params). on_connection: called with the DuckDB
    connection once it is open and with None before it closes, so that another thread (the run's
    heartbeat: time limit, cancel) can `interrupt()` it; an interrupted run fails like any
    (`template_failed`), and the caller, which interrupted it, knows why."""
    upload = Path(upload)
    try:
        names = pq.read_schema(upload).names
    except Exception:  # noqa: BLE001 - a file we cannot read as Parquet
        raise invalid("template_upload_invalid", "The upload is not a readable Parquet file.",
                      "上传数据不是可读取的 Parquet 文件。") from None
    missing = [c for c in template.upload.columns if c not in names]
    if missing:
        raise invalid("template_upload_invalid", f"The upload lacks the template's columns: {', '.join(missing)}.",
                      f"上传数据缺少模板所需的列：{', '.join(missing)}。", details={"missing_columns": missing})
    r = _render(template, params, as_of=as_of, catalog=catalog, upload_columns=names)
    absent = sorted(c for c in r.datasets if c not in snapshots)
    if absent:
        raise invalid("template_dataset_missing", f"No snapshot was given for {', '.join(absent)}.",
                      f"未提供 {', '.join(absent)} 的数据快照。", details={"datasets": absent})

    up = template.upload
    up_view = upload_view_name(up.name)
    datasets = sorted(set(r.datasets) | {KEY_FIELD[0]})
    absent = [c for c in datasets if c not in snapshots]
    if absent:
        raise invalid("template_dataset_missing", f"No snapshot was given for {', '.join(absent)}.",
                      f"未提供 {', '.join(absent)} 的数据快照。", details={"datasets": absent})
    views = {_ALL_PREFIX + view_name(c): Path(snapshots[c]) for c in datasets}
    views[up_view] = upload
    restrict = _applicant_views(template, datasets, descriptor_catalog() if catalog is None else catalog, r.as_of)
    source = exp.Table(this=exp.to_identifier(up_view, quoted=True))
    ref = _col(up.ref)
    stats = exp.Select(expressions=[
        exp.Count(this=exp.Star()),
        exp.Count(this=ref.copy()),
        exp.Count(this=exp.Distinct(expressions=[ref.copy()])),
    ]).from_(source.copy())
    excl = exp.Select(expressions=[
        exp.Alias(this=exp.Cast(this=ref.copy(), to=exp.DataType.build("VARCHAR")), alias=exp.to_identifier("ref", quoted=True)),
        exp.Alias(this=_exclusion_reason(up, r.as_of), alias=exp.to_identifier("reason", quoted=True)),
    ]).from_(source.copy())
    excl_sql = exp.Select(expressions=[exp.Star()]).from_(excl.subquery("e")).where(
        exp.Not(this=exp.Is(this=_col("reason", "e"), expression=exp.Null()))).order_by(_col("ref", "e"))
    try:
        with domain_connection(views, threads=threads, memory_limit=memory_limit) as con, \
                _attached(con, on_connection):
            for statement in restrict:
                con.execute(statement)
            total, non_null, distinct = con.sql(stats.sql(dialect=DIALECT, identify=True)).fetchall()[0]
            if non_null != total or distinct != non_null:
                raise invalid("template_upload_invalid",
                              f"The upload's row reference {up.ref} must be present and unique on every row "
                              f"({total - non_null} empty, {non_null - distinct} repeated).",
                              f"上传数据的行引用 {up.ref} 必须在每一行都存在且唯一（{total - non_null} 行为空，"
                              f"{non_null - distinct} 行重复）。")
            per_key = exp.Select(expressions=[exp.Max(this=_col("n"))]).from_(
                exp.Select(expressions=[exp.Alias(this=exp.Count(this=exp.Star()), alias=exp.to_identifier("n"))])
                .from_(source.copy()).where(consent_condition(up, r.as_of)).group_by(_col(up.key)).subquery("k"))
            most = con.sql(per_key.sql(dialect=DIALECT, identify=True)).fetchall()[0][0] or 0
            if most > up.max_rows_per_person:
                # (the tenant's own ID numbers: refusing says nothing about the city's data)
                raise invalid("template_upload_invalid",
                              f"One ID number is named by {most} consented rows; this template answers at most "
                              f"{up.max_rows_per_person} per person in a run.",
                              f"同一身份证号对应 {most} 个已授权行；该模板每次运行对每人最多回答 "
                              f"{up.max_rows_per_person} 行。", details={"max_rows_per_person": up.max_rows_per_person})
            exclusions = con.sql(excl_sql.sql(dialect=DIALECT, identify=True)).to_arrow_table()
            all_refs = con.sql(exp.Select(expressions=[exp.Cast(this=ref.copy(), to=exp.DataType.build("VARCHAR"))])
                               .from_(source.copy()).sql(dialect=DIALECT, identify=True)).to_arrow_table().column(0)
            table = con.sql(r.sql).to_arrow_table()
    except PdaoError:
        raise
    except duckdb.Error:
        raise _failed() from None

    # The answer must be what the check promised: one row per consented row, declared values only.
    consented = total - exclusions.num_rows
    ref_name = template.ref_output.name  # type: ignore[union-attr]
    refs = table.column(ref_name)
    if table.num_rows != consented or refs.null_count or pc.count_distinct(refs).as_py() != table.num_rows:
        raise _mismatch("it does not have exactly one row per consented upload row",
                        "结果并非对每个已授权的上传行恰有一行")
    consented_refs = set(all_refs.to_pylist()) - set(exclusions.column("ref").to_pylist())
    if set(refs.to_pylist()) != consented_refs:
        raise _mismatch("its row references are not the consented upload rows'", "其行引用与已授权的上传行不一致")
    if table.column_names != [o.name for o in template.outputs]:
        raise _mismatch("its columns are not the declared outputs", "其列不是已声明的输出列")
    for o in template.outputs:
        if o.kind in LABEL_KINDS:
            col = table.column(o.name)
            allowed = pa.array(list(o.labels or ()), type=pa.string())
            present = pc.drop_null(col)
            if len(present) and not pc.all(pc.is_in(present, value_set=allowed)).as_py():
                raise _mismatch(f"output {o.name} holds a value outside its labels", f"输出列 {o.name} 含有标签以外的值")
    by_reason = {k: 0 for k in EXCLUSION_REASONS}
    for reason in exclusions.column("reason").to_pylist():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return TemplateAnswer(
        template=template.name, version=template.version, digest=template_digest(template), as_of=r.as_of,
        params=r.params, table=table, upload_rows=total, persons=table.num_rows, excluded=exclusions.num_rows,
        excluded_by_reason=by_reason, exclusions=exclusions, sql=r.sql,
    )
