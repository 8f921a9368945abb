"""Streaming a spooled download (`sandbox.results.export.ExportFile`) to the client: a chunk at a
time, each chunk read off the event loop; however the response ends (sent, cut off by
`api/slow_clients.py` when the client stops reading, client gone, never sent) the staged file is
closed and the user's read slot given back. Without both, one tenant stalled 100 downloads of 14 MB,
each pinning its (already unlinked) staged file and an open descriptor, and nothing ever timed out.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sandbox.results.export import ExportFile

CHUNK_BYTES = 1 << 20


class SpooledDownload(StreamingResponse):
    """The response of a download route (API and console)."""

    def __init__(self, spooled: ExportFile, headers: Mapping[str, str]) -> None:
        self.spooled = spooled
        super().__init__(self._chunks(), media_type=spooled.media_type, headers=headers)
        # a response built but never sent (the request failed after the route returned) still gives
        # the slot back when it is collected
        self._finalizer = weakref.finalize(self, spooled.close)

    async def _chunks(self) -> AsyncIterator[bytes]:
        file = self.spooled.file
        assert file is not None
        while block := await anyio.to_thread.run_sync(file.read, CHUNK_BYTES):
            yield block

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finalizer()


def download_headers(spooled: ExportFile, **extra: str) -> dict[str, str]:
    """The headers every download carries: which result and export, the stamp, the size."""
    r = spooled.export
    return {"X-Pdao-Result": str(r.result_id), "X-Pdao-Export": r.export_id, "X-Pdao-Fingerprint": r.fingerprint,
            "X-Pdao-Synthetic": "true" if spooled.synthetic else "false", "Content-Length": str(spooled.size),
            "Content-Disposition": f'attachment; filename="{spooled.filename}"', **extra}
