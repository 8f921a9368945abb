"""The console's words, in Chinese (the default) and English.

`translator(lang)` gives the templates `t(key, **params)` and `tv(kind, value)`. A key missing
from the catalog renders as ⟦key⟧ — the marker the tests look for on every page in both languages.
Values from the data (statuses, usages, roles …) go through `tv`, which falls back to the value
itself for a value this catalog has never heard of (new statuses must not break a page); the
tests check that every value the code knows today has both words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LANGS = ("zh", "en")
DEFAULT_LANG = "zh"
MISSING = "⟦{}⟧"

# key: (zh, en)
MESSAGES: dict[str, tuple[str, str]] = {
    # frame
    "app.title": ("公共数据授权运营沙箱", "Public-data authorized-operation sandbox"),
    "app.short": ("pdao 控制台", "pdao console"),
    "app.tagline": ("原始数据不出域，数据可用不可见", "Raw data never leaves the domain: usable but not visible"),
    "nav.home": ("首页", "Home"),
    "nav.catalog": ("数据目录", "Catalog"),
    "nav.scenes": ("场景", "Scenes"),
    "nav.queries": ("查询", "Queries"),
    "nav.results": ("结果", "Results"),
    "nav.reviews": ("出域审核", "Export review"),
    "nav.audit": ("审计日志", "Audit log"),
    "nav.alerts": ("告警", "Alerts"),
    "nav.emergency": ("紧急停止", "Emergency stop"),
    "nav.logout": ("退出登录", "Log out"),
    "nav.lang_switch": ("English", "中文"),
    "nav.signed_in_as": ("当前用户", "Signed in as"),
    "common.none": ("无", "none"),
    "common.yes": ("是", "yes"),
    "common.no": ("否", "no"),
    "common.filter": ("筛选", "Filter"),
    "common.reset": ("重置", "Reset"),
    "common.details": ("详情", "Details"),
    "common.id": ("编号", "ID"),
    "common.status": ("状态", "Status"),
    "common.created": ("创建时间", "Created"),
    "common.updated": ("更新时间", "Updated"),
    "common.reason": ("理由", "Reason"),
    "common.comment": ("意见", "Comment"),
    "common.submit": ("提交", "Submit"),
    "common.all": ("全部", "all"),
    "common.empty": ("暂无记录。", "Nothing here yet."),
    "common.back": ("返回", "Back"),
    "common.org": ("单位", "Organization"),
    "common.scene": ("场景", "Scene"),
    "common.dataset": ("数据集", "Dataset"),
    "common.field": ("字段", "Field"),
    "common.usage": ("用途", "Usage"),
    "common.mode": ("环境", "Mode"),
    "common.epsilon": ("ε（隐私预算）", "ε (privacy budget)"),
    "common.title": ("标题", "Title"),
    "common.type": ("类型", "Type"),
    "common.grade": ("分级", "Grade"),
    "common.category": ("分类", "Category"),
    "common.department": ("来源部门", "Source department"),
    "common.actor": ("操作人", "Actor"),
    "common.role": ("角色", "Role"),
    "common.action": ("操作", "Action"),
    "common.object": ("对象", "Object"),
    "common.time": ("时间", "Time"),
    "common.decision": ("决定", "Decision"),
    "common.page_next": ("下一页", "Next page"),
    "common.synthetic": ("合成数据（开发孪生）", "synthetic (dev twin)"),
    "common.lineage": ("数据血缘", "Lineage"),
    "common.search": ("搜索", "Search"),
    "common.count": ("数量", "Count"),
    # login
    "login.title": ("登录", "Log in"),
    "login.username": ("用户名", "Username"),
    "login.password": ("密码", "Password"),
    "login.button": ("登录", "Log in"),
    "login.failed": ("登录失败", "Login failed"),
    "login.hint": ("使用与 API 相同的账号登录；会话令牌保存在仅限 HTTP 的 Cookie 中。",
                   "Log in with the same account as the API; the session token is kept in an HttpOnly cookie."),
    "logout.done": ("您已退出登录。", "You are logged out."),
    # errors
    "error.title": ("出错了", "Something went wrong"),
    "error.status": ("HTTP 状态", "HTTP status"),
    "error.code": ("错误代码", "Error code"),
    "error.request_id": ("请求编号", "Request id"),
    "error.back_home": ("返回首页", "Back to the console"),
    "error.csrf": ("表单已过期或来源不可信，请刷新页面后重试。",
                   "The form has expired or did not come from this console; reload the page and try again."),
    "error.csrf_en": ("表单校验失败", "Form check failed"),
    "error.details": ("详细问题", "Problems"),
    # home
    "home.title": ("工作台", "Workbench"),
    "home.welcome": ("欢迎，{user}（{role}，{org}）", "Welcome, {user} ({role}, {org})"),
    "home.my_scenes": ("我的场景与预算", "My scenes and budgets"),
    "home.my_queries": ("我的查询", "My queries"),
    "home.released": ("可下载的已放行结果", "Released results to download"),
    "home.todo_office": ("待审批的场景申请", "Scene applications waiting for review"),
    "home.todo_reviewer": ("待出域审核的结果", "Results waiting for export review"),
    "home.todo_auditor": ("审计与告警", "Audit and alerts"),
    "home.go_audit": ("打开审计日志", "Open the audit log"),
    "home.go_alerts": ("查看告警", "See the alerts"),
    "home.go_catalog": ("浏览数据目录", "Browse the catalog"),
    # catalog
    "catalog.title": ("数据目录", "Data catalog"),
    "catalog.map": ("资源地图：部门 → 数据集 → 生效场景 → 租户",
                    "Resource map: departments → datasets → active scenes → tenants"),
    "catalog.map_departments": ("部门", "Departments"),
    "catalog.map_datasets": ("数据集", "Datasets"),
    "catalog.map_scenes": ("生效场景", "Active scenes"),
    "catalog.map_tenants": ("租户", "Tenants"),
    "catalog.opening": ("开放类型", "Opening class"),
    "catalog.fields": ("字段数", "Fields"),
    "catalog.versions": ("最新版本", "Latest version"),
    "catalog.cycle": ("更新周期", "Update cycle"),
    "catalog.standard": ("标准", "Standard"),
    "catalog.privacy_unit": ("隐私单位", "Privacy unit"),
    "catalog.sensitivity": ("敏感性", "Sensitivity"),
    "catalog.pii": ("个人信息类型", "PII kind"),
    "catalog.masking": ("默认脱敏", "Default masking"),
    "catalog.domain": ("值域 / 边界", "Domain / bounds"),
    "catalog.description": ("说明", "Description"),
    "catalog.field_list": ("字段与敏感性", "Fields and their sensitivity"),
    "catalog.version_list": ("数据版本（不可变快照）", "Data versions (immutable snapshots)"),
    "catalog.rows": ("行数", "Rows"),
    "catalog.env": ("环境", "Environment"),
    "catalog.q": ("关键词", "Keywords"),
    "catalog.any_grade": ("任意分级", "any grade"),
    "catalog.any_category": ("任意分类", "any category"),
    "catalog.any_department": ("任意部门", "any department"),
    "catalog.by_department": ("按部门", "By department"),
    # scenes
    "scenes.title": ("场景", "Scenes"),
    "scenes.new": ("申请新场景", "Apply for a scene"),
    "scenes.type": ("场景类型", "Scene type"),
    "scenes.validity": ("有效期", "Validity"),
    "scenes.purpose": ("用途说明", "Purpose"),
    "scenes.legal_basis": ("合法性基础", "Legal basis"),
    "scenes.consent": ("同意方式", "Consent approach"),
    "scenes.emergency_plan": ("应急预案", "Emergency plan"),
    "scenes.applicant": ("申请人", "Applicant"),
    "scenes.round": ("审核轮次", "Review round"),
    "scenes.data_list": ("数据清单", "Data list"),
    "scenes.verdict": ("规则表判定", "Rule table's verdict"),
    "scenes.strike": ("划去", "Strike"),
    "scenes.struck": ("已划去", "struck"),
    "scenes.effective": ("当前生效", "effective now"),
    "scenes.review_title": ("审核意见（逐项）", "Review (item by item)"),
    "scenes.review_hint": ("勾选要划去的条目，填写意见，然后批准、退回或驳回。需 {n} 名不同的办公室成员批准。",
                           "Tick the items to strike, comment, then approve, return or reject. "
                           "{n} distinct office members must approve."),
    "scenes.approve": ("批准", "Approve"),
    "scenes.reject": ("驳回", "Reject"),
    "scenes.return": ("退回修改", "Return"),
    "scenes.approvals_this_round": ("本轮已批准", "Approved this round"),
    "scenes.reviews": ("审核记录", "Reviews"),
    "scenes.history": ("状态历史", "History"),
    "scenes.controls": ("授权控制", "Authorization controls"),
    "scenes.suspend": ("暂停", "Suspend"),
    "scenes.resume": ("恢复", "Resume"),
    "scenes.revoke": ("撤销（不可恢复）", "Revoke (final)"),
    "scenes.submit_app": ("提交申请", "Submit the application"),
    "scenes.budget": ("隐私预算", "Privacy budget"),
    "scenes.budget_spent": ("已用 ε {spent}", "ε spent {spent}"),
    "scenes.budget_left": ("剩余 ε {left}", "ε left {left}"),
    "scenes.budget_of": ("共 ε {total}，单次上限 {cap}", "of ε {total}, at most {cap} a query"),
    "scenes.expected_error": ("预期误差（95%）", "Expected error (95%)"),
    "scenes.expected_error_none": ("尚无可参考的查询；可用下方“预估”查看某条 SQL 的误差。",
                                   "No query yet to go by; use Preview below to see the error of a query."),
    "scenes.query_title": ("提交查询", "Run a query"),
    "scenes.query_hint": ("先在开发环境（合成孪生数据，即时、不耗预算）调试，再提交生产环境（真实数据，扣减预算，需出域审核）。",
                          "Develop on dev (synthetic twin: instant, no budget), then run on prod "
                          "(real data: budget charged, held for export review)."),
    "scenes.sql": ("SQL", "SQL"),
    "scenes.run": ("运行", "Run"),
    "scenes.preview": ("预估成本与误差", "Preview cost and error"),
    "scenes.preview_title": ("预估（不运行、不扣预算）", "Preview (nothing run, nothing spent)"),
    "scenes.cost": ("将花费 ε", "ε it would cost"),
    "scenes.left_after": ("之后剩余 ε", "ε left after"),
    "scenes.scene_queries": ("本场景的查询", "Queries of this scene"),
    "scenes.items_hint": ("每行一项：数据集.字段 用途，例如 health.outpatient_visit.district group_by",
                          "One item a line: dataset.field usage, e.g. health.outpatient_visit.district group_by"),
    "scenes.create": ("保存草稿", "Save the draft"),
    "scenes.budget_epsilon": ("总预算 ε", "Total budget ε"),
    "scenes.max_query_epsilon": ("单次查询 ε 上限", "Most ε per query"),
    "scenes.valid_from": ("生效日期", "Valid from"),
    "scenes.valid_to": ("截止日期", "Valid to"),
    "scenes.explain": ("判定说明", "Why"),
    "scenes.templates": ("分析模板", "Analysis templates"),
    "emergency.title": ("紧急停止", "Emergency stop"),
    "emergency.hint": ("一次性暂停某单位的全部生效场景，或涉及某数据集的全部场景；已提交的申请退回重审。",
                       "Suspend at once every approved scene of an organization, or touching a dataset; "
                       "submitted applications are returned for a new review."),
    "emergency.org": ("单位代码", "Organization code"),
    "emergency.dataset": ("数据集代码", "Dataset code"),
    "emergency.button": ("立即停止", "Stop now"),
    "emergency.done": ("已暂停 {n} 个场景，退回 {m} 个申请。", "{n} scene(s) suspended, {m} application(s) returned."),
    # queries
    "queries.title": ("查询", "Queries"),
    "queries.query": ("查询", "Query"),
    "queries.progress": ("进度", "Progress"),
    "queries.result": ("结果", "Result"),
    "queries.checked_sql": ("校验后重写的 SQL", "Checked, regenerated SQL"),
    "queries.error": ("错误", "Error"),
    "queries.cancel": ("取消查询", "Cancel the query"),
    "queries.refresh": ("刷新状态", "Refresh"),
    "queries.open_result": ("查看结果", "Open the result"),
    "queries.spent": ("已花费 ε", "ε spent"),
    # results
    "results.title": ("结果", "Results"),
    "results.result": ("结果", "Result"),
    "results.kind": ("类型", "Kind"),
    "results.column": ("列", "Column"),
    "results.function": ("聚合函数", "Function"),
    "results.version": ("版本", "Version"),
    "results.rows": ("行数", "Rows"),
    "results.cells": ("结果内容", "Cells"),
    "results.cells_hidden": ("结果内容不可见：仅在出域审核放行后（或开发环境的合成结果）向本租户展示，审核员仅在待审期间可预览。",
                             "Cells not shown: the tenant sees them once export review released them (or at once "
                             "for synthetic dev answers); a reviewer previews them only while they wait for review."),
    "results.preview_reviewer": ("审核预览（将要出域的内容，已加噪或脱敏）",
                                 "Reviewer's preview (what would go out: noised or masked)"),
    "results.noise": ("噪声与误差", "Noise and error"),
    "results.report": ("自动披露检查报告", "Automatic disclosure-check report"),
    "results.report_hidden": ("检查报告仅对办公室、审核员和审计员可见。",
                              "The check report is for the office, reviewers and auditors only."),
    "results.check": ("检查项", "Check"),
    "results.verdict": ("结论", "Verdict"),
    "results.download": ("下载", "Download"),
    "results.review_title": ("出域审核决定", "Export review decision"),
    "results.release": ("放行", "Release"),
    "results.reject": ("拒绝", "Reject"),
    "results.revise_title": ("处理后重新检查", "Change and check again"),
    "results.suppress_failing": ("屏蔽未通过检查的单元格", "Suppress every cell a check failed"),
    "results.round": ("取整", "Round"),
    "results.round_columns": ("列（逗号分隔）", "Columns (comma-separated)"),
    "results.round_base": ("取整基数", "Base"),
    "results.revision": ("审核员修订", "Reviewer's revision"),
    "results.released_by": ("放行方式", "Released by"),
    "results.decided_by_me": ("您已对该结果作出决定。", "You have decided on this result."),
    "results.notice_synthetic": ("合成数据：基于开发孪生数据计算，并非真实数据",
                                 "Synthetic: computed on the dev twin, not on real data"),
    "results.filter_status": ("按状态", "By status"),
    "reviews.title": ("出域审核队列", "Export review queue"),
    "reviews.hint": ("这里是等待您决定的结果（不含本单位的结果、不含您已决定的结果）。",
                     "Held results waiting for your decision (never your own organization's, nor ones you decided)."),
    "reviews.open": ("审核", "Review"),
    # lineage
    "lineage.title": ("结果 {id} 的数据血缘", "Lineage of result {id}"),
    "lineage.graph": ("血缘图", "Lineage graph"),
    "lineage.requester": ("查询人", "Requester"),
    "lineage.reviews": ("审核", "Reviews"),
    "lineage.exports": ("导出记录", "Exports"),
    "lineage.authorization": ("所依据的授权条目", "Authorization relied on"),
    "lineage.datasets": ("读取的数据版本", "Dataset versions read"),
    "lineage.node_scene": ("场景", "scene"),
    "lineage.node_query": ("查询", "query"),
    "lineage.node_result": ("结果", "result"),
    "lineage.node_review": ("审核", "review"),
    "lineage.node_export": ("导出", "export"),
    "lineage.node_upload": ("自有数据", "upload"),
    "lineage.node_version": ("版本", "version"),
    # audit
    "audit.title": ("审计日志", "Audit log"),
    "audit.timeline": ("活动与拒绝时间线", "Timeline of activity and denials"),
    "audit.timeline_note": ("按所选筛选条件，最近 {n} 条事件。", "The newest {n} events matching the filters."),
    "audit.legend_allow": ("允许", "allowed"),
    "audit.legend_deny": ("拒绝 / 错误", "denied / error"),
    "audit.verify": ("校验哈希链", "Verify the hash chain"),
    "audit.verify_ok": ("哈希链完整：已校验 {n} 条事件，链头 #{head}。",
                        "The chain is intact: {n} events checked, head #{head}."),
    "audit.verify_bad": ("哈希链已损坏：第一个异常事件 #{seq}（{reason}）。",
                         "The chain is BROKEN: first bad event #{seq} ({reason})."),
    "audit.head_hash": ("链头哈希", "Head hash"),
    "audit.since": ("起始（含）", "Since"),
    "audit.until": ("截止（不含）", "Until"),
    "audit.seq": ("序号", "Seq"),
    "audit.path": ("路径", "Path"),
    "audit.scene_id": ("场景编号", "Scene id"),
    "audit.action_hint": ("精确匹配，或以 * 结尾的前缀（如 scene.*）", "exact, or a prefix ending in * (scene.*)"),
    "audit.alerts": ("告警", "Alerts"),
    "audit.alerts_none": ("所选时间窗口内无告警。", "No alerts in the window."),
    "audit.severity": ("级别", "Severity"),
    "audit.alert_kind": ("类型", "Kind"),
    "audit.first_last": ("首次 / 最近", "First / last"),
    "audit.message": ("说明", "What"),
    "audit.window": ("时间窗口：{since} — {until}", "Window: {since} — {until}"),
    "audit.open_lineage": ("查看结果血缘", "Open the lineage of result"),
    "audit.result_id": ("结果编号", "Result id"),
    "audit.open": ("打开", "Open"),
    "audit.days": ("最近天数", "Last days"),
}

# Values from the data, by kind. zh, en.
VALUES: dict[str, dict[str, tuple[str, str]]] = {
    "role": {
        "provider": ("数据提供方", "provider"), "applicant": ("申请方（租户）", "applicant (tenant)"),
        "office": ("协调小组办公室", "coordination office"), "reviewer": ("出域审核员", "export reviewer"),
        "auditor": ("安全审计员", "security auditor"), "operator": ("运营主体", "operator"),
    },
    "scene_status": {
        "draft": ("草稿", "draft"), "submitted": ("已提交", "submitted"), "returned": ("已退回", "returned"),
        "rejected": ("已驳回", "rejected"), "approved": ("已批准", "approved"), "active": ("生效中", "active"),
        "expired": ("已过期", "expired"), "suspended": ("已暂停", "suspended"), "revoked": ("已撤销", "revoked"),
    },
    "scene_action": {
        "create": ("创建", "create"), "edit": ("修改", "edit"), "submit": ("提交", "submit"),
        "return": ("退回", "return"), "reject": ("驳回", "reject"), "approve": ("批准", "approve"),
        "suspend": ("暂停", "suspend"), "resume": ("恢复", "resume"), "revoke": ("撤销", "revoke"),
        "emergency_stop": ("紧急停止", "emergency stop"), "review": ("审核", "review"),
    },
    "scene_type": {
        "underwriting": ("智能核保", "smart underwriting"), "claims": ("保险理赔核验", "claims verification"),
        "pharma": ("医药统计", "pharma statistics"), "public_health": ("公共卫生统计", "public-health statistics"),
        "other": ("其他", "other"),
    },
    "usage": {
        "aggregate": ("仅用于聚合", "aggregate only"), "group_by": ("分组键", "group key"),
        "filter": ("仅用于筛选", "filter only"), "join_key": ("关联键", "join key"),
        "masked_output": ("脱敏后输出", "output after masking"),
    },
    "sensitivity": {
        "identifier": ("标识符", "identifier"), "quasi_identifier": ("准标识符", "quasi-identifier"),
        "sensitive": ("敏感属性", "sensitive attribute"), "free_text": ("自由文本", "free text"),
        "public": ("公开", "public"),
    },
    "opening_class": {
        "unconditional": ("无条件开放", "unconditional"), "conditional": ("有条件开放", "conditional"),
        "prohibited": ("禁止开放", "prohibited"),
    },
    "category": {
        "personal_attributes": ("个人属性", "personal attributes"), "health_status": ("健康状况", "health status"),
        "medical_application": ("医疗应用", "medical application"), "medical_payment": ("医疗支付", "medical payment"),
        "health_resources": ("卫生资源", "health resources"), "public_health": ("公共卫生", "public health"),
    },
    "update_cycle": {
        "realtime": ("实时", "real time"), "daily": ("每日", "daily"), "weekly": ("每周", "weekly"),
        "monthly": ("每月", "monthly"), "quarterly": ("每季度", "quarterly"), "yearly": ("每年", "yearly"),
        "once": ("一次性", "once"),
    },
    "masking": {
        "none": ("不脱敏", "none"), "pseudonym": ("假名化", "pseudonym"), "partial_id": ("证件号部分遮蔽", "partial ID"),
        "partial_phone": ("手机号部分遮蔽", "partial phone"), "partial_name": ("姓名部分遮蔽", "partial name"),
        "year": ("泛化到年", "year"), "month": ("泛化到月", "month"), "age_band": ("年龄段", "age band"),
        "district": ("泛化到区县", "district"), "round": ("取整分段", "rounded band"),
        "pii_redact": ("个人信息识别去除", "PII redaction"), "suppress": ("屏蔽", "suppressed"),
    },
    "query_status": {
        "queued": ("排队中", "queued"), "running": ("运行中", "running"), "held": ("待出域审核", "held for review"),
        "done": ("已完成", "done"), "released": ("已放行", "released"), "rejected": ("已拒绝", "rejected"),
        "failed": ("失败", "failed"), "cancelled": ("已取消", "cancelled"),
    },
    "result_status": {
        "dev": ("开发结果", "dev"), "held": ("待出域审核", "held for review"), "released": ("已放行", "released"),
        "rejected": ("已拒绝", "rejected"), "superseded": ("已被新版本替代", "superseded"),
    },
    "mode": {"dev": ("开发（合成）", "dev (synthetic)"), "prod": ("生产（真实）", "prod (real)")},
    "kind": {"aggregate": ("聚合", "aggregate"), "rows": ("逐行（脱敏）", "rows (masked)"),
             "template": ("模板", "template")},
    "decision": {"allow": ("允许", "allow"), "deny": ("拒绝", "deny"), "error": ("错误", "error"),
                 "release": ("放行", "release"), "reject": ("拒绝", "reject"), "approve": ("批准", "approve"),
                 "return": ("退回", "return")},
    "severity": {"warning": ("警告", "warning"), "high": ("高", "high")},
    "verdict": {"pass": ("通过", "pass"), "fail": ("未通过", "fail"), "review": ("需人工审核", "needs review"),
                "warn": ("提示", "warning"), "ok": ("通过", "ok")},
    "allowed": {"True": ("允许", "allowed"), "False": ("不允许", "refused")},
}


def _lookup(key: str, lang: str) -> str | None:
    pair = MESSAGES.get(key)
    if pair is None:
        return None
    return pair[LANGS.index(lang)]


def translator(lang: str) -> tuple[Callable[..., str], Callable[[str, Any], str]]:
    lang = lang if lang in LANGS else DEFAULT_LANG
    idx = LANGS.index(lang)

    def t(key: str, **params: Any) -> str:
        text = _lookup(key, lang)
        if text is None:
            return MISSING.format(key)
        return text.format(**params) if params else text

    def tv(kind: str, value: Any) -> str:
        table = VALUES.get(kind)
        if table is None:
            return MISSING.format(f"{kind}:{value}")
        pair = table.get(str(value))
        return pair[idx] if pair else str(value)

    return t, tv


def pick(lang: str, zh: str | None, en: str | None) -> str:
    """A message the services give in both languages (message_zh / message)."""
    return (zh if lang == "zh" else en) or en or zh or ""
