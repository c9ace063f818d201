"""Serving many deltas at once: `dzjax.serve` (a notebook API) and an OpenAI-compatible server.

  steps    the jitted prefill and decode over a fixed set of batch slots (no retracing)
  pool     the delta pool: device slots, LRU host cache, disk
  engine   continuous batching and the scheduler, on one engine thread
  server   `serve()` and `Server`: generate, stream, stats, close
  http     the HTTP server (`dzjax serve`)
  bench    the serving benchmark (`dzjax bench`) against the swap and all-merged baselines
"""

from dzjax.serving.engine import (EngineConfig, Event, ModelNotFoundError, RequestError,
                                  SamplingParams, ServerClosedError)
from dzjax.serving.server import Completion, RequestHandle, Server, serve

__all__ = ["Completion", "EngineConfig", "Event", "ModelNotFoundError", "RequestError",
           "RequestHandle", "SamplingParams", "Server", "ServerClosedError", "serve"]
