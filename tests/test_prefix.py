"""Prefix sharing: the page table's index of full prompt pages per model (pure Python), and the
engine serving requests with a common system prompt from shared pages (same tokens as alone,
fewer pages, also through preemption; never across models; forgotten when a delta goes)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, make_deltas

import dzjax
from dzjax.serving.kv_pages import PageTable


def find(pt: PageTable, model, tokens) -> list[int]:
    return pt.lookup(model, pt.keys(model, tokens))


def test_full_pages_of_a_prefilled_context_are_shared_by_the_same_model_only():
    pt = PageTable(num_pages=10, page_size=4, rows=3, max_pages=4)
    a = list(range(1, 12))  # 11 tokens: pages 0-1 full before the last position, page 2 not
    pt.assign(0, pt.pages_for(len(a) + 1))
    pt.register(0, "ft0", pt.keys("ft0", a))
    b = a[:8] + [99, 98, 97]  # the same first 8 tokens
    shared = find(pt, "ft0", b)
    assert shared == list(pt.tables[0, :2])
    assert find(pt, "ft1", b) == [] and find(pt, None, b) == []  # another model, the base
    assert find(pt, "ft0", a[:4] + [0] * 7) == [pt.tables[0, 0]]  # diverges in the 2nd page
    assert find(pt, "ft0", a[:8]) == [pt.tables[0, 0]]  # page 2 holds the last position
    assert pt.cost(3, shared) == 1  # held by row 0: only the third page is new
    free = pt.free
    pt.assign(1, 3, shared)
    assert pt.free == free - 1 and pt.hits == 2
    np.testing.assert_array_equal(pt.prefill_table(1)[:3], [10, 10, pt.tables[1, 2]])
    # Release both: the indexed pages stay cached (and count as free), the others are freed.
    assert pt.freed_by_releasing([1, 0]) == [1, 3]  # row 1 frees its own page only
    pt.release(1)
    pt.release(0)
    assert pt.free == 10 and pt.in_use == 0 and pt.cached == 2
    shared = find(pt, "ft0", b)
    assert len(shared) == 2 and pt.cost(3, shared) == 3  # cached pages count as taken again
    pt.assign(2, 3, shared)
    assert pt.cached == 0 and pt.in_use == 3


def test_cached_prefix_pages_are_reused_last_and_forgotten_on_demand():
    pt = PageTable(num_pages=4, page_size=4, rows=2, max_pages=4)
    ctx = list(range(20, 33))  # 13 tokens: 3 shareable pages
    pt.assign(0, 4)
    pt.register(0, "ft0", pt.keys("ft0", ctx))
    pt.release(0)
    assert pt.cached == 3 and pt.free == 4
    pt.assign(1, 2)  # the never-indexed page first, then the least recently released cached one
    # The deepest page of the prefix went first (released last-page first): 2 pages still match.
    assert pt.cached == 2 and find(pt, "ft0", ctx) == [0, 1]
    pt.release(1)
    pt.forget("ft0")
    assert pt.cached == 0 and pt.free == 4
    pt.assign(0, 4)
    pt.register(0, None, pt.keys(None, ctx))
    pt.release(0)
    pt.forget(everything=True)
    assert pt.cached == 0 and find(pt, None, ctx) == []


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    paths = make_deltas(fixture_dir("llama"), tmp_path_factory.mktemp("prefix"), 2)
    return dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32), paths


def _requests(seed: int):
    rng = np.random.default_rng(seed)
    system = [int(t) for t in rng.integers(3, 200, 40)]  # 2 full pages of 16, and 8 tokens
    return [system + [int(t) for t in rng.integers(3, 200, int(n))]
            for n in rng.integers(1, 12, 8)]


def test_requests_with_a_common_system_prompt_share_its_pages(llama):
    base, paths = llama
    prompts = _requests(40)
    names = ["ft0", "ft0", None, "ft1", "ft0", None, "ft1", "ft0"]
    options = dict(max_batch=4, max_seq_len=64, max_resident_deltas=2)
    out, kv = {}, {}
    for sharing in (False, True):
        with dzjax.serve(base, paths, **options, prefix_sharing=sharing) as server:
            first = server.generate(prompts[:1], model=names[:1], max_tokens=6, ignore_eos=True)
            rest = server.generate(prompts[1:], model=names[1:], max_tokens=6, ignore_eos=True)
            out[sharing], kv[sharing] = first + rest, server.stats()["kv"]
    assert out[True] == out[False]
    # ft0's later requests reuse the first's 2 pages; the base's and ft1's share among
    # themselves once one of them has been prefilled.
    assert kv[True]["prefix_hits"] >= 2 * 3 and kv[False]["prefix_hits"] == 0
    assert kv[True]["pages_in_use"] == 0


@pytest.mark.slow  # (CI time)
def test_shared_prefixes_survive_preemption_and_delta_removal(llama):
    base, paths = llama
    prompts = _requests(41)
    names = ["ft0"] * 4 + [None] * 4
    kw = dict(model=names, max_tokens=12, temperature=1.0, seed=2, ignore_eos=True)
    options = dict(max_batch=4, max_seq_len=64, max_resident_deltas=2)
    with dzjax.serve(base, paths, **options, prefix_sharing=False) as roomy:
        want = roomy.generate(prompts, **kw)
    with dzjax.serve(base, paths, **options, kv_pages=7, page_size=16) as tight:
        tight.generate(prompts[:1], model="ft0", max_tokens=2, ignore_eos=True)
        got = tight.generate(prompts, **kw)
        kv = tight.stats()["kv"]
        assert kv["preemptions"] > 0 and kv["prefix_hits"] > 0 and got == want
        tight.remove_delta("ft0")
        tight.add_delta("ft0", paths["ft1"])  # the same name, other weights: nothing reused
        again = tight.generate(prompts[:1], model="ft0", max_tokens=6, ignore_eos=True)
    with dzjax.serve(base, {"ft0": paths["ft1"]}, **options, prefix_sharing=False) as fresh:
        assert again == fresh.generate(prompts[:1], model="ft0", max_tokens=6, ignore_eos=True)
