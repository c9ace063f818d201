"""`dzjax.serve`: the notebook API over the serving engine.

    server = dzjax.serve(base, {"prose": delta, "code": "code.dz.safetensors"}, max_batch=16)
    texts = server.generate(["Once upon", "def main("], model=["prose", "code"], max_tokens=32)
    for piece in server.stream("Once upon", model="prose"):
        print(piece, end="")
    server.stats()
    server.close()          # or: with dzjax.serve(...) as server: ...
"""

from __future__ import annotations

import dataclasses
import queue
from typing import Iterator, Sequence

import jax.numpy as jnp

from dzjax.errors import DzjaxError
from dzjax.models.loading import Base, load_base
from dzjax.models.text import check_text, encode_prompt
from dzjax.serving import multihost
from dzjax.serving.engine import Engine, EngineConfig
from dzjax.serving.metrics import Metrics
from dzjax.serving.requests import (Event, Request, RequestError, SamplingParams,
                                    ServerClosedError, TokenLogprob, not_served)

BASE_NAME = "base"  # the model name of base-only requests, unless given


@dataclasses.dataclass(frozen=True)
class Completion:
    """One finished request: its output and what was measured."""

    text: str | None  # None without a tokenizer
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled"
    model: str
    timings: dict  # seconds from arrival: queued, first_token, total
    logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob per token, if asked
    prompt_logprobs: list | None = None  # None (the first token), then TokenLogprob, if asked


class RequestHandle:
    """A submitted request: iterate it for its events as they come, or wait for `result()`."""

    def __init__(self, server: Server, model_name: str):
        self._server, self.model = server, model_name
        self._events: queue.Queue[Event] = queue.Queue()
        self.request: Request | None = None
        self._done: Event | None = None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come; `timeout`: seconds to wait for each (queue.Empty after)."""
        while self._done is None:
            waited = 0.0
            while True:
                try:
                    event = self._events.get(timeout=0.5)
                    break
                except queue.Empty:
                    waited += 0.5
                    if not self._server.engine.alive and self._events.empty():
                        raise ServerClosedError("the serving engine has stopped") from None
                    if timeout is not None and waited >= timeout:
                        raise
            if event.kind == "done":
                self._done = event
            yield event

    def __iter__(self) -> Iterator[str | int]:
        """The output as it is generated: text pieces, or token ids without a tokenizer."""
        with_text = self._server.base.tokenizer is not None
        for event in self.events():
            if event.kind == "token":
                if with_text:
                    if event.text:
                        yield event.text
                else:
                    yield from event.token_ids
        self._raise_if_failed()

    def result(self, timeout: float | None = None) -> Completion:
        for _ in self.events(timeout):
            pass
        self._raise_if_failed()
        r = self.request
        return Completion(r.text if self._server.base.tokenizer is not None else None,
                          list(r.output_ids), len(r.prompt_ids), r.finish_reason, self.model,
                          r.timings, list(r.logprobs), r.prompt_logprobs)

    def cancel(self) -> None:
        self._server.engine.cancel(self.request)

    def _raise_if_failed(self) -> None:
        if self._done.error is not None:
            raise self._done.error


class Server:
    """Serves a base model and many deltas with continuous batching (see `dzjax.serve`)."""

    def __init__(self, base: Base, deltas: dict | None = None, *, base_name: str = BASE_NAME,
                 role: multihost.Leader | None = None, **options):
        self.base_name = base_name
        self.metrics = Metrics(base_name)  # Prometheus (`metrics_text`, HTTP `/metrics`)
        self.engine = Engine(base, engine_config(options), self.metrics, role)
        self.metrics.watch(self.engine.latest_stats)  # a scrape never waits for a step
        self.base = self.engine.base  # without weights: the engine holds its own params
        try:
            for name, source in (deltas or {}).items():
                self.add_delta(name, source)
        except Exception as e:
            if self.engine.multihost is not None:
                self.engine.multihost.fail(f"process 0 could not start serving: {e}")
            self.engine.close()
            raise

    # -- models --------------------------------------------------------------------------------

    def add_delta(self, name: str, delta) -> None:
        """Serve another delta (a `dzjax.Delta` or a file path) under `name`, while running."""
        self._not_base(name)
        self.engine.add_delta(name, delta)

    def check_delta(self, name: str, delta) -> None:
        """Read and check a delta (a `dzjax.Delta` or a file path) as `add_delta` would,
        without serving it: raises a DzjaxError saying what does not fit."""
        self._not_base(name)
        self.engine.pool.validate(name, delta)

    def _not_base(self, name: str) -> None:
        if name == self.base_name:
            raise DzjaxError(f"{name!r} names the base model")

    def remove_delta(self, name: str) -> None:
        """Stop serving a delta; refused while requests run on it, queued ones fail."""
        self.engine.remove_delta(name)

    def models(self) -> list[str]:
        return [self.base_name] + self.engine.delta_names()

    def model_roots(self) -> dict[str, str]:
        """{model: where it comes from}: the base's checkpoint directory, each delta's file (a
        delta given as an object: its name), the base first."""
        base = str(self.base.path) if getattr(self.base, "path", None) else self.base_name
        return {self.base_name: base, **{name: str(path) if path else name
                                         for name, path in self.engine.delta_paths().items()}}

    @property
    def max_seq_len(self) -> int:
        """Prompt + output tokens a request may have at most."""
        return self.engine.max_seq_len

    @property
    def alive(self) -> bool:
        """Whether the engine runs (False once closed, or if it stopped)."""
        return self.engine.alive

    def _delta_name(self, model: str | None) -> str | None:
        if model is None or model == self.base_name:
            return None
        if not isinstance(model, str):
            raise RequestError(f"model must be a string, got {type(model).__name__}")
        if model not in self.engine.delta_names():
            raise not_served(model, self.models())
        return model

    # -- requests ------------------------------------------------------------------------------

    def encode(self, prompt) -> list[int]:
        """A prompt (text, or token ids) as token ids, as `dzjax.generate` encodes it."""
        try:
            return encode_prompt(self.base, prompt, max_bytes=self.engine.max_prompt_bytes,
                                 max_tokens=self.engine.max_seq_len)
        except DzjaxError as e:
            raise RequestError(str(e), param="prompt") from None

    def token_text(self, token: int) -> str:
        """One token's text (vLLM's "token_id:N" without a tokenizer)."""
        tok = self.base.tokenizer
        return f"token_id:{token}" if tok is None else tok.decode([token])

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids as text (special tokens kept); a RequestError without a tokenizer or for ids
        outside the vocabulary."""
        tok = self.base.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer", param="tokens")
        vocab = self.base.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"tokens must be token ids in [0, {vocab})", param="tokens")
        return tok.decode(list(ids))

    def tokenizer_info(self) -> dict:
        """What a client needs to tokenize as this server does (vLLM's /tokenizer_info)."""
        tok = self.base.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer")
        special = {name: getattr(tok, name, None) for name in
                   ("bos_token", "eos_token", "pad_token", "unk_token")}
        return {"tokenizer_class": type(tok).__name__, "model_max_length": self.max_seq_len,
                "vocab_size": self.base.config.vocab_size,
                "chat_template": getattr(tok, "chat_template", None),
                "add_bos_token": getattr(tok, "add_bos_token", None),
                **{k: (v if v is None or isinstance(v, str) else str(v))
                   for k, v in special.items()}}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Chat messages through the tokenizer's chat template, ready for the assistant's turn
        (their text within `max_prompt_bytes`, checked before the template runs)."""
        tok = self.base.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise RequestError("this model has no chat template; use completions")
        try:
            for i, m in enumerate(messages):
                check_text(m.get("content") or "", f"messages[{i}].content")
            check_text("".join(m.get("content") or "" for m in messages), "messages",
                       self.engine.max_prompt_bytes)
        except DzjaxError as e:
            raise RequestError(str(e), param="messages") from None
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompt, model: str | None = None, *, listener=None,
               **sampling) -> RequestHandle:
        """Queue one request; returns its handle at once. `sampling`: `SamplingParams` fields.

        listener: optional callable(Event), called on the engine thread instead of queueing the
        events for the handle (for event loops: it must not block).
        """
        handle = RequestHandle(self, model or self.base_name)
        ids = self.encode(prompt)
        bias = sampling.get("logit_bias")
        if isinstance(bias, (dict, list)):  # {token id: bias}, as OpenAI's, or its items
            items = bias.items() if isinstance(bias, dict) else bias
            sampling = dict(sampling, logit_bias=tuple(
                tuple(e) if isinstance(e, (tuple, list)) else e for e in items))
        params = SamplingParams(**{k: tuple(v) if k in ("stop", "stop_token_ids") else v
                                   for k, v in sampling.items() if v is not None})
        handle.request = self.engine.submit(ids, self._delta_name(model), params,
                                            listener or handle._events.put)
        return handle

    def generate(self, prompts: str | Sequence, model: str | Sequence[str | None] | None = None,
                 *, max_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: Sequence[str] = (), ignore_eos: bool = False,
                 logprobs: int | None = None, top_k: int = 0, min_p: float = 0.0,
                 min_tokens: int = 0, stop_token_ids: Sequence[int] = (),
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                 details: bool = False) -> list:
        """Generate for every prompt, all batched together; greedy by default.

        Args:
          prompts: a text, a list of texts, or a list of token-id lists.
          model: the delta for all prompts, or one per prompt; None or the base name = base only.
          max_tokens, temperature, top_p, stop, ignore_eos: as in `SamplingParams`.
          seed: prompt i samples with seed + i.
          logprobs: None, or each generated token's log-probability and this many alternatives
            (0..20), in the `Completion`s' `logprobs`.
          top_k, min_p, min_tokens, stop_token_ids: as in `SamplingParams`.
          repetition_penalty, frequency_penalty, presence_penalty, logit_bias ({token id:
            bias}): as in `SamplingParams` (vLLM's penalties, in the jitted steps).
          details: return `Completion`s (texts, token ids, finish reasons, timings, logprobs).
        Returns:
          texts (token-id lists for token-id prompts, or without a tokenizer), or `Completion`s.
        """
        prompts, models = _prompts_and_models(prompts, model)
        handles = []
        try:
            for i, (p, m) in enumerate(zip(prompts, models)):
                handles.append(self.submit(p, m, max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, seed=seed + i, stop=stop,
                                           ignore_eos=ignore_eos, logprobs=logprobs,
                                           top_k=top_k, min_p=min_p, min_tokens=min_tokens,
                                           stop_token_ids=stop_token_ids,
                                           repetition_penalty=repetition_penalty,
                                           frequency_penalty=frequency_penalty,
                                           presence_penalty=presence_penalty,
                                           logit_bias=logit_bias or None))
        except Exception:
            for h in handles:
                h.cancel()
            raise
        try:
            results = [h.result() for h in handles]
        finally:  # one failed (or the caller was interrupted): stop the others
            for h in handles:
                if h._done is None:
                    h.cancel()
        if details:
            return results
        as_text = self.base.tokenizer is not None and all(isinstance(p, str) for p in prompts)
        return [r.text if as_text else r.token_ids for r in results]

    def score(self, prompts: str | Sequence, model: str | Sequence[str | None] | None = None, *,
              top_logprobs: int = 0) -> list[list[TokenLogprob | None]]:
        """Each prompt token's log-probability under its model (the first token's is None:
        nothing precedes it), with `top_logprobs` alternatives: the prompts are batched by the
        engine with whatever else runs, each row on its own delta. For a JAX pipeline without a
        server, `dzjax.score` does the same in one call.

        Args:
          prompts: a text, token ids, or a list of either. model: as in `generate`.
        Returns:
          one list per prompt, of None then `TokenLogprob(logprob, top)` per token.
        """
        prompts, models = _prompts_and_models(prompts, model)
        handles = []
        try:
            for p, m in zip(prompts, models):
                handles.append(self.submit(p, m, max_tokens=1, prompt_logprobs=top_logprobs,
                                           ignore_eos=True))
            return [h.result().prompt_logprobs for h in handles]
        finally:
            for h in handles:
                if h._done is None:
                    h.cancel()

    def stream(self, prompt, model: str | None = None, **sampling) -> Iterator[str | int]:
        """Yield the output of one request as it is generated (text pieces, or token ids)."""
        handle = self.submit(prompt, model, **sampling)
        try:
            yield from handle
        finally:
            if handle._done is None:  # the caller stopped early: free the slot
                handle.cancel()

    def stats(self) -> dict:
        """Counts, occupancy, traces and the pool's state (a snapshot, taken between steps)."""
        return self.engine.stats()

    def metrics_text(self) -> bytes:
        """The server's metrics in Prometheus' text format (see `dzjax.serving.metrics`)."""
        return self.metrics.text()

    def close(self, timeout: float | None = None) -> None:
        """Finish the accepted requests and stop the engine; later requests are refused. With a
        timeout (seconds), requests still running after it end with `ServerClosedError`, and
        close returns within about timeout + 1 s."""
        self.engine.close(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_config(options: dict) -> EngineConfig:
    """The engine's settings from `serve`'s options; unknown ones refused by name."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = set(options) - fields
    if unknown:
        raise DzjaxError(f"unknown serve options {sorted(unknown)}; known: {sorted(fields)}")
    if options.get("dtype") is not None:
        options = dict(options, dtype=jnp.dtype(options["dtype"]).name)
    return EngineConfig(**options)


def _prompts_and_models(prompts, model) -> tuple[list, list]:
    """One prompt (a text or token ids) or a list, and one model for all or one per prompt."""
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    prompts = [prompts] if single else list(prompts)
    models = list(model) if isinstance(model, (list, tuple)) else [model] * len(prompts)
    if len(models) != len(prompts):
        raise RequestError(f"{len(models)} models for {len(prompts)} prompts")
    return prompts, models


def serve(base: Base | str, deltas: dict | None = None, **options) -> Server | None:
    """Serve `base` and named deltas (`dzjax.Delta` objects or file paths) from this process.

    Options (all keyword): max_batch (8), max_seq_len (min(context, 1024)),
    max_resident_deltas (8), max_deltas_per_step (= max_resident_deltas), host_cache_bytes (4 GiB),
    max_overtakes (= max_batch), dtype (None: bfloat16 on a GPU, float32 elsewhere),
    implementation (delta kernels), page_size (16), kv_pages, fuse_projections (True),
    pipeline_decode (None: on an accelerator, off on a CPU), prefix_sharing (True), mesh (None:
    one device; any `jax.sharding.Mesh`, see `sharding.as_tp_mesh`), tp_axis, the limits
    of `EngineConfig`, base_name ("base": the model name of base-only requests).

    A mesh over the devices of several processes (`jax.distributed`): call `serve` with the
    same arguments on every process (deltas as files every process reads at the same path).
    Process 0 gets the server; the others follow it (`dzjax.serving.multihost`), return None
    once it closes, and raise if it fails.
    """
    if isinstance(base, str) or hasattr(base, "__fspath__"):
        base = load_base(base)
    if not multihost.spans_processes(options.get("mesh")):
        return Server(base, deltas, **options)
    config = engine_config({k: v for k, v in options.items() if k != "base_name"})
    role = multihost.start(base, config, deltas or {})  # every process agrees, or all raise
    if isinstance(role, multihost.Leader):
        return Server(base, deltas, role=role, **options)
    role.follow(Engine(base, config, role=role))  # (never started: it replays process 0's calls)
    return None
