"""Executes notebooks/emor3_colab_tpu.ipynb on CPU with a tiny budget (nbclient, as CI does).

Parameters are injected the papermill way: a cell placed after the one tagged `parameters`.
The run also records a jax.profiler trace of one GRPO step (config.profile.steps), so this is
the end-to-end check that profiling writes `*.xplane.pb` into `<workdir>/profile`.
"""
import json
import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "emor3_colab_tpu.ipynb"

TINY = """
WORKDIR = {workdir!r}
SFT_STEPS = 0
MAX_STEPS = 2
EVAL_EXAMPLES = 8
PROFILE_STEPS = (1,)
OVERRIDES = {{"rollout.batch_size": 4, "rl.mini_batch_size": 4, "rollout.group_size": 4,
             "rollout.max_new_tokens": 16, "rollout.response_buckets": (16,),
             "eval.max_new_tokens": 16, "eval.batch_size": 8, "train.eval_every": 0}}
"""


def _kernel_for_this_python(root: pathlib.Path) -> str:
    """A kernelspec that runs this interpreter: the stock `python3` spec runs whatever `python`
    is first on PATH, which need not be the venv that has emor3_jax."""
    name = "emor3-test-python"
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "emor3 test", "language": "python"}))
    return name


def _outputs(nb, key):
    return [o.get("data", {}).get(key) for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if key in o.get("data", {})]


def test_colab_notebook_runs_demo_and_shows_results(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    workdir = tmp_path / "run"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(TINY.format(workdir=str(workdir))))

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = _kernel_for_this_python(tmp_path / "jupyter")
    # per cell: the training cell takes 1-2 minutes on 2 cores (mostly compiles); the limit
    # only turns a hang into a failure, it asserts no speed
    client = NotebookClient(nb, timeout=900, kernel_name=kernel,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()        # raises CellExecutionError with the traceback if a cell fails

    tables = [t for t in _outputs(nb, "text/markdown") if "| method |" in t]
    assert tables and "emo_synth" in tables[0], _outputs(nb, "text/markdown")
    assert _outputs(nb, "image/png"), "curves.png was not displayed"
    stdout = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert "micro_batch_size 16 -> 2" in stdout   # the demo's 16 rows/device, fitted to 8 devices

    result = json.loads((workdir / "report" / "results.json").read_text())
    assert result["train_set"] == "emo_synth" and 0.0 <= result["accuracy"]["emo_synth"] <= 1.0
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    assert str(traces[0]) in stdout, "the notebook did not list the trace"
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "reward/mean" in r) == 2


@pytest.mark.parametrize("name", ["PACKAGE_SOURCE", "MODEL_DIR", "PROFILE_STEPS", "OVERRIDES"])
def test_notebook_exposes_parameters(name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert f"\n{name} = " in "\n" + source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
