"""HF checkpoints <-> our parameters: round trips, sharded files, dtypes, errors, config.json."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration

from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import Qwen2_5_VLConfig, qwen2_5_vl_3b_config, tiny_config
from gcs_testutil import gcs  # noqa: F401  (fixture)
from qwen_testutil import chat_row, hf_logits, hf_model, images, left_pad, max_diff_valid


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=False, vision_depth=2, fullatt_block_indexes=(1,))
    model = hf_model(cfg, seed=7)
    d = str(tmp_path_factory.mktemp("hf_src"))
    model.save_pretrained(d)
    pv, grid = images([("coffee", (180, 260))])
    rng = np.random.default_rng(0)
    ids, mask = left_pad([chat_row(cfg, rng, [4, "img", 6], grid), chat_row(cfg, rng, [5], [])],
                         cfg.text.pad_token_id)
    return cfg, model, d, (ids, mask, pv, grid)


def _file_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "np") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_save_hf_then_from_pretrained(ref, tmp_path):
    cfg, hf, src, (ids, mask, pv, grid) = ref
    model, params = qwen2_5_vl.load_hf(src)
    ours = model.apply({"params": params}, ids, mask, pv, grid).logits
    out = qwen2_5_vl.save_hf(params, model.config, str(tmp_path / "export"))
    # same tensors, same names as transformers' own save_pretrained
    a, b = _file_tensors(src), _file_tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.text_config.num_hidden_layers == cfg.text.num_hidden_layers
    assert list(reloaded.config.vision_config.fullatt_block_indexes) == [1]
    expected = hf_logits(hf, cfg, ids, mask, pv, grid)
    np.testing.assert_allclose(hf_logits(reloaded, cfg, ids, mask, pv, grid), expected, atol=1e-6)
    assert max_diff_valid(ours, expected, mask) <= 1e-4


def test_sharded_checkpoints_both_ways(ref, tmp_path):
    cfg, hf, src, (ids, mask, pv, grid) = ref
    hf.save_pretrained(str(tmp_path / "hf_sharded"), max_shard_size="100KB")
    assert os.path.exists(tmp_path / "hf_sharded" / "model.safetensors.index.json")
    _, p_single = qwen2_5_vl.load_hf(src)
    model, p_sharded = qwen2_5_vl.load_hf(str(tmp_path / "hf_sharded"))
    jax.tree.map(np.testing.assert_array_equal, p_single, p_sharded)
    out = qwen2_5_vl.save_hf(p_sharded, model.config, str(tmp_path / "ours_sharded"),
                             max_shard_size="200KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded, cfg, ids, mask, pv, grid),
                               hf_logits(hf, cfg, ids, mask, pv, grid), atol=1e-6)


def test_bf16_round_trip_and_tied_head(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, vision_depth=1, fullatt_block_indexes=())
    hf = hf_model(cfg, seed=2).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "src"))
    assert "lm_head.weight" not in _file_tensors(str(tmp_path / "src"))
    model, params = qwen2_5_vl.load_hf(str(tmp_path / "src"), dtype=jnp.bfloat16)
    assert "lm_head" not in params
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    qwen2_5_vl.save_hf(params, model.config, str(tmp_path / "out"))
    a, b = _file_tensors(str(tmp_path / "src")), _file_tensors(str(tmp_path / "out"))
    assert sorted(a) == sorted(b) and b["model.norm.weight"].dtype == ml_dtypes.bfloat16
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
    assert back.config.tie_word_embeddings and back.dtype == torch.bfloat16
    # bf16 compute runs end to end and stays close to fp32 compute on the same weights
    pv, grid = images([("coffee", (120, 160))])
    rng = np.random.default_rng(1)
    ids, mask = left_pad([chat_row(cfg, rng, [3, "img", 4], grid), chat_row(cfg, rng, [6], [])],
                         cfg.text.pad_token_id)
    m32, p32 = qwen2_5_vl.load_hf(str(tmp_path / "src"))
    lo32 = m32.apply({"params": p32}, ids, mask, pv, grid).logits
    lo16 = model.apply({"params": params}, ids, mask, pv, grid).logits
    assert lo16.dtype == jnp.float32  # logits are accumulated in fp32 whatever the dtype
    assert max_diff_valid(lo16, lo32, mask) < 0.1 * float(jnp.abs(lo32).max())


def test_transformers5_names_are_accepted(ref, tmp_path):
    """Checkpoints written with in-memory names (model.visual., model.language_model.) load."""
    _, _, src, _ = ref
    renamed = {}
    for k, v in _file_tensors(src).items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    d = tmp_path / "renamed"
    d.mkdir()
    save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    _, p1 = qwen2_5_vl.load_hf(src)
    _, p2 = qwen2_5_vl.load_hf(str(d))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def _corrupt(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst)
    tensors = _file_tensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    conf = json.load(open(os.path.join(src, "config.json")))
    if edit_config:
        edit_config(conf)
    json.dump(conf, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_clear_errors(ref, tmp_path):
    _, _, src, _ = ref
    d = _corrupt(src, str(tmp_path / "missing"),
                 edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        qwen2_5_vl.load_hf(d)
    d = _corrupt(src, str(tmp_path / "extra"),
                 edit_tensors=lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.9\.extra\.weight \(in model"):
        qwen2_5_vl.load_hf(d)
    d = _corrupt(src, str(tmp_path / "shape"),
                 edit_config=lambda c: c["text_config"].update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight in .*"
                                         r"model\.safetensors has shape \[64, 128\]"):
        qwen2_5_vl.load_hf(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen2_5_vl.load_hf(str(tmp_path))
    d = _corrupt(src, str(tmp_path / "rope"),
                 edit_config=lambda c: c["text_config"].update(rope_parameters={"rope_theta": 1.0}))
    with pytest.raises(ValueError, match="mrope_section"):
        qwen2_5_vl.load_hf(d)


# The released Qwen2.5-VL-3B-Instruct config.json (flat, transformers 4.x layout).
RELEASED_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                      "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def test_config_layouts():
    cfg = Qwen2_5_VLConfig.from_hf_dict(RELEASED_3B)
    assert cfg == qwen2_5_vl_3b_config()
    # our nested output parses identically in transformers and back in ours
    d = cfg.to_hf_dict()
    hf = HFConfig(**d)
    assert hf.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert hf.text_config.num_key_value_heads == 2 and hf.tie_word_embeddings
    assert list(hf.vision_config.fullatt_block_indexes) == [7, 15, 23, 31]
    assert Qwen2_5_VLConfig.from_hf_dict(json.loads(json.dumps(d))) == cfg
    # transformers' own serialisation of the released config parses to the same thing
    assert Qwen2_5_VLConfig.from_hf_dict(HFConfig(**RELEASED_3B).to_dict()) == cfg
    tiny = tiny_config(tie_word_embeddings=False, dtype="bfloat16")
    assert Qwen2_5_VLConfig.from_hf_dict(tiny.to_hf_dict(), dtype="bfloat16") == tiny


# ------------------------------------------------------------------------------------------
# Exports a user can serve (transformers 4.57 / 5.x, vLLM) and gs:// directories.

def test_export_is_servable(tmp_path):
    """save_hf with the tokenizer writes every file a server reads, in both schemas."""
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig
    from emor3_jax.processing import chat
    from emor3_jax.processing import tokenizer as tk
    tok = tk.build_demo_tokenizer()
    ids = tk.token_ids(tok)
    special = {"image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
               "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
               "bos_token_id": ids.pad, "eos_token_id": ids.im_end, "pad_token_id": ids.pad}
    # head_dim 128 as in Qwen2.5-VL-3B/7B, so mrope_section is the real [16, 24, 24]
    cfg = tiny_config(vocab_size=ids.vocab_size, hidden_size=256, num_heads=2, num_kv_heads=1,
                      num_layers=1, vision_depth=1, fullatt_block_indexes=(),
                      special_token_ids=special)
    hf = hf_model(cfg, seed=5)
    hf.save_pretrained(str(tmp_path / "src"))
    model, params = qwen2_5_vl.load_hf(str(tmp_path / "src"))
    out = qwen2_5_vl.save_hf(params, model.config, str(tmp_path / "export"), tokenizer=tok,
                             min_pixels=3136, max_pixels=401408)
    read = lambda name: json.load(open(os.path.join(out, name)))  # noqa: E731
    conf = read("config.json")
    # transformers 4.57 / vLLM: released (flat) layout, rope_scaling with type == rope_type
    assert conf["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert conf["model_type"] == "qwen2_5_vl" and conf["torch_dtype"] == conf["dtype"] == "float32"
    assert conf["rope_scaling"] == {"type": "default", "rope_type": "default",
                                    "mrope_section": [16, 24, 24]}
    assert conf["rope_theta"] == cfg.text.rope_theta
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings"):
        assert key in conf, key
    assert {k: conf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id")} == {
        k: special[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                "vision_end_token_id")}
    assert conf["vision_config"]["spatial_merge_size"] == 2
    # transformers 5: rope_parameters next to it
    assert conf["rope_parameters"]["mrope_section"] == [16, 24, 24]
    assert read("generation_config.json")["eos_token_id"] == [ids.im_end, ids.pad]
    pre = read("preprocessor_config.json")
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 401408)
    assert pre["size"] == {"shortest_edge": 3136, "longest_edge": 401408}
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 2)
    assert open(os.path.join(out, "chat_template.jinja")).read() == chat.QWEN2_5_VL_CHAT_TEMPLATE
    tok_conf = read("tokenizer_config.json")
    assert tok_conf["chat_template"] == chat.QWEN2_5_VL_CHAT_TEMPLATE
    assert tok_conf["tokenizer_class"] == "PreTrainedTokenizerFast"   # 4.x can load it
    # transformers 5 loads all of it
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert reloaded.config.text_config.rope_parameters["rope_theta"] == cfg.text.rope_theta
    pv, grid = images([("chelsea", (120, 150))])
    rng = np.random.default_rng(3)
    batch_ids, mask = left_pad([chat_row(cfg, rng, [3, "img", 5], grid)], ids.pad)
    np.testing.assert_allclose(hf_logits(reloaded, cfg, batch_ids, mask, pv, grid),
                               hf_logits(hf, cfg, batch_ids, mask, pv, grid), atol=1e-6)
    processor = AutoImageProcessor.from_pretrained(out)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 401408)
    assert GenerationConfig.from_pretrained(out).eos_token_id == [ids.im_end, ids.pad]
    hf_tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        chat.render_chat(messages)
    assert tk.token_ids(hf_tok) == ids


def test_gcs_load_and_save(ref, gcs, tmp_path, monkeypatch):
    """load_hf("gs://...") loads exactly the local copy; save_hf writes to gs:// and reads back."""
    import fsspec
    from gcs_testutil import clear_filesystem_caches
    monkeypatch.setenv("EMOR3_CACHE", str(tmp_path / "cache"))
    src = ref[2]
    bucket = gcs[1]("models")
    fs = fsspec.filesystem("gs")
    for name in os.listdir(src):
        fs.put(os.path.join(src, name), f"models/src/{name}")
    model, params = qwen2_5_vl.load_hf(f"{bucket}/src")
    local_model, local_params = qwen2_5_vl.load_hf(src)
    # the same config and bit-identical parameters: the same logits (test_save_hf_then_from_
    # pretrained checks those of the local copy against transformers)
    assert model.config == local_model.config
    jax.tree.map(np.testing.assert_array_equal, params, local_params)
    # sharded, then single-file, to the same gs:// directory: no stale shards or index remain
    qwen2_5_vl.save_hf(params, model.config, f"{bucket}/export", max_shard_size="200KB")
    assert fs.exists("models/export/model.safetensors.index.json")
    qwen2_5_vl.save_hf(params, model.config, f"{bucket}/export")
    clear_filesystem_caches()
    names = sorted(os.path.basename(p) for p in fsspec.filesystem("gs").find("models/export"))
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "preprocessor_config.json"]
    _, back = qwen2_5_vl.load_hf(f"{bucket}/export")
    jax.tree.map(np.testing.assert_array_equal, params, back)
