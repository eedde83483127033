#!/bin/sh
# The GPU checks of the speed issue as one prepared command, for a session that is lent an
# accelerator machine (the `device` tool; CI never has one, and no test needs one).
#
# What it does there, in at most 10 minutes (tests 200 s, benchmark 380 s at most):
#   1. the tests whose device parameter is "cuda" (conventions, similarity, networks), on the GPU;
#   2. `benchmarks/compare.py --devices cpu,cuda` on the training and robustness pairs: every
#      mode of this project timed on the CPU and on the GPU in one run, with its MMrTRE.
# Results land in $OUT (at most 8 files come back): environment.txt, tests.log, compare.log,
# benchmark.md, results.csv, stages.csv.
#
# That machine has PyTorch (CUDA), numpy, scipy, scikit-image, OpenCV, tifffile, pillow,
# matplotlib and pytest, but not napari, SimpleITK, zarr, dask or shapely, and it cannot
# download: only the napari-free core runs, from src/ (no install). elastix is not timed there.
# ../shared/data does not travel with the working tree; bring a copy that git ignores:
#
#   here:  echo /.devdata/ >> .git/info/exclude && mkdir -p .devdata && cp -r ../shared/data/. .devdata/
#   call:  run(command="sh scripts/device_check.sh", carry=[".devdata"], timeout_s=600)
#   then:  rm -rf .devdata   (never commit it: the data stays in ../shared/data)
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
DATA=${HISTREG_DATA:-$PWD/.devdata}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HISTREG_DATA="$DATA"
PY=${PYTHON:-python3}

"$PY" - > "$OUT/environment.txt" 2>&1 <<'EOF'
import platform, sys
import torch
print(sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0), "cuda", torch.version.cuda)
print("cpu threads:", torch.get_num_threads())
import napari_histreg  # the core imports without napari
print("napari_histreg from", napari_histreg.__file__)
EOF
cat "$OUT/environment.txt"

# 1. the device path's tests: the parameters whose id holds "cuda" (they skip without a GPU)
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -k cuda \
    tests/test_conventions.py tests/test_similarity.py tests/test_segmentation_net.py tests/test_nonrigid_net.py \
    > "$OUT/tests.log" 2>&1
echo "tests: exit $? (the end of $OUT/tests.log:)"
tail -n 5 "$OUT/tests.log"

# 2. every mode on the CPU and on the GPU, one run (a warm-up per method first)
if [ -f "$DATA/dataset.csv" ]; then
    timeout 380 "$PY" benchmarks/compare.py --data "$DATA/dataset.csv" --status training,robustness \
        --methods histreg-hybrid,histreg-learned,histreg-dense,histreg-patches,histreg-affine \
        --devices cpu,cuda --out /tmp/histreg-compare > "$OUT/compare.log" 2>&1
    echo "compare: exit $?"
    tail -n 40 "$OUT/compare.log"
    for f in benchmark.md results.csv stages.csv; do
        [ -f "/tmp/histreg-compare/$f" ] && cp "/tmp/histreg-compare/$f" "$OUT/$f"
    done
else
    echo "no $DATA/dataset.csv: the benchmark needs the data copied to .devdata (see the top of this script)"
fi
