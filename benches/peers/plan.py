"""Cases, parameters and the (case, impl) plan. Imports no torch, so
`run_peers.py --dry-run` works on a machine without CUDA.

The cases file is what `workbench roofline --emit-cases FILE` writes:
    {"l2_bytes": N, "cases": [{"kernel", "case", "dtype", "params", "bytes", "flops"}, ...]}
"""

import json
import math
from dataclasses import dataclass, field

# Implementations a user can ask for with --impl.
IMPLS = ["torch_eager", "torch_compile", "liger", "flashinfer", "torch_sdpa"]

# Inputs are rotated over this many sets at most (like ours: kernels::timing).
MAX_SETS = 64


class CaseError(ValueError):
    pass


@dataclass
class Case:
    kernel: str
    case: str
    dtype: str
    params: dict
    bytes: int
    flops: int
    index: int = 0
    extra: dict = field(default_factory=dict)

    def _raw(self, key):
        v = self.params.get(key)
        if v is None or str(v).strip() == "":
            return None
        return str(v).strip()

    def int(self, key, default=None):
        v = self._raw(key)
        if v is None:
            if default is None:
                raise CaseError(f"{self.kernel} {self.case}: missing parameter {key!r}")
            return default
        try:
            return int(v)
        except ValueError:
            try:
                f = float(v)
            except ValueError:
                raise CaseError(f"{self.kernel} {self.case}: {key}={v!r} is not an integer") from None
            if f != int(f):
                raise CaseError(f"{self.kernel} {self.case}: {key}={v!r} is not an integer")
            return int(f)

    def float(self, key, default=None):
        v = self._raw(key)
        if v is None:
            if default is None:
                raise CaseError(f"{self.kernel} {self.case}: missing parameter {key!r}")
            return float(default)
        try:
            return float(v)
        except ValueError:
            raise CaseError(f"{self.kernel} {self.case}: {key}={v!r} is not a number") from None

    def flag(self, key, default=0):
        return self.int(key, default) != 0

    def label(self):
        return f"{self.kernel} {self.case} {self.dtype}"


def load_cases(path):
    """(l2_bytes, [Case]) from the emitted JSON file."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "cases" not in doc:
        raise CaseError(f"{path}: expected an object with 'l2_bytes' and 'cases'")
    l2 = int(doc.get("l2_bytes") or 0)
    if l2 <= 0:
        raise CaseError(f"{path}: l2_bytes missing or not positive")
    cases = []
    for i, c in enumerate(doc["cases"]):
        try:
            params = {str(k): str(v) for k, v in (c.get("params") or {}).items()}
            cases.append(
                Case(
                    kernel=str(c["kernel"]),
                    case=str(c["case"]),
                    dtype=str(c.get("dtype", "bf16")),
                    params=params,
                    bytes=int(c["bytes"]),
                    flops=int(c.get("flops", 0)),
                    index=i,
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CaseError(f"{path}: case #{i} is malformed ({e!r}): {c!r}") from None
    return l2, cases


def rotation_sets(bytes_per_call, l2_bytes, cap=MAX_SETS):
    """Sets needed so that together they exceed 2x the L2: at least 1, at most cap
    (the same rule as kernels::timing::rotation_sets)."""
    need = math.ceil(2 * l2_bytes / max(1, bytes_per_call))
    return max(1, min(cap, need))


# ---------------------------------------------------------------------------
# Which impl labels each kernel has, and why the others are missing.
# resolve() returns a list of (label, reason): reason None = will run.

NA_SDPA = "not applicable: torch_sdpa is the attention baseline only"
DTYPES = ("bf16", "f16", "f32")
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}


def _rmsnorm(case, impl):
    residual = case.flag("residual")
    if impl == "liger":
        if residual:
            # Liger 0.8.5 has LigerFusedAddRMSNormFunction (fused add); the unfused
            # variant (torch add, then LigerRMSNorm) is timed too, for comparison
            # with the earlier "Liger: RMSNorm only" numbers.
            return [("liger", None), ("liger_unfused_add", None)]
        return [("liger", None)]
    if impl == "torch_sdpa":
        return [(impl, NA_SDPA)]
    return [(impl, None)]


def _silu_mul(case, impl):
    if impl == "torch_sdpa":
        return [(impl, NA_SDPA)]
    if impl == "flashinfer" and (2 * case.int("inter") * ITEMSIZE[case.dtype]) % 16 != 0:
        return [(impl, "flashinfer.silu_and_mul needs input rows of a multiple of 16 bytes (bf16: inter % 4 == 0)")]
    return [(impl, None)]


def _rope(case, impl):
    if impl == "torch_sdpa":
        return [(impl, NA_SDPA)]
    if impl == "liger":
        # Liger's rope takes per-token cos/sin tensors, not a position-indexed
        # cache: the timed call gathers the rows first (two index_select).
        return [("liger_gather_cos_sin", None)]
    return [(impl, None)]


def _kv_store(case, impl):
    if impl == "torch_sdpa":
        return [(impl, NA_SDPA)]
    if impl == "liger":
        return [(impl, "Liger-Kernel 0.8.5 has no paged KV-cache write")]
    if impl == "flashinfer" and case.flag("skip"):
        return [(impl, "flashinfer.append_paged_kv_cache cannot skip tokens (negative slots, skip=1)")]
    return [(impl, None)]


def _paged_attention(case, impl):
    if impl == "liger":
        return [(impl, "Liger-Kernel 0.8.5 has no decode attention")]
    if case.flag("ragged"):
        return [(impl, "ragged=1 not modelled by the peer bench (every sequence ctx tokens)")]
    if case.int("ctx") < 1:
        return [(impl, "ctx=0 has nothing to attend to")]
    return [(impl, None)]


def _prefill_attention(case, impl):
    if impl == "liger":
        return [(impl, "Liger-Kernel 0.8.5 has no attention")]
    if impl in ("torch_eager", "torch_compile"):
        return [(impl, "not applicable: the torch baselines for prefill are torch_sdpa_flash and torch_sdpa_cudnn")]
    if case.flag("ragged"):
        return [(impl, "ragged=1 not modelled by the peer bench (every sequence q_len tokens)")]
    if impl == "torch_sdpa":
        labels = ["torch_sdpa_flash", "torch_sdpa_cudnn"]
        if case.int("prefix", 0):
            why = "SDPA's is_causal aligns the mask top-left: no cached prefix"
            return [(label, why) for label in labels]
        return [(label, None) for label in labels]
    return [(impl, None)]


RESOLVERS = {
    "rmsnorm": _rmsnorm,
    "silu_mul": _silu_mul,
    "rope": _rope,
    "kv_store": _kv_store,
    "paged_attention": _paged_attention,
    "prefill_attention": _prefill_attention,
}

KERNELS = list(RESOLVERS)


def resolve(case, impl):
    if case.dtype not in DTYPES:
        return [(impl, f"dtype {case.dtype} not supported by the peer bench")]
    if impl == "flashinfer" and case.dtype == "f32":
        return [(impl, "FlashInfer's kernels take fp16/bf16 only")]
    return RESOLVERS[case.kernel](case, impl)


@dataclass
class PlanItem:
    case: Case
    impls: list  # [(label, reason or None)]
    sets: int


def build_plan(cases, l2_bytes, impls, kernels=None, warn=print):
    """[PlanItem] for the known kernels among `cases` (filtered by `kernels`)."""
    plan, unknown = [], {}
    for c in cases:
        if kernels and c.kernel not in kernels:
            continue
        if c.kernel not in RESOLVERS:
            unknown[c.kernel] = unknown.get(c.kernel, 0) + 1
            continue
        labels = []
        try:
            for impl in impls:
                labels.extend(resolve(c, impl))
        except CaseError as e:
            warn(f"skip {c.label()}: {e}")
            continue
        plan.append(PlanItem(c, labels, rotation_sets(c.bytes, l2_bytes)))
    for k, n in sorted(unknown.items()):
        warn(f"skip kernel {k!r} ({n} case(s)): no peer implementation in benches/peers")
    return plan
