"""`pdao policy …`: the rule table and "who may do what"."""

from __future__ import annotations

import json
from typing import Annotated

import typer

policy_app = typer.Typer(help="Authorization: the rule table and decisions.", no_args_is_help=True)


def _run(fn):  # noqa: ANN001, ANN202 - pdao.cli.main imports this module, so its helper is imported late
    from pdao.cli.main import _run as run

    return run(fn)


# The rule names of rule_table()["also"], in its order (policies/rules.py item_verdict).
ALSO_RULES = ("prohibited_dataset", "group_by_needs_domain", "masked_output_needs_masking", "join_key_needs_identifier")


def _never_reason(sensitivity: str, usage: str) -> tuple[str, str]:
    from policies.rules import NEVER_REASON, Usage

    return NEVER_REASON.get((sensitivity, Usage(usage)), (
        f"a {sensitivity} field can never be used as {usage}", f"{sensitivity} 类字段不能用于 {usage}"))


def render_rules() -> str:
    """The rule table as the office reads it: sensitivity × usage → the highest field grade."""
    from policies.rules import MAX_GRADE, Usage, rule_table

    usages = [u.value for u in Usage]
    sens = list(MAX_GRADE)
    never: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], str] = {}
    for s in sens:
        for u in usages:
            grade = MAX_GRADE[s][Usage(u)]
            if grade == 0:
                never.append((s, u))
                cells[s, u] = f"never [{len(never)}]"
            else:
                cells[s, u] = f"≤ {grade}"
    first = max(len("sensitivity \\ usage"), *(len(s) for s in sens))
    widths = {u: max(len(u), *(len(cells[s, u]) for s in sens)) for u in usages}
    lines = [
        "Rule table: the highest field grade each sensitivity admits for each usage",
        "规则表：各敏感类别的字段按用途允许的最高分级（grade 1 = public … 5 = e.g. HIV records; 5 is never admitted）",
        "",
        "  ".join(["sensitivity \\ usage".ljust(first), *(u.ljust(widths[u]) for u in usages)]).rstrip(),
        "  ".join(["-" * first, *("-" * widths[u] for u in usages)]),
    ]
    for s in sens:
        lines.append("  ".join([s.ljust(first), *(cells[s, u].ljust(widths[u]) for u in usages)]).rstrip())
    lines += ["", "never (refused whatever the grade; rule never:<sensitivity>:<usage>):"]
    for n, (s, u) in enumerate(never, 1):
        en, zh = _never_reason(s, u)
        lines.append(f"  [{n}] {s} × {u}: {en} / {zh}")
    lines += ["", "a field graded above its cell is refused by rule grade:<sensitivity>:<usage>", "", "also:"]
    also = rule_table()["also"]
    names = ALSO_RULES if len(ALSO_RULES) == len(also) else ("",) * len(also)
    lines += [f"  - {text}" + (f" (rule {name})" if name else "") for text, name in zip(also, names)]
    return "\n".join(lines)


@policy_app.command("rules")
def rules(as_json: Annotated[bool, typer.Option("--json", help="print the table as JSON")] = False) -> None:
    """Print the rule table (grade × sensitivity × usage) that admits or refuses data-list items."""
    if as_json:
        from policies.rules import rule_table

        typer.echo(json.dumps(rule_table(), ensure_ascii=False, indent=2))
        return
    typer.echo(render_rules())


@policy_app.command("explain")
def explain(user: Annotated[str, typer.Option("--user", help="username asking")],
            scene: Annotated[int, typer.Option("--scene", help="scene id")],
            dataset: Annotated[str, typer.Option("--dataset", help="dataset code, e.g. health.outpatient_visit")],
            field: Annotated[str, typer.Option("--field", help="field name")],
            usage: Annotated[str, typer.Option("--usage", help="aggregate|group_by|filter|join_key|masked_output")],
            ) -> None:
    """May USER's organization use DATASET.FIELD as USAGE in SCENE now?

    Prints ALLOWED or DENIED, the rule that decided and why (English and Chinese); exits 0 when
    allowed, 1 when denied. A scene the user may not see answers DENIED not_found.
    """
    from sqlmodel import Session

    from pdao.cli.demo import prepare_home
    from pdao.kernel.config import Settings
    from pdao.kernel.identity.models import Organization, Role
    from pdao.kernel.identity.service import Principal, get_user
    from policies.enforcer import SceneEnforcers
    from sandbox.scenes.models import Scene
    from sandbox.scenes.service import decide, may_see

    settings = Settings.from_env()
    engine = _run(lambda: prepare_home(settings))

    def go() -> tuple[bool, str, str, str, str]:
        with Session(engine) as session:
            u = get_user(session, user)
            org = session.get(Organization, u.org_id)
            principal = Principal(u.id, u.username, Role(u.role), org.id, org.code, org.kind, "cli")
            who = f"user {u.username} ({u.role} of {org.code})"
            row = session.get(Scene, scene)
            if row is None or not may_see(session, principal, row):
                # the same answer as the API: another tenant's scene is indistinguishable from none
                return False, "not_found", "Scene not found.", "场景不存在。", f"{who} · scene {scene}"
            d = decide(session, SceneEnforcers(engine), row, org.code, dataset, field, usage)
            return d.allowed, d.rule, d.message, d.message_zh, f"{who} · scene {scene} ({d.scene_status})"

    try:
        allowed, rule, message, message_zh, context = _run(go)
    finally:
        engine.dispose()
    typer.echo(f"{'ALLOWED' if allowed else 'DENIED'} {rule}")
    typer.echo(f"  {message}")
    typer.echo(f"  {message_zh}")
    typer.echo(f"  {context}: {dataset}.{field} as {usage}")
    raise typer.Exit(0 if allowed else 1)
