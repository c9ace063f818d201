"""Logit parity of the Flax models with HF transformers' torch implementation (committed fixtures).

    .venv/bin/python benchmarks/parity.py    # writes benchmarks/results/parity.json
"""

import json
import platform
import sys
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dzjax

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def parity(name: str, dtype) -> dict:
    base = dzjax.load_base(FIXTURES / name, dtype=dtype)
    with np.load(FIXTURES / name / "reference.npz") as ref:
        logits = np.asarray(dzjax.logits(base, ref["input_ids"], dtype=dtype))
        err = np.abs(logits - ref["logits"])
        return {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                "max_abs_logit": float(np.abs(ref["logits"]).max())}


def main() -> None:
    names = ["llama", "llama3", "mistral", "qwen2", "qwen3", "llama_ft"]
    results = {
        "date": date.today().isoformat(), "device": jax.devices()[0].device_kind,
        "platform": platform.platform(), "jax": jax.__version__,
        "float32": {n: parity(n, jnp.float32) for n in names},
        "bfloat16": {n: parity(n, jnp.bfloat16) for n in names},
    }
    out = ROOT / "benchmarks" / "results" / "parity.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for dtype in ("float32", "bfloat16"):
        for n, r in results[dtype].items():
            print(f"{dtype:9s} {n:9s} max |err| {r['max_abs_err']:.2e}  "
                  f"(logits up to {r['max_abs_logit']:.1f})")
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
