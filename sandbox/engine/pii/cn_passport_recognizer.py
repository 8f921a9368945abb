"""Chinese ordinary passport number (普通护照号码) recognizer."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

#: Letters used after the first one in the newer numbers (no I or O, which read as 1 and 0).
_LETTER = "[A-HJ-NP-Z]"
#: The number itself: ``E`` + 8 digits (electronic passports, 2012–), ``E``/``G`` + a letter +
#: 7 digits (``EA1234567``: once the ``E`` + 8-digit range ran out), and the older ``G`` + 8 digits.
_NUMBER = rf"(?:[EG][0-9]{{8}}|[EG]{_LETTER}[0-9]{{7}})"
#: Never inside a longer run of ASCII letters or digits (lookarounds, not ``\b``, which does not
#: separate a Chinese character from a letter or digit).
_BOUNDED = rf"(?<![0-9A-Za-z]){_NUMBER}(?![0-9A-Za-z])"
#: Words right before the number that say it is something else: a drug approval number (国药准字
#: H20003263 has the shape of a 回乡证), a batch, a model, a barcode…
NOT_PASSPORT_CUES: tuple[str, ...] = (
    "准字", "文号", "批准号", "登记号", "批号", "批次", "型号", "编号", "条码", "货号", "单号", "规格", "标本号",
    "样本号", "订单", "流水号", "序列号",
)
_NOT_AFTER = "(?<!(?:" + "|".join(NOT_PASSPORT_CUES) + r")[:：]?[ \u3000]?)"
#: Cue words right before the number (optionally followed by 号码/号, 为/是, a colon and a space).
PASSPORT_CUES: tuple[str, ...] = ("护照", "passport", "Passport", "PASSPORT")
_CUE = "(?<=(?:" + "|".join(PASSPORT_CUES) + r")(?:号码|号|No\.?)?(?:为|是)?[:：]?[ \u3000]?)"


class CnPassportRecognizer(PatternRecognizer):
    """Finds Chinese ordinary passport numbers: ``E`` + 8 digits, ``E``/``G`` + letter + 7 digits,
    or ``G`` + 8 digits, never inside a longer run of ASCII letters or digits.

    There is no check digit, so the score says how sure the context makes it:

    * ``cn_passport_cue`` (0.85): right after 护照 / 护照号 / 护照号码 (optionally ``:``/``：``, 为, a space);
    * ``cn_passport`` (0.4): the bare pattern anywhere else — deliberately low: a lot number, a model
      or a specimen barcode can have this shape. Right after 准字 (国药准字), 文号, 批号, 批次, 型号,
      编号, 条码, 单号, 流水号 … (``NOT_PASSPORT_CUES``) it is not reported at all.

    Not recognized: diplomatic and service passports (``D``/``S``/``P`` + 7 digits), the
    pre-1990s forms, foreign passports, and numbers written with spaces or lower-case letters.
    Context words (``CONTEXT``) do nothing with the no-op NLP engine; the cue lives in the pattern.
    """

    ENTITY = "CN_PASSPORT"
    PATTERNS = [
        Pattern("cn_passport_cue", _CUE + _BOUNDED, 0.85),
        Pattern("cn_passport", _NOT_AFTER + _BOUNDED, 0.4),
    ]
    CONTEXT = ["护照", "护照号", "护照号码"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnPassportRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )
