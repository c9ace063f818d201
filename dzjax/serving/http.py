"""The OpenAI-compatible HTTP server (`dzjax serve`), on Starlette and uvicorn.

Endpoints (OpenAI's request and response shapes; a model is the base, under `server.base_name`,
or a delta's name):

  GET  /health                200 while the engine runs, else 503
  GET  /v1/models             the base and every delta, as OpenAI's list
  GET  /v1/models/{model}     one of them
  POST /v1/completions        prompt: a string, token ids, or a list of either (one choice each)
  POST /v1/chat/completions   messages, through the tokenizer's chat template

Both generation endpoints take max_tokens (omitted: 16 for completions, as OpenAI's; the rest of
the context for chat; chat also reads max_completion_tokens), temperature, top_p, seed (omitted:
a random one), stop (a string or a list), stream, stream_options.include_usage, and the extension
ignore_eos. n must be 1; fields that would change the output but are not implemented (logprobs,
echo, penalties, tools, ...) are refused unless neutral; other unknown fields are ignored.
A streamed answer is server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a malformed
request (naming the field) or one that does not fit the context, 404 for an unknown model.

Each choice is one engine request. The engine reports events on its own thread; a listener hands
them to the event loop (`call_soon_threadsafe`), so nothing here ever blocks the engine, and the
blocking calls into the server (tokenizing, checks) run on worker threads. A client that goes
away cancels its requests, which frees their batch slots at the engine's next step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import secrets
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dzjax.errors import DzjaxError
from dzjax.serving.engine import (Event, ModelNotFoundError, RequestError, SamplingParams,
                                  ServerClosedError)
from dzjax.serving.server import RequestHandle, Server

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("dzjax.serving.http")

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the context
# Fields of OpenAI's API that would change the output and are not implemented: refused unless
# absent, null or one of these neutral values.
_UNSUPPORTED = {"echo": (False,), "logprobs": (False,), "top_logprobs": (0,), "best_of": (1,),
                "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,),
                "logit_bias": ({},), "tools": ([],), "functions": ([],)}


# -- errors ------------------------------------------------------------------------------------

class HTTPError(Exception):
    """A request answered with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def payload(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def _invalid(param: str | None, message: str) -> HTTPError:
    return HTTPError(400, message, param=param)


def as_http_error(e: Exception) -> HTTPError:
    """The answer to an exception raised for a request: the client's fault (4xx) or ours (5xx)."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, ModelNotFoundError):
        return HTTPError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, RequestError):
        return HTTPError(400, str(e))
    if isinstance(e, ServerClosedError):  # shutting down: try again elsewhere or later
        return HTTPError(503, str(e), kind="server_error")
    if isinstance(e, HTTPException):
        return HTTPError(e.status_code, e.detail)
    log.error("request failed", exc_info=e)
    return HTTPError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


def _openai_errors(endpoint):
    """Wrap an endpoint so that any exception becomes an error in OpenAI's shape: a failed
    request never takes the server down, and clients always get JSON they can parse."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as e:
            return as_http_error(e).response()

    return wrapped


async def _starlette_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape too."""
    return as_http_error(e).response()


# -- request fields ----------------------------------------------------------------------------

async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as e:  # not JSON, or not UTF-8
        raise _invalid(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _invalid(None, "the request body must be a JSON object")
    return body


def _typed(body: dict, name: str, kinds: tuple, what: str):
    """body[name] if it is of one of `kinds` (bool only where named), None if absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _invalid(name, f"{name} must be {what}, got {json.dumps(value)[:80]}")
    return value


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "model must be a non-empty string: the base or a delta's name")
    return model


def _is_token_ids(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _prompts(body: dict) -> list[str | list[int]]:
    """The completion prompts: a string, token ids, or a non-empty list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return [prompt]
    if (isinstance(prompt, list) and prompt
            and all(isinstance(p, str) or _is_token_ids(p) for p in prompt)):
        return prompt
    raise _invalid("prompt", "prompt must be a string, a list of token ids, or a non-empty list "
                             "of strings or of token-id lists")


def _content(content, i: int) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _invalid("messages", f"messages[{i}].content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _invalid("messages", f"messages[{i}] must be an object with a string role")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    return out


def _sampling(body: dict, chat: bool) -> dict:
    """The `SamplingParams` fields a request sets (its max_tokens only if given), checked."""
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise _invalid(name, f"{name} is not supported by this server")
    n = _typed(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise _invalid("n", f"n must be 1 (one choice per prompt), got {n}")
    tokens_field = "max_completion_tokens" if chat and "max_completion_tokens" in body \
        else "max_tokens"
    stop = _typed(body, "stop", (str, list), "a string or a list of strings")
    sampling = {"max_tokens": _typed(body, tokens_field, (int,), "an integer"),
                "temperature": _typed(body, "temperature", (int, float), "a number"),
                "top_p": _typed(body, "top_p", (int, float), "a number"),
                "seed": _typed(body, "seed", (int,), "an integer"),
                "stop": [stop] if isinstance(stop, str) else stop,
                "ignore_eos": _typed(body, "ignore_eos", (bool,), "a boolean")}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    for name, value in sampling.items():  # the engine's own checks, one field at a time
        try:
            SamplingParams(**{name: tuple(value) if name == "stop" else value})
        except RequestError as e:
            if name == "max_tokens":  # the engine's name for it; say the one the client sent
                name, e = tokens_field, str(e).replace("max_tokens", tokens_field)
            raise _invalid(name, str(e)) from None
    return sampling


def _include_usage(body: dict) -> bool:
    """stream_options.include_usage: end the stream with a chunk that has the usage counts."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _invalid("stream_options", "stream_options must be an object")
    return bool(_typed(options, "include_usage", (bool,), "a boolean"))


# -- answers -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Reply:
    """What one call answers with: OpenAI's completion or chat completion, whole or in chunks."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> _Reply:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return cls(chat, model, prefix + uuid.uuid4().hex, int(time.time()))

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None = None,
                     first: bool = False) -> dict:
        """One choice's piece of a stream; a chat stream opens each choice with its role."""
        if not self.chat:
            return self.choice(index, text, finish_reason)
        delta = {"role": "assistant", "content": text} if first else \
            ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    def body(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


class _Generation:
    """The engine requests of one call, one per choice, their events merged into one queue on
    the event loop."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop):
        self.server, self.loop = server, loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self.finished: set[int] = set()

    def submit(self, prompts: list, model: str, sampling: dict,
               default_max_tokens: int | None) -> None:
        """Queue one request per prompt (blocking: run it on a worker thread). Without a
        max_tokens, a request gets default_max_tokens (None: no cap) or the rest of the context,
        whichever is less. If one is refused, those already queued are cancelled."""
        try:
            for index, prompt in enumerate(prompts):
                ids = self.server.encode(prompt) if isinstance(prompt, str) else prompt
                options = {"seed": secrets.randbits(32), **sampling}
                if "max_tokens" not in options:
                    room = self.server.engine.max_seq_len - len(ids)
                    options["max_tokens"] = max(1, room if default_max_tokens is None
                                                else min(default_max_tokens, room))
                self.handles.append(self.server.submit(
                    ids, model, listener=functools.partial(self._listen, index), **options))
        except BaseException:
            self.cancel()
            raise

    def _listen(self, index: int, event: Event) -> None:
        """Called on the engine thread: must not block."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they come, until every request is done."""
        while len(self.finished) < len(self.handles):
            index, event = await self.queue.get()
            if event.kind == "done":
                self.finished.add(index)
            yield index, event

    def cancel(self) -> None:
        """Cancel the requests still running (their client is gone): frees their slots."""
        for index, handle in enumerate(self.handles):
            if index not in self.finished:
                handle.cancel()

    def usage(self) -> dict:
        prompt = sum(len(h.request.prompt_ids) for h in self.handles)
        completion = sum(len(h.request.output_ids) for h in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


async def _answer(generation: _Generation, reply: _Reply) -> JSONResponse:
    """The whole answer, once every choice is done."""
    texts = [[] for _ in generation.handles]
    reasons: list[str | None] = [None] * len(generation.handles)
    try:
        async for index, event in generation.events():
            if event.kind == "token":
                texts[index].append(event.text)
            elif event.error is not None:
                raise event.error
            else:
                reasons[index] = event.finish_reason
    finally:
        generation.cancel()  # after an error, or when the client left: stop the others
    choices = [reply.choice(i, "".join(t), r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse(reply.body(choices, generation.usage()))


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, answer) -> Response:
    """Await the coroutine `answer` unless the client goes away first; then cancel it, which
    cancels its engine requests (their batch slots free at the next step)."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()  # no-op once finished
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if work in done:
        return work.result()
    return Response(status_code=499)  # nobody is there to read it


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _chunks(generation: _Generation, reply: _Reply, include_usage: bool
                  ) -> AsyncIterator[str]:
    """The answer as server-sent events: pieces of text as they come, each choice's finish
    reason, the usage if asked, then [DONE]. An engine error ends it with an error event."""
    if reply.chat:
        yield _sse(reply.body([reply.chunk_choice(i, "", first=True)
                               for i in range(len(generation.handles))], chunk=True))
    async for index, event in generation.events():
        if event.kind == "token":
            if event.text:
                yield _sse(reply.body([reply.chunk_choice(index, event.text)], chunk=True))
        elif event.error is not None:
            yield _sse(as_http_error(event.error).payload())
            yield _sse("[DONE]")
            return
        else:
            yield _sse(reply.body([reply.chunk_choice(index, "", event.finish_reason)],
                                  chunk=True))
    if include_usage:
        yield _sse(reply.body([], generation.usage(), chunk=True))
    yield _sse("[DONE]")


class _EventStream(StreamingResponse):
    """A streamed answer that cancels its requests however it ends: the client leaving (Starlette
    then cancels the stream, or it never starts), the server stopping, or an error."""

    def __init__(self, generation: _Generation, reply: _Reply, include_usage: bool):
        super().__init__(_chunks(generation, reply, include_usage),
                         media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


# -- the application ---------------------------------------------------------------------------

class _Api:
    """The endpoints, over one `Server`."""

    def __init__(self, server: Server):
        self.server = server
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        if not self.server.engine.alive:
            raise HTTPError(503, "the serving engine has stopped", kind="server_error")
        return JSONResponse({"status": "ok"})

    def _model_card(self, name: str) -> dict:
        base = name == self.server.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "dzjax",
                "parent": None if base else self.server.base_name}

    async def list_models(self, request: Request) -> Response:
        names = await run_in_threadpool(self.server.models)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in names]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        names = await run_in_threadpool(self.server.models)
        if name not in names:
            raise HTTPError(404, f"model {name!r} is not served; served: {names}",
                            param="model", code="model_not_found")
        return JSONResponse(self._model_card(name))

    async def completions(self, request: Request) -> Response:
        body = await _json_object(request)
        reply = _Reply.new(chat=False, model=_model(body))
        return await self._generate(request, body, reply, _prompts(body), COMPLETIONS_MAX_TOKENS)

    async def chat_completions(self, request: Request) -> Response:
        body = await _json_object(request)
        reply = _Reply.new(chat=True, model=_model(body))
        ids = await run_in_threadpool(self._encode_chat, _messages(body))
        return await self._generate(request, body, reply, [ids], None)

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            return self.server.encode_chat(messages)
        except (RequestError, ImportError):  # no template; jinja2 missing (our fault: a 500)
            raise
        except Exception as e:  # the template refused these messages (roles out of order, ...)
            raise _invalid("messages", f"the chat template failed on these messages: {e}") from e

    async def _generate(self, request: Request, body: dict, reply: _Reply, prompts: list,
                        default_max_tokens: int | None) -> Response:
        sampling = _sampling(body, reply.chat)
        stream = _typed(body, "stream", (bool,), "a boolean")
        include_usage = _include_usage(body)
        generation = _Generation(self.server, asyncio.get_running_loop())
        await run_in_threadpool(generation.submit, prompts, reply.model, sampling,
                                default_max_tokens)
        if stream:
            return _EventStream(generation, reply, include_usage)
        return await _unless_disconnected(request, _answer(generation, reply))


def make_app(server: Server) -> Starlette:
    """The OpenAI-compatible ASGI app over a running `Server` (see the module docstring)."""
    api = _Api(server)
    routes = [Route("/health", _openai_errors(api.health), methods=["GET"]),
              Route("/v1/models", _openai_errors(api.list_models), methods=["GET"]),
              Route("/v1/models/{model:path}", _openai_errors(api.get_model), methods=["GET"]),
              Route("/v1/completions", _openai_errors(api.completions), methods=["POST"]),
              Route("/v1/chat/completions", _openai_errors(api.chat_completions),
                    methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _starlette_error})


# -- the command line --------------------------------------------------------------------------

def _named_delta(text: str) -> tuple[str, Path]:
    """NAME=PATH, or a bare PATH named after its file (ft.dz.safetensors -> ft)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name.split(".")[0], text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    dtypes = ("float32", "bfloat16", "float16")
    parser.add_argument("base", type=Path, help="base HF checkpoint directory (with a tokenizer)")
    parser.add_argument("--delta", type=_named_delta, action="append", default=[],
                        metavar="NAME=PATH", help="a delta file to serve as model NAME "
                        "(repeat for more; a bare PATH is named after its file)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port")
    parser.add_argument("--base-name", default=None,
                        help="the model name of base-only requests (default: base)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="batch slots: requests decoded together (default: 8)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt + output tokens per request (default: min(context, 1024))")
    parser.add_argument("--max-resident-deltas", type=int, default=None,
                        help="deltas held on the device at once (default: 8)")
    parser.add_argument("--dtype", choices=dtypes, default=None,
                        help="activation dtype (default: float32)")
    parser.add_argument("--weights-dtype", choices=dtypes, default="bfloat16",
                        help="dtype the base weights are held in")
    parser.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                        help="split the model over the first N devices (a tensor-parallel mesh)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))


def _serve_options(args: argparse.Namespace) -> dict:
    options = {"base_name": args.base_name, "max_batch": args.max_batch,
               "max_seq_len": args.max_seq_len, "max_resident_deltas": args.max_resident_deltas,
               "dtype": args.dtype}
    if getattr(args, "tensor_parallel", None):
        from dzjax.models.sharding import make_mesh
        options["mesh"] = make_mesh(args.tensor_parallel)
    return {k: v for k, v in options.items() if v is not None}


async def _serve_and_announce(http: uvicorn.Server, server: Server) -> None:
    """Run uvicorn; print the URL once it listens (with --port 0, the port it got)."""
    task = asyncio.create_task(http.serve())
    while not http.started and not task.done():
        await asyncio.sleep(0.05)
    if http.started:
        host, port = http.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"dzjax: serving {', '.join(server.models())} at http://{host}:{port}/v1",
              flush=True)
    await task


def run(args: argparse.Namespace) -> None:
    """`dzjax serve`: load the base, start the engine, serve HTTP until interrupted (uvicorn
    shuts down gracefully: running requests finish), then stop the engine."""
    import jax.numpy as jnp
    import uvicorn

    import dzjax

    deltas = dict(args.delta)
    if len(deltas) != len(args.delta):
        raise DzjaxError("two --delta options give the same name")
    base = dzjax.load_base(args.base, dtype=jnp.dtype(args.weights_dtype))
    server = dzjax.serve(base, deltas, **_serve_options(args))
    # uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises that signal again: let both
    # arrive here as KeyboardInterrupt (not a kill, for SIGTERM), so that the engine is closed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        config = uvicorn.Config(make_app(server), host=args.host, port=args.port,
                                log_level=args.log_level)
        asyncio.run(_serve_and_announce(uvicorn.Server(config), server))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
