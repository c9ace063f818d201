"""Resumable convert (orbax): killed midway and started again, it writes the same file."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import fixture_dir

import dzjax
from dzjax.compress import pipeline, resume

FAST = dict(n_samples=4, seq_len=32, progress=False, bits=4, sparsity="2:4", group_size=32)
BASE, FT = fixture_dir("llama"), fixture_dir("llama_ft")  # 2 decoder layers


def _counting_layers(monkeypatch, fail_at=None):
    """Count the decoder layers `convert` computes; raise when it reaches layer `fail_at`."""
    done = []
    real = pipeline._Run.layer

    def layer(self, i, x):
        if i == fail_at:
            raise KeyboardInterrupt(f"killed at layer {i}")
        done.append(i)
        return real(self, i, x)
    monkeypatch.setattr(pipeline._Run, "layer", layer)
    return done


def test_a_resumed_convert_writes_the_same_bytes(tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole.dz"
    dzjax.convert(BASE, FT, whole, checkpoint_every=0, **FAST)
    assert not resume.checkpoint_dir(whole).exists()  # removed on success

    out = tmp_path / "resumed.dz"
    with monkeypatch.context() as m:  # killed at layer 1, with other arguments
        done = _counting_layers(m, fail_at=1)
        with pytest.raises(KeyboardInterrupt):
            dzjax.convert(BASE, FT, out, checkpoint_every=0, **dict(FAST, bits=2))
        assert done == [0] and resume.checkpoint_dir(out).is_dir() and not out.exists()
    with monkeypatch.context() as m:  # again with the right ones: that checkpoint is not used
        done = _counting_layers(m, fail_at=1)
        with pytest.raises(KeyboardInterrupt):
            dzjax.convert(BASE, FT, out, checkpoint_every=0, **FAST)
        assert done == [0] and "starting over" in capsys.readouterr().err
    done = _counting_layers(monkeypatch)
    delta = dzjax.convert(BASE, FT, out, checkpoint_every=0, **FAST)
    assert done == [1]  # layer 0 came from the checkpoint
    assert "resuming" in capsys.readouterr().err
    assert out.read_bytes() == whole.read_bytes()
    assert not resume.checkpoint_dir(out).exists()
    assert delta.metadata["report"]["seconds"] >= 0  # timings are returned, not stored


def test_a_resumed_target_bits_convert_keeps_its_measured_allocation(tmp_path, monkeypatch):
    """The sensitivity pass runs once: a resumed convert takes the allocation the killed one
    chose (saved with its progress) instead of measuring again."""
    from dzjax.compress import allocate

    measured, real = [], allocate.measure
    monkeypatch.setattr(allocate, "measure", lambda *a: measured.append(1) or real(*a))
    options = dict(n_samples=4, seq_len=32, progress=False, group_size=32, target_bits=3.5,
                   checkpoint_every=0)
    out = tmp_path / "d.dz"
    with monkeypatch.context() as m:
        _counting_layers(m, fail_at=1)
        with pytest.raises(KeyboardInterrupt):
            dzjax.convert(BASE, FT, out, **options)
    assert measured == [1]
    done = _counting_layers(monkeypatch)
    delta = dzjax.convert(BASE, FT, out, **options)
    assert done == [1] and measured == [1]  # layer 0 and the allocation from the checkpoint
    allocation = delta.metadata["settings"]["allocation"]
    assert set(allocation) == {n for unit in allocate.units(2) for n in unit}
    assert delta.metadata["report"]["bits_per_weight"] <= 3.5


# Slow (CI time, ~40 s: two fresh processes); the resume itself is in the default run above.
@pytest.mark.slow
def test_a_convert_killed_by_sigkill_resumes(tmp_path):
    """A real kill (no Python cleanup at all) after the first layer's checkpoint."""
    out, whole = tmp_path / "d.dz", tmp_path / "whole.dz"
    args = [str(BASE), str(FT), "--quiet", "--n-samples", "4", "--seq-len", "32", "--bits", "4",
            "--sparsity", "2:4", "--group-size", "32", "--checkpoint-every", "0"]
    script = ("import os, signal, sys\n"
              "from dzjax.compress import pipeline\n"
              "real = pipeline._Run.layer\n"
              "def layer(self, i, x):\n"
              "    if i == 1:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(self, i, x)\n"
              "pipeline._Run.layer = layer\n"
              "from dzjax.cli import main\n"
              f"sys.exit(main({['convert'] + args + ['-o', str(out)]!r}))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert resume.checkpoint_dir(out).is_dir() and not out.exists()
    logs = {}
    for target in (out, whole):
        done = subprocess.run([sys.executable, "-m", "dzjax.cli", "convert", *args, "-o",
                               str(target)], capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        logs[target] = done.stderr
    assert "resuming" in logs[out] and "resuming" not in logs[whole]
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.dz", "whole.dz"]


def test_checkpoint_every_is_validated(tmp_path):
    with pytest.raises(dzjax.DzjaxError, match="checkpoint_every"):
        dzjax.convert(BASE, FT, tmp_path / "d.dz", checkpoint_every=-1, **FAST)
    assert list(tmp_path.iterdir()) == []
