"""ReadAhead: the one reader of an ASGI server's ``receive``, with a bounded read-ahead buffer."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, final

import anyio
import anyio.lowlevel

from ._http import Message, Receive

__all__ = ["ReadAhead"]

_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}
_MAX_BUFFERED_MESSAGES = 16


@final
class ReadAhead:
    """The one reader of the server's ``receive``, with a bounded read-ahead buffer.

    The watcher reads ahead of the application (:meth:`fill`) up to ``max_bytes`` of body or
    ``max_messages`` messages, so that a disconnect is seen at once; the application takes the
    messages in order (:meth:`receive`). Only one read of the server is in progress at a time.

    Args:
        receive: the server's ``receive``.
        on_disconnect: called (once per ``http.disconnect``) when the server reports one.
        max_bytes: request-body bytes that may be read ahead of the application.
        max_messages: messages that may be read ahead of the application.
    """

    __slots__ = (
        "_buffer",
        "_bytes",
        "_changed",
        "_error",
        "_max_bytes",
        "_max_messages",
        "_on_disconnect",
        "_reading",
        "_receive",
        "body_done",
        "disconnected",
    )

    def __init__(
        self,
        receive: Receive,
        on_disconnect: Callable[[], object],
        *,
        max_bytes: int,
        max_messages: int = _MAX_BUFFERED_MESSAGES,
    ) -> None:
        self._receive = receive
        self._on_disconnect = on_disconnect
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._buffer: deque[Message] = deque()
        self._bytes = 0
        self._reading = False
        self._changed: anyio.Event | None = None
        self._error: Exception | None = None
        #: The last request-body message has been read from the server.
        self.body_done = False
        #: The server reported ``http.disconnect`` (or the guard learned it otherwise).
        self.disconnected = False

    @property
    def full(self) -> bool:
        """Whether the read-ahead limit is reached (never once the body is read)."""
        return not self.body_done and (
            self._bytes >= self._max_bytes or len(self._buffer) >= self._max_messages
        )

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def _wait_changed(self) -> None:
        changed = self._changed
        if changed is None:
            changed = self._changed = anyio.Event()
        await changed.wait()

    async def _pump(self) -> None:
        """Read one message from the server and file it; only one caller at a time."""
        self._reading = True
        try:
            message = await self._receive()
        finally:
            self._reading = False
            self._notify()
        if message["type"] == "http.disconnect":
            self.disconnected = True
            self._on_disconnect()
        else:
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.body_done = True
            self._buffer.append(message)
            self._bytes += len(message.get("body", b""))

    async def fill(self) -> None:
        """Read ahead until the server reports a disconnect (the watcher's loop).

        An error from the server's ``receive`` is kept for the application's next
        :meth:`receive`.
        """
        try:
            while not self.disconnected:
                if self._reading or self.full:
                    await self._wait_changed()
                else:
                    await self._pump()
        except Exception as exc:
            self._error = exc
            self._notify()

    async def receive(self) -> Message:
        """The application's ``receive``: the next message, in order."""
        while True:
            if self._buffer:
                # A receive() in a cancelled scope (Starlette's is_disconnected() does that)
                # must not take a read-ahead body message with it: raise before popping.
                await anyio.lowlevel.checkpoint_if_cancelled()
                message = self._buffer.popleft()
                self._bytes -= len(message.get("body", b""))
                self._notify()
                return message
            if self.disconnected:
                return dict(_DISCONNECT)
            if self._error is not None:
                raise self._error
            if self._reading:
                await self._wait_changed()
            else:
                await self._pump()
