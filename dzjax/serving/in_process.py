"""One HTTP request run through an ASGI app inside this process, without a socket: how a Ray
Serve replica answers the requests its ingress forwards with dzjax's own app (`make_app`), so
that every field, error and stream is the single server's."""

from __future__ import annotations

import asyncio
import json


async def request(app, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Run one request through an ASGI app in this process: yields ("start", status, headers)
    and ("body", bytes) messages as the app sends them."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query, "root_path": "", "headers": headers,
             "client": ("ray-serve", 0), "server": ("dzjax", 0)}
    sent: asyncio.Queue = asyncio.Queue()
    received = False
    disconnected = asyncio.Event()

    async def receive():
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    started = False
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ("start", message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield ("body", message["body"])
                if not message.get("more_body", False):
                    break
    finally:  # the caller went away (or the answer is complete): let the app stop
        disconnected.set()
        await asyncio.wait([task], timeout=30)
    if not started and task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # (dzjax's app answers its errors itself: this is a bug's)


def model_of(body: bytes) -> str:
    """The `model` field of a JSON body, "" if there is none (the replica then answers the
    error, as a single server would)."""
    try:
        value = json.loads(body).get("model") if body else None
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
