"""The best validation checkpoint (checkpoint.BestCheckpointer) beside the rotating ones, on real
orbax directories: it survives the rotation and later worse evaluations, and a resumed run (a new
Checkpointer / BestCheckpointer on the same workdir) knows the best score so far."""
import jax.numpy as jnp
import numpy as np
import pytest

from emor3_jax import checkpoint as ckpt_lib
from emor3_jax import evaluation

# (RL step, in-domain validation score): the best is step 2; later evaluations are worse.
EVALS = [(1, 0.25), (2, 0.50), (3, 0.375), (4, 0.125), (5, 0.50), (6, 0.25)]
KEEP = 2


def _params(step: int) -> dict:
    return {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(3, dtype=jnp.float32) + step}


def _abstract():
    return ckpt_lib.abstract_like(_params(0))


def _record(score):
    return {"score_sets": ["emoset2k"], "accuracy": {"emoset2k": score, "webemo": score / 2}}


def _train(workdir, evals):
    """What Trainer.train does per step: offer the evaluated params as best, then save the
    regular checkpoint (rotating, KEEP kept)."""
    regular = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=KEEP)
    best = ckpt_lib.BestCheckpointer(workdir / "checkpoints_best")
    saved = []
    for step, score in evals:
        if best.offer(step, score, _params(step), _record(score)):
            saved.append(step)
        regular.save(step, {"params": _params(step)}, {"step": step}, force=True)
    regular.close()
    best.close()
    return saved


def test_best_survives_rotation_and_worse_evaluations(tmp_path):
    saved = _train(tmp_path, EVALS)
    assert saved == [1, 2]                 # 5 ties step 2: the earliest best stays
    regular = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=KEEP)
    assert regular.all_steps() == [5, 6]   # step 2 rotated out of the regular checkpoints ...
    best = ckpt_lib.BestCheckpointer(tmp_path / "checkpoints_best")
    assert best.all_steps() == [2]         # ... kept here; the previous best (1) removed
    params, record = best.restore(_abstract())
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 2.0))
    np.testing.assert_array_equal(params["b"], np.arange(3) + 2.0)
    assert record == {"step": 2, "score": 0.5, **_record(0.5)}
    regular.close()
    best.close()


def test_a_resumed_run_knows_the_best_and_keeps_it(tmp_path):
    _train(tmp_path, EVALS[:3])            # preempted after step 3 (best: step 2, 0.5)
    best = ckpt_lib.BestCheckpointer(tmp_path / "checkpoints_best")
    assert best.record == {"step": 2, "score": 0.5, **_record(0.5)} and best.score == 0.5
    # the resumed run re-evaluates step 3 and goes on: worse or equal scores change nothing
    for step, score in [(3, 0.375), (4, 0.5), (5, float("nan"))]:
        assert not best.offer(step, score, _params(step), _record(score))
    assert best.all_steps() == [2]
    # a better one replaces it (and the old best is gone once the save is committed)
    assert best.offer(6, 0.625, _params(6), _record(0.625))
    best.close()
    best = ckpt_lib.BestCheckpointer(tmp_path / "checkpoints_best")
    assert best.all_steps() == [6] and best.record["score"] == 0.625
    params, record = best.restore(_abstract())
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 6.0))
    assert record["step"] == 6 and record["accuracy"] == {"emoset2k": 0.625, "webemo": 0.3125}
    best.close()


def test_a_rerun_step_that_scores_higher_replaces_itself(tmp_path):
    """A re-run of an evaluated step (non-deterministic resume) with a higher score."""
    _train(tmp_path, [(1, 0.25), (2, 0.5)])
    best = ckpt_lib.BestCheckpointer(tmp_path / "checkpoints_best")
    assert best.offer(2, 0.75, _params(20), _record(0.75))
    best.close()
    best = ckpt_lib.BestCheckpointer(tmp_path / "checkpoints_best")
    params, record = best.restore(_abstract())
    assert best.all_steps() == [2] and record["score"] == 0.75
    np.testing.assert_array_equal(params["w"], np.full((4, 3), 20.0))
    best.close()


def test_no_best_before_any_evaluation(tmp_path):
    best = ckpt_lib.BestCheckpointer(tmp_path / "checkpoints_best")
    assert best.record is None and best.score == float("-inf")
    assert best.restore(_abstract()) is None
    best.close()


# ---------------------------------------------------------------------- validation score --
def test_validation_score_is_the_mean_in_domain_accuracy():
    acc = {"emoset2k": 0.75, "emotion6": 0.5, "webemo": 0.25}
    sets = evaluation.validation_sets(("emoset2k",), tuple(acc), "emoset2k")
    assert sets == ("emoset2k",)
    assert evaluation.validation_score(acc, sets) == 0.75
    assert evaluation.validation_score(acc, ("emoset2k", "emotion6")) == 0.625
    with pytest.raises(ValueError, match="no accuracy for \\['webemo'\\]"):
        evaluation.validation_score({"emoset2k": 1.0}, ("webemo",))


def test_validation_sets_fall_back_when_no_in_domain_set_is_evaluated(caplog):
    assert evaluation.validation_sets(("emoset2k",), ("emotion6", "webemo"), "emotion6") == (
        "emotion6",)
    assert evaluation.validation_sets(("emoset2k",), ("emotion6", "webemo"), "emo_synth") == (
        "emotion6", "webemo")
    assert "no data.in_domain set" in caplog.text
    caplog.clear()
    # setting B with the default in_domain: picked on emoset2k, with a warning that says so
    assert evaluation.validation_sets(("emoset2k",), ("emoset2k", "emotion6"), "emotion6") == (
        "emoset2k",)
    assert "the training set emotion6 is not in data.in_domain" in caplog.text
