"""Recognizer for the permits between the mainland and Hong Kong, Macao and Taiwan (通行证)."""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

from sandbox.engine.pii.cn_passport_recognizer import NOT_PASSPORT_CUES

_LETTER = "[A-HJ-NP-Z]"
_LEFT = r"(?<![0-9A-Za-z])"
_RIGHT = r"(?![0-9A-Za-z])"
#: 往来港澳通行证 (mainland residents to Hong Kong / Macao): ``C`` + 8 digits, or ``C`` + a letter
#: + 7 digits on the newer cards.
_HK_MO_EXIT = rf"C(?:[0-9]{{8}}|{_LETTER}[0-9]{{7}})"
#: 港澳居民来往内地通行证 (回乡证): ``H`` (Hong Kong) or ``M`` (Macao) + 8 digits (cards since 2013;
#: the first 8 stay the same for life) or + 10 digits (the older booklet numbers).
_HOME_RETURN = r"[HM](?:[0-9]{10}|[0-9]{8})"
#: Words right before a letter-prefixed number that say it is something else (see the passport
#: recognizer).
_NOT_AFTER = "(?<!(?:" + "|".join(NOT_PASSPORT_CUES) + r")[:：]?[ \u3000]?)"
#: Cue words for any of the permits, optionally followed by 号码/号/证号, 为/是, a colon and a space.
PERMIT_CUES: tuple[str, ...] = (
    "往来港澳通行证", "港澳通行证", "来往内地通行证", "来往大陆通行证", "通行证", "回乡证", "台胞证",
)
_CUE_TAIL = r"(?:号码|证号|号)?(?:为|是)?[:：]?[ \u3000]?"
_CUE = "(?<=(?:" + "|".join(PERMIT_CUES) + ")" + _CUE_TAIL + ")"
#: 台湾居民来往大陆通行证 (台胞证): 8 digits on the cards issued since 2015. A bare 8-digit number
#: is anything (a date, an invoice number), so it is only taken right after a 台胞证 cue.
TAIWAN_CUES: tuple[str, ...] = ("台胞证", "台湾居民来往大陆通行证", "台湾同胞来往大陆通行证")
_TAIWAN_CUE = "(?<=(?:" + "|".join(TAIWAN_CUES) + ")" + _CUE_TAIL + ")"


class CnTravelPermitRecognizer(PatternRecognizer):
    """Finds the numbers of the Hong Kong / Macao / Taiwan travel permits:

    * ``C`` + 8 digits or ``C`` + letter + 7 digits (往来港澳通行证, mainland residents);
    * ``H``/``M`` + 8 or 10 digits (港澳居民来往内地通行证, "回乡证");
    * 8 digits right after 台胞证 / 台湾居民来往大陆通行证 (台胞证; never without the cue), or the
      pre-2015 form, 10 digits and a bracketed letter (``1234567890(B)``), after the same cue.

    No check digit: the letter-prefixed forms score 0.85 right after a cue word (通行证, 回乡证,
    台胞证, … with an optional 号码/号, 为, colon, space) and 0.4 bare — low on purpose, since an
    ``H`` or ``M`` + 8 digits may be a drug approval number, a model or a batch (not reported at
    all right after 准字 — 国药准字H20003263 —, 批号, 型号, 编号, 条码 …, like passports). The
    Taiwan forms always need their cue (0.85).

    Not recognized: the booklet 往来港澳通行证 (``W`` + 8 digits), numbers split by spaces,
    lower-case letters. Context words do nothing with the no-op NLP engine; the cues live in the
    patterns.
    """

    ENTITY = "CN_TRAVEL_PERMIT"
    PATTERNS = [
        Pattern("cn_permit_cue", _CUE + _LEFT + f"(?:{_HK_MO_EXIT}|{_HOME_RETURN})" + _RIGHT, 0.85),
        Pattern("cn_permit", _NOT_AFTER + _LEFT + f"(?:{_HK_MO_EXIT}|{_HOME_RETURN})" + _RIGHT, 0.4),
        Pattern("cn_permit_taiwan", _TAIWAN_CUE + r"(?<![0-9])(?:[0-9]{8}|[0-9]{10}[(（][A-Z][)）])(?![0-9])", 0.85),
    ]
    CONTEXT = list(PERMIT_CUES)

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnTravelPermitRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )
