"""Chinese street address (住址) recognizer, rule-based and precision-first.

An address is reported only when it reaches a *numbered* local part; administrative names alone
("银川市", "兴庆区丽景街道") are not addresses here. Its shape:

    [administrative parts]  local part [local part …]  [building / unit / room]

* administrative parts (up to five, each optional): a name of 1–6 characters ending in 省 自治区
  自治州 市 州 盟 地区 区 县 旗 镇 乡 街道 ("宁夏回族自治区银川市兴庆区丽景街道"), each read at its
  shortest and never re-split (atomic, so the pattern's work per start stays small whatever the
  text: see ``_ADMIN_PART``);
* local part, at least one, numbered:
  - a road (… 路 街 大街 大道 道 巷 胡同 弄 里) and a house number ``12号``, ``12-3号``, ``12之1号``,
    ``123弄4号``, ``12号院``, or a building ``3号楼`` / ``3栋`` / ``A座``;
  - a compound (… 小区 花园 家园 嘉园 公寓 大厦 新村 社区 苑 园 城 府 庭 湾 广场 公馆 家属院 大院
    宿舍) and a building (``3栋``, ``12号楼``, ``3#楼``, ``A座``, ``三号楼``) or the ``3-2-501``
    shorthand;
  - a village (… 村) and a group and/or house number (``三组``, ``5队``, ``25号``);
* then optionally a building, ``2单元`` / ``二单元``, and a room (``501室``, or a bare ``501``
  right after a building or unit).

Where the address starts: the place-name characters exclude words that introduce an address or
belong to the sentence around it (住 址 在 于 至 自 现 籍 患 者 诉 …, ``PLACE_STOP_CHARS``), so
"家住银川市…" yields "银川市…". Two patterns:

* ``cn_address`` (0.6): the address starts after punctuation, a space, the start of a line or one
  of 住 在 于 至 往 到 址 居 籍 自 从 为 是 系 位 返 ("家住", "住址：", "位于", "来自"…);
* ``cn_address_gazetteer`` (0.65): anywhere, but only starting with an administrative part that
  begins with a known province, provincial capital or Ningxia city/district/county name
  (``GAZETTEER``): "张伟银川市…" yields "银川市…" where ``cn_address`` would take "张伟银川市…"
  (a line start is a boundary too). Where both match, this one wins (higher score). A road named
  after a place ("朝阳区北京路12号") does not start it: the gazetteer name must open an
  administrative part (北京市, 宁夏回族自治区, 兴庆区).

Misses, by design (precision over recall): addresses without a number ("兴庆区丽景街道阳光小区"),
house numbers and rooms in Chinese numerals ("解放西街十二号"; buildings, units and village groups
in Chinese numerals are found: "三号楼二单元", "三组"), full-width digits ("１２号"),
rural addresses below the village without 组/队/号, house numbers with letters ("12号A"),
place names containing a stop character, and an administrative part that only reads right when
extended past a shorter suffix inside it (自治区/自治州 straight after another suffix: "…镇自治州").
Spans can be too long: an address glued to a preceding word that has no stop character and opens
no gazetteer administrative part takes that word along ("张伟解放西街12号" as a whole), and one
with no boundary before it at all may start a few words early. An institution's address (a
hospital's) is reported like anyone's: the text cannot tell them apart.
"""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

#: Characters never inside a place name here: words that introduce an address (家住, 住址, 现居,
#: 位于, 来自, 户籍地, 送至, 返回…) or belong to the clinical sentence around it.
PLACE_STOP_CHARS = "住址在于至往到居籍自从为是系位返现患者诉称述的了被将把其该此年岁男女性因诊疗病症痛咳嗽次床送伤摔撞昨今晨"


def _han_except(stop: str) -> str:
    """A character class of the CJK Unified Ideographs block without ``stop`` (spelled as ranges:
    faster than a negative lookahead before every character)."""
    ranges, lo = [], 0x4E00
    for cp in sorted({ord(c) for c in stop}):
        if lo < cp:
            ranges.append((lo, cp - 1))
        lo = cp + 1
    ranges.append((lo, 0x9FFF))
    return "[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]"


_H = _han_except(PLACE_STOP_CHARS)
_NUM = "[0-9一二三四五六七八九十]"

_ADMIN = _H + "{1,6}?(?:自治区|自治州|地区|街道|省|市|州|盟|区|县|旗|镇|乡)"
#: One administrative part, atomic: its shortest reading is kept and never re-split. The suffixes
#: are also place-name characters, so a run of them ("镇镇镇…") splits into parts in thousands of
#: ways, and the pattern used to try the local part after every split (about 2 ms per start, 55 µs
#: per character of "在" + 30 × "镇" + "1号"). Atomic parts leave at most six readings (how many
#: parts) per start. What this gives up: a part that must extend past a shorter suffix inside it,
#: which only happens when 自治区/自治州 follows another suffix directly ("…镇自治州"); on the
#: labelled corpus, the synthetic free texts and the PII tests' fuzz the findings are the same.
_ADMIN_PART = "(?>" + _ADMIN + ")"
_BLDG = "(?:[0-9A-Z]{1,3}|[一二三四五六七八九十]{1,3})(?:号楼|#楼|＃楼|栋|幢|座)"
_HOUSE = "[0-9]{1,5}(?:弄[0-9]{1,4})?(?:[-之][0-9]{1,4})?号(?:院)?(?!楼)"
_ROAD = _H + "{1,8}?(?:大街|大道|胡同|路|街|巷|弄|道|里)(?:" + _HOUSE + "|" + _BLDG + ")"
_COMPOUND_SUFFIX = "(?:小区|花园|家园|嘉园|公寓|大厦|新村|社区|家属院|大院|宿舍|广场|公馆|苑|园|城|府|庭|湾)"
_COMPOUND = (_H + "{1,10}?" + _COMPOUND_SUFFIX
             + "(?:" + _BLDG + "|[0-9]{1,3}-[0-9]{1,2}-[0-9]{1,5}(?:室|(?![0-9])))")
_VILLAGE = (_H + "{1,6}?村(?:" + _NUM + "{1,3}(?:组|队|社)(?:[0-9]{1,5}号)?|[0-9]{1,5}号)")
_TAIL = ("(?:" + _BLDG + ")?(?:" + _NUM + "{1,2}单元)?"
         "(?:(?<=[栋幢座楼元])[0-9]{1,5}(?:室|号|户|(?![0-9]))|[0-9]{1,5}室)?")
_LOCAL = "(?:" + "|".join((_ROAD, _COMPOUND, _VILLAGE)) + "){1,3}" + _TAIL

#: Necessary for any match (every address has one): a number (or a building letter) right before
#: 号 # 栋 幢 座 组 队 社 单元, or the 3-2-501 shorthand. ``sandbox.engine.pii`` uses it to skip texts
#: without one before running the patterns.
ANCHOR_RE = "[0-9A-Z一二三四五六七八九十](?:号|#|＃|栋|幢|座|组|队|社|单元)|[0-9]-[0-9]"

#: What may come right before an address for ``cn_address``: the start of the text, punctuation or
#: white space (so the start of a line), or the last character of a word introducing it. Written
#: as "not preceded by anything else" (one negative lookbehind, which is faster).
_START = r"(?<![^\s，,。．.；;：:、（(）)【】\[\]“”\"'!！?？/|住在于至往到址居籍自从为是系位返])"
#: A necessary condition checked before the expensive part: an address has no punctuation or space
#: in it, and its first number (or building letter) is followed by 号 # 栋 幢 座 组 队 社 弄 之 or
#: "-" within 80 characters of its start (the longest administrative prefix and local name allowed
#: are well under that). It only prunes starts that cannot match: the matches are the same.
_GUARD = r"(?=[^\s，,。；;、：:（）()“”]{0,80}?[0-9A-Z一二三四五六七八九十](?:号|#|＃|栋|幢|座|组|队|社|弄|之|-))"

#: Names an address may start with anywhere in a sentence (``cn_address_gazetteer``): the
#: provinces, the provincial capitals and a few large cities, and Ningxia's cities, districts and
#: counties (the synthetic data's region).
GAZETTEER: tuple[str, ...] = (
    "北京", "天津", "上海", "重庆", "河北", "山西", "辽宁", "吉林", "黑龙江", "江苏", "浙江", "安徽",
    "福建", "江西", "山东", "河南", "湖北", "湖南", "广东", "海南", "四川", "贵州", "云南", "陕西", "甘肃",
    "青海", "内蒙古", "广西", "西藏", "宁夏", "新疆",
    "石家庄", "太原", "沈阳", "长春", "哈尔滨", "南京", "杭州", "合肥", "福州", "南昌", "济南", "郑州",
    "武汉", "长沙", "广州", "海口", "成都", "贵阳", "昆明", "西安", "兰州", "西宁", "呼和浩特", "南宁",
    "拉萨", "银川", "乌鲁木齐", "深圳", "大连", "青岛", "宁波", "厦门", "苏州",
    "石嘴山", "吴忠", "固原", "中卫", "兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市",
    "大武口区", "惠农区", "平罗县", "利通区", "红寺堡区", "盐池县", "同心县", "青铜峡市", "原州区",
    "西吉县", "隆德县", "泾源县", "彭阳县", "沙坡头区", "中宁县", "海原县",
)
_GAZ = "(?=" + "|".join(sorted(GAZETTEER, key=len, reverse=True)) + ")"


class CnAddressRecognizer(PatternRecognizer):
    """Finds Chinese street addresses that end in a number (see the module docstring)."""

    ENTITY = "CN_ADDRESS"
    PATTERNS = [
        Pattern("cn_address", _START + _GUARD + _ADMIN_PART + "{0,5}" + _LOCAL, 0.6),
        Pattern("cn_address_gazetteer", _GAZ + _ADMIN_PART + "{1,5}" + _LOCAL, 0.65),
    ]
    CONTEXT = ["住址", "地址", "家住", "现住", "户籍地"]

    def __init__(self, supported_language: str = "zh") -> None:
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnAddressRecognizer",
            supported_language=supported_language,
            patterns=[Pattern(p.name, p.regex, p.score) for p in self.PATTERNS],
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )
