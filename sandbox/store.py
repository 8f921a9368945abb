"""The domain store: every dataset version is an immutable Parquet snapshot under PDAO_HOME/domain.

`load_version` checks a file against the dataset's descriptor (columns, types, nulls, value
domains) with DuckDB, refuses it whole with a report, or writes a canonical snapshot, hashes it
and records it in the catalog. A new version never rewrites an old one.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from catalog.models import Dataset, DatasetField, DatasetVersion
from catalog.service import dataset_fields, find_dataset
from pdao.config import Settings
from pdao.errors import invalid

ENVS = ("prod", "dev")

DUCK_TYPES = {
    "string": "VARCHAR",
    "integer": "BIGINT",
    "float": "DOUBLE",
    "decimal": "DECIMAL(18,2)",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
    "boolean": "BOOLEAN",
}

_INTEGER_SOURCES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                    "UINTEGER", "UBIGINT"}
_NUMERIC_SOURCES = _INTEGER_SOURCES | {"FLOAT", "DOUBLE", "DECIMAL"}
# Which source column types may become which field type. VARCHAR (CSV, or strings in Parquet) is
# accepted everywhere and checked value by value.
_COMPATIBLE = {
    "string": {"VARCHAR"},
    "integer": _INTEGER_SOURCES | {"VARCHAR"},
    "float": _NUMERIC_SOURCES | {"VARCHAR"},
    "decimal": _NUMERIC_SOURCES | {"VARCHAR"},
    "date": {"DATE", "VARCHAR"},
    "timestamp": {"TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S", "DATE",
                  "VARCHAR"},
    "boolean": {"BOOLEAN", "VARCHAR"},
}

MAX_EXAMPLES = 5


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class FileReport:
    """What a data file looks like against a descriptor. Empty `problems` means it may be loaded.

    A report says where the problems are (descriptor columns, counts, line or row numbers) and
    never what is in the cells: it goes back to the uploader and into logs, and a wrong value in a
    category column, a reader error quoting the file or a CSV whose first line is data would
    otherwise carry personal data out of the domain."""

    format: str
    row_count: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)


def sniff_format(path: Path) -> str:
    with path.open("rb") as f:
        return "parquet" if f.read(4) == b"PAR1" else "csv"


def _connect(settings: Settings) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"threads": 2, "memory_limit": "1GB",
                                 "temp_directory": str(settings.staging_dir / "duckdb-tmp")})
    return con


def _bind_source(con: duckdb.DuckDBPyConnection, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        con.execute(f"CREATE VIEW src AS SELECT * FROM read_parquet({quote_literal(str(path))})")
    else:
        con.execute(f"CREATE VIEW src AS SELECT * FROM read_csv({quote_literal(str(path))}, header=true, "
                    "all_varchar=true, auto_detect=true)")


def _base_type(t: str) -> str:
    return t.split("(")[0].strip().upper()


_PLAIN_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _unreadable(fmt: str) -> dict[str, Any]:
    # DuckDB's message names server paths and may quote the file: not passed on.
    return {"check": "readable", "message": f"the file cannot be read as {fmt}"}


def check_file(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, fields: list[DatasetField]) -> FileReport:
    """Bind `path` as the view `src` and compare it with the descriptor's fields, in one pass over
    the data for all value checks."""
    report = FileReport(format=fmt)
    try:
        _bind_source(con, path, fmt)
        described = con.execute("DESCRIBE src").fetchall()
    except duckdb.Error:
        report.problems.append(_unreadable(fmt))
        return report
    src_types = {row[0]: row[1] for row in described}
    wanted = [f.name for f in fields]
    missing = [n for n in wanted if n not in src_types]
    extra = [n for n in src_types if n not in wanted]
    if missing and len(missing) == len(wanted):
        report.problems.append({"check": "columns", "columns": missing,
                                "message": "none of the descriptor's columns is in the file; it needs a header "
                                           f"line naming them: {', '.join(wanted)}"})
        return report
    if missing:
        report.problems.append({"check": "columns", "message": f"missing columns: {', '.join(missing)}",
                                "columns": missing})
    if extra:
        shown = [n for n in extra if _PLAIN_COLUMN.fullmatch(n)]
        hidden = f" and {len(extra) - len(shown)} more" if len(shown) < len(extra) else ""
        report.problems.append({"check": "columns", "columns": shown,
                                "message": f"columns not in the descriptor: {', '.join(shown) or '-'}{hidden}"})
    for f in fields:
        if f.name in src_types and _base_type(src_types[f.name]) not in _COMPATIBLE[f.type]:
            report.problems.append({"check": "type", "column": f.name,
                                    "message": f"column '{f.name}' is {src_types[f.name]}, the descriptor says {f.type}"})
    if report.problems:
        return report

    # One pass computes every per-field count.
    exprs = ["count(*)"]
    checks: list[tuple[DatasetField, str, str]] = []
    for f in fields:
        col, typed = quote_ident(f.name), f"TRY_CAST({quote_ident(f.name)} AS {DUCK_TYPES[f.type]})"
        if _base_type(src_types[f.name]) == "VARCHAR" and f.type != "string":
            checks.append((f, "type", f"{col} IS NOT NULL AND {typed} IS NULL"))
        if not f.nullable:
            checks.append((f, "null", f"{col} IS NULL"))
        if f.domain:
            values = ", ".join(quote_literal(v) for v in f.domain)
            checks.append((f, "domain", f"{col} IS NOT NULL AND {col} NOT IN ({values})"))
        if f.bounds and f.type != "string":
            lo, hi = (quote_literal(str(f.bounds[k])) for k in ("min", "max"))
            checks.append((f, "bounds", f"{typed} < CAST({lo} AS {DUCK_TYPES[f.type]}) OR "
                                        f"{typed} > CAST({hi} AS {DUCK_TYPES[f.type]})"))
    exprs += [f"count(*) FILTER (WHERE {cond})" for _, _, cond in checks]
    try:
        counts = con.execute(f"SELECT {', '.join(exprs)} FROM src").fetchone()
    except duckdb.Error:
        report.problems.append(_unreadable(fmt))
        return report
    report.row_count = counts[0]
    first_line = 2 if fmt == "csv" else 1  # CSV: line 1 is the header
    for (f, kind, cond), n in zip(checks, counts[1:], strict=True):
        if not n:
            continue
        rows = [r[0] for r in con.execute(
            f"SELECT rn FROM (SELECT row_number() OVER () - 1 + {first_line} AS rn, * FROM src) WHERE {cond} "
            f"ORDER BY rn LIMIT {MAX_EXAMPLES}").fetchall()]
        item: dict[str, Any] = {"check": kind, "column": f.name, "count": n,
                                ("first_lines" if fmt == "csv" else "first_rows"): rows}
        if kind == "type":
            item["message"] = f"{n} value(s) of '{f.name}' are not a valid {f.type}"
        elif kind == "null":
            item["message"] = f"{n} row(s) have no value for '{f.name}', which may not be empty"
        elif kind == "domain":
            item["message"] = f"{n} value(s) of '{f.name}' are outside its value domain"
        else:
            item["message"] = (f"{n} value(s) of '{f.name}' fall outside the bounds "
                               f"[{f.bounds['min']}, {f.bounds['max']}]; they will be clamped in analyses")
        (report.warnings if kind == "bounds" else report.problems).append(item)
    return report


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_version(session: Session, settings: Settings, dataset_code: str, src: Path, *, env: str = "prod",
                 source: str = "cli", note: str = "", loaded_by: int | None = None) -> tuple[DatasetVersion, FileReport]:
    """Check `src` against the descriptor and add it as the next immutable version (committed)."""
    if env not in ENVS:
        raise invalid("invalid_env", f"env must be one of {', '.join(ENVS)}.", f"env 只能是 {', '.join(ENVS)}。")
    ds = find_dataset(session, dataset_code)
    fields = dataset_fields(session, ds.id)
    settings.ensure_home()
    fmt = sniff_format(src)
    tmp = settings.staging_dir / f"load-{uuid.uuid4().hex}.parquet"
    con = _connect(settings)
    try:
        report = check_file(con, src, fmt, fields)
        if report.problems:
            raise invalid("version_invalid",
                          f"The file does not match the descriptor of '{dataset_code}' "
                          f"({len(report.problems)} problem(s)); nothing was loaded.",
                          f"文件与数据集 {dataset_code} 的描述不符（{len(report.problems)} 处问题），未加载任何数据。",
                          details={"format": fmt, "problems": report.problems, "warnings": report.warnings})
        select_list = ", ".join(f"CAST({quote_ident(f.name)} AS {DUCK_TYPES[f.type]}) AS {quote_ident(f.name)}"
                                for f in fields)
        try:
            con.execute(f"COPY (SELECT {select_list} FROM src) TO {quote_literal(str(tmp))} "
                        "(FORMAT parquet, COMPRESSION zstd)")
        except duckdb.Error:
            tmp.unlink(missing_ok=True)
            raise invalid("version_invalid", "The file cannot be read; nothing was loaded.",
                          "无法读取该文件，未加载任何数据。",
                          details={"format": fmt, "problems": [_unreadable(fmt)], "warnings": []}) from None
    finally:
        con.close()
    try:
        digest = _sha256(tmp)
        return _register(session, settings, ds, tmp, digest, report, env=env, source=source, note=note,
                         loaded_by=loaded_by), report
    finally:
        tmp.unlink(missing_ok=True)


def _register(session: Session, settings: Settings, ds: Dataset, tmp: Path, digest: str, report: FileReport, *,
              env: str, source: str, note: str, loaded_by: int | None) -> DatasetVersion:
    folder = settings.domain_dir / ds.code / env
    folder.mkdir(parents=True, exist_ok=True)
    number = session.exec(select(func.max(DatasetVersion.number)).where(
        DatasetVersion.dataset_id == ds.id, DatasetVersion.env == env)).one() or 0
    for _attempt in range(20):  # another loader (or a crashed one's file) may hold the next number
        number += 1
        final = folder / f"v{number}-{digest[:12]}.parquet"
        try:
            os.link(tmp, final)  # fails if the name exists: a snapshot is never overwritten
        except FileExistsError:
            continue
        os.chmod(final, 0o444)
        version = DatasetVersion(dataset_id=ds.id, env=env, number=number, dataset_revision=ds.revision,
                                 row_count=report.row_count, size_bytes=final.stat().st_size, sha256=digest,
                                 storage_path=str(final.relative_to(settings.domain_dir)), source=source,
                                 note=note, loaded_by=loaded_by)
        session.add(version)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            final.unlink(missing_ok=True)
            continue
        session.refresh(version)
        return version
    raise RuntimeError("could not allocate a version number")  # pragma: no cover


def snapshot_path(settings: Settings, version: DatasetVersion) -> Path:
    """Where a version's snapshot lives (for the sandbox engine only)."""
    return settings.domain_dir / version.storage_path
