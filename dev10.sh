#!/usr/bin/env bash
set -x
W=".gpu/env .gpu/bin/workbench"
R=/tmp/r; rm -rf $R; mkdir -p $R
date -u > $R/date.txt
( time timeout 240 $W check paged_attention --variant v7,v8 --only checks --csv $R/check-paged.csv ) > $R/check-paged.log 2>&1; echo "rc=$?" >> $R/check-paged.log
tar czf $OUT/r.tgz -C $R .
timeout 60 .gpu/env .gpu/tests/paged_attention_fused --include-ignored > $R/test-paged_attention_fused.log 2>&1; echo "rc=$?" >> $R/test-paged_attention_fused.log
timeout 60 .gpu/env .gpu/tests/hf_parity --include-ignored > $R/test-hf_parity.log 2>&1; echo "rc=$?" >> $R/test-hf_parity.log
timeout 100 $W roofline paged_attention --variant v8 --out $R/rl > $R/rl.log 2>&1; echo "rc=$?" >> $R/rl.log
tar czf $OUT/r.tgz -C $R .
