"""Accelerator check: forward+backward MFU and sampler tokens/s at the 3B shapes, fused vs einsum.

For a GPU or TPU machine lent for a few minutes (`bench/accelerator.sh` wraps it with a time
limit). Random weights (nothing to download), the recipe's precision (fp32 master parameters,
bf16 compute), text-only sequences (the vision tower is a small share of the 3B step), one
device. For each attention op (`model.attention`: the fused kernel of the backend, then the
einsum reference):

  train    jit(value_and_grad) of the mean next-token cross-entropy over [batch, seq] tokens
           (logits in sequence chunks as the update computes them, remat=full as the TPU config);
           MFU = model FLOPs / time / the chip's peak bf16 FLOP/s. Model FLOPs are counted
           analytically: 6 x matmul parameters x tokens + 6 x causal attention score/value
           matmuls (XLA's cost analysis does not see inside fused kernels).
  sample   Sampler.generate: `prompts` prompts of `prompt_len` random tokens x G samples,
           exactly `new_tokens` new tokens each (no EOS), temperature 1; generated tokens/s.

Warm-up (compilation) excluded; median of --repeats. Prints one table and the fused/einsum
ratio per row.

    python bench/accelerator.py [--arch qwen2.5-vl-3b|tiny] [--attention cudnn,einsum]
        [--batch 4] [--seq 2048] [--prompts 16] [--group 8] [--prompt_len 512]
        [--new_tokens 256] [--repeats 3] [--peak_tflops 989]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import get_tiny_config, qwen2_5_vl_3b_config
from emor3_jax.rl.logprobs import chunked_token_logprobs
from emor3_jax.sampling import Prompts, Sampler, SamplingSettings

# bf16 dense peak per chip (TFLOP/s), by jax device_kind prefix; --peak_tflops overrides.
PEAKS = {"NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0,
         "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_tflops(override: float) -> tuple[float, str]:
    if override:
        return override, "--peak_tflops"
    kind = jax.devices()[0].device_kind
    for prefix, peak in PEAKS.items():
        if kind.startswith(prefix):
            return peak, kind
    return 0.0, f"{kind} (unknown peak: pass --peak_tflops)"


def model_config(arch: str, attention: str):
    runtime = dict(dtype="bfloat16", param_dtype="float32", remat="full",
                   attention_impl=attention)
    if arch == "tiny":
        return get_tiny_config("demo", vocab_size=1024).replace(**runtime)
    return qwen2_5_vl_3b_config(**runtime)


def train_flops(cfg, batch: int, seq: int) -> float:
    """6 x matmul parameters x tokens + 6 x causal attention matmuls (fwd 2, bwd 4)."""
    t = cfg.text
    head = t.hidden_size // t.num_attention_heads
    per_layer = (t.hidden_size * head * (t.num_attention_heads + 2 * t.num_key_value_heads)
                 + t.num_attention_heads * head * t.hidden_size
                 + 3 * t.hidden_size * t.intermediate_size)
    matmul = t.num_hidden_layers * per_layer + t.vocab_size * t.hidden_size   # + LM head
    tokens = batch * seq
    attn = t.num_hidden_layers * 2 * batch * t.num_attention_heads * head * seq * seq / 2
    return 6.0 * matmul * tokens + 3.0 * 2 * attn


def median_time(fn, repeats: int) -> float:
    fn()                                  # warm-up: compilation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(model, params, batch: int, seq: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, model.config.text.vocab_size - 8, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), jnp.int32)

    def loss(p):
        hidden = model.apply({"params": p}, ids, mask, method=model.hidden_states)
        head = lambda h: model.apply({"params": p}, h, method=model.logits)  # noqa: E731
        logp, _ = chunked_token_logprobs(head, hidden[:, :-1], ids[:, 1:], chunk=512,
                                         with_entropy=False)
        return -jnp.mean(logp)

    step = jax.jit(jax.value_and_grad(loss))
    return median_time(lambda: jax.block_until_ready(step(params)), repeats)


def bench_sample(model, params, prompts: int, group: int, prompt_len: int, new_tokens: int,
                 repeats: int) -> float:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.text.vocab_size - 8, (prompts, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    sampler = Sampler(model, memory_limit_bytes=0)
    calls = [0]

    def run():
        calls[0] += 1
        res = sampler.generate(params, Prompts(ids, mask),
                               SamplingSettings(new_tokens, num_samples=group, temperature=1.0,
                                                eos_token_ids=()), jax.random.key(calls[0]))
        assert res.tokens.shape == (prompts * group, new_tokens)
    return median_time(run, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-vl-3b", choices=("qwen2.5-vl-3b", "tiny"))
    ap.add_argument("--attention", default="",
                    help="comma list; default: the backend's fused kernel, then einsum")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=512)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=0.0)
    ap.add_argument("--skip", default="", help="train and/or sample, comma list")
    a = ap.parse_args()
    backend = jax.default_backend()
    fused = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "blockwise")
    impls = a.attention.split(",") if a.attention else [fused, "einsum"]
    peak, peak_src = peak_tflops(a.peak_tflops)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({backend}), peak "
          f"{peak:g} TFLOP/s bf16 ({peak_src}); {a.arch}, fp32 params, bf16 compute")
    rows = []
    for impl in impls:
        cfg = model_config(a.arch, impl)
        model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg)
        params = qwen2_5_vl.init_params(model, jax.random.key(0))
        row = {"attention": impl}
        if "train" not in a.skip:
            row["train_s"] = bench_train(model, params, a.batch, a.seq, a.repeats)
            row["tflops"] = train_flops(cfg, a.batch, a.seq - 1) / row["train_s"] / 1e12
        if "sample" not in a.skip:
            row["sample_s"] = bench_sample(model, params, a.prompts, a.group, a.prompt_len,
                                           a.new_tokens, a.repeats)
            row["tok_s"] = a.prompts * a.group * a.new_tokens / row["sample_s"]
        rows.append(row)
        del params
        print(row, flush=True)
    print(f"\ntrain: {a.batch} x {a.seq} tokens, value_and_grad, remat full | sample: "
          f"{a.prompts} prompts x {a.prompt_len} tokens x G {a.group}, {a.new_tokens} new\n")
    print("| attention | train s | TFLOP/s | MFU | sample s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak and "tflops" in r else "-"
        print(f"| {r['attention']} | {r.get('train_s', float('nan')):.3f} | "
              f"{r.get('tflops', float('nan')):.1f} | {mfu} | {r.get('sample_s', float('nan')):.3f} | "
              f"{r.get('tok_s', float('nan')):.0f} |")
    if len(rows) > 1:
        f, e = rows[0], rows[-1]
        if "train_s" in f:
            print(f"\ntrain speed-up {f['attention']} vs {e['attention']}: "
                  f"{e['train_s'] / f['train_s']:.2f}x")
        if "sample_s" in f:
            print(f"sampler speed-up {f['attention']} vs {e['attention']}: "
                  f"{e['sample_s'] / f['sample_s']:.2f}x")


if __name__ == "__main__":
    main()
