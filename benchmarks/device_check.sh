#!/usr/bin/env bash
# One-shot GPU check of rag_kernels on one NVIDIA GPU (H100 / H200 class) without network:
# GPU correctness first, then the CUDA benchmarks against the GPU targets of issue 11, then
# one summary table. Everything fits one run of about 8 minutes (BUDGET_S).
#
#   OUT=/some/dir bash benchmarks/device_check.sh              # the whole check (needs CUDA)
#   bash benchmarks/device_check.sh --dry-run                  # no GPU needed: the plan, the
#       wheel install as `pip --dry-run`, pytest --collect-only of the GPU tests, the summary
#   OUT=/some/dir bash benchmarks/device_check.sh --steps tests,summary    # some steps only
#
# Needs ${PYTHON:-python3} with torch, triton and transformers (the benchmarks' HF row), and
# pytest for the GPU tests (pytest-xdist, when installed, runs them in RK_TEST_WORKERS=6
# processes). Nothing of this repository is installed: it goes on PYTHONPATH (the C++
# extension is not used on CUDA). Without pytest the tests step says so loudly and fails:
# the check never reports success without its correctness tests having run.
#
# Optional wheels: every *.whl in WHEELS_DIR (default shared/wheels; the device tool copies a
# checkout's shared/ folder, which .gitignore keeps out of git) is installed with
# `pip install --no-deps --no-index --target` into a scratch folder put on PYTHONPATH (the
# machine reaches no package index): cut_cross_entropy and liger_kernel for the Cut
# Cross-Entropy and Liger rows (skipped with a message when absent), pytest and its
# dependencies if the machine lacks them (pytest, pluggy, iniconfig, packaging, pygments;
# pytest-xdist and execnet for parallel tests).
#
# Steps, in this order, each under `timeout`, all under one deadline (BUDGET_S, default 470 s;
# RESERVE_S=15 s are kept for the summary; a step that would get under 10 s is skipped and
# the log says so):
#   wheels   the optional wheels (above)
#   env      python / torch / triton / transformers / pytest versions, GPU, nvidia-smi -> env.txt
#   peak     measured bf16 matmul peak: torch.mm 8192^3 on random data, median of 30
#   tests    pytest -v -m gpu tests/test_gpu.py (GPU_TEST_ARGS), autotuning ON
#            (RAG_KERNELS_AUTOTUNE=1: the configs the benchmarks use are the ones checked, and
#            one test forces every config in turn); per-test limit RK_TEST_TIMEOUT (default
#            90 s; tests/conftest.py: soft SIGALRM, then a hard faulthandler exit, after which
#            the tests not yet run are rerun); at most TESTS_S (default 200 s)
#   lp_*     linear_logprob N=16384 H=4096 V=128256 bf16, fwd and fwd+bwd: rk_fused (the default,
#            deterministic backward), cce, naive, rk_fused_atomic (LP_ALT_PROVIDER: the atomic
#            backward), liger, cce_exact (CCE without gradient filtering)
#   rag_*    rag_loss B=8 K=8 T=256 H=4096 V=128256 bf16: rk_fused, hf_get_nll,
#            cce_marginalize ("CCE reduction='none' + torch marginalisation", epsilon 0)
#   con_*    contrastive B=M=65536 D=768 bf16: rk_fused, naive
#   summary  the table (targets, PASS / FAIL / UNMEASURED) -> summary.md and the end of stdout
# The benchmark steps run one process per provider (benchmarks/harness.py --inprocess: peak
# memory from the CUDA allocator's statistics, one Triton autotuning per process), most
# important first; each appends its rows to bench.csv as it finishes. Shapes: LP_SHAPE,
# RAG_SHAPE, CON_SHAPE; BENCH_DEVICE=cpu BENCH_QUICK=1 runs the same steps on CPU at the
# scripts' --quick shapes (a smoke test of this script, tests/test_device_check.py).
#
# $OUT (default: a new temporary folder) receives six files (the device tool returns at most
# eight): device_check.log (everything printed), env.txt, gpu_tests.log (one line per test
# start / outcome, written as each test ends: it survives a killed run), gpu_tests.xml
# (junit, all attempts merged, killed and not-run tests included), bench.csv (long format,
# benchmarks/harness.py columns), summary.md.
#
# Exit status: 0 when the GPU tests ran and none failed, errored, was killed or was left
# unrun (the benchmark targets are reported, not part of the status); 1 otherwise; 2 for bad
# arguments (an unknown --steps name, a --steps without names, a budget that is not a whole
# number of seconds). A --steps selection without `tests`: 0. --dry-run: 0 when the wheel
# install and the test collection went through.
set -u

usage() { sed -n '2,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

MODE=run
STEPS=${STEPS:-}
while (($#)); do
    case $1 in
        --dry-run) MODE=dry ;;
        --steps)
            if (($# < 2)) || [[ -z $2 || $2 == -* ]]; then
                echo "device_check.sh: --steps needs a comma-separated list of steps" >&2
                exit 2
            fi
            STEPS=$2; shift ;;
        --steps=*) STEPS=${1#--steps=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

KNOWN_STEPS="wheels env peak tests lp_rk lp_cce rag_rk rag_hf rag_cce con_rk con_naive lp_naive"
KNOWN_STEPS+=" lp_rk_alt lp_liger lp_cce_exact summary"
if [[ -n $STEPS ]]; then
    IFS=, read -ra _wanted <<<"$STEPS"
    for _s in "${_wanted[@]}"; do
        if [[ " $KNOWN_STEPS " != *" $_s "* ]]; then
            echo "device_check.sh: --steps: unknown step '$_s'; known: ${KNOWN_STEPS// /,}" >&2
            exit 2
        fi
    done
fi
for _v in BUDGET_S RESERVE_S TESTS_S REPEATS RK_TEST_TIMEOUT; do
    if [[ -n ${!_v:-} && ! ${!_v} =~ ^[0-9]+$ ]]; then
        echo "device_check.sh: $_v must be a whole number, got '${!_v}'" >&2
        exit 2
    fi
done

cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t rk_device_check.XXXXXX)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2

# Everything below runs in main, its output through tee into $OUT/device_check.log (a
# pipeline, so the script ends only after tee has written the last line).
main() {
if [[ -z ${SCRATCH:-} ]]; then
    SCRATCH=$(mktemp -d -t rk_device_scratch.XXXXXX) || exit 2
    trap 'rm -rf "$SCRATCH"' EXIT
fi
mkdir -p "$SCRATCH"

BUDGET_S=${BUDGET_S:-470}
RESERVE_S=${RESERVE_S:-15}
TESTS_S=${TESTS_S:-200}
START_S=$(date +%s)
DEADLINE=$((START_S + BUDGET_S))
WHEELS_DIR=${WHEELS_DIR:-shared/wheels}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
BENCH_QUICK=${BENCH_QUICK:-0}
REPEATS=${REPEATS:-5}
if [[ $BENCH_QUICK == 1 ]]; then  # the scripts' --quick shapes, as tests/test_device_check.py
    LP_SHAPE=${LP_SHAPE:-N=67 H=33 V=517}
    RAG_SHAPE=${RAG_SHAPE:-B=2 K=3 T=9 H=17 V=101}
    CON_SHAPE=${CON_SHAPE:-B=129 M=129 D=384}
fi
LP_SHAPE=${LP_SHAPE:-N=16384 H=4096 V=128256}
RAG_SHAPE=${RAG_SHAPE:-B=8 K=8 T=256 H=4096 V=128256}
CON_SHAPE=${CON_SHAPE:-B=65536 M=65536 D=768}
LP_ALT_PROVIDER=${LP_ALT_PROVIDER:-rk_fused_atomic}
CSV=$OUT/bench.csv
export OUT SCRATCH MODE WHEELS_DIR PY LP_SHAPE RAG_SHAPE CON_SHAPE LP_ALT_PROVIDER CSV
export PYTHONPATH="$REPO:$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 RAG_KERNELS_AUTOTUNE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset RAG_KERNELS_TRITON_BACKWARD  # rk_fused rows: the default backward
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export RK_TEST_TIMEOUT=${RK_TEST_TIMEOUT:-90} RK_TEST_WORKERS=${RK_TEST_WORKERS:-6}
export GPU_TEST_ARGS=${GPU_TEST_ARGS:--m gpu tests/test_gpu.py}

left() { echo $((DEADLINE - $(date +%s))); }
want() { [[ -z $STEPS || ",$STEPS," == *",$1,"* ]]; }
STEP_LOG=""
note_step() { STEP_LOG+="$1=$2;"; }

# step NAME CAP CMD...: CMD under `timeout min(CAP, time left - RESERVE_S)`; skipped when
# that is under 10 s. --dry-run runs only the steps that need no GPU (DRY_OK) and prints
# the others' commands.
DRY_OK=" wheels env tests summary "
step() {
    local name=$1 cap=$2 t rc start
    shift 2
    want "$name" || return 0
    t=$(($(left) - RESERVE_S))
    ((t > cap)) && t=$cap
    if [[ $MODE == dry && $DRY_OK != *" $name "* ]]; then
        echo "=== $name (dry run: not run; timeout ${cap}s): $*"
        note_step "$name" dry
        return 0
    fi
    if ((t < 10)); then
        echo "=== SKIP $name: $(left) s left of the ${BUDGET_S} s budget, too little to start it"
        note_step "$name" "skipped(time)"
        return 125
    fi
    echo "=== $name: timeout ${t}s, $(left)s left, $(date -u +%H:%M:%S) UTC"
    start=$(date +%s)
    timeout -k 5 "$t" "$@"
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "=== $name TIMED OUT after ${t}s (the rows and log lines it wrote are kept)"
        note_step "$name" timeout
    else
        note_step "$name" "$rc"
    fi
    echo "=== $name rc=$rc in $(($(date +%s) - start))s"
    return $rc
}

# shellcheck disable=SC2317  # run through `bash -c install_wheels` (under timeout)
install_wheels() {
    local whls=() dry=()
    shopt -s nullglob
    whls=("$WHEELS_DIR"/*.whl)
    shopt -u nullglob
    if ((${#whls[@]} == 0)); then
        echo "no wheels in $WHEELS_DIR: the Cut Cross-Entropy and Liger rows will be skipped" \
            "(put their wheels there, or set WHEELS_DIR)"
        return 0
    fi
    [[ $MODE == dry ]] && dry=(--dry-run)
    echo "installing ${#whls[@]} wheels from $WHEELS_DIR into $SCRATCH/site (--no-deps --no-index)"
    "$PY" -m pip install --no-deps --no-index --no-compile --no-cache-dir \
        --disable-pip-version-check "${dry[@]}" --target "$SCRATCH/site" "${whls[@]}" || return
    # The dry run still collects the GPU tests: a python without pytest gets the test runner's
    # wheels (only those) for real, in the scratch folder (removed at exit).
    if [[ $MODE == dry ]] && ! "$PY" -c "import pytest" 2>/dev/null; then
        local runner=() w
        for w in "${whls[@]}"; do
            case ${w##*/} in
                pytest-* | pytest_xdist-* | pluggy-* | iniconfig-* | packaging-* | execnet-* | \
                    [Pp]ygments-*) runner+=("$w") ;;
            esac
        done
        ((${#runner[@]} == 0)) && return 0
        echo "dry run: installing the ${#runner[@]} test-runner wheels for the test collection"
        "$PY" -m pip install --no-deps --no-index --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$SCRATCH/site" "${runner[@]}"
    fi
}
export -f install_wheels

# bench NAME CAP MODULE SHAPE PROVIDER [ARGS...]: one provider of one benchmark script.
bench() {
    local name=$1 cap=$2 module=$3 shape=$4 provider=$5 quick=()
    shift 5
    [[ $BENCH_QUICK == 1 ]] && quick=(--quick)
    TRITON_PRINT_AUTOTUNING=1 step "$name" "$cap" "$PY" -m "$module" --device "$BENCH_DEVICE" \
        --inprocess --csv "$CSV" --repeats "$REPEATS" --warmup 1 --providers "$provider" \
        --shapes "$shape" "${quick[@]}" "$@"
}

echo "=== rag_kernels device check: $(date -u +%Y-%m-%dT%H:%M:%SZ), mode=$MODE, budget ${BUDGET_S}s," \
    "python=$PY, OUT=$OUT${STEPS:+, steps=$STEPS}"

step wheels 40 bash -c install_wheels

step env 30 "$PY" - "$OUT/env.txt" <<'PY'
"""Versions, the GPU and its clocks -> env.txt (also printed)."""
import importlib
import importlib.metadata
import os
import subprocess
import sys

lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
for mod, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                  ("pytest", "pytest"), ("xdist", "pytest-xdist"),
                  ("cut_cross_entropy", "cut-cross-entropy"), ("liger_kernel", "liger-kernel")):
    try:
        m = importlib.import_module(mod)
        version = getattr(m, "__version__", None)
        if version is None:  # liger_kernel has none
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = "?"
        lines.append(f"{mod} {version}")
    except Exception as exc:
        lines.append(f"{mod} MISSING ({type(exc).__name__}: {str(exc)[:120]})")
try:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"gpu {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}")
    else:
        lines.append("gpu NONE (torch.cuda.is_available() is False)")
except Exception as exc:
    lines.append(f"gpu unknown (torch: {type(exc).__name__}: {exc})")
try:
    q = "name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=15)
    lines.append(f"nvidia-smi ({q}): {smi.stdout.strip() or smi.stderr.strip()}")
except Exception as exc:
    lines.append(f"nvidia-smi: {type(exc).__name__}: {exc}")
try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    lines.append(f"commit {rev or 'unknown'}{'-dirty' if dirty else ''}")
except Exception:
    lines.append("commit unknown")
lines.append(f"PYTHONPATH {os.environ.get('PYTHONPATH', '')}")
text = "\n".join(lines) + "\n"
print(text, end="")
with open(sys.argv[1], "w") as f:
    f.write(text)
PY

step peak 30 "$PY" - <<'PY'
"""Measured bf16 matmul peak (the yardstick of the 60 % target): torch.mm 8192^3 on random
data, 10 warm-ups, median of 30 timed calls (CUDA events) -> one bench.csv row."""
import os
from datetime import datetime, timezone

import torch

from benchmarks.harness import device_name, git_commit, summarize, write_rows

n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(10):
    torch.mm(a, b)
times = []
for _ in range(30):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.mm(a, b)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
med, p20, p80 = summarize(times)
tflops = 2 * n**3 / (med * 1e-3) / 1e12
print(f"bf16 torch.mm {n}^3: median {med:.3f} ms -> {tflops:.1f} TFLOP/s "
      f"(best {2 * n**3 / (min(times) * 1e-3) / 1e12:.1f})")
write_rows(os.environ["CSV"], [{
    "op": "matmul_peak", "provider": "torch_mm", "mode": "fwd", "shape": f"M={n} N={n} K={n}",
    "median_ms": f"{med:.4f}", "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}", "peak_mb": "",
    "device": device_name("cuda"), "commit": git_commit(),
    "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "dtype": "bfloat16",
    "repeats": len(times), "tflops": f"{tflops:.2f}", "torch": torch.__version__,
}])
PY

TESTS_DEADLINE=$(($(date +%s) + TESTS_S))
((TESTS_DEADLINE > DEADLINE - RESERVE_S)) && TESTS_DEADLINE=$((DEADLINE - RESERVE_S))
export TESTS_DEADLINE
TESTS_RC=
step tests "$TESTS_S" "$PY" - <<'PY'
"""GPU tests: collect, run (pytest-xdist when installed), rerun what a dead process left,
merge the junit files, count the outcomes from the progress log (tests/conftest.py)."""
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

out, scratch = os.environ["OUT"], os.environ["SCRATCH"]
deadline = float(os.environ["TESTS_DEADLINE"])
dry = os.environ.get("MODE") == "dry"
args = shlex.split(os.environ["GPU_TEST_ARGS"])
workers = int(os.environ.get("RK_TEST_WORKERS", "1"))
log, xml_out = os.path.join(out, "gpu_tests.log"), os.path.join(out, "gpu_tests.xml")
py = sys.executable
base = [py, "-m", "pytest", "-p", "no:cacheprovider", *args]


def say(*a):
    print("[tests]", *a, flush=True)


def progress(line):
    with open(log, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def write_junit(suites, extra):
    root = ET.Element("testsuites")
    for s in suites:
        root.append(s)
    if extra:
        s = ET.SubElement(root, "testsuite", name="device_check", tests=str(len(extra)))
        for nodeid, kind, msg in extra:
            path, _, name = nodeid.partition("::")
            case = ET.SubElement(s, "testcase", classname=path, name=name)
            ET.SubElement(case, kind, message=msg)
    ET.ElementTree(root).write(xml_out, encoding="utf-8", xml_declaration=True)


if importlib.util.find_spec("pytest") is None:
    bar = "!" * 78
    msg = (f"pytest is NOT installed for {py}: the GPU correctness tests CANNOT run and the "
           "check cannot pass. Put wheels of pytest, pluggy, iniconfig, packaging and "
           "pygments (pytest >= 8.4 needs it) in WHEELS_DIR (they are installed with the "
           "others) and run it again.")
    say(bar)
    say(msg)
    say(bar)
    progress(f"NOPYTEST {msg}")
    progress("RESULT collected=0 passed=0 failed=0 errors=1 skipped=0 killed=0 notrun=0 ok=0")
    write_junit([], [("device_check::pytest", "error", msg)])
    sys.exit(1)

env = dict(os.environ)
env.pop("RK_TEST_LOG", None)
t = max(10.0, min(120.0, deadline - time.time()))
proc = subprocess.run([*base, "--collect-only", "-q"], capture_output=True, text=True, env=env,
                      timeout=t)
ids = [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
if proc.returncode not in (0, 5) or not ids:
    say(f"collection failed (rc {proc.returncode}, {len(ids)} tests):")
    print((proc.stdout + proc.stderr)[-4000:])
    progress(f"RESULT collected={len(ids)} passed=0 failed=0 errors=1 skipped=0 killed=0 "
             "notrun=0 ok=0")
    write_junit([], [("device_check::collection", "error", f"pytest collection rc {proc.returncode}")])
    sys.exit(1)
xdist = workers > 1 and importlib.util.find_spec("xdist") is not None
say(f"{len(ids)} tests collected ({' '.join(args)}); "
    + (f"pytest-xdist: {workers} workers" if xdist else "one process (no pytest-xdist)")
    + f"; per-test limit {os.environ.get('RK_TEST_TIMEOUT')} s")
if dry:
    for i in ids:
        print("   ", i)
    sys.exit(0)
for i in ids:
    progress(f"QUEUED {i}")

outcome, killed, suites = {}, [], []
for attempt in (1, 2, 3):
    todo = [i for i in ids if i not in outcome and i not in killed]
    remaining = deadline - time.time()
    if not todo or remaining < 20:
        break
    junit = os.path.join(scratch, f"junit_{attempt}.xml")
    cmd = [*base, "-v", "-rfEsP", f"--junitxml={junit}"]
    if attempt > 1:  # the tests a dead process left, by node id
        cmd = [py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEsP",
               f"--junitxml={junit}", *todo]
    if xdist:
        cmd += ["-n", str(workers), "--dist", "loadgroup"]
    with open(log, "a", encoding="utf-8") as f:
        offset = f.tell()
    say(f"attempt {attempt}: {len(todo)} tests, {remaining:.0f} s left")
    p = subprocess.Popen(cmd, env=dict(os.environ, RK_TEST_LOG=log), start_new_session=True)
    timed_out = False
    try:
        rc = p.wait(timeout=remaining - 5)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGTERM)
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
        say(f"the tests step's time ran out: pytest stopped (rc {rc})")
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        lines = f.read().splitlines()
    started, session_end = [], False
    for ln in lines:
        word, _, rest = ln.partition(" ")
        nodeid = rest.split(" ", 1)[0]
        if word == "START":
            started.append(nodeid)
        elif word in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            if nodeid not in outcome or word in ("FAILED", "ERROR"):  # e.g. a failed teardown
                outcome[nodeid] = word
        elif word == "SESSION":
            session_end = True
    hung = [i for i in dict.fromkeys(started) if i not in outcome]
    why = ("the tests step ran out of time" if timed_out else
           "the test process died (hard per-test timeout or crash; stacks above in this log)")
    for i in hung:
        killed.append(i)
        progress(f"KILLED {i}: {why}")
    if os.path.exists(junit):
        try:
            suites.extend(ET.parse(junit).getroot().iter("testsuite"))
        except ET.ParseError as exc:
            say(f"unreadable junit file {junit}: {exc}")
    not_run = [i for i in ids if i not in outcome and i not in killed]
    extra = [(i, "error", f"KILLED: {why}") for i in killed]
    extra += [(i, "skipped", "NOT RUN: out of time or after a dead process") for i in not_run]
    write_junit(suites, extra)
    if session_end or timed_out or not (hung or started):
        break

counts = {k: sum(v == k for v in outcome.values()) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
not_run = [i for i in ids if i not in outcome and i not in killed]
for i in not_run:
    progress(f"NOTRUN {i}")
ok = counts["PASSED"] > 0 and not (counts["FAILED"] or counts["ERROR"] or killed or not_run)
result = (f"collected={len(ids)} passed={counts['PASSED']} failed={counts['FAILED']} "
          f"errors={counts['ERROR']} skipped={counts['SKIPPED']} killed={len(killed)} "
          f"notrun={len(not_run)} ok={int(ok)}")
progress(f"RESULT {result}")
say(("GPU TESTS OK: " if ok else "GPU TESTS NOT OK: ") + result)
sys.exit(0 if ok else 1)
PY
TESTS_RC=$?
want tests || TESTS_RC=

bench lp_rk 75 benchmarks.linear_logprob "$LP_SHAPE" rk_fused
bench lp_cce 60 benchmarks.linear_logprob "$LP_SHAPE" cce
bench rag_rk 75 benchmarks.rag_loss "$RAG_SHAPE" rk_fused
bench rag_hf 45 benchmarks.rag_loss "$RAG_SHAPE" hf_get_nll
bench rag_cce 45 benchmarks.rag_loss "$RAG_SHAPE" cce_marginalize --modes sequence_eps0,token_eps0
bench con_rk 45 benchmarks.contrastive "$CON_SHAPE" rk_fused
bench con_naive 45 benchmarks.contrastive "$CON_SHAPE" naive
bench lp_naive 30 benchmarks.linear_logprob "$LP_SHAPE" naive
bench lp_rk_alt 60 benchmarks.linear_logprob "$LP_SHAPE" "$LP_ALT_PROVIDER"
bench lp_liger 45 benchmarks.linear_logprob "$LP_SHAPE" liger
bench lp_cce_exact 40 benchmarks.linear_logprob "$LP_SHAPE" cce_exact

export STEP_LOG
RESERVE_S=0
step summary 30 "$PY" - <<'PY'
"""The summary: GPU test outcome, the GPU targets of issue 11 (PASS / FAIL / UNMEASURED), every
benchmark row, the autotune choices, the steps. Standard library only."""
import csv
import math
import os
import re

out = os.environ["OUT"]
LP, RAG, CON = (os.environ[k] for k in ("LP_SHAPE", "RAG_SHAPE", "CON_SHAPE"))
ALT = os.environ.get("LP_ALT_PROVIDER", "")


def read(name):
    try:
        with open(os.path.join(out, name), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def dims(shape):
    return {k: int(v) for k, v in (p.split("=") for p in shape.split())}


rows = []
if read("bench.csv"):
    with open(os.path.join(out, "bench.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
last = {}
for r in rows:  # the last row of each (op, provider, mode, shape)
    last[(r.get("op"), r.get("provider"), r.get("mode"), r.get("shape"))] = r


def num(r, key):
    try:
        return float(r[key]) if r is not None and r.get(key) not in (None, "") else math.nan
    except ValueError:
        return math.nan


def get(op, provider, mode, shape):
    return last.get((op, provider, mode, shape))


env = read("env.txt").splitlines()
device = next((r.get("device") for r in rows if r.get("device")), "")
gpu = next((ln[4:] for ln in env if ln.startswith("gpu ")), device or "unknown GPU")
md = [f"# rag_kernels device check: {gpu}"]
md += ["", " | ".join(ln for ln in env if ln.split(" ")[0] in
                      ("python", "torch", "triton", "transformers", "pytest", "commit"))]

tlog = read("gpu_tests.log").splitlines()
result = next((ln[7:] for ln in reversed(tlog) if ln.startswith("RESULT ")), None)
md += ["", "## GPU correctness (tests/test_gpu.py, autotuning on)", ""]
if any(ln.startswith("NOPYTEST") for ln in tlog):
    md.append("**NOT RUN: pytest is not installed** (see the tests step in the log)")
if result is None:
    md.append("**NOT RUN** (no RESULT line in gpu_tests.log)")
else:
    ok = "ok=1" in result
    md.append(f"**{'PASS' if ok else 'FAIL'}**: {result.replace(' ok=1', '').replace(' ok=0', '')}")
bad = [ln for ln in tlog if ln.split(" ", 1)[0] in ("FAILED", "ERROR", "KILLED")]
md += [f"- {ln[:400]}" for ln in bad[:30]]
if len(bad) > 30:
    md.append(f"- ... {len(bad) - 30} more in gpu_tests.log")

peak_row = get("matmul_peak", "torch_mm", "fwd", "M=8192 N=8192 K=8192")
peak = num(peak_row, "tflops")
md += ["", f"Measured bf16 matmul peak (torch.mm 8192^3, median): "
       + (f"{peak:.0f} TFLOP/s" if peak == peak else "UNMEASURED")]

targets = []


def target(what, value, ok, detail):
    verdict = "UNMEASURED" if ok is None else ("PASS" if ok else "FAIL")
    targets.append((what, detail if ok is not None else "—", verdict))


def ratio_target(what, op, num_p, den_p, mode, shape, limit, metric="median_ms", at_least=False):
    a, b = get(op, num_p, mode, shape), get(op, den_p, mode, shape)
    x, y = num(a, metric), num(b, metric)
    if not (x == x and y == y) or y == 0:
        return target(what, None, None, "")
    r = x / y
    unit = "ms" if metric == "median_ms" else "MB"
    ok = r >= limit if at_least else r <= limit
    target(what, r, ok, f"{num_p} {x:.1f} {unit} / {den_p} {y:.1f} {unit} = {r:.2f}×")


ratio_target(f"linear_logprob fwd+bwd time ≤ 1.0× Cut Cross-Entropy ({LP})", "linear_logprob",
             "rk_fused", "cce", "fwd+bwd", LP, 1.0)
ratio_target("linear_logprob fwd+bwd peak memory ≤ Cut Cross-Entropy's", "linear_logprob",
             "rk_fused", "cce", "fwd+bwd", LP, 1.0, metric="peak_mb")
tf = num(get("linear_logprob", "rk_fused", "fwd+bwd", LP), "tflops")
if tf == tf and peak == peak:
    target("linear_logprob fwd+bwd ≥ 60 % of the bf16 matmul peak (8·N·H·V flops)", tf / peak,
           tf / peak >= 0.6, f"{tf:.0f} TFLOP/s = {100 * tf / peak:.0f} % of {peak:.0f}")
else:
    target("linear_logprob fwd+bwd ≥ 60 % of the bf16 matmul peak (8·N·H·V flops)", None, None, "")
for mode in ("sequence_eps0", "sequence_eps0.1", "token_eps0", "token_eps0.1"):
    ratio_target(f"rag_loss {mode}: ≥ 3× faster than HF get_nll ({RAG})", "rag_loss",
                 "hf_get_nll", "rk_fused", mode, RAG, 3.0, at_least=True)
for mode in ("sequence_eps0", "token_eps0"):
    ratio_target(f"rag_loss {mode}: ≤ 1.1× CCE + torch marginalisation", "rag_loss", "rk_fused",
                 "cce_marginalize", mode, RAG, 1.1)
for mode in ("fwd+bwd", "fwd"):
    ratio_target(f"contrastive {mode} time ≤ 1.0× naive ({CON})", "contrastive", "rk_fused",
                 "naive", mode, CON, 1.0)
con = get("contrastive", "rk_fused", "fwd+bwd", CON)
mb = num(con, "peak_mb")
if mb == mb:
    d = dims(CON)
    # tests/test_gpu.py::contrastive_memory_bound: the backward budget max(1 % of the [B, M]
    # fp32 scores, 256 MiB) + 32 bytes per embedding element of queries and candidates + 32 MiB
    bound = (max(0.01 * d["B"] * d["M"] * 4, 256 * 2**20) + 32 * (d["B"] + d["M"]) * d["D"]
             + 32 * 2**20) / 2**20
    naive = num(get("contrastive", "naive", "fwd+bwd", CON), "peak_mb")
    extra = f"; naive {naive:.0f} MB" if naive == naive else ""
    target("contrastive fwd+bwd memory O(B + M)", mb, mb <= bound,
           f"{mb:.0f} MB ≤ bound {bound:.0f} MB (budget + 32 B·(B+M)·D){extra}")
else:
    target("contrastive fwd+bwd memory O(B + M)", None, None, "")

md += ["", "## GPU targets (issue 11; bf16)", "", "| target | measured | verdict |", "|---|---|---|"]
md += [f"| {w} | {d} | {v} |" for w, d, v in targets]

# Context rows: the other variant of our backward, Liger, CCE without filtering, naive.
ctx = []
for prov in (ALT, "naive", "liger", "cce_exact"):
    for mode in ("fwd+bwd", "fwd"):
        a, b = get("linear_logprob", "rk_fused", mode, LP), get("linear_logprob", prov, mode, LP)
        x, y = num(a, "median_ms"), num(b, "median_ms")
        if x == x and y == y and y:
            ctx.append(f"- linear_logprob {mode}: rk_fused / {prov} = {x / y:.2f}× "
                       f"({x:.1f} / {y:.1f} ms; memory {num(a, 'peak_mb'):.0f} / "
                       f"{num(b, 'peak_mb'):.0f} MB)")
if ctx:
    md += ["", "Context:", ""] + ctx

BASE = {"linear_logprob": "cce", "rag_loss": "hf_get_nll", "contrastive": "naive"}
md += ["", "## Benchmark rows (bench.csv, last of each)", "",
       "| op | provider | mode | shape | median ms | p20–p80 ms | peak MB | TFLOP/s | × baseline |",
       "|---|---|---|---|---|---|---|---|---|"]
for (op, prov, mode, shape), r in last.items():
    base = get(op, BASE.get(op, ""), mode, shape)
    x, y = num(r, "median_ms"), num(base, "median_ms")
    vs = f"{x / y:.2f}× {BASE[op]}" if op in BASE and x == x and y == y and y else ""
    md.append(f"| {op} | {prov} | {mode} | {shape} | {x:.2f} | {r.get('p20_ms', '')}–"
              f"{r.get('p80_ms', '')} | {r.get('peak_mb', '')} | {r.get('tflops', '')} | {vs} |")
if not last:
    md.append("| (no rows) | | | | | | | | |")

picks = re.findall(r"Triton autotuning for function (\w+),\s*with key as (.*?),\s*finished after "
                   r"([\d.]+)s,\s*best config selected: (.*?);", read("device_check.log"), re.S)
if picks:
    md += ["", "## Autotune choices (benchmark processes)", ""]
    md += [f"- {fn} key {key.strip()}: {cfg.strip()} ({t} s)" for fn, key, t, cfg in picks[:40]]

steps = [s for s in os.environ.get("STEP_LOG", "").split(";") if s]
md += ["", "## Steps (rc, or skipped / timeout / dry)", "", ", ".join(steps) or "none"]
# The verdicts last: the end of the output is what a short log tail shows.
chunks = [[]]
for ln in md:
    if ln.startswith("## "):
        chunks.append([])
    chunks[-1].append(ln)
ORDER = ("## Benchmark rows", "## Autotune", "## Steps", "## GPU correctness", "## GPU targets")
rank = lambda c: next((i for i, h in enumerate(ORDER) if c and c[0].startswith(h)), -1)
md = []
for c in sorted(chunks, key=rank):
    while c and not c[-1]:
        c.pop()
    while c and not c[0]:
        c.pop(0)
    md += [*c, ""] if c else []
text = "\n".join(md).strip("\n") + "\n"
with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text)
print(text)
PY

echo "=== done in $(($(date +%s) - START_S))s of the ${BUDGET_S}s budget; files in $OUT:"
ls -la "$OUT"
if [[ $MODE == dry ]]; then
    [[ $STEP_LOG == *"wheels=0;"* || $STEP_LOG != *"wheels="* ]] &&
        [[ $STEP_LOG == *"tests=0;"* || $STEP_LOG != *"tests="* ]]
    exit $?
fi
[[ -z $TESTS_RC ]] && exit 0
((TESTS_RC == 0)) && exit 0
exit 1
}

main 2>&1 | tee -a "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
