"""GRPO update throughput: our sharded jit step vs the same step in PyTorch transformers.

One mini-batch shaped like the EMO-R3 recipe (defaults: B = 2 prompts x G = 8 responses, each
prompt = ~150 text tokens + one photo at min_pixels = 262,144 (361 image tokens), responses of
up to 256 tokens, micro-batches of 4 responses), the EMO-R3 loss (clipped policy loss + 0.01 k3
KL, token-mean over the mini-batch) with gradient accumulation over the micro-batches, global-
norm clip 1.0 and one AdamW step; fp32, same config and weights on both sides (ours loaded from
the HF model's save_pretrained):

  jax    emor3_jax.rl.update.make_update_step: each micro-batch runs its distinct prompts (and
         their images through the vision tower) once and its responses attend to the prompt's
         keys/values (rl/logprobs.py); LM head on response tokens only, in sequence chunks.
  jax/noshare  the same step given every response as its own prompt + image copy (what EasyR1
         computes), to separate the implementation speed from the sharing.
  torch  Qwen2_5_VLForConditionalGeneration (sdpa attention), every response with its prompt
         and image, logits_to_keep = T + 1, log_softmax + gather, loss.backward() per
         micro-batch, clip_grad_norm_, torch.optim.AdamW(foreach=True); torch.set_num_threads.

Warm-up (compilation, and one step after switching framework) excluded. This CPU is shared
with other jobs, so a large fp32 jnp.dot (the achievable peak) is timed around every block of
steps; the table gives the fastest and the median step. Model FLOPs are counted analytically
(6 x matmul parameters x the tokens that pass through them + attention score/value matmuls;
padding, remat recomputation and the optimizer not counted; the vision tower counted for the
images each side really encodes). XLA's cost analysis is not used: it counts a while-loop body
once (our micro-batch and layer scans). Run:  python bench/train_step.py [--repeats 5]

Measured (2-core Xeon, load < 2, --repeats 3; the matmul peak around the blocks was 268 234 178
267 GFLOP/s):

    step         images  s best  median tokens/s  vs torch | model GFLOP  GFLOP/s  % peak
    jax               4   17.51   17.58      703      1.67 |      2454.4    140.2    52.2
    jax/noshare      16   43.11   43.41      285      0.68 |      6074.8    140.9    52.5
    torch            16   29.31   29.53      420      1.00 |      6074.8    207.3    77.2

Both targets are met (1.67x torch, 52% of the measured peak), the first thanks to running each
prompt and image once per micro-batch: the same work without sharing (jax/noshare) runs at the
same FLOP rate but is 1.5x slower than torch, whose MKL matmuls reach 77% of peak. A profile of
our step: ~60% of op time in YNNPACK matmul fusions (near peak), the rest layout copies,
dynamic-(update-)slices of the scanned layers' stacked parameters and residuals, and masks.
`--compare length`: the same update (and a forward log-prob pass) with length-aware
micro-batches (what the trainer runs: each cut to its own longest response, rounded up to a
bucket), with token-budget micro-batches (`budget`: rl.micro_batch_tokens, by default what
--micro-rows rows compute at the longest lengths, so short responses go more rows to a
micro-batch), and every micro-batch padded to the mini-batch's longest (make_update_step, the
reference); long-tailed lengths (--long-frac of
the responses at the maximum, the rest short). Measured on an idle host (quiet-bench, load < 1
at the start), --repeats 3, 2 prompts x G 8, responses up to 256 (2 at 256, mean 67):

    step             s best  median  x padded (median) | padded %  lengths
    update padded     23.01   27.18   1.00     1.00    |     73.8  256
    update length     21.00   22.50   1.10     1.21    |     58.0  64,256
    logprob padded     7.18    7.56   1.00     1.00    |     73.8  256
    logprob length     5.97    7.34   1.20     1.03    |     58.0  64,256

Same loss. 1.1-1.2x, short of 1.5x: a prompt's G responses stay in the micro-batches of that
prompt (its prefill is shared), so each prompt's one long response pads its micro-batch to 256,
and the prompt (~505 tokens with the image) runs in every micro-batch whatever its length.

`--mix geometric --prompts 4` (lengths geometric with mean 1/8 of the 256 cap, mean 26;
longest per prompt 78, 47, 177, 37), idle host, --repeats 2, 2026-12-07:

    step             s best  median  x padded  x rows (median) | padded %  lengths
    update length     44.47   45.80   1.27     1.00     1.00   |     72.6  256,128,64
    update budget     30.76   32.36   1.84     1.45     1.42   |     74.7  4x256,8x128,8x64,4x64
    logprob length    12.51   13.40   1.44     1.00     1.00   |     72.6  256,128,64
    logprob budget     8.86    9.69   2.03     1.41     1.38   |     74.7  4x256,8x128,8x64,4x64

Same loss: a prompt's short responses share a micro-batch (4 micro-batches instead of 8), so
the ~505-token prompts run half as often.

Unrolling the layer scans (nn.scan unroll = depth, models/text.py and vision.py) measured
~14.8 s instead of ~16.3-17.3 s per step (an option worth adding for CPU; on TPU the scan keeps
compile time flat in depth).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import torch
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from emor3_jax import sharding
from emor3_jax.batches import PromptBatch, split_flat_images
from emor3_jax.configs import base
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import rope_index
from emor3_jax.rl import batching
from emor3_jax.rl import losses, update
from emor3_jax.rl import train_state as train_state_lib

CONFIGS = {
    # ~63M parameters, Qwen2.5-VL-3B's shape scaled down: GQA 16/2 heads of 64, SwiGLU 2.75x,
    # tied head; an 8-block ViT with full attention in its last block (the 3B: 4 of 32),
    # small vocabulary so matmuls dominate.
    "60m": lambda **kw: tiny_config(vocab_size=2048, hidden_size=1024, intermediate_size=2816,
                                    num_layers=4, num_heads=16, num_kv_heads=2, vision_depth=8,
                                    vision_hidden_size=384, vision_intermediate_size=1024,
                                    vision_heads=6, fullatt_block_indexes=(7,), **kw),
}


# ------------------------------------------------------------------------------ the batch
def long_tail_lengths(n: int, response_len: int, long_frac: float, short: tuple[float, float],
                      seed=0) -> np.ndarray:
    """A long-tailed response-length mix: round(long_frac x n) responses (random rows) run to
    the maximum response_len, the others are uniform in [short[0], short[1]] x response_len."""
    rng = np.random.default_rng([seed, 1])
    lengths = rng.integers(int(short[0] * response_len), int(short[1] * response_len) + 1, n)
    lengths[rng.choice(n, int(round(long_frac * n)), replace=False)] = response_len
    return lengths


def geometric_lengths(n: int, response_len: int, mean_frac: float, seed=0) -> np.ndarray:
    """Lengths drawn from a geometric distribution with mean mean_frac x response_len, capped
    at response_len (the long tail of real GRPO responses: most end early, a few hit the cap)."""
    rng = np.random.default_rng([seed, 2])
    return np.minimum(rng.geometric(1.0 / (mean_frac * response_len), n), response_len)


def make_rollout(cfg, prompts: int, group: int, text_len: int, response_len: int,
                 image_pixels: int, seed=0, lengths=None):
    """B prompts (text, one photo resized to ~image_pixels, text) and G responses each
    (lengths: per response; default uniform in [response_len / 2, response_len])."""
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    proc = Qwen2VLImageProcessorPil(min_pixels=image_pixels, max_pixels=image_pixels)
    out = proc(images=[photos[i % 3] for i in range(prompts)], return_tensors="np")
    pv, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)
    rng = np.random.default_rng(seed)
    vocab = cfg.text.vocab_size - 8
    rows = []
    for t, h, w in grid:
        rows.append(rng.integers(0, vocab, text_len // 2).tolist() + [cfg.vision_start_token_id]
                    + [cfg.image_token_id] * (int(t * h * w) // 4) + [cfg.vision_end_token_id]
                    + rng.integers(0, vocab, text_len - text_len // 2).tolist())
    length = max(len(r) for r in rows)
    ids = np.full((prompts, length), cfg.text.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    pos, _ = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    n = prompts * group
    if lengths is None:
        lengths = rng.integers(response_len // 2, response_len + 1, n)
    rmask = (np.arange(response_len)[None] < lengths[:, None]).astype(np.int32)
    resp = np.where(rmask > 0, rng.integers(0, vocab, (n, response_len)),
                    cfg.text.pad_token_id).astype(np.int32)
    adv = np.asarray(losses.group_advantages(rng.integers(0, 2, n).astype(np.float32), group))
    old = -rng.uniform(5, 9, (n, response_len)).astype(np.float32)
    ref = (old + rng.normal(0, 0.1, old.shape)).astype(np.float32)
    prompt_batch = PromptBatch.create(ids, mask, pos,
                                      images=split_flat_images(pv, grid, [1] * prompts))
    return dict(prompts=prompt_batch, responses=resp, response_mask=rmask, advantages=adv,
                old_logp=old, ref_logp=ref, group=group)


def unshared(rollout):
    """The same rollout with every response as its own prompt (its own copy of the image)."""
    g, p = rollout["group"], rollout["prompts"]
    return dict(rollout, prompts=p.take(np.repeat(np.arange(p.num_rows), g)), group=1)


# ------------------------------------------------------------------------------ FLOPs
def model_flops(cfg, rollout, prompt_passes: int) -> float:
    """Analytic training FLOPs (3 x forward) of one step, without padding or recomputation.

    prompt_passes: how many times prompts (with their image) go through the model: once per
    response for the plain layout, once per micro-batch and distinct prompt when shared
    (then responses attend to the prompt's keys/values instead of recomputing them).
    """
    t, v = cfg.text, cfg.vision
    p = rollout["prompts"]
    n, resp_len = rollout["responses"].shape
    lp = p.width
    kv = t.num_key_value_heads * t.head_dim
    layer = t.hidden_size * (2 * t.hidden_size + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    shared = prompt_passes < n
    text_tokens = prompt_passes * lp + n * (resp_len - 1 if shared else resp_len)
    fwd = 2 * layer * t.num_hidden_layers * text_tokens
    if shared:   # prompt: Lp x Lp scores; response row: (T - 1) x (Lp + T - 1)
        pairs = prompt_passes * lp * lp + n * (resp_len - 1) * (lp + resp_len - 1)
    else:
        pairs = n * (lp + resp_len) ** 2
    fwd += 2 * 2 * t.num_hidden_layers * pairs * t.hidden_size           # QK^T and PV
    fwd += 2 * t.hidden_size * t.vocab_size * n * resp_len                # LM head on responses
    grids = p["image_grid_thw"]
    per_image = int(np.prod(grids, -1).mean())
    patches = per_image * prompt_passes * len(grids) // len(p["input_ids"])
    vblock = 4 * v.hidden_size ** 2 + 3 * v.hidden_size * v.intermediate_size
    merger = (v.hidden_size * v.merge_unit) ** 2 + v.hidden_size * v.merge_unit * v.out_hidden_size
    fwd += 2 * (v.patch_dim * v.hidden_size + v.depth * vblock) * patches
    fwd += 2 * merger * patches // v.merge_unit
    full = len(v.fullatt_block_indexes)
    fwd += 4 * v.hidden_size * patches * (full * per_image + (v.depth - full) * v.window_patches)
    return 3.0 * fwd


def make_matmul(size: int):
    """A [size, size] x [size, size] fp32 jnp.dot: run() -> its FLOPs (the achievable peak)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    dot(a, b).block_until_ready()
    return lambda: dot(a, b).block_until_ready()


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ ours
def setup_jax(model, params, rollout, micro_rows: int, chunk: int):
    """Compile our step; returns run() (one update, blocking) and the first step's loss."""
    c = base.get_config()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = train_state_lib.make_optimizer(c.optim)
    step = update.make_update_step(model, opt, mesh, c.rl, c.optim, chunk=chunk)
    batch = batching.pack_update_batch(
        model.config, rollout["prompts"], rollout["responses"], rollout["response_mask"],
        rollout["advantages"], rollout["old_logp"], rollout["ref_logp"],
        group_size=rollout["group"], micro_batch_rows=micro_rows)
    batch = jax.device_put(batch)
    state = [train_state_lib.init_train_state(model, jax.tree.map(jnp.copy, params), opt, mesh)]

    def run():
        state[0], metrics = step(state[0], batch)
        return float(metrics["loss"])
    t0 = time.perf_counter()
    loss = run()
    return dict(run=run, compile_s=time.perf_counter() - t0, loss=loss,
                images=int(batch.inputs.vision_inputs.frame_valid.any(-1).sum()),
                prompt_passes=int(batch.inputs.prompt_mask.any(-1).sum()))


# ------------------------------------------------------------------------------ length-aware
def setup_length(model, params, rollout, micro_rows: int, chunk: int, length_aware: bool,
                 buckets=(), logprobs: bool = False, token_budget: int = 0):
    """One update (or, logprobs=True, one forward log-prob pass) over the mini-batch, its
    micro-batches padded to the mini-batch's longest response (make_update_step /
    make_logprob_fn over pack_update_batch) or each to its own bucketed length
    (make_micro_batch_update / micro_batch_logprobs over pack_micro_batches; with
    token_budget, micro_rows x 1, 2, 4 ... rows within the budget). Batches are
    packed and put on the device before timing. run() returns the loss (logprobs: the sum of
    the valid tokens' log-probs)."""
    c = base.get_config()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = train_state_lib.make_optimizer(c.optim)
    p, g, mask = rollout["prompts"], rollout["group"], rollout["response_mask"]
    args = (model.config, p, rollout["responses"], mask)
    if not logprobs:
        args += (rollout["advantages"], rollout["old_logp"], rollout["ref_logp"])
    kw = dict(group_size=g, micro_batch_rows=micro_rows)
    t0 = time.perf_counter()
    if length_aware:
        batch = batching.pack_micro_batches(*args, **kw, length_buckets=buckets,
                                          token_budget=token_budget)
        padded = batch.padded_fraction
        shapes = sorted({(len(r), t) for r, (_, t) in zip(batch.rows, batch.shapes)},
                        key=lambda rt: -rt[1])
        shapes = [f"{r}x{t}" if token_budget else str(t) for r, t in shapes]
        batch = dataclasses.replace(batch, items=[jax.device_put(x) for x in batch.items])
    else:
        batch = (batching.pack_policy_inputs(*args, **kw) if logprobs else
                 batching.pack_update_batch(*args, **kw))
        padded, shapes = 1.0 - mask.sum() / mask.size, [str(mask.shape[1])]
        batch = jax.device_put(batch)
    pack_s = time.perf_counter() - t0
    if logprobs:
        fn = update.make_logprob_fn(model, mesh, chunk=chunk)
        valid = mask > 0

        def run():
            logp = (update.micro_batch_logprobs(fn, params, batch) if length_aware else
                    batching.merge_micro_batches(fn(params, batch)))
            return float(logp[valid].sum())
    else:
        make = update.make_micro_batch_update if length_aware else update.make_update_step
        step = make(model, opt, mesh, c.rl, c.optim, chunk=chunk)
        state = [train_state_lib.init_train_state(model, jax.tree.map(jnp.copy, params), opt, mesh)]

        def run():
            state[0], metrics = step(state[0], batch)
            return float(metrics["loss"])
    t0 = time.perf_counter()
    loss = run()
    return dict(run=run, compile_s=time.perf_counter() - t0, loss=loss, padded=padded,
                shapes=shapes, pack_s=pack_s)


def main_length(args, cfg):
    """--compare length: padded to the mini-batch's longest vs length-aware micro-batches."""
    model = qwen2_5_vl.build_model(cfg)
    params = qwen2_5_vl.init_params(model, jax.random.key(0))
    n = args.prompts * args.group
    short = tuple(float(x) for x in args.short.split(","))
    if args.mix == "geometric":
        lengths = geometric_lengths(n, args.response_len, args.mean_frac)
        mix = (f"geometric with mean {args.mean_frac:g} x the max {args.response_len}, capped "
               "there")
    else:
        lengths = long_tail_lengths(n, args.response_len, args.long_frac, short)
        mix = (f"long-tailed: {args.long_frac:g} of the responses at the max "
               f"{args.response_len}, the rest uniform in [{short[0]:g}, {short[1]:g}] x max")
    rollout = make_rollout(cfg, args.prompts, args.group, args.text_len, args.response_len,
                           args.image_pixels, lengths=lengths)
    lp = int(rollout["prompts"].attention_mask.sum(1).mean())
    resp_tokens = int(rollout["response_mask"].sum())
    tokens = resp_tokens + n * lp          # real tokens: each response with its prompt
    buckets = tuple(int(x) for x in args.length_buckets.split(",") if x)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
          f"fp32; config {args.config}: {qwen2_5_vl.count_params(params) / 1e6:.1f}M params; "
          f"{args.prompts} prompts (~{lp} tokens with the image) x G {args.group} = {n} "
          f"responses; micro-batches of {args.micro_rows} rows (log-prob passes: "
          f"{args.logprob_micro_rows}); length buckets "
          f"{batching.bucket_lengths(args.response_len, buckets)}; chunk {args.chunk}, attention "
          f"{args.attention}", flush=True)
    by_prompt = [sorted(x.tolist(), reverse=True) for x in lengths.reshape(-1, args.group)]
    print(f"response lengths ({mix}): by prompt {by_prompt}; {resp_tokens} response tokens, "
          f"mean {resp_tokens / n:.0f}", flush=True)
    # the token budget: by default what the fixed rows compute at the longest lengths (the
    # same peak memory), so short responses go more to a micro-batch
    width = rollout["prompts"].input_ids.shape[1]
    budget_of = lambda rows, given: given or batching.micro_batch_slots(
        rows, -(-rows // args.group), width, args.response_len, 1)
    budgets = {False: budget_of(args.micro_rows, args.micro_tokens),
               True: budget_of(args.logprob_micro_rows, args.logprob_micro_tokens)}
    print(f"token budgets (prompt + response slots per micro-batch): update {budgets[False]}, "
          f"log-prob {budgets[True]}", flush=True)
    steps = {}
    for name, la, lpass, budget in (
            ("update padded", False, False, False), ("update length", True, False, False),
            ("update budget", True, False, True), ("logprob padded", False, True, False),
            ("logprob length", True, True, False), ("logprob budget", True, True, True)):
        if lpass and args.skip_logprob:
            continue
        rows = args.logprob_micro_rows if lpass else args.micro_rows
        steps[name] = setup_length(model, params, rollout, rows, args.chunk, la, buckets,
                                   logprobs=lpass, token_budget=budgets[lpass] if budget else 0)
    # one untimed run each, then the repeats interleaved (padded, length-aware, ...), so a
    # change in the load of this shared host hits both sides alike
    times = {name: [] for name in steps}
    for st in steps.values():
        st["run"]()
    for _ in range(args.repeats):
        for name, st in steps.items():
            times[name].append(seconds(st["run"]))
    head = (f"{'step':15} {'s best':>7} {'median':>7} {'tokens/s':>9} {'resp tok/s':>10} "
            f"{'x padded':>8} {'x rows':>7} {'(median)':>8} | {'padded %':>8} "
            f"{'lengths':>22} | {'compile s':>9} {'pack s':>6} | first loss / sum log p")
    print(head)
    print("-" * len(head))
    for name, st in steps.items():
        kind = name.split()[0]
        best, median = min(times[name]), statistics.median(times[name])
        ratio = lambda other: (f"{min(times[other]) / best:.2f}",
                               f"{statistics.median(times[other]) / median:.2f}")
        x_padded, _ = ratio(f"{kind} padded")
        x_rows, x_rows_median = ratio(f"{kind} length")
        print(f"{name:15} {best:7.2f} {median:7.2f} {tokens / best:9.0f} "
              f"{resp_tokens / best:10.0f} {x_padded:>8} {x_rows:>7} {x_rows_median:>8} | "
              f"{100 * st['padded']:8.1f} {','.join(st['shapes']):>22} | "
              f"{st['compile_s']:9.1f} {st['pack_s']:6.2f} | {st['loss']:.6f}")
    print("s best / median: seconds per update (or log-prob pass), fastest / median of the "
          "repeats; tokens/s: real tokens (each response + its prompt) / best time; resp tok/s: "
          "real response tokens / best time; x padded, x rows: the time padded to the longest / "
          "with fixed-row length-aware micro-batches over this time (best; x rows also median); "
          "padded %: padded response slots / response slots computed; lengths: the response "
          "lengths the micro-batches were padded to (rows x length with a budget); compile s: "
          "first call (compilation); pack s: host packing.")


# ------------------------------------------------------------------------------ torch
def setup_torch(hf, cfg, rollout, micro_rows: int):
    """The same update in PyTorch; returns run() and the first step's loss."""
    p = rollout["prompts"]
    g = rollout["group"]
    n, resp_len = rollout["responses"].shape
    ids = np.concatenate([np.repeat(p.input_ids, g, 0), rollout["responses"]], 1)
    mask = np.concatenate([np.repeat(p.attention_mask, g, 0), rollout["response_mask"]], 1)
    pos = np.repeat(batching.response_position_ids(p.mrope_positions, resp_len), g, 1)
    grid = p.flat_images(np.arange(n) // g)[1]
    tt = lambda x, dtype=torch.long: torch.tensor(np.ascontiguousarray(x), dtype=dtype)
    micro = []
    for start in range(0, n, micro_rows):
        rows = range(start, start + micro_rows)
        micro.append(dict(
            input_ids=tt(ids[rows]), attention_mask=tt(mask[rows]),
            position_ids=tt(pos[:, rows]),
            pixel_values=tt(p.flat_images([r // g for r in rows])[0], torch.float32),
            image_grid_thw=tt(grid[rows]),
            mm_token_type_ids=tt((ids[rows] == cfg.image_token_id).astype(np.int64)),
            rmask=tt(rollout["response_mask"][rows], torch.float32),
            adv=tt(rollout["advantages"][rows], torch.float32),
            old=tt(rollout["old_logp"][rows], torch.float32),
            ref=tt(rollout["ref_logp"][rows], torch.float32)))
    token_count = float(rollout["response_mask"].sum())
    c = base.get_config()
    opt = torch.optim.AdamW(hf.parameters(), lr=c.optim.lr, betas=(c.optim.b1, c.optim.b2),
                            eps=1e-8, weight_decay=c.optim.weight_decay, foreach=True)
    rl = c.rl
    import math

    def micro_loss(mb):
        logits = hf(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                    position_ids=mb["position_ids"], pixel_values=mb["pixel_values"],
                    image_grid_thw=mb["image_grid_thw"], mm_token_type_ids=mb["mm_token_type_ids"],
                    use_cache=False, logits_to_keep=resp_len + 1).logits[:, :-1].float()
        targets = mb["input_ids"][:, -resp_len:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        m, adv = mb["rmask"], mb["adv"][:, None]
        logp = torch.where(m > 0, logp, 0.0)
        old = torch.where(m > 0, mb["old"], 0.0)
        log_ratio = logp - old
        ratio = torch.exp(log_ratio.clamp(-20, 20))
        clipped = torch.exp(log_ratio.clamp(math.log(1 - rl.clip_low), math.log(1 + rl.clip_high)))
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * rl.dual_clip), pg)
        d = (torch.where(m > 0, mb["ref"], 0.0) - logp).clamp(-20, 20)
        kl = (torch.exp(d) - d - 1).clamp(-10, 10)
        return ((pg + rl.kl_coef * kl) * m).sum() / token_count

    def run():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in micro:
            loss = micro_loss(mb)
            loss.backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), c.optim.grad_clip)
        if not torch.isfinite(norm):
            raise FloatingPointError(f"torch step: gradient norm {norm}")
        opt.step()
        return total
    t0 = time.perf_counter()
    loss = run()
    return dict(run=run, compile_s=time.perf_counter() - t0, loss=loss, images=n)


# ------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="60m", choices=sorted(CONFIGS))
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=150, help="prompt text tokens besides the "
                    "image (the SET prompt in the chat template is ~150)")
    ap.add_argument("--image-pixels", type=int, default=base.MIN_PIXELS)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--micro-rows", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--attention", default="einsum", choices=("einsum", "xla"))
    ap.add_argument("--remat", default="none", choices=("none", "block", "full"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-size", type=int, default=4096)
    ap.add_argument("--skip-noshare", action="store_true")
    ap.add_argument("--compare", default="torch", choices=("torch", "length"),
                    help="torch: ours vs PyTorch; length: micro-batches padded to the "
                    "mini-batch's longest response vs length-aware (long-tailed lengths)")
    ap.add_argument("--mix", default="fixed", choices=("fixed", "geometric"),
                    help="--compare length: response lengths; fixed: --long-frac at the max, "
                    "the rest in --short; geometric: mean --mean-frac x the max, capped")
    ap.add_argument("--mean-frac", type=float, default=0.125,
                    help="--compare length --mix geometric: mean length / --response-len")
    ap.add_argument("--long-frac", type=float, default=0.125,
                    help="--compare length: share of the responses at --response-len")
    ap.add_argument("--short", default="0.0625,0.25",
                    help="--compare length: the other responses' lengths, uniform in this "
                    "range x --response-len")
    ap.add_argument("--length-buckets", default="",
                    help="--compare length: comma list (default: powers of two from 64)")
    ap.add_argument("--logprob-micro-rows", type=int, default=4)
    ap.add_argument("--micro-tokens", type=int, default=0,
                    help="--compare length: the update's token budget (0: what --micro-rows "
                    "rows compute at the longest lengths)")
    ap.add_argument("--logprob-micro-tokens", type=int, default=0,
                    help="--compare length: the log-prob passes' token budget (0: the same "
                    "for --logprob-micro-rows)")
    ap.add_argument("--skip-logprob", action="store_true")
    args = ap.parse_args()
    if args.mix == "geometric" and not 1 <= args.mean_frac * args.response_len <= args.response_len:
        ap.error(f"--mean-frac={args.mean_frac:g} gives a mean length of "
                 f"{args.mean_frac * args.response_len:g} tokens; it must be 1 to --response-len "
                 f"({args.response_len}), e.g. --mean-frac=0.125")
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config](attention_impl=args.attention, remat=args.remat)
    if args.compare == "length":
        return main_length(args, cfg)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict()))
    hf.train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = qwen2_5_vl.load_hf(d, attention_impl=args.attention, remat=args.remat)
    rollout = make_rollout(cfg, args.prompts, args.group, args.text_len, args.response_len,
                           args.image_pixels)
    n, resp_len = rollout["responses"].shape
    seq = rollout["prompts"]["input_ids"].shape[1] + resp_len
    tokens, resp_tokens = n * seq, int(rollout["response_mask"].sum())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), fp32; config "
          f"{args.config}: {qwen2_5_vl.count_params(params) / 1e6:.1f}M params; {args.prompts} "
          f"prompts x G {args.group} = {n} responses of {seq} tokens ({resp_len} response, "
          f"{resp_tokens} real), micro-batches of {args.micro_rows} rows, chunk {args.chunk}, "
          f"attention {args.attention}, remat {args.remat}", flush=True)

    steps = {"jax": setup_jax(model, params, rollout, args.micro_rows, args.chunk)}
    steps["jax"]["flops"] = model_flops(cfg, rollout, steps["jax"]["prompt_passes"])
    if not args.skip_noshare:
        plain = unshared(rollout)
        steps["jax/noshare"] = setup_jax(model, params, plain, args.micro_rows, args.chunk)
        steps["jax/noshare"]["flops"] = model_flops(cfg, plain, n)
    steps["torch"] = setup_torch(hf, cfg, rollout, args.micro_rows)
    steps["torch"]["flops"] = model_flops(cfg, rollout, n)
    matmul = make_matmul(args.peak_size)
    peak_flops = 2 * args.peak_size ** 3

    # Each step runs in its own block: one untimed step first (the first step after the other
    # framework ran is ~15% slower: allocator / thread-pool warm-up), then --repeats timed
    # steps. The CPU is shared with other jobs: the peak is timed before and after every
    # block, and a block's FLOP/s is compared with the mean of those two peaks.
    peaks, times, block_peak = [peak_flops / seconds(matmul)], {}, {}
    for name, st in steps.items():
        st["run"]()
        times[name] = [seconds(st["run"]) for _ in range(args.repeats)]
        peaks.append(peak_flops / seconds(matmul))
        block_peak[name] = (peaks[-2] + peaks[-1]) / 2

    print(f"fp32 matmul peak ({args.peak_size}^3 jnp.dot), per repeat: "
          + " ".join(f"{p / 1e9:.0f}" for p in peaks) + " GFLOP/s")
    head = (f"{'step':12} {'images':>6} {'s best':>7} {'median':>7} {'tokens/s':>8} "
            f"{'resp tok/s':>10} {'vs torch':>8} {'(median)':>8} | {'model GFLOP':>11} "
            f"{'GFLOP/s':>8} {'% peak':>6} {'(median)':>8} | {'compile s':>9} | first loss")
    print(head)
    print("-" * len(head))
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, st in steps.items():
        print(f"{name:12} {st['images']:6d} {best[name]:7.2f} {median[name]:7.2f} "
              f"{tokens / best[name]:8.0f} {resp_tokens / best[name]:10.0f} "
              f"{best['torch'] / best[name]:8.2f} {median['torch'] / median[name]:8.2f} | "
              f"{st['flops'] / 1e9:11.1f} {st['flops'] / best[name] / 1e9:8.1f} "
              f"{100 * st['flops'] / best[name] / max(peaks):6.1f} "
              f"{100 * st['flops'] / median[name] / block_peak[name]:8.1f} | "
              f"{st['compile_s']:9.1f} | {st['loss']:.6f}")
    print("s best / median: seconds per update step, fastest / median of the repeats; vs torch: "
          "torch time / this time; % peak: model FLOP/s of the fastest step / the highest "
          "measured peak, (median): of the median step / the mean peak around its block. "
          "tokens = all prompt + response positions of the N sequences; resp tok/s = real "
          "response tokens.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
