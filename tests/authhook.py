"""A connect webhook for the auth tests, run as its own process on loopback:
``python tests/authhook.py PORT``. It prints ``ready`` once listening.

It answers by the token it is sent:

* ``allow-<sub>``: ``{"allow": true, "sub": "<sub>"}`` (and ``"topics": ["open-*"]`` for
  ``allow-<sub>-limited``);
* ``deny``: ``{"allow": false}``; ``status-<n>``: status n with an allow body;
* ``slow``: waits 30 s first (longer than any AUTH_WEBHOOK_TIMEOUT of the tests);
* ``garbage``: a body that is not JSON.

``GET /asked`` gives the questions received so far, as a JSON list.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

asked: list[dict[str, object]] = []


async def hook(request: web.Request) -> web.Response:
    question = await request.json()
    asked.append(question)
    token = str(question.get("token"))
    if token == "slow":
        await asyncio.sleep(30)
    if token == "garbage":
        return web.Response(text="not json")
    if token.startswith("status-"):
        return web.json_response({"allow": True, "sub": "x"}, status=int(token[7:]))
    if token.startswith("allow-"):
        sub = token[6:]
        answer: dict[str, object] = {"allow": True, "sub": sub}
        if sub.endswith("-limited"):
            answer["topics"] = ["open-*"]
        return web.json_response(answer)
    return web.json_response({"allow": False})


async def questions(request: web.Request) -> web.Response:
    return web.json_response(asked)


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/asked", questions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
