"""Grouped sampler == transformers generate (greedy), right sampling distribution, prefill once
per prompt, same tokens on a mesh, few programs, memory check (tiny fp32 models)."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from emor3_jax import sampling, sharding
from emor3_jax.models import layers, qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.models.text import TextModel
from emor3_jax.models.vision import VisionTransformer
from emor3_jax.processing import rope_index
from emor3_jax.sampling import (Prompts, Sampler, SamplerMemoryError, SamplingSettings,
                                generate, grouped_decode, memory, packing, rules)
from qwen_testutil import chat_row, hf_logits, hf_model, images, left_pad

NEW_TOKENS = 24
# Four prompts: one image; two images of other sizes; text only; image first (all left-padded).
IMAGE_SPECS = [("astronaut", (200, 280)), ("chelsea", (240, 160)), ("coffee", (150, 220)),
               ("chelsea", (100, 120))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=False)
    ref = hf_model(cfg, seed=3)
    d = str(tmp_path_factory.mktemp("hf_sampling"))
    ref.save_pretrained(d)
    model, params = qwen2_5_vl.load_hf(d)
    pv, grid = images(IMAGE_SPECS)
    rng = np.random.default_rng(0)
    rows = [chat_row(cfg, rng, [5, "img", 7], grid[0:1]),
            chat_row(cfg, rng, [3, "img", 9, "img", 2], grid[1:3]),
            chat_row(cfg, rng, [17], []),
            chat_row(cfg, rng, ["img", 4], grid[3:4])]
    ids, mask = left_pad(rows, cfg.text.pad_token_id)
    return cfg, ref, d, model, params, (ids, mask, pv, grid)


def _forbidden(cfg):
    return [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
            cfg.vision_end_token_id]


def _hf_greedy(cfg, ref, batch, eos):
    ids, mask, pv, grid = batch
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long), pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(grid),
            mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)),
            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=list(eos),
            pad_token_id=cfg.text.pad_token_id, bad_words_ids=[[i] for i in _forbidden(cfg)],
            output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:].numpy()
    logits = torch.stack(out.logits, 1).float().numpy()           # raw logits per step
    return tokens, logits


def test_greedy_equals_transformers_generate(setup):
    cfg, ref, _, model, params, batch = setup
    pad = cfg.text.pad_token_id
    # 1st pass with the config's EOS only; then make a token row 1 emits at step 5 a second
    # EOS id, so rows end at different steps ("any of several EOS ids ends a row").
    sampler = Sampler(model)
    first = sampler.generate(params, Prompts(*batch), SamplingSettings(NEW_TOKENS))
    extra_eos = int(first.tokens[1, 5])
    eos = (cfg.text.eos_token_id, extra_eos)
    greedy = SamplingSettings(NEW_TOKENS, eos_token_ids=eos)
    res = sampler.generate(params, Prompts(*batch), greedy)
    hf_tokens, hf_step_logits = _hf_greedy(cfg, ref, batch, eos)

    hf_lengths = np.array([
        (np.flatnonzero(np.isin(r, eos))[0] + 1) if np.isin(r, eos).any() else NEW_TOKENS
        for r in hf_tokens])
    assert hf_lengths.min() < NEW_TOKENS == hf_lengths.max()     # some rows ended early
    np.testing.assert_array_equal(res.lengths, hf_lengths)
    for row, n in enumerate(hf_lengths):
        np.testing.assert_array_equal(res.tokens[row, :n], hf_tokens[row, :n])
        assert (res.tokens[row, n:] == pad).all() and (res.logprobs[row, n:] == 0).all()
        # log-prob of each chosen token under the raw (unprocessed) policy distribution
        ref_lp = torch.log_softmax(torch.tensor(hf_step_logits[row, :n]), -1).numpy()
        np.testing.assert_allclose(res.logprobs[row, :n],
                                   ref_lp[np.arange(n), hf_tokens[row, :n]], atol=2e-4)
    assert res.tokens.dtype == np.int32 and res.tokens.shape == (4, NEW_TOKENS)
    assert not np.isin(res.tokens, _forbidden(cfg)).any()
    assert sampler.compiled == {"prefill": 1, "decode_start": 1, "decode": 1}

    # G samples per prompt, rows prompt-major, and chunking (2 chunks, one with a filler row)
    # give the same greedy rows.
    grouped = Sampler(model, chunk_size=3).generate(params, Prompts(*batch),
                                                    SamplingSettings(NEW_TOKENS, num_samples=2,
                                                                     eos_token_ids=eos))
    np.testing.assert_array_equal(grouped.tokens, np.repeat(res.tokens, 2, 0))
    np.testing.assert_array_equal(grouped.lengths, np.repeat(res.lengths, 2))
    np.testing.assert_allclose(grouped.logprobs, np.repeat(res.logprobs, 2, 0), atol=1e-5)

    # The data pipeline's precomputed mRoPE positions/deltas give the same result.
    ids, mask, pv, grid = batch
    pos, deltas = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    again = sampler.generate(params, Prompts(*batch, position_ids=pos, rope_deltas=deltas),
                             greedy)
    np.testing.assert_array_equal(again.tokens, res.tokens)
    assert sampler.compiled == {"prefill": 1, "decode_start": 1, "decode": 1}


def _hf_rule_probs(logits, temperature, top_p, top_k, forbidden):
    """transformers' warpers in numpy: mask, temperature, top-k, top-p (ascending cumsum)."""
    x = logits.astype(np.float64).copy()
    x[forbidden] = -np.inf
    x = x / temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(p, kind="stable")
    cum = np.cumsum(p[order])
    remove = cum <= 1 - top_p
    remove[-1] = False
    x[order[remove]] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


def _chi2_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # fold a tiny remainder into the last bin
        obs, exp = np.append(obs[:-2], obs[-2:].sum()), np.append(exp[:-2], exp[-2:].sum())
    assert (counts[probs == 0] == 0).all(), "a token outside the truncated support was drawn"
    return scipy.stats.chisquare(obs, exp).pvalue


def test_first_token_distribution_chi_square(setup):
    """16384 draws of the first token of one prompt match softmax(logits/T) after top-k/top-p
    (fixed seed; 4096 draws could not tell T from 1.15 T on this flat random model)."""
    cfg, ref, _, model, params, (ids, mask, pv, grid) = setup
    ids1, mask1 = ids[:1], mask[:1]
    logits = hf_logits(ref, cfg, ids1, mask1, pv[:int(np.prod(grid[0]))], grid[:1])[0, -1]
    top = np.argsort(logits)[::-1]
    forbidden = _forbidden(cfg) + [int(top[0])]          # also forbid the most likely token
    temperature, top_p, top_k, draws = 0.7, 0.9, 40, 16384
    res = generate(model, params, Prompts(ids1, mask1, pv[:int(np.prod(grid[0]))], grid[:1]),
                   SamplingSettings(1, num_samples=draws, temperature=temperature, top_p=top_p,
                                    top_k=top_k, forbidden_token_ids=forbidden),
                   jax.random.key(7))
    first = res.tokens[:, 0]
    counts = np.bincount(first, minlength=cfg.text.vocab_size)
    probs = _hf_rule_probs(logits, temperature, top_p, top_k, forbidden)
    support = int((probs > 0).sum())
    assert 10 <= support <= top_k                           # a real truncation test
    assert not np.isin(first, forbidden).any()
    assert _chi2_pvalue(counts, probs) > 1e-3
    # ...and the test can fail: the same draws are rejected against a 15% higher temperature.
    wrong = _hf_rule_probs(logits, temperature * 1.15, top_p, top_k, forbidden)
    assert _chi2_pvalue(counts, wrong) < 1e-4
    # log-probs are those of the raw policy distribution (before temperature/truncation)
    raw = torch.log_softmax(torch.tensor(logits), -1).numpy()
    np.testing.assert_allclose(res.logprobs[:, 0], raw[first], atol=2e-4)
    assert (res.lengths == 1).all()


def test_rules_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * 2
    for top_p in (0.3, 0.9):
        ours = np.asarray(rules.top_p_filter(jnp.asarray(logits), top_p))
        theirs = TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    ours = np.asarray(rules.top_k_filter(jnp.asarray(logits), 7))
    theirs = TopKLogitsWarper(7)(None, torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))


def test_no_top_p_program_draws_the_same_tokens_without_a_sort():
    """top_p = 1 is static in the rollout's programs: the same tokens and log-probs as the
    traced top-p rule at 1, and no vocabulary sort in the program (XLA's TPU cost analysis
    counts a sort inside a branch never taken)."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(16, 300)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(7), 16)
    allowed = jnp.asarray(rules.allowed_mask(300, forbidden_ids=(5, 17)))
    draw = lambda nucleus: jax.jit(lambda k, x, t, p: rules.next_tokens(
        k, x, allowed, t, p, 0, nucleus))
    for temperature in (1.0, 0.6, 0.0):
        ours, theirs = draw(False)(keys, logits, temperature, 1.0), draw(True)(
            keys, logits, temperature, 1.0)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
    text = lambda nucleus: str(jax.make_jaxpr(draw(nucleus))(keys, logits, 1.0, 1.0))
    assert " sort[" in text(True) and " sort[" not in text(False)


def test_two_level_draw_equals_a_whole_vocabulary_cumsum():
    """The draw sums the CDF per 128-id block, then inside one block: the same tokens as one
    cumsum over the whole vocabulary (2,560 draws: vocabularies not a multiple of the block,
    forbidden ids, rows with 3 allowed ids), never a forbidden id; and the chosen tokens'
    log-probs are log_softmax's (to fp32 rounding: the sum may be reduced in another order)."""
    def whole_vocabulary(key_rows, logits):
        probs = jax.nn.softmax(logits, axis=-1)
        cdf = jnp.cumsum(probs, axis=-1)
        u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(key_rows) * cdf[:, -1]
        last = jnp.where(probs > 0, jnp.arange(logits.shape[-1]), 0).max(-1)
        return jnp.minimum((cdf <= u[:, None]).sum(-1), last)

    rng = np.random.default_rng(0)
    ours_fn, theirs_fn = jax.jit(rules.categorical_inverse_cdf), jax.jit(whole_vocabulary)
    for trial in range(40):
        v, n = int(rng.choice([300, 1000, 4097, 18992])), 64
        x = rng.normal(size=(n, v)).astype(np.float32) * rng.choice([0.5, 3.0, 10.0])
        x[:, rng.random(v) < 0.05] = -np.inf
        if trial % 5 == 0:                               # three allowed ids
            x[:] = -np.inf
            x[:, rng.integers(0, v, 3)] = 1.0
        keys = jax.random.split(jax.random.key(trial), n)
        ours = np.asarray(ours_fn(keys, x))
        np.testing.assert_array_equal(ours, np.asarray(theirs_fn(keys, x)))
        assert np.isfinite(x[np.arange(n), ours]).all()
        np.testing.assert_allclose(
            rules.chosen_logprobs(jnp.asarray(x), jnp.asarray(ours)),
            jnp.take_along_axis(jax.nn.log_softmax(x, -1), jnp.asarray(ours)[:, None], -1)[:, 0],
            rtol=1e-6, atol=1e-6)


def test_grouped_attention_equals_repeated_cache_attention():
    """The shared-prompt attention == plain attention over the G-fold repeated cache (also with
    a shared prefix: prefix, per-prompt suffix and generated levels)."""
    rng = np.random.default_rng(1)
    b, g, n, kh, d, lp, t = 3, 4, 6, 2, 8, 11, 5
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    s = 3                                                           # new tokens per row
    q, pk, pv, gk, gv = f(b * g, s, n, d), f(b, kh, lp, d), f(b, kh, lp, d), \
        f(b * g, kh, t, d), f(b * g, kh, t, d)
    pmask = jnp.asarray(rng.random((b, lp)) > 0.3).at[:, -1].set(True)
    valid = jnp.arange(t)[None, :] <= 1 + jnp.arange(s)[:, None]       # tokens at slots 1..3
    kt = lambda x: jnp.swapaxes(x, 2, 3)                    # the cache stores keys [.., D, L]
    ours = jax.jit(grouped_decode.grouped_attention)(q, kt(pk), pv, pmask, kt(gk), gv, valid)
    rep = lambda x: jnp.repeat(jnp.swapaxes(x, 1, 2), g, 0)            # [B*G, Lp, K, D]
    k = jnp.concatenate([rep(pk), jnp.swapaxes(gk, 1, 2)], 1)
    v = jnp.concatenate([rep(pv), jnp.swapaxes(gv, 1, 2)], 1)
    mask = jnp.concatenate([jnp.broadcast_to(jnp.repeat(pmask, g, 0)[:, None], (b * g, s, lp)),
                            jnp.broadcast_to(valid, (b * g, s, t))], -1)
    ref = layers.attention(q, k, v, mask[:, None])
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # share_prefix: prefix [B], left-padded suffixes [B*M], G generated rows per suffix row
    m = 2
    sk, sv = f(b * m, kh, 4, d), f(b * m, kh, 4, d)
    smask = jnp.asarray(np.arange(4)[None, :] >= rng.integers(0, 4, (b * m, 1)))
    q3, gk3, gv3 = f(b * m * g, s, n, d), f(b * m * g, kh, t, d), f(b * m * g, kh, t, d)
    ours = jax.jit(grouped_decode.grouped_attention)(q3, kt(pk), pv, pmask, kt(gk3), gv3, valid,
                                                     suffix_k=kt(sk), suffix_v=sv,
                                                     suffix_mask=smask)
    rep = lambda x, r: jnp.repeat(jnp.swapaxes(x, 1, 2), r, 0)
    k = jnp.concatenate([rep(pk, m * g), rep(sk, g), jnp.swapaxes(gk3, 1, 2)], 1)
    v = jnp.concatenate([rep(pv, m * g), rep(sv, g), jnp.swapaxes(gv3, 1, 2)], 1)
    rows = b * m * g
    mask = jnp.concatenate([jnp.broadcast_to(jnp.repeat(pmask, m * g, 0)[:, None], (rows, s, lp)),
                            jnp.broadcast_to(jnp.repeat(smask, g, 0)[:, None], (rows, s, 4)),
                            jnp.broadcast_to(valid, (rows, s, t))], -1)
    np.testing.assert_allclose(ours, jax.jit(layers.attention)(q3, k, v, mask[:, None]),
                               atol=1e-5)


def test_attention_in_query_blocks_equals_all_at_once():
    """Many new tokens at once (a suffix prefill) run in blocks of queries (padded: 11 tokens
    in blocks of 4), with the same result as all at once."""
    rng = np.random.default_rng(2)
    b, g, n, kh, d, lp, s = 2, 3, 4, 2, 8, 7, 11
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    pmask = jnp.asarray(rng.random((b, lp)) > 0.3).at[:, -1].set(True)
    causal = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]
    levels = [(f(b, kh, d, lp), f(b, kh, lp, d), pmask, None),          # keys [.., D, L]
              (f(b * g, kh, d, s), f(b * g, kh, s, d), None, causal)]
    q = f(b * g, s, n, d)
    whole = grouped_decode.attend(q, levels)
    blocked = jax.jit(lambda q: grouped_decode.attend_blocked(q, levels, block=4))(q)
    np.testing.assert_allclose(blocked, whole, atol=1e-6)


def test_prefill_runs_once_per_prompt(setup, monkeypatch):
    """G = 8: at run time the vision tower executes once, on the 4 prompts' patches, and the
    prompt prefill once, on 4 rows (spies record each execution via jax.debug.callback)."""
    cfg, _, _, model, params, (ids, mask, pv, grid) = setup
    runs = []
    vision_call, text_call = VisionTransformer.__call__, TextModel.__call__

    def vision_spy(self, pixel_values, vision_inputs):
        rows = pixel_values.shape[0]
        jax.debug.callback(lambda: runs.append(("vision", rows)))
        return vision_call(self, pixel_values, vision_inputs)

    def text_spy(self, inputs_embeds, *args, mode="forward", **kw):
        shape = inputs_embeds.shape[:2]
        jax.debug.callback(lambda: runs.append((mode, shape)))
        return text_call(self, inputs_embeds, *args, mode=mode, **kw)

    monkeypatch.setattr(VisionTransformer, "__call__", vision_spy)
    monkeypatch.setattr(TextModel, "__call__", text_spy)
    sampler = Sampler(model)
    res = sampler.generate(params, Prompts(ids, mask, pv, grid),
                           SamplingSettings(6, num_samples=8, temperature=1.0, eos_token_ids=()),
                           jax.random.key(0))
    assert res.tokens.shape == (4 * 8, 6) and (res.lengths == 6).all()
    assert sampler.compiled == {"prefill": 1, "decode_start": 1, "decode": 1}
    padded = min(p for p in sampler.buckets.vision.num_patches if p >= pv.shape[0])
    assert padded < 2 * pv.shape[0]
    bucket = min(n for n in sampler.buckets.prompt_len if n >= mask.sum(1).max())
    # one execution each over the whole call (decode included), on B = 4 rows, not B*G = 32
    assert runs == [("vision", padded), ("prefill", (4, bucket))]


def test_mesh_greedy_equals_single_device(setup, devices8):
    cfg, _, d, model, params, batch = setup
    settings = SamplingSettings(8, num_samples=2)
    single = generate(model, params, Prompts(*batch), settings)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model_m, params_m = qwen2_5_vl.load_hf(d, mesh=mesh)
    sampler = Sampler(model_m, mesh=mesh)
    sharded = sampler.generate(params_m, Prompts(*batch), settings)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.lengths, single.lengths)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_decode_windows_sample_what_one_window_samples(setup, devices8):
    # The decode steps run in windows whose attention reads only the window's gen slots
    # (4, 16, then 24 = the buffer here): the same greedy tokens, the same sampled tokens under
    # the same keys, the same log-probs as one program over the whole buffer, on a mesh.
    cfg, _, d, model, params, batch = setup
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    model_m, params_m = qwen2_5_vl.load_hf(d, mesh=mesh)
    assert sampling.decode_windows(24, 4) == (4, 16, 24)
    one = Sampler(model_m, mesh=mesh, buckets=sampling.SamplerBuckets(decode_window=0))
    windowed = Sampler(model_m, mesh=mesh, buckets=sampling.SamplerBuckets(decode_window=4))
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.95)):
        settings = SamplingSettings(NEW_TOKENS, num_samples=2,
                                    eos_token_ids=[cfg.text.eos_token_id], **kw)
        want, got = (s.generate(params_m, Prompts(*batch), settings, jax.random.key(7))
                     for s in (one, windowed))
        assert want.lengths.max() > 16, want.lengths        # rows reach the last window
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    # per settings (top-p on or off: static), one program over the buffer or three windows
    assert one.compiled["decode"] == 2 and windowed.compiled["decode"] == 6


def test_few_programs_traced_knobs_and_memory_check(setup):
    cfg, _, _, model, params, (ids, mask, pv, grid) = setup
    sampler = Sampler(model)
    text_ids, text_mask = ids[2:3], mask[2:3]                       # the text-only prompt
    key = jax.random.key(1)
    # temperature, top-p and max_new_tokens (within a bucket) are traced; whether top-p can
    # truncate at all is static (top_p = 1: no vocabulary sort in the program)
    for temperature, top_p, new in [(1.0, 1.0, 6), (0.6, 0.95, 5), (0.7, 0.9, 4),
                                    (0.0, 1.0, 3)]:
        settings = SamplingSettings(new, num_samples=2, temperature=temperature, top_p=top_p)
        sampler.generate(params, Prompts(text_ids, text_mask), settings, key)
    assert sampler.compiled == {"prefill": 1, "decode_start": 2, "decode": 2}
    # prompt lengths 17..24 share the bucket of the 17-token prompt above; 40 opens a new one.
    rng = np.random.default_rng(5)
    for n in (19, 22, 24):
        sampler.generate(params, Prompts(*left_pad([chat_row(cfg, rng, [n], [])], 0)), settings,
                         key)
    assert sampler.compiled == {"prefill": 1, "decode_start": 2, "decode": 2}
    sampler.generate(params, Prompts(*left_pad([chat_row(cfg, rng, [40], [])], 0)), settings, key)
    assert sampler.num_programs == 8                 # each of the three for the new bucket

    small = Sampler(model, memory_limit_bytes=1 << 20)
    with pytest.raises(SamplerMemoryError, match=r"prefill of \d+ prompts \(prompt bucket \d+, "
                       r"\d+ image patches\) needs about .* GiB per device .* limit is "
                       r".* \(memory_limit_bytes\)"):
        small.generate(params, Prompts(ids, mask, pv, grid), SamplingSettings(4))
    assert small.compiled == {"prefill": 1}        # compiled and checked, then never run


def test_fit_check_reads_xla_memory_analysis():
    """memory.check_fits: args + outputs - aliased + temporaries against the limit; a backend
    without memory analysis is not checked."""
    class Compiled:
        def __init__(self, stats):
            self.stats = stats

        def memory_analysis(self):
            return self.stats

    gib = 1 << 30
    stats = types.SimpleNamespace(argument_size_in_bytes=3 * gib, output_size_in_bytes=gib,
                                  alias_size_in_bytes=gib, temp_size_in_bytes=2 * gib,
                                  generated_code_size_in_bytes=0)
    memory.check_fits(Compiled(stats), "decode of 4 prompts", 6 * gib, "test")      # 5 GiB
    with pytest.raises(SamplerMemoryError, match=r"decode of 4 prompts needs about 5.00 GiB "
                       r"per device .* limit is 4.00 GiB \(test\)"):
        memory.check_fits(Compiled(stats), "decode of 4 prompts", 4 * gib, "test")
    memory.check_fits(Compiled(None), "decode of 4 prompts", 1, "test")


def test_prompts_sharing_an_image_equal_duplicated_images(setup):
    """row_images (one copy of an image for several prompts, one vision run) == the HF layout
    with the image repeated for every prompt."""
    cfg, _, _, model, params, (ids, mask, pv, grid) = setup
    n0 = int(np.prod(grid[0]))
    sampler = Sampler(model)
    rows = [0, 0, 2, 0]                                   # image prompt, twice, text, again
    five = SamplingSettings(5)
    dup = sampler.generate(params, Prompts(ids[rows], mask[rows], np.concatenate([pv[:n0]] * 3),
                                           np.repeat(grid[:1], 3, 0)), five)
    shared = sampler.generate(params, Prompts(ids[rows], mask[rows], pv[:n0], grid[:1],
                                              row_images=[[0], [0], [], [0]]), five)
    np.testing.assert_array_equal(shared.tokens, dup.tokens)
    np.testing.assert_allclose(shared.logprobs, dup.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="need"):
        sampler.generate(params, Prompts(ids[rows], mask[rows], pv[:n0], grid[:1],
                                         row_images=[[0], [], [], [0]]), five)


def test_shared_prefix_units_and_continuation_trie(setup):
    """Host side: a group whose common prefix would end before its image becomes units of one
    prompt; a prompt ending in image tokens cannot be split; the continuation trie feeds each
    distinct proper prefix once and every node sees exactly its ancestors."""
    cfg = setup[0]
    img = cfg.image_token_id
    units_of = functools.partial(packing.shared_units, image_token_id=img)
    a = np.array([5, 6, img, img, 7, 8])
    units = units_of([a, np.array([5, 9, img, img, 7]), a[:5], a], [[0]] * 4, cap=4)
    assert sorted((u.tolist(), p) for u, p in units) == [([0], 5), ([1], 4), ([2], 4), ([3], 5)]
    units = units_of([a, a[:5], np.array([3, 4, 5])], [[0], [0], []], cap=4)
    assert sorted((sorted(u.tolist()), p) for u, p in units) == [([0, 1], 4), ([2], 2)]
    with pytest.raises(ValueError, match="cannot be split"):
        units_of([a[:4]], [[0]], cap=4)
    trie = sampling.continuation_trie([[7, 1], [7, 2, 1], [8, 1], [9]], pad=0, buckets=4)
    np.testing.assert_array_equal(trie.first, [7, 7, 8, 9])
    np.testing.assert_array_equal(trie.nodes, [7, 2, 8, 0])             # (7), (7 2), (8), filler
    np.testing.assert_array_equal(trie.depth, [0, 1, 0, 0])
    np.testing.assert_array_equal(trie.visible, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0],
                                                 [0, 0, 0, 1]])
    np.testing.assert_array_equal(trie.node_of[trie.used], [0, 0, 1, 2])
    np.testing.assert_array_equal(trie.target[trie.used], [1, 2, 1, 1])


@pytest.mark.parametrize("compute, rollout_mesh", [("bfloat16", None), ("float32", (2, 1, 4))])
def test_sampling_params_sample_like_the_master_weights(setup, devices8, compute, rollout_mesh):
    """policy.sampling_params: fp32 master weights -> a copy in the compute dtype, laid out for
    config.rollout.mesh. Every forward casts each weight to the compute dtype anyway, so the
    copy samples the masters' tokens: the same tokens on the same mesh (bf16 compute; log-probs
    bit for bit on an AVX2 host, within a bf16 rounding of the logits on an AVX-512 one, where
    7 of 64 differed by up to 0.019: the two programs round differently there),
    and up to reduction order on another layout (fp32 compute, tensor-parallel rollout
    mesh)."""
    from emor3_jax import policy
    from emor3_jax.configs import base
    cfg, _, d, _, _, batch = setup
    train_mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    model, params = qwen2_5_vl.load_hf(d, mesh=train_mesh, dtype=jnp.dtype(compute),
                                       param_dtype=jnp.float32)
    config = base.get_config()
    if rollout_mesh:
        config.rollout.mesh.data, config.rollout.mesh.fsdp, config.rollout.mesh.tensor = \
            rollout_mesh
    mesh = policy.sampling_mesh(config, train_mesh)
    assert (mesh is train_mesh) == (rollout_mesh is None)
    copy = policy.sampling_params(model, params, mesh)
    assert {x.dtype for x in jax.tree.leaves(copy)} == {jnp.dtype(compute)}
    assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(copy))
    settings, key = SamplingSettings(8, num_samples=2, temperature=1.0), jax.random.key(5)
    masters = Sampler(model, mesh=train_mesh).generate(params, Prompts(*batch), settings, key)
    sampled = Sampler(model, mesh=mesh).generate(copy, Prompts(*batch), settings, key)
    np.testing.assert_array_equal(sampled.tokens, masters.tokens)
    np.testing.assert_array_equal(sampled.lengths, masters.lengths)
    # bf16: logits of magnitude 4-8 have an ulp of 2^-5; allow two
    np.testing.assert_allclose(sampled.logprobs, masters.logprobs,
                               atol=2 ** -4 if rollout_mesh is None else 1e-5)


def test_decode_on_a_mesh_moves_activations_not_weights(devices8):
    # The sampling copy's layout (policy.sampling_params: heads, k/v and MLP columns and the
    # vocabulary over the devices that split the rows) and the decode's activation layout: a
    # step's collectives (aot.hlo.loop_collective_bytes of the compiled decode loop) carry a
    # few [rows, D] activations per layer and the [rows, V] logits once; neither a weight nor
    # the [rows, 2F] MLP activations that contracting over FSDP-split weights sums per layer.
    from emor3_jax import policy
    from emor3_jax.aot import hlo
    cfg = tiny_config(intermediate_size=1024)                  # F wide next to D = 64
    model = qwen2_5_vl.build_model(cfg)
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    params = policy.sampling_params(model, qwen2_5_vl.init_params(model, jax.random.key(0), mesh),
                                    mesh)
    prompts, group, length = 8, 8, 12
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size - 8, (prompts, length))
    sampler = Sampler(model, mesh=mesh)
    sampler.generate(params, Prompts(ids.astype(np.int32), np.ones_like(ids, np.int32)),
                     SamplingSettings(4, num_samples=group))
    (decode,) = sampler._decode.executables.values()
    moved = hlo.loop_collective_bytes(decode.as_text())
    rows, itemsize, t = prompts * group, 4, cfg.text
    activations = t.num_hidden_layers * 8 * rows * t.hidden_size * itemsize
    logits = 2 * rows * t.vocab_size * itemsize
    assert 0 < sum(moved.values()) <= activations + logits, moved
    mlp_sums = t.num_hidden_layers * rows * 2 * t.intermediate_size * itemsize
    assert sum(moved.values()) < mlp_sums / 2, moved
