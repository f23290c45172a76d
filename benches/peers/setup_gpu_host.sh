# Source this on the GPU host, from the repository root, before run_peers.py:
#
#     source benches/peers/setup_gpu_host.sh
#
# It installs the carried wheels in .whl/ (Liger-Kernel 0.8.5, FlashInfer
# 0.5.0, apache-tvm-ffi 0.1.x, nvidia-cudnn-frontend; fetched on the build
# machine with the `pip download` line in benches/peers/README.md) into
# /tmp/site without touching the system Python, and sets the environment
# FlashInfer's JIT wants. The host has no network: everything comes from .whl/.

_peers_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../.." && pwd)"
export PEERS_SITE="${PEERS_SITE:-/tmp/site}"

if ! ls "$_peers_root"/.whl/*.whl >/dev/null 2>&1; then
    echo "setup_gpu_host.sh: no wheels in $_peers_root/.whl (carry .whl with the tree)" >&2
elif [ ! -d "$PEERS_SITE/flashinfer" ] || [ ! -d "$PEERS_SITE/liger_kernel" ]; then
    # --target skips PEP 668's externally-managed check; --no-deps: torch,
    # triton, numpy, requests, packaging come from the host's python3.
    python3 -m pip install --quiet --no-index --no-deps --target "$PEERS_SITE" "$_peers_root"/.whl/*.whl \
        || pip install --quiet --no-index --no-deps --target "$PEERS_SITE" "$_peers_root"/.whl/*.whl \
        || echo "setup_gpu_host.sh: installing the wheels failed" >&2
fi

case ":${PYTHONPATH:-}:" in
    *":$PEERS_SITE:"*) ;;
    *) export PYTHONPATH="$PEERS_SITE${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

# FlashInfer compiles its kernels on first use (about 2 minutes for norm,
# activation, RoPE, page and decode): parallel, and for the H100 only.
export MAX_JOBS="${MAX_JOBS:-16}"
export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
case ":$PATH:" in
    *":$CUDA_HOME/bin:"*) ;;
    *) export PATH="$CUDA_HOME/bin:$PATH" ;;
esac
# The pip wheels' bin/ (ninja, if it came as a wheel) next to the packages.
if [ -d "$PEERS_SITE/bin" ]; then
    export PATH="$PEERS_SITE/bin:$PATH"
fi
unset _peers_root
