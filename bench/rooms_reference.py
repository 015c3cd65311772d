"""The reference for the rooms scenarios (S17-S19): a hand-written python-socketio server doing
the room relay a user would write instead of polysignal's rooms protocol.

python-socketio's ``AsyncServer`` on aiohttp, its in-memory manager, no authentication, three
events:

* connect: accepted, no ``auth`` checked;
* ``join`` ``{room}``: the socket enters ``room``; the ack is ``{room, peers}`` (the other members);
* ``relay`` ``{room, ...}``: if the sender is in ``room``, the data goes unchanged, as event
  ``relay``, to the room's other members (else ``relay-error`` to the sender).

Leaving is disconnecting (python-socketio leaves the rooms). ``GET /healthz`` answers 200.
uvloop's event loop when it is installed, as polysignal uses it, so both run on the same loop.

    PORT=8080 python rooms_reference.py
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
app = web.Application()
sio.attach(app)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
    return True


@sio.event
async def join(sid: str, data: Any) -> Any:
    room = data.get("room") if isinstance(data, dict) else None
    if not isinstance(room, str) or not room:
        return {"error": "room is required"}
    await sio.enter_room(sid, room)
    peers = [peer for peer, _ in sio.manager.get_participants("/", room) if peer != sid]
    return {"room": room, "peers": peers}


@sio.event
async def relay(sid: str, data: Any) -> None:
    room = data.get("room") if isinstance(data, dict) else None
    if not isinstance(room, str) or room not in sio.rooms(sid):
        await sio.emit("relay-error", {"message": "not in this room"}, to=sid)
        return
    await sio.emit("relay", data, room=room, skip_sid=sid)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


app.router.add_get("/healthz", healthz)


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(port))


async def serve(port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"python-socketio rooms reference listening on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
