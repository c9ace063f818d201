"""Property-based fuzzing of delta files (hypothesis): damaged bytes, garbled headers and made-up
files give a clear `DzjaxError` (never another exception, never a hang or a huge allocation),
or, when the damage changed nothing that matters, the same delta. CI runs a fixed set of examples
(profile "ci", derandomized); `make test-all` runs many more, random ones (profile "all")."""

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dzjax
from conftest import fixture_dir, make_deltas
from dzjax.compress.delta_file import content_hash
from dzjax.models.safetensors_io import SafetensorsFile, write_safetensors

SECONDS = 30  # per example, at most (the first one compiles nothing: loading is NumPy)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def delta_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    path = make_deltas(fixture_dir("llama"), tmp, 1)["ft0"]
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    return path, path.read_bytes(), dzjax.load_delta(path), base, tmp


def same_delta(a, b) -> bool:
    import jax

    leaves = [jax.tree.leaves(d.params) for d in (a, b)]
    return len(leaves[0]) == len(leaves[1]) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(*leaves))


def load_or_refuse(path):
    """Load a fuzzed file: the delta, or None when it was refused with a DzjaxError (any other
    exception fails the test); bounded in time."""
    start = time.monotonic()
    try:
        delta = dzjax.load_delta(path)
    except dzjax.DzjaxError:
        delta = None
    assert time.monotonic() - start < SECONDS
    return delta


@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1,
                      max_size=6))
def test_damaged_bytes_are_refused_or_harmless(delta_file, flips):
    path, data, original, base, tmp = delta_file
    damaged = bytearray(data)
    for where, mask in flips:
        damaged[where % len(damaged)] ^= mask
    bad = tmp / "flipped.dz"
    bad.write_bytes(bytes(damaged))
    delta = load_or_refuse(bad)
    assert delta is None or same_delta(delta, original)  # e.g. a flip in the header's padding


@given(cut=st.integers(0, 2**31))
def test_truncated_files_are_refused(delta_file, cut):
    path, data, original, base, tmp = delta_file
    bad = tmp / "cut.dz"
    bad.write_bytes(data[:cut % len(data)])
    assert load_or_refuse(bad) is None


def edit_at(tree, path_choice: int, value):
    """Replace one node of a JSON tree, chosen by index among all nodes, with `value`."""
    nodes = []

    def walk(node, parent, key):
        nodes.append((parent, key))
        children = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for k, child in children:
            walk(child, node, k)

    walk(tree, None, None)
    parent, key = nodes[path_choice % len(nodes)]
    if parent is None:
        return value
    parent[key] = value
    return tree


@given(choice=st.integers(0, 10**6), value=json_values)
def test_garbled_headers_with_matching_hashes_are_refused_or_usable(delta_file, choice, value):
    """The worst case for the checks: the header says something else but every hash matches.
    A delta that loads must then either work on the base or be refused when used."""
    path, data, original, base, tmp = delta_file
    sf = SafetensorsFile(path)
    meta = edit_at(json.loads(sf.metadata["dzjax"]), choice, value)
    header = json.dumps(meta)
    bad = tmp / "garbled.dz"
    write_safetensors(bad, {k: sf.read(k) for k in sf.keys()},
                      metadata={"dzjax": header, "dzjax_digest": content_hash(header)})
    delta = load_or_refuse(bad)
    if delta is not None:
        try:
            logits = dzjax.logits(base, [[1, 2, 3]], delta=delta)
        except dzjax.DzjaxError:
            return
        assert bool(jnp.isfinite(logits).all())


@given(header=st.dictionaries(st.text(max_size=30), json_values, max_size=6),
       data=st.binary(max_size=256))
def test_made_up_safetensors_files_are_refused(delta_file, header, data):
    _, _, original, base, tmp = delta_file
    raw = json.dumps(header).encode()
    bad = tmp / "made_up.dz"
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    assert load_or_refuse(bad) is None
