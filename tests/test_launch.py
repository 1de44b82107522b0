"""launch/: the TPU pod script (dry run, and its control flow against a stand-in gcloud) and the
SLURM script (dry run), plus a real 2-process jax.distributed start from a SLURM step's
environment, which is what emor3_jax/distributed.py sees under launch/slurm_gpu.sbatch."""
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"

# Stands in for gcloud where it cannot run: logs its arguments, answers `describe` with
# $FAKE_TPU_STATE (no TPU VM when empty), and succeeds.
FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
    if [ "$4" = describe ]; then
      [ -n "${FAKE_TPU_STATE:-}" ] || exit 1
      echo "$FAKE_TPU_STATE"
    fi
    """)


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("EMOR3_", "SLURM_"))}
    e.update(PATH=f"{bin_dir}{os.pathsep}{e['PATH']}", FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
             TMPDIR=str(tmp_path))
    return e


def _run(args, env, cwd=None, check=True):
    p = subprocess.run(["bash", *map(str, args)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _gcloud_calls(env):
    log = pathlib.Path(env["FAKE_GCLOUD_LOG"])
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_tpu_help_and_bad_option(env):
    assert "usage: launch/tpu_pod.sh" in _run([TPU, "--help"], env).stdout
    p = _run([TPU, "--frobnicate"], env, check=False)
    assert p.returncode == 2 and "unknown option '--frobnicate'" in p.stderr
    p = _run([TPU, "--remote-dir", "../x", "--dry-run"], env, check=False)
    assert p.returncode == 2 and "--remote-dir" in p.stderr


def test_tpu_dry_run_prints_every_step_and_runs_nothing(env):
    out = _run([TPU, "--dry-run"], env).stdout
    assert _gcloud_calls(env) == [], "--dry-run must not call gcloud"
    lines = out.splitlines()
    gc = "gcloud compute tpus tpu-vm"
    expected = [
        f"{gc} describe emor3 --zone=us-central2-b",
        f"{gc} create emor3 --zone=us-central2-b --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base",
        "tar -czf",
        f"{gc} scp {env['TMPDIR']}/emor3_jax-emor3.tar.gz emor3:emor3_jax.tar.gz "
        "--zone=us-central2-b --worker=all",
        f"{gc} ssh emor3 --zone=us-central2-b --worker=all '--command=set -e; rm -rf emor3_jax;",
        "uv venv --clear --python 3.12",
        "EMOR3_DISTRIBUTED=1 \"$HOME\"/emor3_venv/bin/python -m emor3_jax.main "
        "--config=configs/tpu_v4.py "
        '--workdir="$HOME"/emor3_runs/emor3',
        f"{gc} scp --recurse emor3:emor3_runs/emor3/report reports/emor3 --zone=us-central2-b "
        "--worker=0",
    ]
    at = 0
    for want in expected:      # in this order
        hits = [i for i, line in enumerate(lines) if i >= at and want in line]
        assert hits, f"{want!r} not found after line {at} in:\n{out}"
        at = hits[0]
    assert "delete" not in out
    # Every remote command is valid shell for the worker.
    for line in lines:
        for word in shlex.split(line) if line.startswith("gcloud") else []:
            if word.startswith("--command="):
                subprocess.run(["bash", "-n", "-c", word[len("--command="):]], check=True)


def test_tpu_dry_run_options_env_and_main_flags(env):
    env = dict(env, EMOR3_TPU_ZONE="europe-west4-a", EMOR3_TPU_PROJECT="my-proj")
    out = _run([TPU, "--dry-run", "--name=pod7", "--type", "v5p-16", "--version=v2-alpha-tpuv5",
                "--config", "configs/tpu_v4_7b.py:grpo", "--workdir", "gs://bkt/run 1",
                "--repo", "https://example.com/emor3_jax.git", "--ref", "v1", "--spot", "--delete",
                "--", "--config.model.hf_dir=gs://bkt/Qwen2.5-VL-7B-Instruct",
                "--config.rollout.group_size=4"], env).stdout
    assert ("create pod7 --zone=europe-west4-a --project=my-proj --accelerator-type=v5p-16 "
            "--version=v2-alpha-tpuv5 --spot") in out
    assert "git clone --depth 1 --branch v1 https://example.com/emor3_jax.git emor3_jax" in out
    assert "tar -czf" not in out
    run = [w for line in out.splitlines() if line.startswith("gcloud")
           for w in shlex.split(line) if w.startswith("--command=") and "emor3_jax.main" in w]
    assert len(run) == 1
    argv = shlex.split(run[0][len("--command="):].split("&&", 1)[1])
    assert argv == ["EMOR3_DISTRIBUTED=1", "$HOME/emor3_venv/bin/python", "-m", "emor3_jax.main",
                    "--config=configs/tpu_v4_7b.py:grpo", "--workdir=gs://bkt/run 1",
                    "--config.model.hf_dir=gs://bkt/Qwen2.5-VL-7B-Instruct",
                    "--config.rollout.group_size=4"]
    assert "gcloud storage cp -r 'gs://bkt/run 1/report' reports/pod7" in out
    assert out.rstrip().splitlines()[-1] == ("gcloud compute tpus tpu-vm delete pod7 "
                                             "--zone=europe-west4-a --project=my-proj --quiet")


def _worker_commands(out):
    return [w[len("--command="):] for line in out.splitlines() if line.startswith("gcloud")
            for w in shlex.split(line) if w.startswith("--command=")]


def test_tpu_workers_get_a_python_jax_supports(env):
    """The TPU images ship Python 3.10 and jax >= 0.7 needs 3.11: by default every worker gets a
    uv venv of Python 3.12, the package is installed into it and the run uses it; --python
    takes an existing interpreter, checked to be >= 3.11 on the worker before installing."""
    cmds = _worker_commands(_run([TPU, "--dry-run", "--venv", "envs/py312"], env).stdout)
    install, = [c for c in cmds if "install" in c]
    train, = [c for c in cmds if "emor3_jax.main" in c]
    venv_py = '"$HOME"/envs/py312/bin/python'
    assert "https://astral.sh/uv/install.sh" in install
    assert 'uv venv --clear --python 3.12 "$HOME"/envs/py312' in install
    assert f"uv pip install -q --python {venv_py} -e '.[tpu]'" in install
    assert install.index("uv venv") < install.index("uv pip install")
    assert f"EMOR3_DISTRIBUTED=1 {venv_py} -m emor3_jax.main" in train
    assert "python3" not in install + train, "the image's Python 3.10 must not run the package"

    # The venv check runs for real: a Python of another minor version makes uv rebuild the venv.
    def venv_is_current(install, venv_py):    # the worker's test, on this interpreter
        check = install.split("if ! ", 1)[1].split(" 2>/dev/null")[0]
        return subprocess.run(["bash", "-c", check.replace(venv_py, sys.executable)]).returncode == 0

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert venv_is_current(install, venv_py) == (here == "3.12")
    other = _worker_commands(_run([TPU, "--dry-run", "--python-version", here], env).stdout)
    assert venv_is_current([c for c in other if "install" in c][0], '"$HOME"/emor3_venv/bin/python')

    cmds = _worker_commands(_run([TPU, "--dry-run", "--python", "/opt/py/bin/python3"], env).stdout)
    install, = [c for c in cmds if "install" in c]
    assert "uv venv --clear" not in install and "astral.sh" not in install
    assert install.index("sys.version_info < (3, 11)") < install.index("pip install")
    assert any("EMOR3_DISTRIBUTED=1 /opt/py/bin/python3 -m emor3_jax.main" in c for c in cmds)

    p = _run([TPU, "--dry-run", "--python-version", "3.10"], env, check=False)
    assert p.returncode == 2 and "Python 3.11 or later" in p.stderr


def test_tpu_named_python_below_311_stops_before_installing(env, tmp_path):
    """The worker's --python check, run for real against an interpreter that reports 3.10."""
    old = tmp_path / "python3.10"
    old.write_text("#!/usr/bin/env bash\n"
                   "case \"$*\" in -V) echo 'Python 3.10.12' ;; -c*) exit 1 ;;"
                   " *) echo INSTALLED >> \"$FAKE_GCLOUD_LOG\" ;; esac\n")
    old.chmod(0o755)
    cmds = _worker_commands(_run([TPU, "--dry-run", "--python", str(old)], env).stdout)
    install, = [c for c in cmds if "install" in c]
    code = tmp_path / "emor3_jax"
    code.mkdir()
    p = subprocess.run(["bash", "-c", install], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 2, p.stderr
    assert f"{old} on" in p.stderr and "is Python 3.10.12" in p.stderr and ">= 3.11" in p.stderr
    assert "INSTALLED" not in _gcloud_calls(env)


@pytest.mark.parametrize("state,created,started", [("", True, False), ("READY", False, False),
                                                    ("STOPPED", False, True)])
def test_tpu_creates_reuses_or_starts(env, state, created, started):
    env = dict(env, FAKE_TPU_STATE=state)
    _run([TPU, "--skip-code", "--skip-install", "--report-dir", env["TMPDIR"] + "/rep"], env)
    calls = _gcloud_calls(env)
    assert calls[0].startswith("compute tpus tpu-vm describe emor3")
    assert any(c.startswith("compute tpus tpu-vm create emor3") for c in calls) == created
    assert any(c.startswith("compute tpus tpu-vm start emor3") for c in calls) == started
    assert any("--worker=all --command=cd emor3_jax && EMOR3_DISTRIBUTED=1" in c for c in calls)
    assert calls[-1].startswith("compute tpus tpu-vm scp --recurse emor3:emor3_runs/emor3/report")


def test_tpu_recreates_a_preempted_tpu(env):
    _run([TPU, "--skip-code", "--skip-install", "--skip-run"], dict(env, FAKE_TPU_STATE="PREEMPTED"))
    calls = [" ".join(c.split()[:5]) for c in _gcloud_calls(env)]
    assert calls == ["compute tpus tpu-vm describe emor3", "compute tpus tpu-vm delete emor3",
                     "compute tpus tpu-vm create emor3"]


def test_tpu_refuses_a_tpu_in_a_bad_state(env):
    p = _run([TPU], dict(env, FAKE_TPU_STATE="CREATING"), check=False)
    assert p.returncode == 2 and "state CREATING" in p.stderr
    assert not any("create" in c or "ssh" in c for c in _gcloud_calls(env))


def test_tpu_ships_this_checkout_without_git_or_workdirs(env):
    _run([TPU, "--skip-create", "--skip-install", "--skip-run"], env)
    with tarfile.open(pathlib.Path(env["TMPDIR"]) / "emor3_jax-emor3.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"setup.py", "emor3_jax/main.py", "configs/tpu_v4.py", "launch/tpu_pod.sh"} <= names
    assert not any(n.startswith((".git/", "workdir")) or "__pycache__" in n for n in names)
    calls = _gcloud_calls(env)
    assert calls[0].startswith("compute tpus tpu-vm scp ") and "--worker=all" in calls[0]
    assert "tar -xzf emor3_jax.tar.gz -C emor3_jax" in calls[1]


def _slurm_env(env, **kw):
    return dict(env, EMOR3_DRY_RUN="1", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NAME="emor3",
                SLURM_CPUS_PER_TASK="64", **kw)


def test_slurm_one_process_per_node_sees_all_gpus(env):
    out = _run([SLURM, "--config.rollout.group_size=4"],
               _slurm_env(env, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2",
                          SLURM_NTASKS_PER_NODE="1(x2)", SLURM_GPUS_ON_NODE="8"),
               cwd=env["TMPDIR"]).stdout.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out
    assert "SRUN_CPUS_PER_TASK=64" in out
    assert shlex.split(out[-1]) == [
        "srun", "--kill-on-bad-exit=1", "python", "-m", "emor3_jax.main",
        "--config=configs/gpu.py", f"--workdir={ROOT}/workdir/slurm-emor3",
        "--config.rollout.group_size=4"]


def test_slurm_one_process_per_gpu_and_bad_split(env):
    out = _run([SLURM], _slurm_env(env, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16",
                                   SLURM_GPUS_ON_NODE="8", EMOR3_WORKDIR="/shared/run",
                                   EMOR3_CONFIG="configs/tpu_v4.py:grpo"), cwd=ROOT).stdout
    assert "JAX_LOCAL_DEVICE_IDS=\n" in out       # jax's SLURM default: GPU = SLURM_LOCALID
    assert "--config=configs/tpu_v4.py:grpo --workdir=/shared/run" in out
    p = _run([SLURM], _slurm_env(env, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="6",
                                 SLURM_GPUS_ON_NODE="8"), check=False)
    assert p.returncode == 2 and "--ntasks-per-node=8" in p.stderr
    p = _run([SLURM], _slurm_env(env, EMOR3_CONFIG="configs/nope.py"), check=False)
    assert p.returncode == 2 and "configs/nope.py not found" in p.stderr


PROBE = """
import jax
from emor3_jax import distributed
distributed.initialize()
print("PROCESS", jax.process_index(), "OF", jax.process_count(), flush=True)
"""


def test_slurm_step_environment_starts_jax_distributed(env, tmp_path):
    """Two processes with the variables srun gives each task (one task per node, as the sbatch
    script's default) join one jax.distributed job through emor3_jax.distributed."""
    base = dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS="", SLURM_JOB_ID=str(40000 + os.getpid() % 999),
                SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="2",
                SLURM_LOCALID="0", JAX_LOCAL_DEVICE_IDS="0")
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=dict(base, SLURM_PROCID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for i, out in enumerate(outs):
        assert f"PROCESS {i} OF 2" in out, out


def test_slurm_refuses_a_python_below_311(env, tmp_path):
    old = tmp_path / "python3.10"
    old.write_text("#!/usr/bin/env bash\ncase \"$*\" in -V) echo 'Python 3.10.12' ;; *) exit 1 ;; esac\n")
    old.chmod(0o755)
    p = _run([SLURM], _slurm_env(env, EMOR3_PYTHON=str(old)), cwd=ROOT, check=False)
    assert p.returncode == 2 and "is Python 3.10.12" in p.stderr and "EMOR3_VENV" in p.stderr
