"""The benchmark's workload: seeded Poisson arrivals, uniform or Zipf popularity over the deltas,
prompt and output lengths. The same config (seed included) gives the same requests."""

from __future__ import annotations

import dataclasses

import numpy as np

from dzjax.errors import DzjaxError


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
