"""The Flax models against HF transformers' torch outputs (committed fixtures), and their cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCHITECTURES, fixture_dir, reference

import dzjax
from dzjax.models import TRACE_COUNTS, CausalLM, KVCache, forward_cached


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    name = request.param
    return name, dzjax.load_base(fixture_dir(name), dtype=jnp.float32), reference(name)


def test_logits_match_hf(arch):
    name, base, ref = arch
    logits = dzjax.logits(base, ref["input_ids"])
    assert logits.dtype == jnp.float32 and logits.shape == ref["logits"].shape
    err = float(jnp.max(jnp.abs(logits - ref["logits"])))
    assert err <= 1e-4, f"{name}: max abs logit error {err}"


def test_each_block_matches_hf(arch):
    """Hidden states after every decoder layer but the last (HF applies the final norm to that one)."""
    name, base, ref = arch
    ids = ref["input_ids"]
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    _, state = CausalLM(base.config).apply({"params": base.params}, ids, positions,
                                           mutable=["intermediates"])
    hidden = state["intermediates"]["model"]["hidden_states"]
    assert len(hidden) == base.config.num_layers
    for layer in range(base.config.num_layers - 1):
        err = float(jnp.max(jnp.abs(hidden[layer] - ref["hidden_states"][layer + 1])))
        assert err <= 1e-4, f"{name}: layer {layer} max abs error {err}"


def test_cached_decode_equals_full_forward(arch):
    """Prefill of unequal, right-padded prompts then one token at a time == one full pass."""
    name, base, ref = arch
    ids = ref["input_ids"]
    full = np.asarray(dzjax.logits(base, ids))
    prompt_lens = np.array([5, 9])
    batch, seq = ids.shape
    cache = KVCache.zeros(base.config, batch, 32, jnp.float32)
    prompts = np.where(np.arange(seq)[None] < prompt_lens[:, None], ids, 0)[:, :prompt_lens.max()]
    positions = np.broadcast_to(np.arange(prompts.shape[1]), prompts.shape).astype(np.int32)
    step_logits, cache = forward_cached(base.params, prompts, positions, cache, config=base.config)
    for row, n in enumerate(prompt_lens):
        np.testing.assert_allclose(step_logits[row, :n], full[row, :n], atol=1e-4, rtol=0)
    for t in range(seq - prompt_lens.min()):
        pos = prompt_lens + t
        live = pos < seq
        tokens = ids[np.arange(batch), np.minimum(pos, seq - 1)][:, None]
        step_logits, cache = forward_cached(base.params, tokens, pos[:, None].astype(np.int32),
                                            cache, config=base.config)
        for row in np.flatnonzero(live):
            np.testing.assert_allclose(step_logits[row, 0], full[row, pos[row]], atol=1e-4,
                                       rtol=0, err_msg=f"{name} row {row} position {pos[row]}")


def test_dense_delta_gives_finetune_logits_without_retrace():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    finetune = dzjax.load_base(fixture_dir("llama_ft"), dtype=jnp.float32)
    ref = reference("llama_ft")
    delta = dzjax.dense_delta(base.params, finetune.params)

    logits = dzjax.logits(base, ref["input_ids"], delta=delta)
    err = float(jnp.max(jnp.abs(logits - ref["logits"])))
    assert err <= 1e-4, f"base + dense delta vs fine-tune: max abs error {err}"

    traces = TRACE_COUNTS["forward"]
    other = jax.tree.map(lambda d: 0.5 * d, delta)  # same shapes, different values
    halfway = dzjax.logits(base, ref["input_ids"], delta=other)
    assert TRACE_COUNTS["forward"] == traces, "swapping a same-shape delta retraced the forward"
    assert float(jnp.max(jnp.abs(halfway - logits))) > 0.1  # the new delta is really used
    assert float(jnp.max(jnp.abs(halfway - reference("llama")["logits"]))) > 0.1


def test_partial_delta_touches_only_its_tensors():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    ids = reference("llama")["input_ids"]
    kernel = base.params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    delta = {"model": {"layers_1": {"mlp": {"down_proj": {"kernel": jnp.ones_like(kernel) * 0.01}}}}}
    merged = jax.tree.map(lambda x: x, base.params)
    merged["model"]["layers_1"]["mlp"]["down_proj"]["kernel"] = kernel + 0.01
    merged_base = dzjax.Base(config=base.config, params=merged)
    np.testing.assert_allclose(dzjax.logits(base, ids, delta=delta),
                               dzjax.logits(merged_base, ids), atol=1e-4, rtol=0)


def test_generate_with_delta_equals_generate_on_merged_weights():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    finetune = dzjax.load_base(fixture_dir("llama_ft"), dtype=jnp.float32)
    delta = dzjax.dense_delta(base.params, finetune.params)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
    with_delta = dzjax.generate(base, prompts, max_tokens=8, delta=delta, stop_at_eos=False)
    merged = dzjax.generate(finetune, prompts, max_tokens=8, stop_at_eos=False)
    assert with_delta == merged
    assert with_delta != dzjax.generate(base, prompts, max_tokens=8, stop_at_eos=False)
    assert all(len(tokens) == 8 for tokens in with_delta)


def test_generate_greedy_follows_argmax_of_full_forward():
    base = dzjax.load_base(fixture_dir("qwen3"), dtype=jnp.float32)
    prompt = [3, 1, 4, 1, 5]
    tokens = dzjax.generate(base, [prompt], max_tokens=6, stop_at_eos=False)[0]
    sequence = list(prompt)
    for token in tokens:
        assert token == int(jnp.argmax(dzjax.logits(base, [sequence])[0, -1]))
        sequence.append(token)


def test_generate_sampling_is_seeded_and_stops_at_eos():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    kwargs = dict(max_tokens=12, temperature=1.0, top_p=0.9, stop_at_eos=False)
    first = dzjax.generate(base, [[1, 2, 3]], seed=1, **kwargs)
    assert first == dzjax.generate(base, [[1, 2, 3]], seed=1, **kwargs)
    assert first != dzjax.generate(base, [[1, 2, 3]], seed=2, **kwargs)
    # Make the 4th greedy token the end-of-sequence token: generation stops right before it.
    greedy = dzjax.generate(base, [[1, 2, 3]], max_tokens=12, stop_at_eos=False)[0]
    eos = greedy[3]
    config = dataclasses.replace(base.config, eos_token_ids=(eos,))
    stopping = dzjax.Base(config=config, params=base.params)
    assert dzjax.generate(stopping, [[1, 2, 3]], max_tokens=12) == [greedy[:greedy.index(eos)]]


def test_sampler_top_p_keeps_only_the_nucleus():
    n = 256
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * n))
    seeds, counters = np.arange(n, dtype=np.uint32), np.zeros(n, np.int32)
    draws = dzjax.models.sample(logits, seeds, counters, np.ones(n), np.full(n, 0.7))
    assert set(np.asarray(draws).tolist()) == {0, 1}
    greedy = dzjax.models.sample(logits, seeds, counters, np.zeros(n), np.ones(n))
    assert set(np.asarray(greedy).tolist()) == {0}


def test_sampler_top_k_min_p_and_suppressed_tokens():
    n = 256
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * n))
    seeds, counters = np.arange(n, dtype=np.uint32), np.zeros(n, np.int32)
    ones = np.ones(n, np.float32)
    draw = lambda **kw: set(np.asarray(dzjax.models.sample(logits, seeds, counters, ones, ones,
                                                           **kw)).tolist())
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=np.full(n, 2)) == {0, 1}
    assert draw(min_p=np.full(n, 0.5)) == {0, 1, 2}  # p >= 0.5 * 0.4
    # top_p after top_k, on what top_k kept (as HF and vLLM): of {0.4, 0.3} renormalised,
    # 0.57 already reaches 0.5.
    assert dzjax.models.sample(logits, seeds, counters, ones, np.full(n, 0.5),
                               top_k=np.full(n, 2)).tolist() == [0] * n
    # Suppressed tokens are never drawn, and a greedy row takes the best of the others.
    suppress = np.tile(np.array([[0, 2, -1]], np.int32), (n, 1))
    assert draw(suppress=suppress) == {1, 3}
    greedy = dzjax.models.sample(logits, seeds, counters, np.zeros(n), ones, suppress=suppress)
    assert set(np.asarray(greedy).tolist()) == {1}


def test_penalties_match_a_numpy_reference():
    """penalize on fresh random logits and histories against a loop written from vLLM's rules."""
    from dzjax.models.sampling import penalize

    rng = np.random.default_rng(3)
    b, v, length, k = 5, 40, 12, 4
    logits = rng.normal(0, 3, (b, v)).astype(np.float32)
    history = rng.integers(0, v, (b, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, b)
    history[np.arange(length)[None, :] >= lengths[:, None]] = -1
    output_start = np.array([rng.integers(0, n + 1) for n in lengths], np.int32)
    extra = np.array([3, -1, 7, 7, -1], np.int32)
    repetition = rng.uniform(0.5, 2, b).astype(np.float32)
    frequency, presence = (rng.uniform(-2, 2, b).astype(np.float32) for _ in range(2))
    bias_ids = np.array([rng.choice(v, k, replace=False) for _ in range(b)], np.int32)
    bias_ids[0, 2:] = -1
    bias_values = rng.uniform(-100, 100, (b, k)).astype(np.float32)
    got = np.asarray(penalize(jnp.asarray(logits), history, output_start, extra, repetition,
                              frequency, presence, bias_ids, bias_values))
    want = logits.astype(np.float64).copy()
    for i in range(b):  # vLLM's order: the bias, then repetition, then frequency and presence
        context = [int(t) for t in history[i, :lengths[i]]]
        output = context[output_start[i]:] + ([int(extra[i])] if extra[i] >= 0 else [])
        for t, bias in zip(bias_ids[i], bias_values[i]):
            if t >= 0:
                want[i, t] += bias
        for t in set(context) | set(output):
            want[i, t] = want[i, t] / repetition[i] if want[i, t] > 0 else want[i, t] * repetition[i]
        for t in set(output):
            want[i, t] -= frequency[i] * output.count(t) + presence[i]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-6
    assert np.max(np.abs(got - logits)) > 1  # it did something


def test_sampler_draws_depend_on_the_rows_seed_and_counter_only():
    logits = jax.random.normal(jax.random.key(1), (6, 50)) * 3
    seeds = np.array([7, 7, 8, 7, 9, 7], np.uint32)
    counters = np.array([0, 0, 0, 1, 0, 0], np.int32)
    args = (np.ones(6, np.float32), np.ones(6, np.float32))
    same = np.tile(np.asarray(logits[:1]), (6, 1))
    draws = np.asarray(dzjax.models.sample(same, seeds, counters, *args))
    assert draws[0] == draws[1] == draws[5]  # same seed and counter: the same draw
    # A row's draw does not depend on its batch-mates: row 0 alone gives the same.
    alone = dzjax.models.sample(same[:1], seeds[:1], counters[:1], args[0][:1], args[1][:1])
    assert int(alone[0]) == draws[0]


@pytest.mark.parametrize("bad", [np.array([[0, 256]]), np.array([[-1, 3]]), np.zeros((1, 0), int),
                                 np.zeros((1, 2, 3), int), np.array([[0.5, 1.0]])])
def test_logits_rejects_bad_input_ids(bad):
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    with pytest.raises(ValueError, match="input_ids"):
        dzjax.logits(base, bad)


def test_delta_with_unknown_or_misshapen_tensor_is_rejected():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    with pytest.raises(ValueError, match="no base parameter"):
        dzjax.logits(base, [[1, 2]], delta={"model": {"layers_9": {"mlp": jnp.zeros(3)}}})
    with pytest.raises(ValueError, match="shape"):
        dzjax.logits(base, [[1, 2]], delta={"lm_head": {"kernel": jnp.zeros((3, 3))}})


def test_kernel_options_are_part_of_the_model_and_profiles_read_by_name(tmp_path):
    """How compressed deltas run is the model's own static field: another implementation is
    another program (no global state), and the stages carry names a profile shows."""
    from conftest import make_deltas
    from dzjax.models import KernelOptions, forward

    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    delta = dzjax.load_delta(make_deltas(fixture_dir("llama"), tmp_path, 1)["ft0"])
    ids = np.arange(8, dtype=np.int32)[None]
    positions = ids.copy()
    texts = {}
    for impl in ("xla", "interpret"):
        lowered = forward.lower(base.params, ids, positions, delta.params, config=base.config,
                                kernels=KernelOptions(implementation=impl))
        texts[impl] = lowered.as_text(debug_info=True)
    assert "delta_matmul" in texts["xla"] and "layers_1/self_attn/q_proj" in texts["xla"]
    assert "/attention/" in texts["xla"] and "kv_cache_write" not in texts["xla"]  # no cache
    # The interpret-mode Pallas kernel is in the second program only.
    assert "delta_matmul_pallas" not in texts["xla"] and "delta_matmul_pallas" in texts["interpret"]
    with pytest.raises(ValueError, match="implementation='fast'"):
        KernelOptions(implementation="fast")
