"""Evaluation report: results.json, results.md (EMO-R3.md's table layout) and curves.png."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

# EMO-R3.md's results table: setting A trains on EmoSet, setting B on Emotion6.
PAPER_COLUMNS = (("A", "emoset2k", "EmoSet^I"), ("A", "emotion6", "Emo6"), ("A", "webemo", "WebEmo"),
                 ("B", "emotion6", "Emo6^I"), ("B", "emoset2k", "EmoSet"), ("B", "webemo", "WebEmo"))
SETTING_OF_TRAIN = {"emoset2k": "A", "emotion6": "B"}
# Published reference rows (Qwen2.5-VL-3B-Instruct, accuracy %), from EMO-R3.md.
PUBLISHED = {
    "zero-shot (published)": (51.55, 50.00, 40.65, 50.00, 51.55, 40.65, 50.77, 45.71, 47.40),
    "GRPO G=8 (published)": (75.45, 57.91, 49.40, 69.87, 60.30, 42.05, 72.66, 52.42, 59.16),
    "EMO-R3 G=8 (published)": (76.40, 59.26, 49.70, 71.72, 61.80, 43.65, 74.06, 53.60, 60.42),
}


def summarize(accuracy: Mapping[str, float], in_domain: Sequence[str]) -> dict:
    """A^I (mean in-domain), A^O (mean out-of-domain), A (mean of all), in percent."""
    ins = [100 * v for k, v in accuracy.items() if k in in_domain]
    outs = [100 * v for k, v in accuracy.items() if k not in in_domain]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"A_I": mean(ins), "A_O": mean(outs), "A": mean(ins + outs)}


def _fmt(x):
    return "–" if x is None else f"{x:.2f}"


def results_markdown(accuracy: Mapping[str, float], train_set: str, method: str) -> str:
    """The run's accuracies as a Markdown table; EMO-R3.md's layout when the data sets fit it."""
    setting = SETTING_OF_TRAIN.get(train_set)
    in_domain = (train_set,)
    s = summarize(accuracy, in_domain)
    if setting and set(accuracy) <= {"emoset2k", "emotion6", "webemo"}:
        header = [c[2] for c in PAPER_COLUMNS] + ["A^I", "A^O", "A"]
        cells = [_fmt(100 * accuracy[name]) if st == setting and name in accuracy else "–"
                 for st, name, _ in PAPER_COLUMNS]
        rows = [[method] + cells + [_fmt(s["A_I"]), _fmt(s["A_O"]), _fmt(s["A"])]]
        rows += [[k] + [_fmt(v) for v in vals] for k, vals in PUBLISHED.items()]
        lead = (f"Setting {setting} (trained on {train_set}); columns of the other setting are "
                "blank. Published rows from EMO-R3.md for reference.\n\n")
    else:
        names = sorted(accuracy, key=lambda k: (k not in in_domain, k))
        header = [n + ("^I" if n in in_domain else "") for n in names] + ["A^I", "A^O", "A"]
        rows = [[method] + [_fmt(100 * accuracy[n]) for n in names]
                + [_fmt(s["A_I"]), _fmt(s["A_O"]), _fmt(s["A"])]]
        lead = f"Trained on {train_set}; accuracy in percent.\n\n"
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lead + "\n".join(lines) + "\n"


def write_report(report_dir: str, accuracy: Mapping[str, float], *, train_set: str, method: str,
                 extra: Mapping | None = None) -> dict:
    os.makedirs(report_dir, exist_ok=True)
    result = {"method": method, "train_set": train_set,
              "accuracy": {k: float(v) for k, v in accuracy.items()},
              **summarize(accuracy, (train_set,)), **(dict(extra) if extra else {})}
    with open(os.path.join(report_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(report_dir, "results.md"), "w") as f:
        f.write(results_markdown(accuracy, train_set, method))
    return result


CURVES = (("reward", ("reward/mean", "reward/format", "reward/accuracy", "reward/coherence",
                      "reward/consistency")),
          ("accuracy", ("reward/accuracy", "eval/accuracy")),
          ("kl", ("loss/kl",)),
          ("response length", ("response/length_mean",)))


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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
