"""Tenant uploads (issue #6): a company's own table, checked, scanned and kept as immutable versions.

A tenant sends a file (CSV or Parquet) with a declared schema (`parse_schema`). `store_upload`
checks it with DuckDB the way `sandbox.engine.store` checks a dataset version — the source read through a
staged link, typed parsing, the file refused whole with a report by row (and, for CSV, by line)
that never holds a cell value — then scans every string, integer or decimal column the schema did not
declare as personal data with the project's Presidio recognizers (`sandbox.engine.pii.find_pii_batch`):
undeclared personal data refuses the file (422 `unexpected_pii`, column, kind and rows/lines, never
the text). A file that passes becomes the next version of that name in the tenant's own space,
`PDAO_HOME/tenants/<org>/uploads/<name>/v<n>-<sha12>.parquet` (read-only, SHA-256 recorded), and a
`TenantUpload` row.

Bounded work (issue #13): before its file is read, an upload is counted against its
organization's rate and concurrency in the database (429 `upload_rate_limited`,
`upload_in_progress`: `admit_upload`, `UploadSlot`). A file of more than `Settings.upload_max_rows`
data rows is refused (413 `too_many_rows`) before any per-row work — a Parquet file by its footer, a
CSV file by its line breaks and, only when those say more, by a count that stops past the cap — and
so is a Parquet file written with an encoding whose pages do not bound what they decode to (422,
`encoding`) or whose values unpack to more than a file may hold (413 `values_too_large`, counted
within a memory limit and stopped past the limit). A bound that cannot be computed refuses the
file. The checks, the scan and the canonical copy run within `Settings.upload_check_seconds` (413
`check_time_exceeded`: `CheckClock`). Every check runs in DuckDB over whole columns (ID check
characters and mobile numbers in SQL; the personal-data scan sends Presidio only the distinct
values a regular expression pre-filter cannot rule out). An organization's stored versions
together stay within `tenant_upload_quota_bytes` and `tenant_upload_quota_rows` (413
`upload_quota_exceeded`), held by one conditional UPDATE of its `TenantUploadUsage` row in the
transaction that stores the version.

Who sees what (`upload_scope`): a tenant-scoped caller (`policies.visibility.tenant_scoped`: an
applicant, or anyone in a company — a company's own reviewer too) its own organization's uploads
(metadata: never cells); the office, reviewers and auditors outside companies the metadata of every
tenant's uploads; providers, operators and other tenants nothing (404 on a name, exactly like a
missing one).

For the query path (sandbox/queries/service.py, sandbox/engine/sql.py): `latest_upload`, `upload_path`,
`tenant_upload_columns`, `join_key_of`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.compute as pc
from sqlalchemy import Engine, delete, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from catalog.identifiers import CN_ID_CHECK_CHARS, CN_ID_WEIGHTS
from catalog.models import DatasetField
from catalog.service import find_dataset
from pdao.kernel.config import Settings
from pdao.kernel.db import utcnow
from pdao.kernel.errors import PdaoError, invalid, not_found
from pdao.kernel.identity.models import Organization, Role
from policies import access
from policies.catalog_rules import catalog_scope
from sandbox.engine.store import (
    _COMPATIBLE,
    DUCK_TYPES,
    MAX_EXAMPLES,
    _base_type,
    _connect,
    _sha256,
    _type_problem_condition,
    _typed,
    duck_path,
    quote_ident,
    quote_literal,
    sniff_format,
    stage_source,
)
from sandbox.uploads.models import TenantUpload, TenantUploadCheck, TenantUploadUsage

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TYPES = ("string", "integer", "decimal", "date", "boolean")
ROLES = ("join_key", "row_ref", "consent_ref", "consent_valid_from", "consent_valid_until", "attribute")
NOT_NULL_ROLES = ("join_key", "row_ref")   # never null, declared or not
PII_KINDS = ("cn_id", "name", "phone")
MAX_COLUMNS = 64
MAX_NOTE = 500
# Findings below this score are not refusals: a bare `E12345678` is a passport number at 0.4, and
# so is many a claim reference. Check digits (ID, card, credit code) score 1.0, phones 0.7+.
PII_MIN_SCORE = 0.5
PII_CHUNK = 10_000
ROW = "__pdao_row"

ROLE_TYPES = {"consent_valid_from": "date", "consent_valid_until": "date"}


# ---------------------------------------------------------------------------------------------
# The declared schema

@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str
    role: str = "attribute"
    pii_kind: str | None = None
    nullable: bool = True
    joins: str | None = None   # join_key only: "dataset.code.field"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "role": self.role, "pii_kind": self.pii_kind,
                "nullable": self.nullable, "joins": self.joins}


@dataclass(frozen=True)
class UploadSchema:
    name: str
    columns: tuple[ColumnSpec, ...]

    def column(self, role: str) -> ColumnSpec | None:
        return next((c for c in self.columns if c.role == role), None)


def schema_invalid(problems: list[dict[str, Any]]) -> PdaoError:
    first = problems[0]["message"]
    more = f" (and {len(problems) - 1} more; see details)" if len(problems) > 1 else ""
    more_zh = f"（另有 {len(problems) - 1} 处问题，见 details）" if len(problems) > 1 else ""
    return invalid("schema_invalid", f"The declared schema is invalid: {first}{more}; nothing was stored.",
                   f"声明的表结构无效：{problems[0].get('message_zh', first)}{more_zh}；未保存任何数据。",
                   details={"problems": problems})


def _shown(value: Any) -> str | None:
    """A name the client sent, echoed only when it is a plain name (anything else could be data)."""
    return value if isinstance(value, str) and NAME_RE.fullmatch(value) else None


def parse_schema(data: Any, name: str | None = None) -> UploadSchema:
    """The declared schema from its JSON (already decoded), or 422 `schema_invalid` naming every
    problem. `name` (a form field) stands in for, or must agree with, the schema's own `name`."""
    problems: list[dict[str, Any]] = []

    def bad(path: str, message: str, message_zh: str) -> None:
        problems.append({"path": path, "message": message, "message_zh": message_zh})

    if not isinstance(data, dict):
        raise schema_invalid([{"path": "", "message": "the schema must be a JSON object with 'name' and 'columns'",
                               "message_zh": "表结构须为包含 name 与 columns 的 JSON 对象"}])
    unknown = sorted(k for k in data if k not in ("name", "columns"))
    if unknown:
        shown = [k for k in unknown if _shown(k)]
        bad("", f"unknown keys: {', '.join(shown) or '-'}", f"未知的键：{', '.join(shown) or '-'}")
    table = data.get("name", name)
    if name is not None and data.get("name") not in (None, name):
        bad("name", "the form's 'name' and the schema's 'name' differ", "表单的 name 与表结构的 name 不一致")
    if not isinstance(table, str) or not NAME_RE.fullmatch(table):
        bad("name", "the table name must match ^[a-z][a-z0-9_]{0,62}$", "表名须符合 ^[a-z][a-z0-9_]{0,62}$")
    cols = data.get("columns")
    specs: list[ColumnSpec] = []
    if not isinstance(cols, list) or not cols:
        bad("columns", "'columns' must be a non-empty list", "columns 须为非空列表")
        cols = []
    if len(cols) > MAX_COLUMNS:
        bad("columns", f"at most {MAX_COLUMNS} columns", f"最多 {MAX_COLUMNS} 列")
        cols = []
    seen: set[str] = set()
    for i, c in enumerate(cols):
        at = f"columns[{i}]"
        if not isinstance(c, dict):
            bad(at, "each column is an object", "每一列须为对象")
            continue
        extra = sorted(k for k in c if k not in ("name", "type", "role", "pii_kind", "nullable", "joins"))
        if extra:
            shown = [k for k in extra if _shown(k)]
            bad(at, f"unknown keys: {', '.join(shown) or '-'}", f"未知的键：{', '.join(shown) or '-'}")
        cname, ctype = c.get("name"), c.get("type")
        role, kind = c.get("role", "attribute"), c.get("pii_kind")
        nullable, joins = c.get("nullable", role not in NOT_NULL_ROLES), c.get("joins")
        label = f"column '{cname}'" if _shown(cname) else f"column #{i + 1}"
        ok = True
        if not isinstance(cname, str) or not NAME_RE.fullmatch(cname) or cname.startswith("__"):
            bad(f"{at}.name", f"{label}: the name must match ^[a-z][a-z0-9_]{{0,62}}$",
                f"第 {i + 1} 列：列名须符合 ^[a-z][a-z0-9_]{{0,62}}$")
            ok = False
        elif cname in seen:
            bad(f"{at}.name", f"{label} is declared twice", f"列 {cname} 重复声明")
            ok = False
        else:
            seen.add(cname)
        if ctype not in TYPES:
            bad(f"{at}.type", f"{label}: type must be one of {', '.join(TYPES)}", f"{label}：type 须为 {', '.join(TYPES)} 之一")
            ok = False
        if role not in ROLES:
            bad(f"{at}.role", f"{label}: role must be one of {', '.join(ROLES)}", f"{label}：role 须为 {', '.join(ROLES)} 之一")
            ok = False
        if kind is not None and kind not in PII_KINDS:
            bad(f"{at}.pii_kind", f"{label}: pii_kind must be one of {', '.join(PII_KINDS)} or null",
                f"{label}：pii_kind 须为 {', '.join(PII_KINDS)} 之一或 null")
            ok = False
        if not isinstance(nullable, bool):
            bad(f"{at}.nullable", f"{label}: nullable must be true or false", f"{label}：nullable 须为 true 或 false")
            ok = False
        if kind is not None and ctype not in (None, "string") and ctype in TYPES:
            bad(f"{at}.pii_kind", f"{label}: a column with a pii_kind is a string", f"{label}：带 pii_kind 的列须为 string")
            ok = False
        if role in ROLE_TYPES and ctype in TYPES and ctype != ROLE_TYPES[role]:
            bad(f"{at}.type", f"{label}: a {role} column is a date", f"{label}：{role} 列须为 date")
            ok = False
        if role == "join_key":
            if not isinstance(joins, str) or joins.count(".") < 1:
                bad(f"{at}.joins", f"{label}: a join_key names the dataset field it joins, e.g. "
                    "\"health.resident.id_number\"", f"{label}：join_key 须指明关联的数据集字段，如 health.resident.id_number")
                ok = False
            if nullable is True:
                bad(f"{at}.nullable", f"{label}: a join_key may not be nullable", f"{label}：join_key 不可为空")
                ok = False
        elif joins is not None:
            bad(f"{at}.joins", f"{label}: only a join_key column joins a dataset field", f"{label}：只有 join_key 列可声明 joins")
            ok = False
        if role == "row_ref":
            if ctype in TYPES and ctype not in ("string", "integer"):
                bad(f"{at}.type", f"{label}: a row_ref is a string or an integer", f"{label}：row_ref 须为 string 或 integer")
                ok = False
            if nullable is True:
                bad(f"{at}.nullable", f"{label}: a row_ref may not be nullable", f"{label}：row_ref 不可为空")
                ok = False
        if ok:
            specs.append(ColumnSpec(cname, ctype, role, kind, nullable, joins))
    for role in ("join_key", "row_ref", "consent_ref", "consent_valid_from", "consent_valid_until"):
        n = sum(1 for c in cols if isinstance(c, dict) and c.get("role", "attribute") == role)
        if n > 1:
            bad("columns", f"at most one {role} column", f"{role} 列至多一个")
    if cols and not any(isinstance(c, dict) and c.get("role") == "join_key" for c in cols):
        bad("columns", "one column must be the join_key (the key joined to a dataset field)",
            "须有一列为 join_key（与数据集字段关联的键）")
    if problems:
        raise schema_invalid(problems)
    return UploadSchema(table, tuple(specs))


def parse_schema_text(text: str | None, name: str | None = None) -> UploadSchema:
    if text is None or not text.strip():
        raise invalid("schema_required", "Send the table's declared schema as the form field 'schema' (JSON).",
                      "请以表单字段 schema（JSON）声明表结构。")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise schema_invalid([{"path": "", "message": "the schema is not valid JSON",
                               "message_zh": "表结构不是有效的 JSON"}]) from None
    return parse_schema(data, name)


def check_join_targets(session: Session, schema: UploadSchema, role: Role, org_id: int, org_kind: str) -> None:
    """Each join_key's `joins` names a field of a dataset the tenant may see, of the same type and
    the same pii_kind (an ID number joins an ID number). 422 `schema_invalid` otherwise."""
    problems = []
    scope = catalog_scope(role, org_id, org_kind)
    for c in schema.columns:
        if c.role != "join_key":
            continue
        code, _, fname = (c.joins or "").rpartition(".")
        ds = None
        if code:
            try:   # the catalog's one visibility filter: a prohibited dataset is "no such dataset"
                ds = find_dataset(session, code, scope)
            except PdaoError:
                ds = None
        f = None if ds is None else session.exec(select(DatasetField).where(
            DatasetField.dataset_id == ds.id, DatasetField.name == fname)).first()
        if f is None:
            problems.append({"path": f"columns.{c.name}.joins",
                             "message": f"column '{c.name}' joins no field the catalog has",
                             "message_zh": f"列 {c.name} 关联的字段在目录中不存在"})
            continue
        if f.type != c.type:
            problems.append({"path": f"columns.{c.name}.type",
                             "message": f"column '{c.name}' is {c.type}, {c.joins} is {f.type}",
                             "message_zh": f"列 {c.name} 类型为 {c.type}，{c.joins} 为 {f.type}"})
        if (f.pii_kind or None) != c.pii_kind:
            problems.append({"path": f"columns.{c.name}.pii_kind",
                             "message": f"column '{c.name}' declares pii_kind {c.pii_kind}, "
                                        f"{c.joins} is {f.pii_kind}",
                             "message_zh": f"列 {c.name} 声明的 pii_kind 为 {c.pii_kind}，{c.joins} 为 {f.pii_kind}"})
    if problems:
        raise schema_invalid(problems)


# ---------------------------------------------------------------------------------------------
# Checking a file

@dataclass
class UploadReport:
    """Where a file disagrees with its schema: columns, counts, rows (1-based data rows) and, for
    CSV, lines (1-based, the header is line 1). Never a cell value."""

    format: str
    row_count: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    pii: list[dict[str, Any]] = field(default_factory=list)


def _csv_header(path: Path) -> list[str] | None:
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            for rec in csv.reader(f):
                if rec:
                    return rec
    except (UnicodeDecodeError, csv.Error, OSError):
        return None
    return None


def csv_lines(path: Path, rows: set[int], ncols: int) -> dict[int, int]:
    """Data row number -> the line it starts on (the header is line 1), for the rows asked. Read
    as DuckDB reads it (comma, double quotes, a quoted value may span lines, blank lines skipped
    unless the table has one column)."""
    out: dict[int, int] = {}
    if not rows:
        return out
    last = max(rows)
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            reader = csv.reader(f)
            header_seen, row, line_end = False, 0, 0
            for rec in reader:
                start, line_end = line_end + 1, reader.line_num
                if not header_seen:
                    header_seen = bool(rec)
                    continue
                if not rec and ncols > 1:
                    continue
                row += 1
                if row in rows:
                    out[row] = start
                if row >= last:
                    break
    except (UnicodeDecodeError, csv.Error, OSError):
        return {}
    return out


def _bind(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, report: UploadReport) -> list[str] | None:
    lit = quote_literal(duck_path(path))
    if fmt == "parquet":
        con.execute(f"CREATE VIEW src AS SELECT * FROM read_parquet({lit})")
        return [r[0] for r in con.execute("DESCRIBE src").fetchall()]
    header = _csv_header(path)
    if header is None:
        report.problems.append({"check": "readable", "message": "the file cannot be read as CSV (UTF-8, with a "
                                "header line)"})
        return None
    if len(set(header)) != len(header):
        report.problems.append({"check": "columns", "message": "the header line names a column twice"})
        return None
    cols = "{" + ", ".join(f"{quote_literal(h)}: 'VARCHAR'" for h in header) + "}"
    con.execute(f"CREATE VIEW src AS SELECT * FROM read_csv({lit}, header=true, delim=',', quote='\"', "
                f"escape='\"', columns={cols}, auto_detect=false, store_rejects=true)")
    return header


def _rejects(con: duckdb.DuckDBPyConnection, report: UploadReport) -> None:
    """Lines the CSV reader could not take (wrong number of values, bad quoting or encoding)."""
    try:
        rows = con.execute("SELECT error_type::VARCHAR, count(DISTINCT line), list(DISTINCT line ORDER BY line)[1:5] "
                           "FROM reject_errors "
                           "GROUP BY 1 ORDER BY 1").fetchall()
    except duckdb.CatalogException:   # DuckDB makes the table only when a line was rejected
        return
    for kind, n, lines in rows:
        report.problems.append({"check": "malformed", "error": kind.lower().replace(" ", "_"), "count": n,
                                "first_lines": [int(x) for x in lines],
                                "message": f"{n} line(s) cannot be read as CSV ({kind.lower()})"})


# The identifier checks as SQL over whole columns: each is TRUE exactly where its Python original
# in catalog.identifiers is (is_valid_cn_id, is_cn_mobile; tests/test_upload_bounds.py compares
# them on valid, mutated and random values), FALSE elsewhere, never NULL for a non-null value, and
# never an error, whatever the value (ascii() and TRY_CAST cannot fail).

def cn_id_ok_sql(v: str) -> str:
    """`is_valid_cn_id(v)` in DuckDB SQL, for the VARCHAR expression `v`: 17 ASCII digits and a
    digit or X/x, a real date YYYYMMDD from 1800 on in characters 7–14, the GB 11643 check character."""
    # any character's code point - 48, times at most 10, 17 times: well within INTEGER
    total = " + ".join(f"(ascii(substr({v}, {i}, 1)) - 48) * {w}" for i, w in enumerate(CN_ID_WEIGHTS, start=1))
    born = f"TRY_CAST(substr({v}, 7, 4) || '-' || substr({v}, 11, 2) || '-' || substr({v}, 13, 2) AS DATE)"
    return (f"coalesce(regexp_full_match({v}, '[0-9]{{17}}[0-9Xx]') AND year({born}) >= 1800 "
            f"AND substr({quote_literal(CN_ID_CHECK_CHARS)}, (({total}) % 11) + 1, 1) = upper(substr({v}, 18, 1)), "
            "false)")


def phone_ok_sql(v: str) -> str:
    """`is_cn_mobile(v)` in DuckDB SQL: the whole value is 1[3-9] + 9 digits, optionally after
    +86 and one space or dash."""
    return f"coalesce(regexp_full_match({v}, '(?:\\+86[ -]?)?1[3-9][0-9]{{9}}'), false)"


# ---------------------------------------------------------------------------------------------
# Bounds: rows per upload, checked before any per-row work

def too_many_rows(limit: int, rows: int | None) -> PdaoError:
    """413: the file has more data rows than one upload may (`rows` when counted to the end)."""
    counted = f"{rows:,}" if rows is not None else f"more than {limit:,}"
    counted_zh = f"{rows:,}" if rows is not None else f"超过 {limit:,}"
    return PdaoError(413, "too_many_rows",
                     f"The file has {counted} data rows; an upload may have at most {limit:,} "
                     "(PDAO_UPLOAD_MAX_ROWS). Nothing was stored; split the table or send fewer rows.",
                     f"文件有 {counted_zh} 行数据，单次上传至多 {limit:,} 行（PDAO_UPLOAD_MAX_ROWS）。"
                     "未保存任何数据；请拆分或减少行数。",
                     details={"limit_rows": limit, "rows": rows})


_CHUNK = 1 << 20


def csv_rows_at_most(path: Path) -> int:
    """An upper bound of a CSV file's data rows, from its line breaks alone (\\n, \\r\\n or \\r):
    each record ends at one, or at the end of the file, and the first record is the header. Exact
    when the file has no blank line and no quoted line break; never less than what a reader finds."""
    breaks, last = 0, b""
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            breaks += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
            if last == b"\r" and chunk[:1] == b"\n":
                breaks -= 1
            last = chunk[-1:]
    records = breaks if last in (b"\n", b"\r") else breaks + 1
    return max(records - 1, 0)


def values_too_large(limit: int, unpacked: int | None) -> PdaoError:
    """413: a (small) Parquet file whose values unpack to more than a file may hold; `unpacked` is
    what was counted when counting stopped past the limit, or None when a single page or batch of
    values would not even fit in the memory a check may use."""
    if unpacked is None:
        counted, counted_zh = "more than a check may hold in memory", "超出检查可用的内存"
    else:
        counted, counted_zh = f"more than {unpacked / 1024**2:,.0f} MB", f"超过 {unpacked / 1024**2:,.0f} MB"
    return PdaoError(413, "values_too_large",
                     f"The file's values unpack to {counted}; an upload may hold at most "
                     f"{limit / 1024**2:,.0f} MB (PDAO_MAX_TENANT_UPLOAD_MB), as a CSV file may. Nothing was stored.",
                     f"文件中的数据解压后{counted_zh}，单次上传至多 {limit / 1024**2:,.0f} MB"
                     "（PDAO_MAX_TENANT_UPLOAD_MB，与 CSV 文件相同）。未保存任何数据。",
                     details={"limit_bytes": limit, "unpacked_bytes": unpacked})


#: Parquet encodings an upload may use: those whose pages bound what they decode to (plain and
#: length-prefixed values, fixed-width numbers, dictionary indices; a dictionary's repeats are
#: counted below). DELTA_BYTE_ARRAY is not among them: each value repeats a prefix of the one
#: before it, so a few KB of pages decode to gigabytes (the review's 8.8 KB "bomb" decoded
#: 10,000 values of 1 MB). pyarrow, pandas, polars and DuckDB never write it unless told to.
PARQUET_ENCODINGS = frozenset({"PLAIN", "PLAIN_DICTIONARY", "RLE_DICTIONARY", "RLE", "BIT_PACKED",
                               "DELTA_BINARY_PACKED", "DELTA_LENGTH_BYTE_ARRAY", "BYTE_STREAM_SPLIT"})
#: What the count of a Parquet file's values may hold in memory at once, on its own DuckDB
#: connection: a page or a batch of values decoding to more is refused, not spilled or retried.
SIZING_MEMORY = "256MB"
_SIZING_BATCH = 8192


def parquet_encoding_problems(con: duckdb.DuckDBPyConnection, path: Path) -> list[dict[str, Any]]:
    """Columns of a Parquet file written with an encoding outside `PARQUET_ENCODINGS`, as problems
    of the report (from the footer: no page read). What a lying footer hides is caught by the
    count of the values (`parquet_value_bytes`), which runs within a memory limit."""
    lit = quote_literal(duck_path(path))
    found: dict[str, set[str]] = {}
    for column, encodings, stats in con.execute(
            f"SELECT path_in_schema, encodings, encoding_stats FROM parquet_metadata({lit})").fetchall():
        used = {e.strip() for e in (encodings or "").split(",") if e.strip()}
        used |= {str(st["encoding"]) for st in (stats or []) if st and st.get("encoding")}
        found.setdefault(column, set()).update(used - PARQUET_ENCODINGS)
    problems = []
    for column, bad in sorted(found.items()):
        if not bad:
            continue
        shown = column if NAME_RE.fullmatch(column) else None
        names = ", ".join(sorted(e for e in bad if re.fullmatch(r"[A-Z_]{1,40}", e)) or ["?"])
        problems.append({"check": "encoding", "column": shown, "encodings": names.split(", "),
                         "message": f"column '{shown or '?'}' is written with the Parquet encoding {names}, which "
                                    "an upload may not use (write the file with PLAIN or dictionary encoding, the "
                                    "default of pyarrow, pandas, polars and DuckDB)"})
    return problems


def parquet_value_bytes(path: Path, columns: list[str], limit: int, clock: CheckClock | None = None) -> int:
    """What a Parquet file's values take written out as text, as a CSV file of them would, counted
    until the count passes `limit` (then that count, which is more than `limit`): first its pages'
    uncompressed size from the footer (no page read), then, only if that fits, the values
    themselves, every column, streamed a batch at a time on a DuckDB connection of its own whose
    memory is `SIZING_MEMORY` and which never spills to disk. So counting stops as soon as it has
    seen too much, and a page or a batch of values that would decode to more than that memory
    refuses the file (413 `values_too_large`) instead of being decoded. Raises duckdb.Error if the
    file cannot be read (the caller reports it); never returns "no bound"."""
    lit = quote_literal(duck_path(path))
    con = duckdb.connect(config={"threads": 1, "memory_limit": SIZING_MEMORY, "temp_directory": ""})  # no spilling
    try:
        with clock.interrupting(con) if clock else contextlib.nullcontext():
            pages = int(con.execute(f"SELECT coalesce(sum(total_uncompressed_size), 0) FROM parquet_metadata({lit})"
                                    ).fetchall()[0][0])
            if pages > limit or not columns:
                return pages
            size = " + ".join(f"coalesce(strlen(CAST({quote_ident(c)} AS VARCHAR)), 0)" for c in columns)
            total = 0
            try:
                reader = con.sql(f"SELECT CAST({size} AS BIGINT) AS n FROM read_parquet({lit})"
                                 ).to_arrow_reader(_SIZING_BATCH)
                for batch in reader:
                    total += pc.sum(batch.column(0)).as_py() or 0
                    if total > limit:
                        return total
            except duckdb.OutOfMemoryException:
                raise values_too_large(limit, None) from None
            return max(pages, total)
    finally:
        con.close()


def rows_up_to(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, limit: int) -> int:
    """The data rows of the file bound as `src` — exactly, or some number above `limit` where
    counting stopped. Parquet: the footer's counts (DuckDB reads no more rows than its row groups
    declare); CSV: the line breaks, then, only if they allow more than `limit`, DuckDB's own
    reading of at most `limit` + 1 rows. Raises duckdb.Error or OSError if they cannot be counted:
    the caller refuses the file (a count that failed is never read as "no bound")."""
    lit = quote_literal(duck_path(path))
    if fmt == "parquet":
        declared = con.execute(f"SELECT num_rows FROM parquet_file_metadata({lit})").fetchone()[0]
        in_groups = con.execute(
            "SELECT coalesce(sum(n), 0) FROM (SELECT DISTINCT row_group_id, row_group_num_rows AS n "
            f"FROM parquet_metadata({lit}))").fetchone()[0]
        return max(int(declared or 0), int(in_groups))
    at_most = csv_rows_at_most(path)
    if at_most <= limit:
        return at_most
    return con.execute(f"SELECT count(*) FROM (SELECT 1 FROM src LIMIT {limit + 1})").fetchone()[0]


# ---------------------------------------------------------------------------------------------
# Bounds: the time one upload's checks may take

def check_time_exceeded(seconds: float) -> PdaoError:
    """413: the file's checks and scan did not finish within the time one upload may take."""
    return PdaoError(413, "check_time_exceeded",
                     f"The file could not be checked within {seconds:g} s (PDAO_UPLOAD_CHECK_SECONDS); nothing was "
                     "stored. Send a smaller file, or one with fewer long free-text values.",
                     f"文件未能在 {seconds:g} 秒内完成检查（PDAO_UPLOAD_CHECK_SECONDS），未保存任何数据。"
                     "请上传更小的文件，或减少较长的自由文本。",
                     details={"limit_seconds": seconds})


class CheckClock:
    """One upload's time budget (`Settings.upload_check_seconds`) for its checks, its scan and its
    canonical copy, from the moment they start: a DuckDB query still running when it ends is
    interrupted (`interrupting`), the PII scan stops at it (`deadline`), and the file is refused
    (413 `check_time_exceeded`). A time.monotonic() clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    @contextlib.contextmanager
    def interrupting(self, con: duckdb.DuckDBPyConnection):  # noqa: ANN201
        """While inside, `con` is interrupted from the deadline on (its query raises
        duckdb.InterruptException): again and again, since DuckDB forgets an interrupt that came
        between two queries."""
        stop = threading.Event()

        def interrupt() -> None:
            if stop.wait(max(self.deadline - time.monotonic(), 0.0)):
                return
            while True:
                con.interrupt()
                if stop.wait(0.05):
                    return

        watch = threading.Thread(target=interrupt, name="upload-check-clock", daemon=True)
        watch.start()
        try:
            yield con
        finally:
            stop.set()
            watch.join()


def check_upload(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, schema: UploadSchema,
                 today: date | None = None, max_rows: int | None = None, max_bytes: int | None = None,
                 clock: CheckClock | None = None) -> UploadReport:
    """Bind `path` as `src` and compare it with the schema (refusals in `problems`, notes in
    `warnings`). With `max_rows`, a file of more data rows is refused first (413 `too_many_rows`),
    before anything reads its rows; with `max_bytes`, a Parquet file whose values unpack to more
    bytes than that (413 `values_too_large`), before any per-row check. A bound that cannot be
    computed refuses the file too (a `readable` problem, or 413): it is never taken for "no bound".
    A Parquet file written with an encoding outside `PARQUET_ENCODINGS` is refused (`encoding`).
    Does not scan for personal data (`scan_pii`)."""
    report = UploadReport(format=fmt)
    try:
        names = _bind(con, path, fmt, report)
        if names is None:
            return report
        if max_rows is not None:   # before any per-row work, the reading of the whole CSV included
            counted = rows_up_to(con, path, fmt, max_rows)
            if counted > max_rows:
                raise too_many_rows(max_rows, counted if fmt == "parquet" else None)
        src_types = {r[0]: r[1] for r in con.execute("DESCRIBE src").fetchall()}
        if fmt == "csv":
            # every column read (a bare count(*) does not parse the values, and rejects nothing)
            con.execute(f"SELECT count(*), {', '.join(f'max(length({quote_ident(n)}))' for n in names)} "
                        "FROM src").fetchall()   # fetchall: the scan must finish to record its rejects
            _rejects(con, report)
            if report.problems:
                return report
    except (duckdb.Error, OSError):
        report.problems.append({"check": "readable", "message": f"the file cannot be read as {fmt}"})
        return report
    wanted = [c.name for c in schema.columns]
    missing = [n for n in wanted if n not in src_types]
    extra = [n for n in src_types if n not in wanted]
    if missing:
        report.problems.append({"check": "columns", "columns": missing,
                                "message": f"declared columns missing from the file: {', '.join(missing)}"})
    if extra:
        shown = [n for n in extra if NAME_RE.fullmatch(n)]
        hidden = f" and {len(extra) - len(shown)} more" if len(shown) < len(extra) else ""
        report.problems.append({"check": "columns", "columns": shown,
                                "message": f"columns not declared in the schema: {', '.join(shown) or '-'}{hidden}"})
    for c in schema.columns:
        if c.name in src_types and _base_type(src_types[c.name]).strip('"') not in _COMPATIBLE[c.type] | {"NULL"}:
            report.problems.append({"check": "type", "column": c.name,
                                    "message": f"column '{c.name}' is {src_types[c.name]}, the schema says {c.type}"})
    if report.problems:
        return report
    if fmt == "parquet":   # how its values are encoded and what they unpack to, before reading them
        try:
            report.problems += parquet_encoding_problems(con, path)
            if report.problems:
                return report
            if max_bytes is not None:
                unpacked = parquet_value_bytes(path, wanted, max_bytes, clock)
                if unpacked > max_bytes:
                    raise values_too_large(max_bytes, unpacked)
        except duckdb.Error:
            report.problems.append({"check": "readable", "message": f"the file cannot be read as {fmt}"})
            return report

    today = today or date.today()
    checks: list[tuple[str, str, str, bool]] = []   # (column, check, condition, warning?)
    for c in schema.columns:
        col = f"s.{quote_ident(c.name)}"
        bad_type = _type_problem_condition(col, c.type, src_types[c.name])
        if bad_type:
            checks.append((c.name, "type", bad_type, False))
        if not c.nullable:
            empty = f" OR trim({col}) = ''" if c.type == "string" else ""
            checks.append((c.name, "null", f"{col} IS NULL{empty}", False))
        if c.pii_kind == "cn_id":
            checks.append((c.name, "cn_id", f"{col} IS NOT NULL AND NOT {cn_id_ok_sql(f'CAST({col} AS VARCHAR)')}",
                           False))
        if c.pii_kind == "phone":
            checks.append((c.name, "phone", f"{col} IS NOT NULL AND NOT {phone_ok_sql(f'CAST({col} AS VARCHAR)')}",
                           False))
    typed = {c.name: _typed(f"s.{quote_ident(c.name)}", c.type, src_types[c.name]) for c in schema.columns}
    vf, vu = schema.column("consent_valid_from"), schema.column("consent_valid_until")
    if vf and vu:
        checks.append((vu.name, "consent_order", f"{typed[vu.name]} < {typed[vf.name]}", False))
    today_lit = f"DATE {quote_literal(today.isoformat())}"
    if vu:
        checks.append((vu.name, "consent_expired", f"{typed[vu.name]} < {today_lit}", True))
    if vf:
        checks.append((vf.name, "consent_not_yet_valid", f"{typed[vf.name]} > {today_lit}", True))
    # repeated keys (a warning: the engine keeps one row per key) and row references (refused:
    # each row's answer is told by its reference)
    windows = []
    for role, check, warn, alias in (("join_key", "duplicate_key", True, "__pdao_dup_key"),
                                     ("row_ref", "duplicate_ref", False, "__pdao_dup_ref")):
        c = schema.column(role)
        if c is not None:
            ccol = f"s.{quote_ident(c.name)}"
            part = f"upper({ccol})" if c.type == "string" else ccol
            windows.append(f"row_number() OVER (PARTITION BY {part} ORDER BY s.{ROW}) AS {alias}")
            checks.append((c.name, check, f"{ccol} IS NOT NULL AND s.{alias} > 1", warn))
    numbered = f"(SELECT row_number() OVER () AS {ROW}, s.* FROM src AS s)"
    if windows:
        numbered = f"(SELECT s.*, {', '.join(windows)} FROM {numbered} AS s)"
    exprs = ["count(*)"] + [f"count(*) FILTER (WHERE {cond})" for _, _, cond, _ in checks]
    try:
        counts = con.execute(f"SELECT {', '.join(exprs)} FROM {numbered} AS s").fetchone()
        report.row_count = counts[0]
        if max_rows is not None and report.row_count > max_rows:   # a footer that undercounted
            raise too_many_rows(max_rows, report.row_count)
        found = []
        for (cname, kind, cond, warn), n in zip(checks, counts[1:], strict=True):
            if n:
                rows = [r[0] for r in con.execute(f"SELECT s.{ROW} FROM {numbered} AS s WHERE {cond} "
                                                  f"ORDER BY s.{ROW} LIMIT {MAX_EXAMPLES}").fetchall()]
                found.append((cname, kind, n, rows, warn))
    except duckdb.Error:
        report.problems.append({"check": "readable", "message": f"the file cannot be read as {fmt}"})
        return report
    if report.row_count == 0:
        report.problems.append({"check": "rows", "message": "the file has no data rows"})
    spec = {c.name: c for c in schema.columns}
    for cname, kind, n, rows, warn in found:
        item: dict[str, Any] = {"check": kind, "column": cname, "count": n, "first_rows": rows}
        item["message"] = {
            "type": f"{n} value(s) of '{cname}' are not a valid {spec[cname].type}",
            "null": f"{n} row(s) have no value for '{cname}', which may not be empty",
            "cn_id": f"{n} value(s) of '{cname}' are not valid resident ID numbers (GB 11643: 18 characters, "
                     "a real birth date, the check character)",
            "phone": f"{n} value(s) of '{cname}' are not mainland mobile numbers",
            "consent_order": f"{n} row(s) have '{cname}' before '{vf.name if vf else ''}'",
            "consent_expired": f"{n} row(s) have a consent that ended before {today.isoformat()}",
            "consent_not_yet_valid": f"{n} row(s) have a consent that starts after {today.isoformat()}",
            "duplicate_key": f"{n} row(s) repeat a '{cname}' of an earlier row; a join keeps one row per key",
            "duplicate_ref": f"{n} row(s) repeat a '{cname}' of an earlier row; a row_ref names one row",
        }[kind]
        (report.warnings if warn else report.problems).append(item)
    _add_lines(path, fmt, len(schema.columns), report.problems + report.warnings, report.row_count)
    return report


def _add_lines(path: Path, fmt: str, ncols: int, items: list[dict[str, Any]], row_count: int | None = None) -> None:
    if fmt != "csv":
        return
    wanted = {r for it in items for r in it.get("first_rows", ())}
    if wanted and row_count is not None and csv_rows_at_most(path) == row_count:
        # as many line breaks as rows: no blank line, no quoted line break, one line per record
        lines = {r: r + 1 for r in wanted}
    else:
        lines = csv_lines(path, wanted, ncols)
    if not wanted or len(lines) != len(wanted):
        return
    for it in items:
        if "first_rows" in it:
            it["first_lines"] = [lines[r] for r in it["first_rows"]]


def scanned_columns(schema: UploadSchema) -> list[ColumnSpec]:
    """Columns the PII scan reads: every string, integer or decimal column without a declared
    pii_kind (an 11- or 18-digit integer can be a phone or an ID number as well as a string can,
    and a decimal's 16 integer digits hold a phone, a 15-digit ID number or a card number)."""
    return [c for c in schema.columns if c.pii_kind is None and c.type in ("string", "integer", "decimal")]


def scanned_text(c: ColumnSpec, src_type: str) -> str:
    """The VARCHAR the PII scan reads of column `c` (of source type `src_type`) in `src AS s`: the
    value as sent; for a decimal also the integer digits of its typed value, after a separator no
    pattern reads across (`1.3812345678E10`, `+013812345678` and a DOUBLE's 1.3812345678e10 all
    read `13812345678` there; cents never hold personal data)."""
    col = f"s.{quote_ident(c.name)}"
    if c.type == "decimal":
        digits = f"CAST(CAST(trunc({_typed(col, 'decimal', src_type)}) AS BIGINT) AS VARCHAR)"
        return f"(CAST({col} AS VARCHAR) || ' / ' || {digits})"
    return f"CAST({col} AS VARCHAR)"


def _re2_literal(word: str) -> str:
    return "".join("\\" + ch if ch in "\\.+*?()|[]{}^$" else ch for ch in word)


@functools.cache
def pii_prefilter_sql(v: str = "v") -> str:
    """A DuckDB condition on the VARCHAR expression `v` that is TRUE for every value in which
    `sandbox.engine.pii.find_pii_batch` can find anything scoring `PII_MIN_SCORE` or more: the OR of a
    necessary condition of each such pattern of the recognizers, built from their own constants.
    Values it rules out are not sent to Presidio, which changes no finding of the scan; most
    references (A0000001, C-0000001) and words are ruled out (tests/test_upload_bounds.py checks it
    on the PII tests' texts, the synthetic free texts and random ones).

    Bare passport and permit numbers (0.4) are left out on purpose: they never refuse a file."""
    from sandbox.engine.pii.cn_address_recognizer import ANCHOR_RE
    from sandbox.engine.pii.cn_license_plate_recognizer import PROVINCES
    from sandbox.engine.pii.cn_name_recognizer import CUES, SURNAMES
    from sandbox.engine.pii.cn_passport_recognizer import PASSPORT_CUES
    from sandbox.engine.pii.cn_travel_permit_recognizer import PERMIT_CUES, TAIWAN_CUES

    cue_words = sorted({*CUES, "代诉", "代述", *PASSPORT_CUES, *PERMIT_CUES, *TAIWAN_CUES}, key=lambda w: (-len(w), w))
    anywhere = "|".join([
        "[0-9]{15}",                                       # ID numbers (18 and 15 digits), bank cards (16-19)
        "1[3-9][0-9]{9}",                                  # mobiles, with or without +86 / 86 / 0086
        "1[3-9][0-9][ -][0-9]{4}[ -][0-9]{4}",             # mobiles split 3-4-4
        "[0-9]{4}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{4}",    # cards in groups of four
        "[0-9A-HJ-NPQRTUWXY]{18}",                         # unified social credit codes
        "@",                                               # e-mail addresses
        f"[{PROVINCES}][A-HJ-NP-Z]",                       # licence plates
        ANCHOR_RE,                                         # street addresses (each has one)
        *map(_re2_literal, cue_words),                     # names, passports, permits after their cue words
    ])
    # a name as the whole first clause of a line: a comma, and a surname first on some line
    first = "".join(sorted({name[0] for name in SURNAMES}))
    lead = f"^[{first}]|[\\n\\r\\x0B\\x0C\\x{{85}}\\x{{2028}}\\x{{2029}}]"
    return (f"(regexp_matches({v}, {quote_literal(anywhere)}) OR (regexp_matches({v}, '[，,]') "
            f"AND regexp_matches({v}, {quote_literal(lead)})))")


def scan_pii(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, schema: UploadSchema,
             row_count: int | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
    """Personal data the schema did not declare: per (column, kind), how many rows and the first
    rows (lines for CSV; `row_count`, the file's data rows if known, may spare reading it again for
    them). Each distinct value that the pre-filter (`pii_prefilter_sql`, in DuckDB, over whole
    columns) cannot rule out is scanned once; no value leaves this function. Past `deadline` (a
    time.monotonic() instant), TimeoutError, even inside one long value."""
    from sandbox.engine.pii import find_pii_batch

    src_types = {r[0]: r[1] for r in con.execute("DESCRIBE src").fetchall()}
    out: list[dict[str, Any]] = []
    for c in scanned_columns(schema):
        # row numbers in file order first, then the filter (a filter is never pushed below OVER ())
        cur = con.execute(
            f"SELECT v, count(*), list(r ORDER BY r)[1:{MAX_EXAMPLES}] FROM (SELECT "
            f"{scanned_text(c, src_types[c.name])} AS v, row_number() OVER () AS r FROM src AS s) "
            f"WHERE v IS NOT NULL AND trim(v) <> '' "
            f"AND {pii_prefilter_sql('v')} GROUP BY v")
        hits: dict[str, list] = {}
        while True:
            chunk = cur.fetchmany(PII_CHUNK)
            if not chunk:
                break
            findings = find_pii_batch([v for v, _, _ in chunk], deadline=deadline)
            for (_, n, rows), fs in zip(chunk, findings, strict=True):
                for kind in {f.kind for f in fs if f.score >= PII_MIN_SCORE}:
                    h = hits.setdefault(kind, [0, []])
                    h[0] += n
                    h[1] = sorted(set(h[1]) | set(rows))[:MAX_EXAMPLES]
        for kind, (n, rows) in sorted(hits.items()):
            out.append({"check": "unexpected_pii", "column": c.name, "kind": kind, "count": n, "first_rows": rows,
                        "message": f"{n} value(s) of '{c.name}' hold personal data of kind {kind}, which the "
                                   "schema does not declare"})
    _add_lines(path, fmt, len(schema.columns), out, row_count)
    return out


# ---------------------------------------------------------------------------------------------
# Storing

def tenants_dir(settings: Settings) -> Path:
    return settings.home / "tenants"


def upload_path(settings: Settings, upload: TenantUpload) -> Path:
    """Where an upload's Parquet file lives (for the sandbox engine only; never shown)."""
    return settings.home / upload.storage_path


def verify_upload(settings: Settings, upload: TenantUpload) -> str:
    """`ok`, `missing` or `altered`: does the file still hash to what was recorded?"""
    path = upload_path(settings, upload)
    if not path.is_file():
        return "missing"
    return "ok" if _sha256(path) == upload.sha256 else "altered"


def _refused(report: UploadReport, schema: UploadSchema) -> PdaoError:
    n = len(report.problems)
    return invalid("upload_invalid",
                   f"The file does not match the declared schema of '{schema.name}' ({n} problem(s)); "
                   "nothing was stored.",
                   f"文件与声明的表结构 {schema.name} 不符（{n} 处问题），未保存任何数据。",
                   details={"format": report.format, "problems": report.problems, "warnings": report.warnings})


def _pii_refused(report: UploadReport) -> PdaoError:
    first = report.pii[0]
    where = (f"line {first['first_lines'][0]}" if first.get("first_lines") else f"row {first['first_rows'][0]}")
    where_zh = (f"第 {first['first_lines'][0]} 行" if first.get("first_lines") else f"第 {first['first_rows'][0]} 条记录")
    more = f" (and {len(report.pii) - 1} more; see details)" if len(report.pii) > 1 else ""
    return invalid("unexpected_pii",
                   f"Column '{first['column']}' holds personal data of kind {first['kind']} that the schema does "
                   f"not declare ({first['count']} value(s), first at {where}){more}; nothing was stored. Remove it, "
                   "or declare the column's pii_kind if the scene needs it.",
                   f"列 {first['column']} 含有未声明的个人信息（类型 {first['kind']}，{first['count']} 个值，首见于{where_zh}）；"
                   "未保存任何数据。请删除，或在场景确需时声明该列的 pii_kind。",
                   details={"format": report.format, "findings": report.pii, "warnings": report.warnings})


def write_upload(settings: Settings, src: Path, schema: UploadSchema, today: date | None = None
                 ) -> tuple[Path, UploadReport]:
    """Check and scan `src`, then write its canonical Parquet to staging (the caller removes it),
    all within `settings.upload_check_seconds`. Refuses the file whole (413 `too_many_rows` /
    `values_too_large` / `check_time_exceeded`, 422 `upload_invalid` / `unexpected_pii`). Touches no
    database."""
    settings.ensure_home()
    fmt = sniff_format(src)
    tmp = settings.staging_dir / f"tenant-{uuid.uuid4().hex}.parquet"
    staged = stage_source(settings, src)
    clock = CheckClock(settings.upload_check_seconds)
    con = None
    try:
        con = _connect(settings)
        with clock.interrupting(con):
            report = _check_scan_copy(con, staged, fmt, schema, today, settings, clock, tmp)
    except (PdaoError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        # refused after the time ran out, whatever said so (an interrupted query reads as unreadable)
        if isinstance(e, TimeoutError) or clock.expired():
            raise check_time_exceeded(settings.upload_check_seconds) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if con is not None:
            con.close()
        staged.unlink(missing_ok=True)
    return tmp, report


def _check_scan_copy(con: duckdb.DuckDBPyConnection, staged: Path, fmt: str, schema: UploadSchema,
                     today: date | None, settings: Settings, clock: CheckClock, tmp: Path) -> UploadReport:
    """`write_upload`'s work on its connection: the checks, the scan, the canonical copy to `tmp`."""
    report = check_upload(con, staged, fmt, schema, today, max_rows=settings.upload_max_rows,
                          max_bytes=settings.max_tenant_upload_bytes, clock=clock)
    if report.problems:
        raise _refused(report, schema)
    try:
        report.pii = scan_pii(con, staged, fmt, schema, report.row_count, deadline=clock.deadline)
    except duckdb.Error:
        report.problems.append({"check": "readable", "message": f"the file cannot be read as {fmt}"})
        raise _refused(report, schema) from None
    if report.pii:
        raise _pii_refused(report)
    src_types = {r[0]: r[1] for r in con.execute("DESCRIBE src").fetchall()}
    exprs = []
    for c in schema.columns:
        e = _typed(quote_ident(c.name), c.type, src_types[c.name], strict=True)
        if c.pii_kind == "cn_id":
            e = f"upper(trim({e}))"   # 'x' typed by hand joins the catalog's 'X'
        exprs.append(f"{e} AS {quote_ident(c.name)}")
    try:
        con.execute(f"COPY (SELECT {', '.join(exprs)} FROM src) TO {quote_literal(str(tmp))} "
                    "(FORMAT parquet, COMPRESSION zstd)")
    except duckdb.Error:
        report.problems.append({"check": "readable", "message": f"the file cannot be read as {fmt}"})
        raise _refused(report, schema) from None
    return report


# ---------------------------------------------------------------------------------------------
# Bounds: what one organization's stored versions hold together

@dataclass(frozen=True)
class Usage:
    """An organization's stored upload versions together (or, as a limit, what they may hold)."""

    bytes: int
    rows: int


def quota_limits(settings: Settings) -> Usage:
    return Usage(settings.tenant_upload_quota_bytes, settings.tenant_upload_quota_rows)


def fits_quota(used: Usage, adding: Usage, limit: Usage) -> bool:
    """Whether a version of `adding` bytes and rows may join the stored ones."""
    return used.bytes + adding.bytes <= limit.bytes and used.rows + adding.rows <= limit.rows


def _mb(n: int) -> str:
    return f"{n / 1024**2:,.1f} MB"


def quota_exceeded(used: Usage, adding: Usage, limit: Usage) -> PdaoError:
    """413: storing this version would take the organization's uploads past its quota."""
    return PdaoError(
        413, "upload_quota_exceeded",
        f"Your organization's uploads already hold {_mb(used.bytes)} and {used.rows:,} rows of its quota of "
        f"{_mb(limit.bytes)} and {limit.rows:,} rows (PDAO_TENANT_UPLOAD_QUOTA_MB, PDAO_TENANT_UPLOAD_QUOTA_ROWS); "
        f"this version ({_mb(adding.bytes)}, {adding.rows:,} rows) does not fit. Nothing was stored; ask the "
        "operator for a larger quota.",
        f"贵机构已上传的数据占用 {_mb(used.bytes)}、{used.rows:,} 行，配额为 {_mb(limit.bytes)}、{limit.rows:,} 行"
        f"（PDAO_TENANT_UPLOAD_QUOTA_MB、PDAO_TENANT_UPLOAD_QUOTA_ROWS）；本版本（{_mb(adding.bytes)}、{adding.rows:,} 行）"
        "超出配额。未保存任何数据；如需更大配额请联系运营方。",
        details={"used_bytes": used.bytes, "used_rows": used.rows, "limit_bytes": limit.bytes,
                 "limit_rows": limit.rows, "version_bytes": adding.bytes, "version_rows": adding.rows})


def upload_usage(session: Session, org_id: int) -> Usage:
    """What the organization's stored versions hold together (as of this statement)."""
    row = session.exec(select(TenantUploadUsage.stored_bytes, TenantUploadUsage.stored_rows)
                       .where(TenantUploadUsage.org_id == org_id)).first()
    return Usage(int(row[0]), int(row[1])) if row else Usage(0, 0)


def claim_quota(session: Session, org_id: int, adding: Usage, limit: Usage) -> None:
    """Count a new version against the organization's quota, in the caller's transaction (which
    then stores the version and commits, or rolls back and counts nothing). One conditional UPDATE
    decides and counts at once, and holds the organization's usage row until the commit: a
    concurrent upload of the same organization waits for it (PostgreSQL re-reads the row, SQLite
    takes its one write lock), so two uploads never both fit into the last room. Raises 413
    `upload_quota_exceeded`; an IntegrityError if a concurrent first upload made the row (retry)."""
    u = TenantUploadUsage
    claim = (update(u).where(u.org_id == org_id, u.stored_bytes + adding.bytes <= limit.bytes,
                             u.stored_rows + adding.rows <= limit.rows)
             .values(stored_bytes=u.stored_bytes + adding.bytes, stored_rows=u.stored_rows + adding.rows)
             .execution_options(synchronize_session=False))
    for _attempt in range(5):
        if session.exec(claim).rowcount == 1:
            return
        row = session.exec(select(u.stored_bytes, u.stored_rows).where(u.org_id == org_id)).first()
        if row is None:   # the organization's first upload
            session.add(u(org_id=org_id, stored_bytes=0, stored_rows=0))
            session.flush()
            continue
        used = Usage(int(row[0]), int(row[1]))
        if not fits_quota(used, adding, limit):
            raise quota_exceeded(used, adding, limit)
        # it fits now: the row was made (or changed) by a concurrent upload between the two statements
    raise PdaoError(409, "concurrent_change", "Other uploads of your organization were stored at the same time; "
                    "send it again.", "贵机构的其他上传同时写入，请重新上传。")


# ---------------------------------------------------------------------------------------------
# Bounds: how often, and how many at once, one organization's uploads are checked

RATE_WINDOW = timedelta(hours=1)
#: A running upload's slot lasts this long unless renewed; `UploadSlot` renews it every quarter of
#: it while the request runs, so only a process that died mid-upload lets it run out.
UPLOAD_LEASE_SECONDS = 120.0
_IN_PROGRESS_RETRY_SECONDS = 10

log = logging.getLogger("pdao.uploads")


def upload_in_progress(limit: int) -> PdaoError:
    """429: the organization already has as many uploads being checked as it may."""
    return PdaoError(429, "upload_in_progress",
                     f"Your organization already has {limit} upload(s) being received or checked, as many as it may "
                     "at once (PDAO_UPLOAD_CONCURRENCY). Nothing was read or stored; send it again when that one has "
                     "finished.",
                     f"贵机构已有 {limit} 个上传正在接收或检查，已达同时上传上限（PDAO_UPLOAD_CONCURRENCY）。"
                     "未读取也未保存任何数据；请待其完成后重新上传。",
                     details={"limit_concurrent": limit, "retry_after_seconds": _IN_PROGRESS_RETRY_SECONDS},
                     headers={"Retry-After": str(_IN_PROGRESS_RETRY_SECONDS)})


def upload_rate_limited(limit: int, retry_after: int) -> PdaoError:
    """429: the organization started as many uploads in the last hour as it may."""
    return PdaoError(429, "upload_rate_limited",
                     f"Your organization started {limit} uploads in the last hour, as many as it may "
                     f"(PDAO_UPLOAD_RATE_PER_HOUR). Nothing was read or stored; try again in {retry_after} s.",
                     f"贵机构最近一小时已发起 {limit} 次上传，已达上限（PDAO_UPLOAD_RATE_PER_HOUR）。"
                     f"未读取也未保存任何数据；请于 {retry_after} 秒后重试。",
                     details={"limit_per_hour": limit, "retry_after_seconds": retry_after},
                     headers={"Retry-After": str(retry_after)})


def admission_refusal(started: list[datetime], running: int, settings: Settings, now: datetime
                      ) -> PdaoError | None:
    """Why a new upload of an organization may not start now, or None: `running` of its uploads
    are being checked, and `started` (oldest first) are when its uploads of the last hour started."""
    if running >= settings.upload_concurrency:
        return upload_in_progress(settings.upload_concurrency)
    if len(started) >= settings.upload_rate_per_hour:
        # when enough of them have left the hour for one more
        frees = started[len(started) - settings.upload_rate_per_hour] + RATE_WINDOW
        return upload_rate_limited(settings.upload_rate_per_hour, max(1, math.ceil((frees - now).total_seconds())))
    return None


def admit_upload(engine: Engine, settings: Settings, org_id: int, user_id: int, now: datetime | None = None) -> int:
    """Count an upload against its organization's rate and concurrency, before its file is read,
    committed at once (the id of its `TenantUploadCheck`), or raise 429 (`upload_in_progress`,
    `upload_rate_limited`) and count nothing. One organization's admissions take turns on its
    `TenantUploadUsage` row (an UPDATE that changes nothing, as `claim_quota` takes it: PostgreSQL
    locks the row, SQLite its one writer), so two uploads never both take the last slot."""
    now = now or utcnow()
    usage, check = TenantUploadUsage, TenantUploadCheck
    with Session(engine) as s:
        for _attempt in range(5):
            held = s.exec(update(usage).where(usage.org_id == org_id).values(stored_rows=usage.stored_rows)
                          .execution_options(synchronize_session=False)).rowcount
            if not held:   # the organization's first upload: make its row, then take it
                s.add(usage(org_id=org_id, stored_bytes=0, stored_rows=0))
                try:
                    s.commit()
                except IntegrityError:
                    s.rollback()
                continue
            running = s.exec(select(func.count()).select_from(check).where(
                check.org_id == org_id, check.finished_at.is_(None), check.lease_until > now)).one()
            started = list(s.exec(select(check.started_at).where(
                check.org_id == org_id, check.started_at > now - RATE_WINDOW).order_by(check.started_at)).all())
            refusal = admission_refusal(started, running, settings, now)
            if refusal is not None:
                s.rollback()
                raise refusal
            s.exec(delete(check).where(check.org_id == org_id, check.started_at <= now - RATE_WINDOW,
                                       or_(check.finished_at.is_not(None), check.lease_until <= now)))
            row = check(org_id=org_id, user_id=user_id, started_at=now,
                        lease_until=now + timedelta(seconds=UPLOAD_LEASE_SECONDS))
            s.add(row)
            s.commit()
            return row.id
    raise PdaoError(409, "concurrent_change", "Other uploads of your organization started at the same time; send it "
                    "again.", "贵机构的其他上传同时开始，请重新上传。")


def renew_upload(engine: Engine, check_id: int, now: datetime | None = None) -> None:
    """Extend a running upload's lease (`UPLOAD_LEASE_SECONDS` from now)."""
    now = now or utcnow()
    c = TenantUploadCheck
    with Session(engine) as s:
        s.exec(update(c).where(c.id == check_id, c.finished_at.is_(None))
               .values(lease_until=now + timedelta(seconds=UPLOAD_LEASE_SECONDS))
               .execution_options(synchronize_session=False))
        s.commit()


def finish_upload(engine: Engine, check_id: int, now: datetime | None = None) -> None:
    """The upload is over (stored or refused): its slot is free; it still counts against the rate."""
    c = TenantUploadCheck
    with Session(engine) as s:
        s.exec(update(c).where(c.id == check_id, c.finished_at.is_(None)).values(finished_at=now or utcnow())
               .execution_options(synchronize_session=False))
        s.commit()


class UploadSlot:
    """One admitted upload (`admit_upload`), its lease renewed by a thread of its own until
    `release()`. If releasing fails, the lease runs out by itself."""

    def __init__(self, engine: Engine, check_id: int) -> None:
        self.engine, self.check_id = engine, check_id
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._renew, name=f"upload-lease-{check_id}", daemon=True)
        self._beat.start()

    @classmethod
    def take(cls, engine: Engine, settings: Settings, org_id: int, user_id: int) -> UploadSlot:
        return cls(engine, admit_upload(engine, settings, org_id, user_id))

    def _renew(self) -> None:
        while not self._stop.wait(UPLOAD_LEASE_SECONDS / 4):
            try:
                renew_upload(self.engine, self.check_id)
            except Exception:  # noqa: BLE001 - the lease then runs out: the slot is freed, never held
                log.warning("could not renew upload check %s", self.check_id, exc_info=True)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            finish_upload(self.engine, self.check_id)
        except Exception:  # noqa: BLE001
            log.warning("could not finish upload check %s; its lease will run out", self.check_id, exc_info=True)

    def __enter__(self) -> UploadSlot:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def store_upload(session: Session, settings: Settings, *, org: Organization, user_id: int, schema: UploadSchema,
                 src: Path, note: str = "", today: date | None = None) -> tuple[TenantUpload, UploadReport]:
    """Check `src` against `schema` and keep it as the next version of `schema.name` in the
    tenant's own space (committed), within the organization's quota. The caller has checked the
    schema's join targets."""
    limit = quota_limits(settings)
    used = upload_usage(session, org.id)
    if not fits_quota(used, Usage(1, 1), limit):   # full already: not worth reading the file
        raise quota_exceeded(used, Usage(0, 0), limit)
    tmp, report = write_upload(settings, src, schema, today)
    try:
        digest = _sha256(tmp)
        adding = Usage(tmp.stat().st_size, report.row_count)   # the stored file is this one, linked
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", org.code) or ".." in org.code:
            raise ValueError(f"organization code {org.code!r} cannot name a folder")
        folder = tenants_dir(settings) / org.code / "uploads" / schema.name
        folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(20):
            final: Path | None = None
            try:
                # first the quota: its UPDATE makes this organization's uploads take turns, so the
                # version number read next is not taken by a concurrent upload of the same name
                claim_quota(session, org.id, adding, limit)
                number = session.exec(select(func.max(TenantUpload.version)).where(
                    TenantUpload.org_id == org.id, TenantUpload.name == schema.name)).one() or 0
                while final is None:   # step over a file a crashed upload left
                    number += 1
                    final = folder / f"v{number}-{digest[:12]}.parquet"
                    try:
                        os.link(tmp, final)
                    except FileExistsError:
                        final = None
                os.chmod(final, 0o444)
                row = TenantUpload(org_id=org.id, name=schema.name, version=number,
                                   columns=[c.as_dict() for c in schema.columns], format=report.format,
                                   row_count=report.row_count, size_bytes=final.stat().st_size, sha256=digest,
                                   storage_path=str(final.relative_to(settings.home)), warnings=report.warnings,
                                   note=note[:MAX_NOTE], uploaded_by=user_id)
                session.add(row)
                session.commit()
            except IntegrityError:   # a concurrent upload took the number: again
                session.rollback()
                if final is not None:
                    final.unlink(missing_ok=True)
                continue
            except BaseException:
                session.rollback()
                if final is not None:
                    final.unlink(missing_ok=True)
                raise
            session.refresh(row)
            return row, report
    finally:
        tmp.unlink(missing_ok=True)
    raise PdaoError(409, "concurrent_change", "Another upload of this table was stored at the same time; send it "
                    "again.", "同一表的另一次上传同时写入，请重新上传。")


# ---------------------------------------------------------------------------------------------
# Who sees what, and the integrator's API

def upload_scope(role: Role, org_id: int, org_kind: str) -> int | None | bool:
    """Which uploads a caller may see (metadata only, never cells): an org id (its own
    organization's: anyone tenant-scoped, i.e. an applicant or anyone in a company, a company's own
    reviewer included), None (every tenant's: the office, reviewers and auditors outside companies),
    or False (none: providers, operators)."""
    r = access.reach(role, org_kind, "upload")
    return org_id if r is access.OWN else None if r is access.ALL else False


def visible_uploads(session: Session, role: Role, org_id: int, org_kind: str, *, name: str | None = None,
                    org_code: str | None = None) -> list[tuple[TenantUpload, str]]:
    """(upload, org code) the caller may see, by org, name, version."""
    scope = upload_scope(role, org_id, org_kind)
    if scope is False:
        return []
    stmt = select(TenantUpload, Organization.code).join(Organization, Organization.id == TenantUpload.org_id)
    if scope is not None:
        stmt = stmt.where(TenantUpload.org_id == scope)
    if name is not None:
        stmt = stmt.where(TenantUpload.name == name)
    if org_code is not None:
        stmt = stmt.where(Organization.code == org_code)
    return list(session.exec(stmt.order_by(Organization.code, TenantUpload.name, TenantUpload.version)).all())


def get_versions(session: Session, role: Role, org_id: int, org_kind: str, name: str, org_code: str | None = None
                 ) -> list[tuple[TenantUpload, str]]:
    """Every version of one table the caller may see; 404 for a name it may not see, exactly like
    one that does not exist."""
    rows = visible_uploads(session, role, org_id, org_kind, name=name, org_code=org_code)
    if not rows:
        raise not_found("Upload", "上传数据")
    return rows


def latest_upload(session: Session, org_id: int, name: str) -> TenantUpload | None:
    """The newest version of the tenant's table `name`, or None."""
    return session.exec(select(TenantUpload).where(TenantUpload.org_id == org_id, TenantUpload.name == name)
                        .order_by(TenantUpload.version.desc())).first()


def tenant_upload_columns(session: Session, org_id: int) -> dict[str, list[str]]:
    """name -> the columns of its newest version, for `sandbox.engine.sql.check_query(..., uploads=...)`."""
    out: dict[str, tuple[int, list[str]]] = {}
    for u in session.exec(select(TenantUpload).where(TenantUpload.org_id == org_id)).all():
        if u.name not in out or u.version > out[u.name][0]:
            out[u.name] = (u.version, [c["name"] for c in u.columns])
    return {k: v[1] for k, v in sorted(out.items())}


def join_key_of(upload: TenantUpload) -> tuple[str, str]:
    """(the upload's join-key column, the "dataset.code.field" it joins), e.g.
    ("id_number", "health.resident.id_number")."""
    for c in upload.columns:
        if c.get("role") == "join_key":
            return c["name"], c["joins"]
    raise ValueError(f"upload {upload.name} v{upload.version} has no join key")


def upload_roles(upload: TenantUpload) -> dict[str, str]:
    """role -> column for every role but `attribute`, e.g. {"join_key": "id_number", "row_ref":
    "applicant_ref", "consent_ref": …, "consent_valid_from": …, "consent_valid_until": …}: what a
    template's upload contract (sandbox.templates.library.UploadSpec) maps to."""
    return {c["role"]: c["name"] for c in upload.columns if c.get("role", "attribute") != "attribute"}


def split_join_target(target: str) -> tuple[str, str]:
    """"health.resident.id_number" -> ("health.resident", "id_number")."""
    code, _, fname = target.rpartition(".")
    return code, fname


__all__ = ["ColumnSpec", "UploadSchema", "UploadReport", "parse_schema", "parse_schema_text", "check_join_targets",
           "check_upload", "scan_pii", "write_upload", "store_upload", "upload_path", "verify_upload", "upload_scope",
           "visible_uploads", "get_versions", "latest_upload", "tenant_upload_columns", "join_key_of", "upload_roles",
           "split_join_target", "DUCK_TYPES", "Usage", "upload_usage", "claim_quota", "fits_quota", "quota_limits",
           "too_many_rows", "rows_up_to", "values_too_large", "parquet_value_bytes", "cn_id_ok_sql", "phone_ok_sql",
           "pii_prefilter_sql", "parquet_encoding_problems", "PARQUET_ENCODINGS", "CheckClock", "check_time_exceeded",
           "scanned_columns", "scanned_text", "admit_upload", "renew_upload", "finish_upload", "UploadSlot",
           "admission_refusal", "upload_in_progress", "upload_rate_limited"]
