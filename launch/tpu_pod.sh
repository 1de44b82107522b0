#!/usr/bin/env bash
# Train EMO-R3 on a Cloud TPU VM, one host (v4-8) or a pod slice (v4-32, ...), from a laptop.
#
# 1. create the TPU VM, or reuse one of that name (READY; STOPPED is started; PREEMPTED is
#    deleted and created again)
# 2. put the code on every worker: this checkout (tar + scp) or `git clone` of --repo
# 3. on every worker: a Python >= 3.11 venv made by uv (the TPU images ship Python 3.10, and
#    jax >= 0.7 needs 3.11), then `uv pip install -e ".[tpu]"` into it
# 4. run the same `python -m emor3_jax.main` on every worker at once; EMOR3_DISTRIBUTED=1 makes
#    emor3_jax/distributed.py call jax.distributed.initialize(), which finds the other workers
#    through the TPU metadata server
# 5. copy <workdir>/report (results.md, results.json, curves.png) back from worker 0
# 6. optionally delete the TPU VM
#
# Every step is a gcloud command; --dry-run prints them instead of running them.
# Written for bash 3.2+ (macOS) as well as Linux.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [options] [-- flags for emor3_jax.main]

Creates (or reuses) a Cloud TPU VM, installs this package on every worker, runs
`python -m emor3_jax.main --config=CONFIG --workdir=WORKDIR [flags]` on all workers and
copies the report back. Options (or the environment variable in brackets):

  --name NAME           TPU VM name                         [EMOR3_TPU_NAME]     emor3
  --zone ZONE           zone                                [EMOR3_TPU_ZONE]     us-central2-b
  --type TYPE           accelerator type (v4-8, v4-32, v5p-16, v6e-8, ...)
                                                            [EMOR3_TPU_TYPE]     v4-8
  --version VERSION     TPU software version                [EMOR3_TPU_VERSION]  tpu-ubuntu2204-base
                        (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --project PROJECT     GCP project (default: gcloud's)     [EMOR3_TPU_PROJECT]
  --spot                create a Spot TPU VM (preemptible; the trainer saves on SIGTERM)
  --config FILE[:M]     config file, optionally :method     [EMOR3_CONFIG]       configs/tpu_v4.py
  --workdir DIR         run directory on the workers: gs://bucket/path (needed on multi-host
                        slices: every host writes its checkpoint shards into it), an absolute
                        path, or a path relative to the worker's home
                                                            [EMOR3_WORKDIR]      emor3_runs/NAME
  --repo URL            git URL cloned on every worker instead of copying this checkout
                                                            [EMOR3_REPO]
  --ref REF             branch or tag of --repo             [EMOR3_REF]          (default branch)
  --remote-dir DIR      code directory on the workers, relative to home
                                                            [EMOR3_REMOTE_DIR]   emor3_jax
  --python-version V    Python the worker venv is made with [EMOR3_PYTHON_VERSION] 3.12
                        (uv fetches a standalone build; 3.11 or later, as jax >= 0.7 needs)
  --venv DIR            that venv on the workers, relative to home
                                                            [EMOR3_TPU_VENV]     emor3_venv
  --python PY           use this interpreter on the workers instead of a venv (it must be
                        Python >= 3.11; checked before installing)
                                                            [EMOR3_PYTHON]       (the venv's)
  --report-dir DIR      where the report lands locally      [EMOR3_REPORT_DIR]   reports/NAME
  --skip-create         the TPU VM exists: do not describe/create it
  --skip-code           the code is already on the workers (no copy / clone)
  --skip-install        the package is already installed on the workers
  --skip-run            set up only (create, copy, install); no training, no report
  --delete              delete the TPU VM after the report is fetched
  --dry-run             print the commands instead of running them
  -h, --help            this message

Examples:
  launch/tpu_pod.sh --dry-run
  launch/tpu_pod.sh --name emor3-3b --workdir=gs://my-bucket/emor3_3b -- \
      --config.model.hf_dir=gs://my-bucket/Qwen2.5-VL-3B-Instruct \
      --config.data.manual_dir=/home/me/emotion
  launch/tpu_pod.sh --type v4-32 --config configs/tpu_v4_7b.py --workdir gs://my-bucket/emor3_7b \
      --delete -- --config.model.hf_dir=gs://my-bucket/Qwen2.5-VL-7B-Instruct
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME=${EMOR3_TPU_NAME:-emor3}
ZONE=${EMOR3_TPU_ZONE:-us-central2-b}
TYPE=${EMOR3_TPU_TYPE:-v4-8}
VERSION=${EMOR3_TPU_VERSION:-tpu-ubuntu2204-base}
PROJECT=${EMOR3_TPU_PROJECT:-}
CONFIG=${EMOR3_CONFIG:-configs/tpu_v4.py}
WORKDIR=${EMOR3_WORKDIR:-}
REPO=${EMOR3_REPO:-}
REF=${EMOR3_REF:-}
REMOTE_DIR=${EMOR3_REMOTE_DIR:-emor3_jax}
PY=${EMOR3_PYTHON:-}
PY_VERSION=${EMOR3_PYTHON_VERSION:-3.12}
VENV=${EMOR3_TPU_VENV:-emor3_venv}
REPORT_DIR=${EMOR3_REPORT_DIR:-}
SPOT=0 DELETE=0 DRY_RUN=0 DO_CREATE=1 DO_CODE=1 DO_INSTALL=1 DO_RUN=1
EXTRA=()

# Options take a value as `--opt value` or `--opt=value`.
while [ $# -gt 0 ]; do
  opt=$1 val="" has_val=0
  case $opt in
    --*=*) val=${opt#*=}; opt=${opt%%=*}; has_val=1 ;;
  esac
  case $opt in
    --name|--zone|--type|--version|--project|--config|--workdir|--repo|--ref|--remote-dir|\
    --python|--python-version|--venv|--report-dir)
      if [ $has_val = 0 ]; then
        [ $# -ge 2 ] || die "$opt needs a value (see --help)"
        val=$2; shift
      fi
      case $opt in
        --name) NAME=$val ;; --zone) ZONE=$val ;; --type) TYPE=$val ;;
        --version) VERSION=$val ;; --project) PROJECT=$val ;; --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;; --repo) REPO=$val ;; --ref) REF=$val ;;
        --remote-dir) REMOTE_DIR=$val ;; --python) PY=$val ;; --report-dir) REPORT_DIR=$val ;;
        --python-version) PY_VERSION=$val ;; --venv) VENV=$val ;;
      esac ;;
    --spot) SPOT=1 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-create) DO_CREATE=0 ;;
    --skip-code) DO_CODE=0 ;;
    --skip-install) DO_INSTALL=0 ;;
    --skip-run) DO_RUN=0 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (flags for emor3_jax.main go after '--'; see --help)" ;;
  esac
  shift
done

[ -n "$NAME" ] || die "--name is empty"
[ -n "$ZONE" ] || die "--zone is empty"
WORKDIR=${WORKDIR:-emor3_runs/$NAME}
REPORT_DIR=${REPORT_DIR:-reports/$NAME}
# The code directory is wiped and re-created on every worker: only a plain relative path.
case $REMOTE_DIR in
  ""|.|..|/*|~*|*..*) die "--remote-dir '$REMOTE_DIR' must be a plain path relative to the" \
                          "worker's home (e.g. emor3_jax)" ;;
esac
echo "$REMOTE_DIR" | grep -Eq '^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$' \
  || die "--remote-dir '$REMOTE_DIR' may only hold letters, digits, '_', '.', '-' and '/'"
echo "$PY_VERSION" | grep -Eq '^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$' \
  || die "--python-version '$PY_VERSION': emor3_jax needs Python 3.11 or later (jax >= 0.7" \
         "declares Requires-Python >= 3.11), e.g. --python-version 3.12"
case $VENV in
  ""|.|..|/*|~*|*..*) die "--venv '$VENV' must be a plain path relative to the worker's home" \
                        "(e.g. emor3_venv)" ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Quote one word for a POSIX shell (the local one when printing, the worker's in --command).
q() {
  case $1 in
    *[!A-Za-z0-9_./:=,@%+-]*|"") printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Run a command, or print it (one shell-quoted line) under --dry-run.
run() {
  if [ $DRY_RUN = 1 ]; then
    local line="" word
    for word in "$@"; do line="$line $(q "$word")"; done
    echo "${line# }"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

step() { echo "== $*" >&2; }

GC=(gcloud compute tpus tpu-vm)
if [ $DRY_RUN = 0 ]; then
  trap 'rc=$?; [ $rc = 0 ] || echo "tpu_pod.sh: failed (exit $rc). A TPU VM $NAME that was created is still \
running and billed: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2' EXIT
fi
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")
ssh_all() { run "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

# -------------------------------------------------------------------------------- 1. TPU VM --
if [ $DO_CREATE = 1 ]; then
  step "TPU VM $NAME ($TYPE, $VERSION) in $ZONE"
  create=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [ $SPOT = 1 ] && create+=(--spot)
  if [ $DRY_RUN = 1 ]; then
    run "${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
    echo "# only when describe finds no TPU VM named $NAME:"
    run "${create[@]}"
  else
    state=$("${GC[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true)
    case $state in
      "") run "${create[@]}" ;;
      READY) echo "reusing TPU VM $NAME (READY)" >&2 ;;
      STOPPED) run "${GC[@]}" start "$NAME" "${LOC[@]}" ;;
      PREEMPTED|TERMINATED)   # a Spot VM after preemption: only deleting it frees the name
        run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
        run "${create[@]}" ;;
      *) die "TPU VM $NAME exists in state $state; delete it (gcloud compute tpus tpu-vm" \
             "delete $NAME --zone=$ZONE) or pick another --name" ;;
    esac
  fi
fi

# ---------------------------------------------------------------------------------- 2. code --
RD=$(q "$REMOTE_DIR")
if [ $DO_CODE = 1 ]; then
  if [ -n "$REPO" ]; then
    step "git clone $REPO${REF:+ @ $REF} into ~/$REMOTE_DIR on every worker"
    ssh_all "set -e; rm -rf $RD; git clone --depth 1 ${REF:+--branch $(q "$REF") }$(q "$REPO") $RD"
  else
    step "copy $ROOT to ~/$REMOTE_DIR on every worker"
    tarball="${TMPDIR:-/tmp}/emor3_jax-$NAME.tar.gz"
    run tar -czf "$tarball" -C "$ROOT" --exclude=./.git --exclude='./workdir*' \
      --exclude=./.venv --exclude=./venv --exclude=./reports --exclude='*.egg-info' \
      --exclude='__pycache__' .
    run "${GC[@]}" scp "$tarball" "$NAME:emor3_jax.tar.gz" "${LOC[@]}" --worker=all
    ssh_all "set -e; rm -rf $RD; mkdir -p $RD; tar -xzf emor3_jax.tar.gz -C $RD; rm emor3_jax.tar.gz"
  fi
fi

# ------------------------------------------------------------------------------- 3. install --
# The TPU VM images (Ubuntu 22.04) ship Python 3.10, which jax >= 0.7 does not support: by
# default every worker gets a venv of Python $PY_VERSION made by uv (installed into
# ~/.local/bin by its standalone installer; uv fetches a standalone CPython build), and the
# package goes into it. An existing interpreter (--python) is checked to be >= 3.11 instead.
# uv makes a PEP 660 editable install, whose import hook maps emor3_jax.configs to configs/.
if [ -n "$PY" ]; then
  wpy=$(q "$PY")
else
  wpy="\"\$HOME\"/$(q "$VENV")/bin/python"
fi
need_311="import sys; sys.exit(sys.version_info < (3, 11))"
py_mm=${PY_VERSION#*.}
is_venv_version="import sys; sys.exit(sys.version_info[:2] != (${PY_VERSION%%.*}, ${py_mm%%.*}))"
if [ $DO_INSTALL = 1 ]; then
  if [ -n "$PY" ]; then
    step "pip install -e \".[tpu]\" into $PY on every worker"
    ssh_all "set -e; cd $RD; $wpy -c '$need_311' || { echo \"tpu_pod.sh: $PY on \$(hostname) is\
 \$($wpy -V 2>&1); emor3_jax needs Python >= 3.11 (jax >= 0.7). Leave out --python to get a uv\
 venv of Python $PY_VERSION.\" >&2; exit 2; }; $wpy -m pip install -q --upgrade pip;\
 $wpy -m pip install -q -e '.[tpu]'; $wpy -c 'import emor3_jax.configs.base'"
  else
    step "Python $PY_VERSION venv ~/$VENV (uv) and uv pip install -e \".[tpu]\" on every worker"
    uv='"$HOME"/.local/bin/uv'
    ssh_all "set -e; cd $RD; if [ ! -x $uv ]; then curl -LsSf https://astral.sh/uv/install.sh |\
 env UV_INSTALL_DIR=\"\$HOME\"/.local/bin UV_NO_MODIFY_PATH=1 sh; fi; if ! $wpy -c\
 '$is_venv_version' 2>/dev/null; then $uv venv --clear --python $(q "$PY_VERSION")\
 \"\$HOME\"/$(q "$VENV"); fi;\
 $uv pip install -q --python $wpy -e '.[tpu]'; $wpy -c 'import emor3_jax.configs.base'"
  fi
fi

[ $DO_RUN = 1 ] || { step "set up only (--skip-run): done"; exit 0; }

# ----------------------------------------------------------------------------------- 4. run --
# A relative workdir is relative to the worker's home, not to the code directory (which step 2
# wipes); the worker's shell expands "$HOME".
case $WORKDIR in
  gs://*|/*) remote_workdir=$(q "$WORKDIR") ;;
  *) remote_workdir="\"\$HOME\"/$(q "$WORKDIR")" ;;
esac
flags=""
for f in ${EXTRA[@]+"${EXTRA[@]}"}; do flags="$flags $(q "$f")"; done
step "train: $CONFIG on every worker, workdir $WORKDIR"
ssh_all "cd $RD && EMOR3_DISTRIBUTED=1 $wpy -m emor3_jax.main --config=$(q "$CONFIG") --workdir=$remote_workdir$flags"

# -------------------------------------------------------------------------------- 5. report --
step "report -> $REPORT_DIR"
run mkdir -p "$REPORT_DIR"
case $WORKDIR in
  gs://*) run gcloud storage cp -r "${WORKDIR%/}/report" "$REPORT_DIR" ;;
  *) run "${GC[@]}" scp --recurse "$NAME:${WORKDIR%/}/report" "$REPORT_DIR" "${LOC[@]}" --worker=0 ;;
esac
[ $DRY_RUN = 1 ] || echo "report: $REPORT_DIR/report/results.md" >&2

# -------------------------------------------------------------------------------- 6. delete --
if [ $DELETE = 1 ]; then
  step "delete TPU VM $NAME"
  run "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
fi
