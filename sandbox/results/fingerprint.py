"""Stamping exported files and tracing a file found outside (issue #5, parts 3 and 5). Pure functions:
bytes and tables in, values out; no database, no settings, no clock.

Two keyed values tie a downloaded file to its export:

* the **content fingerprint** (`content_fingerprint`): HMAC-SHA256, keyed by a server-derived key,
  over the sorted digests of the table's rows, every cell first reduced to a *canonical string*
  (`canonical_rows`). It ignores the header, the column names, the row order and everything a
  spreadsheet or pandas does to a file when it re-saves it (encoding, BOM, line ends, quoting, number
  formatting, `TRUE`/`True`/`true`, `2024/3/1` for `2024-03-01` …), so a file whose header and
  comment were stripped still names its result as long as the cells are intact.
* the **export stamp** (`export_stamp`): HMAC over the export id and the content fingerprint, written
  into the file (a `#` comment line in CSV, the `pdao` schema metadata key in Parquet, the `export`
  field in JSON). Only the server can compute it, so a stamp that was edited (another export id)
  fails `verify_stamp`.

A found file is read by `read_found` into candidate row sets (with and without a header row, with and
without a pandas index column …); `match_candidates` gives the content fingerprints to look up.
`similarity` is the fallback for a file whose numbers lost digits (Excel's "General" format keeps
only about 10 significant digits when it saves a CSV): it compares a found file with one stored
result, numbers within a relative tolerance.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import hmac
import io
import itertools
import json
import math
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, ROUND_UP, Context, Decimal
from functools import lru_cache
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

__all__ = [
    "SIGNIFICANT_DIGITS", "MAX_FOUND_BYTES", "MAX_FOUND_ROWS", "FoundFileError", "Found",
    "derive_key", "canonical_cell", "canonical_rows", "normalize_rows", "row_digest", "content_fingerprint",
    "export_stamp", "verify_stamp", "csv_bytes", "parquet_bytes", "json_bytes", "write_csv", "write_parquet",
    "write_json", "read_found",
    "match_candidates", "similarity",
]

SIGNIFICANT_DIGITS = 12          # numbers are compared at this many significant digits
MAX_FOUND_BYTES = 64 * 1024 * 1024
MAX_FOUND_ROWS = 1_000_000
_MAX_PARQUET_EXPANDED = 1 << 30
MAX_ALTERNATES = 64              # fingerprints tried per candidate for cells that sit on a rounding midpoint

_CONTENT_TAG = b"pdao-content-v1\x00"
_STAMP_TAG = b"pdao-export-v1\x00"
_SYNTHETIC_NOTICE = "# pdao synthetic: dev twin - not real data / 合成数据（开发孪生库），并非真实数据"


# --------------------------------------------------------------------------------------------- errors

class FoundFileError(ValueError):
    """A found file that cannot be read as a table. `code`, `message`, `message_zh` as in every pdao
    error; the route answers it as 422 (413 for `found_file_too_large`)."""

    def __init__(self, code: str, message: str, message_zh: str, status: int = 422) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.message_zh = message_zh
        self.status = status


def _too_many_rows(max_rows: int) -> FoundFileError:
    return FoundFileError("found_file_too_large", f"The file has more than {max_rows} rows.",
                          f"该文件超过 {max_rows} 行。", status=413)


def _unreadable(what: str, what_zh: str) -> FoundFileError:
    return FoundFileError("found_file_unreadable", f"The file could not be read as a table: {what}.",
                          f"无法将该文件读取为表格：{what_zh}。")


# ----------------------------------------------------------------------------------------------- keys

def derive_key(secret: bytes, purpose: str = "pdao fingerprint v1") -> bytes:
    """A key for one purpose from the server's secret (HMAC-SHA256 of the purpose), so the fingerprint
    key is never the token-signing key itself."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("the secret must be at least 16 bytes")
    return hmac.new(bytes(secret), purpose.encode(), hashlib.sha256).digest()


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ValueError("the fingerprint key must be at least 16 bytes")
    return bytes(key)


# ------------------------------------------------------------------------------------- canonical cells

_CTX = Context(prec=SIGNIFICANT_DIGITS, rounding=ROUND_HALF_EVEN)
_CTX_DOWN = Context(prec=SIGNIFICANT_DIGITS, rounding=ROUND_DOWN)
_CTX_UP = Context(prec=SIGNIFICANT_DIGITS, rounding=ROUND_UP)
_SMALL_INT = 10 ** SIGNIFICANT_DIGITS
_FLOAT_MAX = Decimal(1.7976931348623157e308)

# What pandas' read_csv reads as missing (pandas._libs.parsers.STR_NA_VALUES), so a re-save by pandas,
# which writes them back as empty cells, changes nothing.
_NULL_TEXTS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                         "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_INF = {"inf": "inf", "+inf": "inf", "infinity": "inf", "+infinity": "inf", "-inf": "-inf", "-infinity": "-inf"}
_DATE = r"(\d{4})(?:[-/.](\d{1,2})[-/.](\d{1,2})|年(\d{1,2})月(\d{1,2})日)"
_DATE_RE = re.compile(_DATE, re.ASCII)
_DATETIME_RE = re.compile(_DATE + r"(?:[ T]|\s+)(\d{1,2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?\s*"
                          r"(Z|UTC|[+-]\d{2}(?::?\d{2})?)?", re.ASCII)
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?", re.ASCII)


def _fmt_decimal(d: Decimal) -> str:
    """A finite number rounded to SIGNIFICANT_DIGITS digits, in plain notation without trailing zeros."""
    if d.is_zero():
        return "0"
    r = _CTX.plus(d).normalize(_CTX)
    return format(r, "f")


def _canon_float(x: float) -> str:
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return _fmt_decimal(Decimal(x))   # exact binary value, correctly rounded


def _canon_number(v: Any) -> str:
    # Every number goes through float64 (correctly rounded from an int, a Decimal or a text), so a
    # typed value and the text any writer prints for it meet in the same double.
    if isinstance(v, int) and -_SMALL_INT < v < _SMALL_INT:
        return str(v)
    try:
        return _canon_float(float(v))
    except OverflowError:
        return "inf" if v > 0 else "-inf"


def _fmt_fraction(micro: int) -> str:
    return f".{micro:06d}".rstrip("0") if micro else ""


def _fmt_datetime(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if (value.hour, value.minute, value.second, value.microsecond) == (0, 0, 0, 0):
        return value.date().isoformat()   # a date re-saved as midnight is the same date
    return value.strftime("%Y-%m-%dT%H:%M:%S") + _fmt_fraction(value.microsecond)


def _fmt_time(value: dt.time) -> str:
    return value.strftime("%H:%M:%S") + _fmt_fraction(value.microsecond)


def _micro(digits: str | None) -> int:
    return int((digits or "0")[:6].ljust(6, "0"))


def _parse_temporal(s: str) -> str | None:
    m = _DATE_RE.fullmatch(s)
    if m:
        y, mo, d = int(m[1]), int(m[2] or m[4]), int(m[3] or m[5])
        try:
            return dt.date(y, mo, d).isoformat()
        except ValueError:
            return None
    m = _DATETIME_RE.fullmatch(s)
    if m:
        y, mo, d = int(m[1]), int(m[2] or m[4]), int(m[3] or m[5])
        tz = None
        if m[10]:
            z = m[10]
            if z in ("Z", "UTC"):
                tz = dt.timezone.utc
            else:
                sign = -1 if z[0] == "-" else 1
                hh, mm = int(z[1:3]), int(z[3:].lstrip(":") or 0)
                if hh > 23 or mm > 59:
                    return None
                tz = dt.timezone(sign * dt.timedelta(hours=hh, minutes=mm))
        try:
            value = dt.datetime(y, mo, d, int(m[6]), int(m[7]), int(m[8] or 0), _micro(m[9]), tzinfo=tz)
        except ValueError:
            return None
        return _fmt_datetime(value)
    m = _TIME_RE.fullmatch(s)
    if m:
        try:
            return _fmt_time(dt.time(int(m[1]), int(m[2]), int(m[3] or 0), _micro(m[4])))
        except ValueError:
            return None
    return None


@lru_cache(maxsize=1 << 16)
def _canon_text(raw: str) -> str:
    s = unicodedata.normalize("NFC", raw.strip())
    if s in _NULL_TEXTS:
        return ""
    low = s.lower()
    if low in ("true", "false"):
        return low
    if _NUMBER.fullmatch(s):
        return _canon_number(s)
    if low in _INF:
        return _INF[low]
    if s[0].isdigit():
        t = _parse_temporal(s)
        if t is not None:
            return t
    if s[0] in "[{":
        try:
            parsed = json.loads(s)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, (list, dict)):
            return _json_text(parsed)
    return s.replace("\r\n", "\n").replace("\r", "\n")


@lru_cache(maxsize=1 << 12)
def _midpoint_readings(raw: str) -> tuple[str, str] | None:
    """For a number printed with more digits than we keep and lying exactly halfway between two
    SIGNIFICANT_DIGITS-digit numbers (say a 15-digit Excel value ending in …500), both roundings: the
    file cannot tell which side the original value was on."""
    s = raw.strip()
    if not _NUMBER.fullmatch(s):
        return None
    try:
        d = Decimal(s)
        digits = "".join(map(str, d.as_tuple().digits)).strip("0")
        if len(digits) <= SIGNIFICANT_DIGITS or abs(d.adjusted()) > 400:
            return None
        lo, hi = _CTX_DOWN.plus(d), _CTX_UP.plus(d)
        wide = Context(prec=len(d.as_tuple().digits) + 4)
        if wide.subtract(d, lo) != wide.subtract(hi, d) or abs(hi) > _FLOAT_MAX:
            return None
        return _fmt_decimal(lo), _fmt_decimal(hi)
    except ArithmeticError:     # an exponent beyond any float: such a cell reads as ±inf anyway
        return None


def _json_text(v: Any) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _json_default(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return _fmt_datetime(v)
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return _bytes_text(v)
    return str(v)


def _bytes_text(b: bytes | bytearray) -> str:
    try:
        return bytes(b).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(b).hex()


def canonical_cell(v: Any) -> str:
    """One cell as its canonical string (see the module docstring and `canonical_rows`)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return _canon_text(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return _canon_number(v)
    if isinstance(v, float):
        return _canon_float(v)
    if isinstance(v, Decimal):
        if v.is_nan():
            return ""
        return _canon_number(v)
    if isinstance(v, dt.datetime):
        return _fmt_datetime(v)
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, dt.time):
        return _fmt_time(v)
    if isinstance(v, dt.timedelta):
        return _canon_number(v.total_seconds())     # durations are seconds in every writer here
    if isinstance(v, (bytes, bytearray)):
        return _canon_text(_bytes_text(v))
    if isinstance(v, (list, tuple, dict)):
        return _json_text(v)
    if hasattr(v, "item") and callable(v.item):     # numpy scalars
        try:
            return canonical_cell(v.item())
        except (TypeError, ValueError):
            pass
    return _canon_text(str(v))


def _arrow_values(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """The column with the values `canonical_cell` reads: dictionaries decoded, float32 as text,
    nanoseconds as microseconds."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = t.value_type
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        # the shortest text of the float32 value, as every CSV writer prints it
        return pc.cast(col, pa.string())
    if pa.types.is_timestamp(t) and t.unit == "ns":
        col = pc.cast(col, pa.timestamp("us", t.tz), safe=False)
    elif pa.types.is_time64(t) and t.unit == "ns":
        col = pc.cast(col, pa.time64("us"), safe=False)
    return col


def _column_values(col: pa.ChunkedArray | pa.Array) -> list[Any]:
    return _arrow_values(col).to_pylist()


def canonical_rows(table: pa.Table) -> list[tuple[str, ...]]:
    """Every cell of the table as a canonical string, row by row, columns in table order:

    * whitespace stripped (also inside: CRLF/CR line ends become LF), Unicode NFC;
    * NULL, NaN and the texts pandas reads as missing (`""`, `NA`, `NULL`, `None`, `nan`, `#N/A` …) → "";
    * booleans and the texts true/false in any case → "true" / "false";
    * numbers — int, float, decimal, and texts like `1234.50`, `1.2345E3`, `+7`, `007` — through
      float64, rounded to 12 significant digits (half-even on the exact value), plain notation, no
      trailing zeros, `-0` → "0"; ±infinity → "inf" / "-inf";
    * dates → `YYYY-MM-DD` (also from `2024/3/1`, `2024.3.1`, `2024年3月1日`); timestamps → UTC
      `YYYY-MM-DDTHH:MM:SS[.ffffff]`, a midnight timestamp → its date; times → `HH:MM:SS[.ffffff]`;
    * lists and structs → compact JSON with sorted keys; bytes → UTF-8 text (or hex);
    * anything else: the stripped text.
    """
    cols = [_canonical_column(c) for c in table.columns]
    return list(zip(*cols)) if cols else [() for _ in range(table.num_rows)]


def _canonical_column(col: pa.ChunkedArray | pa.Array) -> list[str]:
    """`canonical_cell` of every value of one column, each distinct value computed once (a column
    of flags or bands holds a handful). Values are keyed with their type, so 1 and True never share
    a canonical string; unhashable ones (lists, structs) are computed each time."""
    seen: dict[tuple[type, Any], str] = {}
    out = []
    for v in _column_values(col):
        if v is None:
            out.append("")
            continue
        key = (v.__class__, v)
        try:
            c = seen.get(key)
        except TypeError:
            out.append(canonical_cell(v))
            continue
        if c is None:
            c = seen[key] = canonical_cell(v)
        out.append(c)
    return out


def normalize_rows(rows: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """What the fingerprint is taken over: rows whose cells are all empty dropped (pandas skips blank
    lines, spreadsheets drop trailing empty rows), short rows padded, and trailing columns that are
    empty in every row dropped (a spreadsheet may add an empty column)."""
    kept = [tuple(r) for r in rows if any(r)]
    if not kept:
        return []
    width = max(len(r) for r in kept)
    while width > 0 and all(len(r) < width or not r[width - 1] for r in kept):
        width -= 1
    return [tuple(r[:width]) + ("",) * (width - len(r)) for r in kept]


def row_digest(row: Sequence[str]) -> bytes:
    """SHA-256 of one canonical row, each cell length-prefixed (so `("a,b",)` ≠ `("a", "b")`)."""
    h = hashlib.sha256(len(row).to_bytes(4, "big"))
    for cell in row:
        b = cell.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.digest()


def _fingerprint_of_digests(key: bytes, ncols: int, digests: list[bytes]) -> str:
    return _fingerprint_of_blob(key, ncols, len(digests), b"".join(sorted(digests)))


def _fingerprint_of_blob(key: bytes, ncols: int, count: int, sorted_digests: bytes) -> str:
    """HMAC over the column count, the row count and the sorted row digests (one update of them
    all: the same bytes as one update per digest)."""
    mac = hmac.new(key, _CONTENT_TAG, hashlib.sha256)
    mac.update(ncols.to_bytes(8, "big"))
    mac.update(count.to_bytes(8, "big"))
    mac.update(sorted_digests)
    return mac.hexdigest()


def content_fingerprint(key: bytes, table_or_rows: pa.Table | Iterable[Sequence[str]]) -> str:
    """HMAC-SHA256 (hex) over the column count and the sorted digests of the normalized canonical rows:
    independent of the header, the column names and the row order. `table_or_rows` is a table, or rows
    that are already canonical (`canonical_rows`, `Found.candidates`)."""
    key = _check_key(key)
    if isinstance(table_or_rows, pa.Table):
        width, digests = _table_digests(table_or_rows)
        return _fingerprint_of_blob(key, width, len(digests) // 32, _sorted_digests(digests))
    norm = normalize_rows(table_or_rows)
    return _fingerprint_of_digests(key, len(norm[0]) if norm else 0, [row_digest(r) for r in norm])


_EMPTY_CELL = (0).to_bytes(8, "big")     # an empty canonical cell as `row_digest` hashes it
_DIGEST_ROWS = 65_536                    # rows joined and hashed at a time (bounds the memory)


def _cell_pieces(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """One column as `row_digest` feeds it to SHA-256: (pieces, empty, indices) — the length-prefixed
    canonical text of each distinct value once (`pieces`, binary), whether it is the empty cell
    (`empty`), and each row's index into them. The canonical text of a value depends on the value
    alone, so computing it once per distinct value changes nothing."""
    arr = _arrow_values(col)
    try:
        enc = pc.dictionary_encode(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
        values = enc.dictionary
        canon = (_canonical_texts(values) if pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
                 else [canonical_cell(v) for v in values.to_pylist()])
        indices = enc.indices
    except (pa.ArrowException, TypeError):   # a type Arrow cannot hash (lists, structs): value by value
        canon = _canonical_column(col)
        indices = pa.array(range(len(canon)), pa.int64())
    blobs = [c.encode("utf-8", "surrogatepass") for c in canon] + [b""]      # the last: NULL
    pieces = [len(b).to_bytes(8, "big") + b for b in blobs]
    indices = pc.fill_null(indices, len(pieces) - 1)
    return (pa.array(pieces, pa.binary()), pa.array([p == _EMPTY_CELL for p in pieces], pa.bool_()),
            indices)


# A text that starts with a letter, is printable ASCII with no whitespace at its ends, and is not a
# word `_canon_text` reads (a missing-value text, a boolean, infinity) is its own canonical text:
# no number, date or JSON starts with a letter, NFC leaves ASCII alone, and it holds no CR.
_PLAIN_TEXT = r"^[A-Za-z_]$|^[A-Za-z_][ -~]*[!-~]$"
_WORDS = pa.array(sorted({t.lower() for t in _NULL_TEXTS if t[:1].isalpha()} | {"true", "false", "inf", "infinity"}))


def _canonical_texts(values: pa.Array) -> list[str]:
    """`canonical_cell` of distinct texts (no NULL among them), the plain ones found in Arrow."""
    plain = pc.and_(pc.match_substring_regex(values, _PLAIN_TEXT),
                    pc.invert(pc.is_in(pc.utf8_lower(values), value_set=_WORDS))).to_pylist()
    return [t if ok else _canon_text(t) for t, ok in zip(values.to_pylist(), plain)]


def _table_digests(table: pa.Table) -> tuple[int, bytearray]:
    """(width, the row digests, 32 bytes each, one after the other) of `normalize_rows(canonical_rows(table))`, computed column by column
    in Arrow: each row's length-prefixed cells are joined (`binary_join_element_wise`) and hashed in
    one call, the same bytes `row_digest` feeds SHA-256 piece by piece. A table's rows all have its
    width, and a row that is dropped holds only empty cells, so the trailing columns dropped are
    those empty in every row."""
    columns = [_cell_pieces(c) for c in table.columns]
    empties = [pc.take(empty, indices) for _, empty, indices in columns]
    width = len(columns)
    while width > 0 and pc.all(empties[width - 1]).as_py() in (True, None):
        width -= 1
    if width == 0:
        return 0, bytearray()
    head, sha, digests = width.to_bytes(4, "big"), hashlib.sha256, bytearray()
    for start in range(0, table.num_rows, _DIGEST_ROWS):
        n = min(_DIGEST_ROWS, table.num_rows - start)
        parts = [pc.take(pieces, indices.slice(start, n)) for pieces, _, indices in columns[:width]]
        joined = pc.binary_join_element_wise(*parts, b"")
        blank = empties[0].slice(start, n)
        for e in empties[1:width]:
            blank = pc.and_(blank, e.slice(start, n))
        for row in pc.filter(joined, pc.invert(blank)).to_pylist():
            digests += sha(head + row).digest()
    return width, digests


def _sorted_digests(digests: bytes | bytearray) -> bytes:
    """32-byte digests, one after the other, in the order `sorted` gives them as bytes (NumPy
    compares fixed-width byte strings as memcmp does)."""
    return np.sort(np.frombuffer(bytes(digests), dtype="S32")).tobytes()


def export_stamp(key: bytes, export_id: str, content_fp: str) -> str:
    """The keyed fingerprint written into the file: HMAC-SHA256 (hex) over the export id and the
    content fingerprint. Only the server, which holds the key, can compute or check it."""
    mac = hmac.new(_check_key(key), _STAMP_TAG, hashlib.sha256)
    eid = str(export_id).encode("utf-8")
    mac.update(len(eid).to_bytes(8, "big"))
    mac.update(eid)
    mac.update(str(content_fp).encode("ascii", "replace"))
    return mac.hexdigest()


def verify_stamp(key: bytes, stamp: Any, content_fp: str) -> bool:
    """Whether `stamp["fingerprint"]` is the server's stamp for `stamp["export_id"]` and `content_fp`
    (constant-time). False, never an exception, for a stamp that is malformed or not a dict.

    Check it against the content fingerprint *recorded* for that export (is the stamp genuine?) and
    compare the found file's own candidates with the recorded one (are the cells intact?)."""
    if not isinstance(stamp, dict):
        return False
    export_id, given = stamp.get("export_id"), stamp.get("fingerprint")
    if not isinstance(given, str) or not isinstance(export_id, (str, int)) or isinstance(export_id, bool):
        return False
    expected = export_stamp(key, str(export_id), str(content_fp))
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace"))


# ---------------------------------------------------------------------------------------------- writers

def _stamp_token(v: Any, raw_string: bool = False) -> str:
    if isinstance(v, str):
        text = v if raw_string or _json_scalar(v) is None else json.dumps(v)
    else:
        text = json.dumps(v, ensure_ascii=False, default=str)
    # no space, comma, semicolon, tab, pipe or quote: the comment line stays one cell in every dialect
    return quote(text, safe="-._~:@+=/") or "%22%22"


def _json_scalar(s: str) -> Any:
    try:
        v = json.loads(s)
    except ValueError:
        return None
    return v if isinstance(v, (int, float, bool)) or v is None else None


def _stamp_comment(stamp: dict[str, Any]) -> str:
    if not stamp.get("export_id") or not stamp.get("fingerprint"):
        raise ValueError("the stamp needs export_id and fingerprint")
    parts = ["# pdao export", _stamp_token(str(stamp["export_id"]), raw_string=True),
             "fingerprint", _stamp_token(str(stamp["fingerprint"]), raw_string=True)]
    for k, v in stamp.items():
        if k in ("export_id", "fingerprint") or isinstance(v, (dict, list)):
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)):
            raise ValueError(f"stamp key {k!r} is not a plain name")
        parts += [str(k), _stamp_token(v)]
    return " ".join(parts)


def _csv_safe(table: pa.Table) -> pa.Table:
    """Columns pyarrow's CSV writer cannot print (lists, structs, maps, binary) as JSON or UTF-8 text,
    durations as seconds."""
    for i, f in enumerate(table.schema):
        t = f.type
        if pa.types.is_duration(t):
            secs = [None if v is None else v.total_seconds() for v in table.column(i).to_pylist()]
            table = table.set_column(i, pa.field(f.name, pa.float64()), pa.array(secs, pa.float64()))
        elif pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) \
                or pa.types.is_fixed_size_binary(t):
            vals = [None if v is None else (_bytes_text(v) if isinstance(v, (bytes, bytearray)) else _json_text(v))
                    for v in table.column(i).to_pylist()]
            table = table.set_column(i, pa.field(f.name, pa.string()), pa.array(vals, pa.string()))
    return table


Pieces = Iterable[pa.RecordBatch | pa.Table]     # a table's rows, a batch or a table at a time


def _tables(schema: pa.Schema, pieces: Pieces) -> Iterable[pa.Table]:
    for piece in pieces:
        yield (pa.Table.from_batches([piece]) if isinstance(piece, pa.RecordBatch) else piece).cast(schema)


def write_csv(out: BinaryIO, schema: pa.Schema, pieces: Pieces, stamp: dict[str, Any], *, bom: bool = False) -> None:
    """`csv_bytes`, written to `out` a piece at a time (the header once): the same bytes, in the
    memory of one piece."""
    if bom:
        out.write(codecs.BOM_UTF8)
    out.write((_stamp_comment(stamp) + "\n").encode("utf-8"))
    if stamp.get("synthetic"):
        out.write((_SYNTHETIC_NOTICE + "\n").encode("utf-8"))
    safe = _csv_safe(schema.empty_table()).schema
    writer = pacsv.CSVWriter(out, safe)
    for table in _tables(schema, pieces):
        writer.write_table(_csv_safe(table))
    writer.close()


def write_parquet(out: BinaryIO, schema: pa.Schema, pieces: Pieces, stamp: dict[str, Any]) -> None:
    """`parquet_bytes`, written to `out` a piece at a time (each piece one or more row groups)."""
    _stamp_comment(stamp)    # the same checks as for CSV
    meta = {k: v for k, v in (schema.metadata or {}).items() if k != b"pdao"}
    meta[b"pdao"] = json.dumps(stamp, ensure_ascii=False, default=str).encode("utf-8")
    schema = schema.with_metadata(meta)
    with pq.ParquetWriter(out, schema) as writer:
        for table in _tables(schema, pieces):
            writer.write_table(table)


def _json_text_of(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_json_default)


def write_json(out: BinaryIO, schema: pa.Schema, pieces: Pieces, stamp: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """`json_bytes`, written to `out` a piece at a time: the object up to `"rows": [`, the rows of
    each piece, then `]}` — the text `json.dumps` gives the whole object (its `", "` and `": "`
    separators), so the bytes are the same."""
    _stamp_comment(stamp)
    extra = dict(extra or {})
    if "export" in extra or "rows" in extra:
        raise ValueError("extra must not contain 'export' or 'rows'")
    head = _json_text_of({"export": _json_cell(stamp), **{str(k): _json_cell(v) for k, v in extra.items()}})
    out.write((head[:-1] + ', "rows": [').encode("utf-8"))
    names = _unique_names(schema.names)
    first = True
    for table in _tables(schema, pieces):
        cols = [_json_column(c) for c in table.columns]
        if not cols or not table.num_rows:
            continue
        # one dumps of the piece's rows as a list, its brackets cut: the rows joined by ", "
        text = _json_text_of([dict(zip(names, vals)) for vals in zip(*cols)])[1:-1]
        out.write(((", " if not first else "") + text).encode("utf-8"))
        first = False
    out.write(b"]}")


def _json_column(col: pa.ChunkedArray) -> list[Any]:
    """A column's values as `json_bytes` writes them (`_json_cell`; booleans, integers and texts are
    already what it gives)."""
    t = col.type
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return [_json_cell(None if v is None else float(v)) for v in _column_values(col)]
    values = _column_values(col)
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return values
    return [_json_cell(v) for v in values]


def csv_bytes(table: pa.Table, stamp: dict[str, Any], *, bom: bool = False) -> bytes:
    """The CSV download: `# pdao export <export_id> fingerprint <fp> <key> <value> …` first, a second
    `#` line if `stamp["synthetic"]` (a dev answer can never pass for real data), then the header and
    the rows as pyarrow writes them (UTF-8, LF). `bom=True` starts the file with a UTF-8 BOM, which
    Excel needs to show Chinese text (pandas and `read_found` accept both). Readers skip the comment
    lines with pandas' `comment="#"` (or `skiprows`), DuckDB's `comment='#'`."""
    buf = io.BytesIO()
    write_csv(buf, table.schema, [table], stamp, bom=bom)
    return buf.getvalue()


def parquet_bytes(table: pa.Table, stamp: dict[str, Any]) -> bytes:
    """The Parquet download: the table with the stamp as JSON under the schema metadata key `pdao`
    (replacing the result store's own `pdao` entry; other metadata kept)."""
    buf = io.BytesIO()
    write_parquet(buf, table.schema, [table], stamp)
    return buf.getvalue()


def _json_cell(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return None
        return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")   # strict JSON has no Infinity
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return None if v.is_nan() else str(v)     # exact; read back as a number
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, (bytes, bytearray)):
        return _bytes_text(v)
    if isinstance(v, dict):
        return {str(k): _json_cell(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_cell(x) for x in v]
    return str(v)


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for n in names:
        name, i = str(n), 2
        while name in seen:
            name, i = f"{n}_{i}", i + 1
        seen.add(name)
        out.append(name)
    return out


def json_bytes(table: pa.Table, stamp: dict[str, Any], extra: dict[str, Any] | None = None) -> bytes:
    """The JSON download: `{"export": {stamp}, **extra, "rows": [{column: value}, …]}` (UTF-8, strict
    JSON: NaN → null, ±infinity → "inf"/"-inf", dates ISO, decimals as exact strings)."""
    buf = io.BytesIO()
    write_json(buf, table.schema, [table], stamp, extra)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- found files

@dataclass
class Found:
    """What `read_found` made of a file.

    `stamp`: the pdao dict if a CSV comment, the Parquet `pdao` metadata or the JSON `export` field
    survived (it may lack `export_id` on a file from before stamping), else None.
    `candidates`: canonical row sets to try, most likely first.
    `alternates`: one dict per candidate, (row, column) → the two readings of a cell printed exactly on
    a rounding midpoint (used by `match_candidates`; usually empty).
    `columns`: the column names (Parquet, JSON records) or the first row of a CSV, which may be a
    header or data. `format`: "csv", "parquet" or "json";
    `details`: encoding and delimiter for a CSV."""

    format: str
    stamp: dict[str, Any] | None
    candidates: list[list[tuple[str, ...]]]
    alternates: list[dict[tuple[int, int], tuple[str, ...]]] = field(default_factory=list)
    columns: list[str] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class _Builder:
    def __init__(self) -> None:
        self.candidates: list[list[tuple[str, ...]]] = []
        self.alternates: list[dict[tuple[int, int], tuple[str, ...]]] = []

    def add(self, rows: list[tuple[str, ...]], alts: dict[tuple[int, int], tuple[str, ...]]) -> None:
        rows, alts = _normalize_with(rows, alts)
        if rows and rows not in self.candidates:
            self.candidates.append(rows)
            self.alternates.append(alts)
            # a pandas index written as the first column (to_csv / to_json without index=False)
            n = len(rows)
            if len(rows[0]) > 1 and n > 0:
                first = sorted(r[0] for r in rows)     # in any order: the rows may have been sorted since
                for start in (0, 1):
                    if first == sorted(str(i + start) for i in range(n)):
                        shifted = {(i, j - 1): a for (i, j), a in alts.items() if j > 0}
                        self.add([r[1:] for r in rows], shifted)
                        break


def _normalize_with(rows: list[tuple[str, ...]], alts: dict[tuple[int, int], tuple[str, ...]]
                    ) -> tuple[list[tuple[str, ...]], dict[tuple[int, int], tuple[str, ...]]]:
    """normalize_rows, keeping the alternates on their cells (they are never empty, so a row or a
    column that holds one is never dropped)."""
    kept = [i for i, r in enumerate(rows) if any(r)]
    new_index = {old: new for new, old in enumerate(kept)}
    return normalize_rows(rows), {(new_index[i], j): a for (i, j), a in alts.items() if i in new_index}


def _canon_raw_rows(rows: Sequence[Sequence[Any]]) -> tuple[list[tuple[str, ...]], dict[tuple[int, int], tuple[str, ...]]]:
    out, alts = [], {}
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            cells.append(canonical_cell(v))
            text = v if isinstance(v, str) else repr(v) if isinstance(v, float) else None
            if text is not None and len(text) > SIGNIFICANT_DIGITS:
                m = _midpoint_readings(text)
                if m is not None:
                    alts[(i, j)] = m
        out.append(tuple(cells))
    return out, alts


def _text_of(data: bytes) -> tuple[str, str]:
    if data.startswith(codecs.BOM_UTF8):
        candidates = ["utf-8-sig"]
    elif data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        candidates = ["utf-32"]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = ["utf-16"]       # Excel's "Unicode text" (tab-separated)
    else:
        candidates = ["utf-8", "gb18030"]   # GB18030 ⊃ GBK ⊃ GB2312: Excel and WPS on Chinese Windows
    for enc in candidates:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if "\x00" in text:
            break
        controls = sum(1 for ch in text[:65536] if ord(ch) < 32 and ch not in "\t\r\n")
        if controls > max(2, len(text[:65536]) // 200):
            break
        return text, enc
    raise _unreadable("it is not text in UTF-8, UTF-16 or GBK/GB18030, nor Parquet or JSON",
                      "既不是 UTF-8、UTF-16 或 GBK/GB18030 编码的文本，也不是 Parquet 或 JSON")


def _is_comment_row(row: list[str]) -> bool:
    # only our own lines: a cell that happens to start with "#" is data
    return bool(row) and row[0].strip().replace(" ", "").startswith("#pdao")


def _parse_stamp_comment(text: str) -> dict[str, Any] | None:
    words = text.strip().lstrip("#").split()
    if len(words) < 5 or words[0] != "pdao" or words[1] != "export" or words[3] != "fingerprint":
        return None
    out: dict[str, Any] = {"export_id": unquote(words[2]), "fingerprint": unquote(words[4])}
    rest = words[5:]
    for k, v in zip(rest[0::2], rest[1::2]):
        val = unquote(v)
        try:
            out[k] = json.loads(val)
        except ValueError:
            out[k] = val
    return out


def _delimiter_scores(lines: list[str], filename: str | None) -> list[tuple[tuple[Any, ...], str]]:
    """Each delimiter's score on the sample, best first: more than one column in nearly every row, the
    share of rows with the most common width, the file name, the width."""
    prefer_tab = bool(filename) and filename.lower().endswith((".tsv", ".tab", ".txt"))
    scores = []
    for d in (",", "\t", ";", "|"):
        try:
            counts = [len(r) for r in csv.reader(lines, delimiter=d) if r]
        except csv.Error:
            continue
        if counts:
            width, hits = Counter(counts).most_common(1)[0]
            share = round(hits / len(counts), 2)
            scores.append(((width > 1 and share >= 0.9, share, prefer_tab and d == "\t", width), d))
    scores.sort(key=lambda x: x[0], reverse=True)
    return scores


def _csv_rows(text: str, delimiter: str, max_rows: int) -> list[list[str]]:
    try:
        rows = []
        for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False):
            if r and any(c.strip() for c in r):
                rows.append(r)
                if len(rows) > max_rows + 1000:      # stop early; counted exactly by the caller
                    break
    except csv.Error as e:
        raise _unreadable(f"malformed CSV ({e})", f"CSV 格式有误（{e}）") from None
    return rows


def _read_csv(text: str, encoding: str, filename: str | None, max_rows: int) -> Found:
    lines = text.splitlines(keepends=True)
    sample = [ln for ln in lines[:400] if not ln.lstrip().lstrip('"').replace(" ", "").startswith("#pdao")][:200]
    scores = _delimiter_scores(sample, filename)
    delimiters = [scores[0][1]] if scores else [","]
    # a one-column file whose cells hold ";" or "|" looks like a two-column one: also read it with ","
    # when every row then has the same width
    if delimiters[0] != "," and any(d == "," and sc[1] == 1.0 for sc, d in scores):
        delimiters.append(",")
    b = _Builder()
    stamp, first_row = None, None
    for delimiter in delimiters:
        rows = _csv_rows(text, delimiter, max_rows)
        while rows and _is_comment_row(rows[0]):
            parsed = _parse_stamp_comment(",".join(c for c in rows.pop(0) if c.strip()))
            if parsed is not None and stamp is None:
                stamp = parsed
        if not rows:
            raise _unreadable("it holds no rows", "文件中没有数据行")
        if len(rows) > max_rows + 1:                     # one may be a header
            raise _too_many_rows(max_rows)
        first_row = first_row or [c.strip() for c in rows[0]]
        canon, alts = _canon_raw_rows(rows)
        b.add(canon[1:], {(i - 1, j): a for (i, j), a in alts.items() if i > 0})   # first row a header
        b.add(canon, alts)                                                      # no header
    return Found("csv", stamp, b.candidates, b.alternates, columns=first_row,
                 details={"encoding": encoding, "delimiter": delimiters[0]})


def _read_parquet(data: bytes, max_rows: int) -> Found:
    try:
        f = pq.ParquetFile(io.BytesIO(data))
        if f.metadata.num_rows > max_rows:
            raise _too_many_rows(max_rows)
        meta = f.metadata
        if sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) > _MAX_PARQUET_EXPANDED:
            raise FoundFileError("found_file_too_large", "The Parquet file expands to more than 1 GB.",
                                 "该 Parquet 文件解压后超过 1 GB。", status=413)
        table = f.read()
    except FoundFileError:
        raise
    except Exception:   # pyarrow raises many kinds on a damaged file; none of them may reach a client
        raise _unreadable("a damaged Parquet file", "Parquet 文件已损坏") from None
    stamp = None
    raw = (table.schema.metadata or {}).get(b"pdao")
    if raw:
        try:
            parsed = json.loads(raw)
            stamp = parsed if isinstance(parsed, dict) else None
        except ValueError:
            stamp = None
    keep = [n for n in table.column_names if not re.fullmatch(r"__index_level_\d+__", n)]
    table = table.select([i for i, n in enumerate(table.column_names) if n in keep])
    raw_cols = [_column_values(c) for c in table.columns]
    canon, alts = _canon_raw_rows(list(zip(*raw_cols)) if raw_cols else [])
    b = _Builder()
    b.add(canon, alts)
    return Found("parquet", stamp, b.candidates, b.alternates, columns=keep)


def _records(items: list[Any]) -> tuple[list[list[Any]], list[str] | None]:
    if items and all(isinstance(x, dict) for x in items):
        cols: dict[str, None] = {}
        for x in items:
            for k in x:
                cols.setdefault(k, None)
        names = list(cols)
        return [[x.get(k) for k in names] for x in items], names
    if all(isinstance(x, list) for x in items):
        return [list(x) for x in items], None
    return [[x] for x in items], None


def _read_json(text: str, max_rows: int) -> Found:
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _unreadable("JSON nested too deeply", "JSON 嵌套过深") from None
    except ValueError:
        obj = []                      # JSON lines: one record per line
        for ln in text.splitlines():
            if ln.strip():
                obj.append(json.loads(ln))   # ValueError → caller decides
    stamp = None
    tables: list[tuple[list[list[Any]], list[str] | None, bool]] = []   # rows, names, may carry a header row
    if isinstance(obj, list):
        rows, names = _records(obj)
        tables.append((rows, names, names is None))
    elif isinstance(obj, dict):
        if isinstance(obj.get("export"), dict):
            stamp = obj["export"]
        if isinstance(obj.get("rows"), list):                      # ours
            rows, names = _records(obj["rows"])
            tables.append((rows, names, names is None))
        elif isinstance(obj.get("data"), list):                    # pandas orient="split"
            rows, names = _records(obj["data"])
            cols = obj.get("columns")
            tables.append((rows, [str(c) for c in cols] if isinstance(cols, list) else names, False))
        elif obj and all(isinstance(v, list) for v in obj.values()) \
                and len({len(v) for v in obj.values()}) == 1:              # {col: [values]}
            names = list(obj)
            tables.append(([list(r) for r in zip(*obj.values())], names, False))
        elif obj and all(isinstance(v, dict) for v in obj.values()):
            # pandas orient="columns" {col: {index: v}} or orient="index" {index: {col: v}}
            names = list(obj)
            index: dict[str, None] = {}
            for v in obj.values():
                for k in v:
                    index.setdefault(k, None)
            tables.append(([[obj[c].get(i) for c in names] for i in index], names, False))
            tables.append(_records(list(obj.values())) + (False,))
        else:
            raise _unreadable("JSON without rows", "JSON 中没有数据行")
    else:
        raise _unreadable("JSON without rows", "JSON 中没有数据行")
    b = _Builder()
    columns = None
    for rows, names, maybe_header in tables:
        if len(rows) > max_rows:
            raise _too_many_rows(max_rows)
        canon, alts = _canon_raw_rows(rows)
        b.add(canon, alts)
        if maybe_header and len(canon) > 1:
            b.add(canon[1:], {(i - 1, j): a for (i, j), a in alts.items() if i > 0})
        columns = columns or names
    if not b.candidates:
        raise _unreadable("it holds no rows", "文件中没有数据行")
    return Found("json", stamp if isinstance(stamp, dict) else None, b.candidates, b.alternates, columns=columns)


def read_found(data: bytes, filename: str | None = None, *, max_bytes: int = MAX_FOUND_BYTES,
               max_rows: int = MAX_FOUND_ROWS) -> Found:
    """Read a file found outside — CSV/TSV (any delimiter among , TAB ; |, UTF-8 with or without BOM,
    UTF-16, GBK/GB18030, CRLF, leading `#` lines), Parquet, or JSON (ours, a list of records or arrays,
    JSON lines, pandas' split/columns/index layouts) — into its stamp, if one survived, and canonical
    candidate row sets. The format comes from the content (`PAR1`, a leading `{` or `[`), the name only
    breaks ties. Raises FoundFileError (code, message, message_zh), never anything else, for a file
    that is empty, too large, or not a table."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("data must be bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        mb = max_bytes / (1024 * 1024)
        raise FoundFileError("found_file_too_large", f"The file is larger than {mb:g} MB.",
                             f"文件超过 {mb:g} MB 的上限。", status=413)
    if not data.strip():
        raise FoundFileError("found_file_empty", "The file is empty.", "文件为空。")
    try:
        if data[:4] == b"PAR1":
            return _read_parquet(data, max_rows)
        if data[:2] == b"PK" or data[:4] == b"\xd0\xcf\x11\xe0":
            raise FoundFileError("found_file_unsupported",
                                 "Spreadsheet (.xlsx, .xls) and zip files are not read; save the sheet as CSV and trace that.",
                                 "不读取电子表格（.xlsx、.xls）或压缩文件；请将工作表另存为 CSV 后再溯源。")
        text, encoding = _text_of(data)
        head = text.lstrip("\ufeff \t\r\n")
        if head[:1] in ("{", "["):
            try:
                return _read_json(text, max_rows)
            except FoundFileError:
                raise
            except ValueError:
                if head[:1] == "{" or (filename or "").lower().endswith((".json", ".jsonl", ".ndjson")):
                    raise _unreadable("malformed JSON", "JSON 格式有误") from None
        return _read_csv(text, encoding, filename, max_rows)
    except FoundFileError:
        raise
    except (RecursionError, MemoryError):
        raise _unreadable("it is too deeply nested or too large", "嵌套过深或过大") from None
    except Exception as e:   # pragma: no cover - a last guard: never a stack trace for a found file
        raise _unreadable(type(e).__name__, type(e).__name__) from None


def match_candidates(key: bytes, found: Found) -> list[str]:
    """The content fingerprints to look up for a found file: one per candidate row set, and for a
    candidate with cells printed exactly on a rounding midpoint, one per reading of those cells (at
    most MAX_ALTERNATES per candidate). Distinct, most likely first."""
    key = _check_key(key)
    out: list[str] = []
    for i, rows in enumerate(found.candidates):
        alts = found.alternates[i] if i < len(found.alternates) else {}
        variants: Iterable[dict[tuple[int, int], str]] = [{}]
        if alts:
            cells = sorted(alts)
            variants = itertools.chain([{}], (dict(zip(cells, pick)) for pick in
                                              itertools.islice(itertools.product(*(alts[c] for c in cells)),
                                                               MAX_ALTERNATES - 1)))
        base = [row_digest(r) for r in rows]
        ncols = len(rows[0]) if rows else 0
        for v in variants:
            # candidates are normalized and an alternate reading is never empty: only digests change
            digests = list(base)
            changed: dict[int, list[str]] = {}
            for (r, c), text in v.items():
                changed.setdefault(r, list(rows[r]))[c] = text
            for r, new_row in changed.items():
                digests[r] = row_digest(new_row)
            fp = _fingerprint_of_digests(key, ncols, digests)
            if fp not in out:
                out.append(fp)
    return out


# ------------------------------------------------------------------------------------------ similarity

def _as_number(c: str) -> float | None:
    if not c or not (c[0].isdigit() or c[0] in "+-."):
        return None
    try:
        x = float(c)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _close(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-300)


def _match_fraction(found_rows: list[tuple[str, ...]], rows: list[tuple[str, ...]], rel_tol: float) -> float:
    if not 0 <= rel_tol < 1:
        raise ValueError("rel_tol must be in [0, 1)")
    if not found_rows or not rows or len(found_rows[0]) != len(rows[0]):
        return 0.0
    exact = Counter(rows)
    left: list[tuple[str, ...]] = []
    matched = 0
    for r in found_rows:
        if exact[r] > 0:
            exact[r] -= 1
            matched += 1
        else:
            left.append(r)
    # the rest: the same text cells, numbers within rel_tol (a spreadsheet kept fewer digits)
    buckets: dict[tuple[Any, ...], list[tuple[float, int, tuple[float, ...]]]] = {}
    pool = list(exact.elements())
    for idx, r in enumerate(pool):
        nums = [_as_number(c) for c in r]
        shape = tuple(None if x is not None else c for x, c in zip(nums, r))
        vec = tuple(x for x in nums if x is not None)
        buckets.setdefault(shape, []).append((vec[0] if vec else 0.0, idx, vec))
    for lst in buckets.values():
        lst.sort()
    keys = {shape: [e[0] for e in lst] for shape, lst in buckets.items()}
    used: set[int] = set()
    for r in left:
        nums = [_as_number(c) for c in r]
        shape = tuple(None if x is not None else c for x, c in zip(nums, r))
        lst = buckets.get(shape)
        if not lst:
            continue
        vec = tuple(x for x in nums if x is not None)
        first = vec[0] if vec else 0.0
        span = abs(first) * rel_tol / (1 - rel_tol) * 1.000001
        ks = keys[shape]
        for e in lst[bisect_left(ks, first - span):bisect_right(ks, first + span)]:
            if e[1] not in used and all(_close(a, b, rel_tol) for a, b in zip(vec, e[2])):
                used.add(e[1])
                matched += 1
                break
    return matched / max(len(found_rows), len(rows))


def similarity(found: Found, table_or_rows: pa.Table | Iterable[Sequence[str]], *, rel_tol: float = 1e-5) -> float:
    """How much of a stored result a found file holds, 0.0 – 1.0: the best candidate's matched rows
    over the larger row count, rows matching exactly or with the same text cells and every number
    within `rel_tol` (1e-5 accepts the 6 significant digits Excel's General format keeps at worst).
    The fallback when no fingerprint matches; the caller picks the results to compare (same column
    count) and a threshold."""
    rows = normalize_rows(canonical_rows(table_or_rows) if isinstance(table_or_rows, pa.Table) else table_or_rows)
    return max((_match_fraction(normalize_rows(c), rows, rel_tol) for c in found.candidates), default=0.0)
