"""`pdao pii …`: personal data in text lines, for data providers checking a file before they
upload it (offline: ``sandbox.engine.pii``'s recognizers, no model, no network).

    pdao pii scan < notes.txt > findings.jsonl     # one JSON line per input line
    pdao pii mask < notes.txt > notes.masked.txt   # the same lines, personal data replaced

Both read standard input as UTF-8 (bytes that are not UTF-8 become U+FFFD instead of an error;
a UTF-8 byte-order mark at the very start is dropped) and write each output line as soon as its
input line is done, flushed, so they work in a pipe on files of any size. A line is what ends in
``\\n``; a ``\\r`` before it belongs to the line ending, not to the text.

``scan`` writes ``{"line": n, "entities": [{"type", "start", "end", "score"}]}`` per input line
(``n`` from 1; ``type`` a ``PiiKind`` value: cn_id, uscc, bank_card, phone, email, name, passport,
travel_permit, plate, address; ``start``/``end`` in characters of that line, end exclusive).
``mask`` writes the line with each finding replaced by its placeholder (``[身份证号]``, ``[手机号]``,
…, the ones ``sandbox.engine.pii.redact`` uses), keeping the line ending. ``--engine`` runs Presidio's
``AnalyzerEngine`` (and the anonymizer) instead of the fast path: the same findings, slower.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, BinaryIO

import typer

pii_app = typer.Typer(help="Personal data in text lines (stdin → stdout): scan or mask. Offline.",
                      no_args_is_help=True)

Engine = Annotated[bool, typer.Option("--engine", help="Use Presidio's AnalyzerEngine (and anonymizer) "
                                                         "instead of the fast path: same findings, slower.")]


def _lines(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(text, line ending) for each line of ``stream``, decoded as UTF-8 with replacement."""
    first = True
    for raw in stream:
        if raw.endswith(b"\r\n"):
            body, end = raw[:-2], b"\r\n"
        elif raw.endswith(b"\n"):
            body, end = raw[:-1], b"\n"
        else:
            body, end = raw, b""
        if first:
            first = False
            if body.startswith(b"\xef\xbb\xbf"):
                body = body[3:]
        yield body.decode("utf-8", errors="replace"), end


def _stream(render: Callable[[int, str, bytes], bytes]) -> None:
    """Read stdin line by line and write ``render(n, text, ending)`` for each, flushed."""
    out = typer.get_binary_stream("stdout")
    try:
        for n, (text, end) in enumerate(_lines(typer.get_binary_stream("stdin")), start=1):
            out.write(render(n, text, end))
            out.flush()
    except BrokenPipeError:  # the reader went away (`pdao pii scan < f | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        raise typer.Exit(1) from None


@pii_app.command("scan")
def scan(engine: Engine = False) -> None:
    """For each line on stdin, one JSON line on stdout: {"line": n, "entities": [{"type", "start",
    "end", "score"}]} (start/end in characters of that line)."""
    from sandbox.engine.pii import find_pii_batch  # ~1 s of imports (Presidio): only when the command runs

    def render(n: int, text: str, end: bytes) -> bytes:
        found = find_pii_batch([text], use_engine=engine)[0]
        entities = [{"type": f.kind, "start": f.start, "end": f.end, "score": round(f.score, 4)} for f in found]
        return (json.dumps({"line": n, "entities": entities}, ensure_ascii=False) + "\n").encode("utf-8")

    _stream(render)


@pii_app.command("mask")
def mask(engine: Engine = False) -> None:
    """Each line on stdin with its personal data replaced by placeholders ([身份证号], [手机号], …)."""
    from sandbox.engine.pii import redact_batch

    def render(n: int, text: str, end: bytes) -> bytes:
        return redact_batch([text], use_engine=engine)[0].encode("utf-8") + end

    _stream(render)
