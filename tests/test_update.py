"""GRPO update: chunked log-probs, micro-batch / device invariance, a learning step, skips.

A tiny Qwen2.5-VL (vision depth 3 with a full-attention block, untied head) on two prompts with
real photo crops of different sizes, G = 4 responses each, fp32 and "highest" matmul precision.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax import sharding
from emor3_jax.batches import PromptBatch, split_flat_images
from emor3_jax.configs import base
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import rope_index, vision
from emor3_jax.rl import balance, batching
from emor3_jax.rl import logprobs, losses, update
from emor3_jax.rl import rollout as rollout_lib
from emor3_jax.rl import train_state as train_state_lib
from qwen_testutil import chat_row, images, left_pad

G, T = 4, 7


def _assert_grads_close(got, want):
    """fp32 gradients of one loss along two paths (other summation orders, other fusions):
    each element within 1e-5 of its tensor's largest gradient (float32 rounding summed over a
    few hundred terms) and of itself. A lost or doubled token term moves whole tensors by far
    more."""
    def check(path, a, b):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-7, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    jax.tree_util.tree_map_with_path(check, got, want)


def _assert_adamw_steps_close(got, want, lr: float):
    """Parameters after one AdamW step from gradients that agree to float rounding. The first
    step moves an element by lr * g / (|g| + eps) (+ decay): the same to ~1e-7 lr where |g| is
    far above its rounding error, but anything up to the whole step where g is within rounding
    of zero. So: every element within 2.02 lr, all but 1e-3 of them within 1e-2 lr."""
    def check(path, a, b):
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert diff.max() <= 2.02 * lr, (jax.tree_util.keystr(path), float(diff.max()))
        return int((diff > 1e-2 * lr).sum()), diff.size
    counts = jax.tree.leaves(jax.tree_util.tree_map_with_path(check, got, want),
                             is_leaf=lambda x: isinstance(x, tuple))
    loose, total = (sum(c[i] for c in counts) for i in (0, 1))
    assert loose <= 1e-3 * total, f"{loose} of {total} parameters differ by > {1e-2 * lr:.1g}"


def _rl(**overrides):
    rl = base.get_config().rl
    rl.update(overrides)
    return rl


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(tie_word_embeddings=False)
    model = qwen2_5_vl.build_model(cfg)
    params = qwen2_5_vl.init_params(model, jax.random.key(0))
    pv, grid = images([("astronaut", (200, 280)), ("chelsea", (240, 160))])
    rng = np.random.default_rng(0)
    rows = [chat_row(cfg, rng, [3, "img", 4], grid[:1]), chat_row(cfg, rng, [5, "img", 2], grid[1:])]
    ids, mask = left_pad(rows, cfg.text.pad_token_id)
    pos, _ = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    prompts = PromptBatch.create(ids, mask, pos, images=split_flat_images(pv, grid, [1, 1]))
    n = 2 * G
    lengths = np.array([T, 2, 5, T, 3, T, 1, 6])
    rmask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    resp = np.where(rmask > 0, rng.integers(0, cfg.text.vocab_size - 8, (n, T)),
                    cfg.text.pad_token_id).astype(np.int32)
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.1, 1.0, 0.0])
    adv = np.asarray(losses.group_advantages(rewards, G))
    old = -rng.uniform(4, 8, (n, T)).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, (n, T))).astype(np.float32)
    return dict(cfg=cfg, model=model, params=params, prompts=prompts, resp=resp, rmask=rmask,
                adv=adv, old=old, ref=ref)


def _batch(s, rows, **kw):
    args = dict(old_logp=s["old"], ref_logp=s["ref"], advantages=s["adv"])
    args.update(kw)
    return batching.pack_update_batch(s["cfg"], s["prompts"], s["resp"], s["rmask"],
                                    group_size=G, micro_batch_rows=rows, **args)


def _mesh1():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def logprob_fn(setup):
    """Forward-only log-probs on one device (one compiled program per input structure)."""
    return update.make_logprob_fn(setup["model"], _mesh1(), chunk=4)


# ------------------------------------------------------------------------------ log-probs
def test_chunked_logprobs_equal_naive_values_and_grads(setup):
    s = setup
    model, params = s["model"], s["params"]
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((3, T, s["cfg"].text.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, s["cfg"].text.vocab_size, (3, T)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((3, T)), jnp.float32)

    def objective(fn, p, h):
        head = lambda x: model.apply({"params": p}, x, method=model.logits)
        logp, entropy = fn(head, h, targets)
        return jnp.sum(logp * weights), (logp, entropy)

    naive = jax.jit(jax.value_and_grad(lambda p, h: objective(logprobs.naive_token_logprobs, p, h),
                                       argnums=(0, 1), has_aux=True))
    (_, (logp_ref, ent_ref)), grads_ref = naive(params, hidden)
    for chunk in (3, 7, 64):  # 7 = 3 chunks with padding; 7 = one chunk; 64 > T
        fn = lambda head, h, t: logprobs.chunked_token_logprobs(head, h, t, chunk=chunk)
        chunked = jax.jit(jax.value_and_grad(lambda p, h: objective(fn, p, h), argnums=(0, 1),
                                             has_aux=True))
        (_, (logp, ent)), grads = chunked(params, hidden)
        np.testing.assert_allclose(logp, logp_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ent, ent_ref, atol=1e-5, rtol=0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6),
                     grads, grads_ref)


def _full_sequences(s):
    """The [N, Lp + T] batch the packed inputs stand for: each response after its own prompt
    copy, each with its own copy of the image (the plain model path, HF's layout)."""
    prompts, cfg = s["prompts"], s["cfg"]
    ids = np.concatenate([np.repeat(prompts.input_ids, G, 0), s["resp"]], 1)
    mask = np.concatenate([np.repeat(prompts.attention_mask, G, 0), s["rmask"]], 1)
    pos = np.repeat(batching.response_position_ids(prompts.mrope_positions, T), G, 1)
    pv, grid = prompts.flat_images(np.repeat(np.arange(prompts.num_rows), G))
    return ids, mask, pos, pv, vision.build_vision_inputs_for(cfg, grid)


def test_shared_prompt_logprobs_and_grads_equal_the_full_forward(setup):
    """Prompt + image once per prompt (prefill, keys/values shared by its responses) = the
    model's plain forward over every response with its own prompt and image copy."""
    s = setup
    cfg, model, params = s["cfg"], s["model"], s["params"]
    packed = batching.pack_policy_inputs(cfg, s["prompts"], s["resp"], s["rmask"], group_size=G,
                                       micro_batch_rows=2 * G)
    inputs = jax.tree.map(lambda x: x[0], packed)
    assert inputs.prompt_ids.shape[0] == 2                    # 2 prompts for 8 responses
    assert int(inputs.vision_inputs.frame_valid.any(-1).sum()) == 2   # 2 images encoded
    ids, mask, pos, pv, vin = _full_sequences(s)
    m = jnp.asarray(s["rmask"], jnp.float32)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(m.shape), jnp.float32) * m

    def shared(p):
        logp, _ = logprobs.response_logprobs(model, p, inputs, chunk=3)
        return jnp.sum(jnp.where(m > 0, logp, 0.0) * weights), logp

    def full(p):
        logits = model.apply({"params": p}, ids, mask, pv, position_ids=pos,
                             vision_inputs=vin).logits
        lp = jax.nn.log_softmax(logits[:, -T - 1:-1], axis=-1)
        logp = jnp.take_along_axis(lp, ids[:, -T:, None], -1)[..., 0]
        return jnp.sum(jnp.where(m > 0, logp, 0.0) * weights), logp

    (_, logp), grads = jax.jit(jax.value_and_grad(shared, has_aux=True))(params)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    valid = s["rmask"] > 0
    np.testing.assert_allclose(np.asarray(logp)[valid], np.asarray(ref)[valid], atol=1e-5, rtol=0)
    _assert_grads_close(grads, ref_grads)
    # the vision tower receives gradient too
    assert float(jnp.abs(grads["model"]["visual"]["patch_embed"]["proj"]["kernel"]).max()) > 0


def test_response_position_ids_continue_after_the_prompt():
    prompt = np.array([[[0, 0, 1, 2, 2, 5]], [[0, 0, 1, 3, 3, 5]], [[0, 0, 1, 2, 4, 5]]])
    pos = batching.response_position_ids(prompt, 3)
    assert pos.shape == (3, 1, 9)
    np.testing.assert_array_equal(pos[:, 0, 6:], [[6, 7, 8]] * 3)


# ------------------------------------------------------------- split and device invariance
def test_loss_and_grads_independent_of_micro_batches_and_devices(setup, devices8):
    s = setup
    rl = _rl()
    run1 = jax.jit(update.make_loss_and_grad(s["model"], _mesh1(), rl, chunk=3))
    loss1, metrics1, grads1 = run1(s["params"], _batch(s, 2 * G))
    batch4 = _batch(s, 2)
    assert batch4.num_micro_batches == 4 and batch4.inputs.pixel_values.shape[0] == 4
    loss4, metrics4, grads4 = run1(s["params"], batch4)

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    params8 = jax.device_put(s["params"], qwen2_5_vl.param_shardings(s["model"], mesh))
    run8 = jax.jit(update.make_loss_and_grad(s["model"], mesh, rl, chunk=3))
    loss8, metrics8, grads8 = run8(params8, jax.device_put(batch4, update.update_batch_shardings(
        mesh, batch4)))
    q = grads8["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

    # the loss is the plain token-mean of policy_loss over all 8 responses
    assert float(metrics1["tokens"]) == s["rmask"].sum()
    assert abs(float(loss1) - float(metrics1["pg_loss"] + 0.01 * metrics1["kl"])) < 1e-6
    for loss, metrics, grads in ((loss4, metrics4, grads4), (loss8, metrics8, grads8)):
        np.testing.assert_allclose(loss, loss1, atol=1e-6, rtol=0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                     metrics, metrics1)
        _assert_grads_close(grads, grads1)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads1)) > 1e-3


def test_released_microbatch_mean_differs_and_matches_per_micro_batch_losses(setup, logprob_fn):
    """loss_agg='microbatch_token_mean' = mean over micro-batches of their token-means."""
    s = setup
    batch = _batch(s, 2)
    released = update.make_loss_and_grad(s["model"], _mesh1(),
                                         _rl(loss_agg="microbatch_token_mean"), chunk=3)
    loss = jax.jit(lambda p, b: released(p, b)[0])(s["params"], batch)  # grads pruned: fast
    logp = logprob_fn(s["params"], batch.inputs)
    per_mb = [losses.policy_loss(logp[i], batch.old_logp[i], batch.ref_logp[i],
                                 batch.advantages[i], batch.response_mask[i])[0]
              for i in range(4)]
    np.testing.assert_allclose(loss, np.mean(per_mb), atol=1e-6, rtol=0)
    token_mean = losses.policy_loss(batching.merge_micro_batches(logp), s["old"], s["ref"],
                                    s["adv"], s["rmask"])[0]
    assert abs(float(loss) - float(token_mean)) > 1e-4


# ------------------------------------------------------------------------------ the step
def _optim(lr):
    c = base.get_config().optim
    c.lr = lr
    return c


def test_update_step_learns_and_skips_non_finite_batches(setup, logprob_fn):
    s = setup
    model, mesh = s["model"], _mesh1()
    optim = _optim(1e-3)
    opt = train_state_lib.make_optimizer(optim)
    rl = _rl()
    step = update.make_update_step(model, opt, mesh, rl, optim, chunk=4)
    inputs = batching.pack_policy_inputs(s["cfg"], s["prompts"], s["resp"], s["rmask"],
                                       group_size=G, micro_batch_rows=2)
    start = batching.merge_micro_batches(logprob_fn(s["params"], inputs))
    batch = batching.pack_update_batch(s["cfg"], s["prompts"], s["resp"], s["rmask"], s["adv"],
                                     start, start, group_size=G, micro_batch_rows=2,
                                     inputs=inputs)
    state = train_state_lib.init_train_state(model, s["params"], opt, mesh)
    params0 = jax.tree.map(np.asarray, s["params"])
    history = []
    for _ in range(3):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert set(history[0]) == set(update.METRIC_NAMES)
    # rollout policy = current policy at the first step: ratio 1, no KL, no clipping
    assert abs(history[0]["ratio_mean"] - 1.0) < 1e-5 and abs(history[0]["kl"]) < 1e-6
    assert history[0]["lr"] == pytest.approx(1e-3) and history[0]["skipped"] == 0
    assert history[0]["response_length"] == pytest.approx(s["rmask"].sum() / (2 * G))
    assert history[2]["loss"] < history[1]["loss"] < history[0]["loss"]
    assert int(state.step) == 3
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, params0)
    assert all(jax.tree.leaves(changed))
    after = batching.merge_micro_batches(logprob_fn(state.params, inputs))
    m = s["rmask"] > 0
    gain = ((after - start) * m).sum(1) / m.sum(1)          # mean log-prob change per response
    assert (gain[s["adv"] > 0] > 0).all() and (gain[s["adv"] < 0] < 0).all(), gain

    # a non-finite batch is skipped: same state, skipped = 1, and training goes on after it
    bad = batch.replace(old_logp=batch.old_logp.copy())
    bad.old_logp[1, 0, 0] = np.nan
    before = jax.tree.map(np.asarray, state)
    state, metrics = step(state, bad)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    state, metrics = step(state, batch)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 4
    assert len(step.compiled) == 1


def _mask(lengths):
    return (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def test_length_aware_micro_batches_equal_padding_to_the_longest(setup):
    """A long-tailed mix (one response at the max, most of 1-3 tokens, two empty rows):
    micro-batches cut to their own bucketed lengths (prompt 1 first: it has the longest) give
    the loss, metrics, gradients and AdamW step of the mini-batch padded to its longest, in
    any order; token-less micro-batches are not run; a non-finite one skips the step."""
    s = setup
    rmask = _mask([3, 2, 0, 0, T, 2, 1, 1])
    args = (s["cfg"], s["prompts"], s["resp"], rmask, s["adv"], s["old"], s["ref"])
    padded = batching.pack_update_batch(*args, group_size=G, micro_batch_rows=2)
    loss0, metrics0, grads0 = jax.jit(update.make_loss_and_grad(s["model"], _mesh1(), _rl(),
                                                                chunk=3))(s["params"], padded)
    optim = _optim(1e-3)
    opt = train_state_lib.make_optimizer(optim)
    step = update.make_micro_batch_update(s["model"], opt, _mesh1(), _rl(), optim, chunk=4)
    mbs = batching.pack_micro_batches(*args, group_size=G, micro_batch_rows=2,
                                    length_buckets=(4,))
    assert [t for _, t in mbs.shapes] == [T, 4, 4] and mbs.num_micro_batches == 4
    np.testing.assert_array_equal(mbs.rows, [[4, 5], [6, 7], [0, 1]])    # [2, 3] not run
    for items in (mbs.items, mbs.items[::-1]):
        loss, metrics, grads = step.gradients(s["params"], dataclasses.replace(mbs, items=items))
        np.testing.assert_allclose(loss, loss0, atol=1e-6, rtol=0)
        for k, v in metrics.items():
            np.testing.assert_allclose(v, metrics0[k], atol=1e-6, rtol=0, err_msg=k)
        _assert_grads_close(grads, grads0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3

    fresh = lambda: train_state_lib.init_train_state(
        s["model"], jax.tree.map(jnp.copy, s["params"]), opt, _mesh1())
    want, _ = step.apply_gradients(fresh(), grads0, metrics0)       # the padded gradients
    item = mbs.items[1].replace(old_logp=np.full_like(mbs.items[1].old_logp, np.nan))
    state = fresh()
    before = jax.tree.map(np.asarray, state)
    state, metrics = step(state, dataclasses.replace(mbs, items=[mbs.items[0], item,
                                                                 mbs.items[2]]))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    state, metrics = step(state, mbs)
    assert float(metrics["skipped"]) == 0 and int(state.step) == 1
    _assert_adamw_steps_close(state.params, want.params, lr=1e-3)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                            state.params, before.params)))
    # 16 tokens in 2 x 7 + 2 x 4 + 2 x 4 = 30 slots (padded to the longest: 56)
    assert float(metrics["padded_fraction"]) == pytest.approx(14 / 30)
    assert float(metrics0["padded_fraction"]) == pytest.approx(40 / 56)
    assert float(metrics["response_length"]) == pytest.approx(16 / 8)
    assert len(step.compiled) == 2            # one program per micro-batch shape
    released = update.make_micro_batch_update(
        s["model"], opt, _mesh1(), _rl(loss_agg="microbatch_token_mean"), optim)
    with pytest.raises(ValueError, match="sort=False"):
        released(state, mbs)


def test_pack_micro_batches_sorts_groups_and_counts_padding(setup):
    s = setup
    assert batching.bucket_lengths(2048) == (64, 128, 256, 512, 1024, 2048)
    assert batching.bucket_lengths(300) == (64, 128, 256, 300)
    assert batching.bucket_lengths(48) == (48,)
    assert batching.bucket_lengths(T, (2, 4, 9)) == (2, 4, T)
    # prompt 0: 1 7 1 6, prompt 1: 1 1 2 1; micro-batches of 2 rows, buckets 4 and 7
    rmask = _mask([1, T, 1, 6, 1, 1, 2, 1])
    pack = lambda **kw: batching.pack_micro_batches(
        s["cfg"], s["prompts"], s["resp"], rmask, group_size=G, micro_batch_rows=2,
        length_buckets=(4,), **kw)
    plain, ordered = pack(sort=False), pack()
    np.testing.assert_array_equal(plain.rows, [[0, 1], [2, 3], [4, 5], [6, 7]])
    np.testing.assert_array_equal(ordered.rows, [[1, 3], [0, 2], [6, 4], [5, 7]])
    assert [t for _, t in plain.shapes] == [T, T, 4, 4]
    assert [t for _, t in ordered.shapes] == [T, 4, 4, 4]
    assert plain.token_count == ordered.token_count == 20
    assert plain.padded_fraction == pytest.approx(1 - 20 / 44)
    assert ordered.padded_fraction == pytest.approx(1 - 20 / 38)
    # prompt 1 holds the longest response: it and its image go first
    rmask = _mask([1, 2, 3, 2, 5, T, 1, 6])
    mbs = batching.pack_micro_batches(s["cfg"], s["prompts"], s["resp"], rmask, group_size=G,
                                    micro_batch_rows=2 * G)
    item = mbs.items[0]
    np.testing.assert_array_equal(mbs.rows[0], [5, 7, 4, 6, 2, 1, 3, 0])
    np.testing.assert_array_equal(item.prompt_ids[0], s["prompts"].input_ids[::-1])
    np.testing.assert_array_equal(item.prompt_index[0], [0, 0, 0, 0, 1, 1, 1, 1])
    n0, n1 = s["prompts"].num_patches
    np.testing.assert_array_equal(item.pixel_values[0, :n1 + n0],
                                  s["prompts"].flat_images([1, 0])[0])
    # per-micro-batch results come back in the mini-batch's row order (a stand-in log-prob
    # function that returns each slot's token id), cut micro-batches padded with 0
    fake = lambda params, x: x.response_ids.astype(np.float32)
    for rows, buckets in ((2 * G, ()), (2, (2, 4))):
        got = update.micro_batch_logprobs(fake, None, batching.pack_micro_batches(
            s["cfg"], s["prompts"], s["resp"], rmask, group_size=G, micro_batch_rows=rows,
            length_buckets=buckets))
        np.testing.assert_array_equal(got[rmask > 0], s["resp"][rmask > 0])


def test_token_budget_packs_short_responses_many_to_a_micro_batch(setup):
    """With a token budget (rl.micro_batch_tokens) a micro-batch takes 1, 2, 4 ... rows, the
    most whose prompt and response slots fit: the long responses of prompt 0 go two to a
    micro-batch, the short ones of prompt 1 four; the loss and gradients stay those of the
    mini-batch padded to its longest (token mean), with fewer micro-batches than fixed rows."""
    s = setup
    rmask = _mask([1, T, 1, 6, 1, 1, 2, 1])
    args = (s["cfg"], s["prompts"], s["resp"], rmask, s["adv"], s["old"], s["ref"])
    lp = s["prompts"].width
    budget = lp + 2 * T                # one prompt + two rows of the longest bucket
    mbs = batching.pack_micro_batches(*args, group_size=G, micro_batch_rows=1,
                                    length_buckets=(2,), token_budget=budget)
    np.testing.assert_array_equal(np.concatenate(mbs.rows), [1, 3, 0, 2, 6, 4, 5, 7])
    assert [len(r) for r in mbs.rows] == [2, 2, 4] and mbs.num_micro_batches == 3
    assert [t for _, t in mbs.shapes] == [T, 2, 2]
    assert [item.inputs.prompt_ids.shape[1] for item in mbs.items] == [1, 1, 1]
    assert mbs.padded_fraction == pytest.approx(1 - 20 / (2 * T + 2 * 2 + 4 * 2))
    fixed = batching.pack_micro_batches(*args, group_size=G, micro_batch_rows=1,
                                      length_buckets=(2,))
    assert len(fixed.items) == 8
    # a row cap (rl.micro_batch_max_size): the short responses go two, not four, to a pass
    capped = batching.pack_micro_batches(*args, group_size=G, micro_batch_rows=1,
                                         length_buckets=(2,), token_budget=budget, max_rows=2)
    assert [len(r) for r in capped.rows] == [2, 2, 2, 2]
    # within the budget everywhere: its own slots, counted per device
    for item in mbs.items:
        n, p = item.inputs.response_ids.shape[1], item.inputs.prompt_ids.shape[1]
        assert batching.micro_batch_slots(n, p, item.inputs.prompt_ids.shape[2],
                                        item.inputs.response_ids.shape[2], 1) <= budget
    # per device: 2 prompts do not split over 4 devices (each runs both), 4 do
    assert batching.micro_batch_slots(8, 2, 10, 4, 4) == 2 * 10 + 8 * 4 // 4
    assert batching.micro_batch_slots(8, 4, 10, 4, 4) == 10 + 8 * 4 // 4

    padded = batching.pack_update_batch(*args, group_size=G, micro_batch_rows=2)
    loss0, metrics0, grads0 = jax.jit(update.make_loss_and_grad(s["model"], _mesh1(), _rl(),
                                                                chunk=3))(s["params"], padded)
    step = update.make_micro_batch_update(s["model"], train_state_lib.make_optimizer(_optim(1e-3)),
                                          _mesh1(), _rl(), chunk=4)
    loss, metrics, grads = step.gradients(s["params"], mbs)
    np.testing.assert_allclose(loss, loss0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(metrics["tokens"], metrics0["tokens"])
    _assert_grads_close(grads, grads0)

    with pytest.raises(ValueError, match=r"needs \d+ token slots per device, more than the "
                                         r"token budget 9"):
        batching.pack_micro_batches(*args, group_size=G, micro_batch_rows=1, token_budget=9)
    with pytest.raises(ValueError, match="sort=True"):
        batching.pack_micro_batches(*args, group_size=G, micro_batch_rows=1, sort=False,
                                  token_budget=budget)


def test_check_config_names_a_token_budget_that_holds_no_micro_batch():
    from emor3_jax.configs import tpu_v4
    from emor3_jax.learners import GRPOLearner
    c = tpu_v4.get_config()
    check = lambda: GRPOLearner.check_config(c, data_parallel=4, process_count=1)   # v4-8
    c.rl.micro_batch_tokens = 4096
    # 2 responses per device x 4 devices = one prompt (2048, on every device) + 8 x 2048 / 4
    with pytest.raises(ValueError, match=r"config.rl.micro_batch_tokens=4096 is smaller than "
                                         r"one micro-batch .* use at least 6144"):
        check()
    c.rl.micro_batch_tokens = 6144
    check()
    c.rl.micro_batch_max_size = 1           # fewer than the 2 responses per device
    with pytest.raises(ValueError, match=r"config.rl.micro_batch_max_size=1: .* at least "
                                         r"rl.micro_batch_size=2"):
        check()
    c.rl.micro_batch_max_size = 8
    check()
    c.rl.loss_agg = "microbatch_token_mean"
    with pytest.raises(ValueError, match=r"config.rl.micro_batch_tokens=6144 needs "
                                         r"rl.loss_agg='token_mean'"):
        check()


@pytest.mark.parametrize("budget", [10_000, 0])
def test_grpo_learner_takes_every_old_logprob_before_the_first_update(setup, budget):
    """The release computes the rollout's old (and reference) log-probs, then updates: with two
    mini-batches and rl.ppo_epochs = 2, every log-prob pass sees the params that sampled the
    rollout, and the four updates come after them (old log-probs taken just before each
    mini-batch would see the params the first update had moved)."""
    from emor3_jax.learners import GRPOLearner
    s = setup
    c = base.get_config()
    c.rollout.group_size, c.rollout.response_buckets = G, (T,)
    c.data.prompt_buckets = (s["prompts"].width,)
    c.rl.update(mini_batch_size=1, micro_batch_size=2, logprob_micro_batch_size=4,
                ppo_epochs=2, logprob_chunk=4, balance_batch=0,      # whole prompts in order
                micro_batch_tokens=budget)       # a budget: each prompt's 4 rows in one call
    mesh, opt = _mesh1(), train_state_lib.make_optimizer(_optim(1e-2))
    state = train_state_lib.init_train_state(s["model"], jax.tree.map(jnp.copy, s["params"]), opt,
                                             mesh)
    sampled = jax.tree.map(np.asarray, state.params)
    events, logprob_fn = [], update.make_logprob_fn(s["model"], mesh, chunk=4)
    update_fn = update.make_micro_batch_update(s["model"], opt, mesh, c.rl, chunk=4)

    def record_logprobs(params, *args):
        same = all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), params,
                                                sampled)))
        events.append("logp" if same else "logp of moved params")
        return logprob_fn(params, *args)

    def record_update(state, batch):
        events.append("update")
        if budget:
            assert [len(rows) for rows in batch.rows] == [G]
        return update_fn(state, batch)

    t = object.__new__(GRPOLearner)     # the learner's update alone (no sampler or judge)
    t.config, t.model, t.mesh = c, s["model"], mesh
    t.logprob_fn, t.update_fn = record_logprobs, record_update
    t.ref_params = jax.tree.map(jnp.copy, s["params"])
    ro = rollout_lib.Rollout(prompts=s["prompts"],
                             tokens=s["resp"], logprobs=s["old"],
                             lengths=s["rmask"].sum(1), texts=[""] * 2 * G,
                             group_size=G, advantages=s["adv"])
    state, out = t.update(state, ro, {})
    n_logp = events.index("update")
    assert n_logp >= 4 and set(events[:n_logp]) == {"logp"}, events     # old + ref, 2 each
    assert events[n_logp:] == ["update"] * 4, events
    assert int(state.step) == 4 and out["update/skipped"] == 0


def test_karmarkar_karp_parts_as_easyr1_builds_them():
    """Four items into two parts by hand (EasyR1's largest differencing method): (1, 2) and
    (3, 4) pair up as one-item parts; the partial solution with the larger top part, {4 | 3},
    takes the other's opposite parts: {4, 1} and {3, 2}, sums 5 and 5; on a tie of sums the
    part whose items list is larger comes first. Larger inputs: equal sizes, each index once,
    sums ten times closer than rollout order's."""
    parts = balance.karmarkar_karp([1, 2, 3, 4], 2)
    assert [p.tolist() for p in parts] == [[0, 3], [1, 2]]
    rng = np.random.default_rng(0)
    tokens = rng.geometric(1 / 300, 512) + 700          # a long-tailed rollout of 512 responses
    parts = balance.karmarkar_karp(tokens, 8)
    assert all(len(p) == 64 and (np.diff(p) > 0).all() for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(512))
    sums = [int(tokens[p].sum()) for p in parts]
    in_order = [int(x.sum()) for x in np.split(tokens, 8)]
    assert max(sums) - min(sums) < (max(in_order) - min(in_order)) / 10, (sums, in_order)
    with pytest.raises(ValueError, match="do not split into 3 equal parts"):
        balance.karmarkar_karp(tokens, 3)
    # mini-batch j: the j-th slice of every part (rows ascending); rollout order: whole prompts
    rows = balance.mini_batch_rows(64, 8, 32, tokens, partitions=8)
    assert [len(r) for r in rows] == [256, 256]
    np.testing.assert_array_equal(rows[0], np.sort(np.concatenate([p[:32] for p in parts])))
    assert [r.tolist() for r in balance.mini_batch_rows(3, 2, 2)] == [[0, 1, 2, 3], [4, 5]]


def test_balanced_mini_batches_update_on_exactly_their_responses(setup):
    """rl.balance_batch (EasyR1's order): the learner updates on the balance module's
    mini-batches, which here split both prompts' groups, and each update has the loss and
    gradients of exactly its responses, each after its own prompt copy (the plain forward);
    the rows of a group outside the mini-batch only ride along, masked."""
    from emor3_jax.learners import GRPOLearner
    s = setup
    c = base.get_config()
    c.rollout.group_size, c.rollout.batch_size, c.rollout.response_buckets = G, 2, (T,)
    c.data.prompt_buckets = (s["prompts"].width,)
    c.rl.update(mini_batch_size=1, micro_batch_size=2, logprob_micro_batch_size=4,
                logprob_chunk=4, balance_batch=2, recompute_old_logp=False)
    GRPOLearner._check_balance(c)
    seq = np.repeat(s["prompts"].attention_mask.sum(1), G) + s["rmask"].sum(1)
    want = balance.mini_batch_rows(2, G, 1, seq, partitions=2)
    assert all(len(set(w // G)) == 2 for w in want)             # both groups split
    mesh, opt = _mesh1(), train_state_lib.make_optimizer(_optim(1e-2))
    state = train_state_lib.init_train_state(s["model"], jax.tree.map(jnp.copy, s["params"]), opt,
                                             mesh)
    update_fn = update.make_micro_batch_update(s["model"], opt, mesh, c.rl, chunk=4)
    seen = []

    def record_update(state, mbs):
        # the mini-batch's rows are its prompts' G responses each (GRPOLearner._mini_batch)
        _, rollout_rows, _ = GRPOLearner._mini_batch(s["prompts"], want[len(seen)], G, 2)
        local = np.concatenate([r[np.asarray(item.response_mask[0]).any(1)]
                                for r, item in zip(mbs.rows, mbs.items)])
        seen.append((np.sort(rollout_rows[local]), jax.tree.map(np.asarray, state.params),
                     update_fn.gradients(state.params, mbs)))
        return update_fn(state, mbs)

    t = object.__new__(GRPOLearner)     # the learner's update alone (no sampler or judge)
    t.config, t.model, t.mesh = c, s["model"], mesh
    t.logprob_fn, t.update_fn = update.make_logprob_fn(s["model"], mesh, chunk=4), record_update
    t.ref_params = jax.tree.map(jnp.copy, s["params"])
    ro = rollout_lib.Rollout(prompts=s["prompts"], tokens=s["resp"], logprobs=s["old"],
                             lengths=s["rmask"].sum(1), texts=[""] * 2 * G, group_size=G,
                             advantages=s["adv"])
    t.update(state, ro, {})
    assert [r.tolist() for r, _, _ in seen] == [w.tolist() for w in want]
    ids, mask, pos, _, _ = _full_sequences(s)

    def plain_logp(p, rows):                    # each response after its own prompt copy
        pv, grid = s["prompts"].flat_images(rows // G)
        logits = s["model"].apply({"params": p}, ids[rows], mask[rows], pv,
                                  position_ids=pos[:, rows],
                                  vision_inputs=vision.build_vision_inputs_for(s["cfg"], grid)
                                  ).logits
        lp = jax.nn.log_softmax(logits[:, -T - 1:-1], axis=-1)
        return jnp.take_along_axis(lp, ids[rows, -T:, None], -1)[..., 0]

    for rows, params, (loss, _, grads) in seen:
        ref = plain_logp(t.ref_params, rows)
        want_loss, want_grads = jax.value_and_grad(lambda p: losses.policy_loss(
            plain_logp(p, rows), s["old"][rows], ref, s["adv"][rows], s["rmask"][rows],
            kl_coef=0.01)[0])(params)
        np.testing.assert_allclose(loss, want_loss, atol=1e-6, rtol=0)
        _assert_grads_close(grads, want_grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(seen[1][2][2])) > 1e-3


def test_check_config_names_bad_length_buckets():
    from emor3_jax import trainer
    from emor3_jax.configs import demo_cpu
    c = demo_cpu.get_config()
    assert c.rl.length_buckets == ()
    trainer.check_config(c, num_devices=1, process_count=1)
    c.rl.length_buckets = (0, 64)
    with pytest.raises(ValueError, match=r"config.rl.length_buckets=\(0, 64\)"):
        trainer.check_config(c, num_devices=1, process_count=1)


def test_learning_rate_schedules():
    optim = _optim(1e-3)
    constant = train_state_lib.learning_rate_schedule(optim)
    assert [float(constant(s)) for s in (0, 7, 10_000)] == [1e-3] * 3
    optim.warmup_steps, optim.schedule, optim.decay_steps, optim.min_lr_ratio = 4, "cosine", 8, 0.1
    cosine = train_state_lib.learning_rate_schedule(optim)
    got = np.array([float(cosine(s)) for s in range(16)])
    # Torch-style warm-up (step + 1) / warmup, then 1e-3 * (0.1 + 0.9 * (1 + cos(pi t)) / 2),
    # t = (step - warmup) / decay_steps, held at 1e-4 after the decay.
    warm = [1e-3 * (s + 1) / 4 for s in range(4)]
    t = np.clip((np.arange(4, 16) - 4) / 8, 0, 1)
    decay = list(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t))))
    np.testing.assert_allclose(got, warm + decay, rtol=1e-5)
    assert got[12:] == pytest.approx([1e-4] * 4)
    # The optimizer applies it: AdamW's first step moves a weight by about lr(0) (sign-like).
    opt = train_state_lib.make_optimizer(optim)
    params = {"w": jnp.zeros((3,))}
    upd, _ = opt.update({"w": jnp.ones((3,))}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["w"]), -got[0], rtol=1e-3)


def test_optimizer_keeps_fp32_moments_for_bf16_params():
    opt = train_state_lib.make_optimizer(_optim(1e-2), moment_dtype=jnp.float32)
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    state = opt.init(params)
    dtypes = {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    updates, state = opt.update({"w": jnp.full((4,), 0.5, jnp.bfloat16)}, state, params)
    import optax
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.bfloat16 and float(new["w"][0]) < 1.0


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_one_recipe_update_moves_fp32_master_weights_but_not_bf16(setup, param_dtype):
    """The shipped accelerator precision (configs/tpu_v4.py: fp32 master weights, bf16 compute)
    with the released optimizer (AdamW lr 2e-6, wd 0.01, clip 1.0): one update moves every
    weight that has a gradient, RMSNorm weights (= 1.0) included. The same step on bf16
    parameters shows why: a step of ~2e-6 is below half a bf16 ulp (2^-9 at 1.0) of almost
    every weight, so the norms never move and only weights smaller than ~5e-4 move at all."""
    from emor3_jax.configs import tpu_v4
    c = tpu_v4.get_config()
    assert (c.model.param_dtype, c.model.dtype, c.optim.lr) == ("float32", "bfloat16", 2e-6)
    s = setup
    cfg = tiny_config(tie_word_embeddings=False, dtype=c.model.dtype, param_dtype=param_dtype)
    model = qwen2_5_vl.build_model(cfg)
    params = qwen2_5_vl.init_params(model, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}
    opt = train_state_lib.make_optimizer(c.optim)
    step = update.make_update_step(model, opt, _mesh1(), c.rl, c.optim, chunk=4)
    state = train_state_lib.init_train_state(model, params, opt, _mesh1())
    before = jax.tree.map(np.asarray, params)
    state, metrics = step(state, _batch(s, 2))
    assert float(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (jax.tree_util.keystr(path), np.mean(np.asarray(a) != b)),
        state.params, before)
    moved = dict(jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
    # token embeddings: only the rows of tokens in the batch have a gradient
    dense = {k: v for k, v in moved.items() if "embed_tokens" not in k}
    norms = {k: v for k, v in dense.items() if "norm" in k}
    assert len(norms) >= 4
    if param_dtype == "float32":
        assert min(dense.values()) >= 0.99, {k: v for k, v in dense.items() if v < 0.99}
        assert min(norms.values()) == 1.0, norms
    else:
        assert max(norms.values()) == 0.0, norms
        sizes = {k: x.size for k, x in zip(moved, jax.tree.leaves(before))}
        share = sum(moved[k] * sizes[k] for k in dense) / sum(sizes[k] for k in dense)
        assert share < 0.05, share


def test_run_warns_when_param_dtype_rounds_away_its_lr_steps(caplog):
    from emor3_jax import policy
    from emor3_jax.configs import demo_cpu, tpu_v4
    c = tpu_v4.get_config("cold_start")
    with caplog.at_level("WARNING", logger="emor3_jax.policy"):
        policy.check_update_precision(c)                 # fp32 masters: silent
        assert not caplog.records
        c.model.param_dtype = "bfloat16"
        policy.check_update_precision(c)
    fields = [r.getMessage() for r in caplog.records]
    assert len(fields) == 2 and all("config.model.param_dtype=bfloat16" in m for m in fields)
    assert "config.optim.lr=2e-06" in fields[0] and "config.sft.lr=1e-05" in fields[1]
    caplog.clear()
    policy.check_update_precision(demo_cpu.get_config())    # fp32, lr 1e-3
    assert not caplog.records


def test_pack_rejects_bad_shapes(setup):
    s = setup
    with pytest.raises(ValueError, match="do not split into micro-batches"):
        _batch(s, 3)
    with pytest.raises(ValueError, match="prompt-major"):
        batching.pack_policy_inputs(s["cfg"], s["prompts"], s["resp"][:6], s["rmask"][:6],
                                  group_size=G, micro_batch_rows=2)
    grid = s["prompts"].image_grid_thw.copy()
    grid[1, 0, 1] += 2                  # row 1's image larger than its image-pad tokens
    prompts = s["prompts"].replace(image_grid_thw=grid)
    with pytest.raises(ValueError, match="row 1: .* image-pad tokens"):
        batching.pack_policy_inputs(s["cfg"], prompts, s["resp"], s["rmask"], group_size=G,
                                  micro_batch_rows=2)


def test_pack_carries_each_prompt_once_per_micro_batch(setup, logprob_fn):
    s = setup
    cfg, prompts = s["cfg"], s["prompts"]
    whole = batching.pack_policy_inputs(cfg, prompts, s["resp"], s["rmask"], group_size=G,
                                      micro_batch_rows=2 * G)
    np.testing.assert_array_equal(whole.prompt_index, [[0, 0, 0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(whole.prompt_ids[0], prompts.input_ids)
    halves = batching.pack_policy_inputs(cfg, prompts, s["resp"], s["rmask"], group_size=G,
                                       micro_batch_rows=2)
    assert halves.prompt_ids.shape[:2] == (4, 1) and (halves.prompt_index == 0).all()
    np.testing.assert_array_equal(halves.prompt_ids[:, 0], np.repeat(prompts.input_ids, 2, 0))
    np.testing.assert_array_equal(halves.response_position_ids[0, :, :, 0],
                                  prompts.position_ids[:1].max() + 1)

    # G = 3 in micro-batches of 2 straddles groups: rows {0,1} {2,3} {4,5} need prompts
    # {0} {0,1} {1}; the 1-prompt micro-batches get a padding prompt row (mask 0)
    resp, rmask = s["resp"][:6], s["rmask"][:6]
    odd = batching.pack_policy_inputs(cfg, prompts, resp, rmask, group_size=3, micro_batch_rows=2)
    np.testing.assert_array_equal(odd.prompt_index, [[0, 0], [0, 1], [0, 0]])
    assert odd.prompt_mask.shape[:2] == (3, 2)
    assert not odd.prompt_mask[0, 1].any() and not odd.prompt_mask[2, 1].any()
    one = batching.pack_policy_inputs(cfg, prompts, resp, rmask, group_size=3, micro_batch_rows=6)
    merged = lambda x: batching.merge_micro_batches(logprob_fn(s["params"], x))[rmask > 0]
    np.testing.assert_allclose(merged(odd), merged(one), atol=1e-5, rtol=0)

    # a text-only prompt: its micro-batch gets an unread dummy image
    ids = prompts.input_ids.copy()
    ids[1][ids[1] == cfg.image_token_id] = 7
    grid = prompts.image_grid_thw.copy()
    grid[1] = 0
    text_only = prompts.replace(input_ids=ids, image_grid_thw=grid)
    mixed = batching.pack_policy_inputs(cfg, text_only, s["resp"], s["rmask"], group_size=G,
                                      micro_batch_rows=G)
    assert mixed.pixel_values.shape[0] == 2 and not mixed.pixel_values[1].any()
    no_images = text_only.replace(input_ids=np.where(ids == cfg.image_token_id, 7, ids),
                                  pixel_values=None, image_grid_thw=None)
    plain = batching.pack_policy_inputs(cfg, no_images, s["resp"], s["rmask"], group_size=G,
                                      micro_batch_rows=G)
    assert plain.pixel_values is None and plain.vision_inputs is None


def test_train_state_on_mesh_shards_moments_like_params(setup, devices8):
    s = setup
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    opt = train_state_lib.make_optimizer(_optim(1e-3))
    state = train_state_lib.init_train_state(s["model"], s["params"], opt, mesh)
    want = qwen2_5_vl.param_shardings(s["model"], mesh)
    moments = [t for t in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, dict))
               if isinstance(t, dict)]
    assert len(moments) == 2                                   # Adam mu and nu
    for tree in moments:
        jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim) or pytest.fail(str(sh)),
                     tree, want)
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
