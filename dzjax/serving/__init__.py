"""Serving many deltas at once: `dzjax.serve` (a notebook API) and an OpenAI-compatible server.

  steps       the jitted prefill and decode over a fixed set of batch slots (no retracing)
  pool        the delta pool: device slots, LRU host cache, disk (mechanism)
  scheduler   who is admitted and which delta loads where: a pure function (policy)
  engine      continuous batching on one engine thread: carries out the scheduler's plan
  requests    sampling settings, request state, events and request errors
  detokenize  incremental detokenization with stop strings
  server      `serve()` and `Server`: generate, stream, stats, close
  openai_api  OpenAI's request fields and response shapes
  http        the HTTP server (`dzjax serve`) on Starlette + uvicorn
"""

from dzjax.serving.engine import EngineConfig
from dzjax.serving.requests import (DeltaUnavailableError, Event, ModelNotFoundError,
                                    RequestError, SamplingParams, ServerClosedError)
from dzjax.serving.server import Completion, RequestHandle, Server, serve

__all__ = ["Completion", "DeltaUnavailableError", "EngineConfig", "Event", "ModelNotFoundError",
           "RequestError", "RequestHandle", "SamplingParams", "Server", "ServerClosedError",
           "serve"]
