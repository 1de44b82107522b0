"""Qwen2.5-VL-3B-Instruct, EMO-R3 on EmoSet-2k, G = 8, one node of 8 GPUs (A100/H100 80 GB).

    python -m emor3_jax.main --config=configs/gpu.py \\
        --config.model.hf_dir=/models/Qwen2.5-VL-3B-Instruct \\
        --config.data.manual_dir=/data/emotion --workdir=/runs/emor3_3b_gpu
Several nodes: launch/slurm_gpu.sbatch (one process per node; jax.distributed reads SLURM).
"""
from emor3_jax.configs import base


def get_config(method: str = "emor3"):
    c = base.get_config()
    c.model.arch = "qwen2.5-vl-3b"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"     # fp32 master weights: bf16 would round lr-2e-6 steps away
    c.model.remat = "block"
    c.model.attention = "cudnn"          # cuDNN flash attention through jax.nn.dot_product_attention
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.aot.topology = "h100x8"            # python -m emor3_jax.aot: one node of 8 H100s
    c.rollout.chunk_size = 128
    c.reward.judge_chunk_size = 192      # judge prompts per call (all 8192 at once: 2 TiB)
    return base.apply_method(c, method)
