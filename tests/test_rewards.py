"""EMO-R3 rule rewards: every expectation is derived from docs/method.md "Rewards" (rule cited inline)."""
import numpy as np
import pytest

from emor3_jax.configs import base
from emor3_jax.rewards import emotion

EMOSET = base.LABELS["emoset2k"]
EMOTION6 = base.LABELS["emotion6"]

GOOD = ("<step1>A dog chases a ball on the beach.</step1>\n"
        "<step2>A person would feel playful joy.</step2>\n"
        "<step3>Positive, high arousal.</step3>\n"
        "\\boxed{amusement}")


# ---------------------------------------------------------------------------- format
@pytest.mark.parametrize("response, expected", [
    (GOOD, 1.0),                                                    # full SET structure + boxed
    ("< step1 >a</ step1 >< step2 >b</step2 ><step3>c< /step3>\\boxed{x}", 1.0),  # ws around <,>,/ removed first
    ("\n  <step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{x}  \n", 1.0),  # ws before '<' removed; trailing .* ok
    ("Sure! <step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{x}", 0.0),  # fullmatch: must start at <step1>
    ("<step1>a</step1><step2>b</step2>\\boxed{x}", 0.0),                        # step3 missing
    ("<step2>b</step2><step1>a</step1><step3>c</step3>\\boxed{x}", 0.0),        # steps reordered
    ("<step1>a</step1><step2>b</step2><step3>c</step3> the answer is fear", 0.0),  # no \boxed{...}
    ("<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{x", 0.0),         # \boxed{ without }
    ("<step1>a</step1><step2>b</step2><step3>c</step3>\\boxed{}", 1.0),          # \{.*\}: empty box still matches
    ("<step1>a\nb</step1>\n<step2>\n</step2><step3></step3>\n\\boxed{x}\nDone.", 1.0),  # DOTALL
    ("", 0.0),                                                        # empty response
])
def test_format_reward(response, expected):
    assert emotion.format_reward(response) == expected


def test_normalize_tags_only_touches_brackets_and_slash():
    # regex \s*(<|>|/)\s* -> the bracket: spaces next to < > / vanish, other spaces stay.
    assert emotion.normalize_tags("< step1 > a b </ step1 >") == "<step1>a b</step1>"
    assert emotion.normalize_tags("x / y") == "x/y"


@pytest.mark.parametrize("response, expected", [
    ("<think>reasoning</think> so \\boxed{awe}", 1.0),      # GRPO baseline <think>.*</think>.*\boxed{.*}.*
    ("< think >r</ think >\\boxed{awe}", 1.0),              # same white-space normalization
    (GOOD, 0.0),                                            # SET answer has no <think> block
    ("<think>r</think> fear", 0.0),                         # no boxed answer
    ("Intro <think>r</think>\\boxed{awe}", 0.0),            # fullmatch from the start
])
def test_think_format_reward(response, expected):
    assert emotion.think_format_reward(response) == expected


# ---------------------------------------------------------------------------- boxed / accuracy
@pytest.mark.parametrize("text, expected", [
    ("\\boxed{fear}", "fear"),
    ("\\boxed{  fear \n}", "fear"),                  # stripped
    ("\\boxed{\\text{awe}}", "\\text{awe}"),           # nested braces kept verbatim
    ("\\boxed{a} then \\boxed{fear}", "fear"),        # the LAST \boxed{
    ("\\boxed{fear} then \\boxed{awe", None),         # last one unbalanced -> None (no fallback)
    ("\\boxed{fear}}", "fear"),                       # first balancing brace ends it
    ("\\boxed{{fear}", None),                         # never balanced
    ("\\boxed {fear}", None),                         # needs the literal "\boxed{"
    ("no box here", None),
    ("", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert emotion.extract_boxed(text) == expected


@pytest.mark.parametrize("response, label, expected", [
    (GOOD, "amusement", 1.0),
    (GOOD, "AMUSEMENT", 1.0),                          # both lower-cased
    ("\\boxed{Fear}", "fear", 1.0),                    # both lower-cased
    ("\\boxed{ fear }", "fear", 1.0),                  # boxed content stripped
    ("\\boxed{fear.}", "fear", 0.0),                   # no other normalization
    ("\\boxed{\\text{awe}}", "awe", 0.0),              # nested content is "\text{awe}" != awe
    ("\\boxed{a}...\\boxed{fear}", "fear", 1.0),       # last box counts
    ("\\boxed{a}...\\boxed{fear}", "a", 0.0),          # earlier box ignored
    ("\\boxed{fear", "fear", 0.0),                     # unbalanced -> 0
    ("\\boxed{fear} and \\boxed{fear", "fear", 0.0),   # last is unbalanced -> 0
    ("The answer is fear.", "fear", 0.0),              # no \boxed{ -> 0
    ("", "fear", 0.0),                                 # empty response
    ("\\boxed{sad / ness}", "sad/ness", 1.0),          # accuracy reads the ws-normalized response
])
def test_accuracy_reward(response, label, expected):
    assert emotion.accuracy_reward(response, label) == expected


# ---------------------------------------------------------------------------- judge prompts
def test_coherence_prompt_exact_string():
    # "{that text}\nWhich emotion best describes the text above?\nAnswer the question using one
    # emotional category (one word only): {labels joined by ', '}."  (span: <step1>..</step2>)
    expected = ("<step1>A dog chases a ball on the beach.</step1>\n"
                "<step2>A person would feel playful joy.</step2>\n"
                "Which emotion best describes the text above?\n"
                "Answer the question using one emotional category (one word only): "
                "amusement, anger, awe, contentment, disgust, excitement, fear, sadness.")
    assert emotion.coherence_prompt(GOOD, EMOSET) == expected


def test_consistency_prompt_exact_string():
    # "<image>\nCan the following text describe the image?Please answer with yes or no.{step1}"
    # step 1 = from <step1> (tag included, as released) up to, not including, <step2>; stripped.
    expected = ("<image>\nCan the following text describe the image?Please answer with yes or no."
                "<step1>A dog chases a ball on the beach.</step1>")
    assert emotion.consistency_prompt(GOOD) == expected


def test_spans_are_cut_from_raw_text_and_stripped():
    raw = "  intro <step1> trees </step1>\n\n<step2> calm </step2>\n<step3>x</step3>\\boxed{awe}"
    # coherence: <step1> through </step2>, tags included; inner white space untouched.
    assert emotion.coherence_span(raw) == "<step1> trees </step1>\n\n<step2> calm </step2>"
    # consistency: the trailing "\n\n" before <step2> is stripped.
    assert emotion.consistency_span(raw) == "<step1> trees </step1>"
    # labels of the data set, joined by ', '.
    assert emotion.coherence_prompt(raw, EMOTION6).endswith(
        "(one word only): anger, disgust, fear, joy, sadness, surprise.")


def test_coherence_span_is_non_greedy():
    raw = "<step1>a</step1><step2>b</step2><step3>c</step3><step2>again</step2>"
    assert emotion.coherence_span(raw) == "<step1>a</step1><step2>b</step2>"
    raw2 = "<step1>a</step1><step2>b</step2> <step2>c</step2>"
    assert emotion.consistency_span(raw2) == "<step1>a</step1>"     # up to the FIRST <step2>


def test_spans_missing_in_raw_text_even_if_format_ok():
    # Judge spans use the RAW response: "< step1 >" is not "<step1>" there (format normalizes).
    spaced = "< step1 >a</ step1 ><step2>b</ step2 ><step3>c</step3>\\boxed{awe}"
    assert emotion.format_reward(spaced) == 1.0
    assert emotion.coherence_prompt(spaced, EMOSET) == "Answer 'None'"
    assert emotion.consistency_prompt(spaced) == "<image>\nAnswer 'None'"
    # "</ step2>" breaks only the coherence span (it needs "</step2>"), not the consistency one.
    half = "<step1>a</step1><step2>b</ step2>"
    assert emotion.coherence_prompt(half, EMOSET) == "Answer 'None'"
    assert emotion.consistency_span(half) == "<step1>a</step1>"


@pytest.mark.parametrize("response", [
    "",                                                        # empty
    "no steps at all \\boxed{fear}",                            # no tags
    "<step2>b</step2><step1>a</step1>",                        # reordered: nothing after <step1>
    "<step1>only step one</step1><step3>x</step3>",            # no step2 at all
])
def test_missing_spans_give_none_prompts(response):
    # Missing span -> "Answer 'None'" (text judge) / "<image>\nAnswer 'None'" (image judge).
    assert emotion.coherence_prompt(response, EMOSET) == base.JUDGE_NONE_TEXT_PROMPT
    assert emotion.consistency_prompt(response) == base.JUDGE_NONE_IMAGE_PROMPT
    assert base.JUDGE_NONE_TEXT_PROMPT == "Answer 'None'"
    assert base.JUDGE_NONE_IMAGE_PROMPT == "<image>\nAnswer 'None'"


def test_span_braces_are_not_format_fields():
    raw = "<step1>a {labels} b {0}</step1><step2>c</step2>"
    prompt = emotion.coherence_prompt(raw, EMOSET)
    assert prompt.startswith("<step1>a {labels} b {0}</step1><step2>c</step2>\n")


def test_coherence_prompt_rejects_a_string_label_list():
    with pytest.raises(TypeError, match="LABELS"):
        emotion.coherence_prompt(GOOD, "emoset2k")


# ---------------------------------------------------------------------------- judge scores
@pytest.mark.parametrize("answer, label, expected", [
    ("", "fear", 0.5),              # empty -> 0.5
    ("   \n", "fear", 0.0),         # white space is not empty: compared with the label (released)
    ("None", "fear", 0.5),          # "none" case-insensitive -> 0.5
    (" NONE\n", "fear", 0.0),       # no stripping (released)
    ("nonesuch", "fear", 0.0),      # not exactly "none"
    ("fear", "fear", 1.0),          # equal to ground truth
    ("Fear", "fear", 1.0),          # lower-casing both
    ("fear", "FEAR", 1.0),          # upper-case label
    ("fear.", "fear", 0.0),         # no other normalization (as released)
    (" fear", "fear", 0.0),         # no stripping for the equality test
    ("anger", "fear", 0.0),         # compares with ground truth, not the policy's answer
    ("The emotion is fear", "fear", 0.0),
])
def test_coherence_score(answer, label, expected):
    assert emotion.coherence_score(answer, label) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Yes", 1.0), ("YES.", 1.0), ("yes and no", 1.0),   # "yes" anywhere wins
    ("eyes", 1.0),                                      # substring rule, as released
    ("No", 0.0), ("no, it cannot", 0.0),
    ("I don't know", 0.0),                              # "know" contains "no"
    ("maybe", 0.5), ("", 0.5), ("None", 0.0),           # "None" contains "no"
])
def test_consistency_score(answer, expected):
    assert emotion.consistency_score(answer) == expected


def test_judge_scores_reject_non_strings():
    with pytest.raises(TypeError, match="judge_answer"):
        emotion.consistency_score(None)
    with pytest.raises(TypeError, match="judge_answer"):
        emotion.coherence_score(None, "fear")


# ---------------------------------------------------------------------------- valence / arousal
def _with_step3(text, box="x"):
    return f"<step1>a</step1><step2>b</step2><step3>{text}</step3>\\boxed{{{box}}}"


@pytest.mark.parametrize("step3, label, expected", [
    ("The emotion is negative and high arousal.", "fear", 1.0),   # fear = -/high: both right
    ("NEGATIVE, LOW arousal", "Sadness", 1.0),                    # any case, label lower-cased
    ("Positive and high arousal.", "fear", 0.5),                  # arousal right, polarity wrong
    ("Negative, low arousal", "fear", 0.5),                       # polarity right only
    ("positive or negative? negative. high", "fear", 0.5),        # both polarity words -> no polarity
    ("negative; arousal high or low", "fear", 0.5),               # both arousal words -> no arousal
    ("positive, feelings follow calmly", "awe", 0.5),             # "follow" is not the word "low"
    ("positive, highly calm", "awe", 0.5),                        # "highly" is not "high"
    ("positive high-arousal", "amusement", 1.0),                  # "high-arousal" has the word high
    ("It is unclear.", "fear", 0.0),                              # no words
])
def test_valence_arousal_reward(step3, label, expected):
    assert emotion.valence_arousal_reward(_with_step3(step3), label) == expected


def test_valence_arousal_reads_only_step3():
    outside = "<step1>negative</step1><step2>high</step2><step3>unsure</step3> negative high \\boxed{fear}"
    assert emotion.valence_arousal_reward(outside, "fear") == 0.0
    assert emotion.valence_arousal_reward("negative high \\boxed{fear}", "fear") == 0.0  # no step3
    # tags are read on the ws-normalized response, like format.
    assert emotion.valence_arousal_reward("< step3 >negative, high</ step3 >", "fear") == 1.0


def test_valence_arousal_unknown_label_is_an_error():
    with pytest.raises(ValueError, match="VALENCE_AROUSAL"):
        emotion.valence_arousal_reward(_with_step3("positive high"), "joy")


# ---------------------------------------------------------------------------- presets
def _components(acc, fmt, coh, cons, va):
    return {"accuracy": acc, "format": fmt, "coherence": coh, "consistency": cons,
            "valence_arousal": va}


@pytest.mark.parametrize("name, expected", [
    ("emor3", 0.8 * 1 + 0.1 * (0.5 + 0.0) + 0.1 * 1),                 # released default
    ("emor3_paper", 0.8 * 1 + 0.1 * (0.5 + 0.0) / 2 + 0.1 * 1),       # (1-l1-l2)acc + l1(coh+cons)/2 + l2 fmt
    ("set_only", 0.9 * 1 + 0.1 * 1),
    ("coherence_mult", 0.9 * 1 * 0.5 + 0.1 * 1),
    ("coherence_add", 0.8 * 1 + 0.1 * 0.5 + 0.1 * 1),
    ("consistency_add", 0.8 * 1 + 0.1 * 0.0 + 0.1 * 1),
    ("emor3_mult", 0.9 * 1 * 0.5 * 0.0 + 0.1 * 1),
    ("valence_arousal", 0.9 * 1 + 0.1 * 1 + 0.1 * 0.5),               # SET-only base + 0.1 * va
    ("grpo_think", 0.9 * 1 + 0.1 * 1),
])
def test_preset_combinations(name, expected):
    preset = emotion.get_preset(name)
    assert preset.overall(_components(1.0, 1.0, 0.5, 0.0, 0.5)) == pytest.approx(expected, abs=1e-12)


def test_preset_extremes():
    # Released default max is 1.1 (everything right); with acc = 0 only the 0.1-weighted terms remain.
    assert emotion.PRESETS["emor3"].overall(_components(1, 1, 1, 1, 0)) == pytest.approx(1.1)
    assert emotion.PRESETS["emor3"].overall(_components(0, 1, 1, 0.5, 0)) == pytest.approx(0.25)
    assert emotion.PRESETS["emor3_paper"].overall(_components(1, 1, 1, 1, 0)) == pytest.approx(1.0)
    assert emotion.PRESETS["coherence_mult"].overall(_components(1, 0, 0, 1, 0)) == 0.0
    assert emotion.PRESETS["emor3_mult"].overall(_components(1, 1, 1, 1, 0)) == pytest.approx(1.0)
    assert emotion.PRESETS["emor3_mult"].overall(_components(1, 1, 1, 0.5, 0)) == \
        pytest.approx(0.55)
    assert emotion.PRESETS["consistency_add"].overall(_components(0, 1, 1, 1, 0)) == \
        pytest.approx(0.2)
    custom = emotion.paper_preset(lambda1=0.2, lambda2=0.05)
    assert custom.overall(_components(1, 1, 1, 0, 0)) == pytest.approx(0.75 + 0.1 + 0.05)


def test_preset_needs():
    needs = {name: (p.needs_coherence, p.needs_consistency, p.needs_valence_arousal)
             for name, p in emotion.PRESETS.items()}
    assert needs == {"emor3": (True, True, False), "emor3_paper": (True, True, False),
                     "set_only": (False, False, False), "coherence_mult": (True, False, False),
                     "coherence_add": (True, False, False),
                     "consistency_add": (False, True, False), "emor3_mult": (True, True, False),
                     "valence_arousal": (False, False, True), "grpo_think": (False, False, False)}
    assert all(p.release_file for p in emotion.PRESETS.values())
    assert emotion.PRESETS["coherence_mult"].components == ("format", "accuracy", "coherence")
    with pytest.raises(KeyError, match="consistency"):
        emotion.PRESETS["emor3"].overall({"accuracy": 1, "format": 1, "coherence": 1})


def test_get_preset_unknown_name():
    with pytest.raises(ValueError, match="config.reward.preset"):
        emotion.get_preset("emor4")


# ---------------------------------------------------------------------------- batched scoring
BATCH = [
    GOOD,                                                           # right answer, good format
    "<step1>A storm.</step1><step2>Scary.</step2><step3>negative, high</step3>\\boxed{fear}",
    "I think it's \\boxed{Awe}",                                    # right, no SET format, no spans
    "",                                                             # empty
]
LABELS = ["amusement", "sadness", "awe", "fear"]


def test_score_responses_emor3():
    coh_answers = ["amusement", "Fear", "None", "x"]
    cons_answers = ["Yes.", "no", "unclear", "yes"]
    scores = emotion.score_responses(BATCH, LABELS, "emor3", coh_answers, cons_answers)
    c = scores.components
    np.testing.assert_array_equal(c["format"], [1, 1, 0, 0])
    np.testing.assert_array_equal(c["accuracy"], [1, 0, 1, 0])
    np.testing.assert_array_equal(c["coherence"], [1, 0, 0.5, 0])   # vs ground truth sadness
    np.testing.assert_array_equal(c["consistency"], [1, 0, 0.5, 1])
    assert "valence_arousal" not in c
    np.testing.assert_allclose(scores.overall, [1.1, 0.1, 0.8 + 0.1, 0.1], atol=1e-12)
    assert scores.overall.dtype == np.float64 and scores.overall.shape == (4,)
    assert scores.means()["reward/accuracy"] == 0.5


def test_score_responses_validation_treats_judge_terms_as_one():
    scores = emotion.score_responses(BATCH, LABELS, "emor3", validation=True)
    np.testing.assert_array_equal(scores.components["coherence"], np.ones(4))
    np.testing.assert_allclose(scores.overall, [1.1, 0.3, 1.0, 0.2], atol=1e-12)
    with pytest.raises(ValueError, match="validation=True"):
        emotion.score_responses(BATCH, LABELS, "emor3", ["x"] * 4, ["y"] * 4, validation=True)


def test_score_responses_presets_without_judges():
    va = emotion.score_responses(BATCH, LABELS, "valence_arousal")
    # GOOD step3 "Positive, high arousal." vs amusement (+/high) = 1; BATCH[1] vs sadness (-/low) = 0.5
    np.testing.assert_array_equal(va.components["valence_arousal"], [1, 0.5, 0, 0])
    np.testing.assert_allclose(va.overall, [1.1, 0.15, 0.9, 0.0], atol=1e-12)
    think = emotion.score_responses(BATCH, LABELS, "grpo_think")
    np.testing.assert_array_equal(think.components["format"], [0, 0, 0, 0])  # no <think> blocks
    np.testing.assert_allclose(think.overall, [0.9, 0, 0.9, 0], atol=1e-12)
    # Emotion6 labels work for presets that do not read valence/arousal.
    joy = emotion.score_responses(["\\boxed{joy}"], ["joy"], "set_only")
    np.testing.assert_allclose(joy.overall, [0.9])


def test_score_responses_input_errors():
    with pytest.raises(ValueError, match="coherence_answers"):
        emotion.score_responses(BATCH, LABELS, "coherence_mult")
    with pytest.raises(ValueError, match="does not use consistency"):
        emotion.score_responses(BATCH, LABELS, "coherence_mult", ["a"] * 4, ["yes"] * 4)
    with pytest.raises(ValueError, match="labels for 4 responses"):
        emotion.score_responses(BATCH, LABELS[:3], "set_only")
    with pytest.raises(ValueError, match="3 coherence judge results"):
        emotion.score_responses(BATCH, LABELS, "coherence_mult", ["a"] * 3)
    with pytest.raises(ValueError, match=r"labels\[1\] is empty"):
        emotion.score_responses(BATCH[:2], ["fear", " "], "set_only")
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        emotion.score_responses([b"bytes"], ["fear"], "set_only")
    with pytest.raises(ValueError, match="VALENCE_AROUSAL"):
        emotion.score_responses(["\\boxed{joy}"], ["joy"], "valence_arousal")


# The release's grading per preset: exact lower-cased match for EMO-R3 and its additive coherence
# ablation, mathruler's grade_answer for the GRPO baseline and the other ablations.
GRADED = ["\\boxed{\\text{Awe}}", "\\boxed{awe.}", "\\boxed{ AWE }", "no box", "\\boxed{aw e}"]


def test_each_preset_grades_as_its_release_file():
    from mathruler.grader import extract_boxed_content, grade_answer
    release = [1.0 if grade_answer(extract_boxed_content(r), "awe") else 0.0 for r in GRADED]
    exact = [emotion.accuracy_reward(r, "awe") for r in GRADED]
    assert exact == [0, 0, 1, 0, 0] and release[0] == 1 and release != exact
    for name, preset in emotion.PRESETS.items():
        got = [preset.accuracy_fn(r, "awe") for r in GRADED]
        graded = name in ("grpo_think", "set_only", "coherence_mult", "valence_arousal")
        assert got == (release if graded else exact), name


def test_coherence_rules_of_the_ablations():
    # released emor3 / additive ablation: empty or any-case "none" -> 0.5, exact lower-case match
    add = emotion.PRESETS["coherence_add"].coherence_fn
    assert [add(a, "awe") for a in ("", "NONE", "Awe", "\\text{awe}")] == [0.5, 0.5, 1, 0]
    # multiplicative ablation (emothink_rethink.py): only "None" itself -> 0.5; grade_answer
    mult = emotion.PRESETS["coherence_mult"].coherence_fn
    assert [mult(a, "awe") for a in ("None", "none", "", "\\text{awe}")] == [0.5, 0, 0, 1]
    scores = emotion.score_responses(BATCH, LABELS, "coherence_add", ["amusement", "x", "", "fear"])
    np.testing.assert_allclose(scores.overall, [1.0, 0.1, 0.85, 0.1], atol=1e-12)


def test_score_responses_takes_expected_judge_scores():
    scores = emotion.score_responses(BATCH, LABELS, "emor3", coherence_scores=[0.2, 0.4, 1, 0],
                                     consistency_scores=np.array([0.5, 0, 0, 1]))
    np.testing.assert_allclose(scores.overall, [0.8 + 0.07 + 0.1, 0.04 + 0.1, 0.9, 0.1])
    with pytest.raises(ValueError, match="not both"):
        emotion.score_responses(BATCH, LABELS, "coherence_mult", ["a"] * 4,
                                coherence_scores=[1] * 4)


def test_judge_prompts_follow_preset_needs():
    coh, cons = emotion.judge_prompts(BATCH, EMOSET, "coherence_mult")
    assert cons is None
    assert coh[0] == emotion.coherence_prompt(GOOD, EMOSET)
    assert coh[2] == coh[3] == "Answer 'None'"
    coh, cons = emotion.judge_prompts(BATCH, EMOSET, "emor3")
    assert cons[1] == ("<image>\nCan the following text describe the image?Please answer with yes "
                       "or no.<step1>A storm.</step1>")
    assert emotion.judge_prompts(BATCH, EMOSET, "set_only") == (None, None)


def test_rollout_advantages_use_config_adv_eps():
    """config.rl.adv_eps reaches the advantages: (r - mean) / (std + eps) per group."""
    from emor3_jax.batches import PromptBatch
    from emor3_jax.rl import rollout as rollout_lib
    good = ("<step1>a</step1><step2>b</step2><step3>c</step3> \\boxed{awe}")
    bad = "no format"
    prompts = PromptBatch.create(np.ones((1, 1)), np.ones((1, 1)), np.zeros((3, 1, 1)),
                                 label_text=np.array(["awe"], object))
    ro = lambda: rollout_lib.Rollout(prompts=prompts, tokens=np.zeros((2, 1), np.int32),  # noqa
                                     logprobs=np.zeros((2, 1), np.float32),
                                     lengths=np.ones(2, np.int32), texts=[good, bad],
                                     group_size=2)
    tight = rollout_lib.score(ro(), "set_only").advantages
    loose = rollout_lib.score(ro(), "set_only", adv_eps=1.0).advantages
    r = np.array([1.0, 0.0])       # set_only: 0.9 acc + 0.1 format
    std = r.std(ddof=1)
    np.testing.assert_allclose(tight, (r - r.mean()) / (std + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(loose, (r - r.mean()) / (std + 1.0), rtol=1e-5)
