"""What the integrity checks cost at load: the delta file's content hashes, and the base digest.

    JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/integrity.py [--layers 8]
        [--hidden 1024] [--intermediate 2816] [--vocab 32000] [--out FILE.json]

Builds (in a temporary folder) a random bf16 Llama base of the given size and one 4-bit 2:4 delta
of it (round-to-nearest, for speed), then times, medians of 3 (files in the page cache):
  - `load_delta` as it is (every stored array hashed with xxh3-128 and checked), and with the
    hashing replaced by a no-op: the difference is what the checks cost;
  - `load_base`, and the digest of every weight it computes while reading (timed alone on the
    same tensors);
  - xxh3-128 and sha256 throughput on this machine, for scale.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import xxhash

from dzjax.compress import delta_file
from dzjax.compress.pipeline import convert
from dzjax.models import fingerprint
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM
from dzjax.models.loading import load_base
from dzjax.models.safetensors_io import SafetensorsFile
from dzjax.models.saving import save_hf


def median_s(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", type=pathlib.Path, default=None)
    a = p.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dzjax-integrity-"))
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=a.vocab,
                         hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_layers=a.layers, num_heads=a.hidden // 64,
                         num_kv_heads=a.hidden // 64, head_dim=64, rms_norm_eps=1e-5,
                         rope=RopeConfig(theta=10000.0), max_position_embeddings=2048)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = CausalLM(config).init(jax.random.key(0), ids, ids)["params"]
    save_hf(tmp / "base", config, params, dtype=jnp.bfloat16)
    moved = jax.tree.map(lambda w: w * 1.02, params)
    save_hf(tmp / "ft", config, moved, dtype=jnp.bfloat16)
    del params, moved
    path = tmp / "ft.dz.safetensors"
    convert(tmp / "base", tmp / "ft", path, method="rtn", progress=False,
            calibration=np.random.default_rng(0).integers(0, a.vocab, (2, 16)))

    checked = median_s(lambda: delta_file.load_delta(path))
    def stored_unchecked(self, key):  # `_TensorReader._stored` without the hash
        self.unused.discard(key)
        return self.sf.read(key)
    real = delta_file._TensorReader._stored
    delta_file._TensorReader._stored = stored_unchecked
    try:
        unchecked = median_s(lambda: delta_file.load_delta(path))
    finally:
        delta_file._TensorReader._stored = real

    base_s = median_s(lambda: load_base(tmp / "base"), repeats=2)
    sf = SafetensorsFile(tmp / "base" / "model.safetensors")
    arrays = {k: sf.read(k) for k in sf.keys()}

    def digest():
        d = fingerprint.WeightsDigest()
        for k, v in arrays.items():
            d.add(k, v)
        return d.hexdigest()
    digest_s = median_s(digest)
    blob = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8).tobytes()
    xxh_gbs = len(blob) / median_s(lambda: xxhash.xxh3_128(blob).digest()) / 1e9
    sha_gbs = len(blob) / median_s(lambda: hashlib.sha256(blob).digest()) / 1e9

    report = {
        "what": "load-time cost of the integrity checks (delta content hashes, base digest)",
        "command": "JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/integrity.py "
                   + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(),
        "model": {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate,
                  "vocab": a.vocab, "base_bytes": (tmp / "base" / "model.safetensors").stat().st_size,
                  "delta_bytes": path.stat().st_size},
        "load_delta_s": {"checked": checked, "hashing_skipped": unchecked,
                         "cost_fraction": (checked - unchecked) / unchecked},
        "load_base_s": base_s, "base_digest_s": digest_s,
        "base_digest_fraction_of_load": digest_s / base_s,
        "xxh3_128_gb_per_s": xxh_gbs, "sha256_gb_per_s": sha_gbs,
    }
    out = a.out or pathlib.Path(
        f"benchmarks/results/integrity-{jax.default_backend()}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
