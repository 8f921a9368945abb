"""Unified social credit code (统一社会信用代码, GB 32100-2015) recognizer."""

from __future__ import annotations

import regex

from presidio_analyzer import Pattern, PatternRecognizer

from catalog.identifiers import USCC_CANDIDATE_RE, is_valid_uscc


class CnUsccRecognizer(PatternRecognizer):
    """Finds unified social credit codes: 18 characters of the GB 32100 alphabet (upper case, no
    I O S V Z), not inside a longer run of digits or capitals, kept only when the check character
    is right. An all-digit 18-character run that is also a valid resident ID number is reported as
    an ID number by ``sandbox.pii`` (overlap resolution), not as a code."""

    ENTITY = "CN_USCC"
    PATTERNS = [Pattern("uscc", USCC_CANDIDATE_RE.pattern, 0.3)]
    CONTEXT = ["统一社会信用代码", "信用代码", "社会信用代码"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnUsccRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,  # no IGNORECASE: the alphabet is upper case
        )

    def validate_result(self, pattern_text: str) -> bool:
        return is_valid_uscc(pattern_text)
