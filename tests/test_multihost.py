"""Serving over two processes (`dzjax.serving.multihost`; jax.distributed, gloo CPU collectives):
the tokens one process gives, HTTP on process 0 only, and a lost process stopping the server
with an error that says so, not a hang."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, make_deltas

import dzjax
from dzjax.models.sharding import make_mesh
from dzjax.serving import multihost
from dzjax.serving.engine_config import EngineConfig

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "multihost_serve.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
OPTIONS = dict(max_batch=4, max_seq_len=64)  # as the script serves


def test_a_steps_arguments_go_through_a_message_unchanged():
    rng = np.random.default_rng(0)
    value = {"kind": "decode", "tables": rng.integers(0, 9, (4, 8)).astype(np.int32),
             "sampling": (rng.integers(0, 2**32, 4, dtype=np.uint32),
                          rng.random(4).astype(np.float32), np.full((4, 3), -1, np.int32)),
             "penalties": None, "num_pages": 4, "logprobs": False, "top": None,
             "nested": [1.5, "x", (np.zeros((0, 2), np.float32),)]}
    got = multihost.decode(multihost.encode(value))
    assert set(got) == set(value)
    assert type(got["sampling"]) is tuple and type(got["nested"][2]) is tuple  # (jit's cache key)
    for a, b in [(got["tables"], value["tables"]), *zip(got["sampling"], value["sampling"]),
                 (got["nested"][2][0], value["nested"][2][0])]:
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert [got[k] for k in ("penalties", "num_pages", "logprobs", "top")] == [None, 4, False,
                                                                                None]
    assert got["nested"][:2] == [1.5, "x"]


def test_a_process_started_with_other_options_is_refused_by_name(tmp_path):
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    config = lambda **o: EngineConfig(mesh=make_mesh(1), **o)
    delta = {"a": tmp_path / "a.dz.safetensors"}
    leader = multihost.hello(base, config(max_batch=4), delta)
    assert multihost.difference(leader, multihost.hello(base, config(max_batch=4), delta)) is None
    assert re.search(r"other options .*'max_batch'", multihost.difference(
        leader, multihost.hello(base, config(max_batch=8), delta)))
    assert re.search(r"other deltas .*'a'", multihost.difference(
        leader, multihost.hello(base, config(max_batch=4), {"a": tmp_path / "b.dz"})))
    assert not multihost.spans_processes(make_mesh(1)) and not multihost.spans_processes(None)


def test_two_processes_started_differently_both_refuse_before_serving(tmp_path):
    """Process 1 with another max_batch: both processes stop with the difference named,
    before anything is placed on the mesh (a collective of mismatched shapes would abort)."""
    paths = make_deltas(fixture_dir("llama"), tmp_path, 1)
    (tmp_path / "requests.json").write_text("[]")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(fixture_dir("llama")), "--processes", "2",
         f"--delta=ft0={paths['ft0']}", "--requests", str(tmp_path / "requests.json"),
         "--follower-max-batch", "8"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert done.returncode != 0
    message = "process 1 was started with other options than process 0 (differing: ['max_batch'])"
    assert done.stderr.count(message) == 2, done.stderr[-3000:]  # raised on both processes


def test_two_processes_serve_what_one_does_and_stop_when_one_is_lost(tmp_path):
    """Three deltas over two slots (loads and evictions replayed), base-only and sampled
    requests: process 0's tokens equal one process's. Then process 1 is killed while the server
    is idle: its heartbeat stops, the server stops with an error naming it."""
    paths = make_deltas(fixture_dir("llama"), tmp_path, 3)
    rng = np.random.default_rng(1)
    requests = [{"prompt": [int(t) for t in rng.integers(3, 200, int(rng.integers(2, 21)))],
                 "model": m, "max_tokens": 12} for m in ["ft0", None, "ft1", "ft2", "ft0", "ft2"]]
    requests[1].update(temperature=0.8, seed=7)
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(fixture_dir("llama")), "--processes", "2",
         *[f"--delta={n}={p}" for n, p in paths.items()], "--requests",
         str(tmp_path / "requests.json"), "--kill-follower", "--worker-timeout", "3"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["processes"] == 2
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    with dzjax.serve(base, paths, max_resident_deltas=2, **OPTIONS) as server:
        handles = [server.submit(r["prompt"], r["model"], max_tokens=r["max_tokens"],
                                 temperature=r.get("temperature", 0.0), seed=r.get("seed"),
                                 ignore_eos=True) for r in requests]
        alone = [h.result().token_ids for h in handles]
    assert report["tokens"] == alone
    assert "process 1 of 2 stopped answering (no heartbeat for 3 s)" in report["stopped_by"]
    assert report["stopped_after_s"] < 30
    assert report["then"].startswith("ServerClosedError")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dzjax_serve_over_two_processes_answers_on_process_0_and_exits_when_one_is_lost(
        tmp_path):
    """`dzjax serve --coordinator ...` on two processes: process 0 answers HTTP as one process
    would; killing process 1 mid-request ends that request with an error and process 0 exits
    with one (code 2), instead of waiting."""
    base_dir = fixture_dir("trained") / "base"
    paths = make_deltas(base_dir, tmp_path, 1)
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dzjax.cli", "serve", str(base_dir), f"--delta=ft0={paths['ft0']}",
         "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
         "--port", "0", "--weights-dtype", "float32", "--max-seq-len", "128",
         "--worker-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        for i in range(2)]
    try:
        url = None
        for line in procs[0].stdout:  # "dzjax: serving base, ft0 at http://127.0.0.1:PORT/v1"
            if m := re.search(r"at (http://\S+/v1)", line):
                url = m.group(1)
                break
        assert url, procs[0].stderr.read()[-3000:]
        body = {"model": "ft0", "prompt": "def main(", "max_tokens": 12, "temperature": 0}
        answer = httpx2.post(url + "/completions", json=body, timeout=120).json()
        base = dzjax.load_base(base_dir, dtype=jnp.float32)
        expected = dzjax.generate(base, ["def main("], delta=dzjax.load_delta(paths["ft0"]),
                                  max_tokens=12)[0]
        assert answer["choices"][0]["text"] == expected

        long = dict(body, max_tokens=100, ignore_eos=True, stream=True)
        with httpx2.stream("POST", url + "/completions", json=long, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # it runs
            procs[1].kill()
            killed = time.monotonic()
            rest = [line for line in lines if line]
        assert any('"error"' in line for line in rest), rest[-3:]
        assert rest[-1] == "data: [DONE]"
        assert procs[0].wait(timeout=60) == 2
        assert time.monotonic() - killed < 30
        err = procs[0].stderr.read()
        assert "dzjax serve: error: the serving engine stopped:" in err and "the server stops" \
            in err, err[-3000:]
        assert "serving" not in procs[1].stdout.read()  # HTTP on process 0 only
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id go"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0",
      "--replicas", "2"], "--replicas and --coordinator cannot be combined"),
    (["--worker-timeout", "5"], "--worker-timeout goes with --coordinator"),
])
def test_serve_flags_that_do_not_go_together_are_refused_by_name(flags, message, capsys):
    from dzjax.cli import main
    assert main(["serve", str(fixture_dir("trained") / "base"), *flags]) == 2
    assert message in capsys.readouterr().err
