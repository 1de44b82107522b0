"""Qwen2.5-VL configuration: HF `config.json` fields plus the runtime knobs JAX needs.

`Qwen2_5_VLConfig.from_hf_dict` reads both layouts transformers has written over time: the
flat one of the released checkpoints (text fields at the top level, `rope_scaling` with
`mrope_section`) and the nested one of transformers 5 (`text_config`, `rope_parameters`).
`to_hf_dict` writes the flat layout with both rope spellings, which transformers 4.57 and 5.x
and vLLM load. Runtime fields (dtype, remat, attention implementation) are not HF fields and are
never written to `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "block", "full")
ATTENTION_IMPLS = ("einsum", "blockwise", "splash", "xla", "cudnn")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT tower (HF `vision_config`)."""
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values` (C x T x P x P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_patches(self) -> int:
        """Patches in one full attention window (window_size px square)."""
        return (self.window_size // self.patch_size) ** 2

    def validate(self) -> None:
        _check(self.hidden_size % self.num_heads == 0, "vision_config.hidden_size",
               f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.head_dim % 4 == 0, "vision_config.hidden_size/num_heads",
               f"head_dim {self.head_dim} must be a multiple of 4 (2-D rotary over h and w)")
        _check(self.window_size % (self.patch_size * self.spatial_merge_size) == 0,
               "vision_config.window_size", f"{self.window_size} must be a multiple of "
               f"patch_size*spatial_merge_size={self.patch_size * self.spatial_merge_size}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        _check(not bad, "vision_config.fullatt_block_indexes",
               f"{bad} are outside [0, depth={self.depth})")
        _check(self.hidden_act in ACTIVATIONS, "vision_config.hidden_act",
               f"{self.hidden_act!r} is not one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (HF `text_config`)."""
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        _check(self.hidden_size % self.num_attention_heads == 0, "text_config.hidden_size",
               f"{self.hidden_size} is not divisible by num_attention_heads="
               f"{self.num_attention_heads}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "text_config.num_key_value_heads", f"{self.num_key_value_heads} does not divide "
               f"num_attention_heads={self.num_attention_heads}")
        _check(len(self.mrope_section) == 3 and sum(self.mrope_section) * 2 == self.head_dim,
               "rope_parameters.mrope_section", f"{list(self.mrope_section)} must have 3 entries "
               f"summing to head_dim/2 = {self.head_dim // 2}")
        _check(self.hidden_act in ACTIVATIONS, "text_config.hidden_act",
               f"{self.hidden_act!r} is not one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """Whole-model config. Hashable (frozen, tuples only) so it can sit on a Linen module."""
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True
    # ---- runtime (not HF fields) ----
    dtype: str = "float32"            # activation / compute dtype
    param_dtype: str = "float32"      # parameter storage dtype
    remat: str = "none"               # none | block (save matmuls) | full (save only layer inputs)
    attention_impl: str = "einsum"    # einsum | blockwise | splash | xla | cudnn (layers.attention)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "Qwen2_5_VLConfig":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "Qwen2_5_VLConfig":
        self.vision.validate()
        self.text.validate()
        _check(self.vision.out_hidden_size == self.text.hidden_size, "vision_config.out_hidden_size",
               f"{self.vision.out_hidden_size} must equal text hidden_size {self.text.hidden_size}")
        _check(self.remat in REMAT_POLICIES, "remat", f"{self.remat!r} not in {REMAT_POLICIES}")
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
               f"{self.attention_impl!r} not in {ATTENTION_IMPLS}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"Qwen2_5_VLConfig.{name}={getattr(self, name)!r} is not a dtype") from e
        return self

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> "Qwen2_5_VLConfig":
        """Build from a parsed HF `config.json` (flat or nested layout) plus runtime fields."""
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json: model_type is {d.get('model_type')!r}, expected "
                             "'qwen2_5_vl' (a Qwen2.5-VL checkpoint)")
        text = dict(d.get("text_config") or {})
        # Flat (released-checkpoint) layout: text fields live at the top level.
        for f in dataclasses.fields(TextConfig):
            if f.name not in text and f.name in d:
                text[f.name] = d[f.name]
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or
                    d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta", 1000000.0)))
        if "mrope_section" not in rope:
            raise ValueError("config.json: no rope_parameters/rope_scaling.mrope_section; "
                             "Qwen2.5-VL needs the 3-row mRoPE split (e.g. [16, 24, 24])")
        if text.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported "
                             "(Qwen2.5-VL checkpoints use full attention)")
        eos = text.get("eos_token_id")
        tc = TextConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=int(text["num_attention_heads"]),
            num_key_value_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            hidden_act=text.get("hidden_act", "silu"),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            mrope_section=tuple(int(x) for x in rope["mrope_section"]),
            max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=text.get("pad_token_id"),
            initializer_range=float(text.get("initializer_range", 0.02)),
        )
        v = dict(d.get("vision_config") or {})
        vrope = v.get("rope_parameters") or {}
        vc = VisionConfig(
            depth=int(v.get("depth", VisionConfig.depth)),
            hidden_size=int(v.get("hidden_size", VisionConfig.hidden_size)),
            intermediate_size=int(v.get("intermediate_size", VisionConfig.intermediate_size)),
            num_heads=int(v.get("num_heads", VisionConfig.num_heads)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
            patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            window_size=int(v.get("window_size", 112)),
            out_hidden_size=int(v.get("out_hidden_size", tc.hidden_size)),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes",
                                                               VisionConfig.fullatt_block_indexes)),
            hidden_act=v.get("hidden_act", "silu"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            tokens_per_second=int(v.get("tokens_per_second", 2)),
            initializer_range=float(v.get("initializer_range", 0.02)),
        )
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        top = {k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if d.get(k) is not None}
        return cls(vision=vc, text=tc, tie_word_embeddings=tie, **top, **runtime).validate()

    @classmethod
    def from_json_file(cls, path: str, **runtime) -> "Qwen2_5_VLConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face Qwen2.5-VL "
                                    "directory (config.json + safetensors)") from e
        try:
            return cls.from_hf_dict(d, **runtime)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The released checkpoints' layout, which transformers 4.57 and 5.x and vLLM all read:
        text fields at the top level with both rope spellings (4.57/vLLM `rope_scaling` +
        `rope_theta`, v5 `rope_parameters`; a nested `text_config` would make v5 warn about the
        legacy keys), `vision_config` nested, `dtype` and `torch_dtype`."""
        t, v = self.text, self.vision
        eos = list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id
        d = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "dtype": str(jnp.dtype(self.param_dtype)),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": t.pad_token_id,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": t.hidden_act,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "initializer_range": t.initializer_range,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section)},
                "use_sliding_window": False,
                "attention_dropout": 0.0,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": eos,
                "pad_token_id": t.pad_token_id,
                "tie_word_embeddings": self.tie_word_embeddings,
                "use_cache": True,
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "hidden_act": v.hidden_act,
                "tokens_per_second": v.tokens_per_second,
                "initializer_range": v.initializer_range,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }
        text = d.pop("text_config")
        del text["model_type"]
        # "mrope" is spelled "default" + mrope_section, as 4.57 rewrites it (vLLM refuses a
        # `type` that differs from `rope_type`)
        text["rope_scaling"] = {"type": "default", "rope_type": "default",
                                "mrope_section": list(t.mrope_section)}
        text["rope_theta"] = t.rope_theta
        return {**text, **d, "torch_dtype": d["dtype"]}

    def write_json(self, out_dir: str) -> str:
        path = os.path.join(out_dir, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path


def _check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"Qwen2.5-VL config field {field}: {msg}")


# ------------------------------------------------------------------------------------------
# Built-in configs.

def qwen2_5_vl_3b_config(**runtime) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B-Instruct widths and depths (vocab 151936, tied head)."""
    return Qwen2_5_VLConfig(**runtime).validate()


def qwen2_5_vl_7b_config(**runtime) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct widths and depths (vocab 152064, untied head), as its config.json:
    text 3584 wide, 28 layers, 28 query / 4 KV heads, MLP 18944; the vision tower is the 3B's
    (depth 32, 1280 wide, 16 heads, MLP 3420, full attention in blocks 7/15/23/31) with a
    merger into 3584."""
    text = TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      rope_theta=1000000.0, mrope_section=(16, 24, 24))
    vision = VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                          out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31))
    return Qwen2_5_VLConfig(vision=vision, text=text, tie_word_embeddings=False,
                            **runtime).validate()


def tiny_config(*, vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                mrope_section: tuple[int, int, int] | None = None,
                vision_depth: int = 3, vision_hidden_size: int = 32,
                vision_intermediate_size: int = 64, vision_heads: int = 2,
                fullatt_block_indexes: tuple[int, ...] = (1,), tie_word_embeddings: bool = True,
                image_token_id: int | None = None, special_token_ids: dict[str, int] | None = None,
                rope_theta: float = 10000.0, **runtime) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL-shaped model small enough for CPU tests and the demo.

    The special token ids default to the last ids of the vocabulary (vision_start, vision_end,
    image_pad, video_pad, bos/eos), so any vocab_size works; pass `special_token_ids`
    (keys as in HF config: image_token_id, video_token_id, vision_start_token_id,
    vision_end_token_id, bos_token_id, eos_token_id, pad_token_id) to use a tokenizer's ids.
    Vision keeps the real patch (14), merge (2) and window (112 px) geometry.
    """
    head_dim = hidden_size // num_heads
    if mrope_section is None:  # Qwen's 16/24/24 proportions of head_dim/2
        half = head_dim // 2
        t = half // 4
        h = (half - t) // 2
        mrope_section = (t, h, half - t - h)
    ids = {"vision_start_token_id": vocab_size - 6, "vision_end_token_id": vocab_size - 5,
           "image_token_id": vocab_size - 4, "video_token_id": vocab_size - 3,
           "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
           "pad_token_id": vocab_size - 2}
    if image_token_id is not None:
        ids["image_token_id"] = image_token_id
    ids.update(special_token_ids or {})
    text = TextConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      rope_theta=rope_theta, mrope_section=tuple(mrope_section),
                      max_position_embeddings=32768, bos_token_id=ids["bos_token_id"],
                      eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    vision = VisionConfig(depth=vision_depth, hidden_size=vision_hidden_size,
                          intermediate_size=vision_intermediate_size, num_heads=vision_heads,
                          out_hidden_size=hidden_size,
                          fullatt_block_indexes=tuple(fullatt_block_indexes))
    return Qwen2_5_VLConfig(
        vision=vision, text=text, image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"], tie_word_embeddings=tie_word_embeddings,
        **runtime).validate()


# Named configs for `config.model.tiny` (the CPU demo and tests).
TINY_CONFIGS = {
    # ~1M parameters: unit tests.
    "tiny": dict(),
    # ~5M parameters: the benchmarks' "small" model (bench/forward.py, bench/judge.py).
    "demo": dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                 num_kv_heads=2, vision_depth=4, vision_hidden_size=128,
                 vision_intermediate_size=352, vision_heads=4, fullatt_block_indexes=(3,)),
    # 0.78M parameters (1,024-id vocabulary): the CPU demo policy, configs/demo_cpu.py.
    "demo_small": dict(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                       num_kv_heads=2, vision_depth=2, vision_hidden_size=64,
                       vision_intermediate_size=176, vision_heads=2, fullatt_block_indexes=(1,)),
}


def get_tiny_config(name: str, **overrides) -> Qwen2_5_VLConfig:
    if name not in TINY_CONFIGS:
        raise ValueError(f"config.model.tiny={name!r}: unknown tiny config; choose one of "
                         f"{sorted(TINY_CONFIGS)}")
    return tiny_config(**{**TINY_CONFIGS[name], **overrides})
