"""Pixel rows kept on device (emor3_jax/patches.py, host-local feeding): a batch whose pixels
are a `DevicePatches` view samples, packs and scores exactly as the same batch with numpy
pixels, on a mesh. The two-process run (test_multihost.py) is the same path across hosts."""
import jax
import numpy as np
import pytest

from emor3_jax import patches as patch_lib
from emor3_jax import sharding
from emor3_jax.batches import PromptBatch, concat_prompt_batches
from emor3_jax.models import qwen2_5_vl
from emor3_jax.models.config import tiny_config
from emor3_jax.rl import batching
from emor3_jax.rl import update
from emor3_jax.sampling import Sampler, SamplingSettings
from qwen_testutil import chat_row, hf_model, images, left_pad

G = 2
IMAGE_SPECS = [("astronaut", (200, 280)), ("chelsea", (240, 160)), ("coffee", (150, 220)),
               ("chelsea", (100, 120))]


def _on_device(batch: PromptBatch) -> PromptBatch:
    """The batch with its pixel rows in a PatchStore (this process's rows: all of them)."""
    store = patch_lib.PatchStore.from_host_rows(batch.pixel_values, batch.num_rows)
    return batch.replace(pixel_values=patch_lib.DevicePatches(store, patch_lib.host_rows_index(
        [batch.num_rows], batch.num_rows, batch.pixel_values.shape[1])))


def _rows(x, mesh=None):
    """numpy pixel rows of either kind (device ones gathered, replicated)."""
    if isinstance(x, patch_lib.DevicePatches):
        mesh = mesh or sharding.make_mesh(data=1, fsdp=-1, tensor=1)
        return np.asarray(x.gather(sharding.replicated(mesh)))
    return np.asarray(x)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=False)
    d = str(tmp_path_factory.mktemp("hf_patches"))
    hf_model(cfg, seed=5).save_pretrained(d)
    pv, grid = images(IMAGE_SPECS)
    rng = np.random.default_rng(1)
    starts = np.concatenate([[0], np.cumsum(grid.prod(-1))])
    rows = [chat_row(cfg, rng, [5, "img", 7 + i], grid[i:i + 1]) for i in range(4)]
    ids, mask = left_pad(rows, cfg.text.pad_token_id)
    from emor3_jax.processing import rope_index
    pos, deltas = rope_index.get_rope_index(ids, grid, mask, image_token_id=cfg.image_token_id,
                                            spatial_merge_size=cfg.vision.spatial_merge_size)
    batch = PromptBatch.create(ids, mask, pos, deltas, images=[
        [(pv[starts[i]:starts[i + 1]], tuple(grid[i]))] for i in range(4)])
    return cfg, d, batch


def test_device_rows_take_pad_join_like_numpy(setup):
    _, _, batch = setup
    dev = _on_device(batch)
    for part in (lambda b: b.take([3, 1, 1]), lambda b: b.padded(patches=b.pixel_values.shape[1]
                                                                  + 8),
                 lambda b: b.trimmed(), lambda b: concat_prompt_batches([b.take([2]), b])):
        want, got = part(batch), part(dev)
        assert isinstance(got.pixel_values, patch_lib.DevicePatches)
        assert got.pixel_values.shape == want.pixel_values.shape
        np.testing.assert_array_equal(_rows(got.pixel_values), want.pixel_values)
    for rows in ([0, 2], [3]):
        want, _ = batch.flat_images(rows)
        np.testing.assert_array_equal(_rows(dev.flat_images(rows)[0]), want)
    # rows of two batches (DAPO joins rollouts of several global batches)
    other = _on_device(batch.take([1, 0]))
    joined = concat_prompt_batches([dev.take([3]), other])
    np.testing.assert_array_equal(_rows(joined.pixel_values),
                                  concat_prompt_batches([batch.take([3]), batch.take([1, 0])])
                                  .pixel_values)
    with pytest.raises(TypeError, match="put_global"):
        np.asarray(dev.pixel_values)


def test_sampler_and_update_take_device_rows_like_host_rows(setup, devices8):
    cfg, d, batch = setup
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    model, params = qwen2_5_vl.load_hf(d, mesh=mesh)
    dev = _on_device(batch)
    sampler = Sampler(model, mesh=mesh)
    settings = SamplingSettings(6, num_samples=G, temperature=1.0)
    want, got = (sampler.generate(params, b, settings, jax.random.key(3)) for b in (batch, dev))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)

    # the update's micro-batches (two prompts' images each) and their log-probs
    logprob_fn = update.make_logprob_fn(model, mesh, chunk=4)
    resp = want.tokens.reshape(-1, want.tokens.shape[-1])
    rmask = (np.arange(resp.shape[1])[None] < want.lengths.reshape(-1)[:, None]).astype(np.int32)
    logps = []
    for b in (batch, dev):
        mb = batching.pack_micro_batches(cfg, b, resp, rmask, group_size=G, micro_batch_rows=4,
                                       length_buckets=(8,), prompt_buckets=(b.width,))
        logps.append(update.micro_batch_logprobs(logprob_fn, params, mb))
    assert (logps[0] < 0).sum() >= rmask.sum() // 2       # real log-probs, not padding
    np.testing.assert_allclose(logps[1], logps[0], atol=1e-6)
