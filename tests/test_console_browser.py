"""The console in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; nothing
is downloaded): the office approves a scene, the applicant runs a dev and a prod query, the reviewer
releases the result, the applicant downloads it, and the auditor filters the log, verifies the chain
and opens the lineage graph. Screenshots land in tests/artifacts/console/ (git-ignored).

Without Chromium (or Playwright) these tests are skipped with the reason; under CI (CI=true) that is
a failure, like the PostgreSQL half of the suite.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scene_helpers import BY_DISTRICT, create
from tests.test_template_runs import health  # noqa: F401 - the `health` fixture

CHROMIUM = os.environ.get("PDAO_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
PASSWORD = "pdao-demo"


def _chromium_missing() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set PDAO_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -c constraints.txt -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _chromium_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI the console's browser tests must run", pytrace=False)
        pytest.skip(f"{reason}; the console's browser tests are skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _login(browser, base: str, username: str, lang: str = "zh"):  # noqa: ANN001, ANN202
    ctx = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True, locale="zh-CN")
    page = ctx.new_page()
    page.goto(f"{base}/console/")
    assert "/console/login" in page.url                         # anonymous: to the login page
    if lang == "en":
        page.click("#lang-switch")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    page.wait_for_load_state()
    if page.locator("#whoami").count() == 0:
        page.screenshot(path=str(ARTIFACTS / f"login-failed-{username}.png"), full_page=True)
        raise AssertionError(f"login as {username} failed at {page.url}: {page.inner_text('main')[:500]}")
    assert page.inner_text("#whoami") == username
    return ctx, page


def _wait_status(page, selector: str, wanted: set[str], seconds: float = 60) -> str:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while True:
        status = page.get_attribute(selector, "data-status")
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
        page.reload()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_walk_office_applicant_reviewer_auditor(browser, live_server, client, auth, loaded, shots):
    base = live_server
    scene = create(client, auth("insurer_a"), title="慢病统计（浏览器）")
    assert client.post(f"/api/v1/scenes/{scene['id']}/submit", headers=auth("insurer_a")).status_code == 200
    sid = scene["id"]

    # 1. the office: two members approve, item by item, with the rule table's verdict beside each item
    for n, who in enumerate(("office1", "office2"), 1):
        ctx, page = _login(browser, base, who)
        page.goto(f"{base}/console/scenes/{sid}")
        assert page.locator("table.items tbody tr").count() == len(scene["items"])
        assert page.locator("td.verdict.ok").count() == len(scene["items"])
        page.fill("#review-comment", f"第 {n} 位审核：清单合理")
        page.screenshot(path=str(shots / f"0{n}-office-review-{who}.png"), full_page=True)
        page.click("#approve")
        page.wait_for_selector("#scene-status")
        if n == 2:
            assert "生效中" in page.inner_text("#scene-status")      # active at the second approval
            page.screenshot(path=str(shots / "02b-scene-active.png"), full_page=True)
        ctx.close()
    assert client.get(f"/api/v1/scenes/{sid}", headers=auth("insurer_a")).json()["status"] == "active"

    # 2. the applicant: a dev query (instant, synthetic) and a prod query (held for review)
    ctx, page = _login(browser, base, "insurer_a")
    page.goto(f"{base}/console/scenes/{sid}")
    # the scene's budget, and the company's budget on each dataset the scene reads
    datasets = {i["dataset"] for i in scene["items"]}
    assert page.locator("#company-budgets svg.gauge").count() == len(datasets)
    assert page.locator("svg.gauge").count() == 1 + len(datasets)
    page.fill("#sql", BY_DISTRICT)
    page.select_option("#mode", "dev")
    page.click("#run-query")
    assert _wait_status(page, "#query-status", {"done"}) == "done"
    page.click("#open-result")
    page.wait_for_selector("#result-cells")                     # the tenant's own synthetic answer
    page.screenshot(path=str(shots / "03-applicant-dev-result.png"), full_page=True)
    page.goto(f"{base}/console/scenes/{sid}")
    page.fill("#sql", BY_DISTRICT)
    page.select_option("#mode", "prod")
    page.fill("#epsilon", "0.5")
    page.click("#run-query")
    assert _wait_status(page, "#query-status", {"held", "failed"}) == "held"
    page.screenshot(path=str(shots / "04-applicant-prod-held.png"), full_page=True)
    page.click("#open-result")
    page.wait_for_selector("#cells-hidden")                     # held: no cell for the tenant
    assert page.locator("#result-cells").count() == 0
    result_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    ctx.close()

    # 3. the reviewer: the queue, the preview with the report, release with a reason
    ctx, page = _login(browser, base, "reviewer1")
    page.goto(f"{base}/console/reviews")
    page.click(f'tr[data-result="{result_id}"] a.button')
    page.wait_for_selector("#result-cells")                     # the reviewer's preview
    assert page.locator("table.checks tbody tr").count() >= 1   # the automatic check report
    page.fill("#review-reason", "差分隐私聚合，单元格检查通过")
    page.screenshot(path=str(shots / "05-reviewer-preview.png"), full_page=True)
    page.click("#release")
    page.wait_for_selector('#result-status[data-status="released"]')
    assert page.locator("#result-cells").count() == 0           # decided: no longer shown to them
    ctx.close()

    # 4. the applicant downloads the released result (stamped, recorded)
    ctx, page = _login(browser, base, "insurer_a")
    page.wait_for_selector("#released")
    assert page.locator(f'#released a[href="/console/results/{result_id}"]').count() == 1
    page.screenshot(path=str(shots / "06-applicant-home.png"), full_page=True)
    page.goto(f"{base}/console/results/{result_id}")
    with page.expect_download() as info:
        page.click("#download-csv")
    data = Path(info.value.path()).read_bytes()
    assert data and info.value.suggested_filename.endswith(".csv")
    ctx.close()

    # 5. the auditor: filter the log, see the timeline, verify the chain, open the lineage graph
    ctx, page = _login(browser, base, "auditor1", lang="en")
    page.goto(f"{base}/console/audit")
    page.fill("#f-actor", "insurer_a")
    page.fill("#f-action", "result.*")
    page.click("#apply-filters")
    page.wait_for_selector("#timeline svg")
    actors = page.locator("#events tbody tr td:nth-child(3)").all_inner_texts()
    assert actors and set(actors) == {"insurer_a"}
    assert any(a.startswith("result.download") for a in page.locator("#events tbody tr td:nth-child(6)").all_inner_texts())
    page.screenshot(path=str(shots / "07-auditor-filtered-log.png"), full_page=True)
    page.click("#verify-link")
    page.wait_for_selector('#verify-verdict[data-ok="true"]')
    assert "intact" in page.inner_text("#verify-verdict")
    page.screenshot(path=str(shots / "08-auditor-chain-verified.png"), full_page=True)
    page.goto(f"{base}/console/audit")
    page.fill("#lineage-result", str(result_id))
    page.click("#open-lineage")
    page.wait_for_selector("#lineage-graph svg")
    for node in (f"r:{result_id}", f"s:{sid}", "rv:0"):
        assert page.locator(f'#lineage-graph [data-node="{node}"]').count() == 1, node
    assert page.locator('#lineage-graph [data-node^="e:"]').count() == 1      # the download
    page.screenshot(path=str(shots / "09-auditor-lineage.png"), full_page=True)
    page.goto(f"{base}/console/catalog")                        # the resource map, drawn on the server
    assert page.locator(f'#resource-map [data-node="sc:{sid}"]').count() == 1
    page.screenshot(path=str(shots / "10-catalog-resource-map.png"), full_page=True)
    page.goto(f"{base}/console/audit/alerts")
    page.screenshot(path=str(shots / "11-auditor-alerts.png"), full_page=True)
    ctx.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_walk_upload_template_run_and_trace(browser, live_server, client, auth, health, shots, tmp_path):
    """The underwriting flow in the browser: the applicant uploads its applicants through the file
    form, the office reads the template's SQL, outputs and disclosure before approving, the
    applicant runs it (dev, then prod: held), the reviewer releases, and the auditor traces the file."""
    import json

    from tests.test_scene_templates import underwriting_items
    from tests.test_template_runs import applicants
    from tests.test_tenant_uploads import APPLICANTS

    base = live_server
    # 1. the applicant's upload: a CSV and its declared schema, through the form
    csv = tmp_path / "applicants.csv"
    csv.write_bytes(applicants(health[:25]))
    ctx, page = _login(browser, base, "insurer_a")
    page.goto(f"{base}/console/uploads")
    page.set_input_files("#upload-file", str(csv))
    page.fill("#upload-schema", json.dumps(APPLICANTS, ensure_ascii=False))
    page.click("#upload-send")
    page.wait_for_selector("#upload-stored")
    assert page.locator('[data-upload="company_a/applicants"]').count() == 1
    assert not [x for x in health[:25] if x in page.content()]
    page.screenshot(path=str(shots / "12-applicant-upload.png"), full_page=True)
    ctx.close()
    scene = create(client, auth("insurer_a"), title="智能核保（浏览器）", scene_type="underwriting",
                   items=underwriting_items(), templates=[{"library": "underwriting"}])
    assert client.post(f"/api/v1/scenes/{scene['id']}/submit", headers=auth("insurer_a")).status_code == 200
    sid = scene["id"]

    # 2. the office: the template's SQL, its outputs' dependencies and the combinations, then approve
    for who in ("office1", "office2"):
        ctx, page = _login(browser, base, who)
        page.goto(f"{base}/console/scenes/{sid}")
        page.wait_for_selector("#template-underwriting table.disclosure")
        if who == "office1":
            page.locator("#template-underwriting").screenshot(path=str(shots / "13-office-template-disclosure.png"))
        page.click("#approve")
        page.wait_for_selector("#scene-status")
        ctx.close()

    # 3. the applicant runs it: dev (its own at once), prod (held)
    ctx, page = _login(browser, base, "insurer_a")
    for mode, wanted in (("dev", "done"), ("prod", "held")):
        page.goto(f"{base}/console/scenes/{sid}")
        page.select_option("#template-mode-underwriting", mode)
        page.click("#run-template-underwriting-button")
        assert _wait_status(page, "#query-status", {wanted, "failed"}) == wanted
    page.click("#open-result")
    page.wait_for_selector("#cells-hidden")
    result_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    page.screenshot(path=str(shots / "14-applicant-template-held.png"), full_page=True)
    ctx.close()

    # 4. the reviewer releases; the applicant downloads; the auditor traces the file
    ctx, page = _login(browser, base, "reviewer1")
    page.goto(f"{base}/console/results/{result_id}")
    page.wait_for_selector("#result-cells")
    page.fill("#review-reason", "派生值，仅限已授权申请人")
    page.click("#release")
    page.wait_for_selector("#result-status")
    ctx.close()
    ctx, page = _login(browser, base, "insurer_a")
    page.goto(f"{base}/console/results/{result_id}")
    with page.expect_download() as dl:
        page.click("#download-csv")
    found = tmp_path / "found.csv"
    dl.value.save_as(str(found))
    ctx.close()
    ctx, page = _login(browser, base, "auditor1", lang="en")
    page.goto(f"{base}/console/trace")
    page.set_input_files("#trace-file", str(found))
    page.click("#trace-send")
    page.wait_for_selector("#trace-result")
    assert page.get_attribute("#trace-result", "data-match") == "stamp"
    assert page.inner_text("#trace-requester") == "insurer_a"
    page.screenshot(path=str(shots / "15-auditor-trace.png"), full_page=True)
    ctx.close()
