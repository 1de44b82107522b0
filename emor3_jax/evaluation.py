"""Accuracy of the policy on held-out data sets (the boxed answer, graded as the method's reward
preset grades it: exact match for EMO-R3, mathruler's `grade_answer` for the GRPO baseline).

Validation decodes as released (temperature 0.6, top-p 0.95, one sample) or greedily; the
judge terms are not computed. With several hosts, `batches` are global (every host's shard
gathered, `Pipeline.global_iter`), so every host counts the same examples and gets the result.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from emor3_jax.processing import chat
from emor3_jax.rewards import emotion
from emor3_jax.sampling.types import SamplingSettings

log = logging.getLogger(__name__)


def sampling_settings(eval_config, ids) -> SamplingSettings:
    """One sample per prompt, greedy or at config.eval's temperature / top-p, ended, forbidden
    and padded as the tokenizer's `ids` say."""
    temperature, top_p = ((0.0, 1.0) if eval_config.greedy else
                          (float(eval_config.temperature), float(eval_config.top_p)))
    return SamplingSettings.for_ids(ids, max_new_tokens=int(eval_config.max_new_tokens),
                                    temperature=temperature, top_p=top_p)


def evaluate_dataset(generate: Callable, batches: Iterable[Mapping], tokenizer, *, preset,
                     rng, max_examples: int = 0, samples: list | None = None) -> dict:
    """generate(batch, rng) -> sampling.Samples (one per prompt). Returns counts+rates."""
    preset = emotion.get_preset(preset)
    correct = formatted = total = length = 0
    for i, batch in enumerate(batches):
        rng, key = jax.random.split(rng)
        out = generate(batch, key)
        valid = batch.row_valid
        for row in np.nonzero(valid)[0]:
            if max_examples and total >= max_examples:
                break
            text = chat.decode_response(tokenizer, out.tokens[row], int(out.lengths[row]))
            acc = preset.accuracy_fn(text, batch.label_text[row])
            correct += acc
            formatted += preset.format_fn(text)
            length += int(out.lengths[row])
            total += 1
            if samples is not None and len(samples) < 8:
                samples.append({"label": str(batch.label_text[row]), "response": text,
                                "correct": bool(acc)})
        if max_examples and total >= max_examples:
            break
    if total == 0:
        raise ValueError("evaluation: the data set yielded no valid examples (empty split?)")
    return {"accuracy": correct / total, "format": formatted / total,
            "response_length": length / total, "examples": int(total)}


# --------------------------------------------------------------------------------------------
# The validation score that picks the best checkpoint.

def validation_sets(in_domain: Sequence[str], evaluated: Sequence[str], train_set: str
                    ) -> tuple[str, ...]:
    """The evaluated data sets the validation score averages: those of `data.in_domain`; if
    none of them is evaluated, the training set's; if that is not evaluated either, all."""
    evaluated = tuple(evaluated)
    chosen = tuple(n for n in in_domain if n in evaluated)
    if not chosen:
        chosen = (train_set,) if train_set in evaluated else evaluated
        log.warning("validation score: no data.in_domain set %s is in data.eval %s; the best "
                    "checkpoint is picked by the mean accuracy on %s", tuple(in_domain),
                    evaluated, chosen)
    elif train_set not in chosen:
        log.warning("validation score: the training set %s is not in data.in_domain %s; the "
                    "best checkpoint is picked by the accuracy on %s (set data.in_domain to the "
                    "training set for the paper's setting)", train_set, tuple(in_domain), chosen)
    return chosen


def validation_score(accuracy: Mapping[str, float], sets: Sequence[str]) -> float:
    """Mean accuracy over the in-domain eval sets `sets`: what picks the best checkpoint.

    The release keeps the checkpoint with the best validation reward. At validation the judge
    terms are not computed and count as 1, so that reward is `w_acc * accuracy + w_fmt *
    format + constant` (0.8 and 0.1 for `emor3`): accuracy dominates it, and format adds a
    little only when the answers get no more right. We track the in-domain accuracy itself:
    it is the number the paper reports (Table 1's ^I cells), it is the same criterion for every
    reward preset and baseline (a method with another reward or format regex is not favoured
    by its own format term), and the out-of-domain sets stay held out (selecting on them would
    leak the test sets of the generalization columns into the choice of checkpoint).
    """
    missing = [n for n in sets if n not in accuracy]
    if missing or not sets:
        raise ValueError(f"validation score: no accuracy for {missing or 'any set'} among "
                         f"{sorted(accuracy)}")
    return float(np.mean([float(accuracy[n]) for n in sets]))
