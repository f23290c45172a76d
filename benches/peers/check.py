"""Checking a peer's output against a float64 reference, as ours does
(workbench/compare.rs): element i passes when
    |got - ref| <= atol + rtol * max(|ref|, scale_i)
(scale: the magnitude of terms that cancel, for rope and attention; else |ref|),
a NaN in the reference must be NaN in the output and nowhere else, and the
whole tensor must satisfy ||got - ref||_2 / ||ref||_2 <= rel_l2.

References are computed in row chunks (first dimension) so large cases fit.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    rel_l2: float


EXACT = Tolerance(0.0, 0.0, 0.0)

# workbench/op.rs rounded_once(): outputs computed in f32, rounded once.
ROUNDED_ONCE = {
    "bf16": Tolerance(1e-2, 1e-2, 5e-3),
    "f16": Tolerance(1e-3, 2e-3, 1e-3),
    "f32": Tolerance(1e-5, 1e-5, 1e-5),
}

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@dataclass
class Expect:
    """One output to check. ref(start, end) returns (ref, scale_or_None) for
    rows start:end as float64 tensors shaped like got[start:end]."""

    name: str
    got: torch.Tensor
    ref: object
    rows_per_chunk: int


class _Acc:
    def __init__(self, name, tol):
        self.name, self.tol = name, tol
        self.bad = 0
        self.first = None
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.unexpected_nan = 0
        self.elements = 0

    def add(self, got, want, scale, offset):
        got = got.to(torch.float64).reshape(-1)
        want = want.to(torch.float64).reshape(-1)
        self.elements += want.numel()
        want_nan = torch.isnan(want)
        got_nan = torch.isnan(got)
        finite_want = torch.isfinite(want)
        if self.tol.atol == 0.0 and self.tol.rtol == 0.0:
            bad = ~((got == want) | (want_nan & got_nan))
        else:
            mag = want.abs()
            if scale is not None:
                mag = torch.maximum(mag, scale.to(torch.float64).reshape(-1).abs())
            diff = (got - want).abs()
            allowed = self.tol.atol + self.tol.rtol * mag
            ok_finite = finite_want & torch.isfinite(got) & (diff <= allowed)
            ok_nan = want_nan & got_nan
            ok_inf = torch.isinf(want) & (got == want)
            bad = ~(ok_finite | ok_nan | ok_inf)
            both = finite_want & torch.isfinite(got)
            if both.any():
                d = diff[both]
                self.max_abs = max(self.max_abs, float(d.max()))
                self.sq_diff += float((d * d).sum())
                w = want[both]
                self.sq_ref += float((w * w).sum())
        self.unexpected_nan += int((got_nan & ~want_nan).sum())
        nbad = int(bad.sum())
        if nbad and self.first is None:
            i = int(torch.nonzero(bad)[0])
            self.first = (offset + i, float(got[i]), float(want[i]))
        self.bad += nbad

    def verdict(self):
        msgs = []
        if self.bad:
            i, g, w = self.first
            msgs.append(
                f"{self.name}: {self.bad} of {self.elements} elements out of tolerance "
                f"(first at flat index {i}: got {g!r}, want {w!r}"
                + (")" if self.tol.atol == 0.0 and self.tol.rtol == 0.0 else f"; max abs err {self.max_abs:.3e})")
            )
        if self.tol.rel_l2 > 0 and self.sq_ref > 0:
            rel = (self.sq_diff / self.sq_ref) ** 0.5
            if rel > self.tol.rel_l2:
                msgs.append(f"{self.name}: rel_l2 {rel:.3e} > {self.tol.rel_l2:.1e}")
        if self.unexpected_nan:
            msgs.append(f"{self.name}: {self.unexpected_nan} unexpected NaN")
        return msgs


def check(expects, tol):
    """[] when every output passes, else a list of failure messages."""
    msgs = []
    for e in expects:
        acc = _Acc(e.name, tol)
        rows = e.got.shape[0]
        per_row = e.got[0].numel() if rows else 0
        step = max(1, e.rows_per_chunk)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            want, scale = e.ref(start, end)
            got = e.got[start:end]
            if tuple(want.shape) != tuple(got.shape):
                msgs.append(f"{e.name}: reference shape {tuple(want.shape)} != output shape {tuple(got.shape)}")
                break
            acc.add(got, want, scale, start * per_row)
        msgs.extend(acc.verdict())
    return msgs


def rows_per_chunk(row_elems, budget_elems=1 << 26):
    """Rows per reference chunk: about budget_elems float64 values (512 MiB)."""
    return max(1, budget_elems // max(1, row_elems))


def tolerance(dtype, exact=False):
    return EXACT if exact else ROUNDED_ONCE[dtype]
