"""Hugging Face safetensors <-> Flax parameters for Qwen2.5-VL, both ways.

Name mapping (our tree path -> HF checkpoint name; HF writes the "legacy" prefixes on disk,
`visual.` and `model.`, and keeps `model.visual.` / `model.language_model.` in memory; both
are accepted when loading, the on-disk form is written):
    model/visual/patch_embed/proj/kernel [C*T*p*p, D]  <- visual.patch_embed.proj.weight
                                                          [D, C, T, p, p] (reshape, transpose)
    model/visual/blocks/<x>/kernel [depth, in, out]    <- visual.blocks.{i}.<x>.weight [out, in]
    model/visual/merger/mlp_0                          <- visual.merger.mlp.0
    model/language_model/embed_tokens/embedding        <- model.embed_tokens.weight
    model/language_model/layers/<x> [layers, ...]      <- model.layers.{i}.<x>
    model/language_model/norm/weight                   <- model.norm.weight
    lm_head/kernel [D, V]                              <- lm_head.weight [V, D] (untied only)
Linear weights transpose ([out, in] -> kernel [in, out]); norms, biases and the embedding copy.
Scanned layers stack on a leading axis. With a mesh, every tensor is read shard by shard
straight onto its NamedSharding (`jax.make_array_from_callback` + safetensors `get_slice`), so
no host ever holds the whole model.

`load_hf` takes any model source (local dir, gs:// dir, hub id; model_source.resolve), and
`save_hf` writes a directory transformers (4.57 and 5.x) and vLLM can serve: weights,
config.json, generation_config.json, preprocessor_config.json and, given the tokenizer, its
files with the Qwen2.5-VL chat template; to a local or a gs:// directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 for numpy/safetensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from emor3_jax import model_source, sharding
from emor3_jax import recipe
from emor3_jax.models.config import Qwen2_5_VLConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one of our parameters maps onto HF tensors."""
    path: tuple[str, ...]              # our tree path
    hf_names: tuple[str, ...]          # one per stacked layer (or a single name)
    kind: str                          # "linear" | "conv" | "copy"
    shape: tuple[int, ...]             # our shape (incl. the stacked axis)
    stacked: bool

    def hf_shape(self, cfg: Qwen2_5_VLConfig) -> tuple[int, ...]:
        shape = self.shape[1:] if self.stacked else self.shape
        if self.kind == "linear":
            return tuple(reversed(shape))
        if self.kind == "conv":
            v = cfg.vision
            return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        return tuple(shape)


_SUBST = {"kernel": "weight", "embedding": "weight", "mlp_0": "mlp.0", "mlp_2": "mlp.2"}


def _hf_base(path: tuple[str, ...]) -> tuple[str, str, bool]:
    """(prefix before the layer index, suffix after it, stacked?) for an HF name."""
    parts = [_SUBST.get(p, p) for p in path]
    if parts[:2] == ["model", "visual"]:
        parts = ["visual"] + parts[2:]
    elif parts[:2] == ["model", "language_model"]:
        parts = ["model"] + parts[2:]
    for stack in ("blocks", "layers"):
        if stack in parts:
            i = parts.index(stack)
            return ".".join(parts[:i + 1]), ".".join(parts[i + 1:]), True
    return ".".join(parts), "", False


def tensor_specs(abstract_params, cfg: Qwen2_5_VLConfig) -> list[TensorSpec]:
    """One TensorSpec per leaf of an (abstract, possibly boxed) parameter tree."""
    flat = jax.tree_util.tree_flatten_with_path(
        abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    specs = []
    for keypath, leaf in flat:
        path = tuple(k.key for k in keypath)
        shape = tuple(nn.unbox(leaf).shape)
        prefix, suffix, stacked = _hf_base(path)
        if stacked:
            names = tuple(f"{prefix}.{i}.{suffix}" for i in range(shape[0]))
        else:
            names = (prefix,)
        if path[-1] == "kernel":
            kind = "conv" if "patch_embed" in path else "linear"
        else:
            kind = "copy"
        specs.append(TensorSpec(path, names, kind, shape, stacked))
    return specs


def canonical_name(name: str) -> str:
    """transformers-5 in-memory names -> the on-disk names of released checkpoints."""
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


# ------------------------------------------------------------------------------------------
# Reading.

class _Checkpoint:
    """Name -> (file, on-disk name) over single or sharded safetensors; opens files lazily."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        single = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, "np") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self.files: dict[str, tuple[str, str]] = {}
        for disk_name, fname in weight_map.items():
            self.files[canonical_name(disk_name)] = (fname, disk_name)
        self._open: dict[str, Any] = {}

    def handle(self, fname: str):
        if fname not in self._open:
            path = os.path.join(self.dir, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in {INDEX_FILE} but missing")
            self._open[fname] = safe_open(path, "np")
        return self._open[fname]

    def get_slice(self, name: str):
        fname, disk = self.files[name]
        return self.handle(fname).get_slice(disk)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get_slice(name).get_shape())

    def where(self, name: str) -> str:
        return os.path.join(self.dir, self.files[name][0])


def _check_names(ckpt: _Checkpoint, specs: list[TensorSpec], cfg: Qwen2_5_VLConfig) -> None:
    expected = {n for s in specs for n in s.hf_names}
    missing = sorted(expected - set(ckpt.files))
    unexpected = sorted(set(ckpt.files) - expected)
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        log.info("%s: tied embeddings; ignoring lm_head.weight", ckpt.dir)
        unexpected.remove("lm_head.weight")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from {ckpt.dir}: {missing[:10]}"
                        + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        shown = [f"{n} (in {ckpt.files[n][0]})" for n in unexpected[:10]]
        problems.append(f"{len(unexpected)} unexpected tensors: {shown}"
                        + (" ..." if len(unexpected) > 10 else ""))
    for s in specs:
        want = s.hf_shape(cfg)
        for n in s.hf_names:
            if n in ckpt.files and ckpt.shape(n) != want:
                problems.append(f"tensor {n} in {ckpt.where(n)} has shape {list(ckpt.shape(n))}, "
                                f"config.json implies {list(want)}")
    if problems:
        raise ValueError("checkpoint does not match config.json:\n  " + "\n  ".join(problems))


def _norm_slices(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(d)) for s, d in zip(index, shape))


def _reader(ckpt: _Checkpoint, spec: TensorSpec, cfg: Qwen2_5_VLConfig, dtype
            ) -> Callable[[tuple], np.ndarray]:
    """index (slices of our shape) -> numpy block, reading only that block from disk."""

    def one(name: str, idx: tuple[slice, ...]) -> np.ndarray:
        sl = ckpt.get_slice(name)
        if spec.kind == "linear":
            block = sl[idx[1], idx[0]].T
        elif spec.kind == "conv":
            d = sl[idx[1]]                               # [d, C, T, p, p]
            block = d.reshape(d.shape[0], -1).T[idx[0]]
        else:
            block = sl[idx] if idx else sl[:]
        return np.asarray(block).astype(dtype)

    def read(index: tuple) -> np.ndarray:
        idx = _norm_slices(index, spec.shape)
        if not spec.stacked:
            return one(spec.hf_names[0], idx)
        layers = range(*idx[0].indices(spec.shape[0]))
        return np.stack([one(spec.hf_names[i], idx[1:]) for i in layers])

    return read


def load_hf(hf_dir: str, dtype=jnp.float32, mesh=None, *, param_dtype=None, rules=None,
            **runtime):
    """Load a Hugging Face Qwen2.5-VL directory -> (model, params).

    hf_dir: a local directory, a gs:// directory (copied once per host into the cache) or a
    hub repo id `org/name[@revision]` (model_source.resolve). dtype: compute dtype (and
    parameter dtype unless param_dtype is given). mesh: when given,
    every tensor is placed onto its NamedSharding from emor3_jax.sharding.param_shardings (under
    `rules`, default its LOGICAL_RULES), read shard by shard. runtime: further Qwen2_5_VLConfig
    runtime fields (remat, attention_impl).
    """
    from emor3_jax.models import qwen2_5_vl
    param_dtype = dtype if param_dtype is None else param_dtype
    hf_dir = model_source.resolve(hf_dir, "hf_dir")
    cfg = Qwen2_5_VLConfig.from_json_file(
        os.path.join(hf_dir, "config.json"), dtype=jnp.dtype(dtype).name,
        param_dtype=jnp.dtype(param_dtype).name, **runtime)
    model = qwen2_5_vl.build_model(cfg)
    boxed = qwen2_5_vl.abstract_params(model)
    specs = tensor_specs(boxed, cfg)
    ckpt = _Checkpoint(hf_dir)
    _check_names(ckpt, specs, cfg)
    np_dtype = jnp.dtype(param_dtype)
    if mesh is not None:
        shardings = sharding.param_shardings(boxed, mesh, rules)
        flat_shardings = {tuple(k.key for k in p): s for p, s in
                          jax.tree_util.tree_flatten_with_path(shardings)[0]}
    leaves = {}
    for spec in specs:
        read = _reader(ckpt, spec, cfg, np_dtype)
        if mesh is None:
            leaves[spec.path] = jnp.asarray(read(()))
        else:
            leaves[spec.path] = jax.make_array_from_callback(
                spec.shape, flat_shardings[spec.path], _memoized(read, spec.shape))
    params = _unflatten(leaves)
    return model, params


def _memoized(read, shape):
    """Read each distinct block once (replicas on several local devices share it)."""
    blocks: dict = {}

    def cached(index):
        key = tuple((s.start, s.stop, s.step) for s in _norm_slices(index, shape))
        if key not in blocks:
            blocks[key] = read(index)
        return blocks[key]
    return cached


def _unflatten(leaves: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, x in leaves.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = x
    return out


# ------------------------------------------------------------------------------------------
# Writing.

def _hf_tensors(params, cfg: Qwen2_5_VLConfig):
    """Yield (hf_name, numpy array in the parameter's dtype), one tensor at a time."""
    specs = tensor_specs(params, cfg)
    flat = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
    for spec in specs:
        x = sharding.to_host(nn.unbox(flat[spec.path]))
        blocks = list(x) if spec.stacked else [x]
        for name, b in zip(spec.hf_names, blocks):
            if spec.kind == "linear":
                b = b.T
            elif spec.kind == "conv":
                b = b.T.reshape(spec.hf_shape(cfg))
            yield name, np.ascontiguousarray(b)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or e.g. '5GB', '500MB'")
    unit = m.group(2).upper()
    mult = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_hf(params, config: Qwen2_5_VLConfig, out_dir: str, *, max_shard_size="5GB",
            tokenizer=None, min_pixels: int = recipe.MIN_PIXELS,
            max_pixels: int = recipe.MAX_PIXELS) -> str:
    """Write a servable Hugging Face directory: safetensors (sharded with an index when over
    max_shard_size), config.json, generation_config.json, preprocessor_config.json (images
    resized to [min_pixels, max_pixels], as in the run) and, given `tokenizer`, the tokenizer
    files with the Qwen2.5-VL chat template (`write_serving_files`).

    Tensors keep the parameters' dtype (bf16 or fp32). Only process 0 writes; every process
    must call it when parameters are sharded across hosts (the gather is collective). A gs://
    out_dir is written to a local temporary directory first, then uploaded.
    """
    writer = jax.process_index() == 0
    remote = model_source.is_remote(out_dir)
    tmp = None
    if remote and writer:
        os.makedirs(model_source.cache_root(), exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix="export-", dir=model_source.cache_root())
    local = tmp.name if tmp else os.fspath(out_dir)
    try:
        _write_weights(params, config, local, _parse_size(max_shard_size), writer)
        if writer:
            config.write_json(local)
            write_serving_files(local, config, tokenizer, min_pixels, max_pixels)
            if remote:
                model_source.upload(local, out_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out_dir


def _write_weights(params, config: Qwen2_5_VLConfig, out_dir: str, limit: int, writer: bool):
    """The safetensors files (+ index); every process iterates (gathers), process 0 writes."""
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        for f in os.listdir(out_dir):  # stale shards of an earlier export would confuse loaders
            if f.endswith(".safetensors") or f == INDEX_FILE:
                os.remove(os.path.join(out_dir, f))
    shard: dict[str, np.ndarray] = {}
    size = total = 0
    tmp_names: list[str] = []
    weight_map: dict[str, str] = {}

    def flush():
        """Write the tensors collected so far as the next (temporarily named) shard."""
        name = f"shard-{len(tmp_names):05d}.tmp"
        if writer:
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        tmp_names.append(name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    for name, arr in _hf_tensors(params, config):
        if size and size + arr.nbytes > limit:
            flush()
            size = 0
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if shard:
        flush()
    if not writer:
        return
    n = len(tmp_names)
    if n == 1:
        os.replace(os.path.join(out_dir, tmp_names[0]), os.path.join(out_dir, SINGLE_FILE))
        return
    final = {t: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, t in enumerate(tmp_names)}
    for t, f in final.items():
        os.replace(os.path.join(out_dir, t), os.path.join(out_dir, f))
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}},
                  f, indent=2)


def write_serving_files(out_dir: str, config: Qwen2_5_VLConfig, tokenizer=None,
                        min_pixels: int = recipe.MIN_PIXELS, max_pixels: int = recipe.MAX_PIXELS):
    """What a server needs besides weights and config.json, as Qwen2.5-VL-*-Instruct has it.

    generation_config.json: stop at any of emor3_jax/recipe.py EOS_TOKENS (`<|im_end|>`,
    `<|endoftext|>`; the model's eos without a tokenizer), no sampling defaults (the run's
    sampling is a client choice). preprocessor_config.json: Qwen2VLImageProcessor with the
    model's patch/merge geometry and the run's pixel budget (both the v5 `size` and the 4.x
    `min_pixels`/`max_pixels` spelling). Tokenizer: `tokenizer.save_portable` (loadable by
    4.57 and 5.x) with the chat template the run's prompts were rendered with
    (processing/chat.py), as chat_template.jinja and in tokenizer_config.json.
    """
    from emor3_jax.processing import chat
    from emor3_jax.processing import tokenizer as tok_lib

    t, v = config.text, config.vision
    if tokenizer is not None:
        eos = [int(tokenizer.convert_tokens_to_ids(x)) for x in recipe.EOS_TOKENS]
        pad = int(tokenizer.convert_tokens_to_ids(recipe.PAD_TOKEN))
    else:
        eos = list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else [t.eos_token_id]
        pad = t.pad_token_id
    generation = {"bos_token_id": t.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(recipe.IMAGE_MEAN),
        "image_std": list(recipe.IMAGE_STD),
        "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size}
    for name, d in (("generation_config.json", generation),
                    ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")
    if tokenizer is not None:
        tok_lib.save_portable(tokenizer, out_dir, chat_template=chat.QWEN2_5_VL_CHAT_TEMPLATE)
