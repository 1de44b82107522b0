"""The sampler's jitted programs: prefill, shared-prefix prefill, decode and score.

Their bodies hold no host logic, so what is traced (and recompiled) is visible in one place;
settings that change a program's shape are fields of the frozen `DecodeSettings` (a static jit
argument), everything else (temperature, top-p, max_new_tokens, EOS ids...) is traced.
`CompiledProgram` compiles each argument layout once ahead of running it, so its memory can be
checked first (memory.py) and the same executable then runs.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from emor3_jax import sharding as shd
from emor3_jax.models import layers, qwen2_5_vl
from emor3_jax.sampling import grouped_decode, rules
from emor3_jax.sampling.packing import ContinuationTrie


# Logical axes of the prefill program's host inputs (how `prefill_chunks` places them).
PREFILL_AXES = {"input_ids": ("batch", None), "attention_mask": ("batch", None),
                "position_ids": (None, "batch", None), "next_pos": ("batch",),
                "row_valid": ("batch",), "pixel_values": (None, None),
                "image_slot": ("batch", None)}


@flax.struct.dataclass
class PromptState:
    """A prefilled chunk of prompts: what the decode and score programs start from. They take
    it donated and hand it back unchanged, so more continuations of the same prompts (e.g.
    resampling) need no second prefill. With shared prefixes, prompt_* hold the B prefixes and
    suffix_* the R = B*M prompts' own suffixes (grouped_decode's suffix level); the per-prompt
    fields then have R rows (else R = B)."""
    prompt_k: tuple[jax.Array, ...]   # per layer [B, K, D, Lp] (grouped_decode layout)
    prompt_v: tuple[jax.Array, ...]   # per layer [B, K, Lp, D]
    prompt_mask: jax.Array            # [B, Lp] bool
    logits: jax.Array                 # [R, V] fp32 next-token logits after each prompt
    next_pos: jax.Array               # [R] int32 mRoPE position of the first generated token
    row_valid: jax.Array              # [R] bool (False on rows that only pad the chunk)
    suffix_k: tuple[jax.Array, ...] = ()      # per layer [R, K, D, Ls]; () = no shared prefix
    suffix_v: tuple[jax.Array, ...] = ()      # per layer [R, K, Ls, D]
    suffix_mask: jax.Array | None = None      # [R, Ls] bool


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """The decode program's static settings: each distinct value is its own program."""
    group: int          # continuations per prompt (G)
    new_tokens: int     # generated-token buffer (the max_new_tokens bucket)
    top_k: int          # 0 = off
    window: int = 0     # this program decodes steps < window, attending to the first window
    #                     gen slots (0 = new_tokens; `decode_windows`)
    nucleus: bool = True  # top-p may truncate (False: top_p is 1, no sort traced; rules.py)


# Each decode window holds 4x the gen slots of the one before: a step reads at most 4x the
# slots written so far, and a 2,048-token buffer compiles 3 decode programs (128, 512, 2048).
WINDOW_FACTOR = 4


def decode_windows(new_tokens: int, first: int) -> tuple[int, ...]:
    """The decode programs of a `new_tokens` buffer, by the gen slots their attention reads:
    first, 4 x first, ... up to new_tokens (0: one window). Attention over every slot of the
    buffer at every step read the whole cache however few tokens were written (at 300-token
    responses in a 2,048-slot buffer, half the bytes of the v4 rollout's decode step); each
    window is its own program, and one whose rows have all ended returns at once."""
    windows, w = [], first
    while 0 < w < new_tokens:
        windows.append(w)
        w *= WINDOW_FACTOR
    return tuple(windows) + (new_tokens,)


@flax.struct.dataclass
class DecodeCarry:
    """What one decode window hands the next (donated): the gen-token cache and the rows'
    tokens so far. `step` is the next step to take (1 after the prefill's token)."""
    step: jax.Array                   # int32 scalar
    gen_k: tuple[jax.Array, ...]      # per layer [B*G, K, D, T] (grouped_decode layout)
    gen_v: tuple[jax.Array, ...]      # per layer [B*G, K, T, D]
    tok: jax.Array                    # [B*G] int32 the last token of every row
    tokens: jax.Array                 # [B*G, T] int32
    logprobs: jax.Array               # [B*G, T] fp32
    lengths: jax.Array                # [B*G] int32
    done: jax.Array                   # [B*G] bool


def spec(names, shape, mesh) -> P:
    """The PartitionSpec of logical axis `names` for an array of `shape` on `mesh`."""
    return shd._fit_spec(shd.logical_to_spec(names, shd.SAMPLING_RULES), shape, mesh)


class SamplerPrograms:
    """The program bodies for one model and mesh; `compiled` counts traces per program."""

    def __init__(self, model, mesh=None):
        self.model = model
        self.config = model.config
        self.mesh = mesh
        self.compiled = collections.Counter()     # program kind -> traces (= compilations)

    def _constrain(self, x, names):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, spec(names, x.shape, self.mesh)))

    def _logits(self, params, hidden):
        """fp32 logits [rows, V] of final-norm hidden states [rows, D]: every row on every
        device (a few MB), each device's vocabulary slice of the sampling copy's LM head
        (`sharding.SAMPLING_RULES`), then `_choose` moves rows to their devices."""
        hidden = self._constrain(hidden, (None, None))
        logits = self.model.apply({"params": params}, hidden, method=lambda m, h: m.logits(h))
        return self._constrain(logits, (None, "vocab"))

    def prefill(self, params, input_ids, attention_mask, position_ids, next_pos, row_valid,
                pixel_values, vision_inputs, image_slot):
        """Vision tower once per distinct image, prompt forward once per prompt (B rows)."""
        self.compiled["prefill"] += 1
        return self._prefill_state(params, input_ids, attention_mask, position_ids, next_pos,
                                   row_valid, pixel_values, vision_inputs, image_slot)

    def prefill_shared(self, params, prefix, suffix_ids, suffix_mask, suffix_positions,
                       next_pos, row_valid):
        """share_prefix: the B prefixes (prefix: the prefill arguments, vision included), then
        their M suffixes each (suffix_ids [B*M, Ls], left-padded) in one multi-token call over
        the prefixes' cache -> the state of the B*M whole prompts. One program, so a shared
        chunk compiles as many programs as an unshared one."""
        self.compiled["prefill_shared"] += 1
        state = self._prefill_state(params, *prefix)
        return self._prefill_suffix(params, state, suffix_ids, suffix_mask, suffix_positions,
                                    next_pos, row_valid)

    def _prefill_state(self, params, input_ids, attention_mask, position_ids, next_pos,
                       row_valid, pixel_values, vision_inputs, image_slot) -> PromptState:
        model = self.model
        params = jax.lax.stop_gradient(params)
        b, length = input_ids.shape

        def forward(m, ids, mask, pos, pv, vin, slot):
            # = Qwen2_5_VLForConditionalGeneration.prefill, except that image-token positions
            # gather their merged vision token by index (`slot`), so prompts can share images
            embeds = m.model.language_model.embed(ids)
            if pv is not None:
                image = m.model.visual(pv, vin).astype(embeds.dtype)        # [P/4, D]
                picked = jnp.take(image, jnp.maximum(slot, 0), axis=0)
                embeds = jnp.where((slot >= 0)[..., None], picked, embeds)
            cache = qwen2_5_vl.init_cache(m.config, b, length)
            hidden, (k, v) = m.model.language_model(
                embeds, pos, qwen2_5_vl.causal_mask(mask), kv=(cache.k, cache.v),
                write_index=0, mode=qwen2_5_vl.PREFILL)
            return m.logits(hidden[:, -1]), qwen2_5_vl.KVCache(k=k, v=v, key_mask=mask != 0)

        with layers.kernel_mesh(self.mesh):
            logits, cache = model.apply({"params": params}, input_ids, attention_mask,
                                        position_ids, pixel_values, vision_inputs, image_slot,
                                        method=forward)
        prompt_k, prompt_v = grouped_decode.prompt_part(cache)
        kv = grouped_decode.logical_axes()
        return PromptState(prompt_k=tuple(self._constrain(x, kv) for x in prompt_k),
                           prompt_v=tuple(self._constrain(x, kv) for x in prompt_v),
                           prompt_mask=cache.key_mask, logits=logits.astype(jnp.float32),
                           next_pos=next_pos, row_valid=row_valid)

    def _prefill_suffix(self, params, state: PromptState, input_ids, attention_mask,
                        positions, next_pos, row_valid) -> PromptState:
        """The suffixes as S = Ls new tokens per row over the prefixes (grouped_decode),
        left padding masked per row; their k/v become the state's suffix level."""
        model = self.model
        params = jax.lax.stop_gradient(params)
        n, length = input_ids.shape
        cache = self._grouped_cache(state, n // state.prompt_k[0].shape[0], length)
        key_mask = attention_mask != 0
        hidden, cache = grouped_decode.decode_hidden(model, params, self._per_layer(params),
                                                     input_ids, positions, cache, 0,
                                                     gen_mask=key_mask,
                                                     constrain=self._constrain)
        logits = model.apply({"params": params}, hidden[:, -1], method=lambda m, h: m.logits(h))
        return PromptState(prompt_k=state.prompt_k, prompt_v=state.prompt_v,
                           prompt_mask=state.prompt_mask, logits=logits.astype(jnp.float32),
                           next_pos=next_pos, row_valid=row_valid, suffix_k=cache.gen_k,
                           suffix_v=cache.gen_v, suffix_mask=key_mask)

    def _grouped_cache(self, state: PromptState, group: int, slots: int):
        cache = grouped_decode.with_empty_gen(state.prompt_k, state.prompt_v, state.prompt_mask,
                                              group, slots, state.suffix_k, state.suffix_v,
                                              state.suffix_mask)
        kv = grouped_decode.logical_axes()
        return cache.replace(gen_k=tuple(self._constrain(x, kv) for x in cache.gen_k),
                             gen_v=tuple(self._constrain(x, kv) for x in cache.gen_v))

    def _per_layer(self, params):
        return grouped_decode.split_layers(params["model"]["language_model"]["layers"],
                                           self.config.text.num_hidden_layers)

    def _choose(self, rng, row_ids, step, logits, allowed, temperature, top_p,
                settings: DecodeSettings):
        step_key = jax.random.fold_in(rng, step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, row_ids)
        # Whole vocabulary rows per device: the draw's cumsum over a `tensor`-sharded
        # vocabulary is partitioned pathologically (151k ids on a 2 x 4 CPU mesh: 35 s per
        # step instead of 0.1 s); gathering the [rows, V] logits is cheap.
        logits = self._constrain(logits, ("batch", None))
        return rules.next_tokens(keys, logits, allowed, temperature, top_p, settings.top_k,
                                 settings.nucleus)

    @staticmethod
    def _record(c: DecodeCarry, tok, lp, eos_ids, pad_id) -> DecodeCarry:
        """Write step c.step's tokens (pad on rows already ended) and move on."""
        alive = ~c.done
        tok = jnp.where(alive, tok, pad_id)
        lp = jnp.where(alive, lp, 0.0)
        return c.replace(
            step=c.step + 1, tok=tok,
            tokens=jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.step)),
            logprobs=jax.lax.dynamic_update_slice(c.logprobs, lp[:, None], (0, c.step)),
            lengths=c.lengths + alive.astype(jnp.int32),
            done=c.done | (tok[:, None] == eos_ids[None, :]).any(-1))

    def decode_start(self, state: PromptState, rng, temperature, top_p, eos_ids, pad_id,
                     allowed, row_ids, *, settings: DecodeSettings):
        """The decode's empty cache and output buffers, and every row's first token drawn from
        its prompt's logits -> (state, carry for the first window). Its own program, so the
        windows' loops are all that they hold (XLA's bytes per call are then per step)."""
        self.compiled["decode_start"] += 1
        group, t_max = settings.group, settings.new_tokens
        empty = self._grouped_cache(state, group, t_max)
        n_rows = empty.gen_k[0].shape[0]
        carry = DecodeCarry(step=jnp.int32(0), gen_k=empty.gen_k, gen_v=empty.gen_v,
                            tok=jnp.zeros((n_rows,), jnp.int32),
                            tokens=jnp.full((n_rows, t_max), pad_id, jnp.int32),
                            logprobs=jnp.zeros((n_rows, t_max), jnp.float32),
                            lengths=jnp.zeros((n_rows,), jnp.int32),
                            done=~jnp.repeat(state.row_valid, group))
        tok, lp = self._choose(rng, row_ids, 0, jnp.repeat(state.logits, group, axis=0),
                               allowed, temperature, top_p, settings)
        return state, self._record(carry, tok, lp, eos_ids, pad_id)

    def decode(self, params, state: PromptState, carry: DecodeCarry, rng, temperature, top_p,
               max_new_tokens, eos_ids, pad_id, allowed, row_ids, *, settings: DecodeSettings):
        """Decode steps up to settings.window, attending to that many gen slots, from `carry`
        (`decode_start`'s or the previous window's) -> (state, carry). row_ids
        [rows * group] int32: each row's random stream (fold_in of the step key)."""
        self.compiled["decode"] += 1
        model, group = self.model, settings.group
        window = settings.window or settings.new_tokens
        params = jax.lax.stop_gradient(params)
        positions = jnp.repeat(state.next_pos, group)
        per_layer = self._per_layer(params)
        stop = jnp.minimum(jnp.minimum(max_new_tokens, settings.new_tokens), window)

        def cond(c: DecodeCarry):
            return (c.step < stop) & ~c.done.all()

        def body(c: DecodeCarry):
            cache = grouped_decode.GroupedCache(
                prompt_k=state.prompt_k, prompt_v=state.prompt_v, prompt_mask=state.prompt_mask,
                gen_k=c.gen_k, gen_v=c.gen_v, suffix_k=state.suffix_k, suffix_v=state.suffix_v,
                suffix_mask=state.suffix_mask)
            hidden, cache = grouped_decode.decode_hidden(
                model, params, per_layer, c.tok[:, None], (positions + c.step - 1)[:, None],
                cache, c.step - 1, window=window, constrain=self._constrain)
            logits = self._logits(params, hidden[:, 0])
            tok, lp = self._choose(rng, row_ids, c.step, logits, allowed, temperature, top_p,
                                   settings)
            return self._record(c.replace(gen_k=cache.gen_k, gen_v=cache.gen_v), tok, lp,
                                eos_ids, pad_id)

        return state, jax.lax.while_loop(cond, body, carry)

    def score(self, params, state: PromptState, trie: ContinuationTrie, temperature):
        """log p(continuation c | prompt r) [R, C]: token log-probs under the full softmax of
        logits / temperature (a traced scalar: one program for every temperature). The
        continuations' proper prefixes are the trie's S nodes, fed in ONE multi-token call per
        prompt, each node seeing its ancestors (a token tree: the C candidates share their
        common prefixes and the prompt)."""
        self.compiled["score"] += 1
        model = self.model
        params = jax.lax.stop_gradient(params)
        inv_t = 1.0 / temperature
        first = jax.nn.log_softmax(state.logits * inv_t, -1)[:, trie.first]          # [R, C]
        n_rows, n_nodes = state.logits.shape[0], trie.nodes.shape[0]
        if n_nodes == 0:                                 # every continuation is one token
            return state, first
        cache = self._grouped_cache(state, 1, n_nodes)
        tokens = jnp.broadcast_to(trie.nodes, (n_rows, n_nodes))
        positions = state.next_pos[:, None] + trie.depth[None, :]
        hidden, _ = grouped_decode.decode_hidden(model, params, self._per_layer(params),
                                                 tokens, positions, cache, 0,
                                                 gen_valid=trie.visible,
                                                 constrain=self._constrain)
        logits = model.apply({"params": params}, hidden, method=lambda m, h: m.logits(h))
        logits = logits.astype(jnp.float32) * inv_t                                  # [R, S, V]
        lse = jax.nn.logsumexp(logits, -1)                                           # [R, S]
        rest = logits[:, trie.node_of, trie.target] - lse[:, trie.node_of]           # [R, C, W]
        return state, first + jnp.where(trie.used, rest, 0.0).sum(-1)


def _layout(tree) -> tuple:
    """What an executable is compiled for: the tree's structure and each leaf's type and
    placement (the shapes alone would let a differently sharded argument through)."""
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


class CompiledProgram:
    """A jitted program run through executables compiled ahead, one per argument layout.

    `check(name, executable, args, kwargs)` sees each executable before it first runs (the
    sampler's memory check); the same executable then runs, so checking costs no second
    compilation. `trace` is the jitted function's (AOT)."""

    def __init__(self, fn: Callable, name: str, check: Callable, *,
                 static_argnames: tuple[str, ...] = (), donate_argnames: tuple[str, ...] = ()):
        self.name, self.check, self.static = name, check, static_argnames
        self.jitted = jax.jit(fn, static_argnames=static_argnames,
                              donate_argnames=donate_argnames)
        self.executables: dict = {}

    def trace(self, *args, **kwargs):
        return self.jitted.trace(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
        key = (_layout((args, dynamic)),
               tuple((k, kwargs[k]) for k in self.static if k in kwargs))
        executable = self.executables.get(key)
        if executable is None:
            executable = self.jitted.trace(*args, **kwargs).lower().compile()
            self.check(self.name, executable, args, kwargs)
            self.executables[key] = executable
        return executable(*args, **dynamic)
