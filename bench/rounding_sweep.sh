#!/usr/bin/env bash
# The same code under other rounding: the CPU kernels torch picks (ATEN_CPU_CAPABILITY), MKL's code
# paths (MKL_CBWR, MKL_ENABLE_INSTRUCTIONS) and the thread count (how sums are split) each change
# the last bits of a result, as another laptop would. Runs, under each variant:
#   bash bench/rounding_sweep.sh suite     the tests (python -m pytest); every variant must pass
#   bash bench/rounding_sweep.sh course    the tiny course (run_all.sh --preset tiny), then a table
#                                          of what 05 measured under each: the spread a learner on
#                                          another machine can expect
#   VARIANTS="native threads-1" bash bench/rounding_sweep.sh course    some variants only
# Logs and artifacts go to ${SWEEP_OUT:-/tmp/rounding_sweep}/<mode>-<variant>.
set -u
cd "$(dirname "$0")/.."
mode=${1:-suite}
OUT=${SWEEP_OUT:-/tmp/rounding_sweep}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}

variant_env() {  # the environment of one variant
  case "$1" in
    native) echo "" ;;
    cpu-default) echo "ATEN_CPU_CAPABILITY=default" ;;   # no vector kernels at all
    cpu-avx2) echo "ATEN_CPU_CAPABILITY=avx2" ;;         # a CPU without AVX-512
    mkl-compatible) echo "MKL_CBWR=COMPATIBLE" ;;        # MKL's reproducible, slowest path
    mkl-sse42) echo "MKL_ENABLE_INSTRUCTIONS=SSE4_2" ;;  # MKL as on an old CPU
    threads-1) echo "OMP_NUM_THREADS=1" ;;
    threads-3) echo "OMP_NUM_THREADS=3" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

VARIANTS=${VARIANTS:-native cpu-default cpu-avx2 mkl-compatible mkl-sse42 threads-1 threads-3}
failed=0
for v in $VARIANTS; do
  log="$OUT/$mode-$v.log"
  t0=$(date +%s)
  case "$mode" in
    suite) env $(variant_env "$v") "$PYTHON" -m pytest -p no:cacheprovider > "$log" 2>&1 ;;
    course) rm -rf "$OUT/course-$v"
            env $(variant_env "$v") bash run_all.sh --preset tiny --out "$OUT/course-$v" > "$log" 2>&1 ;;
    *) echo "usage: bash bench/rounding_sweep.sh suite|course" >&2; exit 2 ;;
  esac
  code=$?
  [ $code -eq 0 ] || failed=1
  echo "$v: exit $code in $(( $(date +%s) - t0 ))s | $(tail -n 1 "$log")"
done

if [ "$mode" = course ]; then
  "$PYTHON" - "$OUT" $VARIANTS <<'EOF'
import math, sys
import torch
out, variants = sys.argv[1], sys.argv[2:]
rows = []
for v in variants:
    try:
        ev = torch.load(f"{out}/course-{v}/eval.pt", weights_only=True)
        log = torch.load(f"{out}/course-{v}/train_log.pt", weights_only=True)
    except FileNotFoundError:
        continue
    p = ev["perplexity"]
    rows.append((v, p["generated-test"], p["toy-language"], [math.exp(x) for _, x in log["val"][1:]]))
print(f"\n{'variant':<16}{'teacher test':>13}{'toy':>7}{'student test':>14}{'toy':>7}   student val ppl by epoch")
for v, t, y, val in rows:
    print(f"{v:<16}{t['teacher']:>13.2f}{y['teacher']:>7.2f}{t['student']:>14.2f}{y['student']:>7.2f}   "
          + " ".join(f"{x:.1f}" for x in val))
for key in ("teacher", "student"):
    for name, i in (("generated-test", 1), ("toy-language", 2)):
        vals = [r[i][key] for r in rows]
        ach = [r[i]["teacher"] / r[i][key] for r in rows] if key == "student" else None
        text = f"{key} on {name}: {min(vals):.2f}-{max(vals):.2f} (median {sorted(vals)[len(vals) // 2]:.2f})"
        if ach:
            text += f", achievement {min(ach):.0%}-{max(ach):.0%}"
        print(text)
EOF
fi
exit $failed
