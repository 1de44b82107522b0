"""Evaluation report: a run's results.json / results.md / curves.png, and the paper's Table 1.

One run is one *setting* of the paper: setting A trains on EmoSet (in-domain EmoSet^I,
out-of-domain Emotion6 and WebEmo), setting B on Emotion6 (in-domain Emo6^I, out EmoSet and
WebEmo). The paper's A^I / A^O / A combine both runs, so a single run's report shows its own cells
only; `python -m emor3_jax.report RUN_A RUN_B [--json OUT] [--checkpoint final|best]` reads the
two workdirs' `report/results.json` and prints the paper's row beside the published ones.

A training run has two checkpoints to report: the final one (the params after the last step,
evaluated at the end) and the best one (checkpoints_best/: the RL evaluation with the highest
validation score, the mean in-domain accuracy; its numbers are from that evaluation). results.json
holds both, each with its step: `final` = {step, accuracy}, `best` = {step, score, score_sets,
accuracy} (null when nothing was evaluated during RL); the top-level `accuracy` is the final
checkpoint's (`accuracy_checkpoint`), as before. Table 1 uses the final checkpoints unless
`--checkpoint=best`, and says which it used and their steps.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from emor3_jax import fileio, metric_names as names

# docs/method.md's results table: (setting, data set, column header).
PAPER_COLUMNS = (("A", "emoset2k", "EmoSet^I"), ("A", "emotion6", "Emo6"), ("A", "webemo", "WebEmo"),
                 ("B", "emotion6", "Emo6^I"), ("B", "emoset2k", "EmoSet"), ("B", "webemo", "WebEmo"))
SETTING_OF_TRAIN = {"emoset2k": "A", "emotion6": "B"}
# Published rows (Qwen2.5-VL-3B-Instruct, accuracy %, docs/method.md): the six cells, A^I, A^O, A.
PUBLISHED = {
    "zero-shot": (51.55, 50.00, 40.65, 50.00, 51.55, 40.65, 50.77, 45.71, 47.40),
    "SFT": (77.15, 34.51, 17.75, 69.53, 26.45, 37.65, 73.34, 29.09, 43.84),
    "GRPO G=4": (74.60, 60.10, 49.50, 70.88, 59.90, 44.85, 72.74, 53.59, 59.97),
    "DAPO G=4": (68.99, 56.90, 49.80, 68.56, 59.95, 45.50, 68.78, 53.04, 58.28),
    "EMO-R3 G=4": (75.50, 60.44, 50.45, 70.71, 60.70, 45.20, 73.10, 54.20, 60.50),
    "GRPO G=8": (75.45, 57.91, 49.40, 69.87, 60.30, 42.05, 72.66, 52.42, 59.16),
    "DAPO G=8": (70.21, 55.72, 48.80, 62.39, 58.05, 46.30, 66.30, 52.22, 56.91),
    "EMO-R3 G=8": (76.40, 59.26, 49.70, 71.72, 61.80, 43.65, 74.06, 53.60, 60.42),
}
HEADER = [c[2] for c in PAPER_COLUMNS] + ["A^I", "A^O", "A"]


def _fmt(x):
    return "–" if x is None else f"{x:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _step(step) -> str:
    return "step not recorded" if step is None else f"step {step}"


def results_markdown(accuracy: Mapping[str, float], train_set: str, method: str,
                     step: int | None = None, best: Mapping | None = None) -> str:
    """One run's accuracies (percent), in-domain first, with the setting it is; with `step`
    (the final checkpoint's) and/or `best` (its record), one row per checkpoint, each naming
    its step, and a line on where each row's numbers come from."""
    setting = SETTING_OF_TRAIN.get(train_set)
    names = sorted(accuracy, key=lambda k: (k != train_set, k))
    header = [n + ("^I" if n == train_set else "") for n in names]
    pct = lambda acc: [_fmt(100 * acc[n]) if n in acc else _fmt(None) for n in names]  # noqa: E731
    notes = ""
    if step is None and best is None:
        rows = [[method] + pct(accuracy)]
    else:
        rows = [[f"{method} (final, {_step(step)})"] + pct(accuracy)]
        notes = (f"- final: the parameters after the last step ({_step(step)}), evaluated at the "
                 "end; `accuracy` in results.json, the export and Table 1 by default are this "
                 "checkpoint.\n")
        if best is not None:
            rows.append([f"{method} (best, step {best['step']})"] + pct(best["accuracy"]))
            sets = "+".join(best.get("score_sets", [])) or "the in-domain sets"
            notes += (f"- best: step {best['step']}, the highest validation score among the "
                      f"evaluations during RL ({100 * best['score']:.2f} = mean accuracy on "
                      f"{sets}), kept in checkpoints_best/; its numbers are from that "
                      "evaluation (picked as the maximum, so they lean optimistic).\n")
        notes = "\n" + notes
    table = _table(header, rows)
    if setting:
        lead = (f"Setting {setting} of the paper (trained on {train_set}); accuracy in percent. "
                "The paper's A^I / A^O / A average both settings: `python -m emor3_jax.report "
                "RUN_A RUN_B` combines this run with one of the other setting.\n\n")
    else:
        lead = f"Trained on {train_set}; accuracy in percent.\n\n"
    return lead + table + notes


def write_report(report_dir: str, accuracy: Mapping[str, float], *, train_set: str, method: str,
                 step: int | None = None, best: Mapping | None = None,
                 extra: Mapping | None = None) -> dict:
    """results.json and results.md of one run: `accuracy` of the final checkpoint (the params
    at `step`, None = not recorded, e.g. the loaded weights of an eval-only run) and `best`,
    the best validation checkpoint's record (checkpoint.BestCheckpointer), or None."""
    accuracy = {k: float(v) for k, v in accuracy.items()}
    result = {"method": method, "train_set": train_set,
              "setting": SETTING_OF_TRAIN.get(train_set),
              "accuracy": accuracy, "accuracy_checkpoint": "final",
              "final": {"step": step, "accuracy": dict(accuracy)},
              "best": None if best is None else dict(best),
              **(dict(extra) if extra else {})}
    fileio.write_atomic(fileio.join(report_dir, "results.json"), json.dumps(result, indent=2))
    fileio.write_atomic(fileio.join(report_dir, "results.md"),
                        results_markdown(accuracy, train_set, method, step=step, best=best))
    return result


# --------------------------------------------------------------------------------------------
# Table 1 across the two settings.

def table1(cells: Sequence[float]) -> dict:
    """The six cells (percent, PAPER_COLUMNS order) -> {cells, A_I, A_O, A}: A^I the mean of the
    two in-domain cells, A^O of the four out-of-domain cells, A of all six."""
    if len(cells) != len(PAPER_COLUMNS):
        raise ValueError(f"Table 1 has {len(PAPER_COLUMNS)} cells, got {len(cells)}")
    in_domain = [head.endswith("^I") for _, _, head in PAPER_COLUMNS]
    ins = [c for c, i in zip(cells, in_domain) if i]
    outs = [c for c, i in zip(cells, in_domain) if not i]
    return {"cells": {f"{st}/{name}": float(c) for c, (st, name, _) in zip(cells, PAPER_COLUMNS)},
            "A_I": float(np.mean(ins)), "A_O": float(np.mean(outs)),
            "A": float(np.mean(list(cells)))}


CHECKPOINTS = ("final", "best")


def checkpoint_accuracy(run: Mapping, src: str, checkpoint: str = "final"
                        ) -> tuple[Mapping[str, float], int | None]:
    """(accuracy, step) of a run's `checkpoint` (final | best) from its results.json. A
    results.json written before `final` was recorded has the final accuracy only (step None)."""
    if checkpoint == "final":
        final = run.get("final") or {}
        return final.get("accuracy", run.get("accuracy", {})), final.get("step")
    if checkpoint == "best":
        best = run.get("best")
        if not best:
            raise ValueError(f"{src}: results.json has no best checkpoint (one is kept when "
                             "the run evaluates during RL, config.train.eval_every); use "
                             "--checkpoint=final")
        return best.get("accuracy", {}), best.get("step")
    raise ValueError(f"checkpoint={checkpoint!r}; choose one of {CHECKPOINTS}")


def combine_runs(runs: Sequence[Mapping], sources: Sequence[str],
                 checkpoint: str = "final") -> dict:
    """Two runs' results.json (any order) -> Table 1 (percent) of their `checkpoint`s (final |
    best). Errors name the file and field."""
    by_setting: dict[str, tuple[Mapping, str]] = {}
    for run, src in zip(runs, sources):
        train = run.get("train_set")
        setting = SETTING_OF_TRAIN.get(train)
        if setting is None:
            raise ValueError(f"{src}: train_set={train!r} is neither setting A (emoset2k) nor "
                             "setting B (emotion6) of the paper's Table 1")
        if setting in by_setting:
            raise ValueError(f"{src} and {by_setting[setting][1]} both train on {train} (setting "
                             f"{setting}); Table 1 needs one run of each setting")
        by_setting[setting] = (run, src)
    chosen = {s: checkpoint_accuracy(*by_setting[s], checkpoint) for s in ("A", "B")}
    cells = []
    for setting, name, head in PAPER_COLUMNS:
        src = by_setting[setting][1]
        acc = chosen[setting][0]
        if name not in acc:
            raise ValueError(f"{src}: the {checkpoint} checkpoint's accuracy has no {name!r} "
                             f"(the {head} cell of setting {setting}); evaluate that run on "
                             f"{name} (config.data.eval)")
        cells.append(100.0 * float(acc[name]))
    out = table1(cells)
    out["methods"] = {s: by_setting[s][0].get("method") for s in ("A", "B")}
    out["sources"] = {s: by_setting[s][1] for s in ("A", "B")}
    out["checkpoint"] = checkpoint
    out["steps"] = {s: chosen[s][1] for s in ("A", "B")}
    return out


def checkpoint_line(result: Mapping) -> str:
    """Which checkpoint of each run the cells come from, with its step."""
    ck = result.get("checkpoint", "final")
    what = ("the final checkpoint (params after the last step)" if ck == "final" else
            "the best checkpoint (highest in-domain validation accuracy during RL)")
    runs = ", ".join(f"{s}: {_step(result.get('steps', {}).get(s))} of {result['sources'][s]}"
                     for s in ("A", "B"))
    return f"Cells from {what} of each run -- {runs}.\n\n"


def table1_markdown(result: Mapping, method: str) -> str:
    cells = [_fmt(v) for v in result["cells"].values()]
    label = f"{method} ({result.get('checkpoint', 'final')})"
    rows = [[label] + cells + [_fmt(result[k]) for k in ("A_I", "A_O", "A")]]
    rows += [[f"{k} (published)"] + [_fmt(v) for v in vals] for k, vals in PUBLISHED.items()]
    return _table(HEADER, rows)


def _read_results(workdir: str) -> dict:
    path = fileio.join(workdir, "report", "results.json")
    if not fileio.exists(path):
        raise FileNotFoundError(f"{path} does not exist: give a run's workdir (its final "
                                "evaluation writes report/results.json)")
    return json.loads(fileio.read_text(path))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emor3_jax.report",
                                 description="The paper's Table 1 from one run of each setting.")
    ap.add_argument("runs", nargs=2, metavar="RUN", help="workdirs of the setting A and B runs")
    ap.add_argument("--json", help="write the six cells and A_I / A_O / A (percent) here")
    ap.add_argument("--checkpoint", choices=CHECKPOINTS, default="final",
                    help="which checkpoint of each run: final (the params after the last step, "
                         "default) or best (highest in-domain validation accuracy during RL)")
    a = ap.parse_args(argv)
    try:
        result = combine_runs([_read_results(r) for r in a.runs], a.runs, a.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    methods = result["methods"]
    method = methods["A"] if methods["A"] == methods["B"] else f"{methods['A']} / {methods['B']}"
    print(checkpoint_line(result) + table1_markdown(result, method), end="")
    if a.json:
        fileio.write_atomic(a.json, json.dumps(result, indent=2))
    return 0


CURVES = (("reward", (names.REWARD_MEAN, "reward/format", names.ACCURACY, "reward/coherence",
                      "reward/consistency")),
          ("accuracy", (names.ACCURACY, names.EVAL_PREFIX + names.EVAL_ACCURACY)),
          ("kl", (names.KL,)),
          ("response length", (names.RESPONSE_LENGTH_MEAN,)))


def plot_curves(rows: Sequence[Mapping], path: str) -> None:
    """Training curves (reward and components, accuracy, KL, response length) from metric rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for ax, (title, keys) in zip(axes, CURVES):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(path)[1][1:] or "png", dpi=110)
    plt.close(fig)
    fileio.write_atomic(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
