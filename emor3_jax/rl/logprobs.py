"""Per-token log-probs (and entropies) of GRPO responses: shared prompts, chunked LM head.

Two savings over "one [N, Lp + T] forward pass per response":

1. **The prompt runs once per distinct prompt**, not once per response. The G responses of a
   prompt continue the same prompt tokens and the same image, and causal attention means the
   prompt's hidden states and keys/values do not depend on the response. So the prompt (vision
   tower included) runs once through the model's prefill path, its per-layer keys/values are
   gathered to the responses that continue it (`prompt_index`), and the responses run through
   the decode path attending to [prompt keys/values, their own]. The backward pass sums the
   G responses' gradients into the one prompt computation. Same values and gradients as the
   full forward (tested), with the prompt's share of the compute divided by the number of
   responses per prompt in a micro-batch (EasyR1 runs prompt and vision tower per response).

2. **No [N, T, V] logits**: with Qwen's 151k vocabulary, fp32 logits are far larger than the
   activations, so the LM head runs on sequence chunks (lax.scan):
       hidden [N, T, D] -> per chunk: LM head -> fp32 logits -> log-softmax -> log p(token)
   with each chunk under `jax.checkpoint`, so the backward pass also holds one chunk's logits.
   The reductions are masked sums over the vocabulary (no gather along it), so a
   tensor-parallel vocabulary shard (`vocab` -> `tensor`) needs partial sums only.

Which hidden state predicts what: response token 0 is predicted by the prompt's last position
(prompts are left-padded, so that is column Lp - 1), token t >= 1 by response token t - 1.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from emor3_jax.models.qwen2_5_vl import DECODE, PREFILL, causal_mask, decode_mask, init_cache
from emor3_jax.processing.vision import VisionInputs


@flax.struct.dataclass
class PolicyInputs:
    """Model inputs of n responses to p distinct prompts (one micro-batch; every leaf may be
    stacked along a leading micro-batch axis, see emor3_jax/rl/update.py for how it is built).

    Prompts are left-padded to Lp; responses right-padded to T. Rows of the prompt arrays that
    no response points to are padding (mask 0). pixel_values hold the images of the prompts in
    row order (as the HF processor lays out a batch), zero-padded to vision_inputs.num_patches.
    """
    prompt_ids: jax.Array               # [p, Lp] int32
    prompt_mask: jax.Array              # [p, Lp] int32
    prompt_position_ids: jax.Array      # [3, p, Lp] int32 mRoPE (get_rope_index)
    pixel_values: jax.Array | None      # [P, patch_dim]
    vision_inputs: VisionInputs | None
    response_ids: jax.Array             # [n, T] int32 (pad id after the end)
    response_mask: jax.Array            # [n, T] int32, 1 on response tokens (EOS included)
    response_position_ids: jax.Array    # [3, n, T] int32: last prompt position + 1, + 2, ...
    prompt_index: jax.Array             # [n] int32: the prompt row each response continues


def _chunk_logprobs(head: Callable, hidden, targets, with_entropy: bool):
    """log p(targets) and entropy for one chunk: hidden [N, C, D], targets [N, C]."""
    logits = head(hidden).astype(jnp.float32)                             # [N, C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    logp = target_logit - lse
    if not with_entropy:
        return logp, jnp.zeros_like(logp)
    # H = lse - sum p * logits; a metric only: no gradient flows through it.
    logits, lse = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse)
    probs = jnp.exp(logits - lse[..., None])
    return logp, lse - jnp.sum(probs * logits, axis=-1)


def chunked_token_logprobs(head: Callable, hidden, targets, *, chunk: int,
                           with_entropy: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-token log p(targets) and entropy [N, T] (fp32) from hidden states [N, T, D].

    `head` maps hidden [..., D] -> logits [..., V] (e.g. the model's LM head). T is padded up to
    a multiple of `chunk` internally (`chunk` >= T means one chunk). Each chunk is
    rematerialized in the backward pass, so at most one [N, chunk, V] logits block is live.
    """
    n, length, _ = hidden.shape
    if targets.shape != (n, length):
        raise ValueError(f"chunked_token_logprobs: targets {targets.shape} must be [N, T] = "
                         f"{(n, length)} to match hidden {hidden.shape}")
    if chunk <= 0:
        raise ValueError(f"chunked_token_logprobs: chunk={chunk} must be positive "
                         "(config.rl.logprob_chunk)")
    chunk = min(chunk, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    one = jax.checkpoint(lambda h, t: _chunk_logprobs(head, h, t, with_entropy))
    if num_chunks == 1:
        logp, entropy = one(hidden, targets)
    else:
        split = lambda x: jnp.moveaxis(x.reshape((n, num_chunks, chunk) + x.shape[2:]), 1, 0)
        _, (logp, entropy) = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None,
                                          (split(hidden), split(targets)))
        logp, entropy = (jnp.moveaxis(x, 0, 1).reshape(n, -1) for x in (logp, entropy))
    return logp[:, :length], entropy[:, :length]


def naive_token_logprobs(head: Callable, hidden, targets) -> tuple[jax.Array, jax.Array]:
    """Reference: full [N, T, V] logits, log_softmax, gather (tests and small batches only)."""
    logp_all = jax.nn.log_softmax(head(hidden).astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, jax.lax.stop_gradient(entropy)


def _predicting_hidden(module, inputs: PolicyInputs):
    """Bound-module method: hidden states [n, T, D] that predict the response tokens.

    Prefill of the p prompts (vision tower included) -> per-layer keys/values gathered to
    the n responses -> the responses (all but the last token) through the decode path.
    """
    c = module.config
    p, lp = inputs.prompt_ids.shape
    n, t = inputs.response_ids.shape
    max_len = lp + t - 1
    cache = init_cache(c, p, max_len)
    hidden, (k, v) = module.model(inputs.prompt_ids, inputs.prompt_position_ids,
                                  causal_mask(inputs.prompt_mask),
                                  pixel_values=inputs.pixel_values,
                                  vision_inputs=inputs.vision_inputs, kv=(cache.k, cache.v),
                                  write_index=0, mode=PREFILL)
    rows = inputs.prompt_index
    first = jnp.take(hidden[:, -1], rows, axis=0)[:, None]                 # predicts token 0
    if t == 1:
        return first
    k, v = jnp.take(k, rows, axis=1), jnp.take(v, rows, axis=1)           # [layers, n, S, ..]
    tokens = inputs.response_ids[:, :-1]
    key_mask = jnp.concatenate([jnp.take(inputs.prompt_mask, rows, axis=0) != 0,
                                inputs.response_mask[:, :-1] != 0], axis=1)  # [n, max_len]
    hidden, _ = module.model(tokens, inputs.response_position_ids[:, :, :-1],
                             decode_mask(key_mask, lp), kv=(k, v), write_index=lp, mode=DECODE)
    return jnp.concatenate([first.astype(hidden.dtype), hidden], axis=1)


def response_logprobs(model, params, inputs: PolicyInputs, response_len: int | None = None, *,
                      chunk: int, with_entropy: bool = True) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies [n, T] (fp32) of the response tokens (one micro-batch).

    model: a Qwen2_5_VLForConditionalGeneration; params its (unboxed) parameters. Values at
    padded response positions are finite but meaningless: mask them with response_mask.
    response_len (optional) is only checked: T comes from inputs.response_ids.
    """
    n, t = inputs.response_ids.shape
    if response_len is not None and int(response_len) != t:
        raise ValueError(f"response_logprobs: response_len={response_len} but the responses "
                         f"have T = {t} tokens")
    if inputs.prompt_index.shape != (n,):
        raise ValueError(f"response_logprobs: prompt_index {inputs.prompt_index.shape} must be "
                         f"[n] = ({n},)")
    variables = {"params": params}
    hidden = model.apply(variables, inputs, method=_predicting_hidden)
    head = lambda h: model.apply(variables, h, method=model.logits)
    return chunked_token_logprobs(head, hidden, inputs.response_ids, chunk=chunk,
                                  with_entropy=with_entropy)
