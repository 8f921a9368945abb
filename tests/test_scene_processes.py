"""Two real server processes on one metadata database: a change made through one is seen by the
other on its very next request, although the other holds the scene's casbin enforcer in its cache.

Both `pdao serve` processes get the test's home and database (SQLite file or PostgreSQL database)
and the same signing key, so a token issued by one is good at the other.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEMO_PASSWORD
from tests.scene_helpers import SCENE_ITEMS, application

SIGNING_KEY = "test-signing-key-of-at-least-32-bytes"  # as tests/conftest.py make_settings
REPO = Path(__file__).resolve().parents[1]
ITEM = SCENE_ITEMS[0]  # health.outpatient_visit.district as group_by


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdao", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"{self.base}/api/v1", timeout=15)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, f"server {self.name} exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"server {self.name} did not come up:\n{self.output()}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._out.close()


@pytest.fixture
def servers(settings, tmp_path) -> Iterator[tuple[Server, Server]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDAO_")}
    env.update(PDAO_HOME=str(settings.home), PDAO_DATABASE_URL=settings.database_url, PDAO_SECRET_KEY=SIGNING_KEY)
    started: list[Server] = []
    try:
        for name in ("A", "B"):
            started.append(Server(name, env, tmp_path / f"server-{name}.log"))
        deadline = time.monotonic() + 60
        for s in started:
            s.wait_ready(deadline)
        yield started[0], started[1]
    finally:
        for s in started:
            s.stop()


def token(server: Server, username: str) -> dict[str, str]:
    r = server.http.post("/auth/token", data={"username": username, "password": DEMO_PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def active_scene(server: Server, applicant: dict, office: tuple[dict, dict], **over) -> int:
    r = server.http.post("/scenes", headers=applicant, json=application(**over))
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = server.http.post(f"/scenes/{sid}/submit", headers=applicant)
    assert r.status_code == 200, r.text
    for who in office:
        r = server.http.post(f"/scenes/{sid}/reviews", headers=who, json={"decision": "approve", "comment": "ok"})
        assert r.status_code == 200, r.text
    assert r.json()["status"] == "active", r.text
    return sid


def explain(server: Server, headers: dict, sid: int, **item) -> dict:
    r = server.http.get(f"/scenes/{sid}/explain", headers=headers, params={**ITEM, **item})
    assert r.status_code == 200, f"{server.name}: {r.status_code} {r.text}"
    return r.json()


def post(server: Server, headers: dict, path: str, body: dict, status: int = 200) -> dict:
    r = server.http.post(path, headers=headers, json=body)
    assert r.status_code == status, f"{server.name} {path}: {r.status_code} {r.text}"
    return r.json()


def test_changes_through_one_process_are_seen_by_the_other_on_the_next_request(servers):
    a, b = servers
    # tokens from A work at B: same signing key, same users table
    tenant_at_a, tenant_at_b = token(a, "insurer_a"), token(b, "insurer_a")
    office1, office2 = token(a, "office1"), token(a, "office2")

    sid = active_scene(a, tenant_at_a, (office1, office2))

    # B warms its cache: the scene's enforcer is loaded and kept there
    first = explain(b, tenant_at_a, sid)
    assert (first["allowed"], first["rule"], first["scene_status"]) == (True, "scene_item", "active")
    other_use = explain(b, tenant_at_b, sid, usage="filter")
    assert (other_use["allowed"], other_use["rule"]) == (False, "not_in_data_list")
    assert explain(b, tenant_at_b, sid)["allowed"] is True

    # suspended through A: B's very next request is refused
    assert post(a, office1, f"/scenes/{sid}/suspend", {"reason": "audit"})["status"] == "suspended"
    got = explain(b, tenant_at_b, sid)
    assert (got["allowed"], got["rule"], got["scene_status"]) == (False, "scene_suspended", "suspended")

    # resumed through A: B allows again (its cached enforcer is of an older policy version)
    assert post(a, office2, f"/scenes/{sid}/resume", {})["status"] == "active"
    got = explain(b, tenant_at_b, sid)
    assert (got["allowed"], got["rule"]) == (True, "scene_item")

    # revoked through A: B refuses, and B's view of the scene agrees
    assert post(a, office1, f"/scenes/{sid}/revoke", {"reason": "misuse"})["status"] == "revoked"
    got = explain(b, tenant_at_b, sid)
    assert (got["allowed"], got["rule"], got["scene_status"]) == (False, "scene_revoked", "revoked")
    seen = b.http.get(f"/scenes/{sid}", headers=tenant_at_b).json()
    assert seen["status"] == "revoked" and seen["effective_items"] == []
    r = b.http.post(f"/scenes/{sid}/resume", headers=token(b, "office2"), json={})
    assert r.status_code == 409 and r.json()["code"] == "wrong_state"

    # an emergency stop through B is seen by A on its next request
    sid2 = active_scene(a, tenant_at_a, (office1, office2))
    assert explain(a, tenant_at_a, sid2)["allowed"] is True  # A's cache now holds sid2
    stopped = post(b, token(b, "office2"), "/emergency-stop", {"org": "company_a", "reason": "suspected leak"})
    assert stopped == {"suspended": [sid2], "returned": []}  # the revoked scene is not touched
    got = explain(a, tenant_at_a, sid2)
    assert (got["allowed"], got["rule"], got["scene_status"]) == (False, "scene_suspended", "suspended")
    history = a.http.get(f"/scenes/{sid2}", headers=office1).json()["history"]
    assert (history[-1]["action"], history[-1]["actor"]) == ("suspend", "office2")
    assert history[-1]["reason"] == "emergency stop: suspected leak"

    # both processes are still healthy
    for s in servers:
        assert s.proc.poll() is None, s.output()
