"""Replicas on Ray Serve (`dzjax.serving.ray_serve`): a local Ray cluster on CPU with two
replicas of the base and four deltas, two device slots each. Every answer equals `generate`'s,
requests go to the replica that holds their delta, a replica killed under load loses no
request, and deltas loaded and unloaded over HTTP are served by every replica, or by none
(slow: a Ray cluster and two servers start; they need the `ray` extra). The command line's
replicas split their model over two CPU devices each. The refusals run in the default run,
without Ray."""

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from conftest import fixture_dir, make_deltas

import dzjax
from dzjax.cli import main

PROMPTS = ["Once upon a time", "def main(", "The cat sat on"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_command_line_serves_replicas_until_stopped(tmp_path):
    """`dzjax serve --replicas 2`: answers over HTTP, and SIGTERM shuts Serve down (run before
    the module's cluster starts: the command starts its own)."""
    pytest.importorskip("ray")
    base_dir = fixture_dir("trained") / "base"
    paths = make_deltas(base_dir, tmp_path, 2)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "dzjax.cli", "serve", str(base_dir), "--delta",
               f"ft0={paths['ft0']}", "--replicas", "2", "--port", str(port),
               "--max-seq-len", "128", "--max-batch", "4", "--api-key", "sesame",
               "--tensor-parallel", "2", "--delta-dir", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "serving on Ray Serve" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1], "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{port}"
        # The API key: required by the ingress (not routed without it), but not of /health.
        for path, key in (("/v1/models", None), ("/v1/ray/stats", "wrong")):
            headers = {} if key is None else {"authorization": f"Bearer {key}"}
            r = httpx2.get(url + path, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx2.get(url + "/health", timeout=60).status_code == 200
        routed = httpx2.get(url + "/v1/ray/stats", timeout=60,
                            headers={"authorization": "Bearer sesame"}).json()["requests"]
        assert routed == 1  # /health; the two refused were not routed
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0,
                               timeout=300)
        base = dzjax.load_base(base_dir)
        # --delta-dir: a delta loaded over HTTP (through the ingress, with the key).
        loaded = httpx2.post(url + "/v1/load_delta", timeout=300,
                             headers={"authorization": "Bearer sesame"},
                             json={"name": "ft1", "path": paths["ft1"].name})
        assert loaded.status_code == 200, loaded.text
        for name in ("ft0", "ft1"):
            delta = dzjax.load_delta(paths[name])
            assert ask(client, name, PROMPTS[0], 6) == dzjax.generate(
                base, [PROMPTS[0]], max_tokens=6, delta=delta)[0], name
        # --tensor-parallel 2: each replica split its model over 2 devices (base requests go
        # to either replica: sent until both answered).
        want = dzjax.generate(base, [PROMPTS[1]], max_tokens=6)[0]
        for _ in range(40):
            assert ask(client, "base", PROMPTS[1], 6) == want
            replicas = httpx2.get(url + "/v1/ray/stats", timeout=60, headers={
                "authorization": "Bearer sesame"}).json()["replicas"]
            if len(replicas) == 2:
                break
        assert [r["devices"] for r in replicas.values()] == [2, 2], replicas
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from dzjax.serving import ray_serve

    tmp = tmp_path_factory.mktemp("ray")
    base_dir = fixture_dir("trained") / "base"
    paths = make_deltas(base_dir, tmp, 5)  # ft4: loaded over HTTP by a test
    served = {name: path for name, path in paths.items() if name != "ft4"}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_serve.application(base_dir, served, num_replicas=2, max_batch=4,
                                    max_seq_len=128, max_resident_deltas=2, delta_dir=tmp),
              name="dzjax", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    base = dzjax.load_base(base_dir)
    deltas = {name: dzjax.load_delta(p) for name, p in paths.items()}

    def expected(model: str, prompt: str, max_tokens: int) -> str:
        return dzjax.generate(base, [prompt], delta=deltas.get(model), max_tokens=max_tokens)[0]
    yield url, client, expected, sorted(served), tmp, {}  # (the last: what tests pass on)
    client.close()
    serve.shutdown()
    ray.shutdown()


def ask(client, model: str, prompt: str, max_tokens: int) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0).choices[0].text


def stats(url: str) -> dict:
    return httpx2.get(url + "/v1/ray/stats", timeout=30).json()


@pytest.mark.slow
def test_every_request_is_answered_as_generate_would_and_routed_to_its_delta(cluster):
    url, client, expected, names, _, shared = cluster
    models = ["base", *names]
    assert sorted(m.id for m in client.models.list().data) == sorted(models)
    for name in names:  # each taken on once (a miss), then Ray's routers learn where it is
        assert ask(client, name, PROMPTS[0], 2) == expected(name, PROMPTS[0], 2)
    time.sleep(2.0)
    before = stats(url)
    work = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda w: ask(client, *w, 8), work))
    for (model, prompt), answer in zip(work, answers):
        assert answer == expected(model, prompt, 8), (model, prompt)
    stream = client.completions.create(model=names[0], prompt=PROMPTS[0], max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected(names[0], PROMPTS[0], 8)
    s = stats(url)
    assert s["requests"] >= 36 and s["failed"] == 0
    hits, misses = s["hits"] - before["hits"], s["misses"] - before["misses"]
    assert hits + misses == sum(m != "base" for m, _ in work) + 1  # base: not counted
    assert len(s["by_replica"]) == 2  # both replicas answered
    # Four deltas fit the two replicas' four slots: taken on once, they stay.
    assert hits / (hits + misses) >= 0.6, (hits, misses, s)
    print(f"ray serve routing: {hits} hits, {misses} misses after the first loads:", s)


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_request(cluster):
    import ray

    url, client, expected, names, _, shared = cluster
    before = stats(url)
    shared["replicas before the kill"] = set(before["by_replica"])
    work = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, client, model, prompt, 48) for model, prompt in work]
        time.sleep(1.0)  # requests are running on both replicas
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "DeltaReplica" in a["name"]]
        assert len(replicas) == 2, replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]),
                 no_restart=True)
        answers = [f.result() for f in futures]
    for (model, prompt), answer in zip(work, answers):
        assert answer == expected(model, prompt, 48), (model, prompt)
    after = stats(url)
    assert after["failed"] == before["failed"] and after["retries"] > before["retries"], after
    print("after the kill:", after)


def wait_for_replicas(count: int, timeout: float = 300.0) -> None:
    """Until `count` replicas run (one killed is started again by Serve)."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = serve.status().applications["dzjax"].deployments["DeltaReplica"].replica_states
        if states.get("RUNNING", 0) == count:
            return
        time.sleep(1.0)
    raise AssertionError(f"not {count} replicas running after {timeout} s: {states}")


def complete(url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, dict, str]:
    """A completion over plain HTTP: status, the error or the text, and the replica."""
    r = httpx2.post(url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    body = r.json()
    answer = body["choices"][0]["text"] if r.status_code == 200 else body["error"]
    return r.status_code, answer, r.headers.get("x-dzjax-replica")


def manage(url: str, path: str, body: dict) -> tuple[int, dict]:
    r = httpx2.post(url + path, json=body, timeout=300)
    return r.status_code, r.json()


@pytest.mark.slow
def test_deltas_loaded_over_http_are_served_by_every_replica_and_unloaded_by_all(cluster):
    """Run after the kill: one replica is the restarted one, built with the deltas given at
    deployment, and serves the loaded delta from its first request."""
    url, client, expected, names, tmp, shared = cluster
    wait_for_replicas(2)
    (tmp / "junk.dz.safetensors").write_bytes(b"not a delta file")
    assert manage(url, "/v1/load_delta", {"name": "ft4", "path": "ft4.dz.safetensors"}) == (
        200, {"id": "ft4", "object": "model", "status": "loaded",
              "root": str((tmp / "ft4.dz.safetensors").resolve())})
    for body, status, code in [
            ({"name": "ft4", "path": "ft4.dz.safetensors"}, 400, None),  # taken
            ({"name": "x", "path": "../x.dz"}, 403, "outside_delta_dir"),
            ({"name": "x", "path": "none.dz"}, 404, "file_not_found"),
            ({"name": "x", "path": "junk.dz.safetensors"}, 400, None),  # read on a replica
            ({"name": "x"}, 400, None)]:
        got, answer = manage(url, "/v1/load_delta", body)
        assert (got, answer["error"]["code"]) == (status, code), (body, answer)
    assert sorted(m.id for m in client.models.list().data) == ["base", *names, "ft4"]
    # 16 long requests at once: a replica takes 8 at a time, so both serve ft4.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: complete(url, "ft4", PROMPTS[i % 3], 40), range(16)))
    for i, (status, text, _) in enumerate(answers):
        assert (status, text) == (200, expected("ft4", PROMPTS[i % 3], 40))
    replicas = {replica for *_, replica in answers}
    assert len(replicas) == 2, answers
    assert replicas - shared["replicas before the kill"], "the restarted replica answered"

    # Unloaded while a stream runs on it: the stream ends as generate's; new requests are
    # refused at once (404), the listing drops it, a second unload finds nothing.
    stream = client.completions.create(model="ft4", prompt=PROMPTS[0], max_tokens=64,
                                       temperature=0, stream=True)
    first = next(iter(stream)).choices[0].text
    assert manage(url, "/v1/unload_delta", {"name": "ft4"}) == (
        200, {"id": "ft4", "object": "model", "status": "unloaded"})
    assert first + "".join(c.choices[0].text for c in stream) == expected("ft4", PROMPTS[0], 64)
    status, error, _ = complete(url, "ft4", PROMPTS[0], 4)
    assert (status, error["code"]) == (404, "model_not_found"), error
    assert "ft4" not in error["message"].split("served:")[1]
    assert httpx2.get(url + "/v1/models/ft4", timeout=60).status_code == 404
    assert sorted(m.id for m in client.models.list().data) == ["base", *names]
    assert manage(url, "/v1/unload_delta", {"name": "ft4"})[0] == 404
    assert manage(url, "/v1/unload_delta", {"name": "base"})[0] == 400

    # vLLM's LoRA endpoints, the same file under another name.
    assert manage(url, "/v1/load_lora_adapter", {"lora_name": "again",
                                                 "lora_path": "ft4.dz.safetensors"})[0] == 200
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: complete(url, "again", PROMPTS[1], 24), range(16)))
    assert {(status, text) for status, text, _ in answers} == {
        (200, expected("ft4", PROMPTS[1], 24))}
    assert manage(url, "/v1/unload_lora_adapter", {"lora_name": "again"})[0] == 200
    assert sorted(m.id for m in client.models.list().data) == ["base", *names]

    # Unloaded, the file replaced, loaded again under the same name: every replica reads the
    # new file (16 requests at once: on both).
    for source in ("ft0", "ft1"):
        shutil.copyfile(tmp / f"{source}.dz.safetensors", tmp / "swap.dz.safetensors")
        assert manage(url, "/v1/load_delta", {"name": "swap",
                                              "path": "swap.dz.safetensors"})[0] == 200
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: complete(url, "swap", PROMPTS[2], 40), range(16)))
        assert {(status, text) for status, text, _ in answers} == {
            (200, expected(source, PROMPTS[2], 40))}, source
        assert len({replica for *_, replica in answers}) == 2
        assert manage(url, "/v1/unload_delta", {"name": "swap"})[0] == 200


def test_replicas_and_autoscaling_are_not_given_together(capsys, monkeypatch):
    monkeypatch.delenv("DZJAX_API_KEY", raising=False)
    assert main(["serve", str(fixture_dir("trained") / "base"), "--replicas", "2",
                 "--autoscaling-config", '{"max_replicas": 2}']) != 0
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"mesh": "a mesh"}, "give tensor_parallel=N"),
    ({"tensor_parallel": 0}, "tensor_parallel must be an integer >= 1"),
    ({"delta_dir": "/no/such/dir"}, "delta directory /no/such/dir: no such directory"),
])
def test_what_replicas_cannot_take_is_refused_by_name(options, message):
    pytest.importorskip("ray")
    from dzjax.serving import ray_serve

    with pytest.raises(dzjax.DzjaxError, match=message):
        ray_serve.application(fixture_dir("trained") / "base", {}, **options)
