"""config.profile.steps: the trainer's per-step jax.profiler trace (trainer.profiled).

The full path (a training run that writes `<workdir>/profile/**/*.xplane.pb`) runs in
tests/test_notebook.py; this checks the step selection and the trace contents cheaply.
"""
import jax
import jax.numpy as jnp
import pytest

from emor3_jax import trainer


def emor3_profile_probe(x):
    return jnp.tanh(x @ x.T).sum()


def _traces(tmp_path):
    return sorted((tmp_path / "profile").rglob("*.xplane.pb"))


def test_profile_traces_only_the_chosen_steps(tmp_path):
    probe = jax.jit(emor3_profile_probe)
    x = jnp.ones((64, 32))
    for step in range(5):
        if step == 3:
            assert len(_traces(tmp_path)) == 1, "step 2 should have been traced by now"
        with trainer.profiled((2, 4), str(tmp_path), step):
            probe(x + step).block_until_ready()
    traces = _traces(tmp_path)
    assert len(traces) == 2, traces                   # one trace directory per traced step
    for path in traces:
        assert b"emor3_profile_probe" in path.read_bytes(), f"{path} lacks the traced program"


def test_profile_stops_the_trace_when_the_step_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with trainer.profiled((0, 1), str(tmp_path), 0):
            raise RuntimeError("boom")
    # a trace left running would make this start_trace raise
    with trainer.profiled((0, 1), str(tmp_path), 1):
        jax.jit(emor3_profile_probe)(jnp.ones((8, 8))).block_until_ready()
    assert len(_traces(tmp_path)) == 2


def test_no_profile_steps_writes_nothing(tmp_path):
    with trainer.profiled((), str(tmp_path), 0):
        jax.jit(emor3_profile_probe)(jnp.ones((8, 8))).block_until_ready()
    assert not (tmp_path / "profile").exists()
