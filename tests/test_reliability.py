"""Reliability: each defect found by trying dzjax as a hostile user and a faulty disk would, with
the test that reproduces it. Nobody waits forever, no file or request can exhaust the server,
nothing is corrupted or overwritten silently."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import zstandard

import dzjax
from conftest import fixture_dir, make_deltas
from dzjax.compress.delta_file import DeltaFileError, content_hash
from dzjax.models.safetensors_io import SafetensorsFile, remove_stale_temps, write_safetensors
from dzjax.serving import DeltaUnavailableError, RequestError, ServerClosedError

OPTIONS = dict(max_batch=4, max_seq_len=64, max_resident_deltas=2)


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    paths = make_deltas(fixture_dir("llama"), tmp, 3)
    zstd = make_deltas(fixture_dir("llama"), tmp / "z", 1, zstd=True)["ft0"]
    return dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32), paths, zstd


def rewrite(path, out, edit_meta=None, edit_tensors=None):
    """A copy of a delta file with its header or tensors edited and every hash made to match
    again: a well-formed file that says something else."""
    sf = SafetensorsFile(path)
    meta = json.loads(sf.metadata["dzjax"])
    tensors = {k: np.array(sf.read(k)) for k in sf.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    for entry in meta["tensors"].values():
        entry["hashes"] = {k: content_hash(tensors[k]) for k in entry["hashes"] if k in tensors}
    if edit_meta:
        edit_meta(meta)
    header = json.dumps(meta)
    write_safetensors(out, tensors, metadata={"dzjax": header, "dzjax_digest": content_hash(header)})
    return out


def flip_a_bit(path, offset_from_end=1000):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


# -- 1. a request whose delta cannot be read fails, in bounded time; close() does not hang ------

def evicted_server(base, paths, **options):
    """A server whose ft0 was used, then pushed off the device and out of the host cache."""
    server = dzjax.serve(base, paths, **OPTIONS, host_cache_bytes=0, **options)
    for name in ("ft0", "ft1", "ft2"):
        server.generate([[5, 6, 7]], model=name, max_tokens=2, ignore_eos=True)
    assert "ft0" not in server.stats()["pool"]["resident"]
    return server


def test_a_delta_file_damaged_after_eviction_fails_its_requests_only(deltas, tmp_path):
    """ft0's file, after ft0 left the device and the host, is removed, then bit-flipped, then
    replaced by another valid delta: each time its requests fail clearly and in bounded time,
    the others are answered, and once the file is mended ft0 is served again."""
    base, paths, _ = deltas
    own = {n: shutil.copy(p, tmp_path / p.name) for n, p in paths.items()}
    server = evicted_server(base, own)
    try:
        for failures, (damage, message) in enumerate([
                (lambda: os.remove(own["ft0"]), "no such file"),
                (lambda: flip_a_bit(own["ft0"]), "damaged"),
                (lambda: shutil.copy(paths["ft1"], own["ft0"]), "changed on disk")], 1):
            damage()
            start = time.monotonic()
            doomed = server.submit([5, 6, 7], "ft0", max_tokens=4, ignore_eos=True)
            others = [server.submit([5, 6, 7], n, max_tokens=4, ignore_eos=True)
                      for n in ("ft1", None, "ft2")]
            with pytest.raises(DeltaUnavailableError, match=message):
                doomed.result(timeout=60)
            assert time.monotonic() - start < 60
            assert all(len(h.result(timeout=60).token_ids) == 4 for h in others)
            shutil.copy(paths["ft0"], own["ft0"])  # mended: read again and served
            assert len(server.submit([5, 6, 7], "ft0", max_tokens=4, ignore_eos=True)
                       .result(timeout=60).token_ids) == 4
            assert server.stats()["pool"]["failed_reads"] == failures
            for name in ("ft1", "ft2"):  # push ft0 off the device and the host again
                server.generate([[5, 6, 7]], model=name, max_tokens=2, ignore_eos=True)
    finally:
        start = time.monotonic()
        server.close(timeout=30)
        assert time.monotonic() - start < 31


def test_a_read_that_hangs_gives_up_after_its_timeout(deltas, monkeypatch):
    from dzjax.serving import pool

    base, paths, _ = deltas
    server = evicted_server(base, paths, delta_read_timeout_s=0.5)
    release = __import__("threading").Event()
    monkeypatch.setattr(pool.DeltaPool, "_read_again", lambda self, entry: release.wait(60))
    try:
        with pytest.raises(DeltaUnavailableError, match="more than 0.5 s"):
            server.submit([5, 6], "ft0", max_tokens=2).result(timeout=30)
        assert server.generate([[5, 6]], model="ft1", max_tokens=2)  # the others go on
    finally:
        release.set()
        server.close(timeout=10)


def test_close_with_a_timeout_ends_what_still_runs(deltas, monkeypatch):
    from dzjax.serving import steps

    base, paths, _ = deltas
    decode = steps.decode
    monkeypatch.setattr(steps, "decode", lambda *a, **k: (time.sleep(0.05), decode(*a, **k))[1])
    server = dzjax.serve(base, paths, **OPTIONS)
    long = server.submit([5, 6, 7], "ft0", max_tokens=60, ignore_eos=True)
    next(long.events())  # it runs
    start = time.monotonic()
    server.close(timeout=0.2)
    assert time.monotonic() - start < 5
    with pytest.raises(ServerClosedError, match="closed before this request finished"):
        long.result(timeout=5)


# -- 2. a zstd frame cannot make load_delta allocate what it claims ------------------------------

def zstd_bomb(size: int, declare: bool) -> bytes:
    """A small zstd frame of `size` zero bytes, which declares that size in its header (or not)."""
    cobj = zstandard.ZstdCompressor(write_content_size=declare).compressobj(
        size=size if declare else -1)
    chunk = bytes(1 << 20)
    parts = [cobj.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + cobj.flush()


@pytest.mark.parametrize("declare", [True, False])
def test_a_zstd_field_claiming_gigabytes_is_refused_without_allocating(deltas, tmp_path, declare):
    _, _, zstd = deltas
    key = "model.layers.0.mlp.up_proj.qweight.zst"
    bomb = np.frombuffer(zstd_bomb(1 << 30, declare), np.uint8)
    bad = rewrite(zstd, tmp_path / "bomb.dz", edit_tensors=lambda t: t.__setitem__(key, bomb))
    # The child's own peak (VmHWM: its memory map's high-water mark; ru_maxrss would count the
    # parent's memory at fork too).
    probe = ("from dzjax.compress.delta_file import load_delta\n"
             f"try:\n    load_delta({str(bad)!r})\nexcept Exception as e:\n    print(e)\n"
             "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
             "print(int(hwm.split()[1]) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split("\n")
    assert "declares 1073741824 bytes" in out[0] if declare else "holds more than" in out[0]
    assert int(out[1]) < 900, f"peak RSS {out[1]} MiB"  # a 1 GiB allocation would show


# -- 3. a small file claiming a huge model is cheap to refuse -----------------------------------

def test_a_file_claiming_thousands_of_layers_is_checked_fast(deltas, tmp_path):
    base, paths, _ = deltas

    def layers(n):
        def edit(m):
            m["config"]["num_layers"] = n
            m["config"]["sliding_windows"] = [None] * n
        return edit

    claim = rewrite(paths["ft0"], tmp_path / "l.dz", edit_meta=layers(1000))
    start = time.monotonic()
    with pytest.raises(DeltaFileError, match="config that differs"):
        dzjax.load_delta(claim, base=base)
    delta = dzjax.load_delta(claim)  # no base: its 2 layers of tensors, in a 1000-layer model
    assert time.monotonic() - start < 10  # was 38 s (the model traced with 1000 layers)
    assert delta.metadata["config"]["num_layers"] == 1000
    with pytest.raises(DeltaFileError, match=r"num_layers=5000 is not an integer in \[1, 1024\]"):
        dzjax.load_delta(rewrite(paths["ft0"], tmp_path / "m.dz", edit_meta=layers(5000)))


# -- 4, 5. no request can slow the others: stop strings and prompt sizes are bounded ------------

def test_stop_strings_and_prompt_sizes_are_bounded(deltas, monkeypatch):
    base = dzjax.load_base(fixture_dir("trained") / "base", dtype=jnp.float32)
    with dzjax.serve(base, {}, max_batch=2, max_seq_len=64) as server:
        with pytest.raises(RequestError, match="17 stop strings; at most 16") as e:
            server.submit("hi", stop=[f"s{i}" for i in range(17)])
        assert e.value.param == "stop"
        with pytest.raises(RequestError, match="300 characters; at most 256"):
            server.submit("hi", stop=["x" * 300])

        def untokenizable(*args, **kwargs):
            raise AssertionError("the prompt was tokenized before its size was checked")
        monkeypatch.setattr(type(base.tokenizer), "__call__", untokenizable)
        with pytest.raises(RequestError, match=r"\d+ bytes of text; at most 2048") as e:
            server.submit("x" * 5000)  # 32 bytes per position of the context, by default
        assert e.value.param == "prompt"
        with pytest.raises(RequestError, match="97 tokens; the context holds at most 64"):
            server.submit(list(range(3, 100)))
        monkeypatch.undo()
        assert server.generate("hi", max_tokens=2)


def test_a_lone_surrogate_is_a_clear_error(deltas):
    base = dzjax.load_base(fixture_dir("trained") / "base", dtype=jnp.float32)
    with dzjax.serve(base, {}, max_batch=2, max_seq_len=64) as server:
        with pytest.raises(RequestError, match="not valid text: surrogates not allowed"):
            server.submit("ok \udc80 ok")
    with pytest.raises(dzjax.DzjaxError, match="prompt 0 is not valid text"):
        dzjax.generate(base, ["\udc80"])


# -- 6, 8, 11. convert never destroys its inputs, fails before any work, leaves nothing ----------

def copy_base(tmp_path):
    return shutil.copytree(fixture_dir("llama"), tmp_path / "base")


@pytest.mark.parametrize("target", ["model.safetensors", "sub/delta.dz", "."])
def test_convert_refuses_to_write_into_its_inputs(tmp_path, target, monkeypatch):
    from dzjax.compress import pipeline

    base = copy_base(tmp_path)
    before = (base / "model.safetensors").read_bytes()
    monkeypatch.setattr(pipeline, "_compress", lambda *a: pytest.fail("work started"))
    with pytest.raises(dzjax.DzjaxError, match="inside the input checkpoint|is a directory"):
        dzjax.convert(base, fixture_dir("llama_ft"), base / target, progress=False)
    assert (base / "model.safetensors").read_bytes() == before


def test_the_convert_command_refuses_to_destroy_the_base(tmp_path, capsys):
    from dzjax.cli import main

    base = copy_base(tmp_path)
    before = (base / "model.safetensors").read_bytes()
    assert main(["convert", str(base), str(fixture_dir("llama_ft")), "-o",
                 str(base / "model.safetensors"), "--quiet"]) == 2
    assert "inside the input checkpoint" in capsys.readouterr().err
    assert (base / "model.safetensors").read_bytes() == before


def test_convert_checks_its_output_before_any_work(tmp_path, monkeypatch):
    from dzjax.compress import pipeline

    monkeypatch.setattr(pipeline, "_compress", lambda *a: pytest.fail("work started"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(dzjax.DzjaxError, match="is a directory"):
        dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: nothing to check here
        pytest.skip("running as a user whom permissions do not bind")
    with pytest.raises(dzjax.DzjaxError, match="not a writable folder"):
        dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), locked / "x.dz")


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_run(deltas, tmp_path):
    out = tmp_path / "ft.dz"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ft.dz.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"half a delta")
    live = tmp_path / f".ft.dz.{os.getppid()}.def456.tmp"  # a running process's: kept
    live.write_bytes(b"being written")
    assert remove_stale_temps(out) == [stale]
    assert live.exists() and not stale.exists()


# Slow (CI time): 22 s; a killed write's temporary files are checked by
# test_temporary_files_of_a_killed_write_are_removed_on_the_next_run.
@pytest.mark.slow
def test_a_killed_convert_leaves_no_temporary_file(tmp_path):
    """SIGTERM while the delta is written: the command removes its temporary file."""
    out = tmp_path / "ft.dz"
    script = ("import os, signal, sys\n"
              "from dzjax.models import safetensors_io\n"
              "real = safetensors_io._write_body\n"
              "def slow(f, *a):\n"
              "    f.write(b'x' * 100)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "safetensors_io._write_body = slow\n"
              "from dzjax.cli import main\n"
              f"sys.exit(main(['convert', {str(fixture_dir('llama'))!r}, "
              f"{str(fixture_dir('llama_ft'))!r}, '-o', {str(out)!r}, '--quiet', "
              "'--n-samples', '2', '--seq-len', '16', '--method', 'rtn']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 128 + 15, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# -- 7, 11. damaged or garbled content is refused at load ----------------------------------------

def test_bit_flips_anywhere_are_detected(deltas, tmp_path):
    _, paths, _ = deltas
    size = paths["ft0"].stat().st_size
    header = 8 + int.from_bytes(paths["ft0"].read_bytes()[:8], "little")
    for where in (size - 10, (size + header) // 2, header + 3, header // 2):
        bad = tmp_path / f"flip{where}.dz"
        data = bytearray(paths["ft0"].read_bytes())
        data[where] ^= 0x04
        bad.write_bytes(bytes(data))
        with pytest.raises(dzjax.DzjaxError):  # whatever it hit: a clear error, never served
            dzjax.load_delta(bad)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.up_proj.scales", "model.norm.weight"])
def test_nan_or_inf_in_scales_or_exact_tensors_is_refused(deltas, tmp_path, key):
    _, paths, _ = deltas

    def poison(t):
        t[key] = t[key].copy()
        t[key].reshape(-1)[3] = np.inf if "norm" in key else np.nan
    bad = rewrite(paths["ft0"], tmp_path / "nan.dz", edit_tensors=poison)
    with pytest.raises(DeltaFileError, match=f"'{key}' holds NaN or infinite values"):
        dzjax.load_delta(bad)


def test_zero_points_beyond_the_codes_are_refused(deltas, tmp_path):
    _, paths, _ = deltas
    key = "model.layers.0.mlp.up_proj.zeros"

    def poison(t):
        t[key] = t[key].copy()
        t[key].reshape(-1)[5] = 200  # 4-bit codes: zero points must be below 16
    bad = rewrite(paths["ft0"], tmp_path / "zeros.dz", edit_tensors=poison)
    with pytest.raises(DeltaFileError, match=f"'{key}' holds zero points up to 200; 4-bit codes "
                                             "need them below 16"):
        dzjax.load_delta(bad)


@pytest.mark.parametrize("swap", [False, True], ids=["repeated", "decreasing"])
def test_2_4_positions_out_of_order_are_refused(deltas, tmp_path, swap):
    """The kernels place each kept value by its position and count on increasing positions (a
    file `convert` wrote has them): one group's two positions made equal, or swapped."""
    _, paths, _ = deltas
    key = "model.layers.0.mlp.up_proj.meta"

    def poison(t):
        t[key] = t[key].copy()
        word = int(t[key][0, 7])  # stored rows 0, 1 (group 0 of column 7): bits 0-1 and 2-3
        first, second = word & 3, word >> 2 & 3
        assert first < second  # as written
        new = (second | first << 2) if swap else (first | first << 2)
        t[key][0, 7] = np.uint32(word & ~0xF | new)
    bad = rewrite(paths["ft0"], tmp_path / "meta.dz", edit_tensors=poison)
    with pytest.raises(DeltaFileError, match=rf"'{key}': the 2:4 positions of group 0 of column 7 "
                                             r"are \[\d, \d\]; each group's must be distinct, "
                                             "increasing and below 4"):
        dzjax.load_delta(bad)


@pytest.mark.parametrize("version", [True, 2.0, "2", 1])
def test_only_the_integer_format_version_is_read(deltas, tmp_path, version):
    _, paths, _ = deltas
    bad = rewrite(paths["ft0"], tmp_path / "v.dz",
                  edit_meta=lambda m: m.__setitem__("format_version", version))
    with pytest.raises(DeltaFileError, match="format_version .* is not supported"):
        dzjax.load_delta(bad)


def test_a_file_without_hashes_is_refused(deltas, tmp_path):
    _, paths, _ = deltas
    sf = SafetensorsFile(paths["ft0"])
    old = tmp_path / "v1.dz"
    write_safetensors(old, {k: sf.read(k) for k in sf.keys()},
                      metadata={"dzjax": sf.metadata["dzjax"]})
    with pytest.raises(DeltaFileError, match="without content hashes"):
        dzjax.load_delta(old)


# -- 9. deeply nested JSON -----------------------------------------------------------------------

def test_deeply_nested_headers_are_clear_errors(deltas, tmp_path):
    _, paths, _ = deltas
    nested = rewrite(paths["ft0"], tmp_path / "n.dz",
                     edit_meta=lambda m: m.__setitem__("name", json.loads("[" * 50 + "]" * 50)))
    with pytest.raises(DeltaFileError, match="nested 51 levels deep; at most 16"):
        dzjax.load_delta(nested)
    sf = SafetensorsFile(paths["ft0"])
    deep = tmp_path / "d.dz"
    meta = {"dzjax": sf.metadata["dzjax"], "dzjax_digest": sf.metadata["dzjax_digest"]}
    header = (json.dumps({"__metadata__": meta})[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000
              + "}").encode()
    deep.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(dzjax.CheckpointError, match="nested too deeply"):
        dzjax.load_delta(deep)


# -- 10. the base check covers every weight -------------------------------------------------------

def test_a_base_with_a_few_weights_changed_is_another_base(deltas, tmp_path):
    """2000 weights moved by +5 (far from the 64 sampled per tensor): the quick fingerprint
    agrees, the digest does not, so the delta is refused."""
    base, paths, _ = deltas
    other = copy_base(tmp_path)
    sf = SafetensorsFile(other / "model.safetensors")
    tensors = {k: np.array(sf.read(k)) for k in sf.keys()}
    flat = tensors["model.layers.0.mlp.up_proj.weight"].reshape(-1)
    sampled = set(np.linspace(0, flat.size - 1, 64).astype(int))
    moved = [i for i in range(1, flat.size, 3) if i not in sampled][:2000]
    flat[moved] += 5
    write_safetensors(other / "model.safetensors", tensors, metadata=sf.metadata)
    changed = dzjax.load_base(other, dtype=jnp.float32)
    assert changed.fingerprint == base.fingerprint and changed.digest != base.digest
    with pytest.raises(DeltaFileError, match="some of its weights differ"):
        dzjax.logits(changed, [[1, 2, 3]], delta=dzjax.load_delta(paths["ft0"]))
    with pytest.raises(DeltaFileError, match="some of its weights differ"):
        dzjax.load_delta(paths["ft0"], base=changed)


def test_the_digest_is_the_same_from_files_and_params_in_any_dtype(deltas):
    from dzjax.models.loading import checkpoint_digest

    base, _, _ = deltas
    from_files = checkpoint_digest(fixture_dir("llama"), base.config)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        loaded = dzjax.load_base(fixture_dir("llama"), dtype=dtype)
        assert loaded.digest == from_files
    built = dzjax.Base(config=base.config, params=base.params)  # no files: from the params
    assert built.digest == from_files


def test_a_waiting_delta_is_read_once_however_long_it_waits(deltas):
    """A small host cache: deltas read for queued requests are kept on the host until they
    run, instead of evicting each other and being read again and again."""
    base, paths, _ = deltas
    with dzjax.serve(base, paths, max_batch=1, max_seq_len=128, max_resident_deltas=2,
                     host_cache_bytes=0) as server:
        server.generate([[5, 6]], model="ft0", max_tokens=2, ignore_eos=True)
        before = server.stats()["pool"]["disk_reads"]
        handles = [server.submit([5, 6, 7], None, max_tokens=100, ignore_eos=True)]
        handles += [server.submit([5, 6, 7], m, max_tokens=2, ignore_eos=True)
                    for m in ("ft1", "ft2")]
        assert all(h.result(timeout=120).finish_reason == "length" for h in handles)
        assert server.stats()["pool"]["disk_reads"] - before == 2


def test_a_failed_device_write_fails_one_request_and_leaves_no_stale_error(deltas, monkeypatch):
    from dzjax.models import delta_stacks

    base, paths, _ = deltas
    real, calls = delta_stacks.write_slot, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device write failure")
        return real(*args)
    monkeypatch.setattr(delta_stacks, "write_slot", flaky)
    with dzjax.serve(base, paths, **OPTIONS, host_cache_bytes=0) as server:
        with pytest.raises(DeltaUnavailableError, match="injected"):
            server.generate([[5, 6, 7]], model="ft0", max_tokens=2)
        for name in ("ft0", "ft1", "ft2", "ft0"):  # ft0 evicted and read back: no old error
            assert server.generate([[5, 6, 7]], model=name, max_tokens=2, ignore_eos=True)
