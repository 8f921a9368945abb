"""Receiving a data file, streamed straight into the domain's staging folder.

The body is read only here, inside a route, i.e. after the one authentication and authorization
path has run: an unauthenticated or unauthorized upload is never read, and no part of a file ever
lands outside PDAO_HOME (framework form parsing would spool it to the system temp folder first).
Two ways to send a file: the raw body (`Content-Type: application/octet-stream`, `text/csv`, …),
or `multipart/form-data` with one part named `file` (and small text fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pdao.kernel.errors import PdaoError, bad_request, too_large

MAX_FIELD_BYTES = 4096
RAW_TYPES = {b"", b"application/octet-stream", b"text/csv", b"application/csv", b"text/plain",
             b"application/vnd.apache.parquet", b"application/parquet", b"application/x-parquet"}
MAX_PARTS = 8


@dataclass
class Received:
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


class _Sink:
    """Collects one file part into `dest` and small text fields in memory, with limits."""

    def __init__(self, dest: Path, limit: int) -> None:
        self.dest, self.limit = dest, limit
        self.out = dest.open("wb")
        self.received = Received()
        self.parts = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._buffer = bytearray()
        self.files = 0

    # python-multipart callbacks ------------------------------------------------
    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_request("bad_multipart", "Too many parts in the form.", "表单部分过多。")
        self._headers, self._name, self._is_file, self._buffer = {}, None, False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._name == "file"
        if self._is_file:
            self.files += 1
            if self.files > 1:
                raise bad_request("bad_multipart", "Send exactly one file.", "只能上传一个文件。")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.write(chunk)
        else:
            self._buffer += chunk
            if len(self._buffer) > MAX_FIELD_BYTES:
                raise bad_request("bad_multipart", f"Form field '{self._name}' is too long.",
                                  f"表单字段 {self._name} 过长。")

    def on_part_end(self) -> None:
        if not self._is_file and self._name:
            self.received.fields[self._name] = self._buffer.decode("utf-8", "replace")

    # ---------------------------------------------------------------------------
    def write(self, chunk: bytes) -> None:
        self.received.size += len(chunk)
        if self.received.size > self.limit:
            raise too_large(self.limit)
        self.out.write(chunk)


async def receive_file(request: Request, dest: Path, limit: int) -> Received:
    """Stream the request's file into `dest` (created). Raises 400/413; the caller removes `dest`."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    sink = _Sink(dest, limit)
    try:
        if ctype == b"multipart/form-data":
            boundary = params.get(b"boundary")
            if not boundary:
                raise bad_request("bad_multipart", "The multipart body has no boundary.", "multipart 请求缺少边界。")
            parser = MultipartParser(boundary, {
                "on_part_begin": sink.on_part_begin, "on_header_field": sink.on_header_field,
                "on_header_value": sink.on_header_value, "on_header_end": sink.on_header_end,
                "on_headers_finished": sink.on_headers_finished, "on_part_data": sink.on_part_data,
                "on_part_end": sink.on_part_end,
            })
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                parser.finalize()
            except MultipartParseError:
                raise bad_request("bad_multipart", "The multipart body is malformed.", "multipart 请求格式错误。") from None
            if sink.files == 0:
                raise bad_request("no_file", "The form has no part named 'file'.", "表单中没有名为 file 的文件。")
        elif ctype in RAW_TYPES:
            async for chunk in request.stream():
                sink.write(chunk)
        elif ctype == b"application/x-www-form-urlencoded":
            raise bad_request("no_file", "No file: send it as the multipart part 'file' or as the raw body.",
                              "没有文件：请以 multipart 的 file 部分或原始请求体发送。")
        else:
            raise PdaoError(415, "unsupported_media_type", f"Cannot take a file sent as {ctype.decode(errors='replace')}.",
                            f"不支持以 {ctype.decode(errors='replace')} 发送的文件。")
    finally:
        sink.out.close()
    if sink.received.size == 0:
        raise bad_request("empty_file", "The file is empty.", "文件为空。")
    return sink.received
