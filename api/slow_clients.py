"""A client that stops reading an answer is cut off: every piece of an HTTP answer must be taken by
the client within `SEND_TIMEOUT_SECONDS`, else the connection is aborted — not closed, which waits
to flush what the client never reads. (Review r6: downloads that timed out still held their
connections and ~2.8 MB of kernel buffer each until the client chose to close them.)

ASGI has no way to abort a connection, so the application wraps the server's own `send` before
anything else sees it (`api.app.PdaoApp`) and reaches the transport behind it when the server is
uvicorn (`pdao serve`); elsewhere a stalled answer ends with an error.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

import anyio
from starlette.types import Message, Scope, Send

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 30.0     # one chunk (a download's is 1 MiB) must be taken within this: ≥ ~35 KB/s


def _transport(send: Send) -> Any:
    """uvicorn's transport behind its `send` (a bound method of its request cycle), if that is it."""
    cycle = getattr(send, "__self__", None)
    return getattr(cycle, "transport", None)


def _reset(transport: Any) -> None:
    """Abort the connection with a reset: the bytes the client never took are dropped by the kernel
    too (a plain close leaves them queued, the socket lingering, until the client reads or gives up)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def send_in_time(scope: Scope, send: Send) -> Send:
    """The server's `send`, wrapped: a message not taken within `SEND_TIMEOUT_SECONDS` aborts the
    connection (uvicorn's transport, when `send` is uvicorn's own: the app calls this first thing)."""
    transport = _transport(send)

    async def timed(message: Message) -> None:
        try:
            with anyio.fail_after(SEND_TIMEOUT_SECONDS):
                await send(message)
        except TimeoutError:
            log.warning("%s %s: the client took no data for %.0f s; connection aborted",
                        scope.get("method"), scope.get("path"), SEND_TIMEOUT_SECONDS)
            if transport is not None:
                _reset(transport)
            raise OSError("the client stopped reading") from None

    return timed
