"""Rollout throughput: our grouped sampler vs transformers `generate` (PyTorch, CPU).

Same config and weights (ours loaded from the HF model's save_pretrained), the same 8 prompts,
each with a photo crop of its own size and its own text length (left-padded), G = 8 samples
per prompt, exactly 64 new tokens (no EOS: HF gets min_new_tokens = max_new_tokens, we get no
EOS ids), temperature 1, no top-k/top-p, fp32. torch uses 2 threads. Warm-up (compilation)
excluded; median of --repeats runs; generated tokens only. Also reported: compile time of the
first call, and the number of programs compiled over a run of batches with varied prompt
lengths and image sizes.

--mix: "standard" (168-336 px crops: 100-144 image tokens, 20-69 text tokens per prompt) or
"decode" (56-112 px crops: 4-16 image tokens, 8-29 text tokens: decoding dominates). Per
decode step (both samplers): (time of a 64-token call - time of a 1-token call) / 63, next to
the matmul-bound time of a step: its FLOPs (projections, MLP, attention over the average
context, LM head, for all B*G rows) at the FLOP/s of a plain fp32 jnp.dot of the step's MLP
shape ([B*G, hidden] x [hidden, intermediate]) measured in the same run.

    python bench/sampling.py [--configs small,medium] [--mix standard|decode] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2_5_VLConfig as HFConfig  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import CONFIGS  # noqa: E402  (small ~5M and medium ~58M, shared with bench/forward.py)

from emor3_jax.models import qwen2_5_vl  # noqa: E402
from emor3_jax.sampling import Prompts, Sampler, SamplingSettings  # noqa: E402

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_duration(event, duration, **_):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)

CROPS = [(224, 280), (280, 224), (196, 308), (252, 252), (168, 336), (308, 196), (224, 224),
         (252, 280)]
SMALL_CROPS = [(56, 56), (56, 84), (84, 56), (84, 84), (56, 112), (112, 56), (56, 56), (84, 84)]
# name -> (crops, text length of prompt i)
MIXES = {"standard": (CROPS, lambda i: 20 + 7 * i), "decode": (SMALL_CROPS, lambda i: 8 + 3 * i)}


def make_prompts(cfg, n: int, seed: int, text_lens=None, crops=None):
    """n prompts: chat-like text, one photo crop (own size), more text; left-padded."""
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    crops = crops or CROPS
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=336 * 336)
    ims = [photos[i % 3][:crops[i % len(crops)][0], :crops[i % len(crops)][1]] for i in range(n)]
    out = proc(images=ims, return_tensors="np")
    pv, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)
    rng = np.random.default_rng(seed)
    text_lens = text_lens or [20 + 7 * i for i in range(n)]
    rows = []
    for (t, h, w), m in zip(grid, text_lens):
        k = int(t * h * w) // 4
        rows.append(rng.integers(0, cfg.text.vocab_size - 8, 12).tolist()
                    + [cfg.vision_start_token_id] + [cfg.image_token_id] * k
                    + [cfg.vision_end_token_id]
                    + rng.integers(0, cfg.text.vocab_size - 8, m).tolist())
    length = max(map(len, rows))
    ids = np.full((n, length), cfg.text.pad_token_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask, pv, grid


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_time(fn, full_s: float, new_tokens: int, repeats: int) -> float:
    """Seconds per decode step: (full_s, the median time of new_tokens, - the median time of
    fn(1)) / (new_tokens - 1); the prefill and the first draw cancel."""
    fn(1)  # warm-up (ours: the 1-token decode program)
    return (full_s - median_time(lambda: fn(1), repeats)) / (new_tokens - 1)


def matmul_flops_per_s(rows: int, k: int, n: int, reps: int = 50) -> float:
    """fp32 FLOP/s of a plain [rows, k] x [k, n] jnp.dot, `reps` of them in one compiled loop
    (no dispatch in the time); the best of 5."""
    a, b = jnp.full((rows, k), 0.01), jnp.full((k, n), 0.01)
    loop = jax.jit(lambda a, b: jax.lax.fori_loop(
        0, reps, lambda i, x: jnp.dot(x, b)[:, :k] * 0.5 + a, a))
    loop(a, b).block_until_ready()
    best = min(median_time(lambda: loop(a, b).block_until_ready(), 1) for _ in range(5))
    return 2 * rows * k * n * reps / best


def decode_step_flops(cfg, rows: int, context: float) -> float:
    """Multiply-adds x 2 of one decode step of `rows` rows attending to `context` keys each."""
    t = cfg.text
    attn_width = t.num_attention_heads * t.head_dim
    proj = t.hidden_size * (attn_width + 2 * t.num_key_value_heads * t.head_dim) \
        + attn_width * t.hidden_size
    per_layer = proj + 3 * t.hidden_size * t.intermediate_size + 2 * attn_width * context
    return 2 * rows * (t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size)


def bench_one(name: str, prompts: int, group: int, new_tokens: int, repeats: int, mix: str):
    cfg = CONFIGS[name]()
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict())).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = qwen2_5_vl.load_hf(d)
    crops, text_len = MIXES[mix]
    ids, mask, pv, grid = make_prompts(cfg, prompts, seed=0, crops=crops,
                                       text_lens=[text_len(i) for i in range(prompts)])
    n_tokens = prompts * group * new_tokens

    # --- ours ---
    sampler = Sampler(model)
    settings = lambda n=new_tokens: SamplingSettings(n, num_samples=group, temperature=1.0,
                                                     eos_token_ids=())
    calls = [0]

    def ours(n=new_tokens):
        calls[0] += 1
        res = sampler.generate(params, Prompts(ids, mask, pv, grid), settings(n),
                               jax.random.key(calls[0]))
        assert res.tokens.shape == (prompts * group, n)
        assert (res.lengths == n).all()

    _compile_seconds[0] = 0.0
    t0 = time.perf_counter()
    ours()
    first_call = time.perf_counter() - t0
    compile_s = _compile_seconds[0]
    ours_s = median_time(ours, repeats)

    # --- transformers ---
    t_kw = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)))

    def theirs(n=new_tokens):
        with torch.no_grad():
            out = hf.generate(**t_kw, do_sample=True, num_return_sequences=group,
                              max_new_tokens=n, min_new_tokens=n,
                              temperature=1.0, top_p=1.0, top_k=0,
                              pad_token_id=cfg.text.pad_token_id)
        assert out.shape == (prompts * group, ids.shape[1] + n)

    theirs()  # warm-up
    hf_s = median_time(theirs, repeats)
    ours_step = step_time(ours, ours_s, new_tokens, repeats)
    hf_step = step_time(theirs, hf_s, new_tokens, repeats)
    t = cfg.text
    peak = matmul_flops_per_s(prompts * group, t.hidden_size, t.intermediate_size)
    bound_step = decode_step_flops(cfg, prompts * group, mask.sum(1).mean() + new_tokens / 2) \
        / peak

    # --- programs compiled over a run with varied prompt lengths and image sizes ---
    before = sampler.num_programs
    rng = np.random.default_rng(1)
    lengths_seen = []
    for batch in range(6):
        text_lens = rng.integers(10, 160, prompts).tolist()
        crops = [CROPS[j] for j in rng.permutation(len(CROPS))]
        b = make_prompts(cfg, prompts, seed=10 + batch, text_lens=text_lens, crops=crops)
        lengths_seen.append(int(b[1].sum(1).max()))
        sampler.generate(params, Prompts(*b), settings(), jax.random.key(100 + batch))
    varied_programs = sampler.num_programs - before
    return dict(name=name, params=qwen2_5_vl.count_params(params), prompt_len=ids.shape[1],
                patches=pv.shape[0], tokens=n_tokens, ours_s=ours_s, hf_s=hf_s,
                ours_step=ours_step, hf_step=hf_step, bound_step=bound_step, peak=peak,
                first_call=first_call, compile_s=compile_s, programs=sampler.num_programs,
                varied_programs=varied_programs, lengths_seen=lengths_seen)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--mix", default="standard", choices=sorted(MIXES))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), fp32, "
          f"{args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens, "
          f"{args.mix} mix")
    head = (f"{'config':8} {'params':>7} {'prompt':>6} {'patches':>7} | {'ours s':>7} "
            f"{'tok/s':>7} | {'HF s':>7} {'tok/s':>7} | {'speed-up':>8} | "
            f"{'step ms: ours':>13} {'HF':>6} {'bound':>6} {'HF/ours':>7} | {'1st call s':>10} "
            f"{'compile s':>9} | programs (varied run)")
    print(head)
    print("-" * len(head))
    for name in args.configs.split(","):
        r = bench_one(name, args.prompts, args.group, args.new_tokens, args.repeats, args.mix)
        print(f"{r['name']:8} {r['params'] / 1e6:6.1f}M {r['prompt_len']:6d} {r['patches']:7d} | "
              f"{r['ours_s']:7.2f} {r['tokens'] / r['ours_s']:7.0f} | {r['hf_s']:7.2f} "
              f"{r['tokens'] / r['hf_s']:7.0f} | {r['hf_s'] / r['ours_s']:7.1f}x | "
              f"{r['ours_step'] * 1e3:13.1f} {r['hf_step'] * 1e3:6.1f} "
              f"{r['bound_step'] * 1e3:6.1f} {r['hf_step'] / r['ours_step']:6.1f}x | "
              f"{r['first_call']:10.1f} {r['compile_s']:9.1f} | {r['programs']} total, "
              f"{r['varied_programs']} new over 6 batches with max prompt lengths "
              f"{r['lengths_seen']} | fp32 dot {r['peak'] / 1e9:.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
