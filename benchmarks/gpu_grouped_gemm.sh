#!/bin/bash
# One GPU call for issue 12's grouped GEMM: correctness of both CUDA
# grouped-matmul implementations, then the grouped matmul alone at E = 64, 8
# and 256 and the MoE layer at the target sizes, side by side in one run.
# Prints short tables last; full logs and JSON go to $OUT (default gpu_out/).
#
# On the GPU machine, from the repository root, with
#   .cuda/  libtf_moe_ffi_cuda.so and libtf_moe_dropless_ffi_cuda.so
#           (`make cuda` here, then copy them from bazel-bin/tf_moe/ops/)
#   .whl/   keras, optree, namex (cp312) and, for the tokamax rows, tokamax
#           with einshape, pydantic, pydantic-core, annotated-types,
#           typing-inspection, typing-extensions, qwix, tensorboardX,
#           immutabledict (docs/benchmarks.md says how they were fetched)
# run: bash benchmarks/gpu_grouped_gemm.sh [quick|matmul|layer]
# All of it takes about 10 minutes, a device call's limit: split it.
# "quick": the correctness script and E = 64 only; "matmul": the correctness
# script and the grouped matmul at all three E; "layer": the MoE layer only.
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
export TF_MOE_OPS_DIR=${TF_MOE_OPS_DIR:-$PWD/.cuda}
nvidia-smi --query-gpu=name,clocks.sm,utilization.gpu,memory.used --format=csv
quiet() { grep -v "^I0000\|^W0000\|^{"; }

if [ "$1" != layer ]; then
timeout 300 python3 benchmarks/gpu_correctness.py --json "$OUT/correctness.json" \
  > "$OUT/correctness.log" 2>&1
echo "correctness rc=$?"
sed -n '/^dropless grouped/,$p' "$OUT/correctness.log" | quiet | tail -60

experts="64 8 256"
[ "$1" = quick ] && experts=64
for e in $experts; do
  echo "grouped matmul alone, E=$e"
  timeout 150 python3 benchmarks/grouped_matmul.py --rows 32768 --a 1024 --b 4096 \
    --experts "$e" --dtype bfloat16 --sizes_mode uniform --warmup 3 --iters 15 \
    --repeat 10 --implementations \
    dense,custom_call:cutlass,custom_call:cutlass+2x1,custom_call:streams,tokamax \
    --json "$OUT/grouped_matmul_e$e.json" 2>&1 | quiet | tail -6
done
fi
[ "$1" = quick ] || [ "$1" = matmul ] && exit 0

# (Each row is its own process: about 20-30 s of start-up and compilation.)
timeout 300 python3 benchmarks/moe_layer.py --preset gpu --sizes target \
  --paths dense,custom_call,custom_call@deferred,dropless@streams,dropless@cutlass+deferred,dropless@cutlass+2x1+deferred \
  --warmup 3 --iters 10 --repeat 5 --json "$OUT/moe_layer_target.json" 2>&1 | quiet | tail -8
timeout 300 python3 benchmarks/moe_layer.py --preset gpu --sizes target_e8,target_e256 \
  --paths dense,dropless@streams,dropless@cutlass+deferred \
  --warmup 3 --iters 10 --repeat 5 --json "$OUT/moe_layer_e8_e256.json" 2>&1 | quiet | tail -8
