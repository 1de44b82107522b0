"""The CPU demo (the default of `python -m emor3_jax.main`): EMO-R3 on `emo_synth` in minutes.

A tiny Qwen2.5-VL-shaped model (random init) and the package's small-vocabulary tokenizer.
A short Cold-Start SFT teaches the SET format with *random* labels (accuracy stays at chance),
then EMO-R3 GRPO (SET prompt, reflective judge = the policy itself, in `score` mode) learns
which visual cues mean which emotion. Everything else is the released recipe.
"""
from emor3_jax.configs import base


def get_config(method: str = "cold_start"):
    c = base.get_config()
    c.seed = 0
    c.model.tiny = "demo_small"
    c.model.tokenizer = "demo"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"

    c.data.train = "emo_synth"
    c.data.eval = ("emo_synth",)
    c.data.in_domain = ("emo_synth",)
    c.data.min_pixels = 56 * 56
    c.data.max_pixels = 56 * 56
    c.data.max_prompt_len = 256
    c.data.prompt_buckets = (256,)

    c.rollout.batch_size = 32
    c.rollout.group_size = 8
    c.rollout.max_new_tokens = 64
    c.rollout.response_buckets = (48, 64)

    c.reward.judge_mode = "score"
    c.reward.judge_max_new_tokens = 8
    c.reward.judge_prompt_buckets = (64, 96, 128, 192)

    c.rl.mini_batch_size = 32
    c.rl.micro_batch_size = 32
    c.rl.logprob_micro_batch_size = 256
    c.rl.logprob_chunk = 64
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0

    c.sft.steps = 60
    c.sft.lr = 5e-3
    c.sft.batch_size = 32
    c.sft.random_labels = True
    c.sft.target = "set_template"

    c.train.max_steps = 250
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.eval.batch_size = 128
    c.eval.max_examples = 256
    c.eval.max_new_tokens = 64
    c.eval.greedy = True
    c.mesh.fsdp = -1
    c = base.apply_method(c, method)
    return c
