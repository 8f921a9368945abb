"""Resident identity number (公民身份号码, GB 11643-1999) recognizer."""

from __future__ import annotations

from datetime import date

import regex
from presidio_analyzer import Pattern, PatternRecognizer

from catalog.identifiers import CN_ID_CANDIDATE_RE, is_valid_cn_id

# The 1985-era 15-digit form: 6-digit region, YYMMDD (19YY), 3-digit sequence, no check character.
# Bounded by digits / ASCII letters like the 18-character form, never inside a longer digit run.
_CN_ID15_RE = r"(?<![0-9])[1-8][0-9]{5}[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}(?![0-9A-Za-z])"


def id_shaped(s: str) -> bool:
    """True if ``s`` is 18 characters laid out like a resident ID number — 17 ASCII digits and a
    digit or ``X``/``x``, a first digit 1–8 (a region code), characters 7–14 a real date from
    1900 to 2099 — whatever its check character.

    The bank card and credit code recognizers drop such a candidate: an 18-digit number shaped like
    an ID number but failing its check is a mistyped ID number or a record number built from a
    region code and a date far more often than a card (a card's digits 7–14 form such a date by
    chance well under 0.1% of the time)."""
    if len(s) != 18 or not (s[:17].isascii() and s[:17].isdigit()) or s[17] not in "0123456789Xx":
        return False
    if s[0] not in "12345678" or s[6:8] not in ("19", "20"):
        return False
    try:
        date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return True


class CnIdRecognizer(PatternRecognizer):
    """Finds GB 11643 resident ID numbers.

    * 18 characters (17 digits + digit or ``X``/``x``), not inside a longer digit run: the pattern is
      ``catalog.identifiers.CN_ID_CANDIDATE_RE`` (digit lookarounds, so it works next to Chinese
      characters, where ``\\b`` does not); ``validate_result`` keeps only numbers whose birth date
      is a real date and whose check character is right (score 1.0), and drops the rest.
    * Optionally the old 15-digit form (no check character): kept when its ``19YYMMDD`` is a real
      date, at a lower score (0.5) since nothing else confirms it.
    """

    ENTITY = "CN_ID_NUMBER"
    PATTERNS = [
        Pattern("cn_id_18", CN_ID_CANDIDATE_RE.pattern, 0.5),
        Pattern("cn_id_15", _CN_ID15_RE, 0.5),
    ]
    CONTEXT = ["身份证", "身份证号", "证件号", "公民身份号码"]

    def __init__(self, supported_language: str = "zh", include_15_digit: bool = True) -> None:
        patterns = [Pattern(p.name, p.regex, p.score) for p in self.PATTERNS
                    if include_15_digit or p.name != "cn_id_15"]
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnIdRecognizer",
            supported_language=supported_language,
            patterns=patterns,
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )

    def validate_result(self, pattern_text: str) -> bool | None:
        if len(pattern_text) == 18:
            return is_valid_cn_id(pattern_text)
        if len(pattern_text) == 15 and pattern_text.isascii() and pattern_text.isdigit():
            try:
                date(1900 + int(pattern_text[6:8]), int(pattern_text[8:10]), int(pattern_text[10:12]))
            except ValueError:
                return False
            return None  # plausible, but unconfirmed: keep the pattern's score
        return False
