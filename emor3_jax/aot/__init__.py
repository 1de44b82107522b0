"""Ahead-of-time compilation for a TPU slice from a CPU host: does a configuration fit?

    python -m emor3_jax.aot --config=configs/tpu_v4.py [--topology=v4-8] [--image=typical]
        [--lengths=max|typical|P,R]

TPU slices are rented by the hour; this answers "does it fit, and roughly how fast" before
renting one. With libtpu installed (`pip install "jax[tpu]"`, no TPU needed) jax describes a
slice (`jax.experimental.topologies`) and XLA's TPU compiler compiles for it. Every program
of one GRPO step is compiled at the config's real shapes and shardings, from abstract inputs
(shapes only, no weights), through the same jitted functions the trainer calls
(`Sampler.trace_*`, `make_logprob_fn(...).trace`, `make_micro_batch_update(...).trace_*`):

  1. rollout prefill + decode: one sampler chunk, rollout.chunk_size prompts x G rows,
     prompts of data.max_prompt_len tokens with one image each, rollout.max_new_tokens new;
  2. the judge (reward.judge_mode): generate = prefill + decode at the judge's shapes
     (2 prompts per response, one sample each); score = prefill + the score program;
  3. the reference log-prob pass over one mini-batch (rl.logprob_micro_batch_size per device);
  4. the GRPO update of one mini-batch (rl.micro_batch_size per device, train state donated).

Per program: XLA's per-device memory (arguments, outputs, temporaries, aliased = donated
outputs reusing argument buffers; total = args + outputs - aliased + temporaries + code),
FLOPs (XLA's cost analysis, plus the Pallas kernels' counted from their shapes) and a
roofline time (FLOPs at the chip's peak or XLA's bytes accessed at its HBM bandwidth,
whichever is longer), and the MFU they imply.
Run level: the programs run one after another, while the train state (params + AdamW
moments), the reference params (and a checkpoint judge's params) stay resident; the
sampler's KV cache exists only inside the sampling programs. Each program's live memory is
its own total plus every resident tree it does not take as an argument. The configuration
fits when every program compiles and the largest live memory is within --hbm_fraction of
the chip's HBM (a program that fails to compile, e.g. XLA's RESOURCE_EXHAUSTED, is listed
with its error and does not fit); otherwise the tool names each failing family's knob
(rl.micro_batch_size, rl.logprob_micro_batch_size, rollout.chunk_size,
reward.judge_chunk_size; model.remat=full; more chips), recompiles it at values predicted
from the measured memory (up to --fix_attempts times) to report one that fits, and exits 1.
Exit codes: 0 fits, 1 does not fit, 2 bad usage or configuration. `cli(argv)` runs it
in-process (tests).

Shape assumptions (printed with the tables):
- Images: `--image=typical` is a 512x512 photo through the release's pre-resize and
  smart_resize under data.min/max_pixels (the recipe: 532x532 px, 38x38 = 1,444 patches,
  361 tokens); `max` is the largest square image a prompt can hold (data.max_pixels, shrunk
  until its tokens fit data.max_prompt_len - PROMPT_TEXT_TOKENS); `HxW` is that image size.
- Lengths are the worst case: prompts at data.max_prompt_len, responses at
  rollout.max_new_tokens, judge prompts holding a whole response (+ image + template),
  every judge prompt of a chunk with its own image. That decides the fit. `--lengths=typical`
  (TYPICAL_PROMPT_TEXT_TOKENS of text + the image, TYPICAL_RESPONSE_TOKENS-token responses,
  TYPICAL_JUDGE_ANSWER_TOKENS-token judge answers) or `--lengths=P,R` (prompt and response
  tokens) also compiles every program at those lengths, padded to the buckets they fall in
  as the trainer pads them, and prints its per-program time and the step time beside the
  worst case's. The sampler's decode programs keep their maximum new-token buffers (the
  trainer asks for rollout.max_new_tokens); their loops are counted at the expected lengths
  (optimistic: a chunk decodes until its longest row ends).
- Multi-host slices: shapes are global (one SPMD program over the slice).
- FLOPs and time: XLA's cost analysis counts a while-loop body once (scanned layers, the
  micro-batch scan, the decode loop). Both are scaled by the loop trip counts, taken from the
  traced jaxpr (matmul FLOPs with and without trip counts); the decode loop is counted at
  max_new_tokens steps (an upper bound: rows stop at EOS). MFU is unaffected by the scaling.
  The roofline leaves out collectives' latency and imperfect overlap (a lower bound on
  time); XLA's bytes accessed count some buffers more than once (an upper bound on traffic).
- The reference pass is compiled at rl.logprob_micro_batch_size, as the trainer runs it.

Modules by job: chips.py (chips, slices), shapes.py (the step's shapes), programs.py (compiling
them), cost.py (FLOPs from the jaxpr), hlo.py (reading XLA's errors), report.py (tables),
search.py (the knob search), cli.py (driver and flags), runtime.py (the chips this process
sees: the Colab notebook's check before it downloads a model).
"""
import os
import sys

if "jax" not in sys.modules:
    # Compile for TPU, run nothing: no runtime TPU backend (this host has none).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from emor3_jax.aot.chips import (CHIPS, SLICES, Chip, GiB, Topology,  # noqa: E402,F401
                                 resolve_topology, topology_devices)
from emor3_jax.aot.cli import analyze, cli, define_flags, run  # noqa: E402,F401
from emor3_jax.aot.cost import kernel_flops, matmul_flops  # noqa: E402,F401
from emor3_jax.aot.programs import (BUILDERS, RESIDENT, BuildContext, Program,  # noqa: E402,F401
                                    abstract_params, abstract_train_state,
                                    abstract_update_batch, compile_program, judge_model,
                                    judge_programs, live_bytes, make_context, per_device_bytes,
                                    reference_programs, resident_bytes, rollout_programs,
                                    update_programs)
from emor3_jax.aot.report import program_table, run_table, step_time, time_table  # noqa: E402,F401
from emor3_jax.aot.search import (KNOBS, family_live, knob_candidates,  # noqa: E402,F401
                                  knob_value, predict_value, suggest)
from emor3_jax.aot.shapes import (Image, Lengths, Shapes, image_for,  # noqa: E402,F401
                                  lengths_for, model_config, step_shapes)
