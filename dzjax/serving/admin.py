"""The server's operator endpoints: Prometheus metrics, deltas loaded and unloaded over HTTP
(only from the directory the operator names), and the API key (see `dzjax.serving.http`)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dzjax.errors import DzjaxError
from dzjax.serving import metrics, openai_api
from dzjax.serving.openai_api import HTTPError, invalid
from dzjax.serving.requests import ModelNotFoundError, RequestError, ServerClosedError

log = logging.getLogger("dzjax.serving.http")


class Admin:
    """`/metrics` and the delta endpoints over one `Server`; read_json(request) reads a body."""

    def __init__(self, server, delta_dir: str | Path | None, read_json):
        self.server, self.read_json = server, read_json
        self.delta_dir = None if delta_dir is None else Path(delta_dir).resolve()
        # Loads run one at a time: each reads and checks a whole file on the host, and many at
        # once would hold that many files in memory. Later ones wait their turn.
        self._loading = asyncio.Lock()

    def routes(self) -> list[tuple]:
        """(path, method, endpoint): vLLM's LoRA endpoints are aliases of the delta ones."""
        lora = (lambda r: self.load_delta(r, names=("lora_name", "lora_path")),
                lambda r: self.unload_delta(r, name_field="lora_name"))
        return [("/metrics", "GET", self.metrics),
                ("/v1/load_delta", "POST", self.load_delta),
                ("/v1/unload_delta", "POST", self.unload_delta),
                ("/v1/load_lora_adapter", "POST", lora[0]),
                ("/v1/unload_lora_adapter", "POST", lora[1])]

    async def metrics(self, request: Request) -> Response:
        text = self.server.metrics_text()  # from the engine's latest snapshot: never waits
        return Response(text, media_type=metrics.CONTENT_TYPE)

    def _managed(self) -> Path:
        if self.delta_dir is None:
            raise HTTPError(403, "loading and unloading deltas over HTTP is off: start the "
                            "server with --delta-dir DIR (make_app(..., delta_dir=DIR)) to "
                            "allow it for delta files in DIR", code="delta_management_off")
        return self.delta_dir

    async def load_delta(self, request: Request, names=("name", "path")) -> Response:
        directory = self._managed()
        body = await self.read_json(request)
        name_field, path_field = names
        name = openai_api.typed(body, name_field, (str,), "a string")
        where = openai_api.typed(body, path_field, (str,), "a string")
        if not name:
            raise invalid(name_field, f"{name_field} must name the delta to serve")
        if not where:
            raise invalid(path_field, f"{path_field} must be a delta file inside the delta "
                          f"directory")
        if "\0" in where:
            raise invalid(path_field, f"{path_field} must not contain a NUL byte")
        try:
            path = (directory / where).resolve()  # (an absolute path stays itself; links too)
            inside = path.is_relative_to(directory)
            exists = inside and path.is_file()
        except OSError as e:  # a name too long, a directory it may not read
            raise invalid(path_field, f"{path_field} {where[:200]!r}: {e.strerror}") from None
        if not inside:
            raise HTTPError(403, f"{path_field} {where!r} is not inside the delta directory "
                            f"{directory}", param=path_field, code="outside_delta_dir")
        if not exists:
            raise HTTPError(404, f"{path_field} {where!r}: no such delta file in {directory}",
                            param=path_field, code="file_not_found")
        taken = lambda: invalid(name_field, f"a model named {name!r} is already served "
                                f"(unload it first)")
        async with self._loading:
            if name in self.server.models():  # (checked in turn: one loaded meanwhile counts)
                raise taken()
            try:
                await run_in_threadpool(self.server.add_delta, name, path)
            except (RequestError, ServerClosedError):
                raise  # answered by their kind (400, 503)
            except DzjaxError as e:
                if name in self.server.models():  # another load of this name won the race
                    raise taken() from None
                raise invalid(path_field, str(e)) from None  # not a delta of this base, damaged
        log.info("delta %r loaded from %s", name, path)
        return JSONResponse({"id": name, "object": "model", "status": "loaded",
                             "root": str(path)})

    async def unload_delta(self, request: Request, name_field="name") -> Response:
        self._managed()
        body = await self.read_json(request)
        name = openai_api.typed(body, name_field, (str,), "a string")
        if not name:
            raise invalid(name_field, f"{name_field} must name a served delta")
        if name == self.server.base_name:
            raise invalid(name_field, f"{name!r} is the base model: it cannot be unloaded")
        missing = lambda: HTTPError(404, f"no delta named {name!r} is served",
                                    param=name_field, code="model_not_found")
        if name not in self.server.models():
            raise missing()
        try:
            await run_in_threadpool(self.server.remove_delta, name)
        except ModelNotFoundError:  # unloaded meanwhile by another request
            raise missing() from None
        except ServerClosedError:
            raise  # 503
        except DzjaxError as e:  # requests run on it
            raise HTTPError(409, str(e), param=name_field, code="delta_in_use") from None
        log.info("delta %r unloaded", name)
        return JSONResponse({"id": name, "object": "model", "status": "unloaded"})


def warn_if_open(host: str, port: int, api_key: str | None, delta_dir) -> None:
    """Log a warning when anyone who reaches host:port could load deltas (no API key)."""
    if delta_dir is not None and api_key is None and not _loopback(host):
        log.warning("deltas can be loaded over HTTP (--delta-dir) by anyone who reaches %s:%d: "
                    "set --api-key (or $DZJAX_API_KEY), or listen on 127.0.0.1", host, port)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


OPEN_PATHS = ("/health", "/metrics")  # answered without the API key (probes, scrapers)


class Guard:
    """ASGI middleware: the API key (401 without it), and each response counted by route and
    status (dzjax_http_responses_total)."""

    def __init__(self, app, api_key: str | None, recorder: metrics.Metrics):
        self.app, self.recorder = app, recorder
        self.expected = bearer(api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope["path"])

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.recorder.http_response(route, message["status"])
            await send(message)

        if not key_given(self.expected, scope["path"], dict(scope["headers"])):
            return await unauthorized()(scope, receive, counted)
        await self.app(scope, receive, counted)


def bearer(api_key: str | None) -> bytes | None:
    """The Authorization header value `key_given` expects for `api_key` (None: no key)."""
    return None if api_key is None else f"Bearer {api_key}".encode()


def key_given(expected: bytes | None, path: str, headers: dict) -> bool:
    """Whether a request to `path` with raw `headers` may pass: no key is set, the path is
    open, or its Authorization header is `expected` (compared in constant time)."""
    if expected is None or path in OPEN_PATHS:
        return True
    return hmac.compare_digest(headers.get(b"authorization", b""), expected)


def unauthorized() -> JSONResponse:
    """The 401 answer to a request without the API key."""
    error = HTTPError(401, "a valid API key is required: send the header "
                      "'Authorization: Bearer <key>'", code="invalid_api_key")
    return JSONResponse(error.payload(), status_code=401, headers={"www-authenticate": "Bearer"})


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
           "/tokenize", "/detokenize", "/tokenizer_info", "/v1/load_delta", "/v1/unload_delta",
           "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def route_label(path: str) -> str:
    """A bounded label of a request path: its route (a model's card as one), else "other"."""
    if path in _ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
