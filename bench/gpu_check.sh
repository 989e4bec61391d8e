#!/usr/bin/env bash
# The GPU paths, checked on a GPU in one command:
#   1. the seed-scale course (GPT-2 124M-shaped teacher with random weights, 500 samples, the
#      6/512/8 student, 3 epochs) through bench/course_speed.py: seconds per lesson, tokens/s,
#      training MFU against the GPU's peak for the dtype used, what 04's saves cost;
#   2. a few steps of 04 in each precision the GPU has and each kind of distillation;
#   3. lesson 08 (speculative decoding, the draws on the GPU);
#   4. 04 under torchrun on one GPU.
# Then a table: each run, its exit code, its seconds, its last line.
#   bash bench/gpu_check.sh [OUT]          (OUT: a folder for the artifacts; default: a temporary one)
#   SCALE=0.02 DTYPES=fp32 bash bench/gpu_check.sh   (a share of the 500 samples, these precisions
#                                                     only: a quick run, or a rehearsal on a CPU)
#   COURSE=artifacts PRESET=tiny bash bench/gpu_check.sh   (steps 2-4 on a finished course's folder)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d -t gpu_check.XXXX)}
course=${COURSE:-"$out/course"}
mkdir -p "$course"
preset=(${PRESET:+--preset "$PRESET"})
PYTHON=${PYTHON:-python}
results=()

run() {  # run NAME COMMAND...: time it, keep its output in $out/NAME.log, remember how it ended
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  results+=("$(printf '%-28s rc %-3s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" \
                "$(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-90)")")
  echo "${results[-1]}"
}

$PYTHON - <<'EOF'
import torch
from common.plumbing.device import get_device, gpu_has_bf16, pick_dtype
device = get_device()
print(f"torch {torch.__version__} | device {device}", end="")
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f" | {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB | "
          f"bf16 units: {gpu_has_bf16()} | is_bf16_supported(): {torch.cuda.is_bf16_supported()}", end="")
print(f" | 04 --dtype auto trains in {pick_dtype(device)}")
EOF

# --- 1. the seed-scale course ---
if [ -z "${COURSE:-}" ]; then
  run course_speed $PYTHON bench/course_speed.py --out "$course" ${SCALE:+--scale "$SCALE"}
  cat "$out/course_speed.log"
fi

# --- 2. a few steps of 04 in each precision and kind, each in its own folder ---
dtypes=${DTYPES:-"fp32 fp16"}
[ -z "${DTYPES:-}" ] && $PYTHON -c "from common.plumbing.device import get_device, gpu_has_bf16; import sys; \
sys.exit(0 if get_device() == 'cuda' and gpu_has_bf16() else 1)" && dtypes="$dtypes bf16"
step_run() {  # step_run NAME FLAGS...: 04 for 3 steps on the course's files
  local name=$1; shift
  mkdir -p "$out/$name"
  for f in teacher.pt generated.pt student_init.pt; do ln -sf "$(cd "$course" && pwd)/$f" "$out/$name/$f"; done
  run "$name" $PYTHON 04_train.py --out "$out/$name" "${preset[@]}" --stop-after 3 --log-interval 1 "$@"
}
for dtype in $dtypes; do
  for kd in seq soft fkl rkl jsd tvd; do
    step_run "04-$dtype-$kd" --dtype "$dtype" --kd "$kd"
  done
  step_run "04-$dtype-rkl-sampled" --dtype "$dtype" --kd rkl-sampled --on-policy 1
  step_run "04-$dtype-jsd-on-policy" --dtype "$dtype" --kd jsd --on-policy 0.5
done

# --- 3. lesson 08 on the course's students ---
run 08_speculative $PYTHON 08_speculative.py --out "$course" "${preset[@]}" --prompts 8

# --- 4. 04 under torchrun, one process on one GPU ---
mkdir -p "$out/torchrun"
for f in teacher.pt generated.pt student_init.pt; do ln -sf "$(cd "$course" && pwd)/$f" "$out/torchrun/$f"; done
run torchrun-1-process $PYTHON -m torch.distributed.run --standalone --nproc_per_node=1 04_train.py \
  --out "$out/torchrun" "${preset[@]}" --stop-after 3 --log-interval 1

echo
echo "=== gpu_check: $(date +%F) | artifacts and logs in $out ==="
printf '%s\n' "${results[@]}"
failed=$(printf '%s\n' "${results[@]}" | grep -vc ' rc 0 ')
echo "$failed of ${#results[@]} runs failed"
[ "$failed" -eq 0 ]
