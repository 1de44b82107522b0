"""Qwen2.5-VL chat prompts as token ids (EasyR1 conventions), rendered in plain Python.

The official Jinja template is kept below and the Python renderer is tested against
transformers' `apply_chat_template(..., chat_template=QWEN2_5_VL_CHAT_TEMPLATE)`; rendering in
Python keeps the data pipeline free of Jinja and of the tokenizer's own (possibly different)
template. Prompt strings use the `<image>` marker (emor3_jax/recipe.py IMAGE_MARKER) where the
image goes; a prompt without a marker gets its image(s) first, as in the EMO-R3 task prompts.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from emor3_jax import recipe

# The chat template of Qwen/Qwen2.5-VL-3B-Instruct (tokenizer_config.json / chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
# The system turn the template inserts when the conversation has none.
_TEMPLATE_DEFAULT_SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------------------------
# Prompt texts.

def task_prompt(question: str, prompt_format: str = "set") -> str:
    """The user text of a task: question stripped, the format's separator and instruction.

    `prompt_format` is a key of emor3_jax/recipe.py PROMPT_FORMATS ("set", "grpo_think", "plain");
    "plain" is the stripped question alone (zero-shot / SFT style).
    """
    if prompt_format not in recipe.PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of "
                         f"{sorted(recipe.PROMPT_FORMATS)} (emor3_jax/recipe.py PROMPT_FORMATS)")
    separator, instruction = recipe.PROMPT_FORMATS[prompt_format]
    question = question.strip()
    return question if instruction is None else question + separator + instruction


def user_content(text: str, num_images: int) -> str | list[dict[str, Any]]:
    """Chat `content` of one user turn (EasyR1 `_build_messages`).

    With `<image>` markers the text is split at them and each marker becomes an image entry
    (their count must equal `num_images`); without markers the images come first, then the
    text. No image and no marker gives a plain string.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    pieces = text.split(recipe.IMAGE_MARKER)
    markers = len(pieces) - 1
    if markers == 0 and num_images == 0:
        return text
    if markers == 0:
        content = [{"type": "image"} for _ in range(num_images)]
        if text:
            content.append({"type": "text", "text": text})
        return content
    if markers != num_images:
        raise ValueError(f"prompt has {markers} {recipe.IMAGE_MARKER} marker(s) but {num_images} "
                         f"image(s) were given: {text[:80]!r}")
    content = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def build_messages(text: str, num_images: int,
                   system_prompt: str | None = recipe.DEFAULT_SYSTEM_PROMPT
                   ) -> list[dict[str, Any]]:
    """[system, user] messages for one prompt (`system_prompt=None`: the template adds its own)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return messages + [{"role": "user", "content": user_content(text, num_images)}]


def _is_image(item: dict[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video(item: dict[str, Any]) -> bool:
    return item.get("type") == "video" or "video" in item


def render_chat(messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                add_vision_id: bool = False) -> str:
    """`QWEN2_5_VL_CHAT_TEMPLATE` rendered in Python (same output as transformers' Jinja)."""
    out, images, videos = [], 0, 0
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index == 0 and role != "system":
            out.append(f"{_IM_START}system\n{_TEMPLATE_DEFAULT_SYSTEM}{_IM_END}\n")
        out.append(f"{_IM_START}{role}\n")
        if isinstance(content, str):
            out.append(content)
        else:
            for item in content:
                if _is_image(item):
                    images += 1
                    if add_vision_id:
                        out.append(f"Picture {images}: ")
                    out.append(recipe.VISION_START + recipe.IMAGE_PAD + recipe.VISION_END)
                elif _is_video(item):
                    videos += 1
                    if add_vision_id:
                        out.append(f"Video {videos}: ")
                    out.append(recipe.VISION_START + recipe.VIDEO_PAD + recipe.VISION_END)
                elif "text" in item:
                    out.append(item["text"])
        out.append(f"{_IM_END}\n")
    if add_generation_prompt:
        out.append(f"{_IM_START}assistant\n")
    return "".join(out)


def render_prompt(text: str, num_images: int,
                  system_prompt: str | None = recipe.DEFAULT_SYSTEM_PROMPT) -> str:
    """Full prompt string: system turn, one user turn (images + text), assistant prefix.

    Each image appears as a single `<|image_pad|>`; `expand_image_pads` / `encode_prompt`
    widen it to the image's token count.
    """
    return render_chat(build_messages(text, num_images, system_prompt), add_generation_prompt=True)


def expand_image_pads(prompt: str, token_counts: Sequence[int]) -> str:
    """Replace the i-th `<|image_pad|>` by token_counts[i] copies (what the HF processor does)."""
    pieces = prompt.split(recipe.IMAGE_PAD)
    if len(pieces) - 1 != len(token_counts):
        raise ValueError(f"prompt holds {len(pieces) - 1} {recipe.IMAGE_PAD} but "
                         f"{len(token_counts)} image token counts were given")
    out = [pieces[0]]
    for count, piece in zip(token_counts, pieces[1:]):
        out += [recipe.IMAGE_PAD * int(count), piece]
    return "".join(out)


def _image_token_counts(grid_thw_list, merge_size: int) -> list[int]:
    from emor3_jax.processing.image import num_image_tokens
    return [num_image_tokens(g, merge_size) for g in np.asarray(grid_thw_list).reshape(-1, 3)]


# --------------------------------------------------------------------------------------------
# Token ids.

def encode_prompt(tokenizer, text_with_marker: str, grid_thw_list=(), *,
                  merge_size: int = recipe.MERGE_SIZE,
                  system_prompt: str | None = recipe.DEFAULT_SYSTEM_PROMPT) -> np.ndarray:
    """Prompt token ids [L] int32: chat-rendered, each image pad widened to its token count.

    `grid_thw_list` has one (t, h, w) per image (empty for a text-only prompt). Equal to
    tokenizing `expand_image_pads(render_prompt(...), counts)` with the HF tokenizer (no BOS),
    but tokenizes the short string and repeats the pad id, since special tokens always split.
    """
    counts = _image_token_counts(grid_thw_list, merge_size)
    prompt = render_prompt(text_with_marker, len(counts), system_prompt)
    ids = np.asarray(tokenizer.encode(prompt, add_special_tokens=False), dtype=np.int32)
    pad_id = tokenizer.convert_tokens_to_ids(recipe.IMAGE_PAD)
    is_pad = ids == pad_id
    if int(is_pad.sum()) != len(counts):
        raise ValueError(f"prompt tokenizes to {int(is_pad.sum())} {recipe.IMAGE_PAD} for "
                         f"{len(counts)} image(s); does the text contain a literal "
                         f"{recipe.IMAGE_PAD}? {text_with_marker[:80]!r}")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[is_pad] = counts
    return np.repeat(ids, repeats)


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """1 at image-pad positions, 0 elsewhere (int32, same shape), as HF's `mm_token_type_ids`."""
    return (np.asarray(input_ids) == image_token_id).astype(np.int32)


def decode_response(tokenizer, ids, length: int | None = None) -> str:
    """Response text the rewards read: the first `length` ids, special tokens skipped."""
    ids = np.asarray(ids).reshape(-1)
    if length is not None:
        ids = ids[:int(length)]
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)
