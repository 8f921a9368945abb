"""Reading a result is bounded (review r3, F7): `GET /results/{id}` answers a page of rows (at most
`limit`, default 1,000, max 10,000, from `offset`) read from the Parquet file's row groups that hold
it; downloads are written a batch at a time and streamed; one user runs at most
`read_slots.MAX_READS_PER_USER` downloads and reads at once (429 `too_many_reads`). Through HTTP, on
SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlmodel import Session, select

from sandbox.results import export, fingerprint, read_slots
from sandbox.results.models import QueryResult, ResultExport
from tests.scene_helpers import active_scene
from tests.test_scene_templates import underwriting_items
from tests.test_template_runs import applicants, health, upload  # noqa: F401 - `health` is a fixture


@pytest.fixture
def runs(client, auth, health):
    """A dev answer (the tenant's at once) and a held prod answer of 20 rows each."""
    upload(client, auth("insurer_a"), applicants(health[:25]))       # every fifth has no valid consent
    scene = active_scene(client, auth, scene_type="underwriting", items=underwriting_items(),
                         templates=[{"library": "underwriting"}])
    url = f"/api/v1/scenes/{scene['id']}/templates/underwriting/runs"
    dev = client.post(url, headers=auth("insurer_a"), json={"upload": "applicants", "mode": "dev"}).json()
    prod = client.post(url, headers=auth("insurer_a"), json={"upload": "applicants", "mode": "prod"}).json()
    assert dev["status"] == "done" and prod["status"] == "held"
    return {"dev": dev["result_id"], "prod": prod["result_id"]}


def _get(client, headers, rid: int, **params):
    return client.get(f"/api/v1/results/{rid}", headers=headers, params=params)


def test_rows_are_answered_a_page_at_a_time(client, auth, runs):
    a = auth("insurer_a")
    whole = _get(client, a, runs["dev"]).json()
    assert whole["rows_total"] == len(whole["rows"]) == whole["row_count"] == 20 and whole["next_offset"] is None
    pages, offset = [], 0
    while offset is not None:
        page = _get(client, a, runs["dev"], offset=offset, limit=7).json()
        assert page["rows_total"] == 20 and page["offset"] == offset and len(page["rows"]) <= 7
        pages.append(page["rows"])
        offset = page["next_offset"]
    assert [len(p) for p in pages] == [7, 7, 6] and [r for p in pages for r in p] == whole["rows"]
    past = _get(client, a, runs["dev"], offset=20).json()
    assert past["rows"] == [] and past["next_offset"] is None and past["rows_total"] == 20
    for bad in ({"limit": 0}, {"limit": 10_001}, {"offset": -1}, {"limit": "x"}):
        r = _get(client, a, runs["dev"], **bad)
        assert r.status_code == 422, bad
    assert _get(client, a, runs["dev"], limit=10_000).status_code == 200


def test_a_held_row_answers_size_stays_hidden_from_its_tenant_on_every_page(client, auth, runs):
    mine = _get(client, auth("insurer_a"), runs["prod"], limit=5).json()
    assert mine["rows"] is None and mine["row_count"] is None
    assert mine["rows_total"] is None and mine["next_offset"] is None and mine["offset"] is None
    seen = _get(client, auth("reviewer1"), runs["prod"], limit=5).json()
    assert len(seen["rows"]) == 5 and seen["rows_total"] == 20 and seen["next_offset"] == 5


def test_a_page_reads_only_the_row_groups_that_hold_it(client, auth, engine, settings, runs, monkeypatch):
    """F7: a read decoded the whole answer (209 MB of JSON for 1M rows). A page now reads the row
    groups it needs, and no more."""
    with Session(engine) as s:
        stored = settings.results_dir / s.get(QueryResult, runs["dev"]).storage_path
    table = pq.read_table(stored)
    pq.write_table(table, stored, row_group_size=3)          # the same rows, in groups of 3
    asked = []
    real = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        asked.append(list(kwargs.get("row_groups") or []))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    page = _get(client, auth("insurer_a"), runs["dev"], offset=10, limit=4).json()
    assert asked == [[3, 4]]                                   # rows 9-11 and 12-14
    assert page["rows"] == json.loads(json.dumps(table.slice(10, 4).to_pylist(), default=str))


class _Gate:
    """Holds the first `n` calls of a patched writer until released."""

    def __init__(self, real, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0
        self.entered, self.release = threading.Semaphore(0), threading.Event()
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
            held = self.calls <= self.n
        if held:
            self.entered.release()
            self.release.wait(30)
        return self.real(*args, **kwargs)


def test_a_user_runs_at_most_so_many_downloads_and_reads_at_once(client, auth, engine, runs, monkeypatch):
    """F7: four parallel reads of a 1M-row answer took the server from 0.8 to 3.6 GB. Past
    MAX_READS_PER_USER downloads and page reads at once, the next answers 429 (bilingual), and
    nothing is read or recorded."""
    a = auth("insurer_a")
    limit = read_slots.MAX_READS_PER_USER
    gate = _Gate(fingerprint.write_csv, limit)
    monkeypatch.setattr(fingerprint, "write_csv", gate)
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(client.get(f"/api/v1/results/{runs['dev']}/download",
                                                                       headers=a)))
               for _ in range(limit)]
    for t in threads:
        t.start()
    try:
        for _ in range(limit):
            assert gate.entered.acquire(timeout=30)
        for busy in (client.get(f"/api/v1/results/{runs['dev']}/download", headers=a, params={"format": "json"}),
                     _get(client, a, runs["dev"])):
            assert busy.status_code == 429 and busy.json()["code"] == "too_many_reads", busy.text
            assert busy.json()["message_zh"] and busy.headers["retry-after"]
        # metadata without cells is no large read
        assert client.get("/api/v1/results", headers=a).status_code == 200
        with Session(engine) as s:
            assert s.exec(select(ResultExport)).all() == []
    finally:
        gate.release.set()
        for t in threads:
            t.join(60)
    assert [r.status_code for r in out] == [200] * limit
    assert _get(client, a, runs["dev"]).status_code == 200
    with Session(engine) as s:
        assert len(s.exec(select(ResultExport)).all()) == limit


# By default on sqlite only (file writing; downloads on PostgreSQL: tests/test_export_review.py).
@pytest.mark.default_backend("sqlite")
@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_a_download_is_written_a_batch_at_a_time_and_recorded_with_the_hash_of_its_bytes(client, auth, engine,
                                                                                          settings, runs,
                                                                                          monkeypatch, fmt):
    monkeypatch.setattr(export, "EXPORT_BATCH_ROWS", 3)     # 20 rows: seven batches
    r = client.get(f"/api/v1/results/{runs['dev']}/download", headers=auth("insurer_a"), params={"format": fmt})
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    with Session(engine) as s:
        row = s.exec(select(ResultExport).where(ResultExport.export_id == r.headers["X-Pdao-Export"])).one()
        res = s.get(QueryResult, runs["dev"])
        table = pq.read_table(settings.results_dir / res.storage_path).replace_schema_metadata(None)
    assert row.sha256 == hashlib.sha256(r.content).hexdigest() and row.size_bytes == len(r.content)
    stamp = {"export_id": row.export_id, "fingerprint": row.fingerprint, "result_id": res.id,
             "query_id": res.query_id, "version": res.version, "synthetic": res.synthetic}
    if fmt == "csv":      # the bytes of the whole table written at once
        assert r.content == fingerprint.csv_bytes(table, stamp)
    elif fmt == "json":
        assert r.content == fingerprint.json_bytes(table, stamp, {"result_id": res.id, "query_id": res.query_id,
                                                                  "synthetic": res.synthetic, "noise": res.noise})
    else:
        back = pq.read_table(io.BytesIO(r.content))
        assert back.replace_schema_metadata(None).equals(table)
        assert json.loads(back.schema.metadata[b"pdao"]) == stamp
    assert list(settings.staging_dir.iterdir()) == []         # the spooled file is gone


# By default on sqlite only (a page over the same service; paging on PostgreSQL: test_rows_are_answered_a_page_at_a_time).
@pytest.mark.default_backend("sqlite")
def test_the_consoles_result_page_shows_a_page_of_rows_with_links_to_the_others(app, client, auth, runs, monkeypatch):
    import re

    import api.console.routes
    from tests.console_support import CONSOLE, console_client

    monkeypatch.setattr(api.console.routes, "CONSOLE_PAGE_ROWS", 7)
    tenant = console_client(app, "insurer_a")
    seen, url = [], f"{CONSOLE}/results/{runs['dev']}"
    while url:
        page = tenant.get(url)
        assert page.status_code == 200 and 'id="result-pager"' in page.text
        body = page.text.split('id="result-cells"', 1)[1].split("</table>", 1)[0]
        seen.append(len(re.findall(r"<tr><td>", body)))
        nxt = re.search(r'id="page-next" href="([^"]+)"', page.text)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
        assert ('id="page-prev"' in page.text) == (len(seen) > 1)
    assert seen == [7, 7, 6]
    held = tenant.get(f"{CONSOLE}/results/{runs['prod']}").text
    assert 'id="result-cells"' not in held and 'id="result-pager"' not in held


def _stalled_download(base: str, path: str, token: str) -> socket.socket:
    """A client that asks for a download, reads its first bytes and then never reads again."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    assert b"200 OK" in s.recv(4096)
    return s


# On sqlite only: the slots and the send timeout live in the web process, not in the database.
@pytest.mark.default_backend("sqlite")
def test_a_stalled_download_keeps_its_read_slot_until_it_is_cut_off(live_server, auth, engine, settings, runs,
                                                                    monkeypatch):
    """Review r5 #1: the read slot ended when the staged file was written, so one tenant opened 100
    downloads of a 14 MB answer, read 4 KB of each and stopped: 1.4 GB of unlinked staged files and
    200 descriptors pinned, nothing refused, nothing timed out. Now a download keeps its slot while it
    streams (a third, stalled or not, is refused) and a client that takes no data for the send timeout
    is cut off, which gives the slot and the file back."""
    import httpx

    import api.slow_clients

    monkeypatch.setattr(api.slow_clients, "SEND_TIMEOUT_SECONDS", 2.0)
    with Session(engine) as s:       # the dev answer, made large (16 MB as CSV): more than socket buffers hold
        res = s.get(QueryResult, runs["dev"])
        res.content_fp = None
        s.commit()
        path = settings.results_dir / res.storage_path
    pq.write_table(pa.table({"h": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(250_000)]}), path)
    a = auth("insurer_a")
    token = a["Authorization"].removeprefix("Bearer ")
    url = f"/api/v1/results/{runs['dev']}/download"
    stalled = [_stalled_download(live_server, url, token) for _ in range(read_slots.MAX_READS_PER_USER)]
    try:
        busy = httpx.get(live_server + url, headers=a, timeout=30)
        assert busy.status_code == 429 and busy.json()["code"] == "too_many_reads", busy.text
        deadline = time.monotonic() + 30          # cut off after 2 s without progress
        while True:
            r = httpx.get(live_server + url, headers=a, timeout=60)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200 and len(r.content) == int(r.headers["content-length"]) > 16_000_000
        # and the stalled connections were aborted, not left to flush what the client never reads
        # (review r6: closed gracefully, each held its socket and megabytes of buffer)
        for s in stalled:
            s.settimeout(5)
            with pytest.raises((ConnectionResetError, TimeoutError)) as cut:
                while s.recv(1 << 20):
                    pass
            assert cut.type is ConnectionResetError
    finally:
        for s in stalled:
            s.close()
    assert list(settings.staging_dir.iterdir()) == []


def test_an_organization_reads_so_many_result_rows_a_minute(app, client, auth, engine, settings, runs):
    """Review r5 #3: one tenant reading 10,000-row pages in a loop (279 in 30 s) slowed every other
    tenant 5-10x within every limit. Pages and downloads now cost their rows against the
    organization's budget a minute (`PDAO_READ_ROWS_PER_MINUTE`): past it, 429 `read_rate_limited`
    with the wait, nothing read or recorded; another company reads on."""
    import dataclasses

    app.state.settings = dataclasses.replace(settings, read_rows_per_minute=45)   # the dev answer has 20 rows
    a = auth("insurer_a")
    assert _get(client, a, runs["dev"], limit=20).status_code == 200            # 20
    assert client.get(f"/api/v1/results/{runs['dev']}/download", headers=a).status_code == 200   # 40
    r = _get(client, a, runs["dev"], limit=10)
    assert r.status_code == 429 and r.json()["code"] == "read_rate_limited" and r.json()["message_zh"], r.text
    assert int(r.headers["retry-after"]) >= 1
    r = client.get(f"/api/v1/results/{runs['dev']}/download", headers=a)
    assert r.status_code == 429 and r.json()["code"] == "read_rate_limited"
    with Session(engine) as s:
        assert len(s.exec(select(ResultExport)).all()) == 1
    # metadata without cells costs nothing
    assert client.get("/api/v1/results", headers=a).status_code == 200


def test_a_read_larger_than_a_minutes_budget_leaves_it_in_debt(app, client, auth, runs, settings):
    """Review r6: a download cost at most a minute's worth of rows however large the answer. It may
    start once the budget holds a minute's worth, and takes all its rows: the next read waits."""
    import dataclasses

    app.state.settings = dataclasses.replace(settings, read_rows_per_minute=15)   # the answer has 20 rows
    a = auth("insurer_a")
    assert client.get(f"/api/v1/results/{runs['dev']}/download", headers=a).status_code == 200
    r = _get(client, a, runs["dev"], limit=1)
    assert r.status_code == 429 and r.json()["code"] == "read_rate_limited"
