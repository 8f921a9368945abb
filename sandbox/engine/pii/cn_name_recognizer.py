"""Chinese person-name recognizer that needs no NLP model.

A name is a known surname (single or compound) followed by one or two Chinese characters, and it is
only reported where the text itself says a name is there:

* ``cue``: right after a cue word — 患者 病人 患儿 就诊人 家属 联系人 监护人 代理人 陪同人 陪护人
  姓名 父亲 母亲 配偶 丈夫 妻子 儿子 女儿 …, and in claims 被保险人 投保人 出险人 申请人 受益人
  经办人 收款人 户名 持卡人 (optionally followed by ``:``/``：`` and a space) — and right before a
  boundary: punctuation, a space, a digit, the end of the line, or a following cue such as 代诉
  自述 诉 身份证 电话 手机 联系 先生 女士 陪同 男 女 (score 0.85);
* ``proxy``: at the start of a line or clause, right before 代诉 / 代述 ("王芳代诉…", 0.85);
* ``lead``: a whole clause at the very start of a line, right before a comma ("张伟，咳嗽3天…",
  0.6) — the weakest rule, since any two- or three-character clause starting with a surname
  character could match; the stop-characters below keep symptom words such as 高热 or 黄疸 out.

The given name may not contain a "stop character" (``STOP_CHARS``): characters that are common in
clinical text right after a surname-like character (热 痛 血 疸 院 于 今 昨 …: 高热, 关节痛, 于今晨)
and rare in given names.

Limits (precision over recall, by design):

* Names without a cue are missed ("张伟咳嗽3天", "今日张伟来诊", a doctor's "主治医师张伟": 医师
  is no cue, since "医师查房" would then read as a name), as are given names of three or more
  characters, surnames not in ``SURNAMES``, names written in pinyin, and minority names
  transliterated with "·" (e.g. 买买提·艾力).
* A cue followed by a surname-character word and a boundary is a false positive ("患者高某，" is
  right, but a hypothetical "患者钱少，" would be reported too), unless the word is in
  ``NOT_NAMES`` (安静 高龄 平卧位 尚可 查房 苏醒 …, clinical words seen right after a cue).
* Context words (``CONTEXT``) are listed for Presidio's enhancer but do nothing with the no-op NLP
  engine used here; the cues live in the patterns themselves.
"""

from __future__ import annotations

import regex
from presidio_analyzer import Pattern, PatternRecognizer

COMPOUND_SURNAMES: tuple[str, ...] = (
    "欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
    "夏侯", "令狐", "端木", "轩辕", "独孤", "南宫", "西门", "呼延", "申屠", "太史", "百里", "万俟",
    "闻人", "澹台", "公冶", "宗政", "濮阳", "淳于", "单于", "钟离", "赫连", "东郭", "拓跋",
)

# Common single-character surnames (the ~300 most frequent), with the Hui surnames frequent in
# Ningxia (纳 拓 冶 虎 锁 撒 哈 喇 妥 …). Function words that are also rare surnames (来 由 但 和
# 时 全 都 应 …) are left out on purpose: "患者来院，" must not look like a name.
SINGLE_SURNAMES: str = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫阎段雷侯龙史陶黎贺顾毛郝龚邵万钱严"
    "覃武戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符"
    "舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳穆农司卓"
    "古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂佟臧闵苟邬边卞姬师仇栾隋商刁沙荣巫寇桑"
    "郎甄丛仲虞敖巩明佘池查麻苑迟邝官封谈匡鞠惠荆乐冀郁胥南班储栗燕楚鄢劳谌奚皮粟冼蔺楼盘满闻位厉伊"
    "仝郜海阚花权帅屠豆朴盖练廉禹井祖漆巴丰卿狄平索宣晋容敬扈晁芮阙浦戈伏鹿薄邸雍辜羊乌母裘亓修邰赫"
    "杭况那宿鲜印逯隆茹诸战慕危银亢嵇哈湛宾戎勾茅利呼揭尉冶斯元束檀衣展阴昝幸奉植衡富尧闭强云"
    "纳拓虎锁撒喇妥"
)
SURNAMES: tuple[str, ...] = COMPOUND_SURNAMES + tuple(dict.fromkeys(SINGLE_SURNAMES))

#: Characters not accepted in a given name: frequent in clinical text right after a character that
#: is also a surname (高热, 黄疸, 关节痛, 于今日, 马上…), rare in given names.
STOP_CHARS: str = (
    "热烧血压糖脂痛疼咳嗽痰喘吐泻肿胀晕昏伤病症疾炎癌瘤疸疹痒酸麻因于在到来去出入院诊治疗药片次日年时"
    "前后无有不未已及并和与的了着过是为被把给向从自诉述感觉等性男女岁者属人科室床号区县市路街村组省医"
    "术检查复期夜间部身体节上下左右内外今昨当本我门该此其每近"
)

CUES: tuple[str, ...] = (
    "患者", "病人", "病患", "患儿", "就诊者", "就诊人", "家属", "联系人", "监护人", "代理人", "陪同人",
    "陪护人", "姓名", "父亲", "母亲", "配偶", "丈夫", "妻子", "儿子", "女儿", "委托人", "签字人",
    # insurance claims and payments
    "被保险人", "投保人", "出险人", "申请人", "受益人", "经办人", "收款人", "户名", "持卡人",
    # staff
    "医师", "医生", "审核人",
)
FOLLOWING_CUES: tuple[str, ...] = (
    "代诉", "代述", "自述", "主诉", "诉", "身份证", "证件", "电话", "手机", "联系", "先生", "女士",
    "同志", "年龄", "性别", "住址", "家住", "陪同", "陪护", "男", "女",
)

_HAN = r"[\u4e00-\u9fff]"
_SURNAME = "(?:" + "|".join(COMPOUND_SURNAMES) + "|[" + "".join(dict.fromkeys(SINGLE_SURNAMES)) + "])"
_GIVEN = "(?:(?![" + STOP_CHARS + "])" + _HAN + "){1,2}"
_NAME = _SURNAME + _GIVEN
_BOUNDARY = r"""(?=[，,。．.；;：:（(）)、！!？?\s“”"'《》【】\[\]<>/|0-9]|$|""" + "|".join(FOLLOWING_CUES) + ")"
_CUE = "(?<=(?:" + "|".join(CUES) + r")[:：]?[ \u3000]?)"

#: Words that fit the name rules (a surname character, one or two more, a boundary) but are
#: clinical or everyday words: "患者安静，", "患者高龄，", "医师查房：", "患者苏醒，". A match equal to
#: one of them is dropped (``invalidate_result``).
NOT_NAMES: frozenset[str] = frozenset((
    "安静", "安睡", "安详", "安好", "安全", "高龄", "平卧", "平卧位", "平稳", "平素", "平躺", "尚可", "尚好",
    "尚稳", "尚平稳", "明显", "明确", "常规", "良好", "乐观", "向好", "成功", "成人", "康复", "方便", "方可",
    "查房", "查体", "查看", "单侧", "温和", "舒适", "易怒", "冷汗", "冷静", "苏醒", "宫缩", "危重", "满意",
    "强迫", "包扎", "卫生", "左侧", "齐全", "文静", "宁静", "曾经", "马上", "任何", "黄染", "白班", "余同",
    "余无", "何时",
))

NAME_AFTER_CUE_RE = _CUE + _NAME + _BOUNDARY
NAME_BEFORE_PROXY_RE = r"(?:^|(?<=[，,。；;\s]))" + _NAME + "(?=代诉|代述)"
NAME_LEADING_CLAUSE_RE = "^" + _NAME + "(?=[，,])"


class CnNameRecognizer(PatternRecognizer):
    """Chinese person names next to a cue, from a surname list (see the module docstring)."""

    ENTITY = "CN_PERSON_NAME"
    PATTERNS = [
        Pattern("cn_name_cue", NAME_AFTER_CUE_RE, 0.85),
        Pattern("cn_name_proxy", NAME_BEFORE_PROXY_RE, 0.85),
        Pattern("cn_name_lead", NAME_LEADING_CLAUSE_RE, 0.6),
    ]
    CONTEXT = list(CUES)

    def __init__(self, supported_language: str = "zh", leading_clause: bool = True) -> None:
        patterns = [Pattern(p.name, p.regex, p.score) for p in self.PATTERNS
                    if leading_clause or p.name != "cn_name_lead"]
        super().__init__(
            supported_entity=self.ENTITY,
            name="CnNameRecognizer",
            supported_language=supported_language,
            patterns=patterns,
            context=self.CONTEXT,
            global_regex_flags=regex.DOTALL | regex.MULTILINE,
        )

    def invalidate_result(self, pattern_text: str) -> bool:
        return pattern_text in NOT_NAMES
