"""What serving over several processes costs: the same requests served on one model split over
2 devices, once by one process (`serve(mesh=make_mesh(2))`) and once by 2 processes of one
device each (`dzjax.serving.multihost`, gloo collectives on CPU), compiled, timed per decode step.

  PYTHONPATH=. python benchmarks/multihost.py [--out FILE.json]

The model is the llama test fixture with two synthetic deltas; 4 requests (2 deltas and the
base), prompts of 12 tokens, 48 tokens each. Both runs must give the same tokens.
Results: benchmarks/results/multihost-<backend>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).parent.parent
ONE_PROCESS = """
import json, sys, time
import jax.numpy as jnp, dzjax
from dzjax.models.sharding import make_mesh
deltas, requests = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
base = dzjax.load_base(sys.argv[3], dtype=jnp.float32)
with dzjax.serve(base, deltas, mesh=make_mesh(2), max_batch=4, max_seq_len=64,
                 max_resident_deltas=2) as server:
    run = lambda: [h.result().token_ids for h in [server.submit(
        r["prompt"], r["model"], max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]]
    tokens = run()
    steps, start = server.stats()["decode_steps"], time.perf_counter()
    run()
    print(json.dumps({"tokens": tokens, "timed": {"seconds": time.perf_counter() - start,
                      "decode_steps": server.stats()["decode_steps"] - steps}}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    import jax

    from conftest import fixture_dir, make_deltas

    base_dir = fixture_dir("llama")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        paths = {n: str(p) for n, p in make_deltas(base_dir, tmp, 2).items()}
        rng = np.random.default_rng(0)
        requests = [{"prompt": [int(t) for t in rng.integers(3, 200, 12)], "model": m,
                     "max_tokens": 48} for m in ["ft0", None, "ft1", "ft0"]]
        (tmp / "requests.json").write_text(json.dumps(requests))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        one = subprocess.run([sys.executable, "-c", ONE_PROCESS, json.dumps(paths),
                              str(tmp / "requests.json"), str(base_dir)], check=True,
                             capture_output=True, text=True, env={**env,
                                                                  "JAX_NUM_CPU_DEVICES": "2"})
        two = subprocess.run([sys.executable, str(ROOT / "scripts" / "multihost_serve.py"),
                              str(base_dir), "--processes", "2", "--requests",
                              str(tmp / "requests.json"), "--timed",
                              *[f"--delta={n}={p}" for n, p in paths.items()]],
                             check=True, capture_output=True, text=True, env=env)
    runs = {"one process, 2 devices": json.loads(one.stdout.strip().splitlines()[-1]),
            "2 processes, 1 device each": json.loads(two.stdout.strip().splitlines()[-1])}
    tokens = [r.pop("tokens") for r in runs.values()]
    if tokens[0] != tokens[1]:
        raise SystemExit("the two runs gave different tokens")
    for name, r in runs.items():
        t = r["timed"]
        t["ms_per_step"] = 1000 * t["seconds"] / t["decode_steps"]
        print(f"{name}: {t['ms_per_step']:.1f} ms per decode step ({t['decode_steps']} steps)")
    report = {"command": "PYTHONPATH=. python benchmarks/multihost.py",
              "backend": jax.default_backend(), "date": datetime.date.today().isoformat(),
              "requests": len(requests), "same_tokens": True, "runs": runs}
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" /
                       f"multihost-{report['backend']}-{report['date']}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
