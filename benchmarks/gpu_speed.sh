#!/usr/bin/env bash
# The train_speed suite (benchmarks/suites/train_speed.yaml) on a GPU, in one prepared run: images/s of a pretraining
# step against lightly's reference loop (bf16, GPU busy share, model FLOPs utilisation) and embedding throughput.
#
#   1. here, with network, once (fills .whl/, which git ignores: the packages the GPU image lacks, for its Python):
#        bash benchmarks/gpu_speed.sh --prepare
#   2. on the GPU machine, from the repository root (the device tool: carry [".whl"]; about 4 to 6 minutes):
#        bash benchmarks/gpu_speed.sh [--quick]
#
# Other suites: RUNS and DATA_DIR (step 3 below). Results: $OUT/<suite>/<task>/<suite>_<task>.{md,json} (with
# --quick: <suite>_quick.*), one folder per suite and task so that a task stopped by its time limit does not lose
# another's; the whole log in $OUT/gpu_speed.log; the Markdown is printed at the end. OUT defaults to /tmp/gpu_speed
# (the device tool sets it). Exit code: 0 when every task wrote its results, 1 when a task failed or ran out of time,
# 2 when something needed is missing.
# A dry run of this script without a GPU: DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_speed.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
WHEELS=$REPO/.whl
# The distributions that `sslcell benchmark` imports (found by listing the modules a --quick run of this suite loads)
# and that the lent H200 image (python3 3.12 with CUDA PyTorch, Lightning, numba, h5py, scikit-learn, pandas, ...;
# the device tool's KINDS.md) does not hold; pinned as in .ci/constraints.txt. Installed with --no-deps.
MISSING_ON_GPU_IMAGE=(
    lightly==1.6.0 anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
    scverse-misc==0.0.3 session-info2==0.4.1 zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0
    scanpy==1.11.5 umap-learn==0.5.12 pynndescent==0.7.0 faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0
)
LIMIT_TRAIN_STEP_S=${LIMIT_TRAIN_STEP_S:-240}  # time limits per task; expected on an H200: about 1.5 and 1 minutes
LIMIT_EMBED_S=${LIMIT_EMBED_S:-150}

die() { echo "gpu_speed.sh: $*" >&2; exit 2; }

if [[ "${1:-}" == "--prepare" ]]; then
    # cp312 manylinux x86_64 wheels of what the GPU image lacks (its python3 is 3.12; see the device tool's KINDS.md)
    mkdir -p "$WHEELS" || die "cannot create $WHEELS"
    for spec in "${MISSING_ON_GPU_IMAGE[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$spec" || die "could not download $spec"
    done
    du -sh "$WHEELS"
    echo "ready: carry .whl to the GPU machine and run: bash benchmarks/gpu_speed.sh"
    exit 0
fi

QUICK=()
[[ "${1:-}" == "--quick" ]] && QUICK=(--quick)
OUT=${OUT:-/tmp/gpu_speed}
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
exec > >(tee "$OUT/gpu_speed.log") 2>&1
echo "== $(date -u +%FT%TZ) on $(hostname); repository $REPO"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"

# 1. Python with a CUDA build of torch: the image's python3, else a venv (which needs network or a local index)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null; then
    echo "python3 has no CUDA torch: making .venv-gpu (pip install -c .ci/constraints.txt -e .)"
    if python3 -m venv .venv-gpu && . .venv-gpu/bin/activate \
        && pip install -q -c .ci/constraints.txt -e . && python -c "import torch; assert torch.cuda.is_available()"; then
        PY=python
    else
        die "no CUDA-capable torch: python3 has none and .venv-gpu could not be built (no network?); use a machine \
whose python3 has a CUDA build of torch"
    fi
fi
if [[ "$DEVICE" == cuda ]]; then
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
        || die "torch cannot reach the GPU"
fi

# 2. sslcell's dependencies: those the image lacks come from .whl (carried), installed beside, never over, its own
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
CHECK="import lightly, anndata, pytorch_lightning, numba, h5py, sklearn, yaml, tqdm; import sslcell.benchmark.tasks"
if ! "$PY" -c "$CHECK" 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "sslcell's dependencies are missing and there is no $WHEELS/*.whl: \
run 'bash benchmarks/gpu_speed.sh --prepare' where there is network, and carry .whl"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sslcell_site \
        "$WHEELS"/*.whl || die "pip could not install $WHEELS/*.whl"
    export PYTHONPATH=$REPO:/tmp/sslcell_site${PYTHONPATH#"$REPO"}
fi
"$PY" -c "$CHECK" || die "sslcell's benchmark runner cannot be imported (the error above names what is missing)"
# sslcell's version in the results needs its metadata: an editable install (offline) where it is not installed yet
if ! "$PY" -c "import importlib.metadata as m; m.version('sslcell')" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1 \
        || echo "(sslcell not pip-installed: its version reads 0.0.0 in the results; the code is this working tree)"
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# 3. the suites on the GPU, one task at a time, each with a time limit. RUNS: "suite:task:limit_s" entries (default:
# train_speed's two tasks); e.g. RUNS="crops_few_labels:jurkat:300 crops:jurkat:420" DATA_DIR=bench_runs/gpu/data for
# the crop suites, whose data (../shared/data, outside the repository) must be carried inside it: carry .whl and the
# data folder (64 MiB in all: .whl is ~31 MB, jurkat_cellcycle_ifc_mlcp.npz 17 MB, chula_rbc12_crops48.npz 37 MB).
RUNS=${RUNS:-"train_speed:train_step:$LIMIT_TRAIN_STEP_S train_speed:embed:$LIMIT_EMBED_S"}
DATA_ARGS=()
[[ -n "${DATA_DIR:-}" ]] && DATA_ARGS=(--data "$DATA_DIR")
status=0
for run in $RUNS; do
    IFS=: read -r suite task limit <<< "$run"
    echo "== $suite / $task (limit $limit s)"
    start=$(date +%s)
    timeout --signal=INT --kill-after=20 "$limit" "$PY" -m sslcell benchmark \
        "benchmarks/suites/$suite.yaml" --device "$DEVICE" --only "$task" --out "$OUT/$suite/$task" \
        --workdir "/tmp/sslcell_bench_${suite}_$task" "${DATA_ARGS[@]}" "${QUICK[@]}"
    rc=$?
    echo "== $suite / $task: exit code $rc after $(( $(date +%s) - start )) s"
    [[ $rc -eq 0 ]] || status=1
done
for md in "$OUT"/*/*/*.md; do
    [[ -f "$md" ]] && { echo; echo "==== $md"; cat "$md"; }
done
exit $status
