"""The CPU demo (the default of `python -m emor3_jax.main`): EMO-R3 on `emo_synth` in minutes.

A tiny Qwen2.5-VL-shaped model (random init) and the package's small-vocabulary tokenizer.
A short Cold-Start SFT teaches the SET format, with step 1 describing what the image shows
(its `caption`: warm or cool, vivid or muted, bright or dark; never the emotion) and a *random*
label, so accuracy stays at chance; then EMO-R3 GRPO (the question alone as the prompt, the
reflective judge = the policy itself, in `score` mode) learns which scenes mean which emotion
from the reward alone.

Deviations from the released recipe, all for a 0.78M-parameter model trained from scratch on
2 CPU cores: fp32; images at 112 x 112; rollout batch 32 prompts (mini-batch 16, so two updates
per rollout as 512 / 256 in the recipe); responses of at most 48 tokens (a well-formed answer
is 42-43 demo tokens); the question alone as the prompt (`data.prompt_format=plain`, 77 tokens;
the SET instructions make it 172: the SFT has taught the answer format, which the reward still
checks); 100 GRPO steps; AdamW lr 1e-3 (500x the recipe's) with 10 warm-up steps, a cosine
decay to 2e-4 over the 200 updates and no weight decay; k3 KL coefficient 0.1 instead of 0.01;
greedy evaluation on 128 held-out images; mini-batches of whole prompts in rollout order
(`rl.balance_batch=0`, not the released balanced order: the seed table was measured so).
Reward, judge, advantages and clipping are the recipe's. Why (measured here, held-out accuracy
on 128 images):
  * the plain prompt: with the SET prompt and 100 steps, seeds 0, 1, 2 ended at 0.77, 0.66,
    0.48 (a flat start of 25-50 steps whose length varied with the seed; the 16 image tokens
    were a small share of 172 prompt tokens to the tiny LM); with the question alone every
    forward pass is ~2x cheaper, and 150 steps left seeds 0-4 at 0.75-0.88, 0.75-0.88 already
    at step 100 (a 2-core AVX-512 host; 8-9 min a run, 13.5 on an AVX2 host). 100 steps,
    the decay fitted to them: the README's seed table.
  * KL 0.01: at this learning rate the reward alone does not hold step 1 (correct descriptions
    fell from 70 % after SFT to 16 %) and accuracy was 0.59 after 100 GRPO steps; with 0.1,
    0.77 after 80.
  * constant lr: accuracy swung 0.77 -> 0.56 -> 0.78 at steps 80, 100, 120; with the decay
    0.80 -> 0.83 at steps 80, 100. lr 2e-3 broke the format (0.77 at step 50).
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
    # emo_synth images are 56 x 56; the processor resizes them to 112 x 112 = 16 image tokens.
    # With 4 image tokens among ~170 prompt tokens the tiny LM barely reads the image: a
    # supervised run (true labels, 100 steps) reached 0.16 accuracy at 56 px, 0.72 at 112 px.
    c.data.min_pixels = 112 * 112
    c.data.max_pixels = 112 * 112
    c.data.prompt_format = "plain"  # the question alone (docstring)
    c.data.max_prompt_len = 80      # every plain emo_synth prompt is 77 tokens
    c.data.prompt_buckets = (80,)

    c.rollout.batch_size = 32
    c.rollout.group_size = 8
    c.rollout.max_new_tokens = 48   # a well-formed SET answer is 42-43 demo tokens
    c.rollout.response_buckets = (48,)

    c.reward.judge_mode = "score"
    c.reward.judge_max_new_tokens = 8
    c.reward.judge_prompt_buckets = (64, 96, 128, 192)

    c.rl.mini_batch_size = 16        # two updates per rollout, as the recipe's 512 / 256
    c.rl.balance_batch = 0           # whole prompts in rollout order (docstring)
    c.rl.micro_batch_size = 16
    c.rl.logprob_micro_batch_size = 256
    c.rl.logprob_chunk = 64
    c.rl.kl_coef = 0.1
    # fp32 end to end on one backend: the sampler's log-probs are the actor's (same weights and
    # dtype; only the forbidden vision tokens' tiny mass is renormalized away), so the
    # released recomputation would be one more forward pass per update for nothing
    c.rl.recompute_old_logp = False
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.decay_steps = 200        # 100 GRPO steps x 2 updates
    c.optim.min_lr_ratio = 0.2
    c.optim.weight_decay = 0.0

    c.sft.steps = 100               # 60 left the template fragile under GRPO
    c.sft.lr = 5e-3
    c.sft.batch_size = 32
    c.sft.random_labels = True
    c.sft.target = "set_caption"     # step 1 = what the image shows; the label stays random
    c.sft.max_len = 48               # the rollout's length: a target is 42-43 tokens (128 padded
                                     # every row to 2.7x its length; same loss and gradients)

    c.train.max_steps = 100
    c.train.eval_every = 25
    c.train.checkpoint_every = 50
    c.eval.batch_size = 128
    c.eval.max_examples = 128
    c.eval.max_new_tokens = 48
    c.eval.greedy = True
    c.mesh.fsdp = -1
    c = base.apply_method(c, method)
    return c
