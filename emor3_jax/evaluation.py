"""Accuracy of the policy on held-out data sets (exact match of the boxed answer).

Validation decodes as released (temperature 0.6, top-p 0.95, one sample) or greedily; the
judge terms are not computed. With several hosts, `batches` are global (every host's shard
gathered, `Pipeline.global_iter`), so every host counts the same examples and gets the result.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from emor3_jax.processing import chat
from emor3_jax.rewards import emotion

log = logging.getLogger(__name__)


def sampling_kwargs(eval_config) -> dict:
    if eval_config.greedy:
        return dict(temperature=0.0, top_p=1.0)
    return dict(temperature=float(eval_config.temperature), top_p=float(eval_config.top_p))


def evaluate_dataset(generate: Callable, batches: Iterable[Mapping], tokenizer, *, preset,
                     max_new_tokens: int, rng, eval_config, max_examples: int = 0,
                     samples: list | None = None) -> dict:
    """generate(batch, rng, max_new_tokens, **sampling) -> SampleOutput. Returns counts+rates."""
    preset = emotion.get_preset(preset)
    correct = formatted = total = length = 0
    for i, batch in enumerate(batches):
        rng, key = jax.random.split(rng)
        out = generate(batch, key, max_new_tokens, **sampling_kwargs(eval_config))
        valid = np.asarray(batch["valid"], bool)
        for row in np.nonzero(valid)[0]:
            if max_examples and total >= max_examples:
                break
            text = chat.decode_response(tokenizer, out.tokens[row], int(out.lengths[row]))
            acc = emotion.accuracy_reward(text, batch["label_text"][row])
            correct += acc
            formatted += preset.format_fn(text)
            length += int(out.lengths[row])
            total += 1
            if samples is not None and len(samples) < 8:
                samples.append({"label": str(batch["label_text"][row]), "response": text,
                                "correct": bool(acc)})
        if max_examples and total >= max_examples:
            break
    if total == 0:
        raise ValueError("evaluation: the data set yielded no valid examples (empty split?)")
    return {"accuracy": correct / total, "format": formatted / total,
            "response_length": length / total, "examples": int(total)}
