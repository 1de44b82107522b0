"""emor3_jax.aot: compile a GRPO step's programs for a TPU v4-8 from this CPU host (libtpu).

A tiny model at small shapes compiles every program (rollout prefill, decode start and decode
windows, generate-mode judge prefill and decode, reference log-probs, the update's gradient and
optimizer calls) and must fit; with a tiny share of HBM it must not, and the tool must exit 1
naming (and trying) a knob. Runs the tool in-process (`aot.cli`), like `python -m emor3_jax.aot`.
"""
import io
import re
import textwrap

import pytest

pytest.importorskip("libtpu", reason="AOT compilation for TPU needs libtpu: pip install 'jax[tpu]'")

from emor3_jax import aot  # noqa: E402

# A tiny model at small shapes; everything else is the released recipe (configs/base.py).
TINY_CONFIG = textwrap.dedent('''
    from emor3_jax.configs import base

    def get_config():
        c = base.get_config()
        c.model.tiny = "demo_small"
        c.model.tokenizer = "demo"
        c.model.dtype = c.model.param_dtype = "bfloat16"
        c.data.min_pixels = c.data.max_pixels = 56 * 56
        c.data.max_prompt_len = 64
        c.data.prompt_buckets = (64,)
        c.rollout.batch_size = 8
        c.rollout.max_new_tokens = 16
        c.rollout.response_buckets = (16,)
        c.eval.max_new_tokens = 16
        c.rollout.decode_window = 4          # rollout decode windows 4 and 16 (the judge's: 4)
        c.reward.judge_mode = "generate"
        c.reward.judge_max_new_tokens = 4
        c.reward.judge_prompt_buckets = (128,)
        c.reward.judge_chunk_size = 40       # 5 units of G = 8 sharing a prefix: runs as 8 x 8 rows
        c.reward.judge_shared_suffix_max = 64  # suffixes of 112 tokens at these lengths: whole
        c.rl.mini_batch_size = 8
        c.rl.micro_batch_size = 4
        c.rl.micro_batch_tokens = 256        # at least 4 rows per device: 8 at 16 tokens, 16 at 8
        c.rl.length_buckets = (8,)
        c.rl.logprob_micro_batch_size = 4
        c.rl.logprob_chunk = 16
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 1
        c.aot.topology = "v4-8"
        return c
''')
PROGRAMS = ("rollout prefill", "rollout decode start", "rollout decode, steps < 4",
            "rollout decode, steps 4-15", "judge prefill", "judge decode start", "judge decode",
            "judge shared-prefix prefill", "judge shared-prefix decode start",
            "judge shared-prefix decode",
            "reference log-probs", "old log-probs", "update gradients",
            "update gradients, 64 rows", "update optimizer step")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot_tiny.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def run_tool(*args):
    out, err = io.StringIO(), io.StringIO()
    code = aot.cli(["emor3_jax.aot", *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def table_rows(report: str, header: str) -> dict[str, list[str]]:
    """{program: cells} of the markdown table whose header row starts with `header`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_tiny_step_fits_on_v4_8(config_file):
    code, out, err = run_tool(f"--config={config_file}")
    assert code == 0, out + err
    assert out.rstrip().splitlines()[-1] == "fits: yes"
    assert "v4:2x2x1: 4 x TPU v4" in out
    programs = table_rows(out, "| program | shapes")
    assert tuple(programs) == PROGRAMS
    for name, cells in programs.items():
        args, output, temp, alias, total = (float(x) for x in cells[2:7])
        assert re.fullmatch(r"\d+%", cells[7]), cells       # % of HBM
        assert total > 0 and args > 0 and min(output, temp, alias) >= 0, (name, cells)
        assert "FLOP" in cells[8] and cells[9] != "n/a", cells   # FLOPs, est. time
        assert not cells[-1].startswith("FAILED"), cells
    # the judge as the trainer's: prompts whose suffix (response + template end: 112 tokens)
    # needs more than judge_shared_suffix_max run whole, priced; the shared programs at that
    # limit are compiled for the fit, no call priced: a chunk of 40 prompts is 5 units of G = 8
    # prompts, padded to the sampler's buckets (8 prefixes x 8 suffixes)
    assert "shared prefixes where the suffix needs <= 64 tokens, else whole prompts" in out
    assert programs["judge prefill"][1] == ("40 (compiled as 48: the sampler's num_prompts "
                                            "bucket) prompts x 128 tokens, 40 images"), programs
    assert programs["judge shared-prefix prefill"][1].startswith(
        "40 (compiled as 64: the sampler's num_prompts buckets) prompts = 8 shared prefixes of "
        "100 tokens with an image, 8 suffixes of 64 tokens each"), programs
    assert all(programs[p][11] == "0" for p in PROGRAMS if p.startswith("judge shared"))
    assert programs["judge decode start"][11] != "0", programs
    # the decode windows: attention over the window's gen slots, then the memory roofline of a
    # step (every decoder weight and the live KV once) beside the HBM bytes of the compiled
    # step and XLA's bytes accessed (which also counts on-chip copies: the larger)
    assert programs["rollout decode, steps 4-15"][1] == (
        "8 x G=8 rows, 16 new tokens, attention over 16 slots"), programs
    roofline = table_rows(out, "| decode program")
    assert list(roofline) == [p for p in PROGRAMS
                              if " decode" in p and not p.endswith("start")], roofline
    for name, cells in roofline.items():
        minimal, hbm, xla = (float(cells[i].split()[0]) for i in (1, 2, 4))
        to_hbm, to_xla = (int(cells[i].rstrip("%")) for i in (3, 5))
        # (a tiny model's weights can stay in on-chip memory across steps: HBM < minimal)
        assert 0 < minimal and 0 < hbm < xla and to_hbm > to_xla > 0, cells
        # what a step moves between the 4 chips (the rows live on different chips)
        assert re.fullmatch(r"(\S+ [\d.]+ [KM]iB)(, \S+ [\d.]+ [KM]iB)*", cells[8]), cells
    assert programs["rollout prefill"][1].startswith("8 prompts x 64 tokens"), programs
    # the programs the trainer runs (rl.length_aware): log-probs one micro-batch per call (a
    # mini-batch of 64 responses = 4 micro-batches of 4 rows x 4 devices); the gradients of
    # token-budget micro-batches (256 slots per device: 2 prompts of 64 tokens on every device
    # + rows x 16 / 4 -> 32 rows at 16 tokens, 64 at 8), then one optimizer call; the gradient
    # accumulator and the train state are donated from call to call
    ref, grad = programs["reference log-probs"], programs["update gradients"]
    assert ref[1].startswith("1 micro-batch of 16 rows (4 per mini-batch), 64+16 tokens"), ref
    assert ref[11] == "4", ref
    assert grad[1].startswith("1 micro-batch of 32 rows (2 per mini-batch), 64+16 tokens"), grad
    assert grad[11] == "2", grad
    short = programs["update gradients, 64 rows"]
    assert short[1].startswith("1 micro-batch of 64 rows (1 per mini-batch), 64+8 tokens")
    assert short[11] == "0", short          # compiled for the fit; no response is that short
    assert programs["update optimizer step"][11] == "1"
    assert float(grad[5]) > 0 and float(programs["update optimizer step"][5]) > 0
    run = table_rows(out, "| program | program total")
    assert tuple(run) == PROGRAMS
    for name, cells in run.items():          # live = program + resident outside it + other
        assert float(cells[4]) >= float(cells[1]), cells
    # the log-probs of the earlier micro-batches wait on the device beside the last call's
    assert "(outputs of 3 earlier calls)" in run["reference log-probs"][3], run
    assert "peak live memory" in out and "suggestions" not in out


def test_too_little_hbm_does_not_fit(config_file):
    # 1/10000 of a v4's HBM (3.4 MB) holds no program: the verdict, the exit code and the
    # suggestions, including one tried by recompiling, follow.
    # --lengths: the same programs again at expected lengths (32 + 8 tokens, padded to the
    # buckets 64 + 16): their time beside the worst case's, the verdict unchanged.
    code, out, err = run_tool(f"--config={config_file}", "--programs=reference",
                              "--hbm_fraction=0.0001", "--fix_attempts=1", "--lengths=32,8")
    assert code == 1, out + err
    assert out.rstrip().splitlines()[-1] == "fits: no"
    rows = table_rows(out, "| program | shapes")
    assert list(rows) == ["reference log-probs", "old log-probs"], rows
    assert "At 32,8 lengths: prompts of 32 tokens (bucket 64), responses of 8 (bucket 16;" in out
    timed = table_rows(out, "| program | shapes (global) | FLOPs/device")
    assert list(timed) == ["reference log-probs", "old log-probs"], timed
    assert all("FLOP" in cells[2] for cells in timed.values()), timed
    assert re.search(r"estimated step time at 32,8 lengths \(.*\): \S+", out)
    cells = rows["reference log-probs"]
    assert float(cells[6]) > 0, cells
    assert "limit 0.01% = 0.0032 GiB" in out
    suggestions = out.split("does not fit; suggestions:")[1]
    assert ("reference log-probs, old log-probs: try a smaller rl.logprob_micro_batch_size"
            in suggestions)
    assert re.search(r"rl.logprob_micro_batch_size=\d: still does not fit", suggestions)


def test_bad_usage_exits_2(config_file):
    code, _, err = run_tool(f"--config={config_file}", "--topology=v9-8")
    assert code == 2 and "topology" in err
    code, _, err = run_tool(f"--config={config_file}", "--programs=bogus")
    assert code == 2 and "bogus" in err
    code, _, err = run_tool(f"--config={config_file}", "--lengths=4096,8")
    assert code == 2 and "--lengths=4096,8" in err, err


def test_loop_collectives_are_counted_once_per_iteration(devices8):
    """What a compiled loop body moves between devices, per iteration and device: a psum of a
    [64, 32] fp32 block (8 KiB) and an all-gather of [16, 8] fp32 blocks from 8 devices (4 KiB
    received), whatever the trip count; none outside a loop."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from emor3_jax import sharding
    from emor3_jax.aot import hlo
    mesh = sharding.make_mesh(1, 8, 1, devices=devices8)

    def body(i, carry):
        a, b = carry
        return jax.lax.psum(a, "fsdp") * 0.5, b + jax.lax.all_gather(b, "fsdp").sum(0) * i

    def program(trips):
        loop = jax.shard_map(lambda a, b: jax.lax.fori_loop(0, trips, body, (a, b)), mesh=mesh,
                             in_specs=(P(), P("fsdp")), out_specs=(P(), P("fsdp")))
        return jax.jit(loop).lower(jnp.ones((64, 32)), jnp.ones((128, 8))).compile().as_text()

    for trips in (3, 50):
        assert hlo.loop_collective_bytes(program(trips)) == {"all-reduce": 64 * 32 * 4,
                                                             "all-gather": 8 * 16 * 8 * 4}
    no_loop = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "fsdp"), mesh=mesh,
                                    in_specs=P(), out_specs=P()))
    assert hlo.loop_collective_bytes(no_loop.lower(jnp.ones((4,))).compile().as_text()) == {}


def test_loop_hbm_bytes_count_hbm_traffic_not_on_chip_copies():
    """The decode table's HBM bytes per step, on loops whose HBM traffic is known by hand
    (compiled for one v4 chip): an MLP of two bf16 weights (32.25 MiB) on 8 rows reads the
    weights once, while XLA's bytes accessed also counts the copy XLA prefetches one of them
    into on-chip memory with; attention of 128 rows over a 512-slot window of a 2,048-slot
    bf16 cache (64 MiB of keys and values in the window) updated in place reads the window,
    not the buffer; an embedding gather of 128 rows reads those rows, not the table; a
    conditional counts its costliest branch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from emor3_jax.aot import hlo
    chip = aot.topology_devices(aot.resolve_topology("v4-8"))[:1]
    on_chip = NamedSharding(Mesh(chip, ("x",)), P())
    bf, mib = jnp.bfloat16, 2 ** 20

    def compiled(fn, *shapes):
        args = [jax.ShapeDtypeStruct(s, bf, sharding=on_chip) for s in shapes]
        c = jax.jit(fn, donate_argnums=0).lower(*args).compile()
        cost = c.cost_analysis()
        return hlo.loop_hbm_bytes(c.as_text()), (cost[0] if isinstance(cost, list) else cost)[
            "bytes accessed"]

    def loop(step):
        return lambda x, *w: jax.lax.while_loop(lambda c: c[0] < 100,
                                                lambda c: (c[0] + 1, step(c[1], *w)), (0, x))

    def mlp(x, w, wd):
        gu = x @ w
        return (jax.nn.silu(gu[:, :2752]) * gu[:, 2752:]).astype(bf) @ wd

    weights = (2048 * 5504 + 2752 * 2048) * 2
    hbm, xla = compiled(loop(mlp), (8, 2048), (2048, 5504), (2752, 2048))
    assert weights <= hbm < weights + 0.1 * mib and xla > 1.5 * weights, (hbm, xla)

    r, k, d, t, w = 128, 2, 128, 2048, 512

    def attend(c):
        i, gk, gv, x = c
        new = x[:, :, :1].astype(bf)                                   # [R, K, 1, D]
        gk = jax.lax.dynamic_update_slice(gk, jnp.swapaxes(new, 2, 3), (0, 0, 0, i))
        gv = jax.lax.dynamic_update_slice(gv, new, (0, 0, i, 0))
        s = jnp.einsum("bkqd,bkds->bkqs", x.astype(bf), gk[..., :w],
                       preferred_element_type=jnp.float32)
        p = jax.nn.softmax(jnp.where(jnp.arange(w) <= i, s, -1e30), -1).astype(bf)
        return i + 1, gk, gv, jnp.einsum("bkqs,bksd->bkqd", p, gv[:, :, :w],
                                         preferred_element_type=jnp.float32)
    window = 2 * r * k * d * w * 2
    hbm, _ = compiled(lambda gk, gv, x: jax.lax.while_loop(
        lambda c: c[0] < w, attend, (0, gk, gv, x.astype(jnp.float32))),
        (r, k, d, t), (r, k, t, d), (r, k, 8, d))
    assert window <= hbm < window + 2 * mib, (hbm, window)

    def embed(ids, table):
        return (table[ids[:, 0] % 1000] * 2).astype(jnp.int32)[:, :1] + ids
    rows = 128 * 2048 * 2
    hbm, _ = compiled(loop(lambda ids, table: embed(ids.astype(jnp.int32), table).astype(bf)),
                      (128, 1), (151936 // 4, 2048))
    assert rows <= hbm < 4 * rows, (hbm, rows)

    big = lambda x: (x.astype(jnp.float32) * 3).astype(bf) * 2        # read and write x
    branchy = lambda x: jax.lax.cond(x[0, 0] > 0, big, lambda x: x.at[0].set(0), x)
    hbm, _ = compiled(loop(branchy), (4096, 2048))
    assert 2 * 4096 * 2048 * 2 <= hbm < 3 * 4096 * 2048 * 2, hbm


def test_splash_kernel_flops_are_counted_from_its_shapes(devices8):
    """XLA's cost analysis does not see inside Pallas kernels: the tool counts the splash
    kernels of a traced program (forward 4*T*S*D per head, backward 14, causal: half), on one
    device and inside the shard_map a mesh puts around them (per-device shapes, every device)."""
    import jax
    import jax.numpy as jnp
    from emor3_jax import sharding
    from emor3_jax.models import layers
    b, t, n, kv, d = 4, 256, 4, 2, 128
    q, k = jnp.ones((b, t, n, d)), jnp.ones((b, t, kv, d))
    loss = lambda q, k, v: layers.splash_attention(
        q, k, v, layers.Mask(jnp.ones((b, t), bool)), interpret=True).sum()
    per_tsd = 0.5 * b * n * t * t * d                        # causal: half of T x S
    assert aot.kernel_flops(jax.make_jaxpr(loss)(q, k, k).jaxpr) == 4 * per_tsd
    grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k)
    assert aot.kernel_flops(grad.jaxpr) == (4 + 8 + 6) * per_tsd
    with jax.set_mesh(sharding.make_mesh(1, 4, 1, devices=devices8[:4])):
        sharded = jax.make_jaxpr(loss)(q, k, k)
    assert aot.kernel_flops(sharded.jaxpr) == 4 * per_tsd     # summed over the 4 devices


@pytest.mark.parametrize("name,chips,hosts,hbm", [
    ("v4-8", 4, 1, 32), ("v4-32", 16, 4, 32), ("v5e-1", 1, 1, 16), ("v5litepod-8", 8, 1, 16),
    ("v5e-16", 16, 2, 16), ("v6e-8", 8, 1, 32), ("v6e:4x4", 16, 2, 32), ("v5p-16", 8, 2, 95)])
def test_slices_resolve_to_their_chips_and_hosts(name, chips, hosts, hbm):
    """A slice name gives libtpu's topology with one host per host's block of chips (v5e and
    v6e hosts drive 8 chips, v4 and v5p hosts 4), so the AOT report's host count is the VM's."""
    topology = aot.resolve_topology(name)
    devices = aot.topology_devices(topology)
    assert topology.num_chips == len(devices) == chips
    assert len({d.process_index for d in devices}) == hosts
    assert topology.chip.hbm_bytes == hbm * aot.GiB


def test_a_single_chip_runtime_says_what_fits_instead():
    """The notebook's check on a v5e-1 (Colab's TPU runtime): the 3B recipe's state alone
    (fp32 params and AdamW moments, bf16 reference and sampling copy) cannot fit one 16 GiB
    chip, and the answer names what can (the demo, bf16 evaluation, the fitted v5e config);
    on a v5e-8 with that config the state leaves room; the demo fits a v6e-1."""
    from emor3_jax.aot import runtime
    from emor3_jax.configs import demo_cpu, tpu_v4, tpu_v5e
    one = aot.topology_devices(aot.resolve_topology("v5e-1"))
    config = tpu_v4.get_config()
    config.mesh.fsdp = -1                       # all chips of the runtime, as the notebook
    fit = runtime.check(config, one)
    assert fit.fits is False and fit.resident_per_chip > 50 * aot.GiB, fit.message
    assert "it does not fit" in fit.message and "configs/tpu_v5e.py is fitted for a v5e-8" \
        in fit.message and "evaluation of this model in bfloat16 (7.0 GiB" in fit.message
    eight = aot.topology_devices(aot.resolve_topology("v5e-8"))
    fit = runtime.check(tpu_v5e.get_config(), eight)
    assert fit.fits is True and 6 * aot.GiB < fit.resident_per_chip < 8 * aot.GiB, fit.message
    fit = runtime.check(demo_cpu.get_config(), aot.topology_devices(aot.resolve_topology("v6e-1")))
    assert fit.fits is True and fit.resident_per_chip < 0.1 * aot.GiB, fit.message
    import jax
    assert runtime.check(tpu_v4.get_config(), jax.devices()[:1]).fits is None   # CPU: unknown


def test_decode_roofline_without_a_cost_analysis_says_n_a():
    """A deviceless CUDA compile has no cost analysis (XLA bytes 0): the decode roofline table
    prints n/a for XLA's bytes (and for HBM bytes, with no compiled loop counted) instead of
    dividing by zero (the GPU report once failed so)."""
    from emor3_jax.aot import report
    program = aot.Program(name="rollout decode", shapes="", uses=(), calls=1, group="rollout")
    program.min_step_bytes = 2 * 2 ** 30
    rows = report.decode_table([program], aot.resolve_topology("h100x8").chip)
    assert rows[-1].startswith("| rollout decode | 2.00 GiB | n/a | n/a | n/a | n/a |"), rows


def test_gpu_nodes_resolve_and_need_the_cuda_plugin():
    """h100x8 is one node of 8 H100s (jax's CUDA topology 1x1x8), compiled against 90 % of each
    GPU; without jax's CUDA plugin (the aot-gpu extra; not in the test extra) the tool says
    how to get it instead of failing somewhere inside jax."""
    topology = aot.resolve_topology("h100x8")
    assert topology.num_chips == 8 and topology.chip.platform == "cuda"
    assert topology.chip.usable == 0.9 and "major: 9 minor: 0" in topology.chip.target_config
    assert aot.resolve_topology("a100x16").topology_name == "a100:1x2x8"
    import importlib.util
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        with pytest.raises(RuntimeError, match=r"aot-gpu"):
            aot.topology_devices(topology)
