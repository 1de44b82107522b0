"""Forward and forward+backward time: our Flax Qwen2.5-VL vs transformers' PyTorch model.

Same config, same weights (ours loaded from the HF model's save_pretrained), same batch of
prompts with images (HF processor inputs), fp32 on this CPU; torch uses 2 threads. Warm-up
(compilation) excluded; the best of --repeats runs, ours and torch's alternating (the CPU is
shared with other jobs; alternating and taking the minimum keeps both equally disturbed). Loss = mean next-token cross-entropy.

    python bench/forward.py [--configs small,medium] [--batch 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import torch
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import get_tiny_config, tiny_config
from emor3_jax.processing import rope_index, vision

CONFIGS = {
    # ~5M parameters (the CPU demo shape with a 1k vocab).
    "small": lambda: get_tiny_config("demo", vocab_size=1024),
    # ~58M parameters.
    "medium": lambda: tiny_config(vocab_size=1024, hidden_size=640, intermediate_size=2048,
                                  num_layers=8, num_heads=10, num_kv_heads=2, vision_depth=8,
                                  vision_hidden_size=384, vision_intermediate_size=1024,
                                  vision_heads=6, fullatt_block_indexes=(3, 7)),
}


def make_batch(cfg, batch: int, text_len: int, seed: int = 0):
    """`batch` prompts, each: text, one 224x280 photo crop (80 image tokens), text."""
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 280)
    out = proc(images=[photos[i % 3][:224, :280] for i in range(batch)], return_tensors="np")
    pv, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"]
    rng = np.random.default_rng(seed)
    rows = []
    for t, h, w in grid:
        n = int(t * h * w) // 4
        rows.append(rng.integers(0, cfg.text.vocab_size - 8, text_len // 2).tolist()
                    + [cfg.vision_start_token_id] + [cfg.image_token_id] * n
                    + [cfg.vision_end_token_id]
                    + rng.integers(0, cfg.text.vocab_size - 8, text_len // 2).tolist())
    ids = np.asarray(rows, np.int32)
    return ids, np.ones_like(ids), pv, grid


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` milliseconds of two functions, run alternately after a warm-up each,
    so load from other jobs on this shared CPU hits both alike."""
    fn_a()
    fn_b()  # warm-up / compile
    best_a = best_b = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        best_a, best_b = min(best_a, t1 - t0), min(best_b, t2 - t1)
    return best_a * 1e3, best_b * 1e3


def bench_one(name: str, batch: int, text_len: int, repeats: int, remat: str):
    cfg = CONFIGS[name]().replace(remat=remat)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict())).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = qwen2_5_vl.load_hf(d)
    ids, mask, pv, grid = make_batch(cfg, batch, text_len)
    n_params = qwen2_5_vl.count_params(params)
    tokens = ids.size

    # --- ours (jit; host metadata precomputed as in training) ---
    vin = vision.build_vision_inputs_for(cfg, grid)
    pos, _ = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    ids_j, mask_j, pv_j, pos_j = map(jnp.asarray, (ids, mask, pv, pos))
    vin_j = jax.tree.map(jnp.asarray, vin)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids_j, mask_j, pv_j, vision_inputs=vin_j,
                             position_ids=pos_j).logits
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, ids_j[:, 1:, None], -1).mean()

    fwd = jax.jit(loss_fn)
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))

    # --- torch ---
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    t_kw = dict(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                mm_token_type_ids=torch.tensor((ids == cfg.image_token_id).astype(np.int64)))

    def torch_loss():
        logits = hf(input_ids=t_ids, attention_mask=t_mask, **t_kw).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 t_ids[:, 1:].reshape(-1))

    def torch_fwd():
        with torch.no_grad():
            torch_loss()

    def torch_fb():
        hf.zero_grad(set_to_none=True)
        torch_loss().backward()

    jax_fwd, pt_fwd = timed_pair(lambda: fwd(params).block_until_ready(), torch_fwd, repeats)
    jax_fb, pt_fb = timed_pair(lambda: jax.block_until_ready(fwd_bwd(params)), torch_fb, repeats)
    with torch.no_grad():
        gap = abs(float(torch_loss()) - float(fwd(params)))
    return dict(name=f"{name}/{remat}", params=n_params, tokens=tokens, patches=pv.shape[0], jax_fwd=jax_fwd,
                jax_fb=jax_fb, pt_fwd=pt_fwd, pt_fb=pt_fb, loss_gap=gap)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,medium")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--remat", default="none,block",
                    help="our remat policies to time (same math; on XLA:CPU 'block' avoids "
                         "stacking every elementwise residual of the scanned layers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), fp32, batch {args.batch}")
    head = (f"{'config/remat':13} {'params':>8} {'tokens':>6} {'patches':>7} | {'fwd ms jax':>10} "
            f"{'torch':>8} {'ratio':>6} | {'fwd+bwd ms jax':>14} {'torch':>8} {'ratio':>6} | "
            f"{'fwd+bwd tok/s jax':>17} {'torch':>8} | loss gap")
    print(head)
    print("-" * len(head))
    for name, remat in itertools.product(args.configs.split(","), args.remat.split(",")):
        r = bench_one(name, args.batch, args.text_len, args.repeats, remat)
        print(f"{r['name']:13} {r['params'] / 1e6:7.1f}M {r['tokens']:6d} {r['patches']:7d} | "
              f"{r['jax_fwd']:10.1f} {r['pt_fwd']:8.1f} {r['jax_fwd'] / r['pt_fwd']:6.2f} | "
              f"{r['jax_fb']:14.1f} {r['pt_fb']:8.1f} {r['jax_fb'] / r['pt_fb']:6.2f} | "
              f"{r['tokens'] / r['jax_fb'] * 1e3:17.0f} {r['tokens'] / r['pt_fb'] * 1e3:8.0f} | "
              f"{r['loss_gap']:.1e}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
