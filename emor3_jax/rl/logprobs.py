"""Per-token log-probs (and entropies) of GRPO responses: shared prompts, chunked LM head.

Two savings over "one [N, Lp + T] forward pass per response":

1. **The prompt runs once per distinct prompt**, not once per response. The G responses of a
   prompt continue the same prompt tokens and the same image, and causal attention means the
   prompt's hidden states and keys/values do not depend on the response. So the prompt (vision
   tower included) runs once, and prompts and responses go through the decoder together, one
   layer at a time (`TextModel.prompt_and_responses`): in each layer the prompts run as a
   prefill, that layer's keys/values are gathered to the responses that continue them
   (`prompt_index`), and the responses run as a decode step attending to [prompt keys/values,
   their own]. The backward pass sums the G responses' gradients into the one prompt
   computation. Same values and gradients as the full forward (tested), with the prompt's
   share of the compute divided by the number of responses per prompt in a micro-batch
   (EasyR1 runs prompt and vision tower per response). One scan rather than a prefill pass
   and a decode pass: each layer's weights serve both in one step, so the backward pass builds
   one stacked fp32 gradient of the layers, not one per pass (3.1 GiB per chip for
   Qwen2.5-VL-3B on a v4-8), and no [layers, rows, Lp + T, ...] key/value stack exists.

2. **No [N, T, V] logits**: with Qwen's 151k vocabulary, fp32 logits are far larger than the
   activations, so the LM head runs on sequence chunks (lax.scan):
       hidden [N, T, D] -> per chunk: LM head -> fp32 logits -> log-softmax -> log p(token)
   with each chunk under `jax.checkpoint`, so the backward pass also holds one chunk's logits.
   The reductions are masked sums over the vocabulary (no gather along it), so a vocabulary
   split across devices needs partial sums only: under a mesh the head is vocabulary-parallel
   over every device (`vocab_parallel_head_params`), each device holding all rows' logits
   over its slice of the vocabulary.

Which hidden state predicts what: response token 0 is predicted by the prompt's last position
(prompts are left-padded, so that is column Lp - 1), token t >= 1 by response token t - 1.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from emor3_jax.models.layers import ALL_DEVICES, constrain
from emor3_jax.models.qwen2_5_vl import causal_mask, decode_mask
from emor3_jax.processing.vision import VisionInputs


@flax.struct.dataclass
class PolicyInputs:
    """Model inputs of n responses to p distinct prompts (one micro-batch; every leaf may be
    stacked along a leading micro-batch axis, see emor3_jax/rl/batching.py for how it is built).

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
    # vocabulary-parallel LM head (see vocab_parallel_head_params): every device sees the
    # chunk's rows and its own slice of the vocabulary
    hidden = constrain(hidden, (None, None, None))
    logits = constrain(head(hidden).astype(jnp.float32), (None, None, ALL_DEVICES))
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    logp = target_logit - lse
    rows = lambda x: constrain(x, ("batch", "length"))          # back to the rows' devices
    if not with_entropy:
        return rows(logp), jnp.zeros_like(rows(logp))
    # H = lse - sum p * logits; a metric only: no gradient flows through it.
    logits, lse = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse)
    probs = jnp.exp(logits - lse[..., None])
    return rows(logp), rows(lse - jnp.sum(probs * logits, axis=-1))


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
        split = lambda x: constrain(
            jnp.moveaxis(x.reshape((n, num_chunks, chunk) + x.shape[2:]), 1, 0),
            (None, "batch", "length", None)[:x.ndim + 1])
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


def _replace_leaf(tree, path, value):
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace_leaf(tree[path[0]], path[1:], value)
    return out


def vocab_parallel_head_params(model, params):
    """`params` with the LM head's weight in the compute dtype and split along the vocabulary
    over every device, when tracing under a mesh (`layers.kernel_mesh`): with the chunk's
    hidden states on every device and its logits split likewise (`_chunk_logprobs`), each
    device computes all rows' logits over its slice of the vocabulary.

    The weight is stored FSDP-sharded along `embed`, the head's contraction dimension. Left to
    itself, XLA contracted that sharded dimension: every device computed partial logits of
    *all* rows of a chunk, summed them across devices, and in the backward pass gathered the
    fp32 logit cotangents of all rows: [rows, chunk, V] fp32 on every device (2.3 GiB per
    8 x 512 chunk with Qwen's 151,936-token vocabulary, several alive at once). Gathering the
    weight instead (0.6 GiB bf16 for Qwen2.5-VL-3B) costs its whole fp32 gradient on every
    device. Split along the vocabulary, a device holds 1/devices of the weight, of the logits
    and of the weight's gradient, and moves only the chunk's hidden states (rows x chunk x D)
    and the softmax statistics; the weight's gradient is complete on its device (every row is
    there), as in the one-device computation. Same values (the cast is the one `model.logits`
    does).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return params
    c = model.config
    if c.tie_word_embeddings:
        path, names = ("model", "language_model", "embed_tokens", "embedding"), \
            (ALL_DEVICES, None)
    else:
        path, names = ("lm_head", "kernel"), (None, ALL_DEVICES)
    w = params
    for key in path:
        w = w[key]
    return _replace_leaf(params, path, constrain(w.astype(c.compute_dtype), names))


def _predicting_hidden(module, inputs: PolicyInputs):
    """Bound-module method: hidden states [n, T, D] that predict the response tokens.

    The p prompts (vision tower included) and the responses (all but the last token) go
    through the decoder together, layer by layer (`TextModel.prompt_and_responses`): in each
    layer the prompts run as a prefill, their keys/values are gathered to the n responses
    that continue them, and the responses run as a decode step against them.
    """
    lp, t = inputs.prompt_ids.shape[1], inputs.response_ids.shape[1]
    rows = inputs.prompt_index
    prompt_embeds = module.model.embed(inputs.prompt_ids, inputs.pixel_values,
                                       inputs.vision_inputs)
    if t == 1:
        hidden, _ = module.model.language_model(prompt_embeds, inputs.prompt_position_ids,
                                                causal_mask(inputs.prompt_mask))
        return jnp.take(hidden[:, -1], rows, axis=0)[:, None]             # predicts token 0
    key_mask = jnp.concatenate([jnp.take(inputs.prompt_mask, rows, axis=0) != 0,
                                inputs.response_mask[:, :-1] != 0], axis=1)  # [n, Lp + T - 1]
    prompt_hidden, hidden = module.model.language_model.prompt_and_responses(
        prompt_embeds, inputs.prompt_position_ids, causal_mask(inputs.prompt_mask),
        module.model.embed(inputs.response_ids[:, :-1]), inputs.response_position_ids[:, :, :-1],
        decode_mask(key_mask, lp), rows)
    first = jnp.take(prompt_hidden[:, -1], rows, axis=0)[:, None]          # predicts token 0
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
    # inside the chunk (so under its checkpoint and scan): the weight is cast and gathered per
    # chunk and its fp32 cotangent accumulates over the chunks
    head = lambda h: model.apply({"params": vocab_parallel_head_params(model, params)}, h,
                                 method=model.logits)
    return chunked_token_logprobs(head, hidden, inputs.response_ids, chunk=chunk,
                                  with_entropy=with_entropy)
