"""What a request is: its sampling settings, its state in the engine, the events it reports, and
the errors a request can end with."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from dzjax.errors import DzjaxError
from dzjax.models.scoring import MAX_TOP_LOGPROBS

MAX_STOP_TOKEN_IDS = 8  # stop_token_ids of one request at most
MAX_LOGIT_BIAS = 300  # logit_bias entries of one request at most (OpenAI's limit)


class RequestError(DzjaxError):
    """A request cannot be served as asked (its fields, its model, its length); `param` names
    the request field at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(RequestError):
    """A request names a model that is not served."""


def not_served(model: str, served: list[str]) -> ModelNotFoundError:
    """The error of a request naming `model`, which is not among the `served` models."""
    return ModelNotFoundError(f"model {model!r} is not served; served: {served}")


class DeltaUnavailableError(DzjaxError):
    """A request's delta could not be read or loaded (its file is gone or damaged): the server's
    fault, not the request's; a later request tries again."""


class ServerClosedError(DzjaxError):
    """The server is closed (or its engine stopped): it takes no more requests."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request generates. temperature 0 is greedy."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    ignore_eos: bool = False
    # Log-probabilities (of the model's distribution, before temperature and top_p), None = off;
    # k = also the k likeliest alternatives (0..MAX_TOP_LOGPROBS): of each generated token, and
    # of each prompt token (the first has none: nothing precedes it).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    top_k: int = 0  # sample among the k likeliest tokens at most (0: no limit)
    min_p: float = 0.0  # only tokens at least min_p times as likely as the likeliest
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are held back until this many
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request (not in the output)
    # As vLLM (`dzjax.models.sampling.penalize`), before temperature and the filters: a token
    # seen in the prompt or output has its logit divided by repetition_penalty (multiplied,
    # where negative); frequency_penalty * (its count in the output) and presence_penalty *
    # (whether it is there) are subtracted; logit_bias adds (token id, bias in [-100, 100]).
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalized(self) -> bool:
        """Whether this request needs the penalties' variant of the steps."""
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0 or bool(self.logit_bias))

    def __post_init__(self):
        checks = [("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                   f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
                  ("temperature", isinstance(self.temperature, (int, float))
                   and 0 <= self.temperature <= 100,
                   f"temperature must be in [0, 100], got {self.temperature!r}"),
                  ("top_p", isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
                   f"top_p must be in (0, 1], got {self.top_p!r}"),
                  ("seed", isinstance(self.seed, int) and 0 <= self.seed < 2 ** 32,
                   f"seed must be an integer in [0, 2**32), got {self.seed!r}"),
                  ("stop", all(isinstance(s, str) and s for s in self.stop),
                   f"stop must be non-empty strings, got {str(self.stop)[:200]}")]
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        checks += [
            ("top_k", integer(self.top_k) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}"),
            ("min_p", isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1,
             f"min_p must be in [0, 1], got {self.min_p!r}"),
            ("min_tokens", integer(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}"),
            ("stop_token_ids", all(integer(t) and t >= 0 for t in self.stop_token_ids)
             and len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
             f"stop_token_ids must be at most {MAX_STOP_TOKEN_IDS} token ids, got "
             f"{str(self.stop_token_ids)[:200]}")]
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        checks += [
            ("repetition_penalty", number(self.repetition_penalty)
             and 0 < self.repetition_penalty <= 100,
             f"repetition_penalty must be in (0, 100] (1: off), got {self.repetition_penalty!r}"),
            ("frequency_penalty", number(self.frequency_penalty)
             and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            ("presence_penalty", number(self.presence_penalty)
             and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            ("logit_bias", isinstance(self.logit_bias, tuple)
             and len(self.logit_bias) <= MAX_LOGIT_BIAS
             and all(isinstance(e, tuple) and len(e) == 2 and integer(e[0]) and e[0] >= 0
                     and number(e[1]) and -100 <= e[1] <= 100 for e in self.logit_bias)
             and len({e[0] for e in self.logit_bias}) == len(self.logit_bias),
             f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases in "
             f"[-100, 100], got {str(self.logit_bias)[:200]}")]
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            checks.append((name, k is None or (isinstance(k, int) and not isinstance(k, bool)
                                               and 0 <= k <= MAX_TOP_LOGPROBS),
                           f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}"))
        for param, ok, message in checks:
            if not ok:
                raise RequestError(message, param=param)
        # one form whatever order the entries came in (checked above: distinct integer ids)
        object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias)))


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the likeliest alternatives at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request reports as it runs: a piece of output, then the end."""

    kind: str  # "token" or "done"
    text: str = ""  # the new text (token events; empty without a tokenizer)
    token_ids: tuple[int, ...] = ()  # the new token ids
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when the request asked
    finish_reason: str | None = None  # done: "stop", "length", "cancelled" or "error"
    error: Exception | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One request and everything measured about it (times from `time.perf_counter`).

    Changed by the engine thread only, except `cancelled`, which any thread may set.
    """

    id: int
    model: str | None  # a delta name; None = the base model
    prompt_ids: list[int]
    sampling: SamplingParams
    listener: Callable[[Event], None]
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the output text so far (with a tokenizer)
    finish_reason: str | None = None
    cancelled: bool = False
    overtaken: int = 0
    batch_row: int | None = None
    delta_slot: int = -1
    order: int = -1  # admission order (the latest admitted are preempted first)
    prefix_keys: tuple = ()  # (context length, its KV prefix keys): hashed once per context
    logprobs: list = dataclasses.field(default_factory=list)  # TokenLogprob per output token
    prompt_logprobs: list | None = None  # None, then per prompt token: None (the first) or one

    @property
    def timings(self) -> dict:
        """Seconds from arrival to admission, first token and finish."""
        since = lambda t: None if t is None else t - self.arrival
        return {"queued": since(self.admitted), "first_token": since(self.first_token),
                "total": since(self.finished)}
