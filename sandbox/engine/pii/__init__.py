"""Personal data in Chinese free text: Presidio recognizers, detection and redaction, offline.

The recognizers (one class per file in this package, Presidio's registry style) are
``PatternRecognizer`` subclasses whose check digits run in ``validate_result``:

* ``cn_id`` (``CN_ID_NUMBER``, ``[身份证号]``): 18 characters with the GB 11643 check character; also
  the old 15-digit form when its date is real (score 0.5, no check character to confirm it);
* ``uscc`` (``CN_USCC``, ``[统一社会信用代码]``): the GB 32100 check character;
* ``bank_card`` (``CN_BANK_CARD``, ``[银行卡号]``): 16–19 digits, contiguous or in groups of four, Luhn;
  neither a card nor a credit code is 18 digits laid out like an ID number (region code, real
  date: ``cn_id_recognizer.id_shaped``), which is a mistyped ID or a record number instead;
* ``phone`` (``CN_MOBILE``, ``[手机号]``): ``1[3-9]`` + 9 digits, optional +86 / 86 / 0086 prefix,
  also split 3-4-4 by spaces or dashes;
* ``email`` (``EMAIL_ADDRESS``, ``[电子邮箱]``): ASCII addresses;
* ``name`` (``CN_PERSON_NAME``, ``[姓名]``): a surname list + cue words (clinical, family,
  insurance claims, staff), a denylist of clinical words, no model (see ``cn_name_recognizer`` for
  what it misses);
* ``passport`` (``CN_PASSPORT``, ``[护照号]``): ``E`` + 8 digits, ``E``/``G`` + letter + 7 digits,
  ``G`` + 8 digits; 0.85 right after 护照(号码), 0.4 bare (no check digit: a lot number can look
  the same);
* ``travel_permit`` (``CN_TRAVEL_PERMIT``, ``[通行证号]``): 往来港澳通行证 ``C`` + 8 digits or
  ``C`` + letter + 7 digits, 回乡证 ``H``/``M`` + 8 or 10 digits (0.85 after a cue, 0.4 bare), and
  台胞证 8 digits (or the old 10 digits + bracketed letter), only right after its cue;
* ``plate`` (``CN_LICENSE_PLATE``, ``[车牌号]``): province character + letter + 5 letters/digits
  (at least 3 digits, no I/O), or the 8-character new-energy form (``D``/``F`` third or last);
* ``address`` (``CN_ADDRESS``, ``[地址]``): street addresses reaching a number (…路12号,
  …小区3栋2单元501室, …村三组25号), with their administrative parts; precision first (see
  ``cn_address_recognizer`` for what it misses).

The kind is the ``catalog.descriptor.PiiKind`` value. Every pattern bounds digits with digit
lookarounds, never ``\\b`` (which does not separate a Chinese character from a digit), and all
compile without IGNORECASE (the GB 32100 alphabet is upper case).

No model is downloaded, ever: ``analyzer()`` builds an ``AnalyzerEngine`` on Presidio's
``NoOpNlpEngine`` (no tokens, no lemmas; measured faster than a blank ``zh`` spaCy pipeline, which
``analyzer(nlp="spacy_blank")`` still offers) with a ``RecognizerRegistry`` holding exactly the
recognizers above for language ``zh``. None of them needs NLP artifacts.

Two paths give the same answer (``tests/test_pii.py`` checks that they do, finding for finding):

* ``find_pii`` / ``redact`` go through the engine and, for ``redact``, presidio-anonymizer's
  ``replace`` operator;
* ``find_pii_batch`` / ``redact_batch`` run the same recognizers' patterns, validators and score
  rules directly (no per-match explanation objects, no deep copies), then the engine's own
  clean-up (``EntityRecognizer.remove_duplicates``: a finding inside another of the same kind with
  an equal or higher score is dropped — which matters when several patterns of one recognizer
  match nested spans, as the address patterns can): several times faster, for whole columns.
  (They would part only if context words were passed to ``analyze()`` explicitly, which nothing
  here does: with the no-op engine, context words never change a score; the cue words of names,
  passports and permits live in the patterns themselves.)

Overlaps between entities of different kinds (an 18-digit run can pass the Luhn check and the
GB 32100 check at once) are resolved identically on both paths: higher score
first, then the longer span, then the kind order ``KIND_PRIORITY`` (ID number first).
"""

from __future__ import annotations

import bisect
import functools
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import regex
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, PatternRecognizer, RecognizerRegistry, RecognizerResult
from presidio_analyzer.nlp_engine import NlpEngine, NoOpNlpEngine
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig

from sandbox.engine.pii.cn_address_recognizer import GAZETTEER, CnAddressRecognizer
from sandbox.engine.pii.cn_bank_card_recognizer import CnBankCardRecognizer
from sandbox.engine.pii.cn_id_recognizer import CnIdRecognizer
from sandbox.engine.pii.cn_license_plate_recognizer import PROVINCES, CnLicensePlateRecognizer
from sandbox.engine.pii.cn_mobile_recognizer import CnMobileRecognizer
from sandbox.engine.pii.cn_name_recognizer import CUES, SURNAMES, CnNameRecognizer
from sandbox.engine.pii.cn_passport_recognizer import PASSPORT_CUES, CnPassportRecognizer
from sandbox.engine.pii.cn_travel_permit_recognizer import PERMIT_CUES, TAIWAN_CUES, CnTravelPermitRecognizer
from sandbox.engine.pii.cn_uscc_recognizer import CnUsccRecognizer
from sandbox.engine.pii.email_recognizer import EmailRecognizer

__all__ = [
    "LANGUAGE",
    "ENTITY_KIND",
    "KIND_ENTITY",
    "PLACEHOLDERS",
    "KIND_PRIORITY",
    "Finding",
    "recognizers",
    "analyzer",
    "find_pii",
    "redact",
    "find_pii_batch",
    "redact_batch",
    "CnIdRecognizer",
    "CnMobileRecognizer",
    "CnBankCardRecognizer",
    "CnUsccRecognizer",
    "CnNameRecognizer",
    "EmailRecognizer",
    "CnPassportRecognizer",
    "CnTravelPermitRecognizer",
    "CnLicensePlateRecognizer",
    "CnAddressRecognizer",
]

LANGUAGE = "zh"

#: Presidio entity type -> ``catalog.descriptor.PiiKind`` value.
ENTITY_KIND: dict[str, str] = {
    CnIdRecognizer.ENTITY: "cn_id",
    CnUsccRecognizer.ENTITY: "uscc",
    CnBankCardRecognizer.ENTITY: "bank_card",
    CnMobileRecognizer.ENTITY: "phone",
    EmailRecognizer.ENTITY: "email",
    CnNameRecognizer.ENTITY: "name",
    CnPassportRecognizer.ENTITY: "passport",
    CnTravelPermitRecognizer.ENTITY: "travel_permit",
    CnLicensePlateRecognizer.ENTITY: "plate",
    CnAddressRecognizer.ENTITY: "address",
}
KIND_ENTITY: dict[str, str] = {k: e for e, k in ENTITY_KIND.items()}

PLACEHOLDERS: dict[str, str] = {
    "cn_id": "[身份证号]",
    "uscc": "[统一社会信用代码]",
    "bank_card": "[银行卡号]",
    "phone": "[手机号]",
    "email": "[电子邮箱]",
    "name": "[姓名]",
    "passport": "[护照号]",
    "travel_permit": "[通行证号]",
    "plate": "[车牌号]",
    "address": "[地址]",
}

#: Tie-break between overlapping findings of equal score and length (first wins).
KIND_PRIORITY: tuple[str, ...] = ("cn_id", "uscc", "bank_card", "phone", "passport", "travel_permit", "plate",
                                  "email", "address", "name")
_RANK = {k: i for i, k in enumerate(KIND_PRIORITY)}

_RECOGNIZER_CLASSES = (CnIdRecognizer, CnUsccRecognizer, CnBankCardRecognizer, CnMobileRecognizer,
                       EmailRecognizer, CnNameRecognizer, CnPassportRecognizer, CnTravelPermitRecognizer,
                       CnLicensePlateRecognizer, CnAddressRecognizer)
_FLAGS = regex.DOTALL | regex.MULTILINE  # what every recognizer here compiles with (no IGNORECASE)


@dataclass(frozen=True, slots=True)
class Finding:
    """One piece of personal data in a text: ``text[start:end]`` is of ``kind`` (a ``PiiKind``
    value: cn_id, uscc, bank_card, phone, email, name, passport, travel_permit, plate, address)
    with Presidio's ``score`` (1.0 when a check digit confirmed it)."""

    kind: str
    start: int
    end: int
    score: float

    @property
    def entity(self) -> str:
        """The Presidio entity type (e.g. ``CN_ID_NUMBER``)."""
        return KIND_ENTITY[self.kind]

    @property
    def placeholder(self) -> str:
        return PLACEHOLDERS[self.kind]


def recognizers() -> list[PatternRecognizer]:
    """Fresh instances of the package's recognizers, language ``zh``."""
    return [cls(supported_language=LANGUAGE) for cls in _RECOGNIZER_CLASSES]


def _nlp_engine(nlp: str) -> NlpEngine:
    if nlp == "noop":
        return NoOpNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "noop"}])
    if nlp == "spacy_blank":
        import spacy
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        engine = SpacyNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "blank"}])
        engine.nlp = {LANGUAGE: spacy.blank(LANGUAGE)}  # set before first use: nothing is downloaded
        return engine
    raise ValueError(f"unknown NLP engine {nlp!r}: use 'noop' or 'spacy_blank'")


def analyzer(nlp: str = "noop") -> AnalyzerEngine:
    """A new offline ``AnalyzerEngine`` for language ``zh`` whose registry holds exactly this
    package's recognizers. ``nlp="noop"`` (default, faster) or ``"spacy_blank"``
    (``spacy.blank("zh")``, character tokens; no model download either)."""
    registry = RecognizerRegistry(recognizers=recognizers(), global_regex_flags=_FLAGS,
                                  supported_languages=[LANGUAGE])
    return AnalyzerEngine(registry=registry, nlp_engine=_nlp_engine(nlp), supported_languages=[LANGUAGE])


@functools.cache
def _default_analyzer() -> AnalyzerEngine:
    return analyzer()


@functools.cache
def _anonymizer() -> AnonymizerEngine:
    return AnonymizerEngine()


_OPERATORS = {e: OperatorConfig("replace", {"new_value": PLACEHOLDERS[k]}) for e, k in ENTITY_KIND.items()}


def _resolve(cands: Iterable[tuple[str, int, int, float]]) -> list[Finding]:
    """Non-overlapping findings, by start: greedily keep the highest score, then the longest
    span, then the kind first in ``KIND_PRIORITY``."""
    ordered = sorted(cands, key=lambda c: (-c[3], c[1] - c[2], _RANK[c[0]], c[1]))
    starts: list[int] = []  # the kept spans, disjoint, sorted by start
    kept: list[tuple[str, int, int, float]] = []
    for c in ordered:
        i = bisect.bisect_right(starts, c[1])
        if (i > 0 and kept[i - 1][2] > c[1]) or (i < len(kept) and kept[i][1] < c[2]):
            continue  # overlaps its left or right neighbour (the only candidates, spans being disjoint)
        starts.insert(i, c[1])
        kept.insert(i, c)
    return [Finding(*c) for c in kept]


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return text


def find_pii(text: str, *, engine: AnalyzerEngine | None = None) -> list[Finding]:
    """Personal data in ``text`` through Presidio's ``AnalyzerEngine`` (``engine``, or the
    default ``analyzer()``), as non-overlapping findings ordered by start."""
    _check_text(text)
    if not text:
        return []
    results = (engine or _default_analyzer()).analyze(text=text, language=LANGUAGE)
    return _resolve((ENTITY_KIND[r.entity_type], r.start, r.end, r.score) for r in results)


def redact(text: str, *, engine: AnalyzerEngine | None = None) -> str:
    """``text`` with every finding of ``find_pii`` replaced by its placeholder (``[身份证号]``,
    ``[手机号]``, …) by presidio-anonymizer's ``replace`` operator."""
    findings = find_pii(text, engine=engine)
    if not findings:
        return text
    results = [RecognizerResult(f.entity, f.start, f.end, f.score) for f in findings]
    # One placeholder per finding: the anonymizer would otherwise merge two same-kind findings
    # separated by spaces into one.
    return _anonymizer().anonymize(text=text, analyzer_results=results, operators=_OPERATORS,
                                   merge_entities_with_spaces=False).text


# ----------------------------------------------------------------------------- fast path


_LINE_BREAKS = "\n\r\x0b\x0c\x85\u2028\u2029"
_NAME_FIRST = frozenset(c[0] for c in SURNAMES)


def _search(pattern: str):
    """``text -> bool``: does ``pattern`` occur in the text (the standard library's ``re``, faster
    than ``regex`` for these simple searches)."""
    search = re.compile(pattern).search
    return lambda text: search(text) is not None


def _any_of(words: Iterable[str]):
    return _search("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


_DIGIT = _search("[0-9]")
# Every address has a number (or building letter) before 号 # 栋 幢 座 组 队 社 单元, or the 3-2-501
# shorthand (cn_address_recognizer.ANCHOR_RE; this class pair is implied by it).
_ADDRESS_ANCHOR = _search("[0-9A-Z一二三四五六七八九十][号#＃栋幢座组队社单-]")
_GAZETTEER_NAME = _any_of(GAZETTEER)

# Necessary conditions for a pattern to match at all (so skipping it when false changes nothing):
# they only save the regex engine a scan of texts that cannot match.
_PREFILTERS = {
    "cn_id_18": _DIGIT,
    "cn_id_15": _DIGIT,
    "bank_card": _DIGIT,
    "bank_card_grouped": _DIGIT,
    "cn_mobile": _DIGIT,
    "cn_mobile_86": _DIGIT,
    "cn_mobile_split": _search("[0-9][ -][0-9]{4}[ -][0-9]"),
    "email": _search("@"),
    "cn_name_cue": _any_of(CUES),
    "cn_name_proxy": _any_of(("代诉", "代述")),
    "cn_name_lead": lambda text: text[:1] in _NAME_FIRST or any(c in text for c in _LINE_BREAKS),
    "cn_passport_cue": _any_of(PASSPORT_CUES),
    "cn_passport": _search("[EG][0-9A-Z][0-9]{7}"),
    "cn_permit_cue": _any_of(PERMIT_CUES),
    "cn_permit": _search("[CHM][0-9A-Z][0-9]{7}"),
    "cn_permit_taiwan": _any_of(TAIWAN_CUES),
    "cn_plate": _search(f"[{PROVINCES}][A-HJ-NP-Z]"),
    "cn_address": _ADDRESS_ANCHOR,
    "cn_address_gazetteer": lambda text: _ADDRESS_ANCHOR(text) and _GAZETTEER_NAME(text),
}


class _Compiled:
    """The recognizers' patterns compiled once with their own flags, plus their validators."""

    def __init__(self) -> None:
        self.rules = []
        for rec in recognizers():
            kind = ENTITY_KIND[rec.supported_entities[0]]
            for p in rec.patterns:
                self.rules.append((kind, regex.compile(p.regex, flags=rec.global_regex_flags), p.score,
                                   rec.validate_result, rec.invalidate_result, _PREFILTERS.get(p.name)))

    def find(self, text: str, deadline: float | None = None) -> list[Finding]:
        cands: list[tuple[str, int, int, float]] = []
        for kind, rx, base, validate, invalidate, may_match in self.rules:
            if may_match is not None and not may_match(text):
                continue
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise TimeoutError("the PII scan ran out of time")
            for m in rx.finditer(text, timeout=timeout):
                start, end = m.span()
                if start == end:
                    continue
                s = m.group()
                score = base
                v = validate(s)
                if v is not None:
                    score = EntityRecognizer.MAX_SCORE if v else EntityRecognizer.MIN_SCORE
                if invalidate(s):
                    score = EntityRecognizer.MIN_SCORE
                if score > EntityRecognizer.MIN_SCORE:
                    cands.append((kind, start, end, score))
        if not cands:
            return []
        return _resolve(_drop_contained(cands) if len(cands) > 1 else cands)


def _drop_contained(cands: list[tuple[str, int, int, float]]) -> list[tuple[str, int, int, float]]:
    """What ``AnalyzerEngine.analyze`` does to the recognizers' results before returning them
    (``EntityRecognizer.remove_duplicates``), on candidates: exact duplicates go, and so does a
    candidate inside another of the same kind with an equal or higher score."""
    ordered = sorted(set(cands), key=lambda c: (c[0], c[1], c[1] - c[2], -c[3]))
    out: list[tuple[str, int, int, float]] = []
    active: list[tuple[str, int, int, float]] = []
    kind = None
    for c in ordered:
        if c[0] != kind:
            kind, active = c[0], []
        active = [a for a in active if a[2] >= c[1]]  # only these can contain c
        if any(c[1] >= a[1] and c[2] <= a[2] and c[3] <= a[3] for a in active):
            continue
        out.append(c)
        active.append(c)
    return out


@functools.cache
def _compiled() -> _Compiled:
    return _Compiled()


def _splice(text: str, findings: list[Finding]) -> str:
    if not findings:
        return text
    out, pos = [], 0
    for f in findings:
        out.append(text[pos:f.start])
        out.append(PLACEHOLDERS[f.kind])
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


def find_pii_batch(texts: Iterable[str | None], *, use_engine: bool = False,
                   deadline: float | None = None) -> list[list[Finding]]:
    """``find_pii`` for many texts (a null or empty text has no findings).

    By default the recognizers' compiled patterns and validators run directly — the same findings
    as the engine, several times faster; ``use_engine=True`` goes through ``AnalyzerEngine``.
    ``deadline`` (a ``time.monotonic()`` instant, fast path only): past it, ``TimeoutError``, even
    inside one long text (each pattern's search gets the time left as its ``timeout``)."""
    if use_engine:
        if deadline is not None:
            raise ValueError("a deadline is for the fast path only")
        eng = _default_analyzer()
        return [[] if t is None else find_pii(t, engine=eng) for t in texts]
    c = _compiled()
    return [[] if t is None else c.find(_check_text(t), deadline) for t in texts]


def redact_batch(texts: Iterable[str | None], *, use_engine: bool = False) -> list[str | None]:
    """``redact`` for many texts; nulls stay null. By default the fast path (same output as the
    engine and anonymizer, spliced directly); ``use_engine=True`` calls ``redact`` on each."""
    if use_engine:
        eng = _default_analyzer()
        return [None if t is None else redact(t, engine=eng) for t in texts]
    c = _compiled()
    return [None if t is None else _splice(t, c.find(_check_text(t))) for t in texts]
