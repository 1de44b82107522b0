"""The released EMO-R3 recipe: the one source of truth for labels, prompts, token ids and defaults.

The constants (labels, prompts, token strings, image processing) live in the package
(`emor3_jax/recipe.py`, imported by library code) and are re-exported here; config files start
from `get_config()` and override fields. Every deviation from the released recipe is a named
field, never an edit of a constant.
"""
import ml_collections

from emor3_jax.recipe import (  # noqa: F401  (the recipe's constants, for config files)
    SPECIAL_TOKENS, PAD_TOKEN, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END,
    FORBIDDEN_IN_RESPONSE, EOS_TOKENS, DEFAULT_SYSTEM_PROMPT, IMAGE_MARKER, PATCH_SIZE,
    MERGE_SIZE, TEMPORAL_PATCH_SIZE, MIN_PIXELS, MAX_PIXELS, IMAGE_MEAN, IMAGE_STD,
    MIKELS_LABELS, LABELS, VALENCE_AROUSAL, question_text, SET_INSTRUCTION,
    GRPO_THINK_INSTRUCTION, PROMPT_FORMATS, COHERENCE_TEMPLATE, CONSISTENCY_TEMPLATE,
    JUDGE_NONE_TEXT_PROMPT, JUDGE_NONE_IMAGE_PROMPT, METHODS, RELEASED_EPOCHS, DEFAULT_EPOCHS,
    released_epochs)


def apply_method(c, method: str):
    """Turn the EMO-R3 recipe into one of the paper's baselines (`--config=file.py:grpo`).

    emor3: SET prompt + reflective reward (released default). grpo: the release's naive GRPO
    scripts (`math.jinja` `<think>` prompt, EasyR1 `math.py`: 0.9 acc + 0.1 format, mathruler
    grading). dapo: grpo + EasyR1's DAPO recipe (`examples/qwen2_5_vl_7b_geo3k_dapo.sh`): online
    filtering of groups whose mean overall reward is not strictly inside (0.01, 0.99), refilled
    from mini rollout batches of 128 prompts up to 20 tries, clip-high 0.28, no KL. sft:
    supervised fine-tuning on the labels (the SFT baseline). cold_start: the Cold-Start-Emo SFT
    followed by EMO-R3.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS} "
                         "(e.g. --config=configs/tpu_v4.py:grpo)")
    c.method = method
    if method in ("grpo", "dapo"):
        c.data.prompt_format = "grpo_think"
        c.reward.preset = "grpo_think"
    if method == "dapo":
        c.rl.learner = "dapo"
        c.rollout.mini_batch_size = 128
        c.rl.clip_high = 0.28
        c.rl.kl_coef = 0.0
    if method == "sft":
        c.mode = "sft"
        c.sft.steps = c.sft.steps or 500
    if method == "cold_start":
        c.sft.steps = c.sft.steps or 100
    return c


def get_config():
    """Released EMO-R3 recipe (Qwen2.5-VL-3B-Instruct, EmoSet-2k, G=8)."""
    c = ml_collections.ConfigDict()
    c.mode = "train"  # train | sft | eval | export
    c.method = "emor3"  # see METHODS / apply_method
    c.seed = 1
    c.compile_cache_dir = ""       # persistent XLA cache: "" = $JAX_COMPILATION_CACHE_DIR or
                                   # <workdir>/../jax_cache (local or gs://); "none" = off

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""            # Hugging Face directory (config.json + safetensors)
    c.model.tiny = ""              # name of a built-in tiny config instead of hf_dir ("" = none)
    c.model.arch = ""              # built-in architecture (qwen2.5-vl-3b|7b) for AOT without weights
    c.model.dtype = "bfloat16"     # compute dtype (and the frozen reference's)
    c.model.param_dtype = "float32"  # master weights (fp32, as released: bf16 rounds lr 2e-6 away)
    c.model.remat = "none"         # none | block | full
    c.model.attention = "einsum"   # einsum (reference) | blockwise | splash (TPU) | xla | cudnn
    c.model.tokenizer = ""         # tokenizer directory; "" = the one in hf_dir; "demo" = built-in

    c.data = ml_collections.ConfigDict()
    c.data.train = "emoset2k"
    c.data.eval = ("emoset2k", "emotion6", "webemo")
    c.data.in_domain = ("emoset2k",)
    c.data.data_dir = ""           # TFDS data_dir ("" = TFDS default)
    c.data.manual_dir = ""         # where the user's files are
    c.data.prompt_format = "set"   # key of PROMPT_FORMATS
    # another variant's label list per data set, e.g. --config.data.labels.webemo="('a','b')"
    # (() = LABELS[name]); it gets its own prepared files (data/builders.py labels_config)
    c.data.labels = ml_collections.ConfigDict({"emoset2k": (), "emotion6": (), "webemo": ()})
    c.data.min_pixels = MIN_PIXELS
    c.data.max_pixels = MAX_PIXELS
    c.data.max_prompt_len = 2048
    c.data.prompt_buckets = (256, 512, 1024, 2048)
    c.data.patch_buckets = ()      # () = powers of two and 1.5x powers of two
    c.data.num_workers = 0
    c.data.shuffle = True

    c.rollout = ml_collections.ConfigDict()
    c.rollout.batch_size = 512     # prompts per rollout
    c.rollout.group_size = 8       # G
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.max_new_tokens = 2048
    c.rollout.response_buckets = (256, 512, 1024, 2048)
    c.rollout.chunk_size = 0       # prompts per sampler call (0 = the whole rollout batch)
    # Decode steps run in windows of gen slots, 4x each (128, 512, 2048 for 2,048 new tokens),
    # one program each, whose attention reads only the window's slots (rollout, evaluation and
    # the judge's generate mode); 0 = one program over the whole buffer.
    c.rollout.decode_window = 128
    # The layout the sampler, evaluation and a policy judge run on: the same devices as
    # config.mesh in another (data, fsdp, tensor) shape; all 0 = config.mesh. Decoding reads
    # every weight once per token, so splitting weights over `tensor` (no per-token gather)
    # decodes faster than FSDP, which all-gathers each layer at every token.
    c.rollout.mesh = ml_collections.ConfigDict({"data": 0, "fsdp": 0, "tensor": 0})
    c.rollout.filter_low = 0.01    # DAPO: keep groups whose mean overall reward is strictly in
    c.rollout.filter_high = 0.99   # (filter_low, filter_high), as EasyR1's filter
    c.rollout.mini_batch_size = 0  # dynamic sampling: prompts per generation try (0 = batch_size)
    c.rollout.max_resample_tries = 20

    c.reward = ml_collections.ConfigDict()
    c.reward.preset = "emor3"      # a key of rewards/emotion.py PRESETS (each names its release file)
    c.reward.judge_source = "policy"   # policy | checkpoint
    c.reward.judge_dir = ""        # HF directory of the frozen judge (judge_source=checkpoint)
    c.reward.judge_mode = "generate"   # generate | score
    c.reward.judge_temperature = 0.6
    c.reward.judge_top_p = 0.95
    c.reward.judge_max_new_tokens = 2048
    c.reward.judge_prompt_buckets = (128, 256, 512, 1024, 2048, 4096)
    c.reward.judge_chunk_size = 0  # judge prompts per program call (0 = all at once)
    # prefill what a chunk's judge prompts share (template, image) once, their own suffixes
    # (the response) against it; False: every prompt whole (the suffix pass has no flash
    # kernel, so at 2,048-token responses the whole-prompt splash prefill needs less memory)
    c.reward.judge_share_prefix = True
    # ... except for prompts whose suffix (the response and the template's end) needs more than
    # this many tokens: they run whole (0 = no limit). The shared suffix pass has no flash
    # kernel, so at long responses whole prompts can fit where shared ones do not.
    c.reward.judge_shared_suffix_max = 0

    c.rl = ml_collections.ConfigDict()
    # The RL algorithm: a key of emor3_jax.learners.LEARNERS (grpo: GRPO and EMO-R3, the reward
    # preset picking rule or reflective rewards; dapo: GRPO + dynamic sampling, EasyR1's
    # algorithm.online_filtering, with the rollout.filter_* band and rollout.mini_batch_size)
    c.rl.learner = "grpo"
    c.rl.adv_eps = 1e-6            # advantage = (r - mean) / (unbiased std + adv_eps) per group
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.3
    c.rl.dual_clip = 3.0
    c.rl.kl_coef = 0.01
    # token_mean | microbatch_token_mean (released: the mean inside each micro-batch of
    # rl.micro_batch_size responses per device, so it depends on that split; 4 as released)
    c.rl.loss_agg = "token_mean"
    c.rl.mini_batch_size = 256     # prompts per update
    # Which responses form a mini-batch: 0 = whole prompts in rollout order; k = EasyR1's
    # balanced order (released, k = its 8 GPUs): the responses split into k equal parts of
    # near-equal tokens, mini-batch j = the j-th slice of each part, so it mixes lengths and may
    # hold some of a prompt's responses (emor3_jax/rl/balance.py). token_mean only.
    c.rl.balance_batch = 8
    c.rl.micro_batch_size = 4      # responses per device per accumulation step
    c.rl.logprob_micro_batch_size = 16
    c.rl.ppo_epochs = 1
    c.rl.recompute_old_logp = True   # old log-probs from the actor's forward pass (released);
                                     # False: the sampler's (saves one pass, differs in bf16)
    c.rl.logprob_chunk = 512       # sequence chunk for per-token log-probs
    # Micro-batches (update and log-prob passes) are length-aware: each is padded to its own
    # longest response (and prompt), rounded up to a bucket; prompts sorted by their longest
    # response first (token_mean only). Same loss and gradients as padding every micro-batch
    # to the mini-batch's longest. One program per bucket used.
    c.rl.length_buckets = ()       # response-length buckets; () = powers of two from 64
    # Token-budget micro-batches (token_mean, length-aware): token slots per device one
    # accumulation step may compute (its prompts once, every response row, at their bucketed
    # lengths); rl.micro_batch_size is then the fewest rows, and shorter responses go more to
    # a micro-batch (x2, x4, ...), as verl's use_dynamic_bsz. 0: always rl.micro_batch_size
    # rows; -1: what rl.micro_batch_size rows compute at the longest lengths. Slots are not
    # bytes: more rows of shorter responses also hold more LM-head logit chunks and attention
    # rows over the prompt, so check a budget with `python -m emor3_jax.aot` (on a v4-8 at
    # 2048-token prompts, -1 does not fit: 32-row micro-batches of 512-token responses).
    c.rl.micro_batch_tokens = 0
    c.rl.logprob_micro_batch_tokens = 0   # the same for the log-prob passes
    # The most responses per device a budget may put in one micro-batch (0: no cap), for
    # what token slots do not count (see above).
    c.rl.micro_batch_max_size = 0
    c.rl.logprob_micro_batch_max_size = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # constant | cosine (decay after the warm-up)
    c.optim.decay_steps = 0        # cosine: optimizer steps to decay over
    c.optim.min_lr_ratio = 0.0     # cosine: final lr / lr

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0                # Cold-Start-Emo SFT steps before RL (0 = none)
    c.sft.lr = 1e-5
    c.sft.batch_size = 32
    c.sft.random_labels = False
    c.sft.target = "boxed"         # boxed | set_template | set_caption (emor3_jax/learners/sft.py)
    c.sft.max_len = 128            # target tokens
    c.sft.data = ""                # data set for SFT ("" = data.train)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 0             # 0 = the release's for data.train and the method
                                   # (released_epochs: 20; Emotion6 30 EMO-R3, 25 GRPO)
    c.train.max_steps = 0          # 0 = from epochs
    # The release validates after every step (EasyR1 val_freq 1, and before training); here
    # every 10 (README: deliberate differences); it saves every 5 steps and keeps 7, as here.
    c.train.eval_every = 10
    c.train.checkpoint_every = 5
    c.train.keep_checkpoints = 7
    c.train.log_every = 1
    c.train.max_nonfinite_in_a_row = 3

    c.metrics = ml_collections.ConfigDict()
    # where metrics go beside <workdir>/metrics.jsonl (always written): tensorboard, wandb
    # (pip install -e ".[wandb]"; WANDB_MODE=offline keeps it local)
    c.metrics.backends = ("tensorboard",)
    c.metrics.wandb_project = "emor3_jax"
    c.metrics.wandb_entity = ""    # "" = your default entity
    c.metrics.wandb_name = ""      # "" = the workdir's name

    c.eval = ml_collections.ConfigDict()
    c.eval.greedy = False
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.max_new_tokens = 2048
    c.eval.batch_size = 64
    c.eval.max_examples = 0        # 0 = all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1               # -1 = all remaining devices
    c.mesh.tensor = 1

    c.aot = ml_collections.ConfigDict()
    c.aot.topology = ""            # e.g. v4:2x2x1 (v4-8); see emor3_jax/aot/

    c.profile = ml_collections.ConfigDict()
    c.profile.steps = ()           # training steps to trace with jax.profiler
    return c
