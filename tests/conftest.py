import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

# Eight CPU devices, for the tensor-parallel tests (a mesh of 1, 2, 4 or 8). Must be set before
# JAX starts its backend; single-device code runs on the first, as without it.
jax.config.update("jax_num_cpu_devices", 8)
# Compiled programs go to a persistent cache: the suite compiles the same programs in several
# modules (and clears its in-memory caches after each, below), and loading one is far cheaper
# than compiling it again. Kept in .jax_cache/ (git-ignored), so a second run is faster still.
_CACHE = os.environ.get("DZJAX_TEST_JAX_CACHE") or str(Path(__file__).parent.parent / ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

# Fuzzing (hypothesis): CI runs a fixed, small set of examples; `make test-all` many random ones.
try:
    from hypothesis import HealthCheck, settings

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                              suppress_health_check=_quiet, print_blob=True)
    settings.register_profile("all", max_examples=300, deadline=None,
                              suppress_health_check=_quiet, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # the test extra is not installed: the fuzz tests are skipped
    pass

FIXTURES = Path(__file__).parent / "fixtures"
ARCHITECTURES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def fixture_dir(name: str) -> Path:
    return FIXTURES / name


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as ref:
        return dict(ref)


@pytest.fixture
def copy_fixture(tmp_path):
    """copy_fixture(name) -> a writable copy of a fixture checkpoint, for tests that damage it."""

    def copy(name: str = "llama") -> Path:
        return Path(shutil.copytree(FIXTURES / name, tmp_path / name))

    return copy


def make_finetune(base_dir: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A synthetic full fine-tune of a checkpoint: every tensor (norms and biases too) moved by
    Gaussian noise of `scale` times the tensor's spread, saved as an HF checkpoint."""
    import jax
    import jax.numpy as jnp

    from dzjax.models.loading import load_base
    from dzjax.models.saving import save_hf

    base = load_base(base_dir, dtype=jnp.float32)
    leaves, treedef = jax.tree.flatten(base.params)
    rng = np.random.default_rng(seed)
    moved = [np.asarray(a) + scale * (np.std(np.asarray(a)) + 1e-2)
             * rng.standard_normal(a.shape).astype(np.float32) for a in leaves]
    hf_config = base.hf_config.to_dict() if base.hf_config is not None else None
    return save_hf(out, base.config, jax.tree.unflatten(treedef, moved), dtype=jnp.float32,
                   hf_config=hf_config, tokenizer=base.tokenizer)


def make_deltas(base_dir: Path, out_dir: Path, count: int, *, group_size: int = 32,
                sparsity="2:4", bits: int = 4, **options) -> dict[str, Path]:
    """`count` synthetic fine-tunes of base_dir, converted (round-to-nearest, fast) to delta
    files; returns {name: path}. `options`: further `dzjax.convert` options."""
    import dzjax

    out = {}
    calibration = np.random.default_rng(0).integers(0, 200, (2, 16))
    for i in range(count):
        ft = make_finetune(base_dir, out_dir / f"ft{i}", seed=100 + i)
        path = out_dir / f"ft{i}.dz.safetensors"
        dzjax.convert(base_dir, ft, path, bits=bits, sparsity=sparsity, group_size=group_size,
                      calibration=calibration, method="rtn", progress=False, name=f"ft{i}",
                      **options)
        out[f"ft{i}"] = path
    return out


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. Each holds memory mappings of its
    machine code, and the whole suite's would exceed the kernel's limit on mappings
    (vm.max_map_count, 65530 by default): LLVM then aborts with "Cannot allocate memory"."""
    yield
    jax.clear_caches()
