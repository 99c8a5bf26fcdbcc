#!/usr/bin/env bash
# Runs benchmark stages on a GPU machine that has JAX with CUDA but nothing else of
# ours: installs the pinned pure-Python dependencies from wheels in .whl/ (fetch them
# first, on a machine with network access:
#   pip download --no-deps --only-binary=:all: -d .whl \
#     diffrax==0.7.2 equinox==0.13.8 lineax==0.1.1 optimistix==0.1.0
# ), puts src/ on the path, and writes each stage's table and log to $OUT.
# Usage: OUT=results bash benchmarks/gpu_session.sh smoke forward gradients scaling gru gru6 vspaper depth coldstart adaptive windows
set -u
OUT=${OUT:-benchmark-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
if [ ! -d /tmp/site ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
if ! $py -c "import diffrax_deer._bench.timing, diffrax, jax; print(jax.__version__, diffrax.__version__, jax.devices())"; then
  echo "pinned wheels failed; falling back to the image's packages"
  export PYTHONPATH=$PWD/src
  $py -c "import diffrax_deer._bench.timing, diffrax, jax; print(jax.__version__, diffrax.__version__, jax.devices())" || exit 1
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    smoke) $py benchmarks/forward.py --quick 2>&1 | tail -8 ;;
    forward) $py benchmarks/forward.py --markdown $OUT/forward.md --json $OUT/forward.json 2>&1 | tee $OUT/forward.log | tail -15 ;;
    forward32) $py benchmarks/forward.py --dtypes float32 --markdown $OUT/forward32.md --json $OUT/forward32.json 2>&1 | tee $OUT/forward32.log | tail -8 ;;
    forward6) $py benchmarks/forward.py --sizes 1e6 --dtypes float32 --repeats 3 --markdown $OUT/forward6.md 2>&1 | tee $OUT/forward6.log | tail -8 ;;
    gradients) $py benchmarks/gradients.py --markdown $OUT/gradients.md --json $OUT/gradients.json 2>&1 | tee $OUT/gradients.log | tail -15 ;;
    scaling) $py benchmarks/newton_scaling.py --max-full-size 256 --markdown $OUT/scaling.md --json $OUT/scaling.json 2>&1 | tee $OUT/scaling.log | tail -15 ;;
    # The paper's GRU table; seq1d from the paper's package when ../shared/peers has it.
    gru) PYTHONPATH=$PYTHONPATH:${PEERS:-$PWD/../shared/peers} $py benchmarks/gru.py --max-jacobian-gib 24 --markdown $OUT/gru.md --json $OUT/gru.json 2>&1 | tee $OUT/gru.log | tail -30 ;;
    gru6) PYTHONPATH=$PYTHONPATH:${PEERS:-$PWD/../shared/peers} $py benchmarks/gru.py --lengths 1e6 --hidden 1,4,8 --repeats 3 --max-jacobian-gib 24 --markdown $OUT/gru6.md --json $OUT/gru6.json 2>&1 | tee $OUT/gru6.log | tail -12 ;;
    gru-quick) $py benchmarks/gru.py --quick 2>&1 | tail -8 ;;
    # Issue 13: the paper's solve_ivp side by side (when ../shared/peers has it),
    # the sequential depth for N = 1e3-1e6, and the cold starts.
    vspaper) PYTHONPATH=$PYTHONPATH:${PEERS:-$PWD/../shared/peers} $py benchmarks/vs_paper.py --markdown $OUT/vs_paper.md --json $OUT/vs_paper.json 2>&1 | tee $OUT/vs_paper.log | tail -45 ;;
    depth) $py benchmarks/depth.py --markdown $OUT/depth.md --json $OUT/depth.json 2>&1 | tee $OUT/depth.log | tail -16 ;;
    coldstart) $py benchmarks/cold_start.py --markdown $OUT/cold_start.md --json $OUT/cold_start.json 2>&1 | tee $OUT/cold_start.log | tail -45 ;;
    # Issue 14: work-precision against adaptive Tsit5 / Dopri8 / Kvaerno5 (its GPU
    # floor: faster than Tsit5 at equal accuracy where Tsit5 needs >= 1000 steps),
    # and each window's error estimate against its true error.
    adaptive) $py benchmarks/adaptive.py --repeats 3 --tolerances 1e-4,1e-6,1e-8 --markdown $OUT/adaptive.md --json $OUT/adaptive.json 2>&1 | tee $OUT/adaptive.log | tail -30 ;;
    windows) $py benchmarks/window_estimates.py --markdown $OUT/window_estimates.md --json $OUT/window_estimates.json 2>&1 | tee $OUT/window_estimates.log | tail -35 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"
