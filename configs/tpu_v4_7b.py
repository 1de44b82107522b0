"""Qwen2.5-VL-7B-Instruct, EMO-R3 on EmoSet-2k, G = 8, a TPU v4-32 slice (16 chips, 4 hosts).

Run the same command on every host (launch/tpu_pod.sh does that):
    python -m emor3_jax.main --config=configs/tpu_v4_7b.py \\
        --config.model.hf_dir=gs://bucket/Qwen2.5-VL-7B-Instruct \\
        --config.data.manual_dir=/path/to/emotion/files --workdir=gs://bucket/emor3_7b
"""
from emor3_jax.configs import base


def get_config(method: str = "emor3"):
    c = base.get_config()
    c.model.arch = "qwen2.5-vl-7b"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 1  # v4-32: 16 chips
    c.aot.topology = "v4:2x2x4"
    c.rollout.chunk_size = 128
    return base.apply_method(c, method)
