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
    assert "| emor3 | 76.40 | 59.26 | 49.70 | 71.72 | 61.80 | 43.65 | 74.06 | 53.60 | 60.42 |" in printed
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
