"""The released EMO-R3 recipe's constants: the one source of truth for special tokens, image
processing, labels, prompt templates and released epochs. Library modules import them from
here; `configs/base.py` re-exports them for config files and builds the run config around them.
Every deviation from the released recipe is a named config field, never an edit of a constant.
"""

# --------------------------------------------------------------------------------------------
# Qwen2.5-VL special tokens (ids of the Qwen2 tokenizer shipped with Qwen2.5-VL).
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
PAD_TOKEN = "<|endoftext|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# Tokens the policy must never sample inside a response.
FORBIDDEN_IN_RESPONSE = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD)
# Any of these ends a response.
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The user-turn marker for "the image goes here" in prompt strings (EasyR1 convention).
IMAGE_MARKER = "<image>"

# --------------------------------------------------------------------------------------------
# Image processing (Qwen2-VL smart_resize; one LLM token per 28x28 pixels).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 262_144
MAX_PIXELS = 4_194_304
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------
# Label sets, one per data set (order = ClassLabel index order).
MIKELS_LABELS = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear",
                 "sadness")
LABELS = {
    "emoset2k": MIKELS_LABELS,
    "emotion6": ("anger", "disgust", "fear", "joy", "sadness", "surprise"),
    # WebEmo's 7 mid-level categories of Parrott's hierarchy (it has no "disgust")
    "webemo": ("anger", "confusion", "fear", "joy", "love", "sadness", "surprise"),
    "emo_synth": MIKELS_LABELS,
}

# Valence (+/-) and arousal (high/low) of each Mikels label, for the valence/arousal reward.
VALENCE_AROUSAL = {
    "amusement": ("positive", "high"),
    "anger": ("negative", "high"),
    "awe": ("positive", "low"),
    "contentment": ("positive", "low"),
    "disgust": ("negative", "high"),
    "excitement": ("positive", "high"),
    "fear": ("negative", "high"),
    "sadness": ("negative", "low"),
}


def question_text(labels):
    """The data set's question: its label list in the EmoSet sentence ("a, b, or c.")."""
    listed = ", ".join(labels[:-1]) + ", or " + labels[-1]
    return ("Which emotion best describes the image? Answer the question using one emotional "
            f"category: {listed}.")


# --------------------------------------------------------------------------------------------
# Prompts (exact strings of the released code).
SET_INSTRUCTION = (
    "You First think the emotional meaning step by step, and then provide the final answer.\n"
    "\n"
    "The reasoning process MUST follow the structure below:\n"
    "<step1>Identify what in the scene could trigger emotion (action, face, environment).</step1>\n"
    "<step2>Describe how a human would feel about it.</step2>\n"
    "<step3>Conclude if the emotion is positive or negative, and if it's high or low arousal.</step3>\n"
    "\n"
    "The final answer MUST BE put in \\boxed{}."
)
GRPO_THINK_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
    "answer MUST BE put in \\boxed{}."
)
# Prompt formats by name: (separator, instruction) appended after the stripped question.
# set: the release's EMO-R3 template (question, blank line, SET); grpo_think: its `math.jinja`
# (`{{ content | trim }} You FIRST think ...`: one space); plain: the question alone.
PROMPT_FORMATS = {"set": ("\n\n", SET_INSTRUCTION), "grpo_think": (" ", GRPO_THINK_INSTRUCTION),
                  "plain": ("", None)}

COHERENCE_TEMPLATE = ("{text}\nWhich emotion best describes the text above?\n"
                      "Answer the question using one emotional category (one word only): {labels}.")
CONSISTENCY_TEMPLATE = (IMAGE_MARKER + "\nCan the following text describe the image?"
                        "Please answer with yes or no.{text}")
JUDGE_NONE_TEXT_PROMPT = "Answer 'None'"
JUDGE_NONE_IMAGE_PROMPT = IMAGE_MARKER + "\nAnswer 'None'"


# --------------------------------------------------------------------------------------------
METHODS = ("emor3", "grpo", "dapo", "sft", "cold_start")

# Training epochs of the release's scripts, by training set and method family (EMO-R3: emor3,
# cold_start; GRPO: grpo, dapo): EmoSet-2k 20 (examples/qwen2_5_vl_3b_emor3.sh); Emotion6
# (setting B) 30 for EMO-R3 (examples/fyy/new/qwen2_5_vl_3b_emothink_new_rethink_image_
# emotion6.sh) and 25 for naive GRPO (examples/fyy/qwen2_5_vl_3b_naive_grpo_emotion6.sh), both
# in the release's history. train.epochs = 0 takes these; anything else not listed: 20.
RELEASED_EPOCHS = {("emotion6", "emor3"): 30, ("emotion6", "grpo"): 25}
DEFAULT_EPOCHS = 20


def released_epochs(train_set: str, method: str) -> int:
    family = "grpo" if method in ("grpo", "dapo") else "emor3"
    return RELEASED_EPOCHS.get((train_set, family), DEFAULT_EPOCHS)
