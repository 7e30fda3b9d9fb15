#!/bin/bash
# The first check on a GPU (about 8 minutes on one GPU; docs/performance.md, "GPU check"):
#   1. the toy TR row on CUDA under --precision bf16, fp16 (GradScaler) and fp32, each with and without
#      --feature_cache (scores, and whether the cached row equals the plain one);
#   2. one NCCL process group of world size 1 (python -m utils.distributed = torchrun), the mediator with
#      the feature cache;
#   3. benchmarks.bench_step at paper size for ViT-S/8 and ViT-B/8, benchmarks.bench_feature_cache (steps
#      with and without the cache) and benchmarks.bench_predict;
# then one table naming the GPU: each check, its status and its time. Everything printed also goes to
# $log (default gpu_check.log). Each check has a time limit, so the whole script ends within ~9 minutes.
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # tiny sizes on the CPU (CI: the script cannot rot)
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
dry=false
case "${1:-}" in
    "") ;;
    --dry-run) dry=true ;;
    *) echo "error: unknown option ${1}; expected nothing or --dry-run" >&2; exit 2 ;;
esac
log="${log:-gpu_check.log}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$log"

if $dry; then
    device=cpu
    pipeline=(--dry-run --precisions fp32)
    toy=(--dataset toy --data_dir "$work/data" --ckpt "$work/random_vit_tiny_8.pth" --device cpu --num_workers 0
         --train_resolution 32 --num_codebook 8 --batch_size 4 --max_steps 1)
    step=(--device cpu --sizes tiny --repeats 1 --stages fine_tuning_tr)
    cache=(--device cpu --sizes tiny --repeats 1 --toy_steps 0 --stages fine_tuning_tr)
    predict=(--device cpu --backbone random_vit_tiny_8 --resolution 32 --batch 1 --repeats 1 --no_crf)
    limits=(300 120 120 120 120)  # a loaded 2-core CI machine
else
    device=cuda
    pipeline=(--device cuda --steps 10)
    toy=(--dataset toy --data_dir "$work/data" --ckpt "$work/random_vit_tiny_8.pth" --device cuda --max_steps 10)
    step=(--device cuda --sizes paper --backbones vit_small_8 vit_base_8 --repeats 3)
    cache=(--device cuda --sizes paper --backbones vit_small_8 vit_base_8 --repeats 3 --toy_steps 0)
    predict=(--device cuda --backbone dino_vit_base_8 --resolution 320 --batch 8 --repeats 3)
    limits=(200 90 150 90 60)
fi
# the machine's name for the table, and the backbone of the process-group check, in one start of python
gpu=$("$python" -c "import sys, torch
from models import save_random_checkpoint
save_random_checkpoint('random_vit_tiny_8', sys.argv[1])
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (CPU)'
print(name, '(torch', torch.__version__, 'CUDA', str(torch.version.cuda) + ')')" "$work/random_vit_tiny_8.pth")

rows=()
check() {  # check NAME LIMIT_S COMMAND...: run it under a time limit, output to the screen and $log
    local name="$1" limit="$2" t0 status took; shift 2
    echo "===== $name" | tee -a "$log"
    t0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | grep -v 'it/s' | tee -a "$log"
    status=${PIPESTATUS[0]}
    took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
    case "$status" in 0) status=ok ;; 124|137) status="TIMED OUT (${limit} s)" ;; *) status="FAILED (exit $status)" ;; esac
    rows+=("| $name | $status | $took s |")
}

check "toy TR row x --precision x --feature_cache" "${limits[0]}" "$python" -m benchmarks.toy_pipeline "${pipeline[@]}"
check "process group of world size 1 (utils.distributed, $([ $device = cuda ] && echo NCCL || echo Gloo))" \
    "${limits[1]}" "$python" -m utils.distributed --standalone --nproc_per_node 1 train_mediator.py "${toy[@]}" \
    --output_dir "$work/CAUSE" --log_dir "$work/logs" --feature_cache "$work/cache"
check "bench_step" "${limits[2]}" "$python" -m benchmarks.bench_step "${step[@]}"
check "bench_feature_cache" "${limits[3]}" "$python" -m benchmarks.bench_feature_cache "${cache[@]}"
check "bench_predict" "${limits[4]}" "$python" -m benchmarks.bench_predict "${predict[@]}"

{
    echo
    echo "GPU check on: $gpu"
    echo "| check | status | time |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee -a "$log"
printf '%s\n' "${rows[@]}" | grep -qv '| ok |' && exit 1
exit 0
