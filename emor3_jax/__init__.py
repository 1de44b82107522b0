"""emor3_jax: EMO-R3 (reflective GRPO for emotion reasoning) on Qwen2.5-VL in JAX/Flax."""
__version__ = "0.1.0"
