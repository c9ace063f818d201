"""dzjax on Ray Serve: replicas that each hold the base and their own delta pool, with requests
routed to a replica that already has their delta (Ray Serve's model multiplexing, keyed on the
delta name). Needs the optional extra `dzjax[ray]`.

    app = dzjax.serving.ray_serve.application("base/", {"math": "math.dz"}, num_replicas=2)
    ray.serve.run(app)        # or `dzjax serve base/ --delta math=math.dz --replicas 2`

The deployment graph:
  Ingress   (one, or more behind Ray Serve's proxy): takes the OpenAI-compatible HTTP requests,
            reads the body's `model` and sends the request on with it as the multiplexed model
            id; a request whose replica died before answering is sent again (another replica
            or the restarted one), up to `max_retries` times. GET /v1/ray/stats: the routing
            counts (requests, resident hits and misses, retries, answers by replica), and
            each replica's devices and compilations as of its latest answer. It keeps the
            served deltas (`delta_registry.DeltaRegistry`; each replica follows it with a
            `delta_registry.Follower`), and answers the delta endpoints (/v1/load_delta,
            /v1/unload_delta and their LoRA aliases) with the single server's checks, when
            given a `delta_dir`. A load is read and checked on one replica; every request
            carries the registry's state, and a replica whose deltas differ brings them in
            line before answering it (a replica started later too). An unloaded delta is
            refused (404) at once; a replica frees it when the requests running on it there
            end.
  Replica   (num_replicas, or autoscaled): a `dzjax.serve` server over the base and every
            delta (registered as files: read when first asked for), and dzjax's own HTTP app,
            which answers the forwarded request as a single server would (the same fields,
            errors and streams). Its multiplexed model set has max_resident_deltas entries
            (the device slots of its pool), so Ray's routing follows what is on the device.
            With tensor_parallel=N, each replica splits the model over N devices of its own.

A hit is a request whose delta was in its replica's multiplexed set when it arrived; a miss
made the replica take the delta on (its pool then reads the file, or finds it in host memory).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
from pathlib import Path

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dzjax.errors import DzjaxError
from dzjax.serving import admin, http, in_process, openai_api
from dzjax.serving.http import MAX_REQUEST_BYTES  # a request body at most (413 beyond)
from dzjax.serving.delta_registry import DeltaRegistry, Follower
from dzjax.serving.requests import DeltaUnavailableError, ServerClosedError, not_served
from dzjax.serving.server import BASE_NAME

MAX_RETRIES = 3  # a request is sent again at most this many times when its replica dies
INGRESS_MAX_ONGOING = 10_000  # requests the ingress holds at once (Ray Serve's default: 5)
REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
_HOP_HEADERS = {b"host", b"content-length", b"transfer-encoding", b"connection"}
_GENERATION = ("/v1/completions", "/v1/chat/completions")  # the paths whose body names a model


def application(base, deltas: dict[str, str] | None = None, *, num_replicas: int | None = 2,
                autoscaling_config: dict | None = None, max_retries: int = MAX_RETRIES,
                ray_actor_options: dict | None = None, weights_dtype: str | None = None,
                max_request_bytes: int | None = None, shutdown_timeout_s: float = 30.0,
                api_key: str | None = None, delta_dir: str | Path | None = None,
                tensor_parallel: int | None = None, **options):
    """The Ray Serve application of `base` (a checkpoint directory) and `deltas` ({name: delta
    file}), for `ray.serve.run`.

    num_replicas: replicas (each a whole `dzjax.serve` server); None with autoscaling_config,
      which is passed to Ray Serve as it is (min_replicas, max_replicas,
      target_ongoing_requests, ...). ray_actor_options: each replica's resources (e.g.
      {"num_gpus": 1}; default: none reserved, but with tensor_parallel see there).
      weights_dtype: of the base's weights (default: `load_base`'s). max_request_bytes:
      `make_app`'s. shutdown_timeout_s: how long a stopping replica lets its requests finish.
      api_key: required of every request but /health and /metrics, by the ingress and by each
      replica's app (None: no key). delta_dir: the directory whose delta files may be loaded
      over HTTP (the same path on every node; None: loading is off), with the registry in the
      ingress (keep it one replica; a restarted ingress serves the deltas given here again).
      tensor_parallel: N splits each replica's model over N devices of its own; its
      ray_actor_options default to {"num_gpus": N} where the Ray cluster has GPUs (joined or
      started here if need be), else to N CPU devices of the replica's process (XLA's host
      device count). options:
      `dzjax.serve`'s, for every replica (not `mesh`: a replica builds its own).
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise DzjaxError("api_key must be a non-empty string (or None for no key)")
    if not (Path(base) / "config.json").is_file():
        raise DzjaxError(f"{base}: not a checkpoint directory (no config.json)")
    deltas = {str(k): str(Path(v).resolve()) for k, v in (deltas or {}).items()}
    missing = [f"{name}={path}" for name, path in deltas.items() if not Path(path).is_file()]
    if missing:
        raise DzjaxError(f"no such delta file: {', '.join(missing)}")
    if (num_replicas is None) == (autoscaling_config is None):
        raise DzjaxError("give num_replicas or autoscaling_config (not both)")
    if num_replicas is not None and (not isinstance(num_replicas, int) or num_replicas < 1):
        raise DzjaxError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise DzjaxError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if delta_dir is not None and not Path(delta_dir).is_dir():
        raise DzjaxError(f"delta directory {delta_dir}: no such directory")
    if "mesh" in options:
        raise DzjaxError("a mesh cannot be given to replicas (its devices are this process's): "
                         "give tensor_parallel=N, and each replica builds its own")
    actor = ray_actor_options or {"num_cpus": 0}
    if tensor_parallel is not None:
        if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise DzjaxError(f"tensor_parallel must be an integer >= 1, got {tensor_parallel!r}")
        actor = ray_actor_options or _devices(tensor_parallel)
    resident = options.get("max_resident_deltas", 8)
    scale = {"num_replicas": num_replicas} if autoscaling_config is None \
        else {"autoscaling_config": autoscaling_config}
    # Ray Serve lets a replica take 5 requests at a time unless told: a replica takes twice
    # its batch (a full batch and the next one queued in its engine), the ingress any number.
    batch = options.get("max_batch", 8)
    replica = _replica_class(resident).options(
        ray_actor_options=actor,
        max_ongoing_requests=2 * batch, graceful_shutdown_timeout_s=shutdown_timeout_s, **scale)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=INGRESS_MAX_ONGOING)
    limit = MAX_REQUEST_BYTES if max_request_bytes is None else max_request_bytes
    loading = {} if weights_dtype is None else {"dtype": weights_dtype}
    return ingress.bind(replica.bind(str(Path(base).resolve()), deltas, options, loading,
                                     {"max_request_bytes": limit, "api_key": api_key},
                                     shutdown_timeout_s, tensor_parallel),
                        max_retries, deltas, limit, api_key,
                        None if delta_dir is None else str(Path(delta_dir).resolve()),
                        options.get("base_name", BASE_NAME))


def _devices(n: int) -> dict:
    """A replica's resources for a model split over n devices: n GPUs where the Ray cluster has
    GPUs (joined, or started, here: JAX is not started in this process), else n CPU devices of
    the replica's own process."""
    import os

    import ray

    if not ray.is_initialized():
        ray.init()
    if ray.cluster_resources().get("GPU", 0) > 0:
        return {"num_cpus": 0, "num_gpus": n}
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    return {"num_cpus": 0, "runtime_env": {"env_vars": {"XLA_FLAGS": flags.strip()}}}


def run(app, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` on Ray Serve at host:port until interrupted (a local Ray cluster, or the
    one $RAY_ADDRESS names), then shut Serve down."""
    import signal
    import time

    import ray

    if not ray.is_initialized():  # (`application` may have joined it)
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="dzjax", route_prefix="/")
    # A stop, as Ctrl-C: Serve is shut down (set after ray.init, which installs its own).
    signal.signal(signal.SIGTERM, http.interrupt)
    print(f"dzjax: serving on Ray Serve at http://{host}:{port}/v1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def app_builder(args: dict):
    """For Ray's own CLI and config files: `serve run dzjax.serving.ray_serve:app_builder
    base=DIR deltas=NAME=PATH,NAME=PATH num_replicas=2` (a config file's `args` may give
    `deltas` as a mapping, `autoscaling_config` and `options` (`dzjax.serve`'s) as mappings)."""
    args = dict(args)
    known = ("base", "deltas", "num_replicas", "autoscaling_config", "options", "weights_dtype",
             "max_retries", "api_key", "delta_dir", "tensor_parallel")
    if set(args) - set(known) or "base" not in args:
        raise DzjaxError(f"app_builder takes {', '.join(known)}; got {sorted(args)}")
    deltas = args.get("deltas") or {}
    if isinstance(deltas, str):
        pairs = [item.split("=", 1) for item in deltas.split(",") if item]
        if any(len(p) != 2 for p in pairs):
            raise DzjaxError(f"deltas must be NAME=PATH,NAME=PATH, got {deltas!r}")
        deltas = dict(pairs)
    autoscaling = args.get("autoscaling_config")
    replicas = args.get("num_replicas", None if autoscaling else 2)
    return application(args["base"], deltas,
                       num_replicas=None if replicas is None else int(replicas),
                       autoscaling_config=autoscaling, weights_dtype=args.get("weights_dtype"),
                       max_retries=int(args.get("max_retries", MAX_RETRIES)),
                       api_key=args.get("api_key"), delta_dir=args.get("delta_dir"),
                       tensor_parallel=None if args.get("tensor_parallel") is None
                       else int(args["tensor_parallel"]),
                       **(args.get("options") or {}))


def _replica_class(resident: int):
    """The replica deployment, its multiplexed set as large as its device pool."""

    @serve.deployment(name="DeltaReplica")
    class DeltaReplica:
        def __init__(self, base: str, deltas: dict[str, str], options: dict, loading: dict,
                     http_options: dict, shutdown_timeout_s: float,
                     tensor_parallel: int | None = None):
            import jax
            import jax.numpy as jnp

            from dzjax.models.loading import load_base
            from dzjax.serving.server import serve as dzjax_serve

            if tensor_parallel is not None:
                from dzjax.models.sharding import make_mesh

                if len(jax.devices()) < tensor_parallel:
                    raise DzjaxError(
                        f"tensor_parallel={tensor_parallel}: this replica has "
                        f"{len(jax.devices())} {jax.default_backend()} devices (give "
                        f"ray_actor_options that reserve {tensor_parallel})")
                options = dict(options, mesh=make_mesh(tensor_parallel))
            if "dtype" in loading:
                loading = dict(loading, dtype=jnp.dtype(loading["dtype"]))
            self.server = dzjax_serve(load_base(base, **loading), deltas, **options)
            self.app = http.make_app(self.server, **http_options)
            self.id = serve.get_replica_context().replica_id.unique_id
            self.devices = options["mesh"].devices.size if "mesh" in options else 1
            self.taken_on = collections.Counter()  # multiplexed loads, by model
            self.shutdown_timeout_s = shutdown_timeout_s
            self.deltas = Follower(self.server, deltas, self.id)  # (the ingress's registry)

        @serve.multiplexed(max_num_models_per_replica=resident)
        async def take_on(self, model: str) -> str:
            """Ray's record that this replica holds `model` (its pool does the loading)."""
            self.taken_on[model] += 1
            return model

        async def check_delta(self, name: str, path: str) -> tuple | None:
            """For a load at the ingress: `Follower.check`."""
            return await self.deltas.check(name, path)

        async def forward(self, method: str, path: str, query: bytes, headers: list,
                          body: bytes, registry: tuple):
            """Answer one HTTP request with dzjax's app, the served deltas first brought in
            line with the ingress's `registry`: ("start", status, headers, hit, info), then
            the body's chunks; info: this replica's devices and compilations (`_info`)."""
            if self.deltas.due(registry):  # (shielded: a client gone midway stops no read)
                await asyncio.shield(self.deltas.sync(registry))
            model = serve.get_multiplexed_model_id()
            why = await self.deltas.unavailable(model) if model else None
            if why is not None:
                error = openai_api.as_http_error(DeltaUnavailableError(why))
                yield ("start", error.status, [(b"content-type", b"application/json"),
                                               (b"x-dzjax-replica", self.id.encode())],
                       None, self._info())
                yield ("body", json.dumps(error.payload()).encode())
                return
            hit = None
            if model and model != self.server.base_name and model in self.server.models():
                before = self.taken_on[model]
                await self.take_on(model)
                hit = self.taken_on[model] == before
            async for kind, *rest in in_process.request(self.app, method, path, query, headers,
                                                        body):
                if kind == "start":
                    status, out_headers = rest
                    yield ("start", status, out_headers + [(b"x-dzjax-replica",
                                                            self.id.encode())],
                           hit, self._info())
                else:
                    yield ("body", rest[0])

        def _info(self) -> dict:
            """The devices the model is split over, and the programs compiled so far (from
            the engine's latest snapshot: never waits)."""
            alive = self.server.alive
            return {"devices": self.devices,
                    "traces": self.server.engine.latest_stats()["traces"] if alive else None}

        def __del__(self):
            server = getattr(self, "server", None)
            if server is not None:
                server.close(timeout=self.shutdown_timeout_s)

    return DeltaReplica


@serve.deployment(name="Ingress")
class Ingress:
    """The HTTP entry: each request to a replica that has its delta, retried if it died; the
    served deltas' registry, and their endpoints."""

    def __init__(self, replicas, max_retries: int = MAX_RETRIES, deltas: dict | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, api_key: str | None = None,
                 delta_dir: str | None = None, base_name: str = BASE_NAME):
        self.replicas, self.max_retries = replicas, max_retries
        self.expected = admin.bearer(api_key)
        self.max_request_bytes = max_request_bytes
        self.registry = DeltaRegistry(base_name, deltas or {}, self._check_on_a_replica)
        self.loop = None  # (the event loop requests run on: a load's check waits on it)
        manager = admin.Admin(self.registry, delta_dir, functools.partial(
            http.json_object, max_bytes=max_request_bytes))
        self.managing = {path: http.openai_errors(endpoint)
                         for path, method, endpoint in manager.routes() if path != "/metrics"}
        self.counts = collections.Counter()
        self.by_replica = collections.Counter()
        self.replica_info: dict[str, dict] = {}  # each replica's latest `_info`

    async def __call__(self, request: Request) -> Response:
        # Checked here too (each replica's app checks it again): a request without the key is
        # not routed, so it cannot make a replica take a delta on.
        if not admin.key_given(self.expected, request.url.path, dict(request.headers.raw)):
            return admin.unauthorized()
        path = request.url.path
        if path == "/v1/ray/stats":
            return JSONResponse(self.stats())
        if path in self.managing and request.method == "POST":
            self.loop = asyncio.get_running_loop()
            return await self.managing[path](request)
        body = bytearray()
        async for piece in request.stream():  # bounded before anything is parsed
            body += piece
            if len(body) > self.max_request_bytes:
                return JSONResponse({"error": {
                    "message": f"the request body is over {self.max_request_bytes} bytes",
                    "type": "invalid_request_error", "param": None,
                    "code": "request_too_large"}}, status_code=413)
        body = bytes(body)
        if path in _GENERATION:
            model = in_process.model_of(body)
        else:  # (a model's card names it in its path; other paths name none)
            model = path.removeprefix("/v1/models/") if path.startswith("/v1/models/") else ""
        if model and model != self.registry.base_name and model not in self.registry.paths:
            # (one unloaded may still run on a replica: answered here)
            return http.error_response(not_served(model, self.registry.models()))
        if path not in _GENERATION or model not in self.registry.paths:
            model = ""  # (routed by delta: generation only) the base, or no model: any replica
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP_HEADERS]
        self.counts["requests"] += 1
        for attempt in range(self.max_retries + 1):
            try:
                return await self._forward(request, model, headers, body)
            except REPLICA_GONE:
                if attempt == self.max_retries:
                    self.counts["failed"] += 1
                    return JSONResponse({"error": {
                        "message": f"no replica answered after {attempt + 1} tries",
                        "type": "server_error", "param": None, "code": "replica_unavailable"}},
                        status_code=503)
                self.counts["retries"] += 1

    async def _forward(self, request: Request, model: str, headers: list, body: bytes):
        handle = self.replicas.options(stream=True, multiplexed_model_id=model)
        stream = handle.forward.remote(request.method, request.url.path,
                                       request.url.query.encode(), headers, body,
                                       self.registry.snapshot())
        _, status, out_headers, hit, info = await stream.__anext__()
        out = {k.decode(): v.decode() for k, v in out_headers}
        replica = out.get("x-dzjax-replica", "?")
        self.replica_info[replica] = info
        if out.get("content-type", "").startswith("text/event-stream"):
            # Retryable until the first generated token is here (a chat stream's first event
            # is its role, sent before any generation).
            first = []
            for _ in range(2 if request.url.path.endswith("/chat/completions") else 1):
                try:
                    first.append((await stream.__anext__())[1])
                except StopAsyncIteration:
                    break
            self._count(hit, replica)
            return StreamingResponse(_rest(first, stream), status_code=status, headers=out)
        content = b"".join([chunk async for _, chunk in stream])  # whole first: retryable
        self._count(hit, replica)
        if request.url.path == "/v1/models" and status == 200:
            content = self._listed(content)
            out.pop("content-length", None)
        return Response(content, status_code=status, headers=out)

    def _listed(self, content: bytes) -> bytes:
        """A replica's model list without the deltas unloaded since (still freed there)."""
        listing = json.loads(content)
        served = set(self.registry.models())
        listing["data"] = [card for card in listing["data"] if card["id"] in served]
        return json.dumps(listing).encode()

    def _check_on_a_replica(self, name: str, path: str) -> None:
        """`DeltaRegistry.check`, on a load's thread: one replica reads and checks the file."""
        future = asyncio.run_coroutine_threadsafe(self._check(name, path), self.loop)
        refused = future.result()
        if refused is not None:
            kind, why = refused
            raise ServerClosedError(why) if kind == "closed" else DzjaxError(why)

    async def _check(self, name: str, path: str) -> tuple | None:
        for attempt in range(self.max_retries + 1):
            try:
                return await self.replicas.check_delta.remote(name, path)
            except REPLICA_GONE:
                self.counts["retries"] += attempt < self.max_retries
        raise ServerClosedError(f"no replica answered after {self.max_retries + 1} tries")

    def _count(self, hit, replica: str) -> None:
        self.by_replica[replica] += 1
        if hit is not None:
            self.counts["hits" if hit else "misses"] += 1

    def stats(self) -> dict:
        c = self.counts
        routed = c["hits"] + c["misses"]
        return {"requests": c["requests"], "retries": c["retries"], "failed": c["failed"],
                "hits": c["hits"], "misses": c["misses"],
                "hit_rate": c["hits"] / routed if routed else None,
                "by_replica": dict(self.by_replica), "replicas": dict(self.replica_info)}


async def _rest(first: list[bytes], stream):
    """The rest of a stream; a replica gone midway ends it with an error event and [DONE]
    (what was sent cannot be taken back, so it is not retried)."""
    for chunk in first:
        yield chunk
    try:
        async for _, chunk in stream:
            yield chunk
    except REPLICA_GONE as e:
        error = {"error": {"message": f"the replica serving this stream stopped: {e}"[:500],
                           "type": "server_error", "param": None,
                           "code": "replica_unavailable"}}
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
