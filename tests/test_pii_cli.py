"""`pdao pii scan` and `pdao pii mask`: in process (typer's runner) and once as the installed
command in a subprocess, reading stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdao.cli.main import app
from sandbox.engine.pii import find_pii_batch, redact_batch

CORPUS = Path(__file__).parent / "data" / "pii_corpus.jsonl"
PDAO = Path(sys.executable).parent / "pdao"

LINES = [
    "患者张伟，男，45岁，身份证号11010519491231002X，电话13812345678号，家住银川市兴庆区解放西街12号。",
    "",
    "护照号码E12345678，车牌宁A12345，邮箱zhang.wei@example.com",
    "咳嗽3天，无个人信息。",
]


def run(*args: str, input: bytes) -> bytes:
    result = CliRunner().invoke(app, ["pii", *args], input=input)
    assert result.exit_code == 0, f"pdao pii {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result.stdout_bytes


def scan(data: bytes, *opts: str) -> list[dict]:
    return [json.loads(x) for x in run("scan", *opts, input=data).decode("utf-8").splitlines()]


def test_scan_writes_one_json_line_per_input_line():
    out = scan("\n".join(LINES).encode("utf-8") + b"\n")
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert all(set(o) == {"line", "entities"} for o in out)
    expected = find_pii_batch(LINES)
    for o, text, found in zip(out, LINES, expected):
        assert [(e["type"], e["start"], e["end"], e["score"]) for e in o["entities"]] == \
            [(f.kind, f.start, f.end, f.score) for f in found]
    first = {(e["type"], LINES[0][e["start"]:e["end"]]) for e in out[0]["entities"]}
    assert first == {("name", "张伟"), ("cn_id", "11010519491231002X"), ("phone", "13812345678"),
                     ("address", "银川市兴庆区解放西街12号")}
    assert {e["type"] for e in out[2]["entities"]} == {"passport", "plate", "email"}
    assert out[1]["entities"] == [] and out[3]["entities"] == []


def test_mask_writes_the_masked_lines_with_their_endings():
    data = ("\r\n".join(LINES[:2]) + "\n" + "\n".join(LINES[2:])).encode("utf-8")  # mixed, last line unterminated
    out = run("mask", input=data)
    masked = redact_batch(LINES)
    assert out == ("\r\n".join(masked[:2]) + "\n" + "\n".join(masked[2:])).encode("utf-8")
    assert "[身份证号]" in masked[0] and "[地址]" in masked[0] and "[车牌号]" in masked[2]
    assert out.decode("utf-8").count("\n") == data.decode("utf-8").count("\n")


def test_offsets_are_characters_of_the_line_not_bytes():
    line = "电话：13812345678"
    (o,) = scan(line.encode("utf-8"))
    (e,) = o["entities"]
    assert (e["start"], e["end"]) == (3, 14) and line[e["start"]:e["end"]] == "13812345678"


def test_invalid_utf8_is_replaced_not_fatal():
    data = b"\xff\xfe\xc3 \xe6\x89 \xe5\xae\x81A12345\n\xef\xbb\xbf\n\xef\xbb\xbf\xe7\x94\xb5\xe8\xaf\x9d13812345678\n"
    out = scan(data)
    assert len(out) == 3
    (plate,) = out[0]["entities"]
    text0 = data.split(b"\n")[0].decode("utf-8", errors="replace")
    assert text0[plate["start"]:plate["end"]] == "宁A12345"
    assert out[1]["entities"] == []
    (phone,) = out[2]["entities"]
    assert (phone["start"], phone["end"]) == (3, 14)  # "\ufeff" is a character here: only line 1 drops a BOM
    masked = run("mask", input=data).decode("utf-8")
    assert masked.splitlines()[0].endswith("[车牌号]") and "\ufffd" in masked


def test_bom_at_the_start_is_dropped():
    (o,) = scan("\ufeff电话13812345678".encode("utf-8"))
    assert [(e["start"], e["end"]) for e in o["entities"]] == [(2, 13)]


def test_engine_option_gives_the_same_output_on_the_corpus():
    texts = [json.loads(x)["text"] for x in CORPUS.read_text(encoding="utf-8").splitlines()[:80]]
    data = "\n".join(texts).encode("utf-8") + b"\n"
    assert run("scan", "--engine", input=data) == run("scan", input=data)
    assert run("mask", "--engine", input=data) == run("mask", input=data)
    assert sum(len(o["entities"]) for o in scan(data)) > 80


def test_empty_input_writes_nothing():
    assert run("scan", input=b"") == b""
    assert run("mask", input=b"") == b""


def test_help_lists_both_commands():
    result = CliRunner().invoke(app, ["pii", "--help"])
    assert result.exit_code == 0 and "scan" in result.output and "mask" in result.output


def test_the_command_module_does_not_import_presidio():
    code = ("import sys, pdao.cli.pii; "
            "sys.exit(int(any(m.startswith(('sandbox.engine.pii', 'presidio')) for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ----------------------------------------------------------------------------- the installed command


@pytest.fixture(scope="module")
def pdao_bin() -> str:
    if not PDAO.exists():
        pytest.fail(f"{PDAO} is not installed (pip install -e .)")
    return str(PDAO)


def test_subprocess_scan_from_stdin(pdao_bin):
    data = "\n".join(LINES).encode("utf-8") + b"\n\xff bad \xe5\xae\x81A12345\n"
    proc = subprocess.run([pdao_bin, "pii", "scan"], input=data, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    out = [json.loads(x) for x in proc.stdout.decode("utf-8").splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5]
    assert out[:4] == scan("\n".join(LINES).encode("utf-8") + b"\n")
    assert [e["type"] for e in out[4]["entities"]] == ["plate"]


def test_subprocess_streams_line_by_line(pdao_bin):
    """An output line comes out while stdin is still open: nothing waits for the end of the input."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the command must flush itself
    proc = subprocess.Popen([pdao_bin, "pii", "mask"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    got: list[bytes] = []
    try:
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
        reader.start()
        proc.stdin.write("电话13812345678\n".encode("utf-8"))
        proc.stdin.flush()
        reader.join(timeout=60)
        assert got == ["电话[手机号]\n".encode("utf-8")], "no output line before the input ended"
        proc.stdin.write("第二行\n".encode("utf-8"))
        proc.stdin.close()
        assert proc.stdout.read() == "第二行\n".encode("utf-8")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
