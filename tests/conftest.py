"""Test setup: 8 virtual CPU devices so sharding code really runs on a mesh, and one persistent
XLA compilation cache for the session.

The cache is keyed by the compiled program (HLO, compile options, device ids, XLA flags), so a
hit returns the executable a fresh compile would; it saves the many recompiles of the same
programs by different tests, and by the one-process `python -m emor3_jax.main` children that
inherit the environment. Multi-process children must not use it (tests/test_multihost.py says
why). A fresh directory per session: every run still compiles everything once.

Python bytecode likewise: where the host forbids writing it (PYTHONDONTWRITEBYTECODE=1, as on
the CI machines, with the README's `pip install --no-compile`), every process compiled every
module it imports from source, ~10 s of each trainer child's start (jax, transformers, sympy
...), in each of the ~30 processes the suite starts. The session writes bytecode to its own
directory (PYTHONPYCACHEPREFIX) instead, which the workers and children inherit.
"""
import atexit
import os
import shutil
import sys
import tempfile

if sys.dont_write_bytecode:
    _pycache = tempfile.mkdtemp(prefix="emor3-test-pycache-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = _pycache
    sys.dont_write_bytecode = False
    atexit.register(shutil.rmtree, _pycache, ignore_errors=True)

# LLVM's lowest optimization level for XLA:CPU: the suite's tiny programs spend more time
# compiling than running (a third less CPU time over test_sampling + test_model_parity, same
# results; floating-point semantics do not depend on it). And XLA:CPU's older loop emitters for
# fusions instead of its MLIR fusion emitters, which dominate compile time at that level: a tiny
# update step's first call 21.5 -> 8.6 s, a cold tiny trainer run 60 -> 41 CPU-s. The demo
# test, which runs long, drops these flags in its child (at full optimization the MLIR emitters
# run its steps ~15 % faster).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true",
                      "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # set once; pytest-xdist workers inherit it
    _cache = tempfile.mkdtemp(prefix="emor3-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The longest test files (minutes each on 2 cores, mostly subprocess runs of the trainer) go
# first: with `-n 2 --dist loadfile` the workers take files in collection order, so the long
# ones overlap the many short ones instead of one of them running alone at the end.
LONG_FIRST = ("test_demo_learns.py", "test_multihost.py", "test_trainer_faults.py",
              "test_notebook.py", "test_grpo_e2e.py", "test_update.py", "test_aot.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))   # stable


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, not run in CI (-m 'not slow')")


@pytest.fixture(scope="session")
def devices8():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 virtual CPU devices, got {len(devs)}"
    return devs
