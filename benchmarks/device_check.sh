#!/usr/bin/env bash
# One-shot GPU check for rag_kernels: one NVIDIA GPU (H100 / H200 class), no network access.
# Nothing is downloaded: it uses the torch / triton already installed on the machine (plus any
# wheels in $WHEELS_DIR), runs the GPU tests and the CUDA benchmarks, and leaves a log and
# CSVs in $OUT.
#
#   OUT=/some/dir bash benchmarks/device_check.sh
#
# Steps (each under `timeout`, all under one deadline, BUDGET_S, default 285 s):
#   1. environment (nvidia-smi, torch / triton / CUDA versions)
#   2. pip install --no-deps --no-build-isolation -e . (C++ CPU extension skipped here: it is
#      not used on the GPU path; step 7 builds it if time is left), plus any wheels found in
#      $WHEELS_DIR (default shared/wheels; e.g. cut_cross_entropy for the CCE comparison)
#   3. bf16 matmul peak: torch.mm 8192^3, median of 50 -> $OUT/matmul_peak.csv
#   4. pytest -m gpu tests/test_gpu.py (RAG_KERNELS_AUTOTUNE=0: one config, quick compiles)
#   5. benchmarks: `python -m benchmarks.linear_logprob --device cuda --inprocess` if that
#      module exists, else (or if it fails) a minimal in-script timing of triton / naive /
#      Cut Cross-Entropy (when importable) -> $OUT/linear_logprob*.csv. CUDA times flush L2
#      (a 256 MB buffer zeroed) before every timed call, as triton.testing.do_bench does
#   5b. if time is left: benchmarks.rag_loss and benchmarks.contrastive on CUDA
#   6. summary: TFLOP/s counting 8NHV for fwd+bwd (2NHV fwd) as % of the measured peak
#   7. if time is left: build the C++ extension against this torch (compile check only)
# Everything printed goes to $OUT/device_check.log as well. Exit status: 0 when the GPU tests
# passed, else the pytest status (the log has the details).
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
cd "$(dirname "$0")/.." || exit 1
exec > >(tee -a "$LOG") 2>&1

BUDGET_S=${BUDGET_S:-285}
DEADLINE=$(($(date +%s) + BUDGET_S))
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python}

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME MAX_SECONDS CMD...: run CMD under min(MAX_SECONDS, time left - 5); skip if < 10 s.
step() {
    local name=$1 max=$2 t rc start
    shift 2
    t=$(($(left) - 5))
    ((t > max)) && t=$max
    if ((t < 10)); then
        echo "=== SKIP $name: only $(left) s left"
        return 125
    fi
    echo "=== $name (timeout ${t}s, $(left)s left) $(date -u +%H:%M:%S)"
    start=$(date +%s)
    timeout -k 5 "$t" "$@"
    rc=$?
    echo "=== $name rc=$rc in $(($(date +%s) - start))s"
    return $rc
}

step env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name(0))'"

if ! RAG_KERNELS_SKIP_CPP=1 step install 90 $PY -m pip install -q --no-deps --no-build-isolation -e .; then
    echo "install failed: using PYTHONPATH=$PWD"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# Optional offline extras (e.g. the pure-Python cut_cross_entropy wheel for the CCE comparison):
# any *.whl under $WHEELS_DIR (default shared/wheels) is installed without dependencies.
WHEELS_DIR=${WHEELS_DIR:-shared/wheels}
if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    step extra_wheels 60 $PY -m pip install -q --no-deps --no-index "$WHEELS_DIR"/*.whl
fi

step matmul_peak 40 $PY - "$OUT/matmul_peak.csv" <<'EOF'
import sys, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(10):
    torch.mm(a, b)
times = []
for _ in range(50):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); torch.mm(a, b); e.record(); torch.cuda.synchronize()
    times.append(s.elapsed_time(e))
times.sort()
ms = times[len(times) // 2]
tf = 2 * n**3 / (ms * 1e-3) / 1e12
print(f"bf16 torch.mm {n}^3: median {ms:.3f} ms -> {tf:.1f} TFLOP/s (best {2*n**3/(times[0]*1e-3)/1e12:.1f})")
with open(sys.argv[1], "w") as f:
    f.write("op,n,median_ms,tflops,device\n")
    f.write(f"bf16_mm,{n},{ms:.4f},{tf:.2f},{torch.cuda.get_device_name(0)}\n")
EOF

RAG_KERNELS_AUTOTUNE=0 step pytest_gpu 110 $PY -m pytest -m gpu tests/test_gpu.py -q -rs -s \
    --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider
PYTEST_RC=$?

BENCH_OK=0
if [ -f benchmarks/linear_logprob.py ]; then
    # The target shape (N=16384 tokens, H=4096, V=128256: a Llama-3-8B-sized LM head) plus
    # one mid-size shape; BENCH_ARGS overrides the selection.
    # shellcheck disable=SC2086
    TRITON_PRINT_AUTOTUNING=1 step bench_module 150 $PY -m benchmarks.linear_logprob --device cuda --inprocess \
        --csv "$OUT/linear_logprob.csv" --repeats 5 --warmup 1 \
        ${BENCH_ARGS:---providers rk_fused,cce,naive --shapes "N=16384 H=4096 V=128256,N=4096 H=2048 V=32000"} \
        && BENCH_OK=1
fi
if [ "$BENCH_OK" != 1 ]; then
    # Minimal timing, same long-format columns as benchmarks/harness.py.
    TRITON_PRINT_AUTOTUNING=1 step bench_fallback 150 $PY - "$OUT/linear_logprob_fallback.csv" <<'EOF'
import csv, datetime, subprocess, sys
import torch
import torch.nn.functional as F
import rag_kernels as rk

rk.set_value_checks(False)
dev = torch.cuda.get_device_name(0)
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
except Exception:
    commit = "unknown"
try:
    from cut_cross_entropy import linear_cross_entropy as cce
except Exception as exc:
    cce = None
    print("cut_cross_entropy not importable:", exc)

def providers():
    yield "triton", lambda h, w, y: rk.linear_logprob(h, w, y, impl="triton")
    yield "naive", lambda h, w, y: -F.cross_entropy((h @ w.T).float(), y, reduction="none")
    if cce is not None:
        yield "cce", lambda h, w, y: -cce(h, w, y, reduction="none", impl="cce")

rows = []
shapes = [(16384, 4096, 131072), (4096, 2048, 32768)]
for N, H, V in shapes:
    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w0 = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) / H**0.5
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    up = torch.rand(N, device="cuda", generator=g)
    for name, fn in providers():
        for mode in ("fwd", "fwd+bwd"):
            h = h0.clone().requires_grad_(mode != "fwd")
            w = w0.clone().requires_grad_(mode != "fwd")
            def call():
                lp = fn(h, w, y)
                if mode != "fwd":
                    (lp.float() * up).sum().backward()
                    h.grad = w.grad = None
                return lp
            try:
                call(); torch.cuda.synchronize()  # compile / autotune
                base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
                out = call(); torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                del out
                times = []
                flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > L2
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize(); flush.zero_()  # cold L2, as triton's do_bench
                    s.record(); call(); e.record(); torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                del flush
            except Exception as exc:
                print(f"{name} {mode} N={N} H={H} V={V}: FAILED {type(exc).__name__}: {exc}")
                torch.cuda.empty_cache()
                continue
            times.sort()
            q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]
            flops = (2 if mode == "fwd" else 8) * N * H * V
            ms = q(0.5)
            row = dict(op="linear_logprob", provider=name, mode=mode, shape=f"N={N} H={H} V={V}",
                       median_ms=f"{ms:.3f}", p20_ms=f"{q(0.2):.3f}", p80_ms=f"{q(0.8):.3f}",
                       peak_mb=f"{peak:.1f}", device=dev, commit=commit,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       dtype="bfloat16", repeats=len(times), tflops=f"{flops / (ms * 1e-3) / 1e12:.1f}",
                       torch=torch.__version__)
            print(row)
            rows.append(row)
            with open(sys.argv[1], "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader(); wr.writerows(rows)
            torch.cuda.empty_cache()
EOF
fi

# RAG loss (B=8, K=8, T=256, H=4096, V=128256 bf16) and contrastive loss on the GPU, when time
# is left (default shapes of benchmarks/rag_loss.py and benchmarks/contrastive.py).
step bench_rag_loss 60 $PY -m benchmarks.rag_loss --device cuda --inprocess --csv "$OUT/rag_loss.csv" \
    --repeats 3 --warmup 1
step bench_contrastive 45 $PY -m benchmarks.contrastive --device cuda --inprocess --csv "$OUT/contrastive.csv" \
    --repeats 3 --warmup 1

step summary 20 $PY - "$OUT" <<'EOF'
import csv, glob, os, sys
out = sys.argv[1]
peak = None
try:
    with open(os.path.join(out, "matmul_peak.csv")) as f:
        peak = float(next(csv.DictReader(f))["tflops"])
except Exception as exc:
    print("no matmul peak:", exc)
print(f"measured bf16 matmul peak: {peak} TFLOP/s")
for path in sorted(glob.glob(os.path.join(out, "linear_logprob*.csv"))):
    print(f"--- {os.path.basename(path)}")
    by = {}
    for r in csv.DictReader(open(path)):
        by[(r.get("shape"), r.get("mode"), r.get("provider"))] = r
    for (shape, mode, prov), r in sorted(by.items()):
        tf = r.get("tflops") or ""
        pct = f"{100 * float(tf) / peak:.0f}% of peak" if tf and peak else ""
        base = by.get((shape, mode, "cce"))
        vs = f", {float(r['median_ms']) / float(base['median_ms']):.2f}x cce" if base and prov != "cce" else ""
        print(f"{shape:28s} {mode:8s} {prov:10s} {r['median_ms']:>9s} ms {r.get('peak_mb',''):>9s} MB {tf:>7s} TF/s {pct}{vs}")
EOF

step cpp_build_check 120 $PY -m pip install -q --no-deps --no-build-isolation -e .

echo "=== done: pytest_gpu rc=$PYTEST_RC, $(left)s of the ${BUDGET_S}s budget left; files in $OUT"
ls -la "$OUT"
exit $PYTEST_RC
