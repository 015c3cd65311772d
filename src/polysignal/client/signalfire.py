"""An asyncio client for Signal-Fire (docs/protocols/signal-fire.md), usable with aiortc.

```python
client = await connect("ws://127.0.0.1:4444/signal-fire")
session = await client.create_session(other_id)     # ok:false raises SignalFireError
if (await session.outcome()).kind is Outcome.ACCEPTED:
    await client.send_offer(other_id, {"type": "offer", "sdp": pc.localDescription.sdp})
    signal = await client.next_signal(other_id)          # Signal(cmd="answer", data={...})

incoming = await client.next_session()                    # on the other side
await incoming.accept()                                   # or: await incoming.reject("busy")
```

Every request waits for its ack (``{id, ok}``) and raises ``SignalFireError`` with the server's
message on ``ok:false``. A second ``ok:false`` after an ack (the relay could not be delivered)
is kept in ``Client.late_errors``. Descriptions and candidates are plain dicts in the browser's
shapes (``RTCSessionDescriptionInit``, ``RTCIceCandidateInit``), so they work with aiortc
(``RTCSessionDescription(**d)``) and cross to browsers unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import orjson

from polysignal.protocols.signalfire import SUBPROTOCOL, Cmd, MessageId, new_id

log = logging.getLogger("polysignal.client")

DEFAULT_TIMEOUT = 10.0


class SignalFireError(Exception):
    """The server refused a request (``ok:false``) or the connection failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Outcome(Enum):
    """How a session ended its pending phase."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed-out"
    CLOSED = "closed"  # our own connection went away


@dataclass(frozen=True, slots=True)
class SessionEnd:
    kind: Outcome
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Signal:
    """An ``offer``, ``answer`` or ``ice`` relayed from a peer, with its whole ``data``."""

    cmd: Cmd
    origin: str
    data: Any


@dataclass(eq=False)
class _Session:
    client: Client
    peer: str
    _end: asyncio.Future[SessionEnd] = field(init=False)

    def __post_init__(self) -> None:
        self._end = asyncio.get_running_loop().create_future()

    def _finish(self, end: SessionEnd) -> None:
        if not self._end.done():
            self._end.set_result(end)

    async def outcome(self) -> SessionEnd:
        """Wait until the session is answered, cancelled, timed out, or the client closes."""
        return await asyncio.shield(self._end)


class OutgoingSession(_Session):
    """A session this client started with ``Client.create_session``."""

    @property
    def target(self) -> str:
        return self.peer

    async def cancel(self) -> None:
        await self.client.request(Cmd.SESSION_CANCEL, self.peer)
        self._finish(SessionEnd(Outcome.CANCELLED))


class IncomingSession(_Session):
    """A ``session-start`` another client sent us; accept or reject it."""

    @property
    def origin(self) -> str:
        return self.peer

    async def accept(self) -> None:
        await self.client.request(Cmd.SESSION_ACCEPT, self.peer)
        self._finish(SessionEnd(Outcome.ACCEPTED))

    async def reject(self, reason: str | None = None) -> None:
        data = {"message": reason} if reason is not None else None
        await self.client.request(Cmd.SESSION_REJECT, self.peer, data)
        self._finish(SessionEnd(Outcome.REJECTED, reason))


class Client:
    """One Signal-Fire connection; build it with ``connect``."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        http: aiohttp.ClientSession | None,
        welcome: dict[str, Any],
        request_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        data = welcome["data"]
        self.id: str = data["id"]
        # The server's RTCConfiguration (``{"iceServers": [...]}``) or None when it sends none.
        self.configuration: dict[str, Any] | None = data.get("configuration")
        self.late_errors: list[tuple[MessageId, str]] = []
        self.request_timeout = request_timeout
        self._ws = ws
        self._http = http
        self._acks: dict[MessageId, asyncio.Future[None]] = {}
        self._answered: set[MessageId] = set()
        self._outgoing: dict[str, OutgoingSession] = {}
        self._incoming: dict[str, IncomingSession] = {}
        self._sessions: asyncio.Queue[IncomingSession] = asyncio.Queue()
        self._signals: dict[str, asyncio.Queue[Signal]] = {}
        self.closed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    # --- requests ---
    async def request(self, cmd: Cmd, target: str, data: Any = None) -> None:
        """Send one request and wait for its ack; raise SignalFireError on ``ok:false``.

        Waits at most ``request_timeout`` seconds (TimeoutError).
        """
        if self.closed.is_set():
            raise SignalFireError("connection closed")
        request_id = new_id()
        message: dict[str, Any] = {"id": request_id, "cmd": cmd.value, "target": target}
        if data is not None:
            message["data"] = data
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[request_id] = ack
        try:
            await self._ws.send_str(orjson.dumps(message).decode())
            await asyncio.wait_for(asyncio.shield(ack), self.request_timeout)
        finally:
            self._acks.pop(request_id, None)

    async def create_session(self, target: str) -> OutgoingSession:
        """Send ``session-start`` to ``target``; the session reports how it ends."""
        session = OutgoingSession(self, target)
        self._outgoing[target] = session
        try:
            await self.request(Cmd.SESSION_START, target)
        except BaseException:
            if self._outgoing.get(target) is session:
                del self._outgoing[target]
            raise
        return session

    async def next_session(self) -> IncomingSession:
        """The next incoming session request (wrap in ``asyncio.timeout`` to bound the wait)."""
        return await self._sessions.get()

    async def send_offer(self, target: str, offer: dict[str, Any]) -> None:
        await self.request(Cmd.OFFER, target, {"offer": offer})

    async def send_answer(self, target: str, answer: dict[str, Any]) -> None:
        await self.request(Cmd.ANSWER, target, {"answer": answer})

    async def send_ice(self, target: str, candidate: dict[str, Any]) -> None:
        await self.request(Cmd.ICE, target, {"candidate": candidate})

    async def next_signal(self, origin: str) -> Signal:
        """The next ``offer``/``answer``/``ice`` relayed from ``origin``, in arrival order."""
        return await self._signal_queue(origin).get()

    async def close(self) -> None:
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- incoming frames ---
    def _signal_queue(self, origin: str) -> asyncio.Queue[Signal]:
        queue = self._signals.get(origin)
        if queue is None:
            queue = self._signals[origin] = asyncio.Queue()
        return queue

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    message = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    log.warning("server sent a frame that is not JSON")
                    continue
                if isinstance(message, dict):
                    self._dispatch(message)
        finally:
            self.closed.set()
            for ack in self._acks.values():
                if not ack.done():
                    ack.set_exception(SignalFireError("connection closed"))
            for session in (*self._outgoing.values(), *self._incoming.values()):
                session._finish(SessionEnd(Outcome.CLOSED))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "ok" in message:
            self._on_reply(message)
            return
        origin = message.get("origin")
        try:
            cmd = Cmd(str(message.get("cmd")))
        except ValueError:
            log.debug("ignoring unknown cmd %r", message.get("cmd"))
            return
        if not isinstance(origin, str):
            return
        data = message.get("data")
        match cmd:
            case Cmd.SESSION_START:
                session = IncomingSession(self, origin)
                self._incoming[origin] = session
                self._sessions.put_nowait(session)
            case Cmd.SESSION_ACCEPT:
                self._end_outgoing(origin, SessionEnd(Outcome.ACCEPTED))
            case Cmd.SESSION_REJECT:
                reason = data.get("message") if isinstance(data, dict) else None
                self._end_outgoing(origin, SessionEnd(Outcome.REJECTED, reason))
            case Cmd.SESSION_CANCEL:
                self._end_incoming(origin, SessionEnd(Outcome.CANCELLED))
            case Cmd.SESSION_TIMEOUT:
                self._end_outgoing(origin, SessionEnd(Outcome.TIMED_OUT))
                self._end_incoming(origin, SessionEnd(Outcome.TIMED_OUT))
            case Cmd.OFFER | Cmd.ANSWER | Cmd.ICE:
                self._signal_queue(origin).put_nowait(Signal(cmd, origin, data))
            case Cmd.WELCOME:
                pass

    def _on_reply(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        ok = message.get("ok") is True
        data = message.get("data")
        text = data.get("message") if isinstance(data, dict) else None
        error = str(text) if text is not None else "request failed"
        ack = self._acks.get(request_id) if isinstance(request_id, str | int | float) else None
        if ack is not None and not ack.done():
            if ok:
                ack.set_result(None)
            else:
                ack.set_exception(SignalFireError(error))
        elif not ok and isinstance(request_id, str | int | float):
            # A relay that failed after its ack: a second reply (docs/protocols/signal-fire.md).
            self.late_errors.append((request_id, error))

    def _end_outgoing(self, origin: str, end: SessionEnd) -> None:
        session = self._outgoing.pop(origin, None)
        if session is not None:
            session._finish(end)

    def _end_incoming(self, origin: str, end: SessionEnd) -> None:
        session = self._incoming.pop(origin, None)
        if session is not None:
            session._finish(end)


async def connect(
    url: str,
    *,
    subprotocol: str | None = SUBPROTOCOL,
    request_timeout: float = DEFAULT_TIMEOUT,
    session: aiohttp.ClientSession | None = None,
) -> Client:
    """Open a connection and wait for ``welcome``; the client then knows its ``id``.

    With ``subprotocol`` set (the default ``Signal-Fire@3``), a server that does not echo it is
    refused, as the published client does. Pass ``None`` to offer none (the server's
    ``/signal-fire`` path accepts that). ``request_timeout`` bounds the handshake and each
    request's wait for its ack.
    """
    own = session is None
    http = session if session is not None else aiohttp.ClientSession()
    try:
        protocols = (subprotocol,) if subprotocol else ()
        ws = await http.ws_connect(
            url, protocols=protocols, timeout=aiohttp.ClientWSTimeout(request_timeout)
        )
        if subprotocol and ws.protocol != subprotocol:
            await ws.close(code=1002, message=b"subprotocol not echoed")
            raise SignalFireError(f"server did not accept subprotocol {subprotocol}")
        msg = await ws.receive(timeout=request_timeout)
        welcome: Any = None
        if msg.type is aiohttp.WSMsgType.TEXT:
            with contextlib.suppress(orjson.JSONDecodeError):
                welcome = orjson.loads(msg.data)
        if (
            not isinstance(welcome, dict)
            or welcome.get("cmd") != Cmd.WELCOME
            or not isinstance(welcome.get("data"), dict)
            or not isinstance(welcome["data"].get("id"), str)
        ):
            await ws.close(code=1008, message=b"expected welcome")
            raise SignalFireError("the server's first frame was not a welcome")
        return Client(ws, http if own else None, welcome, request_timeout)
    except BaseException:
        if own:
            await http.close()
        raise
