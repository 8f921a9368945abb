"""`pdao demo --no-serve` then `pdao serve`: a real server process answering real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HEALTH_CODES = {"health.resident", "health.chronic_condition", "health.outpatient_visit", "health.inpatient_stay",
                "health.insurance_settlement"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdao_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdao", *args]


@pytest.fixture
def demo_home(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDAO_")}
    env.update(PDAO_HOME=str(tmp_path / "home"), PDAO_DEMO_PASSWORD="demo-pass-123")
    done = subprocess.run(pdao_cmd("demo", "--no-serve", "--scale", "3000"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "insurer_a" in done.stdout and "/docs" in done.stdout
    # a second run finds everything in place and changes nothing
    again = subprocess.run(pdao_cmd("demo", "--no-serve", "--scale", "3000"), env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "already loaded" in again.stdout, again.stdout + again.stderr
    return env


def test_demo_then_serve_over_real_http(demo_home):
    port = free_port()
    proc = subprocess.Popen(pdao_cmd("serve", "--host", "127.0.0.1", "--port", str(port)), env=demo_home,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        docs = httpx.get(f"{base}/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert httpx.get(f"{base}/api/v1/openapi.json").json()["paths"]["/api/v1/datasets"]
        token = httpx.post(f"{base}/api/v1/auth/token",
                           data={"username": "insurer_a", "password": "demo-pass-123"}).json()["access_token"]
        page = httpx.get(f"{base}/api/v1/datasets", headers={"Authorization": f"Bearer {token}"}).json()
        assert HEALTH_CODES <= {d["code"] for d in page["items"]}
        assert all(d["latest_version"]["prod"] == 1 and d["latest_version"]["dev"] == 1
                   for d in page["items"] if d["code"] in HEALTH_CODES)
        unknown = httpx.get(f"{base}/api/v1/no-such-thing")
        assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
        assert httpx.get(f"{base}/api/v1/datasets").json()["code"] == "not_authenticated"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
