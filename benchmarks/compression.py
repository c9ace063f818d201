"""Compression benchmarks: OBS speed per matrix, and peak host memory of a convert vs depth.

    .venv/bin/python benchmarks/compression.py speed            # 4096x4096 and 11008x4096
    .venv/bin/python benchmarks/compression.py memory           # convert of 2, 4, 8, 16 layers
    .venv/bin/python benchmarks/compression.py quality          # the quality/size table (~25 min)
    .venv/bin/python benchmarks/compression.py allocation       # target_bits vs uniform (~15 min)
    .venv/bin/python benchmarks/compression.py sizes            # file sizes at real models' shapes

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


# Block settings x embedding/head settings, each converted for every fine-tune of the fixture
# ("as blocks" was dzjax's behaviour before the embeddings had settings of their own).
_SAME = dict(embedding_bits="same", embedding_sparsity="same", embedding_group_size="same")
_EXACT = dict(compress_embeddings=False)
_E4, _E8 = dict(embedding_bits=4), dict(embedding_bits=8)
_BLOCKS = {"4bit 2:4 g128": dict(bits=4, sparsity="2:4", group_size=128),
           "2bit 2:4 g128": dict(bits=2, sparsity="2:4", group_size=128),
           "2bit g128": dict(bits=2, sparsity=None, group_size=128),
           "4bit g128": dict(bits=4, sparsity=None, group_size=128)}
_EMBEDDINGS = {"4bit 2:4 g128": {"as blocks": _SAME, "exact": _EXACT, "4bit per-row": _E4,
                                 "8bit per-row": _E8},
               "2bit 2:4 g128": {"as blocks": _SAME, "8bit per-row": _E8},
               "2bit g128": {"as blocks": _SAME, "exact": _EXACT, "4bit per-row": _E4,
                             "8bit per-row": _E8},
               "4bit g128": {"exact": _EXACT, "4bit per-row": _E4}}
QUALITY_SETTINGS = {f"{blocks}, embeddings {emb}": dict(_BLOCKS[blocks], **settings)
                    for blocks, options in _EMBEDDINGS.items() for emb, settings in options.items()}
# and after OBS, the scales refined with optax (convert(..., refine_steps=100))
QUALITY_SETTINGS.update({f"{label}, refined 100 steps": dict(QUALITY_SETTINGS[label],
                                                             refine_steps=100)
                         for label in ("2bit g128, embeddings 4bit per-row",
                                       "4bit 2:4 g128, embeddings 4bit per-row")})
# The reference point (SparseGPT + GPTQ on the blocks, embeddings exact) also as RTN.
QUALITY_METHODS = {"4bit 2:4 g128, embeddings exact": ("obs", "rtn")}  # others: obs only


def _domains():
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import make_domains  # the fixture's own split of the corpora

    return make_domains


def _drop_blocks(base, finetune) -> dict:
    """The fine-tune's delta without its decoder blocks: embedding, final norm, lm_head, exact."""
    keep = {k: v for k, v in base.params.items() if k != "model"}
    keep["model"] = {k: v for k, v in base.params["model"].items() if not k.startswith("layers_")}
    return jax.tree.map(lambda b, f: jnp.asarray(f, jnp.float32) - jnp.asarray(b, jnp.float32),
                        keep, {k: finetune.params[k] if k != "model" else
                               {n: finetune.params["model"][n] for n in keep["model"]}
                               for k in keep})


def quality(args) -> dict:
    """Held-out perplexity and KL(fine-tune || compressed) of base + compressed delta, for the
    fine-tunes of tests/fixtures/domains (each moves its weights by ~3% of their norm)."""
    import dzjax

    base = dzjax.load_base(ROOT / "tests" / "fixtures" / "domains" / "base", dtype=jnp.float32)
    rows, references = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.finetunes or list(_domains().SLICES):
            finetune, windows, ref = _references(base, name)
            references[name] = ref
            for label, settings in QUALITY_SETTINGS.items():
                for method in QUALITY_METHODS.get(label, ("obs",)):
                    rows.append(_quality_row(base, finetune, name, windows, ref, label, settings,
                                             method, Path(tmp), args.n_samples))
    return {**_header(), "what": "held-out perplexity and KL(fine-tune || base + compressed "
            "delta) on tests/fixtures/domains (Llama, hidden 128, 4 layers, vocab 1024: the "
            "embedding and head are 25% of the parameters; group 128 = per-channel here)",
            "calibration": f"{args.n_samples} x 128 tokens of each fine-tune's training text",
            "gain_kept": "(ppl_base - ppl) / (ppl_base - ppl_finetune)",
            "block_gain_kept": "(ppl_blocks_dropped - ppl) / (ppl_blocks_dropped - "
            "ppl_finetune), blocks dropped = base + the exact embedding, norm and head deltas",
            "references": references, "rows": rows, "summary": _quality_summary(rows)}


def _quality_row(base, finetune, name, windows, ref, label, settings, method, tmp: Path,
                 n_samples: int) -> dict:
    """Convert fine-tune `name` of the domains fixture with `settings`; its quality and size."""
    import zstandard

    import dzjax
    from dzjax.compress.evaluate import kl_divergence, perplexity

    fixture = ROOT / "tests" / "fixtures" / "domains"
    t0 = time.perf_counter()
    delta = dzjax.convert(fixture / "base", fixture / name, tmp / "d.dz",
                          calibration=_domains().slice_docs(name, 0), n_samples=n_samples,
                          seq_len=128, method=method, progress=False, **settings)
    report = delta.metadata["report"]
    raw = (tmp / "d.dz").read_bytes()
    zstd_bytes = len(zstandard.ZstdCompressor(level=19).compress(raw))
    ppl = perplexity(base, windows, delta)
    r = {
        "finetune": name, "settings": label, "method": method,
        "perplexity": ppl,
        "gain_kept": (ref["base"] - ppl) / (ref["base"] - ref["finetune"]),
        "block_gain_kept": (ref["blocks_dropped"] - ppl)
        / (ref["blocks_dropped"] - ref["finetune"]),
        "kl": kl_divergence(finetune, base, windows, delta),
        "bits_per_weight": report["bits_per_weight"],
        "ratio_vs_bf16": report["ratio_vs_bf16"],
        "file_bytes": report["file_bytes"],
        "zstd_gain": round(1 - zstd_bytes / len(raw), 4),  # what --zstd saves
        "convert_seconds": round(time.perf_counter() - t0, 1),
    }
    if "allocation" in report:
        r["allocation"] = report["allocation"]["matrices"]
    print(f"  {label:48s} {method}: ppl {r['perplexity']:.3f}, gain kept "
          f"{100 * r['gain_kept']:5.1f}% (blocks {100 * r['block_gain_kept']:5.1f}%)"
          f", KL {r['kl']:.5f}, {r['bits_per_weight']:.2f} bits/weight, "
          f"{r['ratio_vs_bf16']:.2f}x vs bf16" + (f", {r['allocation']}" if "allocation" in r
                                                   else ""), flush=True)
    return r


def _references(base, name: str) -> tuple:
    """The fine-tune `name` of the domains fixture, its held-out windows and reference figures."""
    import dzjax
    from dzjax.compress.evaluate import kl_divergence, perplexity, token_windows

    finetune = dzjax.load_base(ROOT / "tests" / "fixtures" / "domains" / name, dtype=jnp.float32)
    windows = token_windows(base.tokenizer, _domains().slice_docs(name, 1), 128)
    ref = {"base": perplexity(base, windows), "finetune": perplexity(finetune, windows),
           "blocks_dropped": perplexity(base, windows, _drop_blocks(base, finetune)),
           "kl_base": kl_divergence(finetune, base, windows),
           "held_out_windows": len(windows)}
    print(f"{name}: held-out ppl base {ref['base']:.3f}, fine-tune {ref['finetune']:.3f}, "
          f"blocks dropped {ref['blocks_dropped']:.3f}; KL(ft || base) "
          f"{ref['kl_base']:.4f}", flush=True)
    return finetune, windows, ref


# Uniform settings (the embeddings at their default) against target_bits at the same sizes.
ALLOCATION_UNIFORM = {"2bit g128": dict(bits=2, group_size=128),
                      "3bit g128": dict(bits=3, group_size=128),
                      "4bit 2:4 g128": dict(bits=4, sparsity="2:4", group_size=128),
                      "4bit g128": dict(bits=4, group_size=128)}


def allocation(args) -> dict:
    """Quality at equal size: every block matrix alike, against `target_bits` at the uniform
    settings' own bits per weight and between them."""
    import dzjax

    base = dzjax.load_base(ROOT / "tests" / "fixtures" / "domains" / "base", dtype=jnp.float32)
    rows, references = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.finetunes or list(_domains().SLICES):
            finetune, windows, ref = _references(base, name)
            references[name] = ref
            uniform = {}
            for label, settings in ALLOCATION_UNIFORM.items():
                rows.append(_quality_row(base, finetune, name, windows, ref, label, settings,
                                         "obs", Path(tmp), args.n_samples))
                uniform[label] = rows[-1]["bits_per_weight"]
            low, mid, high = uniform["2bit g128"], uniform["3bit g128"], uniform["4bit g128"]
            # (to 2 decimals, so that the fine-tunes share labels; never above the uniform's)
            for target in sorted({round((low + mid) / 2, 2), int(mid * 100) / 100,
                                  int(uniform["4bit 2:4 g128"] * 100) / 100,
                                  round((mid + high) / 2, 2)}):
                rows.append(_quality_row(base, finetune, name, windows, ref,
                                         f"target_bits {target}", dict(target_bits=target),
                                         "obs", Path(tmp), args.n_samples))
    return {**_header(), "what": "held-out perplexity and KL at equal size: uniform block "
            "settings against target_bits (tests/fixtures/domains, embeddings 4-bit per row)",
            "calibration": f"{args.n_samples} x 128 tokens of each fine-tune's training text",
            "references": references, "rows": rows,
            "summary": _quality_summary(rows)}


def _quality_summary(rows: list[dict]) -> list[dict]:
    """Per setting: the mean over fine-tunes of gain kept, KL and bits per weight."""
    out = []
    for key in dict.fromkeys((r["settings"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["settings"], r["method"]) == key]
        out.append({"settings": key[0], "method": key[1], **{
            f: round(float(np.mean([r[f] for r in mine])), 5)
            for f in ("gain_kept", "block_gain_kept", "kl", "bits_per_weight", "ratio_vs_bf16",
                      "zstd_gain")}})
    print("\nmean over fine-tunes:")
    for r in out:
        print(f"  {r['settings']:48s} {r['method']}: gain kept {100 * r['gain_kept']:5.1f}%, "
              f"KL {r['kl']:.5f}, {r['bits_per_weight']:.2f} bits/weight, "
              f"{r['ratio_vs_bf16']:.2f}x")
    return out


# Real models' shapes: hidden, intermediate, layers, vocab, heads, kv heads, head dim, tied.
SIZE_MODELS = {"Llama-2-7B": (4096, 11008, 32, 32000, 32, 32, 128, False),
               "Mistral-7B": (4096, 14336, 32, 32000, 32, 8, 128, False),
               "SmolLM-360M": (960, 2560, 32, 49152, 15, 5, 64, True),
               "Qwen2.5-0.5B": (896, 4864, 24, 151936, 14, 2, 64, True)}
SIZE_SETTINGS = {"defaults (2-bit g128, embeddings 4-bit per row)":
                 (dict(bits=2, group_size=128), dict(bits=4)),
                 "4-bit 2:4 g128 everywhere (DeltaZip's)":
                 (dict(bits=4, sparsity="2:4", group_size=128),) * 2}


def sizes(args) -> dict:
    """Delta size against the bf16 fine-tune at real models' shapes, from the arrays each
    format stores (`Format.stored_arrays`, padding included); norms as bf16."""
    from dzjax.pallas_kernels.formats import Format

    def nbytes(k, n, settings):
        fmt = Format.for_matrix(k, **settings)
        return sum(int(np.prod(shape)) * dtype.itemsize
                   for shape, dtype in fmt.stored_arrays(k, n).values())

    rows = []
    for model, (d, f, layers, vocab, heads, kv, hd, tied) in SIZE_MODELS.items():
        blocks = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, f), (d, f),
                  (f, d)]
        tables = 1 if tied else 2
        params = layers * sum(k * n for k, n in blocks) + tables * vocab * d
        for label, (block, table) in SIZE_SETTINGS.items():
            total = (layers * sum(nbytes(k, n, block) for k, n in blocks)
                     + tables * nbytes(d, vocab, table) + (2 * layers + 1) * d * 2)
            rows.append({"model": model, "settings": label,
                         "embedding_share": round(tables * vocab * d / params, 4),
                         "bits_per_weight": round(8 * total / params, 3),
                         "ratio_vs_bf16": round(2 * params / total, 2)})
            r = rows[-1]
            print(f"{model:14s} (embeddings {100 * r['embedding_share']:4.1f}%) {label:48s} "
                  f"{r['bits_per_weight']:.2f} bits/weight, {r['ratio_vs_bf16']:.2f}x vs bf16")
    return {**_header(), "what": "delta size at real shapes, from the stored arrays", "rows": rows}


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
    q.add_argument("--finetunes", nargs="+", help="of tests/fixtures/domains (default: all)")
    a = sub.add_parser("allocation")
    a.add_argument("--n-samples", type=int, default=64)
    a.add_argument("--finetunes", nargs="+", help="of tests/fixtures/domains (default: all)")
    sub.add_parser("sizes")
    args = p.parse_args()
    results = {"speed": speed, "memory": memory, "quality": quality, "allocation": allocation,
               "sizes": sizes}[args.what](args)
    _write(args.what, results)


if __name__ == "__main__":
    main()
