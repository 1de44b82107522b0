"""Judge throughput: `score` mode vs `generate` mode on the reflective prompts of 64 responses.

64 SET-formatted responses (8 images x G = 8, as in a rollout) -> 64 coherence prompts (text)
+ 64 consistency prompts (with the rollout image) through the Qwen2.5-VL chat template, judged
by a tiny random Qwen2.5-VL (`model.tiny="demo"`, ~5M parameters) with the demo
tokenizer. generate: released sampling (T 0.6, top-p 0.95), at most --max-new-tokens judge
tokens; the decode loop of a chunk runs until every row has ended, and a random model rarely
ends (2 end ids in 1,024), so every chunk runs all --max-new-tokens steps (the "judge tokens"
column counts the tokens before each row's end). score: one prefill per prompt + one
multi-token call over the candidate answers. Warm-up (compilation) excluded; median of
--repeats. `--breakdown` also times the shared prefill and the mode-specific programs
separately (synchronising after each, so the sum is a little above the pipelined total).

    python bench/judge.py [--repeats 3] [--max-new-tokens 64] [--breakdown]

Why the 10x target (score vs generate at 64 judge tokens) is out of reach here: both modes
must first prefill the same prompts (vision tower + ~135 prompt tokens each), and that
prefill is most of what score mode costs. Measured on the 2-core CPU (load < 1.5), 64 tokens:

    mode      | median s | prefill s (shared) | mode-specific s
    generate  |    4.24  |       1.21         |  3.08  (4 chunks x 64 decode steps x 32 rows)
    score     |    1.43  |       1.18         |  0.17  (one multi-token call per chunk)
    -> 3.0x. Even a free score step gives at most (1.21 + 3.08) / 1.21 = 3.5x.

The prefill handles 17,314 prompt tokens (22,528 with bucket padding) at ~54 us per token
(~110 GFLOP/s, compute bound); a decode step costs ~376 us per row-token (16 GFLOP/s: 32-row
matmuls), yet 64 judge tokens are only 8,192 row-tokens against 22,528 prompt tokens. Score
mode's own part is already 18x cheaper than decoding; what is left is the shared prefill, and
making it cheaper (finer buckets, sharing the consistency prompts' image prefix across the G
responses) speeds up generate by the same amount. The ratio grows with the judge's answer
length: --max-new-tokens 256 measures generate 19.1 s vs score 1.44 s = 13.2x (the released
judge allows 2,048 tokens; a trained judge that answers "yes" in 2-3 tokens and stops makes
generate cost little more than score).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2_5_VLConfig as HFConfig  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from emor3_jax.configs import base  # noqa: E402
from emor3_jax.models import qwen2_5_vl  # noqa: E402
from emor3_jax.models.config import get_tiny_config  # noqa: E402
from emor3_jax.processing import image as image_lib  # noqa: E402
from emor3_jax.processing import tokenizer as tokenizer_lib  # noqa: E402
from emor3_jax.rewards import emotion  # noqa: E402
from emor3_jax.rewards.judge import Judge, ProcessedImage  # noqa: E402

SCENES = ["A child laughs while playing with friends on the beach.",
          "Dark storm clouds gather over an empty field at night.",
          "A man shouts at another man in a crowded street.",
          "The family eats dinner together at a warm table.",
          "A spider crawls on rotten food in a dirty kitchen.",
          "A huge mountain rises above the clouds at sunrise.",
          "A woman cries alone in a dark room.",
          "Fans cheer and jump as the team scores a goal."]
FEELINGS = ["A human would feel happy, playful and amused about it.",
            "People would feel scared, nervous and tense.",
            "A human would feel angry and annoyed.",
            "A human would feel warm, safe and peaceful.",
            "A human would feel disgusted and sick.",
            "People would feel a sense of wonder and awe.",
            "A human would feel sad, lonely and hurt.",
            "A human would feel thrilled and excited."]


def make_rollout(n_images: int, group: int, seed: int = 0):
    """n_images x group SET responses (varied lengths), labels and one image per response."""
    rng = np.random.default_rng(seed)
    labels = base.LABELS["emoset2k"]
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    crops = [(224, 280), (280, 224), (196, 308), (252, 252), (168, 336), (308, 196)]
    responses, truth, imgs = [], [], []
    for i in range(n_images):
        h, w = crops[i % len(crops)]
        pv, grid = image_lib.process_image(photos[i % 3][:h, :w], min_pixels=56 * 56,
                                           max_pixels=224 * 280)
        img = ProcessedImage(pv, tuple(grid))
        for g in range(group):
            k = int(rng.integers(len(SCENES)))
            extra = " ".join(rng.choice(SCENES, int(rng.integers(0, 3))))
            responses.append(f"<step1>{SCENES[k]} {extra}</step1>\n<step2>{FEELINGS[k]}</step2>\n"
                             f"<step3>The emotion is positive with low arousal.</step3>\n"
                             f"\\boxed{{{labels[k]}}}")
            truth.append(labels[k])
            imgs.append(img)
    return responses, truth, imgs


def build_model(tok):
    ids = tokenizer_lib.token_ids(tok)
    cfg = get_tiny_config("demo", vocab_size=ids.vocab_size, special_token_ids={
        "image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
        "bos_token_id": ids.pad, "eos_token_id": ids.im_end, "pad_token_id": ids.pad})
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(HFConfig(**cfg.to_hf_dict())).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return qwen2_5_vl.load_hf(d)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Timed:
    """Wraps a jitted program: synchronises and accumulates its wall time (breakdown only)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.shapes = fn, 0.0, []

    def reset(self):
        self.seconds, self.shapes = 0.0, []

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.fn(*a, **k))
        self.seconds += time.perf_counter() - t0
        self.shapes.append(np.shape(a[1]) if len(a) > 1 else ())   # prefill: input_ids [B, L]
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=32,
                    help="judge prompts per program call (sorted by length, so a chunk pads "
                         "only to its own length bucket); 0 = all at once")
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    tok = tokenizer_lib.build_demo_tokenizer()
    model, params = build_model(tok)
    responses, truth, imgs = make_rollout(args.images, args.group)
    labels = base.LABELS["emoset2k"]
    judges = {mode: Judge(model, tok, mode=mode, source="policy",
                          max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size or None)
              for mode in ("generate", "score")}
    n_prompts = 2 * len(responses)
    coh, cons = emotion.judge_prompts(responses, labels, "emor3")
    _, mask, *_ = judges["score"].encode(coh + cons, [None] * len(coh) + imgs)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, judge = policy "
          f"({qwen2_5_vl.count_params(params) / 1e6:.1f}M params, vocab {len(tok)}), "
          f"{len(responses)} responses -> {n_prompts} judge prompts of "
          f"{mask.sum(1).min()}-{mask.sum(1).max()} tokens (mean {mask.sum(1).mean():.0f}); "
          f"generate: T 0.6 top-p 0.95, max {args.max_new_tokens} tokens; chunks of "
          f"{args.chunk_size or n_prompts} prompts")
    rows = {}
    for mode, judge in judges.items():
        calls = [0]

        def run():
            calls[0] += 1
            return judge.rewards(responses, truth, labels, "emor3", imgs,
                                 rng=jax.random.key(calls[0]), policy_params=params)

        t0 = time.perf_counter()
        out = run()
        first = time.perf_counter() - t0
        seconds = median_time(run, args.repeats)
        rows[mode] = dict(seconds=seconds, first=first, out=out,
                          tokens=judge.stats["generated_tokens"] // (args.repeats + 1))
    head = (f"{'mode':9} | {'median s':>8} | {'prompts/s':>9} | {'1st call s':>10} | "
            f"{'judge tokens/call':>17} | mean R_coh  R_cons")
    print(head)
    print("-" * len(head))
    for mode, r in rows.items():
        print(f"{mode:9} | {r['seconds']:8.3f} | {n_prompts / r['seconds']:9.1f} | "
              f"{r['first']:10.1f} | {r['tokens']:17d} | {r['out'].coherence.mean():8.3f} "
              f"{r['out'].consistency.mean():7.3f}")
    print(f"score is {rows['generate']['seconds'] / rows['score']['seconds']:.1f}x faster than "
          f"generate (target >= 10x)")

    if args.breakdown:
        sampler = judges["score"].sampler        # both judges share it (same model)
        programs = {k: _Timed(getattr(sampler, k)) for k in ("_prefill", "_decode", "_score")}
        for k, timed in programs.items():
            setattr(sampler, k, timed)
        parts = {}
        for mode, judge in judges.items():
            for t in programs.values():
                t.reset()
            total = median_time(lambda: judge.rewards(
                responses, truth, labels, "emor3", imgs, rng=jax.random.key(0),
                policy_params=params), 1)
            specific = programs["_decode"].seconds + programs["_score"].seconds
            parts[mode] = (programs["_prefill"].seconds, specific)
            print(f"breakdown {mode:8}: total {total:.3f} s = prefill (vision + prompts, shared "
                  f"by both modes) {programs['_prefill'].seconds:.3f} s + {mode}-specific "
                  f"{specific:.3f} s + host {total - programs['_prefill'].seconds - specific:.3f} s")
        padded = sum(int(np.prod(x)) for x in programs["_prefill"].shapes)
        chunks = len(programs["_prefill"].shapes)
        positions = chunks * args.max_new_tokens * (args.chunk_size or n_prompts)
        prefill, decode = parts["generate"]
        print(f"prefill: {chunks} chunks, {int(mask.sum())} prompt tokens ({padded} with bucket "
              f"padding) in {prefill:.3f} s = {1e6 * prefill / padded:.1f} us per padded token; "
              f"generate: {args.max_new_tokens} decode steps per chunk (its loop ends when every "
              f"row has ended) = {positions} row-tokens in {decode:.3f} s = "
              f"{1e6 * decode / positions:.1f} us each")
        print(f"mode-specific work: generate {decode:.3f} s vs score {parts['score'][1]:.3f} s = "
              f"{decode / parts['score'][1]:.1f}x; with the shared prefill, even a free score "
              f"step could be at most (prefill + decode) / prefill = "
              f"{(prefill + decode) / prefill:.1f}x faster than generate")


if __name__ == "__main__":
    main()
