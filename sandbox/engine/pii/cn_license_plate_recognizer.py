"""Mainland vehicle licence plate (机动车号牌, 车牌号) recognizer."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

#: The one-character abbreviations of the 31 mainland provinces, regions and municipalities.
PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
#: Plate letters: I and O are never used (they read as 1 and 0).
_ALNUM = "[A-HJ-NP-Z0-9]"
_CITY = "[A-HJ-NP-Z]"
#: An optional separator after the issuing-authority letter, as plates are often typed: 宁A·12345.
_SEP = r"[·•\-\u00b7 ]?"
_NEW_ENERGY = rf"[{PROVINCES}]{_CITY}{_SEP}(?:[DF]{_ALNUM}[0-9]{{4}}|[0-9]{{5}}[DF])"
_ORDINARY = rf"[{PROVINCES}]{_CITY}{_SEP}{_ALNUM}{{5}}"
# The 8-character new-energy form first: at the same start, the 7-character form would stop short
# of the last character (and then fail the lookahead anyway).
PLATE_RE = rf"(?:{_NEW_ENERGY}|{_ORDINARY})(?![0-9A-Za-z])"


class CnLicensePlateRecognizer(PatternRecognizer):
    """Finds mainland licence plates: a province abbreviation (宁 京 粤 …), the issuing-authority
    letter, an optional ``·``/space/dash, then

    * 5 letters or digits (no I or O) with at least 3 digits — ordinary plates, ``宁A12345``,
      ``宁AB1234``; or
    * the 8-character new-energy form: ``D``/``F`` first then a letter or digit and 4 digits
      (``京AD12345``, small cars), or 5 digits then ``D``/``F`` (``京A12345D``, large vehicles).

    Never followed by another ASCII letter or digit (a lookahead, not ``\\b``). No check digit:
    score 0.7. Not recognized: plates ending in a Chinese character (挂 学 警 港 澳 领 使),
    military and embassy plates, lower-case letters, and plates written without the province.
    """

    ENTITY = "CN_LICENSE_PLATE"
    PATTERNS = [Pattern("cn_plate", PLATE_RE, 0.7)]
    CONTEXT = ["车牌", "车牌号", "号牌", "肇事车辆"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnLicensePlateRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )

    def validate_result(self, pattern_text: str) -> bool | None:
        # An ordinary plate has at most two letters among its last five characters (new-energy
        # plates always have at least four digits): "宁ABCDE" is a word, not a plate.
        tail = pattern_text[-5:]
        if sum(c.isdigit() for c in tail) < 3:
            return False
        return None  # plausible, unconfirmed: keep the pattern's score
