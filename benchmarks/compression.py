"""Compression benchmarks: OBS speed per matrix, and peak host memory of a convert vs depth.

    .venv/bin/python benchmarks/compression.py speed            # 4096x4096 and 11008x4096
    .venv/bin/python benchmarks/compression.py memory           # convert of 2, 4, 8, 16 layers
    .venv/bin/python benchmarks/compression.py quality          # the quality/size table

Each writes benchmarks/results/compression-<what>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _header() -> dict:
    return {"date": date.today().isoformat(), "device": jax.devices()[0].device_kind,
            "platform": platform.platform(), "jax": jax.__version__}


def _write(what: str, results: dict) -> Path:
    device = jax.devices()[0].platform
    out = RESULTS / f"compression-{what}-{device}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)
    return out


def speed(args) -> dict:
    """Seconds to compress one matrix (Hessian given), after compilation."""
    from dzjax.compress.obs import ObsConfig, obs_prune_quantize

    rows = []
    for k, n in [(4096, 4096), (11008, 4096)]:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2 * k, k)).astype(np.float32)
        h = jnp.asarray(2 * x.T @ x / len(x))
        w = jnp.asarray(rng.normal(scale=1e-3, size=(k, n)).astype(np.float32))
        for label, cfg in [("4bit-g128-2:4", ObsConfig(bits=4, group_size=128, sparsity="2:4")),
                           ("4bit-g128", ObsConfig(bits=4, group_size=128))]:
            t0 = time.perf_counter()
            jax.block_until_ready(obs_prune_quantize(w, h, cfg).w_hat)
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(obs_prune_quantize(w, h, cfg).w_hat)
                times.append(time.perf_counter() - t0)
            rows.append({"K": k, "N": n, "settings": label, "seconds": min(times),
                         "first_call_seconds": first})
            print(f"K={k:5d} N={n} {label:14s} {min(times):7.2f} s (first call {first:.2f} s)")
    return {**_header(), "what": "OBS prune+quantize of one [K, N] matrix, Hessian given",
            "rows": rows}


def synthetic_pair(out: Path, layers: int, hidden: int, intermediate: int, vocab: int = 4096):
    """A random bf16 base and a fine-tune of it (base + 1e-2 relative noise), as HF dirs."""
    from dzjax.models.config import ModelConfig, RopeConfig
    from dzjax.models.llama import CausalLM
    from dzjax.models.saving import save_hf

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=intermediate, num_layers=layers, num_heads=8,
                         num_kv_heads=4, head_dim=hidden // 8, rms_norm_eps=1e-5,
                         rope=RopeConfig(theta=10000.0), max_position_embeddings=1024)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = CausalLM(config, param_dtype=jnp.bfloat16).init(jax.random.key(0), ids, ids)["params"]
    save_hf(out / "base", config, params)
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    params = jax.tree.map(
        lambda p: (p + 2e-4 * jax.random.normal(next(keys), p.shape)).astype(p.dtype), params)
    save_hf(out / "finetune", config, params)


def _convert_peak_rss(work: Path) -> float:
    """Peak resident memory (MiB) of a fresh process converting work/finetune against work/base."""
    code = ("import resource, dzjax; dzjax.convert({b!r}, {f!r}, {o!r}, n_samples=16, seq_len=256,"
            " progress=False); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)").format(
        b=str(work / "base"), f=str(work / "finetune"), o=str(work / "delta.dz"))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def memory(args) -> dict:
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            synthetic_pair(work, layers, args.hidden, args.intermediate)
            size = sum(p.stat().st_size for p in (work / "finetune").iterdir())
            t0 = time.perf_counter()
            peak = _convert_peak_rss(work)
            rows.append({"layers": layers, "checkpoint_mib": size / 2**20, "peak_rss_mib": peak,
                         "seconds": time.perf_counter() - t0})
            print(f"{layers:3d} layers: checkpoint {size / 2**20:7.1f} MiB, "
                  f"peak RSS {peak:7.1f} MiB, {rows[-1]['seconds']:.1f} s")
    return {**_header(), "what": "peak host memory of a whole convert vs model depth",
            "hidden": args.hidden, "intermediate": args.intermediate, "rows": rows}


QUALITY_SETTINGS = {
    "4bit 2:4 g128": dict(bits=4, sparsity="2:4", group_size=128),
    "2bit 2:4 g128": dict(bits=2, sparsity="2:4", group_size=128),
    "4bit per-channel dense": dict(bits=4, sparsity=None, group_size=None),
    "2bit g128": dict(bits=2, sparsity=None, group_size=128),
    "4bit 50% unstructured g128": dict(bits=4, sparsity=0.5, group_size=128),
}


def quality(args) -> dict:
    """Perplexity on held-out text of base + compressed delta, OBS vs round-to-nearest."""
    import zstandard

    import dzjax
    from dzjax.compress.calibration import embedded_corpus
    from dzjax.compress.evaluate import perplexity, token_windows

    trained = ROOT / "tests" / "fixtures" / "trained"
    split = json.loads((trained / "split.json").read_text())
    docs = embedded_corpus("code")
    train_docs, held_out = docs[:split["train_docs"]], docs[split["train_docs"]:]
    base = dzjax.load_base(trained / "base", dtype=jnp.float32)
    finetune = dzjax.load_base(trained / "code_ft", dtype=jnp.float32)
    windows = token_windows(base.tokenizer, held_out, 128)
    reference = {"base": perplexity(base, windows), "finetune": perplexity(finetune, windows)}
    print(f"held-out code perplexity: base {reference['base']:.2f}, "
          f"fine-tune {reference['finetune']:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, settings in QUALITY_SETTINGS.items():
            for method in ("obs", "rtn"):
                t0 = time.perf_counter()
                delta = dzjax.convert(trained / "base", trained / "code_ft", Path(tmp) / "d.dz",
                                      calibration=train_docs, n_samples=args.n_samples,
                                      seq_len=128, method=method, progress=False, **settings)
                report = delta.metadata["report"]
                raw = (Path(tmp) / "d.dz").read_bytes()
                zstd_bytes = len(zstandard.ZstdCompressor(level=19).compress(raw))
                rows.append({
                    "settings": label, "method": method,
                    "perplexity": perplexity(base, windows, delta),
                    "mean_relative_error": report["mean_relative_error"],
                    "bits_per_weight": report["bits_per_weight"],
                    "ratio_vs_bf16": report["ratio_vs_bf16"],
                    "ratio_vs_finetune_files": report["ratio_vs_finetune_files"],
                    "file_bytes": report["file_bytes"],
                    "zstd_file_bytes": zstd_bytes,  # what a lossless stage at rest would give
                    "zstd_gain": round(1 - zstd_bytes / len(raw), 4),
                    "convert_seconds": round(time.perf_counter() - t0, 1),
                })
                r = rows[-1]
                print(f"{label:28s} {method}: ppl {r['perplexity']:.2f}, rel. err "
                      f"{r['mean_relative_error']:.3f}, {r['bits_per_weight']:.2f} bits/weight, "
                      f"{r['ratio_vs_bf16']:.2f}x vs bf16, zstd -{100 * r['zstd_gain']:.1f}%")
        # Calibration data: the fine-tune's own text (above), out-of-domain English, random ids.
        calibrations = {"embedded prose (out of domain)": embedded_corpus("prose"),
                        "random token ids": np.random.default_rng(0).integers(
                            0, base.config.vocab_size, (args.n_samples, 128))}
        for label, calibration in calibrations.items():
            delta = dzjax.convert(trained / "base", trained / "code_ft", Path(tmp) / "c.dz",
                                  calibration=calibration, n_samples=args.n_samples, seq_len=128,
                                  progress=False, **QUALITY_SETTINGS["4bit 2:4 g128"])
            rows.append({"settings": "4bit 2:4 g128", "method": "obs", "calibration": label,
                         "perplexity": perplexity(base, windows, delta),
                         "mean_relative_error": delta.metadata["report"]["mean_relative_error"]})
            print(f"4bit 2:4 g128 obs, calibrated on {label}: ppl {rows[-1]['perplexity']:.2f}")
    return {**_header(), "what": "held-out perplexity of base + compressed delta (tiny trained "
            "Llama: hidden 128, 4 layers; group 128 equals per-channel for the 128-input matrices)",
            "reference": reference, "calibration": f"{args.n_samples} x 128 tokens of the "
            "fine-tune's training text", "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--repeats", type=int, default=2)
    m = sub.add_parser("memory")
    m.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    m.add_argument("--hidden", type=int, default=1024)
    m.add_argument("--intermediate", type=int, default=2816)
    q = sub.add_parser("quality")
    q.add_argument("--n-samples", type=int, default=64)
    args = p.parse_args()
    results = {"speed": speed, "memory": memory, "quality": quality}[args.what](args)
    _write(args.what, results)


if __name__ == "__main__":
    main()
