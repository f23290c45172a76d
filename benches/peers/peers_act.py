"""silu_mul peers: input [tokens, 2*inter] laid out gate|up,
out [tokens, inter] = silu(gate) * up."""

import torch
import torch.nn.functional as F

from bench_base import BenchBase, Impl
from check import Expect, rows_per_chunk, tolerance
from common import Unavailable, compiled, import_peer, randn, torch_dtype, uniform


# vLLM's SiluAndMul.forward_native.
def eager_silu_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class Bench(BenchBase):
    kernel = "silu_mul"

    def __init__(self, case, device="cuda"):
        super().__init__(case, device)
        self.tokens = case.int("tokens")
        self.inter = case.int("inter")
        self.dtype = torch_dtype(case.dtype)

    def _set(self, x):
        out = torch.empty((self.tokens, self.inter), dtype=self.dtype, device=self.device)
        return {"x": x, "out": out}

    def check_set(self, gen):
        return self._set(randn((self.tokens, 2 * self.inter), self.dtype, gen, self.device))

    def perf_set(self, gen, index):
        # ours: input uniform in [-4, 4)
        return self._set(uniform((self.tokens, 2 * self.inter), -4.0, 4.0, self.dtype, gen, self.device))

    def tolerance(self):
        return tolerance(self.case.dtype)

    def expects(self, pristine, got):
        x, i = pristine["x"], self.inter

        def ref(a, b):
            g = x[a:b, :i].double()
            u = x[a:b, i:].double()
            return g * torch.sigmoid(g) * u, None

        return [Expect("out", got["out"], ref, rows_per_chunk(3 * i * 3))]

    def impl(self, label):
        if label in ("torch_eager", "torch_compile"):
            f = compiled(eager_silu_mul) if label == "torch_compile" else eager_silu_mul
            return Impl(fn=lambda s: f(s["x"]), outputs=lambda s, ret: {"out": ret})
        if label == "liger":
            # LigerFusedGateUpSiLUMulFunction.forward(ctx, y, in_place=False) -> c:
            # one [..., 2*ffn] gate|up tensor, no chunk copies
            Fn = import_peer("liger_kernel.ops.swiglu").LigerFusedGateUpSiLUMulFunction
            return Impl(fn=lambda s: Fn.apply(s["x"]), outputs=lambda s, ret: {"out": ret})
        if label == "flashinfer":
            act = import_peer("flashinfer.activation")
            # silu_and_mul(input, out=None, enable_pdl=None) -> out
            return Impl(
                fn=lambda s: act.silu_and_mul(s["x"], out=s["out"]),
                outputs=lambda s, ret: {"out": s["out"]},
            )
        raise Unavailable(f"no impl {label!r} for silu_mul")
