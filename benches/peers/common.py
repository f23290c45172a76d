"""Shared helpers for the peer modules: input generation, torch.compile,
and importing the optional peers (Liger-Kernel, FlashInfer) with clear errors."""

import importlib

import torch

from check import TORCH_DTYPES

# torch.compile mode for impl "torch_compile". The default mode (Inductor's
# Triton kernels, no CUDA graphs of its own: we capture our own graph) is
# used, not "max-autotune-no-cudagraphs": autotuning every shape takes
# minutes per case and these ops are single fused elementwise/reduction
# kernels where it rarely changes the result. Override with --compile-mode.
COMPILE_MODE = None
# dynamic=False (default): one static-shape compile per case, the best case
# for Inductor. --compile-dynamic compiles shape-generic code once per
# function and reuses it across cases: far less compile time, maybe slower code.
COMPILE_DYNAMIC = False


class Unavailable(Exception):
    """The peer cannot run this op here (import failed, unsupported shape)."""


def torch_dtype(name):
    return TORCH_DTYPES[name]


def generator(seed, device="cuda"):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def uniform(shape, lo, hi, dtype, gen, device="cuda"):
    """Uniform values in [lo, hi), like ours' rand_buf (perf inputs)."""
    t = torch.empty(shape, dtype=torch.float32, device=device)
    t.uniform_(lo, hi, generator=gen)
    return t.to(dtype)


def randn(shape, dtype, gen, device="cuda"):
    """Standard normal values rounded to dtype (check inputs, like Gen::Randn)."""
    return torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)


def clone_set(s):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}


_compiled = {}


def compiled(fn):
    """torch.compile(fn) with a clean Dynamo cache (see reset_compile)."""
    key = fn
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, mode=COMPILE_MODE, dynamic=True if COMPILE_DYNAMIC else False)
    return _compiled[key]


def reset_compile():
    """Forget compiled code between cases: each case compiles its own static
    shapes, and Dynamo's recompile limit (8 per function) never silently
    falls back to eager. A no-op with --compile-dynamic."""
    if COMPILE_DYNAMIC:
        return
    _compiled.clear()
    torch._dynamo.reset()


def configure_dynamo():
    cfg = torch._dynamo.config
    for name, value in (
        ("cache_size_limit", 64),
        ("recompile_limit", 64),
        ("automatic_dynamic_shapes", False),
    ):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


_import_failures = {}


def import_peer(module):
    """Import an optional peer module; a failure raises Unavailable (and is
    remembered, so a missing peer costs one attempt per run, not per case)."""
    if module in _import_failures:
        raise Unavailable(_import_failures[module])
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a peer failing at import time
        msg = f"cannot import {module}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        _import_failures[module] = msg
        raise Unavailable(msg) from e
