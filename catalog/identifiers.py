"""Validators for Chinese personal and organisational identifiers.

Pure functions: no I/O, no clock, no global state. They answer ``False`` (the ``is_*`` / ``*_valid``
functions) or raise ``ValueError`` (the extractors and check-character calculators) on bad input,
never anything else, so they are safe to call on arbitrary strings found in free text.

* Resident identity number, GB 11643-1999 (公民身份号码): 6-digit region code, 8-digit birth date
  ``YYYYMMDD``, 3-digit sequence (odd 17th digit = male, even = female), and a check character
  ``"10X98765432"[Σ dᵢ·wᵢ mod 11]`` with weights 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2.
* Unified social credit code, GB 32100-2015 (统一社会信用代码): 17 characters from the alphabet
  ``0123456789ABCDEFGHJKLMNPQRTUWXY`` (no I, O, S, V, Z), weights 1 3 9 27 19 26 16 17 20 29 25 13 8
  24 10 30 28, check ``alphabet[(31 − Σ cᵢ·wᵢ mod 31) mod 31]``.
* Bank card numbers: 16–19 digits with a Luhn (mod 10) check digit.
* Mainland mobile numbers: ``1[3-9]`` followed by 9 digits, optionally prefixed by ``+86``.

The regular expressions at the end find *candidates* in free text; confirm each with the validator.
Note that ``\\b`` does not separate a CJK character from a digit, so they use digit lookarounds.
"""

from __future__ import annotations

import re
from datetime import date

__all__ = [
    "CN_ID_WEIGHTS",
    "CN_ID_CHECK_CHARS",
    "USCC_ALPHABET",
    "USCC_WEIGHTS",
    "CN_ID_CANDIDATE_RE",
    "CN_MOBILE_CANDIDATE_RE",
    "USCC_CANDIDATE_RE",
    "BANK_CARD_CANDIDATE_RE",
    "cn_id_check_char",
    "is_valid_cn_id",
    "cn_id_birth_date",
    "cn_id_sex",
    "cn_id_region",
    "uscc_check_char",
    "is_valid_uscc",
    "luhn_check_digit",
    "luhn_valid",
    "is_cn_mobile",
]

# --------------------------------------------------------------------------- GB 11643 resident ID

CN_ID_WEIGHTS: tuple[int, ...] = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CN_ID_CHECK_CHARS = "10X98765432"


def cn_id_check_char(body17: str) -> str:
    """The GB 11643 check character (``'0'``–``'9'`` or ``'X'``) for the first 17 digits.

    >>> cn_id_check_char("11010519491231002")
    'X'

    Raises ``ValueError`` unless ``body17`` is exactly 17 ASCII digits.
    """
    if not isinstance(body17, str) or len(body17) != 17 or not _is_ascii_digits(body17):
        raise ValueError("a resident ID body is exactly 17 digits")
    total = sum(int(c) * w for c, w in zip(body17, CN_ID_WEIGHTS))
    return CN_ID_CHECK_CHARS[total % 11]


def _cn_id_date(s: str) -> date | None:
    try:
        return date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return None


def is_valid_cn_id(s: object) -> bool:
    """True if ``s`` is an 18-character GB 11643 resident ID number.

    Checks: 17 ASCII digits followed by a digit or ``X`` (a lower-case ``x``, common in hand-typed
    data, is accepted too); characters 7–14 form a real calendar date ``YYYYMMDD`` with a year from
    1800 on; the last character is the check character of the first 17. The region code is not
    looked up and the birth date is not compared with today (this module has no clock).
    """
    if not isinstance(s, str) or len(s) != 18:
        return False
    body, check = s[:17], s[17].upper()
    if not _is_ascii_digits(body) or check not in CN_ID_CHECK_CHARS:
        return False
    born = _cn_id_date(s)
    if born is None or born.year < 1800:
        return False
    return cn_id_check_char(body) == check


def cn_id_birth_date(s: str) -> date:
    """The birth date encoded in a valid resident ID number; ``ValueError`` if ``s`` is not valid."""
    if not is_valid_cn_id(s):
        raise ValueError("not a valid resident ID number")
    born = _cn_id_date(s)
    assert born is not None
    return born


def cn_id_sex(s: str) -> str:
    """``"M"`` if the 17th digit of a valid resident ID number is odd, else ``"F"``.

    ``ValueError`` if ``s`` is not valid.
    """
    if not is_valid_cn_id(s):
        raise ValueError("not a valid resident ID number")
    return "M" if int(s[16]) % 2 == 1 else "F"


def cn_id_region(s: str) -> str:
    """The 6-digit administrative region code (first six digits) of a valid resident ID number."""
    if not is_valid_cn_id(s):
        raise ValueError("not a valid resident ID number")
    return s[:6]


# --------------------------------------------------------------------------- GB 32100 USCC

USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_WEIGHTS: tuple[int, ...] = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_USCC_VALUE = {c: i for i, c in enumerate(USCC_ALPHABET)}


def uscc_check_char(body17: str) -> str:
    """The GB 32100 check character for the first 17 characters of a unified social credit code.

    Raises ``ValueError`` unless ``body17`` is 17 characters of the code alphabet (upper case).
    """
    if not isinstance(body17, str) or len(body17) != 17:
        raise ValueError("a USCC body is exactly 17 characters")
    try:
        total = sum(_USCC_VALUE[c] * w for c, w in zip(body17, USCC_WEIGHTS))
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the USCC alphabet") from None
    return USCC_ALPHABET[(31 - total % 31) % 31]


def is_valid_uscc(s: object) -> bool:
    """True if ``s`` is an 18-character unified social credit code with a correct check character.

    Upper case only (the standard's alphabet); the registration-authority and organisation-type
    characters and the embedded region code are not interpreted.
    """
    if not isinstance(s, str) or len(s) != 18 or any(c not in _USCC_VALUE for c in s):
        return False
    return uscc_check_char(s[:17]) == s[17]


# --------------------------------------------------------------------------- Luhn bank cards


def luhn_check_digit(payload: str) -> str:
    """The Luhn check digit to append to ``payload`` (ASCII digits, at least one)."""
    if not isinstance(payload, str) or not payload or not _is_ascii_digits(payload):
        raise ValueError("a Luhn payload is one or more digits")
    total = 0
    # Doubling starts with the rightmost payload digit (it sits left of the check digit).
    for i, c in enumerate(reversed(payload)):
        d = int(c)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(digits: object, *, min_length: int = 16, max_length: int = 19) -> bool:
    """True if ``digits`` is a string of ``min_length``–``max_length`` (default 16–19, a bank card)
    ASCII digits whose last digit is the Luhn check digit of the rest. No spaces or dashes."""
    if not isinstance(digits, str) or not (min_length <= len(digits) <= max_length):
        return False
    if not _is_ascii_digits(digits):
        return False
    return luhn_check_digit(digits[:-1]) == digits[-1]


# --------------------------------------------------------------------------- mobile numbers

_CN_MOBILE_RE = re.compile(r"(?:\+86[ -]?)?1[3-9][0-9]{9}")


def is_cn_mobile(s: object) -> bool:
    """True if ``s`` is a mainland mobile number: ``1[3-9]`` + 9 digits, optionally ``+86`` first
    (with an optional single space or dash after it). Nothing else is allowed around it."""
    return isinstance(s, str) and _CN_MOBILE_RE.fullmatch(s) is not None


# --------------------------------------------------------------------------- candidate patterns

#: 18-character resident ID candidates not embedded in a longer digit run.
CN_ID_CANDIDATE_RE = re.compile(r"(?<![0-9])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")
#: Mobile number candidates (optionally +86) not embedded in a longer digit run.
CN_MOBILE_CANDIDATE_RE = re.compile(r"(?<![0-9])(?:\+86[ -]?)?1[3-9][0-9]{9}(?![0-9])")
#: Unified social credit code candidates.
USCC_CANDIDATE_RE = re.compile(r"(?<![0-9A-Z])[0-9A-HJ-NPQRTUWXY]{18}(?![0-9A-Z])")
#: Bank card candidates (16–19 digits not embedded in a longer digit run).
BANK_CARD_CANDIDATE_RE = re.compile(r"(?<![0-9])[0-9]{16,19}(?![0-9])")


def _is_ascii_digits(s: str) -> bool:
    # str.isdigit() accepts full-width and other Unicode digits; int() would then accept them too.
    return s.isascii() and s.isdigit()
