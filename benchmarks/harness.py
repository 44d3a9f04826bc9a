"""Shared benchmark harness: providers, fresh-process timing and peak memory, long-format CSV.

A benchmark script declares its providers and cases and hands control to :class:`Benchmark`::

    from benchmarks.harness import Benchmark, Case, Provider, Unavailable
    from benchmarks.plot import plot_csv

    def setup_naive(case: Case):           # build inputs on case.device, return the timed call
        h = torch.randn(case.shape["N"], ..., device=case.device, dtype=case.torch_dtype)
        return lambda: ...                  # runs "fwd" or "fwd+bwd" according to case.mode

    BENCH = Benchmark(
        op="linear_logprob",                # CSV "op" column; default CSV results/<op>.csv
        module="benchmarks.linear_logprob", # run as `python -m <module> --worker SPEC`
        providers=[Provider("naive", setup_naive), Provider("x", setup_x, available=check_x)],
        cases=lambda args: [Case({"N": 2048}, "fwd", args.device, "float32"), ...],
        flops=lambda case: 2.0 * ...,       # optional: adds a ``tflops`` column
        baseline="naive",                   # provider the printed ratio tables divide by
        plot=plot_csv,                      # optional (from benchmarks.plot): enables --plot
    )
    if __name__ == "__main__":
        BENCH.main()

API (everything else is private):

* ``Provider(name, setup, available=None, dtype=None)``: ``setup(case) -> Callable[[], Any]``
  builds the inputs and returns the zero-argument callable that is timed; ``available(case)
  -> str | None`` returns a reason to skip (checked in the parent, cheaply). ``setup`` may also
  raise ``Unavailable(reason)``. A skipped provider prints its reason and writes no row.
  ``dtype`` runs the provider on every case in that dtype (a bf16 variant beside fp32 ones).
* ``Case(shape: dict[str, int], mode: str, device: str, dtype: str)``: ``case.label`` is the
  CSV ``shape`` string (``"N=2048 H=576 V=49152"``), ``case.torch_dtype`` the torch dtype.
* ``measure(provider, case, warmup, repeats) -> dict`` runs one measurement in this process.
* ``summarize(times_ms) -> (median, p20, p80)`` (linear interpolation, as ``numpy.percentile``).
* ``write_rows(path, rows)`` appends rows (dicts) to a CSV, widening its header for new extra
  columns; ``read_rows(path)``; ``latest(rows)`` keeps the last row per
  (op, provider, mode, shape, device).
* ``ratio_table(rows, baseline, metric="median_ms", device=None) -> str``: markdown table of
  ``metric(provider) / metric(baseline)`` per (shape, mode). From the shell:
  ``python -m benchmarks.harness ratios benchmarks/results/x.csv --baseline naive [--metric peak_mb]``.
* ``device_name(device)``, ``git_commit()``.

Common CLI of every script: ``--device cpu|cuda``, ``--repeats`` (default 5), ``--warmup``
(default 1), ``--quick`` (tiny shapes, a smoke test), ``--csv PATH`` (default
``benchmarks/results/<op>.csv``), ``--providers a,b``, ``--modes m1,m2``, ``--inprocess``,
``--shapes "N=4096 H=2048 V=32000",...``, ``--timeout`` (seconds per worker), ``--plot``
(write the PNG next to the CSV) when the script passes ``plot=``, and ``--emulate-avx2``: sets
``RAG_KERNELS_CPU_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` for the workers, so that an AVX-512 machine measures the code paths
of an AVX2-only one (the same variables set by hand do the same).

Imports run one way: ``benchmarks.plot`` imports this module (its CSV readers), this module
never imports ``benchmarks.plot``; a script that wants ``--plot`` hands ``plot_csv`` in.

On CUDA, ``--inprocess`` keeps ``peak_mb`` exact (it comes from the caching allocator's
statistics, not from RSS) and saves one interpreter start, CUDA initialisation and Triton
autotuning per point: use it where device time is short. On CPU prefer the default fresh
process: RSS is per process, and the allocator state of earlier points would leak in.

What one measurement does (a FRESH ``python -m <module> --worker`` process per
(provider, shape, mode), unless ``--inprocess``):

1. ``torch.manual_seed(0)``; ``fn = provider.setup(case)`` builds the inputs.
2. ``warmup`` calls of ``fn()`` (at least one): lazy initialisation, ``torch.compile`` and
   Triton autotuning happen here and are excluded from both memory and time.
3. Peak memory of one call. CPU: ``gc.collect()``, ``malloc_trim(0)`` (glibc: return freed heap
   pages, so the op cannot silently reuse memory that was already resident), then the RSS
   high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs`` and the baseline is
   the current RSS (inputs included); ``peak_mb`` = high-water RSS (``VmHWM``) after the call
   minus the baseline. Where ``clear_refs`` is not writable (non-Linux, old kernels) the
   fallback is the ``ru_maxrss`` delta of the FIRST call, taken before any warm-up (it then
   includes one-time initialisation, and under-reports if building the inputs peaked
   higher); the row's ``mem_method`` column says which was used. CUDA: ``peak_mb`` =
   ``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
   ``memory_allocated()`` before the call. The callable's result is held until the peak is
   read, so outputs and tensors saved for backward count.
4. Timing, in the same process: ``repeats`` calls, each timed alone; the row reports
   median, p20 and p80 in milliseconds. CPU: ``time.perf_counter``. CUDA: as
   ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` does, the L2 cache is flushed
   before every call by zeroing a 256 MB buffer (five times an H100 / H200 L2), so no call
   finds its inputs in L2 left there by the previous one; then ``torch.cuda.Event`` pairs
   around the call alone (the flush is not timed), after a synchronize. Unlike ``do_bench``
   the number of calls is exactly ``repeats`` (not derived from a time budget).

CSV columns, in order: ``op, provider, mode, shape, median_ms, p20_ms, p80_ms, peak_mb,
device, commit, date`` then extras (``dtype, repeats, tflops, torch, mem_method``; on CPU also
``cpu_isa`` and ``bf16_gemm``, the C++ kernels' dispatch: :func:`cpu_kernel_isa`). ``device``
names the CPU model (with torch's thread count, and in brackets any ISA caps of
:data:`ISA_LIMIT_VARS` that are set) or the GPU; ``commit`` is ``git rev-parse
--short HEAD`` plus ``-dirty`` when ``git status --porcelain`` is not empty (``unknown``
without git); ``date`` is UTC ISO-8601.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "op", "provider", "mode", "shape", "median_ms", "p20_ms", "p80_ms", "peak_mb",
    "device", "commit", "date",
)  # fmt: skip
_MARKER = "@@BENCH_RESULT@@"
# Bytes zeroed before every timed CUDA call to evict L2 (triton.testing.do_bench uses 256 MB;
# the L2 of an H100 / H200 is 50 MB).
L2_FLUSH_BYTES = 256 * 2**20
# Variables that cap the instruction set of the rag_kernels C++ kernels, MKL, ATen and oneDNN;
# ``--emulate-avx2`` sets all four to AVX2 (an AVX-512 machine standing in for an AVX2-only
# one), and ``device_name`` appends those that are set, so such rows never mix with native ones.
ISA_LIMIT_VARS = ("RAG_KERNELS_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
                  "ONEDNN_MAX_CPU_ISA")  # fmt: skip
EMULATE_AVX2 = {"RAG_KERNELS_CPU_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # fmt: skip


class Unavailable(Exception):
    """Raised by a provider's ``setup`` when it cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Case:
    """One benchmark point: ``shape`` sizes, ``mode`` (e.g. "fwd", "fwd+bwd"), device, dtype."""

    shape: dict[str, int]
    mode: str
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Provider:
    """``setup(case)`` builds inputs and returns the timed zero-argument callable.

    ``dtype`` (optional) runs this provider on every case in that dtype instead of the case's
    own (e.g. a bf16 variant next to the fp32 providers of the same run); the CSV row records
    the dtype it ran in.
    """

    name: str
    setup: Callable[[Case], Callable[[], Any]]
    available: Callable[[Case], str | None] | None = None
    dtype: str | None = None

    def case_for(self, case: Case) -> Case:
        return case if self.dtype is None else replace(case, dtype=self.dtype)

    def skip_reason(self, case: Case) -> str | None:
        if self.available is None:
            return None
        try:
            return self.available(case)
        except Exception as exc:  # an availability probe must never kill the run
            return f"availability check failed: {type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- yardsticks


def gemm_floor(h, w, backward: bool = True, tile: int = 2048):
    """The ``gemm_floor`` yardstick of the LM-head benchmarks: the ``[rows, H] x [H, V]`` matmuls
    alone that an exact method keeping no ``[rows, V]`` logits runs, in vocabulary tiles of
    ``tile`` with torch's own threading and no epilogue. Forward: the logits (the log-sum-exp
    pass); with ``backward``, then per tile the logits again, ``dh`` and ``dW`` (four GEMMs in
    all). Returns ``(dh, dW)`` (``None`` without ``backward``)."""
    import torch

    V = w.shape[0]
    for v0 in range(0, V, tile):
        h @ w[v0 : v0 + tile].T
    if not backward:
        return None
    dh = torch.zeros_like(h)
    dw = torch.empty_like(w)
    for v0 in range(0, V, tile):
        wt = w[v0 : v0 + tile]
        z = h @ wt.T
        dh.addmm_(z, wt)
        torch.mm(z.T, h, out=dw[v0 : v0 + tile])
    return dh, dw


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of the per-call times."""
    return percentile(times_ms, 50), percentile(times_ms, 20), percentile(times_ms, 80)


# ----------------------------------------------------------------------------- environment


def git_commit() -> str:
    """Short HEAD hash, ``-dirty`` if the work tree has changes, ``unknown`` without git."""
    try:
        run = lambda *a: subprocess.run(
            ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = run("status", "--porcelain").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    """CPU model and torch thread count, or the CUDA device's name."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform

        model = platform.processor() or model
    limits = " ".join(f"{k}={os.environ[k]}" for k in ISA_LIMIT_VARS if os.environ.get(k))
    return f"{model} ({torch.get_num_threads()} threads)" + (f" [{limits}]" if limits else "")


def cpu_kernel_isa() -> dict:
    """The rag_kernels C++ kernels' dispatch in this process: ``cpu_isa`` (the epilogues'
    instruction set) and ``bf16_gemm`` (``native``: bf16 GEMMs with fp32 outputs;
    ``converted``: bf16 tiles converted to fp32). Empty without the extension."""
    try:
        import importlib

        C = importlib.import_module("rag_kernels.ops._C")
        bf16 = "native" if C.native_bf16_gemm() else "converted"
        return {"cpu_isa": C.cpu_isa(), "bf16_gemm": bf16}
    except Exception:
        return {}


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- CPU memory


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _peak_cpu_mb(fn: Callable[[], Any]) -> tuple[float, str]:
    gc.collect()
    _malloc_trim()
    if _reset_hwm():
        base = _status_kb("VmRSS")
        out = fn()
        peak = _status_kb("VmHWM")
        del out
        return max(0, peak - base) / 1024.0, "vmhwm"
    # ru_maxrss never goes down: only meaningful on a call that precedes every warm-up.
    base = _maxrss_kb()
    out = fn()
    peak = _maxrss_kb()
    del out
    return max(0, peak - base) / 1024.0, "ru_maxrss"


def _peak_cuda_mb(fn: Callable[[], Any], device) -> tuple[float, str]:
    import torch

    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - base) / 2**20, "cuda_max_allocated"


# ----------------------------------------------------------------------------- timing


def _time_cpu(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(fn: Callable[[], Any], device, repeats: int) -> list[float]:
    """Per-call CUDA times (ms), each call starting with a cold L2 (see module docstring)."""
    import torch

    times = []
    with torch.cuda.device(device):
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.zero_()  # stream-ordered: it finishes before `start` is recorded
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        del flush
    return times


# ----------------------------------------------------------------------------- measurement


def measure(provider: Provider, case: Case, warmup: int = 1, repeats: int = 5) -> dict:
    """Warm up, measure peak memory of one call, then time ``repeats`` calls (this process).

    Returns ``{"median_ms", "p20_ms", "p80_ms", "peak_mb", "times_ms", "mem_method",
    "device", "torch"}``; raises :class:`Unavailable` if the provider cannot run.
    """
    import torch

    torch.manual_seed(0)
    fn = provider.setup(case)
    cuda = case.device.startswith("cuda")
    dev = torch.device(case.device)
    if not cuda and not _reset_hwm():  # no resettable high-water mark: measure first
        peak_mb, method = _peak_cpu_mb(fn)
        for _ in range(max(0, warmup - 1)):
            fn()
    else:
        for _ in range(max(1, warmup)):
            fn()
        peak_mb, method = _peak_cuda_mb(fn, dev) if cuda else _peak_cpu_mb(fn)
    n = max(1, repeats)
    times = _time_cuda(fn, dev, n) if cuda else _time_cpu(fn, n)
    del fn
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the next in-process measurement starts unfragmented
    med, p20, p80 = summarize(times)
    return {
        "median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mb": peak_mb,
        "times_ms": times, "mem_method": method, "device": device_name(case.device),
        "torch": torch.__version__, **({} if cuda else cpu_kernel_isa()),
    }  # fmt: skip


def _worker(bench: Benchmark, spec_json: str) -> int:
    spec = json.loads(spec_json)
    case = Case(**spec["case"])
    provider = bench.provider(spec["provider"])
    try:
        result = measure(provider, case, spec["warmup"], spec["repeats"])
    except Unavailable as exc:
        result = {"skip": str(exc)}
    print(_MARKER + json.dumps(result), flush=True)
    return 0


def _run_fresh(bench: Benchmark, provider: Provider, case: Case, args) -> dict:
    """Run one measurement in a fresh interpreter; returns the worker's dict or {"error": ...}."""
    spec = {"provider": provider.name, "case": asdict(case), "warmup": args.warmup,
            "repeats": args.repeats}  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", bench.module, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    return {"error": f"worker exited with {proc.returncode}:\n{tail}"}


# ----------------------------------------------------------------------------- CSV


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot take result rows (None when it can): a symlink (not followed), a
    directory, or an existing file that is not a results CSV of these benchmarks (its header
    lacks :data:`COLUMNS`) — a user's file is never rewritten."""
    path = Path(path)
    if path.is_symlink():
        return "is a symlink (not followed: pass the file itself)"
    if path.is_dir():
        return "is a directory"
    if path.exists():
        try:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            return f"cannot be read as a CSV ({e})"
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            return (
                "exists and is not a results CSV of these benchmarks (its header lacks "
                f"{', '.join(missing)}): it is left alone; pass another --csv"
            )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"cannot be created ({parent} is not a writable directory)"
    return None


def write_rows(path: str | Path, rows: Iterable[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (created with its header if missing).

    Columns are :data:`COLUMNS` then the extra keys in first-seen order; a new extra column
    rewrites the file with the widened header (earlier rows get an empty cell), through a
    temporary file renamed over it. A path :func:`csv_problem` objects to raises ValueError.
    """
    path = Path(path)
    if problem := csv_problem(path):
        raise ValueError(f"{path}: {problem}")
    rows = list(rows)
    old = read_rows(path)
    header = list(COLUMNS)
    old_header = list(old[0].keys()) if old else []
    for key in [*old_header, *(k for r in rows for k in r)]:
        if key not in header:
            header.append(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if old and header == old_header:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, restval="").writerows(rows)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            writer.writeheader()
            writer.writerows([*old, *rows])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _positive(kind):
    """argparse type: a ``kind`` (int / float) > 0."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not v > 0 or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    return parse


def latest(rows: Iterable[dict]) -> list[dict]:
    """The last row for each (op, provider, mode, shape, device), in first-seen order."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        key = (r.get("op"), r["provider"], r["mode"], r["shape"], r.get("device"))
        keep.pop(key, None)  # re-insert so a rerun's order wins
        keep[key] = r
    return list(keep.values())


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def ratio_table(
    rows: Iterable[dict], baseline: str, metric: str = "median_ms", device: str | None = None
) -> str:
    """Markdown table: ``metric(provider) / metric(baseline)`` for each (shape, mode).

    Uses :func:`latest` rows of one device (``device`` is a substring to match; default: the
    device of the last row). Columns: shape, mode, the baseline's absolute value, then one
    ratio column per other provider (``—`` where either side is missing or zero).
    """
    rows = latest(rows)
    if device is None and rows:
        device = rows[-1].get("device", "")
    rows = [r for r in rows if device is None or device in (r.get("device") or "")]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != baseline]
    points = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows))
    val = {(r["provider"], r["shape"], r["mode"]): _num(r.get(metric)) for r in rows}
    unit = {"ms": "ms", "mb": "MB"}.get(metric.rsplit("_", 1)[-1], metric)
    head = ["shape", "mode", f"{baseline} ({unit})", *(f"{p} / {baseline}" for p in providers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, mode in points:
        b = val.get((baseline, shape, mode), math.nan)
        cells = [shape, mode, "—" if math.isnan(b) else f"{b:.1f}"]
        for p in providers:
            v = val.get((p, shape, mode), math.nan)
            ok = not (math.isnan(v) or math.isnan(b) or b == 0)
            cells.append("—" if not ok else f"{v / b:.2f}×" if v / b >= 0.1 else f"{v / b:.3f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Benchmark


@dataclass
class Benchmark:
    """A benchmark script: providers × cases, run via :meth:`main` (see module docstring)."""

    op: str
    module: str
    providers: list[Provider]
    cases: Callable[[argparse.Namespace], list[Case]]
    flops: Callable[[Case], float | None] | None = None
    baseline: str | None = None
    description: str = ""
    extra_args: Callable[[argparse.ArgumentParser], None] | None = field(default=None)
    # ``plot(csv_path) -> [png paths]`` (``benchmarks.plot.plot_csv``): enables ``--plot``.
    plot: Callable[[Path], list[Path]] | None = None

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"unknown provider {name!r}; known: {[p.name for p in self.providers]}")

    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(prog=f"python -m {self.module}", description=self.description)
        ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        ap.add_argument(
            "--repeats", type=_positive(int), default=5, help="timed calls per measurement (>= 1)"
        )
        ap.add_argument("--warmup", type=_positive(int), default=1,
                        help="untimed calls first (>= 1)")  # fmt: skip
        ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
        ap.add_argument("--csv", default=None, help=f"output (default results/{self.op}.csv)")
        ap.add_argument("--providers", default=None, help="comma-separated subset")
        ap.add_argument("--modes", default=None, help="comma-separated subset")
        ap.add_argument(
            "--shapes",
            default=None,
            help='comma-separated subset of labels, e.g. "N=4096 H=2048 V=32000"',
        )
        ap.add_argument("--inprocess", action="store_true",
                        help="measure in this process instead of a fresh one per point "
                        "(fast; memory is less isolated)")  # fmt: skip
        ap.add_argument("--timeout", type=_positive(float), default=3600.0,
                        help="seconds per worker (> 0)")  # fmt: skip
        ap.add_argument("--emulate-avx2", action="store_true",
                        help="cap the rag_kernels kernels, MKL, ATen and oneDNN at AVX2 "
                        f"({' '.join(f'{k}={v}' for k, v in EMULATE_AVX2.items())})")  # fmt: skip
        if self.plot is not None:
            ap.add_argument("--plot", action="store_true", help="write <csv>.png afterwards")
        ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
        if self.extra_args is not None:
            self.extra_args(ap)
        return ap

    def main(self, argv: Sequence[str] | None = None) -> int:
        args = self.parser().parse_args(argv)
        if args.worker is not None:
            return _worker(self, args.worker)
        if args.emulate_avx2:
            if args.device != "cpu":
                print("--emulate-avx2 applies to --device cpu only", file=sys.stderr)
                return 2
            if args.inprocess and "torch" in sys.modules:
                print("--emulate-avx2 --inprocess: torch is already imported here, so the ISA "
                      "caps would not apply; run without --inprocess", file=sys.stderr)  # fmt: skip
                return 2
            os.environ.update(EMULATE_AVX2)  # read by MKL / ATen / oneDNN at first use
        return self.run(args)

    def run(self, args: argparse.Namespace) -> int:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("--device cuda: no CUDA device available", file=sys.stderr)
                return 2
        csv_path = Path(args.csv) if args.csv else RESULTS_DIR / f"{self.op}.csv"
        if problem := csv_problem(csv_path):
            print(f"--csv {csv_path}: {problem}", file=sys.stderr)
            return 2
        providers = self.providers
        if args.providers:
            wanted = [s.strip() for s in args.providers.split(",") if s.strip()]
            unknown = [w for w in wanted if w not in {p.name for p in providers}]
            if unknown:
                print(f"--providers: unknown {unknown}; known: {[p.name for p in providers]}",
                      file=sys.stderr)  # fmt: skip
                return 2
            providers = [p for p in providers if p.name in wanted]
        cases = every_case = self.cases(args)
        for flag, value, key in (
            ("--modes", args.modes, lambda c: c.mode),
            ("--shapes", args.shapes, lambda c: c.label),
        ):
            if not value:
                continue
            wanted = {" ".join(s.split()) for s in value.split(",") if s.strip()}
            known = {key(c) for c in every_case}
            if unknown := sorted(wanted - known):
                print(f"{flag}: unknown {unknown}; known: {sorted(known)}", file=sys.stderr)
                return 2
            cases = [c for c in cases if key(c) in wanted]
        commit = git_commit()
        written: list[dict] = []
        failed = 0
        print(f"# {self.op}: {len(cases)} cases x {len(providers)} providers -> {csv_path}")
        for base_case in cases:
            for p in providers:
                case = p.case_for(base_case)
                tag = f"{p.name:<16} {case.mode:<16} {case.label} {case.dtype}"
                reason = p.skip_reason(case)
                if reason is None:
                    if args.inprocess:
                        try:
                            res = measure(p, case, args.warmup, args.repeats)
                        except Unavailable as exc:
                            res = {"skip": str(exc)}
                        except Exception as exc:  # report, and go on with the next point
                            res = {"error": f"{type(exc).__name__}: {exc}"}
                    else:
                        res = _run_fresh(self, p, case, args)
                    reason = res.get("skip")
                if reason is not None:
                    print(f"skip {tag}: {reason}", flush=True)
                    continue
                if "error" in res:
                    print(f"FAIL {tag}: {res['error']}", flush=True)
                    failed += 1
                    continue
                row = {
                    "op": self.op, "provider": p.name, "mode": case.mode, "shape": case.label,
                    "median_ms": f"{res['median_ms']:.3f}", "p20_ms": f"{res['p20_ms']:.3f}",
                    "p80_ms": f"{res['p80_ms']:.3f}", "peak_mb": f"{res['peak_mb']:.1f}",
                    "device": res["device"], "commit": commit, "date": _utc_now(),
                    "dtype": case.dtype, "repeats": len(res["times_ms"]),
                }  # fmt: skip
                fl = self.flops(case) if self.flops else None
                row["tflops"] = f"{fl / (res['median_ms'] * 1e-3) / 1e12:.4f}" if fl else ""
                row["torch"] = res["torch"]
                row["mem_method"] = res["mem_method"]
                for key in ("cpu_isa", "bf16_gemm"):
                    if key in res:
                        row[key] = res[key]
                write_rows(csv_path, [row])
                written.append(row)
                print(
                    f"ok   {tag}: median {res['median_ms']:.1f} ms "
                    f"[p20 {res['p20_ms']:.1f}, p80 {res['p80_ms']:.1f}] "
                    f"peak +{res['peak_mb']:.1f} MB",
                    flush=True,
                )
        base = self.baseline or (providers[0].name if providers else None)
        if written and base is not None:
            for metric in ("median_ms", "peak_mb"):
                print(f"\n{metric} relative to {base}:\n" + ratio_table(written, base, metric))
        if getattr(args, "plot", False) and written and self.plot is not None:
            print(f"\nplot: {self.plot(csv_path)}")
        if failed:
            print(f"\n{failed} point(s) failed (FAIL lines above)", file=sys.stderr)
            return 1
        return 0


# ----------------------------------------------------------------------------- CLI


def _cli(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratios", help="print markdown ratio tables from a results CSV")
    r.add_argument("csv")
    r.add_argument("--baseline", required=True)
    r.add_argument("--metric", action="append", default=None,
                   help="median_ms (default) and/or peak_mb; repeatable")  # fmt: skip
    r.add_argument("--device", default=None, help="substring of the device column")
    r.add_argument("--op", default=None, help="only rows of this op")
    args = ap.parse_args(argv)
    if not Path(args.csv).is_file():
        ap.error(f"{args.csv}: no such results CSV")
    rows = read_rows(args.csv)
    if args.op:
        rows = [x for x in rows if x.get("op") == args.op]
    metrics = args.metric or ["median_ms", "peak_mb"]
    bad = [m for m in metrics if m not in ("median_ms", "peak_mb", "p20_ms", "p80_ms")]
    if bad:
        ap.error(f"--metric: unknown {bad}; choose median_ms, peak_mb, p20_ms or p80_ms")
    providers = sorted({x.get("provider", "") for x in rows})
    if args.baseline not in providers:
        ap.error(f"--baseline {args.baseline}: no rows of that provider; the CSV has {providers}")
    for metric in metrics:
        print(f"{metric} relative to {args.baseline}:\n")
        print(ratio_table(rows, args.baseline, metric, args.device) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
