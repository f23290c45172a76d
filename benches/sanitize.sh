#!/usr/bin/env bash
# compute-sanitizer over the check cases of the attention kernels (issue #4):
# memcheck and racecheck, error counts written to $OUT/sanitizer.md.
#
#   bash benches/sanitize.sh            # GPU host, after ../shared/gpu/bundle here
#   KERNELS=prefill_attention VARIANT=v5,v6 bash benches/sanitize.sh   # some variants
#
# bf16 check cases only: the sanitizers slow kernels down 10-100x, and the
# f16/f32 instantiations share the code paths.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
cuda=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$cuda/lib64:${LD_LIBRARY_PATH:-}"
sanitizer=$(command -v compute-sanitizer || echo "$cuda/bin/compute-sanitizer")
{
  echo "# compute-sanitizer on the attention kernels"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  echo
  echo "Variants: ${VARIANT:-all}."
  echo
  echo "| kernel | tool | errors | warnings (racecheck hazards) | check result |"
  echo "|---|---|---|---|---|"
} > "$OUT/sanitizer.md"
for kernel in ${KERNELS:-paged_attention prefill_attention}; do
  for tool in memcheck racecheck; do
    log="$OUT/sanitizer-$kernel-$tool.log"
    # The binary itself, not a wrapper script: the sanitizer follows the process it starts.
    "$sanitizer" --tool "$tool" --print-limit 20 .gpu/bin/workbench check "$kernel" --only checks --dtype bf16 \
      ${VARIANT:+--variant "$VARIANT"} > "$log" 2>&1
    rc=$?
    # memcheck ends with "ERROR SUMMARY: N errors"; racecheck with
    # "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)".
    if [ "$tool" = racecheck ]; then
      summary=$(grep -Eo 'RACECHECK SUMMARY: .*' "$log" | tail -1)
      errors=$(echo "$summary" | grep -Eo '[0-9]+ errors' | grep -Eo '[0-9]+')
      warnings=$(echo "$summary" | grep -Eo '[0-9]+ warnings' | grep -Eo '[0-9]+')
    else
      errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+')
      warnings=0
    fi
    checks=$(grep -Eo '[0-9]+ of [0-9]+ passed' "$log" | tail -1)
    echo "| $kernel | $tool | ${errors:-?} | ${warnings:-?} | ${checks:-no summary}, exit $rc |" >> "$OUT/sanitizer.md"
  done
done
cat "$OUT/sanitizer.md"
