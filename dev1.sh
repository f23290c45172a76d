#!/bin/bash
# device call 1: PDL tests + A/B
set -u
O=$OUT/r; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv > $O/gpu.txt
T=.gpu/tests
for t in engine_pdl hf_parity paged_attention_fused engine_faults; do
  f=$(ls $T/${t}-* 2>/dev/null | head -1); [ -z "$f" ] && f=$T/$t
  echo "== $t" ; timeout 300 .gpu/env $f --include-ignored 2>&1 | tail -8
done > $O/tests.log 2>&1
for i in 1 2; do
  for mode in pdl nopdl; do
    flag=""; [ $mode = nopdl ] && flag="--no-pdl"
    .gpu/env .gpu/bin/workbench e2e --model qwen2-0.5b --no-csv $flag > $O/e2e-$mode-$i.log 2>&1
    echo "$mode $i: $(grep -E 'output tok/s' $O/e2e-$mode-$i.log | sed 's/.*s, \([0-9]*\) output.*/\1 tok\/s/') $(grep -E 'graph replay' $O/e2e-$mode-$i.log)"
  done
done | tee $O/ab.txt
cd $OUT && tar czf r.tgz r
