"""rmsnorm peers. residual=1 is the fused op:
    residual <- round(x + residual)   (in place)
    out      <- RMSNorm(residual) * weight
x, residual, out [tokens, hidden]; weight [hidden], shared by all sets (as ours).
"""

import torch

from bench_base import BenchBase, Impl
from check import Expect, rows_per_chunk, tolerance
from common import Unavailable, compiled, import_peer, randn, torch_dtype, uniform


# HF transformers' Qwen2RMSNorm.forward, with the residual add in place first.
def eager_rmsnorm(x, weight, eps: float):
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)


def eager_fused_add_rmsnorm(x, residual, weight, eps: float):
    residual.add_(x)
    return eager_rmsnorm(residual, weight, eps)


class Bench(BenchBase):
    kernel = "rmsnorm"

    def __init__(self, case, device="cuda"):
        super().__init__(case, device)
        self.tokens = case.int("tokens")
        self.hidden = case.int("hidden")
        self.residual = case.flag("residual")
        self.eps = case.float("eps", 1e-6)
        self.dtype = torch_dtype(case.dtype)
        g = torch.Generator(device=device)
        g.manual_seed(999)
        self.weight = uniform((self.hidden,), 0.5, 1.5, self.dtype, g, device)

    def _set(self, make):
        shape = (self.tokens, self.hidden)
        s = {"x": make(shape), "weight": self.weight}
        if self.residual:
            s["residual"] = make(shape)
        s["out"] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return s

    def check_set(self, gen):
        return self._set(lambda shape: randn(shape, self.dtype, gen, self.device))

    def perf_set(self, gen, index):
        return self._set(lambda shape: uniform(shape, -1.0, 1.0, self.dtype, gen, self.device))

    def tolerance(self):
        return tolerance(self.case.dtype)

    def expects(self, pristine, got):
        x, w, eps, dt = pristine["x"], pristine["weight"].double(), self.eps, self.dtype
        res = pristine.get("residual")

        def summed(a, b):
            if res is None:
                return x[a:b].double()
            # round(x + residual) to the storage type, as the fused op stores it
            return (x[a:b].float() + res[a:b].float()).to(dt).double()

        def ref_out(a, b):
            r = summed(a, b)
            return r * torch.rsqrt((r * r).mean(-1, keepdim=True) + eps) * w, None

        chunk = rows_per_chunk(self.hidden * 4)
        out = [Expect("out", got["out"], ref_out, chunk)]
        if res is not None:
            out.append(Expect("residual", got["residual"], lambda a, b: (summed(a, b), None), chunk))
        return out

    def impl(self, label):
        eps, residual = self.eps, self.residual
        if label in ("torch_eager", "torch_compile"):
            wrap = compiled if label == "torch_compile" else (lambda f: f)
            if residual:
                f = wrap(eager_fused_add_rmsnorm)
                return Impl(
                    fn=lambda s: f(s["x"], s["residual"], s["weight"], eps),
                    outputs=lambda s, ret: {"out": ret, "residual": s["residual"]},
                )
            f = wrap(eager_rmsnorm)
            return Impl(fn=lambda s: f(s["x"], s["weight"], eps), outputs=lambda s, ret: {"out": ret})

        if label == "liger":
            if residual:
                mod = import_peer("liger_kernel.ops.fused_add_rms_norm")
                F = mod.LigerFusedAddRMSNormFunction
                # forward(ctx, X, R, W, eps, offset=0.0, casting_mode="llama", in_place=False)
                # -> (Y, S): S = X + R in a new tensor (not in place), Y = RMSNorm(S) * W
                return Impl(
                    fn=lambda s: F.apply(s["x"], s["residual"], s["weight"], eps, 0.0, "llama", False),
                    outputs=lambda s, ret: {"out": ret[0], "residual": ret[1]},
                )
            F = import_peer("liger_kernel.ops.rms_norm").LigerRMSNormFunction
            # forward(ctx, X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None)
            return Impl(
                fn=lambda s: F.apply(s["x"], s["weight"], eps, 0.0, "llama", False),
                outputs=lambda s, ret: {"out": ret},
            )

        if label == "liger_unfused_add":
            F = import_peer("liger_kernel.ops.rms_norm").LigerRMSNormFunction

            def unfused(s):
                s["residual"].add_(s["x"])
                return F.apply(s["residual"], s["weight"], eps, 0.0, "llama", False)

            return Impl(fn=unfused, outputs=lambda s, ret: {"out": ret, "residual": s["residual"]})

        if label == "flashinfer":
            norm = import_peer("flashinfer.norm")
            if residual:
                # fused_add_rmsnorm(input, residual, weight, eps=1e-6, enable_pdl=None) -> None:
                # residual += input; input = RMSNorm(residual) * weight (both in place)
                return Impl(
                    fn=lambda s: norm.fused_add_rmsnorm(s["x"], s["residual"], s["weight"], eps),
                    outputs=lambda s, ret: {"out": s["x"], "residual": s["residual"]},
                )
            # rmsnorm(input, weight, eps=1e-6, out=None, enable_pdl=None) -> out
            return Impl(
                fn=lambda s: norm.rmsnorm(s["x"], s["weight"], eps, out=s["out"]),
                outputs=lambda s, ret: {"out": s["out"]},
            )
        raise Unavailable(f"no impl {label!r} for rmsnorm")
