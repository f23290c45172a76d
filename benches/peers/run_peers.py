#!/usr/bin/env python3
"""Time peer implementations (torch eager, torch.compile, Liger-Kernel,
FlashInfer, torch SDPA) on the cases our workbench times, with our byte model
and our timing method, and write CSV rows in our schema.

    python3 run_peers.py --cases cases.json --out peers.csv \\
        [--impl torch_eager,torch_compile,liger,flashinfer,torch_sdpa] \\
        [--kernels rmsnorm,...] [--max-seconds N] [--dry-run] [--preflight]

cases.json comes from `workbench roofline --emit-cases FILE`. Every peer is
checked once against a float64 reference before it is timed; a peer that
fails gets a row with `us` empty. Peers that lack an op get no row, a line on
stderr, and a line in missing.csv (kernel,impl,reason). See README.md.
"""

import argparse
import csv
import math
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plan as planmod  # noqa: E402  (torch-free)

MODULES = {
    "rmsnorm": "peers_norm",
    "silu_mul": "peers_act",
    "rope": "peers_rope",
    "kv_store": "peers_kv",
    "paged_attention": "peers_attn",
    "prefill_attention": "peers_prefill",
}

COLUMNS = [
    "kernel", "variant", "case", "dtype", "impl", "us", "bytes", "flops",
    "gb_per_s", "tflop_per_s", "pct_of_ceiling",
]


MISSING_COLUMNS = ["kernel", "impl", "reason"]


def _has_header(path, columns):
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), None) == columns
    except OSError:
        return False


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def short(e, limit=240):
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


class Outputs:
    """peers.csv and missing.csv, written row by row (flushed), so a run cut
    short still leaves every finished row."""

    def __init__(self, out_path, missing_path, resume=False):
        for p in (out_path, missing_path):
            d = os.path.dirname(os.path.abspath(p))
            os.makedirs(d, exist_ok=True)
        # With resume, rows already in out_path (timed or failed) are kept and
        # their (kernel, case, dtype, impl) are not run again.
        self.done = set()
        self.seen_missing = set()
        keep_out = resume and _has_header(out_path, COLUMNS)
        keep_missing = resume and _has_header(missing_path, MISSING_COLUMNS)
        if keep_out:
            with open(out_path, newline="") as f:
                for r in csv.DictReader(f):
                    self.done.add((r["kernel"], r["case"], r["dtype"], r["impl"]))
        if keep_missing:
            with open(missing_path, newline="") as f:
                for r in csv.DictReader(f):
                    self.seen_missing.add((r["kernel"], r["impl"], r["reason"]))
        self.f = open(out_path, "a" if keep_out else "w", newline="")
        self.w = csv.writer(self.f, lineterminator="\n")  # as the workbench writes
        if not keep_out:
            self.w.writerow(COLUMNS)
        self.mf = open(missing_path, "a" if keep_missing else "w", newline="")
        self.mw = csv.writer(self.mf, lineterminator="\n")
        if not keep_missing:
            self.mw.writerow(MISSING_COLUMNS)
        self.rows = self.failed = 0
        self.eager_fallbacks = []
        self.f.flush()
        self.mf.flush()

    def row(self, case, impl, us):
        if us is None:
            us_s = gb = tf = ""
            self.failed += 1
        else:
            us_s = f"{us:.3f}"
            gb = f"{case.bytes / us / 1e3:.1f}"
            tf = f"{case.flops / us / 1e6:.4f}"
        self.w.writerow([case.kernel, "-", case.case, case.dtype, impl, us_s, case.bytes, case.flops, gb, tf, ""])
        self.f.flush()
        self.rows += 1

    def missing(self, kernel, impl, reason):
        key = (kernel, impl, reason)
        if key in self.seen_missing:
            return
        self.seen_missing.add(key)
        self.mw.writerow([kernel, impl, reason])
        self.mf.flush()

    def close(self):
        self.f.close()
        self.mf.close()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="cases JSON from `workbench roofline --emit-cases FILE`")
    ap.add_argument("--out", default="peers.csv", help="CSV of timed rows (default peers.csv)")
    ap.add_argument("--missing", help="CSV of kernel,impl,reason (default: missing.csv beside --out)")
    ap.add_argument("--impl", default=",".join(planmod.IMPLS), help="comma-separated impls (default: all)")
    ap.add_argument("--kernels", help="comma-separated kernels (default: all in the cases file)")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="global time budget; 0 = none")
    ap.add_argument("--dry-run", action="store_true", help="print the (case, impl) plan; no torch, no CUDA")
    ap.add_argument("--preflight", action="store_true", help="import every peer, print versions, and exit")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (and missing.csv), append, and skip the pairs done")
    ap.add_argument("--check-only", action="store_true", help="check peers against the reference; time nothing")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default), or cpu with --check-only: a smoke test of the torch impls and references")
    ap.add_argument("--compile-mode", default="default",
                    help='torch.compile mode for torch_compile (default: "default"; e.g. max-autotune-no-cudagraphs)')
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="torch.compile(dynamic=True) once per function instead of a static compile per case")
    ap.add_argument("--target-ms", type=float, default=150.0, help="GPU time to measure per impl (ours: 150)")
    ap.add_argument("--min-replays", type=int, default=15, help="(ours: 15)")
    ap.add_argument("--max-replays", type=int, default=2000, help="(ours: 2000)")
    args = ap.parse_args(argv)
    if not args.preflight and not args.cases:
        ap.error("--cases is required (except with --preflight)")
    impls = [x.strip() for x in args.impl.split(",") if x.strip()]
    bad = [x for x in impls if x not in planmod.IMPLS]
    if bad:
        ap.error(f"unknown impl(s) {bad}; known: {','.join(planmod.IMPLS)}")
    args.impls = impls
    args.kernel_list = [x.strip() for x in args.kernels.split(",") if x.strip()] if args.kernels else None
    if args.missing is None:
        args.missing = os.path.join(os.path.dirname(os.path.abspath(args.out)), "missing.csv")
    return args


def print_plan(plan, l2):
    print(f"l2_bytes {l2}; {len(plan)} case(s)")
    n_run = n_missing = 0
    for item in plan:
        c = item.case
        print(f"{c.kernel} {c.case} {c.dtype}: bytes {c.bytes}, flops {c.flops}, {item.sets} set(s)")
        for label, reason in item.impls:
            if reason is None:
                n_run += 1
                print(f"    run      {label}")
            else:
                n_missing += 1
                print(f"    missing  {label}: {reason}")
    print(f"{n_run} (case, impl) pair(s) to run, {n_missing} missing")


def preflight():
    import shutil

    log(f"python {sys.version.split()[0]}; PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    for var in ("MAX_JOBS", "FLASHINFER_CUDA_ARCH_LIST", "FLASHINFER_WORKSPACE_BASE", "CUDA_HOME"):
        log(f"  {var}={os.environ.get(var, '')}")
    log(f"  ninja: {shutil.which('ninja')}; nvcc: {shutil.which('nvcc')}")
    ok = True
    try:
        import torch

        log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            log(f"  device: {p.name}, cc {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
        import triton

        log(f"triton {triton.__version__}")
    except Exception as e:
        log(f"torch/triton: FAILED {type(e).__name__}: {short(e)}")
        return 1
    for mod in ("liger_kernel.ops.rms_norm", "liger_kernel.ops.fused_add_rms_norm", "liger_kernel.ops.swiglu",
                "liger_kernel.ops.rope", "flashinfer", "flashinfer.norm", "flashinfer.activation",
                "flashinfer.rope", "flashinfer.page", "flashinfer.decode"):
        try:
            m = __import__(mod, fromlist=["_"])
            top = sys.modules[mod.split(".")[0]]
            log(f"{mod}: ok ({getattr(top, '__version__', '?')}, {os.path.dirname(getattr(top, '__file__', '') or '')})")
        except Exception as e:
            ok = False
            log(f"{mod}: FAILED {type(e).__name__}: {short(e)}")
    try:
        from importlib.metadata import version

        log(f"liger-kernel dist version: {version('liger-kernel')}")
    except Exception:
        pass
    return 0 if ok else 1


def cuda_alive(torch):
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def run(args, plan, l2):
    import importlib

    import torch

    import common
    from check import check
    from common import Unavailable, clone_set, generator
    from timing import TimingOpts, time_sets

    dev = args.device
    on_cuda = dev.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        log("error: no CUDA device (use --dry-run, or --device cpu --check-only, on a machine without a GPU)")
        return 2
    if not on_cuda and not args.check_only:
        log("error: timing needs CUDA; --device cpu works only with --check-only")
        return 2
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    torch.set_grad_enabled(False)
    common.COMPILE_MODE = None if args.compile_mode in ("", "default", "none") else args.compile_mode
    common.COMPILE_DYNAMIC = args.compile_dynamic
    common.configure_dynamo()
    opts = TimingOpts(min_replays=args.min_replays, max_replays=args.max_replays, target_ms=args.target_ms)
    t0 = time.monotonic()
    deadline = t0 + args.max_seconds if args.max_seconds > 0 else None
    out = Outputs(args.out, args.missing, args.resume)
    if out.done:
        log(f"resume: {len(out.done)} row(s) already in {args.out} are skipped")
    name = torch.cuda.get_device_properties(0).name if on_cuda else dev
    log(f"device {name}; torch {torch.__version__}; L2 from cases file {l2 / 2**20:.0f} MiB; "
        f"compile mode {common.COMPILE_MODE or 'default'}{', dynamic' if args.compile_dynamic else ''}; "
        f"{len(plan)} case(s)")

    def over():
        return deadline is not None and time.monotonic() > deadline

    def fail(case, label, why):
        log(f"    {label}: FAILED {why}")
        out.row(case, label, None)
        out.missing(case.kernel, label, f"failed on {case.case}: {why}")

    aborted = None
    try:
        for n, item in enumerate(plan, 1):
            case = item.case
            if over():
                aborted = f"time budget of {args.max_seconds:.0f} s spent"
                break
            log(f"[{n}/{len(plan)} +{time.monotonic() - t0:.0f}s] {case.kernel} {case.case} {case.dtype}: "
                f"{item.sets} set(s) of {case.bytes} B")
            runnable = []
            for label, reason in item.impls:
                if (case.kernel, case.case, case.dtype, label) in out.done:
                    continue
                if reason is None:
                    runnable.append(label)
                else:
                    log(f"    {label}: n/a ({reason})")
                    out.missing(case.kernel, label, reason)
            if not runnable:
                continue
            mod = importlib.import_module(MODULES[case.kernel])
            try:
                bench = mod.Bench(case, dev)
                if "torch_compile" in runnable:
                    common.reset_compile()
                pristine = bench.check_set(generator(1 + 7 * case.index, dev))
            except Unavailable as e:
                for label in runnable:
                    log(f"    {label}: n/a ({e})")
                    out.missing(case.kernel, label, str(e))
                continue
            except Exception as e:
                for label in runnable:
                    fail(case, label, f"setting up the case: {type(e).__name__}: {short(e)}")
                if not cuda_alive(torch):
                    aborted = "CUDA context lost"
                    break
                continue

            for label in runnable:
                if over():
                    aborted = f"time budget of {args.max_seconds:.0f} s spent"
                    break
                try:
                    impl = bench.impl(label)
                except Unavailable as e:
                    log(f"    {label}: n/a ({e})")
                    out.missing(case.kernel, label, str(e))
                    continue
                except Exception as e:
                    fail(case, label, f"{type(e).__name__}: {short(e)}")
                    continue

                # 1. Check once against the float64 reference.
                t_check = time.monotonic()
                try:
                    s = impl.prepare(clone_set(pristine))
                    ret = impl.fn(s)
                    sync()
                    msgs = check(bench.expects(pristine, impl.outputs(s, ret)), bench.tolerance())
                except Unavailable as e:
                    log(f"    {label}: n/a ({e})")
                    out.missing(case.kernel, label, str(e))
                    continue
                except Exception as e:
                    msgs = [f"{type(e).__name__}: {short(e)}"]
                finally:
                    s = ret = None
                if msgs:
                    fail(case, label, "check: " + "; ".join(msgs))
                    if not cuda_alive(torch):
                        aborted = "CUDA context lost"
                        break
                    if on_cuda:
                        torch.cuda.empty_cache()
                    continue
                check_s = time.monotonic() - t_check
                if args.check_only:
                    log(f"    {label}: check ok ({check_s:.1f} s)")
                    continue

                # 2. Time it on N rotated input sets.
                sets = None
                try:
                    gen = generator(100003 + case.index, dev)
                    sets = [impl.prepare(bench.perf_set(gen, i)) for i in range(item.sets)]
                    t = time_sets(impl.fn, sets, opts, deadline, log)
                except Exception as e:
                    sets = None
                    fail(case, label, f"timing: {type(e).__name__}: {short(e)}")
                    if not cuda_alive(torch):
                        aborted = "CUDA context lost"
                        break
                    torch.cuda.empty_cache()
                    continue
                finally:
                    sets = None
                if not math.isfinite(t.median_us) or t.median_us <= 0:
                    fail(case, label, "timing: no valid replay")
                    continue
                out.row(case, label, t.median_us)
                if t.mode != "graph":
                    out.eager_fallbacks.append(f"{case.kernel} {case.case} {label}")
                log(f"    {label:<22} {t.median_us:10.3f} us {case.bytes / t.median_us / 1e3:8.1f} GB/s  "
                    f"[{t.mode}, {t.sets} set(s), {t.replays} replays, p10 {t.p10_us:.3f} p90 {t.p90_us:.3f}; "
                    f"check {check_s:.1f} s]")
            if aborted:
                break
            del bench, pristine
            if on_cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        aborted = "interrupted"
    finally:
        out.close()
    if aborted:
        log(f"stopped early: {aborted}; the rows so far are written")
    if out.eager_fallbacks:
        log(f"{len(out.eager_fallbacks)} row(s) timed as eager calls (graph capture failed), not graph replay:")
        for x in out.eager_fallbacks:
            log(f"    {x}")
    log(f"wrote {out.rows} row(s) ({out.failed} failed) to {args.out}; missing to {args.missing}; "
        f"{time.monotonic() - t0:.0f} s")
    return 0 if aborted in (None, f"time budget of {args.max_seconds:.0f} s spent") else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.preflight:
        return preflight()
    try:
        l2, cases = planmod.load_cases(args.cases)
    except (OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    if args.kernel_list:
        unknown = [k for k in args.kernel_list if k not in planmod.KERNELS]
        if unknown:
            log(f"note: --kernels {unknown} have no peer implementation here")
    plan = planmod.build_plan(cases, l2, args.impls, args.kernel_list, warn=log)
    if args.dry_run:
        print_plan(plan, l2)
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    return run(args, plan, l2)


if __name__ == "__main__":
    sys.exit(main())
