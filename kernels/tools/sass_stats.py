"""Per-kernel SASS statistics without a GPU.

    python3 kernels/tools/sass_stats.py STEM [FILTER] [--arch sm_90a]

Compiles kernels/cuda/STEM.cu (with common.cuh prepended, as the runtime
does) to a CUBIN with the NVRTC that `.ci/test` installs, disassembles it
with cuobjdump/nvdisasm, and prints, per kernel whose name contains FILTER:
instructions, MUFU (special function unit), CALL (slow-path subroutines),
BRA, FFMA/FMUL, global loads and stores. cuobjdump and nvdisasm come from
PyPI wheels (no CUDA toolkit needed):

    pip download --no-deps --only-binary=:all: -d /tmp/sass nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    (cd /tmp/sass && for w in *.whl; do python3 -m zipfile -e $w x; done; chmod +x x/nvidia/cu13/bin/*)
    PATH=/tmp/sass/x/nvidia/cu13/bin:$PATH python3 kernels/tools/sass_stats.py silu_mul bf16

A static count, not a timing: it shows what a change did to the code (a
division's slow-path calls, spills), never how fast it runs.
"""
import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA = os.path.join(ROOT, ".ci/cuda/nvidia/cu13")


def cubin(stem, arch):
    # NVRTC dlopens its builtins by soname: load them first so that no
    # LD_LIBRARY_PATH is needed.
    ctypes.CDLL(os.path.join(CUDA, "lib/libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(os.path.join(CUDA, "lib/libnvrtc.so.13"))
    src = (open(os.path.join(ROOT, "kernels/cuda/common.cuh")).read() + f'\n#line 1 "{stem}.cu"\n'
           + open(os.path.join(ROOT, f"kernels/cuda/{stem}.cu")).read())
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{stem}.cu".encode(), 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}", "--std=c++17", f"-I{CUDA}/include"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    if lib.nvrtcCompileProgram(prog, len(opts), arr):
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    n = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stem")
    ap.add_argument("filter", nargs="?", default="")
    ap.add_argument("--arch", default="sm_90a")
    a = ap.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin(a.stem, a.arch))
        f.flush()
        try:
            sass = subprocess.run(["cuobjdump", "-sass", f.name], check=True, capture_output=True,
                                  text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"cuobjdump -sass failed ({e}); put cuobjdump and nvdisasm on PATH (see the docstring)")
    cols = ("MUFU", "CALL", "BRA", "FFMA", "FMUL", "LDG", "STG")
    print(f"{'kernel':<40} {'instr':>6} " + " ".join(f"{c:>5}" for c in cols))
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n")[0].strip()
        if a.filter not in name:
            continue
        ins = [re.sub(r"^\s*/\*[0-9a-f]{4}\*/\s*", "", l) for l in block.split("\n")
               if re.match(r"\s*/\*[0-9a-f]{4}\*/", l)]
        ops = Counter((l.split()[1] if l.startswith("@") else l.split()[0]).split(".")[0] for l in ins)
        print(f"{name:<40} {len(ins):>6} " + " ".join(f"{ops.get(c, 0):>5}" for c in cols))


if __name__ == "__main__":
    main()
