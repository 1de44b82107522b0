"""Grouped sampling with a KV cache (prefill once per prompt, G samples, decode inside jit).

    from emor3_jax.sampling import Prompts, Sampler, SamplingSettings
    sampler = Sampler(model, mesh=mesh)     # keeps its compiled programs for repeated calls
    res = sampler.generate(params, Prompts(input_ids, attention_mask, pixel_values,
                                           image_grid_thw),
                           SamplingSettings(max_new_tokens=..., num_samples=G, temperature=...,
                                            top_p=..., top_k=..., eos_token_ids=(...)), rng=key)
    res.tokens [B*G, T], res.logprobs [B*G, T], res.lengths [B*G]   (rows b*G + g)

`sampler.py` documents the flow, `types.py` the boundary, `packing.py` the host side,
`programs.py` the jitted programs, `memory.py` the fit check, `grouped_decode.py` the KV-cache
layout, `rules.py` the next-token rules.
"""
from emor3_jax.sampling.grouped_decode import GroupedCache  # noqa: F401
from emor3_jax.sampling.rules import allowed_mask, next_tokens, processed_logits  # noqa: F401
from emor3_jax.sampling.sampler import (ContinuationTrie, Sampler,  # noqa: F401
                                        SamplerBuckets, SamplerMemoryError, as_prompts,
                                        continuation_trie, decode_windows, generate,
                                        geometric_buckets)
from emor3_jax.sampling.types import Prompts, Samples, SamplingSettings  # noqa: F401
