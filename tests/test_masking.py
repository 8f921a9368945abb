"""Tests for sandbox.engine.masking: every Masking kind on Python values, lists and pyarrow arrays, nulls,
and the pseudonym's two-keys property."""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, datetime, timezone
from decimal import Decimal

import pyarrow as pa
import pytest

from catalog.descriptor import Masking
from catalog.identifiers import cn_id_check_char
from sandbox.engine import masking as m
from sandbox.engine.masking import mask

KEY_A = b"scene-a-secret-key-0123456789abc"
KEY_B = b"scene-b-secret-key-0123456789abc"
REF = date(2025, 6, 30)
ID = "64010419850312123" + cn_id_check_char("64010419850312123")


def same_on_all_paths(fn, values: list, **kw) -> list:
    """Apply ``fn`` to each value, to the list, to a pyarrow array and to a chunked array: all agree."""
    one = [fn(v, **kw) for v in values]
    assert fn(values, **kw) == one
    arr = pa.array(values)
    assert fn(arr, **kw).to_pylist() == one
    chunked = pa.chunked_array([arr.slice(0, 1), arr.slice(1)])
    out = fn(chunked, **kw)
    assert isinstance(out, pa.ChunkedArray) and out.to_pylist() == one
    return one


def test_every_masking_kind_is_dispatched():
    handled = set()
    for kind in Masking:
        kw = {"key": KEY_A, "reference_date": REF, "width": 10}
        value = {"pseudonym": 1, "partial_id": ID, "partial_phone": "13912345678", "partial_name": "张伟",
                 "year": date(1985, 3, 12), "month": date(1985, 3, 12), "age_band": date(1985, 3, 12),
                 "district": "兴庆区", "round": 17, "pii_redact": "电话13912345678", "suppress": 1,
                 "none": "x"}[kind.value]
        mask(value, kind, **kw)
        mask(value, kind.value, **kw)
        assert mask(None, kind, **kw) is None  # nulls pass through, for every kind
        handled.add(kind)
    assert handled == set(Masking)


def test_dispatcher_refuses_missing_parameters_and_unknown_kinds():
    with pytest.raises(ValueError, match="key"):
        mask("x", "pseudonym")
    with pytest.raises(ValueError, match="reference_date"):
        mask(date(2000, 1, 1), "age_band")
    with pytest.raises(ValueError, match="width"):
        mask(1, "round")
    with pytest.raises(ValueError, match="unknown masking"):
        mask(1, "blur")
    with pytest.raises(TypeError, match="pyarrow"):
        m.partial_id({1, 2})


# ----------------------------------------------------------------------------- pseudonym


def test_pseudonym_is_the_keyed_hmac():
    expected = hmac.new(KEY_A, "640104".encode(), hashlib.sha256).hexdigest()[:16]
    assert mask("640104", "pseudonym", key=KEY_A) == expected
    assert len(m.pseudonym("x", key=KEY_A, length=32)) == 32


def test_two_scene_keys_never_join():
    values = list(range(1000)) + ["张伟", ID]
    a = m.pseudonym(values, key=KEY_A)
    b = m.pseudonym(values, key=KEY_B)
    assert len(set(a)) == len(values)          # no collisions within a scene
    assert not set(a) & set(b)                 # nothing in common across scenes
    assert all(x != y for x, y in zip(a, b))


def test_pseudonym_is_stable_and_joins_within_a_scene():
    # person_id is an integer everywhere; 42, 42.0, Decimal(42) and "42" are one person.
    p = m.pseudonym(42, key=KEY_A)
    assert {m.pseudonym(v, key=KEY_A) for v in (42, 42.0, Decimal("42"), "42")} == {p}
    assert m.pseudonym(date(2020, 1, 2), key=KEY_A) == m.pseudonym("2020-01-02", key=KEY_A)
    arr = m.pseudonym(pa.array([42, None, 42, 7], type=pa.int64()), key=KEY_A)
    assert arr.to_pylist() == [p, None, p, m.pseudonym(7, key=KEY_A)]
    same_on_all_paths(m.pseudonym, [1, None, 2, 1], key=KEY_A)
    same_on_all_paths(m.pseudonym, [date(2020, 1, 2), None], key=KEY_A)


def test_pseudonym_refuses_weak_keys():
    with pytest.raises(ValueError):
        m.pseudonym("x", key=b"short")
    with pytest.raises(ValueError):
        m.pseudonym("x", key="a string key of enough length")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.pseudonym("x", key=KEY_A, length=4)


# ----------------------------------------------------------------------------- partial masks


def test_partial_id():
    assert m.partial_id(ID) == "640104***********1"
    assert m.partial_id("11010519491231002x") == "110105***********X"
    assert m.partial_id("640104850312123") == "640104********3"
    assert m.partial_id(" 11010519491231002X ") == "110105***********X"
    assert m.partial_id("not an id") == "*********"
    assert m.partial_id("") == ""
    out = same_on_all_paths(m.partial_id, [ID, None, "11010519491231002X", ID])
    assert out == ["640104***********1", None, "110105***********X", "640104***********1"]
    assert all(len(x) == 18 for x in out if x)


def test_partial_phone():
    assert m.partial_phone("13912345678") == "139****5678"
    assert m.partial_phone("+86 139-1234-5678") == "139****5678"
    assert m.partial_phone("8613912345678") == "139****5678"
    assert m.partial_phone("0951-5012345") == "*******2345"
    assert m.partial_phone("110") == "***"
    same_on_all_paths(m.partial_phone, ["13912345678", None, "0951-5012345"])


def test_partial_name():
    assert m.partial_name("张伟") == "张*"
    assert m.partial_name("张小伟") == "张**"
    assert m.partial_name("欧阳娜娜") == "欧阳**"
    assert m.partial_name("欧阳娜") == "欧阳*"
    assert m.partial_name("欧阳") == "欧*"       # two characters: 欧 is the surname
    assert m.partial_name("张") == "*"
    same_on_all_paths(m.partial_name, ["张伟", None, "欧阳娜娜"])


# ----------------------------------------------------------------------------- dates


def test_year_and_month():
    d = date(1985, 3, 12)
    assert m.year(d) == 1985 and m.year("1985-03-12") == 1985 and m.year(datetime(1985, 3, 12, 8)) == 1985
    assert m.month(d) == "1985-03" and m.month("2020-11-30") == "2020-11"
    assert same_on_all_paths(m.year, [d, None, date(2020, 1, 1)]) == [1985, None, 2020]
    assert same_on_all_paths(m.month, [d, None]) == ["1985-03", None]
    assert m.month(pa.array(["1985-03-12", None])).to_pylist() == ["1985-03", None]
    ts = pa.array([datetime(2020, 1, 31, 23, 30)], type=pa.timestamp("us"))
    assert m.month(ts).to_pylist() == ["2020-01"] and m.year(ts).to_pylist() == [2020]
    # A zoned timestamp is masked in its own zone: 20:30 UTC on 31 January is February in Shanghai.
    zoned = pa.array([datetime(2020, 1, 31, 20, 30, tzinfo=timezone.utc)], type=pa.timestamp("s", tz="Asia/Shanghai"))
    assert m.month(zoned).to_pylist() == ["2020-02"]


def test_age_band():
    assert m.age_band(date(1985, 3, 12), reference_date=REF) == "40-44"
    assert m.age_band(date(1985, 7, 1), reference_date=REF) == "35-39"   # birthday not yet reached
    assert m.age_band(date(1985, 6, 30), reference_date=REF) == "40-44"  # birthday today
    assert m.age_band(date(1930, 1, 1), reference_date=REF) == "85+"
    assert m.age_band(date(1940, 7, 1), reference_date=REF) == "80-84"
    assert m.age_band(date(2025, 6, 30), reference_date=REF) == "0-4"
    assert m.age_band(date(2025, 7, 1), reference_date=REF) is None       # born after the reference
    # 29 February: counts from 1 March in a common year.
    assert m.age_band(date(2000, 2, 29), reference_date=date(2025, 2, 28)) == "20-24"
    assert m.age_band(date(2000, 2, 29), reference_date=date(2030, 2, 28)) == "25-29"
    assert m.age_band(date(2000, 2, 29), reference_date=date(2030, 3, 1)) == "30-34"
    assert m.age_band(date(1985, 3, 12), reference_date=REF, width=10, top=80) == "40-49"
    births = [date(1985, 3, 12), None, date(1930, 1, 1), date(2025, 7, 1), date(2000, 2, 29), date(2021, 1, 1)]
    out = same_on_all_paths(m.age_band, births, reference_date=REF)
    assert out == ["40-44", None, "85+", None, "25-29", "0-4"]
    assert mask(pa.array(births), "age_band", reference_date=REF).to_pylist() == out
    with pytest.raises(ValueError):
        m.age_band(date(1985, 3, 12), reference_date=REF, width=5, top=83)


# ----------------------------------------------------------------------------- district, round


def test_district():
    assert m.district("宁夏回族自治区银川市兴庆区解放东街12号3单元502室") == "兴庆区"
    assert m.district("金凤区正源北街1号") == "金凤区"
    assert m.district("灵武市某镇某村3组") == "灵武市"
    assert m.district("北京市海淀区") == "其他"
    assert m.district("贺兰县金凤路1号") == "贺兰县"
    assert m.district("西夏区团结路 (原金凤区)") == "西夏区"  # the leftmost district wins
    addrs = ["永宁县杨和镇", None, "上海市", "兴庆区", "银川市西夏区贺兰山西路"]
    assert same_on_all_paths(m.district, addrs) == ["永宁县", None, "其他", "兴庆区", "西夏区"]


def test_round():
    assert m.round_band(1234.5, width=100) == 1200.0
    assert m.round_band(1234, width=100) == 1200 and isinstance(m.round_band(1234, width=100), int)
    assert m.round_band(-1, width=10) == -10
    assert m.round_band(0.3, width=0.1) == 0.3
    assert m.round_band(12.7, width=2.5) == 12.5
    assert m.round_band(Decimal("12.34"), width=Decimal("0.5")) == Decimal("12.0")
    assert m.round_band(Decimal("199.99"), width=100) == Decimal("100")
    assert same_on_all_paths(m.round_band, [1234, None, -1, 7], width=10) == [1230, None, -10, 0]
    assert same_on_all_paths(m.round_band, [1234.5, None, 0.3, -0.05], width=0.1) == [1234.5, None, 0.3, -0.1]
    dec = pa.array([Decimal("199.99"), None], type=pa.decimal128(18, 2))
    assert m.round_band(dec, width=50).to_pylist() == [150.0, None]
    assert mask([17, None], "round", width=5) == [15, None]
    with pytest.raises(ValueError):
        m.round_band(1, width=0)


# ----------------------------------------------------------------------------- text, suppress, none


def test_pii_redact():
    text = f"患者张伟（身份证{ID}）自述头痛，联系电话13912345678"
    expected = "患者[姓名]（身份证[身份证号]）自述头痛，联系电话[手机号]"
    assert mask(text, "pii_redact") == expected
    assert mask([text, None], "pii_redact") == [expected, None]
    assert mask(pa.array([text, None, "无"]), "pii_redact").to_pylist() == [expected, None, "无"]
    with pytest.raises(TypeError):
        mask(12, "pii_redact")


def test_suppress_and_none():
    arr = pa.array([1, 2, None])
    out = mask(arr, "suppress")
    assert out.null_count == 3 and out.type == arr.type and len(out) == 3
    assert mask("secret", "suppress") is None
    assert mask(["a", "b"], "suppress") == [None, None]
    assert mask(pa.chunked_array([[1], [2, 3]]), "suppress").null_count == 3
    assert mask(arr, "none") is arr and mask("x", Masking.none) == "x"


def test_empty_and_all_null_arrays():
    for kind, kw, typ in [("pseudonym", {"key": KEY_A}, pa.int64()), ("partial_id", {}, pa.string()),
                          ("district", {}, pa.string()), ("age_band", {"reference_date": REF}, pa.date32()),
                          ("round", {"width": 10}, pa.int64()), ("month", {}, pa.date32())]:
        assert len(mask(pa.array([], type=typ), kind, **kw)) == 0
        assert mask(pa.array([None, None], type=typ), kind, **kw).to_pylist() == [None, None]
        assert mask(pa.chunked_array([], type=typ), kind, **kw).to_pylist() == []
