"""The OpenAI-compatible HTTP server (`dzjax serve`), on Starlette and uvicorn.

Endpoints (OpenAI's request and response shapes, see `openai_api`; a model is the base, under
`server.base_name`, or a delta's name):

  GET  /health                200 while the engine runs, else 503
  GET  /v1/models             the base and every delta, as OpenAI's list
  GET  /v1/models/{model}     one of them
  POST /v1/completions        prompt: a string, token ids, or a list of either (one choice each)
  POST /v1/chat/completions   messages, through the tokenizer's chat template
  POST /tokenize              vLLM's: {prompt, add_special_tokens} or {messages} -> {count,
                              max_model_len, tokens}
  POST /detokenize            vLLM's: {tokens} -> {prompt}
  GET  /tokenizer_info        the tokenizer's class, special tokens, chat template, limits
  GET  /metrics               Prometheus' text format (see `dzjax.serving.metrics`)
  POST /v1/load_delta         {name, path}: serve another delta file, while serving; only with
                              `delta_dir` (`dzjax serve --delta-dir DIR`), from inside DIR.
                              vLLM's /v1/load_lora_adapter {lora_name, lora_path} is an alias
  POST /v1/unload_delta       {name}: stop serving it (409 while requests run on it); alias
                              /v1/unload_lora_adapter {lora_name}

With `api_key` (`--api-key`, or $DZJAX_API_KEY), every endpoint but /health and /metrics needs
`Authorization: Bearer <key>` (401 without it), as vLLM's --api-key.

A streamed answer is server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
Each choice is one engine request. The engine reports events on its own thread; a listener hands
them to the event loop (`call_soon_threadsafe`), so nothing here ever blocks the engine, and the
blocking calls into the server (tokenizing, checks) run on worker threads. A client that goes
away cancels its requests, which frees their batch slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import dzjax.jsonsafe as jsonsafe
from dzjax.errors import DzjaxError
from dzjax.serving import admin, openai_api
from dzjax.serving.openai_api import HTTPError, Reply, as_http_error, invalid
from dzjax.serving.requests import Event, RequestError, not_served
from dzjax.serving.server import RequestHandle, Server

log = logging.getLogger("dzjax.serving.http")
MAX_REQUEST_BYTES = 8 << 20  # a request body at most (the default of `make_app`)
MAX_JSON_DEPTH = 32  # nesting of a request body (OpenAI's bodies need 5)


def error_response(e: Exception) -> JSONResponse:
    """The answer to an exception raised for a request, in OpenAI's shape."""
    if isinstance(e, HTTPException):  # Starlette's own (no such route, wrong method)
        e = HTTPError(e.status_code, e.detail)
    error = as_http_error(e)
    return JSONResponse(error.payload(), status_code=error.status)


def openai_errors(endpoint):
    """Wrap an endpoint so that any exception becomes an error in OpenAI's shape: a failed
    request never takes the server down, and clients always get JSON they can parse."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as e:
            return error_response(e)

    return wrapped


async def _starlette_error(request: Request, e: HTTPException) -> Response:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape too."""
    return error_response(e)


async def json_object(request: Request, max_bytes: int) -> dict:
    """The request's JSON object body: at most `max_bytes` (413 beyond, read no further) and
    nested at most `MAX_JSON_DEPTH` levels."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    try:
        body = jsonsafe.loads(b"".join(chunks), max_depth=MAX_JSON_DEPTH)
    except jsonsafe.JSONLimitError as e:  # not JSON, not UTF-8, or nested too deeply
        raise invalid(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    return body


def _too_large(size: int, limit: int) -> HTTPError:
    return HTTPError(413, f"the request body has {'more than ' * (size > limit)}{size} bytes; at "
                     f"most {limit} are allowed", code="request_too_large")


class _Generation:
    """The engine requests of one call, one per choice, their events merged into one queue on
    the event loop."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop, *, echo: bool = False,
                 prompt_only: bool = False):
        self.server, self.loop = server, loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        self.finished: set[int] = set()
        self.prompts: list = []
        self.n = 1  # choices per prompt
        # echo: the prompt is prepended (with its log-probs); prompt_only: max_tokens 0 with echo,
        # the one token the engine generates is dropped.
        self.echo, self.prompt_only = echo, prompt_only

    def submit(self, prompts: list, model: str, sampling: dict,
               default_max_tokens: int | None, n: int = 1) -> None:
        """Queue n requests per prompt, choice i * n + j the j-th of prompt i (blocking: run it
        on a worker thread); with a seed, choice j samples with seed + j. Without a max_tokens,
        a request gets default_max_tokens (None: no cap) or the rest of the context, whichever
        is less. If one is refused, those already queued are cancelled."""
        self.prompts, self.n = [p for p in prompts for _ in range(n)], n
        try:
            for index, prompt in enumerate(self.prompts):
                ids = self.server.encode(prompt) if isinstance(prompt, str) else prompt
                options = {"seed": secrets.randbits(32), **sampling}
                if "seed" in sampling:
                    options["seed"] = (sampling["seed"] + index % n) % 2 ** 32
                if "max_tokens" not in options:
                    room = self.server.max_seq_len - len(ids)
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
        prompt = sum(len(h.request.prompt_ids) for h in self.handles[::self.n])  # once each
        completion = 0 if self.prompt_only else \
            sum(len(h.request.output_ids) for h in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def choice(self, reply: Reply, index: int, text: str, reason: str | None,
               entries: list) -> dict:
        """Choice `index` of the whole answer: its text (after the prompt, with echo) and its
        log-probs, when asked; entries: [(token id, TokenLogprob)] of its generated tokens."""
        r = self.handles[index].request
        if self.prompt_only:
            text, entries, reason = "", [], "length"
        if self.echo:
            prompt = self.prompts[index]
            text = (prompt if isinstance(prompt, str) else self.server.detokenize(r.prompt_ids)) \
                + text
            if r.prompt_logprobs is not None:
                entries = list(zip(r.prompt_ids, r.prompt_logprobs)) + entries
        wanted = r.sampling.logprobs is not None or (self.echo and r.prompt_logprobs is not None)
        out = reply.choice(index, text, reason,
                           reply.logprobs(entries, self.server.token_text) if wanted else None)
        if r.prompt_logprobs is not None and not self.echo:  # vLLM's prompt_logprobs field
            out["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": lp.logprob, "decoded_token": self.server.token_text(t)},
                 **{str(a): {"logprob": v, "decoded_token": self.server.token_text(a)}
                    for a, v in lp.top}}
                for t, lp in zip(r.prompt_ids[1:], r.prompt_logprobs[1:])]
        return out


async def _answer(generation: _Generation, reply: Reply) -> JSONResponse:
    """The whole answer, once every choice is done."""
    texts = [[] for _ in generation.handles]
    entries = [[] for _ in generation.handles]  # (token id, TokenLogprob) when asked
    reasons: list[str | None] = [None] * len(generation.handles)
    try:
        async for index, event in generation.events():
            if event.kind == "token":
                texts[index].append(event.text)
                entries[index].extend(zip(event.token_ids, event.logprobs))
            elif event.error is not None:
                raise event.error
            else:
                reasons[index] = event.finish_reason
    finally:
        generation.cancel()  # after an error, or when the client left: stop the others
    choices = [generation.choice(reply, i, "".join(t), r, e)
               for i, (t, r, e) in enumerate(zip(texts, reasons, entries))]
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


async def _chunks(generation: _Generation, reply: Reply, include_usage: bool
                  ) -> AsyncIterator[str]:
    """The answer as server-sent events: pieces of text as they come, each choice's finish
    reason, the usage if asked, then [DONE]. An engine error ends it with an error event."""
    if reply.chat:
        yield _sse(reply.body([reply.chunk_choice(i, "", first=True)
                               for i in range(len(generation.handles))], chunk=True))
    offsets = [0] * len(generation.handles)  # text_offset runs on across a choice's chunks
    async for index, event in generation.events():
        if event.kind == "token":
            if event.logprobs:  # every token's log-probs, even one whose text is held back
                logprobs = reply.logprobs(list(zip(event.token_ids, event.logprobs)),
                                          generation.server.token_text, offsets[index])
                if not reply.chat:
                    offsets[index] += sum(map(len, logprobs["tokens"]))
                yield _sse(reply.body([reply.chunk_choice(index, event.text, logprobs=logprobs)],
                                      chunk=True))
            elif event.text:
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

    def __init__(self, generation: _Generation, reply: Reply, include_usage: bool):
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

    def __init__(self, server: Server, max_request_bytes: int):
        self.server, self.max_request_bytes = server, max_request_bytes
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        if not self.server.alive:
            raise HTTPError(503, "the serving engine has stopped", kind="server_error")
        return JSONResponse({"status": "ok"})

    def _model_card(self, name: str, root: str) -> dict:
        """vLLM's card: `root` is the base's checkpoint or the delta's file, `parent` the base
        (None for the base itself), `max_model_len` the server's prompt + output limit."""
        base = name == self.server.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "dzjax",
                "root": root, "parent": None if base else self.server.base_name,
                "max_model_len": self.server.max_seq_len}

    async def list_models(self, request: Request) -> Response:
        roots = self.server.model_roots()  # never waits for the engine
        return JSONResponse({"object": "list",
                             "data": [self._model_card(n, r) for n, r in roots.items()]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        roots = self.server.model_roots()  # never waits for the engine
        if name not in roots:
            raise as_http_error(not_served(name, list(roots)))
        return JSONResponse(self._model_card(name, roots[name]))

    async def completions(self, request: Request) -> Response:
        body = await json_object(request, self.max_request_bytes)
        reply = Reply.new(chat=False, model=openai_api.model_field(body))
        return await self._generate(request, body, reply, openai_api.prompts(body),
                                    openai_api.COMPLETIONS_MAX_TOKENS)

    async def chat_completions(self, request: Request) -> Response:
        body = await json_object(request, self.max_request_bytes)
        reply = Reply.new(chat=True, model=openai_api.model_field(body))
        ids = await run_in_threadpool(self._encode_chat, openai_api.messages(body))
        return await self._generate(request, body, reply, [ids], None)

    async def tokenize(self, request: Request) -> Response:
        body = await json_object(request, self.max_request_bytes)
        if "model" in body:
            openai_api.model_field(body)  # checked, not needed: every model has the base's
        if body.get("messages") is not None:
            ids = await run_in_threadpool(self._encode_chat, openai_api.messages(body))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise invalid("prompt", "prompt must be a string (or send messages)")
            special = openai_api.typed(body, "add_special_tokens", (bool,), "a boolean")
            ids = await run_in_threadpool(self._encode_text, prompt, special is not False)
        return JSONResponse({"count": len(ids), "max_model_len": self.server.max_seq_len,
                             "tokens": ids})

    def _encode_text(self, prompt: str, special: bool) -> list[int]:
        if special:
            return self.server.encode(prompt)
        tok = self.server.base.tokenizer
        if tok is None:
            raise invalid("prompt", "this model has no tokenizer")
        return list(tok(prompt, add_special_tokens=False)["input_ids"])

    async def detokenize(self, request: Request) -> Response:
        body = await json_object(request, self.max_request_bytes)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise invalid("tokens", "tokens must be a list of token ids")
        return JSONResponse({"prompt": await run_in_threadpool(self.server.detokenize, tokens)})

    async def tokenizer_info(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.server.tokenizer_info))

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            return self.server.encode_chat(messages)
        except (RequestError, ImportError):  # no template; jinja2 missing (our fault: a 500)
            raise
        except Exception as e:  # the template refused these messages (roles out of order, ...)
            raise invalid("messages", f"the chat template failed on these messages: {e}") from e

    async def _generate(self, request: Request, body: dict, reply: Reply, prompts: list,
                        default_max_tokens: int | None) -> Response:
        logprobs, echo = openai_api.logprob_fields(body, reply.chat)
        stream = openai_api.typed(body, "stream", (bool,), "a boolean")
        if echo and stream:
            raise invalid("echo", "echo is not supported with stream: true")
        prompt_only = echo and body.get("max_tokens") == 0
        if prompt_only:  # the prompt scored, nothing generated (the engine makes one token)
            body = {**body, "max_tokens": 1, "ignore_eos": True}
        sampling = {**openai_api.sampling_fields(body, reply.chat), **logprobs}
        include_usage = openai_api.include_usage(body)
        n = openai_api.choices_per_prompt(body)
        generation = _Generation(self.server, asyncio.get_running_loop(), echo=echo,
                                 prompt_only=prompt_only)
        await run_in_threadpool(generation.submit, prompts, reply.model, sampling,
                                default_max_tokens, n)
        if stream:
            return _EventStream(generation, reply, include_usage)
        return await _unless_disconnected(request, _answer(generation, reply))


def make_app(server: Server, *, max_request_bytes: int = MAX_REQUEST_BYTES,
             api_key: str | None = None, delta_dir: str | Path | None = None):
    """The OpenAI-compatible ASGI app over a running `Server` (see the module docstring); a
    request body over `max_request_bytes` is refused with 413 before it is read further.
    api_key: required of every request but /health and /metrics (None: no key). delta_dir:
    the directory whose delta files may be loaded over HTTP (None: loading is off)."""
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    if api_key is not None and not api_key:
        raise DzjaxError("the API key must not be empty")
    if delta_dir is not None and not Path(delta_dir).is_dir():
        raise DzjaxError(f"delta directory {delta_dir}: no such directory")
    api = _Api(server, max_request_bytes)
    routes = [Route("/health", openai_errors(api.health), methods=["GET"]),
              Route("/v1/models", openai_errors(api.list_models), methods=["GET"]),
              Route("/v1/models/{model:path}", openai_errors(api.get_model), methods=["GET"]),
              Route("/v1/completions", openai_errors(api.completions), methods=["POST"]),
              Route("/v1/chat/completions", openai_errors(api.chat_completions),
                    methods=["POST"]),
              Route("/tokenize", openai_errors(api.tokenize), methods=["POST"]),
              Route("/detokenize", openai_errors(api.detokenize), methods=["POST"]),
              Route("/tokenizer_info", openai_errors(api.tokenizer_info), methods=["GET"])]
    routes += [Route(path, openai_errors(endpoint), methods=[method])
               for path, method, endpoint in admin.Admin(
                   server, delta_dir, functools.partial(json_object,
                                                        max_bytes=max_request_bytes)).routes()]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _starlette_error})
    return admin.Guard(app, api_key, server.metrics)


# -- running it --------------------------------------------------------------------------------

async def _serve_and_announce(http, server: Server) -> Exception | None:
    """Run uvicorn; print the URL once it listens (with port 0, the port it got). Stops when
    the engine stops by itself (a process of a multi-process mesh was lost); returns why."""
    task = asyncio.create_task(http.serve())
    while not http.started and not task.done():
        await asyncio.sleep(0.05)
    if http.started:
        host, port = http.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"dzjax: serving {', '.join(server.models())} at http://{host}:{port}/v1",
              flush=True)
    while not task.done():  # (the requests still open got the engine's error)
        await asyncio.wait([task], timeout=0.5)
        http.should_exit = http.should_exit or server.engine.failed is not None
    await task
    return server.engine.failed


def run_server(server: Server, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", max_request_bytes: int = MAX_REQUEST_BYTES,
               shutdown_timeout_s: float = 30.0, api_key: str | None = None,
               delta_dir: str | Path | None = None) -> None:
    """Serve `server` over HTTP until interrupted, then close it. On SIGINT or SIGTERM, uvicorn
    stops taking connections and lets running requests finish for up to `shutdown_timeout_s`;
    what still runs after that ends with an error, and the process exits."""
    import uvicorn

    # uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises that signal again: let both
    # arrive here as KeyboardInterrupt (not a kill, for SIGTERM), so that the engine is closed.
    admin.warn_if_open(host, port, api_key, delta_dir)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        app = make_app(server, max_request_bytes=max_request_bytes, api_key=api_key,
                       delta_dir=delta_dir)
        config = uvicorn.Config(app,
                                host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=shutdown_timeout_s)
        stopped = asyncio.run(_serve_and_announce(uvicorn.Server(config), server))
    except KeyboardInterrupt:
        stopped = None
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close(timeout=shutdown_timeout_s)
    if stopped is not None:
        raise DzjaxError(f"the serving engine stopped: {stopped}")


def interrupt(signum, frame) -> None:
    """A SIGTERM handler: stop as Ctrl-C does (the server is closed on the way out)."""
    raise KeyboardInterrupt
