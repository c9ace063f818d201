"""`dzjax bench`: serving throughput and latency of dzjax against the swap and merged baselines.

    dzjax bench --synthetic                          # random base + 8 random deltas (cached)
    dzjax bench BASE --delta code=code.dz.safetensors --delta chat=chat.dz.safetensors

One seeded workload (Poisson arrivals, uniform or Zipf popularity over the deltas, prompt and
output lengths) is served, in real time, by three systems on the same machine:

  dzjax   `dzjax.serve` with every delta: continuous batching, many deltas per decode step.
  swap    one merged fine-tune resident at a time, as HF-style serving does it: first come, first
          served; the head request's model is loaded from its merged checkpoint on disk (the page
          cache dropped first, so it is a disk read; load time counts), then the arrived requests
          of that model run in static batches through `dzjax.generate`.
  merged  every merged fine-tune resident (when memory allows): the same static batches, no load.

Every request generates exactly its max_tokens (EOS ignored), so all systems do the same work.
Latencies are measured from each request's scheduled arrival. `dzjax.generate` does not stream:
the baselines' first-token time is the batch's start plus the measured warm prefill time of the
batch's shape. All compilation happens before the clock starts (`traces_during_run` checks it).
A microbenchmark times the jitted decode step (`steps.decode`) with 8 active deltas vs base-only.
Results: JSON (command, device, config, per-system metrics and per-request times) and a PNG plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models.generate import bucket

SYSTEMS = ("dzjax", "swap", "merged")
RESULTS_DIR = Path("benchmarks/results")

# ----------------------------------------------------------------------------------------------
# The workload.


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Token counts drawn uniformly from [low, high] (fixed when low == high)."""

    low: int
    high: int

    def __post_init__(self):
        if not 1 <= self.low <= self.high:
            raise DzjaxError(f"lengths need 1 <= low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> Lengths:
        """'32' (fixed) or '8:64' (uniform, both ends included)."""
        low, _, high = str(text).partition(":")
        try:
            return cls(int(low), int(high or low))
        except ValueError:
            raise DzjaxError(f"a length is N or LOW:HIGH, got {text!r}") from None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, n)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    models: tuple[str, ...]  # the deltas; with zipf, the first is the most popular
    vocab_size: int
    num_requests: int = 256
    rate: float = 16.0  # requests/s of the Poisson process; inf = all arrive at time 0
    popularity: str = "uniform"  # "uniform" or "zipf"
    zipf_alpha: float = 1.5
    prompt_len: Lengths = Lengths(32, 32)
    output_len: Lengths = Lengths(8, 64)
    seed: int = 0

    def __post_init__(self):
        checks = [(len(self.models) >= 1, "the workload needs at least one model"),
                  (self.num_requests >= 1, f"num_requests must be >= 1, got {self.num_requests}"),
                  (self.rate > 0, f"rate must be > 0 (or inf), got {self.rate}"),
                  (self.popularity in ("uniform", "zipf"),
                   f"popularity is 'uniform' or 'zipf', got {self.popularity!r}"),
                  (self.zipf_alpha > 0, f"zipf_alpha must be > 0, got {self.zipf_alpha}")]
        for ok, message in checks:
            if not ok:
                raise DzjaxError(message)


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival: float  # seconds after the start of the run
    model: str
    prompt: tuple[int, ...]
    max_tokens: int


def popularity(config: WorkloadConfig) -> np.ndarray:
    """The probability of each model, in `config.models` order: equal, or p_i ~ 1 / i^alpha."""
    ranks = np.arange(1, len(config.models) + 1, dtype=np.float64)
    weights = np.ones_like(ranks) if config.popularity == "uniform" else ranks ** -config.zipf_alpha
    return weights / weights.sum()


def make_workload(config: WorkloadConfig) -> list[BenchRequest]:
    """The requests in arrival order; the same config (seed included) gives the same workload."""
    rng = np.random.default_rng(config.seed)
    n = config.num_requests
    gaps = np.zeros(n) if np.isinf(config.rate) else rng.exponential(1 / config.rate, n)
    arrivals = np.cumsum(gaps)
    models = rng.choice(len(config.models), n, p=popularity(config))
    prompt_lens, output_lens = config.prompt_len.sample(rng, n), config.output_len.sample(rng, n)
    return [BenchRequest(i, float(arrivals[i]), config.models[models[i]],
                         tuple(int(t) for t in rng.integers(0, config.vocab_size, prompt_lens[i])),
                         int(output_lens[i])) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Metrics.


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One answered request; times in seconds after the start of the run."""

    index: int
    model: str
    arrival: float
    first_token: float
    finished: float
    tokens: int


def _percentiles(values: np.ndarray) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean()), "max": float(values.max())}


def summarize(outcomes: list[Outcome], num_requests: int, slo_s: float) -> dict:
    """Throughput, TTFT and latency percentiles, SLO attainment, and the per-request times."""
    arrival = np.array([o.arrival for o in outcomes])
    first = np.array([o.first_token for o in outcomes])
    finished = np.array([o.finished for o in outcomes])
    tokens = sum(o.tokens for o in outcomes)
    duration = float(finished.max() - arrival.min())
    latency = finished - arrival
    return {
        "requests": num_requests, "answered": len(outcomes), "generated_tokens": tokens,
        "duration_s": duration, "throughput_tokens_per_s": tokens / duration,
        "throughput_requests_per_s": len(outcomes) / duration,
        "ttft_s": _percentiles(first - arrival), "latency_s": _percentiles(latency),
        "slo_s": slo_s, "slo_attainment": float(np.mean(latency <= slo_s)),
        # [index, model, arrival, ttft, latency, tokens] per request, for plots and re-analysis
        "per_request": [[o.index, o.model, round(o.arrival, 4), round(o.first_token - o.arrival, 4),
                         round(o.finished - o.arrival, 4), o.tokens] for o in outcomes],
    }


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _traces() -> int:
    from dzjax.models.forward import TRACE_COUNTS

    return sum(TRACE_COUNTS.values())


# ----------------------------------------------------------------------------------------------
# Shapes: every compiled program is built before the clock starts.


def batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes a batch of 1..max_batch rows can take."""
    return sorted({bucket(n, 1, max_batch) for n in range(1, max_batch + 1)})


def generate_shapes(prompt_len: Lengths, output_len: Lengths) -> dict[tuple[int, int], tuple]:
    """{(prompt bucket, cache bucket): (prompt length, max_tokens)} for every shape that
    `dzjax.generate` can be called with on a batch of this workload (its longest prompt and its
    largest max_tokens decide it), with one example each."""
    shapes = {}
    for p in range(prompt_len.low, prompt_len.high + 1):
        for m in range(output_len.low, output_len.high + 1):
            shapes.setdefault((bucket(p, 16), bucket(p + m, 16)), (p, m))
    return shapes


# ----------------------------------------------------------------------------------------------
# The systems.


def run_dzjax(base, deltas: dict, workload: list[BenchRequest], *, max_batch: int,
              max_seq_len: int, dtype: str, implementation: str | None) -> tuple[list, dict]:
    """Serve the workload with `dzjax.serve` (all deltas); returns (outcomes, extra stats)."""
    from dzjax.serving.server import serve

    with serve(base, deltas, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype,
               max_resident_deltas=len(deltas), implementation=implementation) as server:
        _warm_engine(server, workload, max_batch, max_seq_len)
        traces, before = _traces(), _engine_counts(server.stats())
        start = time.perf_counter()
        handles = []
        for r in workload:
            _sleep_until(start + r.arrival)
            handles.append(server.submit(list(r.prompt), r.model, max_tokens=r.max_tokens,
                                         ignore_eos=True))
        outcomes = []
        for r, h in zip(workload, handles):
            c = h.result()
            submitted = h.request.arrival - start  # the engine's timings count from the submit
            outcomes.append(Outcome(r.index, r.model, r.arrival,
                                    submitted + c.timings["first_token"],
                                    submitted + c.timings["total"], len(c.token_ids)))
        after = _engine_counts(server.stats())
    run = {k: after[k] - before[k] for k in after}  # the warm-up's steps left out
    return outcomes, {"decode_steps": run["steps"], "prefill_calls": run["prefills"],
                      "mean_batch_rows": run["rows"] / max(run["steps"], 1),
                      "mean_active_deltas": run["active"] / max(run["steps"], 1),
                      "traces_during_run": _traces() - traces}


def _engine_counts(stats: dict) -> dict:
    """The engine's running totals, from its stats (which give some of them as means)."""
    steps = stats["decode_steps"]
    return {"steps": steps, "prefills": stats["prefill_calls"],
            "rows": stats["mean_batch_rows"] * steps, "active": stats["mean_active_deltas"] * steps}


def _warm_engine(server, workload: list[BenchRequest], max_batch: int, max_seq_len: int) -> None:
    """Compile the engine's prefill for every (rows, prompt bucket) and its decode step.

    The requests of one size are submitted from the engine thread (`engine.call`), so they are
    admitted together and prefilled as one group of exactly that size.
    """
    models = sorted({r.model for r in workload})
    lengths = sorted({bucket(len(r.prompt), 16, max_seq_len): len(r.prompt)
                      for r in workload}.values())
    for length in lengths:
        for n in batch_sizes(max_batch):
            submit = lambda length=length, n=n: [
                server.submit([1] * length, models[i % len(models)], max_tokens=2,
                              ignore_eos=True) for i in range(n)]
            for handle in server.engine.call(submit):
                handle.result()


def run_static(models, workload: list[BenchRequest], *, max_batch: int, dtype,
               prefill_s: dict) -> tuple[list, dict]:
    """The baselines: one model at a time, first come first served, static batches.

    The head of the queue picks the model (switching to it if another is current); then up to
    max_batch arrived requests of that model run as one `dzjax.generate` call.

    Args:
      models: `models(name)` returns the `Base` of a merged fine-tune, loading it (the swap
        baseline) or looking it up (all merged models resident).
      prefill_s: {(rows, prompt bucket, cache bucket): seconds}, for the first-token times.
    Returns:
      (outcomes, stats: model switches, seconds spent switching, batches).
    """
    waiting: list[BenchRequest] = []
    upcoming = list(workload)
    current, model = None, None
    stats = {"switches": 0, "switch_s": 0.0, "batches": 0}
    outcomes = []
    traces = _traces()
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start

    def arrive() -> None:
        while upcoming and upcoming[0].arrival <= clock():
            waiting.append(upcoming.pop(0))

    while upcoming or waiting:
        arrive()
        if not waiting:
            _sleep_until(start + upcoming[0].arrival)
            continue
        name = waiting[0].model
        if name != current:
            t = clock()
            model = None  # one model resident: drop the old one before loading the next
            model, current = models(name), name
            stats["switches"] += 1
            stats["switch_s"] += clock() - t
            arrive()  # requests that came during the load join this model's batch
        batch = [r for r in waiting if r.model == name][:max_batch]
        for r in batch:
            waiting.remove(r)
        outcomes += _static_batch(model, batch, clock, max_batch=max_batch, dtype=dtype,
                                  prefill_s=prefill_s)
        stats["batches"] += 1
    stats["traces_during_run"] = _traces() - traces
    stats["mean_batch_rows"] = len(outcomes) / max(stats["batches"], 1)
    return sorted(outcomes, key=lambda o: o.index), stats


def _static_batch(model, batch: list[BenchRequest], clock, *, max_batch: int, dtype,
                  prefill_s: dict) -> list[Outcome]:
    """One `dzjax.generate` call for a batch of one model's requests, padded to a power of two
    rows (as the engine pads its prefills), run for the batch's largest max_tokens; every request
    finishes when the call returns."""
    from dzjax.models.generate import generate

    rows = bucket(len(batch), 1, max_batch)
    prompts = [list(r.prompt) for r in batch]
    prompts += prompts[:1] * (rows - len(batch))  # padding rows: outputs dropped
    max_tokens = max(r.max_tokens for r in batch)
    longest = max(len(r.prompt) for r in batch)
    shape = (rows, bucket(longest, 16), bucket(longest + max_tokens, 16))
    start = clock()
    outputs = generate(model, prompts, max_tokens=max_tokens, dtype=dtype, stop_at_eos=False)
    done = clock()
    return [Outcome(r.index, r.model, r.arrival, start + prefill_s[shape], done,
                    len(out[:r.max_tokens])) for r, out in zip(batch, outputs)]


def warm_static(model, workload_config: WorkloadConfig, *, max_batch: int, dtype,
                repeats: int = 3) -> dict:
    """Compile `dzjax.generate` for every shape the baselines can meet, and measure the warm
    prefill time of each: {(rows, prompt bucket, cache bucket): seconds}."""
    from dzjax.models.forward import forward_cached
    from dzjax.models.generate import generate
    from dzjax.models.llama import KVCache
    from dzjax.pallas_kernels.dispatch import requested_implementation

    prefill_s = {}
    for (prompt_bucket, cache_bucket), (p, m) in generate_shapes(
            workload_config.prompt_len, workload_config.output_len).items():
        for rows in batch_sizes(max_batch):
            generate(model, [[1] * p] * rows, max_tokens=m, dtype=dtype, stop_at_eos=False)
            ids = np.ones((rows, prompt_bucket), np.int32)
            positions = np.broadcast_to(np.arange(prompt_bucket, dtype=np.int32), ids.shape)
            times = []
            for _ in range(repeats):  # the prefill call `generate` makes, alone
                cache = KVCache.zeros(model.config, rows, cache_bucket, dtype)
                t = time.perf_counter()
                jax.block_until_ready(forward_cached(
                    model.params, ids, positions, cache, config=model.config, dtype=dtype,
                    implementation=requested_implementation(None)))
                times.append(time.perf_counter() - t)
            prefill_s[(rows, prompt_bucket, cache_bucket)] = statistics.median(times)
    return prefill_s


def drop_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the cached pages of a checkpoint's files, so the next read comes
    from the disk (as a swap of a model that has not been used for a while does)."""
    for f in Path(directory).iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def swap_loader(merged: dict[str, Path], weights_dtype, cold: bool):
    """models(name) for the swap baseline: the merged checkpoint loaded from disk each call."""
    from dzjax.models.loading import load_base

    def load(name: str):
        if cold:
            drop_page_cache(merged[name])
        model = load_base(merged[name], dtype=weights_dtype)
        jax.block_until_ready(model.params)
        return model
    return load


def merged_fits(base, count: int, fraction: float) -> tuple[bool, str]:
    """Whether `count` models of the base's size fit in `fraction` of the free device (or host)
    memory; returns the answer and the numbers behind it."""
    need = count * sum(leaf.nbytes for leaf in jax.tree.leaves(base.params))
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free, where = stats["bytes_limit"] - stats.get("bytes_in_use", 0), "device"
    else:
        free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host"
    ok = need <= fraction * free
    return ok, (f"{count} merged models need {need / 2**30:.2f} GiB; "
                f"{fraction:.0%} of the free {where} memory is {fraction * free / 2**30:.2f} GiB")


# ----------------------------------------------------------------------------------------------
# The decode-step microbenchmark.


def decode_step_times(base, deltas: dict, *, batch: int, cache_len: int, dtype: str,
                      implementation: str | None, repeats: int) -> dict:
    """Median ms of the jitted decode step over `batch` rows: base only (no delta stacks),
    stacks resident but unused, 1 delta, and min(8, deltas, batch) deltas (rows round-robin).
    The cases take turns, so that other load on the machine skews them alike."""
    from dzjax.pallas_kernels.dispatch import requested_implementation
    from dzjax.serving.pool import DeltaPool

    pool = DeltaPool(base, len(deltas), host_cache_bytes=1 << 62)
    try:
        for name, source in deltas.items():
            pool.add(*pool.validate(name, source))
            pool.make_resident(name)
        active = min(8, len(deltas), batch)
        cases = {"base": (None, -1), "resident_unused": (pool.stacks, -1),
                 "1_delta": (pool.stacks, 0), f"{active}_deltas": (pool.stacks, active)}
        runners = {label: _decode_step(base, stacks, np.arange(batch) % spread if spread > 1
                                       else np.full(batch, spread), cache_len, jnp.dtype(dtype),
                                       requested_implementation(implementation))
                   for label, (stacks, spread) in cases.items()}
        times = {label: [] for label in runners}
        for i in range(repeats + 2):  # two warm-up rounds: compile, then a first run
            for label, step in runners.items():
                t = step()
                if i >= 2:
                    times[label].append(t)
    finally:
        pool.close()
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
    return {"batch": batch, "cache_len": cache_len, "active_deltas": active, "repeats": repeats,
            "ms": ms, "ratio_active_vs_base": ms[f"{active}_deltas"] / ms["base"],
            # far below the medians: other work on the machine slowed this microbenchmark
            "ms_min": {label: 1e3 * min(t) for label, t in times.items()}}


def _decode_step(base, stacks, slots, cache_len, dtype, implementation):
    """A function that runs `steps.decode` once on its own cache and returns the seconds."""
    from dzjax.models.llama import KVCache
    from dzjax.serving import steps

    b = len(slots)
    slots = np.asarray(slots, np.int32)
    tokens, positions = np.ones(b, np.int32), np.full(b, cache_len // 2, np.int32)
    sampling = (np.zeros(b, np.uint32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                np.ones(b, np.float32))
    cache = KVCache.zeros(base.config, b, cache_len, dtype)

    def step() -> float:
        nonlocal cache
        t = time.perf_counter()
        out, cache = steps.decode(base.params, stacks, cache, tokens, positions, slots, sampling,
                                  config=base.config, dtype=dtype, implementation=implementation)
        jax.block_until_ready(out)
        return time.perf_counter() - t
    return step


# ----------------------------------------------------------------------------------------------
# The models: a random base and deltas, or real checkpoints; merged checkpoints for the baselines.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """A random Llama base and `deltas` random fine-tunes of it (base + noise), compressed."""

    layers: int = 4
    hidden: int = 512
    intermediate: int = 1408
    vocab: int = 4096
    heads: int = 8
    kv_heads: int | None = None  # None = heads
    context: int = 2048
    deltas: int = 8
    bits: int = 4
    sparsity: str | float | None = "2:4"
    group_size: int | None = 128
    weights_dtype: str = "bfloat16"
    noise: float = 0.01  # each fine-tune moves every tensor by this much of its spread
    seed: int = 0

    def model_config(self):
        from dzjax.models.config import ModelConfig, RopeConfig

        if self.hidden % self.heads:
            raise DzjaxError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        return ModelConfig(architecture="LlamaForCausalLM", vocab_size=self.vocab,
                           hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_layers=self.layers, num_heads=self.heads,
                           num_kv_heads=self.kv_heads or self.heads,
                           head_dim=self.hidden // self.heads, rms_norm_eps=1e-5,
                           rope=RopeConfig(theta=10000.0),
                           max_position_embeddings=self.context)


@dataclasses.dataclass(frozen=True)
class Models:
    """What the systems serve: the base, the delta files, and each delta's merged checkpoint."""

    base_dir: Path
    deltas: dict[str, Path]
    merged: dict[str, Path]
    build_s: float = 0.0  # 0 when everything was found ready


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_synthetic(config: SyntheticConfig, root: Path) -> Models:
    """Build (once; cached under root by the config's hash) the random base, its deltas
    (`dzjax.convert`, round-to-nearest for speed) and their merged checkpoints (`export_hf`)."""
    import shutil

    from dzjax.compress import convert, export_hf
    from dzjax.models.llama import CausalLM
    from dzjax.models.loading import load_base
    from dzjax.models.saving import save_hf

    out = Path(root) / f"synthetic-{_key(dataclasses.asdict(config))}"
    names = [f"delta{i}" for i in range(config.deltas)]
    models = Models(out / "base", {n: out / f"{n}.dz.safetensors" for n in names},
                    {n: out / f"merged-{n}" for n in names})
    if (out / "config.json").exists():
        return models
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_config, dtype = config.model_config(), jnp.dtype(config.weights_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = CausalLM(model_config, param_dtype=jnp.float32).init(
        jax.random.key(config.seed), ids, ids)["params"]
    save_hf(tmp / "base", model_config, params, dtype=dtype)
    base = load_base(tmp / "base", dtype=dtype)
    calibration = np.random.default_rng(config.seed).integers(0, config.vocab, (2, 16))
    for i, name in enumerate(names):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(config.seed + 1 + i), len(leaves))
        moved = [p + config.noise * (jnp.std(p) + 1e-2) * jax.random.normal(k, p.shape)
                 for p, k in zip(leaves, keys)]
        save_hf(tmp / "finetune", model_config, jax.tree.unflatten(treedef, moved), dtype=dtype)
        delta = convert(tmp / "base", tmp / "finetune", tmp / f"{name}.dz.safetensors",
                        bits=config.bits, sparsity=config.sparsity, group_size=config.group_size,
                        calibration=calibration, method="rtn", progress=False, name=name)
        shutil.rmtree(tmp / "finetune")
        export_hf(base, delta, tmp / f"merged-{name}")
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    os.replace(tmp, out)
    return dataclasses.replace(models, build_s=time.perf_counter() - start)


def prepare_real(base_dir: Path, deltas: dict[str, Path], weights_dtype: str,
                 root: Path) -> Models:
    """Real checkpoints: the merged checkpoints the swap baseline loads, exported once from the
    deltas (`export_hf`, in the base's dtype) under root, keyed by the files they come from."""
    from dzjax.compress import export_hf, load_delta
    from dzjax.models.loading import load_base

    files = {n: (str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime)
             for n, p in deltas.items()}
    out = Path(root) / f"real-{_key([str(Path(base_dir).resolve()), files, weights_dtype])}"
    merged = {n: out / f"merged-{n}" for n in deltas}
    start, base = time.perf_counter(), None
    for name, path in deltas.items():
        if not (merged[name] / "config.json").exists():
            base = base or load_base(base_dir, dtype=jnp.dtype(weights_dtype))
            export_hf(base, load_delta(path), merged[name], overwrite=True)
    return Models(Path(base_dir), dict(deltas), merged,
                  build_s=time.perf_counter() - start if base is not None else 0.0)


# ----------------------------------------------------------------------------------------------
# One benchmark run.


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    systems: tuple[str, ...] = SYSTEMS
    max_batch: int = 8  # batch slots of dzjax; largest static batch of the baselines
    dtype: str = "float32"  # activations
    weights_dtype: str = dataclasses.field(default_factory=lambda: default_weights_dtype())
    implementation: str | None = None  # delta kernels of dzjax
    slo_s: float = 10.0  # a request meets the SLO when its latency is at most this
    cold_swap: bool = True  # drop the merged checkpoint's pages from the page cache before a load
    merged_memory_fraction: float = 0.5  # merged models must fit in this much free memory
    decode_repeats: int = 20  # 0 = no decode-step microbenchmark

    def __post_init__(self):
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown or not self.systems:
            raise DzjaxError(f"systems are some of {', '.join(SYSTEMS)}; got {self.systems}")
        if self.max_batch < 1 or self.slo_s <= 0:
            raise DzjaxError(f"need max_batch >= 1 and slo > 0, got {self.max_batch}, {self.slo_s}")


def default_weights_dtype() -> str:
    """float32 on a CPU (bfloat16 weights cost a conversion there at every step), else bfloat16."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def benchmark(models: Models, workload_config: WorkloadConfig, config: BenchConfig) -> dict:
    """Serve one workload with each system; returns the report (metrics, not printed)."""
    from dzjax.models.loading import load_base

    base = load_base(models.base_dir, dtype=jnp.dtype(config.weights_dtype))
    max_seq_len = workload_config.prompt_len.high + workload_config.output_len.high
    if max_seq_len > base.config.max_position_embeddings:
        raise DzjaxError(f"prompts and outputs of up to {max_seq_len} tokens exceed the model's "
                         f"context of {base.config.max_position_embeddings}")
    workload = make_workload(workload_config)
    systems, prefill_s = {}, None
    for system in config.systems:
        if system != "dzjax" and prefill_s is None:  # the merged models share the base's programs
            prefill_s = warm_static(base, workload_config, max_batch=config.max_batch,
                                    dtype=jnp.dtype(config.dtype))
        systems[system] = _run_system(system, base, models, workload, config,
                                      max_seq_len=max_seq_len, prefill_s=prefill_s)
    span = workload[-1].arrival - workload[0].arrival
    report = {"offered": {  # throughputs compare capacities only when every system falls behind
        "arrival_span_s": span, "requests_per_s": len(workload) / span if span else None,
        "requested_tokens": sum(r.max_tokens for r in workload)},
        "systems": systems, "ratios": _ratios(systems)}
    if config.decode_repeats:
        decode = report["decode_step"] = decode_step_times(
            base, models.deltas, batch=config.max_batch, cache_len=max_seq_len,
            dtype=config.dtype, implementation=config.implementation,
            repeats=config.decode_repeats)
        report["ratios"]["decode_step_active_deltas_vs_base"] = decode["ratio_active_vs_base"]
        swap = systems.get("swap", {})
        if swap.get("switches"):  # what a swap costs, in decode steps of the base
            report["ratios"]["swap_load_vs_base_decode_step"] = (
                swap["switch_s"] / swap["switches"] / (decode["ms"]["base"] / 1e3))
    report["targets"] = _targets(report, workload_config)
    return report


def _run_system(system: str, base, models: Models, workload: list[BenchRequest],
                config: BenchConfig, *, max_seq_len: int, prefill_s: dict | None) -> dict:
    """One system's metrics on the workload (or why it was skipped)."""
    from dzjax.models.loading import load_base

    weights_dtype = jnp.dtype(config.weights_dtype)
    if system == "dzjax":
        outcomes, extra = run_dzjax(base, models.deltas, workload, max_batch=config.max_batch,
                                    max_seq_len=max_seq_len, dtype=config.dtype,
                                    implementation=config.implementation)
    else:
        if system == "swap":
            loader = swap_loader(models.merged, weights_dtype, config.cold_swap)
            extra = {"cold": config.cold_swap}
        else:
            fits, why = merged_fits(base, len(models.merged), config.merged_memory_fraction)
            if not fits:
                return {"skipped": why}
            resident = {n: load_base(d, dtype=weights_dtype) for n, d in models.merged.items()}
            loader, extra = resident.__getitem__, {"memory": why}
        outcomes, stats = run_static(loader, workload, max_batch=config.max_batch,
                                     dtype=jnp.dtype(config.dtype), prefill_s=prefill_s)
        extra.update(stats)
    return {**summarize(outcomes, len(workload), config.slo_s), **extra}


def _ratios(systems: dict) -> dict:
    tput = {n: s["throughput_tokens_per_s"] for n, s in systems.items() if "skipped" not in s}
    return {f"throughput_dzjax_vs_{other}": tput["dzjax"] / tput[other]
            for other in ("swap", "merged") if "dzjax" in tput and other in tput}


def _targets(report: dict, workload_config: WorkloadConfig) -> dict:
    """The issue's targets, with whether this run's conditions are the ones they are set for."""
    targets = {}
    ratio = report["ratios"].get("throughput_dzjax_vs_swap")
    if ratio is not None:
        targets["throughput_dzjax_vs_swap"] = {
            "target": ">= 3x at 8 deltas, uniform popularity", "measured": ratio,
            "met": ratio >= 3, "conditions_match": len(workload_config.models) == 8
            and workload_config.popularity == "uniform"}
    decode = report.get("decode_step")
    if decode is not None:
        targets["decode_step_8_deltas_vs_base"] = {
            "target": "<= 1.5x on a GPU", "measured": decode["ratio_active_vs_base"],
            "met": decode["ratio_active_vs_base"] <= 1.5,
            "conditions_match": decode["active_deltas"] == 8 and jax.default_backend() == "gpu"}
    return targets


# ----------------------------------------------------------------------------------------------
# Output: the JSON report, the plot, a short table.


def device_header() -> dict:
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{dev.device_kind}", "backend": jax.default_backend(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__, "load_average": os.getloadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def default_out() -> Path:
    return RESULTS_DIR / f"serving-{jax.default_backend()}-{datetime.date.today().isoformat()}.json"


def plot(report: dict, out: Path) -> Path:
    """The PNG beside `out`: throughput, TTFT and latency percentiles, each request's latency
    against its arrival, and SLO attainment as a function of the SLO."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DzjaxError("the plot needs matplotlib: pip install 'dzjax[bench]' "
                         "(or pass --no-plot)") from None
    systems = {n: s for n, s in report["systems"].items() if "skipped" not in s}
    names = list(systems)
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].bar(names, [systems[n]["throughput_tokens_per_s"] for n in names],
                 color=[f"C{i}" for i in range(len(names))])
    ax[0, 0].set_ylabel("generated tokens / s")
    ax[0, 0].set_title("throughput")
    x = np.arange(len(names))
    for j, (metric, q) in enumerate([("ttft_s", "p50"), ("ttft_s", "p99"),
                                     ("latency_s", "p50"), ("latency_s", "p99")]):
        ax[0, 1].bar(x + (j - 1.5) * 0.2, [systems[n][metric][q] for n in names], 0.2,
                     label=f"{metric.removesuffix('_s')} {q}")
    ax[0, 1].set_xticks(x, names)
    ax[0, 1].set_ylabel("seconds")
    ax[0, 1].set_title("time to first token and latency")
    ax[0, 1].legend(fontsize=8)
    slo = report["config"]["bench"]["slo_s"]
    top = max(max(r[4] for r in s["per_request"]) for s in systems.values())
    thresholds = np.linspace(0, top * 1.05, 200)
    for i, n in enumerate(names):
        rows = np.array([r[2:5] for r in systems[n]["per_request"]], float)  # arrival, ttft, lat.
        ax[1, 0].plot(rows[:, 0], rows[:, 2], ".", color=f"C{i}", label=n)
        ax[1, 1].plot(thresholds, [np.sum(rows[:, 2] <= t) / systems[n]["requests"]
                                   for t in thresholds], color=f"C{i}", label=n)
    ax[1, 0].axhline(slo, color="gray", linestyle=":", label=f"SLO {slo:g} s")
    ax[1, 0].set_xlabel("arrival (s)")
    ax[1, 0].set_ylabel("latency (s)")
    ax[1, 0].set_title("latency of each request")
    ax[1, 1].axvline(slo, color="gray", linestyle=":", label=f"SLO {slo:g} s")
    ax[1, 1].set_xlabel("SLO: latency at most (s)")
    ax[1, 1].set_ylabel("fraction of requests")
    ax[1, 1].set_title("SLO attainment")
    for a in ax[1]:
        a.legend(fontsize=8)
    w = report["config"]["workload"]
    fig.suptitle(f"{report['device']}: {len(w['models'])} deltas, {w['popularity']}, "
                 f"{w['num_requests']} requests at {w['rate']}/s, prompt {w['prompt_len']}, "
                 f"output {w['output_len']}, batch {report['config']['bench']['max_batch']}")
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def table(report: dict) -> str:
    """A few lines for the terminal."""
    lines = [(f"{'system':8s} {'tok/s':>8s} {'req/s':>6s} {'TTFT p50':>9s} {'p99':>7s} "
              f"{'latency p50':>11s} {'p99':>7s} {'SLO':>5s}")]
    for name, s in report["systems"].items():
        if "skipped" in s:
            lines.append(f"{name:8s} skipped: {s['skipped']}")
            continue
        lines.append(f"{name:8s} {s['throughput_tokens_per_s']:8.1f} "
                     f"{s['throughput_requests_per_s']:6.2f} {s['ttft_s']['p50']:8.2f}s "
                     f"{s['ttft_s']['p99']:6.2f}s {s['latency_s']['p50']:10.2f}s "
                     f"{s['latency_s']['p99']:6.2f}s {s['slo_attainment']:5.0%}")
    lines += [f"{k}: {v:.2f}x" for k, v in report["ratios"].items()]
    if "decode_step" in report:
        d = report["decode_step"]
        lines.append("decode step (ms, batch {}): ".format(d["batch"])
                     + ", ".join(f"{k} {v:.1f}" for k, v in d["ms"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command line.


def _sparsity(text: str):
    if text.lower() in ("none", "dense"):
        return None
    return text if ":" in text else float(text)


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def _defaults(cls) -> argparse.Namespace:
    """A dataclass's field defaults, without making one (that could start a JAX backend)."""
    return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(cls)
                                 if f.default is not dataclasses.MISSING})


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("base", nargs="?", type=Path,
                        help="base HF checkpoint (not with --synthetic)")
    parser.add_argument("--delta", action="append", type=_named_path, default=[],
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
    b.add_argument("--dtype", default=bd.dtype, help="activation dtype")
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
                        help="JSON to write (None: benchmarks/results/serving-<backend>-<date>"
                             ".json); the plot goes beside it as .png")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")


def _models(args, weights_dtype: str) -> tuple[Models, dict]:
    """Build or prepare the models the arguments name; returns them and their config record."""
    from dzjax.demo import default_cache_dir

    root = (args.cache_dir or default_cache_dir()) / "bench"
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
    config = BenchConfig(systems=args.systems, max_batch=args.max_batch, dtype=args.dtype,
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
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    written = [out] + ([] if args.no_plot else [plot(report, out)])
    print(table(report))
    print("wrote " + ", ".join(str(p) for p in written))
    return report


def _vocab_size(base_dir: Path) -> int:
    from dzjax.models.config import from_hf_config
    from dzjax.models.loading import read_hf_config

    return from_hf_config(read_hf_config(base_dir)).vocab_size


def _argv(args) -> list[str]:
    """The arguments as flags again (every one, defaults included), to rerun exactly."""
    out = [] if args.base is None else [str(args.base)]
    for name, value in sorted(vars(args).items()):
        if name in ("base", "run", "command") or value is False or (
                value is None and name != "sparsity"):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "sparsity" and value is None:
            out += [flag, "none"]
        elif value is True:
            out.append(flag)
        elif name == "delta":
            out += [a for n, p in value for a in (flag, f"{n}={p}")]
        elif name == "systems":
            out += [flag, ",".join(value)]
        else:
            out += [flag, str(value)]
    return out
