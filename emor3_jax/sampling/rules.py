"""Next-token rules in fp32: greedy, temperature, top-k, top-p; log-probs of the chosen tokens.

Order as in transformers / vLLM: disallowed ids (vision special tokens, ids beyond the
tokenizer) are removed, logits are divided by the temperature, then top-k, then top-p on the
renormalised remainder, then one categorical draw by inverse CDF (one uniform number per row
instead of V Gumbel draws; the CDF summed in two levels, `categorical_inverse_cdf`).
`temperature == 0` means greedy (argmax of the allowed logits). Temperature and top-p are
traced values (changing them never recompiles); top-k is static (it sets a `lax.top_k` shape),
and so is whether top-p is on at all (`nucleus`): a program that never truncates (the rollout's
top_p = 1) holds no vocabulary sort, which XLA's TPU cost analysis counts at 3.6 GiB per decode
step of a v4-8 rollout chunk even inside a branch never taken.

The returned log-prob is that of the chosen token under the policy's own distribution,
`log_softmax(logits)` over the full vocabulary, before the mask, temperature and truncation:
what GRPO's old log-probs must be (the trainer recomputes the same quantity).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


def allowed_mask(vocab_size: int, forbidden_ids=(), valid_vocab_size: int | None = None
                 ) -> np.ndarray:
    """[V] bool on the host: False for forbidden ids and for ids >= valid_vocab_size."""
    allowed = np.ones((vocab_size,), bool)
    bad = [int(i) for i in forbidden_ids]
    out_of_range = [i for i in bad if not 0 <= i < vocab_size]
    if out_of_range:
        raise ValueError(f"forbidden_token_ids {out_of_range} are outside the model vocabulary "
                         f"[0, {vocab_size})")
    allowed[bad] = False
    if valid_vocab_size is not None:
        if not 0 < valid_vocab_size <= vocab_size:
            raise ValueError(f"valid_vocab_size={valid_vocab_size} must be in (0, {vocab_size}]")
        allowed[valid_vocab_size:] = False
    if not allowed.any():
        raise ValueError("every token id is forbidden; nothing can be sampled")
    return allowed


def top_k_filter(logits, top_k: int):
    """Keep the top_k largest logits per row (ties with the k-th kept), -inf elsewhere."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus).

    A token is kept iff the probability of the tokens strictly more likely than it is
    < top_p (the most likely token is always kept); equal probabilities are kept together.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    desc = -jnp.sort(-probs, axis=-1)
    before = jnp.cumsum(desc, axis=-1) - desc                  # mass strictly above each token
    n_keep = jnp.maximum((before < top_p).sum(-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where(probs < threshold, NEG_INF, logits)


def processed_logits(logits, allowed, temperature, top_p, top_k: int = 0,
                     nucleus: bool = True):
    """The logits a draw is taken from: masked, / temperature, top-k, then top-p (fp32).
    nucleus=False: top-p is known to be 1 (static), and its branch is not traced."""
    x = jnp.where(allowed, logits.astype(jnp.float32), NEG_INF) / temperature
    x = top_k_filter(x, top_k)
    if not nucleus:
        return x
    return jax.lax.cond(top_p < 1.0, top_p_filter, lambda x, _: x, x, top_p)


# Vocabulary ids per block of the two-level draw: a row's CDF is summed per block, and only the
# block the uniform number falls in is summed token by token.
DRAW_BLOCK = 128


def categorical_inverse_cdf(key_rows, logits, block: int = DRAW_BLOCK):
    """One draw per row from softmax(logits) ([N, V], -inf = excluded) with one uniform each:
    the first token whose cumulative probability exceeds it.

    In two levels: the probability of each block of `block` ids, their cumulative sums, the
    block the uniform number falls in, then the cumulative sums inside that block only. On a
    v4-8 rollout chunk (128 rows per chip) the draw moved 519 MiB of HBM per decode step with
    one whole-vocabulary cumsum (XLA wrote and re-tiled [N, V] fp32 arrays five times) and
    371 MiB so (it still writes the probabilities once and re-tiles them for the block sums;
    `aot.hlo.loop_hbm_bytes`). The same token as the whole-vocabulary cumsum up to fp32
    rounding of the sums (a uniform number within ~1e-7 of a boundary between two tokens)."""
    n, v = logits.shape
    nb = -(-v // block)
    m = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - m)                            # as jax.nn.softmax
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    blocks = jnp.pad(unnormalized / total, ((0, 0), (0, nb * block - v))).reshape(n, nb, block)
    block_p = blocks.sum(-1)                                                    # [N, nb]
    block_cdf = jnp.cumsum(block_p, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(key_rows) * block_cdf[:, -1]
    # the uniform number can round up to the total: then the last block with probability
    last_block = jnp.where(block_p > 0, jnp.arange(nb), 0).max(-1)
    j = jnp.minimum((block_cdf <= u[:, None]).sum(-1), last_block)              # [N]
    before = jnp.where(j > 0, jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None],
                                                  axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]         # [N, block]
    index = (before[:, None] + jnp.cumsum(inner, axis=-1) <= u[:, None]).sum(-1)
    # ... and inside that block, its last token with probability
    last = jnp.where(inner > 0, jnp.arange(block), 0).max(-1)
    return (j * block + jnp.minimum(index, last)).astype(jnp.int32)


def chosen_logprobs(logits, tokens):
    """log_softmax(logits)[n, tokens[n]] ([N, V] fp32, [N]) without the [N, V] log-softmax:
    the same operations as jax.nn.log_softmax on the chosen logit only."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))
    return ((jnp.take_along_axis(logits, tokens[:, None], axis=-1) - m) - lse)[:, 0]


def next_tokens(keys, logits, allowed, temperature, top_p, top_k: int = 0,
                nucleus: bool = True):
    """Choose one token per row -> (tokens [N] int32, policy log-probs [N] fp32).

    keys: [N] PRNG keys (one per row, so a row's draw does not depend on the batch it is in);
    logits [N, V] (any float dtype; computed in fp32); allowed [V] bool; nucleus: as in
    `processed_logits` (False only where top_p is 1).
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def greedy(_):
        return jnp.argmax(jnp.where(allowed, logits, NEG_INF), axis=-1)

    def sample(_):
        x = processed_logits(logits, allowed, jnp.maximum(temperature, 1e-6), top_p, top_k,
                             nucleus)
        return categorical_inverse_cdf(keys, x)

    tokens = jax.lax.cond(temperature > 0.0, sample, greedy, None).astype(jnp.int32)
    return tokens, chosen_logprobs(logits, tokens)
