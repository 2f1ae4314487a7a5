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
# run: bash benchmarks/gpu_grouped_gemm.sh MODE[,MODE...]
# (CORRECTNESS_ARGS, MATMUL_IMPLS, LAYER_PATHS override the modes' defaults,
# e.g. CORRECTNESS_ARGS="--sections grouped,moe" to fit a call.)
# Modes (each about 2-8 minutes; a device call has 10):
#   correctness  benchmarks/gpu_correctness.py, every section
#   matmul       the grouped matmul alone at E = 64, forward+backward
#   matmul_e     the same at E = 8 and 256
#   layer        the MoE layer at the target sizes: dense, capacity path,
#                dropless with the fused epilogue (both CUTLASS schedules)
#                and without, streams
#   layer_e      the MoE layer at E = 8 and 256
#   profile      per-op profile of the dense and dropless steps
#   ncu          Nsight Compute on the GEMM kernels of the grouped matmul alone
#                (NCU_EXPERTS, NCU_IMPLS; one step each): duration, SM and
#                memory throughput, occupancy, per kernel (ncu_summary.py)
#   decoder_lm   the decoder LM end to end (benchmarks/decoder_lm.py, model.fit;
#                the trainer's config, so .whl/ also needs ml_collections):
#                dense, capacity path and dropless at E = 64 (DECODER_PATHS,
#                DECODER_EXPERTS)
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

has() { [[ ",$1," == *",$2,"* ]]; }
modes=${1:-correctness}

if has "$modes" correctness; then
timeout 540 python3 benchmarks/gpu_correctness.py ${CORRECTNESS_ARGS:-} --json "$OUT/correctness.json" \
  > "$OUT/correctness.log" 2>&1
echo "correctness rc=$?"
grep -E "^\[|ALL OK|FAILURES|False|error [0-9.e-]+ FAIL|UNEXPECTED|NO ERROR" \
  "$OUT/correctness.log" | quiet | tail -30
fi

MATMUL_IMPLS=${MATMUL_IMPLS:-dense,custom_call:cutlass,custom_call:cutlass+pingpong,custom_call:streams,tokamax}
matmul() {
  for e in "$@"; do
    echo "grouped matmul alone, E=$e"
    timeout 150 python3 benchmarks/grouped_matmul.py --rows 32768 --a 1024 --b 4096 \
      --experts "$e" --dtype bfloat16 --sizes_mode uniform --warmup 3 --iters 15 \
      --repeat 10 --implementations "$MATMUL_IMPLS" \
      --json "$OUT/grouped_matmul_e$e.json" 2>&1 | quiet | tail -6
  done
}
has "$modes" matmul && matmul 64
has "$modes" matmul_e && matmul 8 256

# (Each row is its own process: about 20-30 s of start-up and compilation.)
if has "$modes" layer; then
timeout 300 python3 benchmarks/moe_layer.py --preset gpu --sizes target \
  --paths "${LAYER_PATHS:-dense,custom_call,dropless@cutlass,dropless@cutlass+pingpong,dropless+unfused@cutlass,dropless@streams}" \
  --warmup 3 --iters 10 --repeat 5 --json "$OUT/moe_layer_target.json" 2>&1 | quiet | tail -8
fi
if has "$modes" layer_e; then
timeout 300 python3 benchmarks/moe_layer.py --preset gpu --sizes target_e8,target_e256 \
  --paths "${LAYER_PATHS:-dense,dropless@cutlass,dropless@cutlass+pingpong}" \
  --warmup 3 --iters 10 --repeat 5 --json "$OUT/moe_layer_e8_e256.json" 2>&1 | quiet | tail -8
fi
if has "$modes" profile; then
# (Command buffers off, so that the trace shows every kernel.)
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 python3 benchmarks/moe_profile.py \
  --paths dense,dropless --what_ifs "" --out "$OUT/profile" > "$OUT/profile.log" 2>&1
echo "profile rc=$?"
grep -v "^I0000\|^W0000" "$OUT/profile.log" | tail -60
fi
if has "$modes" decoder_lm; then
timeout "${DECODER_TIMEOUT:-420}" python3 benchmarks/decoder_lm.py --preset gpu \
  --paths "${DECODER_PATHS:-dense,custom_call,dropless}" --experts "${DECODER_EXPERTS:-64}" \
  --warmup 5 --steps "${DECODER_STEPS:-20}" --repeat 3 --json "$OUT/decoder_lm.json" \
  > "$OUT/decoder_lm.log" 2>&1
echo "decoder_lm rc=$?"
quiet < "$OUT/decoder_lm.log" | tail -12
fi
if has "$modes" ncu; then
# The GEMM kernels only: CUTLASS's device_kernel and cuBLAS's (nvjet, xmma).
timeout 300 ncu --target-processes all -k 'regex:device_kernel|nvjet|xmma|gemm' \
  --section SpeedOfLight --section LaunchStats --section Occupancy \
  --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
  python3 benchmarks/grouped_matmul.py --rows 32768 --a 1024 --b 4096 \
  --experts "${NCU_EXPERTS:-8}" --dtype bfloat16 --sizes_mode uniform --warmup 1 --iters 1 \
  --implementations "${NCU_IMPLS:-dense,custom_call:cutlass,custom_call:cutlass+2x1}" \
  --json "$OUT/ncu_matmul.json" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$?"
tail -3 "$OUT/ncu.err"
python3 benchmarks/ncu_summary.py "$OUT/ncu.csv"
fi
