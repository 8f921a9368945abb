"""E-mail address recognizer (ASCII addresses)."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

# ASCII character classes spelled out, so that Chinese text glued to an address does not become
# part of it, and a lookbehind instead of \b (which does not separate CJK from ASCII letters).
_EMAIL_RE = (
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)


class EmailRecognizer(PatternRecognizer):
    """Finds ASCII e-mail addresses (``local@domain.tld``); internationalized addresses are not
    recognized. No validation beyond the pattern (score 0.9)."""

    ENTITY = "EMAIL_ADDRESS"
    PATTERNS = [Pattern("email", _EMAIL_RE, 0.9)]
    CONTEXT = ["邮箱", "电子邮件", "email", "e-mail"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="EmailRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )
