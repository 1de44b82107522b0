"""fsdp 2 x tensor 4 on 8 virtual CPU devices gives the same logits as one device."""
import re

import jax
import jax.extend.core
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from emor3_jax import sharding
from emor3_jax.models import layers, qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.processing import rope_index, vision
from qwen_testutil import chat_row, hf_model, images, left_pad


@pytest.fixture(scope="module")
def setup(tmp_path_factory, devices8):
    cfg = tiny_config(tie_word_embeddings=False)
    d = str(tmp_path_factory.mktemp("hf_mesh"))
    hf_model(cfg, seed=5).save_pretrained(d)
    pv, grid = images([("astronaut", (200, 280)), ("chelsea", (240, 160))])
    rng = np.random.default_rng(0)
    ids, mask = left_pad([chat_row(cfg, rng, [3, "img", 4, "img", 2], grid),
                          chat_row(cfg, rng, [12], [])], cfg.text.pad_token_id)
    vin = vision.build_vision_inputs_for(cfg, grid)
    pos, deltas = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id)
    return d, (ids, mask, pv, vin, pos, deltas)


def _forward_and_decode(model, params, inputs, batch_sharding=None, replicated=None):
    ids, mask, pv, vin, pos, deltas = inputs
    length = ids.shape[1]

    def run(p, ids, mask, pv, vin, pos, deltas):
        logits = model.apply({"params": p}, ids, mask, pv, vision_inputs=vin,
                             position_ids=pos).logits
        last, cache = model.apply({"params": p}, ids, mask, max_len=length + 1, pixel_values=pv,
                                  vision_inputs=vin, position_ids=pos, method=model.prefill)
        step_pos = rope_index.decode_position_ids(deltas, mask.sum(1))
        nxt, _ = model.apply({"params": p}, ids[:, -1:], step_pos, cache, length,
                             method=model.decode)
        return logits, last, nxt

    args = (ids, mask, pv, vin, pos, deltas)
    if batch_sharding is not None:
        args = (jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding),
                jax.device_put(pv, replicated), jax.device_put(vin, replicated),
                jax.device_put(pos, NamedSharding(batch_sharding.mesh, P(None, ("data", "fsdp")))),
                jax.device_put(deltas, NamedSharding(batch_sharding.mesh, P(("data", "fsdp")))))
    mesh = None if batch_sharding is None else batch_sharding.mesh
    with layers.kernel_mesh(mesh):      # activations constrained to their logical axes
        return [np.asarray(x) for x in jax.jit(run)(params, *args)]


def test_fsdp2_tensor4_equals_single_device(setup):
    d, inputs = setup
    model, params = qwen2_5_vl.load_hf(d)
    single = _forward_and_decode(model, params, inputs)

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model_m, params_m = qwen2_5_vl.load_hf(d, mesh=mesh)
    q = params_m["model"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 4)
    emb = params_m["model"]["language_model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == P("tensor", "fsdp")
    cache_sh = qwen2_5_vl.cache_shardings(model.config, mesh, batch_size=2, max_len=64)
    assert cache_sh.k.spec == P(None, ("data", "fsdp"), None, None, None)  # 2 KV heads, tensor 4
    assert cache_sh.key_mask.spec == P(("data", "fsdp"), None)
    # sharded loading reads the same numbers
    jax.tree.map(np.testing.assert_array_equal, params, params_m)
    sharded = _forward_and_decode(model_m, params_m, inputs,
                                  sharding.batch_sharding(mesh, 2), sharding.replicated(mesh))
    # fp32; sharded contractions only change the summation order
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def _constraint_specs(jaxpr) -> list:
    """The PartitionSpecs of every sharding constraint in `jaxpr` and its sub-jaxprs."""
    out = [eqn.params["sharding"].spec for eqn in jaxpr.eqns
           if eqn.primitive.name == "sharding_constraint"]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        out += _constraint_specs(sub)
    return out


def test_decoder_activations_carry_their_logical_axes(devices8):
    """Traced under a mesh, the decoder's residual stream (rows over data x fsdp), queries and
    keys/values (heads over tensor; 2 KV heads do not split 4 ways) and MLP activation
    (intermediate over tensor) are constrained, so a tensor-parallel run cannot quietly
    replicate them; without a mesh nothing is constrained."""
    cfg = tiny_config()                        # 4 query heads, 2 KV heads, MLP 128
    model = qwen2_5_vl.build_model(cfg)
    params = jax.eval_shape(lambda: qwen2_5_vl.init_params(model, jax.random.key(0)))
    ids = np.full((4, 8), 5, np.int32)
    forward = lambda p: model.apply({"params": p}, ids, np.ones_like(ids)).logits
    assert _constraint_specs(jax.make_jaxpr(forward)(params).jaxpr) == []
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    with layers.kernel_mesh(mesh):
        specs = _constraint_specs(jax.make_jaxpr(forward)(params).jaxpr)
    rows = ("data", "fsdp")
    assert P(rows, None, None) in specs                       # residual stream
    assert P(rows, None, "tensor", None) in specs             # queries
    assert P(rows, None, None, None) in specs                 # keys / values
    assert P(rows, None, "tensor") in specs                   # MLP activation


def test_init_params_on_mesh(devices8):
    cfg = tiny_config()
    model = qwen2_5_vl.build_model(cfg)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    params = qwen2_5_vl.init_params(model, jax.random.key(0), mesh=mesh)
    shardings = qwen2_5_vl.param_shardings(model, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 params, shardings)
    up = params["model"]["visual"]["blocks"]["mlp"]["up_proj"]["kernel"]
    assert up.shape == (cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.intermediate_size)
    assert up.sharding.spec == P(None, "fsdp", "tensor")


def test_a_parameter_the_mesh_cannot_split_is_named(devices8, caplog):
    """A mesh axis that does not divide a parameter's dimension replicates it: never silently."""
    import flax.linen as nn
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    boxed = {"lm": {"embedding": nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct((6, 64), np.float32), names=("vocab", "embed"))}}
    out = sharding.param_shardings(boxed, mesh)
    assert out["lm"]["embedding"].spec == P(None, "fsdp")
    assert re.search(r"parameter lm/embedding \(6, 64\): dimension 0 \(6\) is not divisible by "
                     r"mesh axis 'tensor' \(x4\); it is replicated", caplog.text)
