"""Masking of ``masked_output`` fields: one pure function per ``catalog.descriptor.Masking`` kind.

Every function takes either

* one Python value (``str``, ``int``, ``float``, ``Decimal``, ``date``, ``datetime``, ``bool`` or
  ``None``) and returns one value,
* a ``list``/``tuple`` of such values and returns a ``list``, or
* a **pyarrow** ``Array`` or ``ChunkedArray`` (the columnar type of this module: the Parquet
  snapshots, DuckDB's ``to_arrow_table()`` and ``sandbox.synth`` all speak Arrow) and returns one of
  the same kind and length. For pandas, go through ``pa.array(series)`` / ``.to_pandas()``.

Nulls pass through as nulls (``None`` in, ``None`` out; a null slot stays null), for every kind,
``suppress`` aside, which turns everything into nulls. Nothing here reads a clock, a file or a
global secret: the pseudonym key and the reference date of age bands are arguments.

The kinds, exactly:

``pseudonym``
    ``HMAC-SHA256(key, canonical UTF-8 text of the value)``, the first ``length`` (default 16) hex
    digits. ``key`` is the per-scene secret (``bytes``, at least 16): the same value under two
    scenes' keys gives unrelated pseudonyms, so two tenants' outputs never join, while within one
    scene a person keeps one pseudonym across datasets. Canonical text: a ``str`` as is; an
    integer (or an integral ``float``/``Decimal``) in decimal digits, so ``42``, ``42.0`` and
    ``"42"`` agree; other floats by ``repr``; other Decimals in plain notation; dates and datetimes
    in ISO 8601; ``True``/``False`` as ``"true"``/``"false"``; ``bytes`` as they are.
``partial_id``
    An ID number keeps its 6-digit region and its last character, every other character becomes
    ``*`` and the length is kept: ``640104198503121231`` → ``640104***********1``, the 15-digit form
    ``640104850312123`` → ``640104********3``; a lower-case ``x`` is upper-cased. Anything else (not
    18 = 17 digits + digit/X, nor 15 digits, after trimming spaces) becomes all ``*``, same length.
``partial_phone``
    A mobile number (after removing spaces, dashes, brackets and a +86/86/0086 prefix) keeps its
    first 3 and last 4 digits: ``+86 139-1234-5678`` → ``139****5678``. Another number of at least 7
    digits keeps only its last 4 digits (``0951-5012345`` → ``*******2345``, digits only); anything
    shorter or without digits becomes all ``*``, same length as the input.
``partial_name``
    The surname stays, every other character becomes ``*``: ``张伟`` → ``张*``, ``欧阳娜娜`` →
    ``欧阳**`` (compound surnames from ``sandbox.engine.pii``'s list, for names of 3+ characters). A
    one-character value becomes ``*``. Surrounding spaces are trimmed.
``year``
    A date (``date``, ``datetime``, ISO string; date32/date64/timestamp/string arrays) → its year,
    an ``int`` (int64 array).
``month``
    A date → ``"YYYY-MM"``.
``age_band``
    A birth date → the age in completed years on ``reference_date`` (a birthday on 29 February
    counts from 1 March in other years), in bands of ``width`` years (default 5): ``"0-4"``,
    ``"5-9"``, …, ``"80-84"`` and ``"top+"`` (default ``"85+"``). A birth date after the reference
    date gives null.
``district``
    An address → the first (leftmost) of the six district names it contains — 兴庆区 金凤区 西夏区
    永宁县 贺兰县 灵武市 — else ``"其他"``. Short forms (``兴庆``) are not recognized.
``round``
    A number → the lower edge of its band of ``width``: ``floor(x / width) * width`` (``1234.5`` with
    ``width=100`` → ``1200.0``; ``-1`` with ``width=10`` → ``-10``). Integers with an integral width
    stay integers; a ``Decimal`` stays a ``Decimal`` (exact); floats (and decimal128 arrays, which
    become float64) are computed in floating point, with a quotient within 1e-9 of an integer taken
    as that integer and the edge rounded to the width's decimal places (so ``0.3`` with width
    ``0.1`` → ``0.3``, not ``0.2`` nor ``0.30000000000000004``).
``pii_redact``
    Free text through ``sandbox.engine.pii.redact_batch`` (each finding → ``[身份证号]``, ``[手机号]``, …).
``suppress``
    Null, whatever the input.
``none``
    The input itself.

``mask(values, masking, *, key=..., reference_date=..., width=...)`` dispatches on the kind.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.descriptor import Masking

__all__ = [
    "DISTRICTS",
    "OTHER_DISTRICT",
    "mask",
    "pseudonym",
    "partial_id",
    "partial_phone",
    "partial_name",
    "year",
    "month",
    "age_band",
    "district",
    "round_band",
    "pii_redact",
    "suppress",
    "identity",
]

DISTRICTS: tuple[str, ...] = ("兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市")
OTHER_DISTRICT = "其他"
MIN_KEY_BYTES = 16

_SCALARS = (str, bytes, int, float, Decimal, date, bool)  # datetime is a date


# ----------------------------------------------------------------------------- plumbing


def _apply(values: Any, scalar: Callable[[Any], Any], array: Callable[[pa.Array], pa.Array]) -> Any:
    """Run ``scalar`` on one non-null value, element-wise on a list, ``array`` on Arrow data."""
    if values is None:
        return None
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks == 0:
            return pa.chunked_array([], type=array(pa.array([], type=values.type)).type)
        return pa.chunked_array([array(c) for c in values.chunks])
    if isinstance(values, pa.Array):
        return array(values)
    if isinstance(values, (list, tuple)):
        return [None if v is None else scalar(v) for v in values]
    if isinstance(values, np.generic):  # a NumPy scalar: its Python value
        values = values.item()
        return None if values is None else scalar(values)
    if isinstance(values, _SCALARS):
        return scalar(values)
    raise TypeError(f"cannot mask a {type(values).__name__}: pass a Python value, a list, or a pyarrow "
                    "Array/ChunkedArray (pa.array(series) for pandas)")


def _map_unique(arr: pa.Array, fn: Callable[[Any], Any], out_type: pa.DataType) -> pa.Array:
    """Apply a scalar function once per distinct non-null value of ``arr``; nulls stay null."""
    if len(arr) == 0:
        return pa.array([], type=out_type)
    enc = pc.dictionary_encode(arr) if not pa.types.is_dictionary(arr.type) else arr
    mapped = pa.array([None if v is None else fn(v) for v in enc.dictionary.to_pylist()], type=out_type)
    return mapped.take(enc.indices)


def _as_dates(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return arr
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.cast(arr, pa.date32())
    if pa.types.is_null(t):
        return pa.nulls(len(arr), type=pa.date32())
    raise TypeError(f"expected dates, got an array of {t}")


def _as_date(v: Any) -> date:
    if isinstance(v, date):
        return v  # a datetime is a date too
    if isinstance(v, str):
        return date.fromisoformat(v)
    raise TypeError(f"expected a date, got {type(v).__name__}")


# ----------------------------------------------------------------------------- pseudonym


def _canonical(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        text = v
    elif isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, int):
        text = str(v)
    elif isinstance(v, float):
        text = str(int(v)) if v.is_integer() else repr(v)
    elif isinstance(v, Decimal):
        text = str(int(v)) if v.is_finite() and v == v.to_integral_value() else format(v.normalize(), "f")
    elif isinstance(v, (date, datetime)):
        text = v.isoformat()
    else:
        raise TypeError(f"cannot pseudonymize a {type(v).__name__}")
    return text.encode("utf-8")


def pseudonym(values: Any, *, key: bytes, length: int = 16) -> Any:
    """Keyed pseudonyms: the first ``length`` hex digits of HMAC-SHA256(``key``, canonical value)."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a pseudonym key is at least {MIN_KEY_BYTES} bytes")
    if isinstance(length, bool) or not isinstance(length, int) or not 8 <= length <= 64:
        raise ValueError("a pseudonym length is 8 to 64 hex digits")
    base = hmac.new(bytes(key), digestmod=hashlib.sha256)

    def one(v: Any) -> str:
        h = base.copy()
        h.update(_canonical(v))
        return h.hexdigest()[:length]

    def arr(a: pa.Array) -> pa.Array:
        if pa.types.is_null(a.type):
            return pa.nulls(len(a), type=pa.string())
        return _map_unique(a, one, pa.string())

    return _apply(values, one, arr)


# ----------------------------------------------------------------------------- partial masks

_ID_TAIL = frozenset("0123456789X")


def _partial_id(v: Any) -> str:
    s = str(v).strip().upper()
    if len(s) == 18 and s[:17].isascii() and s[:17].isdigit() and s[17] in _ID_TAIL:
        return s[:6] + "*" * 11 + s[17]
    if len(s) == 15 and s.isascii() and s.isdigit():
        return s[:6] + "*" * 8 + s[14]
    return "*" * len(s)


def partial_id(values: Any) -> Any:
    """ID numbers keeping the region and the last character (``640104***********1``)."""
    return _apply(values, _partial_id, lambda a: _map_unique(a, _partial_id, pa.string()))


def _partial_phone(v: Any) -> str:
    s = str(v).strip()
    compact = "".join(c for c in s if c not in " -()（）\u3000")
    for prefix in ("+86", "0086", "86"):
        if compact.startswith(prefix) and len(compact) == len(prefix) + 11:
            compact = compact[len(prefix):]
            break
    if (len(compact) == 11 and compact.isascii() and compact.isdigit() and compact[0] == "1"
            and compact[1] in "3456789"):
        return compact[:3] + "****" + compact[-4:]
    digits = "".join(c for c in s if c.isascii() and c.isdigit())
    if len(digits) >= 7:
        return "*" * (len(digits) - 4) + digits[-4:]
    return "*" * len(s)


def partial_phone(values: Any) -> Any:
    """Mobile numbers keeping the first 3 and last 4 digits (``139****5678``)."""
    return _apply(values, _partial_phone, lambda a: _map_unique(a, _partial_phone, pa.string()))


@functools.cache
def _compound_surnames() -> frozenset[str]:
    # Imported on first use: sandbox.engine.pii loads Presidio (and spaCy), ~1 s that the other kinds skip.
    from sandbox.engine.pii.cn_name_recognizer import COMPOUND_SURNAMES

    return frozenset(COMPOUND_SURNAMES)


def _partial_name(v: Any) -> str:
    s = str(v).strip()
    if len(s) <= 1:
        return "*" * len(s)
    keep = 2 if len(s) >= 3 and s[:2] in _compound_surnames() else 1
    return s[:keep] + "*" * (len(s) - keep)


def partial_name(values: Any) -> Any:
    """Names keeping the surname (``张*``, ``欧阳**``)."""
    return _apply(values, _partial_name, lambda a: _map_unique(a, _partial_name, pa.string()))


# ----------------------------------------------------------------------------- dates


def year(values: Any) -> Any:
    """Dates → their year (int)."""
    return _apply(values, lambda v: _as_date(v).year, lambda a: pc.year(_as_dates(a)))


def month(values: Any) -> Any:
    """Dates → ``"YYYY-MM"``."""

    def arr(a: pa.Array) -> pa.Array:
        # (a zoned timestamp is formatted in its own time zone, like a zoned datetime)
        return pc.strftime(_as_dates(a), format="%Y-%m")

    return _apply(values, lambda v: f"{_as_date(v).year:04d}-{_as_date(v).month:02d}", arr)


def _band_labels(width: int, top: int) -> list[str]:
    return [f"{lo}-{lo + width - 1}" for lo in range(0, top, width)] + [f"{top}+"]


def age_band(values: Any, *, reference_date: date, width: int = 5, top: int = 85) -> Any:
    """Birth dates → age bands on ``reference_date`` (``"40-44"``, ``"85+"``)."""
    if not isinstance(reference_date, date):
        raise ValueError("age_band needs a reference_date (a datetime.date)")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError("an age band width is a positive integer")
    if isinstance(top, bool) or not isinstance(top, int) or top < width or top % width:
        raise ValueError("the top age band must start at a multiple of the width")
    ref = reference_date.date() if isinstance(reference_date, datetime) else reference_date
    labels = _band_labels(width, top)
    ref_md = ref.month * 100 + ref.day

    def one(v: Any) -> str | None:
        b = _as_date(v)
        age = ref.year - b.year - (ref_md < b.month * 100 + b.day)
        if age < 0:
            return None
        return labels[min(age // width, len(labels) - 1)]

    def arr(a: pa.Array) -> pa.Array:
        d = _as_dates(a)
        if len(d) == 0:
            return pa.array([], type=pa.string())
        y = pc.year(d).to_numpy(zero_copy_only=False)
        md = (pc.multiply(pc.month(d), 100).to_numpy(zero_copy_only=False)
              + pc.day(d).to_numpy(zero_copy_only=False))
        valid = d.is_valid().to_numpy(zero_copy_only=False)
        y = np.where(valid, y, 0).astype(np.int64)
        md = np.where(valid, md, 0).astype(np.int64)
        age = ref.year - y - (ref_md < md)
        idx = np.minimum(np.maximum(age, 0) // width, len(labels) - 1)
        null = ~valid | (age < 0)
        return pa.array(labels).take(pa.array(idx, mask=null))

    return _apply(values, one, arr)


# ----------------------------------------------------------------------------- district


def _district(v: Any) -> str:
    s = str(v)
    best, where = OTHER_DISTRICT, len(s) + 1
    for name in DISTRICTS:
        i = s.find(name)
        if 0 <= i < where:
            best, where = name, i
    return best


def district(values: Any) -> Any:
    """Addresses → the district (兴庆区 金凤区 西夏区 永宁县 贺兰县 灵武市) or ``"其他"``."""

    def arr(a: pa.Array) -> pa.Array:
        if pa.types.is_null(a.type):
            return pa.nulls(len(a), type=pa.string())
        if len(a) == 0:
            return pa.array([], type=pa.string())
        big = np.iinfo(np.int64).max
        pos = np.stack([
            np.where(p < 0, big, p)
            for p in (pc.fill_null(pc.find_substring(a, name), -1).to_numpy(zero_copy_only=False).astype(np.int64)
                      for name in DISTRICTS)
        ])
        first = pos.argmin(axis=0)
        idx = np.where(pos.min(axis=0) == big, len(DISTRICTS), first)
        labels = pa.array(list(DISTRICTS) + [OTHER_DISTRICT])
        return labels.take(pa.array(idx, mask=~a.is_valid().to_numpy(zero_copy_only=False)))

    return _apply(values, _district, arr)


# ----------------------------------------------------------------------------- numbers

_SNAP = 1e-9


def _float_band(x: np.ndarray | float, width: float):
    q = np.asarray(x, dtype=np.float64) / width
    r = np.round(q)
    q = np.where(np.abs(q - r) <= _SNAP * np.maximum(1.0, np.abs(q)), r, np.floor(q))
    # 3 * 0.1 is 0.30000000000000004: round the edge to the width's own decimal places.
    places = max(0, -Decimal(repr(float(width))).normalize().as_tuple().exponent)
    return np.round(q * width, places)


def round_band(values: Any, *, width: float | int | Decimal) -> Any:
    """Numbers → the lower edge of their band of ``width`` (``floor(x / width) * width``)."""
    if isinstance(width, bool) or not isinstance(width, (int, float, Decimal)) or not width > 0 \
            or not math.isfinite(width):
        raise ValueError("round needs a positive, finite width")
    int_width = isinstance(width, int) or (isinstance(width, (float, Decimal)) and width == int(width))

    def one(v: Any) -> Any:
        if isinstance(v, bool):
            raise TypeError("cannot round a boolean")
        if isinstance(v, int) and int_width:
            w = int(width)
            return v // w * w
        if isinstance(v, Decimal):
            w = width if isinstance(width, Decimal) else Decimal(repr(width) if isinstance(width, float) else width)
            return (v / w).to_integral_value(rounding="ROUND_FLOOR") * w
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                return v
            return float(_float_band(float(v), float(width)))
        raise TypeError(f"cannot round a {type(v).__name__}")

    def arr(a: pa.Array) -> pa.Array:
        t = a.type
        if pa.types.is_null(t):
            return a
        valid = a.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_integer(t) and int_width:
            x = pc.fill_null(a, 0).to_numpy(zero_copy_only=False).astype(np.int64)
            w = int(width)
            return pa.array(x // w * w, mask=~valid)
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            x = pc.fill_null(pc.cast(a, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
            out = np.where(np.isfinite(x), _float_band(x, float(width)), x)
            return pa.array(out, type=pa.float64(), mask=~valid)
        raise TypeError(f"cannot round an array of {t}")

    return _apply(values, one, arr)


# ----------------------------------------------------------------------------- text, suppress, none


def pii_redact(values: Any) -> Any:
    """Free text with every PII finding replaced by its placeholder (``sandbox.engine.pii``)."""
    from sandbox.engine import pii

    def one(v: Any) -> str:
        if not isinstance(v, str):
            raise TypeError(f"pii_redact needs text, got {type(v).__name__}")
        return pii.redact_batch([v])[0]

    def arr(a: pa.Array) -> pa.Array:
        if pa.types.is_null(a.type):
            return pa.nulls(len(a), type=pa.string())
        if not (pa.types.is_string(a.type) or pa.types.is_large_string(a.type)):
            raise TypeError(f"pii_redact needs a string array, got {a.type}")
        return pa.array(pii.redact_batch(a.to_pylist()), type=a.type)

    if isinstance(values, (list, tuple)):
        return pii.redact_batch(values)
    return _apply(values, one, arr)


def suppress(values: Any) -> Any:
    """All nulls (same length and type for arrays)."""
    if isinstance(values, pa.ChunkedArray):
        return pa.chunked_array([pa.nulls(len(c), type=values.type) for c in values.chunks], type=values.type)
    if isinstance(values, pa.Array):
        return pa.nulls(len(values), type=values.type)
    if isinstance(values, (list, tuple)):
        return [None] * len(values)
    return None


def identity(values: Any) -> Any:
    """The values themselves (masking ``none``)."""
    return values


# ----------------------------------------------------------------------------- dispatcher


def mask(
    values: Any,
    masking: str | Masking,
    *,
    key: bytes | None = None,
    reference_date: date | None = None,
    width: float | int | Decimal | None = None,
    pseudonym_length: int = 16,
    age_width: int = 5,
    age_top: int = 85,
) -> Any:
    """Apply the masking ``masking`` (a ``catalog.descriptor.Masking`` value) to ``values``.

    ``key`` (per-scene secret bytes) is needed by ``pseudonym``, ``reference_date`` by
    ``age_band``, ``width`` by ``round``; each raises ``ValueError`` when its parameter is missing.
    """
    try:
        kind = Masking(masking)
    except ValueError:
        raise ValueError(f"unknown masking {masking!r}; known: {', '.join(m.value for m in Masking)}") from None
    if kind is Masking.pseudonym:
        if key is None:
            raise ValueError("masking 'pseudonym' needs the scene's key")
        return pseudonym(values, key=key, length=pseudonym_length)
    if kind is Masking.age_band:
        if reference_date is None:
            raise ValueError("masking 'age_band' needs a reference_date")
        return age_band(values, reference_date=reference_date, width=age_width, top=age_top)
    if kind is Masking.round:
        if width is None:
            raise ValueError("masking 'round' needs a band width")
        return round_band(values, width=width)
    simple: dict[Masking, Callable[[Any], Any]] = {
        Masking.partial_id: partial_id,
        Masking.partial_phone: partial_phone,
        Masking.partial_name: partial_name,
        Masking.year: year,
        Masking.month: month,
        Masking.district: district,
        Masking.pii_redact: pii_redact,
        Masking.suppress: suppress,
        Masking.none: identity,
    }
    return simple[kind](values)
