#!/usr/bin/env bash
# On the GPU host, from the repository root: the peers, then our roofline,
# into one report directory, on one card.
#
#   bash benches/peers/full_report.sh OUT_DIR [KERNELS...]
#
# Environment (all optional):
#   WB            the workbench command   (default: .gpu/env .gpu/bin/workbench)
#   VARIANTS      our variants to time    (default: all; e.g. production,latest)
#   IMPLS         peer implementations    (default: flashinfer,liger,torch_eager,torch_compile)
#   PEER_SECONDS  the peers' time budget  (default: 0 = none)
#   L2_BYTES      the L2 the peers rotate their inputs over (default: 50 MiB,
#                 the H100's and the H200's)
#   PEERS_ONLY=1  stop after the peers
#   PEERS         the peer runner          (default: python3 benches/peers/run_peers.py)
#
# The peers resume from OUT_DIR/peers.csv: when a time limit cuts them short,
# running the same command again times only the (case, impl) pairs still
# missing. Our roofline saves OUT_DIR/run.json after every case, so a cut-short
# run still renders with `workbench roofline --render OUT_DIR`.
set -euo pipefail
out=${1:?usage: full_report.sh OUT_DIR [KERNELS...]}
shift
kernels=("$@")
WB=${WB:-.gpu/env .gpu/bin/workbench}
IMPLS=${IMPLS:-flashinfer,liger,torch_eager,torch_compile}
PEERS=${PEERS:-python3 benches/peers/run_peers.py}
PEER_SECONDS=${PEER_SECONDS:-0}
variant_args=()
[ -n "${VARIANTS:-}" ] && variant_args=(--variant "$VARIANTS")
mkdir -p "$out"

# shellcheck source=/dev/null
source benches/peers/setup_gpu_host.sh >>"$out/peers-setup.log" 2>&1
$WB roofline "${kernels[@]}" "${variant_args[@]}" --emit-cases "$out/cases.json" \
    --l2-bytes "${L2_BYTES:-$((50 << 20))}"
kernel_list=$(IFS=,; echo "${kernels[*]}")
$PEERS --cases "$out/cases.json" --out "$out/peers.csv" --resume \
    --impl "$IMPLS" ${kernel_list:+--kernels "$kernel_list"} --max-seconds "$PEER_SECONDS" \
    2>>"$out/peers.log"
echo "peers: $(($(wc -l <"$out/peers.csv") - 1)) row(s) in $out/peers.csv"
[ "${PEERS_ONLY:-0}" = 1 ] && exit 0

$WB roofline "${kernels[@]}" "${variant_args[@]}" --out "$out" \
    --peers "$out/peers.csv" --peers-missing "$out/missing.csv" 2>&1 | tee "$out/roofline.log"
