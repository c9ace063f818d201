"""Replicas on Ray Serve (`dzjax.serving.ray_serve`): a local Ray cluster on CPU with two
replicas of the base and four deltas, two device slots each. Every answer equals `generate`'s,
requests go to the replica that holds their delta, and a replica killed under load loses no
request (slow: a Ray cluster and two servers start; they need the `ray` extra). The command
line's refusals run in the default run, without Ray."""

import concurrent.futures
import os
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
    paths = make_deltas(base_dir, tmp_path, 1)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "dzjax.cli", "serve", str(base_dir), "--delta",
               f"ft0={paths['ft0']}", "--replicas", "2", "--port", str(port),
               "--max-seq-len", "128", "--max-batch", "4", "--api-key", "sesame"]
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
        text = ask(client, "ft0", PROMPTS[0], 6)
        base = dzjax.load_base(base_dir)
        assert text == dzjax.generate(base, [PROMPTS[0]], max_tokens=6,
                                      delta=dzjax.load_delta(paths["ft0"]))[0]
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
    paths = make_deltas(base_dir, tmp, 4)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_serve.application(base_dir, paths, num_replicas=2, max_batch=4,
                                    max_seq_len=128, max_resident_deltas=2),
              name="dzjax", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    base = dzjax.load_base(base_dir)
    deltas = {name: dzjax.load_delta(p) for name, p in paths.items()}

    def expected(model: str, prompt: str, max_tokens: int) -> str:
        return dzjax.generate(base, [prompt], delta=deltas.get(model), max_tokens=max_tokens)[0]
    yield url, client, expected, sorted(paths)
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
    url, client, expected, names = cluster
    models = ["base", *names]
    assert sorted(m.id for m in client.models.list().data) == sorted(models)
    work = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda w: ask(client, *w, 8), work))
    for (model, prompt), answer in zip(work, answers):
        assert answer == expected(model, prompt, 8), (model, prompt)
    stream = client.completions.create(model=names[0], prompt=PROMPTS[0], max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected(names[0], PROMPTS[0], 8)
    s = stats(url)
    assert s["requests"] >= 32 and s["failed"] == 0
    deltas = s["hits"] + s["misses"]
    assert deltas == sum(m != "base" for m, _ in work) + 1  # base requests are not counted
    assert len(s["by_replica"]) == 2  # both replicas answered
    # Four deltas fit the two replicas' four slots: after each is first taken on, they stay.
    assert s["hit_rate"] >= 0.6, s
    print("ray serve routing:", s)


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_request(cluster):
    import ray

    url, client, expected, names = cluster
    before = stats(url)
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


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2", "--delta-dir", "."], "--delta-dir cannot be used with --replicas"),
    (["--replicas", "2", "--tensor-parallel", "2"], "--tensor-parallel cannot be used"),
    (["--replicas", "2", "--autoscaling-config", '{"max_replicas": 2}'], "not both"),
])
def test_options_replicas_cannot_take_are_refused_by_name(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("DZJAX_API_KEY", raising=False)
    assert main(["serve", str(fixture_dir("trained") / "base"), *flags]) != 0
    assert message in capsys.readouterr().err
