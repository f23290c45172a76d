#!/usr/bin/env bash
# One device call on the GPU host: the GPU tests, the peers, then our roofline
# with the peers merged. Everything lands in $OUT (default ./out).
#
#   ../shared/gpu/bundle            # build machine: binaries into .gpu/
#   bash benches/gpu-run.sh         # GPU host (carry .gpu and .whl)
#
# Budgets (seconds) keep the whole call inside a 10-minute device command:
#   TESTS_S (GPU proptests + sabotage), PEERS_S (all peers), OURS_S (roofline).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/r"
TESTS_S=${TESTS_S:-120} PEERS_S=${PEERS_S:-210} OURS_S=${OURS_S:-300}
wb=".gpu/env .gpu/bin/workbench"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/r/nvidia-smi.csv" 2>&1
if [ "$TESTS_S" -gt 0 ]; then
  ( for t in gpu_proptest sabotage cli; do echo "== $t"; .gpu/env .gpu/tests/$t --include-ignored; done ) \
    > "$OUT/tests.log" 2>&1 &
  tests_pid=$!
  # The tests share the GPU: wait for them before timing anything.
  timeout "$TESTS_S" tail --pid=$tests_pid -f /dev/null; kill $tests_pid 2>/dev/null
fi

$wb roofline --emit-cases "$OUT/r/cases.json"
if [ "$PEERS_S" -gt 0 ]; then
  source benches/peers/setup_gpu_host.sh
  python3 benches/peers/run_peers.py --preflight > "$OUT/peers.log" 2>&1
  # The strongest peers first for every case; torch.compile with what is left.
  timeout "$PEERS_S" python3 benches/peers/run_peers.py --cases "$OUT/r/cases.json" --out "$OUT/r/peers.csv" \
    --impl flashinfer,torch_eager,liger,torch_sdpa --target-ms 50 --max-seconds $((PEERS_S * 2 / 3)) >> "$OUT/peers.log" 2>&1
  timeout $((PEERS_S / 3)) python3 benches/peers/run_peers.py --cases "$OUT/r/cases.json" --out "$OUT/r/peers.csv" \
    --impl torch_compile --compile-dynamic --resume --target-ms 50 --max-seconds $((PEERS_S / 3 - 10)) >> "$OUT/peers.log" 2>&1
fi
peers=()
[ -s "$OUT/r/peers.csv" ] && peers=(--peers "$OUT/r/peers.csv")
[ -s "$OUT/r/missing.csv" ] && peers+=(--peers-missing "$OUT/r/missing.csv")
timeout "$OURS_S" $wb roofline --out "$OUT/r" "${peers[@]}" > "$OUT/roofline.log" 2>&1
echo "roofline exit=$?" >> "$OUT/roofline.log"
tar -C "$OUT" -cf "$OUT/report.tar" r
