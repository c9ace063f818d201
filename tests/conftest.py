import shutil
from pathlib import Path

import numpy as np
import pytest

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
