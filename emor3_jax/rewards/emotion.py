"""Rule-based EMO-R3 rewards: format, accuracy, judge prompts/scores and their combinations.

Everything here runs on the host over decoded response strings (docs/method.md, "Rewards"). The
semantics follow the authors' released EasyR1 fork; where this module chooses something the
release leaves open or does differently (valence/arousal word detection, white-space-only judge
answers) the function's docstring says so.

Two views of one response are used, as in the release:
  * format, accuracy, think-format and valence/arousal read the *white-space-normalized*
    response (`\\s*(<|>|/)\\s*` -> the bracket), so `< step1 >` counts as `<step1>`;
  * the judge spans (coherence, consistency) are cut from the *raw* decoded response, so
    `< step1 >` there means "no span" and the judge gets the `Answer 'None'` prompt.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from emor3_jax import recipe

# --------------------------------------------------------------------------------------------
# Patterns (all from docs/method.md / the released reward functions).
_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_SET_FORMAT = re.compile(
    r"<step1>.*</step1>.*<step2>.*</step2>.*<step3>.*</step3>.*\\boxed\{.*\}.*", re.DOTALL)
_THINK_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
# Coherence: `<step1>` through the first following `</step2>`, tags included.
_COHERENCE_SPAN = re.compile(r"<step1>.*?</step2>", re.DOTALL)
# Consistency: `<step1>` (tag included, as the release's `(<step1>.*?)(?=<step2>)`) up to, not
# including, the first following `<step2>`.
_CONSISTENCY_SPAN = re.compile(r"<step1>.*?(?=<step2>)", re.DOTALL)
_STEP3 = re.compile(r"<step3>(.*?)</step3>", re.DOTALL)
_BOXED_OPEN = "\\boxed{"

_POLARITY_WORDS = {"positive": re.compile(r"\bpositive\b", re.IGNORECASE),
                   "negative": re.compile(r"\bnegative\b", re.IGNORECASE)}
_AROUSAL_WORDS = {"high": re.compile(r"\bhigh\b", re.IGNORECASE),
                  "low": re.compile(r"\blow\b", re.IGNORECASE)}

# Value a judge term takes when it is not computed (validation, as released: rethink_score = 1).
JUDGE_SKIPPED = 1.0


# --------------------------------------------------------------------------------------------
# Single-response rules.
def normalize_tags(response: str) -> str:
    """Delete white space around `<`, `>` and `/` (the release's fix for `< step1 >`-style tags)."""
    return _TAG_SPACE.sub(r"\1", response)


def format_reward(response: str) -> float:
    """SET format in {0, 1}: the normalized response fully matches step1..step3 then `\\boxed{}`."""
    return 1.0 if _SET_FORMAT.fullmatch(normalize_tags(response)) else 0.0


def think_format_reward(response: str) -> float:
    """GRPO-baseline format in {0, 1}: `<think>...</think>` then `\\boxed{}` (normalized response)."""
    return 1.0 if _THINK_FORMAT.fullmatch(normalize_tags(response)) else 0.0


def extract_boxed(response: str) -> str | None:
    """Stripped text inside the *last* `\\boxed{` up to its balancing `}`; None if absent/unbalanced.

    Nested braces are kept verbatim (`\\boxed{\\text{awe}}` -> `\\text{awe}`), as mathruler's
    `extract_boxed_content` does in the release; no other normalization.
    """
    start = response.rfind(_BOXED_OPEN)
    if start < 0:
        return None
    content_start = start + len(_BOXED_OPEN)
    depth = 0
    for i in range(content_start, len(response)):
        char = response[i]
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return response[content_start:i].strip()
            depth -= 1
    return None


def accuracy_reward(response: str, label: str) -> float:
    """Boxed exact match in {0, 1}: last boxed content of the normalized response vs the label,
    both lower-cased (content stripped; the label is used as given)."""
    answer = extract_boxed(normalize_tags(response))
    return 1.0 if answer is not None and answer.lower() == label.lower() else 0.0


def graded_accuracy_reward(response: str, label: str) -> float:
    """mathruler's grading in {0, 1}, as the release's baseline and ablation reward files do:
    `grade_answer(extract_boxed_content(response), label)` on the normalized response.

    More lenient than `accuracy_reward` (mathruler normalizes `\\text{awe}`, units, spacing and
    compares expressions with sympy) and stricter on nothing; a missing box reads "None".
    """
    from mathruler.grader import extract_boxed_content
    return _grade(extract_boxed_content(normalize_tags(response)), label)


@functools.lru_cache(maxsize=1 << 16)
def _grade(answer: str, label: str) -> float:
    """mathruler's `grade_answer`, memoized: it costs milliseconds (LaTeX parsing, sympy
    checks) and a rollout repeats the same few boxed answers thousands of times."""
    from mathruler.grader import grade_answer
    return 1.0 if grade_answer(answer, label) else 0.0


def coherence_span(response: str) -> str | None:
    """`<step1>` through the first `</step2>` of the raw response (tags kept, stripped), or None."""
    match = _COHERENCE_SPAN.search(response)
    return match.group(0).strip() if match else None


def consistency_span(response: str) -> str | None:
    """Step 1 of the raw response: from `<step1>` (kept) up to, not including, the first `<step2>`.

    The `<step1>` tag is included because the released code cuts `(<step1>.*?)(?=<step2>)`
    (docs/method.md: "from `<step1>` up to, not including, `<step2>`"). Stripped; None if missing.
    """
    match = _CONSISTENCY_SPAN.search(response)
    return match.group(0).strip() if match else None


def coherence_prompt(response: str, labels: Sequence[str]) -> str:
    """Text-only judge prompt: does step1+step2 alone imply an emotion from `labels`?

    `labels` is the data set's label tuple (e.g. `recipe.LABELS["emoset2k"]`), joined by ', '.
    """
    if isinstance(labels, str):
        raise TypeError(f"coherence_prompt: labels must be a sequence of label strings (e.g. "
                        f"emor3_jax/recipe.py LABELS['emoset2k']), got the string {labels!r}")
    span = coherence_span(response)
    if not span:
        return recipe.JUDGE_NONE_TEXT_PROMPT
    return recipe.COHERENCE_TEMPLATE.format(text=span, labels=", ".join(labels))


def consistency_prompt(response: str) -> str:
    """Judge prompt with the `<image>` marker: can step 1 describe the image?"""
    span = consistency_span(response)
    if not span:
        return recipe.JUDGE_NONE_IMAGE_PROMPT
    return recipe.CONSISTENCY_TEMPLATE.format(text=span)


def coherence_score(judge_answer: str, label: str) -> float:
    """R_coh in {0, 0.5, 1}, exactly as released (`not answer or answer.lower() == "none"`):
    an empty or "none" answer (case-insensitive, not stripped) -> 0.5; an answer equal to the
    ground truth after lower-casing both -> 1 (no other normalization: "Fear.", " fear" or a
    white-space-only answer score 0); else 0.
    """
    _check_str("coherence_score: judge_answer", judge_answer)
    if not judge_answer or judge_answer.lower() == "none":
        return 0.5
    return 1.0 if judge_answer.lower() == label.lower() else 0.0


def graded_coherence_score(judge_answer: str, label: str) -> float:
    """R_coh of the release's multiplicative ablation (`emothink_rethink.py`): exactly "None"
    (case-sensitive; an empty answer is not special) -> 0.5; else mathruler's
    `grade_answer(answer, label)` -> 1 or 0."""
    _check_str("graded_coherence_score: judge_answer", judge_answer)
    if judge_answer == "None":
        return 0.5
    return _grade(judge_answer, label)


def consistency_score(judge_answer: str) -> float:
    """R_cons in {0, 0.5, 1}: "yes" anywhere (lower-cased) -> 1; else "no" anywhere -> 0; else 0.5.

    Substring tests as released, so "I don't know" contains "no" and scores 0.
    """
    _check_str("consistency_score: judge_answer", judge_answer)
    answer = judge_answer.lower()
    if "yes" in answer:
        return 1.0
    if "no" in answer:
        return 0.0
    return 0.5


def step3_text(response: str) -> str | None:
    """Content between the first `<step3>` and the next `</step3>` of the normalized response."""
    match = _STEP3.search(normalize_tags(response))
    return match.group(1) if match else None


def _single_word(text: str, words: Mapping[str, re.Pattern]) -> str | None:
    """The one word of `words` present in `text`; None if none or several different ones occur."""
    found = [word for word, pattern in words.items() if pattern.search(text)]
    return found[0] if len(found) == 1 else None


def valence_arousal_reward(response: str, label: str) -> float:
    """Step-3 valence/arousal check in {0, 0.5, 1} against emor3_jax/recipe.py VALENCE_AROUSAL.

    Detection (this project's definition, tighter than the authors' substring test):
      * step 3 = text inside the first `<step3>...</step3>` of the normalized response
        (missing -> 0). The authors' history read the text *after* `</step3>`; step 3 is what
        the prompt asks to conclude in, so that is what is read here.
      * polarity word: whole word "positive" or "negative", any case. If exactly one of the two
        occurs (any number of times) it is the prediction; both or neither -> no polarity credit.
      * arousal word: whole word "high" or "low", any case (so "follow", "highly", "higher" do
        not count; "high-arousal" does); same exactly-one rule.
      * +0.5 if the predicted polarity equals the label's, +0.5 if the arousal does.
    Negations ("not positive") are not understood. A label without a valence/arousal entry is an
    error: this preset is defined for the Mikels labels only.
    """
    key = label.strip().lower()
    if key not in recipe.VALENCE_AROUSAL:
        raise ValueError(f"valence_arousal_reward: label {label!r} has no entry in recipe.py "
                         f"VALENCE_AROUSAL (known: {sorted(recipe.VALENCE_AROUSAL)}); use the "
                         f"valence_arousal reward preset only with Mikels-label data sets")
    text = step3_text(response)
    if text is None:
        return 0.0
    want_polarity, want_arousal = recipe.VALENCE_AROUSAL[key]
    score = 0.0
    if _single_word(text, _POLARITY_WORDS) == want_polarity:
        score += 0.5
    if _single_word(text, _AROUSAL_WORDS) == want_arousal:
        score += 0.5
    return score


def _check_str(what: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a decoded string, got {type(value).__name__}: {value!r}")


# --------------------------------------------------------------------------------------------
# Presets: which components a reward needs and how they combine.
COMPONENTS = ("format", "accuracy", "coherence", "consistency", "valence_arousal")


@dataclasses.dataclass(frozen=True)
class RewardPreset:
    """A named overall reward. `combine` maps a dict of components (floats or arrays) to the total.

    `needs_*` tell the trainer which judge passes / extra rules to run; `format_fn`,
    `accuracy_fn` and `coherence_fn` are the rules whose values go under "format", "accuracy"
    (in training and in evaluation) and "coherence"; `release_file` names the file of the
    authors' release (SeerRay-Lab/emo-r3, EasyR1 for the GRPO baseline) the preset reproduces.
    """
    name: str
    combine: Callable[[Mapping[str, float | np.ndarray]], float | np.ndarray]
    needs_coherence: bool
    needs_consistency: bool
    needs_valence_arousal: bool = False
    format_fn: Callable[[str], float] = format_reward
    accuracy_fn: Callable[[str, str], float] = accuracy_reward
    coherence_fn: Callable[[str, str], float] = coherence_score
    release_file: str = ""
    description: str = ""

    @property
    def components(self) -> tuple[str, ...]:
        """Components this preset reads, in COMPONENTS order."""
        needed = {"format": True, "accuracy": True, "coherence": self.needs_coherence,
                  "consistency": self.needs_consistency,
                  "valence_arousal": self.needs_valence_arousal}
        return tuple(name for name in COMPONENTS if needed[name])

    def overall(self, components: Mapping[str, float | np.ndarray]) -> float | np.ndarray:
        missing = [name for name in self.components if name not in components]
        if missing:
            raise KeyError(f"reward preset {self.name!r} needs components {missing}; "
                           f"got {sorted(components)}")
        return self.combine(components)


def paper_preset(lambda1: float = 0.1, lambda2: float = 0.1) -> RewardPreset:
    """The paper's (1 - l1 - l2)*acc + l1*(R_coh + R_cons)/2 + l2*format."""
    def combine(c):
        return ((1.0 - lambda1 - lambda2) * c["accuracy"]
                + lambda1 * (c["coherence"] + c["consistency"]) / 2.0 + lambda2 * c["format"])
    return RewardPreset("emor3_paper", combine, needs_coherence=True, needs_consistency=True,
                        release_file="(paper, Eq. of the overall reward; not in the release)",
                        description=f"paper: (1-{lambda1}-{lambda2})*acc + {lambda1}*(coh+cons)/2 "
                                    f"+ {lambda2}*format")


# Each preset grades as its release file does: exact lower-cased match (`accuracy_reward`) for
# the released EMO-R3 reward and its additive coherence ablation, mathruler's `grade_answer`
# (`graded_accuracy_reward`) for the GRPO baseline and the other ablations.
_RELEASE = "SeerRay-Lab/emo-r3 examples/reward_function/"
PRESETS: dict[str, RewardPreset] = {
    "emor3": RewardPreset(
        "emor3",
        lambda c: 0.8 * c["accuracy"] + 0.1 * (c["coherence"] + c["consistency"])
        + 0.1 * c["format"],
        needs_coherence=True, needs_consistency=True,
        release_file=_RELEASE + "emor3.py (examples/qwen2_5_vl_3b_emor3.sh)",
        description="released default: 0.8*acc + 0.1*(coh+cons) + 0.1*format (max 1.1), "
                    "exact-match accuracy"),
    "emor3_paper": paper_preset(0.1, 0.1),
    "set_only": RewardPreset(
        "set_only", lambda c: 0.9 * c["accuracy"] + 0.1 * c["format"],
        needs_coherence=False, needs_consistency=False, accuracy_fn=graded_accuracy_reward,
        release_file=_RELEASE + "new/emothink_new.py",
        description="SET only: 0.9*acc + 0.1*format, mathruler grading"),
    "coherence_mult": RewardPreset(
        "coherence_mult", lambda c: 0.9 * c["accuracy"] * c["coherence"] + 0.1 * c["format"],
        needs_coherence=True, needs_consistency=False, accuracy_fn=graded_accuracy_reward,
        coherence_fn=graded_coherence_score,
        release_file=_RELEASE + "new/emothink_rethink.py",
        description="coherence-only multiplicative: 0.9*acc*coh + 0.1*format, mathruler grading "
                    "of the answer and of the judge's (exactly 'None' -> 0.5)"),
    "coherence_add": RewardPreset(
        "coherence_add", lambda c: 0.8 * c["accuracy"] + 0.1 * c["coherence"] + 0.1 * c["format"],
        needs_coherence=True, needs_consistency=False,
        release_file=_RELEASE + "new/emothink_rethink_image_nocoh.py (its active branch)",
        description="coherence-only additive: 0.8*acc + 0.1*coh + 0.1*format, exact-match "
                    "accuracy, released R_coh"),
    "consistency_add": RewardPreset(
        "consistency_add",
        lambda c: 0.8 * c["accuracy"] + 0.1 * c["consistency"] + 0.1 * c["format"],
        needs_coherence=False, needs_consistency=True,
        release_file=_RELEASE + "emor3.py with its coherence term left out (the release has "
                                "no consistency-only file; the paper's ablation has the row)",
        description="consistency-only additive: 0.8*acc + 0.1*cons + 0.1*format, exact-match "
                    "accuracy, released R_cons"),
    "emor3_mult": RewardPreset(
        "emor3_mult",
        lambda c: 0.9 * c["accuracy"] * c["coherence"] * c["consistency"] + 0.1 * c["format"],
        needs_coherence=True, needs_consistency=True,
        release_file=_RELEASE + "emor3.py (its commented-out `overall`)",
        description="both judge terms multiplicative: 0.9*acc*coh*cons + 0.1*format, "
                    "exact-match accuracy, released R_coh and R_cons"),
    "valence_arousal": RewardPreset(
        "valence_arousal",
        lambda c: 0.9 * c["accuracy"] + 0.1 * c["format"] + 0.1 * c["valence_arousal"],
        needs_coherence=False, needs_consistency=False, needs_valence_arousal=True,
        accuracy_fn=graded_accuracy_reward,
        release_file=_RELEASE + "new/emothink_think_reward.py (valence/arousal words detected "
                                "as in valence_arousal_reward, not by its substring test)",
        description="SET-only base plus 0.1*valence/arousal score: 0.9*acc + 0.1*format + 0.1*va "
                    "(max 1.1), mathruler grading"),
    "grpo_think": RewardPreset(
        "grpo_think", lambda c: 0.9 * c["accuracy"] + 0.1 * c["format"],
        needs_coherence=False, needs_consistency=False, format_fn=think_format_reward,
        accuracy_fn=graded_accuracy_reward,
        release_file="EasyR1 examples/reward_function/math.py with examples/format_prompt/"
                     "math.jinja (the release's naive GRPO scripts)",
        description="GRPO baseline: 0.9*acc + 0.1*think-format, mathruler grading"),
}


def get_preset(preset: str | RewardPreset) -> RewardPreset:
    if isinstance(preset, RewardPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"config.reward.preset={preset!r} is not a reward preset; choose one of "
                         f"{sorted(PRESETS)}")
    return PRESETS[preset]


# --------------------------------------------------------------------------------------------
# Batched scoring (host side).
@dataclasses.dataclass(frozen=True)
class RewardScores:
    """Per-response totals and components (float64 numpy arrays of shape [N])."""
    overall: np.ndarray
    components: dict[str, np.ndarray]

    def means(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging."""
        out = {f"{prefix}overall": float(self.overall.mean()) if self.overall.size else 0.0}
        for name, values in self.components.items():
            out[f"{prefix}{name}"] = float(values.mean()) if values.size else 0.0
        return out


def judge_prompts(responses: Sequence[str], dataset_labels: Sequence[str],
                  preset: str | RewardPreset) -> tuple[list[str] | None, list[str] | None]:
    """(coherence prompts, consistency prompts) for the judge passes the preset needs (else None).

    `dataset_labels` is the data set's label tuple (emor3_jax/recipe.py LABELS[name]).
    """
    preset = get_preset(preset)
    coherence = ([coherence_prompt(r, dataset_labels) for r in responses]
                 if preset.needs_coherence else None)
    consistency = ([consistency_prompt(r) for r in responses]
                   if preset.needs_consistency else None)
    return coherence, consistency


def _judge_column(name: str, answers: Sequence[str] | None, scores, labels: Sequence[str],
                  needed: bool, validation: bool, score: Callable[[str, str], float]
                  ) -> np.ndarray | None:
    """Scores of one judge term (from the judge's answers, or given: the score mode's expected
    values), JUDGE_SKIPPED in validation, None if the preset does not use it."""
    n = len(labels)
    given = answers if scores is None else scores
    if answers is not None and scores is not None:
        raise ValueError(f"score_responses: pass {name}_answers or {name}_scores, not both")
    if not needed:
        if given is not None:
            raise ValueError(f"score_responses: {name} judge results were given but the preset "
                             f"does not use {name}; drop them (or pick a preset that needs them)")
        return None
    if validation:
        if given is not None:
            raise ValueError(f"score_responses: validation=True treats {name} as "
                             f"{JUDGE_SKIPPED}; do not pass {name} judge results")
        return np.full(n, JUDGE_SKIPPED, dtype=np.float64)
    if given is None:
        raise ValueError(f"score_responses: the preset needs the {name} judge; pass "
                         f"{name}_answers (one decoded judge answer per response), "
                         f"{name}_scores, or validation=True")
    if len(given) != n:
        raise ValueError(f"score_responses: {len(given)} {name} judge results for {n} responses")
    if scores is not None:
        return np.asarray(scores, dtype=np.float64).reshape(n)
    return np.array([score(a, l) for a, l in zip(answers, labels)], dtype=np.float64)


def score_responses(responses: Sequence[str], labels: Sequence[str], preset: str | RewardPreset,
                    coherence_answers: Sequence[str] | None = None,
                    consistency_answers: Sequence[str] | None = None, *,
                    coherence_scores=None, consistency_scores=None,
                    validation: bool = False) -> RewardScores:
    """Score a batch: components the preset needs and the overall reward, as numpy arrays.

    `responses` are raw decoded responses (special tokens skipped), `labels` the ground-truth
    label of each response (rows aligned; prompt-major b*G+g in training). Judge answers are the
    decoded judge outputs for the prompts of `judge_prompts`, aligned with `responses`; the
    judge's score mode gives `*_scores` instead (expected R_coh / R_cons per response). With
    `validation=True` the judge terms are not computed and count as JUDGE_SKIPPED (= 1).
    """
    preset = get_preset(preset)
    n = len(responses)
    if len(labels) != n:
        raise ValueError(f"score_responses: {len(labels)} labels for {n} responses; give one "
                         f"ground-truth label per response (repeat each prompt's label G times)")
    for i, (response, label) in enumerate(zip(responses, labels)):
        _check_str(f"score_responses: responses[{i}]", response)
        _check_str(f"score_responses: labels[{i}]", label)
        if not label.strip():
            raise ValueError(f"score_responses: labels[{i}] is empty; every record needs an answer")

    components = {
        "format": np.array([preset.format_fn(r) for r in responses], dtype=np.float64),
        "accuracy": np.array([preset.accuracy_fn(r, l) for r, l in zip(responses, labels)],
                             dtype=np.float64),
    }
    judged = {
        "coherence": _judge_column("coherence", coherence_answers, coherence_scores, labels,
                                   preset.needs_coherence, validation, preset.coherence_fn),
        "consistency": _judge_column("consistency", consistency_answers, consistency_scores,
                                     labels, preset.needs_consistency, validation,
                                     lambda answer, _label: consistency_score(answer)),
    }
    components.update({k: v for k, v in judged.items() if v is not None})
    if preset.needs_valence_arousal:
        components["valence_arousal"] = np.array(
            [valence_arousal_reward(r, l) for r, l in zip(responses, labels)], dtype=np.float64)
    overall = np.asarray(preset.overall(components), dtype=np.float64).reshape(n)
    return RewardScores(overall=overall, components=components)
