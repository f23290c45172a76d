# Compile a kernel source with NVRTC to CUBIN with ptxas -v, print the log (registers/spills).
import ctypes, sys, os, time
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cuda = root + "/.ci/cuda/nvidia/cu13"
lib = ctypes.CDLL(cuda + "/lib/libnvrtc.so.13")
stem = sys.argv[1]; arch = sys.argv[2] if len(sys.argv) > 2 else "sm_90a"
def splice(line):  # as kernels/src/compile.rs does for its HEADERS
    name = line.strip()[len('#include "'):-1] if line.strip().startswith('#include "') else None
    return open(root + f"/kernels/cuda/{name}").read() if name else line
body = "\n".join(splice(l) for l in open(root + f"/kernels/cuda/{stem}.cu").read().split("\n"))
src = open(root + "/kernels/cuda/common.cuh").read() + f'\n#line 1 "{stem}.cu"\n' + body
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{stem}.cu".encode(), 0, None, None) == 0
opts = [f"--gpu-architecture={arch}", "--std=c++17", f"-I{cuda}/include", "--ptxas-options=-v"] + sys.argv[3:]
arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
t = time.time()
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
dt = time.time() - t
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
buf = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, buf)
print(buf.value.decode())
print("rc", rc, "seconds", round(dt, 1))
if rc == 0 and os.environ.get("PTX"):
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n)); b = ctypes.create_string_buffer(n.value); lib.nvrtcGetPTX(prog, b)
    open(os.environ["PTX"], "w").write(b.value.decode())
