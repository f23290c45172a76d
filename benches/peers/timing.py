"""Timing, the same method as ours (kernels/src/timing.rs):

- the caller prepares N independent input sets, N = plan.rotation_sets(bytes, l2)
  (together more than 2x the L2, at most 64), so each call reads from HBM;
- every set is run once eagerly (first-use costs: JIT, autotune, compile),
  then once more on a side stream (the warm-up PyTorch asks for before capture);
- ONE CUDA graph is captured that runs the op once on each set in turn;
- the graph is replayed 3 times to warm up, then timed replay by replay with
  CUDA events until 150 ms of GPU time (at least 15, at most 2000 replays);
- per-call time = replay time / N; the median over replays is reported.

If capture fails (host work or a sync inside the call), N sequential eager
calls are timed between events instead, and the result says mode "eager".
"""

import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class TimingOpts:
    warmup_replays: int = 3
    min_replays: int = 15
    max_replays: int = 2000
    target_ms: float = 150.0


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    min_us: float
    replays: int
    sets: int
    mode: str  # "graph" or "eager"


def _quantile(sorted_v, q):
    if not sorted_v:
        return float("nan")
    i = int(round((len(sorted_v) - 1) * q))
    return sorted_v[min(i, len(sorted_v) - 1)]


def summarize(per_call_us, sets, mode):
    v = sorted(per_call_us)
    return Timing(
        median_us=_quantile(v, 0.5),
        p10_us=_quantile(v, 0.1),
        p90_us=_quantile(v, 0.9),
        min_us=v[0] if v else float("nan"),
        replays=len(v),
        sets=sets,
        mode=mode,
    )


def _timed_loop(run_once, sets, opts, deadline):
    """Time run_once() (which covers all sets) until the target; per-call us."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.current_stream()
    per_call, total_ms = [], 0.0
    while len(per_call) < opts.max_replays and (
        len(per_call) < opts.min_replays or total_ms < opts.target_ms
    ):
        if deadline is not None and time.monotonic() > deadline and len(per_call) >= 3:
            break
        start.record(stream)
        run_once()
        end.record(stream)
        end.synchronize()
        ms = start.elapsed_time(end)
        total_ms += ms
        per_call.append(ms * 1e3 / sets)
    return per_call


def time_sets(fn, sets, opts=None, deadline=None, log=None):
    """Time fn(s) over the list of input sets `sets` (see module docs).

    fn's return values are kept alive until timing ends, so outputs that fn
    allocates are distinct per set (as ours write per-set outputs) instead of
    reusing one freed buffer that could stay in L2.
    """
    opts = opts or TimingOpts()
    log = log or (lambda m: print(m, file=sys.stderr))
    n = len(sets)
    keep = [fn(s) for s in sets]  # eager pass: errors surface here
    torch.cuda.synchronize()
    del keep

    graph = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            keep = [fn(s) for s in sets]
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        del keep
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            keep = [fn(s) for s in sets]
        torch.cuda.synchronize()
    except Exception as e:  # capture failed: host work or a sync in the call
        graph = None
        keep = None
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        log(f"    graph capture failed ({type(e).__name__}: {_short(e)}); timing {n} eager calls between events")

    if graph is not None:
        for _ in range(opts.warmup_replays):
            graph.replay()
        torch.cuda.synchronize()
        per_call = _timed_loop(graph.replay, n, opts, deadline)
        mode = "graph"
    else:
        holder = []

        def run_all():
            holder.clear()
            holder.extend(fn(s) for s in sets)

        for _ in range(opts.warmup_replays):
            run_all()
        torch.cuda.synchronize()
        per_call = _timed_loop(run_all, n, opts, deadline)
        holder.clear()
        mode = "eager"
    del keep
    graph = None
    return summarize(per_call, n, mode)


def _short(e, limit=300):
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."
