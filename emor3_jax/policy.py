"""The policy a run trains: model, parameters and tokenizer, built from `config.model`.

Three sources: a Hugging Face model (`model.hf_dir`: a local or gs:// directory or a hub repo id,
model_source.resolve; weights streamed onto the mesh), a
built-in tiny config with random weights and the package's demo tokenizer (`model.tiny`, the
CPU demo), or a built-in architecture without weights (`model.arch`, shapes only, for AOT).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from emor3_jax import model_source, sharding
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import Qwen2_5_VLConfig
from emor3_jax.processing import tokenizer as tok_lib

log = logging.getLogger(__name__)

ARCHS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b")


@dataclasses.dataclass
class Policy:
    model: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration
    params: Any
    tokenizer: Any
    ids: tok_lib.TokenIds

    @property
    def config(self) -> Qwen2_5_VLConfig:
        return self.model.config


def runtime_fields(model_config) -> dict:
    return dict(dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                remat=model_config.remat, attention_impl=model_config.attention)


def _check_vocab(config: Qwen2_5_VLConfig, ids: tok_lib.TokenIds, where: str) -> None:
    if ids.vocab_size > config.text.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {ids.vocab_size} ids but the model's vocab "
                         f"is {config.text.vocab_size}; use the tokenizer of this checkpoint")
    if ids.image_pad != config.image_token_id:
        raise ValueError(f"{where}: tokenizer <|image_pad|> id {ids.image_pad} != model "
                         f"image_token_id {config.image_token_id}; tokenizer and model disagree")


def load_tokenizer(model_config, hf_dir: str | None = None):
    """`model.tokenizer`: "demo" (built-in), a model source (local/gs:// directory, hub id), or ""
    (the one in hf_dir; `hf_dir`: model.hf_dir already resolved to a local directory)."""
    name = model_config.tokenizer
    if name == "demo" or (not name and model_config.tiny):
        return tok_lib.build_demo_tokenizer()
    if name:
        return tok_lib.load_tokenizer(name, field="config.model.tokenizer")
    if not model_config.hf_dir:
        raise ValueError("config.model: set hf_dir (a Qwen2.5-VL directory) or tokenizer")
    return tok_lib.load_tokenizer(hf_dir or model_config.hf_dir, field="config.model.hf_dir")


def tiny_model_config(model_config, ids: tok_lib.TokenIds) -> Qwen2_5_VLConfig:
    """A named tiny config whose special ids and vocab follow the tokenizer."""
    special = {"image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
               "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
               "bos_token_id": ids.pad, "eos_token_id": ids.im_end, "pad_token_id": ids.pad}
    return qwen2_5_vl.get_tiny_config(model_config.tiny, vocab_size=ids.vocab_size,
                                      special_token_ids=special, **runtime_fields(model_config))


def arch_config(model_config) -> Qwen2_5_VLConfig:
    """Built-in Qwen2.5-VL-3B / 7B shapes (for AOT compilation without a checkpoint)."""
    from emor3_jax.models import config as cfg_lib
    rt = runtime_fields(model_config)
    if model_config.arch == "qwen2.5-vl-3b":
        return cfg_lib.qwen2_5_vl_3b_config(**rt)
    if model_config.arch == "qwen2.5-vl-7b":
        return cfg_lib.qwen2_5_vl_7b_config(**rt)
    raise ValueError(f"config.model.arch={model_config.arch!r}; choose one of {ARCHS}")


def check_model_config(model_config) -> None:
    """Fail before anything is compiled or loaded when the model source is unusable."""
    if model_config.tokenizer and model_config.tokenizer != "demo":
        model_source.check(model_config.tokenizer, "config.model.tokenizer")
    if model_config.hf_dir:
        model_source.check(model_config.hf_dir, "config.model.hf_dir")
        if model_source.classify(model_config.hf_dir) == "local" and not os.path.isfile(
                os.path.join(model_config.hf_dir, "config.json")):
            raise FileNotFoundError(
                f"config.model.hf_dir={model_config.hf_dir!r} has no config.json; point it at a "
                "Hugging Face Qwen2.5-VL directory (e.g. Qwen2.5-VL-3B-Instruct)")
    elif not model_config.tiny:
        raise ValueError("config.model: set hf_dir=<Qwen2.5-VL directory> (or tiny=demo for the "
                         "CPU demo); the model has no weights otherwise")


def build_policy(model_config, mesh, rng) -> Policy:
    """Model + params (placed on `mesh`) + tokenizer from `config.model`."""
    check_model_config(model_config)
    hf_dir = model_config.hf_dir and model_source.resolve(model_config.hf_dir,
                                                          "config.model.hf_dir")
    tokenizer = load_tokenizer(model_config, hf_dir)
    ids = tok_lib.token_ids(tokenizer)
    if model_config.hf_dir:
        model, params = qwen2_5_vl.load_hf(hf_dir, mesh=mesh,
                                           dtype=jnp.dtype(model_config.dtype),
                                           param_dtype=jnp.dtype(model_config.param_dtype),
                                           remat=model_config.remat,
                                           attention_impl=model_config.attention)
        where = model_config.hf_dir
    else:
        model = qwen2_5_vl.build_model(tiny_model_config(model_config, ids))
        params = qwen2_5_vl.init_params(model, rng, mesh)
        where = f"model.tiny={model_config.tiny}"
    _check_vocab(model.config, ids, where)
    log.info("policy: %s, %.2fM parameters", where, qwen2_5_vl.count_params(params) / 1e6)
    return Policy(model=model, params=params, tokenizer=tokenizer, ids=ids)


def reference_params(params, compute_dtype):
    """The frozen reference: a separate copy (donation of the train state cannot touch it) in
    the compute dtype (`model.dtype`). It is only ever run forward, where every weight is cast to
    the compute dtype anyway, so fp32 master weights need not be kept twice (the release's FSDP
    reference is bf16 too). Works on arrays and on ShapeDtypeStructs (AOT)."""
    def cast(x):
        y = _in_dtype(x, compute_dtype, x.sharding)
        return x.copy() if y is x else y
    return jax.tree.map(cast, params)


def _in_dtype(x, dtype, sharding):
    """A float array (or ShapeDtypeStruct) in `dtype`, laid out by `sharding`; other dtypes
    keep theirs. An array already so is returned as it is."""
    to = jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, to, sharding=sharding)
    if to == x.dtype and x.sharding == sharding:
        return x
    return jax.device_put(x.astype(to), sharding)    # cast in place, then lay out


def sampling_mesh_shape(config, num_devices: int) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) of `config.rollout.mesh` over `num_devices` (checked), or None when
    its sizes are all 0: the sampler then runs on the training mesh."""
    m = config.rollout.mesh
    if not (m.data or m.fsdp or m.tensor):
        return None
    return sharding.mesh_shape(m.data, m.fsdp, m.tensor, num_devices, "config.rollout.mesh")


def sampling_mesh(config, training_mesh):
    """The mesh the rollout sampler, the evaluation and the judge run on: `config.rollout.mesh`
    (the same devices in another layout), or the training mesh."""
    devices = list(training_mesh.devices.flat)
    shape = sampling_mesh_shape(config, len(devices))
    if shape is None:
        return training_mesh
    return sharding.make_mesh(*shape, devices=devices, field="config.rollout.mesh")


def sampling_params(model, params, mesh):
    """The weights the sampler (and a policy judge) reads: the policy in the compute dtype,
    laid out for `mesh`; one cast per step, as the release hands vLLM bf16 weights.

    Every forward casts each weight to the compute dtype anyway, so the samples are the same;
    what changes is what a decode step moves: it reads every weight once per token, and fp32
    masters sharded by FSDP are all-gathered (4 bytes per parameter) at every step. Works on
    arrays and on ShapeDtypeStructs (AOT)."""
    dtype = model.config.compute_dtype
    return jax.tree.map(lambda x, where: _in_dtype(x, dtype, where), params,
                        qwen2_5_vl.param_shardings(model, mesh, sharding.SAMPLING_RULES))


def check_update_precision(config) -> None:
    """Warn when the parameter dtype cannot hold the run's learning-rate steps: an AdamW step
    moves a weight by about lr, and a weight of magnitude ~1 (every RMSNorm weight) keeps a
    step only if lr is at least half its ulp (bf16: 2^-8 = 3.9e-3)."""
    param_dtype = jnp.dtype(config.model.param_dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        return
    half_ulp = float(jnp.finfo(param_dtype).eps) / 2
    lrs = {"optim.lr": float(config.optim.lr)}
    if config.sft.steps:
        lrs["sft.lr"] = float(config.sft.lr)
    for field, lr in lrs.items():
        if 0 < lr < half_ulp:
            log.warning(
                "config.model.param_dtype=%s cannot represent config.%s=%g steps: a weight near "
                "1.0 (every RMSNorm weight) has a %s ulp of %.2g, so an AdamW update of ~lr rounds "
                "away and those weights never change. Use model.param_dtype=float32 (fp32 master "
                "weights) with model.dtype=bfloat16 compute, as the released recipe does.",
                param_dtype.name, field, lr, param_dtype.name, 2 * half_ulp)
