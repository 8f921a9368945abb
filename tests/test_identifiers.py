"""Tests for catalog.identifiers: known-good values worked out here from the published algorithms
(independently of the module), known-bad values one character away from them."""

from __future__ import annotations

from datetime import date

import pytest

from catalog.identifiers import (
    CN_ID_CANDIDATE_RE,
    CN_MOBILE_CANDIDATE_RE,
    cn_id_birth_date,
    cn_id_check_char,
    cn_id_region,
    cn_id_sex,
    is_cn_mobile,
    is_valid_cn_id,
    is_valid_uscc,
    luhn_check_digit,
    luhn_valid,
    uscc_check_char,
)

# ----------------------------------------------------------------------------- GB 11643 by hand

W = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]


def _hand_check(body: str) -> str:
    return "10X98765432"[sum(int(d) * w for d, w in zip(body, W)) % 11]


def test_cn_id_worked_example_with_x():
    # 1 1 0 1 0 5 1 9 4 9 1 2 3 1 0 0 2 weighted:
    # 7+9+0+5+0+20+2+9+24+27+7+18+30+5+0+0+4 = 167; 167 mod 11 = 2 -> "10X98765432"[2] = "X"
    body = "11010519491231002"
    assert sum(int(d) * w for d, w in zip(body, W)) == 167
    assert cn_id_check_char(body) == "X"
    assert is_valid_cn_id(body + "X")
    assert is_valid_cn_id(body + "x")  # lower-case x from hand-typed data is accepted
    assert cn_id_birth_date(body + "X") == date(1949, 12, 31)
    assert cn_id_sex(body + "X") == "F"  # 17th digit 2 is even
    assert cn_id_region(body + "X") == "110105"


def test_cn_id_yinchuan_examples():
    # 640104 19850312 123: 6*7+4*9+0+1*5+0+4*4 + 1*2+9*1+8*6+5*3+0+3*9+1*10+2*5+1*8+2*4+3*2
    body = "64010419850312123"
    s = 42 + 36 + 0 + 5 + 0 + 16 + 2 + 9 + 48 + 15 + 0 + 27 + 10 + 10 + 8 + 8 + 6
    assert s == sum(int(d) * w for d, w in zip(body, W))
    check = "10X98765432"[s % 11]
    assert cn_id_check_char(body) == check
    full = body + check
    assert is_valid_cn_id(full)
    assert cn_id_sex(full) == "M"  # 3 is odd
    assert cn_id_birth_date(full) == date(1985, 3, 12)


@pytest.mark.parametrize(
    "body",
    ["64010519700101001", "64010620000229002", "64012119251231999", "64018120241231500", "64012219600615456"],
)
def test_cn_id_check_char_matches_hand_computation(body):
    assert cn_id_check_char(body) == _hand_check(body)
    assert is_valid_cn_id(body + _hand_check(body))


def test_cn_id_every_check_char_reachable():
    seen = set()
    for seq in range(200):
        body = f"64010619900101{seq:03d}"
        seen.add(cn_id_check_char(body))
    assert seen == set("10X98765432")


@pytest.mark.parametrize(
    "bad",
    [
        "11010519491231002Y",  # not a check char
        "110105194912310021",  # wrong check char
        "11010519491231002",  # 17 chars
        "11010519491231002XX",  # 19 chars
        "110105194902300021",  # 1949-02-30 is not a date (check char irrelevant)
        "11010517991231002X",  # year before 1800
        "1101051949123100２X",  # full-width digit
        "",
        None,
        110105194912310020,
    ],
)
def test_cn_id_invalid(bad):
    assert not is_valid_cn_id(bad)


def test_cn_id_bad_date_even_with_right_check_char():
    body = "64010419850230123"  # 30 February
    assert not is_valid_cn_id(body + _hand_check(body))
    body = "64010419851301123"  # month 13
    assert not is_valid_cn_id(body + _hand_check(body))


def test_cn_id_single_digit_error_detected():
    good = "64010419850312123" + _hand_check("64010419850312123")
    for i in range(17):
        for d in "0123456789":
            if d == good[i]:
                continue
            mutated = good[:i] + d + good[i + 1 :]
            assert not is_valid_cn_id(mutated) or _hand_check(mutated[:17]) == mutated[17]
            # GB 11643 detects every single-digit substitution:
            assert _hand_check(mutated[:17]) != good[17]


def test_cn_id_extractors_raise_on_invalid():
    with pytest.raises(ValueError):
        cn_id_birth_date("110105194912310021")
    with pytest.raises(ValueError):
        cn_id_sex("not an id")
    with pytest.raises(ValueError):
        cn_id_check_char("1234")
    with pytest.raises(ValueError):
        cn_id_check_char("1101051949123100A")


def test_cn_id_sex_female_and_male():
    for seq, sex in (("120", "F"), ("121", "M"), ("998", "F"), ("509", "M")):
        body = "64012219700707" + seq
        assert cn_id_sex(body + _hand_check(body)) == sex


def test_cn_id_candidate_regex_in_chinese_text():
    body = "64010419850312123"
    full = body + _hand_check(body)
    text = f"患者张伟（身份证{full}）自述头痛三天"
    assert CN_ID_CANDIDATE_RE.findall(text) == [full]
    assert CN_ID_CANDIDATE_RE.findall("流水号1" + full) == []  # 19-digit run is not an ID


# ----------------------------------------------------------------------------- GB 32100 by hand

ALPHA = "0123456789ABCDEFGHJKLMNPQRTUWXY"
UW = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]


def _hand_uscc(body: str) -> str:
    return ALPHA[(31 - sum(ALPHA.index(c) * w for c, w in zip(body, UW)) % 31) % 31]


def test_uscc_published_example():
    # The standard's sample code 91350100M000100Y43:
    # 9*1+1*3+3*9+5*27+0+1*26+0+0+M(21)*20+0+0+0+1*8+0+0+Y(30)*30+4*28 = 1640; 1640 mod 31 = 28;
    # 31 - 28 = 3 -> alphabet[3] = "3"
    body = "91350100M000100Y4"
    assert sum(ALPHA.index(c) * w for c, w in zip(body, UW)) == 1640
    assert uscc_check_char(body) == "3"
    assert is_valid_uscc("91350100M000100Y43")


@pytest.mark.parametrize("body", ["91640100MA76XYW12", "12640000455012345", "52640104MJX000011", "91640106000000000"])
def test_uscc_hand_computed(body):
    assert uscc_check_char(body) == _hand_uscc(body)
    assert is_valid_uscc(body + _hand_uscc(body))


def test_uscc_check_char_zero_case():
    # Find a body whose weighted sum is a multiple of 31: the check is alphabet[(31 - 0) mod 31] = "0".
    for n in range(10_000):
        body = f"9164010000000{n:04d}"
        if sum(ALPHA.index(c) * w for c, w in zip(body, UW)) % 31 == 0:
            break
    else:  # pragma: no cover
        pytest.fail("no body found")
    assert uscc_check_char(body) == "0"
    assert is_valid_uscc(body + "0")


@pytest.mark.parametrize(
    "bad",
    [
        "91350100M000100Y44",  # wrong check
        "91350100M000100Y4",  # 17 chars
        "91350100M000100I43",  # I is not in the alphabet
        "91350100m000100y43",  # lower case
        "",
        None,
    ],
)
def test_uscc_invalid(bad):
    assert not is_valid_uscc(bad)


def test_uscc_check_char_rejects_bad_alphabet():
    with pytest.raises(ValueError):
        uscc_check_char("91350100O000100Y4")
    with pytest.raises(ValueError):
        uscc_check_char("9135")


# ----------------------------------------------------------------------------- Luhn


def _hand_luhn_ok(s: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(s)):
        d = int(c) * (2 if i % 2 == 1 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",  # the classic Visa test number (16)
        "5500000000000004",  # Mastercard test number (16)
        "6011000990139424",  # Discover test number (16)
    ],
)
def test_luhn_known_good(card):
    assert _hand_luhn_ok(card)
    assert luhn_valid(card)


def test_luhn_19_digit_unionpay_style():
    payload = "622202123456789012"  # 18 digits + check = 19
    check = luhn_check_digit(payload)
    assert _hand_luhn_ok(payload + check)
    assert luhn_valid(payload + check)
    for wrong in "0123456789":
        if wrong != check:
            assert not luhn_valid(payload + wrong)


@pytest.mark.parametrize(
    "bad",
    [
        "4111111111111112",  # check digit off by one
        "411111111111111",  # 15 digits
        "41111111111111111111",  # 20 digits
        "4111 1111 1111 1111",
        "411111111111111a",
        None,
    ],
)
def test_luhn_invalid(bad):
    assert not luhn_valid(bad)


def test_luhn_length_is_configurable():
    assert luhn_valid("79927398713", min_length=11)  # the textbook Luhn example
    assert not luhn_valid("79927398713")


# ----------------------------------------------------------------------------- mobile


@pytest.mark.parametrize("good", ["13912345678", "19800000000", "+8615012345678", "+86 17712345678", "+86-18612345678"])
def test_mobile_good(good):
    assert is_cn_mobile(good)


@pytest.mark.parametrize(
    "bad", ["12912345678", "1391234567", "139123456789", "23912345678", "8613912345678", "+8512345678901", "", None]
)
def test_mobile_bad(bad):
    assert not is_cn_mobile(bad)


def test_mobile_candidate_regex():
    text = "联系电话13912345678，座机0951-1234567，卡号6222021234567890123"
    assert CN_MOBILE_CANDIDATE_RE.findall(text) == ["13912345678"]
