"""The domain store: every dataset version is an immutable Parquet snapshot under PDAO_HOME/domain.

`load_version` checks a file against the dataset's descriptor (columns, types, nulls, value
domains) with DuckDB, refuses it whole with a report, or writes a canonical snapshot, hashes it
and records it in the catalog. A new version never rewrites an old one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, func, select

from catalog.models import Dataset, DatasetField, DatasetVersion
from catalog.service import concurrent_change, dataset_fields, find_dataset, is_write_conflict
from pdao.kernel.config import Settings
from pdao.kernel.errors import PdaoError, conflict, invalid

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


# Each row's rank among its person's rows (snapshots of datasets with a privacy unit).
RANK_COLUMN = "__pdao_rank"


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
    # Casts between aware and naive timestamps use the session time zone, which DuckDB takes from
    # the server: pinned, so the same file gives the same snapshot bytes on every server.
    con.execute("SET TimeZone='UTC'")
    return con


_GLOB_CHARS = re.compile(r"[*?\[]")


def duck_path(path: Path) -> str:
    """A path as a DuckDB file-reader argument that is read literally: DuckDB treats `*`, `?` and
    `[` as a glob (it has no option to turn that off), so each is escaped as a one-character class."""
    return _GLOB_CHARS.sub(lambda m: f"[{m.group(0)}]", str(path))


def stage_source(settings: Settings, src: Path) -> Path:
    """A name in staging for `src` that has no glob characters (the user's file name may have
    them, e.g. `visits[2024].csv` or `*.parquet`, and would make DuckDB read other files): a
    symbolic link (cheap, any file system, and its own fresh mtime so the staging sweep leaves it
    alone), else a hard link, else a copy. The caller removes it."""
    staged = settings.staging_dir / f"src-{uuid.uuid4().hex}"
    target = src.resolve()
    for make in (os.symlink, os.link, shutil.copyfile):
        try:
            make(target, staged)
            return staged
        except OSError:
            staged.unlink(missing_ok=True)
    raise invalid("version_invalid", "The file cannot be read; nothing was loaded.", "无法读取该文件，未加载任何数据。",
                  details={"format": "unknown", "problems": [{"check": "readable", "message": "the file cannot be read"}],
                           "warnings": []})


def _bind_source(con: duckdb.DuckDBPyConnection, path: Path, fmt: str) -> None:
    lit = quote_literal(duck_path(path))
    if fmt == "parquet":
        con.execute(f"CREATE VIEW src AS SELECT * FROM read_parquet({lit})")
    else:
        con.execute(f"CREATE VIEW src AS SELECT * FROM read_csv({lit}, header=true, all_varchar=true, auto_detect=true)")


def _base_type(t: str) -> str:
    return t.split("(")[0].strip().upper()


_PLAIN_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
ROW = "__pdao_row"  # the internal row-number alias; descriptor names start with a letter, so never a field


def _unreadable(fmt: str) -> dict[str, Any]:
    # DuckDB's message names server paths and may quote the file: not passed on.
    return {"check": "readable", "message": f"the file cannot be read as {fmt}"}


def _typed(col: str, ftype: str, src_type: str, *, strict: bool = False) -> str:
    """The SQL that turns source column `col` (of DuckDB type `src_type`) into the field's type:
    TRY_CAST for checking, CAST (`strict`) for writing. Text timestamps go through TIMESTAMPTZ,
    so an offset (`10:00+08:00`) is honoured and the stored value is UTC."""
    cast = "CAST" if strict else "TRY_CAST"
    if ftype == "timestamp" and _base_type(src_type) == "VARCHAR":
        return f"{cast}({cast}({col} AS TIMESTAMPTZ) AS TIMESTAMP)"
    return f"{cast}({col} AS {DUCK_TYPES[ftype]})"


def _bound_literal(ftype: str, value: Any) -> str:
    """A bound as a SQL literal the field's type parses exactly (no exponent notation)."""
    if ftype == "integer":
        text = str(int(value))
    elif ftype == "decimal":
        text = format(Decimal(repr(float(value))), "f")
    else:
        text = str(value)
    return f"CAST({quote_literal(text)} AS {DUCK_TYPES[ftype]})"


_TYPE_WORDS = {
    "integer": "integer (a whole number in the BIGINT range)",
    "decimal": "decimal (at most 2 decimal places, |x| < 10^16: DECIMAL(18,2))",
}


def _type_problem_condition(col: str, ftype: str, src_type: str) -> str | None:
    """Non-null values that are not a valid `ftype`, or would change on the way in (rounded)."""
    base = _base_type(src_type)
    typed = _typed(col, ftype, src_type)
    if base == "VARCHAR":
        if ftype == "string":
            return None
        bad = f"{typed} IS NULL"
        if ftype in ("integer", "decimal"):
            # TRY_CAST rounds ('1.5' -> 2, '99.999' -> 100.00): compare with an exact reading, and
            # catch digits beyond what that reading holds.
            bad += (f" OR TRY_CAST({col} AS DECIMAL(38,10)) <> {typed}"
                    f" OR regexp_matches({col}, '[.][0-9]{{10}}0*[1-9]')")
        return f"{col} IS NOT NULL AND ({bad})"
    if ftype in ("integer", "decimal") and base in _NUMERIC_SOURCES:
        # e.g. DOUBLE 99.999 or DECIMAL(10,3) into DECIMAL(18,2), UBIGINT beyond BIGINT
        bad = f"{typed} IS NULL OR CAST({typed} AS {src_type}) <> {col}"
        if ftype == "decimal" and base in ("DOUBLE", "FLOAT", "REAL"):
            # beyond 2^53 / 100 a binary float no longer holds every cent, and the round trip above
            # can hide a rounded value (6222021234567894.0 stored as …893.76): refused, never changed
            bad += f" OR abs({col}) >= 9.0e13"
        return f"{col} IS NOT NULL AND ({bad})"
    return None


def check_file(con: duckdb.DuckDBPyConnection, path: Path, fmt: str, fields: list[DatasetField]) -> FileReport:
    """Bind `path` as the view `src` and compare it with the descriptor's fields, in one pass over
    the data for all value checks. `path` is read literally (`duck_path`); loads pass a staged
    name without glob characters (`stage_source`) all the same."""
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

    # One pass computes every per-field count. Conditions name columns qualified by `s`, the
    # source's alias, so that no field name can collide with the row-number alias.
    exprs = ["count(*)"]
    checks: list[tuple[DatasetField, str, str]] = []
    for f in fields:
        col = f"s.{quote_ident(f.name)}"
        src_type = src_types[f.name]
        typed = _typed(col, f.type, src_type)
        bad_type = _type_problem_condition(col, f.type, src_type)
        if bad_type:
            checks.append((f, "type", bad_type))
        if not f.nullable:
            checks.append((f, "null", f"{col} IS NULL"))
        if f.domain:
            values = ", ".join(quote_literal(v) for v in f.domain)
            checks.append((f, "domain", f"{col} IS NOT NULL AND {col} NOT IN ({values})"))
        if f.bounds and f.type != "string":
            lo, hi = (_bound_literal(f.type, f.bounds[k]) for k in ("min", "max"))
            checks.append((f, "bounds", f"{typed} < {lo} OR {typed} > {hi}"))
    exprs += [f"count(*) FILTER (WHERE {cond})" for _, _, cond in checks]
    try:
        counts = con.execute(f"SELECT {', '.join(exprs)} FROM src AS s").fetchone()
    except duckdb.Error:
        report.problems.append(_unreadable(fmt))
        return report
    report.row_count = counts[0]
    for (f, kind, cond), n in zip(checks, counts[1:], strict=True):
        if not n:
            continue
        # Data rows, 1-based, in file order (a quoted CSV value may span lines, so never lines).
        rows = [r[0] for r in con.execute(
            f"SELECT {ROW} FROM (SELECT row_number() OVER () AS {ROW}, s.* FROM src AS s) AS s WHERE {cond} "
            f"ORDER BY {ROW} LIMIT {MAX_EXAMPLES}").fetchall()]
        item: dict[str, Any] = {"check": kind, "column": f.name, "count": n, "first_rows": rows}
        if kind == "type":
            item["message"] = f"{n} value(s) of '{f.name}' are not a valid {_TYPE_WORDS.get(f.type, f.type)}"
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


def write_snapshot(settings: Settings, src: Path, fields: list[DatasetField], dataset_code: str,
                   privacy_unit: str | None = None) -> tuple[Path, FileReport]:
    """Check `src` against `fields` and write the canonical Parquet snapshot to staging (the caller
    removes it). Refuses the file whole (422 version_invalid) with a report. Touches no database.

    With a privacy unit, the snapshot also holds `RANK_COLUMN`: each row's rank (1, 2, …) among its
    person's rows, in an order fixed by the row's content, and the rows are stored by rank. The
    engine bounds contributions with a `rank <= k` filter that skips whole row groups, instead of
    ranking at every query (~25× the scan, stack-facts)."""
    settings.ensure_home()
    fmt = sniff_format(src)
    tmp = settings.staging_dir / f"load-{uuid.uuid4().hex}.parquet"
    ranked = tmp.with_suffix(".ranked.parquet")   # the first of two passes (privacy unit only)
    staged = stage_source(settings, src)
    con: duckdb.DuckDBPyConnection | None = None
    try:
        con = _connect(settings)
        report = check_file(con, staged, fmt, fields)
        if report.problems:
            raise invalid("version_invalid",
                          f"The file does not match the descriptor of '{dataset_code}' "
                          f"({len(report.problems)} problem(s)); nothing was loaded.",
                          f"文件与数据集 {dataset_code} 的描述不符（{len(report.problems)} 处问题），未加载任何数据。",
                          details={"format": fmt, "problems": report.problems, "warnings": report.warnings})
        src_types = {r[0]: r[1] for r in con.execute("DESCRIBE src").fetchall()}
        select_list = ", ".join(f"{_typed(quote_ident(f.name), f.type, src_types[f.name], strict=True)} "
                                f"AS {quote_ident(f.name)}" for f in fields)
        body = f"SELECT {select_list} FROM src"
        if privacy_unit is not None:
            # hash(t): the whole row, so the order (and which rows a bound keeps) depends on the
            # rows alone, never on their position in the file.
            body = (f"SELECT t.*, row_number() OVER (PARTITION BY t.{quote_ident(privacy_unit)} ORDER BY hash(t)) "
                    f"AS {quote_ident(RANK_COLUMN)} FROM ({body}) AS t")
        try:
            if privacy_unit is None:
                con.execute(f"COPY ({body}) TO {quote_literal(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
            else:
                # Two passes: the window, then the sort (both at once outgrow the memory limit at
                # 100M rows). Sorted by rank first, the rows a bound of k keeps come first, so
                # Parquet's row-group statistics let the engine skip the rest (a bounded aggregate
                # reads ~40% of a 10M-row snapshot). A total order: the same file gives the same
                # snapshot bytes (and hash) every time.
                con.execute(f"COPY ({body}) TO {quote_literal(str(ranked))} (FORMAT parquet, COMPRESSION zstd)")
                con.execute(f"COPY (SELECT * FROM read_parquet({quote_literal(duck_path(ranked))}) "
                            f"ORDER BY {quote_ident(RANK_COLUMN)}, {quote_ident(privacy_unit)}) "
                            f"TO {quote_literal(str(tmp))} (FORMAT parquet, COMPRESSION zstd)")
        except duckdb.Error:
            tmp.unlink(missing_ok=True)
            raise invalid("version_invalid", "The file cannot be read; nothing was loaded.",
                          "无法读取该文件，未加载任何数据。",
                          details={"format": fmt, "problems": [_unreadable(fmt)], "warnings": []}) from None
    finally:
        if con is not None:
            con.close()
        staged.unlink(missing_ok=True)
        ranked.unlink(missing_ok=True)
    return tmp, report


def _check_relevant(fields: list[DatasetField]) -> list[tuple]:
    """What of the fields a file was checked against (and its snapshot written for)."""
    return [(f.name, f.type, f.nullable, f.domain, f.bounds) for f in fields]


def descriptor_changed(code: str) -> PdaoError:
    return conflict("descriptor_changed",
                    f"The descriptor of '{code}' changed while the file was being checked; nothing was loaded. "
                    "Load the file again.",
                    f"数据集 {code} 的描述在检查文件期间发生了变化，未加载任何数据；请重新加载。")


def load_version(session: Session, settings: Settings, dataset_code: str, src: Path, *, env: str = "prod",
                 source: str = "cli", note: str = "", loaded_by: int | None = None) -> tuple[DatasetVersion, FileReport]:
    """Check `src` against the descriptor and add it as the next immutable version (committed).

    The version is recorded only if the dataset's descriptor is still the one the file was checked
    against (409 `descriptor_changed` otherwise, nothing kept); a concurrent writer that wins the
    dataset row makes it 409 `concurrent_change`."""
    if env not in ENVS:
        raise invalid("invalid_env", f"env must be one of {', '.join(ENVS)}.", f"env 只能是 {', '.join(ENVS)}。")
    ds = find_dataset(session, dataset_code)
    # The revision first, then the fields: if the fields read are newer than the revision, the
    # conditional UPDATE in _register sees a changed revision and compares again.
    checked_revision = session.exec(select(Dataset.revision).where(Dataset.id == ds.id)).one()
    fields = dataset_fields(session, ds.id)
    tmp, report = write_snapshot(settings, src, fields, dataset_code, ds.privacy_unit)
    try:
        digest = _sha256(tmp)
        return _register(session, settings, ds, tmp, digest, report, checked_revision, _check_relevant(fields),
                         env=env, source=source, note=note, loaded_by=loaded_by), report
    finally:
        tmp.unlink(missing_ok=True)


def _claim_revision(session: Session, ds: Dataset, revision: int, checked: list[tuple]) -> int:
    """Count the new version on the dataset row, only while its descriptor is still what the file
    was checked against. Answers the revision recorded. Holds the row (PostgreSQL) or the
    database's write lock (SQLite) until the caller's commit or rollback, so no descriptor change
    can come between."""
    for _ in range(10):
        done = session.exec(update(Dataset).where(Dataset.id == ds.id, Dataset.revision == revision)
                            .values(version_count=Dataset.version_count + 1)
                            .execution_options(synchronize_session=False)).rowcount
        if done == 1:
            return revision
        # The descriptor changed since the check. A change of titles or masking leaves the file as
        # valid as it was: count it against the new revision. Anything the check used: refuse.
        current = session.exec(select(Dataset.revision).where(Dataset.id == ds.id)).one()
        if _check_relevant(dataset_fields(session, ds.id)) != checked:
            raise descriptor_changed(ds.code)
        revision = current
    raise concurrent_change(ds.code)


def _link_snapshot(tmp: Path, folder: Path, number: int, digest: str) -> Path | None:
    """Give the staged snapshot its final read-only name; None if the name is taken (a crashed
    load's file): a snapshot is never overwritten."""
    final = folder / f"v{number}-{digest[:12]}.parquet"
    try:
        os.link(tmp, final)
    except FileExistsError:
        return None
    os.chmod(final, 0o444)
    return final


def _register(session: Session, settings: Settings, ds: Dataset, tmp: Path, digest: str, report: FileReport,
              checked_revision: int, checked: list[tuple], *, env: str, source: str, note: str,
              loaded_by: int | None) -> DatasetVersion:
    folder = settings.domain_dir / ds.code / env
    folder.mkdir(parents=True, exist_ok=True)
    for _attempt in range(20):
        final: Path | None = None
        try:
            revision = _claim_revision(session, ds, checked_revision, checked)
            # Read after the claim: concurrent loaders of this dataset are serialized on its row,
            # so this sees every version committed before.
            number = session.exec(select(func.max(DatasetVersion.number)).where(
                DatasetVersion.dataset_id == ds.id, DatasetVersion.env == env)).one() or 0
            while final is None:  # step over files a crashed loader left
                number += 1
                final = _link_snapshot(tmp, folder, number, digest)
            version = DatasetVersion(dataset_id=ds.id, env=env, number=number, dataset_revision=revision,
                                     row_count=report.row_count, size_bytes=final.stat().st_size, sha256=digest,
                                     storage_path=str(final.relative_to(settings.domain_dir)), source=source,
                                     note=note, loaded_by=loaded_by)
            session.add(version)
            session.commit()
        except IntegrityError:  # the number was taken after all: again, from the claim
            session.rollback()
            if final is not None:
                final.unlink(missing_ok=True)
            continue
        except BaseException as e:
            session.rollback()
            if final is not None:
                final.unlink(missing_ok=True)
            if isinstance(e, DBAPIError) and is_write_conflict(session, e):
                raise concurrent_change(ds.code) from None
            raise
        session.refresh(version)
        return version
    raise concurrent_change(ds.code)


def snapshot_path(settings: Settings, version: DatasetVersion) -> Path:
    """Where a version's snapshot lives (for the sandbox engine only)."""
    return settings.domain_dir / version.storage_path


def verify_snapshot(settings: Settings, version: DatasetVersion) -> str:
    """`ok`, `missing` or `altered`: does the snapshot still hash to what the catalog recorded?
    File modes keep honest processes out; the hash catches everything else (root included)."""
    path = snapshot_path(settings, version)
    if not path.is_file():
        return "missing"
    return "ok" if _sha256(path) == version.sha256 else "altered"
