"""The OpenAI-compatible HTTP server (`dzjax serve`), through the official `openai` client against
a real uvicorn server on localhost: answers equal `dzjax.generate`, streaming equals the whole
answer, chat goes through the template, errors have OpenAI's shape and status, many concurrent
requests over several deltas are all answered right, and a client that goes away frees its slot
without disturbing the others."""

import asyncio
import concurrent.futures
import functools
import json
import shutil
import socket
import threading
import time
import types
from pathlib import Path

import httpx2
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

import dzjax
from conftest import fixture_dir, make_deltas
from dzjax.serving import in_process
from dzjax.serving.http import make_app

# Roles by their initial: chat prompts stay short (one compiled prompt-length bucket).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
PROMPTS = ["Once upon a time", "def main(", "The cat sat on"]
DELTAS = ["ft0", "ft1", "ft2", "ft3"]
LONG = 240  # max_tokens of a request that is still running when its client leaves


def templated_base(tmp: Path) -> Path:
    """A copy of the trained base whose tokenizer has a chat template."""
    path = shutil.copytree(fixture_dir("trained") / "base", tmp / "base")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return path


def start_uvicorn(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    """uvicorn on a free localhost port, in a background thread; returns it and its URL."""
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=http.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = http.servers[0].sockets[0].getsockname()[1]
    return http, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module: the base (with a chat template) and four deltas over HTTP."""
    tmp = tmp_path_factory.mktemp("http")
    base_dir = templated_base(tmp)
    paths = make_deltas(base_dir, tmp, len(DELTAS))
    base = dzjax.load_base(base_dir, dtype=jnp.float32)
    server = dzjax.serve(base, paths, max_batch=8, max_seq_len=256, max_resident_deltas=4)
    http, thread, url = start_uvicorn(make_app(server))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    # The answers are compared with greedy `dzjax.generate`: temperature 0 unless a test says
    # otherwise (the HTTP default is OpenAI's 1.0; test_omitted_temperature_means_one).
    for resource in (client.completions, client.chat.completions):
        resource.create = greedy(resource.create)
    deltas = {name: dzjax.load_delta(p) for name, p in paths.items()}

    @functools.cache
    def expected(model: str, prompt, max_tokens: int) -> str:
        """The reference: `dzjax.generate` alone, greedy; token-id prompts give decoded text."""
        out = dzjax.generate(base, [list(prompt) if isinstance(prompt, tuple) else prompt],
                             delta=deltas.get(model), max_tokens=max_tokens)[0]
        return out if isinstance(out, str) else base.tokenizer.decode(out,
                                                                      skip_special_tokens=True)

    yield types.SimpleNamespace(server=server, base=base, url=url, client=client,
                                expected=expected, deltas=deltas)
    client.close()
    http.should_exit = True
    thread.join(timeout=30)
    server.close()
    assert not thread.is_alive(), "uvicorn did not shut down"


def greedy(create):
    @functools.wraps(create)
    def call(*args, **kwargs):
        kwargs.setdefault("temperature", 0)
        return create(*args, **kwargs)
    return call


def post(served, path: str, body) -> tuple[int, dict]:
    """A raw POST (bytes or a JSON-able body): the status and the JSON answer."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx2.post(served.url + path, content=content,
                    headers={"Content-Type": "application/json"}, timeout=120)
    return r.status_code, r.json()


def ask(served, model: str, prompt: str, max_tokens: int, stream: bool = False) -> str:
    """One completion's text, whole or streamed."""
    if not stream:
        r = served.client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
        return r.choices[0].text
    chunks = served.client.completions.create(model=model, prompt=prompt,
                                              max_tokens=max_tokens, stream=True)
    return "".join(c.choices[0].text for c in chunks)


def wait_idle(served, timeout: float = 30.0) -> dict:
    """The engine's stats once nothing runs or waits (a cancellation lands at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = served.server.stats()
        if stats["running"] == stats["waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def cancelled(served) -> int:
    return served.server.stats()["finished"].get("cancelled", 0)


# -- answers -----------------------------------------------------------------------------------

def test_models_lists_the_base_and_every_delta(served):
    models = served.client.models.list().data
    assert [m.id for m in models] == ["base"] + DELTAS
    assert all(m.object == "model" for m in models)
    assert served.client.models.retrieve("ft2").id == "ft2"
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("nope")


@pytest.mark.parametrize("model", ["base", "ft1"])
def test_completion_equals_generate(served, model):
    r = served.client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8)
    assert r.object == "text_completion" and r.model == model
    assert [c.text for c in r.choices] == [served.expected(model, PROMPTS[0], 8)]
    assert r.choices[0].finish_reason == "length"
    prompt_tokens = len(served.base.tokenizer(PROMPTS[0])["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (prompt_tokens, 8, prompt_tokens + 8)


def test_a_list_of_prompts_gives_one_choice_each(served):
    r = served.client.completions.create(model="ft2", prompt=PROMPTS, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [served.expected("ft2", p, 6) for p in PROMPTS]
    assert r.usage.completion_tokens == 3 * 6


def test_token_id_prompt(served):
    ids = served.base.tokenizer(PROMPTS[1])["input_ids"]
    r = served.client.completions.create(model="ft0", prompt=ids, max_tokens=5)
    assert r.choices[0].text == served.expected("ft0", tuple(ids), 5)


def test_stream_concatenates_to_the_whole_answer(served):
    whole = served.client.completions.create(model="ft3", prompt=PROMPTS[2], max_tokens=10)
    chunks = list(served.client.completions.create(
        model="ft3", prompt=PROMPTS[2], max_tokens=10, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2  # really streamed, not one piece
    assert "".join(pieces) == whole.choices[0].text == served.expected("ft3", PROMPTS[2], 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_string_cuts_the_answer(served):
    full = served.expected("base", PROMPTS[0], 8)
    stop = full.split()[1]  # the second word: the answer ends before it
    r = served.client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=8,
                                         stop=[stop, "never there"])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens_defaults_to_16(served):
    r = served.client.completions.create(model="base", prompt=PROMPTS[1],
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_chat_goes_through_the_template(served):
    # Content as a string, or as text parts (which the server joins): the same prompt.
    messages = [{"role": "system", "content": "Be short."},
                {"role": "user", "content": [{"type": "text", "text": "H"},
                                             {"type": "text", "text": "i"}]}]
    ids = served.server.encode_chat([messages[0], {"role": "user", "content": "Hi"}])
    assert served.base.tokenizer.decode(ids) == "s: Be short.\nu: Hi\na:"
    want = served.expected("ft1", tuple(ids), 8)
    r = served.client.chat.completions.create(model="ft1", messages=messages, max_tokens=8)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(served.client.chat.completions.create(model="ft1", messages=messages,
                                                        max_completion_tokens=8, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


# -- errors ------------------------------------------------------------------------------------

# -- log-probabilities, tokenizer endpoints, defaults ---------------------------------------------

def test_echo_logprobs_equal_the_python_scores(served):
    """lm-eval's log-likelihood request: echo, logprobs 1, max_tokens 1: the prompt's tokens'
    log-probs (the first null) and the generated one's, as `dzjax.score` gives them."""
    ids = served.base.tokenizer(PROMPTS[2])["input_ids"]
    r = served.client.completions.create(model="ft1", prompt=ids, echo=True, logprobs=1,
                                         max_tokens=1)
    lp = r.choices[0].logprobs
    generated = r.usage.completion_tokens
    assert generated == 1 and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None
    assert r.choices[0].text.startswith(served.base.tokenizer.decode(ids))
    scores = dzjax.score(served.base, ids, deltas=served.deltas["ft1"], top_logprobs=1)
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], scores.token_logprobs[0, 1:],
                               atol=2e-4)
    # lm-eval's greedy check (chosen == max of the top dict) agrees with the Python API's.
    greedy = [chosen >= max(top.values()) - 1e-6
              for top, chosen in zip(lp.top_logprobs[1:len(ids)], lp.token_logprobs[1:len(ids)])]
    best = scores.top_logprobs[0, 1:, 0]
    assert greedy == (best <= scores.token_logprobs[0, 1:] + 1e-6).tolist()
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0


def test_echo_with_max_tokens_0_scores_the_prompt_only(served):
    r = served.client.completions.create(model="base", prompt=PROMPTS[0], echo=True, logprobs=0,
                                         max_tokens=0)
    ids = served.base.tokenizer(PROMPTS[0])["input_ids"]
    assert r.choices[0].text == PROMPTS[0] and r.usage.completion_tokens == 0
    want = dzjax.score(served.base, ids).token_logprobs[0]
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:], want[1:], atol=2e-4)


def test_generated_tokens_logprobs_completions_and_chat(served):
    prompt = served.base.tokenizer(PROMPTS[1])["input_ids"]
    r = served.client.completions.create(model="ft2", prompt=prompt, logprobs=2,
                                         max_tokens=4, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out = dzjax.generate(served.base, [prompt], delta=served.deltas["ft2"], max_tokens=4,
                         stop_at_eos=False)[0]  # the same greedy tokens, as ids
    assert len(lp.token_logprobs) == 4 and all(len(t) in (2, 3) for t in lp.top_logprobs)
    want = dzjax.score(served.base, prompt + out, deltas=served.deltas["ft2"]).token_logprobs
    np.testing.assert_allclose(lp.token_logprobs, want[0, len(prompt):], atol=2e-4)
    assert lp.tokens == [served.server.token_text(t) for t in out]
    chat = served.client.chat.completions.create(
        model="ft1", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 3
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.logprob - 1e-6
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)  # greedy


def test_vllm_tokenizer_endpoints(served):
    tok = served.base.tokenizer
    status, answer = post(served, "/tokenize", {"model": "ft0", "prompt": PROMPTS[0]})
    assert status == 200 and answer["tokens"] == tok(PROMPTS[0])["input_ids"]
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 256
    status, plain = post(served, "/tokenize", {"prompt": PROMPTS[0], "add_special_tokens": False})
    assert plain["tokens"] == tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    status, chat = post(served, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["tokens"] == served.server.encode_chat(
        [{"role": "user", "content": "hi"}])
    status, back = post(served, "/detokenize", {"tokens": plain["tokens"]})
    assert status == 200 and back["prompt"] == tok.decode(plain["tokens"])
    status, bad = post(served, "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and bad["error"]["param"] == "tokens"
    info = httpx2.get(served.url + "/tokenizer_info", timeout=30).json()
    assert info["model_max_length"] == 256 and info["eos_token"] == tok.eos_token
    assert info["chat_template"] == CHAT_TEMPLATE


def test_omitted_temperature_means_one(served):
    """OpenAI's default: an omitted temperature samples at 1.0 (the same tokens as asking for
    1.0 with that seed), not greedily."""
    body = {"model": "ft0", "prompt": PROMPTS[0], "max_tokens": 12, "ignore_eos": True}
    texts = []
    for seed in (1, 2, 3):
        _, omitted = post(served, "/v1/completions", {**body, "seed": seed})
        _, one = post(served, "/v1/completions", {**body, "seed": seed, "temperature": 1.0})
        assert omitted["choices"][0]["text"] == one["choices"][0]["text"]
        texts.append(omitted["choices"][0]["text"])
    _, greedy_answer = post(served, "/v1/completions", {**body, "temperature": 0})
    assert any(t != greedy_answer["choices"][0]["text"] for t in texts)


def test_sampling_fields_change_the_output_as_documented(served):
    """top_k 1 at temperature 1 is greedy; n gives n choices, seeds seed, seed + 1, ...;
    stop_token_ids end a choice at that token; min_tokens holds back end-of-sequence."""
    body = {"model": "ft3", "prompt": PROMPTS[1], "max_tokens": 10, "ignore_eos": True}
    _, greedy_answer = post(served, "/v1/completions", {**body, "temperature": 0})
    greedy_text = greedy_answer["choices"][0]["text"]
    _, top1 = post(served, "/v1/completions", {**body, "temperature": 1.0, "top_k": 1, "seed": 5})
    assert top1["choices"][0]["text"] == greedy_text
    _, many = post(served, "/v1/completions", {**body, "temperature": 1.0, "n": 3, "seed": 7})
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    for j, choice in enumerate(many["choices"]):
        _, alone = post(served, "/v1/completions", {**body, "temperature": 1.0, "seed": 7 + j})
        assert choice["text"] == alone["choices"][0]["text"]
    assert len({c["text"] for c in many["choices"]}) > 1
    assert many["usage"]["prompt_tokens"] == len(served.base.tokenizer(PROMPTS[1])["input_ids"])
    # Two prompts, n = 2: choice i * n + j is the j-th of prompt i.
    _, pairs = post(served, "/v1/completions", {**body, "prompt": PROMPTS[:2], "temperature": 1.0,
                                                "n": 2, "seed": 3})
    for i, choice in enumerate(pairs["choices"]):
        _, alone = post(served, "/v1/completions", {**body, "prompt": PROMPTS[i // 2],
                                                    "temperature": 1.0, "seed": 3 + i % 2})
        assert choice["text"] == alone["choices"][0]["text"]
    # min_p 1 keeps only the likeliest token: greedy again.
    _, min_p = post(served, "/v1/completions", {**body, "temperature": 1.0, "min_p": 1.0})
    assert min_p["choices"][0]["text"] == greedy_text
    # The third greedy token as a stop token: the answer ends before it.
    ids = served.base.tokenizer(PROMPTS[1])["input_ids"]
    out = dzjax.generate(served.base, [ids], delta=served.deltas["ft3"], max_tokens=10,
                         stop_at_eos=False)[0]
    _, stopped = post(served, "/v1/completions", {**body, "prompt": ids, "temperature": 0,
                                                  "stop_token_ids": [out[2]]})
    assert stopped["choices"][0]["finish_reason"] == "stop"
    cut = out.index(out[2])
    assert stopped["usage"]["completion_tokens"] == cut
    # min_tokens: with the stop token held back until 5 tokens, it cannot end the answer early.
    _, held = post(served, "/v1/completions", {**body, "prompt": ids, "temperature": 0,
                                               "stop_token_ids": [out[2]], "min_tokens": 5})
    assert held["usage"]["completion_tokens"] >= 5


def penalized_greedy(served, model, ids, n, repetition=1.0, frequency=0.0, presence=0.0,
                     bias=None) -> list[int]:
    """The reference: greedy decoding on `dzjax.logits` with vLLM's penalty rules (and their
    order: the bias first), in numpy."""
    out = []
    for _ in range(n):  # one shape for every step (causal: the padding after does not count)
        padded = ids + out + [0] * (n - len(out))
        logits = np.asarray(dzjax.logits(served.base, [padded], delta=served.deltas.get(
            model)))[0, len(ids) + len(out) - 1].astype(np.float64)
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set(ids + out):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(np.argmax(logits)))
    return out


def test_penalties_and_logit_bias_change_the_output_as_documented(served):
    ids = served.base.tokenizer(PROMPTS[0])["input_ids"]
    decode = served.base.tokenizer.decode

    def answer(**fields) -> str:
        status, got = post(served, "/v1/completions", {
            "model": "ft2", "prompt": ids, "max_tokens": 10, "ignore_eos": True,
            "temperature": 0, **fields})
        assert status == 200, got
        return got["choices"][0]["text"]

    plain = penalized_greedy(served, "ft2", ids, 10)
    assert answer() == decode(plain)
    for fields, reference in [
            ({"frequency_penalty": 2.0}, dict(frequency=2.0)),
            ({"presence_penalty": 2.0, "frequency_penalty": 0.5},
             dict(presence=2.0, frequency=0.5)),
            ({"repetition_penalty": 1.8}, dict(repetition=1.8)),
            ({"logit_bias": {str(plain[0]): -100, "7": 4.5}}, dict(bias={plain[0]: -100, 7: 4.5})),
            # the bias comes before the repetition penalty (which scales the biased logit)
            ({"logit_bias": {str(plain[1]): 6}, "repetition_penalty": 3.0},
             dict(bias={plain[1]: 6}, repetition=3.0))]:
        want = penalized_greedy(served, "ft2", ids, 10, **reference)
        assert want != plain, fields  # (the reference itself moved)
        assert answer(**fields) == decode(want), fields
        # The Python API takes the same fields, with logit_bias as {token id: bias}.
        python = {k: ({int(t): v for t, v in x.items()} if k == "logit_bias" else x)
                  for k, x in fields.items()}
        assert served.server.generate([ids], model="ft2", max_tokens=10, ignore_eos=True,
                                      **python)[0] == want, fields
    assert answer(logit_bias={"5": 100}) == decode([5] * 10)


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client.completions.create(model="nope", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_prompt_longer_than_the_context_is_400(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model="ft0", prompt="a b c " * 200, max_tokens=4)
    assert "context" in e.value.body["message"]


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_malformed_body_is_400(served, body):
    status, answer = post(served, "/v1/completions", body)
    assert status == 400
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "model", None),
    ("/v1/completions", "model", 3),
    ("/v1/completions", "prompt", None),
    ("/v1/completions", "prompt", 5),
    ("/v1/completions", "prompt", []),
    ("/v1/completions", "prompt", ["ok", 3]),
    ("/v1/completions", "max_tokens", -1),
    ("/v1/completions", "max_tokens", 0),
    ("/v1/completions", "max_tokens", "8"),
    ("/v1/completions", "max_tokens", 2.5),
    ("/v1/completions", "temperature", "hot"),
    ("/v1/completions", "temperature", -1),
    ("/v1/completions", "top_p", 0),
    ("/v1/completions", "seed", -3),
    ("/v1/completions", "stop", 7),
    ("/v1/completions", "stop", [""]),
    ("/v1/completions", "stream", "yes"),
    ("/v1/completions", "n", 0),
    ("/v1/completions", "n", 17),
    ("/v1/completions", "top_k", -2),
    ("/v1/completions", "min_p", 1.5),
    ("/v1/completions", "min_tokens", 5),  # more than max_tokens (4)
    ("/v1/completions", "stop_token_ids", [1, -1]),
    ("/v1/completions", "stop_token_ids", [10 ** 9]),
    ("/v1/completions", "response_format", {"type": "json_object"}),
    ("/v1/completions", "repetition_penalty", 0),
    ("/v1/completions", "frequency_penalty", 2.5),
    ("/v1/completions", "presence_penalty", "high"),
    ("/v1/completions", "logit_bias", {"5": 300}),
    ("/v1/completions", "logit_bias", {"x": 1}),
    ("/v1/completions", "logit_bias", {"100000": 1}),  # beyond the vocabulary
    ("/v1/completions", "logit_bias", [5, 3]),
    ("/v1/completions", "logit_bias", {"\u00b2": 1}),  # a digit to str.isdigit, not an id
    ("/v1/completions", "logit_bias", {"\u0663": 1}),  # a decimal to int(), not ASCII
    ("/v1/completions", "logit_bias", {"1" * 5000: 1}),  # past int()'s digit limit
    ("/v1/completions", "logit_bias", {"1": 1, "01": 2}),  # one id twice
    ("/v1/completions", "logit_bias", {"1": 1, "01": "x"}),
    ("/v1/completions", "logprobs", 21),
    ("/v1/completions", "logprobs", True),
    ("/v1/completions", "echo", "yes"),
    ("/v1/completions", "prompt_logprobs", -1),
    ("/v1/chat/completions", "top_logprobs", 3),  # without logprobs: true
    ("/v1/chat/completions", "logprobs", 1),
    ("/v1/chat/completions", "messages", None),
    ("/v1/chat/completions", "messages", [{"content": "no role"}]),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": {"not": "text"}}]),
    ("/v1/chat/completions", "max_completion_tokens", -2),
])
def test_bad_field_is_400_naming_it(served, path, field, value):
    body = {"model": "ft0", "max_tokens": 4, "prompt": "hi",
            "messages": [{"role": "user", "content": "hi"}]}
    body[field] = value
    status, answer = post(served, path, body)
    assert status == 400, answer
    assert answer["error"]["param"] == field, answer
    assert field in answer["error"]["message"], answer


def test_limits_are_4xx_naming_the_field(served):
    """Nothing a client sends can exhaust the server: bodies, nesting, prompts and stop strings
    are bounded, each refusal says which field; lone surrogates are a 400, not a 500."""
    huge = json.dumps({"model": "ft0", "prompt": "x" * (9 << 20)}).encode()
    status, answer = post(served, "/v1/completions", huge)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, answer = post(served, "/v1/completions",
                          b'{"model": "ft0", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}")
    assert status == 400 and "nested" in answer["error"]["message"]
    for field, value, message in [
            ("prompt", "x" * 10000, "bytes of text"),
            ("prompt", "ok \udc80", "not valid text"),
            ("stop", [f"s{i}" for i in range(17)], "stop strings"),
            ("stop", ["y" * 257], "characters")]:
        body = json.dumps({"model": "ft0", "prompt": "hi", "max_tokens": 2, field: value})
        status, answer = post(served, "/v1/completions", body.encode())  # \udc80 escaped
        assert status == 400, (field, answer)
        assert answer["error"]["param"] == field and message in answer["error"]["message"]
    status, answer = post(served, "/v1/chat/completions", {
        "model": "ft0", "messages": [{"role": "user", "content": "\udc80"}]})
    assert status == 400 and answer["error"]["param"] == "messages", answer
    assert ask(served, "ft0", PROMPTS[0], 8) == served.expected("ft0", PROMPTS[0], 8)


def test_chat_without_a_template_is_400(served, monkeypatch):
    monkeypatch.setattr(served.base.tokenizer, "chat_template", None)
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "template" in e.value.body["message"]


def test_an_internal_error_is_500_and_the_server_goes_on(served, monkeypatch):
    def broken(prompt):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(served.server, "encode", broken)
    with pytest.raises(openai.InternalServerError) as e:
        served.client.completions.create(model="base", prompt="hi", max_tokens=4)
    assert "tokenizer exploded" in e.value.body["message"]
    monkeypatch.undo()
    r = served.client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=8)
    assert r.choices[0].text == served.expected("base", PROMPTS[0], 8)
    assert httpx2.get(served.url + "/health").json() == {"status": "ok"}


def test_a_failed_engine_step_fails_its_requests_only(served, monkeypatch):
    """A decode step that raises: the whole answer is a 500, a stream ends with an error event,
    and the next requests are served as before."""
    from dzjax.serving import steps

    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(steps, "decode", broken)
    with pytest.raises(openai.InternalServerError, match="device fell over"):
        served.client.completions.create(model="ft0", prompt=PROMPTS[0], max_tokens=8)
    with pytest.raises(openai.APIError, match="device fell over"):
        list(served.client.completions.create(model="ft0", prompt=PROMPTS[0], max_tokens=8,
                                              stream=True))
    monkeypatch.undo()
    assert wait_idle(served)["running"] == 0
    assert ask(served, "ft0", PROMPTS[0], 8, stream=True) == served.expected("ft0", PROMPTS[0], 8)


def test_unknown_route_is_404_in_openai_shape(served):
    r = httpx2.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]


# -- concurrency and clients that leave --------------------------------------------------------

def test_200_concurrent_requests_over_4_deltas(served):
    jobs = [(DELTAS[i % 4], PROMPTS[i % 3], i % 5 == 0) for i in range(200)]  # every 5th streams
    want = {(m, p): served.expected(m, p, 4) for m, p, _ in jobs}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda job: ask(served, job[0], job[1], 4, job[2]), jobs))
    assert got == [want[m, p] for m, p, _ in jobs]
    stats = wait_idle(served)
    assert stats["running"] == stats["waiting"] == 0
    assert stats["max_active_deltas"] == 4


def long_request(model: str) -> dict:
    return {"model": model, "prompt": PROMPTS[0], "max_tokens": LONG}


def test_a_streaming_client_that_leaves_frees_its_slot(served):
    before = cancelled(served)
    others = [(DELTAS[i % 4], PROMPTS[i % 3]) for i in range(8)]
    want = [served.expected(m, p, 6) for m, p in others]
    leaving = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    stream = leaving.completions.create(**long_request("ft0"), stream=True,
                                        extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda job: ask(served, job[0], job[1], 6), others)
        first = next(iter(stream))  # one chunk, then the client goes away mid-generation
        stream.close()
        leaving.close()
        assert list(answers) == want
    assert first.choices[0].text
    stats = wait_idle(served)
    assert stats["running"] == stats["waiting"] == 0
    assert cancelled(served) == before + 1  # cut short, not run to its 240 tokens


def test_a_waiting_client_that_leaves_frees_its_slot(served):
    """Non-streaming: the server notices the closed connection while the answer is made."""
    before = cancelled(served)
    body = json.dumps({**long_request("ft2"), "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while served.server.stats()["running"] == 0:  # it is generating: now leave
            assert time.monotonic() < deadline
            time.sleep(0.01)
    stats = wait_idle(served)
    assert stats["running"] == stats["waiting"] == 0
    assert cancelled(served) == before + 1
    r = served.client.completions.create(model="ft2", prompt=PROMPTS[0], max_tokens=8)
    assert r.choices[0].text == served.expected("ft2", PROMPTS[0], 8)


# -- fuzzing (hypothesis; CI runs a fixed small set, `make test-all` many random ones) ----------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "seed", "stop", "stream", "n", "logprobs", "echo", "stream_options",
           "ignore_eos", "presence_penalty", "user", "suffix"]
_scalars = (st.none() | st.booleans() | st.integers(-5, 300) | st.floats(-2, 3, allow_nan=False)
            | st.sampled_from(["ft0", "base", "nope", "", "hi", "\udc80", "x" * 300])
            | st.text(max_size=12))
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=3)
                       | st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                          "include_usage"]), c, max_size=3),
                       max_leaves=8)


@given(body=st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _values, max_size=7),
       chat=st.booleans())
def test_fuzzed_bodies_get_answers_or_4xx_never_500(served, body, chat):
    if isinstance(body.get("max_tokens"), int):  # keep each example short
        body["max_tokens"] = min(body["max_tokens"], 8)
    body.setdefault("max_tokens", 4)
    body.pop("max_completion_tokens", None) if chat else None
    content = json.dumps(body).encode()  # lone surrogates travel escaped, as clients send them
    r = httpx2.post(served.url + ("/v1/chat/completions" if chat else "/v1/completions"),
                    content=content, headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:500], body)
    if r.status_code != 200 and not body.get("stream"):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_server_still_answers_after_the_fuzzing(served):
    assert ask(served, "ft1", PROMPTS[1], 8) == served.expected("ft1", PROMPTS[1], 8)
    assert wait_idle(served)["running"] == 0


# -- metrics, deltas over HTTP, the API key ----------------------------------------------------

def metrics(served, url: str | None = None) -> dict:
    """/metrics parsed as Prometheus text: {(name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx2.get((url or served.url) + "/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_parse_as_prometheus_text_and_move_with_requests(served):
    wait_idle(served)
    before = metrics(served)
    prompt_tokens = served.server.encode(PROMPTS[1])
    r = served.client.completions.create(model="ft3", prompt=PROMPTS[1], max_tokens=5,
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    status, _ = post(served, "/v1/completions", {"model": "ft3", "prompt": "x", "temperature": -1})
    assert status == 400
    wait_idle(served)  # (the gauges come from the engine's latest snapshot)
    after = metrics(served)
    assert moved(before, after, "dzjax_requests_total", model="ft3", outcome="length") == 1
    assert moved(before, after, "dzjax_generation_tokens_total", model="ft3") == 5
    assert moved(before, after, "dzjax_prompt_tokens_total", model="ft3") == len(prompt_tokens)
    assert moved(before, after, "dzjax_time_to_first_token_seconds_count", model="ft3") == 1
    assert moved(before, after, "dzjax_inter_token_latency_seconds_count", model="ft3") == 4
    assert moved(before, after, "dzjax_request_latency_seconds_count", model="ft3") == 1
    assert moved(before, after, "dzjax_time_to_first_token_seconds_sum", model="ft3") > 0
    assert (moved(before, after, "dzjax_delta_pool_hits_total")
            + moved(before, after, "dzjax_delta_pool_misses_total")) == 1
    assert moved(before, after, "dzjax_http_responses_total", route="/v1/completions",
                 status="200") == 1
    assert moved(before, after, "dzjax_http_responses_total", route="/v1/completions",
                 status="400") == 1
    assert moved(before, after, "dzjax_decode_steps_total") >= 4
    gauges = {name: value for (name, labels), value in after.items() if not labels}
    assert gauges["dzjax_engine_up"] == 1 and gauges["dzjax_batch_rows"] == 8
    assert gauges["dzjax_requests_running"] == gauges["dzjax_requests_waiting"] == 0
    assert gauges["dzjax_kv_pages"] > 0 and gauges["dzjax_kv_bytes"] > 0
    assert gauges["dzjax_delta_pool_slots"] == 4 and 1 <= gauges["dzjax_delta_pool_resident"] <= 4


def test_metrics_and_models_answer_while_the_engine_is_busy(served):
    """A scrape or a model list never waits for the engine thread (a step compiling or
    hung): both answer while it is held in a call, and the scrape says the engine is up."""
    held, release = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(60)
    blocker = threading.Thread(target=served.server.engine.call, args=(hold,))
    blocker.start()
    try:
        assert held.wait(30)
        scrape = httpx2.get(served.url + "/metrics", timeout=10)  # (well before the release)
        assert scrape.status_code == 200 and "\ndzjax_engine_up 1.0\n" in scrape.text
        models = httpx2.get(served.url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["base"] + DELTAS
        assert not release.is_set() and blocker.is_alive()  # (still held throughout)
    finally:
        release.set()
        blocker.join(30)


def test_models_cards_have_root_parent_and_max_model_len(served):
    cards = {m["id"]: m for m in httpx2.get(served.url + "/v1/models").json()["data"]}
    assert cards["base"]["parent"] is None and Path(cards["base"]["root"]).is_dir()
    assert cards["ft1"]["parent"] == "base" and cards["ft1"]["root"].endswith("ft1.dz.safetensors")
    assert {c["max_model_len"] for c in cards.values()} == {256}


@pytest.fixture
def managed(served, tmp_path):
    """A second app over the same server: deltas managed over HTTP from tmp_path/deltas, and an
    API key."""
    directory = tmp_path / "deltas"
    directory.mkdir()
    http, thread, url = start_uvicorn(make_app(served.server, api_key="sekrit",
                                               delta_dir=directory))
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=120)
    yield types.SimpleNamespace(url=url, client=client, dir=directory)
    client.close()
    http.should_exit = True
    thread.join(timeout=30)


def admin(url: str, path: str, body: dict, key: str | None = "sekrit") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx2.post(url + path, json=body, headers=headers, timeout=120)
    return r.status_code, r.json()


def test_a_delta_is_loaded_and_unloaded_over_http(served, managed, tmp_path):
    shutil.copy(served.deltas["ft1"].path, managed.dir / "new.dz")
    status, answer = admin(managed.url, "/v1/load_lora_adapter",
                           {"lora_name": "new", "lora_path": "new.dz"})
    assert status == 200, answer
    cards = {m.id: m for m in managed.client.models.list().data}
    assert cards["new"].parent == "base" and cards["new"].root == str(managed.dir / "new.dz")
    r = managed.client.completions.create(model="new", prompt=PROMPTS[0], max_tokens=8,
                                          temperature=0)
    assert r.choices[0].text == served.expected("ft1", PROMPTS[0], 8)  # the same file
    # In use: refused (409) while a request runs on it, the request unharmed.
    stream = managed.client.completions.create(model="new", prompt=PROMPTS[0], max_tokens=LONG,
                                               stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    status, answer = admin(managed.url, "/v1/unload_delta", {"name": "new"})
    assert status == 409 and answer["error"]["code"] == "delta_in_use"
    stream.close()
    wait_idle(served)
    assert ("dzjax_generation_tokens_total", (("model", "new"),)) in metrics(served)
    status, answer = admin(managed.url, "/v1/unload_lora_adapter", {"lora_name": "new"})
    assert status == 200, answer
    assert "new" not in [m.id for m in managed.client.models.list().data]
    assert not [k for k in metrics(served) if ("model", "new") in k[1]]  # its series dropped
    with pytest.raises(openai.NotFoundError):
        managed.client.completions.create(model="new", prompt="x", max_tokens=1)
    # Loaded again under the name it had: served again.
    assert admin(managed.url, "/v1/load_delta", {"name": "new", "path": "new.dz"})[0] == 200
    assert admin(managed.url, "/v1/unload_delta", {"name": "new"})[0] == 200


def test_delta_management_refusals_name_the_problem(served, managed, tmp_path):
    outside = tmp_path / "outside.dz"
    shutil.copy(served.deltas["ft1"].path, outside)
    (managed.dir / "link.dz").symlink_to(outside)
    (managed.dir / "junk.dz").write_bytes(b"not a delta file")
    cases = [({"name": "x", "path": str(outside)}, 403, "not inside the delta directory"),
             ({"name": "x", "path": "../outside.dz"}, 403, "not inside the delta directory"),
             ({"name": "x", "path": "link.dz"}, 403, "not inside the delta directory"),
             ({"name": "x", "path": "missing.dz"}, 404, "no such delta file"),
             ({"name": "x", "path": "junk.dz"}, 400, "junk.dz"),
             ({"name": "ft0", "path": "junk.dz"}, 400, "already served"),
             ({"name": "base", "path": "junk.dz"}, 400, "already served"),
             ({"path": "junk.dz"}, 400, "name must name the delta"),
             ({"name": "x", "path": 3}, 400, "path must be a string"),
             ({"name": "x", "path": "a\0b.dz"}, 400, "NUL"),
             ({"name": "x", "path": "a" * 300}, 400, "File name too long")]
    for body, status, message in cases:
        got, answer = admin(managed.url, "/v1/load_delta", body)
        assert got == status and message in answer["error"]["message"], (body, answer)
    assert admin(managed.url, "/v1/unload_delta", {"name": "nope"})[0] == 404
    assert admin(managed.url, "/v1/unload_delta", {"name": "base"})[0] == 400
    assert [m.id for m in managed.client.models.list().data] == ["base"] + DELTAS
    # Without the flag, the endpoints are off (the module's server).
    for path in ("/v1/load_delta", "/v1/load_lora_adapter", "/v1/unload_delta"):
        status, answer = admin(served.url, path, {"name": "x", "path": "new.dz"}, key=None)
        assert status == 403 and "--delta-dir" in answer["error"]["message"]


def test_the_api_key_is_required_except_for_health_and_metrics(served, managed):
    for key in (None, "wrong", "sekrit2"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path in ("/v1/models", "/v1/models/base", "/tokenizer_info"):
            r = httpx2.get(managed.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=managed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="base", prompt="x", max_tokens=1)
    wrong.close()
    r = managed.client.completions.create(model="ft0", prompt=PROMPTS[2], max_tokens=4,
                                          temperature=0)
    assert r.choices[0].text == served.expected("ft0", PROMPTS[2], 4)
    assert httpx2.get(managed.url + "/health").status_code == 200
    assert metrics(served, managed.url)[("dzjax_engine_up", ())] == 1


def test_a_request_run_in_process_gets_the_http_answer(served):
    """`in_process.request` (how a Ray Serve replica answers what its ingress forwards) gives
    the socket's answers: a completion, a stream, a refusal, and the body's model is read."""
    app = make_app(served.server)

    def run(body: dict) -> tuple[int, dict, bytes]:
        async def collect():
            out = [m async for m in in_process.request(
                app, "POST", "/v1/completions", b"", [(b"content-type", b"application/json")],
                json.dumps(body).encode())]
            return out[0][1], {k.decode(): v.decode() for k, v in out[0][2]}, \
                b"".join(m[1] for m in out[1:])
        return asyncio.run(collect())

    ask = {"model": "ft1", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    status, headers, body = run(ask)
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["choices"][0]["text"] == served.expected("ft1", PROMPTS[1], 6)
    status, headers, body = run(dict(ask, stream=True))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == served.expected("ft1",
                                                                               PROMPTS[1], 6)
    status, _, body = run(dict(ask, temperature=-1))
    assert status == 400 and json.loads(body)["error"]["param"] == "temperature"
    assert in_process.model_of(json.dumps(ask).encode()) == "ft1"
    assert [in_process.model_of(b) for b in (b"", b"{bad", b"[1]", b'{"model": 3}')] == [""] * 4
