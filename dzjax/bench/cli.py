"""`dzjax bench`: the command line of the serving benchmark (see `dzjax.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import dzjax.paths as paths
from dzjax.bench.models import Models, SyntheticConfig, build_synthetic, prepare_real
from dzjax.bench.report import device_header, plot, table
from dzjax.bench.run import SYSTEMS, BenchConfig, benchmark, default_weights_dtype
from dzjax.bench.workload import Lengths, WorkloadConfig
from dzjax.errors import DzjaxError
from dzjax.models.forward import default_dtype
from dzjax.models.config import from_hf_config
from dzjax.models.loading import read_hf_config
from dzjax.pallas_kernels.formats import parse_sparsity


def _sparsity(text: str):
    """A --sparsity value, checked, as the synthetic config records it: "n:m", a fraction or None."""
    try:
        value = parse_sparsity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else value


def _defaults(cls) -> argparse.Namespace:
    """A dataclass's field defaults, without making one (that could start a JAX backend)."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(cls)
                                 if f.default is not dataclasses.MISSING})


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("base", nargs="?", type=Path,
                        help="base HF checkpoint (not with --synthetic)")
    parser.add_argument("--delta", action="append", type=paths.named_path, default=[],
                        metavar="NAME=PATH", help="a delta file to serve (repeat)")
    parser.add_argument("--synthetic", action="store_true",
                        help="a random base and random deltas, built once in the cache")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where models and merged checkpoints are kept, under bench/ "
                             "(None: $DZJAX_CACHE or ~/.cache/dzjax)")
    s = parser.add_argument_group("synthetic models")
    d = SyntheticConfig()
    for flag, what in [("layers", "decoder layers"), ("hidden", "hidden size"),
                       ("intermediate", "MLP size"), ("vocab", "vocabulary"),
                       ("heads", "attention heads"), ("deltas", "fine-tunes"),
                       ("bits", "bits of the compressed deltas")]:
        s.add_argument(f"--{flag}", type=int, default=getattr(d, flag), help=what)
    s.add_argument("--kv-heads", type=int, default=None, help="None: as many as --heads")
    s.add_argument("--sparsity", type=_sparsity, default=d.sparsity, help="n:m, a fraction, none")
    s.add_argument("--group-size", type=int, default=d.group_size, help="0 = per output channel")
    w = parser.add_argument_group("workload")
    wd = _defaults(WorkloadConfig)
    w.add_argument("--requests", type=int, default=wd.num_requests, help="requests in all")
    w.add_argument("--rate", type=float, default=wd.rate,
                   help="Poisson arrivals per second (inf: all at once)")
    w.add_argument("--popularity", choices=("uniform", "zipf"), default=wd.popularity,
                   help="of the deltas (zipf: the first is the most popular)")
    w.add_argument("--zipf-alpha", type=float, default=wd.zipf_alpha,
                   help="zipf: p(rank i) ~ 1 / i^alpha")
    w.add_argument("--prompt-len", type=Lengths.parse, default=wd.prompt_len, help="N or LOW:HIGH")
    w.add_argument("--output-len", type=Lengths.parse, default=wd.output_len, help="N or LOW:HIGH")
    w.add_argument("--seed", type=int, default=wd.seed, help="of the workload")
    b = parser.add_argument_group("systems")
    bd = _defaults(BenchConfig)
    b.add_argument("--systems", type=lambda t: tuple(t.split(",")), default=",".join(bd.systems),
                   help="comma-separated, of " + ",".join(SYSTEMS))
    b.add_argument("--max-batch", type=int, default=bd.max_batch,
                   help="dzjax's batch slots; the baselines' largest static batch")
    b.add_argument("--dtype", default="auto",
                   help="activations and KV cache; auto: bfloat16 on a GPU, float32 elsewhere")
    b.add_argument("--weights-dtype", default="auto",
                   help="auto: float32 on a CPU, bfloat16 elsewhere")
    b.add_argument("--implementation", default=None,
                   help="delta kernels: xla, pallas, interpret (None: $DZJAX_KERNEL, else auto)")
    b.add_argument("--slo", type=float, default=bd.slo_s, help="latency SLO in seconds")
    b.add_argument("--warm-swap", action="store_true",
                   help="let swaps read from the page cache (without it: drop the checkpoint's "
                        "pages first, so that a swap reads the disk)")
    b.add_argument("--merged-memory-fraction", type=float, default=bd.merged_memory_fraction,
                   help="the merged system runs if all models fit in this much free memory")
    b.add_argument("--decode-repeats", type=int, default=bd.decode_repeats,
                   help="decode-step microbenchmark repeats (0: skip it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (None: $DZJAX_RESULTS or <cache>/results, "
                             "serving-<backend>-<date>.json); the plot goes beside it as .png")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")


def _models(args, weights_dtype: str) -> tuple[Models, dict]:
    """Build or prepare the models the arguments name; returns them and their config record."""
    root = (args.cache_dir or paths.cache_dir()) / "bench"
    if args.synthetic:
        if args.base is not None or args.delta:
            raise DzjaxError("--synthetic builds its own base and deltas: pass neither")
        config = SyntheticConfig(
            layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
            vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads, deltas=args.deltas,
            bits=args.bits, sparsity=args.sparsity, group_size=args.group_size or None,
            weights_dtype=weights_dtype)
        return build_synthetic(config, root), {"synthetic": dataclasses.asdict(config)}
    if args.base is None or not args.delta:
        raise DzjaxError("pass a base checkpoint and --delta NAME=PATH (one or more), "
                         "or --synthetic")
    deltas = dict(args.delta)
    if len(deltas) != len(args.delta):
        raise DzjaxError("two --delta arguments share a name")
    models = prepare_real(args.base, deltas, weights_dtype, root)
    return models, {"base": str(args.base), "deltas": {n: str(p) for n, p in deltas.items()}}


def run(args) -> dict:
    """`dzjax bench`: run, write the JSON (and PNG), print a table; returns the report."""
    weights_dtype = default_weights_dtype() if args.weights_dtype == "auto" else args.weights_dtype
    config = BenchConfig(systems=args.systems, max_batch=args.max_batch,
                         dtype=default_dtype() if args.dtype == "auto" else args.dtype,
                         weights_dtype=weights_dtype, implementation=args.implementation,
                         slo_s=args.slo, cold_swap=not args.warm_swap,
                         merged_memory_fraction=args.merged_memory_fraction,
                         decode_repeats=args.decode_repeats)
    models, model_record = _models(args, config.weights_dtype)
    workload_config = WorkloadConfig(
        models=tuple(models.deltas), vocab_size=_vocab_size(models.base_dir),
        num_requests=args.requests, rate=args.rate, popularity=args.popularity,
        zipf_alpha=args.zipf_alpha, prompt_len=args.prompt_len, output_len=args.output_len,
        seed=args.seed)
    header, start = device_header(), time.perf_counter()
    result = benchmark(models, workload_config, config)
    workload_record = {**dataclasses.asdict(workload_config),
                       "rate": workload_config.rate if np.isfinite(workload_config.rate) else "inf",
                       "prompt_len": str(workload_config.prompt_len),
                       "output_len": str(workload_config.output_len)}
    report = {
        "what": "serving: dzjax (continuous batching, many deltas) vs swapping merged models vs "
                "all merged models resident",
        "argv": sys.argv, "command": "dzjax bench " + shlex.join(_argv(args)),
        **header, "load_average_after": os.getloadavg(),  # other work on the machine skews times
        "config": {"models": model_record, "workload": workload_record,
                   "bench": dataclasses.asdict(config)},
        "setup_s": models.build_s, "bench_s": time.perf_counter() - start,
        **result,
    }
    out = args.out or paths.results_dir() / (
        f"serving-{report['backend']}-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    written = [out] + ([] if args.no_plot else [plot(report, out)])
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return report


def _vocab_size(base_dir: Path) -> int:
    return from_hf_config(read_hf_config(base_dir)).vocab_size


def _argv(args) -> list[str]:
    """The arguments as flags again (every one, defaults included), to rerun exactly."""
    out = [] if args.base is None else [str(args.base)]
    for name, value in sorted(vars(args).items()):
        if name in ("base", "run", "command") or value is False or (
                value is None and name != "sparsity"):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "sparsity":
            out += [flag, "none" if value is None else str(value)]
        elif value is True:
            out.append(flag)
        elif name == "delta":
            out += [a for n, p in value for a in (flag, f"{n}={p}")]
        elif name == "systems":
            out += [flag, ",".join(value)]
        else:
            out += [flag, str(value)]
    return out
