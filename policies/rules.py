"""The rule table: which use of which field a scene may ask for, by grade × sensitivity × usage.

The table is data the office can read (`GET /api/v1/policy/rules`, `pdao policy rules`,
docs/scenes.md); `item_verdict` is the one pure function that applies it. An application is
refused item by item with these verdicts, at drafting, at every edit, at submission and again at
approval, and the same function answers `pdao policy explain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Usage(StrEnum):
    """How a scene may use a field. SCQL's column control list is the model (docs/scenes.md)."""

    aggregate = "aggregate"            # only inside differentially private aggregates
    group_by = "group_by"              # as a group key; only fields with a public value domain
    filter = "filter"                  # only in WHERE
    join_key = "join_key"              # only to join the tenant's own uploads; never output
    masked_output = "masked_output"    # output per row, after the field's masking


# The highest field grade each (sensitivity, usage) admits; 0 = never. Grade 5 (e.g. HIV records)
# is never admitted; identifiers never group or filter (that would single a person out), free text
# only leaves through the PII recognizers.
MAX_GRADE: dict[str, dict[Usage, int]] = {
    "identifier":       {Usage.aggregate: 4, Usage.group_by: 0, Usage.filter: 0, Usage.join_key: 4, Usage.masked_output: 3},
    "quasi_identifier": {Usage.aggregate: 4, Usage.group_by: 4, Usage.filter: 4, Usage.join_key: 0, Usage.masked_output: 3},
    "sensitive":        {Usage.aggregate: 4, Usage.group_by: 3, Usage.filter: 4, Usage.join_key: 0, Usage.masked_output: 2},
    "free_text":        {Usage.aggregate: 0, Usage.group_by: 0, Usage.filter: 0, Usage.join_key: 0, Usage.masked_output: 3},
    "public":           {Usage.aggregate: 4, Usage.group_by: 4, Usage.filter: 4, Usage.join_key: 0, Usage.masked_output: 4},
}

# Why a cell of the table is 0, for the office and for the refusal message.
NEVER_REASON: dict[tuple[str, Usage], tuple[str, str]] = {
    ("identifier", Usage.group_by): ("an identifier can never be a group key", "标识符不能作为分组键"),
    ("identifier", Usage.filter): ("an identifier can never be filtered on (it would single out a person)",
                                   "标识符不能作为筛选条件（会锁定到个人）"),
    ("free_text", Usage.aggregate): ("free text cannot be aggregated", "自由文本不能参与聚合"),
    ("free_text", Usage.group_by): ("free text can never be a group key", "自由文本不能作为分组键"),
    ("free_text", Usage.filter): ("free text cannot be filtered on", "自由文本不能作为筛选条件"),
}


@dataclass(frozen=True)
class FieldFacts:
    """What the rules need to know of a field and its dataset (from the catalog)."""

    dataset: str
    field: str
    dataset_grade: int
    opening_class: str
    field_grade: int
    sensitivity: str
    masking: str
    has_domain: bool
    is_privacy_unit: bool


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str        # a stable name of the rule that decided
    message: str
    message_zh: str

    def as_dict(self) -> dict:
        return {"allowed": self.allowed, "rule": self.rule, "message": self.message, "message_zh": self.message_zh}


def _no(rule: str, message: str, message_zh: str) -> Verdict:
    return Verdict(False, rule, message, message_zh)


def item_verdict(facts: FieldFacts | None, usage: str, dataset: str = "", field: str = "") -> Verdict:
    """May a scene use this field this way? Pure: the first rule that refuses names itself."""
    if facts is None:
        return _no("unknown_field", f"{dataset}.{field} is not a field of the catalog",
                   f"{dataset}.{field} 不是数据目录中的字段")
    name = f"{facts.dataset}.{facts.field}"
    try:
        use = Usage(usage)
    except ValueError:
        return _no("unknown_usage", f"unknown usage '{usage}'; one of {', '.join(Usage)}",
                   f"未知用途 {usage}，可选：{', '.join(Usage)}")
    if facts.opening_class == "prohibited":
        return _no("prohibited_dataset", f"{facts.dataset} is closed to opening (禁止开放) and is never authorized",
                   f"{facts.dataset} 属于禁止开放数据，不得授权运营")
    limit = MAX_GRADE[facts.sensitivity][use]
    if limit == 0:
        en, zh = NEVER_REASON.get((facts.sensitivity, use), (
            f"a {facts.sensitivity} field can never be used as {use}", f"{facts.sensitivity} 类字段不能用于 {use}"))
        return _no(f"never:{facts.sensitivity}:{use}", f"{name}: {en}", f"{name}：{zh}")
    if facts.field_grade > limit:
        return _no(f"grade:{facts.sensitivity}:{use}",
                   f"{name}: grade {facts.field_grade} is above grade {limit}, the most a {facts.sensitivity} field "
                   f"may have for {use}",
                   f"{name}：分级 {facts.field_grade} 高于 {facts.sensitivity} 类字段用于 {use} 所允许的最高级别 {limit}")
    if use is Usage.group_by and not facts.has_domain:
        return _no("group_by_needs_domain", f"{name}: a group key needs a public value domain in the catalog "
                   "(a category list, a boolean, or an integer or date range)",
                   f"{name}：分组键必须在数据目录中有公开值域（类别列表、布尔值或整数/日期范围）")
    if use is Usage.masked_output and facts.masking in ("none", "suppress") and facts.sensitivity != "public":
        why = "is suppressed and never output" if facts.masking == "suppress" else "has no masking"
        return _no("masked_output_needs_masking", f"{name} {why}; it cannot be output per row",
                   f"{name} {'被屏蔽，不得输出' if facts.masking == 'suppress' else '没有脱敏方式'}，不能逐行输出")
    if use is Usage.join_key and facts.sensitivity != "identifier":
        return _no("join_key_needs_identifier", f"{name}: only identifiers join the tenant's own data",
                   f"{name}：只有标识符可以用于与企业自有数据关联")
    return Verdict(True, f"table:{facts.sensitivity}:{use}",
                   f"{name} may be used as {use} (grade {facts.field_grade} ≤ {limit})",
                   f"{name} 可用于 {use}（分级 {facts.field_grade} ≤ {limit}）")


def rule_table() -> dict:
    """The table as the office reads it."""
    return {
        "max_grade": {s: {u.value: g for u, g in row.items()} for s, row in MAX_GRADE.items()},
        "never": [{"sensitivity": s, "usage": u.value, "message": en, "message_zh": zh}
                  for (s, u), (en, zh) in NEVER_REASON.items()],
        "also": [
            "prohibited datasets (opening_class prohibited) are never authorized, whatever the field",
            "group_by needs a public value domain",
            "masked_output needs a masking other than none or suppress (public fields excepted)",
            "join_key needs an identifier",
        ],
    }
