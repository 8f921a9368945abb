"""The Python client (`pdao.client`) against a real server: uvicorn on a free port, real HTTP."""

from __future__ import annotations

import io
import json
import threading
import time

import pandas as pd
import pytest
import uvicorn

from pdao import client as client_mod
from pdao.client import Client, PdaoClientError, QueryFailed, QueryTimeout, ResultHeld
from sandbox.worker import start_in_thread
from tests.conftest import DEMO_PASSWORD
from tests.scene_helpers import BY_DISTRICT, VISITS, active_scene
from tests.scene_helpers import DISTRICTS as DISTRICT_DOMAIN

DISTRICTS = set(DISTRICT_DOMAIN)

# The client speaks HTTP only: which database is behind the server changes nothing it sees. By
# default on SQLite; on PostgreSQL in `make test-slow`. The same server paths on PostgreSQL:
# tests/test_queries.py, tests/test_export_review.py, tests/test_query_jobs.py.
pytestmark = pytest.mark.default_backend("sqlite")


@pytest.fixture
def server(app):
    """The test app served by uvicorn in a thread on a free port; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True, name="pdao-test-uvicorn")
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def worker(engine, settings):
    """A background query worker (as `pdao serve` runs one), stopped after the test."""
    thread, stop = start_in_thread(engine, settings)
    yield
    stop.set()
    thread.join(10)


@pytest.fixture
def users(server, auth):
    """users('insurer_a') -> a Client holding that user's bearer token (one password check per
    user and test: `auth` caches it; `Client.login` itself is tested on its own)."""
    made: dict[str, Client] = {}

    def get(name: str) -> Client:
        if name not in made:
            made[name] = Client(server, auth(name)["Authorization"].removeprefix("Bearer "))
        return made[name]

    yield get
    for c in made.values():
        c.close()


def test_login_gives_a_bearer_client_and_bad_passwords_raise(server, client, auth):
    with Client.login(server + "/", "insurer_a", DEMO_PASSWORD) as c:
        assert c.url == server + "/api/v1" and c.token and c.role == "applicant"
        me = c.me()
        assert me["username"] == "insurer_a" and me["role"] == "applicant" and me["auth_method"] != "api_key"
    with pytest.raises(PdaoClientError) as e:
        Client.login(server, "insurer_a", "wrong password")
    assert e.value.status == 401 and e.value.code and e.value.message_zh
    with Client(server) as anonymous, pytest.raises(PdaoClientError) as e:
        anonymous.me()
    assert e.value.status == 401 and e.value.code == "not_authenticated" and e.value.request_id
    # an API key works as well: an operator grants it, its owner claims it
    r = client.post("/api/v1/api-keys", headers=auth("operator1"), json={"username": "insurer_a", "label": "script"})
    assert r.status_code == 201, r.text
    with Client.login(server, "insurer_a", DEMO_PASSWORD) as owner:
        key = owner.claim_api_key(r.json()["id"], DEMO_PASSWORD)
        assert [(k["id"], k["status"]) for k in owner.api_keys()] == [(r.json()["id"], "active")]
    with Client(server, api_key=key) as keyed:
        assert keyed.me()["username"] == "insurer_a" and keyed.me()["auth_method"] == "api_key"
    with Client(server, api_key="pdao_not-a-key") as keyed, pytest.raises(PdaoClientError) as e:
        keyed.me()
    assert e.value.status == 401


def test_dev_query_returns_a_dataframe_of_every_district_with_its_metadata(client, auth, loaded, users):
    scene = active_scene(client, auth)
    a = users("insurer_a")
    df = a.query(scene["id"], BY_DISTRICT, epsilon=0.5, progress=False)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["district", "n", "total", "mean", "mean_error95"]
    assert set(df["district"]) == DISTRICTS and len(df) == 6
    assert df["n"].dtype == "int64" and df["total"].dtype == "float64"
    assert list(df["n"]) == sorted(df["n"], reverse=True)
    at = df.attrs
    assert at["synthetic"] is True and at["mode"] == "dev" and at["status"] == "dev"
    assert at["query_id"] and at["result_id"] and "synthetic" in at["notice"] and at["notice_zh"]
    assert at["epsilon_spent"] == 0 and at["epsilon"] == pytest.approx(0.5)   # noise as at ε=0.5; nothing spent
    assert at["noise"]["n"]["scale"] == pytest.approx(10 * 3 / 0.5) and at["noise"]["n"]["error95"] > 0
    assert set(at["noise"]) >= {"n", "total", "mean"}
    # the same answer through the other calls
    q = a.status(at["query_id"])
    assert q["status"] == "done" and q["result_id"] == at["result_id"]
    res = a.result(at["result_id"])
    assert res["cells_visible"] is True and len(res["rows"]) == 6
    pd.testing.assert_frame_equal(a.frame(at["result_id"]), df)
    assert a.budget(scene["id"])["epsilon_spent"] == 0
    assert [x["id"] for x in a.queries(scene["id"])] == [at["query_id"]]
    # another tenant sees nothing of it: the same 404 as for what does not exist
    b = users("insurer_b")
    for call in (lambda: b.status(at["query_id"]), lambda: b.result(at["result_id"]),
                 lambda: b.download(at["result_id"]), lambda: b.cancel(at["query_id"]),
                 lambda: b.budget(scene["id"]), lambda: b.query(scene["id"], BY_DISTRICT),
                 lambda: a.status(at["query_id"] + 1000)):
        with pytest.raises(PdaoClientError) as e:
            call()
        assert e.value.status == 404 and e.value.code == "not_found" and e.value.message_zh
    assert b.queries() == []


def test_prod_queries_preview_budget_refusal_held_and_failed(client, auth, loaded, users, worker, capsys, monkeypatch):
    scene = active_scene(client, auth)
    a = users("insurer_a")
    before = a.budget(scene["id"])
    assert (before["epsilon"], before["epsilon_spent"], before["epsilon_left"]) == (3.0, 0, 3.0)
    p = a.preview(scene["id"], BY_DISTRICT, epsilon=0.3)
    assert p["mode"] == "prod" and p["epsilon_cost"] == 0.3 and p["budget"]["affordable"] is True
    assert p["aggregates"]["n"]["error95"] > 0
    assert a.budget(scene["id"]) == before                       # a preview spends nothing

    # refused: the server's code and its Chinese message, nothing spent or queued
    with pytest.raises(PdaoClientError) as e:
        a.query(scene["id"], f"SELECT hospital, COUNT(*) FROM {VISITS} GROUP BY hospital", mode="prod", epsilon=0.5)
    err = e.value
    assert err.status == 422 and err.code == "query_refused" and "group_by" in str(err.details) + err.message
    assert any("\u4e00" <= ch <= "\u9fff" for ch in err.message_zh) and err.message_zh in str(err)
    assert a.budget(scene["id"]) == before and a.queries(scene["id"]) == []
    with pytest.raises(ValueError):
        a.query(scene["id"], BY_DISTRICT, mode="production")

    # run by the worker, then held for export review: ResultHeld with the ids, ε charged once
    capsys.readouterr()
    with pytest.raises(ResultHeld) as e:
        a.query(scene["id"], BY_DISTRICT, mode="prod", epsilon=0.5, poll=0.05, timeout=60)
    held = e.value
    assert held.code == "result_held" and held.query_id and held.result_id and held.query_status == "held"
    assert "export review" in str(held) and "出域审核" in held.message_zh and str(held.result_id) in held.message
    assert held.result["cells_visible"] is False and held.result["rows"] is None and held.result["row_count"] == 6
    assert f"query {held.query_id}" in capsys.readouterr().err      # the progress bar while it waited
    after = a.budget(scene["id"])
    assert after["epsilon_spent"] == pytest.approx(0.5) and after["epsilon_left"] == pytest.approx(2.5)
    assert held.query["epsilon_spent"] == pytest.approx(0.5) == a.status(held.query_id)["epsilon_spent"]
    with pytest.raises(ResultHeld):
        a.frame(held.result_id)
    with pytest.raises(ResultHeld):
        a.fetch(held.query_id, progress=False)
    with pytest.raises(PdaoClientError) as e:
        a.download(held.result_id)
    assert e.value.status == 403 and e.value.code == "result_not_released"

    # export review by a reviewer's client; then the tenant's frame and file; lineage and trace
    r1 = users("reviewer1")
    assert held.result_id in [x["id"] for x in r1.review_queue()]
    with pytest.raises(PdaoClientError) as e:
        a.review(held.result_id, "release", "mine")
    assert e.value.status == 403
    assert r1.review(held.result_id, "release", "DP aggregate, cells fine")["status"] == "released"
    released = a.frame(held.result_id)
    assert len(released) == 6 and released.attrs["status"] == "released" and released.attrs["synthetic"] is False
    found = a.download(held.result_id)
    audit = users("auditor1")
    assert audit.lineage(held.result_id)["query"]["requester"]["username"] == "insurer_a"
    t = audit.trace(found, "found.csv")
    assert t["matched"] and t["stamp_valid"] is True and t["reviewers"][0]["username"] == "reviewer1"

    # failed in the worker (the engine breaks): held like any answer, charged like any run — whether a prod
    # run fails may depend on the data, so its tenant learns nothing of it before a reviewer decides
    import duckdb

    import sandbox.engine.execute

    def broken(*args, **kwargs):
        raise duckdb.IOException("the engine broke")

    monkeypatch.setattr(sandbox.engine.execute, "domain_connection", broken)
    with pytest.raises(ResultHeld) as e:
        a.query(scene["id"], BY_DISTRICT, mode="prod", epsilon=0.2, progress=False, poll=0.05, timeout=60)
    assert e.value.query_status == "held" and e.value.result["row_count"] == 6 and "broke" not in str(e.value.result)
    assert a.budget(scene["id"])["epsilon_spent"] == pytest.approx(0.7)


def test_prod_query_without_waiting_timeout_progress_line_and_cancel(client, auth, loaded, users, monkeypatch, capsys):
    scene = active_scene(client, auth)
    a = users("insurer_a")
    q = a.query(scene["id"], BY_DISTRICT, mode="prod", epsilon=0.4, wait=False)     # no worker: it stays queued
    assert isinstance(q, dict) and q["status"] == "queued" and q["result_id"] is None
    assert a.budget(scene["id"])["epsilon_spent"] == pytest.approx(0.4)              # reserved
    monkeypatch.setattr(client_mod, "tqdm", None)                                     # the plain stderr line
    capsys.readouterr()
    with pytest.raises(QueryTimeout) as e:
        a.wait(q["id"], poll=0.05, timeout=0.2)
    assert e.value.code == "wait_timeout" and e.value.query_status == "queued" and str(q["id"]) in e.value.message
    err = capsys.readouterr().err
    assert f"query {q['id']}: queued" in err and err.endswith("\n")
    assert a.cancel(q["id"])["status"] == "cancelled"
    assert a.budget(scene["id"])["epsilon_spent"] == 0                                # refunded
    with pytest.raises(QueryFailed) as e:
        a.fetch(q["id"], progress=False)
    assert e.value.code == "cancelled" and e.value.query_status == "cancelled" and e.value.message_zh == "查询已取消。"
    with pytest.raises(PdaoClientError) as e:
        a.cancel(q["id"])
    assert e.value.status == 409 and e.value.code == "query_finished"


def test_download_round_trips_to_the_same_frame(client, auth, loaded, users, tmp_path):
    scene = active_scene(client, auth)
    a = users("insurer_a")
    df = a.query(scene["id"], BY_DISTRICT, progress=False)
    rid = df.attrs["result_id"]
    for fmt in ("csv", "parquet", "json"):
        data = a.download(rid, format=fmt)
        assert isinstance(data, bytes) and data
        if fmt == "parquet":   # typed: the frame's own dtypes come back
            back = pd.read_parquet(io.BytesIO(data))
        else:                  # text: values come back; whole floats may read as ints, so cast as the frame
            if fmt == "csv":   # the export stamp, then (synthetic answers) a notice, then the CSV proper
                lines = data.split(b"\n")
                stamp = [ln for ln in lines if ln.startswith(b"#")]
                assert lines[0].startswith(b"# pdao export ex-") and b" fingerprint " in lines[0]
                assert len(stamp) == 2 and "合成数据" in stamp[1].decode()
                back = pd.read_csv(io.BytesIO(data), skiprows=len(stamp))
            else:
                body = json.loads(data)
                assert body["result_id"] == rid and body["synthetic"] is True and body["noise"] == df.attrs["noise"]
                back = pd.DataFrame.from_records(body["rows"], columns=list(body["rows"][0]))
            assert list(back.columns) == list(df.columns)
            back = back.astype(df.dtypes.to_dict())
        pd.testing.assert_frame_equal(back, df, check_exact=False, rtol=1e-12, obj=f"{fmt} download")
        written = a.download(rid, tmp_path, format=fmt)
        # every download is its own export (its own id and stamp), with the same cells
        assert written == tmp_path / f"result-{rid}.{fmt}" and written.stat().st_size > 0
        named = a.download(rid, tmp_path / f"mine.{fmt}", format=fmt)
        assert named == tmp_path / f"mine.{fmt}" and named.read_bytes() != data
    with pytest.raises(ValueError):
        a.download(rid, format="xlsx")


def test_unreachable_server_is_a_client_error():
    with Client("http://127.0.0.1:9", "token", timeout=2) as c, pytest.raises(PdaoClientError) as e:
        c.status(1)
    assert e.value.status == 0 and e.value.code in {"unreachable", "timeout"}
