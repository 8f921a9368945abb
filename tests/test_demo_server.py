"""`pdao demo --no-serve` then `pdao serve`: a real server process answering real HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ahead

HEALTH_CODES = {"health.resident", "health.chronic_condition", "health.outpatient_visit", "health.inpatient_stay",
                "health.insurance_settlement"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdao_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdao", *args]


def demo_env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDAO_")}
    env.update(PDAO_HOME=home, PDAO_DEMO_PASSWORD="demo-pass-123")
    return env


def first_demo() -> tuple[str, int, str, str]:
    """`pdao demo --no-serve` into a new home: (home, exit code, stdout, stderr). A process of its own
    costs ~8 s: the run starts it ahead (conftest `ahead`), while other tests run."""
    home = tempfile.mkdtemp(prefix="pdao-demo-test-")
    done = subprocess.run(pdao_cmd("demo", "--no-serve", "--scale", "3000"), env=demo_env(str(Path(home) / "home")),
                          capture_output=True, text=True, timeout=300)
    return home, done.returncode, done.stdout, done.stderr


@pytest.fixture
def demo_home() -> Iterator[dict[str, str]]:
    home, returncode, stdout, stderr = ahead(first_demo)
    try:
        env = demo_env(str(Path(home) / "home"))
        assert returncode == 0, stdout + stderr
        assert "insurer_a" in stdout and "/docs" in stdout
        # a second run finds everything in place and changes nothing
        again = subprocess.run(pdao_cmd("demo", "--no-serve", "--scale", "3000"), env=env, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0 and "already loaded" in again.stdout, again.stdout + again.stderr
        yield env
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.ahead.with_args(first_demo)   # with_args: a lone callable would be decorated
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
        # the query worker runs in a process of its own, never in the server's (review r6: a prod
        # run's CPU time showed in every request's latency, and with it a held answer's size)
        children = subprocess.run(["ps", "-o", "args=", "--ppid", str(proc.pid)], capture_output=True,
                                  text=True).stdout
        assert "pdao worker" in children, children
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    gone = subprocess.run(["ps", "-o", "args=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    assert "pdao worker" not in gone
