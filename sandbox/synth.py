"""Synthetic health data for Yinchuan (银川市): residents, chronic conditions, outpatient visits,
inpatient stays and medical-insurance settlements.

``generate(out_dir, scale, seed, twin)`` writes one Parquet file per dataset. It is

* deterministic: the same ``(scale, seed, twin)`` gives byte-identical files. Every random draw comes
  from a ``numpy`` generator seeded by ``SeedSequence([seed, twin, chunk index, stream])``; nothing
  depends on the clock, on hash or dict order, or on how many chunks came before (apart from the
  id counters, which are themselves deterministic);
* streamed: people are generated in chunks of ``CHUNK_PEOPLE`` residents, and each chunk is
  appended as one row group to a ``pyarrow.parquet.ParquetWriter`` per dataset, so memory stays
  flat however large ``scale`` is;
* vectorised: numpy for numbers and dates, ``pyarrow.compute`` for string assembly; only the few
  percent of free texts that carry personal data are formatted in a Python loop.

The data are skewed like real data: a realistic age pyramid and district populations; chronic
conditions whose prevalence rises with age; visits per person heavy-tailed (log-normal frailty ×
age × chronic load), so most people have a few visits and a few hundred have hundreds; inpatient
stays at ~0.05–0.15 per person-year, more for the old and the chronically ill; people mostly use a
hospital of their own district; diagnoses depend on age and sex and on the person's conditions.
About 4 % of chief complaints and 5 % of discharge notes embed a name, a mobile number and/or a
valid GB 11643 ID number (the patient's own or a relative's, the relative being another resident).

The dev twin (``twin=True``) has the same schema and distributions but different people: person ids
are offset by ``TWIN_PERSON_OFFSET``, event ids by ``TWIN_EVENT_ID_OFFSET``, and ID numbers use the
sequence numbers 500–999 (production uses 000–499), so the twin's ``person_id`` and ``id_number``
sets are disjoint from production's whatever the seeds. Within one file, ID numbers are unique: a
per-(region, birth date, sex) counter runs across chunks (a small ``int16`` array).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "generate",
    "DATASET_CODES",
    "SCHEMAS",
    "DISTRICTS",
    "DISTRICT_REGION_CODES",
    "HOSPITALS",
    "DEPARTMENTS",
    "CONDITIONS",
    "CONDITION_ICD10",
    "INSURANCE_TYPES",
    "ICD10_CODES",
    "ICD10_CHAPTERS",
    "icd10_chapter",
    "CHUNK_PEOPLE",
    "VISITS_PER_RESIDENT",
    "TWIN_PERSON_OFFSET",
    "TWIN_EVENT_ID_OFFSET",
]

# =============================================================================== public constants

DATASET_CODES: tuple[str, ...] = (
    "health.resident",
    "health.chronic_condition",
    "health.outpatient_visit",
    "health.inpatient_stay",
    "health.insurance_settlement",
)

DISTRICTS: tuple[str, ...] = ("兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市")
DISTRICT_REGION_CODES: dict[str, str] = {
    "兴庆区": "640104",
    "西夏区": "640105",
    "金凤区": "640106",
    "永宁县": "640121",
    "贺兰县": "640122",
    "灵武市": "640181",
}
# Share of the population (roughly the 2020 census).
_DISTRICT_P = np.array([0.28, 0.18, 0.16, 0.12, 0.13, 0.13])
_URBAN = np.array([True, True, True, False, False, False])

# (name, district, relative size)
_HOSPITALS = (
    ("宁夏医科大学总医院", "兴庆区", 5.0),
    ("银川市第一人民医院", "兴庆区", 3.0),
    ("宁夏回族自治区中医医院", "兴庆区", 1.5),
    ("宁夏回族自治区人民医院", "西夏区", 4.5),
    ("银川市第二人民医院", "西夏区", 2.0),
    ("银川市中医医院", "金凤区", 2.0),
    ("宁夏回族自治区第三人民医院", "金凤区", 2.2),
    ("永宁县人民医院", "永宁县", 1.5),
    ("永宁县中医医院", "永宁县", 0.7),
    ("贺兰县人民医院", "贺兰县", 1.6),
    ("贺兰县中医医院", "贺兰县", 0.7),
    ("灵武市人民医院", "灵武市", 1.6),
    ("灵武市中医医院", "灵武市", 0.7),
)
HOSPITALS: tuple[tuple[str, str], ...] = tuple((h, d) for h, d, _ in _HOSPITALS)

DEPARTMENTS: tuple[str, ...] = ("内科", "外科", "儿科", "妇产科", "中医科", "急诊科", "眼科", "口腔科", "皮肤科", "骨科")
CONDITIONS: tuple[str, ...] = ("hypertension", "diabetes", "coronary", "cancer", "copd", "stroke", "ckd")
CONDITION_ICD10: dict[str, tuple[str, ...]] = {
    "hypertension": ("I10",),
    "diabetes": ("E11",),
    "coronary": ("I25",),
    "cancer": ("C34", "C50", "C16", "C18", "C22"),
    "copd": ("J44",),
    "stroke": ("I63",),
    "ckd": ("N18",),
}
INSURANCE_TYPES: tuple[str, ...] = ("城镇职工", "城乡居民", "未参保")

CHUNK_PEOPLE = 20_000
VISITS_PER_RESIDENT = 20
TWIN_PERSON_OFFSET = 500_000_000
TWIN_EVENT_ID_OFFSET = 1_000_000_000_000
_TWIN_SEQ_OFFSET = 500  # ID-number sequence numbers: production 000–499, twin 500–999
_SEQ_SLOTS = 250  # sequence numbers per (region, birth date, sex) on each side
_FORMAT_VERSION = 1  # part of every seed: bump when the generator's output changes on purpose

_ROMAN = ("I II III IV V VI VII VIII IX X XI XII XIII XIV XV XVI XVII XVIII XIX XX XXI XXII").split()
# ICD-10 (WHO 2019) chapters: (first code, last code), in chapter order I..XXII.
_CHAPTER_RANGES = (
    ("A00", "B99"), ("C00", "D48"), ("D50", "D89"), ("E00", "E90"), ("F00", "F99"), ("G00", "G99"),
    ("H00", "H59"), ("H60", "H95"), ("I00", "I99"), ("J00", "J99"), ("K00", "K93"), ("L00", "L99"),
    ("M00", "M99"), ("N00", "N99"), ("O00", "O99"), ("P00", "P96"), ("Q00", "Q99"), ("R00", "R99"),
    ("S00", "T98"), ("V01", "Y98"), ("Z00", "Z99"), ("U00", "U85"),
)


def icd10_chapter(code: str) -> str:
    """The Roman numeral (``'I'``..``'XXII'``) of the ICD-10 chapter of ``code`` (e.g. ``'I10'`` →
    ``'IX'``, ``'U07.1'`` → ``'XXII'``). ``ValueError`` for a code outside every chapter."""
    key = code.strip().upper()[:3]
    for roman, (lo, hi) in zip(_ROMAN, _CHAPTER_RANGES):
        if lo <= key <= hi:
            return roman
    raise ValueError(f"{code!r} is not in an ICD-10 chapter")


def _f(name: str, typ: pa.DataType) -> pa.Field:
    return pa.field(name, typ)


SCHEMAS: dict[str, pa.Schema] = {
    "health.resident": pa.schema([
        _f("person_id", pa.int64()), _f("id_number", pa.string()), _f("name", pa.string()),
        _f("phone", pa.string()), _f("sex", pa.string()), _f("birth_date", pa.date32()),
        _f("district", pa.string()), _f("address", pa.string()), _f("insurance_type", pa.string()),
    ]),
    "health.chronic_condition": pa.schema([
        _f("person_id", pa.int64()), _f("condition", pa.string()), _f("icd10", pa.string()),
        _f("diagnosed_on", pa.date32()),
    ]),
    "health.outpatient_visit": pa.schema([
        _f("visit_id", pa.int64()), _f("person_id", pa.int64()), _f("hospital", pa.string()),
        _f("district", pa.string()), _f("department", pa.string()), _f("visit_date", pa.date32()),
        _f("icd10", pa.string()), _f("icd10_chapter", pa.string()), _f("chief_complaint", pa.string()),
        _f("fee", pa.float64()),
    ]),
    "health.inpatient_stay": pa.schema([
        _f("stay_id", pa.int64()), _f("person_id", pa.int64()), _f("hospital", pa.string()),
        _f("district", pa.string()), _f("department", pa.string()), _f("admit_date", pa.date32()),
        _f("discharge_date", pa.date32()), _f("length_of_stay", pa.int64()), _f("main_icd10", pa.string()),
        _f("icd10_chapter", pa.string()), _f("total_cost", pa.float64()), _f("notes", pa.string()),
    ]),
    "health.insurance_settlement": pa.schema([
        _f("settlement_id", pa.int64()), _f("person_id", pa.int64()), _f("stay_id", pa.int64()),
        _f("visit_id", pa.int64()), _f("settled_on", pa.date32()), _f("insurance_type", pa.string()),
        _f("total_amount", pa.float64()), _f("fund_paid", pa.float64()), _f("self_paid", pa.float64()),
    ]),
}

# =============================================================================== dates

_EPOCH = np.datetime64("1970-01-01", "D")


def _day(s: str) -> int:
    return int((np.datetime64(s, "D") - _EPOCH).astype(np.int64))


_BIRTH_MIN, _BIRTH_MAX = _day("1925-01-01"), _day("2024-12-31")
_N_BIRTH_DAYS = _BIRTH_MAX - _BIRTH_MIN + 1
_WIN_MIN, _WIN_MAX = _day("2019-01-01"), _day("2025-12-31")
_WIN_DAYS = _WIN_MAX - _WIN_MIN + 1
_REF = _WIN_MAX  # "today" for ages
_DIAG_MIN = _day("1985-01-01")
_SETTLE_MAX = _day("2026-03-31")
_COVID_FROM, _COVID_TO = _day("2020-01-20"), _day("2023-06-30")

_YEARS = np.arange(1925, 2025)
_YEAR_START = np.array([_day(f"{y}-01-01") for y in _YEARS], dtype=np.int64)
_YEAR_LEN = np.array([_day(f"{y + 1}-01-01") - _day(f"{y}-01-01") for y in _YEARS], dtype=np.int64)
# Relative births per year: the old thin out, the 1960s and late-1980s booms, the recent decline.
_PYRAMID = (
    (1925, 0.02), (1930, 0.07), (1935, 0.18), (1940, 0.33), (1945, 0.5), (1950, 0.75), (1955, 0.85),
    (1959, 0.8), (1961, 0.55), (1963, 1.25), (1966, 1.3), (1970, 1.3), (1975, 1.05), (1980, 1.0),
    (1985, 1.15), (1988, 1.3), (1991, 1.2), (1995, 0.95), (2000, 0.85), (2005, 0.9), (2010, 1.0),
    (2014, 1.05), (2016, 1.1), (2017, 1.05), (2018, 0.9), (2019, 0.85), (2020, 0.72), (2022, 0.6),
    (2024, 0.52),
)
_BIRTH_YEAR_P = np.interp(_YEARS, [y for y, _ in _PYRAMID], [w for _, w in _PYRAMID])
_BIRTH_YEAR_P /= _BIRTH_YEAR_P.sum()


def _activity_cdf() -> np.ndarray:
    """Cumulative weight of each day of 2019–2025 for visit and admission dates: growth by year,
    winter peaks, the Spring-Festival and National-Day dips, quieter weekends, the early-2020 drop
    and the December-2022 wave."""
    days = np.arange(_WIN_MIN, _WIN_MAX + 1)
    dt = days.astype("datetime64[D]")
    year = dt.astype("datetime64[Y]").astype(np.int64) + 1970
    month = dt.astype("datetime64[M]").astype(np.int64) % 12
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
    by_year = {2019: 1.0, 2020: 0.85, 2021: 0.97, 2022: 0.92, 2023: 1.08, 2024: 1.12, 2025: 1.16}
    w = np.array([by_year[int(y)] for y in year])
    w *= np.array([1.15, 0.9, 1.0, 0.97, 0.95, 0.93, 0.92, 0.93, 0.97, 0.9, 1.05, 1.18])[month]
    w *= np.array([1.18, 1.05, 1.0, 1.0, 1.0, 0.72, 0.62])[weekday]
    w[(days >= _day("2020-01-24")) & (days <= _day("2020-03-31"))] *= 0.4
    w[(days >= _day("2022-12-05")) & (days <= _day("2023-01-15"))] *= 1.4
    c = np.cumsum(w)
    return c / c[-1]


_ACTIVITY_CDF = _activity_cdf()

# =============================================================================== names, places

_SURNAMES = (
    ("王", 7.1), ("李", 7.0), ("张", 6.8), ("刘", 5.4), ("陈", 4.6), ("马", 3.6), ("杨", 3.1), ("黄", 2.0),
    ("赵", 2.2), ("吴", 1.9), ("周", 1.9), ("徐", 1.3), ("孙", 1.5), ("朱", 1.2), ("胡", 1.3), ("郭", 1.3),
    ("何", 1.2), ("高", 1.2), ("林", 0.8), ("罗", 0.9), ("郑", 0.8), ("梁", 0.8), ("谢", 0.7), ("宋", 0.7),
    ("唐", 0.6), ("许", 0.6), ("韩", 0.7), ("冯", 0.6), ("邓", 0.5), ("曹", 0.6), ("彭", 0.5), ("曾", 0.4),
    ("肖", 0.5), ("田", 0.6), ("董", 0.5), ("袁", 0.5), ("潘", 0.4), ("于", 0.5), ("蒋", 0.4), ("蔡", 0.4),
    ("余", 0.4), ("杜", 0.5), ("叶", 0.3), ("程", 0.4), ("苏", 0.5), ("魏", 0.5), ("吕", 0.3), ("丁", 0.5),
    ("任", 0.4), ("沈", 0.3), ("姚", 0.3), ("卢", 0.3), ("姜", 0.3), ("崔", 0.3), ("钟", 0.2), ("谭", 0.2),
    ("陆", 0.2), ("汪", 0.2), ("范", 0.3), ("金", 0.3), ("石", 0.3), ("贾", 0.4), ("白", 0.5), ("海", 0.3),
    ("纳", 0.2), ("拓", 0.1), ("冶", 0.1), ("虎", 0.1), ("锁", 0.1), ("撒", 0.05), ("兰", 0.1), ("哈", 0.1),
)
_GIVEN_M = tuple("伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波宁俊浩宇轩博文建国志海东林峰成龙德学福生荣新兵忠贵山春虎元亮晨阳"
                 "军海金武奇睿泽子豪智凯云天佳")
_GIVEN_F = tuple("芳娜敏静丽艳娟霞秀英华玲梅兰红琴燕雪婷慧颖莉萍倩欣怡佳晶洁琳雨涵梓萱月花凤桂珍玉梦悦琪瑶雅晓丹宁"
                 "春桃荷娥蓉")

_PHONE_PREFIXES = np.array(
    list(range(130, 140)) + [145, 147, 150, 151, 152, 153, 155, 156, 157, 158, 159, 166, 173, 175, 176, 177,
                             178, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189, 191, 193, 195, 198, 199],
    dtype=np.int64,
)

_ROADS = {
    "兴庆区": ("解放东街", "解放西街", "新华东街", "文化西街", "北京东路", "民族北街", "清和北街", "中山南街",
              "湖滨西街", "丽景北街", "胜利南街", "玉皇阁北街", "银古路", "凤凰北街"),
    "金凤区": ("北京中路", "正源北街", "亲水大街", "宁安大街", "黄河东路", "长城中路", "贺兰山中路", "万寿路",
              "康平路", "满城北街", "阅海湾中央大道", "六盘山路"),
    "西夏区": ("北京西路", "文萃北街", "怀远西路", "同心南街", "朔方路", "贺兰山西路", "宁朔南街", "兴洲北街",
              "学院西路", "西夏区团结路"),
    "永宁县": ("宁和南街", "团结西路", "正源南街", "永安东路", "杨和北街", "纳家户路"),
    "贺兰县": ("银河东路", "富兴北街", "利民街", "虹桥路", "习岗南街", "德胜路"),
    "灵武市": ("灵州大街", "东塔街", "崇兴路", "西湖路", "文化街", "朝阳街"),
}
_TOWNS = {
    "兴庆区": ("掌政镇", "大新镇", "通贵乡", "月牙湖乡"),
    "金凤区": ("良田镇", "丰登镇"),
    "西夏区": ("兴泾镇", "镇北堡镇"),
    "永宁县": ("杨和镇", "李俊镇", "望远镇", "望洪镇", "闽宁镇", "胜利乡"),
    "贺兰县": ("习岗镇", "金贵镇", "立岗镇", "洪广镇", "常信乡"),
    "灵武市": ("宁东镇", "崇兴镇", "郝家桥镇", "梧桐树乡", "临河镇", "马家滩镇"),
}
_VILLAGES = ("红星村", "新华村", "永红村", "胜利村", "团结村", "和平村", "光明村", "东方村", "建设村", "五星村",
             "联合村", "新民村", "先锋村", "丰收村", "友爱村", "立强村", "原隆村", "通北村", "金星村", "满春村")

# =============================================================================== diagnoses

_DEPT = {d: i for i, d in enumerate(DEPARTMENTS)}
_AGE_GROUP_EDGES = np.array([1.0, 14.0, 45.0, 60.0])  # infant | child | 14–44 | 45–59 | 60+

# Outpatient diagnoses: code, Chinese name, department, kind (a acute / c chronic / n none),
# median fee (CNY), weights by age group (infant, child, 14–44, 45–59, 60+), sex restriction,
# P(emergency department), P(traditional Chinese medicine department), chief-complaint templates
# ("{d}" is replaced by a duration). Codes of the seven registered conditions have zero weight:
# they appear only for people who have that condition (after it was diagnosed).
_OUT = (
    ("J06", "急性上呼吸道感染", "内科", "a", 110, (30, 30, 14, 8, 6), None, .08, .05,
     ("咳嗽、流涕{d}", "发热伴咽痛{d}", "鼻塞流涕{d}，伴低热", "咽痛{d}，伴咳嗽", "打喷嚏、流清涕{d}")),
    ("J20", "急性支气管炎", "内科", "a", 180, (10, 10, 5, 5, 7), None, .06, .05,
     ("咳嗽咳痰{d}", "咳嗽{d}，夜间加重", "咳黄痰{d}，伴发热")),
    ("J18", "肺炎", "内科", "a", 420, (6, 4, 1.5, 2, 5), None, .15, 0,
     ("发热、咳嗽{d}", "高热{d}，伴气促", "咳嗽咳痰伴胸闷{d}")),
    ("J02", "急性咽炎", "内科", "a", 100, (3, 8, 7, 5, 3), None, .04, .08,
     ("咽痛{d}", "咽部不适{d}，吞咽时加重")),
    ("J45", "哮喘", "内科", "c", 260, (1, 3, 2, 2, 3), None, .12, .03,
     ("反复喘息{d}，加重1天", "胸闷气短{d}", "哮喘复诊，开药")),
    ("H66", "化脓性中耳炎", "外科", "a", 150, (3, 4, 1, .5, .5), None, .03, 0,
     ("耳痛{d}", "耳痛伴发热{d}", "耳道流脓{d}")),
    ("A09", "感染性胃肠炎", "内科", "a", 160, (12, 6, 3, 2.5, 2.5), None, .15, .03,
     ("腹泻{d}，伴呕吐", "腹痛腹泻{d}", "呕吐{d}，伴发热", "稀水样便{d}")),
    ("B01", "水痘", "皮肤科", "a", 110, (1, 3, .3, .05, .02), None, .02, 0,
     ("皮疹伴发热{d}", "全身散在水疱{d}")),
    ("K29", "胃炎", "内科", "a", 210, (0, .5, 6, 7, 6), None, .05, .12,
     ("上腹痛{d}", "胃部不适{d}，伴反酸", "饭后腹胀{d}", "胃痛{d}，伴恶心")),
    ("K21", "胃食管反流病", "内科", "c", 230, (0, .2, 2, 3, 3), None, .02, .1,
     ("反酸烧心{d}", "胸骨后烧灼感{d}")),
    ("K02", "龋病", "口腔科", "c", 180, (0, 8, 3, 2, 2), None, 0, 0,
     ("牙痛{d}", "冷热刺激痛{d}", "牙齿有洞{d}")),
    ("K05", "牙龈炎和牙周疾病", "口腔科", "c", 200, (0, 1, 3, 3, 3), None, 0, 0,
     ("牙龈出血{d}", "牙龈肿痛{d}", "牙齿松动{d}")),
    ("K59", "便秘", "内科", "c", 120, (2, 2, 1, 1.5, 3), None, .02, .2,
     ("排便困难{d}", "大便干结{d}")),
    ("E78", "高脂血症", "内科", "c", 210, (0, 0, 1.5, 4, 5), None, 0, .08,
     ("体检发现血脂高{d}", "血脂异常复查", "高脂血症复诊开药")),
    ("E03", "甲状腺功能减退症", "内科", "c", 190, (0, .2, 1.5, 1.5, 1), None, 0, .05,
     ("乏力、怕冷{d}", "甲减复查甲功")),
    ("D64", "贫血", "内科", "c", 160, (1, 1, 1.5, 1, 1.5), None, .02, .1,
     ("乏力、头晕{d}", "面色苍白{d}")),
    ("M54", "背痛", "骨科", "c", 210, (0, .2, 4, 5, 5), None, .03, .25,
     ("腰痛{d}", "腰背部疼痛{d}，活动后加重", "颈肩部疼痛{d}")),
    ("M17", "膝关节病", "骨科", "c", 260, (0, 0, .5, 3, 6), None, .01, .2,
     ("双膝关节疼痛{d}", "膝关节疼痛{d}，上下楼加重")),
    ("M81", "骨质疏松", "骨科", "c", 260, (0, 0, 0, 1, 4), None, 0, .15,
     ("腰背痛{d}", "骨质疏松复诊")),
    ("L20", "特应性皮炎", "皮肤科", "c", 150, (4, 3, 1, .5, .5), None, 0, .05,
     ("皮肤瘙痒{d}", "反复皮疹伴瘙痒{d}")),
    ("L30", "皮炎", "皮肤科", "a", 120, (2, 2, 3, 2, 2), None, 0, .05,
     ("皮疹{d}，伴瘙痒", "面部红斑{d}")),
    ("L70", "痤疮", "皮肤科", "c", 150, (0, .5, 3, .3, 0), None, 0, .1,
     ("面部痤疮{d}", "面部丘疹{d}")),
    ("H10", "结膜炎", "眼科", "a", 90, (2, 3, 2, 1.5, 1.5), None, .02, 0,
     ("眼红、眼痒{d}", "眼部分泌物增多{d}")),
    ("H52", "屈光不正", "眼科", "c", 150, (0, 5, 2.5, 1, .5), None, 0, 0,
     ("视物模糊{d}", "看远处不清{d}", "配镜验光")),
    ("H25", "老年性白内障", "眼科", "c", 300, (0, 0, 0, .5, 3), None, 0, 0,
     ("视物模糊{d}，逐渐加重", "双眼视力下降{d}")),
    ("N39", "尿路感染", "内科", "a", 180, (.5, .5, 2, 2, 2.5), None, .06, .03,
     ("尿频、尿急、尿痛{d}", "排尿疼痛{d}")),
    ("N76", "阴道炎", "妇产科", "a", 160, (0, 0, 4, 2, .5), "F", 0, .03,
     ("白带增多伴瘙痒{d}", "外阴瘙痒{d}")),
    ("Z34", "正常妊娠监督", "妇产科", "n", 260, (0, 0, 6, 0, 0), "F", 0, 0,
     ("停经{d}，要求产检", "孕期常规产检", "孕中期产检")),
    ("O21", "妊娠剧吐", "妇产科", "a", 320, (0, 0, .8, 0, 0), "F", .1, 0,
     ("停经2月余，恶心呕吐{d}", "孕早期频繁呕吐{d}")),
    ("R51", "头痛", "内科", "a", 150, (0, 1, 3, 2.5, 2), None, .08, .15,
     ("头痛{d}", "头痛{d}，伴恶心", "头部胀痛{d}")),
    ("R50", "发热", "内科", "a", 150, (8, 6, 2, 1.5, 2), None, .2, 0,
     ("发热{d}", "发热{d}，最高体温39℃", "反复发热{d}")),
    ("R10", "腹痛", "内科", "a", 200, (1, 2, 2.5, 2, 2), None, .25, .05,
     ("腹痛{d}", "上腹部疼痛{d}", "右下腹痛{d}")),
    ("S61", "腕和手开放性伤口", "外科", "a", 260, (0, 2, 2.5, 1.5, 1), None, .3, 0,
     ("手指划伤出血{d}", "左手外伤{d}")),
    ("S93", "踝关节扭伤", "骨科", "a", 260, (0, 2, 2.5, 1.5, 1), None, .2, .1,
     ("扭伤右踝关节{d}", "踝部肿痛{d}")),
    ("T14", "损伤", "外科", "a", 240, (.5, 1.5, 1.5, 1, 1), None, .35, 0,
     ("摔伤{d}", "外伤后疼痛{d}")),
    ("F41", "焦虑障碍", "内科", "c", 230, (0, .2, 1.5, 1.5, 1), None, 0, .2,
     ("心慌、失眠{d}", "紧张焦虑{d}")),
    ("G47", "睡眠障碍", "中医科", "c", 200, (0, .2, 2, 3, 3), None, 0, .4,
     ("失眠{d}", "入睡困难{d}，多梦易醒")),
    ("G43", "偏头痛", "内科", "c", 210, (0, .3, 1.5, 1, .5), None, .05, .15,
     ("反复偏侧头痛{d}", "发作性头痛{d}")),
    ("U07", "新型冠状病毒感染", "内科", "a", 210, (1, 1, 1, 1, 1.5), None, .2, .05,
     ("发热、咽痛{d}，抗原阳性", "咳嗽、乏力{d}，核酸阳性")),
    ("Z00", "一般医学检查", "内科", "n", 300, (6, 3, 2, 2, 2), None, 0, 0,
     ("健康体检", "常规体检复查", "儿童保健体检")),
    ("I10", "原发性高血压", "内科", "c", 220, (0, 0, 0, 0, 0), None, .02, .08,
     ("头晕{d}，血压控制不佳", "高血压{d}，复诊开药", "发现血压升高{d}", "头晕头痛{d}，伴颈部不适")),
    ("E11", "2型糖尿病", "内科", "c", 260, (0, 0, 0, 0, 0), None, .01, .06,
     ("口干多饮{d}", "糖尿病{d}，复查血糖", "血糖控制不佳{d}", "双下肢麻木{d}")),
    ("I25", "慢性缺血性心脏病", "内科", "c", 330, (0, 0, 0, 0, 0), None, .08, .08,
     ("胸闷、心前区不适{d}", "活动后胸痛{d}", "冠心病复诊")),
    ("J44", "慢性阻塞性肺疾病", "内科", "c", 300, (0, 0, 0, 0, 0), None, .08, .05,
     ("反复咳嗽咳痰{d}，加重3天", "活动后气喘{d}")),
    ("I63", "脑梗死", "内科", "c", 300, (0, 0, 0, 0, 0), None, .06, .15,
     ("脑梗死后遗症{d}，复诊", "左侧肢体无力{d}", "言语不清{d}")),
    ("N18", "慢性肾脏病", "内科", "c", 460, (0, 0, 0, 0, 0), None, .03, .05,
     ("慢性肾病{d}，复查肾功能", "双下肢水肿{d}")),
    ("C34", "支气管和肺恶性肿瘤", "内科", "c", 900, (0, 0, 0, 0, 0), None, .02, .05,
     ("肺癌术后{d}，复查", "咳嗽、痰中带血{d}")),
    ("C50", "乳房恶性肿瘤", "外科", "c", 900, (0, 0, 0, 0, 0), None, 0, .03,
     ("乳腺癌术后{d}，复查", "发现乳房肿块{d}")),
    ("C16", "胃恶性肿瘤", "外科", "c", 900, (0, 0, 0, 0, 0), None, .02, .05,
     ("胃癌术后{d}，复查", "上腹隐痛、消瘦{d}")),
    ("C18", "结肠恶性肿瘤", "外科", "c", 900, (0, 0, 0, 0, 0), None, .02, .03,
     ("结肠癌术后{d}，复查", "便血、排便习惯改变{d}")),
    ("C22", "肝和肝内胆管恶性肿瘤", "内科", "c", 950, (0, 0, 0, 0, 0), None, .03, .05,
     ("肝癌{d}，复查", "右上腹胀痛{d}")),
)

# Inpatient main diagnoses: code, name, department, median length of stay, base cost, cost per day,
# weights by age group, sex restriction, reasons for admission (templates).
_IN = (
    ("P59", "新生儿黄疸", "儿科", 5, 1200, 450, (20, 0, 0, 0, 0), None, ("皮肤黄染{d}",)),
    ("J18", "肺炎", "内科", 8, 2500, 650, (25, 15, 3, 4, 12), None, ("发热、咳嗽咳痰{d}", "咳嗽伴气促{d}")),
    ("J20", "急性支气管炎", "内科", 6, 1500, 500, (8, 8, 1, 1, 2), None, ("咳嗽咳痰{d}",)),
    ("A09", "感染性胃肠炎", "内科", 4, 1200, 450, (6, 6, 1, .5, 1), None, ("腹泻伴呕吐{d}",)),
    ("K35", "急性阑尾炎", "外科", 6, 8000, 600, (0, 3, 3, 1.5, .5), None, ("转移性右下腹痛{d}",)),
    ("K80", "胆石症", "外科", 8, 9000, 650, (0, 0, 2, 4, 3), None, ("右上腹痛{d}", "体检发现胆囊结石{d}")),
    ("K56", "肠梗阻", "外科", 8, 6000, 700, (.5, .3, .5, 1, 2), None, ("腹痛、腹胀，停止排气排便{d}",)),
    ("O80", "单胎顺产", "妇产科", 3, 3000, 450, (0, 0, 25, 0, 0), "F", ("停经39周，下腹阵痛{d}",)),
    ("O82", "剖宫产单胎分娩", "妇产科", 6, 7000, 600, (0, 0, 12, 0, 0), "F", ("停经38周，要求入院待产",)),
    ("S72", "股骨骨折", "骨科", 14, 25000, 800, (0, .3, .5, 1, 4), None, ("摔伤致髋部疼痛、活动受限{d}",)),
    ("S82", "小腿骨折", "骨科", 12, 18000, 700, (0, 1, 2, 1.5, 1), None, ("外伤致小腿肿痛{d}",)),
    ("M17", "膝关节病", "骨科", 10, 20000, 700, (0, 0, .2, 1, 2.5), None, ("双膝疼痛{d}，加重伴活动受限",)),
    ("M51", "椎间盘疾患", "骨科", 10, 12000, 600, (0, 0, 2, 3, 2), None, ("腰痛伴下肢放射痛{d}",)),
    ("N20", "肾和输尿管结石", "外科", 5, 9000, 600, (0, 0, 2, 2, 1), None, ("腰腹部绞痛{d}",)),
    ("H25", "老年性白内障", "眼科", 2, 5000, 500, (0, 0, 0, .5, 4), None, ("双眼视物模糊{d}",)),
    ("I21", "急性心肌梗死", "内科", 10, 30000, 900, (0, 0, .2, 1, 2), None, ("突发胸痛{d}", "胸痛伴大汗{d}")),
    ("I50", "心力衰竭", "内科", 10, 5000, 750, (0, 0, .1, .5, 4), None, ("活动后气促伴双下肢水肿{d}",)),
    ("I10", "原发性高血压", "内科", 7, 2500, 500, (0, 0, 0, 0, 0), None, ("头晕、血压升高{d}",)),
    ("E11", "2型糖尿病", "内科", 9, 3000, 550, (0, 0, 0, 0, 0), None, ("血糖控制不佳{d}", "口干多饮多尿{d}")),
    ("I25", "慢性缺血性心脏病", "内科", 8, 6000, 700, (0, 0, 0, 0, 0), None, ("反复胸闷{d}",)),
    ("J44", "慢性阻塞性肺疾病", "内科", 10, 4000, 650, (0, 0, 0, 0, 0), None, ("咳嗽咳痰伴喘息{d}，加重",)),
    ("I63", "脑梗死", "内科", 14, 8000, 800, (0, 0, 0, 0, 0), None, ("突发肢体无力、言语不清{d}",)),
    ("N18", "慢性肾脏病", "内科", 12, 6000, 800, (0, 0, 0, 0, 0), None, ("乏力、水肿{d}",)),
    ("C34", "支气管和肺恶性肿瘤", "外科", 14, 20000, 1400, (0, 0, 0, 0, 0), None, ("发现肺部占位{d}", "肺癌术后化疗")),
    ("C50", "乳房恶性肿瘤", "外科", 12, 18000, 1200, (0, 0, 0, 0, 0), None, ("发现乳房肿块{d}", "乳腺癌术后化疗")),
    ("C16", "胃恶性肿瘤", "外科", 16, 22000, 1300, (0, 0, 0, 0, 0), None, ("上腹痛伴消瘦{d}", "胃癌术后化疗")),
    ("C18", "结肠恶性肿瘤", "外科", 15, 21000, 1300, (0, 0, 0, 0, 0), None, ("便血{d}", "结肠癌术后化疗")),
    ("C22", "肝和肝内胆管恶性肿瘤", "内科", 14, 20000, 1400, (0, 0, 0, 0, 0), None, ("右上腹胀痛{d}", "肝癌介入治疗")),
)

# Inpatient codes whose reason for admission has an acute duration (days, not months).
_IN_ACUTE = frozenset({"P59", "J18", "J20", "A09", "K35", "K56", "O80", "S72", "S82", "N20", "I21", "I63"})

_TREATMENTS = ("抗感染、对症支持", "降压、调脂", "控制血糖、营养神经", "抗血小板聚集、改善循环", "手术",
               "化疗", "解痉、止痛", "吸氧、平喘、化痰", "补液、纠正电解质紊乱", "康复理疗")
_OUTCOMES = ("病情好转", "症状缓解", "病情稳定", "治愈", "好转")
_ADVICE = ("低盐低脂饮食，规律服药，定期复查", "注意休息，1周后门诊复查", "按时服药，监测血压血糖",
           "避免劳累，如有不适及时就诊", "伤口定期换药，2周后拆线", "遵医嘱服药，1个月后复查")

_DUR_ACUTE = ("半天", "1天", "2天", "3天", "一天", "两天", "三天", "四天", "五天", "1周", "一周", "十余天")
_DUR_CHRONIC = ("1个月", "2个月", "3个月", "半年", "1年", "2年", "3年", "5年", "10余年", "数年", "多年", "半月")

_PII_COMPLAINT = (
    "患者{name}（身份证{id}）自述{text}，联系电话{phone}",
    "{text}。患者{name}，身份证号{id}",
    "{text}，联系电话{phone}",
    "{name}，{text}，手机{phone}",
    "{text}。陪同家属{rname}，身份证{rid}，电话{rphone}",
    "患者{name}，{text}，家属电话{rphone}",
    "{text}（本人身份证：{id}，电话：{phone}）",
    "{text}，{rname}代诉，联系方式{rphone}",
)
_PII_NOTE = (
    "{text}患者{name}，身份证号{id}，联系电话{phone}。",
    "{text}家属{rname}（电话{rphone}）已知悉病情。",
    "患者{name}（{id}）：{text}",
    "{text}随访电话：{phone}。",
    "{text}陪护家属{rname}，身份证{rid}。",
)
# Visits per person: log-normal frailty (σ), × (1 + factor × number of chronic conditions), with a
# soft ceiling at `saturation` × the chunk's mean rate. Tuned so that 1M visits give ~50k people,
# a median of ~10 visits and a maximum of several hundred.
_FRAILTY_SIGMA = 1.0
_CHRONIC_VISIT_FACTOR = 0.35
_VISIT_SATURATION = 30.0

_P_PII_COMPLAINT = 0.04
_P_PII_NOTE = 0.05


class _Table:
    """Compiled lookup tables derived from the literals above (built once at import)."""

    def __init__(self) -> None:
        out_codes = [r[0] for r in _OUT]
        in_codes = [r[0] for r in _IN]
        self.out_codes = pa.array(out_codes)
        self.out_chapters = pa.array([icd10_chapter(c) for c in out_codes])
        self.out_dept = np.array([_DEPT[r[2]] for r in _OUT])
        self.out_chronic = np.array([r[3] == "c" for r in _OUT])
        self.out_fee = np.array([r[4] for r in _OUT], dtype=float)
        self.out_emerg = np.array([r[7] for r in _OUT])
        self.out_tcm = np.array([r[8] for r in _OUT])
        self.out_cdf = self._cdfs([(r[5], r[6]) for r in _OUT])
        self.out_tpl = _Templates([r[9] for r in _OUT], [r[3] == "c" for r in _OUT])
        self.out_index = {c: i for i, c in enumerate(out_codes)}
        self.out_j06 = self.out_index["J06"]
        self.out_u07 = self.out_index["U07"]

        self.in_codes = pa.array(in_codes)
        self.in_chapters = pa.array([icd10_chapter(c) for c in in_codes])
        self.in_names = pa.array([r[1] for r in _IN])
        self.in_dept = np.array([_DEPT[r[2]] for r in _IN])
        self.in_los = np.array([r[3] for r in _IN], dtype=float)
        self.in_base = np.array([r[4] for r in _IN], dtype=float)
        self.in_per_day = np.array([r[5] for r in _IN], dtype=float)
        self.in_cdf = self._cdfs([(r[6], r[7]) for r in _IN])
        self.in_tpl = _Templates([r[8] for r in _IN], [r[0] not in _IN_ACUTE for r in _IN])
        self.in_index = {c: i for i, c in enumerate(in_codes)}
        # Plausible treatment per inpatient code, as an index into _TREATMENTS.
        treat = []
        for c, _, dept, *_rest in _IN:
            if c.startswith("C"):
                treat.append(5 if dept == "内科" else 4)
            elif dept in ("外科", "骨科", "眼科") or c in ("O82",):
                treat.append(4)
            elif c in ("I10", "I25", "I21", "I50"):
                treat.append(1 if c == "I10" else 3)
            elif c == "E11":
                treat.append(2)
            elif c in ("I63",):
                treat.append(3)
            elif c in ("J44",):
                treat.append(7)
            elif c in ("A09", "N18"):
                treat.append(8)
            elif c == "O80":
                treat.append(9)
            else:
                treat.append(0)
        self.in_treat = np.array(treat)

        # Registered conditions → their codes in the outpatient and inpatient tables.
        cond_codes = [c for cond in CONDITIONS for c in CONDITION_ICD10[cond]]
        self.cond_codes = pa.array(cond_codes)
        self.cond_code_index = {c: i for i, c in enumerate(cond_codes)}
        self.cond_to_out = np.array([self.out_index[c] for c in cond_codes])
        self.cond_to_in = np.array([self.in_index[c] for c in cond_codes])
        # P(a stay of a person with this condition is admitted for it): rarely hypertension itself.
        admit_p = {"I10": 0.15, "E11": 0.3, "I25": 0.45, "J44": 0.5, "I63": 0.5, "N18": 0.45}
        self.cond_admit_p = np.array([admit_p.get(c, 0.7) for c in cond_codes])

        self.departments = pa.array(DEPARTMENTS)
        self.hospitals = pa.array([h for h, _, _ in _HOSPITALS])
        self.hosp_district = np.array([DISTRICTS.index(d) for _, d, _ in _HOSPITALS])
        size = np.array([w for _, _, w in _HOSPITALS])
        self.hosp_cdf_visit = np.cumsum(size**1.3) / np.sum(size**1.3)
        self.hosp_cdf_stay = np.cumsum(size**2.0) / np.sum(size**2.0)
        self.hosp_in_district = []
        for d in range(len(DISTRICTS)):
            idx = np.flatnonzero(self.hosp_district == d)
            self.hosp_in_district.append((idx, np.cumsum(size[idx]) / size[idx].sum()))

        self.districts = pa.array(DISTRICTS)
        self.region_num = np.array([int(DISTRICT_REGION_CODES[d]) for d in DISTRICTS], dtype=np.int64)
        self.sexes = pa.array(["F", "M"])
        self.insurance = pa.array(INSURANCE_TYPES)
        self.conditions = pa.array(CONDITIONS)
        self.check_chars = pa.array(list("10X98765432"))

        self.surnames = pa.array([s for s, _ in _SURNAMES])
        w = np.array([p for _, p in _SURNAMES])
        self.surname_cdf = np.cumsum(w) / w.sum()
        self.given = pa.array(list(_GIVEN_F) + list(_GIVEN_M) + [""])
        self.n_given_f, self.n_given_m = len(_GIVEN_F), len(_GIVEN_M)

        roads, towns, road_start, road_n, town_start, town_n = [], [], [], [], [], []
        for d in DISTRICTS:
            road_start.append(len(roads))
            road_n.append(len(_ROADS[d]))
            roads.extend(_ROADS[d])
            town_start.append(len(towns))
            town_n.append(len(_TOWNS[d]))
            towns.extend(_TOWNS[d])
        self.roads, self.towns, self.villages = pa.array(roads), pa.array(towns), pa.array(_VILLAGES)
        self.road_start, self.road_n = np.array(road_start), np.array(road_n)
        self.town_start, self.town_n = np.array(town_start), np.array(town_n)

        self.treatments, self.outcomes, self.advice = pa.array(_TREATMENTS), pa.array(_OUTCOMES), pa.array(_ADVICE)

    @staticmethod
    def _cdfs(rows: list[tuple[tuple[float, ...], str | None]]) -> np.ndarray:
        """Cumulative code weights for each (age group, sex) — row ``2 * age_group + male``."""
        w = np.zeros((10, len(rows)))
        for j, (weights, sex) in enumerate(rows):
            for g in range(5):
                for male in (0, 1):
                    if sex is None or (sex == "M") == bool(male):
                        w[2 * g + male, j] = weights[g]
        # Every group must be able to draw something.
        assert (w.sum(axis=1) > 0).all()
        c = np.cumsum(w, axis=1)
        return c / c[:, -1:]


class _Templates:
    """Free-text templates split around their "{d}" (duration) slot, flattened for vector lookups."""

    def __init__(self, per_code: list[tuple[str, ...]], chronic: list[bool]) -> None:
        pre, post, has_dur, start, count = [], [], [], [], []
        for lst in per_code:
            start.append(len(pre))
            count.append(len(lst))
            for t in lst:
                a, sep, b = t.partition("{d}")
                pre.append(a)
                post.append(b)
                has_dur.append(bool(sep))
        self.pre, self.post = pa.array(pre), pa.array(post)
        self.has_dur = np.array(has_dur)
        self.start, self.count = np.array(start), np.array(count)
        self.chronic = np.array(chronic)
        self.durations = pa.array(("",) + _DUR_ACUTE + _DUR_CHRONIC)

    def render(self, rng: np.random.Generator, code: np.ndarray) -> pa.Array:
        n = len(code)
        t = self.start[code] + (rng.random(n) * self.count[code]).astype(np.int64)
        u = rng.random(n)
        na, nc = len(_DUR_ACUTE), len(_DUR_CHRONIC)
        dur = np.where(self.chronic[code], 1 + na + (u * nc).astype(np.int64), 1 + (u * na).astype(np.int64))
        dur = np.where(self.has_dur[t], dur, 0)
        return pc.binary_join_element_wise(_take(self.pre, t), _take(self.durations, dur), _take(self.post, t), "")


_T = _Table()

ICD10_CODES: tuple[str, ...] = tuple(sorted({r[0] for r in _OUT} | {r[0] for r in _IN}))
ICD10_CHAPTERS: tuple[str, ...] = tuple(
    r for r in _ROMAN if r in {icd10_chapter(c) for c in ICD10_CODES}
)

# =============================================================================== helpers


def _take(values: pa.Array, idx: np.ndarray) -> pa.Array:
    return values.take(pa.array(idx, type=pa.int64()))


def _str(a: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(a, type=pa.int64()), pa.string())


def _dates(days: np.ndarray) -> pa.Array:
    return pa.array(days.astype(np.int32), type=pa.int32()).view(pa.date32())


def _join(*parts) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _draw_grouped(rng: np.random.Generator, cdfs: np.ndarray, group: np.ndarray) -> np.ndarray:
    """One draw per row from ``cdfs[group[row]]``."""
    u = rng.random(len(group))
    out = np.empty(len(group), dtype=np.int64)
    for g in range(cdfs.shape[0]):
        m = group == g
        if m.any():
            out[m] = np.minimum(np.searchsorted(cdfs[g], u[m], side="right"), cdfs.shape[1] - 1)
    return out


def _age_group(age_years: np.ndarray) -> np.ndarray:
    return np.searchsorted(_AGE_GROUP_EDGES, age_years, side="right")


def _ymd(days: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 → the integer YYYYMMDD."""
    dt = days.astype("datetime64[D]")
    y = dt.astype("datetime64[Y]").astype(np.int64) + 1970
    m = dt.astype("datetime64[M]").astype(np.int64) % 12 + 1
    d = (dt - dt.astype("datetime64[M]")).astype(np.int64) + 1
    return y * 10000 + m * 100 + d


def _cn_id_strings(body17: np.ndarray) -> pa.Array:
    """18-character GB 11643 ID numbers from their first 17 digits (as int64, leading digit ≠ 0)."""
    x = body17.copy()
    total = np.zeros_like(x)
    for w in (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)[::-1]:
        total += (x % 10) * w
        x //= 10
    return _join(_str(body17), _take(_T.check_chars, total % 11))


def _money(x: np.ndarray, hi: float) -> np.ndarray:
    return np.round(np.clip(x, 0.0, hi), 2)


# =============================================================================== the generator


@dataclass
class _Run:
    seed: int
    twin: bool
    id_counter: np.ndarray  # int16 [region × birth day × sex]: sequence slots used so far
    next_visit: int
    next_stay: int
    next_settlement: int

    def rng(self, chunk: int, stream: int) -> np.random.Generator:
        ss = np.random.SeedSequence([self.seed, int(self.twin), chunk, stream, _FORMAT_VERSION])
        return np.random.default_rng(ss)

    def assign_sequences(self, district: np.ndarray, birth: np.ndarray, male: np.ndarray):
        """Unique 3-digit sequence numbers per (region, birth date, sex), continuing across chunks.

        Returns (sequence, birth). In the practically impossible case that a (region, date, sex)
        cell has used all its 250 slots, the birth date is moved on by a day (so the ID stays
        consistent with the birth date)."""
        birth = birth.copy()
        seq = np.empty(len(birth), dtype=np.int64)
        pending = np.arange(len(birth))
        while pending.size:
            b, d, m = birth[pending], district[pending], male[pending].astype(np.int64)
            key = (d * _N_BIRTH_DAYS + (b - _BIRTH_MIN)) * 2 + m
            order = np.argsort(key, kind="stable")
            ks = key[order]
            pos = np.arange(len(ks))
            first = np.r_[True, ks[1:] != ks[:-1]]
            rank_sorted = pos - np.maximum.accumulate(np.where(first, pos, 0))
            rank = np.empty_like(rank_sorted)
            rank[order] = rank_sorted
            k = self.id_counter[key].astype(np.int64) + rank
            ok = k < _SEQ_SLOTS
            # A bijection of the slot number, so that sequence numbers look scattered.
            j = (k * 73 + key * 37) % _SEQ_SLOTS
            seq[pending[ok]] = 2 * j[ok] + m[ok] + (_TWIN_SEQ_OFFSET if self.twin else 0)
            uk, cnt = np.unique(key[ok], return_counts=True)
            self.id_counter[uk] += cnt.astype(np.int16)
            pending = pending[~ok]
            nb = birth[pending] + 1
            birth[pending] = np.where(nb > _BIRTH_MAX, _BIRTH_MIN, nb)
        return seq, birth


_S_RESIDENT, _S_CHRONIC, _S_VISIT, _S_STAY, _S_SETTLE, _S_TEXT = range(6)


def generate(out_dir: Path, scale: int, seed: int, twin: bool = False) -> dict[str, Path]:
    """Write one Parquet file per dataset into out_dir, named '<code>.parquet', e.g. 'health.resident.parquet'.

    scale = target number of outpatient visit rows (approximate, within ~10%); residents ≈ scale/20.
    twin=True makes the dev twin: same schema, different people, person_id and id_number sets disjoint
    from twin=False with ANY seed.

    Returns ``{dataset code: path}`` in ``DATASET_CODES`` order. Files are written under a temporary
    name and renamed when complete, so a reader never sees a half-written file. ``seed`` must be a
    non-negative integer.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError("scale must be a positive integer")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError("seed must be a non-negative integer")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale, seed, twin = int(scale), int(seed), bool(twin)

    n_people = max(1, round(scale / VISITS_PER_RESIDENT))
    event_offset = TWIN_EVENT_ID_OFFSET if twin else 0
    run = _Run(
        seed=seed,
        twin=twin,
        id_counter=np.zeros(len(DISTRICTS) * _N_BIRTH_DAYS * 2, dtype=np.int16),
        next_visit=event_offset + 1,
        next_stay=event_offset + 1,
        next_settlement=event_offset + 1,
    )
    paths = {code: out_dir / f"{code}.parquet" for code in DATASET_CODES}
    tmp = {code: out_dir / f".{code}.parquet.{os.getpid()}.tmp" for code in DATASET_CODES}
    writers = {
        code: pq.ParquetWriter(tmp[code], SCHEMAS[code], compression="zstd", compression_level=3)
        for code in DATASET_CODES
    }
    try:
        # Parquet encoding and compression release the GIL: write chunk i on a second thread while
        # chunk i + 1 is generated. At most two chunks are alive at once; order is preserved.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-writer") as pool:
            pending: Future | None = None
            for chunk, start in enumerate(range(0, n_people, CHUNK_PEOPLE)):
                n = min(CHUNK_PEOPLE, n_people - start)
                tables = _chunk(run, chunk, start, n, scale * n / n_people)
                if pending is not None:
                    pending.result()
                pending = pool.submit(_write_chunk, writers, tables)
                del tables
            if pending is not None:
                pending.result()
        for w in writers.values():
            w.close()
        for code in DATASET_CODES:
            os.replace(tmp[code], paths[code])
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:
                pass
        for p in tmp.values():
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        raise
    return paths


def _write_chunk(writers: dict[str, pq.ParquetWriter], tables: dict[str, pa.Table]) -> None:
    for code in DATASET_CODES:
        if tables[code].num_rows:
            writers[code].write_table(tables[code])


def _chunk(run: _Run, chunk: int, start: int, n: int, visit_target: float) -> dict[str, pa.Table]:
    person_base = (TWIN_PERSON_OFFSET if run.twin else 0) + start + 1
    pid = np.arange(person_base, person_base + n, dtype=np.int64)

    # ---------------------------------------------------------------- residents
    rng = run.rng(chunk, _S_RESIDENT)
    district = _draw(rng, np.cumsum(_DISTRICT_P) / _DISTRICT_P.sum(), n)
    male = rng.random(n) < 0.508
    yidx = _draw(rng, np.cumsum(_BIRTH_YEAR_P), n)
    birth = _YEAR_START[yidx] + (rng.random(n) * _YEAR_LEN[yidx]).astype(np.int64)
    risk = rng.standard_normal(n)  # shared health risk: conditions and use of care
    frail_noise = rng.standard_normal(n)
    seq, birth = run.assign_sequences(district, birth, male)
    body17 = _T.region_num[district] * 10**11 + _ymd(birth) * 1000 + seq
    id_number = _cn_id_strings(body17)
    age = (_REF - birth) / 365.25

    sur = _draw(rng, _T.surname_cdf, n)
    g_off = np.where(male, _T.n_given_f, 0)
    g_n = np.where(male, _T.n_given_m, _T.n_given_f)
    g1 = g_off + (rng.random(n) * g_n).astype(np.int64)
    g2 = g_off + (rng.random(n) * g_n).astype(np.int64)
    single = rng.random(n) < 0.3
    g2 = np.where(single, len(_GIVEN_F) + len(_GIVEN_M), g2)  # the empty string
    name = _join(_take(_T.surnames, sur), _take(_T.given, g1), _take(_T.given, g2))

    phone_num = _PHONE_PREFIXES[rng.integers(0, len(_PHONE_PREFIXES), n)] * 10**8 + rng.integers(0, 10**8, n)
    phone = _str(phone_num)

    road = _T.road_start[district] + (rng.random(n) * _T.road_n[district]).astype(np.int64)
    house = rng.integers(1, 400, n)
    unit = rng.integers(1, 7, n)
    room = rng.integers(1, 27, n) * 100 + rng.integers(1, 5, n)
    d_names = _take(_T.districts, district)
    urban_addr = _join(d_names, _take(_T.roads, road), _str(house), "号", _str(unit), "单元", _str(room), "室")
    town = _T.town_start[district] + (rng.random(n) * _T.town_n[district]).astype(np.int64)
    village = rng.integers(0, len(_VILLAGES), n)
    grp = rng.integers(1, 13, n)
    rural_addr = _join(d_names, _take(_T.towns, town), _take(_T.villages, village), _str(grp), "组",
                       _str(rng.integers(1, 120, n)), "号")
    rural = rng.random(n) < np.where(_URBAN[district], 0.08, 0.45)
    address = pc.if_else(pa.array(rural), rural_addr, urban_addr)

    u = rng.random(n)
    p_uninsured = 0.04
    p_worker = np.where(age < 18, 0.0, np.where(age < 60, np.where(_URBAN[district], 0.55, 0.3),
                                                np.where(_URBAN[district], 0.45, 0.2)))
    insurance = np.where(u < p_uninsured, 2, np.where(u < p_uninsured + (1 - p_uninsured) * p_worker, 0, 1))
    insured = insurance != 2

    residents = pa.Table.from_arrays(
        [pa.array(pid), id_number, name, phone, _take(_T.sexes, male.astype(np.int64)), _dates(birth),
         d_names, address, _take(_T.insurance, insurance)],
        schema=SCHEMAS["health.resident"],
    )

    # ---------------------------------------------------------------- chronic conditions
    rng = run.rng(chunk, _S_CHRONIC)
    a = np.clip(age, 0, 90)
    dec = (a - 50) / 10
    #              logit at 50, per decade, male shift
    params = ((-1.27, 0.55, 0.1), (-2.2, 0.45, 0.1), (-3.5, 0.7, 0.4), (-4.2, 0.6, 0.0),
              (-3.5, 0.6, 0.5), (-4.2, 0.7, 0.3), (-3.2, 0.45, 0.0))
    has = np.zeros((n, len(CONDITIONS)), dtype=bool)
    u = rng.random((n, len(CONDITIONS)))
    for c, (b0, b1, bm) in enumerate(params):
        logit = b0 + b1 * dec + 0.6 * risk + bm * male
        p = 1 / (1 + np.exp(-logit))
        p[age < 18] = 0.0
        has[:, c] = u[:, c] < p
    c_person, c_cond = np.nonzero(has)  # sorted by person, then condition
    n_cond = has.sum(axis=1)
    m = len(c_person)
    # ICD-10 of each condition row (cancer: by site, breast for women only).
    code_name = np.array([_T.cond_code_index[CONDITION_ICD10[c][0]] for c in CONDITIONS])[c_cond]
    is_cancer = c_cond == CONDITIONS.index("cancer")
    site_f = np.cumsum([0.35, 0.25, 0.12, 0.15, 0.13])
    site_m = np.cumsum([0.0, 0.40, 0.20, 0.20, 0.20])  # order: C50 C34 C16 C18 C22 (no C50 for men)
    site_order = np.array([_T.cond_code_index[c] for c in ("C50", "C34", "C16", "C18", "C22")])
    us = rng.random(m)
    site = np.where(male[c_person], np.searchsorted(site_m, us * site_m[-1], side="right"),
                    np.searchsorted(site_f, us * site_f[-1], side="right"))
    code_name = np.where(is_cancer, site_order[np.minimum(site, 4)], code_name)
    # Diagnosis: on average ~6 years ago, never before age 18 or 1985, never after the window.
    age_c = age[c_person]
    span = np.maximum(age_c - 18, 0)
    years_ago = rng.exponential(6.0, m)
    years_ago = np.where(years_ago < span, years_ago, span * rng.random(m))
    diag = _REF - (years_ago * 365.25).astype(np.int64) - rng.integers(0, 60, m)
    diag = np.maximum(diag, np.maximum(birth[c_person] + (18 * 365.25 + 1), _DIAG_MIN).astype(np.int64))
    diag = np.minimum(diag, _REF)
    chronic = pa.Table.from_arrays(
        [pa.array(pid[c_person]), _take(_T.conditions, c_cond), _take(_T.cond_codes, code_name), _dates(diag)],
        schema=SCHEMAS["health.chronic_condition"],
    )
    c_start = np.concatenate([[0], np.cumsum(n_cond)[:-1]])

    # ---------------------------------------------------------------- outpatient visits
    rng = run.rng(chunk, _S_VISIT)
    age_mid = np.maximum(age - 3.5, 0)
    age_f = np.interp(age_mid, [0, 3, 6, 14, 20, 45, 60, 75, 90], [1.6, 1.2, 0.8, 0.55, 0.6, 0.9, 1.4, 2.2, 2.6])
    sex_f = np.where(male, 1.0, 1.15)
    sigma = _FRAILTY_SIGMA
    frailty = np.exp(sigma * (0.45 * risk + 0.89 * frail_noise) - sigma**2 / 2)
    exposure = (_WIN_MAX - np.maximum(_WIN_MIN, birth) + 1) / _WIN_DAYS
    lam = age_f * sex_f * (1 + _CHRONIC_VISIT_FACTOR * n_cond) * frailty * exposure * np.where(insured, 1.0, 0.6)
    # Saturate the extreme tail (nobody visits every day for seven years), then scale to the target.
    mean = lam.mean()
    lam = lam / (1 + lam / (_VISIT_SATURATION * mean))
    lam *= visit_target / lam.sum()
    counts = np.minimum(rng.poisson(lam), 3000)

    # Each person's usual hospital: mostly one of their own district.
    prim = _draw(rng, _T.hosp_cdf_visit, n)
    local = rng.random(n) < 0.85
    u = rng.random(n)
    for d, (idx, cdf) in enumerate(_T.hosp_in_district):
        sel = local & (district == d)
        prim[sel] = idx[np.minimum(np.searchsorted(cdf, u[sel], side="right"), len(idx) - 1)]

    vp = np.repeat(np.arange(n), counts)  # person index of each visit (sorted)
    nv = len(vp)
    vd = np.searchsorted(_ACTIVITY_CDF, rng.random(nv), side="right").astype(np.int64) + _WIN_MIN
    vd = np.minimum(vd, _WIN_MAX)
    bv = birth[vp]
    early = vd < bv
    vd[early] = bv[early] + (vd[early] - _WIN_MIN) % (_WIN_MAX - bv[early] + 1)
    order = np.lexsort((vd, vp))
    vd = vd[order]  # vp stays sorted: lexsort is stable on the primary key
    v_age = (vd - bv) / 365.25
    v_male = male[vp]
    code = _draw_grouped(rng, _T.out_cdf, 2 * _age_group(v_age) + v_male)
    covid_ok = (vd >= _COVID_FROM) & (vd <= _COVID_TO)
    code = np.where((code == _T.out_u07) & ~covid_ok, _T.out_j06, code)
    # Chronic patients: often their condition's code, once it has been diagnosed.
    k = n_cond[vp]
    j = c_start[vp] + (rng.random(nv) * np.maximum(k, 1)).astype(np.int64)
    u = rng.random(nv)
    if m:  # (j points at someone else's row when k == 0; those rows are masked out)
        j = np.minimum(j, m - 1)
        take_cond = (k > 0) & (u < 0.6) & (vd >= diag[j])
        code = np.where(take_cond, _T.cond_to_out[code_name[j]], code)
    dept = _T.out_dept[code].copy()
    dept[(v_age < 14) & (dept == _DEPT["内科"])] = _DEPT["儿科"]
    ue = rng.random(nv)
    emergency = ue < _T.out_emerg[code]
    tcm = ~emergency & (rng.random(nv) < _T.out_tcm[code])
    dept[emergency] = _DEPT["急诊科"]
    dept[tcm] = _DEPT["中医科"]
    hosp = np.where(rng.random(nv) < 0.72, prim[vp], _draw(rng, _T.hosp_cdf_visit, nv))
    fee = _T.out_fee[code] * rng.lognormal(0.0, 0.75, nv) * np.where(emergency, 1.6, 1.0)
    fee = _money(fee, 5000.0)
    visit_id = np.arange(run.next_visit, run.next_visit + nv, dtype=np.int64)
    run.next_visit += nv

    # Texts and their personal-data fraction.
    trng = run.rng(chunk, _S_TEXT)
    complaint = _T.out_tpl.render(trng, code)
    complaint = _embed_pii(trng, complaint, vp, _P_PII_COMPLAINT, _PII_COMPLAINT, name, id_number, phone, n)
    visits = pa.Table.from_arrays(
        [pa.array(visit_id), pa.array(pid[vp]), _take(_T.hospitals, hosp), _take(_T.districts, _T.hosp_district[hosp]),
         _take(_T.departments, dept), _dates(vd), _take(_T.out_codes, code), _take(_T.out_chapters, code),
         complaint, pa.array(fee)],
        schema=SCHEMAS["health.outpatient_visit"],
    )

    # ---------------------------------------------------------------- inpatient stays
    rng = run.rng(chunk, _S_STAY)
    rate = np.interp(age_mid, [0, 1, 2, 14, 20, 45, 60, 75, 90], [0.12, 0.05, 0.03, 0.025, 0.03, 0.045, 0.08, 0.13, 0.18])
    rate = rate + np.where(~male & (age_mid >= 20) & (age_mid < 40), 0.05, 0.0)
    f_half = np.sqrt(frailty) / np.exp(-(sigma**2) / 8)  # mean 1
    rate = rate * (1 + 0.35 * n_cond) * f_half
    s_counts = np.minimum(rng.poisson(rate * (_WIN_DAYS / 365.25) * exposure), 60)
    sp = np.repeat(np.arange(n), s_counts)
    ns = len(sp)
    sb = birth[sp]
    admit = np.searchsorted(_ACTIVITY_CDF, rng.random(ns), side="right").astype(np.int64) + _WIN_MIN
    admit = np.minimum(admit, _WIN_MAX)
    early = admit < sb
    admit[early] = sb[early] + (admit[early] - _WIN_MIN) % (_WIN_MAX - sb[early] + 1)
    s_age = (admit - sb) / 365.25
    s_code = _draw_grouped(rng, _T.in_cdf, 2 * _age_group(s_age) + male[sp])
    k = n_cond[sp]
    j = c_start[sp] + (rng.random(ns) * np.maximum(k, 1)).astype(np.int64)
    u = rng.random(ns)
    if m:  # (j points at someone else's row when k == 0; those rows are masked out)
        j = np.minimum(j, m - 1)
        take_cond = (k > 0) & (u < _T.cond_admit_p[code_name[j]]) & (admit >= diag[j])
        s_code = np.where(take_cond, _T.cond_to_in[code_name[j]], s_code)
    los = np.clip(np.rint(_T.in_los[s_code] * rng.lognormal(0.0, 0.5, ns)), 0, 180).astype(np.int64)
    over = admit + los > _WIN_MAX
    admit[over] = _WIN_MAX - los[over]
    discharge = admit + los
    order = np.lexsort((admit, sp))
    # A person is in one hospital at a time: drop stays that begin before an earlier one ended.
    sp_o = sp[order]
    prev_end = np.r_[-1, np.maximum.accumulate(sp_o * 100_000 + discharge[order])[:-1]]
    same = np.r_[False, sp_o[1:] == sp_o[:-1]]
    order = order[~(same & (sp_o * 100_000 + admit[order] <= prev_end))]
    sp, admit, discharge, los, s_code, s_age = sp[order], admit[order], discharge[order], los[order], s_code[order], s_age[order]
    ns = len(sp)
    s_dept = _T.in_dept[s_code].copy()
    s_dept[(s_age < 14) & (s_dept == _DEPT["内科"])] = _DEPT["儿科"]
    s_dept[rng.random(ns) < 0.03] = _DEPT["急诊科"]
    s_hosp = np.where(rng.random(ns) < 0.5, prim[sp], _draw(rng, _T.hosp_cdf_stay, ns))
    cost = (_T.in_base[s_code] + _T.in_per_day[s_code] * los) * rng.lognormal(0.0, 0.55, ns)
    cost = _money(cost, 500000.0)
    stay_id = np.arange(run.next_stay, run.next_stay + ns, dtype=np.int64)
    run.next_stay += ns

    note = _join(
        "患者因“", _T.in_tpl.render(trng, s_code), "”入院，入院诊断：", _take(_T.in_names, s_code),
        "。入院后予", _take(_T.treatments, _T.in_treat[s_code]), "等治疗，",
        _take(_T.outcomes, trng.integers(0, len(_OUTCOMES), ns)), "，住院", _str(los), "天，今日出院。出院医嘱：",
        _take(_T.advice, _advice(trng, _T.in_treat[s_code])), "。",
    )
    note = _embed_pii(trng, note, sp, _P_PII_NOTE, _PII_NOTE, name, id_number, phone, n)
    stays = pa.Table.from_arrays(
        [pa.array(stay_id), pa.array(pid[sp]), _take(_T.hospitals, s_hosp), _take(_T.districts, _T.hosp_district[s_hosp]),
         _take(_T.departments, s_dept), _dates(admit), _dates(discharge), pa.array(los),
         _take(_T.in_codes, s_code), _take(_T.in_chapters, s_code), pa.array(cost), note],
        schema=SCHEMAS["health.inpatient_stay"],
    )

    # ---------------------------------------------------------------- settlements
    rng = run.rng(chunk, _S_SETTLE)
    s_sel = np.flatnonzero(insured[sp])
    v_sel = np.flatnonzero(insured[vp] & (rng.random(nv) < 0.3))
    s_lag = np.minimum(rng.geometric(0.15, len(s_sel)) - 1, 60)
    v_lag = np.where(rng.random(len(v_sel)) < 0.7, 0, np.minimum(rng.geometric(0.2, len(v_sel)), 60))
    person = np.concatenate([sp[s_sel], vp[v_sel]])
    settled = np.minimum(np.concatenate([discharge[s_sel] + s_lag, vd[v_sel] + v_lag]), _SETTLE_MAX)
    total = np.concatenate([cost[s_sel], fee[v_sel]])
    is_stay = np.r_[np.ones(len(s_sel), bool), np.zeros(len(v_sel), bool)]
    ins = insurance[person]
    worker = ins == 0
    share = np.where(is_stay, np.where(worker, 0.75, 0.55), np.where(worker, 0.6, 0.5))
    share = share + rng.random(len(person)) * np.where(is_stay, 0.15, np.where(worker, 0.2, 0.1))
    total_cents = np.rint(total * 100).astype(np.int64)
    fund_cents = np.rint(total_cents * share).astype(np.int64)
    self_cents = total_cents - fund_cents
    ref_stay = np.concatenate([stay_id[s_sel], np.zeros(len(v_sel), np.int64)])
    ref_visit = np.concatenate([np.zeros(len(s_sel), np.int64), visit_id[v_sel]])
    order = np.lexsort((settled, person))
    person, settled, is_stay, ins = person[order], settled[order], is_stay[order], ins[order]
    total_cents, fund_cents, self_cents = total_cents[order], fund_cents[order], self_cents[order]
    ref_stay, ref_visit = ref_stay[order], ref_visit[order]
    nset = len(person)
    settlement_id = np.arange(run.next_settlement, run.next_settlement + nset, dtype=np.int64)
    run.next_settlement += nset
    settlements = pa.Table.from_arrays(
        [pa.array(settlement_id), pa.array(pid[person]),
         pa.array(ref_stay, type=pa.int64(), mask=~is_stay), pa.array(ref_visit, type=pa.int64(), mask=is_stay),
         _dates(settled), _take(_T.insurance, ins), pa.array(total_cents / 100), pa.array(fund_cents / 100),
         pa.array(self_cents / 100)],
        schema=SCHEMAS["health.insurance_settlement"],
    )

    return {
        "health.resident": residents,
        "health.chronic_condition": chronic,
        "health.outpatient_visit": visits,
        "health.inpatient_stay": stays,
        "health.insurance_settlement": settlements,
    }


def _advice(rng: np.random.Generator, treatment: np.ndarray) -> np.ndarray:
    """Discharge advice fitting the treatment: wound care after surgery, medication otherwise."""
    surgical = treatment == _TREATMENTS.index("手术")
    u = rng.random(len(treatment))
    after_surgery = np.array([1, 3, 4])[(u * 3).astype(np.int64)]
    medical = np.array([0, 1, 2, 3, 5])[(u * 5).astype(np.int64)]
    return np.where(surgical, after_surgery, medical)


def _embed_pii(
    rng: np.random.Generator,
    texts: pa.Array,
    person: np.ndarray,
    p: float,
    templates: tuple[str, ...],
    name: pa.Array,
    id_number: pa.Array,
    phone: pa.Array,
    n_people: int,
) -> pa.Array:
    """Rewrite a fraction ``p`` of ``texts`` so that they carry the person's (or a relative's —
    another resident of the same chunk) name, ID number and/or mobile number, as real notes do."""
    rows = len(texts)
    hit = rng.random(rows) < p
    idx = np.flatnonzero(hit)
    if not len(idx):
        return texts
    own = person[idx]
    rel = (own + rng.integers(1, max(n_people, 2), len(idx))) % n_people  # someone else (or self if n = 1)
    tpl = rng.integers(0, len(templates), len(idx))
    base = _take(texts, idx).to_pylist()
    nm, ids, ph = _take(name, own).to_pylist(), _take(id_number, own).to_pylist(), _take(phone, own).to_pylist()
    rnm, rids, rph = _take(name, rel).to_pylist(), _take(id_number, rel).to_pylist(), _take(phone, rel).to_pylist()
    new = [
        templates[t].format(text=b, name=a, id=i, phone=q, rname=ra, rid=ri, rphone=rq)
        for t, b, a, i, q, ra, ri, rq in zip(tpl.tolist(), base, nm, ids, ph, rnm, rids, rph)
    ]
    return pc.replace_with_mask(texts, pa.array(hit), pa.array(new, type=pa.string()))
