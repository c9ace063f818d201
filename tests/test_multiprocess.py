"""Two processes on localhost (jax.distributed, gloo CPU collectives) form one mesh of two
devices; tensor-parallel generation over it gives the single-process tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from conftest import fixture_dir, make_deltas

import dzjax

SCRIPT = Path(__file__).parent.parent / "scripts" / "multiprocess_generate.py"


# Slow (CI time): 22 s; two processes under jax.distributed, each compiling the model.
@pytest.mark.slow
def test_two_processes_generate_what_one_does(tmp_path):
    paths = make_deltas(fixture_dir("llama"), tmp_path, 1)
    prompts = [[1, 15, 27, 3], [1, 99, 4]]
    out = tmp_path / "tokens.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(fixture_dir("llama")), "--delta", str(paths["ft0"]),
         "--processes", "2", "--prompts", json.dumps(prompts), "--max-tokens", "6",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent.parent,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["processes"] == 2
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    alone = dzjax.generate(base, prompts, max_tokens=6, delta=dzjax.load_delta(paths["ft0"]),
                           stop_at_eos=False)
    assert json.loads(out.read_text()) == report["tokens"] == alone
