#!/usr/bin/env bash
# One GPU session's checks, prepared ahead so that a lent device's ~15 minutes go to measuring, not to typing.
# Run from the repository root on the device machine (its python3 already holds jax[cuda], flax, optax, orbax,
# chex, Pillow, tqdm and safetensors; nothing is installed):
#
#     bash bench/device_session.sh                   # every step; $OUT (default bench-out/device) gets the results
#     STEPS="memory attention" bash bench/device_session.sh
#
# With a checkout of FoundationVision/VAR copied to .var_ref (ignored by git, carried to the device), `run` also times
# the PyTorch reference. Each step has its own time limit, so one that overruns costs its limit, not the session;
# the steps come in the order the brief asks for: the compiled program's memory on the GPU, the largest batch whose
# program fits, the attention sweep, the GPU suite (which also runs the largest batch for real), then the memory step
# again with `--xla_gpu_enable_dynamic_slice_fusion=true` (issue 24 asks for it; last, as the one to drop if time
# runs short). Everything lands
# in at most 8 files directly under $OUT (what the device tool brings back); copy the tables into bench/RESULTS.md
# with the machine, versions and these commands.
set -u -o pipefail
OUT=${OUT:-bench-out/device}
STEPS=${STEPS:-"memory largest attention run dynslice"}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, show its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, $(date +%T)): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $?"
    tail -n 30 "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import sys, jax, flax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', \
flax.__version__, jax.devices())"
    git log -1 --format='commit %H'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

for s in $STEPS; do
    case $s in
    memory)  # weights + cache + temporaries of generate compiled for the GPU: d30, batch 128, every policy
        step memory 150 $PY -m amskv_jax.memory --model d30 --dtype bfloat16 --batch 128 --compile ;;
    largest)  # the largest batch whose compiled program fits 80 GiB (an H100's), full and AMS-KV
        step largest 240 $PY -m amskv_jax.memory --model d30 --dtype bfloat16 --policy full amskv \
            --device-memory 80GiB ;;
    attention)  # the Pallas kernel against XLA at every scale, and its block sizes
        step attention 150 $PY -m bench.attention --models d16,d30 --batches 1,32,128 --sweep ;;
    run)  # every policy beside the full cache: memory, images/s, the largest batch really run, compile time
        ref=()
        [ -d .var_ref ] && ref=(--torch-reference .var_ref)
        step run 300 $PY -m bench.run --suite gpu --out "$OUT/run" --no-plots "${ref[@]}" ;;
    dynslice)  # the memory step again with XLA's dynamic-slice fusion (the scan's weight slices read in place?)
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" \
            step dynslice 150 $PY -m amskv_jax.memory --model d30 --dtype bfloat16 --batch 128 --compile \
            --policy full amskv ;;
    *) echo "unknown step $s (known: memory largest attention run dynslice)" >&2; exit 2 ;;
    esac
done
