"""OpenAI's API, as the HTTP server speaks it: the request fields (read and checked one by one,
each error naming its field), the error shape, and the response bodies (whole and streamed).

Fields: prompt (a string, token ids, or a list of either), messages (chat), max_tokens (omitted:
16 for completions, as OpenAI's; the rest of the context for chat; chat also reads
max_completion_tokens; 0 only with echo: the prompt scored, nothing generated), temperature
(omitted: 1.0, as OpenAI's and vLLM's), top_p,
seed (omitted: a random one), stop (a string or a list), stream, stream_options.include_usage,
log-probabilities (completions: logprobs 0..20 and echo, which prepends the prompt and its
tokens' log-probs, the first null; chat: logprobs and top_logprobs; vLLM's prompt_logprobs), n
(1..16 choices per prompt, seeds seed, seed + 1, ...), vLLM's top_k, min_p, min_tokens (holds
back end-of-sequence and stop_token_ids, not stop strings) and stop_token_ids, OpenAI's
frequency_penalty, presence_penalty and logit_bias and vLLM's repetition_penalty (applied as
vLLM applies them, in the jitted steps), and the extension ignore_eos. Log-probabilities are the model's (log_softmax of its logits, before temperature,
top_p, top_k and min_p), as vLLM returns them. Fields that would change the output but are not
implemented (response_format, beam search, guided decoding, tools, ...)
are refused unless neutral; other unknown fields are ignored.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a malformed
request (naming the field) or one that does not fit the context, 404 for an unknown model, 503
when shutting down or when the model's delta cannot be loaded.
Nothing here knows Starlette: `http` does the transport.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid

from dzjax.serving.requests import (MAX_TOP_LOGPROBS, DeltaUnavailableError, ModelNotFoundError,
                                    RequestError, SamplingParams, ServerClosedError)

log = logging.getLogger("dzjax.serving.http")

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the context
DEFAULT_TEMPERATURE = 1.0  # OpenAI's and vLLM's, when a request gives none
# Fields of OpenAI's API that would change the output and are not implemented: refused unless
# absent, null or one of these neutral values.
UNSUPPORTED = {"best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},),
               "use_beam_search": (False,), "length_penalty": (1,), "guided_json": (),
               "guided_regex": (), "guided_choice": (), "guided_grammar": (),
               "structured_outputs": (), "allowed_token_ids": (), "bad_words": ([],),
               "truncate_prompt_tokens": (), "skip_special_tokens": (True,),
               "include_stop_str_in_output": (False,), "return_tokens_as_token_ids": (False,),
               "add_special_tokens": (True,), "chat_template": (),
               "add_generation_prompt": (True,), "continue_final_message": (False,),
               "chat_template_kwargs": ({},)}
MAX_N = 16  # choices per prompt at most


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


def invalid(param: str | None, message: str) -> HTTPError:
    return HTTPError(400, message, param=param)


def as_http_error(e: Exception) -> HTTPError:
    """The answer to an exception raised for a request: the client's fault (4xx) or ours (5xx)."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, ModelNotFoundError):
        return HTTPError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, RequestError):
        return HTTPError(400, str(e), param=e.param)
    if isinstance(e, ServerClosedError):  # shutting down: try again elsewhere or later
        return HTTPError(503, str(e), kind="server_error")
    if isinstance(e, DeltaUnavailableError):  # its file is gone or damaged: the operator's to fix
        return HTTPError(503, str(e), param="model", code="model_unavailable",
                         kind="server_error")
    log.error("request failed", exc_info=e)
    return HTTPError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


# -- request fields ----------------------------------------------------------------------------

def typed(body: dict, name: str, kinds: tuple, what: str):
    """body[name] if it is of one of `kinds` (bool only where named), None if absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise invalid(name, f"{name} must be {what}, got {json.dumps(value)[:80]}")
    return value


def model_field(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "model must be a non-empty string: the base or a delta's name")
    return model


def is_token_ids(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def prompts(body: dict) -> list[str | list[int]]:
    """The completion prompts: a string, token ids, or a non-empty list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or is_token_ids(prompt):
        return [prompt]
    if (isinstance(prompt, list) and prompt
            and all(isinstance(p, str) or is_token_ids(p) for p in prompt)):
        return prompt
    raise invalid("prompt", "prompt must be a string, a list of token ids, or a non-empty list "
                             "of strings or of token-id lists")


def content_text(content, i: int) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise invalid("messages", f"messages[{i}].content must be a string or a list of text parts")


def messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid("messages", f"messages[{i}] must be an object with a string role")
        out.append({"role": m["role"], "content": content_text(m.get("content"), i)})
    return out


def logprob_fields(body: dict, chat: bool) -> tuple[dict, bool]:
    """(the `SamplingParams` log-prob fields a request sets, echo), checked. Completions:
    logprobs k (0..20) for each generated token, echo (with logprobs: the prompt's too), vLLM's
    prompt_logprobs k; chat: logprobs true with top_logprobs k (0..20)."""
    top = MAX_TOP_LOGPROBS
    if chat:
        wanted = typed(body, "logprobs", (bool,), "a boolean")
        k = typed(body, "top_logprobs", (int,), "an integer")
        if k is not None and not 0 <= k <= top:
            raise invalid("top_logprobs", f"top_logprobs must be in [0, {top}], got {k}")
        if k and not wanted:
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        for name in ("echo", "prompt_logprobs"):
            if body.get(name) not in (None, False):
                raise invalid(name, f"{name} is a completions field here; chat does not take it")
        return ({"logprobs": k or 0} if wanted else {}), False
    if body.get("top_logprobs") not in (None, 0):
        raise invalid("top_logprobs", "completions take logprobs k (the k alternatives), not "
                                      "top_logprobs")
    out = {}
    for name in ("logprobs", "prompt_logprobs"):
        k = typed(body, name, (int,), "an integer")
        if k is not None:
            if not 0 <= k <= top:
                raise invalid(name, f"{name} must be in [0, {top}], got {k}")
            out[name] = k
    echo = bool(typed(body, "echo", (bool,), "a boolean"))
    if echo and "logprobs" in out:
        out.setdefault("prompt_logprobs", out["logprobs"])
    return out, echo


def sampling_fields(body: dict, chat: bool) -> dict:
    """The `SamplingParams` fields a request sets (its max_tokens only if given), checked."""
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise invalid(name, f"{name} is not supported by this server")
    tokens_field = "max_completion_tokens" if chat and "max_completion_tokens" in body \
        else "max_tokens"
    stop = typed(body, "stop", (str, list), "a string or a list of strings")
    temperature = typed(body, "temperature", (int, float), "a number")
    sampling = {"max_tokens": typed(body, tokens_field, (int,), "an integer"),
                # Omitted: 1.0, as OpenAI and vLLM (the notebook API's default stays greedy).
                "temperature": DEFAULT_TEMPERATURE if temperature is None else temperature,
                "top_p": typed(body, "top_p", (int, float), "a number"),
                "seed": typed(body, "seed", (int,), "an integer"),
                "stop": [stop] if isinstance(stop, str) else stop,
                "ignore_eos": typed(body, "ignore_eos", (bool,), "a boolean"),
                # vLLM's sampling extensions (top_k -1 = no limit, as vLLM's)
                "top_k": typed(body, "top_k", (int,), "an integer"),
                "min_p": typed(body, "min_p", (int, float), "a number"),
                "min_tokens": typed(body, "min_tokens", (int,), "an integer"),
                "stop_token_ids": typed(body, "stop_token_ids", (list,), "a list of token ids"),
                # OpenAI's penalties and vLLM's repetition_penalty (applied as vLLM's)
                "frequency_penalty": typed(body, "frequency_penalty", (int, float), "a number"),
                "presence_penalty": typed(body, "presence_penalty", (int, float), "a number"),
                "repetition_penalty": typed(body, "repetition_penalty", (int, float),
                                            "a number"),
                "logit_bias": _logit_bias(body)}
    if sampling["top_k"] == -1:
        sampling["top_k"] = 0
    sampling = {k: v for k, v in sampling.items() if v is not None}
    for name, value in sampling.items():  # the engine's own checks, one field at a time
        try:
            SamplingParams(**{name: tuple(value) if name in ("stop", "stop_token_ids",
                                                             "logit_bias") else value,
                              # against the request's max_tokens once it is known (engine)
                              **({"max_tokens": sampling.get("max_tokens", 2 ** 31)}
                                 if name == "min_tokens" else {})})
        except RequestError as e:
            if name == "max_tokens":  # the engine's name for it; say the one the client sent
                name, e = tokens_field, str(e).replace("max_tokens", tokens_field)
            raise invalid(name, str(e)) from None
    return sampling


def _logit_bias(body: dict) -> list | None:
    """logit_bias as OpenAI sends it, {"token id": bias}, as [(id, bias)] (None: absent)."""
    bias = typed(body, "logit_bias", (dict,), "an object of token ids to biases")
    if not bias:
        return None
    entries = {}
    for key, value in bias.items():
        # ASCII digits only ("²" and "٣" are digits to Python), and short enough for a token id
        if not (key.isascii() and key.isdecimal() and len(key) <= 10):
            raise invalid("logit_bias", f"logit_bias keys must be token ids, got {key[:40]!r}")
        if int(key) in entries:  # "1" and "01"
            raise invalid("logit_bias", f"logit_bias lists token id {int(key)} twice")
        entries[int(key)] = value
    return list(entries.items())  # (the engine sorts them)


def choices_per_prompt(body: dict) -> int:
    """n: how many choices each prompt gets (1 to MAX_N), each sampled with its own seed."""
    n = typed(body, "n", (int,), "an integer")
    if n is not None and not 1 <= n <= MAX_N:
        raise invalid("n", f"n must be in [1, {MAX_N}], got {n}")
    return n or 1


def include_usage(body: dict) -> bool:
    """stream_options.include_usage: end the stream with a chunk that has the usage counts."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    return bool(typed(options, "include_usage", (bool,), "a boolean"))


# -- answers -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reply:
    """What one call answers with: OpenAI's completion or chat completion, whole or in chunks."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> Reply:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return cls(chat, model, prefix + uuid.uuid4().hex, int(time.time()))

    def choice(self, index: int, text: str, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason, "logprobs": logprobs}
        return {"index": index, "text": text, "finish_reason": finish_reason,
                "logprobs": logprobs}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None = None,
                     first: bool = False, logprobs: dict | None = None) -> dict:
        """One choice's piece of a stream; a chat stream opens each choice with its role."""
        if not self.chat:
            return self.choice(index, text, finish_reason, logprobs)
        delta = {"role": "assistant", "content": text} if first else \
            ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason,
                "logprobs": logprobs}

    def logprobs(self, entries, token_text, offset: int = 0) -> dict:
        """The `logprobs` object of a choice from [(token id, TokenLogprob or None)]: for a
        completion OpenAI's legacy lists (tokens, token_logprobs, top_logprobs as token -> logprob
        with the chosen token always in, text_offset from `offset`), for chat its content list."""
        if self.chat:
            item = lambda t, v: {"token": token_text(t), "logprob": v,
                                 "bytes": list(token_text(t).encode())}
            return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(a, v)
                                                                         for a, v in lp.top]}
                                for t, lp in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in entries:
            text = token_text(t)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {
                **{token_text(a): v for a, v in lp.top}, text: lp.logprob})
        return out

    def body(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out
