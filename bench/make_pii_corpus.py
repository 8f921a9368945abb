"""Build the labelled PII test corpus ``tests/data/pii_corpus.jsonl`` (deterministic, seeded).

    python bench/make_pii_corpus.py                  # seed 4, writes tests/data/pii_corpus.jsonl
    python bench/make_pii_corpus.py --check          # exit 1 if the file differs from a fresh build

One JSON object per line: ``{"text": ..., "entities": [{"type": kind, "start": i, "end": j}]}``
(``kind`` a ``catalog.descriptor.PiiKind`` value, ``start``/``end`` in characters, end exclusive).
The texts imitate Chinese medical and insurance free text — chief complaints, admission notes,
claim notes, employer records, traffic-injury notes, notes on patients from Hong Kong, Macao and
Taiwan — and are all synthetic: names are random surname + given-name draws, numbers are random
with their check characters computed by ``catalog.identifiers`` (GB 11643, GB 32100, Luhn), e-mail
domains are ``example.*``. Nothing comes from real people.

What a line labels is what a careful human would mark as personal data, whether or not the
recognizers can find it: names without a cue word (a doctor's name), addresses written with
Chinese numerals, grouped bank cards… are labelled too, so recall is measured honestly. Not
labelled (negatives, on purpose): ID numbers, credit codes and bank cards whose check character
is wrong; 11-digit numbers that are not mobiles (insurance numbers, numbers inside longer runs,
landlines); dates, amounts, record, invoice and settlement numbers (some shaped like ID numbers or
cards, and then, like real serials, occasionally passing a check digit by chance); drug approval
numbers (国药准字H20003263) and lot numbers shaped like permits or passports; hospital buildings,
bus routes and city names that are not street addresses; and plain clinical text with no PII.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from catalog.identifiers import (  # noqa: E402
    USCC_ALPHABET,
    cn_id_check_char,
    is_valid_cn_id,
    luhn_check_digit,
    uscc_check_char,
)

OUT = REPO / "tests" / "data" / "pii_corpus.jsonl"
KINDS = ("cn_id", "uscc", "bank_card", "phone", "email", "name", "passport", "travel_permit", "plate",
         "address")

# ----------------------------------------------------------------------------- vocabularies

SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡杜叶程苏魏吕丁"
            "任沈姚卢姜崔钟谭陆汪范金石贾白海纳拓冶虎锁兰哈")
COMPOUND = ("欧阳", "司马", "上官", "诸葛")
GIVEN = ("伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波俊浩宇轩博文建国志东林峰成龙德学福荣新兵忠贵山春元亮晨阳"
         "芳娜敏静丽艳娟霞秀英玲梅红琴燕雪婷慧颖莉萍倩欣怡佳晶洁琳雨涵梓萱凤桂珍玉梦悦琪瑶雅晓丹桃蓉")
RELATIONS = ("之子", "之女", "之妻", "之夫", "之母", "之父")

SYMPTOMS = ("咳嗽", "咳痰", "发热", "头痛", "头晕", "胸闷", "胸痛", "气短", "心悸", "腹痛", "腹泻", "恶心", "呕吐",
            "乏力", "纳差", "腰痛", "关节痛", "咽痛", "流涕", "皮疹", "尿频", "尿急", "水肿", "便血", "反酸", "失眠",
            "视物模糊", "耳鸣", "肢体麻木", "上腹部不适", "双下肢水肿", "活动后气促", "右膝关节疼痛")
DURATIONS = ("1天", "2天", "3天", "5天", "1周", "2周", "半月", "1月", "3月", "半年", "1年", "3年", "十余年", "2小时",
             "半天", "两天", "三天")
COURSES = ("加重{d}", "伴发热{d}", "伴恶心、呕吐", "夜间加重", "活动后加重", "休息后缓解", "伴咳黄痰", "无明显诱因",
           "自服药物无效", "伴头晕", "进食后加重")
DIAGNOSES = ("社区获得性肺炎", "2型糖尿病", "原发性高血压", "冠状动脉粥样硬化性心脏病", "慢性阻塞性肺疾病急性加重",
             "急性胃肠炎", "腰椎间盘突出症", "右桡骨远端骨折", "脑梗死", "慢性肾脏病3期", "急性支气管炎",
             "胆囊结石伴胆囊炎", "左侧肋骨骨折", "颅脑损伤", "右胫腓骨骨折", "急性阑尾炎", "带状疱疹")
HOSPITALS = ("宁夏医科大学总医院", "银川市第一人民医院", "宁夏回族自治区人民医院", "银川市第二人民医院",
             "银川市中医医院", "永宁县人民医院", "贺兰县人民医院", "灵武市人民医院", "吴忠市人民医院",
             "石嘴山市第一人民医院", "固原市人民医院", "中卫市人民医院")
DEPARTMENTS = ("内科", "外科", "儿科", "急诊科", "骨科", "呼吸科", "心内科", "消化科", "神经内科", "肾内科", "普外科")
INSURERS = ("某某人寿保险股份有限公司宁夏分公司", "某某财产保险股份有限公司银川中心支公司", "某某健康保险股份有限公司")
COMPANIES = ("宁夏某某科技有限公司", "银川某某商贸有限公司", "宁夏某某建设工程有限公司", "吴忠市某某农业发展有限公司",
             "宁夏某某物流有限公司", "银川某某餐饮管理有限公司", "宁夏某某医药连锁有限公司")
BANKS = ("中国工商银行", "中国建设银行", "中国农业银行", "中国银行", "宁夏银行", "黄河农村商业银行", "招商银行")
DRUGS = ("阿莫西林胶囊", "头孢克肟分散片", "硝苯地平控释片", "二甲双胍缓释片", "阿托伐他汀钙片", "布洛芬缓释胶囊",
         "复方甘草口服溶液", "奥美拉唑肠溶胶囊")

# Ningxia (and a few other) administrative units, roads, compounds and villages.
PROVINCES = ("宁夏回族自治区", "宁夏", "甘肃省", "内蒙古自治区", "陕西省")
CITIES = {"银川市": ("兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市"),
          "石嘴山市": ("大武口区", "惠农区", "平罗县"),
          "吴忠市": ("利通区", "红寺堡区", "青铜峡市", "同心县"),
          "固原市": ("原州区", "西吉县", "彭阳县"),
          "中卫市": ("沙坡头区", "中宁县", "海原县")}
OTHER_CITIES = {"兰州市": ("城关区", "七里河区"), "西安市": ("雁塔区", "碑林区"), "呼和浩特市": ("新城区",)}
STREET_OFFICES = ("丽景街道", "凤凰北街街道", "文化街街道", "长城中路街道", "满春街道", "宁华街道", "朔方路街道")
ROADS = ("解放西街", "解放东街", "北京中路", "北京东路", "文化西街", "民族北街", "正源北街", "亲水大街", "宁安大街",
         "黄河东路", "长城中路", "贺兰山路", "万寿路", "康平路", "满城北街", "六盘山路", "朔方路", "同心南街",
         "银河东路", "富兴北街", "利民街", "灵州大街", "东塔街", "崇兴路", "上海西路", "友爱巷", "鼓楼南街",
         "清和北街", "胜利南街", "新华东街", "中山南街", "凤凰北街", "湖滨西街")
COMPOUNDS = ("阳光小区", "金色家园", "丽景花园", "宝湖湾", "紫园", "海宝小区", "丽子园", "唐徕嘉园", "新城花园",
             "万达广场", "世纪大厦", "银湖公寓", "燕鸽新村", "铁路家属院", "北塔社区", "锦绣城", "上陵府")
TOWNS = ("望洪镇", "杨和镇", "闽宁镇", "习岗镇", "金贵镇", "临河镇", "掌政镇", "月牙湖乡", "通贵乡", "良田镇")
VILLAGES = ("红星村", "新华村", "永红村", "胜利村", "团结村", "和平村", "光明村", "东方村", "建设村", "五星村",
            "联合村", "原隆村", "通北村", "金星村", "满春村")
CN_DIGITS = "一二三四五六七八九十"

ID_REGIONS = ("640104", "640105", "640106", "640121", "640122", "640181", "640202", "640302", "640402", "640502",
              "642221", "620102", "610113", "150102", "110105", "310115")
CARD_BINS = ("622202", "621700", "622848", "621661", "622588", "623062", "621226", "622700")
PLATE_PROVINCES = "宁宁宁宁宁甘蒙陕京沪粤川豫鲁新青"
PLATE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
EMAIL_DOMAINS = ("example.com", "example.cn", "example.org", "mail.example.com", "example.com.cn")
PINYIN = ("zhang", "wang", "li", "liu", "chen", "yang", "ma", "zhao", "huang", "zhou", "wu", "xu", "sun", "hu",
          "wei", "fang", "jing", "lei", "tao", "hua", "ming", "ying", "xiao", "hong", "yan", "ning")


# ----------------------------------------------------------------------------- values


class Gen:
    """Random values of every kind (valid and not) from one seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def choice(self, seq):  # noqa: ANN001, ANN201
        return self.r.choice(seq)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def digits(self, n: int, first: str = "0123456789") -> str:
        return self.r.choice(first) + "".join(self.r.choice("0123456789") for _ in range(n - 1))

    # -- people
    def name(self) -> str:
        sur = self.choice(COMPOUND) if self.chance(0.04) else self.choice(SURNAMES)
        return sur + "".join(self.choice(GIVEN) for _ in range(1 if self.chance(0.3) else 2))

    def age(self) -> int:
        return self.r.randint(1, 92)

    def sex(self) -> str:
        return self.choice("男女")

    # -- identifiers
    def _id_body(self) -> str:
        year = self.r.randint(1932, 2022)
        return f"{self.choice(ID_REGIONS)}{year}{self.r.randint(1, 12):02d}{self.r.randint(1, 28):02d}" \
               f"{self.r.randint(0, 999):03d}"

    def cn_id(self) -> str:
        body = self._id_body()
        s = body + cn_id_check_char(body)
        return s.lower() if s.endswith("X") and self.chance(0.2) else s

    def bad_cn_id(self) -> str:
        body = self._id_body()
        good = cn_id_check_char(body)
        return body + self.choice([c for c in "0123456789X" if c != good])

    def cn_id15(self) -> str:
        return f"{self.choice(ID_REGIONS)}{self.r.randint(30, 85):02d}{self.r.randint(1, 12):02d}" \
               f"{self.r.randint(1, 28):02d}{self.r.randint(0, 999):03d}"

    def mobile(self) -> str:
        return "1" + self.choice("3456789") + self.digits(9)

    def mobile_written(self) -> str:
        m = self.mobile()
        if self.chance(0.1):  # split for reading: 138-1234-5678, 138 1234 5678
            sep = self.choice("- ")
            return m[:3] + sep + m[3:7] + sep + m[7:]
        return self.choice(["", "", "", "", "+86 ", "+86-", "+86", "86", "0086"]) + m

    def not_mobile_11(self) -> str:
        """11 digits that are not a mobile number: a leading 0, 2, 6 or 9, or 10/11/12."""
        if self.chance(0.6):
            return self.choice("0269") + self.digits(10)
        return self.choice(["10", "11", "12"]) + self.digits(9)

    def card(self) -> str:
        n = self.choice((16, 16, 19, 19, 19, 17, 18))
        payload = self.choice(CARD_BINS) + self.digits(n - 7)
        return payload + luhn_check_digit(payload)

    def card_written(self) -> str:
        c = self.card()
        if len(c) in (16, 19) and self.chance(0.25):
            sep = self.choice(" -")
            return sep.join(c[i:i + 4] for i in range(0, len(c), 4))
        return c

    def bad_card(self) -> str:
        c = self.card()
        return c[:-1] + self.choice([d for d in "0123456789" if d != c[-1]])

    def uscc(self) -> str:
        body = self.choice("9915") + self.choice("123") + self.choice(("640100", "640104", "640300", "640200",
                                                                        "640500", "642200")) \
            + "".join(self.choice(USCC_ALPHABET) for _ in range(9))
        return body + uscc_check_char(body)

    def bad_uscc(self) -> str:
        u = self.uscc()
        return u[:-1] + self.choice([c for c in USCC_ALPHABET if c != u[-1]])

    def email(self) -> str:
        local = self.choice(PINYIN) + self.choice(["", ".", "_"]) + self.choice(PINYIN)
        if self.chance(0.5):
            local += str(self.r.randint(1, 9999))
        if self.chance(0.1):
            local = self.mobile()
        return f"{local}@{self.choice(EMAIL_DOMAINS)}"

    def passport(self) -> str:
        form = self.r.random()
        if form < 0.55:
            return "E" + self.digits(8)
        if form < 0.85:
            return "E" + self.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") + self.digits(7)
        return "G" + self.digits(8)

    def hk_mo_permit(self) -> str:  # 往来港澳通行证
        return "C" + (self.digits(8) if self.chance(0.6) else self.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") + self.digits(7))

    def home_return(self) -> str:  # 回乡证
        return self.choice("HHHM") + self.digits(8 if self.chance(0.7) else 10)

    def taiwan(self) -> str:  # 台胞证: 8 digits since 2015; before, 10 digits and a letter
        return self.digits(8) if self.chance(0.8) else f"{self.digits(10)}({self.choice('ABCDEF')})"

    def plate(self) -> str:
        prov, letter = self.choice(PLATE_PROVINCES), self.choice(PLATE_LETTERS)
        sep = self.choice(["", "", "", "", "·", " "])
        if self.chance(0.2):  # new energy
            tail = (self.choice("DF") + self.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") + self.digits(4)
                    if self.chance(0.7) else self.digits(5) + self.choice("DF"))
        else:
            chars = [self.choice("0123456789") for _ in range(5)]
            for _ in range(self.choice((0, 0, 0, 1, 1, 2))):
                chars[self.r.randrange(5)] = self.choice("ABCDEFGHJKLMNPQRSTUVWXYZ")
            tail = "".join(chars)
            if sum(c.isdigit() for c in tail) < 3:
                tail = self.digits(5)
        plate = prov + letter + sep + tail
        return plate.lower() if self.chance(0.04) else plate

    # -- addresses
    def admin_prefix(self) -> str:
        form = self.r.random()
        if self.chance(0.08):
            city = self.choice(list(OTHER_CITIES))
            prov = {"兰州市": "甘肃省", "西安市": "陕西省", "呼和浩特市": "内蒙古自治区"}[city]
            return (prov if self.chance(0.5) else "") + city + self.choice(OTHER_CITIES[city])
        city = self.choice(list(CITIES))
        district = self.choice(CITIES[city])
        if form < 0.25:
            return self.choice(PROVINCES[:2]) + city + district
        if form < 0.55:
            return city + district
        if form < 0.85:
            return district
        return ""

    def house(self) -> str:
        n = str(self.r.randint(1, 399))
        form = self.r.random()
        if form < 0.1:
            n += f"-{self.r.randint(1, 20)}"
        elif form < 0.15:
            n += f"之{self.r.randint(1, 5)}"
        return n + "号" + ("院" if self.chance(0.1) else "")

    def room_tail(self) -> str:
        bldg = f"{self.r.randint(1, 40)}" + self.choice(["号楼", "栋", "幢"]) if self.chance(0.8) else \
            self.choice("ABCD") + "座"
        unit = f"{self.r.randint(1, 6)}单元" if self.chance(0.7) else ""
        room = f"{self.r.randint(1, 26)}{self.r.randint(1, 4):02d}" + ("室" if self.chance(0.8) else "")
        return bldg + unit + room

    def address(self) -> tuple[str, bool]:
        """An address, and whether it is in a common written form (for the record only: every
        address is labelled, also those typed with full-width digits or Chinese numerals)."""
        s, common = self._address()
        if self.chance(0.04):  # typed with a full-width input method
            return s.translate(str.maketrans("0123456789-", "０１２３４５６７８９－")), False
        return s, common

    def _address(self) -> tuple[str, bool]:
        form = self.r.random()
        prefix = self.admin_prefix()
        if form < 0.35:  # road + number (+ building)
            s = prefix + self.choice(ROADS) + self.house()
            if self.chance(0.3):
                s += f"{self.r.randint(1, 6)}单元{self.r.randint(1, 26)}{self.r.randint(1, 4):02d}室"
            return s, True
        if form < 0.65:  # compound + building/unit/room
            office = self.choice(STREET_OFFICES) if prefix and self.chance(0.3) else ""
            road = self.choice(ROADS) + self.house() if self.chance(0.25) else ""
            if self.chance(0.15):
                tail = (f"{self.r.randint(1, 30)}-{self.r.randint(1, 6)}-"
                        f"{self.r.randint(1, 26)}{self.r.randint(1, 4):02d}")
            else:
                tail = self.room_tail()
            return prefix + office + road + self.choice(COMPOUNDS) + tail, True
        if form < 0.85:  # village
            town = self.choice(TOWNS) if self.chance(0.7) else ""
            grp = self.choice(CN_DIGITS[:9]) if self.chance(0.5) else str(self.r.randint(1, 12))
            s = prefix + town + self.choice(VILLAGES) + grp + self.choice(["组", "队"])
            if self.chance(0.6):
                s += f"{self.r.randint(1, 150)}号"
            return s, True
        if form < 0.92:  # buildings and units in Chinese numerals, or "3#楼"
            bldg = self.choice([self.choice(CN_DIGITS[:9]) + "号楼", f"{self.r.randint(1, 30)}#楼"])
            return prefix + self.choice(COMPOUNDS) + bldg + self.choice(CN_DIGITS[:6]) + "单元", False
        # a house number in Chinese numerals
        return prefix + self.choice(ROADS) + self.choice(["十二", "三十六", "八", "一百零五", "二十"]) + "号", False

    # -- things that are not personal data
    def date(self) -> str:
        y, m, d = self.r.randint(2019, 2026), self.r.randint(1, 12), self.r.randint(1, 28)
        return self.choice([f"{y}年{m}月{d}日", f"{y}-{m:02d}-{d:02d}", f"{y}{m:02d}{d:02d}", f"{y}.{m}.{d}",
                            f"{y}年{m}月{d}日{self.r.randint(0, 23)}时"])

    def amount(self) -> str:
        return self.choice([f"{self.r.randint(50, 99999)}.{self.r.randint(0, 99):02d}",
                            str(self.r.randint(100, 300000))])

    def record_no(self) -> str:
        y, m, d = self.r.randint(2019, 2026), self.r.randint(1, 12), self.r.randint(1, 28)
        return self.choice([self.digits(10, "0123456789"), self.digits(7), f"{y}{m:02d}{d:02d}{self.digits(4)}",
                            f"ZY{y}{self.digits(6)}", f"MZ{y}{m:02d}{self.digits(5)}"])

    def id_like_record(self) -> str:
        """18 digits shaped like an ID number (a region code and a date) whose check fails."""
        while True:
            y, m, d = self.r.randint(2019, 2026), self.r.randint(1, 12), self.r.randint(1, 28)
            s = f"{self.choice(ID_REGIONS)}{y}{m:02d}{d:02d}{self.digits(4)}"
            if not is_valid_cn_id(s):
                return s

    def long_serial(self, n: int) -> str:
        return self.digits(n, "123456789")


# ----------------------------------------------------------------------------- one labelled line


class Line:
    """A text built piece by piece; ``pii(kind, value)`` records the span it occupies."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.entities: list[dict] = []

    def __call__(self, *texts: str) -> Line:
        for t in texts:
            self.parts.append(t)
            self.pos += len(t)
        return self

    def pii(self, kind: str, value: str) -> Line:
        assert kind in KINDS, kind
        self.entities.append({"type": kind, "start": self.pos, "end": self.pos + len(value)})
        return self(value)

    def record(self) -> dict:
        text = "".join(self.parts)
        for e in self.entities:
            assert text[e["start"]:e["end"]], e
        return {"text": text, "entities": sorted(self.entities, key=lambda e: e["start"])}


# ----------------------------------------------------------------------------- templates


def complaint(g: Gen) -> str:
    s = "、".join(g.r.sample(SYMPTOMS, g.choice((1, 1, 2)))) + g.choice(DURATIONS)
    if g.chance(0.6):
        s += "，" + g.choice(COURSES).format(d=g.choice(DURATIONS))
    return s


def t_plain(g: Gen, ln: Line) -> None:
    """Chief complaints and clinical sentences with no personal data at all."""
    form = g.r.random()
    if form < 0.4:
        ln(complaint(g), "。")
    elif form < 0.7:
        ln(f"患者因“{complaint(g)}”入院。入院诊断：{g.choice(DIAGNOSES)}。予{g.choice(DRUGS)}对症治疗，"
           f"{g.choice(['病情好转', '症状缓解', '病情平稳', '复查指标正常'])}。")
    elif form < 0.85:
        ln(f"患者{g.choice(['高热', '自述头痛', '诉乏力', '于昨日出现发热', '来院时神志清'])}，"
           f"{complaint(g)}，既往{g.choice(['高血压', '糖尿病', '冠心病'])}病史"
           f"{g.choice(['10年', '5年', '3年', '多年'])}，否认药物过敏史。")
    else:  # nursing and ward-round phrases
        ln(g.choice(["患者平卧位，", "患者安静，", "患者神志清楚，", "患者一般情况尚可，", "患者精神可，",
                     "患者左侧肢体肌力4级，", "患者常规术前准备，", "患者明显好转，", "家属同意，",
                     "家属陪同，", "患者高龄，", "患者于今晨"]),
           g.choice(["生命体征平稳", "夜间睡眠可", "饮食、二便正常", "继续观察", "遵医嘱执行"]), "。")


def t_numbers_negative(g: Gen, ln: Line) -> None:
    """Dates, amounts and record numbers — some shaped like ID numbers or cards; no PII."""
    form = g.r.random()
    if form < 0.2:
        ln(f"住院号{g.record_no()}，{g.date()}入院，{g.date()}出院，住院{g.r.randint(2, 30)}天，"
           f"总费用{g.amount()}元，统筹支付{g.amount()}元，个人自付{g.amount()}元。")
    elif form < 0.35:
        ln(f"门诊号：{g.record_no()}；就诊日期{g.date()}；发票号码{g.digits(8)}；处方{g.choice(DRUGS)}"
           f"{g.r.randint(1, 3)}盒，金额{g.amount()}元。")
    elif form < 0.5:
        ln(f"结算单号{g.id_like_record()}，医保结算流水号{g.long_serial(20)}，"
           f"结算时间{g.date()}。")
    elif form < 0.62:
        ln(f"电子票据号码{g.long_serial(g.choice((18, 20, 22)))}，票据代码{g.digits(8)}，"
           f"开票日期{g.date()}，合计{g.amount()}元。")
    elif form < 0.74:
        if g.chance(0.75):
            ln(f"{g.choice(DRUGS)}，国药准字H{g.digits(8, '12')}，批号{g.choice('GEHM')}{g.digits(8, '2')}，"
               f"有效期至{g.date()}。")
        else:  # an approval number without its 国药准字: shaped like a 回乡证
            ln(f"带药：{g.choice(DRUGS)}（H{g.digits(8, '12')}）{g.r.randint(1, 3)}盒，{g.choice(DRUGS)}"
               f"{g.r.randint(1, 3)}盒。")
    elif form < 0.86:
        ln(f"医保个人编号{g.not_mobile_11()}，参保地640100，"
           f"{g.choice(['座机0951-', '科室电话0951-', '值班电话0951'])}{g.digits(7, '5678')}。")
    else:
        ln(f"检验标本条码{g.digits(12)}，采样时间{g.date()}，白细胞{g.r.randint(3, 20)}.{g.r.randint(0, 9)}×10^9/L，"
           f"C反应蛋白{g.r.randint(1, 200)}mg/L。")


def t_invalid_ids(g: Gen, ln: Line) -> None:
    """ID numbers, credit codes and bank cards with wrong check characters; a mobile inside a longer
    run. Labelled: only the real items that share the line."""
    form = g.r.random()
    if form < 0.3:
        ln(f"患者身份证号{g.bad_cn_id()}（系统校验未通过，待核实），")
        if g.chance(0.5):
            ln("联系电话").pii("phone", g.mobile())(g.choice(["。", "，请回访。"]))
        else:
            ln(complaint(g), "。")
    elif form < 0.55:
        ln(f"单位统一社会信用代码填写为{g.bad_uscc()}，与营业执照不符，退回补正。")
    elif form < 0.8:
        ln(f"收款账号{g.bad_card()}校验失败，请被保险人重新提供银行卡信息。")
    else:
        ln(f"订单号{g.mobile()}{g.digits(g.choice((1, 3, 5)))}，交易序号{g.digits(1, '123456789')}{g.mobile()}，"
           f"{g.choice(['已退费', '已结算', '待审核'])}。")


def t_admission(g: Gen, ln: Line) -> None:
    """Admission notes: name with a cue, sex, age, ID, address, mobile."""
    cue = g.choice(["患者", "患者", "患者", "患儿", "病人", "姓名：", "就诊人"])
    ln(cue).pii("name", g.name())(f"，{g.sex()}，{g.age()}岁，")
    if g.chance(0.7):
        ln(g.choice(["身份证号", "身份证号码：", "公民身份号码", "证件号："])).pii("cn_id", g.cn_id())("，")
    if g.chance(0.75):
        addr, _ = g.address()
        ln(g.choice(["家住", "现住", "住址：", "家庭住址：", "户籍地址：", "现居住于"])).pii("address", addr)("，")
    if g.chance(0.7):
        ln(g.choice(["联系电话", "电话：", "手机", "联系方式："])).pii("phone", g.mobile_written())("，")
    ln(f"因“{complaint(g)}”于{g.date()}入院。")


def t_claim(g: Gen, ln: Line) -> None:
    """Insurance claim notes: insured person, ID, hospital, diagnosis, amount, bank card."""
    ln(g.choice(["被保险人", "出险人", "申请人"])).pii("name", g.name())
    ln(g.choice(["（身份证号：", "（证件号码", "，身份证", "（公民身份号码："])).pii("cn_id", g.cn_id())
    ln(g.choice(["）", "），", "，"]))
    ln(f"于{g.date()}因{g.choice(DIAGNOSES)}在{g.choice(HOSPITALS)}{g.choice(DEPARTMENTS)}住院治疗，"
       f"申请理赔金额{g.amount()}元。")
    if g.chance(0.8):
        ln(g.choice(["收款账户：", "开户行", "银行卡号", "理赔款请转入"]))
        if g.chance(0.5):
            ln(g.choice(BANKS), "，卡号")
        ln.pii("bank_card", g.card_written())("。")
    if g.chance(0.5):
        ln(g.choice(["联系电话", "手机："])).pii("phone", g.mobile_written())("。")
    if g.chance(0.3):
        ln("电子邮箱").pii("email", g.email())("。")


def t_employer(g: Gen, ln: Line) -> None:
    """Group insurance / employer records: company, USCC, contact person, phone, e-mail."""
    ln(f"投保单位：{g.choice(COMPANIES)}，统一社会信用代码").pii("uscc", g.uscc())
    if g.chance(0.4):
        addr, _ = g.address()
        ln("，单位地址：").pii("address", addr)
    ln("。")
    ln(g.choice(["联系人：", "经办人", "委托人"])).pii("name", g.name())
    ln("，电话").pii("phone", g.mobile_written())
    if g.chance(0.6):
        ln("，邮箱").pii("email", g.email())
    ln("。")


def t_travel(g: Gen, ln: Line) -> None:
    """Patients from Hong Kong, Macao, Taiwan or abroad: permits and passports."""
    form = g.r.random()
    name_first = g.chance(0.5)
    if name_first:
        ln("患者").pii("name", g.name())("，")
    if form < 0.25:
        ln(g.choice(["持港澳居民来往内地通行证（回乡证）", "回乡证号码：", "港澳居民来往内地通行证号"]))
        ln.pii("travel_permit", g.home_return())
        ln(f"，系{g.choice(['香港', '澳门'])}居民，因{complaint(g)}来诊。")
    elif form < 0.45:
        ln(g.choice(["台胞证号码：", "台胞证", "台湾居民来往大陆通行证号码"])).pii("travel_permit", g.taiwan())
        ln(f"，台湾居民，{g.choice(['来宁探亲期间', '在宁工作期间'])}出现{complaint(g)}。")
    elif form < 0.6:
        ln(f"于{g.date()}自{g.choice(['香港', '澳门'])}返回，往来港澳通行证").pii("travel_permit", g.hk_mo_permit())
        ln(f"，{complaint(g)}。")
    elif form < 0.85:
        ln(g.choice(["护照号码：", "护照号", "护照", "持中国护照"])).pii("passport", g.passport())
        ln(f"，{g.choice(['出国前体检', '境外返回后', '办理签证体检'])}，{complaint(g)}。")
    else:  # no cue word: the bare, low-score forms
        if g.chance(0.5):
            ln("证件类型：护照，证件号码").pii("passport", g.passport())
        else:
            ln("证件号码").pii("travel_permit", g.choice([g.hk_mo_permit(), g.home_return()]))
        ln(f"，{g.choice(DEPARTMENTS)}就诊。")
    if not name_first and g.chance(0.4):
        ln("联系人：").pii("name", g.name())("，电话").pii("phone", g.mobile_written())("。")


def t_traffic(g: Gen, ln: Line) -> None:
    """Traffic injuries: licence plates (and sometimes the address of the accident)."""
    form = g.r.random()
    ln("患者")
    if g.chance(0.4):
        ln.pii("name", g.name())("，")
    if form < 0.35:
        ln(f"于{g.date()}驾驶电动车与一辆车牌号为").pii("plate", g.plate())("的小型轿车相撞，致")
    elif form < 0.6:
        ln(f"{g.date()}步行时被").pii("plate", g.plate())(g.choice(["号货车", "号出租车", "小型客车"]))("撞伤，致")
    elif form < 0.8:
        ln("乘坐").pii("plate", g.plate())("号车辆发生侧翻，致")
    else:
        ln("所驾车辆（").pii("plate", g.plate())("）追尾，肇事车辆").pii("plate", g.plate())("，致")
    ln(f"{g.choice(['头部外伤', '右下肢疼痛', '胸部疼痛', '多处软组织挫伤'])}{g.choice(DURATIONS)}。")
    if g.chance(0.35):
        addr, _ = g.address()
        ln("事故地点位于").pii("address", addr)("附近。")
    if g.chance(0.3):
        ln("交警事故认定书编号" + g.record_no() + "。")


def t_family(g: Gen, ln: Line) -> None:
    """Relatives and contacts; names with and without cue words."""
    form = g.r.random()
    if form < 0.3:
        ln(complaint(g), "，").pii("name", g.name())("代诉病史。")
    elif form < 0.55:
        ln(g.choice(["家属", "陪同家属", "联系人", "监护人", "联系人："])).pii("name", g.name())
        ln(f"（{g.choice(RELATIONS)[1:]}），电话").pii("phone", g.mobile_written())("。")
    elif form < 0.7:
        ln(g.choice(["母亲", "父亲", "妻子", "丈夫", "女儿", "儿子"])).pii("name", g.name())
        ln(f"陪同就诊，{complaint(g)}。")
    elif form < 0.85:  # a doctor's name: no cue word the recognizer knows
        ln(f"{g.choice(['主治医师', '经治医生', '值班医师', '审核人'])}").pii("name", g.name())
        ln(f"，{g.date()}查房：{complaint(g)}，继续{g.choice(DRUGS)}治疗。")
    elif form < 0.92:  # a name opening the line
        ln.pii("name", g.name())(f"，{g.sex()}，{g.age()}岁，{complaint(g)}。")
    else:  # names with no boundary after them, and lists of names
        if g.chance(0.5):
            ln("患者").pii("name", g.name())(g.choice(["今日复诊", "来院复查", "要求出院"]), "，", complaint(g), "。")
        else:
            ln("家属").pii("name", g.name())("、").pii("name", g.name())("已知情并签字。")


def t_dense(g: Gen, ln: Line) -> None:
    """Many kinds on one line, tightly packed (the ``\\b`` traps: numbers glued to Chinese)."""
    ln("姓名：").pii("name", g.name())("；身份证").pii("cn_id", g.cn_id())("号；电话").pii("phone", g.mobile())("号；")
    if g.chance(0.5):
        ln("卡号").pii("bank_card", g.card())("；")
    if g.chance(0.4):
        addr, _ = g.address()
        ln("住址").pii("address", addr)("；")
    if g.chance(0.3):
        ln("车牌").pii("plate", g.plate())("；")
    if g.chance(0.3):
        ln("邮箱").pii("email", g.email())("；")
    if g.chance(0.2):
        ln("护照").pii("passport", g.passport())("；")
    ln("备注：", g.choice(["无", "复诊", "转诊", "外院资料已核对"]), "。")


def t_old_id(g: Gen, ln: Line) -> None:
    """The old 15-digit ID number form."""
    ln("患者").pii("name", g.name())("，旧身份证号").pii("cn_id", g.cn_id15())(f"，{complaint(g)}。")


def t_address_only(g: Gen, ln: Line) -> None:
    """Addresses in sentences (and near misses: hospital buildings, bus routes, city names)."""
    form = g.r.random()
    if form < 0.45:
        addr, _ = g.address()
        ln(g.choice(["患者家住", "居住于", "现住", "送至", "家庭地址：", "邮寄地址："])).pii("address", addr)
        ln(g.choice(["，独居。", "，步行来院。", "，120送入院。", "，请核对。"]))
    elif form < 0.65:
        ln(f"于{g.choice(['住院部', '门诊楼', '医技楼'])}{g.r.randint(1, 9)}号楼{g.r.randint(1, 20)}层"
           f"{g.choice(DEPARTMENTS)}{g.r.randint(1, 60)}床，乘坐{g.r.randint(1, 60)}路公交车来院，"
           f"来自{g.choice(list(CITIES))}{g.choice(['农村', '城区'])}。")
    elif form < 0.8:
        ln(f"患者为{g.choice(list(CITIES))}人，长期居住于{g.choice(list(CITIES))}，"
           f"{g.choice(['从事农业劳动', '退休', '个体经营'])}，{complaint(g)}。")
    else:
        ln(f"患者{g.choice(['男性', '女性'])}，").pii("address", g.admin_prefix() + g.choice(ROADS) + g.house())
        ln("居民，", complaint(g), "。")


TEMPLATES = [  # (template, lines)
    (t_plain, 70), (t_numbers_negative, 75), (t_invalid_ids, 45), (t_admission, 70), (t_claim, 50),
    (t_employer, 25), (t_travel, 65), (t_traffic, 35), (t_family, 40), (t_dense, 30), (t_old_id, 8),
    (t_address_only, 30),
]


def build(seed: int) -> list[dict]:
    g = Gen(seed)
    records = []
    for template, n in TEMPLATES:
        for _ in range(n):
            ln = Line()
            template(g, ln)
            records.append(ln.record())
    g.r.shuffle(records)
    return records


def dumps(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if --out differs from a fresh build")
    args = ap.parse_args(argv)
    text = dumps(build(args.seed))
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from a fresh build'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    records = [json.loads(x) for x in text.splitlines()]
    counts = Counter(e["type"] for r in records for e in r["entities"])
    empty = sum(1 for r in records if not r["entities"])
    print(f"wrote {len(records)} lines to {args.out} ({empty} without PII): "
          + ", ".join(f"{k} {counts[k]}" for k in KINDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
