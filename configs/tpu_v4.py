"""The paper setting: Qwen2.5-VL-3B-Instruct, EMO-R3 on EmoSet-2k, G = 8, one TPU v4-8 (4 chips).

    python -m emor3_jax.main --config=configs/tpu_v4.py \\
        --config.model.hf_dir=/path/or/gs://Qwen2.5-VL-3B-Instruct \\
        --config.data.manual_dir=/path/to/emotion/files --workdir=gs://bucket/emor3_3b
Baselines: `configs/tpu_v4.py:grpo`, `:dapo`, `:sft`, `:cold_start` (see configs/base.py).
"""
from emor3_jax.configs import base


def get_config(method: str = "emor3"):
    c = base.get_config()
    c.model.arch = "qwen2.5-vl-3b"      # shapes for AOT compilation when hf_dir is not at hand
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 1   # v4-8: 4 chips
    c.aot.topology = "v4:2x2x1"
    c.rollout.chunk_size = 64            # prompts per sampler call (x G = 512 rows)
    return base.apply_method(c, method)
