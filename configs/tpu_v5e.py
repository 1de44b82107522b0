"""The paper setting (configs/tpu_v4.py: Qwen2.5-VL-3B-Instruct, EMO-R3 on EmoSet-2k, G = 8, fp32
master weights) on a TPU v5e-8 (v5litepod-8): one host, 8 chips of 16 GiB. The smallest v5e
slice it fits: the train state and the reference take 49 GiB, 12.25 per chip on a v5e-4, which
leaves 3 GiB of its 15.2 usable for the update's 8.3 GiB of temporaries (one response per chip,
as measured on the v5e-8).

    launch/tpu_pod.sh --type v5litepod-8 --version v2-alpha-tpuv5-lite \\
        --config configs/tpu_v5e.py --workdir gs://bucket/emor3_3b -- \\
        --config.model.hf_dir=gs://bucket/Qwen2.5-VL-3B-Instruct

The recipe is tpu_v4.py's, unchanged; only how its batches are split into device programs
differs. Fit (`python -m emor3_jax.aot --config=configs/tpu_v5e.py --lengths=typical`, README,
libtpu 0.0.42.1): the judge prefill of whole prompts needs 13.33 GiB live at 48 prompts (15.63
at 64, over the 15.2 usable); estimated step 344 s at typical lengths with 64-prompt judge
calls (v4-8: 282).
"""
from emor3_jax.configs import base, tpu_v4


def get_config(method: str = "emor3"):
    c = tpu_v4.get_config("emor3")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1   # v5e-8: 8 chips
    c.aot.topology = "v5e:2x4"
    # memory knobs: how the recipe's batches are split, not the recipe
    c.rollout.chunk_size = 32            # prompts per sampler call (x G = 256 rows)
    c.reward.judge_chunk_size = 48       # judge prompts per sampler call: 171 calls per step
    c.rl.micro_batch_size = 1            # responses per chip per accumulation step
    c.rl.micro_batch_tokens = 0          # fixed rows: tpu_v4.py's token budget is not compiled here
    c.rl.logprob_micro_batch_size = 16   # responses per chip per log-prob step
    return base.apply_method(c, method)
