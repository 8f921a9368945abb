"""Unified social credit code (统一社会信用代码, GB 32100-2015) recognizer."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

from catalog.identifiers import USCC_CANDIDATE_RE, is_valid_uscc
from sandbox.engine.pii.cn_id_recognizer import id_shaped


class CnUsccRecognizer(PatternRecognizer):
    """Finds unified social credit codes: 18 characters of the GB 32100 alphabet (upper case, no
    I O S V Z), not inside a longer run of digits or capitals, kept only when the check character
    is right, and not laid out like a resident ID number (``cn_id_recognizer.id_shaped``: an
    all-digit run with a region code and a real date passes the GB 32100 check by chance one time
    in 31; it is a mistyped ID number or a record number, not a code). A valid ID number is thus
    never a code either."""

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
        return is_valid_uscc(pattern_text) and not id_shaped(pattern_text)
