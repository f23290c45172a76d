"""The interface every peer module implements (one Bench class per kernel)."""

from dataclasses import dataclass
from typing import Callable, Optional


def _identity(s):
    return s


@dataclass
class Impl:
    """One peer implementation of one case.

    prepare(set) -> set: setup that is not timed (layout changes a peer's API
        needs, index dtype conversion, FlashInfer's host-side plan()).
    fn(set) -> ret: the timed call; must be capturable in a CUDA graph to be
        timed by replay (else timing falls back to eager calls).
    outputs(set, ret) -> {name: tensor}: what to check, names matching the
        bench's expects().
    """

    fn: Callable
    outputs: Callable
    prepare: Callable = _identity
    note: Optional[str] = None


class BenchBase:
    """Subclasses set `kernel` and implement check_set, perf_set, expects,
    tolerance and impl. Shared per-case tensors (weights, tables) are made in
    __init__ and put by reference into every set, as ours shares them."""

    kernel = "?"

    def __init__(self, case, device="cuda"):
        self.case = case
        self.device = device

    def check_set(self, gen):
        raise NotImplementedError

    def perf_set(self, gen, index):
        raise NotImplementedError

    def expects(self, pristine, got):
        raise NotImplementedError

    def tolerance(self):
        raise NotImplementedError

    def impl(self, label):
        raise NotImplementedError
