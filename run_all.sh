#!/usr/bin/env bash
# Run the whole course, lessons 01 to 06 in order.
#   bash run_all.sh                      the real course (downloads GPT-2 once; a GPU is recommended)
#   bash run_all.sh --preset tiny        a small teacher trained on a toy language: offline, about 70 s on 2 CPU cores
#   bash run_all.sh --out DIR            put the artifacts in DIR (default: artifacts)
# Only --preset and --out are passed on; to change a lesson's other settings, run it on its own.
set -u
cd "$(dirname "$0")"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --preset|--out)
      [ $# -ge 2 ] || { echo "run_all.sh: $1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift 2 ;;
    --preset=*|--out=*) args+=("$1"); shift ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (only --preset and --out are passed on)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python}
start=$(date +%s)
for lesson in 01_teacher.py 02_generate.py 03_student.py 04_train.py 05_evaluate.py 06_compare.py; do
  echo "=== $lesson ==="
  t0=$(date +%s)
  if ! "$PYTHON" "$lesson" "${args[@]+"${args[@]}"}"; then
    echo "run_all.sh: $lesson failed; the lessons before it finished and their artifacts are kept" >&2
    exit 1
  fi
  echo "($lesson: $(( $(date +%s) - t0 ))s)"
done
echo "=== course finished in $(( $(date +%s) - start ))s ==="
