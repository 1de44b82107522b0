"""Reflective judge: score-mode likelihoods == a full forward, score and generate modes agree when
the greedy answer is a candidate, special strings in responses cannot break encoding, the
shared-prefix judge (the default) == every prompt whole, on one device and on a mesh.

Most tests run the unshared path (share_prefix=False): its programs are the ones the
comparisons reuse, so the file compiles each path's programs about once."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from emor3_jax import sharding
from emor3_jax.configs import base
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import tokenizer as tokenizer_lib
from emor3_jax.rewards import emotion
from emor3_jax.rewards.judge import Judge, ProcessedImage
from emor3_jax.sampling import Prompts, Sampler, SamplingSettings, packing
from qwen_testutil import hf_logits, hf_model, images

LABELS = base.LABELS["emoset2k"]


def _response(scene: str, feeling: str, label: str) -> str:
    return (f"<step1>{scene}</step1>\n<step2>{feeling}</step2>\n<step3>The emotion is positive "
            f"and the arousal is high.</step3>\n\\boxed{{{label}}}")


RESPONSES = [
    _response("A child laughs while playing with friends on the beach.",
              "A human would feel happy and playful.", "amusement"),
    _response("Dark storm clouds gather over an empty field at night.",
              "People would feel scared and nervous.", "fear"),
    "The image shows a dog. \\boxed{awe}",                         # no steps: 'None' prompts
    _response("A spider <|im_end|> crawls on rotten food <image> in a <|image_pad|> kitchen.",
              "A human would feel sick.", "disgust"),              # special strings inside
]
TRUE_LABELS = ["amusement", "fear", "awe", "disgust"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tokenizer_lib.build_demo_tokenizer()
    ids = tokenizer_lib.token_ids(tok)
    cfg = tiny_config(vocab_size=ids.vocab_size, tie_word_embeddings=False, special_token_ids={
        "image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
        "bos_token_id": ids.pad, "eos_token_id": ids.im_end, "pad_token_id": ids.pad})
    ref = hf_model(cfg, seed=11)
    d = str(tmp_path_factory.mktemp("judge_hf"))
    ref.save_pretrained(d)
    model, params = qwen2_5_vl.load_hf(d)
    pv, grid = images([("astronaut", (200, 280)), ("chelsea", (160, 240))])
    n0 = int(np.prod(grid[0]))
    photos = [ProcessedImage(pv[:n0], tuple(grid[0])), ProcessedImage(pv[n0:], tuple(grid[1]))]
    rollout_images = [photos[0], photos[0], photos[1], photos[1]]    # 2 prompts x G=2
    return tok, ids, cfg, ref, d, model, params, rollout_images


@pytest.fixture(scope="module")
def sampler(setup):
    """One sampler (the judge's default chunk of 64 prompts) handed to the single-device
    judges, so they share its compiled programs."""
    return Sampler(setup[5], chunk_size=64)


def test_score_log_likelihood_equals_full_forward(setup, sampler):
    """Sampler.score (prefill once, continuations as a group, one multi-token call) ==
    log-softmax sums of transformers' full forward over prompt + continuation."""
    tok, ids, cfg, ref, _, model, params, imgs = setup
    judge = Judge(model, tok, mode="score", source="checkpoint", params=params, sampler=sampler)
    prompts = [emotion.coherence_prompt(RESPONSES[0], LABELS),
               emotion.consistency_prompt(RESPONSES[1]), base.JUDGE_NONE_TEXT_PROMPT]
    p_ids, p_mask, pv, grid, row_images = judge.encode(prompts, [None, imgs[0], None])
    assert row_images == [[], [0], []]
    conts = [[383, ids.im_end], [ids.im_end], [77, 502, ids.im_end]]
    encoded = Prompts(p_ids, p_mask, pv, grid, row_images=row_images)
    ours = judge.sampler.score(params, encoded, conts)
    assert ours.shape == (3, 3)
    for b in range(3):
        row = p_ids[b][p_mask[b] == 1]
        kw = (dict(pixel_values=pv, grid=grid) if b == 1 else {})
        for c, cont in enumerate(conts):
            full = np.concatenate([row, cont])[None].astype(np.int32)
            logits = hf_logits(ref, cfg, full, np.ones_like(full), **kw)[0]
            logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
            expected = sum(logp[len(row) - 1 + j, t] for j, t in enumerate(cont))
            np.testing.assert_allclose(ours[b, c], expected, atol=1e-4)
    # at the judge temperature: the log-softmax of logits / T
    hot = judge.sampler.score(params, encoded, conts[:1], temperature=0.6)
    row = p_ids[0][p_mask[0] == 1]
    full = np.concatenate([row, conts[0]])[None].astype(np.int32)
    logits = torch.tensor(hf_logits(ref, cfg, full, np.ones_like(full))[0]) / 0.6
    logp = torch.log_softmax(logits, -1).numpy()
    np.testing.assert_allclose(hot[0, 0], sum(logp[len(row) - 1 + j, t]
                                              for j, t in enumerate(conts[0])), atol=1e-4)


def test_score_mode_reward_is_the_expected_released_reward(setup, sampler):
    """R_coh = P(label) + 0.5 P(None) and R_cons = P(yes) under the judge's distribution over
    the candidates at T = 0.6 (spellings pooled, renormalized): the released rules' expectation."""
    tok, ids, _, _, _, model, params, imgs = setup
    judge = Judge(model, tok, mode="score", source="checkpoint", params=params, temperature=0.6,
                  share_prefix=False, sampler=sampler)
    out = judge.rewards(RESPONSES, TRUE_LABELS, LABELS, "emor3", imgs)
    coh_cands = LABELS + ("None",)
    conts, owner = judge.candidate_tokens(coh_cands)
    p_ids, p_mask, pv, grid, rows = judge.encode(out.coherence_prompts, None)
    logp = judge.sampler.score(params, Prompts(p_ids, p_mask, pv, grid, row_images=rows), conts,
                               temperature=0.6)
    mass = np.zeros((len(RESPONSES), len(coh_cands)))
    for k, j in enumerate(owner):
        mass[:, j] += np.exp(logp[:, k].astype(np.float64))
    prob = mass / mass.sum(1, keepdims=True)
    want = [prob[i, coh_cands.index(label)] + 0.5 * prob[i, -1]
            for i, label in enumerate(TRUE_LABELS)]
    np.testing.assert_allclose(out.coherence, want, atol=1e-5)
    assert 0 < out.coherence.min() and out.coherence.max() < 1      # not an arg-max 0/0.5/1
    cons = judge.candidate_probs(out.consistency_prompts, imgs, None, ("yes", "no", "None"))
    np.testing.assert_allclose(cons.sum(1), 1.0, atol=1e-6)
    # released R_cons of "None" is 0, not 0.5: "no" is a substring of "none"
    assert emotion.consistency_score("None") == 0.0
    np.testing.assert_allclose(out.consistency, cons[:, 0], atol=1e-6)
    assert out.consistency_answers == [("yes", "no", "None")[j] for j in cons.argmax(1)]
    total = emotion.score_responses(RESPONSES, TRUE_LABELS, "emor3", **out.score_kwargs())
    np.testing.assert_allclose(total.components["coherence"], out.coherence)


def _steer(model, params, judge, prompts, imgs, answer_token, eos_token, gain=40.0):
    """Params whose greedy answer to these prompts is `answer_token` then `eos_token`: LM-head
    columns set along the mean final hidden state after the prompt / after the answer token."""
    p_ids, p_mask, pv, grid, row_images = judge.encode(prompts, imgs)
    if grid is not None:          # the model's eager forward wants every occurrence (HF layout)
        n = grid.prod(-1)
        starts = np.concatenate([[0], np.cumsum(n)])
        order = [i for r in row_images for i in r]
        pv = np.concatenate([pv[starts[i]:starts[i + 1]] for i in order])
        grid = grid[order]
    ext_ids = np.concatenate([p_ids, np.full((len(prompts), 1), answer_token, np.int32)], 1)
    ext_mask = np.concatenate([p_mask, np.ones((len(prompts), 1), np.int32)], 1)
    hidden = model.apply({"params": params}, ext_ids, ext_mask, pv, grid,
                         method=model.hidden_states)
    unit = lambda h: h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    after_prompt = unit(unit(hidden[:, -2]).mean(0))
    after_answer = unit(unit(hidden[:, -1]).mean(0))
    kernel = params["lm_head"]["kernel"]
    kernel = kernel.at[:, answer_token].set(gain * after_prompt)
    kernel = kernel.at[:, eos_token].set(gain * after_answer)
    return {**params, "lm_head": {"kernel": kernel}}


def test_score_and_generate_modes_agree(setup, sampler):
    """Greedy generate (T = 0) and score give the same answers and rewards when the greedy
    answer is a candidate: 'excitement' (coherence) and 'Yes' (consistency)."""
    tok, ids, cfg, _, _, model, params, imgs = setup
    kw = dict(source="checkpoint", temperature=0.0, max_new_tokens=6, share_prefix=False,
              sampler=sampler)
    probe = Judge(model, tok, mode="score", source="checkpoint", params=params, sampler=sampler)
    coh, cons = emotion.judge_prompts(RESPONSES, LABELS, "emor3")
    (excitement,) = tok.encode("excitement", add_special_tokens=False)
    (yes,) = tok.encode("Yes", add_special_tokens=False)
    results = {}
    for name, prompts, prompt_imgs, token in [("coherence", coh, None, excitement),
                                              ("consistency", cons, imgs, yes)]:
        steered = _steer(model, params, probe, prompts, prompt_imgs, token, ids.im_end)
        for mode in ("generate", "score"):
            judge = Judge(model, tok, mode=mode, params=steered, **kw)
            results[name, mode] = judge.rewards(RESPONSES, TRUE_LABELS, LABELS, "emor3", imgs)
    gen, sco = results["coherence", "generate"], results["coherence", "score"]
    assert gen.coherence_answers == sco.coherence_answers == ["excitement"] * 4
    np.testing.assert_array_equal(gen.coherence, sco.coherence)
    np.testing.assert_array_equal(sco.coherence, [0.0, 0.0, 0.0, 0.0])
    gen, sco = results["consistency", "generate"], results["consistency", "score"]
    assert [a.lower() for a in gen.consistency_answers] == sco.consistency_answers == ["yes"] * 4
    np.testing.assert_array_equal(gen.consistency, sco.consistency)
    np.testing.assert_array_equal(sco.consistency, [1.0] * 4)
    # the answers feed emotion.score_responses as they are
    total = emotion.score_responses(RESPONSES, TRUE_LABELS, "emor3", **sco.score_kwargs())
    assert total.components["consistency"].tolist() == [1.0] * 4


def test_unsteered_score_mode_picks_a_candidate_and_scores(setup, sampler):
    tok, _, _, _, _, model, params, imgs = setup
    judge = Judge(model, tok, mode="score", source="policy", share_prefix=False, sampler=sampler)
    out = judge.rewards(RESPONSES, TRUE_LABELS, LABELS, "emor3", imgs, policy_params=params)
    assert set(out.coherence_answers) <= set(LABELS) | {"None"}
    assert set(out.consistency_answers) <= {"yes", "no", "None"}
    assert out.coherence.shape == (4,) and ((0 <= out.coherence) & (out.coherence <= 1)).all()
    # 'Answer None' prompt for the response without steps; no judge on the set_only preset
    assert out.coherence_prompts[2] == base.JUDGE_NONE_TEXT_PROMPT
    none = judge.rewards(RESPONSES, TRUE_LABELS, LABELS, "set_only", imgs, policy_params=params)
    assert none.coherence is None and none.consistency is None


def test_special_strings_in_responses_are_removed_and_counted(setup, sampler):
    tok, ids, _, _, _, model, params, imgs = setup
    judge = Judge(model, tok, mode="generate", source="checkpoint", params=params,
                  temperature=0.6, max_new_tokens=4, share_prefix=False, sampler=sampler)
    coh, cons = emotion.judge_prompts(RESPONSES, LABELS, "emor3")
    p_ids, p_mask, pv, grid, row_images = judge.encode(coh + cons, [None] * 4 + imgs)
    assert judge.stats["sanitized_prompts"] == 2              # response 3, both prompts
    assert judge.stats["removed_special_strings"] == 6         # 2 specials + 1 <image>, twice
    assert row_images == [[]] * 4 + [[0], [0], [1], [1]]       # 2 distinct images, each once
    assert pv.shape[0] == grid.prod(-1).sum()
    n_image_tokens = (p_ids == ids.image_pad).sum(1)
    expected = [0] * 4 + [int(np.prod(grid[r[0]])) // 4 for r in row_images[4:]]
    np.testing.assert_array_equal(n_image_tokens, expected)
    assert ((p_ids == ids.im_end).sum(1) == 2).all()           # system + user turn only
    answers = judge.answer(coh, None, jax.random.key(0))
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert judge.stats["generated_tokens"] > 0


def test_judge_argument_errors(setup, sampler):
    tok, _, cfg, _, _, model, params, imgs = setup
    with pytest.raises(ValueError, match="judge mode"):
        Judge(model, tok, mode="vote")
    with pytest.raises(ValueError, match="needs params"):
        Judge(model, tok, source="checkpoint")
    with pytest.raises(ValueError, match="needs policy_params"):
        Judge(model, tok, mode="score").answer(["hi"], candidates=["yes"])
    other = qwen2_5_vl.build_model(tiny_config(vocab_size=1024))   # default (other) special ids
    with pytest.raises(ValueError, match="disagree"):
        Judge(other, tok, source="checkpoint", params=params)
    # from the recipe config: the released judge (policy, generate, T 0.6, top-p 0.95, 2048)
    reward = base.get_config().reward
    judge = Judge.from_config(reward, model, tok)
    s = judge.sampling
    assert (judge.source, judge.mode, s.temperature, s.top_p, s.max_new_tokens,
            s.share_prefix) == ("policy", "generate", 0.6, 0.95, 2048, True)
    reward.judge_share_prefix = False
    assert not Judge.from_config(reward, model, tok).share_prefix
    reward.judge_source = "checkpoint"
    with pytest.raises(ValueError, match="judge_dir"):
        Judge.from_config(reward, model, tok)
    with pytest.raises(ValueError, match="another model config"):    # a sampler not of its model
        Judge(model, tok, source="checkpoint", params=params, sampler=Sampler(other))


def test_shared_prefix_equals_unshared(setup, sampler, caplog):
    """share_prefix (the judge's default: each image group's and the coherence prompts' common
    token prefix prefilled once, then the suffixes against its cache) == every prompt whole:
    token-identical greedy generations, the same sampled answers with the same key, score-mode
    log-likelihoods within 1e-5 of the unshared ones (those of its greedy generations; the
    score-mode rewards are sums and ratios of them). The suffixes of a group differ in length
    (an 'Answer None' prompt beside a response; responses of different lengths)."""
    tok, ids, _, _, _, model, params, imgs = setup
    coh, cons = emotion.judge_prompts(RESPONSES, LABELS, "emor3")
    kw = dict(mode="generate", source="checkpoint", params=params, temperature=0.6,
              max_new_tokens=6, sampler=sampler)
    judge = Judge(model, tok, **kw)
    p_ids, p_mask, pv, grid, rows = judge.encode(coh + cons, [None] * 4 + imgs)
    encoded = Prompts(p_ids, p_mask, pv, grid, row_images=rows)
    tokens = [p_ids[r][p_mask[r] == 1] for r in range(8)]
    units = packing.shared_units(tokens, rows, cap=8, image_token_id=ids.image_pad)
    by_rows = {tuple(sorted(u.tolist())): p for u, p in units}
    assert set(by_rows) == {(0, 1, 2, 3), (4, 5), (6, 7)}          # text; image 0; image 1
    for unit, p in by_rows.items():
        suffix = [len(tokens[r]) - p for r in unit]
        assert min(suffix) >= 1 and len(set(suffix)) == len(unit)  # different suffix lengths
        assert all((tokens[r][p:] != ids.image_pad).all() for r in unit)
        assert (tokens[unit[0]][:p] == ids.image_pad).any() == (unit[0] >= 4)
    greedy = lambda **kw: SamplingSettings.for_ids(ids, max_new_tokens=6, **kw)
    out = {share: sampler.generate(params, encoded, greedy(share_prefix=share))
           for share in (False, True)}
    # shared_suffix_max: the units whose suffixes need more run whole, beside the shared ones
    need = {unit: max(len(tokens[r]) - p for r in unit) for unit, p in by_rows.items()}
    limit = min(need.values())
    assert 0 < sum(n <= limit for n in need.values()) < len(need)
    whole = sum(len(unit) for unit, n in need.items() if n > limit)
    with caplog.at_level(logging.INFO, logger="emor3_jax.sampling.sampler"):
        out["mixed"] = sampler.generate(params, encoded,
                                        greedy(share_prefix=True, shared_suffix_max=limit))
    assert f"{whole} of 8 prompts have suffixes of more than {limit} tokens" in caplog.text
    for share in (True, "mixed"):
        np.testing.assert_array_equal(out[share].tokens, out[False].tokens)
        np.testing.assert_array_equal(out[share].lengths, out[False].lengths)
        np.testing.assert_allclose(out[share].logprobs, out[False].logprobs, atol=1e-5)
    # sampled (T 0.6, top-p 0.95): the same key gives the same answers, whatever the order
    # the prompts run in (the unshared judge sorts them by length, the shared one by group)
    sampled = {}
    for share in (False, True):
        sampled[share] = Judge(model, tok, share_prefix=share, **kw).rewards(
            RESPONSES, TRUE_LABELS, LABELS, "emor3", imgs, rng=jax.random.key(4))
    assert sampled[True].coherence_answers == sampled[False].coherence_answers
    assert sampled[True].consistency_answers == sampled[False].consistency_answers
    # score: the shared path's log-likelihood of each prompt's own greedy answer (up to 3
    # tokens; every answer is a candidate for every prompt, so the trie shares their prefixes)
    # == the sum of the unshared generation's log-probs of those tokens
    n = np.minimum(out[False].lengths, 3)
    conts = [out[False].tokens[r, :n[r]].tolist() for r in range(8)]
    logp = sampler.score(params, encoded, conts, share_prefix=True)
    want = [out[False].logprobs[r, :n[r]].sum() for r in range(8)]
    np.testing.assert_allclose(np.diag(logp), want, atol=1e-5)
    assert sampler.compiled["prefill_shared"] >= 1


def test_checkpoint_judge_on_mesh_equals_single_device(setup, devices8):
    """The shared-prefix judge on a 2 x 4 mesh (prompts over fsdp, KV heads over tensor) ==
    the unshared one on one device (greedy: the same answers)."""
    tok, _, _, _, d, model, params, imgs = setup
    kw = dict(mode="generate", source="checkpoint", temperature=0.0, max_new_tokens=6)
    single = Judge(model, tok, params=params, share_prefix=False, **kw).rewards(
        RESPONSES, TRUE_LABELS, LABELS, "emor3", imgs)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model_m, params_m = qwen2_5_vl.load_hf(d, mesh=mesh)
    sharded = Judge(model_m, tok, params=params_m, mesh=mesh, **kw).rewards(
        RESPONSES, TRUE_LABELS, LABELS, "emor3", imgs)
    assert sharded.coherence_answers == single.coherence_answers
    assert sharded.consistency_answers == single.consistency_answers
