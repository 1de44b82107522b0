"""The paper setting (configs/tpu_v4.py: Qwen2.5-VL-3B-Instruct, EMO-R3 on EmoSet-2k, G = 8, fp32
master weights) on a TPU v6e-8: one host, 8 Trillium chips of 32 GiB.

    launch/tpu_pod.sh --type v6e-8 --version v2-alpha-tpuv6e --config configs/tpu_v6e.py \\
        --workdir gs://bucket/emor3_3b -- --config.model.hf_dir=gs://bucket/Qwen2.5-VL-3B-Instruct

The recipe is tpu_v4.py's, unchanged; only how its batches are split into device programs
differs. Fit (`python -m emor3_jax.aot --config=configs/tpu_v6e.py --lengths=typical`, README):
the train state and the reference take 6.13 GiB per chip over 8 chips (12.25 on a v4-8), so
each program can take twice the rows per call: peak 30.1 GiB live of 30.4 usable (the judge
prefill of 192 prompts x 4,096 tokens). Estimated step 111 s at typical lengths (v4-8: 282;
AOT rerun with the trainer's programs, libtpu 0.0.42.1).
If another image size or library version needs headroom, reward.judge_chunk_size = 128
should free about 8 GiB (its temporaries grow with its rows) for 64 judge calls instead of 43.
"""
from emor3_jax.configs import base, tpu_v4


def get_config(method: str = "emor3"):
    c = tpu_v4.get_config("emor3")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1   # v6e-8: 8 chips
    c.aot.topology = "v6e:2x4"
    # memory knobs: how the recipe's batches are split, not the recipe
    c.rollout.chunk_size = 128           # prompts per sampler call (x G = 1024 rows)
    c.reward.judge_chunk_size = 192      # judge prompts per sampler call: 43 calls per step
    c.rl.micro_batch_size = 4            # responses per chip per accumulation step
    c.rl.micro_batch_tokens = 0          # fixed rows: tpu_v4.py's token budget is not compiled here
    c.rl.logprob_micro_batch_size = 32   # responses per chip per log-prob step
    return base.apply_method(c, method)
