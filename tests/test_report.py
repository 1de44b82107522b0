"""The paper's Table 1 from one run of each setting (`python -m emor3_jax.report RUN_A RUN_B`)."""
import json

import pytest

from emor3_jax import report

# EMO-R3 G=8 as published: setting A (EmoSet^I, Emo6, WebEmo), setting B (Emo6^I, EmoSet, WebEmo)
RUN_A = {"method": "emor3", "train_set": "emoset2k",
         "accuracy": {"emoset2k": 0.7640, "emotion6": 0.5926, "webemo": 0.4970}}
RUN_B = {"method": "emor3", "train_set": "emotion6",
         "accuracy": {"emotion6": 0.7172, "emoset2k": 0.6180, "webemo": 0.4365}}


def _workdir(tmp_path, name, result):
    (tmp_path / name / "report").mkdir(parents=True)
    (tmp_path / name / "report" / "results.json").write_text(json.dumps(result))
    return str(tmp_path / name)


def test_published_cells_give_the_published_averages():
    for method, row in report.PUBLISHED.items():
        t = report.table1(row[:6])
        assert [round(t[k], 2) for k in ("A_I", "A_O", "A")] == pytest.approx(row[6:], abs=0.011), method
    t = report.table1(report.PUBLISHED["EMO-R3 G=8"][:6])
    assert (round(t["A_I"], 2), round(t["A_O"], 2), round(t["A"], 2)) == (74.06, 53.60, 60.42)


def test_cli_combines_the_two_settings_in_any_order(tmp_path, capsys):
    a, b = _workdir(tmp_path, "a", RUN_A), _workdir(tmp_path, "b", RUN_B)
    out = tmp_path / "table1.json"
    assert report.main([b, a, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (round(result["A_I"], 2), round(result["A_O"], 2), round(result["A"], 2)) == (
        74.06, 53.60, 60.42)
    assert result["cells"]["B/emoset2k"] == pytest.approx(61.80)
    assert result["sources"] == {"A": a, "B": b}
    printed = capsys.readouterr().out
    assert "| emor3 (final) | 76.40 | 59.26 | 49.70 | 71.72 | 61.80 | 43.65 | 74.06 | 53.60 | " \
           "60.42 |" in printed
    assert printed.startswith("Cells from the final checkpoint (params after the last step) "
                              f"of each run -- A: step not recorded of {a}, B: step not "
                              f"recorded of {b}.")
    assert result["checkpoint"] == "final" and result["steps"] == {"A": None, "B": None}
    assert "| EMO-R3 G=8 (published) |" in printed


@pytest.mark.parametrize("runs, words", [
    ((RUN_A, RUN_A), ["both train on emoset2k", "one run of each setting"]),
    ((RUN_A, {**RUN_B, "accuracy": {"emotion6": 0.7, "emoset2k": 0.6}}),
     ["b", "no 'webemo'", "WebEmo cell of setting B", "config.data.eval"]),
    ((RUN_A, {**RUN_B, "train_set": "webemo"}), ["train_set='webemo'", "neither setting"]),
])
def test_cli_errors_name_the_run_and_the_fix(tmp_path, capsys, runs, words):
    dirs = [_workdir(tmp_path, n, r) for n, r in zip("ab", runs)]
    assert report.main(dirs) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_missing_results_names_the_file(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope"), _workdir(tmp_path, "b", RUN_B)]) == 2
    assert "nope/report/results.json does not exist" in capsys.readouterr().err


def test_one_run_shows_its_own_cells_and_setting_not_paper_averages(tmp_path):
    result = report.write_report(str(tmp_path), RUN_A["accuracy"], train_set="emoset2k",
                                 method="emor3")
    assert result["setting"] == "A" and "A_I" not in result
    md = (tmp_path / "results.md").read_text()
    assert "Setting A of the paper (trained on emoset2k)" in md
    assert "| method | emoset2k^I | emotion6 | webemo |" in md
    assert "| emor3 | 76.40 | 59.26 | 49.70 |" in md
    assert "A^O" in md and "| A^I |" not in md       # mentioned in the text, not as a column


# A run with both checkpoints recorded (Trainer.finish after training): final at step 80, best
# at step 40 with other accuracies.
BEST_A = {"step": 40, "score": 0.78, "score_sets": ["emoset2k"],
          "accuracy": {"emoset2k": 0.78, "emotion6": 0.60, "webemo": 0.50}}
BEST_B = {"step": 60, "score": 0.72, "score_sets": ["emotion6"],
          "accuracy": {"emotion6": 0.72, "emoset2k": 0.62, "webemo": 0.44}}


def test_report_records_final_and_best_with_their_steps(tmp_path):
    result = report.write_report(str(tmp_path / "report"), RUN_A["accuracy"],
                                 train_set="emoset2k", method="emor3", step=80, best=BEST_A)
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved == result
    assert saved["accuracy"] == RUN_A["accuracy"] and saved["accuracy_checkpoint"] == "final"
    assert saved["final"] == {"step": 80, "accuracy": RUN_A["accuracy"]}
    assert saved["best"] == BEST_A
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| emor3 (final, step 80) | 76.40 | 59.26 | 49.70 |" in md
    assert "| emor3 (best, step 40) | 78.00 | 60.00 | 50.00 |" in md
    assert "- final: the parameters after the last step (step 80)" in md
    assert "- best: step 40, the highest validation score" in md
    assert "78.00 = mean accuracy on emoset2k" in md


def test_cli_takes_the_final_or_the_best_checkpoint(tmp_path, capsys):
    a = _workdir(tmp_path, "a", {**RUN_A, "final": {"step": 80, "accuracy": RUN_A["accuracy"]},
                                 "best": BEST_A})
    b = _workdir(tmp_path, "b", {**RUN_B, "final": {"step": 80, "accuracy": RUN_B["accuracy"]},
                                 "best": BEST_B})
    out = tmp_path / "t.json"
    assert report.main([a, b, "--json", str(out)]) == 0
    final = json.loads(out.read_text())
    assert final["checkpoint"] == "final" and final["steps"] == {"A": 80, "B": 80}
    assert final["cells"]["A/emoset2k"] == pytest.approx(76.40)
    printed = capsys.readouterr().out
    assert f"final checkpoint (params after the last step) of each run -- A: step 80 of {a}" \
           in printed and "| emor3 (final) | 76.40 |" in printed

    assert report.main([a, b, "--json", str(out), "--checkpoint=best"]) == 0
    best = json.loads(out.read_text())
    assert best["checkpoint"] == "best" and best["steps"] == {"A": 40, "B": 60}
    assert best["cells"]["A/emoset2k"] == pytest.approx(78.0)
    assert best["cells"]["B/emotion6"] == pytest.approx(72.0)
    printed = capsys.readouterr().out
    assert f"best checkpoint (highest in-domain validation accuracy during RL) of each run -- " \
           f"A: step 40 of {a}, B: step 60 of {b}." in printed
    assert "| emor3 (best) | 78.00 | 60.00 | 50.00 | 72.00 | 62.00 | 44.00 |" in printed


def test_cli_best_without_a_best_checkpoint_says_so(tmp_path, capsys):
    a = _workdir(tmp_path, "a", {**RUN_A, "best": None})
    b = _workdir(tmp_path, "b", {**RUN_B, "best": BEST_B})
    assert report.main([a, b, "--checkpoint", "best"]) == 2
    err = capsys.readouterr().err
    assert f"{a}: results.json has no best checkpoint" in err
    assert "config.train.eval_every" in err and "--checkpoint=final" in err
