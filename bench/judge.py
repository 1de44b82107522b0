"""Judge throughput: the shared-prefix judge vs every prompt whole, in `generate` and `score` modes.

64 SET-formatted responses (8 images x G = 8, as in a rollout) -> 64 coherence prompts (text)
+ 64 consistency prompts (with the rollout image) through the Qwen2.5-VL chat template, judged
by a tiny random Qwen2.5-VL (`model.tiny="demo"`, ~5M parameters) with the demo tokenizer, by
two judges per mode in the same run on the same responses: `share_prefix=True` (the default:
each image group's longest common token prefix, template + image + question, ~106-123 tokens,
and the coherence prompts' template head, 22 tokens, prefilled once; then only the suffixes
against that KV cache) and `share_prefix=False` (every prompt whole, as before). Calls
alternate between the four judges (so load drift hits all alike); the median of --repeats
after a first call that includes compilation. Both paths get the same RNG key per call, and
the bench checks that the generated answers are identical and the score-mode rewards agree.
generate: released sampling (T 0.6, top-p 0.95), at most --max-new-tokens judge tokens; a
random model rarely ends (2 end ids in 1,024), so every chunk runs all of them. score: one
(shared) prefill per prompt + one multi-token call over the candidates' token trie.
`--breakdown` also times each program kind (synchronising after each call).

    python bench/judge.py [--repeats 5] [--max-new-tokens 64] [--breakdown]

Measured on an idle 2-core AMD EPYC (AVX2) host (quiet-bench: load < 1 at the start),
median of 3, chunks of 32 prompts:

    max-new-tokens | mode     | unshared ms/response | shared ms/response | speed-up
    64             | generate |        100.2         |        86.7        |  1.16x
    64             | score    |         45.8         |        22.5        |  2.04x
    8              | generate |         42.3         |        26.6        |  1.59x
    8              | score    |         36.1         |        21.7        |  1.67x
(2026-12-01, after the sampler split; the run before it: generate 1.28x / 1.54x, score
1.72x / 1.85x.)

(earlier runs at load 4-6: score 1.72-1.88x, generate 1.22-1.41x at 64 tokens.) The
prefill shrinks from 22,528 to 12,336 padded tokens (5.5 s -> 2.7 s in the breakdown: 2.0x;
the suffixes of the coherence prompts, 72-114 tokens each, are most of what is left). What it
cannot shrink is the decode loop, the same 64 steps x 4 chunks x 32 rows on both paths
(6.5-6.7 s, about half of the unshared generate call), so generate at 64 tokens stays at
1.2-1.4x; with answers a trained judge gives (a few tokens, here 8) it is 1.5-1.7x. The
shared programs take longer to compile (first call 19-22 s vs 11-16 s idle: the prefix
prefill and the suffix pass are one program). Real Qwen2.5-VL prompts share more: the
released pixel budget gives an image at least 334 tokens (min_pixels 512^2, here 56-80), all
in the shared prefix, and a 151k-id tokenizer spends fewer tokens on the unshared text.
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
    """Wraps a jitted program: synchronises and accumulates its wall time and the padded
    prompt tokens it ran (breakdown only)."""

    def __init__(self, fn, tokens):
        self.fn, self.count_tokens = fn, tokens
        self.seconds, self.tokens, self.calls = 0.0, 0, 0

    def reset(self):
        self.seconds, self.tokens, self.calls = 0.0, 0, 0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.fn(*a, **k))
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.tokens += self.count_tokens(a)
        return out


# program -> padded prompt tokens of a call (prefill: input_ids [B, L]; prefill_shared: the
# prefixes' input_ids and the suffixes' [B*M, Ls])
PROGRAMS = {"_prefill": lambda a: int(np.prod(np.shape(a[1]))),
            "_prefill_shared": lambda a: int(np.prod(np.shape(a[1][0])) + np.prod(np.shape(a[2]))),
            "_decode": lambda a: 0, "_score": lambda a: 0}


def breakdown(judges, run):
    """Per judge: seconds and padded tokens of each program kind (synchronised after each)."""
    sampler = next(iter(judges.values())).sampler     # every judge shares it (same model)
    timed = {k: _Timed(getattr(sampler, k), n) for k, n in PROGRAMS.items()}
    for k, t in timed.items():
        setattr(sampler, k, t)
    try:
        for key in judges:
            for t in timed.values():
                t.reset()
            t0 = time.perf_counter()
            run(key, 0)
            total = time.perf_counter() - t0
            parts = " + ".join(f"{k[1:]} {t.seconds:.3f} s ({t.calls} calls"
                               + (f", {t.tokens} padded tokens)" if t.tokens else ")")
                               for k, t in timed.items() if t.calls)
            rest = total - sum(t.seconds for t in timed.values())
            print(f"breakdown {key[0]:8} {_path(key[1]):8}: total {total:.3f} s = {parts} "
                  f"+ host {rest:.3f} s")
    finally:
        for k, t in timed.items():
            setattr(sampler, k, t.fn)


def _path(share: bool) -> str:
    return "shared" if share else "unshared"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=32,
                    help="judge prompts per program call (sorted by length, so a chunk pads "
                         "only to its own length bucket); 0 = all at once")
    ap.add_argument("--modes", default="generate,score")
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    tok = tokenizer_lib.build_demo_tokenizer()
    model, params = build_model(tok)
    responses, truth, imgs = make_rollout(args.images, args.group)
    labels = base.LABELS["emoset2k"]
    modes = args.modes.split(",")
    judges = {(mode, share): Judge(model, tok, mode=mode, source="policy",
                                   max_new_tokens=args.max_new_tokens,
                                   chunk_size=args.chunk_size or None, share_prefix=share)
              for mode in modes for share in (False, True)}
    n_prompts = 2 * len(responses)
    probe = judges[modes[0], False]
    coh, cons = emotion.judge_prompts(responses, labels, "emor3")
    _, mask, *_ = probe.encode(coh + cons, [None] * len(coh) + imgs)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, judge = policy "
          f"({qwen2_5_vl.count_params(params) / 1e6:.1f}M params, vocab {len(tok)}), "
          f"{len(responses)} responses ({args.images} images x G = {args.group}) -> "
          f"{n_prompts} judge prompts of {mask.sum(1).min()}-{mask.sum(1).max()} tokens "
          f"(mean {mask.sum(1).mean():.0f}); generate: T 0.6 top-p 0.95, max "
          f"{args.max_new_tokens} tokens; chunks of {args.chunk_size or n_prompts} prompts")

    def run(key, call):
        # the same key for both paths of a mode: the shared path must give the same answers
        return judges[key].rewards(responses, truth, labels, "emor3", imgs,
                                   rng=jax.random.key(call), policy_params=params)

    rows = {}
    for key, judge in judges.items():            # 1st call: compilation included
        programs = judge.sampler.num_programs
        t0 = time.perf_counter()
        out = run(key, 0)
        rows[key] = dict(first=time.perf_counter() - t0, out=out, times=[],
                         programs=judge.sampler.num_programs - programs)
    for call in range(1, args.repeats + 1):      # interleaved, so load drift hits all alike
        for key in judges:
            t0 = time.perf_counter()
            out = run(key, call)
            rows[key]["times"].append(time.perf_counter() - t0)
            if call == 1:
                rows[key]["out"] = out
    head = (f"{'mode':8} | {'path':8} | {'median s':>8} | {'ms/response':>11} | "
            f"{'1st call s':>10} | {'new programs':>12} | {'mean R_coh':>10} {'R_cons':>6} | "
            f"{'speed-up':>8}")
    print(head)
    print("-" * len(head))
    for (mode, share), r in rows.items():
        r["seconds"] = statistics.median(r["times"])
        base_s = rows[mode, False]["seconds"]
        print(f"{mode:8} | {_path(share):8} | {r['seconds']:8.3f} | "
              f"{1e3 * r['seconds'] / len(responses):11.1f} | {r['first']:10.1f} | "
              f"{r['programs']:12d} | {r['out'].coherence.mean():10.3f} "
              f"{r['out'].consistency.mean():6.3f} | {base_s / r['seconds']:7.2f}x")
    for mode in modes:
        a, b = rows[mode, False]["out"], rows[mode, True]["out"]
        if mode == "generate":
            same = (a.coherence_answers == b.coherence_answers
                    and a.consistency_answers == b.consistency_answers)
            print(f"generate: shared-prefix answers {'identical to' if same else 'DIFFER FROM'} "
                  f"the unshared ones (same RNG key per call)")
        else:
            diff = max(np.abs(a.coherence - b.coherence).max(),
                       np.abs(a.consistency - b.consistency).max())
            print(f"score: largest |reward difference| shared vs unshared {diff:.1e}")
    if len(modes) == 2:
        for share in (False, True):
            ratio = rows["generate", share]["seconds"] / rows["score", share]["seconds"]
            print(f"{_path(share)}: score is {ratio:.1f}x faster than generate")
    if args.breakdown:
        breakdown(judges, run)


if __name__ == "__main__":
    main()
