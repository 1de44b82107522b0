"""Flax models (Qwen2.5-VL policy / judge)."""
