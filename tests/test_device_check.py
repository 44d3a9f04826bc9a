"""benchmarks/device_check.sh without a GPU: shell syntax, its embedded Python, --help, the
dry run (wheel install as ``pip --dry-run``, test collection), the wheel install into a scratch
folder, the tests step (outcomes from the progress log, a soft and a hard per-test timeout,
the rerun after a dead process, the merged junit XML, no pytest), the benchmark steps on CPU
at the scripts' --quick shapes, and the summary's verdicts on sample rows; the per-test
timeout and progress-log hooks of tests/conftest.py in process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from benchmarks.harness import write_rows

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "device_check.sh"
SELFTEST = os.environ.get("RK_DEVICE_CHECK_SELFTEST")


def run_script(tmp_path, *args, timeout=600, **env):
    """Run the script with OUT / SCRATCH in ``tmp_path``; returns (rc, stdout)."""
    full = dict(os.environ)
    for k in ("STEPS", "RK_TEST_LOG", "RK_TEST_TIMEOUT", "RK_TEST_TIMEOUT_GRACE"):
        full.pop(k, None)
    full.update(OUT=str(tmp_path / "out"), SCRATCH=str(tmp_path / "scratch"),
                PYTHON=sys.executable, WHEELS_DIR=str(tmp_path / "no_wheels"))  # fmt: skip
    full.update({k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def out_file(tmp_path, name) -> str:
    return (tmp_path / "out" / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- static


def test_shell_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def embedded_python() -> list[str]:
    text = SCRIPT.read_text()
    return re.findall(r"<<'PY'\n(.*?)\nPY\n", text, re.S)


def test_embedded_python_compiles():
    blocks = embedded_python()
    assert len(blocks) == 4, "env, peak, tests, summary"
    for i, code in enumerate(blocks):
        compile(code, f"device_check.sh heredoc {i}", "exec")


def test_summary_and_tests_step_use_the_standard_library_only():
    """They must run with a python that has nothing installed (the no-pytest case)."""
    blocks = embedded_python()
    stdlib = set(sys.stdlib_module_names)
    for code in (blocks[2], blocks[3]):
        for mod in re.findall(r"^(?:import|from) (\w+)", code, re.M):
            assert mod in stdlib, mod


def test_help_and_bad_argument(tmp_path):
    rc, out = run_script(tmp_path, "--help")
    assert rc == 0 and "One-shot GPU check" in out and "Exit status" in out
    rc, out = run_script(tmp_path, "--bogus")
    assert rc == 2 and "unknown argument '--bogus'" in out
    # a step name nobody runs (a typo of tests) ran nothing and exited 0; a bare --steps ran
    # the whole check; a budget that is not a number ended in a bash error
    rc, out = run_script(tmp_path, "--steps", "summary,tset", "--dry-run")
    assert rc == 2 and "--steps: unknown step 'tset'" in out, out
    rc, out = run_script(tmp_path, "--steps")
    assert rc == 2 and "--steps needs a comma-separated list" in out, out
    rc, out = run_script(tmp_path, "--steps", "summary", BUDGET_S="abc")
    assert rc == 2 and "BUDGET_S must be a whole number, got 'abc'" in out, out


# ----------------------------------------------------------------------------- wheels, dry run


def make_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, ``rk_dummy`` 0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rk_dummy-0.1-py3-none-any.whl"
    files = {
        "rk_dummy/__init__.py": "VALUE = 42\n",
        "rk_dummy-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: rk_dummy\nVersion: 0.1\n",
        "rk_dummy-0.1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "rk_dummy-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("rk_dummy-0.1.dist-info/RECORD", record)
    return path


def test_wheels_step_installs_into_scratch(tmp_path):
    make_wheel(tmp_path / "wheels")
    rc, out = run_script(tmp_path, "--steps", "wheels", WHEELS_DIR=tmp_path / "wheels")
    assert rc == 0, out
    assert (tmp_path / "scratch" / "site" / "rk_dummy" / "__init__.py").exists(), out
    rc, out = run_script(tmp_path, "--steps", "wheels")  # an empty WHEELS_DIR: a message, rc 0
    assert rc == 0 and "no wheels in" in out and "will be skipped" in out


def test_dry_run(tmp_path):
    make_wheel(tmp_path / "wheels")
    rc, out = run_script(tmp_path, "--dry-run", WHEELS_DIR=tmp_path / "wheels")
    assert rc == 0, out[-3000:]
    assert "Would install rk_dummy-0.1" in out or "Would install rk-dummy-0.1" in out, out
    assert not (tmp_path / "scratch" / "site" / "rk_dummy").exists()
    n = int(re.search(r"\[tests\] (\d+) tests collected", out).group(1))
    assert n >= 50, out[-3000:]
    for name in ("peak", "lp_rk", "lp_cce", "rag_rk", "rag_hf", "rag_cce", "con_rk", "con_naive"):
        assert f"=== {name} (dry run: not run" in out, name
    assert "--shapes N=16384 H=4096 V=128256" in out
    assert "torch" in out_file(tmp_path, "env.txt")
    summary = out_file(tmp_path, "summary.md")
    assert "UNMEASURED" in summary and "FAIL" not in summary.replace("UNMEASURED", "")


# ----------------------------------------------------------------------------- tests step


@pytest.mark.skipif(SELFTEST is None, reason="target of the tests-step checks (their subprocess)")
def test_selftest_target():
    if SELFTEST == "sleep":  # the soft limit (SIGALRM) must end this
        time.sleep(120)
    elif SELFTEST == "stuck":  # no Python handler can run: only the hard limit ends this
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(120)
    elif SELFTEST == "fail":
        raise AssertionError("planted failure")


@pytest.mark.skipif(SELFTEST is None, reason="target of the tests-step checks (their subprocess)")
def test_selftest_after():
    pass


TARGETS = "tests/test_device_check.py::test_selftest_target tests/test_device_check.py::test_selftest_after"


def run_tests_step(tmp_path, mode, workers=1, **env):
    t0 = time.monotonic()
    rc, out = run_script(tmp_path, "--steps", "tests,summary", GPU_TEST_ARGS=TARGETS,
                         RK_DEVICE_CHECK_SELFTEST=mode, RK_TEST_WORKERS=workers, **env)  # fmt: skip
    return rc, out, out_file(tmp_path, "gpu_tests.log"), time.monotonic() - t0


def junit_cases(tmp_path) -> dict[str, str]:
    root = ET.parse(tmp_path / "out" / "gpu_tests.xml").getroot()
    cases = {}
    for case in root.iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        cases[case.get("name")] = kind
    return cases


def test_tests_step_soft_timeout_fails_the_test_and_goes_on(tmp_path):
    rc, out, log, took = run_tests_step(tmp_path, "sleep", RK_TEST_TIMEOUT=3)
    assert rc == 1, out[-3000:]
    assert "ran past its 3 s limit" in log, log
    assert re.search(r"^FAILED tests/test_device_check.py::test_selftest_target", log, re.M)
    assert re.search(r"^PASSED tests/test_device_check.py::test_selftest_after", log, re.M)
    assert "RESULT collected=2 passed=1 failed=1 errors=0 skipped=0 killed=0 notrun=0 ok=0" in log
    assert took < 100, took
    assert junit_cases(tmp_path) == {"test_selftest_target": "failure",
                                     "test_selftest_after": "passed"}  # fmt: skip
    summary = out_file(tmp_path, "summary.md")
    assert "**FAIL**: collected=2 passed=1 failed=1" in summary, summary


def test_tests_step_hard_timeout_kills_and_reruns_the_rest(tmp_path):
    rc, out, log, took = run_tests_step(
        tmp_path, "stuck", RK_TEST_TIMEOUT=1, RK_TEST_TIMEOUT_GRACE=1
    )
    assert rc == 1, out[-3000:]
    assert "Timeout (" in log and "test_selftest_target" in log  # faulthandler's stacks
    assert re.search(r"^KILLED tests/test_device_check.py::test_selftest_target: the test "
                     r"process died", log, re.M), log  # fmt: skip
    assert re.search(r"^PASSED tests/test_device_check.py::test_selftest_after", log, re.M), log
    assert "RESULT collected=2 passed=1 failed=0 errors=0 skipped=0 killed=1 notrun=0 ok=0" in log
    assert "attempt 2: 1 tests" in out
    assert took < 100, took
    cases = junit_cases(tmp_path)
    assert cases["test_selftest_target"] == "error" and cases["test_selftest_after"] == "passed"


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("xdist") is None, reason="pytest-xdist not installed"
)
def test_tests_step_under_xdist(tmp_path):
    rc, out, log, _ = run_tests_step(tmp_path, "fail", workers=2)
    assert rc == 1, out[-3000:]
    assert "pytest-xdist: 2 workers" in out
    assert log.count("START tests/test_device_check.py::test_selftest_") == 2, log  # no doubles
    assert "RESULT collected=2 passed=1 failed=1 errors=0 skipped=0 killed=0 notrun=0 ok=0" in log
    rc, out, log, _ = run_tests_step(tmp_path, "pass", workers=2)
    assert rc == 0, out[-3000:]
    assert "passed=2 failed=0 errors=0 skipped=0 killed=0 notrun=0 ok=1" in log
    assert "GPU TESTS OK" in out


def test_tests_step_without_pytest_fails_loudly(tmp_path):
    wrapper = tmp_path / "python_without_site"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(0o755)
    rc, out = run_script(tmp_path, "--steps", "tests,summary", PYTHON=wrapper)
    assert rc == 1, out
    assert "pytest is NOT installed" in out and "CANNOT run" in out
    assert "ok=0" in out_file(tmp_path, "gpu_tests.log")
    assert junit_cases(tmp_path) == {"pytest": "error"}
    assert "NOT RUN: pytest is not installed" in out_file(tmp_path, "summary.md")


# ----------------------------------------------------------------------------- benchmarks


def test_benchmark_steps_on_cpu(tmp_path):
    import rag_kernels as rk

    rc, out = run_script(
        tmp_path, "--steps", "lp_rk,lp_naive,con_rk,con_naive,rag_hf,rag_rk,summary",
        BENCH_DEVICE="cpu", BENCH_QUICK=1, REPEATS=1, LP_SHAPE="N=67 H=33 V=517",
        RAG_SHAPE="B=2 K=3 T=9 H=17 V=101", CON_SHAPE="B=129 M=129 D=384",
    )  # fmt: skip
    assert rc == 0, out[-4000:]
    csv_text = out_file(tmp_path, "bench.csv")
    want = [("linear_logprob", "naive"), ("contrastive", "naive"), ("rag_loss", "hf_get_nll")]
    if rk.cpu_available():
        want += [("linear_logprob", "rk_fused"), ("contrastive", "rk_fused"),
                 ("rag_loss", "rk_fused")]  # fmt: skip
    for op, provider in want:
        assert f"{op},{provider}," in csv_text, (op, provider, csv_text)
    summary = out_file(tmp_path, "summary.md")
    if rk.cpu_available():
        line = next(ln for ln in summary.splitlines() if "contrastive fwd+bwd time" in ln)
        assert "rk_fused" in line and ("PASS" in line or "FAIL" in line), line
    assert "| linear_logprob | naive | fwd+bwd | N=67 H=33 V=517 |" in summary
    assert "lp_rk=0" in summary and "con_naive=0" in summary


def sample_out(tmp_path) -> Path:
    """$OUT with bench rows at the target shapes, a progress log and env.txt."""
    out = tmp_path / "out"
    out.mkdir()
    lp, rag, con = (
        "N=16384 H=4096 V=128256",
        "B=8 K=8 T=256 H=4096 V=128256",
        "B=65536 M=65536 D=768",
    )

    def row(op, provider, mode, shape, ms, mb="", tflops=""):
        return {"op": op, "provider": provider, "mode": mode, "shape": shape,
                "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mb": mb,
                "device": "NVIDIA H200", "commit": "abc", "date": "2026-12-01T00:00:00Z",
                "dtype": "bfloat16", "tflops": tflops}  # fmt: skip

    write_rows(out / "bench.csv", [
        row("matmul_peak", "torch_mm", "fwd", "M=8192 N=8192 K=8192", 1.4, tflops=700.0),
        row("linear_logprob", "rk_fused", "fwd+bwd", lp, 80.0, 2000, 380.0),
        row("linear_logprob", "cce", "fwd+bwd", lp, 100.0, 1000),
        row("linear_logprob", "rk_fused", "fwd", lp, 30.0, 100),
        row("linear_logprob", "naive", "fwd+bwd", lp, 160.0, 9000),
        row("rag_loss", "hf_get_nll", "sequence_eps0", rag, 900.0, 30000),
        row("rag_loss", "rk_fused", "sequence_eps0", rag, 250.0, 1000),
        row("rag_loss", "hf_get_nll", "token_eps0", rag, 500.0, 30000),
        row("rag_loss", "rk_fused", "token_eps0", rag, 250.0, 1000),
        row("rag_loss", "cce_marginalize", "sequence_eps0", rag, 240.0, 1200),
        row("rag_loss", "cce_marginalize", "token_eps0", rag, 200.0, 1200),
        row("contrastive", "rk_fused", "fwd+bwd", con, 40.0, 900),
        row("contrastive", "naive", "fwd+bwd", con, 50.0, 60000),
    ])  # fmt: skip
    (out / "gpu_tests.log").write_text(
        "START tests/test_gpu.py::test_a\nPASSED tests/test_gpu.py::test_a 1.0s\n"
        "START tests/test_gpu.py::test_b\nFAILED tests/test_gpu.py::test_b 2.0s: E  bad\n"
        "RESULT collected=2 passed=1 failed=1 errors=0 skipped=0 killed=0 notrun=0 ok=0\n"
    )
    (out / "env.txt").write_text("python 3.12.3\ntorch 2.11.0\ntriton 3.6.0\ngpu NVIDIA H200\n")
    (out / "device_check.log").write_text(
        "Triton autotuning for function linear_logprob_bwd_kernel,\nwith key as (4096, 128256, "
        "16384, 'torch.bfloat16'),\nfinished after 2.50s,\nbest config selected: BLOCK_N: 128, "
        "BLOCK_V: 64, num_warps: 8;\n"
    )
    return out


def verdicts(summary: str) -> dict[str, str]:
    out = {}
    for ln in summary.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2] in ("PASS", "FAIL", "UNMEASURED"):
            out[cells[0]] = cells[2]
    return out


def test_summary_verdicts_on_sample_rows(tmp_path):
    sample_out(tmp_path)
    rc, out = run_script(tmp_path, "--steps", "summary")
    assert rc == 0, out
    summary = out_file(tmp_path, "summary.md")
    assert "## GPU targets" in out  # printed too, at the end of the log
    v = verdicts(summary)
    key = lambda s: next(k for k in v if k.startswith(s))
    assert v[key("linear_logprob fwd+bwd time")] == "PASS"  # 80 / 100
    assert v[key("linear_logprob fwd+bwd peak memory")] == "FAIL"  # 2000 MB > 1000 MB
    assert v[key("linear_logprob fwd+bwd ≥ 60 %")] == "FAIL"  # 380 / 700 = 54 %
    assert v[key("rag_loss sequence_eps0: ≥ 3×")] == "PASS"  # 900 / 250 = 3.6
    assert v[key("rag_loss token_eps0: ≥ 3×")] == "FAIL"  # 500 / 250 = 2.0
    assert v[key("rag_loss sequence_eps0.1: ≥ 3×")] == "UNMEASURED"
    assert v[key("rag_loss sequence_eps0: ≤ 1.1×")] == "PASS"  # 250 / 240
    assert v[key("rag_loss token_eps0: ≤ 1.1×")] == "FAIL"  # 250 / 200
    assert v[key("contrastive fwd+bwd time")] == "PASS"  # 40 / 50
    assert v[key("contrastive fwd time")] == "UNMEASURED"
    assert v[key("contrastive fwd+bwd memory")] == "PASS"  # 900 MB <= 3360 MB
    assert "rk_fused 80.0 ms / cce 100.0 ms = 0.80×" in summary
    assert "380 TFLOP/s = 54 % of 700" in summary
    assert "**FAIL**: collected=2 passed=1 failed=1" in summary
    assert "- FAILED tests/test_gpu.py::test_b 2.0s: E  bad" in summary
    assert "linear_logprob_bwd_kernel" in summary and "BLOCK_V: 64" in summary
    assert "rk_fused / naive = 0.50×" in summary  # context row


def test_summary_contrastive_bound_matches_the_gpu_test():
    """The summary's O(B + M) memory bound is tests/test_gpu.py's contrastive_memory_bound."""
    from test_gpu import contrastive_memory_bound

    code = embedded_python()[3]
    expr = re.search(r"bound = \((.*?)\) / 2\*\*20", code, re.S).group(1)
    d = {"B": 65536, "M": 65536, "D": 768}
    assert eval(f"({expr})", {"max": max, "d": d}) == contrastive_memory_bound(65536, 65536, 768)


def test_cuda_only_providers_say_why_on_cpu():
    from benchmarks import linear_logprob, rag_loss
    from benchmarks.harness import Case

    lp = Case({"N": 8, "H": 4, "V": 16}, "fwd", "cpu", "float32")
    assert "CUDA only" in linear_logprob._cce_exact_available(lp)
    assert "CUDA" in linear_logprob._liger_available(lp)
    assert "CUDA only" in linear_logprob._rk_atomic_available(lp)
    rag = Case(dict(B=1, K=2, T=3, H=4, V=5), "sequence_eps0", "cpu", "float32")
    assert "CUDA only" in rag_loss._cce_marg_available(rag)


# ----------------------------------------------------------------------------- conftest hooks


def test_deadline_soft_limit_raises_and_disarms():
    import conftest

    with pytest.raises(conftest.TestTimeout, match="x ran past its 0.2 s limit"):
        with conftest.Deadline(0.2, 30.0, "x", 0.2):
            time.sleep(5)
    time.sleep(0.4)  # disarmed: no late alarm, and the hard limit was cancelled
    with conftest.Deadline(5.0, 30.0, "y", 5.0):
        time.sleep(0.05)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_phase_deadline_only_with_the_variable(monkeypatch):
    import conftest

    item = types.SimpleNamespace(stash={}, nodeid="t")  # pytest's Stash has setdefault too
    monkeypatch.delenv("RK_TEST_TIMEOUT", raising=False)
    assert not isinstance(conftest.phase_deadline(item), conftest.Deadline)
    monkeypatch.setenv("RK_TEST_TIMEOUT", "30")
    first = conftest.phase_deadline(item)
    assert isinstance(first, conftest.Deadline) and 29 < first.seconds <= 30
    assert first.grace == 10.0  # max(10, 30 / 4)
    time.sleep(0.2)
    assert conftest.phase_deadline(item).seconds < first.seconds  # one budget per test


def test_outcome_lines():
    import conftest

    def rep(when, outcome, longrepr=None, text=""):
        return types.SimpleNamespace(
            when=when, outcome=outcome, passed=outcome == "passed", failed=outcome == "failed",
            skipped=outcome == "skipped", longrepr=longrepr, longreprtext=text,
            nodeid="tests/x.py::t", duration=1.25,
        )  # fmt: skip

    assert conftest.outcome_line(rep("call", "passed")) == "PASSED tests/x.py::t 1.2s"
    assert conftest.outcome_line(rep("setup", "passed")) is None
    assert conftest.outcome_line(rep("teardown", "passed")) is None
    line = conftest.outcome_line(rep("call", "failed", text="x = 1\nE   AssertionError: no\nfoo"))
    assert line == "FAILED tests/x.py::t 1.2s: E   AssertionError: no"
    line = conftest.outcome_line(rep("setup", "skipped", ("f", 1, "Skipped: needs a GPU")))
    assert line == "SKIPPED tests/x.py::t 1.2s: Skipped: needs a GPU"
    assert conftest.outcome_line(rep("teardown", "failed", text="E boom")).startswith("ERROR ")


def test_progress_appends_and_is_a_noop_without_a_path(tmp_path, monkeypatch):
    import conftest

    monkeypatch.delenv("RK_TEST_LOG", raising=False)
    conftest.progress("nothing")  # no file, no error
    log = tmp_path / "p.log"
    conftest.progress("START a", str(log))
    conftest.progress("PASSED a\nsecond line", str(log))
    assert log.read_text() == "START a\nPASSED a second line\n"
