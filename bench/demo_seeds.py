"""The CPU demo across seeds: held-out accuracy at each evaluation, format and wall time.

One run of a demo on one host is a trajectory, not a property: the flat phase before GRPO starts
to pay off varies with the seed and the host's floating-point order. This runs
`python -m emor3_jax.main --config=configs/demo_cpu.py` once per seed (1 CPU device, a fresh
workdir, a shared TFDS directory) and prints one row per seed plus the spread. `--variant=ci`
runs the faster-learning variant that tests/test_demo_learns.py checks (question-only prompt,
SET-only reward, 50 GRPO steps). Each seed compiles its programs afresh (its own compilation
cache), as a newcomer's first run does; `--shared-cache` lets later seeds load them. Usage (on
an idle machine):

    ../shared/tools/quiet-bench python bench/demo_seeds.py [--seeds 0,1,2] [--variant demo|ci]
        [--eval_every 25] [--steps 0 (= the config's)] [--workdir /tmp/demo_seeds]
        [--shared-cache]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_demo_learns import VARIANT  # noqa: E402  (one definition of the test's variant)


def run_seed(seed: int, variant: str, steps: int, eval_every: int, root: Path,
             shared_cache: bool) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    overrides = dict(VARIANT) if variant == "ci" else {}
    overrides.update(seed=seed, **{"train.eval_every": eval_every})
    if steps:
        overrides["train.max_steps"] = steps
    workdir = root / f"{variant}-seed{seed}"
    cache = root / ("jax_cache" if shared_cache else f"jax_cache-{variant}-seed{seed}")
    for stale in (workdir, None if shared_cache else cache):   # a run left there would resume
        if stale is not None and stale.exists():
            shutil.rmtree(stale)
    args = [sys.executable, "-m", "emor3_jax.main", f"--config={REPO / 'configs/demo_cpu.py'}",
            f"--workdir={workdir}", f"--config.data.data_dir={root / 'tfds'}",
            f"--config.compile_cache_dir={cache}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    t0 = time.time()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/emo_synth/accuracy"], r["eval/emo_synth/format"])
             for r in rows if "eval/emo_synth/accuracy" in r]
    return {"seed": seed, "evals": evals, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variant", choices=("demo", "ci"), default="demo")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--workdir", default="/tmp/demo_seeds")
    ap.add_argument("--shared-cache", action="store_true",
                    help="one compilation cache for every seed (later seeds load the programs)")
    a = ap.parse_args()
    root = Path(a.workdir)
    results = [run_seed(int(s), a.variant, a.steps, a.eval_every, root, a.shared_cache)
               for s in a.seeds.split(",")]
    steps = [s for s, _, _ in results[0]["evals"]]
    print(f"\n## demo across seeds (variant {a.variant})\n")
    print("| seed | " + " | ".join(f"acc @ {s}" for s in steps) + " | format (end) | wall |")
    print("|---" * (len(steps) + 3) + "|")
    for r in results:
        accs = " | ".join(f"{acc:.3f}" for _, acc, _ in r["evals"])
        print(f"| {r['seed']} | {accs} | {r['evals'][-1][2]:.2f} | {r['wall_s'] / 60:.1f} min |")
    final = [r["evals"][-1][1] for r in results]
    print(f"\nfinal held-out accuracy: min {min(final):.3f}, max {max(final):.3f}; "
          f"wall {min(r['wall_s'] for r in results) / 60:.1f}-"
          f"{max(r['wall_s'] for r in results) / 60:.1f} min")


if __name__ == "__main__":
    main()
