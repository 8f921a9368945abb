"""Bank card number (银行卡号) recognizer."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

from catalog.identifiers import luhn_valid
from sandbox.engine.pii.cn_id_recognizer import id_shaped

# catalog.identifiers.BANK_CARD_CANDIDATE_RE, except that an X right after the digits also ends the
# candidate: "64020219930915127X" is an ID number (with a wrong check character), and its first 17
# digits pass the Luhn check one time in ten.
_CONTIGUOUS_RE = r"(?<![0-9])[0-9]{16,19}(?![0-9Xx])"
# Cards are also written in groups of four: "6222 0212 3456 7890 128".
_GROUPED_RE = r"(?<![0-9])[0-9]{4}(?:[ -][0-9]{4}){3}(?:[ -]?[0-9]{1,3})?(?![0-9])"


class CnBankCardRecognizer(PatternRecognizer):
    """Finds bank card numbers: 16–19 digits (contiguous, or in groups of four separated by a space
    or a dash) not inside a longer digit run nor followed by an ``X``, kept only when the Luhn check
    digit is right — and not when it is 18 digits laid out like a resident ID number
    (``id_shaped``: a Luhn check passes by chance one time in ten, so a mistyped ID number or a
    region-and-date record number would otherwise be reported as a card)."""

    ENTITY = "CN_BANK_CARD"
    PATTERNS = [
        Pattern("bank_card", _CONTIGUOUS_RE, 0.3),
        Pattern("bank_card_grouped", _GROUPED_RE, 0.3),
    ]
    CONTEXT = ["银行卡", "卡号", "账号", "银行账户"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnBankCardRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )

    def validate_result(self, pattern_text: str) -> bool:
        digits = pattern_text.replace(" ", "").replace("-", "")
        return luhn_valid(digits) and not id_shaped(digits)
