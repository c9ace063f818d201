"""The decode hot path against the KV cache: step time by capacity and by length, and how many
requests fit in a fixed KV memory budget.

    JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/kv_cache.py [--layers 4]
        [--hidden 512] [--batch 8] [--budget-tokens 2048] [--out FILE.json]

1. The base-only decode step (`steps.decode`, XLA path) of a random Llama (hidden 512, 4 layers,
   like the issue's) over `--batch` rows: every row at 64 tokens with a cache of capacity
   256 / 1024 / 4096 / 8192 positions per row (`dzjax.bench.decode_step.cache_table`), and rows at
   64 / 512 / 2048 tokens with capacity 4096. Medians of `--repeats`.
2. Concurrency in a fixed budget: a server whose KV pool holds `--budget-tokens` positions
   (kv_pages = budget / page_size) and `max_batch` 32, serving 64 requests of mixed lengths
   (prompts 8-120, outputs 8-64 tokens) at once; the most requests that ran at once, against what
   slots of max_seq_len (the layout before paging: each row reserved max_seq_len positions) fit in
   the same budget. Preemptions are counted; every output is checked against a roomy server's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.bench.decode_step import cache_table
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM
from dzjax.models.loading import Base
from dzjax.serving.server import serve


def random_base(layers: int, hidden: int, vocab: int = 4096, context: int = 8192) -> Base:
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=hidden * 11 // 4, num_layers=layers,
                         num_heads=hidden // 64, num_kv_heads=hidden // 64, head_dim=64,
                         rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                         max_position_embeddings=context)
    ids = jnp.zeros((1, 1), jnp.int32)
    return Base(config=config, params=CausalLM(config).init(jax.random.key(0), ids, ids)["params"])


def concurrency(base: Base, budget_tokens: int, page_size: int = 16, max_seq_len: int = 256):
    rng = np.random.default_rng(0)
    requests = [([int(t) for t in rng.integers(3, base.config.vocab_size, int(n))], int(m))
                for n, m in zip(rng.integers(8, 121, 64), rng.integers(8, 65, 64))]
    common = dict(max_batch=32, max_seq_len=max_seq_len, dtype="float32", page_size=page_size)

    def run(**options):
        with serve(base, {}, **common, **options) as server:
            handles = [server.submit(p, max_tokens=m, ignore_eos=True) for p, m in requests]
            outputs = [h.result().token_ids for h in handles]
            return outputs, server.stats()["kv"]

    roomy, _ = run()
    tight, kv = run(kv_pages=budget_tokens // page_size)
    return {"budget_tokens": budget_tokens, "page_size": page_size, "max_seq_len": max_seq_len,
            "requests": len(requests), "max_batch": common["max_batch"],
            "max_running_paged": kv["max_running"], "preemptions": kv["preemptions"],
            "fit_with_slots_of_max_seq_len": budget_tokens // max_seq_len,
            "ratio": kv["max_running"] / max(1, budget_tokens // max_seq_len),
            "outputs_equal_a_roomy_server": tight == roomy}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-tokens", type=int, default=2048)
    p.add_argument("--out", type=pathlib.Path, default=None)
    a = p.parse_args()
    base = random_base(a.layers, a.hidden)
    table = cache_table(base, batch=a.batch, dtype="float32", implementation="xla",
                        repeats=a.repeats)
    report = {
        "what": "decode step against KV capacity and length; concurrency in a fixed KV budget",
        "command": "JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/kv_cache.py "
                   + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "model": {"layers": a.layers, "hidden": a.hidden},
        "decode_step": table,
        "concurrency": concurrency(base, a.budget_tokens),
    }
    out = a.out or pathlib.Path(
        f"benchmarks/results/kv-cache-{jax.default_backend()}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
