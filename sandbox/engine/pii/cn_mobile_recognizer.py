"""Mainland China mobile number (手机号) recognizer."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

from catalog.identifiers import CN_MOBILE_CANDIDATE_RE

# catalog.identifiers.CN_MOBILE_CANDIDATE_RE accepts an optional "+86"; a bare "86" / "0086" prefix
# (as typed in many forms) is accepted here too. Digit lookarounds, not \b: a mobile number inside a
# longer digit run (an order number, a bank card) never matches, and one glued to Chinese text does.
_CN_MOBILE_PREFIXED_RE = r"(?<![0-9+])(?:0086|86)[ -]?1[3-9][0-9]{9}(?![0-9])"
# Split for reading, 3-4-4 with the same separator twice: "138-1234-5678", "138 1234 5678", with the
# same optional prefixes.
_CN_MOBILE_SPLIT_RE = r"(?<![0-9+])(?:(?:\+86|0086|86)[ -]?)?1[3-9][0-9]([ -])[0-9]{4}\1[0-9]{4}(?![0-9])"


class CnMobileRecognizer(PatternRecognizer):
    """Finds mainland mobile numbers: ``1[3-9]`` + 9 digits, optionally prefixed by ``+86``,
    ``86`` or ``0086`` (with an optional space or dash), never inside a longer digit run; also
    split 3-4-4 by spaces or dashes ("138-1234-5678", "+86 138 1234 5678").

    There is no check digit, so the score is the pattern's (0.75); landlines are not recognized.
    """

    ENTITY = "CN_MOBILE"
    PATTERNS = [
        Pattern("cn_mobile", CN_MOBILE_CANDIDATE_RE.pattern, 0.75),
        Pattern("cn_mobile_86", _CN_MOBILE_PREFIXED_RE, 0.75),
        Pattern("cn_mobile_split", _CN_MOBILE_SPLIT_RE, 0.75),
    ]
    CONTEXT = ["电话", "手机", "联系电话", "联系方式", "手机号"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnMobileRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )
